# Everything runs in a project-local virtualenv that these targets create on first use.
PYTHON ?= python3
AIRFLOW_VERSION ?= 3.3.2
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(AIRFLOW_VERSION)

# The lowest versions pyproject.toml declares (tests/test_packaging.py checks that they match), installed in
# a second virtualenv by `make test-floor`. Only PyPI is reachable, so Airflow's constraints files are not:
# everything else resolves to the newest release that Airflow 3.3.0's own metadata allows.
FLOOR_PYTHON ?= python3.11
FLOOR_VENV := .venv-floor
FLOOR_BIN := $(FLOOR_VENV)/bin
FLOOR_PINS := apache-airflow==3.3.0 apache-airflow-providers-common-compat==1.23.0 \
	requests==2.32.2 aiohttp==3.10.11
FLOOR_STAMP := $(FLOOR_VENV)/.installed-floor

.PHONY: venv venv-floor demo gallery test test-floor lint e2e e2e-distributed bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "apache-airflow==$(AIRFLOW_VERSION)" -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

$(FLOOR_STAMP): pyproject.toml Makefile
	rm -rf $(FLOOR_VENV)
	$(FLOOR_PYTHON) -m venv $(FLOOR_VENV)
	echo '*' > $(FLOOR_VENV)/.gitignore
	$(FLOOR_BIN)/python -m pip install -q --upgrade pip
	$(FLOOR_BIN)/python -m pip install -q $(FLOOR_PINS) -e ".[test]"
	touch $(FLOOR_STAMP)

venv-floor: $(FLOOR_STAMP)

## Run the example DAG end to end against the bundled emulator and print the saved image's path.
demo: $(STAMP)
	$(BIN)/python scripts/demo.py

## Serve the Airflow UI on the demo's database; the gallery page `make demo` printed shows its images.
gallery: $(STAMP)
	$(BIN)/python scripts/demo.py --serve

## Lint, format check, type check and the whole test suite (the e2e suite is `make e2e`).
test: lint
	$(BIN)/python -m pytest -q

## The same tests on the lowest declared versions (Python 3.11, Airflow 3.3.0, ...), in .venv-floor.
test-floor: $(FLOOR_STAMP)
	$(FLOOR_BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) $(FLOOR_VENV) .demo .pytest_cache .ruff_cache

## End-to-end suite: a real Airflow deployment (scheduler, triggerer, dag-processor, api-server) on loopback.
e2e: $(STAMP)
	$(BIN)/python -m pytest -m e2e tests/e2e -q -p no:cacheprovider

## The same provider where users outgrow one machine: CeleryExecutor on Redis and PostgreSQL, two triggerers,
## two Celery workers, outputs in S3 (moto). Installs what is missing (Debian packages, .venv-dist) first.
e2e-distributed:
	bash scripts/e2e_distributed_setup.sh
	.venv-dist/bin/python -m pytest -m e2e_distributed tests/e2e/test_distributed.py -q -p no:cacheprovider --durations=0

## Benchmarks B1, B3-B5 (about 25 min; `make bench BENCH_ARGS=--quick` for a 2-minute check).
bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py $(BENCH_ARGS)
