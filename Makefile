# Two commands on a fresh machine: `make demo` and `make test`. Each sets up .venv first.
# torch is pinned through constraints.txt so pip never pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
PIN    := -c constraints.txt

.PHONY: setup setup-test demo test test-fast test-slow bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.runtime: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) install --quiet $(PIN) torch==2.13.0
	$(PIP) install --quiet $(PIN) -e .
	touch $@

$(VENV)/.test: $(VENV)/.runtime
	$(PIP) install --quiet $(PIN) -e '.[test]'
	touch $@

setup: $(VENV)/.runtime
setup-test: $(VENV)/.test

demo: $(VENV)/.runtime
	$(BIN)/neuro-dask demo

# The whole suite: the default step, then the slow step (both required).
test: test-fast test-slow

test-fast: $(VENV)/.test
	$(BIN)/python -m pytest -m "not slow" -q

test-slow: $(VENV)/.test
	$(BIN)/python -m pytest -m slow -q

bench: $(VENV)/.test
	$(BIN)/python benchmarks/bench_decode_vs_transformers.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
