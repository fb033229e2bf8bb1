# pgdurable — every developer task starts here. `make help` lists the targets.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# 2 cores on the project machines: run test files in one process, the acceptance
# tier already forks serve subprocesses of its own.
PYTEST_ARGS ?=

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

$(BIN)/.installed: pyproject.toml setup.py native/_sched_c.pyx
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@$(BIN)/pip install -q --upgrade pip setuptools wheel Cython >/dev/null
	@# psycopg[c] compiles against libpq; where it cannot build, fall back and say so.
	@$(BIN)/pip install -q 'psycopg[c]' 'psycopg-pool' 2>/dev/null \
	  || { echo "pgdurable: psycopg[c] could not be built here; installing psycopg[binary] instead"; \
	       $(BIN)/pip install -q 'psycopg[binary]' 'psycopg-pool'; }
	@$(BIN)/pip install -q -e '.[test]'
	@$(BIN)/python setup.py -q build_ext --inplace 2>&1 | grep -v -E '^(running|copying)' || true
	@touch $@

install: $(BIN)/.installed ## create .venv and install pgdurable with test extras

native: $(BIN)/.installed ## (re)build the Cython scheduler in place
	PGDURABLE_NATIVE=required $(BIN)/python setup.py -q build_ext --inplace

demo: $(BIN)/.installed ## run pgdurable serve + a sample workflow on an embedded PostgreSQL 18
	$(BIN)/python -m pgdurable demo $(if $(DSN),--dsn '$(DSN)')

serve: $(BIN)/.installed ## run the long-lived service (embedded PostgreSQL unless DSN=... is given)
	$(BIN)/python -m pgdurable serve $(if $(DSN),--dsn '$(DSN)')

ui: $(BIN)/.installed ## the web dashboard on http://127.0.0.1:8080 (DSN=... of the role to show; default: the demo's tour role)
	$(BIN)/python -m pgdurable ui $(if $(DSN),--dsn '$(DSN)') $(UI_ARGS)

browser: ## Debian's chromium + chromedriver for tests/ui (installed when missing; needs root)
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null \
	  || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }

# Acceptance tests that mostly wait (a schedule firing each real minute, FOREACH over ten
# thousand rows, a long loop): run apart, beside the other acceptance tests, so that the
# suite's longest run is not their sum (the 20-minute CI budget). Not the rolling upgrades:
# beside verify's fault runs, the box was too busy for the migration to find its locks.
ACCEPT_APART = tests/acceptance/test_schedules.py tests/acceptance/test_foreach.py \
	tests/acceptance/test_limits.py

test: $(BIN)/.installed browser ## run the whole suite (embedded PG 18 + local PG 15 when reachable), both schedulers
	@# Four runs side by side: most of a test's time is spent waiting on serve and PostgreSQL,
	@# so they take little more than the longest alone. The embedded server's acceptance tests,
	@# in two runs (ACCEPT_APART; each run starts an embedded PostgreSQL of its own), the local
	@# server's run (only the tests that take a server: the others run once, on the embedded
	@# one) and, in the foreground, the embedded server's other tests, the pure-Python scheduler twin and the
	@# benchmarks' smoke run. Every run writes a .test-*.log; the background ones are shown
	@# when all have ended, and the last lines say which run failed and on what (a CI page
	@# that keeps only the tail still names the failure).
	@PGDURABLE_IMPL=cython $(BIN)/python -m pytest -q -p no:cacheprovider --no-embedded \
	    --server-tests-only tests/sql tests/migration tests/integration tests/acceptance tests/ui $(PYTEST_ARGS) \
	    > .test-local.log 2>&1 & local=$$!; \
	  PGDURABLE_IMPL=cython $(BIN)/python -m pytest -q -p no:cacheprovider --no-local \
	    tests/acceptance $(foreach f,$(ACCEPT_APART),--ignore=$(f)) $(PYTEST_ARGS) \
	    > .test-acceptance.log 2>&1 & accept=$$!; \
	  PGDURABLE_IMPL=cython $(BIN)/python -m pytest -q -p no:cacheprovider --no-local \
	    $(ACCEPT_APART) $(PYTEST_ARGS) > .test-acceptance-apart.log 2>&1 & apart=$$!; \
	  PGDURABLE_IMPL=cython $(BIN)/python -m pytest --no-local --ignore=tests/acceptance $(PYTEST_ARGS) 2>&1 \
	    | tee .test-embedded.log; embedded=$${PIPESTATUS[0]}; \
	  PGDURABLE_IMPL=python $(BIN)/python -m pytest -q tests/unit tests/native $(PYTEST_ARGS) 2>&1 \
	    | tee .test-twin.log; twin=$${PIPESTATUS[0]}; \
	  $(BIN)/pip install -q -e '.[bench]' >/dev/null 2>&1 \
	    || echo "pgdurable: the bench extra did not install; peer smoke tests will skip"; \
	  $(BIN)/python -m pytest -q -m benchmark --benchmark-disable bench $(PYTEST_ARGS) 2>&1 \
	    | tee .test-bench.log; bench=$${PIPESTATUS[0]}; \
	  wait $$accept; arc=$$?; wait $$apart; apc=$$?; wait $$local; rc=$$?; \
	  echo "== the acceptance tests on the embedded PostgreSQL 18:"; tail -n 60 .test-acceptance.log; \
	  echo "== the acceptance tests run apart, on an embedded PostgreSQL 18 of their own:"; \
	  tail -n 30 .test-acceptance-apart.log; \
	  echo "== the same tests on the local PostgreSQL (127.0.0.1:5432):"; tail -n 60 .test-local.log; \
	  echo "== summary of the six runs:"; \
	  for run in "embedded PG 18, all but acceptance:$$embedded:.test-embedded.log" \
	             "Python scheduler twin:$$twin:.test-twin.log" "bench smoke:$$bench:.test-bench.log" \
	             "embedded PG 18, acceptance:$$arc:.test-acceptance.log" \
	             "embedded PG 18, acceptance run apart:$$apc:.test-acceptance-apart.log" \
	             "local PostgreSQL, server tests:$$rc:.test-local.log"; do \
	    IFS=: read -r name code log <<< "$$run"; \
	    if [ "$$code" -eq 0 ]; then echo "  ok      $$name: $$(tail -n 1 $$log)"; \
	    else echo "  FAILED  $$name (exit $$code, $$log): $$(tail -n 1 $$log)"; \
	         grep -E '^(FAILED|ERROR) ' $$log | head -n 15 | sed 's/^/          /'; fi; \
	  done; \
	  test $$embedded -eq 0 && test $$twin -eq 0 && test $$bench -eq 0 && test $$arc -eq 0 \
	    && test $$apc -eq 0 && test $$rc -eq 0
	@# (the peer drivers, DBOS and Procrastinate, are benchmarks too: the bench extra is
	@# installed so that their smoke tests run rather than skip, saying so where it cannot)

test-unit: $(BIN)/.installed ## fast loop: the unit tests and the scheduler twins (no database)
	$(BIN)/python -m pytest -q tests/unit tests/native $(PYTEST_ARGS)

test-sql: $(BIN)/.installed ## the df API in SQL and the schema's migrations (no serve)
	$(BIN)/python -m pytest -q tests/sql tests/migration $(PYTEST_ARGS)

test-integration: $(BIN)/.installed ## the worker's parts in-process against a real database (no serve)
	$(BIN)/python -m pytest -q tests/integration $(PYTEST_ARGS)

test-fast: $(BIN)/.installed browser ## the whole suite but the slow tests (crash, fault soak, real-minute schedules)
	$(BIN)/python -m pytest -q -m 'not slow and not benchmark' $(PYTEST_ARGS)

test-python: $(BIN)/.installed ## the suite with the pure-Python scheduler
	PGDURABLE_IMPL=python $(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(BIN)/.installed ## W1-W3 side by side with the raw floor, DBOS and Procrastinate (BENCH_ARGS=...)
	@$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python -m bench --peers dbos,procrastinate $(BENCH_ARGS)

bench-scale: $(BIN)/.installed ## the scale checks: 1M finished instances, two serves, memory at 10k in flight (BENCH_ARGS="--checks graph,loop,flood" for the others)
	@$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python -m bench.scale $(BENCH_ARGS)

$(BIN)/.lint-installed: $(BIN)/.installed pyproject.toml
	@$(BIN)/pip install -q -e '.[dev]'
	@touch $@

lint: $(BIN)/.lint-installed ## ruff check + ruff format --check, mypy strict on the package, cython-lint
	$(BIN)/ruff check pgdurable tests bench native
	$(BIN)/ruff format --check pgdurable tests bench native
	$(BIN)/mypy pgdurable
	PATH=$(BIN):$$PATH $(BIN)/cython-lint --max-line-length 100 native/_sched_c.pyx

schema-freeze: $(BIN)/.installed ## release step: record the sha256 of the current SCHEMA_VERSION's migration in pgdurable/sql/released.sha256 (refuses to change a released one)
	$(BIN)/python -m tests.migration.released freeze

embedded-stop: $(BIN)/.installed ## stop the embedded PostgreSQL that make demo / serve left running (and the demo's dashboard)
	@$(BIN)/python -c 'from pgdurable.ui.launch import stop_detached; from pgdurable.embedded import default_data_dir; stop_detached(default_data_dir().parent) and print("stopped the demo'"'"'s dashboard")'
	@$(BIN)/python -c 'from pgdurable.embedded import EmbeddedPostgres, default_data_dir; e = EmbeddedPostgres(default_data_dir()); up = e.data_dir.exists() and e.is_running(); e.stop(); print(f"stopped the embedded PostgreSQL in {e.data_dir}" if up else f"no embedded PostgreSQL was running in {e.data_dir}")'

clean: ## stop the embedded PostgreSQL, remove the venv, build products and its data
	@test -x $(BIN)/python && $(BIN)/python -c 'from pgdurable.ui.launch import stop_detached; from pgdurable.embedded import default_data_dir; stop_detached(default_data_dir().parent)' || true
	@test -x $(BIN)/python && $(BIN)/python -c 'from pgdurable.embedded import EmbeddedPostgres, default_data_dir; EmbeddedPostgres(default_data_dir()).stop()' || true
	rm -rf $(VENV) build *.egg-info native/*.c pgdurable/graph/*.so .pgdurable

.PHONY: help install native demo serve ui browser test test-unit test-sql test-integration test-fast test-python bench bench-scale lint schema-freeze embedded-stop clean
