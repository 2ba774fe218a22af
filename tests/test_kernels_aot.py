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
    """The kernel is found inside a heuristics (or autotune, or both) wrapper, and a name in
    ``divisible_by_16`` that is not one of its arguments is refused before any compile."""
    from triton.runtime.jit import JITFunction

    wrapped = triton.heuristics({"BLOCK": lambda args: 16})(JITFunction(_scale_kernel))
    signature = {"x_ptr": "*fp32", "n": "i32", "factor": "fp32", "BLOCK": "constexpr"}
    with pytest.raises(ValueError, match=r"^argument 'divisible_by_16': \['m', 'BLOCK_N'\] are not arguments of "
                                         r"_scale_kernel$"):
        _aot.ptx_sm90(wrapped, signature, {"BLOCK": 16}, divisible_by_16=("n", "m", "BLOCK_N"))
    # Wrappers stacked (autotune over heuristics): the kernel is found under both.
    stacked = triton.autotune(configs=[triton.Config({})], key=["n"])(wrapped)
    with pytest.raises(ValueError, match=r"^argument 'divisible_by_16': \['m'\] are not arguments of _scale_kernel$"):
        _aot.ptx_sm90(stacked, signature, {"BLOCK": 16}, divisible_by_16=("n", "m"))


def test_a_ptxas_report_without_a_line_it_reads_is_an_error_not_a_zero(monkeypatch):
    """A ptxas whose -v wording changed (here: one whose report is empty) must not read as 0
    registers and no spills: the report is refused, naming the kernel and the pattern."""
    compiled = types.SimpleNamespace(asm={"ptx": "// no code", "cubin": b""},
                                     metadata=types.SimpleNamespace(name="_scale_kernel", shared=0))
    monkeypatch.setattr(_aot, "_compile_with_report", lambda *args: (compiled, ""))
    with pytest.raises(RuntimeError, match=r"^ptxas -v report for _scale_kernel has no match for "
                                           r"'Used \(\\\\d\+\) registers'"):
        _aot.compile_sm90(_scale_kernel, {})


def test_each_resource_is_read_from_its_own_line_of_the_ptxas_report(monkeypatch):
    """Registers, spill stores, spill loads and the stack frame each come from their own words of
    the ``ptxas -v`` report (distinct numbers here), shared memory from Triton's metadata, and the
    warps are the ones asked for: a spill reported under the wrong name would hide one kind of it."""
    report = ("ptxas info    : Compiling entry function '_scale_kernel' for 'sm_90a'\n"
              "ptxas info    : Function properties for _scale_kernel\n"
              "    24 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n"
              "ptxas info    : Used 72 registers, used 1 barriers, 24 bytes cumulative stack size\n")
    compiled = types.SimpleNamespace(asm={"ptx": "// no code", "cubin": b""},
                                     metadata=types.SimpleNamespace(name="_scale_kernel", shared=4096))
    monkeypatch.setattr(_aot, "_compile_with_report", lambda *args: (compiled, report))
    resources = _aot.compile_sm90(_scale_kernel, {}, num_warps=8)
    assert resources == _aot.KernelResources(name="_scale_kernel", registers=72, spill_store_bytes=8,
                                             spill_load_bytes=4, stack_frame_bytes=24, shared_bytes=4096,
                                             num_warps=8)
    assert resources.spills == 12


def test_compile_sm90_asks_triton_for_sm90a_with_the_options_and_alignments_given(monkeypatch):
    """What reaches ``triton.compile`` (faked here, so nothing compiles): the sm_90a target, the warps,
    stages and register cap asked for, and 16-divisibility for every pointer argument (aligned_pointers)
    and for each integer named in ``divisible_by_16``: a spill check run with other options than a
    launch's would judge other code."""
    from triton.runtime.jit import JITFunction

    seen = {}

    def compile(source, target, options):
        seen.update(source=source, target=target, options=options)
        print("    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
              "ptxas info    : Used 40 registers, used 0 barriers")
        return types.SimpleNamespace(asm={"cubin": b""}, metadata=types.SimpleNamespace(name="_scale_kernel", shared=0))

    monkeypatch.setattr(triton, "compile", compile)
    signature = {"x_ptr": "*fp32", "n": "i32", "factor": "fp32", "BLOCK": "constexpr"}
    resources = _aot.compile_sm90(JITFunction(_scale_kernel), signature, {"BLOCK": 16}, num_warps=8, num_stages=2,
                                  divisible_by_16=("n",), maxnreg=128)
    assert resources.registers == 40 and resources.num_warps == 8
    assert (seen["target"].backend, seen["target"].arch, seen["target"].warp_size) == ("cuda", 90, 32)
    assert seen["options"] == {"num_warps": 8, "num_stages": 2, "maxnreg": 128}
    assert seen["source"].attrs == {(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]]}
    assert seen["source"].signature == signature and seen["source"].constants == {(3,): 16}
    _aot.compile_sm90(JITFunction(_scale_kernel), signature, {"BLOCK": 16}, aligned_pointers=False)
    assert seen["options"] == {"num_warps": 4, "num_stages": 3} and seen["source"].attrs == {}
