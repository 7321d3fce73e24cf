# Two commands do everything on a fresh machine: `make run` and `make test`.
# Each creates .venv on first use. torch comes first: the CUDA build only where an NVIDIA driver
# is present, else the CPU build (a plain `torch` requirement would pull GBs of CUDA packages).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tuneplan-installed
TORCH_CPU ?= torch==2.13.0

.PHONY: run test check bench setup clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "NVIDIA GPU found: installing the CUDA build of torch"; $(PY) -m pip install -q torch; \
	else \
		echo "no NVIDIA GPU: installing the CPU build of torch ($(TORCH_CPU))"; $(PY) -m pip install -q "$(TORCH_CPU)"; \
	fi
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

# The main job: the app, opening on the default plan (Llama-3.1-8B, QLoRA, one 24 GiB RTX 4090).
# ARGS passes arguments through, e.g. make run ARGS="estimate --model gpt2 --json".
run: $(STAMP)
	$(VENV)/bin/tuneplan $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q

check: $(STAMP)
	$(VENV)/bin/ruff check advisor runner tests benchmarks
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/bench_estimate.py

clean:
	rm -rf $(VENV) .pytest_cache
