"""Test-suite set-up.

On a machine without a CUDA GPU the Triton kernels run under the interpreter,
which reads TRITON_INTERPRET when the kernels are decorated: so it is set here,
before anything imports ace_kernels.
"""

import contextlib
import faulthandler
import math
import os

import pytest
import torch

# A test still running after ACE_TEST_TIMEOUT_S seconds (default below; 0: no limit) is taken for hung,
# a deadlocked collective or a child that never ends: its process writes every thread's traceback
# to stderr and exits, which fails it (pytest-xdist reports that its worker crashed while running
# that test, and starts another) instead of holding CI to CI's own limit with no word of where.
# The slowest test, the InfoNCE kernels' sm_90a spill check, took up to 474 s on 2 cores.
DEFAULT_TEST_TIMEOUT_S = 1800.0

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import _bounds  # noqa: E402
import ace_kernels  # noqa: E402  (after TRITON_INTERPRET)

TRITON_RUNS = "triton" in ace_kernels.available_backends()
# Every load and store of an interpreted kernel is checked against its tensor arguments' storages
# (tests/_bounds.py); ACE_TEST_BOUNDS=0 turns that off, e.g. to time the kernels alone. Worker
# processes that run Triton kernels install it too (tests/_contrastive_dist_worker.py).
BOUNDS_CHECK = TRITON_RUNS and _bounds.wanted()
if BOUNDS_CHECK:
    _bounds.install()
CUDA_EXT_RUNS = "cuda" in ace_kernels.available_backends()


def _real_cuda_context_for_fakes_of_present_cards_only():
    """Tests make fake CUDA tensors (FakeTensorMode) on cards a machine may lack, cuda:1 to cuda:4, to check
    what the ops say about them. Where CUDA is available, torch 2.11's FakeTensor allocates one real element on
    each fake tensor's card first (fake_tensor.init_gpu_context): on a machine with fewer cards that raised
    "invalid device ordinal". That allocation is skipped for a card past torch.cuda.device_count(), where it
    could only fail; a present card's, and every other use of fake tensors, are as torch has them."""
    from torch._subclasses import fake_tensor

    init = getattr(fake_tensor, "init_gpu_context", None)
    if init is None or getattr(init, "_present_cards_only", False):
        return

    def init_present_cards_only(device):
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            return None
        return init(device)

    init_present_cards_only._present_cards_only = True
    fake_tensor.init_gpu_context = init_present_cards_only


_real_cuda_context_for_fakes_of_present_cards_only()


def _test_timeout_s() -> float:
    said = os.environ.get("ACE_TEST_TIMEOUT_S", "").strip()
    if not said:
        return DEFAULT_TEST_TIMEOUT_S
    try:
        seconds = float(said)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds >= 0):  # a usage error, not a conftest traceback
        raise pytest.UsageError(f"ACE_TEST_TIMEOUT_S: expected a number of seconds, 0 for no limit, got {said!r}")
    return seconds


def _threads_per_worker(threads: int, workers: int) -> int:
    """Torch threads for each of ``workers`` test processes that share ``threads``."""
    return max(1, threads // workers) if workers > 1 else threads


def pytest_configure(config):
    config.ace_timeout_s = _test_timeout_s()
    # pytest-xdist's workers share the cores, and torch's default thread count counts all of them in
    # each worker. With 2 workers on 2 cores, each worker's 2 OpenMP threads spin against the other: the demo
    # (tests/test_cli.py) took 255 s in CI's tests, 26 s alone, and 69 s beside one busy process with
    # 2 threads against 31 s with 1.
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT", "")
    if workers.isdigit():
        torch.set_num_threads(_threads_per_worker(torch.get_num_threads(), int(workers)))
    if config.ace_timeout_s > 0:
        # The terminal's stderr, kept now: while a test runs, pytest captures file descriptor 2 into a
        # file that an exiting process would take with it.
        config.ace_timeout_stderr = os.dup(2)
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped, and reported as skipped, without one)")
    config.addinivalue_line("markers", "triton: runs Triton kernels (on CPU under TRITON_INTERPRET=1)")
    config.addinivalue_line("markers", "slow: long CPU test, still part of CI")
    config.addinivalue_line("markers", "not_poisoned(reason): runs without the poisoned_empty fixture of its module")
    config.addinivalue_line("markers", "interpreter: runs Triton kernels on CPU tensors, which only the interpreter "
                                       "takes (skipped on a CUDA machine, where the tests taking the `device` "
                                       "fixture run the same kernels on the GPU)")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_triton = pytest.mark.skip(reason="triton cannot run here: " + "; ".join(
        ace_kernels.available_backends(reasons=True)["triton"]))
    skip_interpreter = pytest.mark.skip(reason="CPU tensors through the Triton kernels need the interpreter, "
                                               "which is off on a CUDA machine")
    for item in items:
        if "interpreter" in item.keywords and HAS_GPU:
            item.add_marker(skip_interpreter)
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip_gpu)
        if "triton" in item.keywords and not TRITON_RUNS:
            item.add_marker(skip_triton)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """The test's set-up, call and tear-down, ended past ACE_TEST_TIMEOUT_S seconds (see above)."""
    stderr = getattr(item.config, "ace_timeout_stderr", None)
    if stderr is not None:
        faulthandler.dump_traceback_later(item.config.ace_timeout_s, exit=True, file=stderr)
    try:
        yield
    finally:
        if stderr is not None:
            faulthandler.cancel_dump_traceback_later()


@pytest.fixture
def device():
    return torch.device("cuda" if HAS_GPU else "cpu")


@contextlib.contextmanager
def poisoning_empty():
    """Every uninitialised tensor made inside is filled with NaN (the largest value for integers).

    torch's own ``fill_uninitialized_memory``, which needs ``use_deterministic_algorithms`` (here
    warn_only, so that no op is refused): a kernel or launcher that reads memory nothing wrote, e.g. a
    partial sum that a skipped program never stored, then gives NaN, where a fresh CPU allocation (zeros)
    would hide it. The settings before are restored after."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.utils.deterministic.fill_uninitialized_memory = before[2]


@pytest.fixture
def poisoned_empty(request):
    """The test runs under :func:`poisoning_empty`, unless it is marked ``not_poisoned``: the tests of
    the hypergraph's atomic scatter, which its Triton backend leaves for the deterministic one under
    that setting (as torch's own ops with a deterministic path do)."""
    if request.node.get_closest_marker("not_poisoned") is not None:
        yield
        return
    with poisoning_empty():
        yield


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-model tests.

    Tiny matmuls gain nothing from threads, and on a shared 2-core runner extra
    threads make each step 10-50x slower. Restored for the other modules.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def one_rank_group():
    """A default gloo group of this process alone (an in-memory store), removed afterwards."""
    import datetime

    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group set up already")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()
