"""The approaches ace_kernels is measured against, written from the spec.

These follow ``../shared/spec/ace-lora.md`` and the issue texts: how the
reference ACE-LoRA code and common libraries compute the same functions. They
share no code with ``ace_kernels`` so that a comparison is between two
independent implementations (they double as a numeric cross-check in the
suite and in ``tests/test_benchmarks_smoke.py``).

- :class:`ReferenceLoRAQKV`: three reference LoRA linears (q, k, v). With
  dropout on, each forms the dense ``scaling * B @ A`` every step and runs
  ``drop(x) @ (BA)^T`` as an extra full GEMM.
- :class:`PeftStyleLoRAQKV`: three PEFT-style LoRA linears, each with its own
  ``nn.Dropout`` (autograd keeps the dropped copy of x and the mask).
- :func:`reference_ace_hypergraph`: dense ACE-HGNN: N x N similarity, masks,
  top-k scattered into an N x N matrix, softmax, self-loop, column-0 copy, two
  dense N x N x D matmuls, adapters; always all N rows.
- :func:`reference_label_guided_infonce`: label mask built in numpy on the host
  every step, dense B x B logits, cross-entropy both ways.
- :func:`chunked_infonce_loss`: the same loss's forward in row blocks, for sizes
  the dense one cannot reach (the B=1,000,000 check).
- :func:`open_clip_loss`: open_clip's ``ClipLoss`` (imported lazily: the GPU
  machine has no open_clip).
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LEAKY_SLOPE = 0.2  # spec section 4: Adapter(z) = Up(LeakyReLU_0.2(Down(z)))


# --------------------------------------------------------------------------- LoRA


class ReferenceLoRALinear(nn.Module):
    """One LoRA linear the way the reference code computes it.

    ``y = x W^T + b + drop(x) (s B A)^T``: the rank-r update is formed as a dense
    ``[out, in]`` matrix every step and applied with a full extra GEMM. The frozen
    ``weight``/``bias`` are buffers (no gradient), ``w_lora_A``/``w_lora_B`` trainable.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                 lora_b: torch.Tensor, *, scaling: float, dropout_p: float):
        super().__init__()
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.w_lora_A = nn.Parameter(lora_a.detach().clone())
        self.w_lora_B = nn.Parameter(lora_b.detach().clone())
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout_p) if dropout_p > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = self.scaling * (self.w_lora_B @ self.w_lora_A)  # dense [out, in] every step
        if self.dropout is not None and self.training:
            return F.linear(x, self.weight, self.bias) + F.linear(self.dropout(x), delta)
        # No dropout: the reference merges W' = W + s B A. Unlike the reference (spec section 2,
        # "reference bug") the merged weight here keeps the exact gradient of x.
        return F.linear(x, self.weight + delta, self.bias)


class PeftStyleLoRALinear(nn.Module):
    """A PEFT-style LoRA linear: frozen base, ``lora_B(lora_A(dropout(x))) * scaling``.

    Mirrors ``peft.tuners.lora.Linear.forward`` for one active adapter: each
    layer has its own ``nn.Dropout``, so autograd keeps a dropped copy of x and
    its mask per layer.
    """

    def __init__(self, weight, bias, lora_a, lora_b, *, scaling: float, dropout_p: float):
        super().__init__()
        out_features, in_features = weight.shape
        rank = lora_a.shape[0]
        self.base_layer = nn.Linear(in_features, out_features, bias=bias is not None,
                                    device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            self.base_layer.weight.copy_(weight)
            if bias is not None:
                self.base_layer.bias.copy_(bias)
        self.base_layer.requires_grad_(False)
        self.lora_A = nn.Linear(in_features, rank, bias=False, device=weight.device, dtype=weight.dtype)
        self.lora_B = nn.Linear(rank, out_features, bias=False, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            self.lora_A.weight.copy_(lora_a)
            self.lora_B.weight.copy_(lora_b)
        self.lora_dropout = nn.Dropout(dropout_p) if dropout_p > 0 else nn.Identity()
        self.scaling = scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        return result + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling


class _ThreeProjections(nn.Module):
    """q, k, v as three separate LoRA linears built from the stacked tensors of ``lora_qkv``."""

    layer_class: type = ReferenceLoRALinear

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                 lora_b: torch.Tensor, *, scaling: float, dropout_p: float):
        super().__init__()
        out = weight.shape[0] // 3
        layers = []
        for p in range(3):
            rows = slice(p * out, (p + 1) * out)
            layers.append(self.layer_class(
                weight[rows], None if bias is None else bias[rows], lora_a[p], lora_b[p],
                scaling=scaling, dropout_p=dropout_p))
        self.q_proj, self.k_proj, self.v_proj = layers

    def forward(self, x: torch.Tensor):
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def lora_parameters(self) -> list[torch.Tensor]:
        return [p for p in self.parameters() if p.requires_grad]

    def freeze_lora_a(self) -> "_ThreeProjections":
        """Freeze every A (LoRA-FA's setting: only B and the inputs get gradients); returns self."""
        for layer in (self.q_proj, self.k_proj, self.v_proj):
            a = layer.w_lora_A if isinstance(layer, ReferenceLoRALinear) else layer.lora_A.weight
            a.requires_grad_(False)
        return self

    def stacked_grads(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradients of (lora_a ``[3, r, in]``, lora_b ``[3, out, r]``) in the stacked layout."""
        a_grads, b_grads = [], []
        for layer in (self.q_proj, self.k_proj, self.v_proj):
            if isinstance(layer, ReferenceLoRALinear):
                a_grads.append(layer.w_lora_A.grad)
                b_grads.append(layer.w_lora_B.grad)
            else:
                a_grads.append(layer.lora_A.weight.grad)
                b_grads.append(layer.lora_B.weight.grad)
        return torch.stack(a_grads), torch.stack(b_grads)


class ReferenceLoRAQKV(_ThreeProjections):
    """Three reference LoRA linears (the reference splits the packed qkv into q/k/v)."""

    layer_class = ReferenceLoRALinear


class PeftStyleLoRAQKV(_ThreeProjections):
    """Three PEFT-style LoRA linears, each with its own dropout."""

    layer_class = PeftStyleLoRALinear


class FrozenBaseQKV(nn.Module):
    """The frozen base alone: torch's stacked q/k/v GEMM (forward, then dX in backward)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: torch.Tensor):
        return F.linear(x, self.weight, self.bias).chunk(3, dim=-1)


def reference_lora_qkv(x, weight, bias, lora_a, lora_b, *, scaling, dropout_p=0.0, training=False,
                       backend=None):
    """``lora_qkv``'s signature answered the reference way: three projections, dense ``s B A`` each.

    ``backend`` is accepted and ignored so that this can stand in for the op
    inside a model (see ``benchmarks/bench_model.py``).
    """
    out = weight.shape[0] // 3
    results = []
    for p in range(3):
        rows = slice(p * out, (p + 1) * out)
        w, b = weight[rows], None if bias is None else bias[rows]
        delta = scaling * (lora_b[p] @ lora_a[p])
        if training and dropout_p > 0:
            results.append(F.linear(x, w, b) + F.linear(F.dropout(x, dropout_p, True), delta))
        else:
            results.append(F.linear(x, w + delta, b))
    return tuple(results)


# --------------------------------------------------------------------------- ACE-HGNN


def _adapter_parts(adapter) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if isinstance(adapter, (tuple, list)):
        return tuple(adapter)  # type: ignore[return-value]
    return adapter.down.weight, adapter.down.bias, adapter.up.weight, adapter.up.bias


def _adapter(z: torch.Tensor, adapter) -> torch.Tensor:
    down_w, down_b, up_w, up_b = _adapter_parts(adapter)
    return F.linear(F.leaky_relu(F.linear(z, down_w, down_b), LEAKY_SLOPE), up_w, up_b)


def reference_ace_hypergraph(x: torch.Tensor, cls_attn: torch.Tensor, edge_adapter, node_adapter, *,
                             topk: int = 5, cls_only: bool = False) -> torch.Tensor:
    """Dense ACE-HGNN (spec section 4) as the reference approach computes it.

    Builds every N x N matrix for every sample and always computes all N output
    rows; ``cls_only`` only slices token 0 at the end.
    """
    batch, tokens, _ = x.shape
    neg_inf = float("-inf")
    patches = F.normalize(x[:, 1:], dim=-1)
    similarity = patches @ patches.transpose(1, 2)  # [B, N-1, N-1]
    scores = x.new_full((batch, tokens, tokens), neg_inf)
    scores[:, 0, 1:] = cls_attn
    scores[:, 1:, 1:] = similarity
    eye = torch.eye(tokens, dtype=torch.bool, device=x.device)
    scores = scores.masked_fill(eye, neg_inf)  # S[i, i] = -inf; S[i, 0] = -inf already for i >= 1
    values, index = scores.topk(topk, dim=-1)
    kept = torch.full_like(scores, neg_inf).scatter(-1, index, values)  # top-k scattered into N x N
    attention = kept.softmax(dim=-1)
    attention = attention.masked_fill(eye, 1.0)  # self-loop after the softmax
    column0 = torch.zeros_like(attention)
    column0[:, 1:, 0] = attention[:, 0, 1:]  # quirk: column 0 copies the CLS row
    attention = attention + column0
    edges = attention @ x  # E = A X
    edges = _adapter(edges, edge_adapter)
    context = attention.transpose(1, 2) @ edges  # C = A^T E'
    out = _adapter(context, node_adapter)
    return out[:, 0] if cls_only else out


def reference_ace_hypergraph_any_backend(x, cls_attn, edge_adapter, node_adapter, *, topk=5, cls_only=False,
                                         backend=None, deterministic=None):
    """:func:`reference_ace_hypergraph` with the op's ``backend`` and ``deterministic`` keywords
    accepted and ignored (the dense reference has no atomics: it is deterministic)."""
    return reference_ace_hypergraph(x, cls_attn, edge_adapter, node_adapter, topk=topk, cls_only=cls_only)


# --------------------------------------------------------------------------- label-guided InfoNCE


def _host_label_mask(labels: torch.Tensor) -> np.ndarray:
    """[B, B] bool: True where rows i != j carry equal label vectors (built in numpy, as the reference)."""
    rows = labels.detach().cpu().numpy()  # a device sync every step, as in the reference
    _, keys = np.unique(rows.reshape(rows.shape[0], -1), axis=0, return_inverse=True)
    keys = keys.reshape(-1)
    same = keys[:, None] == keys[None, :]
    np.fill_diagonal(same, False)
    return same


def reference_label_guided_infonce(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale,
                                   labels: torch.Tensor | None = None) -> torch.Tensor:
    """Dense label-guided InfoNCE (spec section 5): B x B logits, host-built mask, CE both ways."""
    logits = logit_scale * image_emb @ text_emb.t()
    if labels is not None:
        mask = torch.from_numpy(_host_label_mask(labels)).to(logits.device)
        logits = logits.masked_fill(mask, float("-inf"))
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def reference_label_guided_infonce_any_backend(image_emb, text_emb, logit_scale, labels=None, *, group=None,
                                               backend=None):
    """:func:`reference_label_guided_infonce` with the op's keywords (single process only)."""
    if group is not None:
        raise ValueError("argument 'group': the dense reference computes the local loss only; expected None")
    return reference_label_guided_infonce(image_emb, text_emb, logit_scale, labels)


def chunked_infonce_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale,
                         labels: torch.Tensor | None = None, *, block_rows: int | None = None,
                         max_seconds: float | None = None) -> float:
    """The label-guided InfoNCE loss (forward only) in row blocks, as a Python float.

    For sizes no dense reference reaches (B=1,000,000): ``block_rows`` x B fp32 logits at a
    time (at most ~2 GiB), row log-sum-exps per block and column log-sum-exps accumulated
    across blocks, sums in fp64. The embeddings are upcast to fp32 and the products run with
    tf32 allowed: tf32's 10-bit mantissa holds bf16's 8 bits, so for bf16 inputs every product
    is exact (fp32 accumulation) and this is an fp32 computation at tensor-core speed. Label rows are grouped with
    ``torch.unique`` (no code shared with ace_kernels). ``max_seconds``: after the first block
    the whole is projected from its time; ``TimeoutError`` when that exceeds it.
    """
    batch = image_emb.shape[0]
    u = image_emb.detach().float()
    t = text_emb.detach().float()
    scale = float(logit_scale.detach().float().item() if isinstance(logit_scale, torch.Tensor) else logit_scale)
    keys = None
    if labels is not None:
        keys = torch.unique(labels.detach().reshape(batch, -1), dim=0, return_inverse=True)[1]
    block = block_rows or max(128, min(4096, 2**29 // max(batch, 1)))
    row_sum = torch.zeros((), dtype=torch.float64, device=u.device)
    col_lse = torch.full((batch,), float("-inf"), dtype=torch.float32, device=u.device)
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        started = time.perf_counter()
        for index, start in enumerate(range(0, batch, block)):
            stop = min(start + block, batch)
            logits = torch.mm(u[start:stop], t.t()).mul_(scale)
            if keys is not None:
                same = keys[start:stop, None] == keys[None, :]
                same.diagonal(start).fill_(False)  # the global diagonal (the positive) stays
                logits.masked_fill_(same, float("-inf"))
                del same
            row_sum += torch.logsumexp(logits, dim=1).double().sum()
            torch.logaddexp(col_lse, torch.logsumexp(logits, dim=0), out=col_lse)
            del logits
            if index == 0 and max_seconds is not None and stop < batch:
                if u.is_cuda:
                    torch.cuda.synchronize(u.device)
                projected = (time.perf_counter() - started) * math.ceil(batch / block)
                if projected > max_seconds:
                    raise TimeoutError(f"projected {projected:.0f} s from its first block, over the "
                                       f"{max_seconds:.0f} s allowed")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    positives = torch.linalg.vecdot(u, t).double().sum() * scale
    return ((row_sum + col_lse.double().sum() - 2 * positives) / (2 * batch)).item()


def open_clip_loss():
    """open_clip's ``ClipLoss`` instance, or raise ``ImportError`` saying why it is missing."""
    try:
        from open_clip.loss import ClipLoss
    except Exception as exc:  # ImportError, or a broken torchvision underneath
        raise ImportError(f"open_clip is not importable here ({type(exc).__name__}: {exc})") from exc
    return ClipLoss()


# --------------------------------------------------------------------------- shapes


def lora_flops_fwd_bwd(m: int, k: int, out: int, r: int, projections: int = 3) -> float:
    """Useful FLOPs of a LoRA q/k/v forward+backward with frozen W (no dW).

    Forward ``2 M K P out`` (frozen GEMM) plus the rank-r path ``2 M P r (K + out)``;
    backward ``2 M P out K`` (dX through W) plus four rank-r products.
    """
    frozen = 2 * m * k * projections * out * 2
    low_rank = 2 * m * projections * r * (k + out) * 3
    return float(frozen + low_rank)


def infonce_flops_fwd_bwd(batch: int, dim: int) -> float:
    """The 8 B^2 D FLOP count issue 5 uses for forward+backward (logits 2 B^2 D, dU and dT
    4 B^2 D, and one recomputation of the logits 2 B^2 D). The Triton kernels execute 10 B^2 D
    at D=512 in 16 bits (``ace_kernels.contrastive._triton_matmul_flops``); the bench reports both."""
    return 8.0 * batch * batch * dim


def hypergraph_min_bytes(batch: int, tokens: int, dim: int, element: int, *, cls_only: bool) -> float:
    """A lower bound on bytes moved by one forward+backward (activations only; adapters are tiny).

    x is read in forward and again in backward and dx written once; the full
    output adds writing out and reading dout (both ``[B, N, D]``); cls_only adds
    ``[B, D]`` twice.
    """
    tensor = batch * tokens * dim * element
    row = batch * dim * element
    return float(3 * tensor + (2 * tensor if not cls_only else 2 * row))
