"""The Makefile's test-worker count (`make test` runs one pytest-xdist process per core)."""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def _workers(tmp_path, cpu_max: str | None, **env) -> int:
    args = ["make", "-s", "-C", ROOT, "print-test-workers"]
    if cpu_max is not None:
        (tmp_path / "cpu.max").write_text(cpu_max)
    args.append(f"CPU_MAX_FILE={tmp_path / 'cpu.max'}")
    run_env = {k: v for k, v in os.environ.items() if k not in ("TEST_WORKERS", "MAKEFLAGS", "MFLAGS")}
    run_env.update(env)
    out = subprocess.run(args, capture_output=True, text=True, env=run_env, timeout=60)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip())


def _expected(cores: int) -> int:
    n = min(cores, 8)
    return 0 if n < 2 else n


CORES = len(os.sched_getaffinity(0))


@pytest.mark.parametrize("cpu_max, quota", [
    (None, None),                # no cgroup v2 file: nproc alone
    ("max 100000\n", None),      # no quota
    ("garbage\n", None),         # unreadable: ignored
    ("100000 0\n", None),        # a zero period: ignored
    ("100000 100000\n", 1),      # one core: tests in this process
    ("150000 100000\n", 2),      # 1.5 cores round up to 2
    ("50000 100000\n", 1),
    ("1600000 100000\n", 16),    # more than the machine: nproc and the cap of 8 decide
])
def test_workers_follow_the_cores_and_a_cpu_quota(tmp_path, cpu_max, quota):
    cores = CORES if quota is None else min(CORES, quota)
    assert _workers(tmp_path, cpu_max) == _expected(cores)


def test_workers_ignore_omp_num_threads(tmp_path):
    # nproc follows OMP_NUM_THREADS; the worker count must not (the suite sets it for torch).
    assert _workers(tmp_path, None, OMP_NUM_THREADS="1") == _expected(CORES)


def test_workers_can_be_set(tmp_path):
    args = ["make", "-s", "-C", ROOT, "print-test-workers", "TEST_WORKERS=3"]
    assert subprocess.run(args, capture_output=True, text=True, timeout=60).stdout.strip() == "3"
