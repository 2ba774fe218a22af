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
Labels become integer keys once per call, on the device and exactly (no
hashing): the label rows are sorted and numbered by group (``_label_keys``),
with fixed shapes, so without a host synchronisation. Two off-diagonal entries
are masked exactly when their keys are equal.

The ``B x B`` logits never exist. The forward pass walks blocks of rows and
produces ``r`` and ``c`` with running log-sum-exps; the backward pass
recomputes each block and forms the logit gradient
``G = (exp(L - r_i) + exp(L - c_j)) / (2B)`` in place, from which
``dU = s G T``, ``dT = s G^T U`` and ``ds = sum_i u_i . (G T)_i``. The positive
logits ``-s u_i . t_i`` enter as ``-2 / (2B)`` on ``G_ii``, before the products (where
the positives win, ``G_ii`` and that term cancel there, in full precision). The loss
sums each row's ``r_i - s u_i . t_i`` (at least 0), not the difference of the sums.

Backends: ``triton`` (GPU; the CPU interpreter when asked for explicitly, fp16/fp32
only: the interpreter's bf16 arithmetic is wrong, so bf16 is refused there) and
``torch`` (any device, any float dtype and D). Triton: inputs fp16/bf16/fp32 (fp32 dots in
IEEE mode), fp32 accumulation, D <= 1024; gradients are written in the input dtype. The
exponentials are ``ex2.approx.ftz`` (``_exp``: the bits of ``tl.exp`` down to 2**-126, 0 below);
for 16-bit inputs on a GPU the log-sum-exps' logs are ``lg2.approx.ftz`` (``_log``: within
about 1.1e-7 of ln x, less than the float32 rounding of an LSE above 2, which the logits of a
contrastive batch give), for fp32 inputs and in the interpreter ``tl.log``.

Triton forward, one device: one kernel pass over the ``B x B`` similarity tiles
(one program per SM, each taking every G-th block of rows against all
columns). Each tile is computed once and feeds both the row log-sum-exps
(online, in registers) and the column log-sum-exps: every tile's column LSE,
with its own per-column shift, is merged into a ``[programs, B]`` fp32 partial
that only that program touches, and torch combines the partials in column
chunks. The key mask is applied in registers; fully masked tiles and columns
shift by 0 and stay ``-inf`` (no ``inf - inf``, no ``log 0``). Exact
(no fixed shift that could underflow), deterministic, no atomics; extra
memory ``4 B * programs`` bytes (33 MiB at B = 65,536 on a 132-SM H100).
With ``group=`` a rank runs the same kernel over its rows ``lo..hi`` only, against
each rank's columns in turn: their row LSEs over each rank's columns, and every
column's LSE over those rows, which the ranks combine (see "Across ranks"). A row
of a chunk whose every logit is masked has LSE ``-inf`` (its diagonal is in another
chunk), as a fully masked column has.

Triton backward: one gradient kernel twice (``dU`` then ``dT``). A program owns
a block of 64 rows and accumulates their gradient over the whole of D
(``64 x 512`` fp32 in registers), computing each similarity tile once from the
same ``b`` tile that then feeds the gradient dot (for ``512 < D <= 1024``: two
D halves, each recomputing the similarities). The positive logits enter as
``-2`` on the owned diagonal weights; ``ds`` comes from the fp32 weights times
similarities, as per-program partials that torch sums in a fixed order
(deterministic, no atomics). Producing ``dT`` in the ``dU`` pass would save the
second similarity pass (``2 B^2 D``) but needs ``B^2 D / 64`` float atomic adds
(3.4e10 at B = 65,536, D = 512: more time than the matmuls it saves) or
``B x D`` partials per row block, so it is not done.

Cost, 16-bit inputs with D <= 512 (16-byte aligned rows): forward ``2 B^2 D``
FLOPs, backward ``8 B^2 D`` (per direction: similarities ``2 B^2 D``, gradient
``2 B^2 D``), ``10 B^2 D`` in all against issue 5's counted ``8 B^2 D``. Wider D
(to 1024), fp32 inputs or unaligned rows split the gradient into D chunks that
each recompute the similarities (D = 1024 in 16 bits: two 512-wide halves,
``14 B^2 D``). With ``group=`` the ranks split this work without repeating any of it
(rank ``r`` holding ``n_r`` rows: ``10 n_r B D``, ``1.25 B^2 D`` per rank at ``W = 8`` equal
ranks); see "Across ranks".
Extra memory of the Triton path is ``O(B)`` besides the forward's partials.

Blocked strategy (a launch configuration with ``STRATEGY="blocked"``, among the
candidates a GPU sweep times; ``_tuning`` launches it on a card where it was measured
faster). The one-pass kernels keep a 128- or 64-row block of one side resident over all of
D, which holds their column tiles to 32 wide at D = 512 and leaves one block per SM to
alternate between tensor-core work and the softmax. The blocked strategy computes each
similarity tile (128 x 64, say) as an ordinary pipelined GEMM over D, one program per tile,
with room for more than one per SM, and splits the ``B x B`` work into row blocks:
- forward (rows ``lo..hi``: every row on one device): each tile's row and column
  log-sum-exps (exact per-row and per-column shifts) go to an fp32 row buffer of at most
  ``_BLOCKED_PART_BYTES`` (8 MiB) and a column buffer of that much plus one running row of B,
  which torch folds into the row LSEs and the running column LSE after each row block (each
  fold allocates a temporary of its input's size);
- backward, per direction: each row block's softmax weights are written in the inputs'
  dtype to a buffer of at most ``_BLOCKED_WEIGHT_BYTES`` (32 MiB; 256 rows at
  B = 65,536 in bf16), exactly as the one-pass kernel rounds them before its gradient
  dot, and one cuBLAS product per row block (fp32 accumulation, ``coef * s`` applied in
  fp32, one rounding) gives the block's gradient rows.
Each kernel launches up to twice per block (``_tile_launches``): once for the interior tiles
(every row and column inside the block, no diagonal entry), whose programs mask only by the
labels and need no bounds (60 to 80% of the general tile's instructions a logit in the sm_90a code, and
fewer registers: more blocks per SM), once for the others; the programs of each launch skip the
other kind's tiles (a block whose rows are columns too, as every block of one device's, has
both kinds: one launch more than before). Bit for bit the results of one launch of every tile
the general way.
Same FLOPs (``10 B^2 D`` at any D <= 1024, with no D chunks), plus writing and reading the
weights once (``4 B^2`` bytes per direction in 16 bits); deterministic. Extra memory, at
its peak: forward about ``2 * (8 MiB + 4 B)`` with the fold's temporaries, backward the
32 MiB of weights plus ``8 * rows * D`` bytes of fp32 products and O(B) partials. A block
never holds less than one tile of rows, so past B = 131,072 (16 bits) the weights take
``2 * BLOCK_M * B`` bytes, and past B of about 2 million the forward's buffers ``4 B`` each
per row tile (the row partials ``4 B * BLOCK_M / BLOCK_N``: with 128 x 64 tiles ``8 B``,
past B = 1,048,576). Sweep candidates only for 16-bit inputs with D <= 512:
fp32 inputs keep the IEEE-dot kernels (cuBLAS fp32 products follow
``torch.backends.cuda.matmul.allow_tf32``).

The torch backend's extra memory is ``O(block * B + B * D)``; the block height
is the private knob ``_TORCH_BLOCK_ROWS``.

Across ranks (``group=``)
-------------------------
The text embeddings go round the ranks' ring (and the labels are all-gathered, so that false
negatives across ranks are masked), the image embeddings stay where they are: rank ``r`` owns
rows ``lo..hi`` of the global batch (its own image rows) and every logit in them, and each
logit is computed by one rank per pass:
- forward: one pass over its rows' logits, a rank's columns at a time as their text rows
  arrive (``_ring_all_gather``: ``W - 1`` point-to-point steps, each rank sending the rows it
  got last to the next rank; its own columns first, each chunk's kernels running while the
  next chunk is in flight), gives its rows' log-sum-exps over each chunk, folded in rank order
  into their row log-sum-exps, and each column's log-sum-exp over its rows; those ``[B]``
  fp32 partials are all-gathered (``4 W B`` bytes) and folded in rank order into every
  column's log-sum-exp, the same bits on every rank. The one-device kernels take a chunk with
  the rows and columns numbered from the chunk's first column (rows after it), or as its
  transpose (rows before it: the chunk's rows are the kernel's rows). Rank ``r``'s share
  ``l_r`` of the loss is that of its rows and of the columns of the same indices; the shares
  sum to the loss.
- backward, two passes: its rows against every column give its rows' ``dU`` whole, and
  with them the logit-scale gradient of its rows' logits; every row against its columns
  (its rows of ``U``) gives its part of every ``dT``, formed 16,384 rows at a time
  (``_REDUCE_CHUNK_ROWS``), each rank's rows of a chunk reduced to that rank while the next chunk
  is formed; this pass runs first, and the ``dU`` pass while the last chunk's reductions (all of
  them up to B = 16,384) are in flight. Both
  directions' softmax weights of a logit come from the rank that owns its row, so each
  rank's backward applies its own upstream gradient to weights of other ranks' shares:
  the summed gradients are the loss's when every rank backpropagates the same multiple
  of it (see :func:`label_guided_infonce`).
Per rank: ``2 n_r B D`` forward FLOPs and ``8 n_r B D`` backward (16-bit, D <= 512), one
device's ``10 B^2 D`` split by rows, in ``W`` forward launches (one per non-empty rank's
columns) where one device makes one; communication: the ring's text embeddings (a rank
receives the others' ``B - n_r`` rows and sends ``B - n_{r+1}``, every rank's but the next one's,
as a ring all-gather does: the one it replaces, padded to the largest local batch, overlapped
nothing), the gather of the labels, the ``[B]`` column partials, and the reductions of ``dT``'s
parts to each rank's rows (one per rank and chunk; ``dU`` needs none, on either backend).
Memory per rank: the gathered ``[B, D]`` text rows (kept for the backward), ``W`` row partials
of its rows (``4 W n_r`` bytes; 8 for fp64 inputs) and, in the backward, its own rows' sum of ``dT`` and two
chunks' parts at most (fp32, 32 MiB a chunk at D = 512; fp64 for fp64
inputs): every row's parts at once only up to B = 32,768 (before 2026-12-05 they were always
one ``[B, D]`` buffer, reduce-scattered, and padded into a second one when the local batches
differed). A rank may hold no rows (``lo == hi``): its share is 0 and its gradients zero; it
forms zero parts and joins every collective. The ``dT`` parts are formed in fp32 (the torch
backend gathers fp32 copies of 16-bit rows; the Triton kernel writes fp32 there) and summed in
fp32, so a 16-bit row gradient is rounded once, after the sum over ranks, as on one device.
"""

from __future__ import annotations

import copy
import functools
import math
import numbers
import struct
import typing

import torch
from torch import nn

from ace_kernels import _dispatch, _library, _tuning
from ace_kernels._checks import FLOAT_DTYPES, check_finite_number, check_tensor

__all__ = ["label_guided_infonce", "LabelGuidedInfoNCE"]

OP_NAME = "label_guided_infonce"
_dispatch.define_op(OP_NAME, prefer=("triton", "torch"))

# Rows of the logit matrix the torch backend materialises at once. Each block
# costs about 3 * block * B * 4 bytes at its peak (logits, one exp buffer, the
# bool mask); 128 keeps B = 32768 under ~50 MiB and B = 8192 under ~13 MiB while
# the block matmul (128 x D x B) still runs at full speed on a CPU.
_TORCH_BLOCK_ROWS = 128

# With group=, the backward forms a rank's part of the text rows' gradient (fp32, D wide) this
# many rows at a time (_reduce_to_owners): 32 MiB at D = 512, and on an H100/H200 a few waves of
# the gradient kernel's row tiles per launch (a rank's rows at a time would leave most SMs idle
# at B/W of a few thousand); a multiple of every BLOCK_M, so no row tile is split between launches.
_REDUCE_CHUNK_ROWS = 16384

_LABEL_DTYPES = (
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
    torch.float16, torch.bfloat16, torch.float32, torch.float64,
)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; every other float type accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _label_keys(labels: torch.Tensor | None) -> torch.Tensor | None:
    """int64 key per row, on the device: equal keys <=> equal label rows, exactly (no hash).

    Rows compare as ``==`` does: -0.0 equals 0.0, and a row holding a NaN equals no other
    row (it gets a key of its own, negative). The rows' bytes (after mapping -0.0 to 0.0
    and NaN to 0) are packed into int64 words and sorted lexicographically, one stable sort
    per word; equal rows are then adjacent and a cumulative sum of "differs from the row
    before" numbers the groups. Every shape here is fixed by the input's shape, so there is
    no host synchronisation (``torch.unique`` sizes its output from the data and waits for
    the device) and ``torch.compile`` traces it.
    """
    if labels is None:
        return None
    rows = labels.reshape(-1, 1) if labels.dim() == 1 else labels.flatten(1)
    n, device = rows.shape[0], rows.device
    if rows.shape[1] == 0:  # empty label rows are all equal
        return torch.zeros(n, dtype=torch.int64, device=device)
    nan_rows = None
    if rows.is_floating_point():
        nan = rows.isnan()
        nan_rows = nan.any(dim=1)
        # -0.0 == 0: both zeros become +0.0 (equal values, equal bytes). Not `x + 0.0`, which inductor
        # drops as a no-op: compiled, -0.0 kept its sign bit and its own key (a negative left unmasked).
        rows = torch.where(nan | (rows == 0), 0.0, rows)
    elif rows.dtype == torch.bool:
        rows = rows.to(torch.uint8)
    # The bytes go into a fresh zero-padded buffer: reinterpreting them as int64 needs an 8-byte
    # aligned start and unit strides, which a tensor torch calls contiguous need not have (a
    # storage offset of a few bytes; a size-1 last dimension with another stride).
    width = rows.shape[1] * rows.element_size()
    data = torch.zeros((n, width + (-width % 8)), dtype=torch.uint8, device=device)
    # Copied through a uint8 view of a contiguous clone, not written through a view of ``data`` as
    # the labels' dtype: that one copy fewer breaks torch 2.11's torch.compile (functionalizing the
    # mutated dtype view; test_compile.py::test_triton_fullgraph_inductor on the GPU image's stack).
    data[:, :width] = rows.clone(memory_format=torch.contiguous_format).view(torch.uint8).reshape(n, width)
    words = data.view(torch.int64)  # [n, W]; signed order is as good as any for grouping
    order = torch.arange(n, device=device)
    for w in range(words.shape[1] - 1, -1, -1):  # least significant word first: lexicographic
        order = order[torch.sort(words[order, w], stable=True).indices]
    ordered = words[order]
    starts = torch.ones(n, dtype=torch.bool, device=device)
    if n > 1:
        starts[1:] = (ordered[1:] != ordered[:-1]).any(dim=1)
    keys = torch.empty(n, dtype=torch.int64, device=device).scatter_(0, order, torch.cumsum(starts, 0) - 1)
    if nan_rows is not None:
        keys = torch.where(nan_rows, -1 - torch.arange(n, device=device), keys)
    return keys


# ---------------------------------------------------------------------------
# torch backend
# ---------------------------------------------------------------------------

def _block_logits(a_block, b_part, scale, keys, a_start: int, b_start: int, dots=None) -> torch.Tensor:
    """Masked logits ``scale * a_block b_part^T`` for global rows ``a_start..``, columns ``b_start..``.

    ``dots``: where to copy the unscaled global diagonal's products (the positives' ``a_i . b_i``;
    the block must hold that diagonal for all its rows). Taken from the same product as the
    log-sum-exps, a row whose only unmasked logit is its positive has a loss of exactly 0.
    """
    logits = torch.mm(a_block, b_part.t())
    if dots is not None:
        dots.copy_(logits.diagonal(a_start - b_start))
    in_place = _library.in_place_ok()  # not the product a selective checkpoint keeps
    logits = logits.mul_(scale) if in_place else logits * scale
    if keys is not None:
        same = keys[a_start:a_start + a_block.shape[0], None] == keys[None, b_start:b_start + b_part.shape[0]]
        # The global diagonal (a_start + x == b_start + y) is always kept.
        same.diagonal(a_start - b_start).fill_(False)
        logits.masked_fill_(same, float("-inf"))
    return logits


def _torch_lse_both(u, t, scale, keys, block: int, lo: int = 0, c0: int = 0):
    """Row log-sum-exps of the masked logits' rows ``lo..lo + len(u)`` (``u`` holds those rows,
    every row by default) over the columns ``c0..c0 + len(t)`` (``t`` holds those, every column by
    default), each of those columns' log-sum-exp over those rows (the whole batch's with every
    row), and the rows' positives' products ``u_i . t_i`` from the same products, in one pass over
    row blocks; None for the products where the columns do not hold every row's own (a chunk of
    another rank's columns, ``group=``)."""
    n = t.shape[0]
    hi = lo + u.shape[0]
    row_lse = torch.empty(hi - lo, dtype=u.dtype, device=u.device)
    col_lse = torch.full((n,), float("-inf"), dtype=u.dtype, device=u.device)
    dots = torch.empty(hi - lo, dtype=u.dtype, device=u.device) if c0 <= lo and hi <= c0 + n else None
    for start, stop in _library.spans(lo, hi, block):
        logits = _block_logits(u[start - lo:stop - lo], t, scale, keys, start, c0,
                               None if dots is None else dots[start - lo:stop - lo])
        torch.logsumexp(logits, dim=1, out=row_lse[start - lo:stop - lo])
        # logaddexp(-inf, -inf) is -inf in torch, so columns fully masked in this block stay clean.
        torch.logaddexp(col_lse, torch.logsumexp(logits, dim=0), out=col_lse)
    return row_lse, col_lse, dots


def _torch_grad_both(u, t, scale, keys, row_lse, col_lse, coef, block: int, needs=(True, True, True)):
    """dU, dT, ds of ``coef * (sum r + sum c)`` in one pass (single device, every row owned).

    ``needs`` (autograd's ``needs_input_grad`` for the three): a gradient not wanted is None and
    its products are not formed (the text rows' product and [n, D] accumulator for ``t``, the
    product with ``t`` for ``u`` or the scale), as the Triton backend skips its kernels."""
    n = u.shape[0]
    need_u, need_t, need_scale = needs
    # Contiguous whatever u's layout: rows of it are written with out=, which Dynamo refuses on
    # a non-contiguous tensor (empty_like keeps a transposed u's strides; a graph break).
    grad_u = torch.empty(u.shape, dtype=u.dtype, device=u.device) if need_u else None
    grad_t = torch.zeros_like(t) if need_t else None
    grad_scale = torch.zeros((), dtype=u.dtype, device=u.device) if need_scale else None
    for start, stop in _library.spans(0, n, block):
        u_block = u[start:stop]
        logits = _block_logits(u_block, t, scale, keys, start, 0)
        row_prob = torch.sub(logits, row_lse[start:stop, None]).exp_()
        weights = logits.sub_(col_lse[None, :]).exp_().add_(row_prob)  # reuses the logits buffer
        del row_prob
        weights.mul_(coef)
        _fold_positive_weights(weights, start, stop, 0, 0, n, coef)
        if need_u or need_scale:
            g_t = torch.mm(weights, t)
            if need_scale:
                # ds = sum_ij G_ij u_i.t_j = sum_i u_i . (G t)_i: no need to keep the raw similarities.
                grad_scale += torch.linalg.vecdot(g_t, u_block).sum()
            if need_u:
                torch.mul(g_t, scale, out=grad_u[start:stop])
        if need_t:
            grad_t.addmm_(weights.t(), u_block)
    if need_t:
        grad_t.mul_(scale)
    return grad_u, grad_t, grad_scale


def _torch_grad_rows(a, b, scale, keys, lse_a, lse_b, rows: tuple, cols: tuple, coef, block: int,
                     needs: tuple = (True, True)):
    """Gradient w.r.t. rows ``r0..r1`` (``[r1 - r0, D]``) through their logits against columns
    ``c0..c1`` (``a`` holds those rows only and ``b`` those columns), whose weights are
    ``G_ij = coef (exp(L_ij - lse_a_i) + exp(L_ij - lse_b_j) - 2 [i == j])``, and this pass's
    ``sum_ij G_ij a_i . b_j`` (the logit-scale gradient over ``scale``). ``needs``: which of the
    two to form (None for the other: a frozen tower's rows, or the scale's term of a pass that
    only feeds the rows).

    ``lse_a``/``lse_b`` are full length; a row or column whose entry is ``+inf`` adds nothing.
    A rank (``group=``): its rows against every column (``a`` its own rows of ``U``, ``b`` all of
    ``T``), then every row against its columns (``a`` all of ``T``, ``b`` its own rows of ``U``).
    """
    (r0, r1), (c0, c1) = rows, cols
    need_a, need_scale = needs
    grad_a = torch.empty((r1 - r0, a.shape[1]), dtype=a.dtype, device=a.device) if need_a else None
    grad_scale = torch.zeros((), dtype=a.dtype, device=a.device) if need_scale else None
    for start, stop in _library.spans(r0, r1, block):
        a_block = a[start - r0:stop - r0]
        logits = _block_logits(a_block, b, scale, keys, start, c0)
        row_prob = torch.sub(logits, lse_a[start:stop, None]).exp_()
        weights = logits.sub_(lse_b[None, c0:c1]).exp_().add_(row_prob)
        del row_prob
        weights.mul_(coef)
        _fold_positive_weights(weights, start, stop, c0, c0, c1, coef)
        g_b = torch.mm(weights, b)
        if need_scale:
            grad_scale += torch.linalg.vecdot(g_b, a_block).sum()
        if need_a:
            torch.mul(g_b, scale, out=grad_a[start - r0:stop - r0])
    return grad_a, grad_scale


def _fold_positive_weights(weights, start: int, stop: int, c0: int, lo: int, hi: int, coef) -> None:
    """Subtract the positive logits' weight ``2 coef`` from ``G_ii`` in place, for the ``i``
    in ``lo..hi`` among this block's rows ``start..stop`` (columns from ``c0``).

    The gradient of ``-2 coef s u_i . t_i`` then rides in the same products as the softmax
    terms, and where the positives win (``G_ii`` close to ``2 coef``) the two cancel before
    the products, not after them (added afterwards, an fp32 gradient kept rounding noise of
    the softmax terms' size where the true one is 1e-13). The Triton kernels do the same.
    """
    i0, i1 = max(start, lo), min(stop, hi)
    if i0 < i1:
        weights[i0 - start:i1 - start, i0 - c0:i1 - c0].diagonal().sub_(2 * coef)


def _loss_share(row_lse, col_lse, scale, positives, n: int):
    """``(sum_i (r_i - s p_i) + sum_j (c_j - s p_j)) / (2 n)`` over the owned rows and the
    columns of the same indices (``p``: the owned rows' products ``u_i . t_i``, from the
    products both kinds of log-sum-exps came from).

    Each row's and column's difference is taken before the sum (the differences of the sums
    cancel to a few B ulps of the logits, which made a small loss negative), and held at 0 or
    more: a row's masked log-sum-exp includes its positive logit, so it is never below it.
    """
    positive_logits = scale * positives
    rows = (row_lse - positive_logits).clamp_min_(0).sum()
    cols = (col_lse - positive_logits).clamp_min_(0).sum()
    return (rows + cols) / (2 * n)


def _owned_lse(row_lse, n: int, lo: int, hi: int):
    """The owned rows' log-sum-exps at ``lo..hi`` of a length-``n`` vector, ``+inf`` elsewhere
    (where no weight is formed: a ``+inf`` entry would give 0)."""
    ext = torch.full((n,), float("inf"), dtype=row_lse.dtype, device=row_lse.device)
    ext[lo:hi] = row_lse
    return ext


def _column_lse_across_ranks(col_part: torch.Tensor, group) -> torch.Tensor:
    """Every column's log-sum-exp over the global batch's rows, from each rank's over its own rows
    (``[n]`` fp32 or fp64 on every rank, ``-inf`` from a rank with no rows): all-gathered, then one
    log-sum-exp per column over the ranks in rank order, so every rank gets the same bits.
    ``W * n`` elements at once (2 MiB at W = 8, n = 65,536)."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    parts = col_part.new_empty((world * col_part.numel(),))  # gathered flat (gloo takes no [W, n] form)
    _collective("all_gather_single")(parts, col_part.contiguous(), group=group)
    return torch.logsumexp(parts.view((world,) + tuple(col_part.shape)), dim=0)


_SECOND_DERIVATIVE_ERROR = ("label_guided_infonce: second derivatives (create_graph=True) are not supported; "
                            "the tiled backward builds no graph")


class _TorchLossShare(torch.autograd.Function):
    """The owned share of the loss: ``(sum_{i in lo..hi} (r_i - L_ii) + sum_{j in lo..hi} (c_j - L_jj)) / (2 n)``.

    One device (``combine`` None): ``lo = 0, hi = n``, the whole loss, one pass over the
    logits forward and one backward (both directions' gradients from each block).

    A rank of ``group=`` (``combine`` given; ``u`` its own rows ``lo..hi``, ``t`` the gathered
    batch): one pass over its rows' logits gives their row log-sum-exps and each column's over
    its rows, and ``combine`` (:func:`_column_lse_across_ranks`, a collective) turns those into
    every column's over all rows; the shares add up to the loss. Backward, two passes: its rows
    against every column (their ``u`` gradients, complete; the logit-scale gradient of their
    logits) and every row against its columns (its rows' parts of every ``t`` gradient, which
    :func:`_reduce_to_owners` sums). Each logit is visited by one rank per direction,
    so the ranks together do one device's work, and each rank backpropagates its rows' logits
    through both softmaxes: the gradients summed over ranks are the loss's when every rank
    backpropagates the same multiple of it (the documented convention).

    The positive logits are handled inside so that each input receives a single gradient buffer
    (autograd would otherwise sum two ``B x D`` gradients).
    """

    @staticmethod
    def forward(ctx, u, t, scale, keys, lo: int, hi: int, block: int, combine=None):
        ctx.lo, ctx.hi, ctx.block, ctx.grouped = lo, hi, block, combine is not None
        share, saved = _torch_share(u, t, scale, keys, lo, hi, block, combine)
        ctx.save_for_backward(*saved)
        return share

    @staticmethod
    @_library.kernel_backward(_SECOND_DERIVATIVE_ERROR)
    def backward(ctx, grad_share):
        lo, hi, block = ctx.lo, ctx.hi, ctx.block
        u, t, scale, keys, row_lse, col_lse = ctx.saved_tensors
        if not ctx.grouped:
            coef = grad_share / (2 * t.shape[0])
            grad_u, grad_t, grad_scale = _torch_grad_both(u, t, scale, keys, row_lse, col_lse, coef, block,
                                                          ctx.needs_input_grad[:3])
            return grad_u, grad_t, grad_scale, None, None, None, None, None
        need_t = ctx.needs_input_grad[1]
        u_pass, t_part = _torch_rank_grads(ctx.saved_tensors, grad_share, lo, hi, block, ctx.needs_input_grad[:3])
        grad_u, grad_scale = u_pass()
        grad_t = t_part(0, t.shape[0]) if need_t else None  # one process standing in for a rank (tests)
        return grad_u, grad_t, grad_scale, None, None, None, None, None


def _torch_share(u, t, scale, keys, lo: int, hi: int, block: int, combine=None) -> tuple[torch.Tensor, tuple]:
    """The owned share and what its backward needs (:class:`_TorchLossShare`): one device
    (``combine`` None, every row) or a rank of ``group=`` (``u`` its own rows ``lo..hi``,
    ``t`` every row)."""
    if combine is None:
        row_lse, col_lse, dots = _torch_lse_both(u, t, scale, keys, block)
    else:
        row_lse, col_part, dots = _torch_lse_both(u, t, scale, keys, block, lo)
        col_lse = combine(col_part)  # every rank joins, a rank with no rows too
    share = _loss_share(row_lse, col_lse[lo:hi], scale, dots, t.shape[0])
    return share, (u, t, scale, keys, row_lse, col_lse)


def _torch_rank_grads(saved, grad_share, lo: int, hi: int, block: int, needs: tuple):
    """A rank's backward (:class:`_TorchLossShare`'s two passes), each pass only where its gradient
    is wanted, as the Triton backend's (:func:`_triton_rank_grads`): a frozen tower's rows are not
    differentiated. Returns ``u_pass()``, which gives the own rows' ``u`` gradient (complete) and
    the scale's (None where neither is wanted), and ``t_part(r0, r1)``: this rank's part of the
    ``t`` gradient of the rows ``r0..r1`` (``[r1 - r0, D]``, every row against this rank's
    columns)."""
    u, t, scale, keys, row_lse, col_lse = saved
    n = t.shape[0]
    coef = grad_share / (2 * n)
    need_u, _, need_scale = needs
    # A rank with no rows (lo == hi) forms zeros: no logits, so empty products (its image rows'
    # gradient [0, D], zero parts of every text row's), and it joins the reductions as the others do.
    row_ext = _owned_lse(row_lse, n, lo, hi)

    def u_pass() -> tuple:
        if not (need_u or need_scale):
            return None, None
        return _torch_grad_rows(u, t, scale, keys, row_ext, col_lse, (lo, hi), (0, n), coef, block,
                                (need_u, need_scale))

    def t_part(r0: int, r1: int) -> torch.Tensor:
        return _torch_grad_rows(t[r0:r1], u, scale, keys, col_lse, row_ext, (r0, r1), (lo, hi), coef, block,
                                (True, False))[0]

    return u_pass, t_part


@_dispatch.register(OP_NAME, "torch")
def _lse_share_torch(u, t, scale, keys, lo: int, hi: int, combine=None):
    return _TorchLossShare.apply(u, t, scale, keys, lo, hi, _TORCH_BLOCK_ROWS, combine)


# ---------------------------------------------------------------------------
# triton backend
# ---------------------------------------------------------------------------

try:
    import triton
    import triton.language as tl
except Exception:  # missing or broken: the torch backend still works; dispatch reports why triton cannot run
    triton = None
try:
    from triton.language.extra import libdevice
except Exception:  # without it the forward kernels take tl.log (_fast_log)
    libdevice = None

if triton is not None:

    @triton.jit
    def _dot(x, y, IEEE: tl.constexpr):
        # fp32 inputs: IEEE fp32 dot (TF32 would cost ~1e-3 relative); fp16/bf16: tensor cores, fp32 accumulate.
        if IEEE:
            out = tl.dot(x.to(tl.float32), y.to(tl.float32), input_precision="ieee")
        else:
            out = tl.dot(x, y)
        return out

    @triton.jit
    def _similarity_tile(a_ptr, b_ptr, a_rows, b_rows, a_in, b_in, dim, stride_a, stride_b,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         IEEE: tl.constexpr):
        # a[a_rows] . b[b_rows] over all of D in K steps (used when D is too wide for one dot), where
        # a_in and b_in say which rows exist (the others load as 0).
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        ks = tl.arange(0, BLOCK_K)
        for k0 in range(0, dim, BLOCK_K):
            kk = k0 + ks
            a = tl.load(a_ptr + a_rows[:, None] * stride_a + kk[None, :],
                        mask=a_in[:, None] & (kk[None, :] < dim), other=0.0)
            b = tl.load(b_ptr + b_rows[None, :] * stride_b + kk[:, None],
                        mask=b_in[None, :] & (kk[:, None] < dim), other=0.0)
            acc += _dot(a, b, IEEE)
        return acc

    @triton.jit
    def _on_diagonal(row_start, col_start, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # rows[:, None] == cols[None, :] for the tile of rows row_start.. and columns col_start.., in 32
        # bits: the rows and often the columns are int64 (from the program id), and sm_90 compares int64
        # in two instructions, per logit. The offset fits in 32 bits (the batch is under 2^31 rows:
        # _triton_check). In the gradient kernel's loop the int64 compares took 10 more instructions
        # per logit (bf16, D = 512).
        offset = (col_start - row_start).to(tl.int32)
        return tl.arange(0, BLOCK_M)[:, None] == (offset + tl.arange(0, BLOCK_N))[None, :]

    @triton.jit
    def _row_keys(keys_ptr, rows, row_in, HAS_KEYS: tl.constexpr):
        # The rows' label keys for _masked_logits (-1 outside row_in; zeros, never read, without keys).
        # The gradient kernel loads them once, before its column loop: loaded in the loop, its fp16
        # 3-stage sweep candidate spilled 8 bytes (triton 3.8); the forward's loop is shorter with them in it.
        if HAS_KEYS:
            key_r = tl.load(keys_ptr + rows, mask=row_in, other=-1)
        else:
            key_r = tl.zeros_like(rows)
        return key_r

    @triton.jit
    def _masked_logits(sim, key_r, cols, row_in, col_in, diagonal, keys_ptr, scale, HAS_KEYS: tl.constexpr):
        # Rows where row_in is false and columns where col_in is false are -inf, as are the pairs of
        # equal keys off the diagonal (key_r: _row_keys'; diagonal: _on_diagonal's tile).
        logits = sim * scale
        valid = row_in[:, None] & col_in[None, :]
        if HAS_KEYS:
            key_c = tl.load(keys_ptr + cols, mask=col_in, other=-2)
            valid = valid & ((key_r[:, None] != key_c[None, :]) | diagonal)
        return tl.where(valid, logits, float("-inf"))

    @triton.jit
    def _exp(x):
        # e**x in float32 as 2**(x * log2 e). tl.exp computes the same product (log2 e rounded to
        # float32) and then ex2.approx.f32, which sm_90 expands to a compare and two multiplies
        # around its one MUFU.EX2 so that results under 2**-126 come out subnormal; tl.exp2 is
        # ex2.approx.ftz.f32, the MUFU.EX2 alone. The two agree bit for bit but below 2**-126,
        # which this flushes to 0: a softmax weight or a summand under 1.2e-38 beside the
        # largest term's 1 (every exponent here is shifted by its max or its log-sum-exp).
        return tl.exp2(x * 1.4426950408889634)

    @triton.jit
    def _log(x, FAST: tl.constexpr):
        # ln x for the log-sum-exps, whose x (a sum of exponentials shifted by their max) is >= 1, or 0
        # for a row of the one-pass forward whose every logit is masked (a chunk of another rank's
        # columns with group=): ln 0 is -inf on both paths (lg2.approx of +0 too), that row's LSE.
        # FAST (16-bit inputs on a GPU): lg2.approx.ftz times ln 2 (libdevice's fast_logf), one
        # MUFU.LG2 and a multiply, within about 1.1e-7 of ln x (2**-22.6 in log2), where tl.log is
        # a polynomial of some 20 instructions. The forward kernels take a log per row and per
        # column of every tile, in every thread that holds that row or column: a fifth of the
        # blocked forward's instructions in the sm_90a code. The interpreter cannot run
        # fast_logf and fp32 inputs keep the exact log (see _fast_log).
        if FAST:
            return libdevice.fast_logf(x)
        else:
            return tl.log(x)

    @triton.jit
    def _holds_diagonal(row_start, col_start, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # Whether the tile of rows row_start.. and columns col_start.. holds an entry (i, i).
        return (col_start < row_start + BLOCK_M) & (col_start + BLOCK_N > row_start)

    @triton.jit
    def _row_lse_step(run_max, run_sum, diag, sim, logits, diagonal, c0, row_start,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # One column tile into a row block's online log-sum-exp (and its diagonal similarities).
        # A row whose entries so far are all masked keeps max -inf and shifts by 0 (no inf - inf).
        if _holds_diagonal(row_start, c0, BLOCK_M, BLOCK_N):
            diag += tl.sum(tl.where(diagonal, sim, 0.0), axis=1)
        new_max = tl.maximum(run_max, tl.max(logits, axis=1))
        safe = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * _exp(run_max - safe) + tl.sum(_exp(logits - safe[:, None]), axis=1)
        return new_max, run_sum, diag

    @triton.jit
    def _tile_lse(logits, AXIS: tl.constexpr, FAST_LOG: tl.constexpr):
        # Log-sum-exp of a tile along AXIS, -inf where every entry is masked (never log 0), NaN where
        # one is NaN. tl.max skips NaN, so a line whose unmasked entries are all NaN has top -inf
        # as an empty one does; its total (exp(NaN) = NaN, the masked entries' 0) tells them apart.
        top = tl.max(logits, axis=AXIS)
        empty = top == float("-inf")
        safe = tl.where(empty, 0.0, top)
        if AXIS == 1:
            total = tl.sum(_exp(logits - safe[:, None]), axis=1)
        else:
            total = tl.sum(_exp(logits - safe[None, :]), axis=0)
        return tl.where(empty, tl.where(total == 0.0, float("-inf"), total),
                        safe + _log(tl.where(empty, 1.0, total), FAST_LOG))

    @triton.jit
    def _lse_both_kernel(
        a_ptr, b_ptr, keys_ptr, scale_ptr, lse_ptr, diag_ptr, col_part_ptr,
        row_lo, row_hi, n, dim, stride_a, stride_b,
        HAS_KEYS: tl.constexpr, IEEE: tl.constexpr, FAST_LOG: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
        ONE_DOT: tl.constexpr,
    ):
        # Row and column log-sum-exps of the masked logits of rows row_lo..row_hi against the n rows
        # of b (columns), one pass; a holds those rows only (its row 0 is row row_lo: a rank's own
        # rows with group=, every row on one device). Program g takes row blocks g, g + G, ...
        # (G = number of programs) of the BLOCK_M-aligned blocks that hold the range (started at row_lo, not
        # aligned, the blocks cost up to 40 more registers) against every column: row LSEs (and the
        # similarities a_i . b_i) go straight to lse_ptr/diag_ptr ([row_hi - row_lo] fp32); column LSEs over this
        # program's rows accumulate in col_part_ptr[g, :] ([G, n] fp32, -inf on entry), which only
        # this program touches: deterministic, no atomics. Every column gets its own shift (its
        # max in the tile), so nothing underflows that an exact log-sum-exp would keep.
        pid = tl.program_id(0).to(tl.int64)
        programs = tl.num_programs(0)
        scale = tl.load(scale_ptr).to(tl.float32)
        part_row = col_part_ptr + pid * n
        # Row r of the batch at a_base + r * stride_a (a's row 0 is row row_lo; the rows before it
        # that a row block starting below row_lo holds are masked, never loaded). row_lo * stride_a
        # is within int32: B * row stride < 2^31 (_triton_check).
        a_base = a_ptr - row_lo * stride_a
        first_tile = row_lo // BLOCK_M
        for step in range(0, tl.cdiv(tl.cdiv(row_hi, BLOCK_M) - first_tile - pid, programs)):
            row_start = (first_tile + pid + step * programs) * BLOCK_M  # int64, from pid
            rows = row_start + tl.arange(0, BLOCK_M)
            # row_lo <= rows < row_hi in one unsigned compare (two spill in some sweep candidates)
            row_in = (rows - row_lo).to(tl.uint32) < (row_hi - row_lo).to(tl.uint32)
            if ONE_DOT:
                dcols = tl.arange(0, BLOCK_D)
                a_rows = tl.load(a_base + rows[:, None] * stride_a + dcols[None, :],
                                 mask=row_in[:, None] & (dcols[None, :] < dim), other=0.0)
            run_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
            run_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
            diag = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for c0 in range(0, n, BLOCK_N):
                cols = c0 + tl.arange(0, BLOCK_N)
                if ONE_DOT:
                    b = tl.load(b_ptr + cols[:, None] * stride_b + dcols[None, :],
                                mask=(cols[:, None] < n) & (dcols[None, :] < dim), other=0.0)
                    sim = _dot(a_rows, tl.trans(b), IEEE)
                else:
                    sim = _similarity_tile(a_base, b_ptr, rows, cols, row_in, cols < n, dim, stride_a, stride_b,
                                           BLOCK_M, BLOCK_N, BLOCK_K, IEEE)
                # Rows past row_hi (another range's) are -inf: they must not enter the columns' sums.
                diagonal = _on_diagonal(row_start, c0, BLOCK_M, BLOCK_N)
                logits = _masked_logits(sim, _row_keys(keys_ptr, rows, row_in, HAS_KEYS), cols, row_in, cols < n,
                                        diagonal, keys_ptr, scale, HAS_KEYS)
                run_max, run_sum, diag = _row_lse_step(run_max, run_sum, diag, sim, logits, diagonal, c0,
                                                       row_start, BLOCK_M, BLOCK_N)
                # Columns: this tile's LSE per column (-inf where fully masked), merged into the partial.
                tile_lse = _tile_lse(logits, 0, FAST_LOG)
                old = tl.load(part_row + cols, mask=cols < n, other=float("-inf"))
                # A NaN on either side stays NaN: tl.maximum's default takes the other operand, and
                # beside an empty side (-inf) the merge then stored -inf, as if the column held nothing.
                top = tl.maximum(old, tile_lse, propagate_nan=tl.PropagateNan.ALL)
                top_empty = top == float("-inf")
                top_safe = tl.where(top_empty, 0.0, top)
                both = _exp(old - top_safe) + _exp(tile_lse - top_safe)
                merged = tl.where(top_empty, float("-inf"),
                                  top_safe + _log(tl.where(top_empty, 1.0, both), FAST_LOG))
                tl.store(part_row + cols, merged, mask=cols < n)
            lse = run_max + _log(tl.where(row_in, run_sum, 1.0), FAST_LOG)
            tl.store(lse_ptr + (rows - row_lo), lse, mask=row_in)
            tl.store(diag_ptr + (rows - row_lo), diag, mask=row_in)
            # The next row block reads the column partials back, possibly in other threads of this
            # program (replicated layouts, asynchronous copies): make this block's stores visible.
            tl.debug_barrier()

    @triton.jit
    def _grad_rows_kernel(
        a_ptr, b_ptr, keys_ptr, scale_ptr, coef_ptr, lse_a_ptr, lse_b_ptr, grad_a_ptr, grad_scale_ptr,
        row_lo, row_hi, col_lo, col_hi, n, dim, stride_a, stride_b, stride_g,
        HAS_KEYS: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
        ONE_DOT: tl.constexpr,
    ):
        # Gradient w.r.t. rows row_lo..row_hi through their logits against columns col_lo..col_hi (a
        # holds those rows only and b those columns: their row 0 is row row_lo and column col_lo; with
        # group=, one of them is a rank's own rows), with weights
        # coef * (exp(L - lse_a_i) + exp(L - lse_b_j) - 2 [i == j]); lse_* are fp32 [n] (+inf: no
        # weight). Row blocks are BLOCK_M-aligned (as in _lse_both_kernel: started at row_lo, the
        # 16-bit one-dot default spilled); the rows of a block outside the range load as 0 and are
        # not stored. Program (row block, D chunk) writes
        # grad_a[rows - row_lo, chunk] in grad_a's dtype (row stride stride_g) and its part of the
        # logit-scale gradient, coef * sum_ij w_ij a_i . b_j, to grad_scale_ptr[pid] (0 from chunks
        # other than 0).
        # ONE_DOT: one chunk covers D, so each similarity tile is one dot from the b tile that the
        # gradient dot uses too, computed once. Otherwise (D over the one-dot limit) each of the
        # cdiv(D, BLOCK_D) chunks recomputes the similarities in K steps of BLOCK_K.
        pid_m = tl.program_id(0).to(tl.int64)
        pid_d = tl.program_id(1).to(tl.int64)
        row_start = (row_lo // BLOCK_M + pid_m) * BLOCK_M
        rows = row_start + tl.arange(0, BLOCK_M)
        dcols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        row_in = (rows >= row_lo) & (rows < row_hi)
        d_in = dcols < dim
        scale = tl.load(scale_ptr).to(tl.float32)
        coef = tl.load(coef_ptr).to(tl.float32)
        lse_a = tl.load(lse_a_ptr + rows, mask=row_in, other=float("inf"))
        key_r = _row_keys(keys_ptr, rows, row_in, HAS_KEYS)
        # Row r at a_base + r * stride_a, column c at b_base + c * stride_b (see _lse_both_kernel).
        a_base = a_ptr - row_lo * stride_a
        b_base = b_ptr - col_lo * stride_b
        if ONE_DOT:
            a_rows = tl.load(a_base + rows[:, None] * stride_a + dcols[None, :],
                             mask=row_in[:, None] & d_in[None, :], other=0.0)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        scale_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for c0 in range(col_lo, col_hi, BLOCK_N):
            cols = c0 + tl.arange(0, BLOCK_N)
            col_in = cols < col_hi
            b = tl.load(b_base + cols[:, None] * stride_b + dcols[None, :],
                        mask=col_in[:, None] & d_in[None, :], other=0.0)
            if ONE_DOT:
                sim = _dot(a_rows, tl.trans(b), IEEE)
            else:
                sim = _similarity_tile(a_base, b_base, rows, cols, row_in, col_in, dim, stride_a, stride_b,
                                       BLOCK_M, BLOCK_N, BLOCK_K, IEEE)
            # Rows of the block outside the range are -inf, so both their weights are 0 (with logit 0,
            # as their loaded zeros give, e**-lse_b_j is inf where a column's log-sum-exp is
            # under -88.7, and inf * 0 a NaN in the logit-scale part). Columns are masked at col_hi
            # (<= n), the bound col_in tests (masked at n as well, the loop kept both compares: 1.4
            # more instructions per logit at bf16, D = 512).
            positive = _on_diagonal(row_start, c0, BLOCK_M, BLOCK_N)
            logits = _masked_logits(sim, key_r, cols, row_in, col_in, positive, keys_ptr, scale, HAS_KEYS)
            lse_b = tl.load(lse_b_ptr + cols, mask=col_in, other=float("inf"))
            # Softmax weights of both directions, each <= 1 (coef is applied once at the end, so that
            # fp16 weights do not underflow for large B). The positive logit s a_i . b_i adds -2 to
            # its weight: its gradient -2 s b_i then comes out of the same dot. (An entry i == i
            # outside the ranges is a padding column's, whose b is loaded as 0, or a row's of the
            # block outside row_lo..row_hi, loaded as 0 too, whose gradient row is not stored and
            # whose logit-scale part is 0: its -2 adds nothing.)
            weights = _exp(logits - lse_a[:, None]) + _exp(logits - lse_b[None, :])
            weights = tl.where(col_in[None, :], weights, 0.0)
            weights = tl.where(positive, weights - 2.0, weights)
            # d loss / d s over coef: sum_ij w_ij a_i . b_j, from the fp32 similarities already here.
            scale_acc += tl.sum(weights * sim, axis=1)
            if IEEE:
                acc += tl.dot(weights, b.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(weights.to(b.dtype), b)
        # Every D chunk sees the same weights: only chunk 0 reports the logit-scale part.
        partial = tl.where(pid_d == 0, tl.sum(scale_acc, axis=0) * coef, 0.0)
        tl.store(grad_scale_ptr + pid_m * tl.num_programs(1) + pid_d, partial)
        tl.store(grad_a_ptr + (rows - row_lo)[:, None] * stride_g + dcols[None, :],
                 (acc * (coef * scale)).to(grad_a_ptr.dtype.element_ty), mask=row_in[:, None] & d_in[None, :])

    # -- Blocked strategy: large tiles with a K loop, the B x B work split into row blocks. --
    # The one-pass kernels above keep a row block of a resident over all of D, which limits their
    # column tiles to 32 (register pressure and shared memory at D = 512) and serialises the
    # softmax with the tensor-core work on one block per SM. The blocked strategy (a swept
    # candidate, STRATEGY="blocked") instead computes each BLOCK_M x BLOCK_N tile as an ordinary
    # pipelined GEMM over D, one program per tile, several tiles resident per SM:
    # - forward: per-tile row and column log-sum-exps, merged by torch per row block;
    # - backward: each row block's softmax weights written in the inputs' dtype (exactly as the
    #   one-pass kernel rounds them before its gradient dot), then one cuBLAS product per row block.

    @triton.jit
    def _program_tile(rows_total, BLOCK_M: tl.constexpr):
        # (program, row tile, column tile) of a 1-D grid over a block's tiles, the row tile varying
        # fastest (column tiles could outnumber grid axis 1's limit): the programs that run
        # together share one tile of the other side.
        pid = tl.program_id(0).to(tl.int64)
        row_tiles = tl.cdiv(rows_total, BLOCK_M)
        return pid, pid % row_tiles, pid // row_tiles

    @triton.jit
    def _interior_tile(row_start, rows_end, col_start, cols_end, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # Whether every row of the tile is below rows_end and every column below cols_end (<= n),
        # and no entry is on the diagonal (row == column): there the masks reduce to the label
        # keys', and nothing needs bounds. The blocked kernels launch twice, once for these tiles
        # (TILES=1: a leaner program, fewer registers) and once for the others (_tile_launches).
        inside = (row_start + BLOCK_M <= rows_end) & (col_start + BLOCK_N <= cols_end)
        return inside & ~_holds_diagonal(row_start, col_start, BLOCK_M, BLOCK_N)

    @triton.jit
    def _interior_logits(sim, rows, cols, row_bound, keys_ptr, scale, HAS_KEYS: tl.constexpr):
        # _masked_logits of an interior tile: every bound holds and rows != cols, so only the keys mask.
        # row_bound: one that every row of the tile is below (its block's end, or the batch's).
        logits = sim * scale
        if HAS_KEYS:
            key_r = tl.load(keys_ptr + rows)
            key_c = tl.load(keys_ptr + cols)
            logits = tl.where(key_r[:, None] == key_c[None, :], float("-inf"), logits)
        else:
            # Always true here, but a select, as in _masked_logits: without one the GPU backend
            # contracts sim * scale into the exponentials' subtractions (an FMA, one rounding fewer)
            # and the interior tiles are no longer bit for bit the general ones.
            logits = tl.where((rows < row_bound)[:, None], logits, float("-inf"))
        return logits

    @triton.jit
    def _lse_tiles_kernel(
        a_ptr, b_ptr, keys_ptr, scale_ptr, row_part_ptr, col_part_ptr, diag_ptr,
        row0, rows_end, n, dim, stride_a, stride_b,
        HAS_KEYS: tl.constexpr, IEEE: tl.constexpr, FAST_LOG: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TILES: tl.constexpr,
    ):
        # Rows row0..rows_end against the n rows of b, one tile per program (_program_tile); a_ptr is
        # row row0's (the block's first row; a holds rows from there on, at least to rows_end);
        # TILES: 0 every tile, 1 the interior tiles only (_interior_tile), 2 the others only.
        # Outputs, fp32, indexed from row0:
        # row_part [rows, cdiv(n, BLOCK_N)]: the tile's log-sum-exp of each row;
        # col_part [cdiv(rows, BLOCK_M), n]: the tile's log-sum-exp of each column;
        # diag [rows]: a_i . b_i, written by the tile that holds (i, i).
        _, pid_m, pid_n = _program_tile(rows_end - row0, BLOCK_M)
        row_start = row0 + pid_m * BLOCK_M
        rows = row_start + tl.arange(0, BLOCK_M)
        c0 = pid_n * BLOCK_N
        cols = c0 + tl.arange(0, BLOCK_N)
        interior = _interior_tile(row_start, rows_end, c0, n, BLOCK_M, BLOCK_N)
        if TILES != 0:  # 1: the interior tiles only; 2: the others only
            if interior != (TILES == 1):
                return
        scale = tl.load(scale_ptr).to(tl.float32)
        # Row r at a_ptr + (r - row0) * stride_a (a_ptr is row row0's).
        sim = _similarity_tile(a_ptr - row0 * stride_a, b_ptr, rows, cols, rows < rows_end, cols < n, dim, stride_a,
                               stride_b, BLOCK_M, BLOCK_N, BLOCK_K, IEEE)
        if TILES == 1:
            logits = _interior_logits(sim, rows, cols, rows_end, keys_ptr, scale, HAS_KEYS)
            tl.store(row_part_ptr + (rows - row0) * tl.cdiv(n, BLOCK_N) + pid_n, _tile_lse(logits, 1, FAST_LOG))
            tl.store(col_part_ptr + pid_m * n + cols, _tile_lse(logits, 0, FAST_LOG))
        else:
            # Rows past the block belong to the next one: they must not enter its column sums. (Rows are
            # not bounded by n: those of a chunk of columns with group= may come after every column.)
            row_in = rows < rows_end
            diagonal = _on_diagonal(row_start, c0, BLOCK_M, BLOCK_N)
            logits = _masked_logits(sim, _row_keys(keys_ptr, rows, row_in, HAS_KEYS), cols, row_in, cols < n, diagonal,
                                    keys_ptr, scale, HAS_KEYS)
            tl.store(row_part_ptr + (rows - row0) * tl.cdiv(n, BLOCK_N) + pid_n, _tile_lse(logits, 1, FAST_LOG),
                     mask=row_in)
            tl.store(col_part_ptr + pid_m * n + cols, _tile_lse(logits, 0, FAST_LOG), mask=cols < n)
            if _holds_diagonal(row_start, c0, BLOCK_M, BLOCK_N):
                diag = tl.sum(tl.where(diagonal, sim, 0.0), axis=1)
                tl.store(diag_ptr + (rows - row0), diag, mask=row_in & (rows >= c0) & (rows < c0 + BLOCK_N))

    @triton.jit
    def _grad_weights_kernel(
        a_ptr, b_ptr, keys_ptr, scale_ptr, lse_a_ptr, lse_b_ptr, w_ptr, part_ptr,
        row0, rows_end, col0, cols_end, diag_lo, diag_hi, n, dim, stride_a, stride_b, stride_w,
        HAS_KEYS: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TILES: tl.constexpr,
    ):
        # Softmax weights of rows row0..rows_end against columns col0..cols_end (a_ptr is row row0's,
        # b_ptr column col0's: a holds the rows from row0 on, b the columns from col0 on), as in
        # _grad_rows_kernel (both directions, -2 on the diagonal's entries diag_lo..diag_hi),
        # stored in w_ptr's dtype at [row - row0, col - col0] (row stride stride_w); and the tile's
        # sum_ij w_ij a_i . b_j (the logit-scale gradient over coef) at part_ptr[program]. One tile per program
        # (_program_tile); TILES: 0 every tile, 1 the interior tiles only (_interior_tile), 2 the others.
        pid, pid_m, pid_n = _program_tile(rows_end - row0, BLOCK_M)
        row_start = row0 + pid_m * BLOCK_M
        col_start = col0 + pid_n * BLOCK_N
        rows = row_start + tl.arange(0, BLOCK_M)
        cols = col_start + tl.arange(0, BLOCK_N)
        interior = _interior_tile(row_start, rows_end, col_start, cols_end, BLOCK_M, BLOCK_N)
        if TILES != 0:  # 1: the interior tiles only; 2: the others only
            if interior != (TILES == 1):
                return
        scale = tl.load(scale_ptr).to(tl.float32)
        # Row r at a_ptr + (r - row0) * stride_a, column c at b_ptr + (c - col0) * stride_b.
        sim = _similarity_tile(a_ptr - row0 * stride_a, b_ptr - col0 * stride_b, rows, cols, rows < rows_end,
                               cols < cols_end, dim, stride_a, stride_b, BLOCK_M, BLOCK_N, BLOCK_K, IEEE)
        if TILES == 1:
            # No bounds, no diagonal: the weights as below with every mask true and no -2.
            logits = _interior_logits(sim, rows, cols, n, keys_ptr, scale, HAS_KEYS)
            lse_a = tl.load(lse_a_ptr + rows)
            lse_b = tl.load(lse_b_ptr + cols)
            weights = _exp(logits - lse_a[:, None]) + _exp(logits - lse_b[None, :])
            tl.store(part_ptr + pid, tl.sum(tl.sum(weights * sim, axis=1), axis=0))
            tl.store(w_ptr + (rows - row0)[:, None] * stride_w + (cols - col0)[None, :],
                     weights.to(w_ptr.dtype.element_ty))
        else:
            row_in = rows < rows_end
            col_in = cols < cols_end
            diagonal = _on_diagonal(row_start, col_start, BLOCK_M, BLOCK_N)
            logits = _masked_logits(sim, _row_keys(keys_ptr, rows, rows < n, HAS_KEYS), cols, rows < n, cols < n,
                                    diagonal, keys_ptr, scale, HAS_KEYS)
            lse_a = tl.load(lse_a_ptr + rows, mask=row_in, other=float("inf"))
            lse_b = tl.load(lse_b_ptr + cols, mask=col_in, other=float("inf"))
            weights = _exp(logits - lse_a[:, None]) + _exp(logits - lse_b[None, :])
            positive = diagonal & (rows[:, None] >= diag_lo) & (rows[:, None] < diag_hi)
            inside = row_in[:, None] & col_in[None, :]
            weights = tl.where(inside, weights, 0.0) - tl.where(positive & inside, 2.0, 0.0)
            tl.store(part_ptr + pid, tl.sum(tl.sum(weights * sim, axis=1), axis=0))
            tl.store(w_ptr + (rows - row0)[:, None] * stride_w + (cols - col0)[None, :],
                     weights.to(w_ptr.dtype.element_ty), mask=inside)


# Launch configurations, chosen by compiling for sm_90a (ace_kernels._aot.compile_sm90; triton 3.8
# and 3.6 differ by up to ~40 registers, fp16 forward, and every one below has 0 spill bytes in both). "lse" is
# the one-pass forward's (_lse_both_kernel), "grad" the gradient kernel's (_grad_rows_kernel).
# - 16-bit, D <= 512, one dot per similarity tile (the row block of a stays in shared memory):
#   lse 128 x 32, 8 warps, 2 stages: 137-188 registers (2026-12-06, triton 3.6 and 3.8), 193 KiB
#   shared (each 32 x 512 b tile feeds 128 x 32 x 512 MACs); grad 64 x 32, 8 warps, 2 stages:
#   243-255 registers (the 64 x 512 fp32 accumulator alone is 128 per thread), 128 KiB shared.
#   There BLOCK_N 64 spills 32-128 bytes, a third stage does not fit beside a larger tile,
#   16 warps spill, and a 128-row gradient accumulator cannot fit at all.
# - 16-bit, 512 < D <= 1024, K steps of 64: lse 128 x 64, 8 warps, 3 stages (187-237 registers one-pass,
#   72 KiB; 128 x 128 spills in the one-pass kernel); grad 64 x 32 in two 512-wide D chunks,
#   8 warps, 3 stages (234-250 registers, 68 KiB).
# - fp32 (IEEE dots on CUDA cores, never the fast path): lse 64 x 32 in K steps of 16, 4 warps,
#   no pipelining (96-168 registers, aligned or not). The former 8 warps and 2 stages spilled
#   8 bytes in the label-free one-pass kernel under triton 3.8 when every size is a multiple of
#   16; 8 warps and 3 stages spilled 16 bytes under 3.6; K steps of 32 spill. grad 64 x 32 in K
#   steps of 32 and 256-wide D chunks (178-196 registers; 512 wide spills).
# - D or a row stride not a multiple of 16 elements: Triton cannot prove 16-byte alignment, loads
#   go element by element through registers and the configurations above spill (80-800 bytes).
#   Then K steps of 32 and narrower chunks: 16-bit lse 64 x 64 (~128 registers), grad 64 x 32 in
#   256-wide chunks (200-224); fp32 lse as aligned (K steps of 32 spilled 60 bytes in the one-pass
#   kernel under 3.6 with every size a multiple of 16; with 2 stages a label-free forward kernel
#   spilled 8 bytes under ptxas 12.9), grad 32 x 32 in 128-wide chunks (128 registers; 64 x 32
#   spilled 40 bytes in one specialisation under ptxas 12.9 once a rank's own rows came in a tensor
#   of their own with group=, 2026-12-05, and so did it with 4 warps, one stage or K steps of 16).
# tests/test_contrastive.py compiles exactly these for every input dtype at D = 512 and 1024,
# aligned, and at D = 500 and 1000, with and without labels, each with the batch (n and the
# bounds) not a multiple of 16 and a multiple of 16 (Triton specialises on it: other code); CI
# runs it under Triton 3.8 (ptxas 12.9) and 3.6 (ptxas 12.8, the GPU image's), whose register
# allocations differ.
_GPU_CONFIGS = {
    # (kernel, "16bit" or "fp32", path): tiles
    ("lse", "16bit", "one_dot"): dict(BLOCK_M=128, BLOCK_N=32, BLOCK_K=64, num_warps=8, num_stages=2),
    ("lse", "16bit", "k_steps"): dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=3),
    ("lse", "16bit", "unaligned"): dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=2),
    ("lse", "fp32", "k_steps"): dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=1),
    ("lse", "fp32", "unaligned"): dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=1),
    ("grad", "16bit", "one_dot"): dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=64, num_warps=8, num_stages=2),
    ("grad", "16bit", "k_steps"): dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=64, num_warps=8, num_stages=3),
    ("grad", "16bit", "unaligned"): dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, num_warps=8, num_stages=2),
    ("grad", "fp32", "k_steps"): dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, num_warps=8, num_stages=2),
    ("grad", "fp32", "unaligned"): dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=8, num_stages=2),
}
# Alternatives that a GPU benchmark run times side by side for the one-dot path of 16-bit inputs
# (D <= 512, aligned: the benchmarks' D = 512 in bf16); ``_tuning`` then launches the fastest on
# that card. Keys: (kernel, "16bit/one_dot"). Each compiles for sm_90a without spills at D = 512
# (the widest BLOCK_D of the path), with and without labels, in both forward kernels for "lse"
# (tests/test_contrastive.py).
_GPU_CANDIDATES = {
    ("lse", "16bit/one_dot"): (dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=1),
                               dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=64, num_warps=4, num_stages=3),
                               dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=2),
                               dict(BLOCK_M=128, BLOCK_N=16, BLOCK_K=64, num_warps=8, num_stages=3),
                               dict(STRATEGY="blocked", BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=8,
                                    num_stages=3),
                               dict(STRATEGY="blocked", BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4,
                                    num_stages=4)),
    ("grad", "16bit/one_dot"): (dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=64, num_warps=8, num_stages=3),
                                dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=64, num_warps=8, num_stages=3),
                                dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=2),
                                dict(BLOCK_M=64, BLOCK_N=16, BLOCK_K=64, num_warps=8, num_stages=4),
                                dict(STRATEGY="blocked", BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=8,
                                     num_stages=3),
                                dict(STRATEGY="blocked", BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=8,
                                     num_stages=4)),
}
_tuning.register("contrastive", _GPU_CANDIDATES,
                 lambda kernel, dtype_class: _GPU_CONFIGS[(kernel, *dtype_class.split("/"))], __name__)
# Shared memory per block, in bytes, of each configuration above, as compiled for sm_90a at the
# path's widest D (the one-dot path's row block and b tiles are BLOCK_D wide: a narrower D needs
# less, but the bound is the path's), the most over dtypes, labels and batch specialisations:
# (kernel, "<16bit|fp32>/<path>"): (the default's, then each candidate's in order). A GPU that
# gives a block less cannot launch the configuration (OutOfResources): the Triton backend
# declines the call there (_triton_check). On sm_80 Triton's shared use can differ slightly
# from sm_90a's; these are the sm_90a needs, the larger of triton 3.8's (this project's pin) and
# 3.6's (the GPU machine's: up to 512 bytes more in three one-dot forwards). tests/test_contrastive.py
# checks each against the compiles, under both in CI.
_GPU_SHARED_BYTES = {
    ("lse", "16bit/one_dot"): (197632, 196608, 164352, 197632, 180736, 73728, 65536),
    ("lse", "16bit/k_steps"): (73728,),
    ("lse", "16bit/unaligned"): (8192,),
    ("lse", "fp32/k_steps"): (6144,),
    ("lse", "fp32/unaligned"): (6144,),
    ("grad", "16bit/one_dot"): (131328, 164352, 100864, 102912, 131456, 73728, 49152),
    ("grad", "16bit/k_steps"): (69632,),
    ("grad", "16bit/unaligned"): (22528,),
    ("grad", "fp32/k_steps"): (45056,),
    ("grad", "fp32/unaligned"): (24576,),
}
_GPU_SHARED_MOST = max(max(needs) for needs in _GPU_SHARED_BYTES.values())
# Widest D done with one dot per similarity tile (aligned inputs only), and the gradient's D
# chunk width beyond it, per (kind, aligned).
_GPU_ONE_DOT_MAX = {"16bit": 512, "fp32": 0}
_GPU_GRAD_CHUNK = {("16bit", True): 512, ("16bit", False): 256, ("fp32", True): 256, ("fp32", False): 128}
# The interpreter: tiny tiles and a 64-wide limit, so that CPU tests reach every path with small D.
_INTERPRETER_TILES = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=1)
_INTERPRETER_D = 64


def _config_key(dtype: torch.dtype, dim: int, *, aligned: bool = True, interpreter: bool | None = None) -> str:
    """``"<16bit|fp32>/<one_dot|k_steps|unaligned>"``: the dtype class and path whose launch
    configuration a call takes (what ``_tuning.forced`` and the tuned file are keyed by)."""
    if interpreter is None:
        interpreter = _dispatch.interpreter_enabled()
    kind = _tuning.dtype_class(dtype)
    if interpreter:
        one_dot = dim <= _INTERPRETER_D
    else:
        one_dot = aligned and dim <= _GPU_ONE_DOT_MAX[kind]
    return f"{kind}/" + ("one_dot" if one_dot else ("k_steps" if aligned else "unaligned"))


def _launch_config(kernel: str, dtype: torch.dtype, dim: int, *, aligned: bool = True,
                   interpreter: bool | None = None, device: torch.device | None = None) -> dict:
    """Tiles, warps, stages and D split of ``kernel`` ("lse" or "grad") for ``dtype`` embeddings of width ``dim``.

    ``aligned``: ``dim`` and every row stride are multiples of 16 elements (what Triton
    specialises on). ``ONE_DOT``: each similarity tile is one dot over ``BLOCK_D >= dim``
    columns (a power of two >= 16, as ``tl.dot`` needs), computed once per direction.
    Otherwise similarities take K steps of ``BLOCK_K`` and the gradient is split into
    ``d_chunks`` chunks of ``BLOCK_D`` columns, each recomputing them.

    The tiles, warps and stages are the path's defaults, or on a CUDA ``device`` the ones
    measured fastest on its card model (``_tuning``); a configuration forced with
    ``_tuning.forced("contrastive", kernel, "<16bit|fp32>/<path>", ...)`` replaces them, on the
    interpreter too (``BLOCK_D``, ``ONE_DOT`` and the D split stay the path's).
    """
    if interpreter is None:
        interpreter = _dispatch.interpreter_enabled()
    kind, path = _config_key(dtype, dim, aligned=aligned, interpreter=interpreter).split("/")
    one_dot = path == "one_dot"
    chunk = _INTERPRETER_D if interpreter else _GPU_GRAD_CHUNK[(kind, aligned)]
    default = _INTERPRETER_TILES if interpreter else _GPU_CONFIGS[(kernel, kind, path)]
    config = _tuning.launch_config("contrastive", kernel, f"{kind}/{path}", None if interpreter else device, default)
    width = max(16, triton.next_power_of_2(dim))
    if one_dot:
        block_d = width
    elif kernel == "grad":
        block_d = min(width, chunk)
    else:
        block_d = 16  # unused by the K-step similarity
    config.update(BLOCK_D=block_d, ONE_DOT=one_dot,
                  d_chunks=triton.cdiv(dim, block_d) if kernel == "grad" else 1)
    return config


# Blocked strategy (STRATEGY="blocked" in a launch configuration): bytes of the per-block buffers,
# which bound its extra memory. Forward: each row block's per-tile row and column log-sum-exps
# (fp32, up to this many bytes each); backward: each row block's softmax weights (inputs' dtype).
_BLOCKED_PART_BYTES = 8 << 20
_BLOCKED_WEIGHT_BYTES = 32 << 20


def _blocked(cfg: dict) -> bool:
    return cfg.get("STRATEGY") == "blocked"


def _first_blocked_candidate(kernel: str) -> dict:
    """``kernel``'s ("lse" or "grad") first blocked candidate of the 16-bit one-dot path: the one
    the benchmark's ``triton+blocked`` rows and the blocked GPU tests force."""
    return next(c for c in _GPU_CANDIDATES[(kernel, "16bit/one_dot")] if _blocked(c))


def _block_rows(n: int, block_m: int, bytes_per_row: int, budget: int) -> int:
    """Rows per block of the blocked strategy: a multiple of ``block_m``, at least one tile,
    at most what ``budget`` bytes hold, and no more than the batch needs."""
    fit = max(1, budget // max(1, bytes_per_row) // block_m)
    return block_m * min(fit, triton.cdiv(n, block_m))


def _blocked_options(cfg: dict) -> dict:
    return {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")}


# Whether the blocked kernels run their interior tiles (full, off the diagonal) in a launch of their
# own (TILES=1: no bounds or diagonal masks, fewer instructions a logit and fewer registers in
# the sm_90a code; see benchmarks/kernel_stats.py) and the other tiles in a second (TILES=2): one
# launch more per block where it has both kinds. (Full tiles with the diagonal's code in the first
# launch took 162 and 177 registers, one block per SM: that is why the diagonal tiles go with the
# partial ones.) Off: one launch, every tile the general way (TILES=0; the tests compare the two).
_SPLIT_INTERIOR_TILES = True
TILES_ALL, TILES_INTERIOR, TILES_EDGE = 0, 1, 2


def _tile_launches(r0: int, r1: int, c0: int, c1: int, cfg: dict) -> tuple:
    """The TILES values to launch a blocked kernel with over the block of rows ``r0..r1`` and
    columns ``c0..c1``: the interior tiles when the block can hold one (a full tile each way), the
    others when it has any (a partial tile, or rows and columns that share indices: diagonal
    tiles). Each launch's programs skip the other kind's tiles."""
    if not _SPLIT_INTERIOR_TILES:
        return (TILES_ALL,)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    interior = r1 - r0 >= bm and c1 - c0 >= bn
    edge = (r1 - r0) % bm != 0 or (c1 - c0) % bn != 0 or (r0 < c1 and c0 < r1)
    return ((TILES_INTERIOR,) if interior else ()) + ((TILES_EDGE,) if edge else ())


def _lse_block_rows(rows_total: int, n: int, cfg: dict) -> int:
    """Rows per block of the blocked forward: its per-tile row partials ([rows, cdiv(n, BLOCK_N)]
    fp32) and column partials ([rows / BLOCK_M, n] fp32) within ``_BLOCKED_PART_BYTES`` each, or
    one tile of rows when even that is more."""
    bm = cfg["BLOCK_M"]
    rows = _block_rows(rows_total, bm, 4 * triton.cdiv(n, cfg["BLOCK_N"]), _BLOCKED_PART_BYTES)
    return min(rows, bm * max(1, _BLOCKED_PART_BYTES // (4 * n)))


def _lse_blocked(a, b, scale, keys, lo: int, hi: int, cfg: dict):
    """:func:`_triton_lse_both` by the blocked strategy: the row log-sum-exps of rows ``lo..hi``
    (``a``, its row 0 row ``lo``) against ``b``, each column's over those rows, and the similarities
    ``a_i . b_i``."""
    n, dim = b.shape
    bm = cfg["BLOCK_M"]
    col_tiles = triton.cdiv(n, cfg["BLOCK_N"])
    rows = _lse_block_rows(hi - lo, n, cfg)
    row_part = torch.empty(rows, col_tiles, dtype=torch.float32, device=a.device)
    lse = torch.empty(hi - lo, dtype=torch.float32, device=a.device)
    positives = torch.empty(hi - lo, dtype=torch.float32, device=a.device)
    # Row 0 carries the column log-sum-exps of the blocks before; rows 1.. this block's tiles.
    col_buf = torch.full((1 + rows // bm, n), float("-inf"), dtype=torch.float32, device=a.device)
    col_lse = torch.full((n,), float("-inf"), dtype=torch.float32, device=a.device)
    # The same for every launch of the loop below (host work, once).
    constants = dict(HAS_KEYS=keys is not None, IEEE=a.dtype == torch.float32, FAST_LOG=_fast_log(a.dtype),
                     **_blocked_options(cfg))
    for r0 in range(lo, hi, rows):
        r1 = min(hi, r0 + rows)
        tiles = triton.cdiv(r1 - r0, bm)
        for tiles_kind in _tile_launches(r0, r1, 0, n, cfg):
            _lse_tiles_kernel[(tiles * col_tiles,)](
                a[r0 - lo:], b, keys if keys is not None else lse, scale, row_part, col_buf[1:], positives[r0 - lo:],
                r0, r1, n, dim, a.stride(0), b.stride(0), TILES=tiles_kind, **constants)
        torch.logsumexp(row_part[:r1 - r0], dim=1, out=lse[r0 - lo:r1 - lo])
        torch.logsumexp(col_buf[:1 + tiles], dim=0, out=col_lse)
        col_buf[0].copy_(col_lse)
    return lse, col_lse, positives


def _mm_fp32(w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``w @ b`` accumulated and returned in fp32 (16-bit inputs: one cuBLAS call on a GPU)."""
    if w.dtype == torch.float32:
        return torch.mm(w, b)
    if w.is_cuda:
        return torch.mm(w, b, out_dtype=torch.float32)
    return torch.mm(w.float(), b.float())  # CPU (interpreter tests): products of 16-bit numbers are exact in fp32


def _grad_block_rows(n: int, cfg: dict, element_size: int) -> int:
    """Rows per block of the blocked backward: its softmax weights ([rows, n] in the inputs'
    dtype) within ``_BLOCKED_WEIGHT_BYTES``, or one tile of rows when even that is more."""
    return _block_rows(n, cfg["BLOCK_M"], n * element_size, _BLOCKED_WEIGHT_BYTES)


def _grad_blocked(a, b, scale, keys, lse_a, lse_b, rows: tuple, cols: tuple, coef, cfg: dict,
                  grad_a: torch.Tensor):
    """:func:`_triton_grad_rows` by the blocked strategy: per block of rows, the softmax weights in
    ``b``'s dtype (``_grad_weights_kernel``), then ``grad = coef * s * (W @ b)`` accumulated in fp32
    and rounded once into ``grad_a``'s dtype (the one-pass kernel's rounding of the weights and of
    the result; only the order of the fp32 additions differs).

    Rows ``r0..r1`` (``a``, its row 0 row ``r0``) against columns ``c0..c1`` (``b``, from ``c0``;
    ``group=``: a rank's rows against every column, or every row against its columns). A block
    holds as many rows as the weights buffer takes at the columns' width (more beside a rank's
    columns than beside all); its fp32 products are formed in chunks of the rows a block of full
    width holds."""
    n, dim = lse_a.shape[0], a.shape[1]
    (r_lo, r_hi), (c_lo, c_hi) = rows, cols
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    element = b.element_size()
    full_rows = _grad_block_rows(n, cfg, element)
    capacity = full_rows * n  # elements of the weights buffer
    # Never fewer than one tile of rows: bm * (c_hi - c_lo) <= bm * n <= capacity.
    block_rows = _block_rows(r_hi - r_lo, bm, (c_hi - c_lo) * element, capacity * element)
    blocks = [(r0, min(r_hi, r0 + block_rows)) for r0 in range(r_lo, r_hi, block_rows)]
    weights_buffer = torch.empty(capacity, dtype=b.dtype, device=a.device)
    col_tiles = triton.cdiv(c_hi - c_lo, bn)
    programs_of = [triton.cdiv(r1 - r0, bm) * col_tiles for r0, r1 in blocks]
    # Per-tile logit-scale partials of one block (reused), then one sum per block: O(B) in all.
    tile_part = torch.empty(max(programs_of), dtype=torch.float32, device=a.device)
    block_sums = torch.empty(len(blocks), dtype=torch.float32, device=a.device)
    factor = coef * scale
    # The diagonal entries inside both ranges: the positives whose weight takes the -2.
    diag_lo, diag_hi = max(r_lo, c_lo), min(r_hi, c_hi)
    for block, ((r0, r1), programs) in enumerate(zip(blocks, programs_of)):
        weights = weights_buffer[:(r1 - r0) * (c_hi - c_lo)].view(r1 - r0, c_hi - c_lo)
        for tiles_kind in _tile_launches(r0, r1, c_lo, c_hi, cfg):
            _grad_weights_kernel[(programs,)](
                a[r0 - r_lo:], b, keys if keys is not None else lse_a, scale, lse_a, lse_b, weights, tile_part,
                r0, r1, c_lo, c_hi, diag_lo, diag_hi, n, dim, a.stride(0), b.stride(0), weights.stride(0),
                HAS_KEYS=keys is not None, IEEE=a.dtype == torch.float32, TILES=tiles_kind,
                **_blocked_options(cfg))
        torch.sum(tile_part[:programs], dim=0, out=block_sums[block])
        for s0 in range(r0, r1, full_rows):
            s1 = min(r1, s0 + full_rows)
            grad_a[s0 - r_lo:s1 - r_lo] = _mm_fp32(weights[s0 - r0:s1 - r0], b).mul_(factor)
    # Fixed-order sums of per-program partials: deterministic, no float atomics.
    return grad_a, block_sums.sum() * coef[0]


def _triton_matmul_flops(batch: int, dim: int, dtype: torch.dtype, *, aligned: bool = True) -> int:
    """Matmul FLOPs the Triton forward + backward execute on a GPU (single device, ``B = batch``).

    Forward: one pass of ``2 B^2 D``. Backward, per direction: the similarities
    (``2 B^2 D``, once per D chunk) and the gradient dot (``2 B^2 D``). One chunk: ``10 B^2 D``.
    """
    chunks = _launch_config("grad", dtype, dim, aligned=aligned, interpreter=False)["d_chunks"]
    return 2 * batch * batch * dim * (1 + 2 * (chunks + 1))


def _aligned(dim: int, *tensors) -> bool:
    """What Triton specialises on: 16-byte aligned pointers and D, row strides multiples of 16."""
    return dim % 16 == 0 and all(t.stride(0) % 16 == 0 and t.data_ptr() % 16 == 0 for t in tensors)


def _fast_log(dtype: torch.dtype) -> bool:
    """Whether the forward kernels take the log-sum-exps' logs with MUFU.LG2 (``_log``): for
    16-bit inputs on an NVIDIA GPU. fp32 inputs keep the exact log, as their dots keep IEEE
    products; the interpreter cannot run libdevice's fast_logf, and ROCm's libdevice has none."""
    return (libdevice is not None and dtype in (torch.float16, torch.bfloat16)
            and torch.version.hip is None and not _dispatch.interpreter_enabled())


def _kernel_options(cfg: dict) -> dict:
    return {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_D", "ONE_DOT", "num_warps", "num_stages")}


def _lse_programs(device: torch.device, blocks: int) -> int:
    """Programs of the one-pass forward: one per SM (its tiles leave room for one block per SM);
    3 under the interpreter, so that tests see programs owning several row blocks."""
    if _dispatch.interpreter_enabled() or device.type != "cuda":
        return min(blocks, 3)
    return min(blocks, torch.cuda.get_device_properties(device).multi_processor_count)


def _lse_both_fake(u, t, scale, keys, lo, hi):
    rows = u.new_empty((hi - lo,), dtype=torch.float32)
    return rows, u.new_empty((t.shape[0],), dtype=torch.float32), torch.empty_like(rows)


@_library.launcher("infonce_lse_both", _lse_both_fake)
def _triton_lse_both(u: torch.Tensor, t: torch.Tensor, scale: torch.Tensor, keys: torch.Tensor | None, lo: int,
                     hi: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row log-sum-exps of rows ``lo..hi`` (``u``: those rows only), each column's log-sum-exp over
    those rows (the whole batch's when they are every row) and the rows' similarities ``u_i . t_i``,
    in one pass.

    Extra memory: the ``[programs, B]`` fp32 column partials (33 MiB at B = 65,536 on a
    132-SM H100), combined in column chunks so that no second buffer of that size appears.
    """
    n, dim = t.shape
    if lo == hi:  # a rank with no rows (group=): -inf columns, no kernel launch
        return (u.new_empty((0,), dtype=torch.float32), u.new_full((n,), float("-inf"), dtype=torch.float32),
                u.new_empty((0,), dtype=torch.float32))
    cfg = _launch_config("lse", u.dtype, dim, aligned=_aligned(dim, u, t), device=u.device)
    if _blocked(cfg):
        return _lse_blocked(u, t, scale, keys, lo, hi, cfg)
    programs = _lse_programs(u.device, triton.cdiv(hi, cfg["BLOCK_M"]) - lo // cfg["BLOCK_M"])
    col_part = torch.full((programs, n), float("-inf"), dtype=torch.float32, device=u.device)
    row_lse = torch.empty(hi - lo, dtype=torch.float32, device=u.device)
    positives = torch.empty(hi - lo, dtype=torch.float32, device=u.device)
    _lse_both_kernel[(programs,)](
        u, t, keys if keys is not None else row_lse, scale, row_lse, positives, col_part, lo, hi, n, dim,
        u.stride(0), t.stride(0), HAS_KEYS=keys is not None, IEEE=u.dtype == torch.float32,
        FAST_LOG=_fast_log(u.dtype), **_kernel_options(cfg))
    col_lse = torch.empty(n, dtype=torch.float32, device=u.device)
    step = 8192
    for start in range(0, n, step):
        torch.logsumexp(col_part[:, start:start + step], dim=0, out=col_lse[start:start + step])
    return row_lse, col_lse, positives


def _grad_rows_fake(a, b, scale, keys, lse_a, lse_b, r0, r1, c0, c1, coef, wide=False):
    grad = a.new_empty((r1 - r0, a.shape[1]), dtype=torch.float32 if wide else a.dtype)
    return grad, a.new_empty((), dtype=torch.float32)


@_library.launcher("infonce_grad_rows", _grad_rows_fake)
def _triton_grad_rows(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, keys: torch.Tensor | None,
                      lse_a: torch.Tensor, lse_b: torch.Tensor, r0: int, r1: int, c0: int, c1: int,
                      coef: torch.Tensor, wide: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient w.r.t. rows ``r0..r1`` through their logits against columns ``c0..c1`` (``a`` holds
    those rows only and ``b`` those columns; ``[r1 - r0, D]`` in ``a``'s dtype, or fp32 when
    ``wide``; the weights are :func:`_torch_grad_rows`'), and this pass's logit-scale gradient."""
    n, dim = lse_a.shape[0], a.shape[1]
    grad_a = torch.empty(r1 - r0, dim, dtype=torch.float32 if wide else a.dtype, device=a.device)
    if r0 == r1 or c0 == c1:
        return grad_a.zero_(), torch.zeros((), dtype=torch.float32, device=a.device)
    cfg = _launch_config("grad", a.dtype, dim, aligned=_aligned(dim, a, b, grad_a), device=a.device)
    if _blocked(cfg):
        return _grad_blocked(a, b, scale, keys, lse_a, lse_b, (r0, r1), (c0, c1), coef, cfg, grad_a)
    grid = (triton.cdiv(r1, cfg["BLOCK_M"]) - r0 // cfg["BLOCK_M"], cfg["d_chunks"])
    partial = torch.empty(grid[0] * grid[1], dtype=torch.float32, device=a.device)
    _grad_rows_kernel[grid](
        a, b, keys if keys is not None else lse_a, scale, coef, lse_a, lse_b, grad_a, partial,
        r0, r1, c0, c1, n, dim, a.stride(0), b.stride(0), grad_a.stride(0),
        HAS_KEYS=keys is not None, IEEE=a.dtype == torch.float32,
        **_kernel_options(cfg))
    # Fixed-order sum of per-program partials: deterministic, no float atomics.
    return grad_a, partial.sum()


def _triton_share(u, t, scale, keys, lo: int, hi: int, combine=None) -> tuple[torch.Tensor, tuple]:
    """The owned share (fp32) and what its backward needs (:func:`_triton_share_grads`): one
    device (``combine`` None, every row) or a rank of ``group=`` (:class:`_TorchLossShare`; ``u``
    holds the owned rows ``lo..hi`` only, ``t`` every row)."""
    if u.stride(1) != 1:
        u = u.contiguous()
    if t.stride(1) != 1:
        t = t.contiguous()
    keys32 = keys.to(torch.int32) if keys is not None else None
    scale32 = scale.detach().to(torch.float32).reshape(1)
    n = t.shape[0]
    row_lse, col_lse, positives = _triton_lse_both(u, t, scale32, keys32, lo, hi)
    if combine is not None:
        col_lse = combine(col_lse)  # every rank joins, a rank with no rows too
    share = _loss_share(row_lse, col_lse[lo:hi], scale32[0], positives, n)
    return share, (u, t, scale, keys32, row_lse, col_lse)


def _triton_share_grads(saved, grad_share, lo: int, hi: int, grouped: bool, needs=(True, True, True)):
    """Gradients of the owned share w.r.t. ``u``, ``t`` and the scale (:class:`_TorchLossShare`'s
    passes). One device: ``[n, D]`` each in the inputs' dtype. A rank of ``group=`` (``u`` its
    own rows): their ``u`` gradient (``[hi - lo, D]``, complete, in the inputs' dtype) and its part
    of every row's ``t`` gradient (``[n, D]`` fp32; :class:`_GroupShare` forms it a chunk of rows
    at a time instead, :func:`_triton_rank_grads`).

    ``needs`` (autograd's ``needs_input_grad`` for the three) skips a gradient kernel: the
    first pass (``u``'s rows) also gives the scale's gradient, so it runs when either is
    needed; the second (``t``'s rows) only for ``t``. A skipped gradient is None.
    """
    u_pass, t_part = _triton_rank_grads(saved, grad_share, lo, hi, grouped, needs)
    grad_u, grad_scale = u_pass()
    grad_t = t_part(0, saved[1].shape[0]) if needs[1] else None
    return grad_u, grad_t, grad_scale


def _triton_rank_grads(saved, grad_share, lo: int, hi: int, grouped: bool, needs: tuple):
    """:func:`_triton_share_grads`' two passes, to run in either order: ``u_pass()``, the first (the
    ``u`` and scale gradients, None where not wanted), and ``t_part(r0, r1)``, the second over the
    rows ``r0..r1`` only (``[r1 - r0, D]``; fp32 for a rank, whose parts are summed over ranks
    before they are rounded)."""
    u, t, scale, keys32, row_lse, col_lse = saved
    n = t.shape[0]
    scale32 = scale.detach().to(torch.float32).reshape(1)
    coef = (grad_share.to(torch.float32) / (2 * n)).reshape(1)
    row_ext = _owned_lse(row_lse, n, lo, hi) if grouped else row_lse
    # The kernels add the positives' terms; the first pass gives the logit-scale gradient of the
    # owned rows' logits (every weight of theirs and their positives): the whole one on one device.
    def u_pass() -> tuple:
        if not (needs[0] or needs[2]):
            return None, None
        grad_u, grad_scale = _triton_grad_rows(u, t, scale32, keys32, row_ext, col_lse, lo, hi, 0, n, coef)
        return (grad_u if needs[0] else None,
                grad_scale.to(scale.dtype).reshape(scale.shape) if needs[2] else None)

    def t_part(r0: int, r1: int) -> torch.Tensor:
        return _triton_grad_rows(t[r0:r1], u, scale32, keys32, col_lse, row_ext, r0, r1, lo, hi, coef, grouped)[0]

    return u_pass, t_part


class _TritonLossShare(torch.autograd.Function):
    """Triton version of :class:`_TorchLossShare` (same value, fp32 accumulation, any input float dtype)."""

    @staticmethod
    def forward(ctx, u, t, scale, keys, lo: int, hi: int, combine=None):
        ctx.lo, ctx.hi, ctx.grouped = lo, hi, combine is not None
        share, saved = _triton_share(u, t, scale, keys, lo, hi, combine)
        ctx.save_for_backward(*saved)
        return share

    @staticmethod
    @_library.kernel_backward(_SECOND_DERIVATIVE_ERROR)
    def backward(ctx, grad_share):
        grad_u, grad_t, grad_scale = _triton_share_grads(ctx.saved_tensors, grad_share, ctx.lo, ctx.hi, ctx.grouped,
                                                         needs=ctx.needs_input_grad[:3])
        if ctx.grouped and grad_t is not None:  # one process standing in for a rank (tests)
            grad_t = grad_t.to(ctx.saved_tensors[1].dtype)
        return grad_u, grad_t, grad_scale, None, None, None, None


class _GroupShare(torch.autograd.Function):
    """The owned share of the global loss from this rank's rows (``group=``), on either backend
    (``passes``: :data:`_TORCH_PASSES` or :data:`_TRITON_PASSES`).

    The text rows go round the ranks' ring (:func:`_ring_all_gather`); the image rows stay this
    rank's (each rank forms only its own rows' logits). The forward takes its rows' logits against
    each rank's text rows as they arrive, its own first, while the next rows are in flight: per
    chunk of columns, its rows' log-sum-exps over those columns and each column's over its rows,
    folded afterwards in rank order (the same order whatever the arrival), so no rank waits for a
    whole gather before its first kernel. The backward's first pass gives this rank's own rows'
    ``u`` gradient whole (no reduction). Its part of every text row's gradient (every row against
    its columns) is formed a chunk of rows at a time, each rank's rows reduced to it while the
    next chunk is formed (:func:`_reduce_to_owners`): the parts are summed in fp32 (fp64 for fp64
    inputs) and a 16-bit gradient is rounded once, after the sum over ranks, as one process's is
    (autograd would round a gathered 16-bit input's gradient before the reduction). ``combine``
    folds the column partials across the ranks (:func:`_column_lse_across_ranks` over ``group``).
    """

    @staticmethod
    def forward(ctx, u_local, t_local, scale, keys, group, sizes: tuple, rank: int, combine, passes):
        ctx.group, ctx.sizes, ctx.rank, ctx.passes, ctx.dtype = group, sizes, rank, passes, t_local.dtype
        starts = _starts(sizes)
        lo, hi, n = starts[rank], starts[rank + 1], starts[-1]
        ctx.lo, ctx.hi = lo, hi
        # Contiguous, as the gathered rows are: the checks (_triton_check) saw the gathered batch's
        # strides, on every rank alike.
        u = u_local.contiguous()
        kernel_scale, kernel_keys = passes.prepare(scale, keys)
        row_parts, col_parts, positives = {}, {}, []

        def take(owner: int, t_rows: torch.Tensor) -> None:
            row_parts[owner], col_parts[owner], own = passes.chunk(u, t_rows, kernel_scale, kernel_keys, lo,
                                                                   starts[owner])
            if owner == rank:
                positives.append(own)

        t = _ring_all_gather(t_local.contiguous(), group, sizes, rank, take)
        owners = sorted(row_parts)  # rank order: every rank folds alike, whatever came first
        row_lse = torch.logsumexp(torch.stack([row_parts[o] for o in owners]), dim=0)
        col_lse = combine(torch.cat([col_parts[o] for o in owners]))  # every rank joins, one with no rows too
        own = positives[0] if positives else row_lse.new_empty((0,))  # a rank with no rows takes no chunk of its own
        share = _loss_share(row_lse, col_lse[lo:hi], kernel_scale.reshape(()), own, n)
        ctx.save_for_backward(u, t, scale, kernel_keys, row_lse, col_lse)
        return share

    @staticmethod
    @_library.kernel_backward(_SECOND_DERIVATIVE_ERROR)
    def backward(ctx, grad_share):
        needs = ctx.needs_input_grad[:3]
        u_pass, t_part = ctx.passes.grads(ctx.saved_tensors, grad_share, ctx.lo, ctx.hi, needs)
        # Only the text rows are reduced, and only when they need a gradient: every rank has
        # agreed on which (the shape exchange), where the logit scale's need may differ from rank
        # to rank. (A rank with no rows forms zeros, and joins the reductions too.) Their pass
        # runs first, so that the image rows' pass overlaps the last chunk's reductions.
        if needs[1]:
            grad_t, (grad_u, grad_scale) = _reduce_to_owners(t_part, ctx.group, ctx.sizes, ctx.rank, meanwhile=u_pass)
            grad_t = grad_t.to(ctx.dtype)
        else:
            grad_t, (grad_u, grad_scale) = None, u_pass()
        return grad_u, grad_t, grad_scale, None, None, None, None, None, None


class _Passes(typing.NamedTuple):
    """A backend's parts of :class:`_GroupShare`: ``prepare(scale, keys)`` gives the multiplier and
    keys its kernels take; ``chunk(u, t_rows, scale, keys, lo, c0)`` the row log-sum-exps of the rows
    ``lo..`` (``u``) over the columns ``c0..`` (``t_rows``), each of those columns' over the rows, and
    the rows' positives' products where the columns hold every row's own (None otherwise);
    ``grads(saved, grad_share, lo, hi, needs)`` the two passes of its backward, ``u_pass()`` (the
    ``u`` and scale gradients) and ``t_part(r0, r1)``."""
    prepare: typing.Callable
    chunk: typing.Callable
    grads: typing.Callable


_TORCH_PASSES = _Passes(
    prepare=lambda scale, keys: (scale, keys),
    chunk=lambda u, t_rows, scale, keys, lo, c0: _torch_lse_both(u, t_rows, scale, keys, _TORCH_BLOCK_ROWS, lo, c0),
    grads=lambda saved, grad_share, lo, hi, needs: _torch_rank_grads(saved, grad_share, lo, hi, _TORCH_BLOCK_ROWS,
                                                                     needs))
_TRITON_PASSES = _Passes(
    prepare=lambda scale, keys: (scale.detach().to(torch.float32).reshape(1),
                                 keys.to(torch.int32) if keys is not None else None),
    chunk=lambda u, t_rows, scale, keys, lo, c0: _triton_lse_cols(u, t_rows, scale, keys, lo, c0),
    grads=lambda saved, grad_share, lo, hi, needs: _triton_rank_grads(saved, grad_share, lo, hi, True, needs))


def _triton_lse_cols(u, t_rows, scale32, keys32, lo: int, c0: int):
    """:func:`_triton_lse_both` over a chunk of the columns: the row log-sum-exps of the rows ``lo..``
    (``u``) over the columns ``c0..`` (``t_rows``), each of those columns' over the rows, and the rows'
    products ``u_i . t_i`` where the columns hold every row's own (``c0 <= lo`` and ``hi <= c1``, as
    :func:`_torch_lse_both`; None otherwise). The kernels number rows and columns from the columns'
    first, and rows may not come before it: a block of rows at or after its columns is passed as it is
    (row offset ``lo - c0``, the keys from ``c0`` on), and one before them the other way round (the
    columns as rows from ``c0 - lo``, the keys from ``lo`` on; a logit is the same either way), its two
    kinds of log-sum-exps swapped back."""
    hi, c1 = lo + u.shape[0], c0 + t_rows.shape[0]
    if lo == hi:  # a rank with no rows: -inf columns, no kernel launch
        none = u.new_empty((0,), dtype=torch.float32)
        return none, u.new_full((c1 - c0,), float("-inf"), dtype=torch.float32), none if c0 <= lo <= c1 else None
    if lo >= c0:
        row_lse, col_lse, positives = _triton_lse_both(u, t_rows, scale32, None if keys32 is None else keys32[c0:],
                                                       lo - c0, hi - c0)
        return row_lse, col_lse, positives if hi <= c1 else None
    col_lse, row_lse, _ = _triton_lse_both(t_rows, u, scale32, None if keys32 is None else keys32[lo:],
                                           c0 - lo, c1 - lo)
    return row_lse, col_lse, None


def _triton_check(u, t):
    reasons = []
    if u.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        reasons.append(f"the Triton kernels take fp16/bf16/fp32 embeddings, got {str(u.dtype).replace('torch.', '')}")
    if u.shape[1] > 1024:
        reasons.append(f"the Triton kernels take D <= 1024, got D={u.shape[1]}")
    reasons += _dispatch.interpreter_bf16_reasons(u.dtype)  # (the hypergraph kernels load bf16 as fp32)
    if u.shape[0] >= 2**30:
        # int32 keys, and int32 row/column counters: tl.cdiv(row_hi, BLOCK_M) and the column loops'
        # c0 + BLOCK_N wrap within a tile of 2^31. The bound is new for a width of 1 only: from
        # D = 2 on, the row-stride check below refused such batches already.
        reasons.append("the Triton kernels count rows in int32 (tile loops, block counts): B must be < 2^30")
    elif u.shape[0] > 1 and u.shape[0] * max(u.stride(0), t.stride(0), u.shape[1]) >= 2**31:
        # Row offsets are int64, but column tiles are offset in int32 (registers are tight). One row
        # is only ever read at offset 0: its stride never enters an offset (as _library.int32_safe).
        reasons.append("the Triton kernels offset column tiles in int32: B * row stride must be < 2^31")
    if not reasons:
        reasons += _shared_memory_reasons(u, t)
    return reasons


def _shared_need(kernel: str, dtype: torch.dtype, dim: int, config: dict, *, aligned: bool) -> int | None:
    """Shared memory per block (bytes, sm_90a) of ``kernel``'s launch ``config`` on ``dtype``
    embeddings of width ``dim`` (:data:`_GPU_SHARED_BYTES`); None for a configuration not declared."""
    key = _config_key(dtype, dim, aligned=aligned, interpreter=False)
    number = _tuning.declared_number("contrastive", kernel, key, config)
    return None if number is None else _GPU_SHARED_BYTES[(kernel, key)][number]


def _shared_memory_reasons(u, t) -> list[str]:
    """Why the forward's or the backward's launches of a call on CUDA embeddings ``u``, ``t``
    need more shared memory per block than their GPU gives (empty elsewhere)."""
    limit = _dispatch.shared_memory_limit(u.device)
    if limit is None or limit >= _GPU_SHARED_MOST:  # (an H100/H200 fits every configuration: no per-call cost)
        return []
    dim = u.shape[1]
    # As _aligned at the launches (the pointers aside: a misaligned one takes the unaligned path,
    # which needs less): rows that are not contiguous are copied first, with D as their stride. A branch:
    # under torch.compile(dynamic=True) a symbolic D makes `dim % 16 == 0` a SymBool, which keys no table,
    # and Dynamo's bool() keeps it one (make_fx's guards); a branch guards in both.
    aligned = all(x.stride(1) != 1 or x.stride(0) % 16 == 0 for x in (u, t)) if dim % 16 == 0 else False
    reasons = []
    for kernel in ("lse", "grad"):
        config = _launch_config(kernel, u.dtype, dim, aligned=aligned, device=u.device)
        need = _shared_need(kernel, u.dtype, dim, config, aligned=aligned)
        what = "the forward" if kernel == "lse" else "the backward"
        reasons += _dispatch.shared_memory_reasons(u.device, need, f"{what}'s launch configuration ({dim=}, "
                                                   f"{str(u.dtype).replace('torch.', '')})")
    return reasons


# Registered whether or not Triton imports: without it the dispatcher refuses the backend
# before this runs, saying why (the import error), as for the other ops.
@_dispatch.register(OP_NAME, "triton", check=_triton_check)
def _lse_share_triton(u, t, scale, keys, lo: int, hi: int, combine=None):
    return _TritonLossShare.apply(u, t, scale, keys, lo, hi, combine)


# ---------------------------------------------------------------------------
# distributed helpers
# ---------------------------------------------------------------------------

def _reduce_to_owners(part, group, sizes: tuple, rank: int, meanwhile=None) -> tuple:
    """This rank's rows of a gradient whose parts every rank holds, summed over ranks: ``part(r0, r1)``
    gives this rank's part of the rows ``r0..r1`` (``[r1 - r0, ...]``, in the dtype to sum in).

    It is called for :data:`_REDUCE_CHUNK_ROWS` rows at a time (fewer in the last chunk), in order,
    every rank alike; each rank's rows of a chunk are reduced to that rank while the next chunk is
    formed (on a GPU its kernels overlap the reductions), and copied into its sum once they
    arrive. So two chunks' parts and this rank's sum are held at once at most, not every row's
    parts (a reduce-scatter's input, padded to the largest local batch where they differ); the
    order of the sums is fixed for a fixed world size (deterministic). ``meanwhile()`` runs while
    the last chunk's reductions are in flight. Returns this rank's rows in the parts' dtype (the
    caller rounds once, after the sum) and what ``meanwhile`` returned (None without it)."""
    import torch.distributed as dist

    reduce = _collective("reduce")
    starts = _starts(sizes)
    lo = starts[rank]
    mine = None
    pending = []  # (work, piece, where the piece goes in this rank's sum; None for another rank's)
    for c0 in range(0, starts[-1], _REDUCE_CHUNK_ROWS):
        c1 = min(c0 + _REDUCE_CHUNK_ROWS, starts[-1])
        chunk = part(c0, c1).contiguous()
        if mine is None:
            mine = chunk.new_empty((sizes[rank],) + tuple(chunk.shape[1:]))
        _take_reduced(pending, mine)
        pending = []
        for owner in range(len(sizes)):
            p0, p1 = max(c0, starts[owner]), min(c1, starts[owner + 1])
            if p0 < p1:
                piece = chunk[p0 - c0:p1 - c0]
                work = reduce(piece, op=dist.ReduceOp.SUM, group=group, async_op=True, group_dst=owner)
                pending.append((work, piece, p0 - lo if owner == rank else None))
    during = meanwhile() if meanwhile is not None else None
    if mine is None:  # no rows on any rank
        return part(0, 0), during
    _take_reduced(pending, mine)
    return mine, during


def _take_reduced(pending: list, mine: torch.Tensor) -> None:
    """Wait for :func:`_reduce_to_owners`' reductions in flight, copying this rank's into its sum."""
    for work, piece, at in pending:
        work.wait()
        if at is not None:
            mine[at:at + piece.shape[0]].copy_(piece)


def _starts(sizes: tuple) -> list:
    """Each rank's first row in the global batch, and the batch's size last: ``[0, n_0, n_0 + n_1, ..., B]``."""
    starts = [0]
    for size in sizes:
        starts.append(starts[-1] + size)
    return starts


def _ring_all_gather(local: torch.Tensor, group, sizes: tuple, rank: int, take) -> torch.Tensor:
    """Every rank's rows in rank order, ``[sum(sizes), ...]``, passed round the ranks' ring: at each of
    ``W - 1`` steps a rank sends the rows it got last to the next rank and receives the previous
    rank's (one point-to-point exchange each way, ``batch_isend_irecv``), so rank ``r`` receives the
    others' ``B - n_r`` rows and sends ``B - n_{r+1}`` (every rank's but the next one's, which that
    one holds already). ``take(owner, rows)`` is called on each non-empty rank's rows (a view of the
    result), this rank's first and then each rank's before it in the ring, each while the next
    exchange is in flight (on a GPU its kernels overlap the transfer), and never on rows still in
    flight. Ranks without rows send and receive nothing of their own, and pass the others' on; rows
    are never padded."""
    import torch.distributed as dist

    starts = _starts(sizes)
    gathered = local.new_empty((starts[-1],) + tuple(local.shape[1:]))

    def rows(owner: int) -> torch.Tensor:
        return gathered[starts[owner]:starts[owner + 1]]

    rows(rank).copy_(local)
    world = len(sizes)
    exchange = _collective("batch_isend_irecv")
    held = rank
    for step in range(1, world):
        incoming = (rank - step) % world
        ops = []
        if sizes[held]:
            ops.append(dist.P2POp(dist.isend, rows(held), group=group, group_peer=(rank + 1) % world))
        if sizes[incoming]:
            ops.append(dist.P2POp(dist.irecv, rows(incoming), group=group, group_peer=(rank - 1) % world))
        works = exchange(ops) if ops else []
        if sizes[held]:
            take(held, rows(held))
        for work in works:
            work.wait()
        held = incoming
    if sizes[held]:
        take(held, rows(held))
    return gathered


def _all_gather_padded(local: torch.Tensor, group, sizes: tuple) -> torch.Tensor:
    """Every rank's rows in rank order, ``[sum(sizes), ...]``. A rank short of the largest local batch pads
    with zero rows for the collective, which writes into one buffer: that buffer is the result when no rank
    is short, else the real rows are copied out of it."""
    biggest, row = max(sizes), tuple(local.shape[1:])
    if biggest == 0:  # every rank has the same sizes: none enters the collective
        return local.new_empty((0,) + row)
    if local.shape[0] < biggest:
        local = torch.cat([local, local.new_zeros((biggest - local.shape[0],) + row)])
    gathered = local.new_empty((len(sizes) * biggest,) + row)
    _collective("all_gather_single")(gathered, local, group=group)
    if min(sizes) == biggest:
        return gathered
    return torch.cat([piece[:size] for piece, size in zip(gathered.split(biggest), sizes)])


def _collective(name: str):
    """A torch.distributed collective by name (one place, which the tests count through): the
    single-buffer all-gather (``all_gather_single`` from torch 2.14, which deprecates the older
    ``all_gather_into_tensor`` that torch 2.11 has), ``reduce`` or ``batch_isend_irecv``."""
    import torch.distributed as dist

    older = {"all_gather_single": "all_gather_into_tensor"}
    return getattr(dist, name, None) or getattr(dist, older[name])


class _SumAcrossRanks(torch.autograd.Function):
    """Value: the sum of every rank's share. Gradient: identity (each rank backpropagates its own share)."""

    @staticmethod
    def forward(ctx, share, group):
        import torch.distributed as dist

        total = share.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total

    @staticmethod
    @_library.autocast_off_backward
    def backward(ctx, grad_total):
        return grad_total, None


_DTYPE_CODES = {dtype: code for code, dtype in enumerate(_LABEL_DTYPES)}


def _exchange_shapes(image_emb, text_emb, logit_scale, labels, group, local_error: Exception | None = None,
                     backend: str | None = None):
    """Local batch sizes of every rank, after checking that the ranks agree on everything else.

    One small all-gather whose result is read on the host (a synchronisation).
    Every rank sees the same table, so a mismatch raises the same error on
    every rank instead of hanging in a later collective. ``local_error`` is this
    rank's own error (bad arguments, or a backend it cannot run): it travels as a
    flag, so that such a rank raises its error and every other rank raises one
    naming it, instead of waiting in the next collective until the timeout.
    ``backend`` is the one this rank resolved (without an error). ``logit_scale`` travels as the
    bits of its float64 value (a copy on its device when it is a tensor, no extra synchronisation),
    so ranks whose scales differ raise instead of computing different losses.
    """
    import torch.distributed as dist

    world = dist.get_world_size(group)
    if local_error is None:
        has_labels = labels is not None
        label_width = math.prod(labels.shape[1:]) if has_labels else -1
        # Whether the text rows get a gradient decides whether the backward runs their
        # reductions: ranks that differ would pair different collectives. (The image rows'
        # need runs none, on either backend; ranks that differ there are told so all the same,
        # as a configuration that differs.)
        grads = [int(torch.is_grad_enabled() and t.requires_grad) for t in (image_emb, text_emb)]
        # So does the backend: torch gathers copies in its compute dtype, Triton the rows as they
        # are (both reduce the text rows' gradients only: each rank's image rows' gradient is
        # whole where it is computed).
        row = [image_emb.shape[0], image_emb.shape[1], int(has_labels), label_width,
               _DTYPE_CODES[image_emb.dtype], _DTYPE_CODES[labels.dtype] if has_labels else -1, *grads,
               _dispatch.BACKENDS.index(backend), 0]
        if not isinstance(logit_scale, torch.Tensor):
            row.append(struct.unpack("<q", struct.pack("<d", float(logit_scale)))[0])
    else:
        row = [-1] * 9 + [1, 0]
    row = torch.tensor(row, dtype=torch.int64, device=_exchange_device(image_emb, group))
    if local_error is None and isinstance(logit_scale, torch.Tensor):
        scale_bits = logit_scale.detach().reshape(1).to(device=row.device, dtype=torch.float64).view(torch.int64)
        row = torch.cat([row, scale_bits])
    table = [torch.empty_like(row) for _ in range(world)]
    dist.all_gather(table, row, group=group)
    table = [r.tolist() for r in table]
    bad = [rank for rank, r in enumerate(table) if r[9]]
    if local_error is not None:
        raise local_error
    if bad:
        raise ValueError(f"label_guided_infonce with group=: rank(s) {bad} of ranks 0..{world - 1} passed invalid "
                         "arguments or asked for a backend they cannot run (their own errors say which); no rank "
                         "computed the loss")
    names = ("batch", "embedding dim", "labels given", "label width", "embedding dtype", "label dtype",
             "requires_grad of image_emb (with grad mode on)", "requires_grad of text_emb (with grad mode on)")
    for column in range(1, len(names)):
        values = [r[column] for r in table]
        if len(set(values)) > 1:
            shown = values
            if column == 4:
                shown = [str(_LABEL_DTYPES[v]).replace("torch.", "") for v in values]
            elif column == 5:
                shown = [str(_LABEL_DTYPES[v]).replace("torch.", "") if v >= 0 else None for v in values]
            hint = (" (a rank with an empty batch must pass [0, D] embeddings that require grad when the "
                    "others' do, e.g. torch.zeros(0, D, requires_grad=True))" if column >= 6 else "")
            raise ValueError(
                f"label_guided_infonce with group=: every rank must pass the same {names[column]}; "
                f"got {shown} on ranks 0..{world - 1}{hint}")
    scales = [struct.unpack("<d", struct.pack("<q", r[10]))[0] for r in table]
    if any(not (value == scales[0] or (math.isnan(value) and math.isnan(scales[0]))) for value in scales):
        raise ValueError(f"label_guided_infonce with group=: every rank must pass the same logit_scale (each rank's "
                         f"loss would use its own); got {scales} on ranks 0..{world - 1}")
    # Checked last: ranks that differ in the above may resolve backend="auto" differently for it.
    backends = [_dispatch.BACKENDS[r[8]] for r in table]
    if len(set(backends)) > 1:
        agreed = " or ".join(f"backend={name!r}" for name in sorted(set(backends)))
        raise ValueError(
            f"label_guided_infonce with group=: every rank must run the same backend (the backends run "
            f"different collectives); got {backends} on ranks 0..{world - 1} (each rank's backend=; under "
            f"backend='auto', {_dispatch._ENV_VAR} or else what that rank can run). Pass the same backend= "
            f"explicitly on every rank ({agreed}): a rank that cannot run it then says why")
    return tuple(r[0] for r in table)


def _exchange_device(image_emb, group) -> torch.device:
    """Where the shape exchange's tensor lives: the embeddings' device, or (when they are not a
    tensor at all) the one the group's backend carries: CUDA for NCCL, else the CPU."""
    if isinstance(image_emb, torch.Tensor):
        return image_emb.device
    import torch.distributed as dist

    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather_labels(labels, group, sizes):
    # A common wire type that gloo and NCCL both carry and that keeps every value exact. The
    # width is explicit: reshape(0, -1) (a rank with no rows, or [B, 0] labels) is ambiguous.
    rows = labels.reshape(labels.shape[0], math.prod(labels.shape[1:]))
    if labels.dtype.is_floating_point:
        wire = rows.to(torch.float64)
    else:
        wire = rows.to(torch.int64)
    return _all_gather_padded(wire.contiguous(), group, sizes)


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------

def _validate(image_emb, text_emb, logit_scale, labels, *, distributed: bool = False):
    """Local checks. ``distributed``: leave the emptiness of ``[B, D]`` to :func:`_check_global_batch`,
    after the shape exchange (a rank with ``B = 0`` is valid there, and a rank raising alone
    before the exchange would leave the others waiting in it)."""
    check_tensor("image_emb", image_emb, ndim=2)
    device = image_emb.device
    check_tensor("text_emb", text_emb, ndim=2, device=device)
    if text_emb.dtype != image_emb.dtype:
        raise ValueError(f"argument 'text_emb': expected dtype {str(image_emb.dtype).replace('torch.', '')} (the "
                         f"dtype of 'image_emb'), got {str(text_emb.dtype).replace('torch.', '')}")
    if tuple(text_emb.shape) != tuple(image_emb.shape):
        raise ValueError(
            f"argument 'text_emb': expected shape {list(image_emb.shape)} (the shape of 'image_emb'), "
            f"got {list(text_emb.shape)}")
    batch, dim = image_emb.shape
    if not distributed and (batch < 1 or dim < 1):
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
    elif isinstance(logit_scale, bool) or not isinstance(logit_scale, numbers.Real):
        # numbers.Real: Python and NumPy numbers alike (as LabelGuidedInfoNCE takes them).
        raise ValueError("argument 'logit_scale': expected a float or a scalar tensor, got "
                         f"{type(logit_scale).__name__}")
    else:
        try:
            float(logit_scale)
        except OverflowError:
            raise ValueError(f"argument 'logit_scale': expected a number a float can hold, got an integer of "
                             f"{int(logit_scale).bit_length()} bits") from None


def _check_global_batch(dim: int, sizes: tuple) -> None:
    """The ``group=`` counterpart of the local emptiness check, on the exchanged table: every
    rank sees the same ``dim`` and ``sizes``, so every rank raises the same error."""
    if sum(sizes) == 0:
        raise ValueError(
            f"label_guided_infonce with group=: the global batch is empty (local batch sizes "
            f"{list(sizes)} on ranks 0..{len(sizes) - 1}); at least one rank must hold rows")
    if dim < 1:
        raise ValueError(f"argument 'image_emb': expected a non-empty [B, D] tensor, got D = {dim} on every rank "
                         f"of group=")


def _check_group(group) -> None:
    """``group``: None or a torch.distributed ProcessGroup."""
    if group is None:
        return
    import torch.distributed as dist

    if dist.is_available() and isinstance(group, int) and group == dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError("argument 'group': this rank is not a member of the group (dist.new_group returns "
                         "GroupMember.NON_GROUP_MEMBER on the ranks it leaves out); call with group= only on "
                         "the group's ranks")
    if not (dist.is_available() and isinstance(group, dist.ProcessGroup)):
        raise ValueError(f"argument 'group': expected a torch.distributed ProcessGroup (e.g. "
                         f"dist.group.WORLD) or None, got {type(group).__name__}")


def label_guided_infonce(image_emb, text_emb, logit_scale, labels=None, *, group=None, backend="auto"):
    """Label-guided InfoNCE loss (spec section 5) without ever forming the ``B x B`` logits.

    Parameters
    ----------
    image_emb, text_emb : torch.Tensor
        ``[B, D]`` embeddings (normally L2-normalised; not checked), same
        dtype (fp16, bf16, fp32 or fp64) and device. ``B >= 1`` and ``D >= 1``;
        with ``group`` a rank may hold ``B = 0`` (see Notes) as long as the
        global batch is not empty (a ``ValueError`` on every rank otherwise).
    logit_scale : torch.Tensor or float
        The logit multiplier itself (not its log), a one-element tensor (may
        require grad; its gradient keeps its dtype and shape) or a number.
    labels : torch.Tensor, optional
        ``[B, L]`` (or ``[B]``) labels of dtype bool, uint8, int8, int16, int32,
        int64, float16, bfloat16, float32 or float64 (torch's uint16/32/64 are
        refused). Rows are compared as whole vectors; an off-diagonal pair with
        equal rows is not a negative. ``None`` gives the plain CLIP loss.
    group : torch.distributed.ProcessGroup, optional
        Compute the loss of the global batch (every rank's rows, concatenated
        in rank order) instead of the local one. Ranks may hold different
        local batch sizes; ``D``, label width and dtypes must agree (a
        ``ValueError`` naming the per-rank values otherwise, raised on every
        rank). A rank whose arguments are invalid, or which asks for a backend
        it cannot run, raises its own error and every other rank one naming it,
        before any collective of the loss. Every rank must run the same
        backend (as named or as ``auto`` resolves it there, which may differ
        from rank to rank): a ``ValueError`` naming each rank's otherwise, on
        every rank. ``logit_scale`` must have the same value on every rank
        (compared exactly, NaN equal to NaN: a ``ValueError`` naming each
        rank's otherwise, on every rank). The text embeddings go round the
        ranks' ring by point-to-point exchanges (``batch_isend_irecv``): with
        NCCL, each rank must have made its GPU the current device
        (``torch.cuda.set_device``) before the call, as torch requires for
        those exchanges (a hang otherwise).
    backend : {"auto", "triton", "torch"}
        ``auto`` takes Triton where it can run the call (on a GPU: fp16/bf16/fp32
        embeddings with D <= 1024) and torch otherwise (fp64, wider D, the CPU);
        ``ACE_KERNELS_BACKEND`` replaces ``auto`` (see :mod:`ace_kernels._dispatch`).

    Returns
    -------
    torch.Tensor
        The scalar loss, fp64 for fp64 embeddings and fp32 otherwise.

    Notes
    -----
    Distributed convention: every rank returns the *global* loss value, and
    every rank backpropagates the same multiple of it (``loss.backward()``, or
    ``(k * loss).backward()`` with one ``k`` on all ranks). Backward on a rank
    then gives its local ``image_emb``/``text_emb`` exactly that multiple of the
    gradient of the global loss, and its ``logit_scale`` this rank's share of
    that gradient (the part through its rows' logits). Hence **summing** every
    parameter gradient over ranks (``all_reduce(SUM)``) gives exactly the
    single-process gradient of the concatenated batch, for encoder parameters
    and ``logit_scale`` alike. DDP *averages* gradients: under DDP multiply the
    loss by the world size before ``backward()`` (or all-reduce
    ``logit_scale.grad`` and the other parameters with SUM yourself). Every
    rank must run the backward. (Ranks that weight the loss differently get
    a mix: each rank's weight applies to the gradients through its own rows'
    logits.)

    A rank whose local batch is empty (``B = 0``, e.g. the last batch of a
    sampler split over ranks) contributes no rows and owns no share: it still
    returns the global loss, its embeddings get ``[0, D]`` gradients and its
    ``logit_scale`` gradient is 0, so the SUM above is unchanged. It must still
    call the function and run the backward (both hold collectives).

    Host synchronisation: none on one device (label keys come from sorts of
    fixed shape, not ``torch.unique``); with ``group`` one small shape
    all-gather is read on the host.

    Autocast is ignored, in the forward and the backward: the loss reads the
    embeddings in their own dtype and accumulates in fp32 (fp64 for fp64 inputs
    on the torch backend).

    Non-finite inputs never raise or hang: NaN or +-inf in the embeddings or
    ``logit_scale`` give a NaN (or inf) loss and NaN gradients (with ``group``,
    a scale that is NaN on some ranks only differs, see above). Labels are
    compared exactly (a NaN label row equals no other row).
    """
    _check_group(group)
    # Dynamo's tracing only: non-strict torch.export sets is_compiling() but runs this Python as it is, where
    # the disabled _eager_across_ranks would come back here while the flag stays set (a RecursionError).
    if group is not None and torch.compiler.is_dynamo_compiling():
        return _eager_across_ranks(image_emb, text_emb, logit_scale, labels, group=group, backend=backend)
    if _library.builds_graph((image_emb, text_emb, logit_scale)):
        # Both backends save the embeddings and the multiplier whichever of them trains: those made
        # under torch.inference_mode (a locked tower's cached outputs) are copied out of it.
        image_emb, text_emb, logit_scale = map(_library.out_of_inference, (image_emb, text_emb, logit_scale))
    local_impl = None  # with group=: the backend this rank resolved before the shape exchange
    if group is None:
        _validate(image_emb, text_emb, logit_scale, labels)
    else:
        try:
            _validate(image_emb, text_emb, logit_scale, labels, distributed=True)
            # A backend this rank cannot run (asked for explicitly) fails here, before the
            # collectives, and travels in the exchange like an argument error. Checked on one
            # row of the embeddings' width and dtype: what depends on the rows (their number,
            # a local view's strides) is checked below, on the gathered batch, which has the
            # same sizes on every rank, so every rank decides alike there.
            row = image_emb.new_empty(()).expand(1, image_emb.shape[1])
            local_impl = _dispatch.select(OP_NAME, backend, [image_emb, text_emb, labels, logit_scale],
                                          args=(row, row), kwargs={})
            local_error = None
        except (ValueError, RuntimeError) as exc:
            local_impl, local_error = None, exc
        # Raises on every rank if any failed, or if the ranks resolved different backends.
        sizes = _exchange_shapes(image_emb, text_emb, logit_scale, labels, group, local_error,
                                 backend=None if local_impl is None else _dispatch.backend_of(OP_NAME, local_impl))
    compute = _compute_dtype(image_emb.dtype)
    if isinstance(logit_scale, torch.Tensor):
        scale = logit_scale.reshape(()).to(compute)
    else:
        # torch.full, not torch.tensor: no copy from the host, so no synchronisation on a GPU.
        scale = torch.full((), float(logit_scale), dtype=compute, device=image_emb.device)

    if group is None:
        rank, sizes = 0, (image_emb.shape[0],)
        u_all, t_all = image_emb, text_emb
        keys = _label_keys(labels)
    else:
        import torch.distributed as dist

        rank = dist.get_rank(group)
        _check_global_batch(image_emb.shape[1], sizes)
        # What the backends' checks see: the global batch's shape and dtype, no row stride over D (the
        # text rows are gathered into one buffer, the rank's own image rows made contiguous).
        u_all = image_emb.new_empty(()).expand(sum(sizes), image_emb.shape[1])
        t_all = u_all
        keys = _label_keys(_gather_labels(labels, group, sizes)) if labels is not None else None

    if local_impl is _lse_share_torch:
        # What every rank resolved (the exchange checked), and torch takes any batch.
        impl = local_impl
    else:
        # The gathered batch may rule out the backend the ranks agreed on, for the same reasons
        # on every rank: "auto" then falls back to torch on all of them, an explicit one raises.
        impl = _dispatch.select(OP_NAME, backend, [image_emb, text_emb, labels, scale],
                                args=(u_all, t_all), kwargs={})
    lo = sum(sizes[:rank])
    hi = lo + sizes[rank]
    combine = None if group is None else functools.partial(_column_lse_across_ranks, group=group)
    # The loss ignores autocast (as the Triton kernels always do): the torch backend's logit
    # matmuls would otherwise drop to the autocast dtype.
    with _library.autocast_off(image_emb.device.type):
        u_in, t_in = image_emb, text_emb
        if impl is _lse_share_torch:
            # The torch backend works in the compute dtype (with group=, gathered in it too, so
            # that the text rows' gradients are summed over ranks before they are rounded to 16 bits).
            u_in, t_in = image_emb.to(compute), text_emb.to(compute)
        if group is None:
            share = impl(u_in, t_in, scale, keys, lo, hi)
        else:
            # Triton loads the inputs as they are. The image rows stay this rank's (the share's
            # backward gives them their gradient whole); the text rows are gathered, and their
            # gradients' parts summed over ranks before they are rounded.
            passes = _TORCH_PASSES if impl is _lse_share_torch else _TRITON_PASSES
            share = _GroupShare.apply(u_in, t_in, scale, keys, group, sizes, rank, combine, passes)
    if group is None:
        return share
    return _SumAcrossRanks.apply(share, group)


# torch._disable_dynamo: torch.compiler.disable, importing dynamo at the first call (see hypergraph.py).
@torch._disable_dynamo
def _eager_across_ranks(image_emb, text_emb, logit_scale, labels, *, group, backend):
    # The loss with group= always runs eagerly, under torch.compile too (a graph break; fullgraph=True
    # is refused): its shape exchange is read on the host, and torch 2.11's dynamo traced the
    # collectives' autograd functions (around a pybind11 options object it cannot trace) into
    # gradients of zero for the embeddings and the scale, with the loss right.
    return label_guided_infonce(image_emb, text_emb, logit_scale, labels, group=group, backend=backend)


class _GroupNotSaved:
    """What a pickled :class:`LabelGuidedInfoNCE` holds in place of its process group, which cannot
    be pickled (a communicator of the process that made it): the number of its ranks, for the error."""

    def __init__(self, ranks: int):
        self.ranks = ranks


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
        See :func:`label_guided_infonce`. ``copy.deepcopy`` and ``copy.copy`` of
        the module share the group. Pickled (``torch.save`` of the module or of
        a model holding it), the module is saved without it (a process group
        cannot be pickled); the loaded one raises a ``ValueError`` at its first
        call until its ``group`` attribute is set again (to this process's group,
        or None for the loss of the local batch), never computing the local loss
        in place of the global one. ``dist.group.WORLD`` is None until
        ``init_process_group`` has run: a module built before it with
        ``group=dist.group.WORLD`` holds None and computes each rank's local loss
        (set ``.group`` after the initialisation).
    backend : str
        See :func:`label_guided_infonce`.
    """

    def __init__(self, logit_scale_init: float, *, group=None, backend: str = "auto"):
        super().__init__()
        if isinstance(logit_scale_init, torch.Tensor) and logit_scale_init.numel() == 1:
            if logit_scale_init.is_meta:  # .item() raised torch's "cannot be called on meta tensors"
                raise ValueError("argument 'logit_scale_init': expected a number or a one-element tensor with a "
                                 "value, got a tensor on the meta device (pass the number itself)")
            logit_scale_init = logit_scale_init.item()
        elif isinstance(logit_scale_init, numbers.Real) and not isinstance(logit_scale_init, (bool, int, float)):
            logit_scale_init = float(logit_scale_init)  # a NumPy scalar, taken before the check as before it
        init = check_finite_number("logit_scale_init", logit_scale_init)
        # Checked on the CPU: under a default device of meta (deferred init) the value cannot be read.
        if not torch.isfinite(torch.tensor(init, dtype=torch.float32, device="cpu")):  # inf in float32 only
            raise ValueError(f"argument 'logit_scale_init': expected a finite number within float32's range "
                             f"(|x| <= {torch.finfo(torch.float32).max:.6g}), got {init!r}")
        self.logit_scale = nn.Parameter(torch.tensor(init, dtype=torch.float32))  # on the default device
        self._logit_scale_init = init  # for reset_parameters (a module built on the meta device has no value)
        # Checked now, not at the first forward (where a bad value would surface in a training loop).
        _dispatch.check_backend(backend, ops=(OP_NAME,))
        _check_group(group)
        self.group = group
        self.backend = backend

    def reset_parameters(self) -> None:
        """Set ``logit_scale`` back to ``logit_scale_init``, as at construction (what FSDP's meta-device
        materialisation and ``to_empty`` then ``reset_parameters`` rely on)."""
        with torch.no_grad():
            self.logit_scale.fill_(self._logit_scale_init)

    def forward(self, image_emb, text_emb, labels=None):
        if isinstance(self.group, _GroupNotSaved):
            raise ValueError(f"LabelGuidedInfoNCE.group: this module was pickled (torch.save) with group= a process "
                             f"group of {self.group.ranks} rank(s), which pickling cannot keep; set its 'group' "
                             f"attribute to this process's group (e.g. dist.group.WORLD), or to None for the loss "
                             f"of the local batch alone, before calling it")
        return label_guided_infonce(image_emb, text_emb, self.logit_scale, labels,
                                    group=self.group, backend=self.backend)

    def __getstate__(self):
        # Pickled (torch.save of the module or of a model holding it; pickling the group itself raised
        # "cannot pickle 'ProcessGroup' object"): without the group, whose place keeps its size.
        state = super().__getstate__()
        group = state.get("group")
        if group is not None and not isinstance(group, _GroupNotSaved):
            state["group"] = _GroupNotSaved(group.size())
        return state

    def __copy__(self):
        # Shares everything, the group included (copy.copy would otherwise take __getstate__'s pickling form).
        new = type(self).__new__(type(self))
        new.__setstate__(nn.Module.__getstate__(self))
        return new

    def __deepcopy__(self, memo):
        # A copy in this process (an averaged or EMA model, a snapshot) shares the group, a
        # communicator rather than state; everything else is deep-copied as nn.Module's would be.
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        state = nn.Module.__getstate__(self)
        group = state.pop("group", None)
        state = copy.deepcopy(state, memo)
        state["group"] = group
        new.__setstate__(state)
        return new

    def extra_repr(self) -> str:
        # No value to print on the meta device (a model built or moved there).
        scale = "<meta>" if self.logit_scale.is_meta else f"{float(self.logit_scale.detach()):.4g}"
        settings = [f"logit_scale={scale}"]
        # The settings that change what runs, when not the defaults (as ACEHypergraph's deterministic).
        if self.backend != "auto":
            settings.append(f"backend={self.backend!r}")
        if isinstance(self.group, _GroupNotSaved):
            settings.append(f"group=<{self.group.ranks} rank{'' if self.group.ranks == 1 else 's'}, not saved>")
        elif self.group is not None:
            ranks = self.group.size()
            settings.append(f"group=<{ranks} rank{'' if ranks == 1 else 's'}>")
        return ", ".join(settings)
