"""Backend selection, the environment override, the measured backend order, and import hygiene."""

import json
import os
import subprocess
import sys

import numpy as np
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
    # A bool (NumPy's too): the string "no" gave the reasons table, being truthy.
    assert ace_kernels.available_backends(reasons=np.bool_(False)) == ace_kernels.available_backends()
    for bad, kind in (("no", "str"), (None, "NoneType"), (1, "int")):
        with pytest.raises(ValueError, match=rf"^argument 'reasons': expected a bool, got {kind}$"):
            ace_kernels.available_backends(reasons=bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the reasons given on a machine with no GPU")
def test_cuda_backend_says_why_not():
    reasons = ace_kernels.available_backends(reasons=True)["cuda"]
    assert reasons and any("GPU" in r or "CUDA" in r for r in reasons)


def test_auto_never_picks_the_interpreter(toy_op, monkeypatch):
    """Under TRITON_INTERPRET=1 the Triton backend takes CPU tensors, on a machine with a GPU
    too: auto passes it by there as well (only backend='triton' runs the interpreter)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("ACE_KERNELS_BACKEND", raising=False)
    x = torch.zeros(3)
    assert _dispatch.select(toy_op, "auto", [x], (3,))() == "torch"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_dispatch, "_global_reasons", lambda backend: [])  # triton imported in this mode
    assert _dispatch.select(toy_op, "auto", [x], (3,))() == "torch"
    assert _dispatch.select(toy_op, "triton", [x], (3,))() == "triton"  # as asked for


def test_triton_interpret_changed_after_import_is_named(monkeypatch):
    # The kernels took their mode at import: a later change would fail deep inside Triton.
    # It is a reason of the machine, not of a call's tensors: available_backends and
    # ace_kernels.info say so too.
    monkeypatch.setenv("TRITON_INTERPRET", "0" if _dispatch._INTERPRETER_AT_IMPORT else "1")
    if _dispatch._triton_import_error():
        pytest.skip("triton does not import here")
    reasons = ace_kernels.available_backends(reasons=True)["triton"]
    now, then = ("off", "on") if _dispatch._INTERPRETER_AT_IMPORT else ("on", "off")
    assert reasons == [f"TRITON_INTERPRET is {now} now but was {then} when ace_kernels was imported, and the Triton "
                       "kernels took their mode then: set it before importing ace_kernels"]
    assert "triton" not in ace_kernels.available_backends()
    with pytest.raises(RuntimeError, match="when ace_kernels was imported"):
        ace_kernels.lora_linear(torch.zeros(2, 4), torch.zeros(3, 4), None, torch.zeros(1, 4), torch.zeros(3, 1),
                                scaling=1.0, backend="triton")


@pytest.mark.parametrize("value,on", [("1", True), ("true", True), ("ON", True), ("Yes", True), ("y", True),
                                      ("0", False), ("false", False), ("", False), ("2", False), (" 1", False)])
def test_the_interpreter_is_on_for_every_value_triton_reads_as_on(value, on, monkeypatch):
    # TRITON_INTERPRET=true ran the kernels under the interpreter while the checks took them for compiled ones:
    # auto routed GPU work to the interpreter, bf16 went unrefused, and a CPU machine was told to set it to 1.
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert _dispatch.interpreter_enabled() is on
    knobs = getattr(pytest.importorskip("triton"), "knobs", None)
    if knobs is not None:  # (Triton 3.4 on): its own reading of the variable
        assert knobs.runtime.interpret is on


def test_explicit_backend_that_cannot_run_raises_with_reason(toy_op):
    x = torch.zeros(3)
    with pytest.raises(RuntimeError, match="cuda"):
        _dispatch.select(toy_op, "cuda", [x], (3,))


@pytest.mark.triton
@pytest.mark.interpreter
def test_explicit_interpreter_backend_runs_and_gives_its_op_check_reasons(toy_op):
    x = torch.zeros(3)
    assert _dispatch.select(toy_op, "triton", [x], (3,))() == "triton"
    with pytest.raises(RuntimeError, match="n=12 is over 9"):
        _dispatch.select(toy_op, "triton", [x], (12,))


def test_environment_variable_overrides_auto(toy_op, monkeypatch):
    x = torch.zeros(3)
    monkeypatch.setenv("ACE_KERNELS_BACKEND", "torch")
    assert _dispatch.select(toy_op, "auto", [x], (3,))() == "torch"
    monkeypatch.setenv("ACE_KERNELS_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match=r"backend 'cuda' \(from the environment variable ACE_KERNELS_BACKEND\) "
                                           "cannot run"):
        _dispatch.select(toy_op, "auto", [x], (3,))
    # An explicit argument wins over the environment.
    assert _dispatch.select(toy_op, "torch", [x], (3,))() == "torch"
    monkeypatch.setenv("ACE_KERNELS_BACKEND", "fastest")
    with pytest.raises(ValueError, match="ACE_KERNELS_BACKEND"):
        _dispatch.select(toy_op, "auto", [x], (3,))
    # Set but empty (`ACE_KERNELS_BACKEND= python ...`) or blank: auto, as when unset.
    for blank in ("", "  "):
        monkeypatch.setenv("ACE_KERNELS_BACKEND", blank)
        assert _dispatch.requested_backend("auto") == "auto"
        assert _dispatch.select(toy_op, "auto", [x], (3,))() == "torch"


def test_the_cuda_backend_declines_cpu_tensors(toy_op, monkeypatch):
    """On a machine where the extension runs, the cuda backend still takes CUDA tensors only:
    auto moves on with CPU ones, and backend='cuda' says why (a call's device reasons count as
    well as the machine's)."""
    _dispatch.register(toy_op, "cuda")(lambda *a: "cuda")
    monkeypatch.setattr(_dispatch, "_global_reasons", lambda backend: [])
    monkeypatch.delenv("ACE_KERNELS_BACKEND", raising=False)
    x = torch.zeros(3)
    assert _dispatch.reasons_for(toy_op, "cuda", [x, None], (3,)) == ["needs CUDA tensors, got tensors on ['cpu']"]
    with pytest.raises(RuntimeError, match=r"backend 'cuda' cannot run this call: needs CUDA tensors, got tensors on "
                                           r"\['cpu'\]"):
        _dispatch.select(toy_op, "cuda", [x], (3,))
    assert _dispatch.select(toy_op, "auto", [x], (3,))() == "torch"  # triton: the interpreter, or no CUDA tensors


def test_device_reasons_name_every_device_a_call_mixes_and_what_the_mode_needs(monkeypatch):
    """A CUDA tensor beside a CPU one is no call for the cuda backend (one CUDA tensor did not make it one);
    the Triton backend says which devices it needs under the interpreter and without it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():  # a CUDA tensor without a GPU: only its device is read
        on_gpu = torch.empty(2, device="cuda:0")
    monkeypatch.setattr(_dispatch, "built_cuda_archs", lambda: None)
    on_cpu, on_meta = torch.zeros(2), torch.zeros(2, device="meta")
    assert _dispatch._device_reasons("cuda", [on_gpu, None, on_cpu]) == [
        "needs CUDA tensors, got tensors on ['cpu', 'cuda']"]
    assert _dispatch._device_reasons("cuda", [on_gpu]) == []
    monkeypatch.setattr(_dispatch, "interpreter_enabled", lambda: True)
    assert _dispatch._device_reasons("triton", [on_cpu, on_meta]) == [
        "under TRITON_INTERPRET=1 it needs CPU tensors, got tensors on ['cpu', 'meta']"]
    monkeypatch.setattr(_dispatch, "interpreter_enabled", lambda: False)
    assert _dispatch._device_reasons("triton", [on_gpu, on_cpu]) == [
        "needs CUDA tensors, got tensors on ['cpu', 'cuda']"]
    assert _dispatch._device_reasons("triton", [on_gpu]) == []


def test_unknown_backend_argument_is_a_value_error(toy_op):
    with pytest.raises(ValueError, match="argument 'backend'"):
        _dispatch.select(toy_op, "cudnn", [torch.zeros(1)])


def test_info_command_line_answers_help_and_refuses_unknown_flags(capsys):
    """python -m ace_kernels.info ignored its arguments: --help printed the report instead of a usage, and a
    misspelt flag passed silently with status 0."""
    from ace_kernels import info

    with pytest.raises(SystemExit) as exited:
        info.main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m ace_kernels.info [-h]") and "auto tries" not in out
    with pytest.raises(SystemExit) as exited:
        info.main(["--bogus"])
    assert exited.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    assert info.main([]) == 0 and "auto tries, in order" in capsys.readouterr().out


def test_info_reports_every_backend(capsys):
    from ace_kernels import info

    assert info.main() == 0
    out = capsys.readouterr().out
    for name in ace_kernels.BACKENDS:
        assert name in out
    # And the order auto tries for each public op.
    # The interpreter's state as the backends take it.
    assert f"  interpreter {'on' if _dispatch.interpreter_enabled() else 'off'}\n" in out
    order_block, tuned_block = out.split("auto tries, in order")[1].split("\n\n")
    order_lines = order_block.splitlines()[1:]
    assert {line.split()[0] for line in order_lines} == {
        "ace_hypergraph", "ace_hypergraph[cls_only]", "ace_hypergraph[full]", "label_guided_infonce",
        "lora_linear", "lora_linear[small]", "lora_linear[large]", "lora_qkv", "lora_qkv[small]", "lora_qkv[large]"}
    assert all(line.split()[-1] == "torch" for line in order_lines)  # the exact path is always last
    # And the launch configurations a sweep recorded (for which cards, or on this one).
    assert tuned_block.startswith("tuned launch configurations")
    if not torch.cuda.is_available():  # the CPU suite: no card, so every card the file has
        from ace_kernels import _tuning

        cards = ", ".join(sorted(_tuning.tuned_configs())) or "no card"
        assert tuned_block.strip() == f"tuned launch configurations: recorded for {cards}"
        if _dispatch.interpreter_enabled():
            assert ("\nauto tries, in order (it skips triton here: the interpreter runs only when asked for, "
                    "backend='triton'):\n") in out


def test_info_reports_the_environment_variable(capsys, monkeypatch):
    from ace_kernels import info

    for value, expected in [("bogus", "environment variable ACE_KERNELS_BACKEND: expected one of ('auto', 'cuda', "
                                      "'triton', 'torch'), got 'bogus': every call with backend='auto' (the default) "
                                      "raises"),
                            ("Torch", "ACE_KERNELS_BACKEND=torch: calls with backend='auto' (the default) use torch "
                                      "only (or raise)"),
                            (" auto ", "\nACE_KERNELS_BACKEND=auto\n")]:  # set, to the default: said so
        monkeypatch.setenv("ACE_KERNELS_BACKEND", value)
        assert info.main() == 0
        out = capsys.readouterr().out
        assert expected in out
        assert out.count("ACE_KERNELS_BACKEND") == 1, out  # one line about it (no "=None" after a bad value)
    monkeypatch.delenv("ACE_KERNELS_BACKEND")
    assert info.main() == 0
    assert "ACE_KERNELS_BACKEND" not in capsys.readouterr().out


def test_info_on_a_gpu_machine_names_the_card_and_its_tuned_configurations(monkeypatch):
    """The report's GPU lines, on a faked card: its name, compute capability and memory, and the
    launch configurations a sweep recorded for it (or none)."""
    import types

    from ace_kernels import _tuning, info

    card = types.SimpleNamespace(name="Card A", major=9, minor=0, total_memory=int(79.5 * 2**30))
    names = {0: "Card A"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: card)
    monkeypatch.setattr(_dispatch, "_cuda_device_name", lambda index: names[index])
    monkeypatch.setattr(_tuning, "tuned_configs", lambda: {
        "Card A": {"lora": {"up/fp32": {}, "down/16bit": {}}, "contrastive": {"grad/16bit/one_dot": {}}},
        "Card B": {"lora": {"up/fp32": {}}}})
    lines = info.report().splitlines()
    assert "device Card A  sm_90  79.5 GiB" in lines
    assert lines[-1] == ("tuned launch configurations on Card A: contrastive grad/16bit/one_dot, lora down/16bit, "
                         "lora up/fp32")
    names[0] = "Card C"
    assert info.report().splitlines()[-1] == "tuned launch configurations on Card C: none (the defaults)"


def test_info_on_a_gpu_machine_lists_the_measured_order_of_each_variant(monkeypatch):
    """The orders the report lists are those auto tries on cuda:0: a variant's own measured order where the
    file has one, the op's otherwise (a faked card)."""
    import types

    from ace_kernels import _tuning, info

    card = types.SimpleNamespace(name="Card A", major=9, minor=0, total_memory=80 * 2**30)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: card)
    monkeypatch.setattr(_dispatch, "_cuda_device_name", lambda index: "Card A")
    monkeypatch.setattr(_tuning, "tuned_configs", lambda: {})
    monkeypatch.setattr(_dispatch, "_MEASURED_ORDERS", {"Card A": {
        "ace_hypergraph": ["cuda", "torch", "triton"], "ace_hypergraph[cls_only]": ["torch", "triton", "cuda"]}})
    orders = {line.split()[0]: line.split(None, 1)[1] for line in info.report().split("auto tries, in order")[1]
              .split("\n\n")[0].splitlines()[1:]}
    assert orders["ace_hypergraph"] == orders["ace_hypergraph[full]"] == "cuda, torch, triton"
    assert orders["ace_hypergraph[cls_only]"] == "torch, triton, cuda"
    assert orders["lora_qkv[small]"] == "triton, torch"  # not measured on this card: declared


def test_info_says_cuda_is_unavailable_where_the_extension_has_code_for_no_visible_gpu(monkeypatch):
    """An sm_90a build on a machine of A100s (8.0): every call declines the cuda backend, so the
    report says it is unavailable and why (it said 'available'), and what the extension holds. One
    GPU it runs on is enough for 'available' (each call's devices decide)."""
    import types

    from ace_kernels import info

    card = types.SimpleNamespace(name="Card A", major=8, minor=0, total_memory=40 * 2**30)
    capability = {0: (8, 0), 1: (8, 0)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(capability))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: card)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: capability[index])
    monkeypatch.setattr(_dispatch, "_cuda_device_name", lambda index: "Card A")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    # (machine code, then PTX, as setup.py joins TORCH_CUDA_ARCH_LIST's targets)
    extension = types.SimpleNamespace(CUDA_ARCHS="sm_90a__compute_90", __file__="/x/_C.so")
    monkeypatch.setattr(_dispatch, "_ONCE", {"_extension": (extension, None)})
    monkeypatch.setattr(_dispatch, "_ARCH_REASONS", {})
    lines = info.report().splitlines()
    assert "extension ace_kernels._C: loaded from /x/_C.so (code for sm_90a, compute_90)" in lines
    (cuda,) = [line for line in lines if line.split()[:1] == ["cuda"]]
    assert cuda.startswith("  cuda    unavailable: ace_kernels._C holds code for sm_90a, compute_90 only, not for "
                           "cuda:0 (sm_80)")
    assert "not for cuda:1 (sm_80)" in cuda
    capability[1] = (9, 0)
    monkeypatch.setattr(_dispatch, "_ARCH_REASONS", {})
    assert "  cuda    available" in info.report().splitlines()


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_import_touches_neither_gpu_nor_extension():
    result = _run_python(
        "import sys, ace_kernels\n"
        "assert 'ace_kernels._C' not in sys.modules, 'extension imported eagerly'\n"
        "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo imported at import (slow start-up)'\n"
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


def test_an_unknown_package_attribute_raises_attribute_error_and_the_version_is_setup_pys():
    """The lazy ``ace_kernels.patch`` hook answers only that name: any other raises AttributeError (so
    ``hasattr`` and ``getattr(..., default)`` work), and ``__version__`` is the version setup.py installs."""
    import re

    assert not hasattr(ace_kernels, "no_such_op")
    with pytest.raises(AttributeError, match=r"^module 'ace_kernels' has no attribute 'no_such_op'$"):
        ace_kernels.no_such_op  # noqa: B018
    setup = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.py")).read()
    assert re.findall(r'^    version="([^"]+)",$', setup, re.M) == [ace_kernels.__version__]


def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "ace_kernels.info"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "torch" in result.stdout and "available" in result.stdout


def test_an_extension_cut_short_is_named_and_not_loaded(tmp_path):
    """An ace_kernels._C cut short (an interrupted build or copy) is not loaded: the loader maps it
    and the process died of SIGBUS (python -m ace_kernels.info, and the first ace_hypergraph call
    under auto, which asks whether the cuda backend can run), with nothing to catch. The cuda
    backend names the file instead; a whole library loads as before."""
    import sysconfig

    whole = open(torch._C.__file__, "rb").read()  # a 64-bit ELF shared library exporting PyInit__C
    name = "_C" + sysconfig.get_config_var("EXT_SUFFIX")
    (tmp_path / "short").mkdir()
    (tmp_path / "short" / name).write_bytes(whole[:len(whole) // 2])
    (tmp_path / "whole").mkdir()
    (tmp_path / "whole" / name).write_bytes(whole)
    code = ("import sys, ace_kernels\n"
            "ace_kernels.__path__.insert(0, sys.argv[1])\n"
            "from ace_kernels import _dispatch, info\n"
            "report = info.report()\n"
            "print(_dispatch._extension()[1])\n")
    short = subprocess.run([sys.executable, "-c", code, str(tmp_path / "short")], capture_output=True, text=True,
                           timeout=300)
    assert short.returncode == 0, (short.returncode, short.stderr)
    assert f"{tmp_path / 'short' / name} is cut short ({len(whole) // 2} bytes" in short.stdout, short.stdout
    from ace_kernels._dispatch import _cut_short

    assert _cut_short(str(tmp_path / "whole" / name)) is None and _cut_short(torch._C.__file__) is None
    assert _cut_short(__file__) is None  # not an ELF file: the loader's own error says so


def test_the_cut_short_check_reads_the_segments_and_takes_a_file_of_exactly_its_length_as_whole(tmp_path):
    """A library whose section header table is stripped (sstrip: no section headers) says where it
    ends by its segments only; a file exactly as long as its headers say is whole, one byte less is not."""
    import struct

    def library(data_end: int, size: int) -> str:
        header = bytearray(64)
        header[:6] = b"\x7fELF\x02\x01"  # 64-bit, little-endian
        struct.pack_into("<QQ", header, 32, 64, 0)  # the program headers right after this one; no section headers
        struct.pack_into("<HHHH", header, 54, 56, 1, 64, 0)
        segment = bytearray(56)
        struct.pack_into("<QQ", segment, 8, 0, 0)
        struct.pack_into("<Q", segment, 32, data_end)  # p_filesz of a segment from byte 0
        path = tmp_path / f"lib_{size}.so"
        path.write_bytes(bytes(header + segment).ljust(size, b"\0"))
        return str(path)

    assert _dispatch._cut_short(library(4096, 4096)) is None
    assert _dispatch._cut_short(library(4096, 5000)) is None
    short = _dispatch._cut_short(library(4096, 4095))
    assert short is not None and "is cut short (4095 bytes, its ELF headers place data up to byte 4096" in short


# --------------------------------------------------------------------------- measured backend order

def _gpu_payload(rows, device="NVIDIA H100 80GB HBM3"):
    return {"environment": {"device": device, "device_type": "cuda", "git_sha": "abc", "date": "2026-11-29"},
            "rows": rows}


def _row(op, shape, provider, ms, baseline="reference"):
    return {"op": op, "shape": shape, "dtype": "bfloat16", "provider": provider, "median_ms": ms,
            "baseline": baseline, "metrics": {"rel_err_vs_reference": 1e-3}}


def test_measured_order_is_used_on_its_card_only(toy_op, monkeypatch):
    monkeypatch.setattr(_dispatch, "measured_orders", lambda: {"Card A": {toy_op: ["torch", "cuda"]}})
    monkeypatch.setattr(_dispatch, "_cuda_device_name", lambda index: {0: "Card A", 1: "Card B"}[index])
    # Measured backends first, the declared order for the rest (triton was not measured).
    assert _dispatch.preference(toy_op, torch.device("cuda", 0)) == ("torch", "cuda", "triton")
    assert _dispatch.preference(toy_op, torch.device("cuda", 1)) == ("cuda", "triton", "torch")
    assert _dispatch.preference(toy_op, torch.device("cpu")) == ("cuda", "triton", "torch")
    assert _dispatch.preference(toy_op, None) == ("cuda", "triton", "torch")
    # A device without an index is the current one, which need not be cuda:0.
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert _dispatch.device_name(torch.device("cuda")) == "Card B"
    assert _dispatch.preference(toy_op, torch.device("cuda")) == ("cuda", "triton", "torch")


def test_a_measured_backend_the_op_does_not_have_is_not_tried(monkeypatch):
    """A hand-edited order may name a backend the op lacks (LoRA has no cuda one): it is left out
    of the preference, which holds the op's own backends only, measured ones first."""
    monkeypatch.setattr(_dispatch, "measured_orders", lambda: {"Card A": {"lora_qkv": ["cuda", "torch"]}})
    monkeypatch.setattr(_dispatch, "_cuda_device_name", lambda index: "Card A")
    assert _dispatch.preference("lora_qkv", torch.device("cuda", 0)) == ("torch", "triton")
    assert _dispatch.preference("lora_qkv", torch.device("cuda", 0), "small") == ("torch", "triton")


def test_measured_order_per_variant(monkeypatch):
    # ace_hypergraph's cls_only and full outputs run different kernels: each variant takes its own
    # measured order when the file has one, the op's otherwise.
    assert _dispatch.order_keys() >= {"ace_hypergraph", "ace_hypergraph[cls_only]", "ace_hypergraph[full]"}
    monkeypatch.setattr(_dispatch, "measured_orders", lambda: {"Card A": {
        "ace_hypergraph": ["cuda", "torch", "triton"], "ace_hypergraph[cls_only]": ["triton", "torch"]}})
    monkeypatch.setattr(_dispatch, "_cuda_device_name", lambda index: "Card A")
    dev = torch.device("cuda", 0)
    assert _dispatch.preference("ace_hypergraph", dev, "cls_only") == ("triton", "torch", "cuda")
    assert _dispatch.preference("ace_hypergraph", dev, "full") == ("cuda", "torch", "triton")
    assert _dispatch.preference("ace_hypergraph", dev) == ("cuda", "torch", "triton")
    # LoRA calls are classed by their rows (all of x's leading dimensions).
    from ace_kernels import lora

    assert lora.rows_variant(64 * 197) == "small" and lora.rows_variant(1024 * 197) == "large"
    assert lora.rows_variant(lora.SMALL_ROWS_LIMIT - 1) == "small"
    assert lora.rows_variant(lora.SMALL_ROWS_LIMIT) == "large"
    with pytest.raises(ValueError, match="no variant 'half'"):
        _dispatch.select("ace_hypergraph", "auto", [torch.zeros(1)], variant="half")


def test_auto_takes_the_measured_order_of_the_card_its_tensors_are_on(monkeypatch):
    """select() itself, not only preference(), follows the measured order: of the card the call's
    CUDA tensors are on, for the variant it names when the file has one (fake CUDA tensors and a
    machine where every backend can run, as on a GPU one with the extension built)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(_dispatch, "_OPS", dict(_dispatch._OPS))  # the op below goes with the test
    _dispatch.define_op("_toy_variants", prefer=("cuda", "triton", "torch"), variants=("small", "large"))
    for backend in _dispatch.BACKENDS:
        _dispatch.register("_toy_variants", backend)(lambda backend=backend: backend)
    monkeypatch.setattr(_dispatch, "_MEASURED_ORDERS", {"Card A": {
        "_toy_variants": ["triton", "torch", "cuda"], "_toy_variants[small]": ["torch", "triton", "cuda"]}})
    monkeypatch.setattr(_dispatch, "_cuda_device_name", lambda index: {0: "Card A", 1: "Card B"}[index])
    monkeypatch.setattr(_dispatch, "_global_reasons", lambda backend: [])
    monkeypatch.setattr(_dispatch, "interpreter_enabled", lambda: False)
    monkeypatch.setattr(_dispatch, "built_cuda_archs", lambda: None)  # the extension does not say: no reason
    monkeypatch.delenv("ACE_KERNELS_BACKEND", raising=False)
    with FakeTensorMode():  # CUDA tensors without a GPU: only their devices are read
        on_a, on_b = torch.empty(2, device="cuda:0"), torch.empty(2, device="cuda:1")

    def picked(tensors, variant=None):
        return _dispatch.select("_toy_variants", "auto", tensors, variant=variant)()

    assert picked([on_a]) == "triton"  # the op's measured order, not the declared one
    assert picked([None, on_a], "small") == "torch"  # the variant's own order
    assert picked([on_a], "large") == "triton"  # no order of its own: the op's
    assert picked([on_b]) == picked([on_b], "small") == "cuda"  # a card not measured: the declared order


def test_shipped_order_file_is_readable():
    # Whatever it holds (the cards of the GPU runs recorded) must be a {card: {op: [backends]}} table
    # of known ops and backends.
    orders = _dispatch.measured_orders()
    assert isinstance(orders, dict)
    for card, ops in orders.items():
        for op, order in ops.items():
            assert op in _dispatch.order_keys() and set(order) <= set(_dispatch.BACKENDS), (card, op, order)
    # And all of it was taken: its keys were checked once the ops were declared (read any earlier,
    # it would have named no op, and every entry would have been dropped).
    assert orders == _dispatch.read_by_device(_dispatch.ORDER_FILE)


def test_a_hand_edited_order_file_is_left_out_with_a_warning(tmp_path):
    """What the file holds that no lookup can use is named when it is read, not dropped silently."""
    path = tmp_path / "order.json"
    cases = {
        '{"by_device": {"A": {"lora_qkv": ["torch"],}}}': r"cannot be read \(JSONDecodeError",
        '["torch"]': r"expected a JSON object with a 'by_device' object, got list",
        '{"about": "no table"}': r"expected a JSON object with a 'by_device' object, got none",
    }
    for text, pattern in cases.items():
        path.write_text(text)
        with pytest.warns(RuntimeWarning, match=pattern):
            assert _dispatch.read_by_device(str(path)) == {}
    # An editor's byte-order mark is no error.
    path.write_text('\ufeff{"by_device": {"A": {"lora_qkv": ["torch", "triton"]}}}', encoding="utf-8")
    assert _dispatch.read_by_device(str(path)) == {"A": {"lora_qkv": ["torch", "triton"]}}
    # Entries that are not lists of backends go, naming them; the rest stays.
    table = {"A": {"lora_qkv": "torch", "ace_hypergraph": ["Torch", "triton"], "label_guided_infonce": [],
                   "lora_linear": ["triton", "torch"]}}
    with pytest.warns(RuntimeWarning) as caught:
        kept = _dispatch._orders_only(str(path), table)
    assert kept == {"A": {"lora_linear": ["triton", "torch"]}}
    assert [str(w.message).split(": expected")[0] for w in caught] == [
        f"{path}: by_device / A / {key}" for key in ("lora_qkv", "ace_hypergraph", "label_guided_infonce")]
    # So do keys that name no op or variant (misspelt): no lookup would ever find them.
    table = {"A": {"lora-qkv": ["torch", "triton"], "ace_hypergraph[cls-only]": ["torch"],
                   "ace_hypergraph[cls_only]": ["torch", "triton"]}}
    with pytest.warns(RuntimeWarning) as caught:
        kept = _dispatch._orders_only(str(path), table)
    assert kept == {"A": {"ace_hypergraph[cls_only]": ["torch", "triton"]}}
    assert [str(w.message).split(" (expected")[0] for w in caught] == [
        f"{path}: by_device / A / {key}: not an op or variant of ace_kernels"
        for key in ("lora-qkv", "ace_hypergraph[cls-only]")]
    assert all("'ace_hypergraph[cls_only]'" in str(w.message) and str(w.message).endswith("; left out")
               for w in caught)  # the keys it may hold are named


def test_dispatch_order_tool_ranks_backends_by_time(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks import dispatch_order

    rows = [
        # hypergraph: cuda faster at both shapes, and triton-atomic reported but not written.
        _row("ace_hypergraph", "B=64 cls_only", "triton", 2.0), _row("ace_hypergraph", "B=64 cls_only", "cuda", 1.0),
        _row("ace_hypergraph", "B=64 cls_only", "triton-atomic", 1.5),
        _row("ace_hypergraph", "B=1024 full", "triton", 8.0), _row("ace_hypergraph", "B=1024 full", "cuda", 6.0),
        _row("ace_hypergraph", "B=1024 full", "torch", 30.0), _row("ace_hypergraph", "B=1024 full", "reference", 90.0,
                                                                    baseline=None),
        # lora: triton first; the torch row repeated against a second baseline counts once.
        _row("lora_qkv", "M=12608", "triton", 1.0), _row("lora_qkv", "M=12608", "torch", 3.0),
        _row("lora_qkv", "M=12608", "torch", 3.0, baseline="peft-style"),
        # one backend only: nothing to order.
        _row("label_guided_infonce", "B=65536", "triton", 100.0),
        # a whole-model row (no op of that name dispatches): reported, not written.
        _row("ace_lora_train_step", "B=64", "triton", 2.0), _row("ace_lora_train_step", "B=64", "torch", 1.0),
    ]
    existing = {"about": "kept", "by_device": {"Other card": {"lora_qkv": ["torch", "triton"]},
                                               "NVIDIA H100 80GB HBM3": {"zero_shot_eval": ["torch", "triton"]}}}
    content, report = dispatch_order.update(_gpu_payload(rows), existing)
    orders = content["by_device"]["NVIDIA H100 80GB HBM3"]
    # Entries no op reads are not written, and a stale one from an older file goes.
    assert "ace_lora_train_step" not in orders and "zero_shot_eval" not in orders
    assert any("ace_lora_train_step: torch > triton" in line and "not written" in line for line in report), report
    # torch ran at one of the two hypergraph shapes: counted as twice the slowest at the other.
    assert orders["ace_hypergraph"] == ["cuda", "triton", "torch"]
    # Per variant, from that variant's shapes alone (torch ran only at the full shape).
    assert orders["ace_hypergraph[cls_only]"] == ["cuda", "triton"]
    assert orders["ace_hypergraph[full]"] == ["cuda", "triton", "torch"]
    assert orders["lora_qkv"] == orders["lora_linear"] == ["triton", "torch"]
    # LoRA's variants come from the rows (M=12608 is "small"); no "large" shape ran, so none is written.
    assert orders["lora_qkv[small]"] == orders["lora_linear[small]"] == ["triton", "torch"]
    assert "lora_qkv[large]" not in orders and "lora_linear[large]" not in orders
    assert "label_guided_infonce" not in orders
    assert content["by_device"]["Other card"] == {"lora_qkv": ["torch", "triton"]} and content["about"] == "kept"
    assert any("triton-atomic takes 0.75x" in line for line in report), report
    # The command line writes the file (atomically) and refuses a CPU run.
    results, out = tmp_path / "run.json", tmp_path / "order.json"
    results.write_text(json.dumps(_gpu_payload(rows)))
    assert dispatch_order.main([str(results), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["by_device"]["NVIDIA H100 80GB HBM3"]["ace_hypergraph"][0] == "cuda"
    cpu = _gpu_payload(rows, device="AMD EPYC")
    cpu["environment"]["device_type"] = "cpu"
    results.write_text(json.dumps(cpu))
    assert dispatch_order.main([str(results), "--out", str(out)]) == 2


def test_dispatch_order_scores_missing_shapes_ties_and_ops_not_measured(tmp_path, monkeypatch):
    """A backend that did not run at a shape counts there as twice the slowest that did: one
    fastest shape does not put it ahead of a backend that ran everywhere. Equal scores keep the
    BACKENDS order. A run that measured some ops leaves the card's orders of the others alone."""
    monkeypatch.syspath_prepend(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks import dispatch_order

    # torch ran at one shape of three (fastest there), cuda at two (1.5x triton's time).
    order, scores, compared = dispatch_order.order_for({"a": {"triton": 1.0, "torch": 0.9},
                                                        "b": {"triton": 1.0, "cuda": 1.5},
                                                        "c": {"triton": 1.0, "cuda": 1.5}})
    assert order == ["triton", "cuda", "torch"] and compared == 3
    # triton: (1/0.9)^(1/3); cuda: (2 * 1.0/0.9 * 1.5 * 1.5)^(1/3); torch: (1 * 3 * 3)^(1/3).
    assert scores == pytest.approx({"triton": (1 / 0.9) ** (1 / 3), "cuda": 5 ** (1 / 3), "torch": 9 ** (1 / 3)},
                                   abs=1e-4)
    for tied in ({"triton": 1.0, "torch": 1.0}, {"torch": 2.0, "triton": 2.0, "cuda": 2.0}):
        order, scores, _ = dispatch_order.order_for({"a": tied})
        assert order == [b for b in _dispatch.BACKENDS if b in tied] and set(scores.values()) == {1.0}
    card = "NVIDIA H100 80GB HBM3"
    existing = {"by_device": {card: {"ace_hypergraph": ["cuda", "triton", "torch"],
                                     "ace_hypergraph[full]": ["triton", "cuda", "torch"],
                                     "lora_qkv": ["torch", "triton"]}}}
    content, _ = dispatch_order.update(_gpu_payload([_row("lora_qkv", "M=12608", "triton", 1.0),
                                                     _row("lora_qkv", "M=12608", "torch", 3.0)]), existing)
    assert content["by_device"][card] == {
        "ace_hypergraph": ["cuda", "triton", "torch"], "ace_hypergraph[full]": ["triton", "cuda", "torch"],
        "lora_qkv": ["triton", "torch"], "lora_linear": ["triton", "torch"],
        "lora_qkv[small]": ["triton", "torch"], "lora_linear[small]": ["triton", "torch"]}
    # An op timed with one backend's rows left out (a failed check) keeps the card's earlier order,
    # and the report says so rather than nothing.
    failed = dict(_row("ace_hypergraph", "B=64", "cuda", 0.5), metrics={"rel_err_vs_reference": 0.9})
    content, report = dispatch_order.update(_gpu_payload([_row("lora_qkv", "M=12608", "triton", 1.0),
                                                          _row("lora_qkv", "M=12608", "torch", 3.0),
                                                          _row("ace_hypergraph", "B=64", "triton", 1.0), failed]),
                                            existing)
    assert content["by_device"][card]["ace_hypergraph"] == ["cuda", "triton", "torch"]
    assert "  ace_hypergraph: timed but not ranked (no shape with two of our backends whose checks passed): " \
           "the card's earlier order kept" in report


def test_dispatch_order_report_means_atomic_ratios_geometrically_and_names_an_op_with_no_order(monkeypatch):
    """triton-atomic's time against triton is a geometric mean over the shapes (0.5x and 2x: even);
    an op timed but not ranked on a card with no earlier order says so, not that one is kept."""
    monkeypatch.syspath_prepend(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks import dispatch_order

    rows = [_row("lora_qkv", "M=12608", "triton", 1.0), _row("lora_qkv", "M=12608", "torch", 3.0),
            _row("ace_hypergraph", "B=64 cls_only", "triton", 2.0),
            _row("ace_hypergraph", "B=64 cls_only", "triton-atomic", 1.0),
            _row("ace_hypergraph", "B=1024 full", "triton", 1.0),
            _row("ace_hypergraph", "B=1024 full", "triton-atomic", 2.0)]
    content, report = dispatch_order.update(_gpu_payload(rows), {"by_device": {"Other card": {"ace_hypergraph": []}}})
    assert "ace_hypergraph" not in content["by_device"]["NVIDIA H100 80GB HBM3"]
    assert any("ace_hypergraph: triton-atomic takes 1x the time of triton (geometric mean over 2 shapes" in line
               for line in report), report
    assert "  ace_hypergraph: timed but not ranked (no shape with two of our backends whose checks passed): " \
           "no order for this card" in report


def test_dispatch_order_reports_ops_in_sorted_order_and_skips_an_atomic_ratio_without_triton(monkeypatch):
    """The report lists ops in a fixed order whatever the rows' order; a triton-atomic row whose
    triton row was left out (a failed check) gives no ratio, and no error; so does an untimed row."""
    monkeypatch.syspath_prepend(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks import dispatch_order

    failed = dict(_row("ace_hypergraph", "B=64 cls_only", "triton", 1.0), metrics={"rel_err_vs_reference": 0.9})
    rows = [_row("lora_qkv", "M=12608", "triton", 1.0), _row("lora_qkv", "M=12608", "torch", 3.0),
            _row("ace_hypergraph", "B=64 cls_only", "cuda", 2.0), _row("ace_hypergraph", "B=64 cls_only", "torch", 3.0),
            failed, _row("ace_hypergraph", "B=64 cls_only", "triton-atomic", 1.5),
            # A row with no time is no time of its backend; a whole-model row (no op reads an
            # order for it) is not reported as an op left unranked.
            _row("lora_qkv", "M=12608", "cuda", None), _row("ace_lora_train_step", "B=64", "triton", 2.0)]
    content, report = dispatch_order.update(_gpu_payload(rows), None)
    assert content["by_device"]["NVIDIA H100 80GB HBM3"]["lora_qkv"] == ["triton", "torch"]
    assert [line.split(":")[0] for line in report[1:]] == ["  ace_hypergraph", "  ace_hypergraph[cls_only]",
                                                           "  lora_qkv", "  lora_qkv[small]"], report


def test_int32_safe_copies_only_layouts_whose_loop_offsets_overflow():
    from ace_kernels._library import int32_safe

    # A [M, K] operand stored column-major with M * K >= 2**31: K's stride is M (meta tensors, no memory).
    col_major = torch.empty((2**16, 2**15 + 1), device="meta").t().contiguous().t()
    assert (col_major.shape[1] - 1) * col_major.stride(1) >= 2**31
    assert int32_safe(col_major, (1,)).is_contiguous()
    assert int32_safe(col_major, (0,)) is col_major  # the row dimension is indexed in 64 bits
    row_major = torch.empty((2**16, 2**15 + 1), device="meta")
    assert int32_safe(row_major, (1,)) is row_major
    # The bound is on the last row's offset, (rows - 1) * stride: just under 2**31 keeps the layout (no copy of
    # what fits, though rows * stride is over), just over does not.
    for rows, copied in ((2**15, False), (2**15 + 1, True)):
        t = torch.empty((rows, 2**16 + 1), device="meta")[:, :2**16]
        assert (int32_safe(t, (0,)) is not t) is copied


def test_the_kernels_grid_limit_is_cudas_65535_blocks():
    """CUDA caps a grid's y and z dimensions at 65535 blocks: the hypergraph kernels, which put the batch
    there, decline a batch of 65536 (a launch would fail on the GPU) and take one of 65535."""
    from ace_kernels import hypergraph

    x = torch.empty(65536, 4, 3)
    assert any("split the batch" in r for r in hypergraph._kernel_check(x, None, None, None, 2, True))
    assert hypergraph._kernel_check(x[:65535], None, None, None, 2, True) == []


def test_spans_cover_the_range_exactly_in_steps():
    from ace_kernels._library import spans

    assert spans(0, 10, 4) == [(0, 4), (4, 8), (8, 10)]  # the last one stops at hi
    assert spans(3, 7, 4) == spans(3, 7, 10) == [(3, 7)]
    assert spans(5, 5, 4) == [(5, 5)]


def test_autocast_helpers_give_no_dtype_for_integer_or_meta_tensors():
    """Under autocast, a floating-point tensor reads the autocast dtype; an integer one (label ids, say) has
    none, and a meta tensor (which autocast does not know: asking it raises) has none either."""
    from ace_kernels import _library

    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _library.autocast_dtype(torch.zeros(2)) is torch.bfloat16
        assert _library.autocast_dtype(torch.zeros(2, dtype=torch.int64)) is None
        assert _library.autocast_dtype(torch.zeros(2, device="meta")) is None
        with _library.autocast_off("meta"):
            pass
    assert _library.autocast_dtype(torch.zeros(2)) is None


def test_import_works_with_a_broken_triton():
    # Installed but failing at import (a driver or compiler mismatch): still importable, and
    # ace_kernels.info still says why triton cannot run.
    result = _run_python(
        "import sys, importlib.abc, importlib.machinery\n"
        "import torch\n"
        "for name in [m for m in sys.modules if m == 'triton' or m.startswith('triton.')]:\n"
        "    del sys.modules[name]\n"
        "class Loader(importlib.abc.Loader):\n"
        "    def create_module(self, spec):\n"
        "        return None\n"
        "    def exec_module(self, module):\n"
        "        raise RuntimeError('triton is broken here')\n"
        "class Broken(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'triton' or name.startswith('triton.'):\n"
        "            return importlib.machinery.ModuleSpec(name, Loader())\n"
        "sys.meta_path.insert(0, Broken())\n"
        "import ace_kernels, runpy\n"
        "assert ace_kernels.available_backends(reasons=True)['triton']\n"
        "x = torch.randn(3, 4)\n"
        "calls = {'lora': lambda: ace_kernels.lora_linear(x, torch.randn(2, 4), None, torch.randn(1, 4),\n"
        "                                                 torch.randn(2, 1), scaling=1.0, backend='triton'),\n"
        "         'infonce': lambda: ace_kernels.label_guided_infonce(x, x, 1.0, backend='triton')}\n"
        "for name, call in calls.items():\n"
        "    try:\n"
        "        call()\n"
        "    except RuntimeError as exc:\n"
        "        print(name, 'refused:', exc)\n"
        "runpy.run_module('ace_kernels.info', run_name='__main__')\n"
    )
    assert result.returncode == 0, result.stderr
    assert "importing triton failed: RuntimeError: triton is broken here" in result.stdout, result.stdout
    # Each op names the import error (the loss once said it had no triton implementation).
    for name in ("lora", "infonce"):
        assert f"{name} refused: " in result.stdout and \
            "cannot run this call: importing triton failed: RuntimeError: triton is broken here" in \
            result.stdout.split(f"{name} refused: ")[1].splitlines()[0], result.stdout


def test_public_api_edges_name_their_argument():
    import numpy as np

    x, w, b = torch.randn(4, 8), torch.randn(24, 8), torch.randn(24)
    a, bb = torch.randn(3, 2, 8), torch.randn(3, 8, 2)
    # NumPy numbers are numbers (the packed variant is exported too).
    packed = ace_kernels.lora_qkv_packed(x, w, b, a, bb, scaling=np.float32(0.5), dropout_p=np.float64(0.0),
                                         training=np.bool_(False), backend="torch")
    assert torch.equal(packed, torch.cat(ace_kernels.lora_qkv(x, w, b, a, bb, scaling=0.5, backend="torch"), -1))
    with pytest.raises(ValueError, match="argument 'dropout_p': expected a float in"):
        ace_kernels.lora_qkv(x, w, b, a, bb, scaling=0.5, dropout_p=np.bool_(True))
    # Meta tensors: shapes, no autocast query on a device type autocast does not know.
    meta = [t.to("meta") for t in (x, w, b, a, bb)]
    assert ace_kernels.lora_qkv(*meta, scaling=0.5, backend="torch")[0].shape == (4, 8)
    with pytest.raises(ValueError, match="argument 'weight': expected a tensor on meta"):
        ace_kernels.lora_qkv(meta[0], w, b, a, bb, scaling=0.5)
    with pytest.raises(ValueError, match="argument 'x': expected a dense \\(strided\\) tensor"):
        ace_kernels.lora_qkv(x.to_sparse(), w, b, a, bb, scaling=0.5)
    with pytest.raises(ValueError, match="argument 'group': expected a torch.distributed ProcessGroup"):
        ace_kernels.label_guided_infonce(x, x, 1.0, group="world")
    with pytest.raises(ValueError, match="argument 'backend': expected one of"):
        ace_kernels.LabelGuidedInfoNCE(10.0, backend="nope")
    # The functions name their op's own backends, as the modules do: LoRA has no cuda backend.
    for bad in ("cuda", "bogus"):
        with pytest.raises(ValueError, match=r"argument 'backend': expected one of \('auto', 'triton', 'torch'\), "
                                             rf"got '{bad}'"):
            ace_kernels.lora_qkv(x, w, b, a, bb, scaling=0.5, backend=bad)
        with pytest.raises(ValueError, match=r"expected one of \('auto', 'triton', 'torch'\)"):
            ace_kernels.label_guided_infonce(x, x, 1.0, backend=bad)
    with pytest.raises(ValueError, match=r"got 'cuda' \(lora_qkv: no cuda backend\)"):
        ace_kernels.lora_qkv(x, w, b, a, bb, scaling=0.5, backend="cuda")
    with pytest.raises(ValueError, match="argument 'group': expected a torch.distributed ProcessGroup"):
        ace_kernels.LabelGuidedInfoNCE(10.0, group="world")
    module = ace_kernels.ACEHypergraph(dim=8, hidden=4, topk=2)
    with pytest.raises(ValueError, match="argument 'x': expected features of width 8"):
        module(torch.randn(2, 5, 9), torch.randn(2, 4))


def test_which_gpus_the_built_extension_runs_on():
    # Machine code: its own major version, an equal or newer minor one; an "a" target only on
    # itself; PTX: any newer GPU.
    runs = _dispatch.arch_runs_on
    assert runs("sm_90a", (9, 0)) and not runs("sm_90a", (10, 0)) and not runs("sm_90a", (8, 0))
    assert runs("sm_80", (8, 0)) and runs("sm_80", (8, 6)) and not runs("sm_86", (8, 0)) and not runs("sm_80", (9, 0))
    assert runs("compute_90", (9, 0)) and runs("compute_90", (12, 0)) and not runs("compute_90", (8, 9))
    assert not runs("compute_90a", (10, 0))


def test_cuda_backend_declines_a_gpu_the_extension_has_no_code_for(monkeypatch):
    # An sm_90a-only build on an A100 (8.0): the reason names both and how to rebuild, so that
    # auto moves on and an explicit backend="cuda" says why; on an H200 (9.0) nothing is said.
    monkeypatch.setattr(_dispatch, "built_cuda_archs", lambda: ("sm_90a",))
    monkeypatch.setattr(_dispatch, "_ARCH_REASONS", {})
    capability = {0: (8, 0), 1: (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: capability[index])
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():  # CUDA tensors without a GPU: only their devices are read
        on_a100, on_h200 = torch.empty(2, device="cuda:0"), torch.empty(2, device="cuda:1")
    reasons = _dispatch._device_reasons("cuda", [on_a100, None])
    assert len(reasons) == 1
    assert "sm_90a only, not for cuda:0 (sm_80)" in reasons[0] and "TORCH_CUDA_ARCH_LIST" in reasons[0]
    # Its example arch lists run there: '9.0+PTX' (said before) does not on an 8.0 GPU, only on a newer one.
    assert "for this GPU (e.g. '8.0'): `python setup.py build_ext" in reasons[0]
    capability[4] = (12, 0)
    assert "for this GPU (e.g. '12.0' or '9.0+PTX'): `python" in _dispatch._cuda_arch_reason(4)
    assert _dispatch._device_reasons("cuda", [on_h200]) == []
    assert not any("holds code" in r for r in _dispatch._device_reasons("triton", [on_a100]))  # cuda's alone
    # A build for several targets runs where any one of them does: sm_80 and sm_90a on an A100,
    # an A10 (8.6) and an H200; on a T4 (7.5), where none does, the reason names them all.
    monkeypatch.setattr(_dispatch, "built_cuda_archs", lambda: ("sm_80", "sm_90a"))
    monkeypatch.setattr(_dispatch, "_ARCH_REASONS", {})
    capability.update({2: (8, 6), 3: (7, 5)})
    assert [_dispatch._cuda_arch_reason(index) for index in (0, 1, 2)] == [None, None, None]
    assert "holds code for sm_80, sm_90a only, not for cuda:3 (sm_75)" in _dispatch._cuda_arch_reason(3)
    # An extension that does not say what it holds (built before it recorded it): no reason.
    monkeypatch.setattr(_dispatch, "built_cuda_archs", lambda: None)
    monkeypatch.setattr(_dispatch, "_ARCH_REASONS", {})
    assert _dispatch._cuda_arch_reason(0) is None


# --------------------------------------------------------------------------- reasons and edges

def test_an_import_error_from_inside_triton_is_named_as_such(monkeypatch):
    """An ImportError raised by a package triton imports (not by triton itself) is no 'not
    installed': the reason says importing triton failed, with the error."""
    import builtins

    real_import = builtins.__import__

    def importing(name, *args, **kwargs):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("numpy.core.multiarray failed to import", name="numpy.core.multiarray")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(_dispatch, "_ONCE", {})  # no cached answer, and this one is not kept
    monkeypatch.setattr(builtins, "__import__", importing)
    assert _dispatch._triton_import_error() == "importing triton failed: numpy.core.multiarray failed to import"
    assert _dispatch._global_reasons("triton") == ["importing triton failed: numpy.core.multiarray failed to import"]


def test_an_extension_that_does_not_load_is_named_by_every_caller(monkeypatch):
    """ace_kernels._C failing to import: _extension says why, extension() raises it, the cuda
    backend gives it as a reason of the machine (beside a torch built without CUDA)."""
    import sys

    built, _ = _dispatch._extension()
    if built is not None:  # where it is built (and loads), extension() hands it over
        assert _dispatch.extension() is built
    monkeypatch.setattr(_dispatch, "_ONCE", {})
    monkeypatch.delattr(ace_kernels, "_C", raising=False)
    monkeypatch.setitem(sys.modules, "ace_kernels._C", None)  # the import fails, as an absent build's would
    module, error = _dispatch._extension()
    assert module is None
    assert error == ("the CUDA extension ace_kernels._C is not built or failed to load (ModuleNotFoundError: import "
                     "of ace_kernels._C halted; None in sys.modules)")
    with pytest.raises(RuntimeError, match=r"^the CUDA extension ace_kernels\._C is not built or failed to load "
                                           r"\(ModuleNotFoundError: "):
        _dispatch.extension()
    assert _dispatch.built_cuda_archs() is None
    monkeypatch.setattr(torch.version, "cuda", None)
    assert _dispatch._global_reasons("cuda") == ["this torch build has no CUDA support", error]


def test_an_extension_built_from_other_sources_is_declined_in_a_checkout(tmp_path, monkeypatch):
    """In a checkout (setup.py, csrc/ and the package folder the extension lies in), an extension
    whose recorded sources' sha256 is not that of csrc/ (an in-place build the sources moved on
    from: a pull, an edit) is declined with the reason; it was loaded and run as this one. An
    installed package (no csrc/ beside it) is not compared."""
    import sys
    import types

    from ace_kernels._sources import sources_sha256

    (tmp_path / "csrc" / "family").mkdir(parents=True)
    (tmp_path / "csrc" / "family" / "kernel.cu").write_text("// the kernels\n")
    (tmp_path / "csrc" / "bindings.cpp").write_text("// the bindings\n")
    (tmp_path / "setup.py").write_text("")
    so = str(tmp_path / "ace_kernels" / "_C.so")
    built_from = sources_sha256(str(tmp_path / "csrc"))
    assert built_from and _dispatch._other_sources(so, built_from) is None
    (tmp_path / "csrc" / "family" / "kernel.cu").write_text("// the kernels, edited\n")
    now = sources_sha256(str(tmp_path / "csrc"))
    assert now != built_from
    assert _dispatch._other_sources(so, built_from) == (
        f"the CUDA extension ace_kernels._C at {so} was built from sources of sha256 {built_from[:12]}..., not from "
        f"{tmp_path / 'csrc'} (sha256 {now[:12]}...): rebuild it (`pip install --no-build-isolation -e .` or "
        "`python setup.py build_ext --inplace --force`) or delete it")
    assert "was built from sources it does not record, not from" in _dispatch._other_sources(so, "")  # older build
    assert _dispatch._other_sources(str(tmp_path / "site-packages" / "ace_kernels" / "_C.so"), "") is None
    assert _dispatch._other_sources(str(tmp_path / "elsewhere" / "_C.so"), "") is None
    (tmp_path / "setup.py").unlink()
    assert _dispatch._other_sources(so, "") is None
    # Loaded from this checkout's package folder: the cuda backend gives it as a reason of the machine.
    fake = types.ModuleType("ace_kernels._C")
    fake.__file__ = os.path.join(os.path.dirname(_dispatch.__file__), "_C.so")
    fake.SOURCES_SHA256 = "0" * 64
    monkeypatch.setattr(_dispatch, "_ONCE", {})
    monkeypatch.delattr(ace_kernels, "_C", raising=False)
    monkeypatch.setitem(sys.modules, "ace_kernels._C", fake)
    module, error = _dispatch._extension()
    root = os.path.dirname(os.path.dirname(os.path.abspath(_dispatch.__file__)))
    assert module is None and error.startswith(f"the CUDA extension ace_kernels._C at {fake.__file__} was built "
                                               f"from sources of sha256 000000000000..., not from {root}"), error
    assert error in _dispatch._global_reasons("cuda")
    monkeypatch.setattr(_dispatch, "_ONCE", {})
    fake.SOURCES_SHA256 = sources_sha256(os.path.join(root, "csrc"))
    assert _dispatch._extension() == (fake, None)


def test_another_copys_extension_is_declined(tmp_path, monkeypatch):
    """An editable install (``pip install -e``) of one checkout adds an import hook that finds that
    checkout's ace_kernels._C for any copy of ace_kernels without one of its own (a clone or worktree
    run with the same environment): the cuda backend ran it as this copy's, checked against that
    checkout's csrc/, and info reported it loaded. It is declined before it is imported, naming both."""
    import importlib.abc
    import importlib.machinery

    from ace_kernels._sources import sources_sha256

    other = tmp_path / "other"
    (other / "ace_kernels").mkdir(parents=True)
    (other / "csrc").mkdir()
    (other / "csrc" / "kernel.cu").write_text("// that checkout's kernels\n")
    (other / "setup.py").write_text("")
    (other / "ace_kernels" / "_C.py").write_text(f"SOURCES_SHA256 = {sources_sha256(str(other / 'csrc'))!r}\n"
                                                 "CUDA_ARCHS = 'sm_90a'\n")

    class EditableFinder(importlib.abc.MetaPathFinder):  # what setuptools' editable finder does for it
        def find_spec(self, fullname, path=None, target=None):
            if fullname != "ace_kernels._C":
                return None
            return importlib.machinery.PathFinder.find_spec(fullname, [str(other / "ace_kernels")])

    monkeypatch.setattr(sys, "meta_path", [EditableFinder(), *sys.meta_path])
    monkeypatch.delitem(sys.modules, "ace_kernels._C", raising=False)
    monkeypatch.delattr(ace_kernels, "_C", raising=False)
    monkeypatch.setattr(_dispatch, "_ONCE", {})
    try:
        module, error = _dispatch._extension()
        assert module is None and "ace_kernels._C" not in sys.modules, error
        here = os.path.dirname(os.path.abspath(_dispatch.__file__))
        assert error == (f"the CUDA extension ace_kernels._C found at {other / 'ace_kernels' / '_C.py'} is another "
                         f"copy's, not that of this ace_kernels ({here}; an editable install of that copy finds it "
                         "for others): build this copy's (`pip install --no-build-isolation -e .` or `python setup.py "
                         "build_ext --inplace`) or run that copy")
        assert error in _dispatch._global_reasons("cuda") and _dispatch.built_cuda_archs() is None
    finally:  # the old code imported it
        if str(getattr(sys.modules.get("ace_kernels._C"), "__file__", "")).startswith(str(other)):
            del sys.modules["ace_kernels._C"]
            vars(ace_kernels).pop("_C", None)


def test_this_copys_extension_reached_through_a_symlink_is_its_own(tmp_path, monkeypatch):
    """The package folder named by another path (a symlink to it, as a checkout under a linked home
    folder) is still this copy's: its extension is not declined as another copy's."""
    import types

    here = os.path.dirname(os.path.abspath(_dispatch.__file__))
    (tmp_path / "linked").symlink_to(here, target_is_directory=True)
    module = types.ModuleType("ace_kernels._C")
    module.__file__ = str(tmp_path / "linked" / "_C.so")
    monkeypatch.setitem(sys.modules, "ace_kernels._C", module)
    assert _dispatch._extension_elsewhere() is None
    module.__file__ = str(tmp_path / "_C.so")  # a folder of its own: another copy's
    assert "is another copy's" in _dispatch._extension_elsewhere()


def test_the_sources_fingerprint_leaves_hidden_files_out(tmp_path):
    """setup.py compiles what glob finds, which skips hidden names: an editor's lock file beside a
    source (Emacs's .#kernel.cu, a link to nowhere) or a hidden folder is not part of the build, and
    hashing it raised FileNotFoundError from the cuda backend's check of an in-place build."""
    from ace_kernels._sources import sources_sha256

    (tmp_path / "csrc" / "family").mkdir(parents=True)
    (tmp_path / "csrc" / "family" / "kernel.cu").write_text("// the kernels\n")
    built_from = sources_sha256(str(tmp_path / "csrc"))
    os.symlink("someone@host.1234:1700000000", tmp_path / "csrc" / "family" / ".#kernel.cu")
    (tmp_path / "csrc" / ".old").mkdir()
    (tmp_path / "csrc" / ".old" / "kernel.cu").write_text("// a hidden copy\n")
    assert sources_sha256(str(tmp_path / "csrc")) == built_from
    (tmp_path / "setup.py").write_text("")
    assert _dispatch._other_sources(str(tmp_path / "ace_kernels" / "_C.so"), built_from) is None


def test_an_extension_beside_a_setup_py_but_no_sources_is_not_compared(tmp_path):
    """A folder with setup.py and the package but no csrc/ (or a csrc/ without sources: a trimmed copy)
    is no checkout whose sources could have moved on: its extension is taken as it is, not declined
    (nor does the check fail on the missing fingerprint)."""
    (tmp_path / "setup.py").write_text("")
    so = str(tmp_path / "ace_kernels" / "_C.so")
    assert _dispatch._other_sources(so, "") is None
    assert _dispatch._other_sources(so, "0" * 64) is None
    (tmp_path / "csrc").mkdir()
    (tmp_path / "csrc" / "README.md").write_text("the sources are elsewhere\n")
    assert _dispatch._other_sources(so, "0" * 64) is None


def test_the_sources_fingerprint_is_none_without_sources_and_the_same_in_any_listing_order(tmp_path, monkeypatch):
    """No source file under csrc/: no fingerprint (None), not the hash of nothing. With sources, the
    fingerprint does not depend on the order the file system lists them in (setup.py's build and the
    cuda backend's check may run on different file systems, or after a copy that reorders them)."""
    from ace_kernels import _sources

    csrc = tmp_path / "csrc"
    (csrc / "docs").mkdir(parents=True)
    (csrc / "docs" / "notes.md").write_text("not a source\n")
    assert _sources.sources_sha256(str(csrc)) is None
    for name in ("bindings.cpp", "b/kernel.cu", "b/kernel.cuh", "a/tiles.h", "a/z.hpp"):
        (csrc / name).parent.mkdir(parents=True, exist_ok=True)
        (csrc / name).write_text(f"// {name}\n")
    listed = _sources.sources_sha256(str(csrc))
    walk = os.walk

    def walk_reversed(top):
        for folder, folders, names in walk(top):
            folders.reverse()  # in place: os.walk descends in this order
            names.reverse()
            yield folder, folders, names

    monkeypatch.setattr(_sources.os, "walk", walk_reversed)
    assert _sources.sources_sha256(str(csrc)) == listed


def test_the_triton_backend_without_a_gpu_or_the_interpreter_says_so(monkeypatch):
    if _dispatch._triton_import_error():
        pytest.skip("triton does not import here")
    monkeypatch.setattr(_dispatch, "_INTERPRETER_AT_IMPORT", False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _dispatch._global_reasons("triton") == ["no CUDA GPU is visible and TRITON_INTERPRET=1 is not set"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _dispatch._global_reasons("triton") == []


def test_define_op_refuses_unknown_backends(monkeypatch):
    monkeypatch.setattr(_dispatch, "_OPS", dict(_dispatch._OPS))
    with pytest.raises(ValueError, match=r"^unknown backends \['cudnn', 'Torch'\] for op '_toy_bad'$"):
        _dispatch.define_op("_toy_bad", prefer=("cudnn", "torch", "Torch"))
    assert "_toy_bad" not in _dispatch._OPS


def test_auto_with_no_backend_that_can_run_lists_each_and_why(monkeypatch):
    """An op without a torch backend, on a call no other backend takes: auto's error names every
    backend it tried, in order, each with all of its reasons."""
    monkeypatch.setattr(_dispatch, "_OPS", dict(_dispatch._OPS))
    _dispatch.define_op("_toy_no_torch", prefer=("cuda", "triton"))
    _dispatch.register("_toy_no_torch", "triton", check=lambda n: [] if n < 10 else [f"n={n} is over 9"])(
        lambda *a: "triton")
    monkeypatch.setattr(_dispatch, "_global_reasons", lambda backend: [])
    monkeypatch.setattr(_dispatch, "interpreter_enabled", lambda: False)
    monkeypatch.delenv("ACE_KERNELS_BACKEND", raising=False)
    with pytest.raises(RuntimeError) as caught:
        _dispatch.select("_toy_no_torch", "auto", [torch.zeros(3)], (12,))
    assert str(caught.value) == ("_toy_no_torch: no backend can run this call (cuda: op '_toy_no_torch' has no cuda "
                                 "implementation; triton: needs CUDA tensors, got tensors on ['cpu'], n=12 is over 9)")


def test_an_absent_order_file_is_no_table_and_no_warning(tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _dispatch.read_by_device(str(tmp_path / "dispatch_order.json")) == {}


def _patch_lang_tensor_of_triton_3_6(tensor, scope):
    # The shape of the interpreter function _fix_interpreter_index replaces (its source is read).
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))


def test_the_interpreter_index_fix_wraps_only_an_old_interpreter_once(monkeypatch):
    """Under an interpreter whose scalars convert with int(self.handle.data)) (1-element arrays,
    which numpy >= 2.4 refuses), the fix wraps it so that __index__ reads the one element; it
    wraps once, and leaves alone a function whose source cannot be read."""
    import types

    import numpy as np

    interpreter = pytest.importorskip("triton.runtime.interpreter")
    monkeypatch.setattr(interpreter, "_patch_lang_tensor", _patch_lang_tensor_of_triton_3_6, raising=False)
    _dispatch._fix_interpreter_index()
    patched = interpreter._patch_lang_tensor
    assert patched is not _patch_lang_tensor_of_triton_3_6 and patched._ace_fixed
    attrs = {}
    scope = types.SimpleNamespace(set_attr=lambda tensor, name, value: attrs.setdefault(name, []).append(value))
    patched(object(), scope)
    assert len(attrs["__index__"]) == 2  # the old one, then the fix (which wins)
    scalar = types.SimpleNamespace(handle=types.SimpleNamespace(data=np.array([[7]], dtype=np.int32)))
    assert attrs["__index__"][-1](scalar) == 7
    _dispatch._fix_interpreter_index()  # already fixed: not wrapped twice
    assert interpreter._patch_lang_tensor is patched
    monkeypatch.setattr(interpreter, "_patch_lang_tensor", len)  # a builtin: no source to read
    _dispatch._fix_interpreter_index()
    assert interpreter._patch_lang_tensor is len


def test_nested_tensors_are_refused_naming_the_argument():
    # torch.nested.nested_tensor reports layout torch.strided: each op once failed on its .shape with torch's
    # "Internal error: NestedTensorImpl doesn't support sizes" instead of naming the argument.
    def nested(*shapes):
        return torch.nested.nested_tensor([torch.randn(*s) for s in shapes])

    assert nested((2, 8), (3, 8)).layout == torch.strided
    w, a, bb = torch.randn(24, 8), torch.randn(3, 2, 8), torch.randn(3, 8, 2)
    module = ace_kernels.ACEHypergraph(dim=8, hidden=4, topk=2)
    u = torch.randn(2, 8)
    cases = [
        ("x", lambda: ace_kernels.lora_qkv(nested((2, 8), (3, 8)), w, None, a, bb, scaling=0.5)),
        ("weight", lambda: ace_kernels.lora_linear(u, nested((8,), (8,)), None, a[0], bb[0, :2], scaling=0.5)),
        ("image_emb", lambda: ace_kernels.label_guided_infonce(nested((8,), (8,)), u, 1.0)),
        ("labels", lambda: ace_kernels.label_guided_infonce(u, u, 1.0, nested((1,), (2,)))),
        ("logit_scale", lambda: ace_kernels.label_guided_infonce(u, u, nested((1,)))),
        ("x", lambda: module(nested((5, 8), (6, 8)), torch.randn(2, 4))),
    ]
    for name, call in cases:
        with pytest.raises(ValueError, match=f"argument '{name}': expected a dense \\(strided\\) tensor, got a nested"):
            call()


# --------------------------------------------------------------------------- shared memory per block

def _fake_cards(monkeypatch, optin_kib: dict, names: dict | None = None):
    """A machine where Triton and torch can run and ``cuda:i`` gives a block ``optin_kib[i]`` KiB of
    shared memory (opted in): fake CUDA tensors, the properties read from a table that counts its
    reads. Returns the counter."""
    import types

    reads = []

    def properties(index):
        reads.append(index)
        return types.SimpleNamespace(shared_memory_per_block_optin=optin_kib[index] * 1024)

    # (torch.cuda.is_available stays as it is: _global_reasons below stands in for it, and FakeTensorMode
    # (torch 2.11) makes a real tensor on a CUDA device it believes visible)
    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    monkeypatch.setattr(_dispatch, "_SHARED_LIMITS", {})
    monkeypatch.setattr(_dispatch, "_cuda_device_name", lambda index: (names or {}).get(index, f"Card {index}"))
    monkeypatch.setattr(_dispatch, "_global_reasons", lambda backend: ["not here"] if backend == "cuda" else [])
    monkeypatch.setattr(_dispatch, "interpreter_enabled", lambda: False)
    monkeypatch.delenv("ACE_KERNELS_BACKEND", raising=False)
    return reads


def test_a_launch_needing_exactly_the_blocks_shared_memory_fits(monkeypatch):
    """A block may use all the shared memory the card gives it (opted in): a need equal to the limit
    runs, one byte more is declined naming both."""
    _fake_cards(monkeypatch, {0: 227})
    device = torch.device("cuda", 0)
    assert _dispatch.shared_memory_reasons(device, 227 * 1024, "a launch") == []
    assert _dispatch.shared_memory_reasons(device, 227 * 1024 + 1, "a launch") == [
        f"a launch needs {227 * 1024 + 1} bytes of shared memory per block, cuda:0 allows {227 * 1024} "
        "(shared_memory_per_block_optin)"]


def test_infonce_triton_declines_a_gpu_whose_blocks_have_too_little_shared_memory(monkeypatch):
    """The 16-bit one-pass forward at D = 512 needs 193 KiB of shared memory per block (sm_90a): on
    an A100 (163 KiB) or an sm_86/89 card (99 KiB) Triton would fail at the launch. auto takes torch
    there, backend='triton' says why; on an H100/H200 (227 KiB) nothing changes. The property is
    read once per device."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ace_kernels import contrastive

    reads = _fake_cards(monkeypatch, {0: 99, 1: 163, 2: 227})
    with FakeTensorMode():  # CUDA tensors without a GPU: only their devices, shapes and strides are read
        on = [torch.empty(64, 512, dtype=torch.bfloat16, device=f"cuda:{i}") for i in range(3)]
        narrow = torch.empty(64, 500, dtype=torch.bfloat16, device="cuda:0")  # unaligned path: 8 KiB
    need = contrastive._GPU_SHARED_BYTES[("lse", "16bit/one_dot")][0]
    assert 163 * 1024 < need <= 227 * 1024
    for index, limit in ((0, 99), (1, 163)):
        u = on[index]
        impl = _dispatch.select(contrastive.OP_NAME, "auto", [u, u, None, None], args=(u, u))
        assert _dispatch.backend_of(contrastive.OP_NAME, impl) == "torch"
        with pytest.raises(RuntimeError, match=rf"^label_guided_infonce: backend 'triton' cannot run this call: the "
                                               rf"forward's launch configuration \(dim=512, bfloat16\) needs {need} "
                                               rf"bytes of shared memory per block, cuda:{index} allows "
                                               rf"{limit * 1024} \(shared_memory_per_block_optin\)"):
            _dispatch.select(contrastive.OP_NAME, "triton", [u, u], args=(u, u))
    u = on[2]
    assert contrastive._triton_check(u, u) == []
    assert _dispatch.backend_of(contrastive.OP_NAME, _dispatch.select(
        contrastive.OP_NAME, "auto", [u, u], args=(u, u))) == "triton"
    assert contrastive._triton_check(narrow, narrow) == []
    for _ in range(3):
        contrastive._triton_check(on[0], on[0])
    assert sorted(reads) == [0, 1, 2]  # once per device


def test_infonce_shared_memory_check_costs_nothing_on_a_card_that_fits_every_configuration(monkeypatch):
    """On an H100/H200 (227 KiB) every recorded configuration fits: the per-call check returns before
    resolving the two launch configurations (about 40 us a call on the CPU side)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ace_kernels import contrastive

    _fake_cards(monkeypatch, {0: 227, 1: 163})

    def resolved(*args, **kwargs):
        raise AssertionError("a launch configuration was resolved")

    monkeypatch.setattr(contrastive, "_launch_config", resolved)
    with FakeTensorMode():
        big = torch.empty(8, 512, dtype=torch.float16, device="cuda:0")
        small = torch.empty(8, 512, dtype=torch.float16, device="cuda:1")
    assert contrastive._shared_memory_reasons(big, big) == []
    with pytest.raises(AssertionError, match="resolved"):
        contrastive._shared_memory_reasons(small, small)


def test_infonce_shared_memory_check_traces_with_a_symbolic_width(monkeypatch):
    """torch.compile(dynamic=True) traces the Triton check with a symbolic D: a D that is not a multiple
    of 16 made the alignment a SymBool that keyed the launch configuration's tables, and the trace
    failed (TypeError: BooleanAtom not allowed in this context) on every GPU call. make_fx's symbolic
    tracing shows it without a GPU (Dynamo itself: the next test)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from ace_kernels import contrastive

    _fake_cards(monkeypatch, {0: 163})  # (a card that fits every configuration skips the lookup)
    seen = []

    def check(x):
        u = x.to("cuda:0")
        seen.append((type(u.shape[1]), contrastive._triton_check(u, u)))
        return x + 1

    for dim, refused in ((512, True), (500, False)):  # 512: the one-dot forward needs 193 KiB
        seen.clear()
        make_fx(check, tracing_mode="symbolic")(torch.zeros(8, dim, dtype=torch.float16))
        assert [(kind, bool(reasons)) for kind, reasons in seen] == [(torch.SymInt, refused)], (dim, seen)


def test_infonce_shared_memory_check_traces_under_dynamo_with_a_symbolic_width(monkeypatch):
    """The same under Dynamo itself (torch.compile(dynamic=True), fullgraph), where bool() of a SymBool
    stays one (make_fx's guards): a D not a multiple of 16 still keyed the configuration tables with the
    SymBool `D % 16 == 0`, and the trace failed (TypeError: BooleanAtom not allowed in this context) on
    a card that does not fit every configuration (an A100). Dynamo takes fake CUDA tensors as inputs;
    the block limit is read eagerly first, as an eager call fills it (Dynamo folds the real read)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ace_kernels import contrastive

    _fake_cards(monkeypatch, {0: 163})
    assert _dispatch.shared_memory_limit(torch.device("cuda:0")) == 163 * 1024
    seen = []

    def check(u):
        seen.append(contrastive._triton_check(u, u))
        return u + 1

    for dim, refused in ((512, True), (500, False), (17, False)):  # 512: the one-dot forward needs 193 KiB
        with FakeTensorMode():
            u = torch.empty(8, dim, dtype=torch.float16, device="cuda:0")
        seen.clear()
        torch._dynamo.reset()
        torch.compile(check, backend="eager", dynamic=True, fullgraph=True)(u)
        assert [bool(reasons) for reasons in seen] == [refused], (dim, seen)


def test_every_op_selects_alike_under_dynamo_with_symbolic_shapes(monkeypatch):
    """Each public op's dispatch (its checks, the measured order, the variant) traced by Dynamo with
    dynamic=True, on fake CUDA tensors of odd sizes (D or in_features not a multiple of 16, N = topk + 1,
    B = 1) on an H200-like and an A100-like card, picks what an eager call picks (or raises alike): a
    check that fails only with symbolic sizes breaks torch.compile(dynamic=True), and the automatic
    dynamic shapes Dynamo switches to on a second shape, on a GPU."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    _fake_cards(monkeypatch, {0: 227, 1: 163}, names={0: "NVIDIA H200"})  # card 0 has a measured order
    for index in (0, 1):
        _dispatch.shared_memory_limit(torch.device(f"cuda:{index}"))  # as an eager call fills it
    picked = []
    select = _dispatch.select

    def recording(op, *args, **kwargs):
        picked.append(_dispatch.backend_of(op, select(op, *args, **kwargs)))
        return lambda *call_args: call_args[0] + 0

    monkeypatch.setattr(_dispatch, "select", recording)

    def lora_call(op, qkv):
        def call(x, d):
            p = 3 if qkv else 1
            w, a, b = (d.new_empty(p * 8, 500), d.new_empty(*((3,) if qkv else ()), 4, 500),
                       d.new_empty(*((3,) if qkv else ()), 8, 4))
            return op(x, w, None, a, b, scaling=2.0, dropout_p=0.1, training=True, backend=backend)
        return call

    def hypergraph(x, d):
        adapter = (d.new_empty(8, 500), d.new_empty(8), d.new_empty(500, 8), d.new_empty(500))
        return ace_kernels.ace_hypergraph(x, d.new_empty(1, 4), adapter, adapter, topk=4, cls_only=cls_only,
                                          backend=backend)

    def infonce(x, d):
        return ace_kernels.label_guided_infonce(x[0], x[0], d.new_ones(()), backend=backend)

    calls = [("lora_linear", lora_call(ace_kernels.lora_linear, False), (1, 3, 500)),
             ("lora_qkv", lora_call(ace_kernels.lora_qkv, True), (1, 3, 500)),
             ("lora_qkv_packed", lora_call(ace_kernels.lora_qkv_packed, True), (1, 3, 500)),
             ("ace_hypergraph", hypergraph, (1, 5, 500)), ("label_guided_infonce", infonce, (1, 1, 500))]
    outcomes = []
    for name, call, shape in calls:
        for index in (0, 1):
            for backend in ("auto", "triton"):  # (torch has no check)
                for cls_only in (False, True) if name == "ace_hypergraph" else (False,):
                    with FakeTensorMode():
                        x = torch.empty(shape, dtype=torch.float16, device=f"cuda:{index}")
                        d = torch.empty(0, dtype=torch.float16, device=f"cuda:{index}")
                    answers = []
                    for run in (call, torch.compile(call, backend="eager", dynamic=True, fullgraph=True)):
                        picked.clear()
                        torch._dynamo.reset()
                        try:
                            run(x, d)
                            answers.append(list(picked))
                        except RuntimeError as exc:  # a backend that cannot run the call, or a failed trace
                            answers.append(str(exc).splitlines()[0])
                    assert answers[0] == answers[1], (name, index, backend, cls_only, answers)
                    outcomes.append(answers[0])
    # Not vacuous: the Triton backend takes every call here, on both cards (D = 500 takes the loss's
    # unaligned path, which fits 163 KiB), and a trace that failed would be an error, not a pick.
    assert outcomes.count(["triton"]) == len(outcomes), outcomes


def test_shared_memory_needs_are_not_checked_under_the_interpreter_or_off_cuda(monkeypatch):
    """Under TRITON_INTERPRET=1 the kernels run on CPU tensors, where no block limit applies:
    no device property is read, and the check says nothing."""
    from ace_kernels import contrastive

    def no_properties(index):
        raise AssertionError("no device property is read for CPU tensors")

    monkeypatch.setattr(torch.cuda, "get_device_properties", no_properties)
    monkeypatch.setattr(_dispatch, "_SHARED_LIMITS", {})
    monkeypatch.setattr(_dispatch, "interpreter_enabled", lambda: True)
    u = torch.zeros(8, 512, dtype=torch.float16)
    assert contrastive._triton_check(u, u) == []
    assert _dispatch.shared_memory_reasons(u.device, 10**9, "a launch") == []
    # A CUDA device too (a GPU machine under the interpreter, whose Triton backend declines CUDA tensors).
    assert _dispatch.shared_memory_limit(torch.device("cuda", 0)) is None
    assert _dispatch.shared_memory_reasons(torch.device("cuda", 0), 10**9, "a launch") == []
    monkeypatch.setattr(_dispatch, "interpreter_enabled", lambda: False)
    assert _dispatch.shared_memory_reasons(u.device, 10**9, "a launch") == []


def test_lora_and_hypergraph_triton_check_their_shared_memory_needs_too(monkeypatch):
    """LoRA's and the hypergraph's configurations need less (72 and 10 KiB at most on sm_90a), which
    every card from sm_80 on gives a block: nothing changes there. A card that gives less (a T4's
    64 KiB for LoRA; a made-up 8 KiB one for the hypergraph) is declined like the InfoNCE's."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ace_kernels import hypergraph as hg, lora

    _fake_cards(monkeypatch, {0: 99, 1: 163, 2: 227, 3: 64, 4: 8})
    assert 64 * 1024 < lora._GPU_SHARED_BYTES <= 99 * 1024 and 8 * 1024 < hg.GPU_SHARED_BYTES <= 64 * 1024
    with FakeTensorMode():
        cards = []
        for index in range(5):
            dev = f"cuda:{index}"
            x, weight = torch.empty(4, 16, device=dev), torch.empty(8, 16, device=dev)
            lora_args = (x, weight, None, torch.empty(4, 16, device=dev), torch.empty(8, 4, device=dev), 1.0, 0.0, True)
            hg_args = (torch.empty(2, 9, 16, device=dev), torch.empty(2, 8, device=dev), (), (), 3, True)
            cards.append((lora_args, hg_args))
    for index, (lora_args, hg_args) in enumerate(cards):
        picked = {op: _dispatch.backend_of(op, _dispatch.select(op, "auto", [a for a in args if
                                                                               isinstance(a, torch.Tensor)], args))
                  for op, args in (("lora_linear", lora_args), ("ace_hypergraph", hg_args))}
        if index < 3:
            assert picked == {"lora_linear": "triton", "ace_hypergraph": "triton"}
    assert picked == {"lora_linear": "torch", "ace_hypergraph": "torch"}
    lora_args, hg_args = cards[3]
    with pytest.raises(RuntimeError, match=rf"^lora_linear: backend 'triton' cannot run this call: the fused kernels' "
                                           rf"launch configuration needs {lora._GPU_SHARED_BYTES} bytes of shared "
                                           rf"memory per block, cuda:3 allows 65536 "
                                           rf"\(shared_memory_per_block_optin\)$"):
        _dispatch.select("lora_linear", "triton", [lora_args[0]], lora_args)
    assert _dispatch.backend_of("ace_hypergraph", _dispatch.select("ace_hypergraph", "auto", [hg_args[0]],
                                                                   hg_args)) == "triton"
    lora_args, hg_args = cards[4]
    with pytest.raises(RuntimeError, match=rf"^ace_hypergraph: backend 'triton' cannot run this call: the Triton "
                                           rf"kernels' launch configuration needs {hg.GPU_SHARED_BYTES} bytes of "
                                           rf"shared memory per block, cuda:4 allows 8192"):
        _dispatch.select("ace_hypergraph", "triton", [hg_args[0]], hg_args)
