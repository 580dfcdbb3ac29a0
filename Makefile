# Backhaul developer entry points. `make demo` and `make test` work on a fresh machine:
# they create the virtualenv and install what they need.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Two stamps: the demo needs the runtime dependencies only (seconds to install); the tests add
# the test extra (linters, type checker, scanners) on top.
RUNTIME_STAMP := $(VENV)/.installed-runtime
STAMP         := $(VENV)/.installed

.PHONY: demo test test-compiled test-fast lint typecheck bench load reliability dist clean

$(RUNTIME_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e .
	touch $(RUNTIME_STAMP)

$(STAMP): $(RUNTIME_STAMP)
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

# mitmproxy (the TLS-intercepting proxy of tests/e2e/test_mitmproxy.py) in its own virtualenv:
# it pins its own cryptography, which must not move the project's.
MITM_VENV  ?= .venv-mitm
MITM_STAMP := $(MITM_VENV)/.installed
$(MITM_STAMP):
	$(PYTHON) -m venv $(MITM_VENV)
	$(MITM_VENV)/bin/pip install -q --upgrade pip
	$(MITM_VENV)/bin/pip install -q 'mitmproxy==11.0.2'
	touch $(MITM_STAMP)

## demo: exit server + demo upstream + tunnel client on loopback, one request, Ctrl-C stops
demo: $(RUNTIME_STAMP)
	$(BIN)/python scripts/demo.py

## dist: build the wheel and sdist into dist/ (install with: pip install dist/backhaul-*.whl)
dist: $(STAMP)
	rm -rf dist
	$(BIN)/python -m build --outdir dist .

## test: install test dependencies and system services, then run every test. The adapter
## layer's own unit tests (tests/unit/aio) run first, with the coverage of shared/aio/ they
## reach reported and held at 90 % or more; then everything else; then the compiled build
## (README, "Compiled build"): scripts/compiled.py builds the compiled wheel in a copy of the
## checkout, and the tests that drive the compiled modules run against it there.
AIO_COVERAGE ?= 90
COMPILED_DIR ?= build/compiled
COMPILED_TESTS ?= tests/unit tests/e2e/test_http.py tests/e2e/test_edge_headers.py \
	tests/e2e/test_h1_listener.py tests/e2e/test_framing_oracle.py tests/e2e/test_upstream_http1.py \
	tests/e2e/test_client_upstream_faults.py tests/e2e/test_tcp.py tests/e2e/test_websocket.py \
	tests/e2e/test_streaming.py
test: $(STAMP) $(MITM_STAMP) lint
	bash scripts/ci-deps.sh
	$(BIN)/python -m pytest tests/unit/aio --cov=shared/aio --cov-report=term-missing \
		--cov-fail-under=$(AIO_COVERAGE)
	$(BIN)/python -m pytest --ignore=tests/unit/aio
	$(MAKE) test-compiled

## test-compiled: the compiled build's pass of make test on its own
test-compiled: $(STAMP)
	$(BIN)/python scripts/compiled.py $(COMPILED_DIR)
	cd $(COMPILED_DIR) && BACKHAUL_EXPECT_COMPILED=1 PYTHONPATH="$$PWD" \
		$(abspath $(BIN))/python -m pytest -p no:cacheprovider $(COMPILED_TESTS)

## test-fast: skip the 1 GiB transfers
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

## lint: ruff check, ruff format --check and mypy --strict (part of make test)
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# bench and load use the existing .venv as it is (they never reinstall it); on a fresh machine
# they create it once through the usual stamp.
$(BIN)/exit-server:
	$(MAKE) $(STAMP)

## bench: wrk against nginx baselines, Backhaul HTTP and TCP mode, then the scale test, HTTP/2 and
## gRPC (h2load, grpcio), the fleet, the bare relays under them (bench/relay_floor.py) and start
## time; writes
## docs/BENCHMARKS.md (installs nginx and wrk from Debian if missing: needs root).
## BENCH_ARGS="--quick --profile --skip-scale" etc. (see bench/run.py --help)
## It measures the compiled build, what the container image ships (README, "Compiled build"):
## built first into build/compiled and imported from there; BENCH_BUILD=pure measures the checkout.
BENCH_ARGS ?= --pin
BENCH_BUILD ?= compiled
bench: | $(BIN)/exit-server
	bash bench/setup.sh
ifeq ($(BENCH_BUILD),compiled)
	$(MAKE) $(STAMP)
	$(BIN)/python scripts/compiled.py $(COMPILED_DIR)
	BENCH_VIA="make bench$(if $(filter-out --pin,$(BENCH_ARGS)), BENCH_ARGS='$(BENCH_ARGS)')" \
		PYTHONPATH="$(abspath $(COMPILED_DIR))" $(BIN)/python bench/run.py $(BENCH_ARGS)
else ifeq ($(BENCH_BUILD),pure)
	BENCH_VIA="make bench BENCH_BUILD=pure$(if $(filter-out --pin,$(BENCH_ARGS)), BENCH_ARGS='$(BENCH_ARGS)')" \
		$(BIN)/python bench/run.py $(BENCH_ARGS)
else
	@echo "BENCH_BUILD=$(BENCH_BUILD): use compiled or pure" >&2; exit 2
endif

## load: locust (own virtualenv .venv-load, the `load` extra) against a local stack for LOAD_TIME;
## fails on > 0.1% failures or a p95 over the locustfile's limit. Reports in bench/results/load/.
LOAD_VENV       ?= .venv-load
LOAD_TIME       ?= 60s
LOAD_USERS      ?= 50
LOAD_SPAWN_RATE ?= 10
LOAD_STAMP      := $(LOAD_VENV)/.installed

$(LOAD_STAMP): pyproject.toml
	$(PYTHON) -m venv $(LOAD_VENV)
	echo '*' > $(LOAD_VENV)/.gitignore
	$(LOAD_VENV)/bin/pip install -q --upgrade pip
	$(PYTHON) bench/load.py --print-deps | xargs $(LOAD_VENV)/bin/pip install -q
	touch $(LOAD_STAMP)

load: $(LOAD_STAMP) | $(BIN)/exit-server
	$(BIN)/python bench/load.py --locust $(LOAD_VENV)/bin/locust --time $(LOAD_TIME) \
		--users $(LOAD_USERS) --spawn-rate $(LOAD_SPAWN_RATE)

## reliability: fault-injection scenarios against real processes (client killed, silent link loss,
## exit server restart, upstream faults, degraded link, overload, 10 min soak; ~20 min); writes
## docs/RELIABILITY.md. CI runs the short versions (tests/reliability). RELIABILITY_ARGS="--short" etc.
RELIABILITY_ARGS ?=
reliability: | $(BIN)/exit-server
	bash reliability/setup.sh
	$(BIN)/python reliability/run.py $(RELIABILITY_ARGS)

clean:
	rm -rf $(VENV) $(MITM_VENV) .demo .pytest_cache .mypy_cache .ruff_cache .hypothesis dist build
