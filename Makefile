# The README's quick start is two commands: `make demo` and `make test`. Both set up the
# virtual environment first (once; again when pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# NOTE: torch==2.13.0 is the CPU wheel these machines install locally; an unpinned torch
# pulls gigabytes of CUDA packages. GPU users: `make demo TORCH=torch` (or install their own
# CUDA build into .venv first: with a torch present, pip installs no other).
TORCH ?= torch==2.13.0

.PHONY: setup demo test test-fast completions lint

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev,quickstart,plot,lm-eval,peft]"
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/cpmctl quickstart

test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

completions: setup
	$(BIN)/python scripts/update_completions.py

lint: setup
	$(BIN)/ruff check cpmctl tests scripts
