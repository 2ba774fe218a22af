"""The compiled extension ace_kernels._C: it imports without a GPU, registers its ops, and its
sm_90a kernels use no local memory (no register spills). Resources are read from the built .so
with cuobjdump (shipped in the Triton wheel), so no GPU is needed."""

import importlib.util
import os
import re
import subprocess
import sys
import sysconfig

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
    from ace_kernels import _dispatch

    elsewhere = _dispatch._extension_elsewhere()  # another checkout's build, through its editable install
    if elsewhere:
        pytest.skip(elsewhere)
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


def _held_archs(so: str) -> set[str]:
    """What the .so really holds, as cuobjdump lists it: ``sm_XY[a]`` for machine code (cubins),
    ``compute_XY[a]`` for PTX. -res-usage names each cubin's arch with its "a" (older cuobjdumps'
    -lelf file names drop it) but lists the PTX under an "arch = sm_XY" line too: only its
    "Fatbin elf code" sections count as machine code; -lptx names PTX files "<name>.sm_XY.ptx"."""
    held, section = set(), ""
    listing = subprocess.run([_cuobjdump(), "-res-usage", so], capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0, listing.stderr
    for line in listing.stdout.splitlines():
        if line.startswith("Fatbin "):
            section = line
        found = re.match(r"arch = (sm_\w+)", line)
        if found and section.startswith("Fatbin elf code"):
            held.add(found.group(1))
    listing = subprocess.run([_cuobjdump(), "-lptx", so], capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0, listing.stderr
    held |= {f"compute_{arch}" for arch in re.findall(r"\.(?:sm|compute)_(\w+?)\.ptx", listing.stdout)}
    return held


def test_held_archs_reads_machine_code_and_ptx_apart(monkeypatch):
    """The listing of a "9.0a+PTX" build (cuobjdump 13): its PTX section also says "arch = sm_90a"."""
    res_usage = ("\nFatbin ptx code:\n================\narch = sm_90a\ncode version = [9,0]\n\n"
                 "Fatbin elf code:\n================\narch = sm_90a\ncode version = [1,8]\n")
    lptx = "PTX file    1: hypergraph.sm_90a.ptx\n"
    outputs = {"-res-usage": res_usage, "-lptx": lptx}
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 0, outputs[cmd[1]], ""))
    monkeypatch.setattr(sys.modules[__name__], "_cuobjdump", lambda: "cuobjdump")
    assert _held_archs("x.so") == {"sm_90a", "compute_90a"}
    outputs.update({"-res-usage": "Fatbin ptx code:\narch = sm_80\n", "-lptx": "PTX file 1: k.sm_80.ptx\n"})
    assert _held_archs("x.so") == {"compute_80"}  # PTX only: no machine code


def test_extension_records_what_it_was_built_for():
    # setup.py's default TORCH_CUDA_ARCH_LIST ("9.0a", what CI builds with): H100/H200 machine
    # code only, which the cuda backend compares with each GPU's compute capability.
    _extension_path()
    import ace_kernels._C as ext
    from ace_kernels import _dispatch

    held = _held_archs(_extension_path())
    assert held and set(ext.CUDA_ARCHS.split("__")) == held, (ext.CUDA_ARCHS, held)
    assert _dispatch.built_cuda_archs() == tuple(ext.CUDA_ARCHS.split("__"))


def test_extension_records_the_sources_it_was_built_from():
    """setup.py compiles the sha256 of csrc/ into the module; in a checkout the cuda backend
    declines an extension whose sources are not those beside it."""
    path = _extension_path()
    import ace_kernels._C as ext
    from ace_kernels import _dispatch
    from ace_kernels._sources import sources_sha256

    here = sources_sha256(os.path.join(ROOT, "csrc"))
    assert here and len(ext.SOURCES_SHA256) == 64
    if os.path.dirname(path) == os.path.join(ROOT, "ace_kernels"):  # built in place, in this checkout
        assert ext.SOURCES_SHA256 == here, "ace_kernels._C was built from other sources: rebuild it"
        assert _dispatch._extension() == (ext, None)


def test_extension_kernels_have_no_spills_for_sm90a():
    so = _extension_path()
    dump = subprocess.run([_cuobjdump(), "-res-usage", so], capture_output=True, text=True, timeout=120)
    assert dump.returncode == 0, dump.stderr
    text = dump.stdout
    import ace_kernels._C as ext

    if "sm_90a" not in ext.CUDA_ARCHS.split("__"):
        pytest.skip(f"the extension was built for {ext.CUDA_ARCHS} (TORCH_CUDA_ARCH_LIST), not sm_90a")
    assert "arch = sm_90a" in text, "CUDA_ARCHS says sm_90a but cuobjdump lists no sm_90a code"
    usage = re.findall(r"Function ([^:\s]+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    assert usage, "no kernel resource lines in cuobjdump output"
    report = []
    for name, reg, stack, shared, local in usage:
        report.append(f"{name}: {reg} registers, {shared} B shared (static), stack {stack} B, local {local} B")
    print("\n".join(report))
    for wanted in HYPERGRAPH_KERNELS:
        assert any(wanted in name for name, *_ in usage), f"{wanted} missing from the extension"
    spilled = [line for line, (_, _, stack, _, local) in zip(report, usage, strict=True) if int(local) or int(stack)]
    assert not spilled, "kernels using local memory (register spills): " + "; ".join(spilled)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup_py(args, cwd, **env):
    environment = {k: v for k, v in os.environ.items() if k not in ("ACE_KERNELS_FORCE_CUDA", "ACE_KERNELS_SKIP_CUDA")}
    environment.update(env)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=environment, capture_output=True, text=True,
                          timeout=300)


def test_setup_py_names_an_arch_list_it_cannot_read_and_finds_its_sources_from_anywhere(tmp_path):
    """An arch name torch accepts but setup.py does not read ('Hopper') skips the extension with
    the reason instead of failing the pure-Python install (and fails when the build is forced);
    run from another folder, setup.py still finds csrc/."""
    setup = os.path.join(ROOT, "setup.py")
    skipped = _setup_py([setup, "--name"], ROOT, TORCH_CUDA_ARCH_LIST="Hopper")
    assert skipped.returncode == 0 and skipped.stdout.strip().endswith("ace-kernels"), skipped.stderr
    assert "TORCH_CUDA_ARCH_LIST='Hopper': expected entries like 9.0, 9.0a or 9.0+PTX" in skipped.stdout
    forced = _setup_py([setup, "--name"], ROOT, TORCH_CUDA_ARCH_LIST="Hopper", ACE_KERNELS_FORCE_CUDA="1")
    assert forced.returncode != 0 and "TORCH_CUDA_ARCH_LIST='Hopper'" in forced.stderr
    elsewhere = _setup_py([setup, "--name"], str(tmp_path))
    assert elsewhere.returncode == 0 and "no sources" not in elsewhere.stdout, elsewhere.stdout


def test_setup_py_checks_the_nvcc_that_torch_builds_with(tmp_path):
    """torch builds with CUDA_HOME's nvcc, else CUDA_PATH's, else the one on PATH: a CUDA_HOME or
    CUDA_PATH without one skips the extension naming the variable and the nvcc it lacks (an nvcc on
    PATH, or /usr/local/cuda, used to pass the check instead, or a CUDA_PATH was replaced by
    /usr/local/cuda), and fails the build when it is forced."""
    setup = os.path.join(ROOT, "setup.py")
    missing = str(tmp_path / "no-toolkit")
    nvcc = os.path.join(missing, "bin", "nvcc")
    for variable, env in (("CUDA_HOME", dict(CUDA_HOME=missing)), ("CUDA_PATH", dict(CUDA_HOME="", CUDA_PATH=missing))):
        skipped = _setup_py([setup, "--name"], str(tmp_path), **env)
        assert skipped.returncode == 0 and skipped.stdout.strip().endswith("ace-kernels"), skipped.stderr
        assert "skipping the CUDA extension: " in skipped.stdout, skipped.stdout
        assert f"no nvcc at {nvcc} ({variable}={missing!r})" in skipped.stdout, skipped.stdout
        forced = _setup_py([setup, "--name"], str(tmp_path), ACE_KERNELS_FORCE_CUDA="1", **env)
        assert forced.returncode != 0 and f"no nvcc at {nvcc} ({variable}=" in forced.stderr, forced.stderr[-2000:]


def test_setup_py_reads_cuda_home_before_cuda_path(tmp_path):
    """As torch's cpp_extension does: with both set, CUDA_HOME names the toolkit (here one without
    nvcc, so the extension is skipped naming it) even where CUDA_PATH's has an nvcc."""
    setup = os.path.join(ROOT, "setup.py")
    missing = str(tmp_path / "no-toolkit")
    (tmp_path / "cuda" / "bin").mkdir(parents=True)
    (tmp_path / "cuda" / "bin" / "nvcc").write_text("#!/bin/sh\n")
    skipped = _setup_py([setup, "--name"], str(tmp_path), CUDA_HOME=missing, CUDA_PATH=str(tmp_path / "cuda"))
    assert skipped.returncode == 0 and skipped.stdout.strip().endswith("ace-kernels"), skipped.stderr
    nvcc = os.path.join(missing, "bin", "nvcc")
    assert f"no nvcc at {nvcc} (CUDA_HOME={missing!r})" in skipped.stdout, skipped.stdout


def test_setup_py_without_torch_installs_the_pure_python_package_unless_forced(tmp_path):
    """A build environment where torch does not import (pip's build isolation) skips the extension
    saying so; forced, it fails naming the cause."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise ImportError('no torch in this environment')\n")
    setup = os.path.join(ROOT, "setup.py")
    skipped = _setup_py([setup, "--name"], str(tmp_path), PYTHONPATH=str(tmp_path))
    assert skipped.returncode == 0 and skipped.stdout.strip().endswith("ace-kernels"), skipped.stderr
    assert "torch not importable at build time, building the pure-Python package only" in skipped.stdout
    forced = _setup_py([setup, "--name"], str(tmp_path), PYTHONPATH=str(tmp_path), ACE_KERNELS_FORCE_CUDA="True")
    assert forced.returncode != 0, forced.stdout
    assert "ACE_KERNELS_FORCE_CUDA=1 but torch is not importable (use --no-build-isolation)" in forced.stderr


def test_a_build_that_fails_installs_the_package_without_the_extension_unless_forced(tmp_path):
    """torch refuses to build with an nvcc of another CUDA major version than its own (here a stand-in
    nvcc that says 'release 1.0'): without ACE_KERNELS_FORCE_CUDA the build says why and goes on
    without the extension, and removes the one an earlier build left in place (else the cuda backend
    and these tests would run a stale build); forced, it fails."""
    if torch.version.cuda is None:
        pytest.skip("torch has no CUDA support: setup.py does not try the build")
    tree = tmp_path / "tree"
    tree.mkdir()
    import shutil

    shutil.copy(os.path.join(ROOT, "setup.py"), tree / "setup.py")
    shutil.copytree(os.path.join(ROOT, "csrc"), tree / "csrc")
    (tree / "ace_kernels").mkdir()  # setup.py reads the sources' fingerprint and the toolkit's rule there
    for name in ("_sources.py", "_cuda_toolkit.py"):
        shutil.copy(os.path.join(ROOT, "ace_kernels", name), tree / "ace_kernels" / name)
    nvcc = tmp_path / "cuda" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 1.0, V1.0.0'\n")
    nvcc.chmod(0o755)
    env = dict(CUDA_HOME=str(tmp_path / "cuda"), PATH=f"{nvcc.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    name = "_C" + sysconfig.get_config_var("EXT_SUFFIX")
    stale = tree / "ace_kernels" / name
    stale.write_bytes(b"an earlier build")
    # A build that is not in place, run from another folder, leaves the checkouts' extensions alone
    # (this one's and the folder's: the names resolve against the checkout, not the folder).
    other = tmp_path / "other"
    (other / "ace_kernels").mkdir(parents=True)
    (other / "ace_kernels" / name).write_bytes(b"another checkout's build")
    elsewhere = _setup_py([str(tree / "setup.py"), "build_ext"], str(other), **env)
    assert elsewhere.returncode == 0 and "building the CUDA extension failed" in elsewhere.stderr, elsewhere.stderr
    assert stale.exists() and (other / "ace_kernels" / name).exists()
    # In place, run from another folder: the checkout's earlier build goes all the same (it lies beside
    # the sources, where the cuda backend would load it from).
    inplace_elsewhere = _setup_py([str(tree / "setup.py"), "build_ext", "--inplace"], str(other), **env)
    assert inplace_elsewhere.returncode == 0, inplace_elsewhere.stderr[-2000:]
    assert f"removed {stale}, built from earlier sources" in inplace_elsewhere.stderr, inplace_elsewhere.stderr
    assert not stale.exists()
    # and the folder's own build is not this checkout's: it stays.
    assert (other / "ace_kernels" / name).exists(), inplace_elsewhere.stderr
    stale.write_bytes(b"an earlier build")
    built = _setup_py(["setup.py", "build_ext", "--inplace"], str(tree), **env)
    assert built.returncode == 0, built.stderr[-2000:]
    assert "ace-kernels: building the CUDA extension failed (RuntimeError: " in built.stderr
    assert "installing the pure-Python package without it" in built.stderr
    assert f"removed {stale}, built from earlier sources" in built.stderr, built.stderr
    assert not stale.exists() and not list(tree.rglob("_C*.so"))
    forced = _setup_py(["setup.py", "build_ext", "--inplace"], str(tree), ACE_KERNELS_FORCE_CUDA="1", **env)
    assert forced.returncode != 0 and "building the CUDA extension failed" not in forced.stderr


def test_ops_refuse_what_the_kernels_cannot_take_naming_the_argument():
    """What a launcher would refuse (or read out of bounds with) is refused before it, naming the
    argument, on fake tensors too; CPU tensors name the argument that is not a CUDA tensor."""
    _extension_path()
    import ace_kernels._C  # noqa: F401 (registers the ops)

    ops = torch.ops.ace_kernels
    src = torch.empty(2, 9, 40, device="meta")
    cols = torch.empty(2, 7, 70, dtype=torch.int64, device="meta")
    with pytest.raises(RuntimeError, match=r"argument 'cols': expected at most 64 slots per row \(size\(2\)\)"):
        ops.hg_gather_sum(src, cols, cols.float())
    big = torch.empty(65536, 9, 40, device="meta")
    with pytest.raises(RuntimeError, match=r"argument 'pn': expected a batch of at most 65535 \(size\(0\)\)"):
        ops.hg_topk_incidence(big, big[..., 0], None, 5)
    with pytest.raises(RuntimeError, match=r"argument 'topk': expected 1 <= topk <= 16 and topk < M = 9, got 9"):
        ops.hg_topk_incidence(src, src[..., 0], None, 9)
    with pytest.raises(RuntimeError, match=r"argument 'rows': expected 2 rows of indices, got 3"):
        ops.hg_topk_incidence(src, src[..., 0], torch.empty(3, 4, dtype=torch.int64, device="meta"), 5)
    with pytest.raises(RuntimeError, match=r"argument 'b': expected size 40 \(D = a\.size\(2\)\) at dim 2"):
        ops.hg_entry_dot(src, torch.empty(2, 9, 41, device="meta"), cols[..., :3])
    rp = torch.empty(2, 12, dtype=torch.int64, device="meta")
    perm = torch.empty(2, 28, dtype=torch.int64, device="meta")
    strided = torch.empty(2, 56, device="meta")[:, ::2]  # the CUDA kernel walks it with unit steps
    with pytest.raises(RuntimeError, match=r"argument 'weights_flat': expected unit stride at dim 1, got 2"):
        ops.hg_scatter_sum_csr(src[:, :7], strided, rp, perm, 11, 4)
    with pytest.raises(RuntimeError, match=r"argument 'perm': expected unit stride at dim 1, got 2"):
        ops.hg_scatter_sum_csr(src[:, :7], strided.contiguous(), rp, torch.empty(2, 56, dtype=torch.int64,
                                                                                  device="meta")[:, ::2], 11, 4)
    one = torch.empty_strided((2, 1), (1, 5), device="meta")  # one column of stride 5: contiguous to torch
    assert one.is_contiguous() and one.stride(1) == 5
    out = ops.hg_scatter_sum_csr(src[:, :1], one, torch.empty(2, 1, dtype=torch.int64, device="meta"),
                                 one.long(), 0, 1)
    assert out.shape == (2, 0, 40)
    with pytest.raises(RuntimeError, match=r"argument 'src': expected a 3-D tensor, got 2-D"):
        ops.hg_gather_sum(src[0], cols[..., :4], cols[..., :4].float())
    with pytest.raises(RuntimeError, match=r"argument 'src': expected a CUDA tensor, got cpu"):
        ops.hg_gather_sum(torch.zeros(2, 9, 40), torch.zeros(2, 7, 4, dtype=torch.int64), torch.zeros(2, 7, 4))
    with pytest.raises(RuntimeError, match=r"argument 'pn': expected a CUDA tensor, got cpu"):
        ops.hg_topk_incidence(torch.zeros(2, 9, 40), torch.zeros(2, 9), None, 5)


def test_meta_kernels_refuse_the_dtypes_the_device_kernels_refuse():
    """The meta kernels (what torch.compile's fake tensors and opcheck reach) checked shapes only: an int32
    index or a float64 weight traced without a word and failed only when the compiled code ran on the GPU.
    They now refuse every dtype the CUDA versions refuse, naming the argument."""
    _extension_path()
    import ace_kernels._C  # noqa: F401 (registers the ops)

    ops = torch.ops.ace_kernels

    def meta(*shape, dtype=torch.float32):
        return torch.empty(*shape, dtype=dtype, device="meta")

    src, cols = meta(2, 9, 40), meta(2, 7, 4, dtype=torch.int64)
    rp, perm = meta(2, 12, dtype=torch.int64), meta(2, 28, dtype=torch.int64)
    refused = [
        ("pn", "float32, float16 or bfloat16, got Double",
         lambda: ops.hg_topk_incidence(src.double(), src[..., 0], None, 5)),
        ("inv_norm", "Float, got Half", lambda: ops.hg_topk_incidence(src, src[..., 0].half(), None, 5)),
        ("rows", "Long, got Int", lambda: ops.hg_topk_incidence(src, src[..., 0], meta(2, 4, dtype=torch.int32), 5)),
        ("src", "float32, float16 or bfloat16, got Long", lambda: ops.hg_gather_sum(src.long(), cols, cols.float())),
        ("cols", "Long, got Int", lambda: ops.hg_gather_sum(src, cols.int(), cols.float())),
        ("weights", "Float, got BFloat16", lambda: ops.hg_gather_sum(src, cols, cols.bfloat16())),
        ("src", "float32, float16 or bfloat16, got Double",
         lambda: ops.hg_scatter_sum_csr(src[:, :7].double(), meta(2, 28), rp, perm, 11, 4)),
        ("weights_flat", "Float, got Half", lambda: ops.hg_scatter_sum_csr(src[:, :7], meta(2, 28).half(), rp, perm,
                                                                           11, 4)),
        ("row_ptr", "Long, got Int", lambda: ops.hg_scatter_sum_csr(src[:, :7], meta(2, 28), rp.int(), perm, 11, 4)),
        ("perm", "Long, got Int", lambda: ops.hg_scatter_sum_csr(src[:, :7], meta(2, 28), rp, perm.int(), 11, 4)),
        ("a", "float32, float16 or bfloat16, got Double", lambda: ops.hg_entry_dot(src[:, :7].double(), src, cols)),
        ("b", "float32, float16 or bfloat16, got Int", lambda: ops.hg_entry_dot(src[:, :7], src.int(), cols)),
        ("cols", "Long, got Float", lambda: ops.hg_entry_dot(src[:, :7], src, cols.float())),
    ]
    for name, expected, call in refused:
        with pytest.raises(RuntimeError, match=rf"argument '{name}': expected {expected}"):
            call()
    # What the device kernels take passes: the feature tensors in float32, float16 or bfloat16.
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert ops.hg_gather_sum(src.to(dtype), cols, cols.float()).dtype == torch.float32
        assert ops.hg_entry_dot(src[:, :7].to(dtype), src.half(), cols).shape == (2, 7, 4)
        assert ops.hg_topk_incidence(src.to(dtype), src[..., 0], rp[:, :4], 5)[0].shape == (2, 4, 5)
        assert ops.hg_scatter_sum_csr(src[:, :7].to(dtype), meta(2, 28), rp, perm, 11, 4).shape == (2, 11, 40)


def test_meta_kernels_keep_a_symbolic_batch():
    """The meta kernels and the shape checks they share read sizes with size(), which specialised every
    dimension of a symbolic tensor to its traced value: torch.compile with a dynamic batch (auto runs the cuda
    backend of ace_hypergraph on the H200) recompiled at each batch size, and mark_dynamic or export's Dim
    raised. Traced with symbolic shapes (fake CPU tensors reach the meta kernels), the batch stays a symbol."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.utils._pytree import tree_leaves

    _extension_path()
    import ace_kernels._C  # noqa: F401 (registers the ops)
    from ace_kernels import hypergraph

    ops = torch.ops.ace_kernels
    g = torch.Generator().manual_seed(8)
    pn, inv_norm = torch.randn(2, 10, 16, generator=g), torch.rand(2, 10, generator=g) + 0.5
    src, cols, weights = torch.randn(2, 4, 16), torch.randint(0, 10, (2, 4, 5), generator=g), torch.rand(2, 4, 5)
    row_ptr, perm = hypergraph._transpose_csr(cols, 10)
    cases = {
        "hg_topk_incidence": (lambda pn, inv_norm: ops.hg_topk_incidence(pn, inv_norm, None, 3), (pn, inv_norm)),
        "hg_gather_sum": (ops.hg_gather_sum, (pn, cols, weights)),
        "hg_scatter_sum_csr": (lambda *args: ops.hg_scatter_sum_csr(*args, 10, 5),
                               (src, weights.reshape(2, 20), row_ptr, perm)),
        "hg_entry_dot": (ops.hg_entry_dot, (src, pn, cols)),
    }
    for name, (fn, args) in cases.items():
        graph = make_fx(fn, tracing_mode="symbolic")(*args).graph
        nodes = [n for n in graph.nodes if n.op == "placeholder"]
        nodes += tree_leaves([n.args[0] for n in graph.nodes if n.op == "output"])
        for node in nodes:
            shape = node.meta["val"].shape
            assert isinstance(shape[0], torch.SymInt), f"{name}: {node.name}'s batch specialised, shape {shape}"


def _sdist_names(tmp_path) -> set[str]:
    """The paths an sdist of this checkout holds, relative to its top folder."""
    import fcntl
    import tarfile

    # sdist builds its release tree in the checkout itself (ROOT/ace_kernels-<version>/) and removes it
    # when done: two at once (two tests here, in two pytest-xdist processes) remove it under each other
    # ("No such file or directory: 'ace_kernels-0.1.0/tmp...'"). One at a time: a lock on ROOT.
    root = os.open(ROOT, os.O_RDONLY)
    try:
        try:
            fcntl.flock(root, fcntl.LOCK_EX)
        except OSError:  # a file system without flock on folders (NFS emulates it with write locks)
            pass
        built = _setup_py(["setup.py", "-q", "egg_info", "--egg-base", str(tmp_path), "sdist", "-d", str(tmp_path)],
                          ROOT, ACE_KERNELS_SKIP_CUDA="1")
    finally:
        os.close(root)  # (releases the lock)
    assert built.returncode == 0, built.stderr
    (archive,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        return {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}


def test_sdist_carries_every_cuda_source(tmp_path):
    """setup.py lists only the files it compiles; MANIFEST.in brings the headers they include."""
    shipped = _sdist_names(tmp_path)
    sources = {os.path.relpath(os.path.join(folder, name), ROOT)
               for folder, _, names in os.walk(os.path.join(ROOT, "csrc")) for name in names}
    assert sources and {"csrc/hypergraph/hypergraph.h", "csrc/bindings.cpp"} <= sources
    assert not sources - shipped, f"missing from the sdist: {sorted(sources - shipped)}"


def test_sdist_carries_a_source_of_every_suffix_the_fingerprint_reads(tmp_path):
    """A .cuh or .hpp header under csrc/ is one of the extension's sources (ace_kernels/_sources.py
    fingerprints them), so an sdist carries it too: MANIFEST.in listed .h, .cu and .cpp only, and an
    sdist of a tree with such a header could not compile its sources."""
    import shutil
    import tarfile

    from ace_kernels._sources import SUFFIXES

    tree = tmp_path / "tree"
    for name in ("setup.py", "MANIFEST.in", "requirements.txt", "ace_kernels/__init__.py"):
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(os.path.join(ROOT, name), tree / name)
    sources = {f"csrc/family/source{suffix}" for suffix in SUFFIXES} | {f"csrc/top{suffix}" for suffix in SUFFIXES}
    for name in sources:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_text("// a source\n")
    built = _setup_py(["setup.py", "-q", "sdist", "-d", str(tmp_path)], str(tree), ACE_KERNELS_SKIP_CUDA="1")
    assert built.returncode == 0, built.stderr
    (archive,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        shipped = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    assert not sources - shipped, f"missing from the sdist: {sorted(sources - shipped)}"


def test_wheel_ships_every_package_file_and_the_command(tmp_path):
    """A pure wheel of this checkout holds every tracked file of both packages, the data a run
    reads included (the dispatch order and tuned configurations, the model configs and the
    tokenizer), and declares the ``ace-lora`` command."""
    import zipfile

    built = _setup_py(["setup.py", "-q", "egg_info", "--egg-base", str(tmp_path), "build", "--build-base",
                       str(tmp_path / "build"), "bdist_wheel", "--bdist-dir", str(tmp_path / "bdist"), "-d",
                       str(tmp_path)], ROOT, ACE_KERNELS_SKIP_CUDA="1")
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = set(archive.namelist())
        (entry_points,) = [name for name in shipped if name.endswith(".dist-info/entry_points.txt")]
        commands = archive.read(entry_points).decode()
        (metadata_name,) = [name for name in shipped if name.endswith(".dist-info/METADATA")]
        metadata = archive.read(metadata_name).decode()
    tracked = subprocess.run(["git", "ls-files", "ace_kernels", "ace_model"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
    assert {"ace_kernels/tuned_configs.json", "ace_model/configs/tokenizer/vocab.txt"} <= set(tracked)
    assert not set(tracked) - shipped, f"missing from the wheel: {sorted(set(tracked) - shipped)}"
    assert "ace-lora = ace_model.cli:main" in commands, commands
    # `pip install -e '.[test]'` installs what the suite imports: every pin of requirements.txt but
    # the package's own requirements (torch, numpy) and the packaging tools.
    def name(requirement):
        return re.split(r"[<>=!~;\[ ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")

    pinned = {name(line) for line in open(os.path.join(ROOT, "requirements.txt"), encoding="utf-8")
              if line.strip() and not line.startswith("#")}
    extra = {name(line.split(":", 1)[1]) for line in metadata.splitlines()
             if line.startswith("Requires-Dist:") and 'extra == "test"' in line}
    own = {name(line.split(":", 1)[1]) for line in metadata.splitlines()
           if line.startswith("Requires-Dist:") and "extra ==" not in line}
    assert own == {"torch", "numpy"}, own
    missing = pinned - own - {"setuptools", "wheel"} - extra
    assert not missing, f"requirements.txt pins what the [test] extra lacks: {sorted(missing)}"
    assert "Description-Content-Type: text/markdown" in metadata and "# ace-kernels" in metadata


def _lowest_python(requires_python: str) -> tuple[int, int]:
    """The lowest Python (major, minor) that a Requires-Python such as ">=3.10,<3.15" allows."""
    (lowest,) = re.findall(r">=\s*(\d+\.\d+)", requires_python)
    return tuple(int(part) for part in lowest.split("."))


def test_the_pythons_the_readme_asks_for_are_setup_pys_and_the_pins():
    """The README asks `make` for a python3 of 3.11 or newer, naming the pins that need it, and says the
    package alone needs what setup.py's python_requires says (3.10): it named numpy and matplotlib only,
    and not setup.py's 3.10, which read as a contradiction. Its versions are checked against
    python_requires and the Requires-Python of the pins installed here, and the packages' files against
    python_requires' grammar (3.11's `except*` would need it raised)."""
    import ast
    import importlib.metadata

    with open(os.path.join(ROOT, "setup.py"), encoding="utf-8") as handle:
        (python_requires,) = re.findall(r'python_requires="([^"]+)"', handle.read())
    package_lowest = _lowest_python(python_requires)
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        readme = " ".join(handle.read().split())
    found = re.search(r"with `python3`, which must be (\d+\.\d+) or newer, as the pinned ([\w, -]+?) are: the package "
                      r"alone, setup\.py's `python_requires`, runs on (\d+\.\d+) or newer", readme)
    assert found, "the README's sentence on python3's version is gone or reworded"
    make_lowest, alone = (tuple(int(part) for part in found.group(i).split(".")) for i in (1, 3))
    named = set(re.split(r", | and ", found.group(2)))
    assert alone == package_lowest and package_lowest <= make_lowest, (found.group(0), python_requires)
    lowest = {}  # the pins installed at their pinned version here: the lowest Python each allows
    with open(os.path.join(ROOT, "requirements.txt"), encoding="utf-8") as handle:
        for name, version in re.findall(r"^([\w.-]+)==(\S+)$", handle.read(), flags=re.MULTILINE):
            try:
                if importlib.metadata.version(name) == version:
                    lowest[name.lower()] = _lowest_python(importlib.metadata.metadata(name)["Requires-Python"])
            except (importlib.metadata.PackageNotFoundError, TypeError, ValueError):
                continue  # not installed at its pin, or no lower bound stated
    if not lowest:
        pytest.skip("no pin of requirements.txt is installed at its version here")
    assert make_lowest == max(lowest.values()), lowest
    assert {name for name, version in lowest.items() if version == make_lowest} <= named, lowest
    assert all(lowest[name] == make_lowest for name in named & set(lowest)), lowest
    tracked = subprocess.run(["git", "ls-files", "ace_kernels/*.py", "ace_model/*.py", "setup.py"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    assert "setup.py" in tracked and "ace_kernels/__init__.py" in tracked, tracked
    for path in tracked:
        with open(os.path.join(ROOT, path), encoding="utf-8") as handle:
            ast.parse(handle.read(), path, feature_version=package_lowest)  # raises SyntaxError naming the line


def test_sdist_ships_no_partial_test_suite(tmp_path):
    """setuptools adds tests/test*.py to an sdist by default, but not what they import (conftest.py,
    the oracle and reference modules, tests/data, pytest.ini, benchmarks/): such a suite fails at
    collection. The tests need the repository, so the sdist leaves them out."""
    shipped = _sdist_names(tmp_path)
    assert "setup.py" in shipped and "ace_kernels/__init__.py" in shipped
    tests = sorted(name for name in shipped if name == "tests" or name.startswith("tests/"))
    assert not tests, f"the sdist ships part of the test suite: {tests}"


# setup.py run with setuptools' setup() replaced by one that prints what it was handed: the extension's
# configuration, read without compiling anything (a build takes minutes).
_CONFIGURE = """
import json, os, runpy, sys
import setuptools

handed = {}
setuptools.setup = lambda **kw: handed.update(kw)
sys.argv = [sys.argv[1], "--name"]
runpy.run_path(sys.argv[0], run_name="__main__")
ext = [dict(name=e.name, sources=e.sources, args=e.extra_compile_args, include_dirs=e.include_dirs)
       for e in handed["ext_modules"]]
print("CONFIG:" + json.dumps(dict(ext=ext, cmdclass=sorted(handed["cmdclass"]), max_jobs=os.environ.get("MAX_JOBS"),
                                  arch_list=os.environ.get("TORCH_CUDA_ARCH_LIST"),
                                  cuda_home=os.environ.get("CUDA_HOME"))))
"""


def _configured(cwd, **env) -> tuple[dict, str]:
    """What setup.py (this checkout's, run from ``cwd``) hands to setuptools, and what it printed."""
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("ACE_KERNELS_FORCE_CUDA", "ACE_KERNELS_SKIP_CUDA", "TORCH_CUDA_ARCH_LIST", "MAX_JOBS",
                                "CUDA_HOME", "CUDA_PATH")}
    environment.update(env)
    setup = os.path.join(ROOT, "setup.py")
    run = subprocess.run([sys.executable, "-c", _CONFIGURE, setup], cwd=cwd, env=environment, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    import json

    return json.loads(run.stdout.split("CONFIG:", 1)[1]), run.stdout.split("CONFIG:", 1)[0]


def _needs_a_toolkit():
    if torch.version.cuda is None or not os.path.exists("/usr/local/cuda/bin/nvcc"):
        pytest.skip("setup.py configures the extension only with a CUDA torch and a toolkit (/usr/local/cuda here)")


def test_setup_py_compiles_every_source_and_records_the_archs_and_the_sources_fingerprint():
    """The extension's configuration as setup.py hands it over (the built module's CUDA_ARCHS and
    SOURCES_SHA256 come from these defines): every .cu and .cpp under csrc/ at any depth, relative
    when run from the checkout; sm_90a machine code by default; the fingerprint that the cuda backend
    compares with csrc/; no fast math (results must match the torch path)."""
    from ace_kernels._sources import sources_sha256

    _needs_a_toolkit()
    config, _ = _configured(ROOT, MAX_JOBS="3")
    (ext,) = config["ext"]
    compiled = sorted(os.path.relpath(os.path.join(folder, name), ROOT)
                      for folder, _, names in os.walk(os.path.join(ROOT, "csrc")) for name in names
                      if name.endswith((".cu", ".cpp")))
    assert ext["name"] == "ace_kernels._C" and sorted(ext["sources"]) == compiled and len(compiled) >= 2, ext
    cxx, nvcc = ext["args"]["cxx"], ext["args"]["nvcc"]
    assert "-DACE_KERNELS_CUDA_ARCHS=sm_90a" in cxx, cxx
    assert f"-DACE_KERNELS_SOURCES_SHA256={sources_sha256(os.path.join(ROOT, 'csrc'))}" in cxx, cxx
    assert [flag for flag in nvcc if flag.startswith("-gencode")] == ["-gencode=arch=compute_90a,code=sm_90a"], nvcc
    assert not [flag for flag in nvcc + cxx if "fast_math" in flag or "fast-math" in flag], nvcc
    assert config["arch_list"] == "9.0a" and config["cmdclass"] == ["build_ext"]
    assert config["max_jobs"] == "3"  # set, it is left alone
    # Neither CUDA_HOME nor CUDA_PATH set: /usr/local/cuda's toolkit, for torch too (not the nvcc on PATH,
    # which may be a wrapper script outside any toolkit).
    assert config["cuda_home"] == "/usr/local/cuda"
    # The pip CUDA runtime's headers (nvidia/cu13/include), which the system toolkit may lack.
    pip_headers = [os.path.join(site, "nvidia", "cu13", "include") for site in sys.path]
    assert set([folder for folder in pip_headers if os.path.isdir(folder)][:1]) <= set(ext["include_dirs"]), ext


def _setup_py_function(name: str):
    """The function ``name`` of setup.py, alone (running the file would call setup())."""
    import ast

    with open(os.path.join(ROOT, "setup.py"), encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    (node,) = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == name]
    namespace = {"os": os}
    exec(compile(ast.Module(body=[node], type_ignores=[]), "setup.py", "exec"), namespace)
    return namespace[name]


@pytest.mark.parametrize("cores, memory_gib, jobs", [(16, 6.5, "4"), (2, 64, "2"), (4, 1, "1"), (None, 64, "1")])
def test_setup_py_runs_a_build_job_per_core_within_memory(monkeypatch, cores, memory_gib, jobs):
    """MAX_JOBS unset: one nvcc job a core, at most one per 1.5 GiB of memory (what a job needs), at least one."""
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    pages = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": int(memory_gib * 2**30) // 4096}
    monkeypatch.setattr(os, "sysconf", pages.__getitem__)
    assert _setup_py_function("_default_max_jobs")() == jobs


@pytest.mark.parametrize("value, on", [("1", True), ("true", True), (" Yes", True), ("ON", True), ("0", False),
                                       ("", False), ("no", False), ("2", False)])
def test_setup_py_switches_read_1_true_yes_on_in_any_case(monkeypatch, value, on):
    monkeypatch.setenv("ACE_KERNELS_FORCE_CUDA", value)
    assert _setup_py_function("_flag")("ACE_KERNELS_FORCE_CUDA") is on


def test_setup_py_builds_machine_code_and_ptx_for_each_arch_listed():
    """TORCH_CUDA_ARCH_LIST "8.0;9.0a+PTX": machine code for both and PTX for 9.0a, recorded in that
    order (the module's CUDA_ARCHS, which the cuda backend checks each GPU against); torch reads the
    same list. Run from another folder, the sources are named by their absolute paths."""
    _needs_a_toolkit()
    config, _ = _configured(ROOT, TORCH_CUDA_ARCH_LIST="8.0;9.0a+PTX")
    (ext,) = config["ext"]
    assert [flag for flag in ext["args"]["nvcc"] if flag.startswith("-gencode")] == [
        "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a",
        "-gencode=arch=compute_90a,code=compute_90a"]
    assert "-DACE_KERNELS_CUDA_ARCHS=sm_80__sm_90a__compute_90a" in ext["args"]["cxx"]
    assert config["arch_list"] == "8.0;9.0a+PTX"
    (elsewhere,) = _configured(os.path.dirname(ROOT))[0]["ext"]
    assert sorted(elsewhere["sources"]) == sorted(os.path.join(ROOT, source) for source in ext["sources"])


def test_setup_py_skips_the_extension_for_an_empty_arch_list_and_when_told_to():
    """A TORCH_CUDA_ARCH_LIST of no entries skips the extension naming it (it built one for no GPU),
    and ACE_KERNELS_SKIP_CUDA=1 (or true, yes, on, in any case) skips it whatever else is set,
    ACE_KERNELS_FORCE_CUDA too."""
    _needs_a_toolkit()
    config, printed = _configured(ROOT, TORCH_CUDA_ARCH_LIST=";")
    assert config["ext"] == [] and "TORCH_CUDA_ARCH_LIST=';': expected entries like 9.0" in printed, printed
    assert "got 'none'" in printed, printed
    config, printed = _configured(ROOT, ACE_KERNELS_SKIP_CUDA=" Yes", ACE_KERNELS_FORCE_CUDA="1")  # 1, true, yes, on
    assert config["ext"] == [] and config["cmdclass"] == [], config
    assert "ACE_KERNELS_SKIP_CUDA=1, building the pure-Python package only" in printed, printed


def test_setup_py_without_sources_skips_the_extension_naming_the_folder(tmp_path):
    """setup.py alone (a trimmed copy, no csrc/): the extension is skipped, naming where the sources
    were looked for, and the pure-Python package still installs."""
    import shutil

    shutil.copy(os.path.join(ROOT, "setup.py"), tmp_path / "setup.py")
    skipped = _setup_py(["setup.py", "--name"], str(tmp_path))
    assert skipped.returncode == 0 and skipped.stdout.strip().endswith("ace-kernels"), skipped.stderr
    assert f"no sources under {tmp_path / 'csrc'}" in skipped.stdout, skipped.stdout
