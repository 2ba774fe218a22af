"""Install ace-kernels.

The pure-Python package (``ace_kernels``, ``ace_model``) installs on any machine.
The CUDA extension ``ace_kernels._C`` (sources in ``csrc/``) is built with ninja
only when torch has CUDA support and a CUDA toolkit (``nvcc``) is found, or when
forced; a GPU is not needed to build it.

Environment switches:
  ACE_KERNELS_SKIP_CUDA=1    never build the extension
  ACE_KERNELS_FORCE_CUDA=1   build it, and fail loudly if that is impossible. Without it a build
                             that cannot start or fails (nvcc and torch's CUDA versions differ, an
                             unsupported host compiler, a compile error) prints why and installs
                             the pure-Python package: the cuda backend then reports itself missing
  TORCH_CUDA_ARCH_LIST       defaults to "9.0a" (H100/H200 machine code); "X.Y+PTX" adds PTX that
                             newer GPUs compile at load time. The list is recorded in the module
                             (ace_kernels._C.CUDA_ARCHS): the cuda backend declines a GPU it does
                             not cover, and ``auto`` moves on to the next backend. A changed list
                             with unchanged sources needs ``build_ext --force`` (or pip install)
  MAX_JOBS                   defaults from cores and memory (nvcc needs ~1.5 GB a job)
  CUDA_HOME, CUDA_PATH       the toolkit, read as torch reads them (the first set); neither set,
                             /usr/local/cuda, else the nvcc on PATH. One without bin/nvcc skips
                             the extension, saying so (the rule is ace_kernels/_cuda_toolkit.py's,
                             which the Makefile asks too)

Build with ``pip install --no-build-isolation -e .`` so that the extension is
compiled against the torch already installed.
"""

import glob
import importlib.util
import os
import sys

from setuptools import find_namespace_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _default_max_jobs():
    cores = os.cpu_count() or 1
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = 8
    return str(max(1, min(cores, int(mem_gib // 1.5))))


def _package_module(name):
    """ace_kernels/<name>.py, loaded by path (the package itself needs torch); None where it is missing
    (a trimmed copy: setup.py alone)."""
    path = os.path.join(ROOT, "ace_kernels", f"{name}.py")
    if not os.path.isfile(path):
        return None
    spec = importlib.util.spec_from_file_location(f"_ace_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cuda_extension():
    """Return ([ext_modules], {cmdclass}) or ([], {}) with a printed reason."""
    if _flag("ACE_KERNELS_SKIP_CUDA"):
        print("ace-kernels: ACE_KERNELS_SKIP_CUDA=1, building the pure-Python package only")
        return [], {}
    force = _flag("ACE_KERNELS_FORCE_CUDA")
    try:
        import torch
    except ImportError:
        if force:
            raise RuntimeError("ACE_KERNELS_FORCE_CUDA=1 but torch is not importable (use --no-build-isolation)")
        print("ace-kernels: torch not importable at build time, building the pure-Python package only")
        return [], {}
    # The toolkit torch's cpp_extension builds with (ace_kernels/_cuda_toolkit.py, which the Makefile asks
    # too): its variable is set, /usr/local/cuda's included, so that torch reads the same.
    toolkit_module = _package_module("_cuda_toolkit")
    toolkit = toolkit_module.find() if toolkit_module else None
    if toolkit and toolkit.home:
        os.environ[toolkit.variable] = toolkit.home
    reasons = []
    if torch.version.cuda is None:
        reasons.append("torch has no CUDA support")
    if toolkit is None:
        reasons.append(f"no {os.path.join(ROOT, 'ace_kernels', '_cuda_toolkit.py')}, which finds the toolkit")
    elif toolkit.reason:
        reasons.append(toolkit.reason)
    found = sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*.cu"), recursive=True)
                   + glob.glob(os.path.join(ROOT, "csrc", "**", "*.cpp"), recursive=True))
    # Relative to the repository when run from it (pip does), so build/ mirrors csrc/; absolute otherwise.
    here = os.path.abspath(os.getcwd()) == ROOT
    sources = [os.path.relpath(path, ROOT) for path in found] if here else found
    if not sources:
        reasons.append(f"no sources under {os.path.join(ROOT, 'csrc')}")
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST") or "9.0a"
    entries = arch.replace(";", " ").split()
    unknown = [e for e in entries if not e.replace(".", "").replace("+PTX", "").rstrip("a").isdigit()]
    if unknown or not entries:
        reasons.append(f"TORCH_CUDA_ARCH_LIST={arch!r}: expected entries like 9.0, 9.0a or 9.0+PTX (names such "
                       f"as 'Hopper' or 'native' are not read here), got {unknown[0] if unknown else 'none'!r}")
    if reasons:
        if force:
            raise RuntimeError("ACE_KERNELS_FORCE_CUDA=1 but the extension cannot be built: " + "; ".join(reasons))
        print("ace-kernels: skipping the CUDA extension: " + "; ".join(reasons))
        return [], {}

    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    os.environ.setdefault("MAX_JOBS", _default_max_jobs())
    gencode, built = [], []
    for entry in entries:
        sm = entry.replace(".", "").replace("+PTX", "")
        gencode.append(f"-gencode=arch=compute_{sm},code=sm_{sm}")
        built.append(f"sm_{sm}")
        if entry.endswith("+PTX"):
            gencode.append(f"-gencode=arch=compute_{sm},code=compute_{sm}")
            built.append(f"compute_{sm}")
    # What the module holds, as one identifier (no quoting through ninja): sm_90a__compute_90.
    archs_define = f"-DACE_KERNELS_CUDA_ARCHS={'__'.join(built)}"
    # And what it was built from (ace_kernels/_sources.py).
    sources_sha256 = _package_module("_sources").sources_sha256(os.path.join(ROOT, "csrc"))
    sources_define = f"-DACE_KERNELS_SOURCES_SHA256={sources_sha256}"
    # nvidia/cu13/include of the pip CUDA runtime carries headers the system toolkit lacks.
    include_dirs = [os.path.join(ROOT, "csrc")]
    for site in sys.path:
        extra = os.path.join(site, "nvidia", "cu13", "include")
        if os.path.isdir(extra):
            include_dirs.append(extra)
            break
    ext = CUDAExtension(
        name="ace_kernels._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args={
            "cxx": ["-O3", "-std=c++20", archs_define, sources_define],
            # No --use_fast_math: results must match the exact torch path.
            "nvcc": ["-O3", "-std=c++17", "-lineinfo", "-Xptxas=-v", *gencode],
        },
    )
    class OptionalBuildExtension(BuildExtension.with_options(use_ninja=True)):
        """torch's BuildExtension; unless forced, a failed build leaves the pure-Python package."""

        def run(self):
            # setuptools clears inplace while building (then copies beside the sources): keep it.
            self.inplace_requested = bool(self.inplace)
            super().run()

        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as exc:  # torch's version and compiler checks raise, a failed compile too
                if force:
                    raise
                reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
                print(f"ace-kernels: building the CUDA extension failed ({type(exc).__name__}: {reason}); "
                      "installing the pure-Python package without it (ACE_KERNELS_FORCE_CUDA=1 makes this an "
                      "error)", file=sys.stderr)
                # An extension an earlier build left in place was built from other sources: it
                # goes too, so that nothing (the cuda backend, the build tests) runs it as this one.
                # Where this command builds it, and beside the sources when it builds there
                # (--inplace, pip install -e): this checkout's, wherever the command runs from.
                built = set()
                for e in self.extensions:
                    path = os.path.abspath(self.get_ext_fullpath(e.name))
                    built.add(path)
                    if getattr(self, "inplace_requested", False):
                        built.add(os.path.join(ROOT, *e.name.split(".")[:-1], os.path.basename(path)))
                for stale in sorted(built):
                    if os.path.exists(stale):
                        os.remove(stale)
                        print(f"ace-kernels: removed {stale}, built from earlier sources", file=sys.stderr)
                self.extensions = []  # nothing to copy into place or to list as an output

    return [ext], {"build_ext": OptionalBuildExtension}


ext_modules, cmdclass = _cuda_extension()
_MODEL = ["open_clip_torch", "timm", "transformers", "tqdm", "pillow"]
_README_PATH = os.path.join(ROOT, "README.md")  # in every checkout and sdist; absent from trimmed copies
_README = open(_README_PATH, encoding="utf-8").read() if os.path.exists(_README_PATH) else ""

setup(
    name="ace-kernels",
    version="0.1.0",
    description="Fused Triton and CUDA kernels for ACE-LoRA: LoRA q/k/v, hyperedge attention, label-guided InfoNCE",
    long_description=_README,
    long_description_content_type="text/markdown",
    # Namespace packages, so that the config folders (data, no __init__.py) are packages too:
    # setuptools warns that data in a folder not listed as a package will not be installed.
    packages=find_namespace_packages(include=["ace_kernels", "ace_kernels.*", "ace_model", "ace_model.*"],
                                     exclude=["*.__pycache__"]),
    package_data={"ace_model": ["configs/**/*", "configs/*"],
                  "ace_kernels": ["dispatch_order.json", "tuned_configs.json"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "numpy"],
    extras_require={
        "triton": ["triton>=3.6"],
        "model": _MODEL,
        "bench": ["pytest-benchmark", "matplotlib", "peft"],  # peft: the PEFT towers' baseline rows
        # What the test-suite imports: requirements.txt less torch and setuptools/wheel (the tests build
        # wheels and the extension, run the kernels, the model, the benchmarks and pytest-xdist workers).
        "test": ["pytest", "pytest-benchmark", "pytest-xdist", "peft", "matplotlib", "triton>=3.6", "ninja",
                 "torchvision", *_MODEL],
    },
    entry_points={"console_scripts": ["ace-lora=ace_model.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
