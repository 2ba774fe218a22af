"""Exact resume: a run killed with SIGKILL and resumed gives the uninterrupted run's losses.

Every run is a subprocess (tests/_train_resume_worker.py, one thread, dropout on, chunked
steps, 3 epochs of 5 steps, a state every 4 steps, the last 2 kept). Because each run
restores parameters, optimizer, scheduler, data order and every RNG, the comparison is
exact: the same operations on the same numbers in one process configuration.
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

from ace_model.training import load_state, read_metrics
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


def _assert_same_run(out: Path, uninterrupted):
    reference_dir, reference = uninterrupted
    resumed = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, TOTAL_STEPS + 1))
    for got, want in zip(resumed, reference):
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


def _events(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if "event" in line]


def test_sigkill_mid_step_then_resume_matches(tmp_path, uninterrupted):
    _run(tmp_path, "--kill-at-step", "11", expect_kill=True)
    # Killed inside step 11: steps 1-10 logged, states 4 and 8 on disk, 8 the latest.
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == list(range(1, 11))
    assert json.loads((tmp_path / "checkpoints" / "latest").read_text())["step"] == 8
    lines_before = (tmp_path / "metrics.jsonl").read_text()

    _run(tmp_path, "--resume", "auto")
    assert (tmp_path / "metrics.jsonl").read_text().startswith(lines_before)  # nothing written is lost
    resume_event = _events(tmp_path)[-1]
    assert resume_event["event"] == "resume" and resume_event["from"].endswith("state-00000008.pt")
    _assert_same_run(tmp_path, uninterrupted)


def test_sigkill_while_writing_a_state_keeps_the_previous_one(tmp_path, uninterrupted):
    _run(tmp_path, "--kill-in-save", "8", expect_kill=True)
    ckpt = tmp_path / "checkpoints"
    # The half-written state never got its final name; 'latest' still names step 4.
    assert not (ckpt / "state-00000008.pt").exists()
    assert [n for n in os.listdir(ckpt) if n.startswith(".state-00000008.pt.")], "the kill left a temp file"
    assert json.loads((ckpt / "latest").read_text())["step"] == 4
    assert load_state(ckpt / "state-00000004.pt")["step"] == 4

    _run(tmp_path, "--resume", str(ckpt))
    assert _events(tmp_path)[-1]["from"].endswith("state-00000004.pt")
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
    _run(tmp_path, "--resume", "auto")
    _assert_same_run(tmp_path, uninterrupted)
