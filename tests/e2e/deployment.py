"""A real Airflow 3 deployment on loopback for the end-to-end suite (``make e2e``).

Starts, in a fresh temporary ``AIRFLOW_HOME`` on SQLite: the SpeedPix emulator, then ``airflow db migrate``
and the four Airflow components as separate processes (``api-server``, ``scheduler``, ``dag-processor``,
``triggerer``; LocalExecutor with 4 slots), so one of them (the triggerer) can be SIGKILLed and restarted
alone. Every process runs in its own session (process group) and is stopped with ``os.killpg``: SIGTERM,
then SIGKILL after a grace period, because LocalExecutor workers and serve-logs outlive their parent.

Its DAGs folder holds ``dags_examples/``, the hand-written e2e DAGs of ``tests/e2e/dags/``, and
``speedpix_e2e_catalog_blocking.py``, which ``blocking_catalog_source`` derives from the catalog example (the
same DAG, waiting in the worker slot) so that the B2 comparison measures the example itself.

Used as a library by ``tests/e2e`` (``Deployment``), or by hand::

    .venv/bin/python -m tests.e2e.deployment            # start, print the URLs, stop on Ctrl-C
"""

from __future__ import annotations

import ast
import base64
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
EXAMPLE_DAGS = ROOT / "dags_examples"
E2E_DAGS = ROOT / "tests" / "e2e" / "dags"
CATALOG_EXAMPLE = EXAMPLE_DAGS / "speedpix_catalog_regeneration.py"
BLOCKING_CATALOG_DAG_ID = "speedpix_e2e_catalog_blocking"
COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
TERMINAL_RUN_STATES = ("success", "failed")


class DeploymentError(RuntimeError):
    """Something in the deployment did not come up or finish in time (message carries the log tails)."""


#: ports handed out by free_port in this process: a probe socket is closed before the next probe, so the
#: kernel may offer the same port twice (two components of one deployment would then fight over it)
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback port nothing listens on now and that this process has not handed out before."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def run_to_end(
    argv: list[str], *, timeout: float, log: Path | None = None, **kwargs: Any
) -> subprocess.CompletedProcess:
    """Run a command to its end and return it whatever its exit code (the caller reports a failure): its
    output captured as text, or written to ``log`` (stdout and stderr together). ``kwargs`` go to
    ``subprocess.run`` (``env``, ``cwd``, ``user``...)."""
    if log is None:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)
    with log.open("wb") as handle:
        return subprocess.run(
            argv, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout, check=False, **kwargs
        )


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as err:
        return f"<{path}: {err}>"
    return "\n".join(text[-lines:])


class Deployment:
    """One emulator plus one Airflow deployment; ``start()`` / ``stop()``, or use as a context manager."""

    #: whose log tails ``log_tails()`` shows by default (every ``logs/<name>*.log``)
    log_names: tuple[str, ...] = (*COMPONENTS, "emulator")

    def __init__(
        self,
        *,
        parallelism: int = 4,
        emulator_duration: float = 20.0,
        home: Path | None = None,
        extra_env: dict[str, str] | None = None,
        keep_home: bool = False,
    ) -> None:
        self.home = Path(home or tempfile.mkdtemp(prefix="speedpix-e2e-"))
        self.keep_home = keep_home
        self.parallelism = parallelism
        self.emulator_duration = emulator_duration
        self.logs = self.home / "component-logs"
        self.dags = self.home / "dags"
        self.db_path = self.home / "airflow.db"
        self.catalog_dir = self.home / "catalog"
        self.api_port = free_port()
        self.emulator_port = free_port()
        self.emulator_url = f"http://127.0.0.1:{self.emulator_port}"
        self.api_url = f"http://127.0.0.1:{self.api_port}"
        self.app_key = "e2e-key"
        self.app_secret = secrets.token_urlsafe(16)
        self.extra_env = extra_env or {}
        self.procs: dict[str, subprocess.Popen] = {}
        self._log_handles: list[Any] = []
        self._triggerer_generation = 0
        self.env = self._build_env()

    # ------------------------------------------------------------------ setup
    def _build_env(self) -> dict[str, str]:
        from cryptography.fernet import Fernet

        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("AIRFLOW", "SPEEDPIX_")) and k not in ("PYTEST_CURRENT_TEST",)
        }
        env.update(
            {
                "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                "AIRFLOW_HOME": str(self.home),
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{self.db_path}",
                "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
                "AIRFLOW__CORE__PARALLELISM": str(self.parallelism),
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.api_url}/execution/",
                "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
                # Unpaused on first parse, and no timetable runs: only the runs the suite triggers exist.
                "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
                "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
                "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": "256",
                "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode(),
                "AIRFLOW__API_AUTH__JWT_SECRET": base64.urlsafe_b64encode(os.urandom(32)).decode(),
                "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(16),
                "AIRFLOW__API__HOST": "127.0.0.1",
                "AIRFLOW__API__PORT": str(self.api_port),
                "AIRFLOW__API__BASE_URL": self.api_url,
                "AIRFLOW__API__WORKERS": "1",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
                "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
                "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
                "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
                "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "60",
                "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
                "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_STORAGE_PATH": str(self.home / "bundles"),
                "AIRFLOW__SCHEDULER__TRIGGERER_HEALTH_CHECK_THRESHOLD": "10",
                "AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD": "10",
                "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "30",
                "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
                "AIRFLOW_CONN_SPEEDPIX_DEFAULT": json.dumps(
                    {
                        "conn_type": "speedpix",
                        "host": self.emulator_url,
                        "login": self.app_key,
                        "password": self.app_secret,
                        "extra": {"retry_delay": 0.2, "retry_max_delay": 2},
                    }
                ),
                "SPEEDPIX_CATALOG_URI": self.catalog_dir.as_uri(),
            }
        )
        env.update(self.extra_env)
        return env

    def _prepare_dirs(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        self.catalog_dir.mkdir(parents=True, exist_ok=True)
        shutil.copytree(EXAMPLE_DAGS, self.dags, ignore=shutil.ignore_patterns("__pycache__"))
        for dag_file in sorted(E2E_DAGS.glob("*.py")):
            shutil.copy2(dag_file, self.dags / dag_file.name)
        blocking = blocking_catalog_source(CATALOG_EXAMPLE.read_text(encoding="utf-8"))
        (self.dags / f"{BLOCKING_CATALOG_DAG_ID}.py").write_text(blocking, encoding="utf-8")

    def _popen(self, name: str, argv: list[str], **kwargs: Any) -> subprocess.Popen:
        """Start ``argv`` in its own session (process group), its output appended to ``logs/<name>.log``;
        ``kwargs`` go to ``subprocess.Popen`` (``env``, ``cwd``, ``user``...)."""
        log = (self.logs / f"{name}.log").open("ab")
        self._log_handles.append(log)
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **kwargs,
        )

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        proc = self._popen(name, argv, env=env or self.env, cwd=self.home)
        self.procs[name] = proc
        return proc

    def _migrate(self, deadline: float, env: dict[str, str] | None = None) -> None:
        """``airflow db migrate`` (output in ``logs/db-migrate.log``) within what is left until ``deadline``."""
        migrate = run_to_end(
            [str(BIN / "airflow"), "db", "migrate"],
            env=env or self.env,
            cwd=self.home,
            log=self.logs / "db-migrate.log",
            timeout=max(deadline - time.monotonic(), 1),
        )
        if migrate.returncode != 0:
            raise DeploymentError(f"airflow db migrate failed:\n{tail(self.logs / 'db-migrate.log')}")

    def start(self, timeout: float = 240.0) -> Deployment:
        deadline = time.monotonic() + timeout
        try:
            self._prepare_dirs()
            emulator_env = {**self.env, "SPEEDPIX_APP_SECRET": self.app_secret}
            self._spawn(
                "emulator",
                [
                    str(BIN / "speedpix-emulator"),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.emulator_port),
                    "--app-key",
                    self.app_key,
                    "--duration",
                    str(self.emulator_duration),
                ],
                env=emulator_env,
            )
            self._migrate(deadline)
            self._wait(lambda: self._emulator_up(), deadline, "the emulator to listen", ["emulator"])
            self._spawn("api-server", [str(BIN / "airflow"), "api-server", "--port", str(self.api_port)])
            self._spawn("scheduler", [str(BIN / "airflow"), "scheduler"])
            self._spawn("dag-processor", [str(BIN / "airflow"), "dag-processor"])
            self.start_triggerer()
            self.wait_healthy(deadline - time.monotonic())
        except BaseException:
            self.stop()
            raise
        return self

    # ------------------------------------------------------------------ health
    def _emulator_up(self) -> bool:
        try:
            self.emulator_stats()
            return True
        except OSError:
            return False

    def health(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.api_url}/api/v2/monitor/health", timeout=5) as response:
            return json.load(response)

    def _healthy(self) -> bool:
        try:
            health = self.health()
        except (OSError, ValueError):
            return False
        return all(
            (health.get(part) or {}).get("status") == "healthy"
            for part in ("metadatabase", "scheduler", "triggerer", "dag_processor")
        )

    def wait_healthy(self, timeout: float = 180.0) -> None:
        self._wait(self._healthy, time.monotonic() + timeout, "every component to report healthy", COMPONENTS)

    def _check_alive(self, names: Iterable[str]) -> None:
        for name in names:
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is not None:
                raise DeploymentError(f"{name} exited with code {proc.returncode}\n{self.log_tails([name])}")

    def check_alive(self) -> None:
        """Raise :class:`DeploymentError` (with its log tail) if an Airflow component has exited."""
        self._check_alive(COMPONENTS)

    def _wait(
        self, ready: Callable[[], bool], deadline: float, what: str, components: Iterable[str], pause=0.5
    ) -> None:
        components = list(components)
        while True:
            self._check_alive(components)
            if ready():
                return
            if time.monotonic() > deadline:
                raise DeploymentError(f"Timed out waiting for {what}\n{self.log_tails(components)}")
            time.sleep(pause)

    def log_tails(self, names: Iterable[str] | None = None, lines: int = 30) -> str:
        names = list(names or self.log_names)
        parts = []
        for name in names:
            for path in sorted(self.logs.glob(f"{name}*.log")):
                parts.append(f"----- {path.name} (last {lines} lines) -----\n{tail(path, lines)}")
        return "\n".join(parts)

    # ------------------------------------------------------------------ metadata DB (read-only)
    def query(self, sql: str, params: Iterable[Any] = ()) -> list[tuple]:
        for attempt in range(10):
            try:
                with contextlib.closing(
                    sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10)
                ) as db:
                    return db.execute(sql, tuple(params)).fetchall()
            except sqlite3.OperationalError as err:
                if "locked" not in str(err) or attempt == 9:
                    raise
                time.sleep(0.2)
        return []

    def wait_for_dags(self, dag_ids: Iterable[str], timeout: float = 180.0) -> None:
        dag_ids = list(dag_ids)

        def parsed() -> bool:
            marks = ",".join("?" * len(dag_ids))
            try:
                rows = self.query(
                    f"SELECT d.dag_id FROM dag d JOIN serialized_dag s ON s.dag_id = d.dag_id "
                    f"WHERE d.dag_id IN ({marks}) AND d.is_paused = 0",
                    dag_ids,
                )
            except sqlite3.OperationalError:
                return False
            return {row[0] for row in rows} >= set(dag_ids)

        self._wait(
            parsed, time.monotonic() + timeout, f"DAGs {dag_ids} parsed and unpaused", ["dag-processor"], 1
        )

    def trigger(self, dag_id: str, conf: dict[str, Any] | None = None, run_id: str | None = None) -> str:
        run_id = run_id or f"e2e__{dag_id}__{time.strftime('%H%M%S')}_{secrets.token_hex(2)}"
        result = run_to_end(
            [
                str(BIN / "airflow"),
                "dags",
                "trigger",
                dag_id,
                "--run-id",
                run_id,
                "--conf",
                json.dumps(conf or {}),
            ],
            env=self.env,
            cwd=self.home,
            timeout=120,
        )
        if result.returncode != 0:
            raise DeploymentError(f"airflow dags trigger {dag_id} failed:\n{result.stdout}\n{result.stderr}")
        return run_id

    def run_state(self, dag_id: str, run_id: str) -> str | None:
        rows = self.query("SELECT state FROM dag_run WHERE dag_id = ? AND run_id = ?", (dag_id, run_id))
        return rows[0][0] if rows else None

    def task_states(self, dag_id: str, run_id: str, task_id: str | None = None) -> dict[str, int]:
        """``{state: count}`` of the run's task instances (``none`` for not yet scheduled)."""
        sql = "SELECT coalesce(state, 'none'), count(*) FROM task_instance WHERE dag_id = ? AND run_id = ?"
        params: list[Any] = [dag_id, run_id]
        if task_id is not None:
            sql += " AND task_id = ?"
            params.append(task_id)
        return dict(self.query(sql + " GROUP BY 1", params))

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        rows = self.query(
            "SELECT id, task_id, map_index, state, try_number FROM task_instance WHERE dag_id = ? AND run_id = ?",
            (dag_id, run_id),
        )
        return [
            dict(zip(("id", "task_id", "map_index", "state", "try_number"), row, strict=True)) for row in rows
        ]

    def running_tis_total(self) -> int:
        return self.query("SELECT count(*) FROM task_instance WHERE state = 'running'")[0][0]

    def wait_for_run(
        self,
        dag_id: str,
        run_id: str,
        timeout: float,
        on_sample: Callable[[], None] | None = None,
        interval: float = 0.5,
    ) -> str:
        """Wait until the run is ``success``/``failed``; call ``on_sample`` every ``interval`` s meanwhile."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            state = self.run_state(dag_id, run_id)
            if state in TERMINAL_RUN_STATES:
                return state
            if on_sample is not None:
                on_sample()
            if time.monotonic() > deadline:
                raise DeploymentError(
                    f"Run {dag_id}/{run_id} still {state!r} after {timeout:.0f}s; task states: "
                    f"{self.task_states(dag_id, run_id)}\n{self.log_tails()}"
                )
            time.sleep(interval)

    # ------------------------------------------------------------------ emulator
    def _emulator(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"{self.emulator_url}{path}",
            data=data,
            method="GET" if body is None else "POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)

    def emulator_stats(self) -> dict[str, Any]:
        return self._emulator("/_emulator/stats")

    def emulator_reset(self) -> None:
        self._emulator("/_emulator/reset", {})

    def emulator_config(self, **settings: Any) -> dict[str, Any]:
        return self._emulator("/_emulator/config", settings)

    # ------------------------------------------------------------------ triggerer
    def start_triggerer(self) -> subprocess.Popen:
        self._triggerer_generation += 1
        name = "triggerer" if self._triggerer_generation == 1 else f"triggerer-{self._triggerer_generation}"
        proc = self._spawn(name, [str(BIN / "airflow"), "triggerer"])
        self.procs["triggerer"] = proc
        return proc

    def kill_triggerer(self, sig: int = signal.SIGKILL, timeout: float = 15.0) -> None:
        """Signal the triggerer's whole process group (its trigger-runner child too) and reap it."""
        proc = self.procs["triggerer"]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        proc.wait(timeout=timeout)
        del self.procs["triggerer"]
        self._dead = getattr(self, "_dead", [])
        self._dead.append(proc)

    # ------------------------------------------------------------------ worker processes
    def task_process(self, ti_id: str) -> int | None:
        """PID of the process running task instance ``ti_id`` (the task runner: ``airflow worker -- <id>``)."""
        import psutil

        wanted = f"airflow worker -- {uuid.UUID(str(ti_id))}"
        scheduler = self.procs.get("scheduler")
        if scheduler is None:
            return None
        try:
            candidates = psutil.Process(scheduler.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return None
        for child in candidates:
            with contextlib.suppress(psutil.Error):
                if " ".join(child.cmdline()).strip().startswith(wanted):
                    return child.pid
        return None

    def executor_workers(self) -> tuple[int, int]:
        """``(busy, total)`` LocalExecutor worker processes: a busy one is supervising a task (holds a slot)."""
        import psutil

        scheduler = self.procs.get("scheduler")
        busy = total = 0
        if scheduler is None:
            return busy, total
        try:
            children = psutil.Process(scheduler.pid).children()
        except psutil.NoSuchProcess:
            return busy, total
        for child in children:
            with contextlib.suppress(psutil.Error):
                title = " ".join(child.cmdline()).strip()
                if title.startswith("airflow worker -- LocalExecutor"):
                    total += 1
                    busy += not title.endswith("<idle>")
        return busy, total

    # ------------------------------------------------------------------ stop
    def stop(self, grace: float = 8.0) -> None:
        """SIGTERM every process group this deployment started, SIGKILL what is left after ``grace`` s."""
        procs = [*self.procs.values(), *getattr(self, "_dead", [])]
        for proc in procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        # Children (LocalExecutor workers, serve-logs, trigger runner) can outlive their parent: the group
        # id is the leader's pid, which stays valid for killpg as long as any member lives.
        while time.monotonic() < deadline and any(_group_alive(p.pid) for p in procs):
            time.sleep(0.2)
        for proc in procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        self.procs.clear()
        self._dead = []
        for handle in self._log_handles:
            handle.close()
        self._log_handles.clear()
        if not self.keep_home:
            shutil.rmtree(self.home, ignore_errors=True)

    def __enter__(self) -> Deployment:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def blocking_catalog_source(example: str) -> str:
    """The catalog example's source, changed only where B2 needs it: another ``dag_id``, no schedule,
    ``deferrable=False`` with a 1 s poll on ``SpeedPixRunOperator.partial(...)``, and no ``outlets`` (no
    Asset event). Each change must apply exactly once, so an example that changed shape fails here loudly."""
    tree = ast.parse(example)
    edits = {"dag": 0, "partial": 0, "outlets": 0}

    def set_keywords(call: ast.Call, values: dict[str, Any]) -> None:
        missing = dict(values)
        for kw in call.keywords:
            if kw.arg in missing:
                kw.value = ast.Constant(missing.pop(kw.arg))
        call.keywords += [ast.keyword(arg=k, value=ast.Constant(v)) for k, v in missing.items()]

    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id == "DAG":
            set_keywords(node, {"dag_id": BLOCKING_CATALOG_DAG_ID, "schedule": None})
            edits["dag"] += 1
        elif (
            isinstance(func, ast.Attribute)
            and func.attr == "partial"
            and isinstance(func.value, ast.Name)
            and func.value.id == "SpeedPixRunOperator"
        ):
            set_keywords(node, {"deferrable": False, "poll_interval": 1.0})
            edits["partial"] += 1
        elif (
            isinstance(func, ast.Name)
            and func.id == "task"
            and any(kw.arg == "outlets" for kw in node.keywords)
        ):
            node.keywords = [kw for kw in node.keywords if kw.arg != "outlets"]
            edits["outlets"] += 1
    if edits != {"dag": 1, "partial": 1, "outlets": 1}:
        raise DeploymentError(
            f"{CATALOG_EXAMPLE.name} no longer has the shape the blocking variant is derived from "
            f"(one DAG(...), one SpeedPixRunOperator.partial(...), one @task(outlets=...)): {edits}"
        )
    docstring = (
        f"Generated by tests/e2e/deployment.py from dags_examples/{CATALOG_EXAMPLE.name} for B2: the same "
        "DAG with\ndeferrable=False, poll_interval=1.0, no schedule and no Asset outlet.\n\n"
    )
    first = tree.body[0]
    if (
        isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and isinstance(first.value.value, str)
    ):
        first.value.value = docstring + first.value.value
    else:
        tree.body.insert(0, ast.Expr(ast.Constant(docstring)))
    return ast.unparse(ast.fix_missing_locations(tree)) + "\n"


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def main() -> int:
    deployment = Deployment(keep_home=True)
    print(f"Starting in {deployment.home} ...", flush=True)
    try:
        deployment.start()
        print(f"API server: {deployment.api_url}\nEmulator:   {deployment.emulator_url}", flush=True)
        print(f"Logs:       {deployment.logs}\nPress Ctrl-C to stop.", flush=True)
        while True:
            time.sleep(1)
            deployment.check_alive()
    except KeyboardInterrupt:
        return 0
    finally:
        deployment.stop()


if __name__ == "__main__":
    sys.exit(main())
