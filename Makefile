# Backhaul developer entry points. `make demo` and `make test` work on a fresh machine:
# they create the virtualenv and install what they need.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast lint typecheck bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

## demo: exit server + demo upstream + tunnel client on loopback, one request, Ctrl-C stops
demo: $(STAMP)
	$(BIN)/python scripts/demo.py

## test: install test dependencies and system services, then run every test
test: $(STAMP)
	bash scripts/ci-deps.sh
	$(BIN)/python -m pytest

## test-fast: skip the 1 GiB transfers
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check shared exit_server tunnel_client tests scripts
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .demo .pytest_cache .mypy_cache .ruff_cache .hypothesis
