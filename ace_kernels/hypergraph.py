"""ACE-HGNN hyperedge attention: ``ace_hypergraph`` and the ``ACEHypergraph`` module.

Semantics (spec section 4), per sample, with X = x[b] of shape [N, D] and the
CLS attention row c = cls_attn[b] of shape [N-1]:

1. P = normalize(X[1:]) (``F.normalize``: x / max(|x|, 1e-12)), S_pp = P P^T.
2. Scores: row 0 is c over columns 1..N-1; row i >= 1 is S_pp over the other
   patches; the diagonal and column 0 of rows i >= 1 are -inf.
3. Keep each row's top-k (``torch.topk``), softmax over them -> A.
4. A[i, i] = 1 (after the softmax).
5. A[i, 0] = A[0, i] for i >= 1 (column 0 copies the CLS row).
6. E = A X, E' = edge_adapter(E), C = A^T E', out = node_adapter(C), where
   adapter(z) = up(leaky_relu(down(z), 0.2)). No residual.

How it is computed here (every backend): A is never formed. Each row r of A
has at most k + 2 non-zeros, kept as a sparse incidence ``cols, weights`` of
shape [B, rows, k + 2]: slot 0 is the self loop (weight 1), slots 1..k the
selected columns with their softmax weights, slot k+1 column 0 with the copied
CLS weight (0 for row 0). Where N <= k + 1 a row has fewer finite scores than k
(torch.topk keeps -inf ones too, which weigh 0): every row keeps min(k, N - 1)
slots (``_row_slots``), and a patch row's slot past its N - 2 candidates is empty
(column -1, weight 0); at N = 2 a patch row has no candidate and every such slot is
empty (the torch backend only: the kernels take N >= 3). E = A X is then a weighted
gather of k + 2 rows (``gather_sum``) and C = A^T E' the adjoint scatter (``scatter_sum``); their
backward passes are each other plus a per-entry dot product (``entry_dot``).
For the full output both aggregations run in the adapters' hidden width (the
down-projections commute with A, and up_e folds into down_n), so no [B, N, D]
intermediate (E, E', C) is formed.
``cls_only`` needs only the k + 1 rows {0} u topk(c) of A and E:
C[0] = E'[0] + sum_t A[0, t] E'[t]. On the triton backend that path is fused
(``_ClsEdges``): one kernel selects the chosen patches' neighbours (norms computed
inline), one sums the k + 1 edge rows; the backward is one kernel for the per-sample
scalars and one that writes the at most 1 + k + k^2 non-zero rows of dx, each once.
Four launches instead of about twenty, and no atomics.

float16/bfloat16 x on the kernel backends: the kernels read x in its own dtype and
convert in registers (float32 accumulation); the norms and X W_de^T upcast one
batch chunk at a time, and x is saved for the backward in its own dtype. The
gradients of x's consumers meet, in float32, on a data-less stand-in for
``x.float()`` (``_Float32GradRoute``) and are rounded to x.dtype once.

Backends provide four primitives (``_Primitives``): the top-k incidence of
given rows, ``gather_sum``, ``scatter_sum`` and ``entry_dot``. Softmax
backward, the normalisation, the CLS row (a top-k of a [B, N-1] vector) and
the adapters' small GEMMs stay in torch.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import is_fake

from ace_kernels import _dispatch, _library
from ace_kernels._checks import check_bool, check_positive_int, check_tensor

__all__ = ["ace_hypergraph", "ACEHypergraph", "MAX_KERNEL_TOPK"]

OP_NAME = "ace_hypergraph"
#: Largest ``topk`` the Triton and CUDA incidence kernels keep in registers.
MAX_KERNEL_TOPK = 16
_NEG_SLOPE = 0.2
_NORM_EPS = 1e-12  # F.normalize's default, as the reference uses it


def _row_slots(topk: int, num_tokens: int) -> int:
    """Selected slots per row of A: ``topk``, or N - 1 when N = topk.

    torch.topk over a row of the N x N scores keeps k entries, but row 0 has N - 1 finite
    scores and a patch row N - 2: the -inf entries it keeps beside them weigh exactly 0 after
    the softmax (the diagonal and column 0 are overwritten by steps 4-5 anyway), so keeping
    min(k, N - 1) per row gives the same A. The CLS row then has no empty slot; a patch row
    has one (column -1, weight 0) when N <= k + 1.
    """
    return min(topk, num_tokens - 1)


# --------------------------------------------------------------------------------------
# Torch primitives
# --------------------------------------------------------------------------------------

def _flat_rows(index: torch.Tensor, rows_per_batch: int) -> torch.Tensor:
    """Row indices [B, Q] into a [B, R, D] tensor -> indices into its [B*R, D] view."""
    # Empty slots (column -1) carry weight 0; point them at row 0 of their sample.
    offsets = torch.arange(index.shape[0], device=index.device, dtype=torch.int64) * rows_per_batch
    return (index.to(torch.int64).clamp_min(0) + offsets.view(-1, *([1] * (index.dim() - 1)))).reshape(-1)


def _sparse_mm(crow, col, values, shape, dense):
    # CPU only: a block-diagonal CSR matrix (one block per sample) times the flattened rows.
    # About 2-5x faster than index_add_ / per-slot gathers on 2 cores (measured at B=64,
    # N=197, H=128). torch flags sparse CSR as beta; the warning says nothing actionable here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        matrix = torch.sparse_csr_tensor(crow, col, values, shape, device=dense.device)  # not the default device
        return torch.sparse.mm(matrix, dense)


def _sparse_form(src: torch.Tensor) -> bool:
    """Whether the torch primitives take their CSR form: on a CPU tensor with data, not traced (a fake
    one, as torch.export traces with, has no sparse kernels, and make_fx's real tracing records no
    sparse tensor: it has no strides; the slot-by-slot form traces)."""
    return src.device.type == "cpu" and not is_fake(src) and not _library._tracing_mode_active()


def _torch_gather_sum(src: torch.Tensor, cols: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """out[b, q] = sum_s weights[b, q, s] * src[b, cols[b, q, s]]."""
    if _sparse_form(src):
        return _gather_sum_sparse(src, cols, weights)
    return _gather_sum_by_slot(src, cols, weights)


def _gather_sum_sparse(src: torch.Tensor, cols: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """:func:`_torch_gather_sum` as one block-diagonal CSR product (CPU only)."""
    B, R, D = src.shape
    Q, S = cols.shape[1], cols.shape[2]
    if S == 0:  # no slot: rows of A with no entry (the neighbour slots at N = 1)
        return src.new_zeros(B, Q, D)
    crow = torch.arange(0, B * Q * S + 1, S, dtype=torch.int64, device=src.device)  # not the default device
    return _sparse_mm(crow, _flat_rows(cols, R), weights.reshape(-1).to(src.dtype), (B * Q, B * R),
                      src.reshape(B * R, D)).view(B, Q, D)


def _gather_sum_by_slot(src: torch.Tensor, cols: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """:func:`_torch_gather_sum` slot by slot (any device; the torch backend's form on a GPU)."""
    B, R, D = src.shape
    Q, S = cols.shape[1], cols.shape[2]
    flat = src.reshape(B * R, D)
    out = torch.zeros(B, Q, D, dtype=src.dtype, device=src.device)
    # One slot at a time: the [B, Q, S, D] gather would be S times the output.
    for s in range(S):
        rows = flat.index_select(0, _flat_rows(cols[:, :, s], R)).view(B, Q, D)
        out.addcmul_(rows, weights[:, :, s, None])
    return out


def _torch_scatter_sum(src: torch.Tensor, cols: torch.Tensor, weights: torch.Tensor, num_rows: int,
                       transpose=None) -> torch.Tensor:
    """out[b, cols[b, q, s]] += weights[b, q, s] * src[b, q] (the adjoint of gather_sum)."""
    if _sparse_form(src):
        return _scatter_sum_sparse(src, cols, weights, num_rows, transpose)
    return _scatter_sum_by_slot(src, cols, weights, num_rows)


def _scatter_sum_sparse(src: torch.Tensor, cols: torch.Tensor, weights: torch.Tensor, num_rows: int,
                        transpose=None) -> torch.Tensor:
    """:func:`_torch_scatter_sum` as one block-diagonal CSR product (CPU only)."""
    B, Q, D = src.shape
    S = cols.shape[2]
    # The transposed incidence as CSR: row j of sample b lists the entries (q, s) with
    # cols[b, q, s] == j, in increasing q (sorted and unique, as CSR wants).
    row_ptr, perm = transpose if transpose is not None else _transpose_csr(cols, num_rows)
    nnz = row_ptr[:, -1]
    start = torch.cumsum(nnz, 0) - nnz
    crow = torch.cat([(row_ptr[:, :num_rows] + start[:, None]).reshape(-1), nnz.sum().view(1)])
    valid = torch.arange(Q * S, device=src.device)[None, :] < nnz[:, None]
    entries = (perm + (torch.arange(B, device=src.device) * (Q * S))[:, None])[valid]
    values = weights.reshape(-1).to(src.dtype)[entries]
    return _sparse_mm(crow, entries // S, values, (B * num_rows, B * Q), src.reshape(B * Q, D)).view(
        B, num_rows, D)


def _scatter_sum_by_slot(src: torch.Tensor, cols: torch.Tensor, weights: torch.Tensor,
                         num_rows: int) -> torch.Tensor:
    """:func:`_torch_scatter_sum` slot by slot (any device; the torch backend's form on a GPU)."""
    B, Q, D = src.shape
    S = cols.shape[2]
    out = torch.zeros(B * num_rows, D, dtype=src.dtype, device=src.device)
    for s in range(S):
        # An empty slot (column -1, weight 0) adds nothing, as in the sparse form and the kernels:
        # not 0 * src (NaN for a non-finite row) into the row its clamped column points at.
        part = (src * weights[:, :, s, None]).masked_fill(cols[:, :, s, None] < 0, 0)
        # index_add_ is deterministic on CPU; on CUDA it uses atomics (the kernels do not).
        out.index_add_(0, _flat_rows(cols[:, :, s], num_rows), part.reshape(B * Q, D))
    return out.view(B, num_rows, D)


def _torch_entry_dot(a: torch.Tensor, b: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """out[b, q, s] = <a[b, q], b[b, cols[b, q, s]]> (d weights of gather_sum and scatter_sum)."""
    B, Q, D = a.shape
    R = b.shape[1]
    S = cols.shape[2]
    flat = b.reshape(B * R, D)
    out = torch.empty(B, Q, S, dtype=a.dtype, device=a.device)
    for s in range(S):
        rows = flat.index_select(0, _flat_rows(cols[:, :, s], R)).view(B, Q, D)
        out[:, :, s] = (a * rows).sum(-1)
    return out


# Scores in one [chunk, R, M] similarity block of the torch top-k (~32 MiB in float32); a chunk
# holds one sample at least.
_TOPK_CHUNK_SCORES = 8 * 2**20


def _torch_topk_rows(patches: torch.Tensor, inv_norm: torch.Tensor, rows: torch.Tensor | None, topk: int):
    """Top-k cosine neighbours of patch rows ``rows`` ([B, R] or None = all) among all patches.

    ``patches`` [B, M, D] raw features, ``inv_norm`` [B, M] = 1 / max(|patch|, eps): the cosine
    is <x_i, x_j> inv_norm_i inv_norm_j. Returns (indices [B, R, k] into the patches, softmax
    weights [B, R, k]). The own column is excluded: where a row has fewer than k candidates
    (k = M), the slot left over is empty (index -1, weight 0).
    """
    B, M, D = patches.shape
    R = M if rows is None else rows.shape[1]
    idx_out = torch.empty(B, R, topk, dtype=torch.int64, device=patches.device)
    w_out = torch.empty(B, R, topk, dtype=patches.dtype, device=patches.device)
    for start, stop in _library.spans(0, B, max(1, _TOPK_CHUNK_SCORES // max(1, R * M))):
        block = patches[start:stop]
        scale = inv_norm[start:stop]
        if rows is None:
            queries = block * scale[..., None]
            own = torch.arange(M, device=patches.device).expand(stop - start, M)
        else:
            own = rows[start:stop]
            queries = torch.gather(block, 1, own[..., None].expand(-1, -1, D)) * torch.gather(scale, 1, own)[..., None]
        sim = torch.bmm(queries, block.transpose(1, 2)) * scale[:, None, :]
        sim.scatter_(2, own[..., None], float("-inf"))
        vals, idx = sim.topk(topk, dim=-1)
        idx_out[start:stop] = idx.masked_fill(vals == float("-inf"), -1)  # the own column, kept at k = M
        w_out[start:stop] = _softmax_of_kept(vals)
    return idx_out, w_out


def _softmax_of_kept(vals: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim with 0 for a ``-inf`` entry, also in a row of nothing else.

    A patch row at N = 2 has no candidate (its scores are the diagonal and column 0, both
    ``-inf``): the reference's softmax gives that row NaN, which steps 4-5 then overwrite, so
    its top-k slots weigh 0 here. Other rows keep ``torch.softmax``'s values; the gradient
    stays finite (no NaN is formed, so none reaches the backward)."""
    empty = vals == float("-inf")
    in_empty_row = empty & empty.all(dim=-1, keepdim=True)
    return torch.softmax(vals.masked_fill(in_empty_row, 0.0), dim=-1).masked_fill(in_empty_row, 0.0)


@dataclass(frozen=True)
class _Primitives:
    name: str
    topk_rows: Callable
    gather_sum: Callable
    scatter_sum: Callable
    entry_dot: Callable
    # prepare_transpose(cols, num_rows) -> opaque object reused by scatter_sum (e.g. a CSR of
    # the transposed incidence for deterministic kernels), or None.
    prepare_transpose: Callable = lambda cols, num_rows: None


def _torch_prepare_transpose(cols, num_rows):
    return _transpose_csr(cols, num_rows) if _sparse_form(cols) else None


TORCH_PRIMITIVES = _Primitives("torch", _torch_topk_rows, _torch_gather_sum, _torch_scatter_sum, _torch_entry_dot,
                               _torch_prepare_transpose)


# --------------------------------------------------------------------------------------
# Autograd functions shared by the backends
# --------------------------------------------------------------------------------------

_SECOND_DERIVATIVE_ERROR = ("ace_hypergraph: second derivatives (create_graph=True) are not supported by its "
                            "sparse backward; only backend='torch' with cls_only=True is differentiable twice")


class _GatherSum(torch.autograd.Function):
    """E = A src for a sparse A given as (cols, weights): src [B, R, D] -> [B, Q, D].

    ``data``, when given, is the tensor the kernels read in place of ``src`` (x in its own
    half dtype, with ``src`` its float32 gradient route, see ``_Float32GradRoute``). Saved: ``src``
    for the weights' gradient, ``weights`` for src's, only as needed (``cols`` for both).
    """

    @staticmethod
    def forward(ctx, src, cols, weights, prims, transpose, data=None):
        data = src if data is None else data
        need_src, _, need_w = ctx.needs_input_grad[:3]
        ctx.save_for_backward(data if need_w else None, cols, weights if need_src else None)
        ctx.prims, ctx.transpose, ctx.src_rows = prims, transpose, data.shape[1]
        return prims.gather_sum(data, cols, weights)

    @staticmethod
    @_library.kernel_backward(_SECOND_DERIVATIVE_ERROR)
    def backward(ctx, grad_out):
        src, cols, weights = ctx.saved_tensors
        prims = ctx.prims
        grad_out = grad_out.contiguous()
        grad_src = grad_w = None
        if ctx.needs_input_grad[0]:
            if ctx.transpose is None:
                ctx.transpose = prims.prepare_transpose(cols, ctx.src_rows)
            grad_src = prims.scatter_sum(grad_out, cols, weights, ctx.src_rows, ctx.transpose)
        if ctx.needs_input_grad[2]:
            grad_w = prims.entry_dot(grad_out, src, cols)
        return grad_src, None, grad_w, None, None, None


class _ScatterSum(torch.autograd.Function):
    """C = A^T src for a sparse A given as (cols, weights): src [B, Q, D] -> [B, R, D]. Saved: ``src``
    for the weights' gradient, ``weights`` for src's, only as needed (``cols`` for both)."""

    @staticmethod
    def forward(ctx, src, cols, weights, num_rows, prims, transpose):
        need_src, _, need_w = ctx.needs_input_grad[:3]
        ctx.save_for_backward(src if need_w else None, cols, weights if need_src else None)
        ctx.prims = prims
        return prims.scatter_sum(src, cols, weights, num_rows, transpose)

    @staticmethod
    @_library.kernel_backward(_SECOND_DERIVATIVE_ERROR)
    def backward(ctx, grad_out):
        src, cols, weights = ctx.saved_tensors
        prims = ctx.prims
        grad_out = grad_out.contiguous()
        grad_src = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_src = prims.gather_sum(grad_out, cols, weights)
        if ctx.needs_input_grad[2]:
            grad_w = prims.entry_dot(src, grad_out, cols)
        return grad_src, None, grad_w, None, None, None


# Half inputs on the kernel backends: the kernels read x in its own dtype and convert in
# registers, so no float32 copy of x ([B, N, D]) is made or saved. Torch ops that need float32
# operands (the norms, the down-projection) upcast at most this many elements at a time.
_UPCAST_CHUNK_ELEMENTS = 8 * 2**20  # 32 MiB of float32


def _batch_chunks(t: torch.Tensor):
    return _library.spans(0, t.shape[0], max(1, _UPCAST_CHUNK_ELEMENTS // max(1, t[0].numel())))


class _Float32GradRoute(torch.autograd.Function):
    """Gradient route for a half-precision x whose float32 copy is never made.

    Forward returns a zero-stride float32 tensor of x's shape (4 bytes of storage): the
    consumers take it as their differentiable input but read x itself (passed beside it),
    so their float32 gradients accumulate on this node and are rounded to x.dtype once,
    as the gradient of ``x.float()`` would be. Its values (zeros) are never used.
    """

    @staticmethod
    def forward(ctx, x):
        ctx.dtype = x.dtype
        return torch.zeros((), dtype=torch.float32, device=x.device).expand(x.shape)

    @staticmethod
    @_library.kernel_backward(_SECOND_DERIVATIVE_ERROR)
    def backward(ctx, grad):
        return grad.to(ctx.dtype)


class _InvNorm(torch.autograd.Function):
    """inv_norm = 1 / max(|data|, eps) over the last dim, in ``dtype`` (F.normalize's scale).

    ``route`` is the differentiable input (``data`` itself, or its ``_Float32GradRoute``);
    ``data`` is read, upcast per batch chunk. Backward: d data = -g x / |x|^3 where
    |x| >= eps and 0 elsewhere (the gradient of the norm, the clamp and the reciprocal).
    """

    @staticmethod
    def forward(ctx, route, data, dtype):
        norm = torch.empty(data.shape[:-1], dtype=dtype, device=data.device)
        for start, stop in _batch_chunks(data):
            norm[start:stop] = torch.linalg.vector_norm(data[start:stop].to(dtype), dim=-1)
        ctx.save_for_backward(data, norm)
        return 1.0 / norm.clamp_min(_NORM_EPS)

    @staticmethod
    @_library.kernel_backward(_SECOND_DERIVATIVE_ERROR)
    def backward(ctx, grad):
        data, norm = ctx.saved_tensors
        coef = torch.where(norm >= _NORM_EPS, -grad / norm.clamp_min(_NORM_EPS) ** 3, 0.0)
        return data * coef[..., None], None, None


class _NativeLinear(torch.autograd.Function):
    """F.linear(data.float(), weight) (no bias) for a half ``data`` that is never upcast whole.

    Forward and the weight gradient upcast one batch chunk at a time; ``data`` is saved in its
    own dtype, for the weight's gradient only. The gradient goes to ``route`` (the
    ``_Float32GradRoute`` of data), in float32.
    """

    @staticmethod
    def forward(ctx, route, data, weight):
        out = torch.empty(*data.shape[:-1], weight.shape[0], dtype=weight.dtype, device=data.device)
        for start, stop in _batch_chunks(data):
            out[start:stop] = F.linear(data[start:stop].to(weight.dtype), weight)
        ctx.save_for_backward(data if ctx.needs_input_grad[2] else None, weight)
        return out

    @staticmethod
    @_library.kernel_backward(_SECOND_DERIVATIVE_ERROR)
    def backward(ctx, grad):
        data, weight = ctx.saved_tensors
        grad_route = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_route = grad @ weight
        if ctx.needs_input_grad[2]:
            grad_w = torch.zeros_like(weight)
            for start, stop in _batch_chunks(data):
                g = grad[start:stop].reshape(-1, weight.shape[0])
                grad_w.addmm_(g.T, data[start:stop].reshape(-1, data.shape[-1]).to(weight.dtype))
        return grad_route, None, grad_w


class _LinearToHalf(torch.autograd.Function):
    """F.linear(z, weight, bias).to(dtype) for a half ``dtype``, one batch chunk at a time.

    The float32 product and, in the backward, the float32 upcast of the gradient exist one
    chunk at a time, so neither a float32 [B, N, D] output nor its gradient is formed. ``z`` is
    saved for the weight's gradient only; each gradient is formed only when needed.
    """

    @staticmethod
    def forward(ctx, z, weight, bias, dtype):
        out = torch.empty(*z.shape[:-1], weight.shape[0], dtype=dtype, device=z.device)
        for start, stop in _batch_chunks(out):
            out[start:stop] = F.linear(z[start:stop], weight, bias)
        ctx.save_for_backward(z if ctx.needs_input_grad[1] else None, weight)
        return out

    @staticmethod
    @_library.kernel_backward(_SECOND_DERIVATIVE_ERROR)
    def backward(ctx, grad):
        z, weight = ctx.saved_tensors
        need_z, need_w, need_b = ctx.needs_input_grad[:3]
        grad_z = grad.new_empty((*grad.shape[:-1], weight.shape[1]), dtype=weight.dtype) if need_z else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device) if need_b else None
        for start, stop in _batch_chunks(grad):
            g = grad[start:stop].to(weight.dtype)
            if need_z:
                grad_z[start:stop] = g @ weight
            g = g.reshape(-1, weight.shape[0])
            if need_w:
                grad_w.addmm_(g.T, z[start:stop].reshape(-1, z.shape[-1]))
            if need_b:
                grad_b += g.sum(0)
        return grad_z, grad_w, grad_b, None


class _IncidenceWeights(torch.autograd.Function):
    """Softmax weights of the selected cosine similarities, with their gradient.

    Forward returns the weights computed by the incidence primitive (selection is
    piecewise constant). With s[r, t] = <x_q, x_j> n_q n_j (q = rows[r], j = idx[r, t],
    n = inv_norm), backward gives d s by the softmax backward, then
    d x_q += sum_t d s n_q n_j x_j (gather_sum), d x_j += d s n_q n_j x_q (scatter_sum),
    d n_q += sum_t d s <x_q, x_j> n_j and d n_j += d s <x_q, x_j> n_q (entry_dot); ``_InvNorm``
    takes d n through n = 1 / max(|x|, eps). No normalised copy of the patches is kept.
    ``patches`` is the gradient route, ``data`` the features read (see ``_GatherSum``).
    An empty slot (idx -1, weight 0) has d s = 0; its torch gathers and scatters use patch 0.
    """

    @staticmethod
    def forward(ctx, patches, data, inv_norm, rows, idx, weights, prims):
        ctx.save_for_backward(data, inv_norm, rows, idx, weights)
        ctx.prims = prims
        return weights

    @staticmethod
    @_library.kernel_backward(_SECOND_DERIVATIVE_ERROR)
    def backward(ctx, grad_w):
        patches, inv_norm, rows, idx, weights = ctx.saved_tensors
        prims = ctx.prims
        B, M, D = patches.shape
        all_rows = rows.numel() == 0
        grad_s = weights * (grad_w - (grad_w * weights).sum(-1, keepdim=True))
        n_q = inv_norm if all_rows else torch.gather(inv_norm, 1, rows)
        flat_idx = idx.reshape(B, -1).clamp_min(0)
        n_j = torch.gather(inv_norm, 1, flat_idx).view(idx.shape)
        coef = grad_s * n_q[..., None] * n_j
        # The kernels take strides: no contiguous copy of the (sliced) patches.
        queries = patches if all_rows else torch.gather(patches, 1, rows[..., None].expand(-1, -1, D))
        grad_q = prims.gather_sum(patches, idx, coef)
        grad_x = prims.scatter_sum(queries, idx, coef, M, None)
        dots_gs = grad_s * prims.entry_dot(queries, patches, idx)  # d s * <x_q, x_j>
        grad_n = torch.zeros(B, M, dtype=inv_norm.dtype, device=inv_norm.device)
        grad_n.scatter_add_(1, flat_idx, (dots_gs * n_q[..., None]).reshape(B, -1))
        grad_nq = (dots_gs * n_j).sum(-1)
        if all_rows:
            grad_x += grad_q
            grad_n += grad_nq
        else:
            grad_x.scatter_add_(1, rows[..., None].expand(-1, -1, D), grad_q)
            grad_n.scatter_add_(1, rows, grad_nq)
        return grad_x, None, grad_n, None, None, None, None


# --------------------------------------------------------------------------------------
# The op, written once over the primitives
# --------------------------------------------------------------------------------------

def _adapter(z, params):
    down_w, down_b, up_w, up_b = params
    return F.linear(F.leaky_relu(F.linear(z, down_w, down_b), _NEG_SLOPE), up_w, up_b)


def _hypergraph_impl(x, cls_attn, edge_params, node_params, topk, cls_only, prims: _Primitives):
    B, N, D = x.shape
    M = N - 1
    k = _row_slots(topk, N)
    compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    # Kernel backends read half inputs in their own dtype (converted in registers, float32
    # accumulation): x_data is x itself and x_route its float32 gradient route. Otherwise
    # (float32/float64 inputs, the torch backend) both are x in the compute dtype.
    native = prims.name != "torch" and x.dtype in (torch.float16, torch.bfloat16)
    if native:
        x_data, x_route = x.detach(), _Float32GradRoute.apply(x)
    else:
        x_data = x_route = x.to(compute_dtype)
    c = cls_attn.to(compute_dtype)
    edge_params = tuple(p.to(compute_dtype) for p in edge_params)
    node_params = tuple(p.to(compute_dtype) for p in node_params)
    device = x.device

    # CLS row: top-k of the attention row (torch.topk's selection), softmax.
    cls_vals, cls_idx = c.topk(k, dim=-1)  # cls_idx: patch indices in [0, M)
    cls_w = torch.softmax(cls_vals, dim=-1)

    patches, patches_data = x_route[:, 1:], x_data[:, 1:].detach()
    # normalize(x) = x / max(|x|, eps) (F.normalize), applied inside the similarity so that no
    # normalised copy of the patches is stored.
    inv_norm = _InvNorm.apply(patches, patches_data, compute_dtype)
    rows = cls_idx if cls_only else None
    with torch.no_grad():
        nbr_idx, nbr_w = prims.topk_rows(patches_data, inv_norm.detach(), rows, k)
    no_rows = torch.empty(0, dtype=torch.int64, device=device)
    nbr_w = _IncidenceWeights.apply(patches, patches_data, inv_norm, rows if rows is not None else no_rows, nbr_idx,
                                    nbr_w, prims)
    nbr_cols = torch.where(nbr_idx >= 0, nbr_idx + 1, -1)  # token columns; an empty slot stays -1

    zeros_w = torch.zeros(B, 1, 1, dtype=compute_dtype, device=device)
    ones_w = torch.ones(B, 1, 1, dtype=compute_dtype, device=device)
    zero_col = torch.zeros(B, 1, 1, dtype=torch.int64, device=device)
    # Column -1 marks a structurally empty slot (weight 0): kernels skip it, so column 0 of the
    # transposed incidence holds only its k + 1 real entries.
    empty_col = torch.full((B, 1, 1), -1, dtype=torch.int64, device=device)
    # Row 0 of A: self loop, the CLS row's top-k, an empty slot for the column-0 copy.
    cls_cols = torch.cat([zero_col, cls_idx[:, None, :] + 1, empty_col], dim=2)
    cls_wts = torch.cat([ones_w, cls_w[:, None, :], zeros_w], dim=2)

    if cls_only:
        # Rows 1 + cls_idx[t]: self loop, their top-k, column 0 with weight A[0, 1 + cls_idx[t]] = cls_w[t].
        own = cls_idx[..., None] + 1
        sel_cols = torch.cat([own, nbr_cols, zero_col.expand(B, k, 1)], dim=2)
        sel_wts = torch.cat([ones_w.expand(B, k, 1), nbr_w, cls_w[..., None]], dim=2)
        cols = torch.cat([cls_cols, sel_cols], dim=1)  # [B, k+1, k+2]
        wts = torch.cat([cls_wts, sel_wts], dim=1)
        edges = _GatherSum.apply(x_route, cols, wts, prims, None, x_data.detach())  # rows {0} u (1 + topk(c)) of E
        edges = _adapter(edges, edge_params)
        # C[0] = E'[0] + sum_t cls_w[t] E'[1 + cls_idx[t]]: a gather over the k+1 local rows.
        local = torch.arange(k + 1, device=device, dtype=torch.int64).expand(B, 1, k + 1)
        local_w = torch.cat([ones_w, cls_w[:, None, :]], dim=2)
        context = _GatherSum.apply(edges, local, local_w, prims, None)[:, 0]
        out = _adapter(context, node_params)
        return out.to(x.dtype)

    # Full incidence, [B, N, k+2].
    own = torch.arange(1, N, device=device, dtype=torch.int64).view(1, M, 1).expand(B, M, 1)
    cls_col_w = torch.zeros(B, M, dtype=compute_dtype, device=device).scatter(1, cls_idx, cls_w)
    in_cls_topk = torch.zeros(B, M, dtype=torch.bool, device=device).scatter(1, cls_idx, True)
    cls_slot = torch.where(in_cls_topk, 0, -1)[..., None]
    patch_cols = torch.cat([own, nbr_cols, cls_slot], dim=2)
    patch_wts = torch.cat([ones_w.expand(B, M, 1), nbr_w, cls_col_w[..., None]], dim=2)
    cols = torch.cat([cls_cols, patch_cols], dim=1).contiguous()
    wts = torch.cat([cls_wts, patch_wts], dim=1)
    transpose = prims.prepare_transpose(cols, N)
    # Both aggregations run in the adapters' hidden width instead of D (4x fewer bytes at
    # D=512, H=128), using linearity: down_e(A X) = A (X W_de^T) + b_de, and
    # down_n(A^T E') = A^T (E' W_dn^T) + b_dn with E' W_dn^T = h_e (W_dn W_ue)^T + W_dn b_ue,
    # so neither E nor E' nor C ([B, N, D] each) is ever formed.
    down_we, down_be, up_we, up_be = edge_params
    down_wn, down_bn, up_wn, up_bn = node_params
    if native:
        x_down = _NativeLinear.apply(x_route, x_data, down_we)  # saves x in its own dtype
    else:
        x_down = F.linear(x_data, down_we)
    hidden_e = F.leaky_relu(_GatherSum.apply(x_down.contiguous(), cols, wts, prims, transpose) + down_be, _NEG_SLOPE)
    # W_dn b_ue as a [1, H] product: F.linear of a 1-D input squeezes its mm's result in place, which
    # a selective checkpoint that keeps the matmuls refuses when it recomputes.
    folded = F.linear(hidden_e, down_wn @ up_we, F.linear(up_be[None], down_wn)[0])  # = E' W_dn^T
    hidden_n = F.leaky_relu(_ScatterSum.apply(folded.contiguous(), cols, wts, N, prims, transpose) + down_bn,
                            _NEG_SLOPE)
    if native:
        return _LinearToHalf.apply(hidden_n, up_wn, up_bn, x.dtype)  # no float32 [B, N, D] output
    return F.linear(hidden_n, up_wn, up_bn).to(x.dtype)


# --------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------
# Shared conventions: tensors are passed with their strides (no forced copies); every
# program id is cast to int64 before offset arithmetic; loads are converted to float32
# and accumulated in float32. Column indices are int64; a column of -1 is an empty slot.

try:
    import triton
    import triton.language as tl

    _TRITON_IMPORTED = True
except Exception:  # pragma: no cover - depends on the install
    _TRITON_IMPORTED = False


if _TRITON_IMPORTED:

    @triton.jit
    def _topk_incidence_kernel(
        pn_ptr, inv_norm_ptr, rows_ptr, idx_ptr, w_ptr,
        M, D, R,
        stride_pb, stride_pm, stride_pd,
        stride_nb, stride_nm,
        stride_rb, stride_rr,
        stride_ob, stride_or, stride_ok,
        TOPK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_D: tl.constexpr, HAS_ROWS: tl.constexpr, COMPUTE_NORMS: tl.constexpr = False,
        NATIVE_DOT: tl.constexpr = False,
    ):
        """Top-k cosine neighbours and their softmax weights for BLOCK_Q query rows.

        pn_ptr   [B, M, D] raw patch features (any float dtype).
        inv_norm_ptr [B, M] float32: 1 / max(|patch|, eps); cosine = dot * inv_norm_q * inv_norm_m.
            With COMPUTE_NORMS it is not read: the norms come from the same loads as the dots
            (sqrt of the float32 sum of squares), so no pass over the patches precedes the kernel.
        rows_ptr [B, R] patch index of each query (HAS_ROWS); else query r is patch r (R = M).
        idx_ptr  [B, R, TOPK] int64 out: selected patch indices (slot order unspecified); -1 in the
            slots a row with fewer than TOPK candidates (TOPK = M) leaves empty.
        w_ptr    [B, R, TOPK] float32 out: softmax of the selected similarities (0 in an empty slot).
        NATIVE_DOT (16-bit features only, never under the interpreter, whose bf16 dot is wrong):
        the tile dots take the features in their own dtype, on tensor cores with float32
        accumulation. A product of two fp16/bf16 numbers is exact in float32, so this is the
        float32 dot of the upcast features up to the order of the float32 additions (there the
        query is normalised after the dot, so tokens under ~1e-19 in magnitude, whose products
        are float32 subnormals, may score 0). Otherwise the query is normalised first, as in
        the torch and CUDA paths. The similarities of a [BLOCK_Q, BLOCK_M] tile live only in registers; a running
        top-k of BLOCK_K (>= TOPK, power of 2) slots per query absorbs each tile.
        """
        pid_q = tl.program_id(0).to(tl.int64)
        b = tl.program_id(1).to(tl.int64)
        offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
        q_mask = offs_q < R
        if HAS_ROWS:
            own = tl.load(rows_ptr + b * stride_rb + offs_q * stride_rr, mask=q_mask, other=0).to(tl.int64)
        else:
            own = offs_q
        offs_k = tl.arange(0, BLOCK_K)
        # Padding slots hold +inf so they are never the running minimum.
        best_v = (tl.where(offs_k < TOPK, float("-inf"), float("inf"))[None, :]
                  + tl.zeros([BLOCK_Q, BLOCK_K], tl.float32))
        # Column indices of the kept entries; an empty slot holds -1 - slot, so that every slot's
        # index differs and the eviction below picks exactly one. 32-bit, as the query's own index
        # (M < 2^31 tokens): int64 compares and selects take two instructions each on sm_90.
        best_i = (-1 - offs_k)[None, :] + tl.zeros([BLOCK_Q, BLOCK_K], tl.int32)
        own32 = own.to(tl.int32)
        tile_cols = tl.arange(0, BLOCK_M)
        pn_b = pn_ptr + b * stride_pb
        if COMPUTE_NORMS:
            sq_q = tl.zeros([BLOCK_Q], tl.float32)
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                q = tl.load(pn_b + own[:, None] * stride_pm + offs_d[None, :] * stride_pd,
                            mask=q_mask[:, None] & (offs_d < D)[None, :], other=0.0).to(tl.float32)
                sq_q += tl.sum(q * q, axis=1)
            inv_q = 1.0 / tl.maximum(tl.sqrt(sq_q), 1e-12)
        else:
            inv_q = tl.load(inv_norm_ptr + b * stride_nb + own * stride_nm, mask=q_mask, other=0.0)
        for m0 in range(0, M, BLOCK_M):
            offs_m = m0 + tile_cols
            m_mask = offs_m < M
            sim = tl.zeros([BLOCK_Q, BLOCK_M], tl.float32)
            sq_m = tl.zeros([BLOCK_M], tl.float32)
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                d_mask = offs_d < D
                q = tl.load(pn_b + own[:, None] * stride_pm + offs_d[None, :] * stride_pd,
                            mask=q_mask[:, None] & d_mask[None, :], other=0.0)
                kt = tl.load(pn_b + offs_m[None, :] * stride_pm + offs_d[:, None] * stride_pd,
                             mask=d_mask[:, None] & m_mask[None, :], other=0.0)
                if NATIVE_DOT:
                    sim += tl.dot(q, kt)
                else:
                    # The query normalised before the dot, as torch and CUDA do: the raw product
                    # of two tokens over ~1.8e19 in norm would overflow (inf * 0 = NaN), and of
                    # two under ~1e-22 underflow (every score 0, a tie). ieee: tf32 would
                    # change which neighbours are selected.
                    sim += tl.dot(q.to(tl.float32) * inv_q[:, None], kt.to(tl.float32), input_precision="ieee")
                if COMPUTE_NORMS:
                    kt32 = kt.to(tl.float32)
                    sq_m += tl.sum(kt32 * kt32, axis=0)
            if COMPUTE_NORMS:
                inv_m = 1.0 / tl.maximum(tl.sqrt(sq_m), 1e-12)
            else:
                inv_m = tl.load(inv_norm_ptr + b * stride_nb + offs_m * stride_nm, mask=m_mask, other=0.0)
            if NATIVE_DOT:
                # The raw 16-bit dot overflows only where a token's norm does (Cauchy-Schwarz),
                # and that token's inverse norm is 0: its cosine is 0, as torch's and CUDA's.
                overflowed = (inv_q[:, None] == 0.0) | (inv_m[None, :] == 0.0)
                sim = tl.where(overflowed, 0.0, sim * inv_q[:, None] * inv_m[None, :])
            else:
                sim = sim * inv_m[None, :]
            # NaN ranks first, as in torch.topk; its weight then comes out NaN.
            key = tl.where(sim != sim, float("inf"), sim)
            key = tl.where(m_mask[None, :] & (offs_m[None, :] != own32[:, None]), key, float("-inf"))
            for _ in tl.static_range(TOPK):
                # First position of the max / min (argmax and argmin made ptxas spill).
                top = tl.max(key, axis=1)
                top_at = tl.min(tl.where(key == top[:, None], tile_cols[None, :], BLOCK_M), axis=1)
                # Evict the highest index among the entries tied at the worst value: the columns
                # arrive in increasing order and a tie never displaces, so the lowest indices stay.
                worst = tl.min(best_v, axis=1)
                worst_i = tl.max(tl.where(best_v == worst[:, None], best_i, -1 - BLOCK_K), axis=1)
                take = top > worst
                replace = (best_i == worst_i[:, None]) & take[:, None]
                best_v = tl.where(replace, top[:, None], best_v)
                best_i = tl.where(replace, m0 + top_at[:, None], best_i)
                key = tl.where(tile_cols[None, :] == top_at[:, None], float("-inf"), key)
        slot_ok = offs_k[None, :] < TOPK
        row_max = tl.max(tl.where(slot_ok, best_v, float("-inf")), axis=1)
        e = tl.where(slot_ok, tl.exp(best_v - row_max[:, None]), 0.0)
        w = e / tl.sum(e, axis=1)[:, None]
        out_off = b * stride_ob + offs_q[:, None] * stride_or + offs_k[None, :] * stride_ok
        out_mask = q_mask[:, None] & slot_ok
        tl.store(idx_ptr + out_off, tl.maximum(best_i, -1).to(tl.int64), mask=out_mask)  # never taken: -1
        tl.store(w_ptr + out_off, w, mask=out_mask)

    @triton.jit
    def _gather_sum_kernel(
        src_ptr, cols_ptr, w_ptr, out_ptr,
        Q, D, S,
        stride_sb, stride_sr, stride_sd,
        stride_cb, stride_cq, stride_cs,
        stride_wb, stride_wq, stride_ws,
        stride_ob, stride_oq, stride_od,
        BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """out[b, q] = sum_s w[b, q, s] * src[b, cols[b, q, s]] (hyperedge aggregation E = A X).

        src [B, R, D], cols [B, Q, S] int64 (-1: empty slot), w [B, Q, S], out [B, Q, D] float32.
        Each output row reads at most S rows: no atomics, deterministic.
        """
        pid_q = tl.program_id(0).to(tl.int64)
        pid_d = tl.program_id(1).to(tl.int64)
        b = tl.program_id(2).to(tl.int64)
        offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        q_mask = offs_q < Q
        d_mask = offs_d < D
        acc = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
        for s in range(S):
            col = tl.load(cols_ptr + b * stride_cb + offs_q * stride_cq + s * stride_cs, mask=q_mask, other=-1)
            wt = tl.load(w_ptr + b * stride_wb + offs_q * stride_wq + s * stride_ws, mask=q_mask, other=0.0)
            live = q_mask & (col >= 0)
            rows = tl.load(src_ptr + b * stride_sb + col[:, None] * stride_sr + offs_d[None, :] * stride_sd,
                           mask=live[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
            acc += wt.to(tl.float32)[:, None] * rows
        tl.store(out_ptr + b * stride_ob + offs_q[:, None] * stride_oq + offs_d[None, :] * stride_od, acc,
                 mask=q_mask[:, None] & d_mask[None, :])

    @triton.jit
    def _scatter_sum_csr_kernel(
        src_ptr, w_ptr, row_ptr_ptr, perm_ptr, out_ptr,
        R, D, S,
        stride_sb, stride_sq, stride_sd,
        stride_wb, stride_rpb, stride_pb,
        stride_ob, stride_or, stride_od,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """out[b, j] = sum over entries (q, s) with cols[b, q, s] == j of w * src[b, q] (C = A^T E').

        Deterministic: each output row walks its own segment of the transposed incidence
        (row_ptr [B, R + 1], perm [B, nnz] holding q * S + s, stably sorted by column);
        w is read through its flat [B, Q * S] view (stride_wb, unit inner stride).
        """
        pid_r = tl.program_id(0).to(tl.int64)
        pid_d = tl.program_id(1).to(tl.int64)
        b = tl.program_id(2).to(tl.int64)
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        r_mask = offs_r < R
        d_mask = offs_d < D
        start = tl.load(row_ptr_ptr + b * stride_rpb + offs_r, mask=r_mask, other=0)
        count = tl.load(row_ptr_ptr + b * stride_rpb + offs_r + 1, mask=r_mask, other=0) - start
        acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
        for e in range(0, tl.max(count, axis=0)):
            live = r_mask & (e < count)
            entry = tl.load(perm_ptr + b * stride_pb + start + e, mask=live, other=0)
            q = entry // S
            wt = tl.load(w_ptr + b * stride_wb + entry, mask=live, other=0.0).to(tl.float32)
            rows = tl.load(src_ptr + b * stride_sb + q[:, None] * stride_sq + offs_d[None, :] * stride_sd,
                           mask=live[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
            acc += wt[:, None] * rows
        tl.store(out_ptr + b * stride_ob + offs_r[:, None] * stride_or + offs_d[None, :] * stride_od, acc,
                 mask=r_mask[:, None] & d_mask[None, :])

    @triton.jit
    def _scatter_sum_atomic_kernel(
        src_ptr, cols_ptr, w_ptr, out_ptr,
        Q, D, S,
        stride_sb, stride_sq, stride_sd,
        stride_cb, stride_cq, stride_cs,
        stride_wb, stride_wq, stride_ws,
        stride_ob, stride_or, stride_od,
        BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """out[b, cols[b, q, s]] += w[b, q, s] * src[b, q] with float32 atomics (opt-in C = A^T E').

        The adjoint of ``_gather_sum_kernel`` walking the same [B, Q, S] incidence, so no
        transposed incidence is built. out [B, R, D] float32 must start at zero. The order of
        the additions into a row varies between runs: not deterministic.
        """
        pid_q = tl.program_id(0).to(tl.int64)
        pid_d = tl.program_id(1).to(tl.int64)
        b = tl.program_id(2).to(tl.int64)
        offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        q_mask = offs_q < Q
        d_mask = offs_d < D
        rows = tl.load(src_ptr + b * stride_sb + offs_q[:, None] * stride_sq + offs_d[None, :] * stride_sd,
                       mask=q_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        for s in range(S):
            col = tl.load(cols_ptr + b * stride_cb + offs_q * stride_cq + s * stride_cs, mask=q_mask, other=-1)
            wt = tl.load(w_ptr + b * stride_wb + offs_q * stride_wq + s * stride_ws, mask=q_mask, other=0.0)
            live = q_mask & (col >= 0)
            tl.atomic_add(out_ptr + b * stride_ob + col[:, None] * stride_or + offs_d[None, :] * stride_od,
                          wt.to(tl.float32)[:, None] * rows, mask=live[:, None] & d_mask[None, :], sem="relaxed")

    @triton.jit
    def _entry_dot_kernel(
        a_ptr, b_ptr, cols_ptr, out_ptr,
        Q, D, S,
        stride_ab, stride_aq, stride_ad,
        stride_bb, stride_br, stride_bd,
        stride_cb, stride_cq, stride_cs,
        stride_ob, stride_oq, stride_os,
        BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """out[b, q, s] = <a[b, q], b[b, cols[b, q, s]]> (0 for empty slots): the weight gradient
        of both aggregations. a [B, Q, D], b [B, R, D], out [B, Q, S] float32."""
        pid_q = tl.program_id(0).to(tl.int64)
        bb = tl.program_id(1).to(tl.int64)
        offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
        q_mask = offs_q < Q
        for s in range(S):
            col = tl.load(cols_ptr + bb * stride_cb + offs_q * stride_cq + s * stride_cs, mask=q_mask, other=-1)
            live = q_mask & (col >= 0)
            acc = tl.zeros([BLOCK_Q], tl.float32)
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                d_mask = offs_d < D
                av = tl.load(a_ptr + bb * stride_ab + offs_q[:, None] * stride_aq + offs_d[None, :] * stride_ad,
                             mask=q_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
                bv = tl.load(b_ptr + bb * stride_bb + col[:, None] * stride_br + offs_d[None, :] * stride_bd,
                             mask=live[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
                acc += tl.sum(av * bv, axis=1)
            tl.store(out_ptr + bb * stride_ob + offs_q * stride_oq + s * stride_os, acc, mask=q_mask)

    # ---- cls_only, fused: the k + 1 hyperedges token 0 needs, and their backward ----------
    # Shapes: x [B, N, D] (any float dtype, strided), cls_idx [B, K] int64 (the CLS row's top-k,
    # patch indices), cls_w [B, K] float32 (its softmax), nbr_idx / nbr_w [B, K, K] (each
    # selected patch's own top-k; -1 / 0 in an empty slot, where K = N - 1), edges and their
    # gradient [B, K + 1, D] float32; K = TOPK. An empty slot reads its selected patch's own row
    # (weight 0; never the CLS token, which may be non-finite) and writes no row of dx.
    # The small tensors are contiguous (the launchers make them so).

    @triton.jit
    def _cls_program(D, TOPK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        """A (feature block, sample) program's sample, feature offsets and mask, slot offsets and mask."""
        pid_d = tl.program_id(0).to(tl.int64)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_t = tl.arange(0, BLOCK_T)
        return tl.program_id(1).to(tl.int64), offs_d, offs_d < D, offs_t, offs_t < TOPK

    @triton.jit
    def _cls_edges_kernel(
        x_ptr, cls_idx_ptr, cls_w_ptr, nbr_idx_ptr, nbr_w_ptr, out_ptr,
        D, stride_xb, stride_xn, stride_xd,
        TOPK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """Rows {0} u (1 + cls_idx) of E = A X, in one pass over the rows they read.

        E[0] = x_0 + sum_t cls_w[t] x_q(t);  E[1 + t] = x_q(t) + sum_u nbr_w[t, u] x_n(t, u) + cls_w[t] x_0,
        with q(t) = 1 + cls_idx[t] and n(t, u) = 1 + nbr_idx[t, u] (spec section 4, steps 3-6).
        """
        b, offs_d, d_mask, offs_t, t_mask = _cls_program(D, TOPK, BLOCK_T, BLOCK_D)
        tile_mask = t_mask[:, None] & d_mask[None, :]
        x_b = x_ptr + b * stride_xb
        q_row = 1 + tl.load(cls_idx_ptr + b * TOPK + offs_t, mask=t_mask, other=0)
        cls_w = tl.load(cls_w_ptr + b * TOPK + offs_t, mask=t_mask, other=0.0)
        x0 = tl.load(x_b + offs_d * stride_xd, mask=d_mask, other=0.0).to(tl.float32)
        q = tl.load(x_b + q_row[:, None] * stride_xn + offs_d[None, :] * stride_xd, mask=tile_mask,
                    other=0.0).to(tl.float32)
        e0 = x0 + tl.sum(cls_w[:, None] * q, axis=0)
        acc = q + cls_w[:, None] * x0[None, :]
        for u in tl.static_range(TOPK):
            slot = (b * TOPK + offs_t) * TOPK + u
            # An empty slot (-1, weight 0) would read row 0, the CLS token (0 * inf = NaN for an
            # inf one, where torch's edge is inf): the launcher passes the selected patch's own
            # index there instead (N = k + 1 only). Masking the load here cost registers at k = 16
            # (144 against 72), selecting the row 168 and a spill.
            n_row = 1 + tl.load(nbr_idx_ptr + slot, mask=t_mask, other=0)
            n_w = tl.load(nbr_w_ptr + slot, mask=t_mask, other=0.0)
            rows = tl.load(x_b + n_row[:, None] * stride_xn + offs_d[None, :] * stride_xd, mask=tile_mask,
                           other=0.0).to(tl.float32)
            acc += n_w[:, None] * rows
        out_b = out_ptr + b * (TOPK + 1) * D
        tl.store(out_b + offs_d, e0, mask=d_mask)
        tl.store(out_b + (1 + offs_t[:, None]) * D + offs_d[None, :], acc, mask=tile_mask)

    @triton.jit
    def _cls_coef_kernel(
        x_ptr, grad_ptr, cls_idx_ptr, nbr_idx_ptr, nbr_w_ptr,
        a_ptr, cn_ptr, cq_ptr, dcw_ptr,
        D, stride_xb, stride_xn, stride_xd,
        TOPK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """The scalars of the cls_only backward, one program per sample.

        With G = dL/dE, q(t), n(t, u) as in ``_cls_edges_kernel``, and the cosine
        s[t, u] = <x_q, x_n> / (|x_q| |x_n|) (norms clamped at 1e-12) whose softmax is nbr_w:
          ds[t, u]  = nbr_w (G_t . x_n - sum_u' nbr_w G_t . x_n')      (softmax backward)
          a[t, u]   = ds / (|x_q| |x_n|)                  coefficient of x_n in dx_q, of x_q in dx_n
          cn[t, u]  = -ds <x_q, x_n> / (|x_q| |x_n|^3)    coefficient of x_n in dx_n (its norm)
          cq[t]     = -sum_u ds <x_q, x_n> / (|x_n| |x_q|^3)   coefficient of x_q in dx_q (its norm)
          dcw[t]    = G_0 . x_q + G_t . x_0                the gradient of cls_w
        (cn, cq are 0 where the norm is under the clamp, as the gradient of max(|x|, eps)).
        Every dot product is over D in float32; the norms are recomputed from the same loads.
        """
        b = tl.program_id(0).to(tl.int64)
        offs_t = tl.arange(0, BLOCK_T)
        t_mask = offs_t < TOPK
        tu_mask = t_mask[:, None] & t_mask[None, :]
        tu_off = (b * TOPK + offs_t[:, None]) * TOPK + offs_t[None, :]
        x_b = x_ptr + b * stride_xb
        g_b = grad_ptr + b * (TOPK + 1) * D
        q_row = 1 + tl.load(cls_idx_ptr + b * TOPK + offs_t, mask=t_mask, other=0)
        # An empty slot (-1) reads the selected patch's own row, as _cls_edges_kernel does: its
        # weight is 0, so ds = a = cn = 0 there (r = 0, and 1 / max(|x_q|, eps) is finite). Not
        # row 0: a non-finite CLS token made G_t . x_0 NaN, and 0 * NaN in the softmax backward's
        # sum turned the whole row's ds NaN, where torch's gradient is finite. A non-finite x_q
        # makes row t's weights NaN anyway.
        n_idx = tl.load(nbr_idx_ptr + tu_off, mask=tu_mask, other=0)
        n_row = tl.where(n_idx >= 0, 1 + n_idx, q_row[:, None])
        gn = tl.zeros([BLOCK_T, BLOCK_T], tl.float32)
        qn = tl.zeros([BLOCK_T, BLOCK_T], tl.float32)
        nn = tl.zeros([BLOCK_T, BLOCK_T], tl.float32)
        qq = tl.zeros([BLOCK_T], tl.float32)
        dcw = tl.zeros([BLOCK_T], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_mask = offs_d < D
            tile_mask = t_mask[:, None] & d_mask[None, :]
            x0 = tl.load(x_b + offs_d * stride_xd, mask=d_mask, other=0.0).to(tl.float32)
            g0 = tl.load(g_b + offs_d, mask=d_mask, other=0.0)
            q = tl.load(x_b + q_row[:, None] * stride_xn + offs_d[None, :] * stride_xd, mask=tile_mask,
                        other=0.0).to(tl.float32)
            gt = tl.load(g_b + (1 + offs_t[:, None]) * D + offs_d[None, :], mask=tile_mask, other=0.0)
            pn = tl.load(x_b + n_row[:, :, None] * stride_xn + offs_d[None, None, :] * stride_xd,
                         mask=tu_mask[:, :, None] & d_mask[None, None, :], other=0.0).to(tl.float32)
            gn += tl.sum(gt[:, None, :] * pn, axis=2)
            qn += tl.sum(q[:, None, :] * pn, axis=2)
            nn += tl.sum(pn * pn, axis=2)
            qq += tl.sum(q * q, axis=1)
            dcw += tl.sum(g0[None, :] * q + gt * x0[None, :], axis=1)
        w = tl.load(nbr_w_ptr + tu_off, mask=tu_mask, other=0.0)
        ds = w * (gn - tl.sum(w * gn, axis=1)[:, None])
        norm_q = tl.sqrt(qq)
        norm_n = tl.sqrt(nn)
        inv_q = 1.0 / tl.maximum(norm_q, 1e-12)
        inv_n = 1.0 / tl.maximum(norm_n, 1e-12)
        r = ds * qn
        a = ds * inv_q[:, None] * inv_n
        cn = tl.where(norm_n >= 1e-12, -r * inv_q[:, None] * inv_n * inv_n * inv_n, 0.0)
        cq = tl.where(norm_q >= 1e-12, -tl.sum(r * inv_n, axis=1) * inv_q * inv_q * inv_q, 0.0)
        tl.store(a_ptr + tu_off, a, mask=tu_mask)
        tl.store(cn_ptr + tu_off, cn, mask=tu_mask)
        tl.store(cq_ptr + b * TOPK + offs_t, cq, mask=t_mask)
        tl.store(dcw_ptr + b * TOPK + offs_t, dcw, mask=t_mask)

    @triton.jit
    def _cls_occurrence_rows(o, b, cls_idx_ptr, nbr_idx_ptr, TOPK: tl.constexpr):
        """Which occurrences ``o`` are (live, is_q, is_n), their slots (t, b K + t, (b K + t) K + u),
        the rows of x they name (q(t), n(t, u)) and their destination row in dx.

        Occurrence t < K is the selected patch q(t); occurrence K + t K + u is its neighbour
        n(t, u); beyond K + K^2, none (destination -1), nor is an empty slot's n(t, u) (is_n
        False, destination -1). A patch can occur several times.
        """
        num = TOPK + TOPK * TOPK
        live = o < num
        is_q = o < TOPK
        is_n = live & (o >= TOPK)
        t = tl.where(is_q, o, tl.where(live, (o - TOPK) // TOPK, 0))
        u = tl.where(is_n, (o - TOPK) % TOPK, 0)
        base_t = b * TOPK + t
        slot = base_t * TOPK + u
        q_row = 1 + tl.load(cls_idx_ptr + base_t, mask=live, other=0)
        n_row = 1 + tl.load(nbr_idx_ptr + slot, mask=is_n, other=-1)
        is_n = is_n & (n_row > 0)  # an empty slot (-1) names no row
        dest = tl.where(is_q, q_row, tl.where(is_n, n_row, -1))
        return live, is_q, is_n, t, base_t, slot, q_row, n_row, dest

    @triton.jit
    def _cls_occurrences(
        o, b, x_b, g_b, g0, offs_d, d_mask, D, stride_xn, stride_xd,
        cls_idx_ptr, cls_w_ptr, nbr_idx_ptr, nbr_w_ptr, a_ptr, cn_ptr, cq_ptr,
        TOPK: tl.constexpr,
    ):
        """Destination row and gradient contribution [len(o), BLOCK_D] of occurrences ``o``
        (see ``_cls_occurrence_rows``):
          dx_q(t) += cls_w[t] G_0 + G_t + sum_u a[t, u] x_n(t, u) + cq[t] x_q(t)
          dx_n(t,u) += nbr_w[t, u] G_t + a[t, u] x_q(t) + cn[t, u] x_n(t, u)
        """
        live, is_q, is_n, t, base_t, slot, q_row, n_row, dest = _cls_occurrence_rows(o, b, cls_idx_ptr,
                                                                                    nbr_idx_ptr, TOPK)
        c_g0 = tl.load(cls_w_ptr + base_t, mask=is_q, other=0.0)
        c_gt = tl.where(is_q, 1.0, tl.load(nbr_w_ptr + slot, mask=is_n, other=0.0))
        c_q = tl.where(is_q, tl.load(cq_ptr + base_t, mask=is_q, other=0.0),
                       tl.load(a_ptr + slot, mask=is_n, other=0.0))
        c_n = tl.load(cn_ptr + slot, mask=is_n, other=0.0)
        live_d = live[:, None] & d_mask[None, :]
        n_d = is_n[:, None] & d_mask[None, :]
        q_d = is_q[:, None] & d_mask[None, :]
        gt = tl.load(g_b + (1 + t[:, None]) * D + offs_d[None, :], mask=live_d, other=0.0)
        xq = tl.load(x_b + q_row[:, None] * stride_xn + offs_d[None, :] * stride_xd, mask=live_d,
                     other=0.0).to(tl.float32)
        xn = tl.load(x_b + n_row[:, None] * stride_xn + offs_d[None, :] * stride_xd, mask=n_d,
                     other=0.0).to(tl.float32)
        contrib = c_g0[:, None] * g0[None, :] + c_gt[:, None] * gt + c_q[:, None] * xq + c_n[:, None] * xn
        for v in tl.static_range(TOPK):
            slot_v = base_t * TOPK + v
            v_row = 1 + tl.load(nbr_idx_ptr + slot_v, mask=is_q, other=-1)
            a_v = tl.load(a_ptr + slot_v, mask=is_q, other=0.0)
            xv = tl.load(x_b + v_row[:, None] * stride_xn + offs_d[None, :] * stride_xd,
                         mask=q_d & (v_row > 0)[:, None], other=0.0).to(tl.float32)
            contrib += a_v[:, None] * xv
        return dest, contrib

    @triton.jit
    def _cls_dx_kernel(
        x_ptr, grad_ptr, cls_idx_ptr, cls_w_ptr, nbr_idx_ptr, nbr_w_ptr, a_ptr, cn_ptr, cq_ptr, dx_ptr,
        D, stride_xb, stride_xn, stride_xd, stride_db, stride_dn, stride_dd,
        TOPK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """The rows of dx the cls_only output depends on: 0, q(t) and n(t, u) (the rest stay 0).

        Row 0 is G_0 + sum_t cls_w[t] G_t. A patch row is the sum of its occurrences'
        contributions (``_cls_occurrences``), gathered for each occurrence from every
        occurrence with the same destination and written once, by its first occurrence, in
        dx's dtype: no atomics, no read-modify-write, one rounding.
        """
        b, offs_d, d_mask, offs_t, t_mask = _cls_program(D, TOPK, BLOCK_T, BLOCK_D)
        x_b = x_ptr + b * stride_xb
        g_b = grad_ptr + b * (TOPK + 1) * D
        dx_b = dx_ptr + b * stride_db
        g0 = tl.load(g_b + offs_d, mask=d_mask, other=0.0)
        gt = tl.load(g_b + (1 + offs_t[:, None]) * D + offs_d[None, :], mask=t_mask[:, None] & d_mask[None, :],
                     other=0.0)
        cls_w = tl.load(cls_w_ptr + b * TOPK + offs_t, mask=t_mask, other=0.0)
        dx0 = g0 + tl.sum(cls_w[:, None] * gt, axis=0)
        tl.store(dx_b + offs_d * stride_dd, dx0.to(dx_ptr.dtype.element_ty), mask=d_mask)
        num = TOPK + TOPK * TOPK
        lane = tl.arange(0, BLOCK_O)
        for o1_start in range(0, num, BLOCK_O):
            o1 = o1_start + lane
            dest1 = _cls_occurrence_rows(o1, b, cls_idx_ptr, nbr_idx_ptr, TOPK)[8]  # rows only, no contributions
            total = tl.zeros([BLOCK_O, BLOCK_D], tl.float32)
            earlier = tl.zeros([BLOCK_O], tl.int32)
            for o2_start in range(0, num, BLOCK_O):
                o2 = o2_start + lane
                dest2, contrib2 = _cls_occurrences(o2, b, x_b, g_b, g0, offs_d, d_mask, D, stride_xn, stride_xd,
                                                   cls_idx_ptr, cls_w_ptr, nbr_idx_ptr, nbr_w_ptr, a_ptr, cn_ptr,
                                                   cq_ptr, TOPK)
                same = (dest1[:, None] == dest2[None, :]) & (dest2 >= 0)[None, :]
                # A masked sum, not a 0/1 matrix product: 0 * inf would spread to other rows.
                total += tl.sum(tl.where(same[:, :, None], contrib2[None, :, :], 0.0), axis=1)
                earlier += tl.sum((same & (o2[None, :] < o1[:, None])).to(tl.int32), axis=1)
            first = (earlier == 0) & (dest1 >= 0)
            tl.store(dx_b + dest1[:, None] * stride_dn + offs_d[None, :] * stride_dd,
                     total.to(dx_ptr.dtype.element_ty), mask=first[:, None] & d_mask[None, :])


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _transpose_csr(cols: torch.Tensor, num_rows: int):
    """Transposed incidence: row_ptr [B, num_rows + 1] and perm [B, Q * S] (flat entry ids
    q * S + s, stably sorted by column; empty slots sorted past the end)."""
    B, Q, S = cols.shape
    flat = cols.reshape(B, Q * S)
    key = torch.where(flat >= 0, flat, num_rows)
    perm = torch.sort(key, dim=1, stable=True).indices.contiguous()
    counts = torch.zeros(B, num_rows + 1, dtype=torch.int64, device=cols.device)
    counts.scatter_add_(1, key, torch.ones_like(key))
    row_ptr = torch.zeros(B, num_rows + 1, dtype=torch.int64, device=cols.device)
    row_ptr[:, 1:] = torch.cumsum(counts[:, :num_rows], dim=1)
    return row_ptr, perm


# Launch configurations: (interpreter, GPU). The interpreter pays per tile operation, so it
# gets few large programs; the GPU configurations are the ones the AOT test compiles.
# Other top-k tilings (BLOCK_D=64, 4 warps, 2+ stages) spill on sm_90a (measured with ace_kernels._aot).
TOPK_CONFIG = {"interp": dict(BLOCK_Q=16, BLOCK_M=32, BLOCK_D=64, num_warps=4, num_stages=1),
               "gpu": dict(BLOCK_Q=16, BLOCK_M=64, BLOCK_D=32, num_warps=8, num_stages=1)}
GATHER_CONFIG = {"interp": dict(BLOCK_Q=32, BLOCK_D=128, num_warps=4),
                 "gpu": dict(BLOCK_Q=4, BLOCK_D=128, num_warps=4)}
SCATTER_CONFIG = {"interp": dict(BLOCK_R=32, BLOCK_D=128, num_warps=4),
                  "gpu": dict(BLOCK_R=4, BLOCK_D=128, num_warps=4)}
ATOMIC_SCATTER_CONFIG = {"interp": dict(BLOCK_Q=32, BLOCK_D=128, num_warps=4),
                         "gpu": dict(BLOCK_Q=4, BLOCK_D=128, num_warps=4)}
DOT_CONFIG = {"interp": dict(BLOCK_Q=32, BLOCK_D=128, num_warps=4), "gpu": dict(BLOCK_Q=8, BLOCK_D=128, num_warps=4)}
# The fused cls_only kernels. CLS_COEF's BLOCK_D is for K <= 8 (a [K, K, BLOCK_D] tile of
# neighbour rows); larger K scale it down to keep the tile's size.
CLS_EDGES_CONFIG = {"interp": dict(BLOCK_D=128, num_warps=4), "gpu": dict(BLOCK_D=128, num_warps=4)}
CLS_COEF_CONFIG = {"interp": dict(BLOCK_D=128, num_warps=4), "gpu": dict(BLOCK_D=32, num_warps=4)}
# CLS_DX: 16 x 16 tiles, 8 warps: 112-114 registers, no spills with either triton (3.6, 3.8) at
# any D; 32 x 16 spilled 8 bytes at k = 5 in fp32 and fp16 under 3.8 when D is a multiple of 16.
CLS_DX_CONFIG = {"interp": dict(BLOCK_O=32, BLOCK_D=64, num_warps=4), "gpu": dict(BLOCK_O=16, BLOCK_D=16, num_warps=8)}
# Register caps of the top-k launches (Triton's maxnreg). Without one ptxas picks a target of its
# own for some variants, 64 or 128 registers, and spills: the float32 k = 5 fused selection (norms
# computed), 12 bytes under triton 3.6 when M and D are multiples of 16 (a 256-token tower); and,
# since the running top-k holds 32-bit indices, 16-bit k = 5 and k = 16 variants, 24 to 80 bytes
# under either triton. With a cap ptxas takes up to it and spills nothing in any variant: 128 for
# float32, and for 16-bit, whose k = 16 variants take up to about 200, 255 (a thread's most).
TOPK_FP32_MAXNREG = 128
TOPK_HALF_MAXNREG = 255
# Shared memory per block, in bytes, that the configurations above need at most, as compiled for
# sm_90a (every kernel, dtype and k up to MAX_KERNEL_TOPK; D is tiled): a GPU that gives a block
# less cannot launch them, and the Triton backend declines the call there (_triton_check). On
# sm_80 Triton's shared use can differ slightly; this is the sm_90a need, checked against the
# compiles by tests/test_hypergraph.py.
GPU_SHARED_BYTES = 10240


def _topk_maxnreg(dtype: torch.dtype) -> int:
    """The register cap a top-k launch on ``dtype`` features passes (Triton's ``maxnreg``)."""
    return TOPK_FP32_MAXNREG if dtype == torch.float32 else TOPK_HALF_MAXNREG


def _mode() -> str:
    return "interp" if _dispatch.interpreter_enabled() else "gpu"


def _topk_rows_fake(pn, inv_norm, rows, topk):
    R = pn.shape[1] if rows is None else rows.shape[1]
    return (pn.new_empty((pn.shape[0], R, topk), dtype=torch.int64),
            pn.new_empty((pn.shape[0], R, topk), dtype=torch.float32))


def _launch_topk(pn: torch.Tensor, inv_norm: torch.Tensor | None, rows: torch.Tensor | None, topk: int):
    """``_topk_incidence_kernel`` over ``pn``; the norms are computed in the kernel when
    ``inv_norm`` is None. 16-bit features take tensor-core dots on a GPU (``NATIVE_DOT``)."""
    B, M, D = pn.shape
    pn = _library.int32_safe(pn, (1, 2))  # the token and feature loops
    mode = _mode()
    cfg = TOPK_CONFIG[mode]
    R = M if rows is None else rows.shape[1]
    idx = torch.empty(B, R, topk, dtype=torch.int64, device=pn.device)
    w = torch.empty(B, R, topk, dtype=torch.float32, device=pn.device)
    rows_arg = idx if rows is None else rows  # any pointer when HAS_ROWS is off
    norm_arg = w if inv_norm is None else inv_norm.float()  # any float32 pointer when COMPUTE_NORMS
    block_m = min(cfg["BLOCK_M"], max(16, _pow2(M)))
    block_d = min(cfg["BLOCK_D"], max(16, _pow2(D)))
    grid = (triton.cdiv(R, cfg["BLOCK_Q"]), B)
    _topk_incidence_kernel[grid](
        pn, norm_arg, rows_arg, idx, w, M, D, R,
        pn.stride(0), pn.stride(1), pn.stride(2),
        norm_arg.stride(0), norm_arg.stride(1),
        rows_arg.stride(0), rows_arg.stride(1),
        idx.stride(0), idx.stride(1), idx.stride(2),
        TOPK=topk, BLOCK_K=max(2, _pow2(topk)), BLOCK_Q=cfg["BLOCK_Q"], BLOCK_M=block_m, BLOCK_D=block_d,
        HAS_ROWS=rows is not None, COMPUTE_NORMS=inv_norm is None,
        NATIVE_DOT=mode == "gpu" and pn.dtype in (torch.float16, torch.bfloat16),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        maxnreg=_topk_maxnreg(pn.dtype),
    )
    return idx, w


@_library.launcher("hg_topk_incidence", _topk_rows_fake)
def _triton_topk_rows(pn: torch.Tensor, inv_norm: torch.Tensor, rows: torch.Tensor | None,
                      topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_topk(pn, inv_norm, rows, topk)


def _cls_select_fake(pn, rows, topk):
    return _topk_rows_fake(pn, None, rows, topk)


@_library.launcher("hg_cls_select", _cls_select_fake)
def _triton_cls_select(pn: torch.Tensor, rows: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k neighbours of patches ``rows`` [B, R] among ``pn`` [B, M, D], norms computed inline."""
    return _launch_topk(pn, None, rows, topk)


def _cls_block_t(topk: int) -> int:
    return max(2, _pow2(topk))


def _cls_edges_fake(x, cls_idx, cls_w, nbr_idx, nbr_w):
    return x.new_empty((x.shape[0], cls_idx.shape[1] + 1, x.shape[2]), dtype=torch.float32)


@_library.launcher("hg_cls_edges", _cls_edges_fake)
def _triton_cls_edges(x: torch.Tensor, cls_idx: torch.Tensor, cls_w: torch.Tensor, nbr_idx: torch.Tensor,
                      nbr_w: torch.Tensor) -> torch.Tensor:
    B, _, D = x.shape
    k = cls_idx.shape[1]
    x = _library.int32_safe(x, (2,))  # the feature offsets (rows are 64-bit)
    cfg = CLS_EDGES_CONFIG[_mode()]
    out = torch.empty(B, k + 1, D, dtype=torch.float32, device=x.device)
    block_d = min(cfg["BLOCK_D"], max(16, _pow2(D)))
    _cls_edges_kernel[(triton.cdiv(D, block_d), B)](
        x, cls_idx.contiguous(), cls_w.float().contiguous(), nbr_idx.contiguous(), nbr_w.float().contiguous(), out,
        D, x.stride(0), x.stride(1), x.stride(2),
        TOPK=k, BLOCK_T=_cls_block_t(k), BLOCK_D=block_d, num_warps=cfg["num_warps"],
    )
    return out


def _cls_coef_fake(x, grad, cls_idx, nbr_idx, nbr_w):
    B, k = cls_idx.shape
    return (x.new_empty((B, k, k), dtype=torch.float32), x.new_empty((B, k, k), dtype=torch.float32),
            x.new_empty((B, k), dtype=torch.float32), x.new_empty((B, k), dtype=torch.float32))


@_library.launcher("hg_cls_coef", _cls_coef_fake)
def _triton_cls_coef(x: torch.Tensor, grad: torch.Tensor, cls_idx: torch.Tensor, nbr_idx: torch.Tensor,
                     nbr_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a, cn, cq, d cls_w) of ``_cls_coef_kernel`` from the edges' gradient ``grad`` [B, K + 1, D]."""
    B, _, D = x.shape
    k = cls_idx.shape[1]
    x = _library.int32_safe(x, (2,))
    cfg = CLS_COEF_CONFIG[_mode()]
    block_t = _cls_block_t(k)
    block_d = max(8, min(cfg["BLOCK_D"] * 64 // max(64, block_t * block_t), _pow2(D)))
    a = torch.empty(B, k, k, dtype=torch.float32, device=x.device)
    cn = torch.empty_like(a)
    cq = torch.empty(B, k, dtype=torch.float32, device=x.device)
    dcw = torch.empty_like(cq)
    _cls_coef_kernel[(B,)](
        x, grad.float().contiguous(), cls_idx.contiguous(), nbr_idx.contiguous(), nbr_w.float().contiguous(),
        a, cn, cq, dcw, D, x.stride(0), x.stride(1), x.stride(2),
        TOPK=k, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=cfg["num_warps"],
    )
    return a, cn, cq, dcw


def _cls_dx_fake(x, grad, cls_idx, cls_w, nbr_idx, nbr_w, a, cn, cq):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@_library.launcher("hg_cls_dx", _cls_dx_fake)
def _triton_cls_dx(x: torch.Tensor, grad: torch.Tensor, cls_idx: torch.Tensor, cls_w: torch.Tensor,
                   nbr_idx: torch.Tensor, nbr_w: torch.Tensor, a: torch.Tensor, cn: torch.Tensor,
                   cq: torch.Tensor) -> torch.Tensor:
    """dx [B, N, D] in x's dtype: zeros but for rows 0, 1 + cls_idx and 1 + nbr_idx."""
    B, _, D = x.shape
    k = cls_idx.shape[1]
    x = _library.int32_safe(x, (2,))
    cfg = CLS_DX_CONFIG[_mode()]
    dx = torch.zeros(x.shape, dtype=x.dtype, device=x.device)
    block_d = min(cfg["BLOCK_D"], max(16, _pow2(D)))
    _cls_dx_kernel[(triton.cdiv(D, block_d), B)](
        x, grad.float().contiguous(), cls_idx.contiguous(), cls_w.float().contiguous(), nbr_idx.contiguous(),
        nbr_w.float().contiguous(), a.contiguous(), cn.contiguous(), cq.contiguous(), dx,
        D, x.stride(0), x.stride(1), x.stride(2), dx.stride(0), dx.stride(1), dx.stride(2),
        TOPK=k, BLOCK_T=_cls_block_t(k), BLOCK_O=cfg["BLOCK_O"], BLOCK_D=block_d, num_warps=cfg["num_warps"],
    )
    return dx


def _launch_per_incidence_row(kernel, cfg, src, cols, weights, out):
    """Launch ``kernel`` (gather or atomic scatter) with one program per BLOCK_Q incidence rows
    [B, Q, S] and BLOCK_D feature columns; returns ``out``."""
    B, Q, S = cols.shape
    D = src.shape[2]
    block_d = min(cfg["BLOCK_D"], _pow2(D))
    grid = (triton.cdiv(Q, cfg["BLOCK_Q"]), triton.cdiv(D, block_d), B)
    kernel[grid](
        src, cols, weights, out, Q, D, S,
        src.stride(0), src.stride(1), src.stride(2),
        cols.stride(0), cols.stride(1), cols.stride(2),
        weights.stride(0), weights.stride(1), weights.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        BLOCK_Q=cfg["BLOCK_Q"], BLOCK_D=block_d, num_warps=cfg["num_warps"],
    )
    return out


def _gather_sum_fake(src, cols, weights):
    return src.new_empty((src.shape[0], cols.shape[1], src.shape[2]), dtype=torch.float32)


@_library.launcher("hg_gather_sum", _gather_sum_fake)
def _triton_gather_sum(src: torch.Tensor, cols: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    out = torch.empty(src.shape[0], cols.shape[1], src.shape[2], dtype=torch.float32, device=src.device)
    return _launch_per_incidence_row(_gather_sum_kernel, GATHER_CONFIG[_mode()], src, cols, weights, out)


def _scatter_csr_fake(src, flat_w, row_ptr, perm, num_rows, slots):
    return src.new_empty((src.shape[0], num_rows, src.shape[2]), dtype=torch.float32)


@_library.launcher("hg_scatter_sum_csr", _scatter_csr_fake)
def _triton_scatter_sum_csr(src: torch.Tensor, flat_w: torch.Tensor, row_ptr: torch.Tensor, perm: torch.Tensor,
                            num_rows: int, slots: int) -> torch.Tensor:
    """``C = A^T src`` over the transpose incidence (``row_ptr``, ``perm``; as the CUDA op)."""
    B, _, D = src.shape
    cfg = SCATTER_CONFIG[_mode()]
    out = torch.empty(B, num_rows, D, dtype=torch.float32, device=src.device)
    block_d = min(cfg["BLOCK_D"], _pow2(D))
    grid = (triton.cdiv(num_rows, cfg["BLOCK_R"]), triton.cdiv(D, block_d), B)
    _scatter_sum_csr_kernel[grid](
        src, flat_w, row_ptr, perm, out, num_rows, D, slots,
        src.stride(0), src.stride(1), src.stride(2),
        flat_w.stride(0), row_ptr.stride(0), perm.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        BLOCK_R=cfg["BLOCK_R"], BLOCK_D=block_d, num_warps=cfg["num_warps"],
    )
    return out


def _scatter_sum_via_csr(csr_sum, src, cols, weights, num_rows, transpose=None):
    """``scatter_sum`` through ``csr_sum(src, flat_weights, row_ptr, perm, num_rows, slots)``
    (the Triton launcher or the CUDA op), building the transpose incidence when not given."""
    B, Q, S = cols.shape
    if transpose is None:
        transpose = _transpose_csr(cols, num_rows)
    row_ptr, perm = transpose
    flat_w = weights.reshape(B, Q * S).float().contiguous()
    return csr_sum(src, flat_w, row_ptr, perm, num_rows, S)


def _triton_scatter_sum(src, cols, weights, num_rows, transpose=None):
    return _scatter_sum_via_csr(_triton_scatter_sum_csr, src, cols, weights, num_rows, transpose)


def _scatter_atomic_fake(src, cols, weights, num_rows):
    return src.new_empty((src.shape[0], num_rows, src.shape[2]), dtype=torch.float32)


@_library.launcher("hg_scatter_sum_atomic", _scatter_atomic_fake)
def _triton_scatter_atomic(src: torch.Tensor, cols: torch.Tensor, weights: torch.Tensor,
                           num_rows: int) -> torch.Tensor:
    out = torch.zeros(src.shape[0], num_rows, src.shape[2], dtype=torch.float32, device=src.device)
    return _launch_per_incidence_row(_scatter_sum_atomic_kernel, ATOMIC_SCATTER_CONFIG[_mode()], src, cols,
                                     weights, out)


def _triton_scatter_sum_atomic(src, cols, weights, num_rows, transpose=None):
    """``scatter_sum`` with float32 atomics (``transpose`` is ignored): not deterministic."""
    return _triton_scatter_atomic(src, cols, weights, num_rows)


def _entry_dot_fake(a, b, cols):
    return a.new_empty(cols.shape, dtype=torch.float32)


@_library.launcher("hg_entry_dot", _entry_dot_fake)
def _triton_entry_dot(a: torch.Tensor, b: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    a, b = _library.int32_safe(a, (2,)), _library.int32_safe(b, (2,))  # the feature loop
    B, Q, D = a.shape
    S = cols.shape[2]
    cfg = DOT_CONFIG[_mode()]
    out = torch.empty(B, Q, S, dtype=torch.float32, device=a.device)
    block_d = min(cfg["BLOCK_D"], _pow2(D))
    grid = (triton.cdiv(Q, cfg["BLOCK_Q"]), B)
    _entry_dot_kernel[grid](
        a, b, cols, out, Q, D, S,
        a.stride(0), a.stride(1), a.stride(2),
        b.stride(0), b.stride(1), b.stride(2),
        cols.stride(0), cols.stride(1), cols.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        BLOCK_Q=cfg["BLOCK_Q"], BLOCK_D=block_d, num_warps=cfg["num_warps"],
    )
    return out


TRITON_PRIMITIVES = _Primitives("triton", _triton_topk_rows, _triton_gather_sum, _triton_scatter_sum,
                                _triton_entry_dot, _transpose_csr) if _TRITON_IMPORTED else None
# deterministic=False: every C = A^T src (forward and backward) by atomics, no transpose built.
TRITON_ATOMIC_PRIMITIVES = _Primitives("triton-atomic", _triton_topk_rows, _triton_gather_sum,
                                       _triton_scatter_sum_atomic, _triton_entry_dot) if _TRITON_IMPORTED else None


# --------------------------------------------------------------------------------------
# CUDA kernels (csrc/hypergraph/, ops torch.ops.ace_kernels.hg_*)
# --------------------------------------------------------------------------------------
# The extension is imported on first use only; the ops read features (pn, src, a, b) in float32,
# float16 or bfloat16 (converted in registers), take float32 weights and int64 indices with
# strides passed through, and return float32.

def _cuda_ops():
    _dispatch.extension()  # loads ace_kernels._C, which registers the ops
    return torch.ops.ace_kernels


def _cuda_topk_rows(pn, inv_norm, rows, topk):
    return _cuda_ops().hg_topk_incidence(pn, inv_norm.float(), rows, topk)


def _cuda_gather_sum(src, cols, weights):
    return _cuda_ops().hg_gather_sum(src, cols, weights.float())


def _cuda_scatter_sum(src, cols, weights, num_rows, transpose=None):
    return _scatter_sum_via_csr(_cuda_ops().hg_scatter_sum_csr, src, cols, weights, num_rows, transpose)


def _cuda_entry_dot(a, b, cols):
    return _cuda_ops().hg_entry_dot(a, b, cols)


CUDA_PRIMITIVES = _Primitives("cuda", _cuda_topk_rows, _cuda_gather_sum, _cuda_scatter_sum, _cuda_entry_dot,
                              _transpose_csr)


# --------------------------------------------------------------------------------------
# Validation and the public functional
# --------------------------------------------------------------------------------------

_CALL_HOOKS = (("_forward_pre_hooks", "a forward pre-hook"), ("_forward_hooks", "a forward hook"),
               ("_backward_pre_hooks", "a backward pre-hook"), ("_backward_hooks", "a backward hook"))


def _adapter_parts(adapter) -> tuple:
    """``(adapter, down, up, act)`` (act None when it has none); a module's submodules straight from its
    dictionary (no ``nn.Module.__getattr__``: read at every call)."""
    if isinstance(adapter, nn.Module):
        children = adapter._modules
        return (adapter, children["down"] if "down" in children else adapter.down,
                children["up"] if "up" in children else adapter.up, children.get("act"))
    return (adapter, adapter.down, adapter.up, getattr(adapter, "act", None))


def _is_op_activation(act) -> bool:
    """Whether the activation module ``act`` is what the op applies between down and up: LeakyReLU(0.2)."""
    return isinstance(act, nn.LeakyReLU) and act.negative_slope == _NEG_SLOPE


def _check_not_hooked(name: str, modules: tuple) -> None:
    """The op reads the adapter's ``down``/``up`` weights and never calls the modules, so hooks on the
    adapter, its layers or its activation (``modules``: :func:`_adapter_parts`) would be skipped, silently,
    and so would a ``forward`` set on one of their instances (a wrapper's): raise instead, naming the
    submodule (a check of four dictionaries and the instance's each, cheap enough for every call). Global
    module hooks (``register_module_forward_hook``: ``FlopCounterMode``, profilers) are not checked: they do
    not fire for the adapters, as they do not for the ``out_proj`` of ``nn.MultiheadAttention``."""
    if not any(isinstance(m, nn.Module) and (m._forward_pre_hooks or m._forward_hooks or m._backward_pre_hooks
                                             or m._backward_hooks or "forward" in m.__dict__) for m in modules):
        return
    for part, module in zip((name, f"{name}.down", f"{name}.up", f"{name}.act"), modules):
        if isinstance(module, nn.Module) and "forward" in module.__dict__:
            # A forward set on the instance (accelerate's hooks, a user's wrapper) is skipped as a hook would be.
            forward = module.__dict__["forward"]
            what = getattr(forward, "__qualname__", None) or type(forward).__qualname__
            raise ValueError(f"argument '{name}': {part} has a forward set on the instance ({what}), which "
                             "ace_hypergraph would not run: it reads the adapters' down/up weights and never calls "
                             f"the modules; delete it (del {part}.forward) to call the op")
        kind = next((what for attr, what in _CALL_HOOKS if getattr(module, attr, None)), None)
        if kind is None or _is_uninitialised_lazy(module):
            continue  # a lazy layer's pre-hook creates its weight: _check_plain_layers says so
        hooks = [h for attr, _ in _CALL_HOOKS for h in (getattr(module, attr, None) or {}).values()]
        names = ", ".join(getattr(h, "__qualname__", None) or type(h).__qualname__ for h in hooks)
        advice = "remove it to call the op"
        from torch.nn.utils import prune

        if any(isinstance(h, prune.BasePruningMethod) for h in hooks):
            # Pruning recomputes weight = weight_orig * weight_mask in a pre-hook, as the old weight_norm does.
            advice = "torch.nn.utils.prune.remove(layer, 'weight') makes the pruning permanent (no hook)"
        elif any(type(h).__name__ in ("WeightNorm", "SpectralNorm") for h in hooks):
            # torch.nn.utils.weight_norm / spectral_norm recompute the weight in a pre-hook, so the op would read
            # the one of the layer's last call; their parametrizations recompute it whenever it is read.
            advice = ("use torch.nn.utils.parametrizations.weight_norm / spectral_norm instead, which recompute "
                      "the weight when it is read")
        raise ValueError(f"argument '{name}': {part} has {kind} ({names}), which ace_hypergraph would not run: it "
                         f"reads the adapters' down/up weights and never calls the modules; {advice}")


def _is_uninitialised_lazy(module) -> bool:
    return isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params()


def _check_plain_layers(name: str, modules: tuple) -> None:
    """The op applies ``up(leaky_relu(down(z), 0.2))`` from the layers' weights and biases and never calls
    them: a ``down``/``up`` module that is not an ``nn.Linear`` (PEFT's LoRA layer, whose ``weight`` is its
    base layer's) or whose class overrides ``nn.Linear.forward`` (torch.ao's QAT ``Linear``), or an ``act``
    module other than ``LeakyReLU(0.2)`` computes something the op would skip, silently: raise instead,
    naming it (isinstance and class checks, cheap enough for every call)."""
    _, down, up, act = modules
    for part, layer in (("down", down), ("up", up)):
        if not isinstance(layer, nn.Module):
            continue
        kind = type(layer)
        if _is_uninitialised_lazy(layer):
            # Its weight has no shape until its first call, which the op never makes (a pre-hook infers it).
            raise ValueError(f"argument '{name}': {name}.{part} is an uninitialised {kind.__qualname__} (no weight "
                             "yet: it infers its shape at its first call), which ace_hypergraph would not call: call "
                             f"the adapter once on an input of the features' width ({name}(x)) first, which makes "
                             "it an nn.Linear")
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"argument '{name}': {name}.{part} is a {kind.__module__}.{kind.__qualname__}, not an "
                             "nn.Linear, which ace_hypergraph would not call: it reads the layer's weight and bias "
                             "(a wrapper's own terms, such as a LoRA branch, would be skipped; merge them into the "
                             "layer first, e.g. PEFT's merge_and_unload)")
        if kind.forward is not nn.Linear.forward:
            # A subclass's own forward (torch.ao's QAT Linear fake-quantises the weight; a user's adds noise).
            raise ValueError(f"argument '{name}': {name}.{part} is a {kind.__module__}.{kind.__qualname__}, an "
                             "nn.Linear subclass with its own forward, which ace_hypergraph would not call: it reads "
                             "the layer's weight and bias; give it a plain nn.Linear holding the weight that "
                             "forward would use, or call the adapters themselves")
    if isinstance(act, nn.Module) and not _is_op_activation(act):
        raise ValueError(f"argument '{name}': {name}.act is {act!r}, which ace_hypergraph would not call: it applies "
                         f"leaky_relu with slope {_NEG_SLOPE} between down and up (spec section 4)")


def _adapter_params(name: str, adapter, dim: int):
    if isinstance(adapter, (tuple, list)):
        if len(adapter) != 4:
            raise ValueError(f"argument '{name}': expected a 4-tuple (down_weight, down_bias, up_weight, up_bias) "
                             f"or a module with .down and .up linears, got a sequence of length {len(adapter)}")
        params = tuple(adapter)
    elif hasattr(adapter, "down") and hasattr(adapter, "up"):
        modules = _adapter_parts(adapter)
        _check_not_hooked(name, modules)
        _check_plain_layers(name, modules)
        params = (getattr(adapter.down, "weight", None), getattr(adapter.down, "bias", None),
                  getattr(adapter.up, "weight", None), getattr(adapter.up, "bias", None))
    else:
        raise ValueError(f"argument '{name}': expected a 4-tuple (down_weight, down_bias, up_weight, up_bias) "
                         f"or a module with .down and .up linears, got {type(adapter).__name__}")
    down_w, down_b, up_w, up_b = params
    check_tensor(f"{name}.down_weight", down_w, ndim=2, shape=("hidden", dim))
    hidden = down_w.shape[0]
    check_tensor(f"{name}.down_bias", down_b, shape=(hidden,))
    check_tensor(f"{name}.up_weight", up_w, shape=(dim, hidden))
    check_tensor(f"{name}.up_bias", up_b, shape=(dim,))
    return params


def _validate(x, cls_attn, edge_adapter, node_adapter, topk, cls_only, deterministic):
    check_tensor("x", x, ndim=3)
    B, N, D = x.shape
    if N < 1 or D < 1:  # B = 0 is an empty batch, which gives an empty output (_empty_batch)
        raise ValueError(f"argument 'x': expected a non-empty [B, N, D] tensor, got shape {list(x.shape)}")
    topk = check_positive_int("topk", topk)  # a NumPy integer becomes an int (a Triton constexpr needs one)
    if topk > N:
        raise ValueError(f"argument 'topk': expected topk <= N (torch.topk over a row of the N x N scores), "
                         f"got topk={topk} with N={N}")
    check_tensor("cls_attn", cls_attn, ndim=2, shape=(B, N - 1))
    check_bool("cls_only", cls_only)
    check_bool("deterministic", deterministic)
    edge = _adapter_params("edge_adapter", edge_adapter, D)
    node = _adapter_params("node_adapter", node_adapter, D)
    for name, t in (("cls_attn", cls_attn),
                    *zip(("edge_adapter.down_weight", "edge_adapter.down_bias", "edge_adapter.up_weight",
                          "edge_adapter.up_bias"), edge),
                    *zip(("node_adapter.down_weight", "node_adapter.down_bias", "node_adapter.up_weight",
                          "node_adapter.up_bias"), node)):
        if t.device != x.device:
            raise ValueError(f"argument '{name}': expected a tensor on {x.device} (like 'x'), got {t.device}")
    return edge, node, topk


def _kernel_check(x, cls_attn, edge, node, topk, cls_only, deterministic=True):
    reasons = []
    # The kernels keep a row's slots, min(topk, N - 1), in registers: topk = N = 17 takes 16.
    slots = _row_slots(topk, x.shape[1]) if x.dim() == 3 else topk
    if slots > MAX_KERNEL_TOPK:
        at = "" if slots == topk else f" ({slots} slots a row at N={x.shape[1]})"
        reasons.append(f"topk={topk}{at} is over the kernels' limit of {MAX_KERNEL_TOPK}")
    if x.dim() == 3 and x.shape[1] < 3:
        reasons.append(f"N={x.shape[1]} tokens: a patch row with no other patch to select (N < 3) is handled by the "
                       "torch backend only")
    if x.dtype == torch.float64:
        reasons.append("float64 inputs are handled by the torch backend only")
    if x.shape[0] > _MAX_GRID_BATCH:
        reasons.append(f"a batch of {x.shape[0]} samples is over the kernels' {_MAX_GRID_BATCH} per call "
                       "(the batch is a grid dimension of at most 65535 blocks): split the batch")
    return reasons


# The kernels put the batch on grid dimension y or z.
_MAX_GRID_BATCH = _library.MAX_GRID_YZ


# cls_only and the full output run different kernels (the triton backend fuses cls_only), so
# the benchmark orders them separately.
_dispatch.define_op(OP_NAME, prefer=("triton", "cuda", "torch"), variants=("cls_only", "full"))


def _cls_only_torch(x, cls_attn, edge_params, node_params, topk):
    """Token 0 only, in plain autograd: every tensor is [B, k(+1), ...] except two passes
    over the patches (their norms and one [B, k, N-1] similarity bmm)."""
    k = _row_slots(topk, x.shape[1])
    compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    xc = x.to(compute_dtype)
    c = cls_attn.to(compute_dtype)
    edge_params = tuple(p.to(compute_dtype) for p in edge_params)
    node_params = tuple(p.to(compute_dtype) for p in node_params)
    B, N, D = xc.shape
    cls_vals, cls_idx = c.topk(k, dim=-1)
    cls_w = torch.softmax(cls_vals, dim=-1)  # [B, k]
    patches = xc[:, 1:]
    # normalize(p) = p / max(|p|, eps), as F.normalize; applied to the [B, k, N-1] scores
    # instead of to every patch.
    inv_norm = 1.0 / torch.linalg.vector_norm(patches, dim=-1).clamp_min(_NORM_EPS)  # [B, M]
    queries = torch.gather(patches, 1, cls_idx[..., None].expand(B, k, D))  # raw rows 1 + cls_idx
    q_scaled = queries * torch.gather(inv_norm, 1, cls_idx)[..., None]
    sims = torch.bmm(q_scaled, patches.transpose(1, 2)) * inv_norm[:, None, :]
    sims = sims.scatter(2, cls_idx[..., None], float("-inf"))  # own column
    nbr_vals, nbr_idx = sims.topk(k, dim=-1)  # [B, k, k]; at k = N - 1 the own column, weight 0
    nbr_w = _softmax_of_kept(nbr_vals)
    neighbours = torch.gather(patches, 1, nbr_idx.reshape(B, k * k, 1).expand(B, k * k, D)).view(B, k, k, D)
    x0 = xc[:, :1]
    # E rows: 0 and 1 + cls_idx[t] (self loop + neighbours + column 0 with weight cls_w[t]).
    e0 = x0 + torch.bmm(cls_w[:, None, :], queries)
    e_sel = queries + torch.einsum("btu,btud->btd", nbr_w, neighbours) + cls_w[..., None] * x0
    return _cls_output(torch.cat([e0, e_sel], dim=1), cls_w, edge_params, node_params, x.dtype)


def _cls_output(edge_rows, cls_w, edge_params, node_params, dtype):
    """Token 0's output from rows {0} u (1 + topk(c)) of E = A X ([B, k + 1, D]):
    C[0] = E'[0] + sum_t cls_w[t] E'[1 + cls_idx[t]], out = node_adapter(C[0])."""
    edges = _adapter(edge_rows, edge_params)
    context = edges[:, 0] + torch.bmm(cls_w[:, None, :], edges[:, 1:])[:, 0]
    return _adapter(context, node_params).to(dtype)


class _ClsEdges(torch.autograd.Function):
    """Rows {0} u (1 + cls_idx) of E = A X by the fused Triton kernels: x [B, N, D] -> [B, k + 1, D].

    Forward: ``_topk_incidence_kernel`` (norms inline) selects each chosen patch's neighbours,
    ``_cls_edges_kernel`` sums the rows. Backward: ``_cls_coef_kernel`` (one program per sample:
    the dot products, the softmax backward, the norms' terms), then ``_cls_dx_kernel`` writes the
    1 + k + k^2 rows of dx that can be non-zero, each once, in x's dtype (no float32 copy of x,
    no atomics: deterministic on every device). x is saved as it is.
    """

    @staticmethod
    def forward(ctx, x, cls_idx, cls_w):
        nbr_idx, nbr_w = _triton_cls_select(x[:, 1:], cls_idx, cls_idx.shape[1])
        # cls_w is read for dx alone; x for both gradients (the dot products).
        ctx.save_for_backward(x, cls_idx, cls_w if ctx.needs_input_grad[0] else None, nbr_idx, nbr_w)
        edge_idx = nbr_idx
        if cls_idx.shape[1] == x.shape[1] - 1:
            # N = k + 1: each neighbour list has an empty slot (-1, weight 0), which the edges kernel
            # would read as row 0. It reads the selected patch's own row, as the torch path's own-column
            # slot does: 0 * x_q adds nothing non-finite that the edge (x_q + ...) lacks, where 0 * an
            # inf CLS token made an edge NaN that torch keeps inf.
            edge_idx = torch.where(nbr_idx >= 0, nbr_idx, cls_idx[..., None])
        return _triton_cls_edges(x, cls_idx, cls_w, edge_idx, nbr_w)

    @staticmethod
    @_library.kernel_backward(_SECOND_DERIVATIVE_ERROR)
    def backward(ctx, grad):
        x, cls_idx, cls_w, nbr_idx, nbr_w = ctx.saved_tensors
        grad = grad.float().contiguous()
        a, cn, cq, grad_cls_w = _triton_cls_coef(x, grad, cls_idx, nbr_idx, nbr_w)
        grad_x = _triton_cls_dx(x, grad, cls_idx, cls_w, nbr_idx, nbr_w, a, cn, cq) if ctx.needs_input_grad[0] else None
        return grad_x, None, grad_cls_w if ctx.needs_input_grad[2] else None


def _cls_only_fused(x, cls_attn, edge_params, node_params, topk):
    """Token 0 on the triton backend: the CLS row's top-k and the adapters in torch, the rest in
    ``_ClsEdges`` (4 kernel launches in all, against about 20 through the primitives)."""
    c = cls_attn.float()
    edge_params = tuple(p.float() for p in edge_params)
    node_params = tuple(p.float() for p in node_params)
    cls_vals, cls_idx = c.topk(_row_slots(topk, x.shape[1]), dim=-1)
    cls_w = torch.softmax(cls_vals, dim=-1)
    return _cls_output(_ClsEdges.apply(x, cls_idx, cls_w), cls_w, edge_params, node_params, x.dtype)


@_dispatch.register(OP_NAME, "torch")
def _hypergraph_torch(x, cls_attn, edge, node, topk, cls_only, deterministic=True):
    if cls_only:
        return _cls_only_torch(x, cls_attn, edge, node, topk)
    return _torch_full_output(x, cls_attn, edge, node, topk)


# torch._disable_dynamo is torch.compiler.disable that imports torch._dynamo at the first call,
# not at decoration (torch uses it so for the same reason: importing dynamo is slow).
@torch._disable_dynamo
def _torch_full_output(x, cls_attn, edge, node, topk):
    # Always eager, under torch.compile too (a graph break; fullgraph=True is refused): torch
    # 2.11's dynamo traces this path into a wrong gradient of x (162 off at B=2, N=11, D=16, with
    # the loss right; torch 2.14 traces it right), and on the CPU it reaches a sparse CSR product,
    # which dynamo cannot trace at all.
    return _hypergraph_impl(x, cls_attn, edge, node, topk, False, TORCH_PRIMITIVES)


# The CUDA top-k kernel's shared memory: 8 queries x (D + 512) float32 similarities, dynamic,
# beside 1,600 bytes of static arrays (csrc/hypergraph/hypergraph.cu: kQueriesPerBlock,
# kTopkChunk, top_v/top_i/own_row); all of it within the device's per-block opt-in limit.
_CUDA_TOPK_QUERIES, _CUDA_TOPK_CHUNK, _CUDA_TOPK_STATIC_BYTES = 8, 512, 1600


def _cuda_topk_shared_bytes(dim: int) -> int:
    return _CUDA_TOPK_QUERIES * (dim + _CUDA_TOPK_CHUNK) * 4 + _CUDA_TOPK_STATIC_BYTES


def _cuda_check(x, cls_attn, edge, node, topk, cls_only, deterministic=True):
    reasons = _kernel_check(x, cls_attn, edge, node, topk, cls_only)
    if x.dim() == 3 and x.shape[1] < topk + 2:
        # Untested: its top-k kernel keeps the own column (weight 0) in the slot a short row
        # leaves empty, and refuses N = topk.
        reasons.append(f"N={x.shape[1]} tokens < topk + 2 = {topk + 2}: the CUDA kernels need N - 2 candidates "
                       "per patch row (the Triton backend takes N >= max(3, topk), the torch backend N >= topk)")
    if x.is_cuda and x.dim() == 3:
        limit = _dispatch._shared_memory_limit(_dispatch.cuda_index(x.device))  # cached per device
        if limit is not None and _cuda_topk_shared_bytes(x.shape[-1]) > limit:
            reasons.append(f"D={x.shape[-1]} needs {_cuda_topk_shared_bytes(x.shape[-1])} bytes of shared memory in "
                           f"the CUDA top-k kernel, over this device's {limit} per block (the Triton kernels tile D)")
    module, _ = _dispatch._extension()
    if module is not None and not hasattr(torch.ops.ace_kernels, "hg_gather_sum"):
        reasons.append("ace_kernels._C was built without its torch ops (csrc/bindings.cpp compiled as C++17; "
                       "torch >= 2.10 headers need -std=c++20)")
    return reasons


@_dispatch.register(OP_NAME, "cuda", check=_cuda_check)
def _hypergraph_cuda(x, cls_attn, edge, node, topk, cls_only, deterministic=True):
    return _hypergraph_impl(x, cls_attn, edge, node, topk, cls_only, CUDA_PRIMITIVES)


def _triton_check(x, cls_attn, edge, node, topk, cls_only, deterministic=True):
    return _kernel_check(x, cls_attn, edge, node, topk, cls_only) + _dispatch.shared_memory_reasons(
        x.device, GPU_SHARED_BYTES, "the Triton kernels' launch configuration")


@_dispatch.register(OP_NAME, "triton", check=_triton_check)
def _hypergraph_triton(x, cls_attn, edge, node, topk, cls_only, deterministic=True):
    if cls_only:
        return _cls_only_fused(x, cls_attn, edge, node, topk)  # deterministic whatever is asked
    # torch.use_deterministic_algorithms(True) takes the deterministic scatter, as torch's own ops
    # that have a deterministic path do (warn_only or not).
    use_atomics = not deterministic and not torch.are_deterministic_algorithms_enabled()
    prims = TRITON_ATOMIC_PRIMITIVES if use_atomics else TRITON_PRIMITIVES
    return _hypergraph_impl(x, cls_attn, edge, node, topk, cls_only, prims)


def ace_hypergraph(x, cls_attn, edge_adapter, node_adapter, *, topk: int = 5, cls_only: bool = False,
                   backend: str = "auto", deterministic: bool = True):
    """ACE-HGNN hyperedge attention (spec section 4), without N x N matrices.

    Parameters
    ----------
    x : Tensor [B, N, D]
        Token features, token 0 is CLS; N and D at least 1. An empty batch (B = 0,
        with ``cls_attn`` [0, N - 1]) is checked as any other and gives an empty
        output, with no kernel launched on any backend; its backward gives ``x``
        and ``cls_attn`` empty gradients and each adapter parameter that requires
        grad a zero one, as the reference does. float16, bfloat16, float32 or float64;
        computed in float32 (float64 for float64 input), returned in ``x.dtype``.
        The triton and cuda backends read float16/bfloat16 ``x`` in its own dtype
        and convert in registers (no float32 copy of x is made or kept for the
        backward; torch ops that need float32 operands upcast 32 MiB batch chunks);
        the gradient of x is accumulated in float32 and rounded once, as for
        ``x.float()``. The torch backend computes on ``x.float()``.
    cls_attn : Tensor [B, N - 1]
        The CLS row of the last layer's pre-softmax attention, without column 0.
        Any floating dtype (cast to the compute dtype).
    edge_adapter, node_adapter : tuple or module
        ``(down_weight [H, D], down_bias [H], up_weight [D, H], up_bias [D])`` or a
        module with ``.down`` and ``.up`` ``nn.Linear``. Cast to the compute dtype.
        A module's weights are read, the modules never called (the full output folds
        ``up`` of the edge adapter into ``down`` of the node adapter; ``cls_only``
        applies them to k + 1 rows): a hook on an adapter, its ``down``, ``up`` or
        ``act`` (forward, pre-forward or backward; the pre-hooks of the old
        ``torch.nn.utils.weight_norm`` and of ``torch.nn.utils.prune`` too, which
        recompute ``weight`` at each call), or a ``forward`` set on one of their
        instances (accelerate's hooks, a wrapper), raises a ``ValueError`` naming it,
        and so does a ``down``/``up`` module that is not an ``nn.Linear`` (PEFT's LoRA
        layer, whose ``weight`` is its base layer's: merge it first) or whose class
        overrides ``nn.Linear.forward`` (torch.ao's QAT ``Linear``, a subclass adding
        noise), or an ``act`` module other than ``LeakyReLU(0.2)``.
        Parametrized weights (``torch.nn.utils.parametrizations.weight_norm``,
        ``spectral_norm``) are recomputed when read, as a call would. Global module
        hooks do not fire for the adapters (as for ``nn.MultiheadAttention``'s
        ``out_proj``) and are not refused.
    topk : int
        Neighbours kept per row (k). Needs ``topk <= N`` (the reference's
        ``torch.topk`` over a row of the N x N scores). Where a row has fewer
        than k finite scores (N <= topk + 1) it keeps them all, as the
        reference's softmax gives the -inf ones it keeps weight 0; at N = 2 a
        patch row has none, and only its self loop and column 0 (steps 4-5) are
        non-zero, as in the reference, which overwrites that row's NaN softmax.
        The Triton and CUDA backends take ``N >= 3`` and ``min(topk, N - 1) <= 16``
        slots a row; the CUDA backend ``N >= topk + 2``.
    cls_only : bool
        Return only token 0, ``[B, D]``, computing only the k + 1 rows of A it
        depends on.
    backend : {"auto", "cuda", "triton", "torch"}
        See :mod:`ace_kernels._dispatch`.
    deterministic : bool
        True (default): no float atomics in the triton and cuda backends.
        False: the triton backend computes every C = A^T E' (the node
        aggregation in the forward, and the same scatter in the backward) with
        float32 atomic adds instead of building the transposed incidence; the
        summation order, hence the last bits of the results, then varies between
        runs. Whether it is faster is decided by the GPU benchmark (provider
        ``triton-atomic`` in ``benchmarks/bench_hypergraph.py``). The cuda
        backend and the torch backend ignore it, and so does the triton backend's
        ``cls_only`` path, which has no scatter (see Determinism below). Under
        ``torch.use_deterministic_algorithms(True)`` False is overridden: no atomics.

    Returns
    -------
    Tensor
        ``[B, N, D]`` (the node adapter's output, no residual), or ``[B, D]``
        with ``cls_only=True``.

    Notes
    -----
    Ties: the neighbours are chosen with ``torch.topk`` semantics, which does
    not specify which of several equal scores at the k-th place is kept (CPU,
    CUDA and the kernels may differ). The weights do not depend on the choice,
    but the rows aggregated (and, for the full output, the in-degree of each
    token) do; outputs are well defined when the k-th and (k+1)-th scores of
    every row used differ. Exact ties arise from zero-norm tokens (padding: a
    zero-norm patch has cosine 0 with every token, so its whole row ties: the
    Triton and CUDA kernels keep the lowest indices, the CPU's ``torch.topk`` a
    subset that depends on the row length and the batch's shape), from tokens that are positive multiples of each other,
    and from equal ``cls_attn`` entries; with ``cls_only=True`` only the CLS
    row and the rows it selects are used.

    Zero-norm tokens have cosine 0 with every token (``F.normalize``), and the
    gradient through the normalisation is that of x / max(|x|, 1e-12).

    Non-finite inputs raise no error and never hang: a NaN or inf in ``x`` or
    ``cls_attn`` makes the rows that depend on it NaN (or inf) in the output
    and the gradients. Every backend ranks a NaN score above every number (as
    torch.topk does), so a row that selects one gets NaN weights; the torch
    backend also spreads a non-finite token through zero-weight slots
    (0 * inf = NaN, as the dense reference does), the kernels skip those slots.
    A CLS row whose softmax is NaN (a NaN or +inf in ``cls_attn``, or no
    finite entry) is NaN in every column of the reference's row 0, which
    step 5 copies into column 0 of every row, so its full output of that
    sample is NaN throughout; every backend keeps only the k selected columns
    of row 0, so there token 0, its k tokens and the rows they reach are NaN
    and other rows may stay finite (``cls_only`` is NaN, as the reference).

    Determinism: with ``deterministic=True`` the Triton and CUDA kernels use no
    float atomics (C = A^T E' walks a transposed incidence built with a stable
    sort), so repeated calls give identical outputs. The CUDA kernels are
    deterministic always. The torch backend is deterministic on CPU; on a GPU it
    uses ``index_add_``, which is not, whatever ``deterministic`` says. Gradients
    on a GPU: the similarity's backward adds the norms' gradients with
    ``scatter_add_`` (torch's, atomic on a GPU), so the gradient of ``x`` can differ
    in its last bits between repeated calls on every backend but one; on the CPU it
    is reproducible. The exception is ``cls_only`` on the triton backend: its fused
    kernels use no atomics, so its output and every gradient are reproducible on a
    GPU too. Under ``torch.use_deterministic_algorithms(True)`` torch runs its
    deterministic ``index_add_`` and ``scatter_add_`` on a GPU, and the triton
    backend's ``deterministic=False`` is overridden (no atomics).

    Autocast: the forward runs with autocast off, whatever the caller's state: it
    reads ``x`` in its own dtype and accumulates in float32 (float64 for float64
    ``x``; the adapters' parameters are cast to that compute dtype too), and
    returns ``x``'s dtype. Its sparse backwards run
    with autocast off too; the plain-autograd parts (the adapters, and the torch
    backend's ``cls_only`` path) follow the autocast state at backward time, as
    any module's do, so run ``backward()`` outside autocast, as usual.

    Backends: ``triton`` and ``cuda`` take float16/bfloat16/float32 inputs, ``N >= 3`` and
    ``min(topk, N - 1) <= 16``, ``cuda`` only ``N >= topk + 2``; ``torch`` takes everything.
    ``auto`` prefers triton, then cuda, then torch (both kernel backends are validated against the oracle;
    the GPU benchmark decides the final order, for ``cls_only`` and the full
    output separately).
    """
    edge, node, topk = _validate(x, cls_attn, edge_adapter, node_adapter, topk, cls_only, deterministic)
    cls_only, deterministic = bool(cls_only), bool(deterministic)  # NumPy's bools too
    tensors = [x, cls_attn, *edge, *node]
    if _library.builds_graph(tensors):
        # Tokens made under torch.inference_mode: the paths save x where the reference saves E = A X
        # (the full output's folded down projection, for W_de's gradient). Likewise a frozen edge adapter's
        # up projection made under it: the full output folds W_ue and b_ue into the node adapter's down
        # weight (W_dn W_ue, W_dn b_ue), whose gradient saves them where the reference saves neither.
        x = _library.out_of_inference(x)
        edge = (*edge[:2], *map(_library.out_of_inference, edge[2:]))
    args = (x, cls_attn, edge, node, topk, cls_only, deterministic)
    # Selected at B = 0 too, so that a backend that cannot run the call raises as it would for B >= 1.
    impl = _dispatch.select(OP_NAME, backend, tensors, args, variant="cls_only" if cls_only else "full")
    with _library.autocast_off(x.device.type):  # see Notes: autocast
        if x.shape[0] == 0:
            return _empty_batch(x, cls_attn, edge, node, cls_only)
        return impl(*args)


def _empty_batch(x, cls_attn, edge_params, node_params, cls_only):
    """The output of an empty batch (B = 0) without a kernel (its grid would have no block): the adapters
    applied in plain autograd to the empty rows, x's (token 0's for ``cls_only``) plus cls_attn's row sums
    (over N - 1 >= 0 columns). As in the reference's graph, the backward then gives x and cls_attn empty
    gradients and each adapter parameter that requires grad a zero one (a sum over no rows), in its dtype."""
    compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    rows = x[:, 0] if cls_only else x  # [0, D] or [0, N, D]
    attn = cls_attn.to(compute_dtype).sum(dim=-1)  # [0]
    attn = attn[:, None] if cls_only else attn[:, None, None]
    edge_params = tuple(p.to(compute_dtype) for p in edge_params)
    node_params = tuple(p.to(compute_dtype) for p in node_params)
    return _adapter(_adapter(rows.to(compute_dtype) + attn, edge_params), node_params).to(x.dtype)


# --------------------------------------------------------------------------------------
# Module
# --------------------------------------------------------------------------------------

class _AdapterLinear(nn.Linear):
    """An adapter's ``nn.Linear`` whose :meth:`reset_parameters` gives the reference's init: FSDP's
    meta-device materialisation (and ``to_empty`` then ``reset_parameters`` on each module) gave
    nn.Linear's kaiming-uniform weight instead of the kaiming-normal one."""

    # nn.Linear.__init__ calls reset_parameters: construction keeps nn.Linear's init there and
    # _Adapter draws the kaiming-normal weights after both layers, as it always has (same numbers).
    _kaiming_normal = False

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features)
        self._kaiming_normal = True

    def reset_parameters(self) -> None:
        # The draws of construction, this layer's own: nn.Linear's weight and bias, then the weight again.
        super().reset_parameters()
        if self._kaiming_normal:
            nn.init.kaiming_normal_(self.weight)


class _Adapter(nn.Module):
    """up(leaky_relu(down(z), 0.2)); state dict keys down.weight/bias, up.weight/bias."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.down = _AdapterLinear(dim, hidden)
        self.up = _AdapterLinear(hidden, dim)
        # The reference initialises the weights with kaiming_normal_ and keeps nn.Linear's biases.
        nn.init.kaiming_normal_(self.down.weight)
        nn.init.kaiming_normal_(self.up.weight)

    def forward(self, z):
        return self.up(F.leaky_relu(self.down(z), _NEG_SLOPE))


class ACEHypergraph(nn.Module):
    """ACE-HGNN module: an edge and a node adapter around :func:`ace_hypergraph`.

    Parameters
    ----------
    dim : int
        Token feature size D (512 in BiomedCLIP).
    hidden : int
        Adapter bottleneck (128).
    topk : int
        Neighbours per hyperedge (5).
    deterministic : bool
        Default for :meth:`forward`'s ``deterministic`` (see :func:`ace_hypergraph`).

    The released checkpoint's adapter state dicts (keys ``down.weight``,
    ``down.bias``, ``up.weight``, ``up.bias``) load into ``edge_adapter`` and
    ``node_adapter`` unchanged.

    The forward reads the adapters' weights and never calls them: hooks registered on
    ``edge_adapter``/``node_adapter`` or their layers, and forwards set on their instances,
    raise (see :func:`ace_hypergraph`);
    hooks on this module itself run as usual.
    """

    def __init__(self, dim: int = 512, hidden: int = 128, topk: int = 5, deterministic: bool = True):
        super().__init__()
        dim, hidden, topk = (check_positive_int(name, value) for name, value in
                             (("dim", dim), ("hidden", hidden), ("topk", topk)))
        deterministic = check_bool("deterministic", deterministic)
        self.dim, self.hidden, self.topk, self.deterministic = dim, hidden, topk, deterministic
        self.edge_adapter = _Adapter(dim, hidden)
        self.node_adapter = _Adapter(dim, hidden)

    def forward(self, x, cls_attn, cls_only: bool = False, backend: str = "auto", deterministic: bool | None = None):
        deterministic = self.deterministic if deterministic is None else deterministic
        if isinstance(x, torch.Tensor) and not x.is_nested and x.dim() == 3 and x.shape[-1] != self.dim:
            raise ValueError(f"argument 'x': expected features of width {self.dim} (this module's dim), got shape "
                             f"{list(x.shape)}")
        return ace_hypergraph(x, cls_attn, self.edge_adapter, self.node_adapter, topk=self.topk,
                              cls_only=cls_only, backend=backend, deterministic=deterministic)

    def extra_repr(self) -> str:
        extra = "" if self.deterministic else ", deterministic=False"
        return f"dim={self.dim}, hidden={self.hidden}, topk={self.topk}{extra}"
