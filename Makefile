# `make test` and `make demo` set up .venv from nothing (idempotent; fast once it exists).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# torch and torchvision are pinned to the pair that installs on a fresh machine here
# (a CUDA 13 build that also runs on CPU); DALI for CUDA 13 matches it.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed
# Triton 3.6 beside the one torch ships, for the compile test only (the GPU machines we borrow
# hold 3.6); installed into a folder of its own, which the test puts first on PYTHONPATH.
TRITON_OLD := $(VENV)/triton-3.6

.PHONY: test demo bench venv clean

venv: $(STAMP)

$(STAMP): setup.py pyproject.toml Makefile dali_relabel/ops/kernels/label_pooling_cpu.cpp
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=23" "setuptools>=64" wheel ninja
	$(PIP) install -q $(TORCH_PINS)
	$(PIP) install -q --no-build-isolation -e '.[test]'
	$(PIP) install -q --no-deps --upgrade --target $(TRITON_OLD) triton==3.6.0
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) train/run.py --output output/demo

bench: $(STAMP)
	$(PIP) install -q -e '.[test,bench]' --no-build-isolation
	$(PY) benchmarks/kernel_bench.py
	$(PY) benchmarks/loader_bench.py
	$(PY) benchmarks/token_targets_bench.py

clean:
	rm -rf $(VENV) build *.egg-info dali_relabel/ops/kernels/*.so
