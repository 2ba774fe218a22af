# ace-kernels: `make bench` runs the benchmark suite, `make test` the tests.
# Both create ./.venv and install everything on first use (about 3 minutes).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup bench bench-quick test test-fast info gpu-check gpu-wheels clean

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
	rm -rf build *.egg-info ace_kernels/*.so $(VENV)
