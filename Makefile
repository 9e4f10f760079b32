# Every target sets itself up from nothing: the virtualenv is created and the project installed
# on first use (and again whenever pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export RUNTIME__DLTHUB_TELEMETRY ?= false
export DAGSTER_DISABLE_TELEMETRY ?= true

.PHONY: install test test-fast demo dev bench bench-accounts clean

install: $(STAMP)

# uv resolves and installs the same releases as pip in about a third of the time (benchmarks/
# README.md). It does not read pip's configuration (a private index, say): where it cannot install,
# pip does. INSTALLER=pip skips uv. (setuptools' caution about editable installs is about folders
# named like the package: ours is it.)
INSTALLER ?= uv
PIP_INSTALL = PYTHONWARNINGS='ignore:Editable installation' $(BIN)/python -m pip install --quiet -e '.[test]'
$(STAMP): pyproject.toml setup.cfg
	@echo "installing the project and its test tools into $(VENV) ($(INSTALLER))"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if [ "$(INSTALLER)" = uv ] && $(BIN)/python -m pip install --quiet uv; then \
		$(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python -e '.[test]' || \
		{ echo "uv could not install the project: pip does" >&2; $(PIP_INSTALL); }; \
	else $(PIP_INSTALL); fi
	@touch $(STAMP)

## make test: the whole suite (what CI runs). scripts/services.sh installs PostgreSQL, Redis and
## chromium when missing (apt-get) and starts a private PostgreSQL and Redis on loopback, while the
## project installs; they are stopped afterwards, whatever the outcome. Narrow it with e.g.
## make test PYTEST_ARGS="-k postgres". It runs on every core (pytest-xdist, a module per worker at
## a time, the longest first: conftest.py says why), with one worker more than cores: a worker
## spends about a sixth of its time waiting on the servers and processes its tests start, which the
## extra one fills (benchmarks/README.md).
## PYTEST_WORKERS=0 runs it in one process.
## The tests let Python cache bytecode even where PYTHONDONTWRITEBYTECODE is set: without the
## caches, each of the dozens of processes the suite starts compiles the project again, and pytest
## rewrites every test module again in each worker (__pycache__ is git-ignored; benchmarks/README.md).
PYTEST_WORKERS ?= auto
CACHE_BYTECODE = env -u PYTHONDONTWRITEBYTECODE
TEST_WORKERS = $(if $(filter auto,$(PYTEST_WORKERS)),$(shell echo $$(( $$(nproc 2>/dev/null || echo 1) + 1 ))),$(PYTEST_WORKERS))
XDIST = -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder
test:
	trap 'wait; bash scripts/services.sh down' EXIT; trap 'exit 130' INT TERM; \
	bash scripts/services.sh up & services=$$!; \
	$(MAKE) -s --no-print-directory install && wait $$services && \
	$(CACHE_BYTECODE) $(BIN)/python -m pytest $(XDIST) $(PYTEST_ARGS)

## make test-fast: the layer that needs no service and no root (the read, the paginator, the
## resource settings, the docs against the code, the definitions), on every core: about 35 s on 2
## busy cores. The syncs through the CLIs from other directories are left to make test.
FAST_SKIP = $(addprefix --deselect crm_assets_tests/test_definitions.py::,\
	test_the_cli_materializes_everything_from_another_directory_and_each_keeps_its_own_warehouse \
	test_dg_launch_materializes_every_asset_exactly)
test-fast: $(STAMP)
	$(CACHE_BYTECODE) $(BIN)/python -m pytest -n $(PYTEST_WORKERS) -m "not postgres and not browser" $(FAST_SKIP) \
		crm_assets_tests/test_keyset_read.py crm_assets_tests/test_paginator.py crm_assets_tests/test_catalog.py \
		crm_assets_tests/test_docs.py crm_assets_tests/test_definitions.py $(PYTEST_ARGS)

## make demo: simulator on loopback -> dg launch of all five assets -> row counts, in a few lines
##   make demo DEMO_ARGS=-v   shows the run's log too
demo: $(STAMP)
	$(BIN)/python scripts/demo.py $(DEMO_ARGS)

## make dev: simulator + dg dev (webserver and daemon) with the five assets ready; any signal that
## stops it stops all of it.   make dev DEV_ARGS="--port 3001 --home ../other_dagster_home"
dev: $(STAMP)
	$(BIN)/python scripts/dev.py $(DEV_ARGS)

## make bench: simulator -> HTTP floor, seed config, project (plain dlt and via Dagster): time, rows/s, peak RSS;
## then the many-accounts run (bench-accounts below: PostgreSQL and Redis, about 20 minutes)
##   make bench BENCH_ARGS="--latency-ms 50"   or   BENCH_ARGS="--records 1000000 --only c2,c --json bench.json"
##   make bench BENCH_ACCOUNTS=0   leaves out the many-accounts run
BENCH_ACCOUNTS ?= 1
bench: $(STAMP)
	$(BIN)/python benchmarks/bench.py $(BENCH_ARGS)
	if [ "$(BENCH_ACCOUNTS)" != 0 ]; then $(BIN)/python benchmarks/accounts.py $(ACCOUNTS_ARGS); fi

## make bench-accounts: 20 and 100 accounts of 5,000 records through the Celery run launcher on
## PostgreSQL (scripts/services.sh), one worker and two, against a trivial asset on the same launcher
##   make bench-accounts ACCOUNTS_ARGS="--accounts 20 --workers 2"
bench-accounts: $(STAMP)
	$(BIN)/python benchmarks/accounts.py $(ACCOUNTS_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .dagster_home .demo crm_warehouse.duckdb
