"""ace_kernels._aot's refusals, without compiling: a tool missing from the triton wheel, a
``divisible_by_16`` naming no argument of the kernel (through an autotune/heuristics wrapper),
and a ``ptxas -v`` report without a line it reads. The real sm_90a compiles are in
test_kernel_stats.py and the kernel families' AOT tests (in a fresh process)."""

from __future__ import annotations

import types

import pytest

from ace_kernels import _aot

triton = pytest.importorskip("triton")


def test_a_tool_missing_from_the_triton_wheel_is_named_with_where_it_was_looked_for():
    with pytest.raises(FileNotFoundError, match=r"^no-such-tool not found in the triton wheel at .*"
                                                r"backends/nvidia/bin/no-such-tool$"):
        _aot._tool("no-such-tool")


def _scale_kernel(x_ptr, n, factor, BLOCK: triton.language.constexpr):
    # Never compiled here: only its argument names are read.
    pass


def test_divisible_by_16_must_name_arguments_of_the_kernel_inside_a_wrapper():
    """The kernel is found inside a heuristics (or autotune) wrapper, and a name in
    ``divisible_by_16`` that is not one of its arguments is refused before any compile."""
    from triton.runtime.jit import JITFunction

    wrapped = triton.heuristics({"BLOCK": lambda args: 16})(JITFunction(_scale_kernel))
    signature = {"x_ptr": "*fp32", "n": "i32", "factor": "fp32", "BLOCK": "constexpr"}
    with pytest.raises(ValueError, match=r"^argument 'divisible_by_16': \['m', 'BLOCK_N'\] are not arguments of "
                                         r"_scale_kernel$"):
        _aot.ptx_sm90(wrapped, signature, {"BLOCK": 16}, divisible_by_16=("n", "m", "BLOCK_N"))


def test_a_ptxas_report_without_a_line_it_reads_is_an_error_not_a_zero(monkeypatch):
    """A ptxas whose -v wording changed (here: one whose report is empty) must not read as 0
    registers and no spills: the report is refused, naming the kernel and the pattern."""
    compiled = types.SimpleNamespace(asm={"ptx": "// no code", "cubin": b""},
                                     metadata=types.SimpleNamespace(name="_scale_kernel", shared=0))
    monkeypatch.setattr(_aot, "_compile_with_report", lambda *args: (compiled, ""))
    with pytest.raises(RuntimeError, match=r"^ptxas -v report for _scale_kernel has no match for "
                                           r"'Used \(\\\\d\+\) registers'"):
        _aot.compile_sm90(_scale_kernel, {})
