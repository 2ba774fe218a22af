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
    masks as ``bool`` (1 byte per element and projection), each only when a wanted
    gradient reads it (B alone trained: ``S`` alone). Storing the masks was
    measured faster on the CPU than regenerating them in backward: drawing the
    random numbers costs about as much as a quarter of the base GEMM there.
``triton``
    Triton kernels around torch's GEMMs (GPU; on the CPU only under ``TRITON_INTERPRET=1``
    and only when asked for by name). The LoRA term rides along the frozen base's own GEMM
    as P*r extra columns (``x_cat = [x | S]`` against ``[W | scaling * Bbd]``), so the large
    product runs at cuBLAS speed; one kernel packs ``x_cat`` (computing ``S`` with its
    dropout), the backward's products are torch's too (``dY W``, and ``dY_p B_p`` and
    ``dY_p^T S_p`` batched over the projections), and one kernel finishes the gradients of
    ``x`` and ``A``. The dropout mask comes from Philox keyed by a seed and the element
    position and is regenerated in registers in backward: only ``x_cat`` (x and P*r
    columns, zero-padded to a multiple of 8) and the seed are saved; with A frozen, where
    no gradient reads x, a copy of S's columns (B trained) and the seed (x trained) alone. In
    evaluation (``training=False``) without a graph to build, the LoRA term is merged into
    the weight instead (``W + scaling * B A``, one small batched product) and the call is
    one GEMM; in float16, where a merged element could overflow, the term is added unmerged
    (``x W^T + b + scaling * S Bbd^T``, three GEMMs, ``scaling`` applied in fp32). ``W`` and ``b``
    are treated as frozen: when either requires grad this backend declines the call, except in
    evaluation with grad mode off (``auto`` falls back to ``torch``; ``backend="triton"``
    raises ``RuntimeError`` saying why).
    It declines too for ``dropout_p`` above 0.999237 (``1 - 2**-17 / 0.01``) in training,
    where the rounding of its 16-bit keep threshold (up to 2**-17) can be more than 1% of
    ``1 - dropout_p``; for P*r > 64 (``lora_qkv``: rank at most 21, ``lora_linear``: 64);
    for an ``in_features`` with more column blocks than the grid takes; for float64; and,
    under the interpreter, for bfloat16 (its bf16 arithmetic is wrong).

Dropout randomness
------------------
Both backends draw their randomness from torch's default generator of ``x``'s
device, so ``torch.manual_seed`` and ``torch.random.fork_rng`` (or saving and
restoring the generator state) reproduce the masks exactly:

* ``torch``: ``torch.rand`` of shape [P, M, in] in float32 (whatever the default dtype; P
  projections, M = rows of the flattened ``x``), element kept where the number is ``>= dropout_p``.
* ``triton``: one ``torch.randint`` seed (a 1-element int64 tensor on the device,
  read by the kernels, so there is no host synchronisation). Philox4x32-10 keyed by
  the seed, counter ``rng_offset + row * ceil(in / 2) + col // 2``: lane p serves
  projection p, its low 16 bits column ``2c`` and its high 16 bits column ``2c+1``;
  kept where those 16 bits are ``>= round(dropout_p * 2**16)``. So ``dropout_p`` is
  applied at a resolution of 2**-16 (keep rate off by at most 7.7e-6; 0.1 becomes
  0.100006), while the 1/(1-p) scale uses ``dropout_p`` itself. Two columns per draw
  halve the Philox arithmetic, the main integer cost of the kernels.

Each call draws once (P*M*in uniforms, or one seed), so restoring the generator state
before a call replays its masks. Under ``torch.compile`` with inductor, that draw (the
torch backend's ``torch.rand``, the triton backend's seed) becomes inductor's own generator:
its masks replay within compiled code but differ from eager's for the same seed
(``torch._inductor.config.fallback_random = True`` keeps eager's). The two backends give
different (equally distributed) masks for the same seed, and leave the generator in
different states: random numbers drawn after the call (another layer's dropout) differ too.
:func:`capture_dropout_masks` records the masks a call used (a debugging and
testing aid).

Non-finite inputs
-----------------
Nothing is checked or masked: NaN and Inf propagate as in the formula (a non-finite
element of ``x`` makes its whole output row non-finite; a non-finite weight makes
the affected output columns non-finite). Dropped elements are selected away
(``torch.where``) in the ``torch`` backend and multiplied by 0 in the ``triton``
kernels (so a dropped NaN still reaches ``S`` there, as with ``nn.Dropout``); the
base term makes the row non-finite either way, and gradients then follow the same
arithmetic. Nothing hangs or raises on non-finite values.

Whether a non-finite element comes out NaN or inf follows the arithmetic of the path
that ran, and two paths differ from three separate layers there. ``lora_qkv``'s three
LoRA terms are one block-diagonal product (``S Bbd^T``) in the ``torch`` backend and in
the ``triton`` training and float16 paths: a non-finite rank-r activation of one
projection (from its ``A_p``, or from ``x``) makes the same rows of the other two outputs
NaN (``0 * inf``), where separate layers, and the ``triton`` merged evaluation, keep the
other two projections finite. And the merged weight folds the LoRA term into ``W``: a
non-finite element of ``x`` gives +-inf there where the unmerged sum
``x W^T + scaling * (x A^T) B^T`` meets ``inf - inf``, NaN in the ``torch`` backend.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch

from ace_kernels import _dispatch, _library, _tuning
from ace_kernels._checks import check_bool, check_finite_number, check_probability, check_same_dtype, check_tensor

__all__ = ["lora_linear", "lora_qkv", "lora_qkv_packed", "capture_dropout_masks", "saved_activation_bytes"]

# Below this many rows (tokens) a call is "small": its time on a GPU is mostly the host's
# launch work (the BiomedCLIP towers' 12,608 and 16,384 rows at B = 64), and the fastest backend
# there need not be the fastest at large M, so the benchmark orders the two classes separately.
SMALL_ROWS_LIMIT = 65536
_dispatch.define_op("lora_linear", prefer=("triton", "torch"), variants=("small", "large"))
_dispatch.define_op("lora_qkv", prefer=("triton", "torch"), variants=("small", "large"))


def rows_variant(rows: int) -> str:
    """The dispatch variant of a call on ``rows`` rows of x (all leading dimensions)."""
    return "small" if rows < SMALL_ROWS_LIMIT else "large"


# ----------------------------------------------------------------------------------------
# Debug hooks (tests and benchmarks only)
# ----------------------------------------------------------------------------------------

_MASK_RECORDERS: list[list] = []
_SAVED_BYTES_RECORDERS: list[list] = []
# Opening and closing: two threads closing at once would each search a list the other shifts (a
# recorder missed stays open for good). Recording reads a tuple copy and needs no lock.
_RECORDERS_LOCK = threading.Lock()


@contextlib.contextmanager
def capture_dropout_masks() -> Iterator[list]:
    """Record the dropout keep masks used by LoRA calls inside the ``with`` block.

    Yields a list; every ``lora_linear``/``lora_qkv`` call made inside appends one
    ``bool`` tensor of shape [P, *x.shape[:-1], in] (P = 1 for ``lora_linear``, 3 for
    ``lora_qkv``; True = kept), or ``None`` when the call applied no dropout. For
    the ``triton`` backend the mask is exported by a kernel from the same Philox
    stream as the forward and backward kernels. For tests; costs an extra pass. The
    recorders are process-wide: calls made by other threads inside the block are recorded too.
    Eager calls only: under ``torch.compile`` the ``triton`` backend's recording fails to trace
    (the torch backend's works).
    """
    record: list = []
    with _RECORDERS_LOCK:
        _MASK_RECORDERS.append(record)
    try:
        yield record
    finally:
        _remove_recorder(_MASK_RECORDERS, record)


def _remove_recorder(recorders: list, record: list) -> None:
    # By identity: two recorders holding equal contents (both empty, or nested ones that saw the
    # same calls) compare equal, and list.remove would take the outer one.
    with _RECORDERS_LOCK:
        for index, candidate in enumerate(recorders):
            if candidate is record:
                del recorders[index]
                return


def _record_mask(mask_or_none, lead_shape, in_features) -> None:
    if not _MASK_RECORDERS:
        return
    entry = None
    if mask_or_none is not None:
        entry = mask_or_none.detach().reshape(mask_or_none.shape[0], *lead_shape, in_features).clone()
    for record in tuple(_MASK_RECORDERS):  # a copy: another thread may open or close one meanwhile
        record.append(entry)


@contextlib.contextmanager
def saved_activation_bytes() -> Iterator[list]:
    """Record how many bytes each LoRA call inside the block keeps for backward.

    Yields a list; every call that builds an autograd graph appends a dict
    ``{"backend", "total", "x", "extra"}``: ``total`` counts every tensor the op's
    ``autograd.Function`` saves except the parameters (W, b, A, B), ``x`` the bytes
    of the saved input and ``extra`` the rest (rank-r activations, masks, seed).
    Intended for the benchmarks' saved-activation comparison; eager calls only, as
    :func:`capture_dropout_masks`.
    """
    record: list = []
    with _RECORDERS_LOCK:
        _SAVED_BYTES_RECORDERS.append(record)
    try:
        yield record
    finally:
        _remove_recorder(_SAVED_BYTES_RECORDERS, record)


def _record_saved(backend: str, y: torch.Tensor, x_saved: torch.Tensor | None, extras) -> None:
    """Record what the call that produced ``y`` saved (``x_saved`` None: x was not saved), if it built a
    graph and a recorder is on. (The recorders are checked first: ``torch.compile`` cannot trace ``y.grad_fn``.)"""
    if not _SAVED_BYTES_RECORDERS or y.grad_fn is None:
        return
    x_bytes = 0 if x_saved is None else x_saved.numel() * x_saved.element_size()
    extra = sum(t.numel() * t.element_size() for t in extras if t is not None)
    for record in tuple(_SAVED_BYTES_RECORDERS):
        record.append({"backend": backend, "total": x_bytes + extra, "x": x_bytes, "extra": extra})


# ----------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------


def _validate(x, weight, bias, lora_a, lora_b, scaling, dropout_p, training, projections: int):
    """Check every argument; return (out_features_per_projection, rank, dropout_p)."""
    check_tensor("x", x, min_ndim=1)
    device = x.device
    in_features = x.shape[-1]
    if in_features < 1:
        raise ValueError(f"argument 'x': expected [..., in_features] with in_features >= 1, got shape {list(x.shape)}")
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
    if out_features < 1:
        per = " per projection" if projections == 3 else ""
        raise ValueError(f"argument 'weight': expected at least one output row{per}, got shape {list(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, shape=[weight.shape[0]], device=device)
    if projections == 1:
        check_tensor("lora_a", lora_a, ndim=2, device=device)
        rank = lora_a.shape[0]
        if rank < 1:
            raise ValueError(f"argument 'lora_a': expected shape [r, {in_features}] with r >= 1, got "
                             f"{list(lora_a.shape)}")
        check_tensor("lora_a", lora_a, shape=["r", in_features])
        check_tensor("lora_b", lora_b, shape=[out_features, rank], device=device)
    else:
        check_tensor("lora_a", lora_a, ndim=3, device=device)
        rank = lora_a.shape[1]
        if rank < 1:
            raise ValueError(f"argument 'lora_a': expected shape [3, r, {in_features}] with r >= 1, got "
                             f"{list(lora_a.shape)}")
        check_tensor("lora_a", lora_a, shape=[3, "r", in_features])
        check_tensor("lora_b", lora_b, shape=[3, out_features, rank], device=device)
    check_same_dtype("x", x, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b)
    check_finite_number("scaling", scaling)
    dropout_p = check_probability("dropout_p", dropout_p)
    check_bool("training", training)
    return out_features, rank, dropout_p


# ----------------------------------------------------------------------------------------
# torch backend
# ----------------------------------------------------------------------------------------


def _block_diagonal_view(full: torch.Tensor, projections: int, rank: int) -> torch.Tensor:
    """The diagonal blocks of a [P*out, P*r] matrix (``full`` may be a column slice of a wider
    one) as a view [out, r, P]: element [o, j, p] is full[p*out + o, p*r + j], i.e. B_p[o, j]
    when ``full`` is the block-diagonal Bbd. Viewed as [p, o, q, j], the (p, q) diagonal."""
    out_features = full.shape[0] // projections
    return torch.diagonal(full.view(projections, out_features, projections, rank), dim1=0, dim2=2)


def _block_diagonal_b(lora_b3: torch.Tensor) -> torch.Tensor:
    """[P, out, r] -> [P*out, P*r] with B_p on the diagonal: one GEMM for every projection."""
    projections, out_features, rank = lora_b3.shape
    if projections == 1:
        return lora_b3[0]
    if not _library.in_place_ok():
        return torch.block_diag(*lora_b3.unbind(0))
    full = lora_b3.new_zeros((projections * out_features, projections * rank))
    _block_diagonal_view(full, projections, rank).copy_(lora_b3.permute(1, 2, 0))
    return full


def _diagonal_blocks(full: torch.Tensor, projections: int, rank: int) -> torch.Tensor:
    """[P*out, P*r] -> [P, out, r]: the diagonal blocks (the inverse of :func:`_block_diagonal_b`), a copy."""
    return _block_diagonal_view(full, projections, rank).permute(2, 0, 1).contiguous()


def _down_projection(x2d, lora_a3, keep, keep_prob):
    """S = [drop_p(x) A_p^T / keep_prob]_p, stacked: [M, P*r] (no dropout when ``keep`` is None)."""
    projections, rank, in_features = lora_a3.shape
    if keep is None:
        return x2d @ lora_a3.reshape(projections * rank, in_features).t()
    # where() is several times faster than multiplying by the bool mask on the CPU. Projection by
    # projection: one dropped copy of x ([M, in]) at a time; 1/keep_prob folded into S.
    s_act = torch.stack([torch.where(keep[p], x2d, 0.0) @ lora_a3[p].t() for p in range(projections)])  # [P, M, r]
    s_act = s_act.mul_(1.0 / keep_prob) if _library.in_place_ok() else s_act * (1.0 / keep_prob)
    rows = x2d.shape[0]
    s_flat = s_act.transpose(0, 1).reshape(rows, projections * rank)
    # With one projection, at most one row or rank 1, that reshape is a view of s_act (P > 1 projections
    # of M > 1 rows at r > 1 copy): a view of an intermediate must not be saved or returned by the Function,
    # which torch.compile refuses (an InternalTorchDynamoError for lora_qkv; [M, P*r]: cheap).
    return s_flat.clone() if projections == 1 or rows <= 1 or rank == 1 else s_flat


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
            # torch.rand on the default generator: fork_rng / manual_seed replay it exactly. float32 whatever
            # the default dtype: bfloat16 uniforms (steps of 2**-8) would bias the keep rate (none kept at 0.999).
            keep = torch.rand((projections, rows, in_features), dtype=torch.float32, device=x2d.device) >= dropout_p
        s_flat = _down_projection(x2d, lora_a3, keep, keep_prob)
        if not _library.in_place_ok():
            # Out of place while tracing: torch 2.11's AOTAutograd returned zero gradients for
            # every input when the Function's output was updated in place (fixed by 2.13;
            # inductor re-inplaces it anyway); and under a dispatch mode (selective checkpointing
            # keeps the addmm's result). Eager keeps the in-place update (one buffer less).
            y = torch.addmm(y, s_flat, _block_diagonal_b(lora_b3).t(), alpha=scaling)
        else:
            y.addmm_(s_flat, _block_diagonal_b(lora_b3).t(), alpha=scaling)
        # Only what the wanted gradients read (a frozen weight made under torch.inference_mode cannot be
        # saved; nor need it be when x needs no gradient): W for dX; x for dA, dW and (create_graph=True,
        # x trained too) S's recomputation; A, B and the masks for dX and dA; S for dB.
        need_x, need_w, _, need_a, need_b = ctx.needs_input_grad[:5]
        save_x = need_a or need_w or (need_b and need_x)
        need_branch = need_x or need_a
        saved = (x2d if save_x else None, weight if need_x else None, lora_a3 if need_branch else None,
                 lora_b3 if need_branch else None, s_flat if need_b else None, keep if need_branch else None)
        ctx.save_for_backward(*saved)
        ctx.shape = (projections, rank, in_features, out_features)
        ctx.scaling = scaling
        ctx.keep_prob = keep_prob
        ctx.has_bias = bias is not None
        # Hand the mask and the saved tensors to the caller for the debug hooks.
        side["keep"] = keep
        side["saved"] = (saved[0], saved[4:])
        return y

    @staticmethod
    @_library.autocast_off_backward  # the forward ran with autocast off; so must the products here
    def backward(ctx, grad_y):
        x2d, weight, lora_a3, lora_b3, s_flat, keep = ctx.saved_tensors
        projections, rank, in_features, out_features = ctx.shape
        rows = grad_y.shape[0]
        scaling, keep_prob = ctx.scaling, ctx.keep_prob
        grad_y = grad_y.contiguous()
        grad_x = grad_weight = grad_bias = grad_a = grad_b = None
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        need_branch = need_x or need_a  # the LoRA branch's way back (A, B and the masks are saved for it)
        if need_branch:
            # G_p = dY_p B_p for every projection: one batched product over a view of dY
            # (measured faster on the CPU than dY times the block-diagonal B).
            grad_s3 = torch.bmm(grad_y.view(rows, projections, out_features).transpose(0, 1), lora_b3)  # [P, M, r]
        if need_b:
            if torch.is_grad_enabled() and need_branch:
                # create_graph=True: S was computed without a graph in forward; recompute it
                # with one, so that dB is differentiable in x and A too (every other term
                # below is built from differentiable ops on the saved inputs).
                s_flat = _down_projection(x2d, lora_a3, keep, keep_prob)
            # dB_p = s dY_p^T S_p: the diagonal blocks of dY^T S.
            full = grad_y.t() @ s_flat  # [P*out, P*r]
            grad_b = _diagonal_blocks(full, projections, rank).mul_(scaling)
        if need_branch and keep is None:
            a_flat = lora_a3.reshape(projections * rank, in_features)
            grad_s = grad_s3.transpose(0, 1).reshape(rows, projections * rank)  # [M, P*r]
            if need_x:
                grad_x = grad_y @ weight
                grad_x.addmm_(grad_s, a_flat, alpha=scaling)
            if need_a:
                grad_a = (grad_s.t() @ x2d).mul_(scaling).reshape(projections, rank, in_features)
        elif need_branch:
            factor = scaling / keep_prob
            # Projection by projection: one [M, in] temporary at a time (the masked G_p A_p, the
            # dropped x), where the batched form held two [P, M, in] ones, the backward's peak.
            if need_x:
                grad_x = grad_y @ weight
                lora_sum = torch.where(keep[0], grad_s3[0] @ lora_a3[0], 0.0)
                for p in range(1, projections):
                    lora_sum.add_(torch.where(keep[p], grad_s3[p] @ lora_a3[p], 0.0))
                # mul_ then add_ (not add_(alpha=)): torch 2.11 compiles alpha= to other roundings.
                grad_x.add_(lora_sum.mul_(factor))
                del lora_sum
            if need_a:
                grad_a = torch.stack([grad_s3[p].t() @ torch.where(keep[p], x2d, 0.0)
                                      for p in range(projections)]).mul_(factor)
        if need_w:
            grad_weight = grad_y.t() @ x2d
        if need_bias and ctx.has_bias:
            grad_bias = grad_y.sum(0)
        return grad_x, grad_weight, grad_bias, grad_a, grad_b, None, None, None, None


def _torch_forward(x, weight, bias, lora_a3, lora_b3, scaling, dropout_p, training):
    in_features = x.shape[-1]
    lead_shape = x.shape[:-1]
    if _library.builds_graph((weight, lora_a3)) or (lora_b3.requires_grad and _library.builds_graph((x,))):
        # The Function saves x for the gradients of A and W, and of B beside x's (create_graph=True recomputes
        # S; B alone needs only S, which the reference saves): an x made under torch.inference_mode is copied.
        x = _library.out_of_inference(x)
    x2d = x.reshape(-1, in_features)
    apply_dropout = training and dropout_p > 0.0
    side: dict = {}
    y = _LoraTorchFunction.apply(x2d, weight, bias, lora_a3, lora_b3, float(scaling), dropout_p, apply_dropout, side)
    _record_mask(side["keep"], lead_shape, in_features)
    _record_saved("torch", y, *side["saved"])
    return y.reshape(*lead_shape, y.shape[-1])


@_dispatch.register("lora_linear", "torch")
def _lora_linear_torch(x, weight, bias, lora_a, lora_b, scaling, dropout_p, training):
    return _torch_forward(x, weight, bias, lora_a.unsqueeze(0), lora_b.unsqueeze(0), scaling, dropout_p, training)


@_dispatch.register("lora_qkv", "torch")
def _lora_qkv_torch(x, weight, bias, lora_a, lora_b, scaling, dropout_p, training):
    # The stacked [..., 3*out] result; lora_qkv splits it, lora_qkv_packed returns it.
    return _torch_forward(x, weight, bias, lora_a, lora_b, scaling, dropout_p, training)


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
    backend : {"auto", "triton", "torch"}
        ``auto`` picks the first backend that can run the call; a named one that
        cannot raises ``RuntimeError`` with the reason. ``ACE_KERNELS_BACKEND``
        replaces ``auto`` and counts as naming its backend (so it raises too). LoRA
        has no ``cuda`` kernels (cuBLAS does its GEMMs under the Triton backend):
        ``backend="cuda"`` is a ``ValueError``, ``ACE_KERNELS_BACKEND=cuda`` a
        ``RuntimeError`` at the call.

    Returns
    -------
    Tensor [..., out]
        In the dtype of ``x``; under ``torch.autocast``, float32/16 operands are
        first cast to the autocast dtype, as ``F.linear`` casts them, and the
        result is in that dtype. Gradients flow to ``x``, ``lora_a`` and ``lora_b``,
        and with the ``torch`` backend also to ``weight`` and ``bias`` when they
        require grad. NaN/Inf inputs propagate (see the module docstring). The
        ``triton`` backend's training path multiplies ``scaling`` into ``B`` in
        ``x``'s dtype: in float16 each ``|scaling * B|`` must stay under 65504, or
        the output is inf, which can only happen for ``|scaling| > 1`` (the ``torch``
        backend and ``training=False`` have no such limit; bfloat16 has float32's range).

    Raises
    ------
    ValueError
        When a tensor has the wrong rank, shape, dtype (all must equal ``x``'s:
        float16, bfloat16, float32 or float64) or device, ``scaling`` is not a finite number,
        ``dropout_p`` is outside [0, 1) or ``training`` is not a bool.
    """
    return _call("lora_linear", 1, x, weight, bias, lora_a, lora_b, scaling, dropout_p, training, backend)


def lora_qkv(x, weight, bias, lora_a, lora_b, *, scaling, dropout_p=0.0, training=False, backend="auto"):
    """Three LoRA linears (q, k, v) sharing ``x``, with one stacked base GEMM.

    For p in (q, k, v): ``y_p = x W_p^T + b_p + scaling * (drop_p(x) A_p^T) B_p^T`` with
    an independent dropout mask per projection, exactly as three separate
    :func:`lora_linear` layers (for finite values: a non-finite LoRA term of one
    projection can reach the others' rows as NaN, see the module docstring).

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
        Views into one [..., 3*out] result, as ``torch.chunk`` returns them (not
        contiguous when there is more than one row; autograd refuses to modify them in
        place when the call built a graph).
        Gradients as in :func:`lora_linear`. :func:`lora_qkv_packed` returns the
        stacked result itself.

    Raises
    ------
    ValueError
        As in :func:`lora_linear`; also when ``weight`` has a row count that is not a
        multiple of 3 or ``lora_a``/``lora_b`` do not have 3 projections.
    """
    return tuple(_call("lora_qkv", 3, x, weight, bias, lora_a, lora_b, scaling, dropout_p, training,
                       backend).chunk(3, dim=-1))


def lora_qkv_packed(x, weight, bias, lora_a, lora_b, *, scaling, dropout_p=0.0, training=False, backend="auto"):
    """:func:`lora_qkv` returning the stacked [..., 3*out] result (q, k, v along the last
    dimension), as a packed ``qkv`` linear does: no split and no ``torch.cat`` for callers
    that reshape it themselves (timm's attention). Same arguments, errors and gradients."""
    return _call("lora_qkv", 3, x, weight, bias, lora_a, lora_b, scaling, dropout_p, training, backend,
                 caller="lora_qkv_packed")


def _call(op, projections, x, weight, bias, lora_a, lora_b, scaling, dropout_p, training, backend, caller=None):
    """Validate, dispatch and run. Under ``torch.autocast`` the float32/16 operands are first cast
    to the autocast dtype (as ``F.linear`` would cast them; the casts are differentiable, so
    fp32 master weights get their gradients) and the op runs with autocast off. ``caller``: the public
    function called, which the dispatch errors name (``op`` by default)."""
    autocast_dtype = _library.autocast_dtype(x)
    if autocast_dtype is not None:
        # Non-tensors pass through uncast, for _validate to name them.
        x, weight, bias, lora_a, lora_b = (
            t if not isinstance(t, torch.Tensor) or t.dtype not in _AUTOCAST_CASTS else t.to(autocast_dtype)
            for t in (x, weight, bias, lora_a, lora_b))
    try:
        _, _, dropout_p = _validate(x, weight, bias, lora_a, lora_b, scaling, dropout_p, training, projections)
    except ValueError as exc:
        if autocast_dtype is None:
            raise
        dtype = str(autocast_dtype).replace("torch.", "")
        raise ValueError(f"{exc} (under torch.autocast, which cast the float32/16 operands to {dtype}; other "
                         "dtypes are left as they are)") from None
    training, scaling = bool(training), float(scaling)  # NumPy numbers as Python ones from here on
    args = (x, weight, bias, lora_a, lora_b, scaling, dropout_p, training)
    impl = _dispatch.select(op, backend, [x, weight, bias, lora_a, lora_b], args,
                            variant=rows_variant(x.numel() // max(1, x.shape[-1])), caller=caller)
    with _library.autocast_off(x.device.type):
        return impl(*args)


# The dtypes autocast casts (it leaves float64 alone, as it does for F.linear).
_AUTOCAST_CASTS = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------
# triton backend
# ----------------------------------------------------------------------------------------
#
# Kernels (the caller's tensors are read through their strides; program ids are cast to int64
# before offset arithmetic):
#
# The large products (x W^T forward, dY W backward) are torch's GEMMs, which run on
# cuBLAS on a GPU; the forward's carries the LoRA up-projection along as a few extra columns.
#
# _lora_pack_kernel      x_cat [M, KP] = [x | S | 0] in x's dtype, S = drop_p(x) A_p^T / keep_prob,
#     one pass over x (KP = in + P*r rounded up to a multiple of 8). Then one GEMM
#     y = x_cat W_cat^T + b with W_cat = [W | scaling * Bbd | 0] (Bbd: the block-diagonal
#     [P*out, P*r] matrix of the B_p) gives x W^T + b + scaling * S Bbd^T. x_cat is all the
#     op saves for backward (with the seed): x plus P*r columns (S's alone when only B trains).
# Backward: dY W (one GEMM), G_p = dY_p B_p and dB_p = scaling * dY_p^T S_p (two products
#     batched over the projections on views of dY), each only when its gradient is wanted; then
# _lora_grad_kernel      one program per [BLOCK_M, BLOCK_K] tile of dX, EPILOGUE_M rows at a
#     time: the masks regenerated for exactly this tile of x (every element once over the
#     grid), dX = dY W + scaling / keep * sum_p mask_p * (G_p A_p), in place, and a partial
#     dA = scaling / keep * sum_p G_p^T (mask_p * x) per row block, each only when it is wanted
#     (x is read for dA alone). Partials are summed on the host in a fixed order
#     (deterministic, no atomics).
# _lora_mask_kernel      debug export of the keep masks from the same Philox stream.
#
# Dtypes: everything is stored in x's dtype, S and G included (as torch's own LoRA
# products round them; fp32 GEMMs follow torch's TF32 settings, as torch's own do); the
# kernels' dots accumulate in fp32 (tensor cores for fp16/bf16, exact IEEE fp32 for fp32
# inputs). dX is rounded twice, as torch's sum of its two terms is: dY W by the GEMM, then
# after the LoRA term is added to it in fp32.

try:
    import triton
    import triton.language as tl

    _TRITON_IMPORT_ERROR = None
except Exception as _exc:  # pragma: no cover - depends on the install
    triton = None
    tl = None
    _TRITON_IMPORT_ERROR = _exc

# The three projection lanes of one Philox draw (lane 3 is unused).
_MAX_PROJECTIONS = 3
# Keep test: a 16-bit half of a Philox number >= round(p * 2**16) (see _keep_bits).
_THRESHOLD_BITS = 16
# BLOCK_R is P*r padded to a power of two >= 16 (tl.dot's smallest dimension); above 64
# the epilogue tiles get large enough to spill, so such ranks go to the torch backend. At 64
# itself (q/k/v ranks 11-21, one projection's 33-64) the 16-bit gradient kernel with dropout
# and dX already spills 40 bytes (sm_90a, triton 3.8; the compile test asserts no spills at
# the ranks measured, and records shared memory only at 64).
_MAX_BLOCK_R = 64


if triton is not None:

    @triton.jit
    def _keep_bits(seed, rng_offset, rows, col_start, in_features, drop_threshold,
                   BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
        """Keep masks of the tile rows x [col_start, col_start + BLOCK_COLS), packed: bit p of
        the int32 result is the mask of projection p.

        One Philox4x32-10 call per pair of columns (2c, 2c+1) of a row: key = seed,
        counter = rng_offset + row * ceil(in_features / 2) + c (64-bit). Lane p's low 16
        bits decide column 2c of projection p, its high 16 bits column 2c+1; kept where the
        16 bits are >= drop_threshold = round(p * 2**16). Two columns per call halve the
        Philox work, which dominates these kernels' integer arithmetic. ``col_start`` and
        BLOCK_COLS are even.
        """
        pairs_per_row = (in_features + 1) // 2
        pair_cols = col_start // 2 + tl.arange(0, BLOCK_COLS // 2)
        counter = rng_offset + rows[:, None].to(tl.int64) * pairs_per_row + pair_cols[None, :].to(tl.int64)
        r0, r1, r2, _r3 = tl.randint4x(seed, counter)
        even = ((r0 & 0xFFFF).to(tl.int32) >= drop_threshold).to(tl.int32)
        odd = ((r0 >> 16).to(tl.int32) >= drop_threshold).to(tl.int32)
        even |= ((r1 & 0xFFFF).to(tl.int32) >= drop_threshold).to(tl.int32) << 1
        odd |= ((r1 >> 16).to(tl.int32) >= drop_threshold).to(tl.int32) << 1
        even |= ((r2 & 0xFFFF).to(tl.int32) >= drop_threshold).to(tl.int32) << 2
        odd |= ((r2 >> 16).to(tl.int32) >= drop_threshold).to(tl.int32) << 2
        # [rows, pairs, 2] -> [rows, cols]: column 2c then 2c+1.
        return tl.reshape(tl.join(even, odd), (BLOCK_ROWS, BLOCK_COLS))

    @triton.jit
    def _lora_mask_kernel(
        seed_ptr, mask_ptr,  # int64 [1] seed; int8 [P, M, K] output, contiguous
        M, K, plane, rng_offset, drop_threshold,  # plane: elements between projections' planes (host int)
        PROJECTIONS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid_k = tl.program_id(0).to(tl.int64)
        pid_m = tl.program_id(1).to(tl.int64)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        inside = (rows < M)[:, None] & (cols < K)[None, :]
        seed = tl.load(seed_ptr)
        keep = _keep_bits(seed, rng_offset, rows, pid_k * BLOCK_K, K, drop_threshold, BLOCK_M, BLOCK_K)
        offsets = rows[:, None] * K + cols[None, :]
        tl.store(mask_ptr + offsets, (keep & 1).to(tl.int8), mask=inside)
        if PROJECTIONS == 3:
            tl.store(mask_ptr + plane + offsets, ((keep >> 1) & 1).to(tl.int8), mask=inside)
            # plane + plane, not 2 * plane: an int32 plane (< 2**31) doubled would wrap.
            tl.store(mask_ptr + plane + plane + offsets, ((keep >> 2) & 1).to(tl.int8), mask=inside)

    @triton.jit
    def _lora_pack_kernel(
        x_ptr, a_ptr, xcat_ptr, seed_ptr,  # x [M, K]; A [P, r, K]; x_cat [M, KP] out (x | S | 0); seed int64 [1]
        M, K, KP, RANK,
        stride_xm, stride_xk, stride_ap, stride_ar, stride_ak, stride_cm,
        rng_offset, drop_threshold, inv_keep,
        PROJECTIONS: tl.constexpr, APPLY_DROPOUT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        pid_m = tl.program_id(0).to(tl.int64)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        js = tl.arange(0, BLOCK_R)
        rank_total = PROJECTIONS * RANK
        j_ok = js < rank_total
        proj_j = js // RANK
        r_j = js - proj_j * RANK
        out_rows = xcat_ptr + rows[:, None] * stride_cm
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        if APPLY_DROPOUT:
            seed = tl.load(seed_ptr)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            x_tile = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                             mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            tl.store(out_rows + ks[None, :], x_tile, mask=row_ok[:, None] & k_ok[None, :])
            # int64: a projection's or a rank row's offset (proj_j * stride, r_j * stride) may pass 2^31
            # for a strided A (a narrow view of a wide tensor).
            a_tile = tl.load(a_ptr + proj_j[None, :].to(tl.int64) * stride_ap + r_j[None, :].to(tl.int64) * stride_ar
                             + ks[:, None] * stride_ak,
                             mask=k_ok[:, None] & j_ok[None, :], other=0.0)  # [BLOCK_K, BLOCK_R]
            if APPLY_DROPOUT:
                keep = _keep_bits(seed, rng_offset, rows, k0, K, drop_threshold, BLOCK_M, BLOCK_K)
                # Masks as 0/1 multipliers in x's dtype: selecting with the i1 masks makes the
                # sm_90 compiler stage an i1 tensor through shared memory, which it rejects.
                zero = tl.zeros_like(a_tile)
                acc = tl.dot(x_tile * (keep & 1).to(x_tile.dtype),
                             tl.where((proj_j == 0)[None, :], a_tile, zero), acc, input_precision=DOT_PRECISION)
                if PROJECTIONS == 3:
                    acc = tl.dot(x_tile * ((keep >> 1) & 1).to(x_tile.dtype),
                                 tl.where((proj_j == 1)[None, :], a_tile, zero), acc, input_precision=DOT_PRECISION)
                    acc = tl.dot(x_tile * ((keep >> 2) & 1).to(x_tile.dtype),
                                 tl.where((proj_j == 2)[None, :], a_tile, zero), acc, input_precision=DOT_PRECISION)
            else:
                acc = tl.dot(x_tile, a_tile, acc, input_precision=DOT_PRECISION)
        if APPLY_DROPOUT:
            acc = acc * inv_keep
        # S in columns K .. K + P*r, then zeros up to KP (fewer than 8 columns): the pad meets
        # zero columns of the packed weight, and 0 * garbage could be NaN.
        tl.store(out_rows + K + js[None, :], acc.to(xcat_ptr.dtype.element_ty), mask=row_ok[:, None] & j_ok[None, :])
        pad = tl.arange(0, 8)
        tl.store(out_rows + K + rank_total + pad[None, :], tl.zeros((BLOCK_M, 8), dtype=xcat_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (pad < KP - K - rank_total)[None, :])

    @triton.jit
    def _lora_grad_kernel(
        dx_ptr, g_ptr, xcat_ptr, a_ptr, seed_ptr, da_part_ptr,
        # dX [M, K], dY W on entry, updated in place; G [P, M, r] (G_p = dY_p B_p); x_cat [M, >=K]
        # (its first K columns: x); A [P, r, K]; dA partials fp32 [M blocks, P*r, K] out (with COMPUTE_DA)
        M, K, RANK,
        stride_dxm, stride_gp, stride_gm, stride_gr, stride_cm, stride_ap, stride_ar, stride_ak,
        rng_offset, drop_threshold, lora_factor,  # lora_factor = scaling / keep_prob (scaling without dropout)
        PROJECTIONS: tl.constexpr, APPLY_DROPOUT: tl.constexpr, COMPUTE_DX: tl.constexpr, COMPUTE_DA: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
        EPILOGUE_M: tl.constexpr,  # rows per step (divides BLOCK_M)
        DOT_PRECISION: tl.constexpr,
    ):
        pid_m = tl.program_id(0).to(tl.int64)
        pid_k = tl.program_id(1).to(tl.int64)
        ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        js = tl.arange(0, BLOCK_R)
        rank_total = PROJECTIONS * RANK
        j_ok = js < rank_total
        proj_j = js // RANK
        r_j = js - proj_j * RANK
        a_tile = tl.load(a_ptr + proj_j[:, None].to(tl.int64) * stride_ap + r_j[:, None].to(tl.int64) * stride_ar
                         + ks[None, :] * stride_ak,
                         mask=j_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_R, BLOCK_K]
        if APPLY_DROPOUT:
            seed = tl.load(seed_ptr)
        da_tile = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
        # EPILOGUE_M rows at a time: with dropout, Philox needs several 32-bit words per
        # element, too many registers for a whole [BLOCK_M, BLOCK_K] tile.
        for sub in range(0, BLOCK_M, EPILOGUE_M):
            rows = pid_m * BLOCK_M + sub + tl.arange(0, EPILOGUE_M)
            row_ok = rows < M
            tile_ok = row_ok[:, None] & k_ok[None, :]
            # int64: G is [P, M, r], so projection 2 starts at 2 * M * r, past 2^31 from M * r >= 2^30.
            g_sub = tl.load(g_ptr + proj_j[None, :].to(tl.int64) * stride_gp + rows[:, None] * stride_gm
                            + r_j[None, :] * stride_gr,
                            mask=row_ok[:, None] & j_ok[None, :], other=0.0)  # [EPILOGUE_M, BLOCK_R]
            if COMPUTE_DA:  # x is read for dA alone
                x_sub = tl.load(xcat_ptr + rows[:, None] * stride_cm + ks[None, :], mask=tile_ok, other=0.0)
            if APPLY_DROPOUT:
                keep = _keep_bits(seed, rng_offset, rows, pid_k * BLOCK_K, K, drop_threshold, EPILOGUE_M, BLOCK_K)
                # 0/1 multipliers rather than i1 selects: see _lora_pack_kernel.
                if COMPUTE_DA:
                    zero = tl.zeros_like(g_sub)
                lora_dx = tl.zeros((EPILOGUE_M, BLOCK_K), dtype=tl.float32)
                for p in tl.static_range(PROJECTIONS):  # bit p of keep: projection p's mask
                    keep_x = ((keep >> p) & 1).to(xcat_ptr.dtype.element_ty)
                    if COMPUTE_DA:
                        g_p = tl.where((proj_j == p)[None, :], g_sub, zero)
                    else:
                        # dX alone: G_p as G times 0/1 multipliers of its columns. Selecting with the
                        # predicates, as dA's products do, kept six loop-invariant ones in the loop, more than
                        # ptxas holds at 4 warps (a candidate spilled them, triton 3.6).
                        g_p = g_sub * (proj_j == p).to(xcat_ptr.dtype.element_ty)[None, :]
                    lora_dx += keep_x.to(tl.float32) * tl.dot(g_p, a_tile, input_precision=DOT_PRECISION)
                    if COMPUTE_DA:
                        da_tile = tl.dot(tl.trans(g_p), x_sub * keep_x, da_tile, input_precision=DOT_PRECISION)
            else:
                lora_dx = tl.dot(g_sub, a_tile, input_precision=DOT_PRECISION)
                if COMPUTE_DA:
                    da_tile = tl.dot(tl.trans(g_sub), x_sub, da_tile, input_precision=DOT_PRECISION)
            if COMPUTE_DX:
                # Each element is read and written by this program only: in place is safe.
                dx_sub = dx_ptr + rows[:, None] * stride_dxm + ks[None, :]
                base = tl.load(dx_sub, mask=tile_ok, other=0.0)
                tl.store(dx_sub, (base.to(tl.float32) + lora_factor * lora_dx).to(dx_ptr.dtype.element_ty),
                         mask=tile_ok)
        if COMPUTE_DA:
            tl.store(da_part_ptr + pid_m * rank_total * K + js[:, None] * K + ks[None, :], da_tile * lora_factor,
                     mask=j_ok[:, None] & k_ok[None, :])


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _block_r(projections: int, rank: int) -> int:
    return max(16, _next_pow2(projections * rank))


# Launch configurations: one per (kernel, dtype class), no autotuning (the interpreter
# cannot time configs, and these shapes are all K=768-ish). GPU values were chosen to
# compile for sm_90a without spills (tests/test_lora.py compiles each).
# Interpreter: large-enough tiles that tiny test shapes need few programs.
_GPU_CONFIGS = {
    # kernel: {dtype class: (tile sizes..., num_warps, num_stages)}
    "down": {"16bit": dict(BLOCK_M=64, BLOCK_K=64, num_warps=8, num_stages=3),
             "fp32": dict(BLOCK_M=64, BLOCK_K=32, num_warps=4, num_stages=3)},
    "backward": {"16bit": dict(BLOCK_M=128, BLOCK_K=128, EPILOGUE_M=32, num_warps=8, num_stages=2),
                 "fp32": dict(BLOCK_M=128, BLOCK_K=64, EPILOGUE_M=16, num_warps=8, num_stages=2)},
    "mask": {"16bit": dict(BLOCK_M=64, BLOCK_K=64, num_warps=4, num_stages=1),
             "fp32": dict(BLOCK_M=64, BLOCK_K=64, num_warps=4, num_stages=1)},
}
_INTERPRETER_CONFIGS = {
    "down": dict(BLOCK_M=32, BLOCK_K=32),
    "backward": dict(BLOCK_M=32, BLOCK_K=32, EPILOGUE_M=16),
    "mask": dict(BLOCK_M=32, BLOCK_K=32),
}


# Alternatives to the 16-bit defaults above that a GPU benchmark run times side by side
# (``python -m benchmarks --only tuning``; ``_tuning`` then launches the fastest on that card).
# Each compiles for sm_90a without spills in every launch variant (tests/test_lora.py), as the
# defaults do. 16-bit only: the GPU benchmarks run bf16.
_GPU_CANDIDATES = {
    ("down", "16bit"): (dict(BLOCK_M=128, BLOCK_K=64, num_warps=8, num_stages=3),
                        dict(BLOCK_M=32, BLOCK_K=128, num_warps=4, num_stages=3),
                        dict(BLOCK_M=128, BLOCK_K=32, num_warps=4, num_stages=4),
                        # 80 registers: six blocks (24 warps) per SM against the default's one (8).
                        dict(BLOCK_M=64, BLOCK_K=32, num_warps=4, num_stages=3)),
    ("backward", "16bit"): (dict(BLOCK_M=64, BLOCK_K=128, EPILOGUE_M=32, num_warps=4, num_stages=2),
                            dict(BLOCK_M=256, BLOCK_K=128, EPILOGUE_M=32, num_warps=8, num_stages=2),
                            dict(BLOCK_M=128, BLOCK_K=64, EPILOGUE_M=16, num_warps=4, num_stages=2),
                            dict(BLOCK_M=128, BLOCK_K=256, EPILOGUE_M=16, num_warps=8, num_stages=2),
                            # 162 registers (triton 3.6; 156 with 3.8): three blocks (12 warps) per SM against the
                            # default's one (8).
                            dict(BLOCK_M=256, BLOCK_K=128, EPILOGUE_M=16, num_warps=4, num_stages=2)),
}


_tuning.register("lora", _GPU_CANDIDATES, lambda kernel, dtype_class: _GPU_CONFIGS[kernel][dtype_class], __name__)
# Shared memory per block, in bytes, that the configurations above (defaults and candidates) need
# at most, as compiled for sm_90a at the largest BLOCK_R (_MAX_BLOCK_R: smaller ranks need less),
# every kernel, dtype and launch variant: a GPU that gives a block less cannot launch them, and
# the Triton backend declines the call there (_triton_reasons). On sm_80 Triton's shared use can
# differ slightly; this is the sm_90a need, checked against the compiles by tests/test_lora.py.
_GPU_SHARED_BYTES = 73728


def _config(kernel: str, dtype: torch.dtype, device: torch.device) -> dict:
    dtype_class = _tuning.dtype_class(dtype)
    # On a CPU the interpreter: small tiles, unless a test forces a GPU configuration.
    default = _INTERPRETER_CONFIGS[kernel] if device.type == "cpu" else _GPU_CONFIGS[kernel][dtype_class]
    return _tuning.launch_config("lora", kernel, dtype_class, device, default)


def _dot_precision(dtype: torch.dtype) -> str:
    """The kernels' dots: exact IEEE fp32 for fp32 inputs (16-bit inputs run on tensor cores in
    their own dtype, where the setting does not apply)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _drop_threshold(dropout_p: float) -> int:
    return int(round(dropout_p * (1 << _THRESHOLD_BITS)))


def _keep_rate_error(dropout_p: float) -> float:
    """Relative error of the kernels' keep rate (16-bit threshold) against 1 - dropout_p; the
    kept values are scaled by 1 / (1 - dropout_p), so this is the bias of E[drop(x)] / x."""
    keep = 1.0 - dropout_p
    return ((1 << _THRESHOLD_BITS) - _drop_threshold(dropout_p)) / (1 << _THRESHOLD_BITS) / keep - 1.0


# The Triton backend declines a dropout_p whose threshold's rounding (at most 2**-17) can exceed
# this share of 1 - dropout_p: above 0.999237, whatever the p's own rounding (the rule stays
# monotonic in p); at p = 0.1 the error is 7e-6.
_MAX_KEEP_RATE_ERROR = 1e-2
_MAX_TRITON_DROPOUT = 1.0 - 2.0 ** -(_THRESHOLD_BITS + 1) / _MAX_KEEP_RATE_ERROR


def _draw_seed(device: torch.device) -> torch.Tensor:
    """A 1-element int64 seed from torch's generator of ``device`` (no host sync on a GPU)."""
    return torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64, device=device)  # Philox's whole 64-bit key


def _export_masks(seed: torch.Tensor, rows: int, in_features: int, projections: int, dropout_p: float,
                  rng_offset: int = 0) -> torch.Tensor:
    """Keep masks [P, rows, in] (bool) that the kernels draw for ``seed`` (debug/testing)."""
    mask = torch.empty((projections, rows, in_features), dtype=torch.int8, device=seed.device)
    if rows == 0 or in_features == 0:
        return mask.bool()
    cfg = _config("mask", torch.float32, seed.device)
    # Row blocks are grid dimension y (at most 65535): larger exports go in slices of rows,
    # each continuing the Philox counter where the kernels' row index puts it.
    step = _MAX_GRID_Y * cfg["BLOCK_M"]
    pairs_per_row = (in_features + 1) // 2
    for lo in range(0, rows, step):
        hi = min(rows, lo + step)
        grid = (triton.cdiv(in_features, cfg["BLOCK_K"]), triton.cdiv(hi - lo, cfg["BLOCK_M"]))
        _lora_mask_kernel[grid](seed, mask[:, lo:hi], hi - lo, in_features, rows * in_features,
                                rng_offset + lo * pairs_per_row, _drop_threshold(dropout_p),
                                PROJECTIONS=projections, **cfg)
    return mask.bool()


def _packed_width(in_features: int, rank_total: int) -> int:
    """Columns of x_cat = [x | S | 0]: in + P*r, rounded up to a multiple of 8 (16-byte rows
    for 16-bit dtypes, which cuBLAS needs for its fastest kernels)."""
    return -(-(in_features + rank_total) // 8) * 8


def _packed_weight(weight: torch.Tensor, lora_b3: torch.Tensor, scaling: float, width: int) -> torch.Tensor:
    """W_cat [P*out, width] = [W | scaling * Bbd | 0] in W's dtype (Bbd: the block-diagonal
    [P*out, P*r] matrix of the B_p), so that x_cat W_cat^T = x W^T + scaling * S Bbd^T. Five
    ops: the blocks are written and scaled through :func:`_block_diagonal_view` of the tail."""
    projections, _, rank = lora_b3.shape
    in_features = weight.shape[1]
    w_cat = weight.new_empty((weight.shape[0], width))
    w_cat[:, :in_features] = weight
    tail = w_cat[:, in_features:]
    tail.zero_()
    _block_diagonal_view(tail[:, :projections * rank], projections, rank).copy_(lora_b3.permute(1, 2, 0)).mul_(scaling)
    return w_cat


def _lora_forward_fake(x2d, weight, bias, lora_a3, lora_b3, seed, scaling, dropout_p, apply_dropout):
    rows, (projections, rank, in_features), out_features = x2d.shape[0], lora_a3.shape, lora_b3.shape[1]
    return (x2d.new_empty((rows, projections * out_features)),
            x2d.new_empty((rows, _packed_width(in_features, projections * rank))))


@_library.launcher("lora_forward", _lora_forward_fake)
def _lora_forward_launch(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a3: torch.Tensor,
                         lora_b3: torch.Tensor, seed: torch.Tensor, scaling: float, dropout_p: float,
                         apply_dropout: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(Y [M, P*out], x_cat [M, KP] = [x | S | 0]), both in x's dtype: the pack kernel, then one
    GEMM (torch's, so cuBLAS on a GPU) of x_cat with the packed weight. S is stored unscaled
    (``scaling`` goes into the weight), as torch's own LoRA keeps it: a large ``scaling`` cannot
    overflow a float16 S, but a float16 ``scaling * B`` over 65504 is inf in the packed weight
    (documented in :func:`lora_linear`; checking would cost a device sync per call)."""
    x2d = _library.int32_safe(x2d, (1,))  # the K loop
    lora_a3 = _library.int32_safe(lora_a3, (2,))  # the K loop too (the gradient kernel's K offsets are int64)
    projections, rank, in_features = lora_a3.shape
    rows = x2d.shape[0]
    width = _packed_width(in_features, projections * rank)
    x_cat = torch.empty((rows, width), dtype=x2d.dtype, device=x2d.device)
    if rows > 0:
        cfg = _config("down", x2d.dtype, x2d.device)
        _lora_pack_kernel[(triton.cdiv(rows, cfg["BLOCK_M"]),)](
            x2d, lora_a3, x_cat, seed, rows, in_features, width, rank,
            x2d.stride(0), x2d.stride(1), lora_a3.stride(0), lora_a3.stride(1), lora_a3.stride(2), x_cat.stride(0),
            0, _drop_threshold(dropout_p), 1.0 / (1.0 - dropout_p),
            PROJECTIONS=projections, APPLY_DROPOUT=apply_dropout, BLOCK_R=_block_r(projections, rank),
            DOT_PRECISION=_dot_precision(x2d.dtype), **cfg)
    w_cat = _packed_weight(weight, lora_b3, scaling, width)
    y = torch.addmm(bias, x_cat, w_cat.t()) if bias is not None else x_cat @ w_cat.t()
    return y, x_cat


def _lora_backward_fake(grad_y, x_cat, s_cols, weight, lora_a3, lora_b3, seed, scaling, dropout_p, apply_dropout,
                        compute_dx, compute_da, compute_db):
    projections, rank, in_features = lora_a3.shape
    return (grad_y.new_empty((grad_y.shape[0], in_features) if compute_dx else (0,)),
            grad_y.new_empty((projections * rank, in_features) if compute_da else (0,), dtype=torch.float32),
            grad_y.new_empty(lora_b3.shape if compute_db else (0,)))


@_library.launcher("lora_backward", _lora_backward_fake)
def _lora_backward_launch(grad_y: torch.Tensor, x_cat: torch.Tensor | None, s_cols: torch.Tensor | None,
                          weight: torch.Tensor | None, lora_a3: torch.Tensor, lora_b3: torch.Tensor,
                          seed: torch.Tensor, scaling: float, dropout_p: float, apply_dropout: bool, compute_dx: bool,
                          compute_da: bool, compute_db: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dX [M, K]; dA [P*r, K] fp32; dB [P, out, r] in ``grad_y``'s dtype, x's), each an empty tensor
    when its ``compute_*`` is off. Each input is read for the gradients that need it only (None
    without them): ``x_cat`` [M, >= K] (x in its first K columns) for dA; ``s_cols`` [M, >= P*r]
    (S in its first P*r columns: x_cat's tail, or the copy of them saved without dA) for dB;
    ``weight`` for dX.

    Three products (torch's): dY W, G_p = dY_p B_p and dB_p = scaling * dY_p^T S_p, the last
    two batched over the projections on views of dY; then one kernel adds
    scaling / keep * sum_p mask_p * (G_p A_p) to dY W in place and forms dA's per-row-block
    partials, added here in a fixed order (deterministic, no atomics)."""
    projections, rank, in_features = lora_a3.shape
    out_features = lora_b3.shape[1]
    rows = grad_y.shape[0]
    rank_total = projections * rank
    grad_y = grad_y.contiguous()
    grad_y3 = grad_y.view(rows, projections, out_features)
    grad_x = grad_y @ weight if compute_dx else grad_y.new_empty((0,))
    grad_a = torch.empty((0,), dtype=torch.float32, device=grad_y.device)
    grad_b = grad_y.new_empty((0,))
    if compute_db:
        grad_b = _lora_grad_b(grad_y, s_cols, projections, rank, scaling)
    if compute_dx or compute_da:
        grad_s = torch.bmm(grad_y3.transpose(0, 1), lora_b3)  # [P, M, r]
        cfg = _config("backward", grad_y.dtype, grad_y.device)
        row_blocks = triton.cdiv(rows, cfg["BLOCK_M"])
        # dA's partials, [row blocks, P*r, K] in fp32, only when dA is wanted: with dX alone (A frozen, or the
        # whole adapter, as for a saliency map through a trained model) the kernel reads neither x nor writes them.
        da_part = torch.empty((row_blocks if compute_da else 0, rank_total, in_features), dtype=torch.float32,
                              device=grad_y.device)
        # Without dA, x_cat's pointer and row stride are not read: G stands in for the one (its dtype, x's), and
        # x_cat's width for the other (what a launch with x_cat passed: the same compiled variant).
        x_ptr, x_stride = (x_cat, x_cat.stride(0)) if compute_da else (grad_s, _packed_width(in_features, rank_total))
        if rows > 0:
            _lora_grad_kernel[(row_blocks, triton.cdiv(in_features, cfg["BLOCK_K"]))](
                grad_x if compute_dx else x_cat, grad_s, x_ptr, lora_a3, seed, da_part,
                rows, in_features, rank,
                grad_x.stride(0) if compute_dx else 0, grad_s.stride(0), grad_s.stride(1), grad_s.stride(2),
                x_stride, lora_a3.stride(0), lora_a3.stride(1), lora_a3.stride(2),
                0, _drop_threshold(dropout_p), scaling / (1.0 - dropout_p) if apply_dropout else scaling,
                PROJECTIONS=projections, APPLY_DROPOUT=apply_dropout, COMPUTE_DX=compute_dx, COMPUTE_DA=compute_da,
                BLOCK_R=_block_r(projections, rank), DOT_PRECISION=_dot_precision(grad_y.dtype), **cfg)
        if compute_da:
            grad_a = da_part.sum(0)
    return grad_x, grad_a, grad_b


def _lora_grad_b(grad_y: torch.Tensor, s_cols: torch.Tensor, projections: int, rank: int,
                 scaling: float) -> torch.Tensor:
    """dB_p = scaling * dY_p^T S_p for every projection, one product batched over a view of dY: [P, out, r].
    ``grad_y`` [M, P*out] contiguous; ``s_cols`` [M, >= P*r] starts with S's P*r columns (x_cat's tail, a
    view of it, or the copy of S's columns the Function keeps when dB alone is wanted: the same product)."""
    rows = grad_y.shape[0]
    grad_y3 = grad_y.view(rows, projections, grad_y.shape[1] // projections)
    s_act = s_cols[:, :projections * rank].view(rows, projections, rank)
    return torch.bmm(grad_y3.permute(1, 2, 0), s_act.transpose(0, 1)).mul_(scaling)


class _LoraTritonFunction(torch.autograd.Function):
    """LoRA for P stacked projections; saves x_cat = [x | S | 0] (in x's dtype) and the seed when dA is
    wanted; otherwise no x: a copy of x_cat's S columns for dB, and A, B and the seed for dX."""

    @staticmethod
    def forward(ctx, x2d, weight, bias, lora_a3, lora_b3, scaling, dropout_p, apply_dropout, side):
        if apply_dropout:
            seed = _draw_seed(x2d.device)
        else:
            seed = torch.zeros(1, dtype=torch.int64, device=x2d.device)
        y, x_cat = _lora_forward_launch(x2d, weight, bias, lora_a3, lora_b3, seed, float(scaling), float(dropout_p),
                                        bool(apply_dropout))
        need_x, _, _, need_a, need_b = ctx.needs_input_grad[:5]
        # W is read for dX alone: not saved otherwise (a frozen W made under torch.inference_mode cannot be).
        weight = weight if need_x else None
        if need_a:
            ctx.save_for_backward(x_cat, weight, lora_a3, lora_b3, seed)
            # For the saved-bytes hook: x's share of x_cat, and the rest (S, the pad, the seed).
            side["saved"] = (x2d, (x_cat[:, x2d.shape[1]:], seed))
        else:
            # Without dA nothing reads x (dX's kernel reads G, A and the regenerated masks; dB reads S, as the
            # torch backend keeps it): a copy of x_cat's S columns is saved for dB (not the pad after them, up
            # to 7 more columns a row), and x_cat itself is not; A, B and the seed are for dX only.
            s_cols = x2d.shape[1] + lora_a3.shape[0] * lora_a3.shape[1]
            s_tail = x_cat[:, x2d.shape[1]:s_cols].clone() if need_b else None
            if need_x:
                ctx.save_for_backward(s_tail, weight, lora_a3, lora_b3, seed)
                side["saved"] = (None, (s_tail, seed))
            else:
                ctx.save_for_backward(s_tail, None, None, None, None)
                side["saved"] = (None, (s_tail,))
        ctx.dtype = x2d.dtype
        ctx.shape = tuple(lora_a3.shape)
        ctx.scaling = float(scaling)
        ctx.dropout_p = dropout_p
        ctx.apply_dropout = apply_dropout
        side["seed"] = seed
        return y

    @staticmethod
    @_library.kernel_backward("lora_linear/lora_qkv/lora_qkv_packed (backend 'triton'): second derivatives "
                              "(create_graph=True) are not supported by the Triton kernels; use backend='torch'")
    def backward(ctx, grad_y):
        # x_cat with dA; without it, the copy of S's columns (None without dB).
        x_cat, weight, lora_a3, lora_b3, seed = ctx.saved_tensors
        projections, rank, in_features = ctx.shape
        need_x, _, _, need_a, need_b = ctx.needs_input_grad[:5]
        # The products and the kernel need dY in the inputs' dtype (autocast can hand back another).
        grad_y = grad_y.to(ctx.dtype)
        if not (need_x or need_a):
            return (None, None, None, None, _lora_grad_b(grad_y.contiguous(), x_cat, projections, rank, ctx.scaling),
                    None, None, None, None)
        x_cat, s_cols = (x_cat, x_cat[:, in_features:]) if need_a else (None, x_cat)
        grad_x, grad_a_flat, grad_b = _lora_backward_launch(
            grad_y, x_cat, s_cols if need_b else None, weight, lora_a3, lora_b3, seed, ctx.scaling,
            float(ctx.dropout_p), bool(ctx.apply_dropout), bool(need_x), bool(need_a), bool(need_b))
        grad_a = grad_a_flat.reshape(projections, rank, in_features).to(lora_a3.dtype) if need_a else None
        return (grad_x if need_x else None, None, None, grad_a, grad_b.to(lora_b3.dtype) if need_b else None,
                None, None, None, None)


_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The gradient kernel's column blocks and the mask export's row blocks are grid dimension y.
_MAX_GRID_Y = _library.MAX_GRID_YZ


def _triton_reasons(x, weight, bias, lora_a, lora_b, scaling, dropout_p, training):
    reasons = []
    if _TRITON_IMPORT_ERROR is not None:
        reasons.append(f"triton failed to import ({_TRITON_IMPORT_ERROR})")
    if x.dtype not in _TRITON_DTYPES:
        reasons.append(f"the fused kernels take float16, bfloat16 or float32, got {str(x.dtype).replace('torch.', '')}")
    # Evaluating under torch.no_grad / inference_mode records no gradient: a trainable base is as good as frozen
    # there. Not in training mode: a first pass without a graph (a reentrant checkpoint, a chunked step) must take
    # the backend its recomputation with one takes (its dropout mask, its rounding).
    if ((training or torch.is_grad_enabled())
            and (weight.requires_grad or (bias is not None and bias.requires_grad))):
        reasons.append("weight/bias require grad, but the fused kernels treat the base layer as frozen "
                       "(use backend='torch' to train it)")
    reasons += _dispatch.interpreter_bf16_reasons(x.dtype)
    projections = 3 if lora_a.dim() == 3 else 1
    rank = lora_a.shape[-2]
    if projections * rank > _MAX_BLOCK_R:
        reasons.append(f"rank {rank} is too large for the fused kernels (at most {_MAX_BLOCK_R // projections})")
    if training and dropout_p > _MAX_TRITON_DROPOUT:
        reasons.append(f"dropout_p={dropout_p} is too close to 1 for the kernels' 16-bit keep threshold (above "
                       f"{_MAX_TRITON_DROPOUT:.6f} its rounding can put the keep rate off by more than "
                       f"{100 * _MAX_KEEP_RATE_ERROR:g}% of 1 - dropout_p)")
    in_features = x.shape[-1]
    if in_features > _MAX_GRID_Y * 16 and x.dtype in _TRITON_DTYPES:  # cheap test first: no BLOCK_K < 16
        block_k = _config("backward", x.dtype, x.device)["BLOCK_K"]
        if -(-in_features // block_k) > _MAX_GRID_Y:
            reasons.append(f"in_features {in_features} needs more than {_MAX_GRID_Y} column blocks of {block_k} "
                           f"(the grid's y dimension): at most {_MAX_GRID_Y * block_k}")
    reasons += _dispatch.shared_memory_reasons(x.device, _GPU_SHARED_BYTES, "the fused kernels' launch configuration")
    return reasons


def _merged_forward(x2d, weight, bias, lora_a3, lora_b3, scaling):
    """y = x (W + scaling * Bbd A)^T + b: without dropout and without a graph, the LoRA term
    merged into the frozen weight (one small batched product, [P*out, in]) and one GEMM,
    no pass over x besides the GEMM's own and no kernel of ours.

    Not in float16: an element of ``scaling * B A`` over 65504 is inf in a float16 merged
    weight even where the output is far inside the range (a small x), and telling would cost
    a device sync per call. There the term stays unmerged, with no product scaled in float16:
    ``x W^T + b`` then ``+ scaling * S Bbd^T`` (``S = x A^T`` unscaled, as the training path
    keeps it; ``scaling`` is the GEMM's alpha, applied to its fp32 accumulator on a GPU)."""
    projections, out_features, _ = lora_b3.shape
    if x2d.dtype == torch.float16:
        base = torch.addmm(bias, x2d, weight.t()) if bias is not None else x2d @ weight.t()
        s_flat = x2d @ lora_a3.reshape(-1, lora_a3.shape[-1]).t()  # [M, P*r]
        return torch.addmm(base, s_flat, _block_diagonal_b(lora_b3).t(), alpha=scaling)
    merged = torch.baddbmm(weight.reshape(projections, out_features, -1), lora_b3, lora_a3, alpha=scaling)
    merged = merged.reshape(projections * out_features, -1)
    return torch.addmm(bias, x2d, merged.t()) if bias is not None else x2d @ merged.t()


def _triton_forward(x, weight, bias, lora_a3, lora_b3, scaling, dropout_p, training):
    in_features = x.shape[-1]
    lead_shape = x.shape[:-1]
    x2d = x.reshape(-1, in_features)
    apply_dropout = training and dropout_p > 0.0
    if not training and not (torch.is_grad_enabled() and (x.requires_grad or lora_a3.requires_grad
                                                          or lora_b3.requires_grad)):
        # Evaluation (zero-shot, inference): merged weights (weight and bias are frozen here).
        # Not in training mode, even without dropout or a graph: a chunked step's first pass
        # (no graph) must give the outputs its second pass (with one) recomputes, and in 16 bits
        # the merged weight rounds the LoRA term differently.
        _record_mask(None, lead_shape, in_features)
        y = _merged_forward(x2d, weight, bias, lora_a3, lora_b3, float(scaling))
        return y.reshape(*lead_shape, y.shape[-1])
    side: dict = {}
    y = _LoraTritonFunction.apply(x2d, weight, bias, lora_a3, lora_b3, float(scaling), dropout_p, apply_dropout,
                                  side)
    if _MASK_RECORDERS:
        mask = None
        if apply_dropout:
            mask = _export_masks(side["seed"], x2d.shape[0], in_features, lora_a3.shape[0], dropout_p)
        _record_mask(mask, lead_shape, in_features)
    _record_saved("triton", y, *side["saved"])
    return y.reshape(*lead_shape, y.shape[-1])


@_dispatch.register("lora_linear", "triton", check=_triton_reasons)
def _lora_linear_triton(x, weight, bias, lora_a, lora_b, scaling, dropout_p, training):
    return _triton_forward(x, weight, bias, lora_a.unsqueeze(0), lora_b.unsqueeze(0), scaling, dropout_p, training)


@_dispatch.register("lora_qkv", "triton", check=_triton_reasons)
def _lora_qkv_triton(x, weight, bias, lora_a, lora_b, scaling, dropout_p, training):
    return _triton_forward(x, weight, bias, lora_a, lora_b, scaling, dropout_p, training)
