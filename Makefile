# Two commands on a fresh machine: `make demo` and `make test`. Each sets up .venv first.
# torch is pinned through constraints.txt so pip never pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
PIN    := -c constraints.txt

.PHONY: setup setup-test browser nat-tools demo test lint test-fast test-slow bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.runtime: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) install --quiet $(PIN) torch==2.13.0
	$(PIP) install --quiet $(PIN) -e .
	touch $@

$(VENV)/.test: $(VENV)/.runtime
	$(PIP) install --quiet $(PIN) -e '.[test]'
	$(MAKE) --no-print-directory browser
	$(MAKE) --no-print-directory nat-tools
	touch $@

# Headless Chromium for the dashboard's browser test (Debian's packages). Without root or apt the
# test skips and says why; nothing else depends on it.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver \
			>/dev/null) || echo "could not install chromium: the dashboard's browser test will skip"; \
	else echo "no root or apt-get: chromium not installed, the dashboard's browser test will skip"; fi

# iptables for the home-NAT test (tests/slow/test_home_nat.py: network namespaces, NAT routers).
# Without root or apt the test skips and says why.
nat-tools:
	@if command -v iptables >/dev/null && command -v ip >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iptables iproute2 \
			>/dev/null) || echo "could not install iptables: the home-NAT test will skip"; \
	else echo "no root or apt-get: iptables not installed, the home-NAT test will skip"; fi

setup: $(VENV)/.runtime
setup-test: $(VENV)/.test

demo: $(VENV)/.runtime
	$(BIN)/neuro-dask demo

# The whole suite: lint and format check, the default step, then the slow step (all required).
test: lint test-fast test-slow

lint: $(VENV)/.test
	@echo "== make test, step 1 of 3: ruff (lint and format check, pyproject.toml [tool.ruff]) =="
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Each file's name, its dots and the suite's percentage as it runs; the slowest tests at the end.
PYTEST := $(BIN)/python -m pytest --durations=10 --durations-min=5

test-fast: $(VENV)/.test
	@echo "== make test, step 2 of 3: the default suite (pytest -m 'not slow'; about 8 minutes on 2 cores) =="
	$(PYTEST) -m "not slow"

test-slow: $(VENV)/.test
	@echo "== make test, step 3 of 3: the slow suite (pytest -m slow; about 5 minutes on 2 cores) =="
	$(PYTEST) -m slow

bench: $(VENV)/.test
	$(BIN)/python benchmarks/bench_decode_vs_transformers.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
