"""Test session setup: an isolated AIRFLOW_HOME on SQLite, and the in-process emulator fixtures."""

from __future__ import annotations

import os
import tempfile

# Before anything imports airflow: a throwaway home and database for this test session.
_HOME = tempfile.mkdtemp(prefix="speedpix-airflow-home-")
os.environ.setdefault("AIRFLOW_HOME", _HOME)
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__CORE__UNIT_TEST_MODE", "False")
os.environ.setdefault("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", f"sqlite:///{_HOME}/airflow.db")
for _name in ("SPEEDPIX_APP_KEY", "SPEEDPIX_APP_SECRET", "SPEEDPIX_ENDPOINT"):
    os.environ.pop(_name, None)

pytest_plugins = ["tests.emulator_fixture"]
