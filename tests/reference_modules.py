"""A small re-creation of the reference ACE-LoRA module layout, for the patch tests.

Written from the spec (/work/shared/spec/ace-lora.md, sections 2-5) and issue 8's
description of the layout, not from the reference code: attribute names and call
signatures follow the reference so that ``ace_kernels.patch`` recognises the
modules; the arithmetic is the spec's, computed densely and naively.

Deliberate difference from the reference: with dropout 0 the reference's LoRA
linear folds ``B A`` into a temporary weight and writes ``W`` back after the
forward, so its gradient of ``x`` loses the LoRA term (spec section 2, "reference
bug, not to reproduce"). :class:`ReferenceLoRALinear` here computes
``x W^T + b + s (x A^T) B^T`` directly, whose gradients are exact: the patched
forward is compared against exact gradients.

Layout:

* :class:`ReferenceLoRALinear` -- ``nn.Linear`` subclass with ``w_lora_A`` [r, in],
  ``w_lora_B`` [out, r], ``scaling = alpha / sqrt(r)``, ``r``, ``merged`` and
  ``dropout`` (``nn.Dropout`` or None); ``train(False)`` merges ``s B A`` into the
  weight and sets ``merged``, ``train(True)`` unmerges.
* :class:`ReferenceAttention` -- holds ``q_proj``, ``k_proj``, ``v_proj`` (LoRA) and
  ``proj``; can return the pre-softmax scaled scores.
* :class:`TinyCLIP` -- ``visual.trunk.get_attn_scores(images)``, ``visual.head`` and
  ``encode_text(texts, normalize=True, output_attentions=True, output_tokens=True)``
  with the reference's return conventions, at toy sizes.
* :class:`ReferenceACELoss` -- the loss module: four adapters, ``logit_scale``
  multiplier, ``args.topk``/``args.apply_gnn_encoders``, dense ``apply_ace_hgat``
  and a ``forward(clip_model, images, texts, merged_df=None, indices=None)``
  with the numpy label mask.
* :class:`ReferenceCLIPLoss` -- the plain loss ``forward(image_features, text_features,
  merged_df=None, indices=None)`` with the same mask.
* :class:`FakeFrame` -- the ``merged_df.iloc[indices, 2:].to_numpy()`` access the
  loss uses (pandas is not installed here).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class ReferenceLoRALinear(nn.Linear):
    """``y = x W^T + b + s (drop(x) A^T) B^T`` with the reference's attribute names."""

    def __init__(self, in_features, out_features, r=4, lora_alpha=1, dropout_rate=0.0, bias=True):
        super().__init__(in_features, out_features, bias=bias)
        self.r = r
        self.lora_alpha = lora_alpha
        self.scaling = lora_alpha / math.sqrt(r)  # rsLoRA-style, spec section 2
        self.merged = False
        self.fan_in_fan_out = False
        self.w_lora_A = nn.Parameter(torch.empty(r, in_features))
        self.w_lora_B = nn.Parameter(torch.zeros(out_features, r))
        nn.init.kaiming_uniform_(self.w_lora_A, a=math.sqrt(5))
        self.weight.requires_grad = False
        self.dropout = nn.Dropout(dropout_rate) if dropout_rate > 0 else None

    def delta_weight(self):
        return self.scaling * (self.w_lora_B @ self.w_lora_A)

    def train(self, mode: bool = True):
        super().train(mode)
        # Eval merges s B A into the weight (in place, not differentiable); train unmerges.
        with torch.no_grad():
            if mode and self.merged:
                self.weight.data -= self.delta_weight()
                self.merged = False
            elif not mode and not self.merged:
                self.weight.data += self.delta_weight()
                self.merged = True
        return self

    def forward(self, x):
        base = F.linear(x, self.weight, self.bias)
        if self.merged:
            return base
        lora_in = x
        if self.dropout is not None and self.training and self.dropout.p > 0:
            lora_in = self.dropout(x)
        return base + self.scaling * ((lora_in @ self.w_lora_A.t()) @ self.w_lora_B.t())


class ReferenceAttention(nn.Module):
    """Multi-head self-attention over [B, N, C] with LoRA q/k/v (timm-style computation)."""

    def __init__(self, dim, num_heads, r=4, dropout_rate=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.q_proj = ReferenceLoRALinear(dim, dim, r=r, dropout_rate=dropout_rate)
        self.k_proj = ReferenceLoRALinear(dim, dim, r=r, dropout_rate=dropout_rate)
        self.v_proj = ReferenceLoRALinear(dim, dim, r=r, dropout_rate=dropout_rate)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, key_padding_mask=None, return_attn_scores=False):
        batch, tokens, channels = x.shape
        heads = (batch, tokens, self.num_heads, self.head_dim)
        q = self.q_proj(x).reshape(heads).permute(0, 2, 1, 3)
        k = self.k_proj(x).reshape(heads).permute(0, 2, 1, 3)
        v = self.v_proj(x).reshape(heads).permute(0, 2, 1, 3)
        scores = (q * self.scale) @ k.transpose(-2, -1)  # pre-softmax, pre-mask
        masked = scores
        if key_padding_mask is not None:
            masked = scores.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
        out = (masked.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, tokens, channels)
        out = self.proj(out)
        return (out, scores) if return_attn_scores else out


class Block(nn.Module):
    def __init__(self, dim, num_heads, r, dropout_rate):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ReferenceAttention(dim, num_heads, r=r, dropout_rate=dropout_rate)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, key_padding_mask=None):
        attn_out, scores = self.attn(self.norm1(x), key_padding_mask, return_attn_scores=True)
        x = x + attn_out
        return x + self.mlp(self.norm2(x)), scores


class TinyTrunk(nn.Module):
    """ViT trunk: patch embedding, CLS token, pre-norm blocks, final norm."""

    def __init__(self, image_size, patch, width, depth, heads, r, dropout_rate):
        super().__init__()
        self.patch = patch
        self.patch_embed = nn.Linear(3 * patch * patch, width)
        self.cls_token = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + (image_size // patch) ** 2, width) * 0.02)
        self.blocks = nn.ModuleList(Block(width, heads, r, dropout_rate) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.global_pool = "token"

    def get_attn_scores(self, images):
        """All final tokens (no pooling) and the last block's pre-softmax scores [B, H, N, N]."""
        batch = images.shape[0]
        p = self.patch
        patches = images.unfold(2, p, p).unfold(3, p, p)  # [B, 3, h, w, p, p]
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(batch, -1, 3 * p * p)
        x = torch.cat([self.cls_token.expand(batch, -1, -1), self.patch_embed(patches)], dim=1) + self.pos_embed
        scores = None
        for block in self.blocks:
            x, scores = block(x)
        return self.norm(x), scores


class TinyText(nn.Module):
    def __init__(self, vocab, context, width, depth, heads, r, dropout_rate, embed_dim):
        super().__init__()
        self.token_embed = nn.Embedding(vocab, width)
        self.pos_embed = nn.Parameter(torch.randn(1, context, width) * 0.02)
        self.blocks = nn.ModuleList(Block(width, heads, r, dropout_rate) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        # The open_clip HF "mlp" projection: Linear, GELU, Linear, no biases (spec section 1).
        self.proj = nn.Sequential(nn.Linear(width, (width + embed_dim) // 2, bias=False), nn.GELU(),
                                  nn.Linear((width + embed_dim) // 2, embed_dim, bias=False))


class TinyCLIP(nn.Module):
    """Toy CLIP with the reference's call conventions."""

    def __init__(self, *, image_size=16, patch=4, width=24, depth=2, heads=2, embed_dim=20, vocab=50, context=12,
                 r=4, dropout_rate=0.0):
        super().__init__()
        self.visual = nn.Module()
        self.visual.trunk = TinyTrunk(image_size, patch, width, depth, heads, r, dropout_rate)
        self.visual.head = nn.Linear(width, embed_dim, bias=False)
        self.text = TinyText(vocab, context, width, depth, heads, r, dropout_rate, embed_dim)

    def encode_text(self, texts, normalize=False, output_attentions=False, output_tokens=False):
        text = self.text
        padding = texts != 0  # pad id 0
        x = text.token_embed(texts) + text.pos_embed[:, :texts.shape[1]]
        all_scores = []
        for block in text.blocks:
            x, scores = block(x, key_padding_mask=padding)
            all_scores.append(scores)
        tokens = text.proj(text.norm(x))  # every token, padding included (spec section 3)
        if normalize:
            tokens = F.normalize(tokens, dim=-1)
        if not output_tokens:
            tokens = tokens[:, 0]
        return (tokens, tuple(all_scores)) if output_attentions else tokens


class Adapter(nn.Module):
    """Up(LeakyReLU_0.2(Down(z))), no residual (spec section 4, step 6)."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.down = nn.Linear(dim, hidden)
        self.act = nn.LeakyReLU(0.2)
        self.up = nn.Linear(hidden, dim)
        nn.init.kaiming_normal_(self.down.weight)
        nn.init.kaiming_normal_(self.up.weight)

    def forward(self, z):
        return self.up(self.act(self.down(z)))


class ReferenceACELoss(nn.Module):
    """ACE-HGNN on the token features of both encoders, then the label-guided InfoNCE."""

    def __init__(self, dim, hidden=8, topk=3, logit_scale=10.0, apply_gnn_encoders="both"):
        super().__init__()
        self.args = SimpleNamespace(topk=topk, apply_gnn_encoders=apply_gnn_encoders, hidden_features=hidden,
                                    learnable_logit_scale=True)
        self.img_edge_adapter = Adapter(dim, hidden)
        self.text_edge_adapter = Adapter(dim, hidden)
        self.img_node_adapter = Adapter(dim, hidden)
        self.text_node_adapter = Adapter(dim, hidden)
        # The multiplier itself, learnt directly (spec section 1).
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale)))

    def apply_ace_hgat(self, features, attn_weights, encoder="img"):
        """Dense ACE-HGNN, spec section 4 steps 1-6: returns the full [B, N, D] output."""
        if encoder == "img":
            edge, node = self.img_edge_adapter, self.img_node_adapter
        elif encoder == "text":
            edge, node = self.text_edge_adapter, self.text_node_adapter
        else:
            raise ValueError(f"encoder must be img or text but given {encoder}")
        batch, tokens, _ = features.shape
        neg_inf = float("-inf")
        patches = F.normalize(features[:, 1:], dim=-1)
        scores = torch.zeros(batch, tokens, tokens, dtype=features.dtype, device=features.device)
        scores[:, 1:, 1:] = patches @ patches.transpose(1, 2)
        scores[:, 0, 1:] = attn_weights
        blocked = torch.eye(tokens, dtype=torch.bool, device=features.device).expand(batch, -1, -1).clone()
        blocked[:, 1:, 0] = True
        scores = scores.masked_fill(blocked, neg_inf)
        top_values, top_index = scores.topk(self.args.topk, dim=-1)
        sparse = torch.full_like(scores, neg_inf).scatter(-1, top_index, top_values)
        adjacency = sparse.softmax(dim=-1)
        eye = torch.eye(tokens, dtype=torch.bool, device=features.device).expand(batch, -1, -1)
        adjacency = adjacency.masked_fill(eye, 1.0)
        first_column = torch.cat([adjacency[:, :1, 0], adjacency[:, 0, 1:]], dim=1)  # A[i,0] = A[0,i], i >= 1
        adjacency = torch.cat([first_column.unsqueeze(-1), adjacency[:, :, 1:]], dim=2)
        edges = edge(adjacency @ features)
        return node(adjacency.transpose(1, 2) @ edges)

    def forward(self, clip_model, images, texts, merged_df=None, indices=None):
        clip_model.visual.trunk.global_pool = ""
        image_tokens, img_scores = clip_model.visual.trunk.get_attn_scores(images)
        image_tokens = F.normalize(clip_model.visual.head(image_tokens), dim=-1)
        text_tokens, text_scores = clip_model.encode_text(texts, normalize=True, output_attentions=True,
                                                          output_tokens=True)
        img_cls = img_scores.mean(dim=1)[:, 0, 1:]
        text_cls = text_scores[-1].mean(dim=1)[:, 0, 1:]
        mode = self.args.apply_gnn_encoders
        if mode in ("vision", "both"):
            image_tokens = F.normalize(self.apply_ace_hgat(image_tokens, img_cls, encoder="img"), dim=-1)
        if mode in ("text", "both"):
            text_tokens = F.normalize(self.apply_ace_hgat(text_tokens, text_cls, encoder="text"), dim=-1)
        logits_per_image = self.logit_scale * image_tokens[:, 0] @ text_tokens[:, 0].t()
        if logits_per_image.isnan().any():
            raise ValueError("NaN value in logits_per_image")
        return _label_guided_loss_dense(logits_per_image, merged_df, indices)


def _label_guided_loss_dense(logits_per_image, merged_df, indices):
    """(CE(rows) + CE(columns)) / 2 with the numpy false-negative mask (spec section 5)."""
    device = logits_per_image.device
    logits_per_text = logits_per_image.t()
    target = torch.arange(logits_per_image.shape[0], device=device)
    if merged_df is not None:
        rows = merged_df.iloc[indices, 2:].to_numpy()
        keep = np.ones((rows.shape[0], rows.shape[0]), dtype=bool)
        keep[(rows[:, None, :] == rows[None, :, :]).all(axis=2)] = False
        np.fill_diagonal(keep, True)
        keep = torch.from_numpy(keep).to(device)
        logits_per_image = logits_per_image.masked_fill(~keep, float("-inf"))
        logits_per_text = logits_per_text.masked_fill(~keep.t(), float("-inf"))
    return (F.cross_entropy(logits_per_image, target) + F.cross_entropy(logits_per_text, target)) / 2


class ReferenceCLIPLoss(nn.Module):
    """The reference's plain contrastive loss on [B, D] embeddings (no hypergraph)."""

    def __init__(self, logit_scale=10.0):
        super().__init__()
        self.args = SimpleNamespace(learnable_logit_scale=True)
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale)))

    def forward(self, image_features, text_features, merged_df=None, indices=None):
        return _label_guided_loss_dense(self.logit_scale * image_features @ text_features.t(), merged_df, indices)


class FakeFrame:
    """``frame.iloc[indices, 2:].to_numpy()`` over a numpy table (first two columns: ids)."""

    def __init__(self, table: np.ndarray):
        self.table = table
        self.iloc = self

    def __getitem__(self, key):
        rows, cols = key
        return SimpleNamespace(to_numpy=lambda: self.table[np.asarray(rows)][:, cols])
