# Two entry points: `make reproduce-quick` (the main job) and `make test`.
# Each builds .venv from nothing: a CPU build of PyTorch 2.13 and the package with its
# test tools (without compiling every module to bytecode up front, which took half of the
# set-up: Python compiles what it imports, once).  PYTHON may name another interpreter (3.10+).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv reproduce-quick test bench lint

$(BIN)/guessgrad: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --no-compile "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet --no-compile -e ".[dev]"
	touch $(BIN)/guessgrad

venv: $(BIN)/guessgrad

reproduce-quick: venv
	$(BIN)/guessgrad reproduce table3 --quick --jobs 2

lint: venv
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts

test: lint
	$(BIN)/python -m pytest

bench: venv
	$(BIN)/guessgrad bench --width 512 --methods backprop,w-transpose,w-perp
