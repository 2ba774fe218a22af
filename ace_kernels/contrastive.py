"""Label-guided InfoNCE (spec section 5) in O(B) extra memory, on one device or across ranks.

For image embeddings ``u`` and text embeddings ``t`` (``[B, D]``) and a logit
multiplier ``s``, the logits are ``L = s u t^T``. A pair ``(i, j)`` with
``i != j`` whose label rows are equal (as whole vectors) is removed
(``L[i, j] = -inf``); the diagonal is always kept. With ``r_i`` the
log-sum-exp of row ``i`` and ``c_j`` that of column ``j`` of the masked
logits::

    loss = ( sum_i (r_i - L_ii) + sum_j (c_j - L_jj) ) / (2 B)

which is ``(CE(rows, target i) + CE(columns, target j)) / 2`` averaged over
the batch. Without labels this is the plain CLIP loss.

How it is computed
------------------
Labels become integer keys once per call, on the device and exactly:
``torch.unique(labels, dim=0, return_inverse=True)`` (no hashing). Two
off-diagonal entries are masked exactly when their keys are equal.

The ``B x B`` logits never exist. The forward pass walks blocks of rows and
produces ``r`` and ``c`` with running log-sum-exps; the backward pass
recomputes each block and forms the logit gradient
``G = (exp(L - r_i) + exp(L - c_j)) / (2B)`` in place, from which
``dU = s G T``, ``dT = s G^T U`` and ``ds = sum_i u_i . (G T)_i``. The positive
logits ``-s u_i . t_i`` add an ``O(B D)`` term to the same gradient buffers.

Backends: ``triton`` (GPU; the CPU interpreter when asked for explicitly) and
``torch`` (any device). The Triton forward runs one kernel twice (row LSE of
``U`` against ``T``, then of ``T`` against ``U``: the mask is symmetric), each
an online log-sum-exp over 64 x 64 similarity tiles with the key mask applied
in registers and fully masked tiles shifted by 0 (no ``inf - inf``). The
backward runs one gradient kernel twice (``dU`` then ``dT``), each recomputing
the tiles; program ``(row block, D chunk)`` owns its output rows and writes a
partial of ``ds`` that torch sums in a fixed order, so it is deterministic with
no atomics (cost: 12 B^2 D FLOPs instead of the minimal 8 B^2 D). Inputs
fp16/bf16/fp32 (fp32 dots in IEEE mode), fp32 accumulation, D <= 1024. The torch backend's extra memory is
``O(block * B + B * D)``; the block height is the private knob
``_TORCH_BLOCK_ROWS``.

Across ranks (``group=``)
-------------------------
Embeddings (and labels, so that false negatives across ranks are masked) are
all-gathered; rank ``r`` computes the row log-sum-exps of its own rows and the
column log-sum-exps of its own columns, i.e. its share ``l_r`` of the global
loss, so the work is split, not repeated. See :func:`label_guided_infonce` for
the value and gradient convention.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ace_kernels import _dispatch
from ace_kernels._checks import FLOAT_DTYPES, check_tensor

__all__ = ["label_guided_infonce", "LabelGuidedInfoNCE"]

OP_NAME = "label_guided_infonce"
_dispatch.define_op(OP_NAME, prefer=("triton", "torch"))

# Rows of the logit matrix the torch backend materialises at once. Each block
# costs about 3 * block * B * 4 bytes at its peak (logits, one exp buffer, the
# bool mask); 128 keeps B = 32768 under ~50 MiB and B = 8192 under ~13 MiB while
# the block matmul (128 x D x B) still runs at full speed on a CPU.
_TORCH_BLOCK_ROWS = 128

_LABEL_DTYPES = (
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
    torch.float16, torch.bfloat16, torch.float32, torch.float64,
)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; every other float type accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _label_keys(labels: torch.Tensor | None) -> torch.Tensor | None:
    """Integer key per row: equal keys <=> equal label rows (exact, on the device).

    ``torch.unique`` sizes its output from the data, so on a GPU it waits for
    the device once (the only host synchronisation of the single-device op).
    """
    if labels is None:
        return None
    rows = labels.reshape(labels.shape[0], -1)
    if rows.dtype == torch.bool:
        rows = rows.to(torch.uint8)
    _, inverse = torch.unique(rows, dim=0, return_inverse=True)
    return inverse


# ---------------------------------------------------------------------------
# torch backend
# ---------------------------------------------------------------------------

def _block_logits(a_block, b_part, scale, keys, a_start: int, b_start: int) -> torch.Tensor:
    """Masked logits ``scale * a_block b_part^T`` for global rows ``a_start..``, columns ``b_start..``."""
    logits = torch.mm(a_block, b_part.t())
    logits.mul_(scale)
    if keys is not None:
        same = keys[a_start:a_start + a_block.shape[0], None] == keys[None, b_start:b_start + b_part.shape[0]]
        # The global diagonal (a_start + x == b_start + y) is always kept.
        same.diagonal(a_start - b_start).fill_(False)
        logits.masked_fill_(same, float("-inf"))
    return logits


def _torch_lse_both(u, t, scale, keys, block: int):
    """Row and column log-sum-exps of the masked logits in one pass over row blocks."""
    n = u.shape[0]
    row_lse = torch.empty(n, dtype=u.dtype, device=u.device)
    col_lse = torch.full((n,), float("-inf"), dtype=u.dtype, device=u.device)
    for start in range(0, n, block):
        logits = _block_logits(u[start:start + block], t, scale, keys, start, 0)
        torch.logsumexp(logits, dim=1, out=row_lse[start:start + block])
        # logaddexp(-inf, -inf) is -inf in torch, so columns fully masked in this block stay clean.
        torch.logaddexp(col_lse, torch.logsumexp(logits, dim=0), out=col_lse)
    return row_lse, col_lse


def _torch_lse_rows(a, b, scale, keys, lo: int, hi: int, block: int):
    """Log-sum-exp over all columns for global rows ``lo..hi`` of ``scale * a b^T`` (masked)."""
    out = torch.empty(hi - lo, dtype=a.dtype, device=a.device)
    for start in range(lo, hi, block):
        stop = min(start + block, hi)
        logits = _block_logits(a[start:stop], b, scale, keys, start, 0)
        torch.logsumexp(logits, dim=1, out=out[start - lo:stop - lo])
    return out


def _torch_grad_both(u, t, scale, keys, row_lse, col_lse, coef, block: int):
    """dU, dT, ds of ``coef * (sum r + sum c)`` in one pass (single device, every row owned)."""
    n = u.shape[0]
    grad_u = torch.empty_like(u)
    grad_t = torch.zeros_like(t)
    grad_scale = torch.zeros((), dtype=u.dtype, device=u.device)
    for start in range(0, n, block):
        u_block = u[start:start + block]
        logits = _block_logits(u_block, t, scale, keys, start, 0)
        row_prob = torch.sub(logits, row_lse[start:start + block, None]).exp_()
        weights = logits.sub_(col_lse[None, :]).exp_().add_(row_prob)  # reuses the logits buffer
        del row_prob
        weights.mul_(coef)
        g_t = torch.mm(weights, t)
        # ds = sum_ij G_ij u_i.t_j = sum_i u_i . (G t)_i: no need to keep the raw similarities.
        grad_scale += torch.linalg.vecdot(g_t, u_block).sum()
        torch.mul(g_t, scale, out=grad_u[start:start + block])
        grad_t.addmm_(weights.t(), u_block)
    grad_t.mul_(scale)
    return grad_u, grad_t, grad_scale


def _torch_grad_rows(a, b, scale, keys, lse_a, lse_b, lo: int, hi: int, coef, block: int):
    """Gradient w.r.t. every row of ``a`` of ``coef * (sum_{i in lo..hi} lse_a_i + sum_{j in lo..hi} lse_b_j)``.

    ``lse_a``/``lse_b`` are full length with ``+inf`` outside ``lo..hi`` so the
    unowned softmax weights are exactly zero. Rows outside ``lo..hi`` only meet
    the owned columns, so only those are visited. Also returns this pass's
    ``sum_ij G_ij a_i . b_j`` (the logit-scale gradient over ``scale``).
    """
    n = a.shape[0]
    grad_a = torch.empty_like(a)
    grad_scale = torch.zeros((), dtype=a.dtype, device=a.device)
    for start in range(0, n, block):
        stop = min(start + block, n)
        a_block = a[start:stop]
        owned_rows = start < hi and stop > lo
        c0, c1 = (0, n) if owned_rows else (lo, hi)
        logits = _block_logits(a_block, b[c0:c1], scale, keys, start, c0)
        row_prob = torch.sub(logits, lse_a[start:stop, None]).exp_()
        weights = logits.sub_(lse_b[None, c0:c1]).exp_().add_(row_prob)
        del row_prob
        weights.mul_(coef)
        g_b = torch.mm(weights, b[c0:c1])
        grad_scale += torch.linalg.vecdot(g_b, a_block).sum()
        torch.mul(g_b, scale, out=grad_a[start:stop])
    return grad_a, grad_scale


def _positive_logit_sum(u, t, lo: int, hi: int):
    """``sum_{i in lo..hi} u_i . t_i`` (the positive logits over the multiplier)."""
    return torch.linalg.vecdot(u[lo:hi], t[lo:hi]).sum()


def _global_lse(row_lse, col_lse, n: int, lo: int, hi: int, dtype):
    """This rank's row/column LSEs placed at [lo, hi) of length-n vectors; +inf elsewhere,
    so exp(logit - lse) is 0 for the rows and columns other ranks own."""
    row_ext = torch.full((n,), float("inf"), dtype=dtype, device=row_lse.device)
    col_ext = torch.full((n,), float("inf"), dtype=dtype, device=row_lse.device)
    row_ext[lo:hi] = row_lse
    col_ext[lo:hi] = col_lse
    return row_ext, col_ext


def _add_positive_grads(grad_u, grad_t, grad_scale, u, t, scale, lo: int, hi: int, coef):
    """Add the gradient of ``-2 coef s sum_{i in lo..hi} u_i . t_i`` in place (O(B D), no new B x D buffer)."""
    step = -2 * coef * scale
    grad_u[lo:hi].addcmul_(t[lo:hi], step)
    grad_t[lo:hi].addcmul_(u[lo:hi], step)
    return grad_scale - 2 * coef * _positive_logit_sum(u, t, lo, hi)


class _TorchLossShare(torch.autograd.Function):
    """The owned share of the loss: ``(sum_{i in lo..hi} (r_i - L_ii) + sum_{j in lo..hi} (c_j - L_jj)) / (2 n)``.

    With ``lo = 0, hi = n`` this is the whole loss; across ranks each rank owns
    its slice of the global batch and the shares add up to the loss. The
    positive logits are handled inside so that each input receives a single
    gradient buffer (autograd would otherwise sum two ``B x D`` gradients).
    """

    @staticmethod
    def forward(ctx, u, t, scale, keys, lo: int, hi: int, block: int):
        n = u.shape[0]
        if lo == 0 and hi == n:
            row_lse, col_lse = _torch_lse_both(u, t, scale, keys, block)
        else:
            row_lse = _torch_lse_rows(u, t, scale, keys, lo, hi, block)
            col_lse = _torch_lse_rows(t, u, scale, keys, lo, hi, block)
        share = (row_lse.sum() + col_lse.sum() - 2 * scale * _positive_logit_sum(u, t, lo, hi)) / (2 * n)
        ctx.save_for_backward(u, t, scale, keys, row_lse, col_lse)
        ctx.lo, ctx.hi, ctx.block = lo, hi, block
        return share

    @staticmethod
    def backward(ctx, grad_share):
        u, t, scale, keys, row_lse, col_lse = ctx.saved_tensors
        lo, hi, block = ctx.lo, ctx.hi, ctx.block
        n = u.shape[0]
        coef = grad_share / (2 * n)
        if lo == 0 and hi == n:
            grad_u, grad_t, grad_scale = _torch_grad_both(u, t, scale, keys, row_lse, col_lse, coef, block)
        else:
            row_ext, col_ext = _global_lse(row_lse, col_lse, n, lo, hi, u.dtype)
            grad_u, grad_scale = _torch_grad_rows(u, t, scale, keys, row_ext, col_ext, lo, hi, coef, block)
            # The logit-scale gradient is complete after the first pass (it saw every non-zero G_ij).
            grad_t, _ = _torch_grad_rows(t, u, scale, keys, col_ext, row_ext, lo, hi, coef, block)
        grad_scale = _add_positive_grads(grad_u, grad_t, grad_scale, u, t, scale, lo, hi, coef)
        return grad_u, grad_t, grad_scale, None, None, None, None


@_dispatch.register(OP_NAME, "torch")
def _lse_share_torch(u, t, scale, keys, lo: int, hi: int):
    return _TorchLossShare.apply(u, t, scale, keys, lo, hi, _TORCH_BLOCK_ROWS)


# ---------------------------------------------------------------------------
# triton backend
# ---------------------------------------------------------------------------

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch backend still works; dispatch reports why triton cannot run
    triton = None

if triton is not None:

    @triton.jit
    def _similarity_tile(a_ptr, b_ptr, rows, cols, n_a, n_b, dim, stride_a, stride_b,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         IEEE: tl.constexpr):
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        ks = tl.arange(0, BLOCK_K)
        for k0 in range(0, dim, BLOCK_K):
            kk = k0 + ks
            a = tl.load(a_ptr + rows[:, None] * stride_a + kk[None, :],
                        mask=(rows[:, None] < n_a) & (kk[None, :] < dim), other=0.0)
            b = tl.load(b_ptr + cols[None, :] * stride_b + kk[:, None],
                        mask=(cols[None, :] < n_b) & (kk[:, None] < dim), other=0.0)
            if IEEE:
                acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(a, b)
        return acc

    @triton.jit
    def _masked_logits(sim, rows, cols, n, keys_ptr, scale, HAS_KEYS: tl.constexpr):
        logits = sim * scale
        valid = (rows[:, None] < n) & (cols[None, :] < n)
        if HAS_KEYS:
            key_r = tl.load(keys_ptr + rows, mask=rows < n, other=-1)
            key_c = tl.load(keys_ptr + cols, mask=cols < n, other=-2)
            same = (key_r[:, None] == key_c[None, :]) & (rows[:, None] != cols[None, :])
            valid = valid & (~same)
        return tl.where(valid, logits, float("-inf"))

    @triton.jit
    def _lse_rows_kernel(
        a_ptr, b_ptr, keys_ptr, scale_ptr, lse_ptr,
        row_lo, row_hi, n, dim, stride_a, stride_b,
        HAS_KEYS: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # a_ptr/b_ptr: [n, dim] row-major with row strides; rows row_lo..row_hi of a against every row of b.
        # lse_ptr: [row_hi - row_lo] fp32 output. keys_ptr: [n] int32 label keys (unused without keys).
        pid = tl.program_id(0).to(tl.int64)
        rows = row_lo + pid * BLOCK_M + tl.arange(0, BLOCK_M)
        scale = tl.load(scale_ptr).to(tl.float32)
        run_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        run_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for c0 in range(0, n, BLOCK_N):
            cols = c0 + tl.arange(0, BLOCK_N)
            sim = _similarity_tile(a_ptr, b_ptr, rows, cols, row_hi, n, dim, stride_a, stride_b,
                                   BLOCK_M, BLOCK_N, BLOCK_K, IEEE)
            logits = _masked_logits(sim, rows, cols, n, keys_ptr, scale, HAS_KEYS)
            new_max = tl.maximum(run_max, tl.max(logits, axis=1))
            # A row whose entries so far are all masked keeps max -inf: shift by 0 to avoid inf - inf.
            safe = tl.where(new_max == float("-inf"), 0.0, new_max)
            run_sum = run_sum * tl.exp(run_max - safe) + tl.sum(tl.exp(logits - safe[:, None]), axis=1)
            run_max = new_max
        # Padding rows have run_sum 0; real rows always hold their diagonal, so run_sum > 0.
        lse = run_max + tl.log(tl.where(rows < row_hi, run_sum, 1.0))
        tl.store(lse_ptr + (rows - row_lo), lse, mask=rows < row_hi)

    @triton.jit
    def _grad_rows_kernel(
        a_ptr, b_ptr, keys_ptr, scale_ptr, coef_ptr, lse_a_ptr, lse_b_ptr, grad_a_ptr, grad_scale_ptr,
        own_lo, own_hi, n, dim, stride_a, stride_b, stride_g,
        HAS_KEYS: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # Gradient w.r.t. rows of a of coef * (sum owned lse_a + sum owned lse_b); lse_* are fp32 [n]
        # with +inf outside own_lo..own_hi. Program (row block, D chunk) writes grad_a[rows, chunk]
        # (fp32, row stride stride_g) and its part of sum_i a_i . (G b)_i to grad_scale_ptr[pid].
        pid_m = tl.program_id(0).to(tl.int64)
        pid_d = tl.program_id(1).to(tl.int64)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        dcols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        scale = tl.load(scale_ptr).to(tl.float32)
        coef = tl.load(coef_ptr).to(tl.float32)
        lse_a = tl.load(lse_a_ptr + rows, mask=rows < n, other=float("inf"))
        row_start = pid_m * BLOCK_M
        owned = (row_start < own_hi) & (row_start + BLOCK_M > own_lo)
        c_lo = tl.where(owned, 0, own_lo)
        c_hi = tl.where(owned, n, own_hi)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for c0 in range(c_lo, c_hi, BLOCK_N):
            cols = c0 + tl.arange(0, BLOCK_N)
            sim = _similarity_tile(a_ptr, b_ptr, rows, cols, n, c_hi, dim, stride_a, stride_b,
                                   BLOCK_M, BLOCK_N, BLOCK_K, IEEE)
            logits = _masked_logits(sim, rows, cols, n, keys_ptr, scale, HAS_KEYS)
            lse_b = tl.load(lse_b_ptr + cols, mask=cols < c_hi, other=float("inf"))
            weights = tl.exp(logits - lse_a[:, None]) + tl.exp(logits - lse_b[None, :])
            weights = tl.where((cols[None, :] < c_hi), weights, 0.0) * coef
            b = tl.load(b_ptr + cols[:, None] * stride_b + dcols[None, :],
                        mask=(cols[:, None] < c_hi) & (dcols[None, :] < dim), other=0.0)
            if IEEE:
                acc += tl.dot(weights, b.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(weights.to(b.dtype), b)
        a_chunk = tl.load(a_ptr + rows[:, None] * stride_a + dcols[None, :],
                          mask=(rows[:, None] < n) & (dcols[None, :] < dim), other=0.0).to(tl.float32)
        partial = tl.sum(tl.sum(acc * a_chunk, axis=1), axis=0)
        tl.store(grad_scale_ptr + pid_m * tl.num_programs(1) + pid_d, partial)
        tl.store(grad_a_ptr + rows[:, None] * stride_g + dcols[None, :], acc * scale,
                 mask=(rows[:, None] < n) & (dcols[None, :] < dim))


# Tile shapes of the Triton launchers. The interpreter gets small tiles (tests are tiny);
# on a GPU, 64 x 64 tiles, K steps of 32 and a 128-wide D chunk with 8 warps compile for sm_90a
# with no spills in fp32/bf16/fp16 (4 warps or 64-wide K steps spill; see the AOT test).
_TRITON_TILES = {"gpu": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, BLOCK_D=128, num_warps=8),
                 "interpreter": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, BLOCK_D=32, num_warps=4)}


def _triton_tiles():
    return _TRITON_TILES["interpreter" if _dispatch.interpreter_enabled() else "gpu"]


def _triton_lse_rows(a, b, scale, keys, lo, hi, tiles):
    out = torch.empty(hi - lo, dtype=torch.float32, device=a.device)
    grid = (triton.cdiv(hi - lo, tiles["BLOCK_M"]),)
    _lse_rows_kernel[grid](
        a, b, keys if keys is not None else out, scale, out, lo, hi, a.shape[0], a.shape[1],
        a.stride(0), b.stride(0), HAS_KEYS=keys is not None, IEEE=a.dtype == torch.float32,
        BLOCK_M=tiles["BLOCK_M"], BLOCK_N=tiles["BLOCK_N"], BLOCK_K=tiles["BLOCK_K"], num_warps=tiles["num_warps"])
    return out


def _triton_grad_rows(a, b, scale, keys, lse_a, lse_b, lo, hi, coef, tiles):
    n, dim = a.shape
    grad_a = torch.empty(n, dim, dtype=torch.float32, device=a.device)
    grid = (triton.cdiv(n, tiles["BLOCK_M"]), triton.cdiv(dim, tiles["BLOCK_D"]))
    partial = torch.empty(grid[0] * grid[1], dtype=torch.float32, device=a.device)
    _grad_rows_kernel[grid](
        a, b, keys if keys is not None else lse_a, scale, coef, lse_a, lse_b, grad_a, partial,
        lo, hi, n, dim, a.stride(0), b.stride(0), grad_a.stride(0),
        HAS_KEYS=keys is not None, IEEE=a.dtype == torch.float32,
        BLOCK_M=tiles["BLOCK_M"], BLOCK_N=tiles["BLOCK_N"], BLOCK_K=tiles["BLOCK_K"],
        BLOCK_D=tiles["BLOCK_D"], num_warps=tiles["num_warps"])
    # Fixed-order sum of per-program partials: deterministic, no float atomics.
    return grad_a, partial.sum()


class _TritonLossShare(torch.autograd.Function):
    """Triton version of :class:`_TorchLossShare` (same value, fp32 accumulation, any input float dtype)."""

    @staticmethod
    def forward(ctx, u, t, scale, keys, lo: int, hi: int):
        if u.stride(1) != 1:
            u = u.contiguous()
        if t.stride(1) != 1:
            t = t.contiguous()
        keys32 = keys.to(torch.int32) if keys is not None else None
        scale32 = scale.detach().to(torch.float32).reshape(1)
        tiles = _triton_tiles()
        row_lse = _triton_lse_rows(u, t, scale32, keys32, lo, hi, tiles)
        col_lse = _triton_lse_rows(t, u, scale32, keys32, lo, hi, tiles)
        positives = _positive_logit_sum(u.float(), t.float(), lo, hi)
        n = u.shape[0]
        share = (row_lse.sum() + col_lse.sum() - 2 * scale32[0] * positives) / (2 * n)
        ctx.save_for_backward(u, t, scale, keys32, row_lse, col_lse)
        ctx.lo, ctx.hi = lo, hi
        return share

    @staticmethod
    def backward(ctx, grad_share):
        u, t, scale, keys32, row_lse, col_lse = ctx.saved_tensors
        lo, hi = ctx.lo, ctx.hi
        n = u.shape[0]
        tiles = _triton_tiles()
        scale32 = scale.detach().to(torch.float32).reshape(1)
        coef = (grad_share.to(torch.float32) / (2 * n)).reshape(1)
        row_ext, col_ext = _global_lse(row_lse, col_lse, n, lo, hi, torch.float32)
        grad_u, grad_scale = _triton_grad_rows(u, t, scale32, keys32, row_ext, col_ext, lo, hi, coef, tiles)
        grad_t, _ = _triton_grad_rows(t, u, scale32, keys32, col_ext, row_ext, lo, hi, coef, tiles)
        grad_scale = _add_positive_grads(grad_u, grad_t, grad_scale, u.float(), t.float(), scale32[0], lo, hi,
                                         coef[0])
        return grad_u.to(u.dtype), grad_t.to(t.dtype), grad_scale.to(scale.dtype), None, None, None


def _triton_check(u, t):
    reasons = []
    if u.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        reasons.append(f"the Triton kernels take fp16/bf16/fp32 embeddings, got {str(u.dtype).replace('torch.', '')}")
    if u.shape[1] > 1024:
        reasons.append(f"the Triton kernels take D <= 1024, got D={u.shape[1]}")
    if u.shape[0] >= 2**31:
        reasons.append("the Triton kernels index keys with int32")
    return reasons


if triton is not None:

    @_dispatch.register(OP_NAME, "triton", check=_triton_check)
    def _lse_share_triton(u, t, scale, keys, lo: int, hi: int):
        return _TritonLossShare.apply(u, t, scale, keys, lo, hi)


# ---------------------------------------------------------------------------
# distributed helpers
# ---------------------------------------------------------------------------

class _GatherRows(torch.autograd.Function):
    """All-gather rows of every rank (local sizes may differ); backward sums and slices.

    Every rank's share of the loss depends on every rank's rows, so the
    gradient of a rank's own rows is the sum over ranks of the gradients of
    the gathered copy: an all-reduce (deterministic for a fixed world size) and
    then this rank's slice.
    """

    @staticmethod
    def forward(ctx, local, group, sizes: tuple, rank: int):
        ctx.group, ctx.sizes, ctx.rank = group, sizes, rank
        return _all_gather_padded(local.contiguous(), group, sizes)

    @staticmethod
    def backward(ctx, grad_all):
        import torch.distributed as dist

        grad_all = grad_all.contiguous().clone()
        dist.all_reduce(grad_all, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.sizes[:ctx.rank])
        return grad_all[start:start + ctx.sizes[ctx.rank]], None, None, None


def _all_gather_padded(local: torch.Tensor, group, sizes: tuple) -> torch.Tensor:
    import torch.distributed as dist

    biggest = max(sizes)
    if local.shape[0] < biggest:
        pad = local.new_zeros((biggest - local.shape[0],) + tuple(local.shape[1:]))
        local = torch.cat([local, pad])
    pieces = [torch.empty_like(local) for _ in sizes]
    dist.all_gather(pieces, local, group=group)
    return torch.cat([piece[:size] for piece, size in zip(pieces, sizes)])


class _SumAcrossRanks(torch.autograd.Function):
    """Value: the sum of every rank's share. Gradient: identity (each rank backpropagates its own share)."""

    @staticmethod
    def forward(ctx, share, group):
        import torch.distributed as dist

        total = share.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        return grad_total, None


_DTYPE_CODES = {dtype: code for code, dtype in enumerate(_LABEL_DTYPES)}


def _exchange_shapes(image_emb, labels, group):
    """Local batch sizes of every rank, after checking that the ranks agree on everything else.

    One small all-gather whose result is read on the host (a synchronisation).
    Every rank sees the same table, so a mismatch raises the same error on
    every rank instead of hanging in a later collective.
    """
    import torch.distributed as dist

    world = dist.get_world_size(group)
    has_labels = labels is not None
    label_width = math.prod(labels.shape[1:]) if has_labels else -1
    row = torch.tensor(
        [image_emb.shape[0], image_emb.shape[1], int(has_labels), label_width,
         _DTYPE_CODES[image_emb.dtype], _DTYPE_CODES[labels.dtype] if has_labels else -1],
        dtype=torch.int64, device=image_emb.device)
    table = [torch.empty_like(row) for _ in range(world)]
    dist.all_gather(table, row, group=group)
    table = [r.tolist() for r in table]
    names = ("batch", "embedding dim", "labels given", "label width", "embedding dtype", "label dtype")
    for column in range(1, len(names)):
        values = [r[column] for r in table]
        if len(set(values)) > 1:
            shown = values
            if column == 4:
                shown = [str(_LABEL_DTYPES[v]).replace("torch.", "") for v in values]
            elif column == 5:
                shown = [str(_LABEL_DTYPES[v]).replace("torch.", "") if v >= 0 else None for v in values]
            raise ValueError(
                f"label_guided_infonce with group=: every rank must pass the same {names[column]}; "
                f"got {shown} on ranks 0..{world - 1}")
    return tuple(r[0] for r in table)


def _gather_labels(labels, group, sizes):
    # A common wire type that gloo and NCCL both carry and that keeps every value exact.
    if labels.dtype.is_floating_point:
        wire = labels.reshape(labels.shape[0], -1).to(torch.float64)
    else:
        wire = labels.reshape(labels.shape[0], -1).to(torch.int64)
    return _all_gather_padded(wire.contiguous(), group, sizes)


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------

def _validate(image_emb, text_emb, logit_scale, labels):
    check_tensor("image_emb", image_emb, ndim=2)
    device = image_emb.device
    check_tensor("text_emb", text_emb, ndim=2, dtypes=(image_emb.dtype,), device=device)
    if tuple(text_emb.shape) != tuple(image_emb.shape):
        raise ValueError(
            f"argument 'text_emb': expected shape {list(image_emb.shape)} (the shape of 'image_emb'), "
            f"got {list(text_emb.shape)}")
    batch, dim = image_emb.shape
    if batch < 1 or dim < 1:
        raise ValueError(f"argument 'image_emb': expected a non-empty [B, D] tensor, got shape {list(image_emb.shape)}")
    if labels is not None:
        check_tensor("labels", labels, ndim=(1, 2), dtypes=_LABEL_DTYPES, device=device)
        if labels.shape[0] != batch:
            raise ValueError(f"argument 'labels': expected {batch} rows (the batch of 'image_emb'), "
                             f"got shape {list(labels.shape)}")
    if isinstance(logit_scale, torch.Tensor):
        if logit_scale.numel() != 1:
            raise ValueError(f"argument 'logit_scale': expected a scalar, got shape {list(logit_scale.shape)}")
        check_tensor("logit_scale", logit_scale, dtypes=FLOAT_DTYPES, device=device)
    elif isinstance(logit_scale, bool) or not isinstance(logit_scale, (int, float)):
        raise ValueError(f"argument 'logit_scale': expected a float or a scalar tensor, got {type(logit_scale).__name__}")


def label_guided_infonce(image_emb, text_emb, logit_scale, labels=None, *, group=None, backend="auto"):
    """Label-guided InfoNCE loss (spec section 5) without ever forming the ``B x B`` logits.

    Parameters
    ----------
    image_emb, text_emb : torch.Tensor
        ``[B, D]`` embeddings (normally L2-normalised; not checked), same
        dtype (fp16, bf16, fp32 or fp64) and device. ``B >= 1``.
    logit_scale : torch.Tensor or float
        The logit multiplier itself (not its log), a one-element tensor (may
        require grad; its gradient keeps its dtype and shape) or a number.
    labels : torch.Tensor, optional
        ``[B, L]`` (or ``[B]``) labels of any bool/int/float dtype. Rows are
        compared as whole vectors; an off-diagonal pair with equal rows is not
        a negative. ``None`` gives the plain CLIP loss.
    group : torch.distributed.ProcessGroup, optional
        Compute the loss of the global batch (every rank's rows, concatenated
        in rank order) instead of the local one. Ranks may hold different
        local batch sizes; ``D``, label width and dtypes must agree (a
        ``ValueError`` naming the per-rank values otherwise, raised on every
        rank). ``logit_scale`` must have the same value on every rank.
    backend : {"auto", "triton", "torch"}
        ``auto`` takes Triton on a GPU and torch otherwise.

    Returns
    -------
    torch.Tensor
        The scalar loss, fp64 for fp64 embeddings and fp32 otherwise.

    Notes
    -----
    Distributed convention: every rank returns the *global* loss value.
    Backward on a rank gives its local ``image_emb``/``text_emb`` exactly the
    gradient of the global loss, and its ``logit_scale`` this rank's share of
    that gradient. Hence **summing** every parameter gradient over ranks
    (``all_reduce(SUM)``) gives exactly the single-process gradient of the
    concatenated batch, for encoder parameters and ``logit_scale`` alike.
    DDP *averages* gradients: under DDP multiply the loss by the world size
    before ``backward()`` (or all-reduce ``logit_scale.grad`` and the other
    parameters with SUM yourself). Every rank must run the backward.

    Host synchronisation: ``torch.unique`` (labels given) waits for the
    device once; with ``group`` one small shape all-gather is read on the host.

    Non-finite inputs never raise or hang: NaN or +-inf in the embeddings or
    ``logit_scale`` give a NaN (or inf) loss and NaN gradients. Labels are
    compared exactly (a NaN label row equals no other row).
    """
    _validate(image_emb, text_emb, logit_scale, labels)
    compute = _compute_dtype(image_emb.dtype)
    if isinstance(logit_scale, torch.Tensor):
        scale = logit_scale.reshape(()).to(compute)
    else:
        scale = torch.tensor(float(logit_scale), dtype=compute, device=image_emb.device)

    if group is None:
        rank, sizes = 0, (image_emb.shape[0],)
        u_all, t_all = image_emb, text_emb
        keys = _label_keys(labels)
    else:
        import torch.distributed as dist

        rank = dist.get_rank(group)
        sizes = _exchange_shapes(image_emb, labels, group)
        u_all = _GatherRows.apply(image_emb, group, sizes, rank)
        t_all = _GatherRows.apply(text_emb, group, sizes, rank)
        keys = _label_keys(_gather_labels(labels, group, sizes)) if labels is not None else None

    impl = _dispatch.select(OP_NAME, backend, [image_emb, text_emb, labels, scale],
                            args=(u_all, t_all), kwargs={})
    lo = sum(sizes[:rank])
    hi = lo + sizes[rank]
    if impl is _lse_share_torch:
        # The torch backend works in the compute dtype; Triton loads the inputs as they are.
        u_in, t_in = u_all.to(compute), t_all.to(compute)
    else:
        u_in, t_in = u_all, t_all
    share = impl(u_in, t_in, scale, keys, lo, hi)
    if group is None:
        return share
    return _SumAcrossRanks.apply(share, group)


class LabelGuidedInfoNCE(nn.Module):
    """Label-guided InfoNCE with a learnable logit multiplier (spec section 5).

    Parameters
    ----------
    logit_scale_init : float
        Initial value of the multiplier itself (for a pretrained CLIP whose
        ``logit_scale`` is stored as a log, pass ``exp`` of it). The parameter
        ``logit_scale`` is learnt directly: no log parameterisation, no clamp
        (as in the reference).
    group : torch.distributed.ProcessGroup, optional
        See :func:`label_guided_infonce`.
    backend : str
        See :func:`label_guided_infonce`.
    """

    def __init__(self, logit_scale_init: float, *, group=None, backend: str = "auto"):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale_init), dtype=torch.float32))
        self.group = group
        self.backend = backend

    def forward(self, image_emb, text_emb, labels=None):
        return label_guided_infonce(image_emb, text_emb, self.logit_scale, labels,
                                    group=self.group, backend=self.backend)

    def extra_repr(self) -> str:
        return f"logit_scale={float(self.logit_scale.detach()):.4g}"
