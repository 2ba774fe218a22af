# ace-kernels: `make bench` runs the benchmark suite, `make test` the tests.
# Both create ./.venv and install everything on first use (about 3 minutes).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup bench bench-quick test test-fast test-triton36 info gpu-check gpu-wheels clean

setup: $(STAMP)

$(STAMP): requirements.txt setup.py $(wildcard csrc/*/*.cu csrc/*/*.h csrc/*.cpp csrc/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	CFLAGS=-g0 $(PY) -m pip install -q --no-build-isolation -e .
	touch $(STAMP)

bench: $(STAMP)
	$(PY) -m benchmarks

bench-quick: $(STAMP)
	$(PY) -m benchmarks --quick

test: $(STAMP)
	$(PY) -m pytest tests -q

# The GPU machines run Triton 3.6 (ptxas 12.8), whose register allocation differs from the
# pinned 3.8's (ptxas 12.9): a tile that fits under one can spill under the other. This runs
# the op tests (interpreter, and the sm_90a AOT spill checks) in a second venv with triton
# 3.6.0 and a CPU torch (2.13.0, on this machine's disk), with the package from this tree.
# CI runs it after `make test`.
VENV36 ?= .venv-triton36
STAMP36 := $(VENV36)/.installed

$(STAMP36):
	test -x $(VENV36)/bin/python || $(PYTHON) -m venv $(VENV36)
	$(VENV36)/bin/python -m pip install -q torch==2.13.0
	$(VENV36)/bin/python -m pip install -q triton==3.6.0 numpy pytest
	touch $(STAMP36)

test-triton36: $(STAMP36)
	PYTHONPATH=$(CURDIR) $(VENV36)/bin/python -m pytest -q -p no:cacheprovider \
		tests/test_lora.py tests/test_hypergraph.py tests/test_contrastive.py tests/test_dispatch.py

info: $(STAMP)
	$(PY) -m ace_kernels.info

# On a lent GPU machine (its own python3, no venv): see benchmarks/gpu_check.sh.
gpu-check:
	bash benchmarks/gpu_check.sh

# Wheels a lent GPU machine lacks (it has no network), downloaded here into .whl/ (ignored by
# git) for its Python 3.12; gpu_check.sh installs whatever lies there. Its image already has
# peft, accelerate, timm and transformers; Inf-CL is the InfoNCE benchmark's extra baseline.
GPU_WHEELS ?= inf_cl==1.2.1
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)
	ls -l .whl

clean:
	rm -rf build *.egg-info ace_kernels/*.so $(VENV) $(VENV36)
