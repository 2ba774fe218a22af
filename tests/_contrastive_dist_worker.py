"""Worker for tests/test_contrastive_distributed.py: one gloo rank computing its share of a global batch."""

import contextlib
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

import _bounds
from _dist_exit import exit_now


def make_global_batch(sizes, dim, with_labels, seed=0):
    gen = torch.Generator().manual_seed(seed)
    total = sum(sizes)
    u = torch.nn.functional.normalize(torch.randn(total, dim, generator=gen, dtype=torch.float64), dim=1)
    t = torch.nn.functional.normalize(torch.randn(total, dim, generator=gen, dtype=torch.float64), dim=1)
    labels = None
    if with_labels:
        # Few distinct rows so that duplicates straddle ranks (false negatives across ranks).
        table = torch.randint(0, 2, (4, 14), generator=gen)
        if with_labels == "float64 finer than float32":
            table = table.double() + 1.0  # 1 and 2: a float32 rounds away what 1e-9 adds to them
            table[1] = table[0]
            table[1, 3] += 1e-9  # a row of its own, equal to row 0 once rounded to float32
        elif with_labels == "int64 past 2**53":
            table = table + 2**53
            table[1] = table[0]
            table[1, 3] += 1  # a row of its own, equal to row 0 once rounded to float64
        labels = table[torch.randint(0, 4, (total,), generator=gen)]
    return u, t, labels


@contextlib.contextmanager
def _blocked_strategy(dtype, dim, tiles, weight_bytes):
    """Force the Triton backend's blocked strategy (``tiles``: its BLOCK_M/N/K) for ``dtype``
    rows of width ``dim``, with a weights buffer of ``weight_bytes`` (None: the default), and
    count the programs of its backward: yields ``{"grad_programs": [...]}``, the grid of each
    block of the weights kernel (once, though a block may launch twice: its interior tiles and
    its others, over the same grid)."""
    from ace_kernels import _tuning, contrastive

    config = dict(STRATEGY="blocked", num_warps=4, num_stages=1, **tiles)
    dtype_class = contrastive._config_key(dtype, dim, aligned=dim % 16 == 0)
    counts = {"grad_programs": []}
    kernel = contrastive._grad_weights_kernel

    seen = set()

    class CountingKernel:
        def __getitem__(self, grid):
            launch = kernel[grid]

            def run(*args, **kwargs):
                block = (args[0].data_ptr(), *args[8:12])  # the direction (a), rows r0..r1, columns c0..c1
                if block not in seen:
                    seen.add(block)
                    counts["grad_programs"].append(grid[0])
                return launch(*args, **kwargs)
            return run

    contrastive._grad_weights_kernel = CountingKernel()
    if weight_bytes is not None:
        contrastive._BLOCKED_WEIGHT_BYTES = weight_bytes
    with _tuning.forced("contrastive", "lse", dtype_class, config), \
            _tuning.forced("contrastive", "grad", dtype_class, config):
        yield counts


@contextlib.contextmanager
def _counting_collectives():
    """Record every all-gather's input shape (one tensor: each rank's rows padded to the largest
    local batch, or the column partials), every reduction's (shape, owner) and every
    point-to-point exchange's operations (kind, shape, peer in the group): yields
    ``{"reductions": [(shape, owner), ...], "all_gathers": [shape, ...], "exchanges": [[(kind, shape,
    peer), ...], ...]}``."""
    import torch.distributed as dist

    from ace_kernels import contrastive

    counts = {"reductions": [], "all_gathers": [], "exchanges": []}
    real = contrastive._collective

    def collective(name):
        function = real(name)

        def counted(tensor, *args, **kwargs):
            if name == "reduce":
                counts["reductions"].append((tuple(tensor.shape), kwargs["group_dst"]))
            elif name == "batch_isend_irecv":
                counts["exchanges"].append([("send" if op.op is dist.isend else "recv", tuple(op.tensor.shape),
                                             op.group_peer) for op in tensor])
            else:
                counts["all_gathers"].append(tuple(args[0].shape))
            return function(tensor, *args, **kwargs)

        return counted

    contrastive._collective = collective
    try:
        yield counts
    finally:
        contrastive._collective = real


def run(rank, world, rendezvous, sizes, dim, with_labels, out_dir, backend="torch", dtype=torch.float64, timeout_s=60,
        blocked_tiles=None, weight_bytes=None, image_grad=True, count_collectives=False, members=None,
        reduce_chunk_rows=None):
    """This rank's slice of ``make_global_batch(sizes, ...)`` (possibly empty) through ``group=``.

    ``timeout_s`` bounds every collective: a rank left waiting for one that never comes
    (e.g. a peer that raised before a collective) fails instead of hanging the test.
    ``blocked_tiles``: force the Triton blocked strategy with these tiles and ``weight_bytes`` of
    weights (:func:`_blocked_strategy`), and save its backward's program counts too.
    ``image_grad=False``: a frozen image tower (image_emb needs no gradient; grad_u is None).
    ``count_collectives``: save the input shapes of every reduction and all-gather the call runs.
    ``members``: the global ranks of a subgroup (``dist.new_group``) that computes the loss, ``sizes``
    and the saved files following its own ranks; a rank outside it saves the error the call raises there.
    ``reduce_chunk_rows``: the backward's rows per chunk of the text rows' gradient parts (``_REDUCE_CHUNK_ROWS``).
    """
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    try:
        import ace_kernels
        from ace_kernels import contrastive

        if backend == "triton" and _bounds.wanted():
            _bounds.install()  # this rank's launches checked as the suite's own are
        if reduce_chunk_rows is not None:
            contrastive._REDUCE_CHUNK_ROWS = reduce_chunk_rows
        group = dist.group.WORLD
        if members is not None:
            group = dist.new_group(list(members))  # every rank takes part in making it
            if rank not in members:
                try:
                    ace_kernels.label_guided_infonce(torch.zeros(1, dim), torch.zeros(1, dim), 30.0, group=group)
                    message = "no error"
                except ValueError as exc:
                    message = str(exc)
                with open(os.path.join(out_dir, f"outside{rank}.txt"), "w") as handle:
                    handle.write(message)
                dist.destroy_process_group()
                exit_now()
            rank = dist.get_rank(group)
        u, t, labels = make_global_batch(sizes, dim, with_labels)
        lo = sum(sizes[:rank])
        hi = lo + sizes[rank]
        u_local = u[lo:hi].to(dtype).requires_grad_(image_grad)
        t_local = t[lo:hi].to(dtype).requires_grad_()
        scale = torch.tensor(30.0, dtype=dtype, requires_grad=True)
        local_labels = labels[lo:hi] if labels is not None else None
        counting = contextlib.nullcontext({})
        if blocked_tiles is not None:
            counting = _blocked_strategy(dtype, dim, blocked_tiles, weight_bytes)
        elif count_collectives:
            counting = _counting_collectives()
        with counting as counts:
            loss = ace_kernels.label_guided_infonce(u_local, t_local, scale, local_labels,
                                                    group=group, backend=backend)
            loss.backward()
        torch.save({"loss": loss.detach(), "grad_u": u_local.grad, "grad_t": t_local.grad,
                    "grad_scale": scale.grad, "bounds_checked": _bounds.installed(), **counts},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    exit_now()


def gather_rows_16bit_inputs(sizes, dim, dtype, rank, world):
    """Rank ``rank``'s rows (``[sizes[rank], dim]``) and its gradient of the gathered rows
    (``[sum(sizes), dim]``) for :func:`run_gather_rows_16bit`, in ``dtype``: values in [-4, 4]
    on a grid of 2**-10 rounded to the dtype. The fp32 sum of a few is exact; a sum in 16 bits
    (fp16 keeps 2**-8 above 4, bf16 2**-5) rounds."""
    gen = torch.Generator().manual_seed(1000 * world + rank)
    rows = (torch.randint(-4096, 4097, (sizes[rank], dim), generator=gen) / 1024).to(dtype)
    grad = (torch.randint(-4096, 4097, (sum(sizes), dim), generator=gen) / 1024).to(dtype)
    return rows, grad


def run_gather_rows_16bit(rank, world, rendezvous, sizes, dim, out_dir, timeout_s):
    """The helpers that pass the rows of every rank round the ring (``_ring_all_gather``) and sum each
    rank's rows' gradient parts to it (``_reduce_to_owners``), on fp16 and bf16 rows and gradients of
    :func:`gather_rows_16bit_inputs`: saves the gathered rows, the rows each call of its ``take`` saw
    (``[(owner, rows), ...]``) and this rank's rows' gradient for each dtype. The parts are fp32
    copies of the 16-bit gradients (as both backends form fp32 parts), and the sum is rounded once,
    as the loss's backward does."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    try:
        from ace_kernels import contrastive

        saved = {}
        for dtype in (torch.float16, torch.bfloat16):
            rows, grad = gather_rows_16bit_inputs(sizes, dim, dtype, rank, world)
            taken = []
            gathered = contrastive._ring_all_gather(rows, dist.group.WORLD, tuple(sizes), rank,
                                                    lambda owner, chunk: taken.append((owner, chunk.clone())))
            mine, _ = contrastive._reduce_to_owners(lambda r0, r1: grad[r0:r1].float(), dist.group.WORLD,
                                                    tuple(sizes), rank)
            saved[str(dtype)] = {"gathered": gathered, "taken": taken, "grad": mine.to(dtype),
                                 "sum_dtype": mine.dtype}
        torch.save(saved, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    exit_now()


def _write_value_error(rank, world, rendezvous, out_dir, timeout_s, call):
    """Run ``call(ace_kernels)`` in a gloo group and write the ValueError or RuntimeError it raises
    (``<type>: <message>``, or "no error") to ``rank<r>.txt``, and the call's own seconds to
    ``rank<r>.seconds``: timed from a barrier, so that neither a loaded machine's start-up nor
    the ranks' skew counts, only a rank left waiting for a collective's timeout."""
    import ace_kernels

    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    try:
        dist.barrier()
        started = time.monotonic()
        try:
            call(ace_kernels)
            message = "no error"
        except (ValueError, RuntimeError) as exc:
            message = f"{type(exc).__name__}: {exc}"
        seconds = time.monotonic() - started
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as handle:
            handle.write(message)
        with open(os.path.join(out_dir, f"rank{rank}.seconds"), "w") as handle:
            handle.write(repr(seconds))
    finally:
        dist.destroy_process_group()
    exit_now()


def run_mismatch(rank, world, rendezvous, out_dir):
    """Ranks disagree on the embedding width: every rank must raise the same ValueError."""
    u = torch.randn(3, 8 + rank)
    _write_value_error(rank, world, rendezvous, out_dir, 60, lambda ak: ak.label_guided_infonce(
        u, u, 10.0, group=dist.group.WORLD, backend="torch"))


def run_scale_mismatch(rank, world, rendezvous, out_dir):
    """Rank 1's learnt scale is one step of an optimizer ahead (a tensor against a number): every
    rank must raise the same ValueError instead of computing a loss with its own scale."""
    u = torch.randn(3, 8)
    scale = 10.0 if rank == 0 else torch.tensor(10.5, requires_grad=True)
    _write_value_error(rank, world, rendezvous, out_dir, 60, lambda ak: ak.label_guided_infonce(
        u, u, scale, group=dist.group.WORLD, backend="torch"))


def run_grad_mismatch(rank, world, rendezvous, out_dir, timeout_s, no_grad=False):
    """The last rank's image embeddings do not require grad (an empty rank's placeholder, say):
    the backward would run other collectives there, so every rank must raise the same ValueError.
    ``no_grad``: the call under torch.no_grad(), where no backward runs and none is raised."""
    u = torch.randn(0 if rank == world - 1 else 3, 8, requires_grad=rank != world - 1)
    t = torch.randn(u.shape[0], 8, requires_grad=True)

    def call(ak):
        with torch.no_grad() if no_grad else contextlib.nullcontext():
            ak.label_guided_infonce(u, t, 10.0, group=dist.group.WORLD, backend="torch")

    _write_value_error(rank, world, rendezvous, out_dir, timeout_s, call)


def run_empty_global(rank, world, rendezvous, out_dir, timeout_s, shape=(0, 8)):
    """Every rank passes an empty local batch (``shape``: [0, D], or [B, 0] rows of no width):
    every rank must raise the same ValueError."""
    u = torch.randn(*shape, requires_grad=True)
    labels = torch.zeros(shape[0], 14, dtype=torch.int64)
    _write_value_error(rank, world, rendezvous, out_dir, timeout_s, lambda ak: ak.label_guided_infonce(
        u, u, 10.0, labels, group=dist.group.WORLD, backend="torch"))


def run_scale_grad_on_one_rank(rank, world, rendezvous, out_dir, timeout_s, backend):
    """Frozen embeddings; only rank 0 learns the logit scale (the others pass it as a number, so
    their loss has no graph). Then every rank enters one all-reduce: it must meet the others'."""
    def call(ace_kernels):
        gen = torch.Generator().manual_seed(rank)
        u = torch.nn.functional.normalize(torch.randn(3, 8, generator=gen), dim=1)
        t = torch.nn.functional.normalize(torch.randn(3, 8, generator=gen), dim=1)
        scale = torch.tensor(10.0, requires_grad=True) if rank == 0 else 10.0
        loss = ace_kernels.label_guided_infonce(u, t, scale, group=dist.group.WORLD, backend=backend)
        if loss.requires_grad:
            loss.backward()
        after = torch.full((1,), float(rank + 1))
        dist.all_reduce(after)
        if after.item() != world * (world + 1) / 2:
            raise RuntimeError(f"the all-reduce after the loss met another collective: {after.item()}")

    _write_value_error(rank, world, rendezvous, out_dir, timeout_s, call)


def run_one_bad_rank(rank, world, rendezvous, out_dir, timeout_s):
    """The last rank passes labels with the wrong number of rows: it must raise its own error
    and every other rank one naming it, at once (not after the collectives' timeout)."""
    u = torch.randn(4, 8)
    labels = torch.zeros(3 if rank == world - 1 else 4, dtype=torch.int64)
    _write_value_error(rank, world, rendezvous, out_dir, timeout_s, lambda ak: ak.label_guided_infonce(
        u, u, 10.0, labels, group=dist.group.WORLD, backend="torch"))


def run_one_rank_without_its_backend(rank, world, rendezvous, out_dir, timeout_s):
    """The last rank asks for the Triton backend, which cannot run on these float64 tensors: it
    must raise its own error and every other rank one naming it, at once."""
    u = torch.randn(4, 8, dtype=torch.float64)
    backend = "triton" if rank == world - 1 else "torch"
    _write_value_error(rank, world, rendezvous, out_dir, timeout_s, lambda ak: ak.label_guided_infonce(
        u, u, 10.0, group=dist.group.WORLD, backend=backend))


def run_backend_mismatch(rank, world, rendezvous, out_dir, timeout_s, backends):
    """Rank r asks for ``backends[r]``; ``"auto+triton"`` is ``backend="auto"`` with
    ACE_KERNELS_BACKEND=triton set on that rank alone. fp32 rows that need gradients: every rank
    must raise the same ValueError before any collective of the loss."""
    wanted = backends[rank]
    if wanted.startswith("auto+"):
        os.environ["ACE_KERNELS_BACKEND"] = wanted[len("auto+"):]
        wanted = "auto"
    gen = torch.Generator().manual_seed(rank)
    u = torch.randn(3 + rank, 16, generator=gen, requires_grad=True)
    t = torch.randn(3 + rank, 16, generator=gen, requires_grad=True)
    labels = torch.arange(3 + rank) % 2

    def call(ace_kernels):
        ace_kernels.label_guided_infonce(u, t, 10.0, labels, group=dist.group.WORLD, backend=wanted).backward()

    _write_value_error(rank, world, rendezvous, out_dir, timeout_s, call)


def run_strided_local_rows(rank, world, rendezvous, out_dir, timeout_s):
    """Rank 1's rows are a view with a row stride of 2**31 (one row: any stride is allowed), which
    the Triton kernels could not take as a batch; the gathered batch is contiguous, so every rank
    runs backend="triton" (the backend was once chosen per rank on its local rows: an error)."""
    gen = torch.Generator().manual_seed(rank)
    u = torch.randn(3, 16, generator=gen)
    if rank == 1:
        u = torch.randn(16, generator=gen).as_strided((1, 16), (2**31, 1))
    u = u.requires_grad_()

    def call(ace_kernels):
        ace_kernels.label_guided_infonce(u, u, 10.0, group=dist.group.WORLD, backend="triton").backward()

    _write_value_error(rank, world, rendezvous, out_dir, timeout_s, call)


if __name__ == "__main__":
    sys.exit("run through tests/test_contrastive_distributed.py")
