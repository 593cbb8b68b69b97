# Everything runs in a project-local virtualenv that these targets create on first use.
PYTHON ?= python3
AIRFLOW_VERSION ?= 3.3.2
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(AIRFLOW_VERSION)

.PHONY: venv demo test lint e2e bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "apache-airflow==$(AIRFLOW_VERSION)" -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

## Run the example DAG end to end against the bundled emulator and print the saved image's path.
demo: $(STAMP)
	$(BIN)/python scripts/demo.py

## Lint, format check, type check and the whole test suite (the e2e suite is `make e2e`).
test: lint
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .demo .pytest_cache .ruff_cache

## End-to-end suite: a real Airflow deployment (scheduler, triggerer, dag-processor, api-server) on loopback.
e2e: $(STAMP)
	$(BIN)/python -m pytest -m e2e tests/e2e -q -p no:cacheprovider

## Benchmarks B1, B3-B5 (about 25 min; `make bench BENCH_ARGS=--quick` for a 2-minute check).
bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py $(BENCH_ARGS)
