"""One rank of a gloo run on 127.0.0.1, launched by tests/test_training_distributed.py.

The launcher sets MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE and LOCAL_RANK as torchrun
does. Every mode builds the model as the test does, its zero-initialised trainables (LoRA B)
perturbed (``make_model(..., perturb=True)``) so that ``lora_a`` has gradients to compare. Modes:

- ``step``: one chunked step on this rank's slice of a global batch (dropout on, per-rank
  seed 100 + rank), gradients summed over ranks; saves loss and gradients.
- ``train``: ``ace_model.training.train`` for a few steps (dropout off, ``--loss-scope``); rank 0 saves the
  final trainable parameters.
- ``mismatch``: rank 1 passes a smaller batch to a step, then a different lr to train(), then a
  different loss scope; saves the error each rank got for each.
- ``resume_mismatch``: a short train() run with checkpoints; then rank 0 resumes it while rank
  1 starts afresh; then rank 1 alone asks for a batch that does not divide over the ranks;
  then both resume at the same step, rank 1 from a state whose weights differ; then both resume a
  copy of its state made out as one process's (its world size and RNG states), then its own state
  with another loss scope; saves the error each rank got for each.
- ``resume_exact``: with dropout on, a run stopped on every rank after its first checkpoint and
  resumed, and one run through; rank 0 saves both runs' losses.
- ``frozen_text_tower``: train() as ``train`` (global loss) with the text tower frozen, rank 0
  chunked and rank 1 running the one-pass step; rank 0 saves the final trainable parameters.
- ``rank_failures``: a run whose checkpoint write fails on rank 0 (a full disk, simulated);
  then a run whose set-up fails on rank 1 alone (no dataset and no CSV); then runs where rank 0
  cannot write the run directory (its config.json, then its metrics file), rank 1 cannot load
  its second batch or start its loader, rank 0 cannot write the final weights; saves the error
  each rank got for each. The group's timeout is short, so that a rank left waiting fails the test
  in seconds rather than hanging it.
- ``step_time``: ``train`` (global loss) where every rank's clock of train() moves ``--clock-step`` seconds at
  each reading of ``time.perf_counter`` (:class:`_SteppingClock`), so that each step takes that long.
- ``read_only_out_dir``: ``train`` (global loss) where rank 1's view of the run directory is read-only (a
  mount that only rank 0's node may write); rank 0 saves the final trainable parameters.
- ``last_state``: a complete run (each rank saves the paths train() returned), then one whose loss turns
  NaN at step 4, after the checkpoint of step 3; saves the error each rank got.
- ``early_failure_joined``, ``early_failure_created``: a rank whose own settings fail train()'s first checks
  (before the set-up): rank 0's device, in a group of the worker's; rank 1's chunk_size (validate()), in the
  group train() creates (as under torchrun); saves the error each rank got (the group's timeout is short).
"""

from __future__ import annotations

import argparse
import datetime
import errno
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# The checkout's packages before an installed copy (an editable install of another checkout would
# otherwise be imported: the tests would run that code, not this one's).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import ace_kernels  # noqa: E402
from _dist_exit import exit_now  # noqa: E402
from _train_standin import RandomPairs, make_batch, make_model, trainable_grads  # noqa: E402
from ace_model import training  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", required=True)
    parser.add_argument("--kind", default="standin")
    parser.add_argument("--out", required=True)
    parser.add_argument("--global-batch", type=int, default=10)
    parser.add_argument("--chunk", type=int, default=2)
    parser.add_argument("--loss-scope", default="global")
    parser.add_argument("--clock-step", type=float, default=0.25)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])

    if args.mode in ("step", "mismatch"):
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
        model = make_model(args.kind, seed=0, dropout=0.3, perturb=True)
        images, token_ids, labels = make_batch(model, args.global_batch, seed=1)
        local = args.global_batch // world
        lo, hi = rank * local, (rank + 1) * local
        if args.mode == "mismatch" and rank == 1:
            hi -= 1
        torch.manual_seed(100 + rank)
        params = [p for _, p in training.trainable_named_parameters(model)]
        try:
            loss = training.chunked_train_step(model, images[lo:hi], token_ids[lo:hi], labels[lo:hi],
                                               chunk_size=args.chunk, group=dist.group.WORLD)
            training.sync_gradients(params, dist.group.WORLD)
            torch.save({"loss": loss, "grads": trainable_grads(model)}, os.path.join(args.out, f"rank{rank}.pt"))
        except training.RankMismatchError as exc:
            with open(os.path.join(args.out, f"rank{rank}-batch.err"), "w") as handle:
                handle.write(str(exc))
        if args.mode == "mismatch":
            # Equal batches, but rank 1 computes its loss alone: rank 0 would wait in the loss's collectives.
            _record_error(args, rank, "step-scope", lambda: training.chunked_train_step(
                model, images[rank * local:(rank + 1) * local], token_ids[rank * local:(rank + 1) * local],
                labels[rank * local:(rank + 1) * local], chunk_size=args.chunk, group=dist.group.WORLD,
                loss_scope="local" if rank == 1 else "global"))
            _train_run(args, rank, lr=2e-2 if rank == 1 else 1e-2)  # joins the existing group
            _record_error(args, rank, "scope", lambda: _train_run(args, rank, lr=1e-2, raise_errors=True,
                                                                   loss_scope="local" if rank == 1 else "global"))
        dist.destroy_process_group()
        return
    if args.mode == "resume_mismatch":
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
        _train_run(args, rank, lr=1e-2)
        # Rank 1 starts afresh, as on a node without the shared directory (where nothing would be
        # overwritten: here the directory is shared, so it says overwrite).
        for what, overrides in (("resume", {"resume": "auto"} if rank == 0 else {"overwrite": True}),
                                ("setup", {"batch_size": 7 if rank == 1 else 8, "out_dir": os.path.join(args.out,
                                                                                                      "run2")})):
            try:
                _train_run(args, rank, lr=1e-2, raise_errors=True, **overrides)
                message = "no error"
            except (training.RankMismatchError, ValueError) as exc:
                message = str(exc)
            with open(os.path.join(args.out, f"rank{rank}-{what}.err"), "w") as handle:
                handle.write(message)
        # Both resume at the same step, rank 1 from a copy of the state whose weights differ (as
        # another run's state of that step would): each rank loads its own, so this is caught.
        latest = training.resolve_resume("auto", os.path.join(args.out, "run"))
        other = os.path.join(args.out, "other-state.pt")
        if rank == 0:
            state = training.load_state(latest)
            first = next(iter(state["trainable"]))
            state["trainable"][first] = state["trainable"][first] + 1e-3
            torch.save(state, other)
        dist.barrier()
        try:
            _train_run(args, rank, lr=1e-2, raise_errors=True, resume=str(latest if rank == 0 else other))
            message = "no error"
        except training.RankMismatchError as exc:
            message = str(exc)
        with open(os.path.join(args.out, f"rank{rank}-weights.err"), "w") as handle:
            handle.write(message)
        # A state as one process writes it, beside the run's own (so that it continues that run).
        one_process = os.path.join(args.out, "run", "checkpoints", "state-one-process.pt")
        if rank == 0:
            state = training.load_state(latest)
            state["world_size"], state["rng"] = 1, state["rng"][:1]
            torch.save(state, one_process)
        dist.barrier()
        _record_error(args, rank, "world", lambda: _train_run(args, rank, lr=1e-2, raise_errors=True,
                                                               resume=one_process))
        _record_error(args, rank, "scope", lambda: _train_run(args, rank, lr=1e-2, raise_errors=True, resume="auto",
                                                               loss_scope="local"))
        dist.destroy_process_group()
        return
    if args.mode == "resume_exact":
        # Dropout on: every rank draws its own masks, and a resume must restore each rank's own
        # generator. A run stopped on every rank after its first checkpoint, then resumed, against
        # one that ran through; rank 0 saves both runs' losses.
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
        losses = {}
        for name in ("through", "resumed"):
            out_dir = os.path.join(args.out, name)
            if name == "resumed":
                checkpoint, calls = training._checkpoint, []

                def stop_after_the_first(*a, **k):
                    result = checkpoint(*a, **k)
                    calls.append(1)
                    if len(calls) == 1:
                        raise _Stopped
                    return result

                training._checkpoint = stop_after_the_first
                try:
                    _train_run(args, rank, lr=1e-2, raise_errors=True, dropout=0.3, out_dir=out_dir)
                except _Stopped:
                    pass
                finally:
                    training._checkpoint = checkpoint
                _train_run(args, rank, lr=1e-2, raise_errors=True, dropout=0.3, out_dir=out_dir, resume="auto")
            else:
                _train_run(args, rank, lr=1e-2, raise_errors=True, dropout=0.3, out_dir=out_dir)
            losses[name] = [r["loss"] for r in training.read_metrics(os.path.join(out_dir, "metrics.jsonl"))]
        if rank == 0:
            torch.save(losses, os.path.join(args.out, "losses.pt"))
        dist.destroy_process_group()
        return
    if args.mode == "rank_failures":
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
        save_checkpoint = training.save_checkpoint
        if rank == 0:
            def full_disk(*args, **kwargs):
                raise OSError(errno.ENOSPC, "No space left on device (simulated)")

            training.save_checkpoint = full_disk
        _record_error(args, rank, "write", lambda: _train_run(args, rank, lr=1e-2, raise_errors=True))
        training.save_checkpoint = save_checkpoint
        _record_error(args, rank, "build", lambda: _train_run(args, rank, lr=1e-2, raise_errors=True,
                                                               without_dataset=rank == 1,
                                                               out_dir=os.path.join(args.out, "run2")))
        # Rank 0 cannot write the run directory; then rank 1 cannot load the batch of step 2; then
        # rank 0 cannot write the final ace_lora.pt.
        failures = {"prepare": (0, "atomic_write_text"), "metrics": (0, "_open_metrics_for_append"),
                    "load": (1, "_load_batches"), "start": (1, "_load_batches"), "final": (0, "_atomic_reference_save")}
        for number, (what, (failing_rank, name)) in enumerate(failures.items(), start=3):
            original = getattr(training, name)
            if rank == failing_rank:
                setattr(training, name, _failing(name, original, at_start=what == "start"))
            _record_error(args, rank, what, lambda: _train_run(args, rank, lr=1e-2, raise_errors=True,
                                                              out_dir=os.path.join(args.out, f"run{number}")))
            setattr(training, name, original)
        dist.destroy_process_group()
        return
    if args.mode == "step_time":
        training.time = _SteppingClock(args.clock_step)
        _train_run(args, rank, lr=1e-2, raise_errors=True)
        return
    if args.mode == "read_only_out_dir":
        if rank == 1:
            _read_only_below(args.out)
        _train_run(args, rank, lr=1e-2, raise_errors=True)
        return
    if args.mode == "last_state":
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
        model = make_model(args.kind, seed=0, perturb=True)
        # On the CPU whatever the machine has, as in _train_run (device "auto" puts rank 1 on cuda:1).
        settings = dict(model=args.kind, epochs=2, batch_size=8, checkpoint_every=3, progress=False, seed=3,
                        lr=1e-2, dist_timeout_s=30, device="cpu")
        result = training.train(training.TrainConfig(out_dir=os.path.join(args.out, "run"), **settings), model=model,
                                 dataset=RandomPairs(model, 20, seed=2))
        torch.save({key: result[key] for key in ("state", "reference")}, os.path.join(args.out, f"rank{rank}.pt"))
        calls = []

        def nan_at_step_4(image_emb, text_emb, logit_scale, labels=None, group=None):
            calls.append(1)
            loss = ace_kernels.label_guided_infonce(image_emb, text_emb, logit_scale, labels, group=group)
            return loss * float("nan") if len(calls) == 4 else loss

        model = make_model(args.kind, seed=0, perturb=True)
        _record_error(args, rank, "nan", lambda: training.train(
            training.TrainConfig(out_dir=os.path.join(args.out, "run2"), **settings), model=model,
            dataset=RandomPairs(model, 20, seed=2), loss_fn=nan_at_step_4))
        dist.destroy_process_group()
        return
    if args.mode == "early_failure_joined":
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=20))
        _record_error(args, rank, "device", lambda: _train_run(args, rank, lr=1e-2, raise_errors=True,
                                                                device="cuda:99" if rank == 0 else "cpu"))
        dist.destroy_process_group()
        return
    if args.mode == "early_failure_created":
        _record_error(args, rank, "created", lambda: _train_run(args, rank, lr=1e-2, raise_errors=True,
                                                                 dist_timeout_s=20,
                                                                 chunk_size=0 if rank == 1 else args.chunk))
        return
    if args.mode == "frozen_text_tower":
        # Ranks may differ in chunk_size: rank 0 chunked, rank 1 the one-pass step, text tower frozen.
        _train_run(args, rank, lr=1e-2, raise_errors=True, freeze="text_head",
                   chunk_size=args.chunk if rank == 0 else None)
        return
    _train_run(args, rank, lr=1e-2, loss_scope=args.loss_scope)


def _failing(name, original, at_start=False):
    """``original`` made to fail as a full disk (writes; the metrics file is /dev/full, whose
    flush and close both fail), an unreadable image (the loader, at its second batch) or loader
    workers that cannot start (``at_start``) would."""
    if name == "_load_batches":
        def load(*args, **kwargs):
            if at_start:
                raise OSError(errno.EMFILE, "too many open files (simulated)")
            return _second_fails(original(*args, **kwargs))

        return load
    if name == "_open_metrics_for_append":
        return lambda path: open("/dev/full", "a", encoding="utf-8")

    def write(*args, **kwargs):
        path = str(args[1] if len(args) > 1 else "")
        if name == "_atomic_reference_save" and not path.endswith("ace_lora.pt"):
            return original(*args, **kwargs)  # the checkpoints' copies are written; the final one fails
        raise OSError(errno.ENOSPC, "No space left on device (simulated)")

    return write


class _SteppingClock:
    """The ``time`` module as train() sees it, but for ``perf_counter``, which moves ``step_s``
    seconds at each reading (train() reads it at the start and the end of each step)."""

    def __init__(self, step_s: float):
        self.step_s, self.now = step_s, 0.0

    def perf_counter(self) -> float:
        self.now += self.step_s
        return self.now

    def __getattr__(self, name):
        return getattr(time, name)


def _read_only_below(root: str) -> None:
    """This process may not create folders below ``root`` (as on a read-only mount); the only creation
    train() attempts on a rank that writes nothing is its probe of the run directory."""
    make_folder = tempfile.mkdtemp

    def refuse(*args, **kwargs):
        where = os.path.abspath(str(kwargs.get("dir") or ""))
        if where == os.path.abspath(root) or where.startswith(os.path.abspath(root) + os.sep):
            raise OSError(errno.EROFS, "Read-only file system (simulated)")
        return make_folder(*args, **kwargs)

    tempfile.mkdtemp = refuse


def _second_fails(batches):
    yield next(batches)
    raise OSError(errno.EIO, "cannot read image (simulated)")


def _record_error(args, rank: int, what: str, run) -> None:
    try:
        run()
        message = "no error"
    except Exception as exc:  # noqa: BLE001 - the test reads which error each rank got
        message = f"{type(exc).__name__}: {exc}"
    with open(os.path.join(args.out, f"rank{rank}-{what}.err"), "w") as handle:
        handle.write(message)


class _Stopped(Exception):
    pass


def _train_run(args, rank: int, lr: float, raise_errors: bool = False, without_dataset: bool = False,
               dropout: float = 0.0, freeze: str | None = None, **overrides) -> None:
    model = make_model(args.kind, seed=0, dropout=dropout, perturb=True)
    if freeze is not None:
        getattr(model, freeze).requires_grad_(False)
    # Without a dataset (and with no CSV configured) train() fails while building one.
    data = None if without_dataset else RandomPairs(model, 20, seed=2)
    # The ranks train on the CPU over gloo whatever the machine has: device "auto" would put rank r on
    # cuda:r over NCCL (a one-GPU machine has no cuda:1), and the tests compare with one process on the CPU.
    settings = dict(out_dir=os.path.join(args.out, "run"), model=args.kind, epochs=2, batch_size=8,
                    chunk_size=args.chunk, checkpoint_every=3, progress=False, seed=3, dist_timeout_s=60, lr=lr,
                    device="cpu")
    config = training.TrainConfig(**{**settings, **overrides})
    try:
        training.train(config, model=model, dataset=data)
    except training.RankMismatchError as exc:
        if raise_errors:
            raise
        with open(os.path.join(args.out, f"rank{rank}-config.err"), "w") as handle:
            handle.write(str(exc))
        return
    if rank == 0:
        torch.save({n: p.detach() for n, p in training.trainable_named_parameters(model)},
                   os.path.join(args.out, "final.pt"))


if __name__ == "__main__":
    main()
    exit_now()
