# Two commands do everything on a fresh machine: `make run` and `make test`.
# Each creates .venv on first use. torch comes first: the CUDA build only where an NVIDIA driver
# is present, else the CPU build (a plain `torch` requirement would pull GBs of CUDA packages).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tuneplan-installed
TORCH_CPU ?= torch==2.13.0

SKY_VENV ?= .venv-sky
SKY_STAMP := $(SKY_VENV)/.installed
SKYPILOT ?= skypilot==0.14.1

.PHONY: run test check bench setup clean newest

$(STAMP): pyproject.toml Makefile constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "NVIDIA GPU found: installing the CUDA build of torch"; $(PY) -m pip install -q torch; \
	else \
		echo "no NVIDIA GPU: installing the CPU build of torch ($(TORCH_CPU))"; $(PY) -m pip install -q "$(TORCH_CPU)"; \
	fi
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

# SkyPilot lives in an environment of its own (it pins click below what huggingface_hub needs); the
# tests parse `tuneplan cloud`'s task with its loader (sky.Task.from_yaml) there. Where it cannot be
# installed, those tests say so and skip; nothing else needs it.
$(SKY_STAMP):
	@$(PYTHON) -m venv $(SKY_VENV) && $(SKY_VENV)/bin/python -m pip install -q "$(SKYPILOT)" \
		&& touch $(SKY_STAMP) || echo "could not install SkyPilot: the sky.Task loader tests will skip"

# An older stack beside the project's, for benchmarks/stack_cpu.py --measure only (the stack of the
# fms-acceleration GPU tables): transformers 4.48.1, peft 0.13.2, accelerate 1.0.1 on the same CPU torch.
TF4_VENV ?= .venv-tf4
$(TF4_VENV)/.installed:
	$(PYTHON) -m venv $(TF4_VENV) && $(TF4_VENV)/bin/python -m pip install -q "$(TORCH_CPU)" transformers==4.48.1 \
		peft==0.13.2 accelerate==1.0.1 bitsandbytes pydantic pyyaml rich psutil huggingface_hub nvidia-ml-py \
		&& touch $(TF4_VENV)/.installed

.venv-tf4: $(TF4_VENV)/.installed

# The newest releases, in an environment of their own: the newest transformers, peft and bitsandbytes from the
# package index and the newest CPU torch (PyTorch's CPU index; $(TORCH_CPU) where it cannot be reached), then the
# registry test (every decoder-only causal LM the installed transformers registers, tests/test_registry.py) and
# the estimate's release note. How a maintainer checks a new release: `make newest`.
NEWEST_VENV ?= .tuneplan-cache/venv-newest
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
newest:
	$(PYTHON) -m venv $(NEWEST_VENV)
	$(NEWEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(NEWEST_VENV)/bin/python -m pip install -q --upgrade --index-url $(TORCH_CPU_INDEX) torch \
		|| $(NEWEST_VENV)/bin/python -m pip install -q "$(TORCH_CPU)"
	$(NEWEST_VENV)/bin/python -m pip install -q --upgrade -e ".[dev]" transformers peft bitsandbytes
	$(NEWEST_VENV)/bin/python -c "import torch, transformers, peft, bitsandbytes as b; \
		print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, \
		'bitsandbytes', b.__version__)"
	TUNEPLAN_REGISTRY=all $(NEWEST_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_registry.py

# The main job: the app, opening on the default plan (Llama-3.1-8B, QLoRA, one 24 GiB RTX 4090).
# ARGS passes arguments through, e.g. make run ARGS="estimate --model gpt2 --json".
run: $(STAMP)
	$(VENV)/bin/tuneplan $(ARGS)

test: $(STAMP) $(SKY_STAMP)
	TUNEPLAN_SKY_PYTHON=$$(test -f $(SKY_STAMP) && echo $(abspath $(SKY_VENV))/bin/python) $(PY) -m pytest -q

# The quick loop for a maintainer (under two minutes on two cores): lint, types of the core, the fast tests
check: $(STAMP)
	$(VENV)/bin/ruff check advisor runner tests benchmarks
	$(VENV)/bin/mypy
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/bench_estimate.py

clean:
	rm -rf $(VENV) $(SKY_VENV) $(TF4_VENV) $(NEWEST_VENV) .pytest_cache
