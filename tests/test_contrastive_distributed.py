"""label_guided_infonce(group=) on CPU with gloo: 2 and 3 processes versus one process on the concatenated batch."""

import math
import uuid

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import _bounds
import ace_kernels
from _contrastive_dist_worker import (gather_rows_16bit_inputs, make_global_batch, run, run_backend_mismatch,
                                     run_empty_global, run_gather_rows_16bit, run_grad_mismatch, run_mismatch,
                                     run_one_bad_rank, run_one_rank_without_its_backend, run_scale_grad_on_one_rank,
                                     run_scale_mismatch, run_strided_local_rows)
from oracle_contrastive import label_guided_infonce_oracle

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

# Each rank's share is summed in a different order than the single-process loss,
# and the embedding gradients pass one all-reduce: a few fp64 ulps of O(1) values.
ATOL = 1e-10
JOIN_TIMEOUT_S = 120
# Process-group timeout of the tests where a bug would leave ranks waiting in a collective
# (an empty rank raising before the shape exchange): they fail in a minute, not in gloo's default
# 30. It bounds the ranks' skew too (the rendezvous, a rank importing Triton while another waits
# in a collective): a rank's whole run took at most 5.5 s beside two busy processes on 2 cores.
SHORT_TIMEOUT_S = 60


def _rendezvous(tmp_path) -> str:
    """The ranks' gloo rendezvous: a file store of its own under ``tmp_path``. A free port picked
    here could be taken by another process before the ranks bind it (the suite runs in several
    processes at once)."""
    return f"file://{tmp_path / f'store-{uuid.uuid4().hex}'}"


def _assert_no_rank_waited(tmp_path, world, timeout_s):
    """Each rank's call (timed from a barrier by the worker) ended well before the collectives'
    timeout: no rank waited for it."""
    seconds = [float((tmp_path / f"rank{r}.seconds").read_text()) for r in range(world)]
    assert max(seconds) < timeout_s / 2, f"a rank waited for the collectives' timeout: {seconds}"


def _spawn(target, world, args):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(rank, world) + args) for rank in range(world)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(JOIN_TIMEOUT_S)
    hung = [p for p in procs if p.is_alive()]
    for proc in hung:
        proc.kill()
        proc.join()
    assert not hung, f"{len(hung)} rank(s) did not finish within {JOIN_TIMEOUT_S}s"
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]


def _check_against_single_process(tmp_path, sizes, dim, with_labels, atol):
    """The ranks' saved results against one process (torch backend, fp64) on the concatenated batch."""
    u, t, labels = make_global_batch(sizes, dim, with_labels)
    u.requires_grad_()
    t.requires_grad_()
    scale = torch.tensor(30.0, dtype=torch.float64, requires_grad=True)
    loss = ace_kernels.label_guided_infonce(u, t, scale, labels, backend="torch")
    loss.backward()

    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(len(sizes))]
    lo = 0
    for rank, (result, size) in enumerate(zip(results, sizes, strict=True)):
        # Every rank returns the global loss.
        torch.testing.assert_close(result["loss"].double(), loss.detach(), rtol=0, atol=atol)
        # Local embeddings get exactly the gradient of the global loss ([0, D] on an empty rank).
        assert result["grad_u"].shape == result["grad_t"].shape == (size, dim)
        torch.testing.assert_close(result["grad_u"].double(), u.grad[lo:lo + size], rtol=0, atol=atol)
        torch.testing.assert_close(result["grad_t"].double(), t.grad[lo:lo + size], rtol=0, atol=atol)
        if size == 0:
            # An empty rank owns no share of the loss, so no share of the logit-scale gradient.
            assert result["grad_scale"] is not None and result["grad_scale"].item() == 0.0
        lo += size
    # logit_scale: the SUM over ranks is the single-process gradient (documented convention).
    summed = sum(r["grad_scale"].double() for r in results)
    torch.testing.assert_close(summed, scale.grad, rtol=0, atol=atol)


# (name, local batch sizes, labels given, process-group timeout in s). Some ranks may hold no
# rows (the last batch of a sampler split over ranks): they contribute nothing, still return the
# global loss and get [0, D] gradients; their cases fail fast if a rank is left waiting.
CASES = [
    ("2_ranks_labels", (9, 9), True, 60),
    ("3_ranks_labels_uneven", (5, 1, 8), True, 60),
    ("3_ranks_no_labels", (6, 6, 6), False, 60),
    ("2_ranks_second_empty", (3, 0), True, SHORT_TIMEOUT_S),
    ("3_ranks_first_empty", (0, 5, 4), True, SHORT_TIMEOUT_S),
    ("3_ranks_two_empty_no_labels", (0, 7, 0), False, SHORT_TIMEOUT_S),
    # Label rows that only an exact exchange tells apart (the keys are made from all ranks' rows).
    ("2_ranks_float64_labels", (9, 9), "float64 finer than float32", 60),
    ("2_ranks_int64_labels", (9, 9), "int64 past 2**53", 60),
]


@pytest.mark.parametrize("name,sizes,with_labels,timeout_s", CASES, ids=[c[0] for c in CASES])
def test_global_loss_and_gradients_match_single_process(name, sizes, with_labels, timeout_s, tmp_path):
    dim = 12
    _spawn(run, len(sizes), (_rendezvous(tmp_path), sizes, dim, with_labels, str(tmp_path), "torch", torch.float64,
                             timeout_s))
    _check_against_single_process(tmp_path, sizes, dim, with_labels, ATOL)


def test_a_subgroup_computes_the_loss_of_its_own_ranks(tmp_path):
    """group= a subgroup of global ranks 0 and 2 out of 3 (global rank 2 is the group's rank 1): the
    loss and gradients of its ranks' concatenated batches; rank 1, outside it, is refused at once."""
    sizes, dim = (4, 3), 12
    _spawn(run, 3, (_rendezvous(tmp_path), sizes, dim, True, str(tmp_path), "torch", torch.float64, SHORT_TIMEOUT_S,
                    None, None, True, False, (0, 2)))
    _check_against_single_process(tmp_path, sizes, dim, True, ATOL)
    assert "this rank is not a member of the group" in (tmp_path / "outside1.txt").read_text()


# The text rows' gradient parts (sizes 5, 1, 8) in one chunk (the default), or in chunks of 6
# rows: rank 0's and 1's rows, then 6 of rank 2's, then its other 2; or a row at a time.
REDUCE_CASES = [(None, [((5, 12), 0), ((1, 12), 1), ((8, 12), 2)]),
                (6, [((5, 12), 0), ((1, 12), 1), ((6, 12), 2), ((2, 12), 2)]),
                (1, [((1, 12), 0)] * 5 + [((1, 12), 1)] + [((1, 12), 2)] * 8)]


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=[pytest.mark.triton,
                                                                            pytest.mark.interpreter])])
@pytest.mark.parametrize("chunk_rows,reductions", REDUCE_CASES, ids=["one_chunk", "chunks_of_6", "a_row_per_chunk"])
def test_only_the_text_rows_are_gathered_and_reduced_across_ranks(backend, chunk_rows, reductions, tmp_path):
    """A rank's own image rows get their gradient whole from its pass over its rows, on either
    backend, and no other rank needs them: per step, the text rows go round the ring (two
    exchanges of 3 ranks: each rank sends the rows it holds to the next and receives the previous
    one's; before the ring, one all-gather padded to the largest local batch), beside the
    all-gathers of the labels and of the column partials, and the reductions of this rank's part of
    the text rows' gradients to each rank's rows, a chunk of rows at a time (one [B, D]
    reduce-scatter before 2026-12-05), with the loss and gradients still those of one process,
    whatever the chunks."""
    sizes, dim = (5, 1, 8), 12
    dtype = torch.float64 if backend == "torch" else torch.float32
    _spawn(run, len(sizes), (_rendezvous(tmp_path), sizes, dim, True, str(tmp_path), backend, dtype, 60,
                             None, None, True, True, None, chunk_rows))
    for rank in range(len(sizes)):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        assert saved["all_gathers"] == [(8, 14), (sum(sizes),)], saved["all_gathers"]
        after, before = (rank + 1) % 3, (rank - 1) % 3
        assert saved["exchanges"] == [
            [("send", (sizes[rank], dim), after), ("recv", (sizes[before], dim), before)],
            [("send", (sizes[before], dim), after), ("recv", (sizes[(rank - 2) % 3], dim), before)],
        ], saved["exchanges"]
        assert saved["reductions"] == reductions, saved["reductions"]
        # The ranks' launches are checked as the suite's are (tests/_bounds.py).
        assert saved["bounds_checked"] == (backend == "triton" and _bounds.wanted())
    _check_against_single_process(tmp_path, sizes, dim, True, ATOL if backend == "torch" else 2e-5)


def test_cross_rank_duplicates_are_masked(tmp_path):
    # Guard that the test above can fail: the same batch without global label keys
    # (per-rank local losses) differs from the global loss.
    sizes = (9, 9)
    u, t, labels = make_global_batch(sizes, 12, True)
    global_loss = ace_kernels.label_guided_infonce(u, t, 30.0, labels, backend="torch")
    local = [ace_kernels.label_guided_infonce(u[a:b], t[a:b], 30.0, labels[a:b], backend="torch")
             for a, b in [(0, 9), (9, 18)]]
    assert abs(global_loss.item() - sum(local).item() / 2) > 1e-3


def test_a_rank_with_bad_arguments_makes_every_rank_raise_at_once(tmp_path):
    _spawn(run_one_bad_rank, 3, (_rendezvous(tmp_path), str(tmp_path), 60))
    _assert_no_rank_waited(tmp_path, 3, 60)
    messages = [(tmp_path / f"rank{r}.txt").read_text() for r in range(3)]
    assert "argument 'labels'" in messages[2]
    assert messages[0] == messages[1] and "rank(s) [2]" in messages[0]


def test_a_rank_that_cannot_run_its_backend_makes_every_rank_raise_at_once(tmp_path):
    _spawn(run_one_rank_without_its_backend, 2, (_rendezvous(tmp_path), str(tmp_path), 60))
    _assert_no_rank_waited(tmp_path, 2, 60)
    messages = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert messages[1].startswith("RuntimeError: label_guided_infonce: backend 'triton' cannot run"), messages[1]
    assert messages[0].startswith("ValueError: ") and "rank(s) [1]" in messages[0], messages[0]


def test_mismatched_ranks_raise_on_every_rank(tmp_path):
    _spawn(run_mismatch, 2, (_rendezvous(tmp_path), str(tmp_path)))
    messages = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert messages[0] == messages[1]
    assert "embedding dim" in messages[0] and "[8, 9]" in messages[0]


def test_ranks_whose_logit_scales_differ_raise_on_every_rank(tmp_path):
    _spawn(run_scale_mismatch, 2, (_rendezvous(tmp_path), str(tmp_path)))
    messages = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert messages[0] == messages[1]
    assert "the same logit_scale" in messages[0] and "[10.0, 10.5]" in messages[0], messages[0]


@pytest.mark.parametrize("no_grad", [False, True])
def test_ranks_that_differ_in_which_embeddings_need_gradients_raise_on_every_rank(no_grad, tmp_path):
    # Otherwise the backward's all-reduces pair up differently on the ranks: a hang, or (image
    # gradients paired with text gradients) wrong gradients with no error. Under torch.no_grad()
    # no backward runs: the same ranks compute the loss, no error.
    _spawn(run_grad_mismatch, 2, (_rendezvous(tmp_path), str(tmp_path), SHORT_TIMEOUT_S, no_grad))
    messages = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    if no_grad:
        assert messages == ["no error", "no error"], messages
        return
    assert messages[0] == messages[1]
    assert "requires_grad of image_emb" in messages[0] and "[1, 0]" in messages[0], messages[0]
    assert "requires_grad=True" in messages[0]


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=[pytest.mark.triton,
                                                                              pytest.mark.interpreter])])
def test_ranks_may_differ_in_whether_the_logit_scale_needs_a_gradient(backend, tmp_path):
    # Frozen embeddings: the backward runs no collective on any rank, so a rank that learns the
    # scale and one that does not leave the loss in step (the next collective pairs up).
    _spawn(run_scale_grad_on_one_rank, 2, (_rendezvous(tmp_path), str(tmp_path), SHORT_TIMEOUT_S, backend))
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)] == ["no error"] * 2


@pytest.mark.triton
@pytest.mark.interpreter
def test_ranks_that_resolve_different_backends_raise_on_every_rank(tmp_path):
    # The backends ran different collectives (before 2026-12-05 torch reduce-scattered the text
    # rows' gradients first, Triton the image rows'; torch gathers fp32 copies of 16-bit rows,
    # Triton the rows as they are): torch, triton, torch in fp32 gave the right loss and gradients
    # off by O(1) with no error.
    # The last rank gets Triton from ACE_KERNELS_BACKEND under backend="auto".
    _spawn(run_backend_mismatch, 3,
           (_rendezvous(tmp_path), str(tmp_path), SHORT_TIMEOUT_S, ("torch", "triton", "auto+triton")))
    _assert_no_rank_waited(tmp_path, 3, SHORT_TIMEOUT_S)
    messages = [(tmp_path / f"rank{r}.txt").read_text() for r in range(3)]
    assert messages[0] == messages[1] == messages[2], messages
    assert messages[0].startswith("ValueError: ") and "the same backend" in messages[0], messages[0]
    assert "['torch', 'triton', 'triton'] on ranks 0..2" in messages[0], messages[0]
    assert "backend='torch' or backend='triton'" in messages[0], messages[0]


@pytest.mark.triton
@pytest.mark.interpreter
def test_a_local_view_the_kernels_could_not_take_does_not_split_the_backends(tmp_path):
    # The backend is agreed on one row of each rank's width and dtype; what depends on the rows
    # is decided on the gathered batch, alike on every rank.
    _spawn(run_strided_local_rows, 2, (_rendezvous(tmp_path), str(tmp_path), SHORT_TIMEOUT_S))
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)] == ["no error", "no error"]


def test_a_rank_outside_the_group_is_told_so():
    # What dist.new_group returns on the ranks it leaves out: an int, refused before any collective.
    u = torch.randn(3, 8)
    outside = dist.GroupMember.NON_GROUP_MEMBER
    with pytest.raises(ValueError, match="argument 'group': this rank is not a member of the group"):
        ace_kernels.label_guided_infonce(u, u, 10.0, group=outside)
    with pytest.raises(ValueError, match="argument 'group': this rank is not a member of the group"):
        ace_kernels.LabelGuidedInfoNCE(10.0, group=outside)


def test_empty_global_batch_raises_on_every_rank(tmp_path):
    _spawn(run_empty_global, 2, (_rendezvous(tmp_path), str(tmp_path), SHORT_TIMEOUT_S))
    messages = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert messages[0] == messages[1]
    assert "global batch is empty" in messages[0] and "[0, 0]" in messages[0]
    # Rows of width 0 on every rank (the local check leaves D to the global one): refused alike.
    _spawn(run_empty_global, 2, (_rendezvous(tmp_path), str(tmp_path), SHORT_TIMEOUT_S, (3, 0)))
    messages = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert messages[0] == messages[1] and "argument 'image_emb'" in messages[0], messages


@pytest.mark.triton
@pytest.mark.interpreter
def test_triton_backend_across_ranks(tmp_path):
    # The Triton kernels (the interpreter here) on the owned-share path, 2 uneven ranks, fp32.
    # fp32 kernels versus the fp64 single-process loss: logits up to 30 carry ~30 * 6e-8 each.
    sizes, dim = (7, 12), 20
    _spawn(run, 2, (_rendezvous(tmp_path), sizes, dim, True, str(tmp_path), "triton", torch.float32))
    _check_against_single_process(tmp_path, sizes, dim, True, 2e-5)


@pytest.mark.triton
@pytest.mark.interpreter
def test_triton_backend_across_ranks_with_a_frozen_image_tower(tmp_path):
    """image_emb needs no gradient on any rank, text_emb does: the text rows still get the
    global loss's gradient (their reductions do not wait on the image rows'), within
    the fp32 tolerance of test_triton_backend_across_ranks."""
    sizes, dim = (7, 12), 20
    _spawn(run, 2,
           (_rendezvous(tmp_path), sizes, dim, True, str(tmp_path), "triton", torch.float32, 60, None, None, False))
    u, t, labels = make_global_batch(sizes, dim, True)
    t.requires_grad_()
    ace_kernels.label_guided_infonce(u, t, 30.0, labels, backend="torch").backward()
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert all(r["grad_u"] is None and r["grad_t"] is not None for r in results)
    torch.testing.assert_close(torch.cat([r["grad_t"] for r in results]).double(), t.grad, rtol=0, atol=2e-5)


@pytest.mark.triton
@pytest.mark.interpreter
def test_triton_backend_with_an_empty_rank(tmp_path):
    # As above with the first rank empty: its owned range is lo == hi == 0.
    sizes, dim = (0, 9, 7), 20
    _spawn(run, 3, (_rendezvous(tmp_path), sizes, dim, True, str(tmp_path), "triton", torch.float32, SHORT_TIMEOUT_S))
    _check_against_single_process(tmp_path, sizes, dim, True, 2e-5)


@pytest.mark.triton
@pytest.mark.interpreter
@pytest.mark.parametrize("sizes", [(0, 21, 12), (0, 33, 0)], ids=["ranges_inside_tiles", "one_rank_all_rows"])
def test_triton_k_steps_across_ranks(sizes, tmp_path):
    """The one-pass kernels' K steps (D = 81 > 64 under the interpreter) across real ranks: the
    row blocks of a rank's range are aligned to 16 rows, so rank 2's (21..33) holds rows 16..20 of
    rank 1, which the K steps load whole and which must add nothing to its column partials, its
    gradients or its logit-scale part; and one rank holding every row beside two empty ones (the
    others' column partials all -inf)."""
    dim = 81
    _spawn(run, len(sizes), (_rendezvous(tmp_path), sizes, dim, True, str(tmp_path), "triton", torch.float32,
                             SHORT_TIMEOUT_S))
    _check_against_single_process(tmp_path, sizes, dim, True, 2e-5)


# The blocked strategy forced with the interpreter's 16 x 16 tiles, on uneven ranks whose owned
# ranges start and end inside row tiles (at 20 of 45; at 7 and 30). Weights buffer: the default
# (each range of rows in one block) or one tile of rows (a block per tile).
BLOCKED_CASES = [("2_ranks", (20, 25), None), ("3_ranks_one_tile_blocks", (7, 23, 15), 1)]


@pytest.mark.triton
@pytest.mark.interpreter
@pytest.mark.parametrize("name,sizes,weight_bytes", BLOCKED_CASES, ids=[c[0] for c in BLOCKED_CASES])
def test_triton_blocked_strategy_across_ranks(name, sizes, weight_bytes, tmp_path):
    # fp32 kernels versus the fp64 single-process loss, as in test_triton_backend_across_ranks.
    dim, tile = 20, 16
    _spawn(run, len(sizes), (_rendezvous(tmp_path), sizes, dim, True, str(tmp_path), "triton", torch.float32, 60,
                             dict(BLOCK_M=tile, BLOCK_N=tile, BLOCK_K=tile), weight_bytes))
    _check_against_single_process(tmp_path, sizes, dim, True, 2e-5)
    # A rank's backward runs its rows against every column (dU), then every row against its
    # columns (its part of dT; every row in one chunk at this batch): per direction its rows' tiles
    # times the batch's, so that the ranks together run one device's tiles (no logit twice, as before
    # 2026-12-02, when each rank also ran the row tiles of other ranks against its columns and its
    # own against every column).
    tiles = math.ceil(sum(sizes) / tile)
    for rank, size in enumerate(sizes):
        programs = torch.load(tmp_path / f"rank{rank}.pt")["grad_programs"]
        assert sum(programs) == 2 * math.ceil(size / tile) * tiles, (rank, programs)


def _ulps_fp16(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """|got - want| in units of the last place of ``want`` (fp16; subnormals counted at 2^-24)."""
    want32 = want.float()
    exponent = torch.floor(torch.log2(want32.abs().clamp_min(2.0**-14)))
    return (got.float() - want32).abs() / torch.exp2(exponent - 10)


def _fp16_ranks_and_one_process(backend, tmp_path, sizes=(6, 5, 7)):
    """3 fp16 ranks' row gradients, one fp16 process's (same backend) and the fp64 ones, all [B, D]."""
    dim = 16
    _spawn(run, 3, (_rendezvous(tmp_path), sizes, dim, True, str(tmp_path), backend, torch.float16))
    u, t, labels = make_global_batch(sizes, dim, True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(3)]
    ranks = [torch.cat([r[key] for r in results]) for key in ("grad_u", "grad_t")]
    assert all(g.dtype == torch.float16 for g in ranks)
    one, exact = [], []
    for dtype, out, on in ((torch.float16, one, backend), (torch.float64, exact, "torch")):
        # The fp16 values in both (exactly, in fp64).
        u_ = u.half().to(dtype).requires_grad_()
        t_ = t.half().to(dtype).requires_grad_()
        ace_kernels.label_guided_infonce(u_, t_, torch.tensor(30.0, dtype=dtype), labels, backend=on).backward()
        out += [u_.grad, t_.grad]
    return ranks, one, exact


def test_16bit_row_gradients_are_rounded_once_after_the_sum_over_ranks(tmp_path):
    # Torch backend, 3 ranks in fp16, against one process on the concatenated fp16 batch: both sum
    # the rows' gradients in fp32 and round once, so they differ only where the fp32 order of the
    # additions moves a value across a rounding boundary (at most 1 ulp), and both are within
    # about half an ulp of the exact gradient. Rounding each rank's partial gradient to fp16
    # before the sum over ranks (what autograd does to a gathered fp16 input's gradient) was 331
    # ulps off on these rows: the partial sums cancel.
    ranks, one, exact = _fp16_ranks_and_one_process("torch", tmp_path)
    for got, single, want in zip(ranks, one, exact, strict=True):
        assert _ulps_fp16(got, single).max().item() <= 1.0
        assert _ulps_fp16(got, want).max().item() <= 1.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_16bit_ranks_with_an_empty_one_match_the_fp64_oracle(dtype, tmp_path):
    """16-bit embeddings on the torch backend (the Triton interpreter's bf16 arithmetic is not the
    GPU's), 3 uneven ranks, the middle one empty: the loss and every gradient against the dense fp64
    oracle of the concatenated batch of the same 16-bit values. (Gathering the 16-bit rows, so that
    each rank's part of a text row's gradient is rounded before the sum over ranks, fails it.)"""
    sizes, dim = (6, 0, 9), 12
    # The unit roundoff u (2**-11 for fp16, 2**-8 for bf16): a value rounded once to the dtype is within u of it,
    # relatively; one rounded after a few fp32 errors within one unit in the last place, 2u.
    unit_roundoff = torch.finfo(dtype).eps / 2
    _spawn(run, len(sizes), (_rendezvous(tmp_path), sizes, dim, True, str(tmp_path), "torch", dtype, SHORT_TIMEOUT_S))
    u, t, labels = make_global_batch(sizes, dim, True)
    u = u.to(dtype).double().requires_grad_()
    t = t.to(dtype).double().requires_grad_()
    scale = torch.tensor(30.0, dtype=torch.float64, requires_grad=True)
    loss = label_guided_infonce_oracle(u, t, scale, labels)
    loss.backward()

    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(len(sizes))]
    lo = 0
    for result, size in zip(results, sizes, strict=True):
        # The loss is fp32, computed in fp32 from the 16-bit values: logits up to 30 carry ~30 * 6e-8 each.
        assert result["loss"].dtype == torch.float32
        torch.testing.assert_close(result["loss"].double(), loss.detach(), rtol=0, atol=2e-5)
        # Each gradient is summed in fp32 and rounded once to the dtype; atol covers the fp32
        # errors of entries whose terms cancel (the smallest here are ~3e-5, the largest ~2.6).
        for key, full in (("grad_u", u.grad), ("grad_t", t.grad)):
            assert result[key].dtype == dtype and result[key].shape == (size, dim)
            torch.testing.assert_close(result[key].double(), full[lo:lo + size], rtol=2 * unit_roundoff, atol=1e-6,
                                       msg=lambda m: f"{key} of the rank of {size} rows: {m}")
        assert result["grad_scale"].dtype == dtype
        lo += size
    assert results[1]["grad_scale"].item() == 0.0  # the empty rank owns no share
    # The ranks' shares of the scale's gradient, each rounded once (both positive here): their sum.
    summed = sum(r["grad_scale"].double() for r in results)
    torch.testing.assert_close(summed, scale.grad, rtol=2 * unit_roundoff, atol=0)


@pytest.mark.triton
@pytest.mark.interpreter
def test_triton_16bit_row_gradients_across_ranks_as_accurate_as_one_process(tmp_path):
    # The Triton backend rounds its softmax weights to fp16 for the tensor-core products (one
    # process too: 56 and 544 ulps off the exact gradients of these rows, where the terms cancel);
    # across ranks the row and column weights of a pair are rounded on different ranks. The
    # rows' gradients are summed in fp32 and rounded once; the ranks' result must be no less
    # accurate than one process's, within a few ulps (61 and 100 here). 3 ranks of 16 rows:
    # rounding each rank's partial gradient of the gathered rows to fp16 before the sum gave 288
    # ulps on the image rows (on (6, 5, 7) rows it stayed within the bound).
    ranks, one, exact = _fp16_ranks_and_one_process("triton", tmp_path, (16, 16, 16))
    for got, single, want in zip(ranks, one, exact, strict=True):
        assert _ulps_fp16(got, want).max().item() <= 1.25 * _ulps_fp16(single, want).max().item() + 4.0


@pytest.mark.parametrize("sizes", [(3, 3, 3), (3, 1, 2), (0, 2, 1), (0, 0, 0)])
def test_rows_are_gathered_into_one_buffer(sizes, monkeypatch):
    """The rows' all-gather as rank 0 of 3, the collective simulated: each rank's rows, padded with
    zeros to the largest local batch, land in one buffer, which is the result itself when no rank is
    short (the global batch is not copied a second time); else the real rows come out of it in rank
    order. Ranks that all hold no rows run no collective."""
    from ace_kernels import contrastive

    biggest = max(sizes)
    ranks = [torch.arange(size * 2, dtype=torch.float64).reshape(size, 2) + 100 * r for r, size in enumerate(sizes)]
    written = []

    def all_gather(output, local, group=None):
        assert local.shape == (biggest, 2) and torch.equal(local[:sizes[0]], ranks[0]) and not local[sizes[0]:].any()
        output.copy_(torch.cat([torch.cat([rows, rows.new_zeros(biggest - len(rows), 2)]) for rows in ranks]))
        written.append(output)

    monkeypatch.setattr(contrastive, "_collective", {"all_gather_single": all_gather}.__getitem__)
    got = contrastive._all_gather_padded(ranks[0], None, sizes)
    assert got.dtype == torch.float64 and torch.equal(got, torch.cat(ranks))
    assert len(written) == (biggest > 0)
    if written:
        assert (got.data_ptr() == written[0].data_ptr()) == (min(sizes) == biggest)


class _FakeP2POp:
    """torch.distributed.P2POp without a process group: the operation, the tensor and the peer."""

    def __init__(self, op, tensor, group=None, group_peer=None):
        self.op, self.tensor, self.group_peer = op, tensor, group_peer


def _ring_in_threads(sizes, dim, monkeypatch):
    """Every rank of ``sizes`` running :func:`_ring_all_gather` in a thread of its own, the exchanges
    simulated by a queue per pair of ranks (a send puts a copy, a receive takes it when waited for:
    until then the receiving buffer holds NaN). Returns each rank's (gathered rows, events): its
    exchanges posted, its waits and its ``take`` calls (``take`` checks that the rows it is given are
    the owner's, complete), in order, and the rows every rank holds."""
    import queue
    import threading

    from conftest import poisoning_empty

    from ace_kernels import contrastive

    world = len(sizes)
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(size, dim, dtype=torch.float64, generator=gen) for size in sizes]
    links = {(src, dst): queue.Queue() for src in range(world) for dst in range(world)}
    local = threading.local()

    class Work:
        def __init__(self, op, src):
            self.op, self.src = op, src

        def wait(self):
            local.events.append(f"wait {self.op.op.__name__}")
            if self.op.op is dist.irecv:
                self.op.tensor.copy_(links[(self.src, local.rank)].get(timeout=10))

    def exchange(ops):
        assert ops, "an exchange of nothing is posted"
        local.events.append("post " + " ".join(f"{op.op.__name__}:{op.group_peer}:{op.tensor.shape[0]}" for op in ops))
        for op in ops:
            if op.op is dist.isend:
                links[(local.rank, op.group_peer)].put(op.tensor.clone())
        return [Work(op, op.group_peer) for op in ops]

    results = [None] * world
    failures = []

    def rank_main(rank):
        local.rank, local.events = rank, []

        def take(owner, rows):
            local.events.append(f"take {owner}")
            assert torch.equal(rows, data[owner]), (rank, owner)

        try:
            gathered = contrastive._ring_all_gather(data[rank], None, sizes, rank, take)
            results[rank] = (gathered, local.events)
        except BaseException as exc:  # reported by the main thread
            failures.append((rank, exc))

    monkeypatch.setattr(dist, "P2POp", _FakeP2POp)
    monkeypatch.setattr(contrastive, "_collective", {"batch_isend_irecv": exchange}.__getitem__)
    threads = [threading.Thread(target=rank_main, args=(rank,)) for rank in range(world)]
    with poisoning_empty():  # the gathered buffer is NaN until the rows arrive
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert not failures, failures
    assert not any(thread.is_alive() for thread in threads)
    return results, torch.cat(data)


@pytest.mark.parametrize("sizes", [(5, 1, 8), (4, 0, 5), (0, 7, 0), (3,), (2, 3, 4, 1), (6, 6)])
def test_the_text_rows_go_round_the_ring_each_taken_once_complete(sizes, monkeypatch):
    """Every rank ends with every rank's rows in rank order, takes each non-empty rank's rows exactly
    once (its own first, then the ring's order: the rank before it, the one before that, ...) and
    only once they have arrived, and posts no exchange of nothing; ranks without rows pass the
    others' on."""
    results, rows = _ring_in_threads(sizes, 3, monkeypatch)
    world = len(sizes)
    for rank, (gathered, events) in enumerate(results):
        assert torch.equal(gathered, rows), rank
        ring = [(rank - step) % world for step in range(world)]
        assert [e for e in events if e.startswith("take")] == [f"take {o}" for o in ring if sizes[o]], events


@pytest.mark.parametrize("sizes,rank,events", [
    ((5, 1, 8), 0, ["post isend:1:5 irecv:2:8", "take 0", "wait isend", "wait irecv",
                    "post isend:1:8 irecv:2:1", "take 2", "wait isend", "wait irecv", "take 1"]),
    ((5, 1, 8), 1, ["post isend:2:1 irecv:0:5", "take 1", "wait isend", "wait irecv",
                    "post isend:2:5 irecv:0:8", "take 0", "wait isend", "wait irecv", "take 2"]),
    # The empty rank 1 only passes rank 0's rows on; rank 2 receives nothing at the first step.
    ((4, 0, 5), 1, ["post irecv:0:4", "wait irecv", "post isend:2:4 irecv:0:5", "take 0", "wait isend",
                    "wait irecv", "take 2"]),
    ((4, 0, 5), 2, ["post isend:0:5", "take 2", "wait isend", "post irecv:1:4", "wait irecv", "take 0"]),
], ids=["first_rank", "middle_rank", "empty_rank", "after_the_empty_rank"])
def test_each_ranks_rows_are_taken_while_the_next_are_in_flight(sizes, rank, events, monkeypatch):
    """The order of a rank's work: each step posts its exchange (the rows it holds to the next rank,
    the previous rank's from it), then takes the rows it holds, and only then waits: a rank's
    kernels on its rows run while the next rows travel (on a GPU, the transfer overlaps them)."""
    results, _ = _ring_in_threads(sizes, 2, monkeypatch)
    assert results[rank][1] == events


class _FakeReduction:
    """A reduction's stand-in for :func:`_reduce_to_owners` on rank ``rank`` of ranks that all
    hold the same parts: waiting on it writes ``ranks`` times the part into the owner's block."""

    def __init__(self, events, rank, ranks):
        self.events, self.rank, self.ranks = events, rank, ranks

    def __call__(self, block, op=None, group=None, async_op=False, group_dst=None):
        assert async_op and group_dst is not None
        self.events.append(f"reduce {group_dst}")
        owner, events, rank, ranks = group_dst, self.events, self.rank, self.ranks

        class Work:
            def wait(self):
                events.append(f"wait {owner}")
                if owner == rank:
                    block.mul_(ranks)

        return Work()


@pytest.mark.parametrize("chunk_rows,events", [
    (4, ["part 0:4", "reduce 0", "reduce 1", "part 4:8", "wait 0", "wait 1", "reduce 1", "reduce 3", "part 8:9",
         "wait 1", "wait 3", "reduce 3", "meanwhile", "wait 3"]),
    (5, ["part 0:5", "reduce 0", "reduce 1", "part 5:9", "wait 0", "wait 1", "reduce 3", "meanwhile", "wait 3"]),
    (16, ["part 0:9", "reduce 0", "reduce 1", "reduce 3", "meanwhile", "wait 0", "wait 1", "wait 3"]),
], ids=["chunks_across_ranks", "chunks_at_ranks", "one_chunk"])
def test_text_gradients_are_reduced_to_their_owners_a_chunk_at_a_time(chunk_rows, events, monkeypatch):
    """Rank 1 of 4 (local sizes 2, 3, 0 and 4): its part of the rows is formed _REDUCE_CHUNK_ROWS rows
    at a time, in order; each rank's rows of a chunk are sent to it before the next chunk is formed
    and waited for only after it (the reductions overlap the next chunk's work; the last chunk's,
    the work given as ``meanwhile``: the image rows' pass), an empty rank's rows never reduced;
    rank 1's sum is its rows' (from one chunk or two), in the parts' dtype, in a buffer of its own
    (not a view into a chunk's parts)."""
    from ace_kernels import contrastive

    seen = []
    monkeypatch.setattr(contrastive, "_REDUCE_CHUNK_ROWS", chunk_rows)
    monkeypatch.setattr(contrastive, "_collective", {"reduce": _FakeReduction(seen, 1, 4)}.__getitem__)
    grad = torch.arange(18, dtype=torch.float32).reshape(9, 2) / 7

    def part(r0, r1):
        seen.append(f"part {r0}:{r1}")
        return grad[r0:r1].clone()

    got, during = contrastive._reduce_to_owners(part, None, (2, 3, 0, 4), 1,
                                                meanwhile=lambda: seen.append("meanwhile") or "its result")
    assert seen == events and during == "its result"
    assert got.dtype == torch.float32 and torch.equal(got, grad[2:5] * 4)
    assert got.untyped_storage().nbytes() == got.nbytes
    # A rank with no rows joins every reduction and keeps an empty [0, D] sum.
    seen.clear()
    monkeypatch.setattr(contrastive, "_collective", {"reduce": _FakeReduction(seen, 2, 4)}.__getitem__)
    got, during = contrastive._reduce_to_owners(part, None, (2, 3, 0, 4), 2)
    assert [e for e in seen if e.startswith("reduce")] == [e for e in events if e.startswith("reduce")]
    assert got.shape == (0, 2) and during is None


def test_gathered_16bit_rows_across_ranks_get_their_gradient_summed_in_fp32(tmp_path):
    """The ring and the reducing helper with real point-to-point exchanges and collectives on fp16
    and bf16 rows and fp32 parts of 16-bit gradients, 3 uneven ranks, the middle one empty: every
    rank gets every rank's rows in rank order, bit for bit (and takes each non-empty rank's, its own
    first, as they arrived), and its rows' gradient is the sum of the ranks' parts, in fp32, rounded
    once (exact here: the fp32 sums are exact). Summed in 16 bits, or with a rank's rows dropped or
    misplaced, some entries differ."""
    sizes, dim = (4, 0, 6), 8
    _spawn(run_gather_rows_16bit, len(sizes), (_rendezvous(tmp_path), sizes, dim, str(tmp_path), SHORT_TIMEOUT_S))
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(len(sizes))]
    for dtype in (torch.float16, torch.bfloat16):
        inputs = [gather_rows_16bit_inputs(sizes, dim, dtype, r, len(sizes)) for r in range(len(sizes))]
        rows = torch.cat([local for local, _ in inputs])
        summed = sum(grad.float() for _, grad in inputs).to(dtype)
        lo = 0
        for rank, size in enumerate(sizes):
            got = results[rank][str(dtype)]
            assert got["gathered"].dtype == got["grad"].dtype == dtype and got["sum_dtype"] == torch.float32
            assert torch.equal(got["gathered"], rows), (dtype, rank)
            ring = [(rank - step) % 3 for step in range(3)]
            assert [owner for owner, _ in got["taken"]] == [o for o in ring if sizes[o]], (dtype, rank)
            for owner, taken in got["taken"]:
                assert torch.equal(taken, inputs[owner][0]), (dtype, rank, owner)
            assert got["grad"].shape == (size, dim) and torch.equal(got["grad"], summed[lo:lo + size]), (dtype, rank)
            lo += size
