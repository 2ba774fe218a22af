"""LoRA linear layers: ``lora_linear`` and the stacked ``lora_qkv``.

Each adapted projection computes (spec section 2)::

    y = x W^T + b + scaling * (drop(x) A^T) B^T

with a frozen ``W`` [out, in], ``b`` [out], trainable ``A`` [r, in], ``B`` [out, r]
and inverted dropout on the LoRA branch input only. ``lora_qkv`` is three such
projections sharing ``x`` (q, k, v stacked in ``W`` [3*out, in]), each with its own
independent dropout mask, as with three separate layers.

Backends
--------
``torch``
    Exact PyTorch on any device, one ``autograd.Function``. The frozen base is one
    stacked GEMM; the LoRA branch runs at rank r (``B A`` is never formed). Saved
    for backward: ``x``, the rank-r activations ``S = drop(x) A^T`` and the keep
    masks as ``bool`` (1 byte per element and projection). Storing the masks was
    measured faster on the CPU than regenerating them in backward: drawing the
    random numbers costs about as much as a quarter of the base GEMM there.
``triton``
    Fused kernels (GPU; on the CPU only under ``TRITON_INTERPRET=1`` and only when
    asked for by name). The dropout mask comes from Philox keyed by a seed and the
    element position and is regenerated in registers in backward: only ``x``, ``S``
    and the seed are saved. ``W`` and ``b`` are treated as frozen: when either
    requires grad this backend declines the call (``auto`` falls back to ``torch``;
    ``backend="triton"`` raises ``RuntimeError`` saying why).

Dropout randomness
------------------
Both backends draw their randomness from torch's default generator of ``x``'s
device, so ``torch.manual_seed`` and ``torch.random.fork_rng`` (or saving and
restoring the generator state) reproduce the masks exactly:

* ``torch``: ``torch.rand`` of shape [P, M, in] (P projections, M = rows of the
  flattened ``x``), element kept where the number is ``>= dropout_p``.
* ``triton``: one ``torch.randint`` seed (a 1-element int64 tensor on the device,
  read by the kernels, so there is no host synchronisation); Philox
  ``randint4x(seed, rng_offset + row * in + col)`` gives one 32-bit number per
  projection (lane p for projection p); the element is kept where its top 24 bits
  are ``>= round(dropout_p * 2**24)``.

The two backends therefore give different (equally distributed) masks for the same
seed. :func:`capture_dropout_masks` records the masks a call used (a debugging and
testing aid).

Non-finite inputs
-----------------
Nothing is checked or masked: NaN and Inf propagate as in the formula (a non-finite
element of ``x`` makes its whole output row non-finite; a non-finite weight makes
the affected output columns non-finite). Dropped elements are multiplied by zero in
the ``torch`` backend (so a NaN stays NaN, like ``nn.Dropout``) and selected away in
the ``triton`` backend; the base term makes the row non-finite either way.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch

from ace_kernels import _dispatch
from ace_kernels._checks import check_probability, check_same_dtype, check_tensor

__all__ = ["lora_linear", "lora_qkv", "capture_dropout_masks", "saved_activation_bytes"]

_dispatch.define_op("lora_linear", prefer=("triton", "torch"))
_dispatch.define_op("lora_qkv", prefer=("triton", "torch"))


# ----------------------------------------------------------------------------------------
# Debug hooks (tests and benchmarks only)
# ----------------------------------------------------------------------------------------

_MASK_RECORDERS: list[list] = []
_SAVED_BYTES_RECORDERS: list[list] = []


@contextlib.contextmanager
def capture_dropout_masks() -> Iterator[list]:
    """Record the dropout keep masks used by LoRA calls inside the ``with`` block.

    Yields a list; every ``lora_linear``/``lora_qkv`` call made inside appends one
    ``bool`` tensor of shape [P, *x.shape[:-1], in] (P = 1 for ``lora_linear``, 3 for
    ``lora_qkv``; True = kept), or ``None`` when the call applied no dropout. For
    the ``triton`` backend the mask is exported by a kernel from the same Philox
    stream as the forward and backward kernels. For tests; costs an extra pass.
    """
    record: list = []
    _MASK_RECORDERS.append(record)
    try:
        yield record
    finally:
        _MASK_RECORDERS.remove(record)


def _record_mask(mask_or_none, lead_shape, in_features) -> None:
    if not _MASK_RECORDERS:
        return
    entry = None
    if mask_or_none is not None:
        entry = mask_or_none.detach().reshape(mask_or_none.shape[0], *lead_shape, in_features).clone()
    for record in _MASK_RECORDERS:
        record.append(entry)


@contextlib.contextmanager
def saved_activation_bytes() -> Iterator[list]:
    """Record how many bytes each LoRA call inside the block keeps for backward.

    Yields a list; every call that builds an autograd graph appends a dict
    ``{"backend", "total", "x", "extra"}``: ``total`` counts every tensor the op's
    ``autograd.Function`` saves except the parameters (W, b, A, B), ``x`` the bytes
    of the saved input and ``extra`` the rest (rank-r activations, masks, seed).
    Intended for the benchmarks' saved-activation comparison.
    """
    record: list = []
    _SAVED_BYTES_RECORDERS.append(record)
    try:
        yield record
    finally:
        _SAVED_BYTES_RECORDERS.remove(record)


def _record_saved(backend: str, x_saved: torch.Tensor, extras) -> None:
    if not _SAVED_BYTES_RECORDERS:
        return
    x_bytes = x_saved.numel() * x_saved.element_size()
    extra = sum(t.numel() * t.element_size() for t in extras if t is not None)
    for record in _SAVED_BYTES_RECORDERS:
        record.append({"backend": backend, "total": x_bytes + extra, "x": x_bytes, "extra": extra})


# ----------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------


def _validate(x, weight, bias, lora_a, lora_b, scaling, dropout_p, training, projections: int):
    """Check every argument; return (out_features_per_projection, rank, dropout_p)."""
    check_tensor("x", x, min_ndim=1)
    device = x.device
    in_features = x.shape[-1]
    check_tensor("weight", weight, ndim=2, device=device)
    if weight.shape[1] != in_features:
        raise ValueError(
            f"argument 'weight': expected shape [{'3*out' if projections == 3 else 'out'}, {in_features}] "
            f"(in_features = x.shape[-1]), got {list(weight.shape)}"
        )
    if weight.shape[0] % projections != 0:
        raise ValueError(
            f"argument 'weight': expected shape [3*out, {in_features}] with q, k, v stacked (rows a multiple of 3), "
            f"got {list(weight.shape)}"
        )
    out_features = weight.shape[0] // projections
    if bias is not None:
        check_tensor("bias", bias, shape=[weight.shape[0]], device=device)
    if projections == 1:
        check_tensor("lora_a", lora_a, ndim=2, device=device)
        rank = lora_a.shape[0]
        if rank < 1:
            raise ValueError(f"argument 'lora_a': expected shape [r, {in_features}] with r >= 1, got {list(lora_a.shape)}")
        check_tensor("lora_a", lora_a, shape=["r", in_features])
        check_tensor("lora_b", lora_b, shape=[out_features, rank], device=device)
    else:
        check_tensor("lora_a", lora_a, ndim=3, device=device)
        rank = lora_a.shape[1]
        if rank < 1:
            raise ValueError(f"argument 'lora_a': expected shape [3, r, {in_features}] with r >= 1, got {list(lora_a.shape)}")
        check_tensor("lora_a", lora_a, shape=[3, "r", in_features])
        check_tensor("lora_b", lora_b, shape=[3, out_features, rank], device=device)
    check_same_dtype("x", x, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b)
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise ValueError(f"argument 'scaling': expected a Python number, got {type(scaling).__name__}")
    dropout_p = check_probability("dropout_p", dropout_p)
    if not isinstance(training, bool):
        raise ValueError(f"argument 'training': expected a bool, got {type(training).__name__}")
    return out_features, rank, dropout_p


# ----------------------------------------------------------------------------------------
# torch backend
# ----------------------------------------------------------------------------------------


def _block_diagonal_b(lora_b3: torch.Tensor) -> torch.Tensor:
    """[P, out, r] -> [P*out, P*r] with B_p on the diagonal: one GEMM for every projection."""
    if lora_b3.shape[0] == 1:
        return lora_b3[0]
    return torch.block_diag(*lora_b3.unbind(0))


class _LoraTorchFunction(torch.autograd.Function):
    """Rank-r LoRA for P stacked projections; see the module docstring for what is saved."""

    @staticmethod
    def forward(ctx, x2d, weight, bias, lora_a3, lora_b3, scaling, dropout_p, apply_dropout, side):
        projections, rank, in_features = lora_a3.shape
        out_features = lora_b3.shape[1]
        rows = x2d.shape[0]
        keep_prob = 1.0 - dropout_p
        if bias is not None:
            y = torch.addmm(bias, x2d, weight.t())
        else:
            y = x2d @ weight.t()
        keep = None
        if apply_dropout:
            # torch.rand on the default generator: fork_rng / manual_seed replay it exactly.
            keep = torch.rand((projections, rows, in_features), device=x2d.device) >= dropout_p
            # where() is several times faster than multiplying by the bool mask on the CPU.
            x_dropped = torch.where(keep, x2d.unsqueeze(0), 0.0)  # [P, M, in]; 1/keep_prob folded into S
            s_act = torch.bmm(x_dropped, lora_a3.transpose(1, 2))  # [P, M, r]
            s_act.mul_(1.0 / keep_prob)
            del x_dropped
            s_flat = s_act.transpose(0, 1).reshape(rows, projections * rank)  # [M, P*r]
        else:
            s_flat = x2d @ lora_a3.reshape(projections * rank, in_features).t()  # [M, P*r]
        y.addmm_(s_flat, _block_diagonal_b(lora_b3).t(), alpha=scaling)
        ctx.save_for_backward(x2d, weight, lora_a3, lora_b3, s_flat, keep)
        ctx.scaling = scaling
        ctx.keep_prob = keep_prob
        ctx.has_bias = bias is not None
        # Hand the mask and the saved tensors to the caller for the debug hooks.
        side["keep"] = keep
        side["saved"] = (x2d, (s_flat, keep))
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x2d, weight, lora_a3, lora_b3, s_flat, keep = ctx.saved_tensors
        projections, rank, in_features = lora_a3.shape
        rows = x2d.shape[0]
        scaling, keep_prob = ctx.scaling, ctx.keep_prob
        grad_y = grad_y.contiguous()
        b_block = _block_diagonal_b(lora_b3)  # [P*out, P*r]
        # G_p = dY_p B_p for every projection in one pass over dY.
        grad_s = grad_y @ b_block  # [M, P*r]
        grad_x = grad_weight = grad_bias = grad_a = grad_b = None
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        if need_b:
            # dB_p = s dY_p^T S_p: the diagonal blocks of dY^T S.
            full = grad_y.t() @ s_flat  # [P*out, P*r]
            out_features = lora_b3.shape[1]
            grad_b = torch.stack(
                [full[p * out_features:(p + 1) * out_features, p * rank:(p + 1) * rank] for p in range(projections)]
            ).mul_(scaling)
        if keep is None:
            a_flat = lora_a3.reshape(projections * rank, in_features)
            if need_x:
                grad_x = grad_y @ weight
                grad_x.addmm_(grad_s, a_flat, alpha=scaling)
            if need_a:
                grad_a = (grad_s.t() @ x2d).mul_(scaling).reshape(projections, rank, in_features)
        else:
            grad_s3 = grad_s.reshape(rows, projections, rank).transpose(0, 1)  # [P, M, r]
            factor = scaling / keep_prob
            if need_x:
                grad_x = grad_y @ weight
                for p in range(projections):
                    lora_part = grad_s3[p] @ lora_a3[p]  # [M, in]
                    grad_x.add_(torch.where(keep[p], lora_part, 0.0), alpha=factor)
                del lora_part
            if need_a:
                x_dropped = torch.where(keep, x2d.unsqueeze(0), 0.0)
                grad_a = torch.bmm(grad_s3.transpose(1, 2), x_dropped).mul_(factor)
        if need_w:
            grad_weight = grad_y.t() @ x2d
        if need_bias and ctx.has_bias:
            grad_bias = grad_y.sum(0)
        return grad_x, grad_weight, grad_bias, grad_a, grad_b, None, None, None, None


def _torch_forward(x, weight, bias, lora_a3, lora_b3, scaling, dropout_p, training):
    in_features = x.shape[-1]
    lead_shape = x.shape[:-1]
    x2d = x.reshape(-1, in_features)
    apply_dropout = training and dropout_p > 0.0
    side: dict = {}
    y = _LoraTorchFunction.apply(x2d, weight, bias, lora_a3, lora_b3, float(scaling), dropout_p, apply_dropout, side)
    _record_mask(side["keep"], lead_shape, in_features)
    if y.grad_fn is not None:
        _record_saved("torch", *side["saved"])
    return y.reshape(*lead_shape, y.shape[-1])


@_dispatch.register("lora_linear", "torch")
def _lora_linear_torch(x, weight, bias, lora_a, lora_b, scaling, dropout_p, training):
    return _torch_forward(x, weight, bias, lora_a.unsqueeze(0), lora_b.unsqueeze(0), scaling, dropout_p, training)


@_dispatch.register("lora_qkv", "torch")
def _lora_qkv_torch(x, weight, bias, lora_a, lora_b, scaling, dropout_p, training):
    y = _torch_forward(x, weight, bias, lora_a, lora_b, scaling, dropout_p, training)
    return tuple(y.chunk(3, dim=-1))


# ----------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------


def lora_linear(x, weight, bias, lora_a, lora_b, *, scaling, dropout_p=0.0, training=False, backend="auto"):
    """A linear layer with a LoRA branch: ``x W^T + b + scaling * (drop(x) A^T) B^T``.

    Parameters
    ----------
    x : Tensor [..., in]
        Input; any number of leading dimensions (including none besides ``in``,
        and zero rows), any strides.
    weight : Tensor [out, in]
        Frozen base weight.
    bias : Tensor [out] or None
        Frozen base bias.
    lora_a : Tensor [r, in]
        LoRA down projection A (r >= 1).
    lora_b : Tensor [out, r]
        LoRA up projection B.
    scaling : float
        Multiplier of the LoRA branch (ACE-LoRA uses alpha / sqrt(r) = 0.5).
    dropout_p : float, default 0.0
        Dropout probability on the LoRA branch input, in [0, 1).
    training : bool, default False
        Dropout is applied only when True and ``dropout_p > 0``.
    backend : {"auto", "triton", "torch", "cuda"}
        ``auto`` (or the ``ACE_KERNELS_BACKEND`` environment variable) picks the
        first backend that can run the call; a named one that cannot raises
        ``RuntimeError`` with the reason.

    Returns
    -------
    Tensor [..., out]
        In the dtype of ``x``. Gradients flow to ``x``, ``lora_a`` and ``lora_b``,
        and with the ``torch`` backend also to ``weight`` and ``bias`` when they
        require grad. NaN/Inf inputs propagate (see the module docstring).

    Raises
    ------
    ValueError
        When a tensor has the wrong rank, shape, dtype (all must equal ``x``'s:
        float16, bfloat16, float32 or float64) or device, ``scaling`` is not a number,
        ``dropout_p`` is outside [0, 1) or ``training`` is not a bool.
    """
    _, _, dropout_p = _validate(x, weight, bias, lora_a, lora_b, scaling, dropout_p, training, 1)
    args = (x, weight, bias, lora_a, lora_b, scaling, dropout_p, training)
    impl = _dispatch.select("lora_linear", backend, [x, weight, bias, lora_a, lora_b], args)
    return impl(*args)


def lora_qkv(x, weight, bias, lora_a, lora_b, *, scaling, dropout_p=0.0, training=False, backend="auto"):
    """Three LoRA linears (q, k, v) sharing ``x``, with one stacked base GEMM.

    For p in (q, k, v): ``y_p = x W_p^T + b_p + scaling * (drop_p(x) A_p^T) B_p^T`` with
    an independent dropout mask per projection, exactly as three separate
    :func:`lora_linear` layers.

    Parameters
    ----------
    x : Tensor [..., in]
    weight : Tensor [3*out, in]
        Frozen q, k, v weights stacked along the rows (timm's packed ``qkv``).
    bias : Tensor [3*out] or None
    lora_a : Tensor [3, r, in]
        A_q, A_k, A_v.
    lora_b : Tensor [3, out, r]
        B_q, B_k, B_v.
    scaling, dropout_p, training, backend
        As in :func:`lora_linear`.

    Returns
    -------
    (q, k, v) : tuple of Tensor [..., out]
        Views into one [..., 3*out] result (so they are not contiguous when there is
        more than one row). Gradients as in :func:`lora_linear`.

    Raises
    ------
    ValueError
        As in :func:`lora_linear`; also when ``weight`` has a row count that is not a
        multiple of 3 or ``lora_a``/``lora_b`` do not have 3 projections.
    """
    _, _, dropout_p = _validate(x, weight, bias, lora_a, lora_b, scaling, dropout_p, training, 3)
    args = (x, weight, bias, lora_a, lora_b, scaling, dropout_p, training)
    impl = _dispatch.select("lora_qkv", backend, [x, weight, bias, lora_a, lora_b], args)
    return impl(*args)
