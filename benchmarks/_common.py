"""Shared helpers for the benchmarks: the emulator subprocess, environment, results and tables.

Every benchmark reports ratios against a baseline measured in the same run (the machine is shared and
noisy); nothing here asserts a timing.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import json
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
VENV_BIN = Path(sys.executable).parent
APP_KEY = "bench-key"
APP_SECRET = "bench-secret"  # loopback emulator only; passed through the environment, not argv
CONN_ID = "speedpix_default"

# --------------------------------------------------------------------------------------------- env


def raise_fd_limit() -> None:
    """Per-trigger HTTP clients hold one socket each: lift the soft fd limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def setup_env(url: str, *, app_key: str = APP_KEY, app_secret: str = APP_SECRET) -> Path:
    """Point Airflow at a throwaway home and the SpeedPix connection at ``url``. Call before importing airflow."""
    home = Path(tempfile.mkdtemp(prefix="speedpix-bench-home-"))
    atexit.register(shutil.rmtree, home, True)
    os.environ["AIRFLOW_HOME"] = str(home)
    os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    os.environ["AIRFLOW__CORE__UNIT_TEST_MODE"] = "False"
    os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{home}/airflow.db"
    os.environ["AIRFLOW__LOGGING__LOGGING_LEVEL"] = os.environ.get("BENCH_LOG_LEVEL", "WARNING")
    os.environ["AIRFLOW_CONN_" + CONN_ID.upper()] = json.dumps(
        {"conn_type": "speedpix", "host": url, "login": app_key, "password": app_secret}
    )
    for name in ("SPEEDPIX_APP_KEY", "SPEEDPIX_APP_SECRET", "SPEEDPIX_ENDPOINT"):
        os.environ.pop(name, None)
    return home


# ---------------------------------------------------------------------------------------- emulator


class Emulator:
    """``speedpix-emulator`` in its own process on a free loopback port; stopped by PID on exit."""

    def __init__(
        self,
        *,
        duration: float = 3.0,
        app_key: str = APP_KEY,
        app_secret: str = APP_SECRET,
        storage_dir: str | None = None,
        log_path: str | None = None,
        seed: int | None = None,
        latency: float = 0.0,
    ) -> None:
        self.duration = duration
        self.seed = seed
        self.latency = latency
        self.app_key = app_key
        self.app_secret = app_secret
        self.storage_dir = storage_dir
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self._log: Any = None

    def start(self, timeout: float = 30.0) -> Emulator:
        raise_fd_limit()  # inherited by the child
        exe = VENV_BIN / "speedpix-emulator"
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "airflow_provider_speedpix.emulator"]
        cmd += ["--host", "127.0.0.1", "--port", "0", "--app-key", self.app_key]
        cmd += ["--duration", str(self.duration)]
        if self.storage_dir:
            cmd += ["--storage-dir", self.storage_dir]
        if self.seed is not None:
            cmd += ["--seed", str(self.seed)]
        if self.latency:
            cmd += ["--latency", str(self.latency)]
        env = {**os.environ, "SPEEDPIX_APP_SECRET": self.app_secret}
        self._log = tempfile.TemporaryFile(mode="w+") if self.log_path is None else open(self.log_path, "w+")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=self._log, env=env, text=True, start_new_session=True
        )
        atexit.register(self.stop)
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # "SpeedPix emulator listening on http://127.0.0.1:PORT ..."
        match = re.search(r"listening on (http://\S+)", line)
        if not match:
            self.stop()
            raise RuntimeError(f"emulator did not start: {line!r} {self._stderr()}")
        self.url = match.group(1)
        while True:
            try:
                self.admin("GET", "/_emulator/health", timeout=1.0)
                return self
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"emulator not ready at {self.url}: {self._stderr()}") from None
                time.sleep(0.1)

    def _stderr(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read()[-2000:]

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if proc is not None and proc.stdout is not None:
            proc.stdout.close()
        if self._log is not None:
            self._log.close()
            self._log = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def admin(self, method: str, path: str, payload: Any = None, timeout: float = 30.0) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read() or b"null")

    def stats(self) -> dict:
        return self.admin("GET", "/_emulator/stats")

    def reset(self) -> None:
        self.admin("POST", "/_emulator/reset")

    def configure(self, **settings: Any) -> dict:
        return self.admin("POST", "/_emulator/config", settings)

    def cpu_seconds(self) -> float:
        """User + system CPU of the emulator process so far (to tell when the server is the bottleneck)."""
        import psutil

        times = psutil.Process(self.pid).cpu_times()
        return times.user + times.system

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ------------------------------------------------------------------------------------------ stats


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def rss_bytes(pid: int | None = None) -> int:
    import psutil

    return psutil.Process(pid).memory_info().rss


def cpu_seconds() -> float:
    """This process's user + system CPU time (all threads)."""
    t = os.times()
    return t.user + t.system


def child_json(cmd: list[str], *, timeout: float, log: Any = None) -> Any:
    """Run a benchmark child process and parse the JSON object it prints as its last stdout line."""
    proc = subprocess.run(
        cmd, stdout=subprocess.PIPE, stderr=log, text=True, timeout=timeout, check=False, cwd=ROOT
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd[:4])}... exited {proc.returncode}: {proc.stdout[-2000:]}")
    return json.loads(lines[-1])


# ---------------------------------------------------------------------------------------- results


def row(
    benchmark: str,
    variant: str,
    metric: str,
    value: float | None,
    *,
    baseline: float | None = None,
    baseline_variant: str | None = None,
    n: int | str | None = None,
    better: str = "lower",
    note: str = "",
) -> dict:
    """One result. ``ratio`` is value / baseline (so < 1 is better when ``better`` is "lower")."""
    ratio = None
    if value is not None and baseline not in (None, 0) and value == value and baseline == baseline:
        ratio = value / baseline  # type: ignore[operator]
    return {
        "benchmark": benchmark,
        "variant": variant,
        "metric": metric,
        "value": value,
        "baseline": baseline,
        "baseline_variant": baseline_variant,
        "ratio": ratio,
        "n": n,
        "better": better,
        "note": note,
    }


def record(rows: Iterable[dict], *, command: str | None = None) -> Path:
    """Append rows (with a timestamp and the command) to ``benchmarks/results/<date>.jsonl``."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    path = RESULTS_DIR / f"{now:%Y-%m-%d}.jsonl"
    command = command or " ".join([Path(sys.executable).name, *sys.argv])
    with path.open("a") as out:
        for r in rows:
            out.write(json.dumps({"time": now.isoformat(timespec="seconds"), "command": command, **r}) + "\n")
    return path


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if value != value:
            return "n/a"
        if value == 0:
            return "0"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        if abs(value) >= 0.01:
            return f"{value:.3g}"
        return f"{value:.2e}"
    return str(value)


def markdown_table(rows: Iterable[dict]) -> str:
    lines = [
        "| benchmark | variant | metric | N | value | baseline | ratio | note |",
        "|---|---|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        ratio = r.get("ratio")
        ratio_s = "" if ratio is None else f"{ratio:.2f}x"
        base = _fmt(r.get("baseline"))
        if base and r.get("baseline_variant"):
            base = f"{base} ({r['baseline_variant']})"
        lines.append(
            f"| {r['benchmark']} | {r['variant']} | {r['metric']} | {_fmt(r.get('n'))} | "
            f"{_fmt(r.get('value'))} | {base} | {ratio_s} | {r.get('note', '')} |"
        )
    return "\n".join(lines)


def machine_info() -> dict:
    try:
        from importlib.metadata import version

        airflow_version = version("apache-airflow")
    except Exception:
        airflow_version = "?"
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "airflow": airflow_version,
        "loadavg_1m": round(load[0], 2),
    }


def emit(rows: list[dict], *, json_out: str | None = None, title: str | None = None) -> None:
    """Record rows, print them as a table, and (for run_all) write them as JSON to ``json_out``."""
    record(rows)
    if title:
        print(f"\n### {title}\n")
    print(markdown_table(rows), flush=True)
    if json_out:
        Path(json_out).write_text(json.dumps(rows))


@contextlib.contextmanager
def temp_dir(prefix: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------ creating predictions


async def acreate_predictions(
    url: str, workflow_id: str, n: int, *, concurrency: int = 32, app_key: str = APP_KEY
) -> list[tuple[str, float | None, float]]:
    """Create ``n`` predictions with direct signed calls; returns ``(id, estimated_duration, created_at)``.

    ``created_at`` is the wall-clock time the create answer arrived (the emulator starts the task's clock
    while answering, so the true start is at most one round trip earlier).
    """
    import asyncio

    import httpx

    from airflow_provider_speedpix import _protocol as proto
    from airflow_provider_speedpix._signing import sign_request

    body = proto.encode_body(proto.create_prediction_body(workflow_id, {}))
    path = proto.PATHS[proto.CREATE]
    out: list[tuple[str, float | None, float]] = []
    semaphore = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:

        async def one() -> None:
            async with semaphore:
                headers = sign_request(
                    method="POST", path=path, body=body, app_key=app_key, app_secret=APP_SECRET
                )
                response = await client.post(url + path, content=body, headers=headers)
                envelope = proto.read_envelope(
                    proto.CREATE, response.status_code, response.headers, response.content
                )
                created = proto.parse_created(envelope)
                out.append((created.id, created.estimated_duration, time.time()))

        await asyncio.gather(*(one() for _ in range(n)))
    return out
