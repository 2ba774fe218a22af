# ace-kernels: `make bench` runs the benchmark suite, `make test` the tests.
# Both create ./.venv and install everything on first use (about 3 minutes).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup bench bench-quick test test-fast info gpu-check clean

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

clean:
	rm -rf build *.egg-info ace_kernels/*.so $(VENV)
