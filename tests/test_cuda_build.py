"""The compiled extension ace_kernels._C: it imports without a GPU, registers its ops, and its
sm_90a kernels use no local memory (no register spills). Resources are read from the built .so
with cuobjdump (shipped in the Triton wheel), so no GPU is needed."""

import importlib.util
import os
import re
import subprocess

import pytest
import torch

HYPERGRAPH_KERNELS = ("topk_incidence_kernel", "gather_sum_kernel", "scatter_sum_csr_kernel", "entry_dot_kernel")
OPS = ("hg_topk_incidence", "hg_gather_sum", "hg_scatter_sum_csr", "hg_entry_dot")


def _extension_path():
    if os.environ.get("ACE_KERNELS_SKIP_CUDA", "0") == "1":
        pytest.skip("ACE_KERNELS_SKIP_CUDA=1: the extension is not built")
    spec = importlib.util.find_spec("ace_kernels._C")
    if spec is None or not spec.origin:
        pytest.skip("ace_kernels._C is not built (no nvcc or CUDA torch at install time, or a skipped build)")
    return spec.origin


def _cuobjdump():
    triton = pytest.importorskip("triton")
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        pytest.skip(f"cuobjdump not found at {path}")
    return path


def test_extension_imports_and_registers_ops():
    _extension_path()
    import ace_kernels._C as ext  # loads without a GPU driver

    for op in OPS:
        assert hasattr(torch.ops.ace_kernels, op), f"torch.ops.ace_kernels.{op} missing: {ext.__doc__}"
    # The Meta kernels give shapes without a GPU (what torch.compile's fake tensors use).
    src = torch.empty(2, 9, 40, device="meta")
    cols = torch.empty(2, 7, 4, dtype=torch.int64, device="meta")
    assert torch.ops.ace_kernels.hg_gather_sum(src, cols, cols.float()).shape == (2, 7, 40)
    assert torch.ops.ace_kernels.hg_entry_dot(src[:, :7], src, cols).shape == (2, 7, 4)
    idx, w = torch.ops.ace_kernels.hg_topk_incidence(src, src[..., 0], None, 5)
    assert idx.shape == w.shape == (2, 9, 5) and idx.dtype == torch.int64
    rp = torch.empty(2, 12, dtype=torch.int64, device="meta")
    perm = torch.empty(2, 28, dtype=torch.int64, device="meta")
    scattered = torch.ops.ace_kernels.hg_scatter_sum_csr(src[:, :7], cols.float().flatten(1), rp, perm, 11, 4)
    assert scattered.shape == (2, 11, 40)
    # The shapes the kernel would read out of bounds with are refused by the meta kernel too
    # (what torch.compile's fake tensors meet), not only when the compiled code runs.
    with pytest.raises(RuntimeError, match="argument 'weights_flat': expected 36 columns"):
        torch.ops.ace_kernels.hg_scatter_sum_csr(src, cols.float().flatten(1), rp, perm, 11, 4)


def test_extension_records_what_it_was_built_for():
    # setup.py's default TORCH_CUDA_ARCH_LIST ("9.0a", what CI builds with): H100/H200 machine
    # code only, which the cuda backend compares with each GPU's compute capability.
    _extension_path()
    import ace_kernels._C as ext
    from ace_kernels import _dispatch

    # What the .so really holds: its machine code (cubins) and PTX, as cuobjdump lists them.
    so = _extension_path()
    held = set()
    # (-res-usage names each cubin's arch with its "a"; older cuobjdumps' -lelf file names drop it.)
    for flag, pattern in (("-res-usage", r"arch = (sm_\w+)"), ("-lptx", r"\.(compute_\w+?)\.ptx")):
        listing = subprocess.run([_cuobjdump(), flag, so], capture_output=True, text=True, timeout=120)
        assert listing.returncode == 0, listing.stderr
        held |= set(re.findall(pattern, listing.stdout))
    assert held and set(ext.CUDA_ARCHS.split("__")) == held, (ext.CUDA_ARCHS, held)
    assert _dispatch.built_cuda_archs() == tuple(ext.CUDA_ARCHS.split("__"))


def test_extension_kernels_have_no_spills_for_sm90a():
    so = _extension_path()
    dump = subprocess.run([_cuobjdump(), "-res-usage", so], capture_output=True, text=True, timeout=120)
    assert dump.returncode == 0, dump.stderr
    text = dump.stdout
    assert "arch = sm_90a" in text, "the extension was not built for sm_90a (TORCH_CUDA_ARCH_LIST)"
    usage = re.findall(r"Function ([^:\s]+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    assert usage, "no kernel resource lines in cuobjdump output"
    report = []
    for name, reg, stack, shared, local in usage:
        report.append(f"{name}: {reg} registers, {shared} B shared (static), stack {stack} B, local {local} B")
    print("\n".join(report))
    for wanted in HYPERGRAPH_KERNELS:
        assert any(wanted in name for name, *_ in usage), f"{wanted} missing from the extension"
    spilled = [line for line, (_, _, stack, _, local) in zip(report, usage) if int(local) or int(stack)]
    assert not spilled, "kernels using local memory (register spills): " + "; ".join(spilled)
