"""fp64 oracle for the LoRA ops, written from the spec (section 2), separate from the library.

One adapted linear: ``y = x W^T + b + s * (drop(x) A^T) B^T`` where ``drop`` is inverted
dropout: ``drop(x) = x * keep / (1 - p)`` with an explicit 0/1 keep mask passed in.
The stacked q/k/v op is three such linears, each with its own mask.
Everything is computed in float64 with plain autograd, so gradients come for free.
"""

from __future__ import annotations

import torch


def lora_linear_oracle(x, weight, bias, lora_a, lora_b, *, scaling, keep_mask=None, dropout_p=0.0):
    """One LoRA linear in fp64. ``keep_mask`` (same shape as ``x``, True/1 = kept) or None."""
    if keep_mask is None:
        dropped = x
    else:
        dropped = x * keep_mask.to(x.dtype) / (1.0 - dropout_p)
    y = x @ weight.transpose(0, 1)
    if bias is not None:
        y = y + bias
    lora_down = dropped @ lora_a.transpose(0, 1)
    return y + scaling * (lora_down @ lora_b.transpose(0, 1))


def lora_qkv_oracle(x, weight, bias, lora_a, lora_b, *, scaling, keep_masks=None, dropout_p=0.0):
    """Three separate LoRA linears (q, k, v) with independent masks ``keep_masks[p]``."""
    out = weight.shape[0] // 3
    outputs = []
    for p in range(3):
        rows = slice(p * out, (p + 1) * out)
        outputs.append(
            lora_linear_oracle(
                x,
                weight[rows],
                None if bias is None else bias[rows],
                lora_a[p],
                lora_b[p],
                scaling=scaling,
                keep_mask=None if keep_masks is None else keep_masks[p],
                dropout_p=dropout_p,
            )
        )
    return tuple(outputs)


def fp64_leaves(*tensors):
    """fp64 copies of the inputs as fresh leaves that keep each input's requires_grad."""
    return [
        None if t is None else t.detach().to(torch.float64).requires_grad_(t.requires_grad) for t in tensors
    ]
