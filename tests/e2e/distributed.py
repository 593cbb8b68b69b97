"""A distributed Airflow 3 deployment on loopback for ``make e2e-distributed`` (issue 14).

What a platform team runs once one machine is not enough, every part a separate process started and stopped
by PID (its own session/process group):

* **PostgreSQL** (Debian's package) as the metadata database and Celery result backend: ``initdb`` into a
  temporary directory owned by the ``postgres`` user, the postmaster run as that user on a free loopback
  port;
* **Redis** (``redis-server``) as the Celery broker, in a temporary directory on a free loopback port;
* **moto**'s standalone server as S3 on loopback (``apache-airflow-providers-amazon`` + ``s3fs`` reach it
  through the ``aws_moto`` connection, whose ``endpoint_url`` points at it);
* the SpeedPix emulator, wrapped so that it records every request signature, pre-signed upload token and
  output-URL signature it computes into a file outside every scanned place (the secrets scan's needles);
* Airflow with ``CeleryExecutor``: scheduler, dag-processor, api-server, two triggerers and two Celery
  workers (concurrency 2 each). Each has its own ``AIRFLOW_HOME`` (config, logs) and log-server port, as on
  separate hosts; they share only the database, the broker, the object store and the DAGs folder.

``DistributedDeployment`` subclasses :class:`tests.e2e.deployment.Deployment` (the emulator helpers,
``trigger``, ``wait_for_run``, ``task_states``...) and replaces what differs: the environment, the
components, PostgreSQL queries instead of SQLite, and stopping the infrastructure after Airflow.

By hand (after ``bash scripts/e2e_distributed_setup.sh``)::

    .venv-dist/bin/python -m tests.e2e.distributed            # start, print the URLs, stop on Ctrl-C
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tests.e2e.deployment import (
    BIN,
    ROOT,
    Deployment,
    DeploymentError,
    _group_alive,
    free_port,
    run_to_end,
    tail,
)

AIRFLOW_COMPONENTS = (
    "api-server",
    "scheduler",
    "dag-processor",
    "triggerer-1",
    "triggerer-2",
    "worker-1",
    "worker-2",
)
INFRA = ("postgres", "redis", "moto")
TRIGGERERS = ("triggerer-1", "triggerer-2")
WORKERS = ("worker-1", "worker-2")
WORKER_CONCURRENCY = 2
#: ``[triggerer] triggerer_health_check_threshold`` (the setting ``Trigger.assign_unassigned`` reads in
#: 3.3.2 to decide that a triggerer is dead and its triggers are free; the default is 30 s). Also set as
#: ``[scheduler] triggerer_health_check_threshold`` for older configs. Heartbeats come every 5 s
#: (``[triggerer] job_heartbeat_sec``): 15 s tolerates two late heartbeats on a loaded 2-core machine.
TRIGGERER_HEALTH_CHECK_THRESHOLD = 15
BUCKET = "speedpix-e2e"
AWS_CONN_ID = "aws_moto"
AWS_ACCESS_KEY = "AKIAE2EDISTRIBUTED00"
PG_USER = "airflow"
PG_DB = "airflow"


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if found:
        return found[-1]
    path = shutil.which(name)
    if path is None:
        raise DeploymentError(f"PostgreSQL's {name} not found: run scripts/e2e_distributed_setup.sh")
    return path


class DistributedDeployment(Deployment):
    """PostgreSQL + Redis + moto + emulator + Airflow on CeleryExecutor with 2 triggerers and 2 workers."""

    log_names = (*AIRFLOW_COMPONENTS, *INFRA, "emulator")

    def __init__(self, *, emulator_duration: float = 20.0, keep_home: bool = False) -> None:
        self.pg_port = free_port()
        self.redis_port = free_port()
        self.moto_port = free_port()
        self.moto_url = f"http://127.0.0.1:{self.moto_port}"
        self.aws_secret = "e2e-aws-SECRET-" + os.urandom(12).hex()
        # PostgreSQL must own its data directory, and the postgres user cannot enter a 0700 temporary home.
        self.pg_dir = Path(tempfile.mkdtemp(prefix="speedpix-e2e-pg-"))
        super().__init__(parallelism=16, emulator_duration=emulator_duration, keep_home=keep_home)
        self.secrets_record = self.home / "recorded-secrets.txt"  # needles: never scanned itself
        self._homes: dict[str, Path] = {}
        self._generation: dict[str, int] = {}
        self._infra: dict[str, subprocess.Popen] = {}
        self.killed: list[subprocess.Popen] = []

    # ------------------------------------------------------------------ configuration
    @property
    def pg_dsn(self) -> str:
        return f"postgresql://{PG_USER}@127.0.0.1:{self.pg_port}/{PG_DB}"

    def _build_env(self) -> dict[str, str]:
        env = super()._build_env()
        del env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
        threshold = str(TRIGGERER_HEALTH_CHECK_THRESHOLD)
        env.update(
            {
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": (
                    f"postgresql+psycopg2://{PG_USER}@127.0.0.1:{self.pg_port}/{PG_DB}"
                ),
                "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
                "AIRFLOW__CELERY__BROKER_URL": f"redis://127.0.0.1:{self.redis_port}/0",
                "AIRFLOW__CELERY__RESULT_BACKEND": (
                    f"db+postgresql+psycopg2://{PG_USER}@127.0.0.1:{self.pg_port}/{PG_DB}"
                ),
                "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(WORKER_CONCURRENCY),
                "AIRFLOW__CELERY__SYNC_PARALLELISM": "1",
                "AIRFLOW__SCHEDULER__TRIGGERER_HEALTH_CHECK_THRESHOLD": threshold,
                "AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD": threshold,
                "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "30",
                f"AIRFLOW_CONN_{AWS_CONN_ID.upper()}": json.dumps(
                    {
                        "conn_type": "aws",
                        "login": AWS_ACCESS_KEY,
                        "password": self.aws_secret,
                        "extra": {"endpoint_url": self.moto_url, "region_name": "us-east-1"},
                    }
                ),
                "SPEEDPIX_CATALOG_URI": f"s3://{AWS_CONN_ID}@{BUCKET}/catalog",
                "PYTHONPATH": str(ROOT),
            }
        )
        return env

    def component_home(self, name: str) -> Path:
        """Each component's own AIRFLOW_HOME (its airflow.cfg and its logs), as on its own host."""
        return self.home / "hosts" / name

    def _component_env(self, name: str) -> dict[str, str]:
        home = self.component_home(name)
        home.mkdir(parents=True, exist_ok=True)
        return {
            **self.env,
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_STORAGE_PATH": str(home / "bundles"),
        }

    # ------------------------------------------------------------------ infrastructure
    def _spawn_infra(self, name: str, argv: list[str], **kwargs: Any) -> subprocess.Popen:
        proc = self._infra[name] = self._popen(name, argv, **kwargs)
        return proc

    def _start_postgres(self, deadline: float) -> None:
        user = pwd.getpwnam("postgres")
        data = self.pg_dir / "data"
        os.chown(self.pg_dir, user.pw_uid, user.pw_gid)
        initdb = run_to_end(
            [_pg_bin("initdb"), "-D", str(data), "-U", PG_USER, "-A", "trust", "-E", "UTF8", "--no-sync"],
            user=user.pw_uid,
            group=user.pw_gid,
            cwd=self.pg_dir,
            timeout=120,
        )
        if initdb.returncode != 0:
            raise DeploymentError(f"initdb failed:\n{initdb.stdout}\n{initdb.stderr}")
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.pg_port),
            "unix_socket_directories": str(self.pg_dir),
            "max_connections": "300",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "shared_buffers": "256MB",
        }
        argv = [_pg_bin("postgres"), "-D", str(data)]
        for key, value in settings.items():
            argv += ["-c", f"{key}={value}"]
        self._spawn_infra("postgres", argv, user=user.pw_uid, group=user.pw_gid, cwd=self.pg_dir)

        def ready() -> bool:
            import psycopg2

            try:
                with contextlib.closing(
                    psycopg2.connect(host="127.0.0.1", port=self.pg_port, user=PG_USER, dbname="postgres")
                ) as conn:
                    conn.autocommit = True
                    with conn.cursor() as cur:
                        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (PG_DB,))
                        if cur.fetchone() is None:
                            cur.execute(f'CREATE DATABASE "{PG_DB}"')
                return True
            except psycopg2.OperationalError:
                return False

        self._wait_infra(ready, deadline, "PostgreSQL to accept connections", "postgres")

    def _start_redis(self, deadline: float) -> None:
        folder = self.home / "redis"
        folder.mkdir()
        self._spawn_infra(
            "redis",
            [
                shutil.which("redis-server") or "redis-server",
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.redis_port),
                "--dir",
                str(folder),
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
            ],
        )

        def ready() -> bool:
            import redis

            try:
                return bool(redis.Redis(host="127.0.0.1", port=self.redis_port, socket_timeout=2).ping())
            except redis.exceptions.ConnectionError:
                return False

        self._wait_infra(ready, deadline, "Redis to answer PING", "redis")

    def _start_moto(self, deadline: float) -> None:
        self._spawn_infra(
            "moto", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.moto_port)], cwd=self.home
        )

        def ready() -> bool:
            try:
                self.s3().create_bucket(Bucket=BUCKET)
                return True
            except Exception:  # connection refused until it listens (botocore wraps it variously)
                return False

        self._wait_infra(ready, deadline, "moto (S3) to create the bucket", "moto")

    def _wait_infra(self, ready, deadline: float, what: str, name: str) -> None:
        while True:
            proc = self._infra[name]
            if proc.poll() is not None:
                raise DeploymentError(
                    f"{name} exited with {proc.returncode}\n{tail(self.logs / f'{name}.log')}"
                )
            if ready():
                return
            if time.monotonic() > deadline:
                raise DeploymentError(f"Timed out waiting for {what}\n{tail(self.logs / f'{name}.log')}")
            time.sleep(0.3)

    def s3(self):
        """A boto3 S3 client on moto (the test's own view of the bucket)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.moto_url,
            aws_access_key_id=AWS_ACCESS_KEY,
            aws_secret_access_key=self.aws_secret,
            region_name="us-east-1",
        )

    def list_bucket(self, prefix: str = "") -> list[str]:
        keys: list[str] = []
        for page in self.s3().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
            keys += [item["Key"] for item in page.get("Contents", [])]
        return keys

    # ------------------------------------------------------------------ Airflow
    def start_component(self, name: str) -> subprocess.Popen:
        """(Re)start one Airflow component as its own process group; a restart gets a fresh log file."""
        self._generation[name] = self._generation.get(name, 0) + 1
        log_name = name if self._generation[name] == 1 else f"{name}.{self._generation[name]}"
        airflow = str(BIN / "airflow")
        argv = {
            "api-server": [airflow, "api-server", "--port", str(self.api_port)],
            "scheduler": [airflow, "scheduler"],
            "dag-processor": [airflow, "dag-processor"],
        }.get(name)
        if argv is None and name in TRIGGERERS:
            argv = [airflow, "triggerer", "--skip-serve-logs"]  # its log server would bind every interface
        elif argv is None and name in WORKERS:
            argv = [
                airflow,
                "celery",
                "worker",
                "--concurrency",
                str(WORKER_CONCURRENCY),
                "--celery-hostname",
                f"{name}@%h",
                "--without-gossip",
                "--without-mingle",
                "--skip-serve-logs",
            ]
        if argv is None:
            raise ValueError(name)
        proc = self._spawn(log_name, argv, env=self._component_env(name))
        del self.procs[log_name]
        self.procs[name] = proc
        return proc

    def kill_component(self, name: str, sig: int = signal.SIGKILL, timeout: float = 15.0) -> list[int]:
        """SIGKILL a component's process group and every descendant (task processes too); returns the pids."""
        import psutil

        proc = self.procs.pop(name)
        pids = [proc.pid]
        with contextlib.suppress(psutil.Error):
            pids += [child.pid for child in psutil.Process(proc.pid).children(recursive=True)]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        for pid in pids[1:]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        proc.wait(timeout=timeout)
        self.killed.append(proc)
        return pids

    def descendants(self, name: str) -> set[int]:
        import psutil

        proc = self.procs.get(name)
        if proc is None:
            return set()
        try:
            return {proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))}
        except psutil.NoSuchProcess:
            return set()

    def start(self, timeout: float = 300.0) -> DistributedDeployment:
        deadline = time.monotonic() + timeout
        try:
            self._prepare_dirs()
            self._start_postgres(deadline)
            self._start_redis(deadline)
            self._start_moto(deadline)
            self._spawn(
                "emulator",
                [
                    sys.executable,
                    "-m",
                    "tests.e2e.distributed",
                    "recording-emulator",
                    str(self.secrets_record),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.emulator_port),
                    "--app-key",
                    self.app_key,
                    "--duration",
                    str(self.emulator_duration),
                    "--access-log",
                ],
                env={**self.env, "SPEEDPIX_APP_SECRET": self.app_secret},
            )
            migrate_home = self.component_home("db-migrate")
            migrate_home.mkdir(parents=True)
            self._migrate(deadline, env={**self.env, "AIRFLOW_HOME": str(migrate_home)})
            self._wait(self._emulator_up, deadline, "the emulator to listen", ["emulator"])
            for name in AIRFLOW_COMPONENTS:
                self.start_component(name)
            self.wait_healthy(deadline - time.monotonic())
            self.wait_workers(deadline - time.monotonic())
        except BaseException:
            self.stop()
            raise
        return self

    # ------------------------------------------------------------------ health
    def _check_alive(self, names: Iterable[str]) -> None:
        names = [n for n in names if n in self.procs or n in self._infra]
        for name in names:
            proc = self.procs.get(name) or self._infra.get(name)
            if proc is not None and proc.poll() is not None:
                raise DeploymentError(f"{name} exited with code {proc.returncode}\n{self.log_tails([name])}")

    def check_alive(self) -> None:
        self._check_alive([*self.procs, *INFRA])

    def wait_healthy(self, timeout: float = 180.0) -> None:
        self._wait(
            self._healthy,
            time.monotonic() + timeout,
            "every component to report healthy",
            [*self.procs, *INFRA],
        )

    def alive_triggerer_jobs(self) -> list[int]:
        return [
            row[0]
            for row in self.query(
                "SELECT id FROM job WHERE job_type = 'TriggererJob' AND state = 'running' AND end_date IS NULL "
                "AND latest_heartbeat > now() - make_interval(secs => ?)",
                (TRIGGERER_HEALTH_CHECK_THRESHOLD,),
            )
        ]

    def celery_workers(self) -> list[str]:
        """Names of the Celery workers answering a ping on the broker."""
        from celery import Celery

        app = Celery(broker=self.env["AIRFLOW__CELERY__BROKER_URL"])
        try:
            replies = app.control.ping(timeout=2.0) or []
        except Exception:
            return []
        finally:
            app.close()
        return sorted(name for reply in replies for name in reply)

    def wait_workers(self, timeout: float = 120.0, count: int = len(WORKERS)) -> None:
        self._wait(
            lambda: (
                len(self.alive_triggerer_jobs()) >= len(TRIGGERERS) and len(self.celery_workers()) >= count
            ),
            time.monotonic() + timeout,
            f"{len(TRIGGERERS)} triggerers heartbeating and {count} Celery workers answering",
            [*self.procs],
            pause=1.0,
        )

    def task_logs(self, pattern: str) -> list[Path]:
        """Task and trigger log files matching ``pattern`` under every component's own log folder."""
        return sorted(self.home.glob(f"hosts/*/logs/{pattern}"))

    # ------------------------------------------------------------------ metadata DB (PostgreSQL)
    def query(self, sql: str, params: Iterable[Any] = ()) -> list[tuple]:
        """Read-only query; ``?`` placeholders (as the SQLite base class writes them) become ``%s``."""
        import psycopg2

        with contextlib.closing(
            psycopg2.connect(host="127.0.0.1", port=self.pg_port, user=PG_USER, dbname=PG_DB)
        ) as conn:
            conn.set_session(readonly=True, autocommit=True)
            with conn.cursor() as cur:
                cur.execute(sql.replace("?", "%s"), tuple(params))
                return [tuple(row) for row in cur.fetchall()]

    def wait_for_dags(self, dag_ids: Iterable[str], timeout: float = 180.0) -> None:
        import psycopg2

        dag_ids = list(dag_ids)

        def parsed() -> bool:
            try:
                rows = self.query(
                    "SELECT d.dag_id FROM dag d JOIN serialized_dag s ON s.dag_id = d.dag_id "
                    "WHERE d.dag_id = ANY(?) AND NOT d.is_paused",
                    (dag_ids,),
                )
            except psycopg2.Error:
                return False
            return {row[0] for row in rows} >= set(dag_ids)

        self._wait(
            parsed, time.monotonic() + timeout, f"DAGs {dag_ids} parsed and unpaused", ["dag-processor"], 1
        )

    # ------------------------------------------------------------------ stop
    def stop(self, grace: float = 8.0) -> None:
        """Airflow and the emulator first (the base class, by process group), then moto, Redis and
        PostgreSQL (fast shutdown), each by PID; the temporary directories go unless ``keep_home``."""
        self._dead = [*getattr(self, "_dead", []), *self.killed]
        keep, self.keep_home = self.keep_home, True
        try:
            super().stop(grace)
        finally:
            self.keep_home = keep
        stop_signal = {"postgres": signal.SIGINT}  # PostgreSQL's "fast" shutdown
        for name in ("moto", "redis", "postgres"):
            proc = self._infra.pop(name, None)
            if proc is None:
                continue
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, stop_signal.get(name, signal.SIGTERM))
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
            deadline = time.monotonic() + 5
            while _group_alive(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        for handle in self._log_handles:
            handle.close()
        self._log_handles.clear()
        if not self.keep_home:
            shutil.rmtree(self.home, ignore_errors=True)
            shutil.rmtree(self.pg_dir, ignore_errors=True)


# ---------------------------------------------------------------------- the recording emulator
def recording_emulator(record: str, argv: list[str]) -> int:
    """Run ``speedpix-emulator`` with its signers wrapped: every request signature the gateway computes
    (equal to the client's for every accepted request), every pre-signed upload token and every output-URL
    signature is appended to ``record``, one per line, for the secrets scan."""
    from airflow_provider_speedpix import _signing
    from airflow_provider_speedpix.emulator import __main__ as emulator_main
    from airflow_provider_speedpix.emulator import backend, storage

    handle = open(record, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - open for the process's life

    def keep(value: str) -> str:
        handle.write(value + "\n")
        return value

    real_signature = _signing.compute_signature
    real_upload = storage.Storage.sign_upload
    real_output = storage.sign_output

    def compute_signature(app_secret: str, to_sign: str) -> str:
        return keep(real_signature(app_secret, to_sign))

    _signing.compute_signature = compute_signature

    def sign_output(config, key, expires):
        return keep(real_output(config, key, expires))

    def sign_upload(self, body, headers):
        answer = real_upload(self, body, headers)
        for token in _query_values(json.dumps(answer), "Signature"):
            keep(token)
        return answer

    storage.Storage.sign_upload = sign_upload  # type: ignore[method-assign]
    storage.sign_output = sign_output
    backend.sign_output = sign_output
    return emulator_main.main(argv)


def _query_values(text: str, name: str) -> list[str]:
    import re

    return re.findall(rf"[?&]{name}=([^&\"'\s]+)", text)


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "recording-emulator":
        return recording_emulator(sys.argv[2], sys.argv[3:])
    deployment = DistributedDeployment(keep_home=True)
    print(f"Starting in {deployment.home} ...", flush=True)
    try:
        deployment.start()
        print(f"API server: {deployment.api_url}\nEmulator:   {deployment.emulator_url}", flush=True)
        print(f"S3 (moto):  {deployment.moto_url}\nPostgreSQL: {deployment.pg_dsn}", flush=True)
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
