"""The global-batch InfoNCE across ranks: ``label_guided_infonce(group=)`` (issues 5 and 7).

Op ``label_guided_infonce group=``: one forward+backward of the loss of a global batch of B
rows split evenly over W ranks, against the same loss on the concatenated batch in one
process (the baseline), timed side by side in the same processes: each repetition runs the
W-rank step, then rank 0 alone runs the one-process step while the other ranks wait in a
barrier. A step's time is the slowest rank's (an all-reduce of the times).

- CPU: W = 2 gloo ranks, the torch backend in float32, B = 4096, D = 512, labels. The ranks
  share the machine's cores: each gets ``max(1, threads // W)`` torch threads (``threads``: the
  suite's ``--threads``) and the one-process step as many as the ranks together, at most
  ``threads``, so the ideal ratio is 1x: the row shows what the split and the collectives cost
  against one process on the same cores, not a speed-up. With ``--threads 1`` the ranks have a
  thread each and the one process one: ideal 2x (``metrics.ideal_speedup``). ``--quick``:
  B = 256, D = 64.
- GPU: W = every visible card (at least 2), NCCL, one card per rank, bf16, B = 65,536,
  D = 512, labels; the ideal ratio is W. With one card the family is skipped, saying so.
  This branch has not run yet: no machine lent here has two cards.

Peak memory (``peak_mib``, one call each before the timed ones, also their warm-up): above
what was live before the call, the largest rank's for the W-rank step (the gathered batch is
made inside it, so it counts) and rank 0's for the one-process step (whose whole batch is its
input, so it does not).

The check (``rel_err_vs_one_process``): the loss and every gradient (the ranks' image and
text rows concatenated, the logit scale's summed over ranks, the documented convention)
against the one-process step's, as ``harness.relative_error``. ``metrics.flops_per_rank``
counts ``10 n_r B D`` (the forward's ``2 n_r B D`` and the backward's ``8 n_r B D``).
Each rank is a process of its own (spawned, a file store for the rendezvous); the family
waits for them within a timeout and kills any left.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from datetime import timedelta

import torch

from benchmarks import harness

FAMILY = "distributed"
OP = "label_guided_infonce group="
LABELS = 14
LOGIT_SCALE = 78.35  # the released checkpoint's multiplier, as in bench_contrastive
JOIN_TIMEOUT_S = 600


def _plan(suite) -> dict | None:
    """The configuration on this machine, or None (with the reason logged) when it has none."""
    if suite.is_gpu:
        cards = torch.cuda.device_count()
        if cards < 2:
            suite.skip(OP, f"needs 2 or more CUDA devices, one per rank; this machine has {cards}")
            return None
        return dict(world=min(cards, 8), dist_backend="nccl", device="cuda", backend="auto", dtype="bfloat16",
                    batch=65536, dim=512, threads_per_rank=1, one_threads=1, warmup=1, reps=5)
    threads = torch.get_num_threads()  # the suite's --threads
    per_rank = max(1, threads // 2)
    batch, dim, reps = (256, 64, 3) if suite.quick else (4096, 512, 5)
    # The ranks' threads together, but never more than --threads: with --threads 1 (a busy machine)
    # two OpenMP threads spin against the other load, 100x slower a step, and the row flattered the ranks.
    return dict(world=2, dist_backend="gloo", device="cpu", backend="torch", dtype="float32", batch=batch, dim=dim,
                threads_per_rank=per_rank, one_threads=min(2 * per_rank, threads), warmup=0, reps=reps)


def unavailable(suite) -> bool:
    """Whether this machine cannot run the family (the reason logged): no torch.distributed, or a
    GPU run with one card. The suite's process asks before it starts the family's own, whose
    start-up (torch and CUDA, 4-5 s a family on the H200) would otherwise buy only this line."""
    import torch.distributed as dist

    if not dist.is_available():
        suite.skip(OP, "torch.distributed is not available in this build of torch")
        return True
    return suite.is_gpu and _plan(suite) is None


def ideal_speedup(plan: dict) -> float:
    """The ratio the W-rank step would reach with free collectives: W on GPUs (a card per rank);
    on a CPU the ranks' threads over the one-process step's (1 when they are the same cores)."""
    if plan["device"] == "cuda":
        return float(plan["world"])
    return plan["world"] * plan["threads_per_rank"] / plan["one_threads"]


def _global_batch(plan: dict, device: torch.device):
    """The same global batch on every rank: unit rows, 14 binary labels drawn from 32 rows (so
    that false negatives straddle ranks), the released checkpoint's multiplier."""
    gen = torch.Generator().manual_seed(0)
    batch, dim = plan["batch"], plan["dim"]
    dtype = getattr(torch, plan["dtype"])
    u = torch.nn.functional.normalize(torch.randn(batch, dim, generator=gen), dim=1).to(device, dtype)
    t = torch.nn.functional.normalize(torch.randn(batch, dim, generator=gen), dim=1).to(device, dtype)
    table = torch.randint(0, 2, (32, LABELS), generator=gen)
    labels = table[torch.randint(0, 32, (batch,), generator=gen)].to(device)
    return u, t, labels


def _sizes(batch: int, world: int) -> list[int]:
    return [batch // world + (1 if r < batch % world else 0) for r in range(world)]


def _rank_main(rank: int, world: int, rendezvous: str, plan: dict, out_dir: str) -> None:
    """One rank: ``warmup + reps`` repetitions of (the W-rank step; rank 0's one-process step);
    writes its last step's gradients, and rank 0 the times and the one-process step's results."""
    import torch.distributed as dist

    import ace_kernels

    device = torch.device("cpu") if plan["device"] == "cpu" else torch.device("cuda", rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(plan["threads_per_rank"])
    dist.init_process_group(plan["dist_backend"], init_method=rendezvous, rank=rank, world_size=world,
                            timeout=timedelta(seconds=JOIN_TIMEOUT_S // 2))
    try:
        u, t, labels = _global_batch(plan, device)
        sizes = _sizes(plan["batch"], world)
        lo = sum(sizes[:rank])
        hi = lo + sizes[rank]
        u_local = u[lo:hi].clone().requires_grad_()
        t_local = t[lo:hi].clone().requires_grad_()
        scale = torch.tensor(LOGIT_SCALE, device=device, requires_grad=True)
        leaves = (u_local, t_local, scale)
        # The one-process step's inputs: rank 0's only (it alone runs it).
        one_leaves = (u.clone().requires_grad_(), t.clone().requires_grad_(),
                      torch.tensor(LOGIT_SCALE, device=device, requires_grad=True)) if rank == 0 else ()
        del u, t  # each rank keeps its own rows only

        losses = {}  # each step's last loss

        def group_step():
            loss = ace_kernels.label_guided_infonce(u_local, t_local, scale, labels[lo:hi], group=dist.group.WORLD,
                                                    backend=plan["backend"])
            loss.backward()
            losses["group"] = loss.detach()

        def one_step():
            loss = ace_kernels.label_guided_infonce(*one_leaves, labels, backend=plan["backend"])
            loss.backward()
            losses["one"] = loss.detach()

        # Peak memory first, one call each (also a warm-up): the largest rank's, then rank 0's alone.
        dist.barrier()
        group_peak = torch.tensor([harness.peak_memory_mib(group_step, device=device, grads=leaves)],
                                  dtype=torch.float64, device=device)
        dist.all_reduce(group_peak, op=dist.ReduceOp.MAX)
        dist.barrier()
        if rank == 0:
            torch.set_num_threads(plan["one_threads"])
            one_peak = harness.peak_memory_mib(one_step, device=device, grads=one_leaves)
            torch.set_num_threads(plan["threads_per_rank"])
        dist.barrier()
        group_ms, one_ms = [], []
        for rep in range(plan["warmup"] + plan["reps"]):
            dist.barrier()
            ms = harness.time_single_call(group_step, device=device, grads=leaves)
            slowest = torch.tensor([ms], dtype=torch.float64, device=device)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            dist.barrier()
            if rank == 0:
                torch.set_num_threads(plan["one_threads"])
                ms_one = harness.time_single_call(one_step, device=device, grads=one_leaves)
                torch.set_num_threads(plan["threads_per_rank"])
            dist.barrier()
            if rep >= plan["warmup"]:
                group_ms.append(slowest.item())
                if rank == 0:
                    one_ms.append(ms_one)
        torch.save({"loss": losses["group"].cpu(), "grad_u": u_local.grad.cpu(), "grad_t": t_local.grad.cpu(),
                    "grad_scale": scale.grad.cpu()}, os.path.join(out_dir, f"rank{rank}.pt"))
        if rank == 0:
            torch.save({"loss": losses["one"].cpu(), "grad_u": one_leaves[0].grad.cpu(),
                        "grad_t": one_leaves[1].grad.cpu(), "grad_scale": one_leaves[2].grad.cpu()},
                       os.path.join(out_dir, "one.pt"))
            with open(os.path.join(out_dir, "times.json"), "w") as f:
                json.dump({"group_ms": group_ms, "one_ms": one_ms, "group_peak_mib": group_peak.item(),
                           "one_peak_mib": one_peak}, f)
    finally:
        dist.destroy_process_group()


def _spawn_ranks(plan: dict, out_dir: str) -> str | None:
    """Run the ranks; None, or why they did not all finish."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    rendezvous = f"file://{os.path.join(out_dir, f'store-{uuid.uuid4().hex}')}"
    procs = [ctx.Process(target=_rank_main, args=(rank, plan["world"], rendezvous, plan, out_dir), daemon=True)
             for rank in range(plan["world"])]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    hung = [p for p in procs if p.is_alive()]
    for proc in hung:
        proc.kill()
        proc.join()
    if hung:
        return f"{len(hung)} of {len(procs)} ranks did not finish within {JOIN_TIMEOUT_S} s"
    codes = [p.exitcode for p in procs]
    if any(codes):
        return f"ranks exited with codes {codes}"
    return None


def _results(plan: dict, out_dir: str):
    """(W-rank measurement, one-process measurement, the check's relative error)."""
    with open(os.path.join(out_dir, "times.json")) as f:
        times = json.load(f)
    ranks = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(plan["world"])]
    one = torch.load(os.path.join(out_dir, "one.pt"))
    grads = [torch.cat([r["grad_u"] for r in ranks]), torch.cat([r["grad_t"] for r in ranks]),
             sum(r["grad_scale"].float() for r in ranks)]
    ours = harness.loss_and_grads_vector(ranks[0]["loss"], grads)
    ref = harness.loss_and_grads_vector(one["loss"], [one["grad_u"], one["grad_t"], one["grad_scale"]])
    measurements = []
    for key in ("group", "one"):
        median, spread, iqr = harness.summarize(times[f"{key}_ms"])
        measurements.append(harness.Measurement(median, times[f"{key}_peak_mib"], len(times[f"{key}_ms"]), spread,
                                                iqr_ms=iqr))
    return measurements[0], measurements[1], harness.relative_error(ours, ref)


def run(suite) -> None:
    if unavailable(suite):
        return
    plan = _plan(suite)  # there is one: unavailable() said so
    world, batch, dim = plan["world"], plan["batch"], plan["dim"]
    shape = f"B={batch} D={dim} labels W={world}"
    # One repetition is about two one-process steps (the W ranks' step, then rank 0's alone):
    # a few seconds on the CPU at B = 4096; process start and imports add about 10 s a rank.
    if not suite.include(f"{OP} {shape}", costly=False, estimate_s=15 + 4 * (plan["warmup"] + plan["reps"])):
        return
    provider = f"{plan['backend']} x{world} {plan['dist_backend']}"
    baseline = f"{plan['backend']}, one process"
    print(f" {OP} {shape} {plan['dtype']}: {world} ranks ({plan['dist_backend']}, {plan['threads_per_rank']} "
          f"torch threads each) against one process ({plan['one_threads']} threads), {plan['reps']} repetitions")
    start = time.monotonic()
    with harness.temp_dir("dist") as out_dir:
        failure = _spawn_ranks(plan, out_dir)
        if failure is not None:
            suite.skip(f"{OP} {shape}", failure)
            return
        ours, base, error = _results(plan, out_dir)
    suite.log(f"  {provider}: {ours.median_ms:.3f} ms median of {ours.runs}; {baseline}: {base.median_ms:.3f} ms "
              f"({time.monotonic() - start:.1f} s)")
    sizes = _sizes(batch, world)
    metrics = {"world": world, "dist_backend": plan["dist_backend"], "threads_per_rank": plan["threads_per_rank"],
               "one_process_threads": plan["one_threads"], "flops_per_rank": 10 * max(sizes) * batch * dim,
               "ideal_speedup": ideal_speedup(plan), "rel_err_vs_one_process": error}
    suite.add_rows(family=FAMILY, op=OP, shape=shape, dtype=plan["dtype"], ours={provider: (ours, metrics)},
                   baselines={baseline: (base, {})})
