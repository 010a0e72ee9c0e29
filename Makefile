# Fresh-machine entry points: `make demo` (the offline main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: setup demo test lint

$(BIN)/quantkit:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU wheel; a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"

setup: $(BIN)/quantkit

# The demo writes under runs/demo (git-ignored), so the clone stays clean.
demo: setup
	$(BIN)/quantkit demo --overwrite -o runs/demo

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check quantkit tests benchmarks
