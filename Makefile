# ace-kernels: `make bench` runs the benchmark suite, `make test` the tests.
# Both create ./.venv and install everything on first use (about 3 minutes).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup bench bench-quick test print-test-workers coverage test-gpu-image info gpu-check gpu-wheels clean

setup: $(STAMP)

# What setup.py compiles and fingerprints (csrc/**/*.cu and *.cpp; ace_kernels/_sources.py's suffixes), at any depth.
CSRC_FILES := $(shell find csrc -name '.*' -prune -o -type f \( -name '*.cu' -o -name '*.cuh' -o -name '*.cpp' \
	-o -name '*.hpp' -o -name '*.h' \) -print 2>/dev/null)

# A venv whose Python is gone (removed or upgraded) is set up anew, its stamp notwithstanding (a
# phony prerequisite), and made with --clear: `venv` alone leaves its links dangling.
NO_PYTHON_IN = $(shell test -x $(1)/bin/python || echo venv-without-python)
# What setup.py is told by the environment (or make's command line), as set: the stamp holds the values
# the set-up built with, and other values (ACE_KERNELS_FORCE_CUDA=1 after a build that went without
# the extension, another TORCH_CUDA_ARCH_LIST or CUDA_HOME) make it run again (a phony prerequisite).
SETUP_SWITCH_NAMES := ACE_KERNELS_SKIP_CUDA ACE_KERNELS_FORCE_CUDA TORCH_CUDA_ARCH_LIST CUDA_HOME CUDA_PATH
SETUP_SWITCHES := $(strip $(foreach v,$(SETUP_SWITCH_NAMES),$(if $($(v)),$(v)=$($(v)))))
STAMP_SWITCHES := $(strip $(shell cat $(STAMP) 2>/dev/null))
DIFFERENT = $(subst x$(1),,x$(2))$(subst x$(2),,x$(1))
SWITCHES_CHANGED := $(if $(call DIFFERENT,$(SETUP_SWITCHES),$(STAMP_SWITCHES)),setup-switches-changed)
.PHONY: venv-without-python setup-switches-changed
# pip itself, before the pins of requirements.txt (setuptools and wheel among them) go in with it.
PIP_PIN ?= pip==26.3
$(STAMP): requirements.txt setup.py ace_kernels/_sources.py ace_kernels/_cuda_toolkit.py $(CSRC_FILES) \
		$(call NO_PYTHON_IN,$(VENV)) $(SWITCHES_CHANGED)
	@test -x $(PY) || $(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "make: $(PYTHON)" \
		"must be Python 3.11 or newer, as the pinned requirements are (make PYTHON=python3.12 picks another)" >&2; \
		exit 1; }
	test -x $(PY) || $(PYTHON) -m venv --clear $(VENV)
	$(PY) -m pip install -q $(PIP_PIN)
	$(PY) -m pip install -q -r requirements.txt
	CFLAGS=-g0 $(PY) -m pip install -q --no-build-isolation -e .
	printf '%s\n' '$(subst ','\'',$(SETUP_SWITCHES))' >$(STAMP)

# One torch thread by default, as the committed CPU results were measured: on a shared machine
# oversubscribed OpenMP threads spin and times explode. `make bench BENCH_ARGS=` for torch's choice.
BENCH_ARGS ?= --threads 1
bench: $(STAMP)
	$(PY) -m benchmarks $(BENCH_ARGS)

bench-quick: $(STAMP)
	$(PY) -m benchmarks --quick $(BENCH_ARGS)

# The tests run in TEST_WORKERS processes (pytest-xdist): one per core, at most 8, none on one core (each holds torch
# and the Triton interpreter, about 1 GB). Most of their time is the interpreter's Python, which
# one process cannot spread over cores: CI's 2 cores take 1.5-2x less time than one process.
# `make test TEST_WORKERS=0` runs them in this process (pytest's own -n 0).
# Cores: nproc (the CPUs this process may run on; without OMP_NUM_THREADS, which it would
# follow), lowered to a container's CPU quota (cgroup v2 cpu.max "QUOTA PERIOD", rounded up),
# which nproc does not see. cgroup v1's quota is not read.
# (this process's own cgroup: /proc/self/cgroup's "0::PATH"; "/" inside a cgroup namespace)
CPU_MAX_FILE ?= /sys/fs/cgroup$(shell sed -n 's/^0:://p' /proc/self/cgroup 2>/dev/null)/cpu.max
TEST_WORKERS ?= $(shell n=$$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc 2>/dev/null || echo 1); \
	q=$$(cat $(CPU_MAX_FILE) 2>/dev/null); set -- $$q; \
	case "$$1$$2" in (*[!0-9]*|"") ;; \
		(*) [ "$${2:-0}" -gt 0 ] && c=$$(( ($$1 + $$2 - 1) / $$2 )) && [ $$c -lt $$n ] && n=$$c;; esac; \
	[ $$n -gt 8 ] && n=8; [ $$n -lt 2 ] && n=0; echo $$n)
PYTEST_WORKERS = -n $(TEST_WORKERS) --dist worksteal

# --durations: the slowest tests, at the end of every run (CI's time budget is watched from them).
test: $(STAMP)
	$(PY) -m pytest tests -q --durations=15 $(PYTEST_WORKERS)

print-test-workers:
	@echo $(TEST_WORKERS)

# Which statements no CPU test runs: the tests of `make test` under coverage.py, a report (not a
# gate) in build/coverage/ (report.txt, html/). .coveragerc measures the processes the tests start
# too (the CLI's, torchrun's, the spawned ranks'). GPU-only code is never run here. coverage is
# installed on first use (7.10 or newer, for .coveragerc's `patch`): nothing else needs it.
COVERAGE_PIN ?= coverage==7.17.5
coverage: $(STAMP)
	$(PY) -c "import coverage, sys; sys.exit(coverage.version_info < (7, 10))" 2>/dev/null \
		|| $(PY) -m pip install -q $(COVERAGE_PIN)
	rm -rf build/coverage && mkdir -p build/coverage
	$(PY) -m coverage run --rcfile=.coveragerc -m pytest tests -q -p no:cacheprovider $(PYTEST_WORKERS)
	$(PY) -m coverage combine --rcfile=.coveragerc -q
	$(PY) -m coverage report --rcfile=.coveragerc >build/coverage/report.txt; status=$$?; \
		cat build/coverage/report.txt; exit $$status
	$(PY) -m coverage html --rcfile=.coveragerc -q -d build/coverage/html

# The GPU machines' software, here: Python 3.12, torch 2.11.0 (+cu130) and triton 3.6.0, as the
# lent H100/H200 image has them (numpy 2.5.2 too). This second venv catches what only that
# stack does: Triton 3.6's ptxas (12.8) allocates registers differently from 3.8's (12.9), so a
# tile can spill under one and not the other (the sm_90a AOT checks); torch 2.11 traces the
# ops differently under torch.compile; and the CUDA extension must compile and link against
# torch 2.11's headers (built here when there is a toolkit: ace_kernels/_cuda_toolkit.py, setup.py's
# own rule, says so; it cannot run without a GPU). It runs the op and compile tests with the package
# from this tree. CI runs it after `make test`. Its
# packages go in one distribution at a time (.ci/pip_install_stepwise.py), so that the ~3 GB of
# torch's CUDA wheels never lie on the disk all at once beside what they unpack to.
VENV_GPU ?= .venv-gpu-image
STAMP_GPU := $(VENV_GPU)/.installed
# pyenv's 3.12, else a python3.12 on PATH, else (not that stack's Python) $(PYTHON).
PYTHON312 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) \
	$(shell command -v python3.12 2>/dev/null) $(PYTHON))
GPU_IMAGE_PINS := torch==2.11.0 triton==3.6.0 numpy==2.5.2 pytest==9.2.0 pytest-xdist==3.8.0
# What builds the extension there: requirements.txt's pins, read from it.
GPU_IMAGE_BUILD_PINS = $(shell grep -E '^(setuptools|ninja)==' requirements.txt)

# Re-run when the pins here or there change (the stepwise install skips what is already there).
$(STAMP_GPU): Makefile requirements.txt .ci/pip_install_stepwise.py $(call NO_PYTHON_IN,$(VENV_GPU))
	test -x $(VENV_GPU)/bin/python || $(PYTHON312) -m venv --clear $(VENV_GPU)
	$(VENV_GPU)/bin/python .ci/pip_install_stepwise.py $(GPU_IMAGE_PINS) $(GPU_IMAGE_BUILD_PINS)
	touch $(STAMP_GPU)

# The GPU image's build goes in place, where the tests below import it from, for this target's length
# only: the tree's own builds (ace_kernels/_C*.so; that of a python3 of 3.12 has the very name this
# one takes) wait in $(GPU_IMAGE_KEPT) meanwhile and go back at the end, whatever the outcome (after a
# run cut short, at the start of the next one).
GPU_IMAGE_KEPT := build/gpu-image-kept
test-gpu-image: $(STAMP_GPU)
	@kept="$(GPU_IMAGE_KEPT)"; \
	restore() { [ -d "$$kept" ] || return 0; rm -f ace_kernels/_C*.so; \
		for so in "$$kept"/_C*.so; do [ ! -e "$$so" ] || mv "$$so" ace_kernels/; done; rmdir "$$kept"; }; \
	restore; mkdir -p "$$kept"; \
	for so in ace_kernels/_C*.so; do [ ! -e "$$so" ] || mv "$$so" "$$kept"/; done; \
	trap restore EXIT; trap 'exit 130' INT TERM HUP; \
	if nvcc=$$($(VENV_GPU)/bin/python ace_kernels/_cuda_toolkit.py); then \
		echo "building ace_kernels._C against torch 2.11 (sm_90a) with $$nvcc"; \
		rm -rf build/gpu-image; mkdir -p build; \
		ACE_KERNELS_FORCE_CUDA=1 CFLAGS=-g0 $(VENV_GPU)/bin/python setup.py -q build_ext --inplace \
			--build-temp build/gpu-image/temp >build/gpu-image.log 2>&1 \
			|| { tail -n 40 build/gpu-image.log; exit 1; }; \
		PYTHONPATH="$(CURDIR)" $(VENV_GPU)/bin/python -c "import ace_kernels._C as m; print('loaded', m.__file__)" \
			|| exit 1; \
	else echo "$$nvcc: the extension build against torch 2.11 is not checked"; fi; \
	PYTHONPATH="$(CURDIR)" $(VENV_GPU)/bin/python -m pytest -q -p no:cacheprovider --durations=15 $(PYTEST_WORKERS) \
		tests/test_lora.py tests/test_hypergraph.py tests/test_contrastive.py tests/test_dispatch.py \
		tests/test_compile.py tests/test_precision.py tests/test_bounds.py

info: $(STAMP)
	$(PY) -m ace_kernels.info

# On a lent GPU machine (its own python3, no venv): see benchmarks/gpu_check.sh.
gpu-check:
	bash benchmarks/gpu_check.sh

# Wheels a lent GPU machine lacks (it has no network), downloaded here into .whl/ (ignored by
# git) for its Python 3.12; gpu_check.sh installs whatever lies there. Its image already has
# peft, accelerate, timm, transformers, regex, tqdm and huggingface_hub. Inf-CL is the InfoNCE
# benchmark's extra baseline; open_clip (with ftfy and wcwidth, which it imports) gives the
# ClipLoss baseline and test, and builds BiomedCLIP through open_clip as on CPU.
GPU_WHEELS ?= inf_cl==1.2.1 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4
# .whl/ is emptied first: two versions of one wheel there stop the offline install.
gpu-wheels:
	rm -rf .whl
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)
	ls -l .whl

clean:
	rm -rf build *.egg-info ace_kernels/*.so $(VENV) $(VENV_GPU)
