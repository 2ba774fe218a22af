"""The Makefile's test-worker count: `make test` runs one pytest-xdist process per core, at most
8, none on one core; the cores are nproc's, lowered to a container's CPU quota (cgroup v2). And
what makes the set-up run again."""

import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



def _gnu_make_with_eval() -> bool:
    """GNU make 3.82 or later (``--eval``); macOS ships 3.81."""
    if shutil.which("make") is None:
        return False
    first = subprocess.run(["make", "--version"], capture_output=True, text=True).stdout.split("\n", 1)[0]
    words = first.split()
    if len(words) < 3 or words[:2] != ["GNU", "Make"]:
        return False
    return tuple(int(p) for p in words[2].split(".")[:2] if p.isdigit()) >= (3, 82)


pytestmark = pytest.mark.skipif(not _gnu_make_with_eval(), reason="needs GNU make 3.82 or later")

# nproc as coreutils' behaves: OMP_NUM_THREADS / OMP_THREAD_LIMIT cap what it prints.
FAKE_NPROC = """#!/bin/sh
if [ -n "$OMP_NUM_THREADS" ]; then echo "$OMP_NUM_THREADS"; exit 0; fi
if [ -n "$OMP_THREAD_LIMIT" ]; then echo "$OMP_THREAD_LIMIT"; exit 0; fi
[ "$FAKE_CORES" = fail ] && exit 1
echo "$FAKE_CORES"
"""


def _pytest_workers(tmp_path, cores: str, cpu_max: str | None = None, **env) -> str:
    """``$(PYTEST_WORKERS)`` as make expands it, with ``cores`` from a fake nproc on PATH and
    ``cpu_max`` as the cgroup file's contents (None: no such file)."""
    (tmp_path / "nproc").write_text(FAKE_NPROC)
    (tmp_path / "nproc").chmod(0o755)
    if cpu_max is not None:
        (tmp_path / "cpu.max").write_text(cpu_max)
    base = {k: v for k, v in os.environ.items()
            if k not in ("OMP_NUM_THREADS", "OMP_THREAD_LIMIT", "TEST_WORKERS", "MAKEFLAGS", "MFLAGS")}
    full = dict(base, PATH=f"{tmp_path}:{base['PATH']}", FAKE_CORES=cores, **env)
    out = subprocess.run(["make", "-s", "--no-print-directory", "-C", ROOT, f"CPU_MAX_FILE={tmp_path / 'cpu.max'}",
                          "--eval=_print_workers: ; @echo '$(PYTEST_WORKERS)'", "_print_workers"],
                         env=full, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and not out.stderr, out.stderr
    return out.stdout.strip()


@pytest.mark.parametrize("cores, env, want", [
    ("1", {}, 0), ("2", {}, 2), ("8", {}, 8), ("9", {}, 8), ("64", {}, 8),
    ("fail", {}, 0),                              # no nproc: one process
    ("4", {"OMP_NUM_THREADS": "1"}, 4),           # nproc's OMP cap does not count
    ("4", {"OMP_THREAD_LIMIT": "1"}, 4),
    ("4", {"TEST_WORKERS": "3"}, 3),              # set in the environment
])
def test_one_worker_per_core_at_most_eight_none_on_one(tmp_path, cores, env, want):
    assert _pytest_workers(tmp_path, cores, **env) == f"-n {want} --dist worksteal"


@pytest.mark.parametrize("cpu_max, want", [
    ("max 100000\n", 8),        # no quota: nproc's 16, capped at 8
    ("garbage\n", 8),           # unreadable: ignored
    ("100000 0\n", 8),          # a zero period: ignored
    ("-1 100000\n", 8),
    ("200000\n", 8),             # one field: ignored (quietly: the shell test must not complain)
    ("100000 100000\n", 0),     # one core: tests in this process
    ("150000 100000\n", 2),     # 1.5 cores round up to 2
    ("50000 100000\n", 0),
    ("300000 100000\n", 3),
    ("1600000 100000\n", 8),
])
def test_workers_follow_a_cpu_quota(tmp_path, cpu_max, want):
    assert _pytest_workers(tmp_path, "16", cpu_max) == f"-n {want} --dist worksteal"


def test_a_quota_above_the_cores_leaves_nproc_to_decide(tmp_path):
    assert _pytest_workers(tmp_path, "3", "800000 100000\n") == "-n 3 --dist worksteal"


def test_print_test_workers(tmp_path):
    out = subprocess.run(["make", "-s", "--no-print-directory", "-C", ROOT, "print-test-workers", "TEST_WORKERS=3"],
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "3", out.stderr


@pytest.mark.parametrize("target", ["test", "test-gpu-image", "coverage"])
def test_the_test_targets_pass_the_workers_to_pytest(target):
    out = subprocess.run(["make", "-n", "--no-print-directory", "-C", ROOT, target, "TEST_WORKERS=5"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert [line for line in out.stdout.splitlines() if " -m pytest " in line and "-n 5 --dist worksteal" in line]


def test_coverage_follows_the_processes_the_tests_start():
    """`make coverage` measures the CLI's and torchrun's subprocesses and the spawned ranks (which
    end through os._exit): without the patches their code shows as never run."""
    import configparser

    rc = configparser.ConfigParser()
    rc.read(os.path.join(ROOT, ".coveragerc"))
    assert {p.strip() for p in rc["run"]["patch"].split(",")} >= {"subprocess", "_exit"}
    assert rc["run"].getboolean("parallel")
    assert {p.strip() for p in rc["run"]["source"].split(",")} == {"ace_kernels", "ace_model", "benchmarks"}
    out = subprocess.run(["make", "-n", "--no-print-directory", "-C", ROOT, "coverage"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert [line for line in out.stdout.splitlines() if "-m coverage run --rcfile=.coveragerc -m pytest tests" in line]
    assert [line for line in out.stdout.splitlines() if "-m coverage combine --rcfile=.coveragerc" in line]


# What setup.py reads from the environment to decide the extension's build (CI sets ACE_KERNELS_FORCE_CUDA=1).
SETUP_SWITCHES = ("ACE_KERNELS_SKIP_CUDA", "ACE_KERNELS_FORCE_CUDA", "TORCH_CUDA_ARCH_LIST", "CUDA_HOME", "CUDA_PATH")


def _make_env(**env):
    """This environment with ``env``, without make's flags from a calling make or setup.py's switches."""
    return dict({k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", *SETUP_SWITCHES)}, **env)


def _installed_tree(tmp_path, *sources):
    """The Makefile in ``tmp_path`` with the set-up's prerequisites (and ``sources``) older than its
    stamp, made with none of setup.py's switches set; returns a function giving `make -q setup`'s
    status there (0 up to date, 1 something to do) under the environment variables it is given."""
    shutil.copy(os.path.join(ROOT, "Makefile"), tmp_path / "Makefile")
    for name in ("requirements.txt", "setup.py", "ace_kernels/_sources.py", "ace_kernels/_cuda_toolkit.py",
                 "csrc/bindings.cpp", *sources,
                 ".venv/bin/python", ".venv/.installed"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
        os.utime(tmp_path / name, (1_000_000_000, 1_000_000_000))
    (tmp_path / ".venv" / "bin" / "python").chmod(0o755)
    os.utime(tmp_path / ".venv" / ".installed", (1_000_000_100, 1_000_000_100))

    def pending(*variables, **env):
        out = subprocess.run(["make", "-q", "-C", str(tmp_path), "setup", *variables], capture_output=True, text=True,
                             timeout=60, env=_make_env(**env))
        return out.returncode

    return pending


@pytest.mark.parametrize("source", ["csrc/bindings.cpp", "csrc/hypergraph/hypergraph.h", "csrc/lora/lora.cpp",
                                    "csrc/lora/tiles.cuh", "csrc/lora/tiles.hpp", "csrc/kernels.cu",
                                    "csrc/lora/sm90/gemm.cu"])
def test_setup_reinstalls_when_a_source_setup_py_builds_changes(tmp_path, source):
    """`make test` re-runs the set-up (the in-place build of the extension) when a file that setup.py
    compiles (csrc/**/*.cu, *.cpp) or fingerprints (headers) is newer than the last one: the stamp
    listed csrc/*/*.cu, csrc/*.cpp and .h files one or two levels down only, so a new csrc/lora/lora.cpp
    or .cuh header left the old build in place (which the cuda backend then declines as stale)."""
    pending = _installed_tree(tmp_path, "csrc/hypergraph/hypergraph.h", source)
    assert pending() == 0
    os.utime(tmp_path / source, (1_000_000_200, 1_000_000_200))
    assert pending() == 1
    os.utime(tmp_path / source, (1_000_000_000, 1_000_000_000))
    os.symlink("someone@host.1234", tmp_path / (source.rsplit("/", 1)[0] + "/.#editing.cu"))  # a lock: no source
    assert pending() == 0
    # Nor is a file in a hidden folder (an editor's or a tool's copy), which the fingerprint leaves out too.
    (tmp_path / "csrc" / ".old").mkdir(exist_ok=True)
    (tmp_path / "csrc" / ".old" / "kernel.cu").write_text("")
    os.utime(tmp_path / "csrc" / ".old" / "kernel.cu", (1_000_000_200, 1_000_000_200))
    assert pending() == 0


@pytest.mark.parametrize("prerequisite", ["setup.py", "requirements.txt", "ace_kernels/_sources.py",
                                          "ace_kernels/_cuda_toolkit.py"])
def test_setup_reinstalls_when_what_decides_the_build_changes(tmp_path, prerequisite):
    """The pins, setup.py (the build's flags), the sources' fingerprint code and the toolkit's rule are
    prerequisites of the set-up's stamp too: a change to one of them re-runs the install and the
    extension's build."""
    pending = _installed_tree(tmp_path)
    assert pending() == 0
    os.utime(tmp_path / prerequisite, (1_000_000_200, 1_000_000_200))
    assert pending() == 1


# A venv's python that installs nothing: it logs its arguments and the value of the variable named WATCHED.
FAKE_SETUP_PYTHON = """#!/bin/sh
printf '%s|%s\\n' "$*" "$(printenv "$WATCHED")" >> "$FAKE_PYTHON_LOG"
"""


@pytest.mark.parametrize("switch, value", [("ACE_KERNELS_FORCE_CUDA", "1"), ("ACE_KERNELS_SKIP_CUDA", "1"),
                                           ("TORCH_CUDA_ARCH_LIST", "9.0a 10.0+PTX"), ("CUDA_HOME", "/opt/cuda-13.0"),
                                           ("CUDA_PATH", "/opt/cuda-13.0")])
def test_setup_reinstalls_when_what_setup_py_is_told_changes(tmp_path, switch, value):
    """setup.py's switches decide the extension's build as its files do: the stamp ignored them, so
    `ACE_KERNELS_FORCE_CUDA=1 make test` after a set-up whose build quietly went without the extension
    (or another TORCH_CUDA_ARCH_LIST, another toolkit) said the set-up was done and kept the old build.
    The set-up runs again, with the value, records it, and runs again when it changes back."""
    pending = _installed_tree(tmp_path)
    assert pending() == 0
    assert pending(**{switch: value}) == 1
    assert pending(f"{switch}={value}") == 1  # on make's command line
    python = tmp_path / ".venv" / "bin" / "python"
    python.write_text(FAKE_SETUP_PYTHON)
    log = tmp_path / "python.log"
    env = _make_env(WATCHED=switch, FAKE_PYTHON_LOG=str(log), **{switch: value})
    out = subprocess.run(["make", "-s", "--no-print-directory", "-C", str(tmp_path), "setup"], capture_output=True,
                         text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"-m pip install -q --no-build-isolation -e .|{value}" in log.read_text().splitlines(), log.read_text()
    assert pending(**{switch: value}) == 0
    assert pending(f"{switch}={value}") == 0
    assert pending() == 1
    assert pending(**{switch: value + "0"}) == 1


def test_the_set_up_pins_every_package_it_installs(tmp_path):
    """Every package that the set-ups (`make setup`, `make test-gpu-image`'s venv, `make coverage`) install
    is pinned, in the Makefile and in requirements.txt: pip, setuptools and wheel went in at whatever
    version the index had that day (setuptools builds the extension through torch's cpp_extension)."""
    shutil.copy(os.path.join(ROOT, "Makefile"), tmp_path / "Makefile")
    for name in ("requirements.txt", "setup.py", "ace_kernels/_sources.py", "ace_kernels/_cuda_toolkit.py",
                 ".ci/pip_install_stepwise.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    out = subprocess.run(["make", "-n", "--no-print-directory", "-C", str(tmp_path), "setup", "test-gpu-image",
                          "coverage", "TEST_WORKERS=0"], capture_output=True, text=True, timeout=60, env=_make_env())
    assert out.returncode == 0, out.stderr
    installed = []
    for line in out.stdout.splitlines():
        for command in (" -m pip install ", " .ci/pip_install_stepwise.py "):
            if command in line:
                words = line.split(command, 1)[1].split()
                files = {i + 1 for i, word in enumerate(words) if word in ("-r", "-e")}
                installed += [word for i, word in enumerate(words) if not word.startswith("-") and i not in files]
    with open(os.path.join(ROOT, "requirements.txt"), encoding="utf-8") as handle:
        installed += [line.strip() for line in handle if line.strip() and not line.startswith("#")]
    names = {re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower() for requirement in installed}
    assert {"pip", "setuptools", "wheel", "ninja", "torch", "coverage"} <= names, installed
    unpinned = [requirement for requirement in installed if not re.fullmatch(r"[\w.-]+==[\w.+]+", requirement)]
    assert not unpinned, f"installed at no fixed version: {unpinned}"


def test_the_gpu_image_target_forces_the_extension_build():
    """`make test-gpu-image` builds the extension against torch 2.11 with ACE_KERNELS_FORCE_CUDA=1: a build
    that fails there fails the target, where unforced it would install without the extension and pass."""
    out = subprocess.run(["make", "-n", "--no-print-directory", "-C", ROOT, "test-gpu-image"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert [line for line in out.stdout.splitlines()
            if "ACE_KERNELS_FORCE_CUDA=1 " in line and " setup.py -q build_ext --inplace" in line], out.stdout


# A venv's python that runs nothing: it writes the PYTHONPATH it was given and its arguments to the log.
FAKE_VENV_PYTHON = """#!/bin/sh
printf '%s|%s\\n' "$PYTHONPATH" "$*" >> "$FAKE_PYTHON_LOG"
"""


def _gpu_image_tree(tree, venv_python: str, *extra: str) -> None:
    """A tree whose `make test-gpu-image` finds its venv set up (no install): the Makefile, what that venv's
    stamp depends on and ``extra`` files copied with old mtimes, and ``venv_python`` as the venv's Python."""
    (tree / ".ci").mkdir(parents=True)
    (tree / "ace_kernels").mkdir()
    for name in ("Makefile", ".ci/pip_install_stepwise.py", "requirements.txt", *extra):
        shutil.copy(os.path.join(ROOT, name), tree / name)
        os.utime(tree / name, (1_000_000_000, 1_000_000_000))
    python = tree / ".venv-gpu-image" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(venv_python)
    python.chmod(0o755)
    (tree / ".venv-gpu-image" / ".installed").write_text("")


def test_the_gpu_image_target_runs_from_a_path_with_spaces(tmp_path):
    """`make test-gpu-image` hands the clone to Python as PYTHONPATH: unquoted, a clone under a folder
    whose name has a space set PYTHONPATH to the part before it and ran the rest as a command."""
    tree = tmp_path / "a clone with spaces"
    _gpu_image_tree(tree, FAKE_VENV_PYTHON)
    log = tmp_path / "python.log"
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "PYTHONPATH")}
    out = subprocess.run(["make", "-s", "--no-print-directory", "-C", str(tree), "test-gpu-image", "TEST_WORKERS=0"],
                         env=dict(env, FAKE_PYTHON_LOG=str(log)), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    # The tests, and the extension's import where nvcc is found (the build itself runs with the tree as its cwd).
    calls = [call.split("|", 1) for call in log.read_text().splitlines()]
    calls = [(path, args) for path, args in calls
             if not args.startswith(("setup.py ", "ace_kernels/_cuda_toolkit.py"))]
    assert [args for _, args in calls if args.startswith("-m pytest ")], calls
    assert all(path == str(tree) for path, _ in calls), calls


# A venv's python that stands in for the GPU image's: the toolkit's rule finds an nvcc, an in-place build writes
# the extension under the name a 3.12 build takes, and pytest records which extension it would import, and
# exits with $PYTEST_STATUS.
GPU_IMAGE_BUILD_PYTHON = """#!/bin/sh
so=ace_kernels/_C.cpython-312-x86_64-linux-gnu.so
case "$1" in
    ace_kernels/_cuda_toolkit.py) echo /opt/cuda/bin/nvcc;;
    setup.py) for arg in "$@"; do [ "$arg" != --inplace ] || echo "the GPU image's build" > "$so"; done;;
    -m) cat ace_kernels/_C*.so > "$TESTS_SAW" 2>/dev/null; exit "$PYTEST_STATUS";;
esac
exit 0
"""


@pytest.mark.parametrize("pytest_status", [0, 1])
def test_the_gpu_image_target_puts_back_the_trees_own_extension(tmp_path, pytest_status):
    """`make test-gpu-image` builds the extension against torch 2.11 in place, where its tests import it:
    where python3 is 3.12, as the GPU image's, that build took the name of the tree's own (built against the
    first venv's torch by `make setup`) and replaced it for good, so that the first venv then loaded a build
    for another torch. The tests still see the GPU image's build alone; the tree's builds come back after
    them, whether they pass or fail."""
    tree = tmp_path / "tree"
    _gpu_image_tree(tree, GPU_IMAGE_BUILD_PYTHON)
    own = {"_C.cpython-312-x86_64-linux-gnu.so": "the tree's 3.12 build\n",
           "_C.cpython-311-x86_64-linux-gnu.so": "the tree's 3.11 build\n"}
    for name, text in own.items():
        (tree / "ace_kernels" / name).write_text(text)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("#!/bin/sh\n")  # for a Makefile that looks on PATH
    (tmp_path / "bin" / "nvcc").chmod(0o755)
    saw = tmp_path / "tests_saw.txt"
    env = _make_env(PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", TESTS_SAW=str(saw),
                    PYTEST_STATUS=str(pytest_status))
    out = subprocess.run(["make", "-s", "--no-print-directory", "-C", str(tree), "test-gpu-image", "TEST_WORKERS=0"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert (out.returncode != 0) == bool(pytest_status), out.stdout + out.stderr
    assert {path.name: path.read_text() for path in (tree / "ace_kernels").glob("_C*.so")} == own
    assert saw.read_text() == "the GPU image's build\n"
    assert not (tree / "build" / "gpu-image-kept").exists()


# A venv's python that runs the toolkit's rule (any script but setup.py) and logs, without running, the
# rest: setup.py (the extension's build), pytest and the extension's import.
FAKE_GPU_IMAGE_PYTHON = """#!/bin/sh
case "$1" in setup.py|-m|-c) printf '%s\\n' "$*" >> "$FAKE_PYTHON_LOG"; exit 0;; esac
exec "{python}" "$@"
"""


def _gpu_image_builds_the_extension(tmp_path, **env) -> bool:
    """Whether `make test-gpu-image` (its venv set up, its Python :data:`FAKE_GPU_IMAGE_PYTHON`) builds the
    extension under ``env``."""
    tree = tmp_path / "tree"
    _gpu_image_tree(tree, FAKE_GPU_IMAGE_PYTHON.format(python=sys.executable), "ace_kernels/_cuda_toolkit.py")
    log = tmp_path / "python.log"
    out = subprocess.run(["make", "-s", "--no-print-directory", "-C", str(tree), "test-gpu-image", "TEST_WORKERS=0"],
                         env=_make_env(FAKE_PYTHON_LOG=str(log), **env), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    calls = log.read_text().splitlines()
    assert [call for call in calls if call.startswith("-m pytest ")], calls
    return any(call.startswith("setup.py ") for call in calls)


def _setup_py_finds_a_toolkit(**env) -> bool:
    """Whether setup.py finds the nvcc it builds with under ``env`` (whatever else it lacks)."""
    out = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=_make_env(**env), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ace-kernels"), out.stdout + out.stderr
    return "no nvcc" not in out.stdout


@pytest.mark.parametrize("case", ["as here", "CUDA_HOME without nvcc", "CUDA_PATH without nvcc",
                                  "CUDA_HOME with nvcc, none on PATH", "nvcc on PATH only",
                                  "no CUDA_HOME or PATH nvcc"])
def test_the_gpu_image_target_finds_the_toolkit_as_setup_py_does(tmp_path, case):
    """`make test-gpu-image` forces the extension's build where it finds nvcc: it looked on PATH and in
    /usr/local/cuda, ignoring the CUDA_HOME and CUDA_PATH that setup.py reads first, so a CUDA_HOME
    without nvcc forced a build that setup.py refused (the target failed), and a toolkit named by
    CUDA_HOME alone went unchecked. Both now ask ace_kernels/_cuda_toolkit.py, and agree."""
    missing = str(tmp_path / "no-toolkit")
    (tmp_path / "cuda" / "bin").mkdir(parents=True)
    (tmp_path / "cuda" / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (tmp_path / "cuda" / "bin" / "nvcc").chmod(0o755)
    env = {"as here": {}, "CUDA_HOME without nvcc": {"CUDA_HOME": missing},
           "CUDA_PATH without nvcc": {"CUDA_HOME": "", "CUDA_PATH": missing},
           "CUDA_HOME with nvcc, none on PATH": {"CUDA_HOME": str(tmp_path / "cuda"), "PATH": "/usr/bin:/bin"},
           "nvcc on PATH only": {"PATH": f"{tmp_path / 'cuda' / 'bin'}:/usr/bin:/bin"},
           "no CUDA_HOME or PATH nvcc": {"PATH": "/usr/bin:/bin"}}[case]
    assert _gpu_image_builds_the_extension(tmp_path, **env) == _setup_py_finds_a_toolkit(**env)


@pytest.mark.parametrize("target, venv, python_variable, inputs", [
    ("setup", ".venv", "PYTHON", ["requirements.txt", "setup.py", "ace_kernels/_sources.py",
                                  "ace_kernels/_cuda_toolkit.py"]),
    ("test-gpu-image", ".venv-gpu-image", "PYTHON312", [".ci/pip_install_stepwise.py", "requirements.txt"]),
])
def test_a_venv_whose_python_is_gone_is_made_anew(tmp_path, target, venv, python_variable, inputs):
    """A venv whose interpreter was removed (a pyenv or system Python upgraded) has a dangling bin/python:
    the set-up saw it was not executable and ran `python3 -m venv` over it, which leaves existing links as
    they are, so the install went on with no Python ('No such file or directory'). It is cleared and made
    anew. (pip is left out here, so the install after it fails: what counts is the venv's Python.)"""
    shutil.copy(os.path.join(ROOT, "Makefile"), tmp_path / "Makefile")
    for name in inputs:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    bin_dir = tmp_path / venv / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python3").symlink_to("/nonexistent/python3")
    (bin_dir / "python").symlink_to("python3")
    (tmp_path / "python-without-pip").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@" --without-pip\n')
    (tmp_path / "python-without-pip").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS")}
    subprocess.run(["make", "-s", "--no-print-directory", "-C", str(tmp_path), target,
                    f"{python_variable}={tmp_path / 'python-without-pip'}"],
                   env=env, capture_output=True, text=True, timeout=120)
    out = subprocess.run([str(bin_dir / "python"), "-c", "print('runs')"], capture_output=True, text=True)
    assert out.stdout.strip() == "runs"


def test_the_set_up_refuses_a_python_older_than_the_pins_need_before_making_the_venv(tmp_path):
    """A python3 of 3.10 made the venv, then pip failed on numpy's pin ('no matching distribution'),
    naming no Python; the set-up now says which one and what it needs, and makes no venv."""
    shutil.copy(os.path.join(ROOT, "Makefile"), tmp_path / "Makefile")
    for name in ("requirements.txt", "setup.py", "ace_kernels/_sources.py", "ace_kernels/_cuda_toolkit.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    old = tmp_path / "python3.10"  # answers a version check as 3.10 does; runs anything else
    old.write_text(f'#!/bin/sh\n[ "$1" = -c ] && exec "{sys.executable}" -c "import sys; sys.exit(True)"\n'
                   f'exec "{sys.executable}" "$@"\n')
    old.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS")}
    out = subprocess.run(["make", "-s", "--no-print-directory", "-C", str(tmp_path), "setup", f"PYTHON={old}"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert f"make: {old} must be Python 3.11 or newer" in out.stderr, out.stdout + out.stderr
    assert not (tmp_path / ".venv").exists()


def test_coverage_fails_when_its_report_fails(tmp_path):
    """`make coverage` piped the report into tee, whose status the shell returned: a report that failed
    (no data combined, an unreadable file) left an empty report.txt and the target passed."""
    _installed_tree(tmp_path)
    python = tmp_path / ".venv" / "bin" / "python"
    python.write_text('#!/bin/sh\n[ "$*" = "-m coverage report --rcfile=.coveragerc" ] && exit 1\nexit 0\n')
    python.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS")}
    out = subprocess.run(["make", "-s", "--no-print-directory", "-C", str(tmp_path), "coverage", "TEST_WORKERS=0"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0, out.stdout + out.stderr


def test_the_gpu_image_venv_takes_a_python3_12_on_path(tmp_path):
    """The GPU-image venv is the GPU machines' Python 3.12: it was looked for in pyenv only, so a machine
    with python3.12 on PATH (a system or deadsnakes one) and no pyenv made it with python3 instead,
    another Python, and its tests passed as if on that stack."""
    shutil.copy(os.path.join(ROOT, "Makefile"), tmp_path / "Makefile")
    (tmp_path / ".ci").mkdir()
    (tmp_path / ".ci" / "pip_install_stepwise.py").write_text("")
    (tmp_path / "requirements.txt").write_text("")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python3.12").write_text("#!/bin/sh\n")
    (tmp_path / "bin" / "python3.12").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "PYTHON312")}
    out = subprocess.run(["make", "-n", "--no-print-directory", "-C", str(tmp_path), "test-gpu-image"],
                         env=dict(env, HOME=str(tmp_path / "home"), PATH=f"{tmp_path / 'bin'}:{env['PATH']}"),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"|| {tmp_path / 'bin' / 'python3.12'} -m venv --clear .venv-gpu-image" in out.stdout, out.stdout


def test_setup_runs_again_when_the_venv_python_is_gone(tmp_path):
    """A venv whose interpreter was removed, its stamp still newer than every prerequisite: make said the
    set-up was done and `make test` failed with '.venv/bin/python: No such file or directory'."""
    pending = _installed_tree(tmp_path)
    assert pending() == 0
    (tmp_path / ".venv" / "bin" / "python").unlink()
    (tmp_path / ".venv" / "bin" / "python").symlink_to("/nonexistent/python3")
    assert pending() == 1
