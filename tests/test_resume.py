"""Exact resume: a run killed with SIGKILL and resumed gives the uninterrupted run's losses.

Every run is a subprocess (tests/_train_resume_worker.py, one thread, dropout on, chunked
steps, 3 epochs of 5 steps, a state every 4 steps, the last 2 kept). Because each run
restores parameters, optimizer, scheduler, data order and every RNG, the comparison is
exact: the same operations on the same numbers in one process configuration.

Training is deterministic from the seed, so a "resume" that loaded nothing and ran again from
step 0 would also end with the uninterrupted run's losses (read_metrics keeps the last record
of each step). Each test therefore also checks that the resumed process started at the step of
the state on disk when the run was killed and wrote only the steps after it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ace_model.training import load_state, read_metrics, resolve_resume
from _train_standin import tiny_available

WORKER = Path(__file__).with_name("_train_resume_worker.py")
KIND = "tiny" if tiny_available() else "standin"
TOTAL_STEPS = 15
RUN_TIMEOUT_S = 240


pytestmark = pytest.mark.usefixtures("one_thread")


def _run(out: Path, *extra: str, expect_kill: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(WORKER), "--out", str(out), "--kind", KIND, *extra],
                          env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    if expect_kill:
        assert done.returncode == -signal.SIGKILL, f"expected SIGKILL, got {done.returncode}:\n{done.stderr[-3000:]}"
    else:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    _run(out)
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, TOTAL_STEPS + 1))
    return out, records


def _final_weights(out: Path) -> dict:
    return torch.load(out / "ace_lora.pt", map_location="cpu", weights_only=True)


def _state_on_disk(out: Path, resume: str) -> dict:
    """The state a resume with ``resume`` will load, read before it runs: its path, step and
    the segment (process) that wrote it."""
    path = resolve_resume(resume, out)
    state = load_state(path)
    return {"path": str(path), "step": state["step"], "segment": state["segment"]}


def _assert_resumed_from(out: Path, saved: dict):
    """The resuming process continued from ``saved``: its resume line names that state and its
    step, and the records it wrote (those after its line, its own segment) are exactly the
    steps after that state, each once."""
    lines = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:  # a line torn by the kill
            continue
    starts = [i for i, record in enumerate(lines) if "event" in record]
    resume_event = lines[starts[-1]]
    assert resume_event["event"] == "resume", resume_event
    assert resume_event["from"] == saved["path"] and resume_event["from_segment"] == saved["segment"]
    assert resume_event["step"] == saved["step"], "the resumed run did not start at the step of the state it loaded"
    assert resume_event["segment"] != saved["segment"]  # a new process's stretch
    written = [record["step"] for record in lines[starts[-1] + 1:] if "event" not in record]
    assert written == list(range(saved["step"] + 1, TOTAL_STEPS + 1)), written


def _assert_same_run(out: Path, uninterrupted):
    reference_dir, reference = uninterrupted
    resumed = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, TOTAL_STEPS + 1))
    for got, want in zip(resumed, reference, strict=True):
        # Exact: same data, same masks, same optimizer state, same thread count.
        assert (got["step"], got["loss"], got["lr"]) == (want["step"], want["loss"], want["lr"])
    assert_equal_nested(_final_weights(out), _final_weights(reference_dir))


def assert_equal_nested(got, want):
    if isinstance(want, dict):
        assert got.keys() == want.keys()
        for key in want:
            assert_equal_nested(got[key], want[key])
    elif isinstance(want, torch.Tensor):
        assert torch.equal(got, want)
    else:
        assert got == want


def test_the_worker_runs_this_checkouts_code(tmp_path):
    """The worker is a script (its sys.path starts at tests/): it must import the ace_model of the
    checkout under test, not an installed copy of another checkout, or these tests check that one."""
    from ace_model import training

    where = _run(tmp_path, "--where").stdout.strip().splitlines()[-1]
    assert os.path.samefile(where, training.__file__), (where, training.__file__)


def test_sigkill_mid_step_then_resume_matches(tmp_path, uninterrupted):
    _run(tmp_path, "--kill-at-step", "11", expect_kill=True)
    # Killed inside step 11: steps 1-10 logged, states 4 and 8 on disk, 8 the latest.
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == list(range(1, 11))
    assert json.loads((tmp_path / "checkpoints" / "latest").read_text())["step"] == 8
    lines_before = (tmp_path / "metrics.jsonl").read_text()
    saved = _state_on_disk(tmp_path, "auto")
    assert saved["step"] == 8 and saved["path"].endswith("state-00000008.pt")

    _run(tmp_path, "--resume", "auto")
    assert (tmp_path / "metrics.jsonl").read_text().startswith(lines_before)  # nothing written is lost
    _assert_resumed_from(tmp_path, saved)
    _assert_same_run(tmp_path, uninterrupted)


def test_sigkill_while_writing_a_state_keeps_the_previous_one(tmp_path, uninterrupted):
    _run(tmp_path, "--kill-in-save", "8", expect_kill=True)
    ckpt = tmp_path / "checkpoints"
    # The half-written state never got its final name; 'latest' still names step 4.
    assert not (ckpt / "state-00000008.pt").exists()
    assert [n for n in os.listdir(ckpt) if n.startswith(".state-00000008.pt.")], "the kill left a temp file"
    assert json.loads((ckpt / "latest").read_text())["step"] == 4
    saved = _state_on_disk(tmp_path, str(ckpt))
    assert saved["step"] == 4 and saved["path"].endswith("state-00000004.pt")

    _run(tmp_path, "--resume", str(ckpt))
    _assert_resumed_from(tmp_path, saved)
    assert not [n for n in os.listdir(ckpt) if n.endswith(".tmp")], "stale temp files are cleared on start"
    _assert_same_run(tmp_path, uninterrupted)


def test_sigkill_from_outside_at_an_arbitrary_moment(tmp_path, uninterrupted):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(WORKER), "--out", str(tmp_path), "--kind", KIND,
                             "--step-sleep", "0.15"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    latest = tmp_path / "checkpoints" / "latest"
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.25)  # somewhere inside the following steps
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    saved = _state_on_disk(tmp_path, "auto")
    _run(tmp_path, "--resume", "auto")
    _assert_resumed_from(tmp_path, saved)
    _assert_same_run(tmp_path, uninterrupted)
