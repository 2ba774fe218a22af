"""Ahead-of-time compilation of Triton kernels for Hopper (sm_90a) with no GPU.

Used by CI to reject kernel configurations that spill registers before any GPU
sees them: ``compile_sm90(kernel, signature, constexprs)`` runs Triton's full
pipeline for ``GPUTarget("cuda", 90, 32)``, down to the cubin its ptxas (shipped in
the Triton wheel) makes, and reads that ptxas run's ``-v`` report: registers, spill bytes,
stack frame; shared memory comes from Triton's metadata. ``profile_sm90`` also
disassembles the cubin (nvdisasm, from the same wheel) and counts the instructions of the
kernel's main loop, and ``blocks_per_sm90`` says how many blocks of a kernel fit on one SM:
static facts about the code a GPU would run, for judging a kernel change where no GPU is at
hand (they are not timings).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence


@dataclass(frozen=True)
class KernelResources:
    name: str
    registers: int
    spill_store_bytes: int
    spill_load_bytes: int
    stack_frame_bytes: int
    shared_bytes: int
    num_warps: int

    @property
    def spills(self) -> int:
        return self.spill_store_bytes + self.spill_load_bytes


def _tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} not found in the triton wheel at {path}")
    return path


def compile_sm90(kernel, signature: dict, constexprs: dict | None = None, *, num_warps: int = 4,
                 num_stages: int = 3, divisible_by_16: Sequence[str] = (),
                 aligned_pointers: bool = True, maxnreg: int | None = None) -> KernelResources:
    """Compile ``kernel`` (a ``@triton.jit`` function) for sm_90a and report its resources.

    ``signature`` maps every argument name to a Triton type string (``"*fp32"``,
    ``"i32"``, ``"fp32"``, ... or ``"constexpr"``); ``constexprs`` gives the value of
    each constexpr argument; ``maxnreg`` the register cap a launch passes (Triton's option).
    """
    return _compile(kernel, signature, constexprs, num_warps, num_stages, divisible_by_16, aligned_pointers,
                    maxnreg)[0]


@dataclass(frozen=True)
class LoopProfile:
    """What :func:`profile_sm90` read off one compiled kernel."""

    resources: KernelResources
    blocks_per_sm: int  # resident blocks per SM (registers, shared memory, warps)
    loop_opcodes: dict = field(default_factory=dict)  # opcode (first word) -> count in the main loop's body
    kernel_opcodes: dict = field(default_factory=dict)  # the same over the whole listing (the loop's once)

    @property
    def loop_instructions(self) -> int:
        return sum(self.loop_opcodes.values())

    @property
    def kernel_instructions(self) -> int:
        return sum(self.kernel_opcodes.values())


def profile_sm90(kernel, signature: dict, constexprs: dict | None = None, *, num_warps: int = 4,
                 num_stages: int = 3, divisible_by_16: Sequence[str] = (),
                 aligned_pointers: bool = True, maxnreg: int | None = None) -> LoopProfile:
    """:func:`compile_sm90`, then the instruction mix of the kernel's main loop (its largest
    loop, see :func:`main_loop_opcodes`) and its resident blocks per SM."""
    resources, cubin = _compile(kernel, signature, constexprs, num_warps, num_stages, divisible_by_16,
                                aligned_pointers, maxnreg)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as handle:
            handle.write(cubin)
        sass = subprocess.run([_tool("nvdisasm"), "-c", path], capture_output=True, text=True, check=True).stdout
    return LoopProfile(resources=resources,
                       blocks_per_sm=blocks_per_sm90(resources.registers, resources.shared_bytes, num_warps),
                       loop_opcodes=main_loop_opcodes(sass), kernel_opcodes=opcode_counts(sass.splitlines()))


# sm_90 per-SM limits (CUDA C++ Programming Guide, compute capability 9.0): 64K 32-bit registers
# allocated per warp in units of 256 from 4 sub-partitions of 16K each (cuda_occupancy.h), 228 KiB
# of shared memory allocated in units of 128 bytes, of which 1 KiB is reserved per block, 64
# resident warps, 32 resident blocks.
_SM90_REGISTERS = 65536
_SM90_REGISTER_UNIT = 256
_SM90_SUB_PARTITIONS = 4
_SM90_SHARED_UNIT = 128
_SM90_SHARED_BYTES = 228 * 1024
_SM90_SHARED_PER_BLOCK_RESERVED = 1024
_SM90_WARPS = 64
_SM90_BLOCKS = 32


def blocks_per_sm90(registers: int, shared_bytes: int, num_warps: int) -> int:
    """How many blocks of ``num_warps`` warps, each thread holding ``registers`` registers and the
    block ``shared_bytes`` of shared memory, are resident on one sm_90 SM at once."""
    if registers < 1 or num_warps < 1 or shared_bytes < 0:
        raise ValueError(f"expected registers >= 1, num_warps >= 1 and shared_bytes >= 0, got {registers}, "
                         f"{num_warps} and {shared_bytes}")
    per_warp = -(-registers * 32 // _SM90_REGISTER_UNIT) * _SM90_REGISTER_UNIT
    # Warps fit per sub-partition (a warp's registers come from one of them), as cudaOccupancy.h counts.
    warps = (_SM90_REGISTERS // _SM90_SUB_PARTITIONS // per_warp) * _SM90_SUB_PARTITIONS
    by_registers = warps // num_warps
    per_block = -(-(shared_bytes + _SM90_SHARED_PER_BLOCK_RESERVED) // _SM90_SHARED_UNIT) * _SM90_SHARED_UNIT
    by_shared = _SM90_SHARED_BYTES // per_block
    return min(by_registers, by_shared, _SM90_WARPS // num_warps, _SM90_BLOCKS)


_LABEL = re.compile(r"^\s*(\.L_x_\d+):\s*$")
_BRANCH = re.compile(r"\bBRA\b[^`]*`\((\.L_x_\d+)\)")
_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P(?:T|\d)\s+)?([A-Z][A-Z0-9_]*)")


def main_loop_opcodes(sass: str) -> dict:
    """Opcode counts of the longest loop body in an nvdisasm listing: the lines from a label to
    the last branch back to it. Opcodes are the instruction's first word without its modifiers
    (``IMAD.HI.U32`` counts as ``IMAD``). An empty dict when the listing has no backward branch
    but the one every kernel ends with, a branch to itself after ``EXIT`` (when the compiler
    unrolled every loop, as triton 3.8 does the LoRA gradient kernel's rows with dX alone)."""
    lines = sass.splitlines()
    labels = {}
    for number, line in enumerate(lines):
        match = _LABEL.match(line)
        if match:
            labels[match.group(1)] = number
    best = None
    for number, line in enumerate(lines):
        match = _BRANCH.search(line)
        if (match and match.group(1) in labels and labels[match.group(1)] < number
                and any(_INSTRUCTION.match(body) for body in lines[labels[match.group(1)]:number])):
            span = (labels[match.group(1)], number)
            if best is None or span[1] - span[0] > best[1] - best[0]:
                best = span
    if best is None:
        return {}
    return opcode_counts(lines[best[0]:best[1] + 1])


def opcode_counts(lines: Sequence[str]) -> dict:
    """Opcode (first word, no modifiers) -> count over the instruction lines of an nvdisasm listing."""
    counts = Counter()
    for line in lines:
        match = _INSTRUCTION.match(line)
        if match:
            counts[match.group(1)] += 1
    return dict(counts)


def integer_arguments(signature: dict, exclude: Sequence[str] = ()) -> list:
    """The 32-bit integer arguments of ``signature`` (less ``exclude``): those Triton specialises
    at a launch when their value is a multiple of 16, as ``divisible_by_16`` marks them."""
    return [name for name, kind in signature.items() if kind == "i32" and name not in exclude]


def ptx_sm90(kernel, signature: dict, constexprs: dict | None = None, *, num_warps: int = 4,
             num_stages: int = 3, divisible_by_16: Sequence[str] = (), aligned_pointers: bool = True) -> str:
    """The PTX Triton generates for ``kernel`` on sm_90a (arguments as :func:`compile_sm90`'s):
    which instruction forms it chose, e.g. ``ex2.approx.ftz.f32`` or ``ex2.approx.f32``."""
    return _triton_compile(kernel, signature, constexprs, num_warps, num_stages, divisible_by_16,
                           aligned_pointers).asm["ptx"]


def _triton_compile(kernel, signature, constexprs, num_warps, num_stages, divisible_by_16, aligned_pointers,
                    maxnreg=None):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from triton.runtime.jit import JITFunction

    fn = kernel
    while not isinstance(fn, JITFunction) and hasattr(fn, "fn"):  # unwrap autotune/heuristics
        fn = fn.fn
    index = {name: i for i, name in enumerate(fn.arg_names)}
    unknown = [name for name in divisible_by_16 if name not in index]
    if unknown:
        raise ValueError(f"argument 'divisible_by_16': {unknown} are not arguments of {fn.__name__}")
    divisible = set(divisible_by_16)
    if aligned_pointers:
        divisible.update(name for name, kind in signature.items() if str(kind).startswith("*"))
    attrs = {(index[name],): [["tt.divisibility", 16]] for name in sorted(divisible)}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs or {}, attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    if maxnreg is not None:
        options["maxnreg"] = maxnreg
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def _compile_with_report(kernel, signature, constexprs, num_warps, num_stages, divisible_by_16, aligned_pointers,
                         maxnreg=None):
    """Compile as Triton does for a launch and return (compiled kernel, Triton's own ``ptxas -v`` report).

    The report is the one of the ptxas run that made the cubin, with Triton's flags (``-lineinfo``;
    triton 3.8 adds ``--regAllocOptLevel=2``), so the counts are those of the code a launch would
    load, and ptxas runs once per kernel. A kernel in Triton's cache would skip ptxas and print no
    report, so the cache is not read here (it is still written).
    """
    import contextlib
    import io

    from triton import knobs

    report = io.StringIO()
    with knobs.compilation.scope(), knobs.nvidia.scope():
        knobs.compilation.always_compile = True
        knobs.nvidia.dump_ptxas_log = True  # Triton prints the report to stdout
        with contextlib.redirect_stdout(report):
            compiled = _triton_compile(kernel, signature, constexprs, num_warps, num_stages, divisible_by_16,
                                       aligned_pointers, maxnreg)
    return compiled, report.getvalue()


def _compile(kernel, signature, constexprs, num_warps, num_stages, divisible_by_16, aligned_pointers, maxnreg=None):
    compiled, report = _compile_with_report(kernel, signature, constexprs, num_warps, num_stages, divisible_by_16,
                                            aligned_pointers, maxnreg)

    def grab(pattern: str) -> int:
        # ptxas -v prints every one of these for every kernel: a missing line means its wording
        # changed, and a silent 0 would pass every "no spills" check.
        match = re.search(pattern, report)
        if match is None:
            raise RuntimeError(f"ptxas -v report for {compiled.metadata.name} has no match for {pattern!r}:\n{report}")
        return int(match.group(1))

    resources = KernelResources(
        name=compiled.metadata.name,
        registers=grab(r"Used (\d+) registers"),
        spill_store_bytes=grab(r"(\d+) bytes spill stores"),
        spill_load_bytes=grab(r"(\d+) bytes spill loads"),
        stack_frame_bytes=grab(r"(\d+) bytes stack frame"),
        shared_bytes=int(compiled.metadata.shared),
        num_warps=num_warps,
    )
    return resources, compiled.asm["cubin"]
