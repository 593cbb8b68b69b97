"""e2e fixtures: one real Airflow deployment (tests/e2e/deployment.py) shared by the module's tests.

The e2e tests are skipped unless selected with ``-m e2e`` (``make e2e``) or ``SPEEDPIX_E2E=1``, so the
default ``make test`` never starts a deployment. Set ``SPEEDPIX_E2E_KEEP=1`` to keep the deployment's
temporary AIRFLOW_HOME (component logs, task logs, metadata DB) for inspection.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.e2e.deployment import BLOCKING_CATALOG_DAG_ID, Deployment

RESULTS = pytest.StashKey[dict]()


def e2e_selected(config: pytest.Config) -> bool:
    return os.environ.get("SPEEDPIX_E2E") == "1" or "e2e" in (config.getoption("markexpr") or "")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if e2e_selected(config):
        return
    skip = pytest.mark.skip(
        reason="real-deployment test: run `make e2e` (pytest -m e2e) or set SPEEDPIX_E2E=1"
    )
    for item in items:
        if "e2e" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def e2e_results(request: pytest.FixtureRequest) -> dict:
    """Numbers measured by the e2e tests, printed in the terminal summary."""
    return request.config.stash.setdefault(RESULTS, {})


@pytest.fixture(scope="module")
def deployment():
    keep = os.environ.get("SPEEDPIX_E2E_KEEP") == "1"
    dep = Deployment(parallelism=4, emulator_duration=20.0, keep_home=keep)
    try:
        dep.start(timeout=300)
        dep.wait_for_dags(
            ["speedpix_catalog_regeneration", "speedpix_e2e_blocking_retry", BLOCKING_CATALOG_DAG_ID],
            timeout=180,
        )
        yield dep
    finally:
        dep.stop()
        if keep:
            print(f"\ne2e deployment kept at {dep.home}")


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    results = config.stash.get(RESULTS, None)
    if results:
        terminalreporter.section("SpeedPix e2e measurements")
        terminalreporter.write_line(json.dumps(results, indent=2, sort_keys=True))
