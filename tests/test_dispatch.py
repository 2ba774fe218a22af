"""Backend selection, the environment override, and import hygiene."""

import subprocess
import sys

import pytest
import torch

import ace_kernels
from ace_kernels import _dispatch


@pytest.fixture
def toy_op():
    name = "_toy_op"
    _dispatch.define_op(name, prefer=("cuda", "triton", "torch"))
    calls = []
    _dispatch.register(name, "torch")(lambda *a: calls.append("torch") or "torch")
    _dispatch.register(name, "triton", check=lambda n: [] if n < 10 else [f"n={n} is over 9"])(
        lambda *a: calls.append("triton") or "triton")
    yield name
    del _dispatch._OPS[name]


def test_torch_backend_always_available():
    assert "torch" in ace_kernels.available_backends()
    table = ace_kernels.available_backends(reasons=True)
    assert set(table) == set(ace_kernels.BACKENDS)
    assert table["torch"] == []
    for name in ace_kernels.BACKENDS:
        assert (name in ace_kernels.available_backends()) == (table[name] == [])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the reasons given on a machine with no GPU")
def test_cuda_backend_says_why_not():
    reasons = ace_kernels.available_backends(reasons=True)["cuda"]
    assert reasons and any("GPU" in r or "CUDA" in r for r in reasons)


def test_auto_never_picks_the_interpreter(toy_op, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("ACE_KERNELS_BACKEND", raising=False)
    x = torch.zeros(3)
    if not torch.cuda.is_available():
        assert _dispatch.select(toy_op, "auto", [x], (3,))() == "torch"


def test_explicit_backend_that_cannot_run_raises_with_reason(toy_op):
    x = torch.zeros(3)
    with pytest.raises(RuntimeError, match="cuda"):
        _dispatch.select(toy_op, "cuda", [x], (3,))
    if "triton" in ace_kernels.available_backends() and _dispatch.interpreter_enabled():
        assert _dispatch.select(toy_op, "triton", [x], (3,))() == "triton"
        with pytest.raises(RuntimeError, match="n=12 is over 9"):
            _dispatch.select(toy_op, "triton", [x], (12,))


def test_environment_variable_overrides_auto(toy_op, monkeypatch):
    x = torch.zeros(3)
    monkeypatch.setenv("ACE_KERNELS_BACKEND", "torch")
    assert _dispatch.select(toy_op, "auto", [x], (3,))() == "torch"
    monkeypatch.setenv("ACE_KERNELS_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="cannot run"):
        _dispatch.select(toy_op, "auto", [x], (3,))
    # An explicit argument wins over the environment.
    assert _dispatch.select(toy_op, "torch", [x], (3,))() == "torch"
    monkeypatch.setenv("ACE_KERNELS_BACKEND", "fastest")
    with pytest.raises(ValueError, match="ACE_KERNELS_BACKEND"):
        _dispatch.select(toy_op, "auto", [x], (3,))


def test_unknown_backend_argument_is_a_value_error(toy_op):
    with pytest.raises(ValueError, match="argument 'backend'"):
        _dispatch.select(toy_op, "cudnn", [torch.zeros(1)])


def test_info_reports_every_backend(capsys):
    from ace_kernels import info

    assert info.main() == 0
    out = capsys.readouterr().out
    for name in ace_kernels.BACKENDS:
        assert name in out


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_import_touches_neither_gpu_nor_extension():
    result = _run_python(
        "import sys, ace_kernels\n"
        "assert 'ace_kernels._C' not in sys.modules, 'extension imported eagerly'\n"
        "import torch\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised at import'\n"
        "print('ok')\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_import_works_without_triton():
    # Simulate a machine where triton is not installed.
    result = _run_python(
        "import sys\n"
        "sys.modules['triton'] = None\n"
        "sys.modules['triton.language'] = None\n"
        "import ace_kernels\n"
        "table = ace_kernels.available_backends(reasons=True)\n"
        "assert table['triton'], table\n"
        "print('ok')\n"
    )
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "ace_kernels.info"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "torch" in result.stdout and "available" in result.stdout
