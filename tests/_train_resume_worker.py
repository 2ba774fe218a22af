"""A training run that can SIGKILL itself, launched by tests/test_resume.py.

``--kill-at-step K``: SIGKILL inside the loss of step K (mid-step, after earlier states).
``--kill-in-save K``: SIGKILL halfway through writing the state file of step K.
``--step-sleep S``: sleep S seconds per step, so the parent can kill the run from outside.
``--where``: print the file ``ace_model.training`` was imported from, and exit.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# The checkout's packages before an installed copy (an editable install of another checkout would
# otherwise be imported: the tests would run that code, not this one's).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from _train_standin import RandomPairs, make_model  # noqa: E402
from ace_model import training  # noqa: E402


def run_config(out_dir: str, kind: str, resume: str | None) -> training.TrainConfig:
    # On the CPU (one thread, see main): "auto" would take a GPU where there is one, whose atomics (the
    # attention backward's, the cuda hypergraph's) make two runs differ in their last bits; tests/test_training.py
    # resumes on a GPU with those kept out.
    return training.TrainConfig(out_dir=out_dir, model=kind, epochs=3, batch_size=4, lr=1e-2, warmup_epochs=1,
                                checkpoint_every=4, keep_checkpoints=2, progress=False, seed=7, resume=resume,
                                chunk_size=3, device="cpu")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--kind", default="standin")
    parser.add_argument("--resume", default=None)
    parser.add_argument("--kill-at-step", type=int, default=None)
    parser.add_argument("--kill-in-save", type=int, default=None)
    parser.add_argument("--step-sleep", type=float, default=0.0)
    parser.add_argument("--where", action="store_true")
    args = parser.parse_args()
    if args.where:
        print(training.__file__)
        return
    torch.set_num_threads(1)

    calls = {"n": 0}
    state = training.load_state(training.resolve_resume(args.resume, args.out)) if args.resume else None
    calls["n"] = state["step"] if state else 0

    def loss_fn(*a, **k):
        calls["n"] += 1
        if args.kill_at_step == calls["n"]:
            os.kill(os.getpid(), signal.SIGKILL)
        if args.step_sleep:
            time.sleep(args.step_sleep)
        return training._default_loss_fn()(*a, **k)

    if args.kill_in_save is not None:
        real_save = training.atomic_torch_save
        target = f"state-{args.kill_in_save:08d}.pt"

        def dying_save(obj, path):
            if os.path.basename(path) != target:
                return real_save(obj, path)
            import io

            buffer = io.BytesIO()
            torch.save(obj, buffer)
            data = buffer.getvalue()
            # What atomic_write leaves behind when killed mid-write: a partial temp file,
            # under the temp name atomic_write would give it.
            from ace_model._atomic import create_temp_file

            fd, _ = create_temp_file(path)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data[: len(data) // 2])
                handle.flush()
                os.fsync(handle.fileno())
            os.kill(os.getpid(), signal.SIGKILL)

        training.atomic_torch_save = dying_save

    model = make_model(args.kind, seed=0)
    data = RandomPairs(model, 22, seed=3)  # 5 steps per epoch, two samples dropped
    training.train(run_config(args.out, args.kind, args.resume), model=model, dataset=data, loss_fn=loss_fn)


if __name__ == "__main__":
    main()
