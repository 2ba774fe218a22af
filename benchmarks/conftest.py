"""pytest set-up for ``pytest benchmarks --benchmark-only`` (pytest-benchmark).

Registers the markers this directory uses (the root pytest.ini runs with
``--strict-markers``; tests/conftest.py is not loaded when only benchmarks/ is
collected). ``ACE_BENCH_THREADS=N`` sets torch's CPU threads. Unlike tests/, nothing here turns
on the Triton interpreter: interpreter timings mean nothing, so on a CPU only the torch backend and the
baselines are timed.
"""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HAS_GPU = torch.cuda.is_available()


def pytest_configure(config):
    # On a shared CPU, oversubscribed OpenMP threads spin and times explode: ACE_BENCH_THREADS=1 helps.
    threads = os.environ.get("ACE_BENCH_THREADS")
    if threads:
        if not (threads.strip().isdigit() and int(threads) >= 1):  # a usage error, not a conftest traceback
            raise pytest.UsageError(f"ACE_BENCH_THREADS: expected a positive integer (torch's CPU threads), "
                                    f"got {threads!r}")
        torch.set_num_threads(int(threads))
    for line in (
        "gpu: needs a CUDA GPU (skipped, and reported as skipped, without one)",
        "triton: runs Triton kernels (on CPU under TRITON_INTERPRET=1)",
        "slow: long CPU test, still part of CI",
    ):
        config.addinivalue_line("markers", line)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def bench_device():
    return torch.device("cuda" if HAS_GPU else "cpu")
