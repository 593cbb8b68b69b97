"""Test session setup: an isolated AIRFLOW_HOME on SQLite, the emulator fixtures, DAG-running helpers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import uuid
from pathlib import Path

import pytest

# Before anything imports airflow: a throwaway home, database and dags folder for this test session.
_HOME = Path(tempfile.mkdtemp(prefix="speedpix-airflow-home-"))
DAGS_FOLDER = _HOME / "dags"
DAGS_FOLDER.mkdir()
os.environ["AIRFLOW_HOME"] = str(_HOME)
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(DAGS_FOLDER)
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__UNIT_TEST_MODE"] = "False"
os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{_HOME}/airflow.db"
for _name in (
    "SPEEDPIX_APP_KEY",
    "SPEEDPIX_APP_SECRET",
    "SPEEDPIX_ENDPOINT",
    "AIRFLOW_CONN_SPEEDPIX_DEFAULT",
):
    os.environ.pop(_name, None)

ROOT = Path(__file__).resolve().parent.parent
pytest_plugins = ["tests.emulator_fixture"]


@pytest.fixture(autouse=True)
def no_defer_hold(monkeypatch):
    """dag.test() runs triggers in-process, with no scheduler and so without the race the hold works around
    (``_outcome.DEFER_HOLD_SECONDS``): deferred tasks here resume as soon as their trigger fires. The tests
    of the hold set it themselves; real deployments (tests/e2e) run with it."""
    from airflow_provider_speedpix import _outcome

    monkeypatch.setattr(_outcome, "DEFER_HOLD_SECONDS", 0.0)


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """A migrated SQLite metadata database for ``dag.test()`` (once per session)."""
    subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"],
        check=True,
        stdout=subprocess.DEVNULL,
        env=os.environ,
    )
    return _HOME


def use_speedpix_connection(
    monkeypatch, *, host: str, login: str, password: str, extra: dict, **fields: object
) -> None:
    """Set ``speedpix_default`` through ``AIRFLOW_CONN_SPEEDPIX_DEFAULT`` (the one place tests build it)."""
    conn = {
        "conn_type": "speedpix",
        "host": host,
        "login": login,
        "password": password,
        "extra": extra,
        **fields,
    }
    monkeypatch.setenv("AIRFLOW_CONN_SPEEDPIX_DEFAULT", json.dumps(conn))


#: Retry settings for tests against the emulator: short waits, few attempts.
FAST_RETRIES = {"retry_delay": 0.01, "retry_max_delay": 0.05, "retry_limit": 2, "timeout": 5}


def use_emulator_connection(monkeypatch, emulator, **extra: object) -> None:
    """Point ``speedpix_default`` at ``emulator`` with its own key and secret; ``extra`` as given."""
    use_speedpix_connection(
        monkeypatch, host=emulator.url, login=emulator.app_key, password=emulator.app_secret, extra=extra
    )


@pytest.fixture
def speedpix_conn(emulator, monkeypatch):
    """Point ``speedpix_default`` at the in-process emulator, with fast retries."""
    use_emulator_connection(monkeypatch, emulator, **FAST_RETRIES)
    return emulator


@pytest.fixture
def clocked_conn(make_emulator, speedpix_conn, monkeypatch):
    """Point ``speedpix_default`` at a private emulator on a ManualClock (task duration 1 s; time moves only
    with ``clock.advance``), with fast retries. Set after ``speedpix_conn`` (which ``run_dag`` also sets
    up), so it wins."""
    emu = make_emulator()
    use_emulator_connection(monkeypatch, emu, **FAST_RETRIES)
    return emu


#: emulated seconds that pass with each status read on the ``stepped_emulator``
STEP = 0.6


@pytest.fixture
def stepped_emulator(clocked_conn, monkeypatch):
    """``clocked_conn`` whose clock moves on ``STEP`` seconds after every status read (``get_prediction``
    of a worker's wait or a sensor's poke, ``aget_prediction`` of a trigger). A prediction is then queued at
    the first read, running at the second and, for a 1 s task, done at the third, however late the first
    read comes (``dag.test()`` start-up) and however slowly the machine runs."""
    from airflow_provider_speedpix.hooks.speedpix import SpeedPixHook

    emu = clocked_conn
    get_prediction, aget_prediction = SpeedPixHook.get_prediction, SpeedPixHook.aget_prediction

    def stepped_get(self, *args, **kwargs):
        try:
            return get_prediction(self, *args, **kwargs)
        finally:
            emu.clock.advance(STEP)

    async def stepped_aget(self, *args, **kwargs):
        try:
            return await aget_prediction(self, *args, **kwargs)
        finally:
            emu.clock.advance(STEP)

    monkeypatch.setattr(SpeedPixHook, "get_prediction", stepped_get)
    monkeypatch.setattr(SpeedPixHook, "aget_prediction", stepped_aget)
    return emu


@pytest.fixture
def run_dag(airflow_db, speedpix_conn):
    """``run_dag(body) -> DagRun``: write a DAG file into the session dags folder and ``dag.test()`` it.

    ``body`` is the DAG's code using ``dag_id`` (filled in, unique per call) and whatever it imports.
    """
    import importlib.util

    def run(body: str, *, conf: dict | None = None):
        dag_id = f"t_{uuid.uuid4().hex[:12]}"
        path = DAGS_FOLDER / f"{dag_id}.py"
        path.write_text(textwrap.dedent(body).replace("DAG_ID", dag_id))
        spec = importlib.util.spec_from_file_location(dag_id, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        try:
            return module.dag.test(run_conf=conf)
        finally:
            path.unlink()

    return run


#: Where the catalog example writes, the same for every test of the session: ``dag.test()`` of ANY example
#: parses the whole examples folder and registers the ``speedpix_catalog`` Asset with the URI it sees, and
#: an Asset may not change its URI between parses (a later run with another URI records no asset event).
CATALOG = _HOME / "catalog"


@pytest.fixture
def example_dags_folder(airflow_db, monkeypatch):
    """Copy ``dags_examples/`` into the session dags folder; yields the copy's path."""
    monkeypatch.setenv("SPEEDPIX_CATALOG_URI", f"file://{CATALOG}")
    target = DAGS_FOLDER / "examples"
    shutil.copytree(ROOT / "dags_examples", target, dirs_exist_ok=True)
    yield target
    shutil.rmtree(target, ignore_errors=True)


class FakeClock:
    """Stands in for a module's ``time`` (and its ``asyncio.sleep``): sleeping advances the clock and
    records the delay; nothing really waits. Install it only on the module under test, so the event loop
    and everything else keep the real clock."""

    def __init__(self, start: float | None = None) -> None:
        import time

        self.now = time.time() if start is None else start
        self.sleeps: list[float] = []

    def time(self) -> float:
        return self.now

    monotonic = time

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    async def asleep(self, seconds: float, result: object = None) -> None:
        self.sleep(seconds)

    def install(self, monkeypatch, module) -> FakeClock:
        from types import SimpleNamespace

        monkeypatch.setattr(module, "time", self)
        if hasattr(module, "asyncio"):
            monkeypatch.setattr(module, "asyncio", SimpleNamespace(sleep=self.asleep))
        return self
