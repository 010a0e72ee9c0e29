# Fresh-machine entry points: `make demo` (the offline main job) and `make test`.
# Both install from requirements-lock.txt, the versions the last green CI ran (`make lock` renews it).
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
LOCK = requirements-lock.txt

.PHONY: setup demo test lint lock

$(BIN)/quantkit: $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU wheel; a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q -c $(LOCK) torch==2.13.0
	$(BIN)/pip install -q -c $(LOCK) -e ".[test]"
	@touch $@

setup: $(BIN)/quantkit

# The demo writes under runs/demo (git-ignored), so the clone stays clean.
demo: setup
	$(BIN)/quantkit demo --overwrite -o runs/demo

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check quantkit tests benchmarks

# Re-resolve every dependency (transitive included) to its newest release that setup.cfg allows, in a
# throwaway venv, and write the pins; then `rm -rf .venv && make test` checks them.
lock:
	bash .ci/lock $(LOCK)
