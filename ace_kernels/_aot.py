"""Ahead-of-time compilation of Triton kernels for Hopper (sm_90a) with no GPU.

Used by CI to reject kernel configurations that spill registers before any GPU
sees them: ``compile_sm90(kernel, signature, constexprs)`` runs Triton's full
pipeline for ``GPUTarget("cuda", 90, 32)`` and then ``ptxas -v`` (shipped in
the Triton wheel) on the PTX, returning registers, spill bytes, stack frame and
shared memory.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
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
                 aligned_pointers: bool = True) -> KernelResources:
    """Compile ``kernel`` (a ``@triton.jit`` function) for sm_90a and report its resources.

    ``signature`` maps every argument name to a Triton type string (``"*fp32"``,
    ``"i32"``, ``"fp32"``, ... or ``"constexpr"``); ``constexprs`` gives the value of
    each constexpr argument.
    """
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
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path = os.path.join(tmp, "kernel.ptx")
        with open(ptx_path, "w") as handle:
            handle.write(ptx)
        result = subprocess.run(
            [_tool("ptxas"), "-v", "--gpu-name", "sm_90a", ptx_path, "-o", os.path.join(tmp, "kernel.cubin")],
            capture_output=True, text=True, check=True,
        )
    report = result.stderr + result.stdout

    def grab(pattern: str) -> int:
        # ptxas -v prints every one of these for every kernel: a missing line means its wording
        # changed, and a silent 0 would pass every "no spills" check.
        match = re.search(pattern, report)
        if match is None:
            raise RuntimeError(f"ptxas -v report for {compiled.metadata.name} has no match for {pattern!r}:\n{report}")
        return int(match.group(1))

    return KernelResources(
        name=compiled.metadata.name,
        registers=grab(r"Used (\d+) registers"),
        spill_store_bytes=grab(r"(\d+) bytes spill stores"),
        spill_load_bytes=grab(r"(\d+) bytes spill loads"),
        stack_frame_bytes=grab(r"(\d+) bytes stack frame"),
        shared_bytes=int(compiled.metadata.shared),
        num_warps=num_warps,
    )
