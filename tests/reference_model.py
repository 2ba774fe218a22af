"""ACE-LoRA assembled the way the reference code does it, written from the spec.

Used by tests/test_model.py as an independent oracle for :class:`ace_model.ACELoRA`:

- LoRA: three separate q/k/v linears per attention layer; with dropout, the reference's
  merge-style path ``x W^T + b + drop(x) (s B A)^T`` (dense B A); without dropout,
  ``x (W + s B A)^T + b`` (the exact gradient, not the reference's dropout-0 bug);
- attention: the dense N x N softmax; the CLS row is read off the dense pre-softmax
  score matrix of the last layer (text: before the padding mask is added);
- ACE-HGNN: the dense N x N incidence matrix of spec section 4 (top-k, softmax,
  self-loops, column 0 copying row 0, E = A X, C = A^T E', no residual);
- loss: the B x B logits with the label mask built in numpy, as the reference does.

It reads the frozen weights and trainable parameters of a model (pass a deep copy so
that gradients land in separate tensors). Dropout masks, when used, are supplied by
the caller (e.g. captured from the fused op) and consumed in call order.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


class MaskFeed:
    """Hands out recorded LoRA dropout masks ([3, M, in] bool, or None) in call order."""

    def __init__(self, masks=None):
        self.masks = list(masks) if masks is not None else None
        self.position = 0

    def next(self):
        if self.masks is None:
            return None
        mask = self.masks[self.position]
        self.position += 1
        return mask


def reference_lora_qkv(x, weights, biases, lora, mask, p):
    """Three reference LoRA linears on x [M, in]; mask [3, M, in] bool or None."""
    outputs = []
    for index in range(3):
        a, b = lora.lora_a[index], lora.lora_b[index]
        if mask is not None:
            merged = (b @ a) * lora.scaling  # dense [out, in], as the reference forms it
            dropped = x * mask[index].to(x.dtype) / (1.0 - p)
            y = F.linear(x, weights[index], biases[index]) + F.linear(dropped, merged)
        else:
            y = F.linear(x, weights[index] + lora.scaling * (b @ a), biases[index])
        outputs.append(y)
    return outputs


def dense_attention(q, k, v, key_keep=None):
    """Returns (output, pre-softmax scaled scores averaged over heads [B, N, N])."""
    head_dim = q.shape[-1]
    scores = q @ k.transpose(-2, -1) / math.sqrt(head_dim)
    head_mean = scores.mean(dim=1)
    if key_keep is not None:
        scores = scores + (~key_keep).to(scores.dtype) * torch.finfo(scores.dtype).min
    probs = scores.softmax(dim=-1)
    return probs @ v, head_mean


def reference_image_tokens(model, images, feed: MaskFeed):
    trunk = model.clip.visual.trunk
    x = trunk.norm_pre(trunk._pos_embed(trunk.patch_embed(images)))
    cls_row = None
    for block, lora in zip(trunk.blocks, model.image_lora, strict=True):
        attn = block.attn
        batch, length, width = x.shape
        h = block.norm1(x).reshape(batch * length, width)
        w = attn.qkv.weight.chunk(3)
        bias = attn.qkv.bias.chunk(3)
        q, k, v = reference_lora_qkv(h, w, bias, lora, feed.next(), lora.dropout_p)
        heads = attn.num_heads
        q, k, v = (t.reshape(batch, length, heads, -1).transpose(1, 2) for t in (q, k, v))
        o, scores = dense_attention(q, k, v)
        cls_row = scores[:, 0, 1:]
        o = attn.proj(o.transpose(1, 2).reshape(batch, length, width))
        x = x + o
        x = x + block.mlp(block.norm2(x))
    x = trunk.norm(x)
    return F.normalize(model.clip.visual.head.proj(x), dim=-1), cls_row


def reference_text_tokens(model, token_ids, feed: MaskFeed):
    bert = model.clip.text.transformer
    emb = bert.embeddings
    length = token_ids.shape[1]
    x = emb.word_embeddings(token_ids) + emb.token_type_embeddings(torch.zeros_like(token_ids)) \
        + emb.position_embeddings(torch.arange(length))[None]
    x = emb.LayerNorm(x)
    key_keep = (token_ids != 0)[:, None, None, :]
    cls_row = None
    for layer, lora in zip(bert.encoder.layer, model.text_lora, strict=True):
        sa = layer.attention.self
        batch, length, width = x.shape
        flat = x.reshape(batch * length, width)
        q, k, v = reference_lora_qkv(flat, (sa.query.weight, sa.key.weight, sa.value.weight),
                                     (sa.query.bias, sa.key.bias, sa.value.bias), lora, feed.next(), lora.dropout_p)
        heads = sa.num_attention_heads
        q, k, v = (t.reshape(batch, length, heads, -1).transpose(1, 2) for t in (q, k, v))
        o, scores = dense_attention(q, k, v, key_keep)
        cls_row = scores[:, 0, 1:]
        o = o.transpose(1, 2).reshape(batch, length, width)
        a = layer.attention.output.LayerNorm(layer.attention.output.dense(o) + x)
        x = layer.output.LayerNorm(layer.output.dense(layer.intermediate(a)) + a)
    return F.normalize(model.clip.text.proj(x), dim=-1), cls_row


def _adapter(module, z):
    return module.up(F.leaky_relu(module.down(z), 0.2))


def dense_hgnn(x, cls_row, edge_adapter, node_adapter, topk):
    """Spec section 4 with the dense N x N matrix; returns the full [B, N, D] output."""
    batch, n, _ = x.shape
    patches = F.normalize(x[:, 1:], dim=-1)
    sim = x.new_zeros(batch, n, n)
    sim[:, 1:, 1:] = patches @ patches.transpose(1, 2)
    sim[:, 0, 1:] = cls_row
    blocked = torch.eye(n, dtype=torch.bool).repeat(batch, 1, 1)
    blocked[:, 1:, 0] = True
    sim = sim.masked_fill(blocked, float("-inf"))
    values, indices = torch.topk(sim, k=topk, dim=-1)
    sparse = torch.full_like(sim, float("-inf")).scatter(-1, indices, values)
    a = F.softmax(sparse, dim=-1)
    a = a.masked_fill(torch.eye(n, dtype=torch.bool)[None], 1.0)
    a = a.clone()
    a[:, 1:, 0] = a[:, 0, 1:]  # quirk: column 0 copies the CLS row
    edges = _adapter(edge_adapter, a @ x)
    return _adapter(node_adapter, a.transpose(1, 2) @ edges)


def dense_label_guided_infonce(u, t, scale, labels=None):
    logits = scale * u @ t.T
    batch = u.shape[0]
    if labels is not None:
        y = labels.detach().cpu().numpy()
        same = (y[:, None, :] == y[None, :, :]).all(-1)
        np.fill_diagonal(same, False)
        logits = logits.masked_fill(torch.from_numpy(same), float("-inf"))
    target = torch.arange(batch)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def reference_embeddings(model, images, token_ids, masks=None):
    """(image_emb, text_emb); ``masks`` in the order ACELoRA.loss makes its LoRA calls:
    the image layers, then the text layers."""
    feed = MaskFeed(masks)
    image_tokens, image_row = reference_image_tokens(model, images, feed)
    text_tokens, text_row = reference_text_tokens(model, token_ids, feed)
    topk = model.topk
    image = dense_hgnn(image_tokens, image_row, model.image_hgnn.edge_adapter, model.image_hgnn.node_adapter, topk)
    text = dense_hgnn(text_tokens, text_row, model.text_hgnn.edge_adapter, model.text_hgnn.node_adapter, topk)
    return F.normalize(image[:, 0], dim=-1), F.normalize(text[:, 0], dim=-1)


def reference_loss(model, images, token_ids, labels=None, masks=None):
    u, t = reference_embeddings(model, images, token_ids, masks)
    return dense_label_guided_infonce(u, t, model.logit_scale, labels)
