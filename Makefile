# Two entry points: `make reproduce-quick` (the main job) and `make test`.
# Each builds .venv from nothing: PyTorch 2.13 (a CPU build where pip's index serves one) and
# the package with its test tools, compiling to bytecode only the modules that get imported
# (compiling all of them took half of the set-up; see WARM).  PYTHON may name another
# interpreter (3.10+).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv reproduce-quick test bench lint

# Python writes a module's bytecode when it first imports it, unless PYTHONDONTWRITEBYTECODE
# is set (as in many containers): then every process compiles torch and the rest anew, 10-13 s
# each on two cores.  So the set-up imports what the commands and tests import once, with
# writing on (the bulk, torch._dynamo, while the package installs).  A failed warm-up only
# costs that time later.
WARM := PYTHONDONTWRITEBYTECODE= $(BIN)/python -W ignore -c
WARM_MODULES := guessgrad.cli.__main__, guessgrad.bench, guessgrad.experiments, guessgrad.curves, \
	matplotlib.figure, mnist1d.data, scipy.sparse.linalg, pytest

$(BIN)/guessgrad: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --no-compile "$(TORCH_SPEC)"
	$(WARM) "import torch._dynamo" & \
	$(BIN)/python -m pip install --quiet --no-compile -e ".[dev]" && wait
	-$(WARM) "import $(WARM_MODULES)"
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
