# `make train`: set up .venv and run the default recipe (CPU when there is no GPU).
# `make test`:  set up .venv and run the test suite.
PYTHON ?= python3
VENV ?= .venv
# The CPU machines this project targets carry this torch build locally; any torch >= 2.11 works.
TORCH ?= torch==2.13.0
RECIPE ?= default
BIN := $(VENV)/bin

.PHONY: setup train test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

train: setup
	$(BIN)/slipstream train recipe=$(RECIPE) $(ARGS)

test: setup
	$(BIN)/python -m pytest -q $(ARGS)

clean:
	rm -rf $(VENV) runs
