"""The test suite's own set-up (tests/conftest.py): the time limit of one test, torch's threads; and a rule
of its comparisons."""

import ast
import glob
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pytest(tmp_path, tests: str, limit: str, **env_extra: str) -> subprocess.CompletedProcess:
    """``tests`` (a test module's text) run by pytest in one process under this suite's conftest,
    with ACE_TEST_TIMEOUT_S=``limit`` and ``env_extra``."""
    for name in ("conftest.py", "_bounds.py"):  # the conftest and the module it installs
        shutil.copy(os.path.join(ROOT, "tests", name), tmp_path / name)
    (tmp_path / "test_limit.py").write_text(tests)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST", "PYTEST_CURRENT"))}
    env.update(ACE_TEST_TIMEOUT_S=limit, PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""), **env_extra)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_a_test_past_the_limit_fails_with_every_threads_traceback_and_each_test_has_its_own(tmp_path):
    """A hung test ends at ACE_TEST_TIMEOUT_S: its process writes the tracebacks (to the terminal's
    stderr, not pytest's capture of it) and exits 1; two tests that each stay under the limit, but
    not together, both pass (the limit is one test's)."""
    tests = ("import pathlib, time\n"
             "def test_a():\n    time.sleep(2.5)\n    pathlib.Path('a.done').touch()\n"
             "def test_b():\n    time.sleep(2.5)\n    pathlib.Path('b.done').touch()\n"
             "def test_hung():\n    time.sleep(60)\n")
    proc = _pytest(tmp_path, tests, "4")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    said = proc.stderr
    assert "Timeout (0:00:04)!" in said and "test_limit.py\", line 9 in test_hung" in said, said[-3000:]
    assert (tmp_path / "a.done").exists() and (tmp_path / "b.done").exists()


def test_a_limit_of_zero_sets_none(tmp_path):
    proc = _pytest(tmp_path, "def test_fine():\n    pass\n", "0")
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.parametrize("limit", ["abc", "-1", "nan"])
def test_a_limit_that_is_no_number_of_seconds_is_a_usage_error_naming_the_variable(tmp_path, limit):
    proc = _pytest(tmp_path, "def test_fine():\n    pass\n", limit)
    assert proc.returncode == 4, proc.stdout[-3000:] + proc.stderr[-3000:]
    said = proc.stdout + proc.stderr
    assert f"ACE_TEST_TIMEOUT_S: expected a number of seconds, 0 for no limit, got {limit!r}" in said, said[-3000:]
    assert "Traceback" not in said, said[-3000:]


@pytest.mark.parametrize("threads,workers,each", [(8, 0, 8), (8, 1, 8), (8, 2, 4), (8, 3, 2), (2, 2, 1), (1, 4, 1)])
def test_the_workers_of_a_parallel_run_share_the_threads(threads, workers, each):
    from conftest import _threads_per_worker

    assert _threads_per_worker(threads, workers) == each


@pytest.mark.parametrize("workers", [None, "2"])
def test_each_worker_of_a_parallel_run_sets_torchs_threads_to_its_share(tmp_path, workers):
    """Each of pytest-xdist's W workers (PYTEST_XDIST_WORKER_COUNT, which xdist sets in them) takes
    torch's default thread count divided by W, at least 1; one process keeps the default."""
    default = int(subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                                 capture_output=True, text=True, check=True, timeout=120).stdout)
    threads = max(1, default // int(workers)) if workers else default
    extra = {"PYTEST_XDIST_WORKER_COUNT": workers} if workers else {}
    tests = f"import torch\ndef test_threads():\n    assert torch.get_num_threads() == {threads}\n"
    proc = _pytest(tmp_path, tests, "0", **extra)
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_poisoning_empty_fills_what_nothing_wrote_and_restores_the_settings():
    from conftest import poisoning_empty

    before = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    with poisoning_empty():
        assert torch.empty(3).isnan().all() and torch.empty(2, 2, dtype=torch.float16).isnan().all()
        assert torch.empty(2, dtype=torch.int64).tolist() == [2**63 - 1] * 2
        assert torch.zeros(3).new_empty(2).isnan().all() and torch.empty_like(torch.zeros(4)).isnan().all()
        # A partial sum that one program never stored: NaN, not the zeros a fresh allocation may hold.
        partials = torch.empty(3)
        partials[:2] = 1.0
        assert partials.sum().isnan()
    assert (torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory) == before


def test_the_poisoned_empty_fixture_poisons_unless_the_test_is_marked_not_poisoned(tmp_path):
    tests = ("import pytest, torch\n"
             "pytestmark = pytest.mark.usefixtures('poisoned_empty')\n"
             "def test_poisoned():\n    assert torch.empty(4).isnan().all()\n"
             "@pytest.mark.not_poisoned(reason='a test of the marker')\n"
             "def test_not_poisoned():\n"
             "    assert not torch.are_deterministic_algorithms_enabled()\n")  # without it nothing is filled
    proc = _pytest(tmp_path, tests, "0")
    assert proc.returncode == 0 and "2 passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_every_zip_in_the_tests_says_whether_its_sequences_must_be_as_long():
    """A comparison over ``zip(got, want)`` passes on what a shorter side leaves out (a gradient missing,
    a run that logged fewer steps): every zip in the tests names ``strict=``, True unless one side is
    meant to be longer."""
    loose = []
    for path in sorted(glob.glob(os.path.join(ROOT, "tests", "*.py"))):
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        loose += [f"{os.path.basename(path)}:{node.lineno}" for node in ast.walk(tree)
                  if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "zip"
                  and not any(keyword.arg == "strict" for keyword in node.keywords)]
    assert not loose, f"zip() without strict= at {loose}"


def test_a_fake_tensor_on_a_card_the_machine_lacks_allocates_nothing_real(monkeypatch):
    """conftest's guard: with CUDA available and one card, a fake tensor made on cuda:1 makes no real allocation
    there (torch 2.11 made one, which raised on such a machine; on the GPU image's stack, where this CPU build then
    raises for any real CUDA tensor, the test fails without the guard)."""
    from torch._subclasses import fake_tensor
    from torch._subclasses.fake_tensor import FakeTensorMode

    assert getattr(fake_tensor.init_gpu_context, "_present_cards_only", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with FakeTensorMode():
        fake = torch.empty(2, 3, device="cuda:1")
    assert fake.device == torch.device("cuda", 1) and fake.shape == (2, 3)
