# Every target sets itself up from nothing: the virtualenv is created and the project installed
# on first use (and again whenever pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export RUNTIME__DLTHUB_TELEMETRY ?= false
export DAGSTER_DISABLE_TELEMETRY ?= true

.PHONY: install test demo dev bench clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.cfg
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

## make test: the whole suite (what CI runs)
test: $(STAMP)
	$(BIN)/python -m pytest

## make demo: simulator on loopback -> dagster asset materialize of all five assets -> row counts
demo: $(STAMP)
	$(BIN)/python scripts/demo.py

## make dev: simulator + dagster dev (webserver and daemon) with the five assets ready
dev: $(STAMP)
	$(BIN)/python scripts/dev.py

clean:
	rm -rf $(VENV) .pytest_cache .dagster_home .demo crm_warehouse.duckdb
