"""`make demo`: run the example DAG end to end against the bundled emulator, on Airflow's default SQLite.

Starts the emulator on a free loopback port with room for one running task (``--capacity 1``), points a
``speedpix_default`` connection at it, submits four predictions of "another team" so the example's own
prediction has a queue to wait in (the task log shows ``queued, 1 ahead`` ... ``running 40%``), runs
``airflow dags test speedpix_white_background``, checks the saved output is a PNG, prints its path and
the address of the run's gallery page, and stops the emulator.

``--serve`` (``make gallery``) starts an api-server on that same Airflow home, so the gallery page the demo
printed shows the run's images in the Airflow UI (docs/gallery.md).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".demo"
BIN = Path(sys.executable).parent
DAG_ID = "speedpix_white_background"
#: Predictions submitted before the DAG runs, so the demo's task log shows a real queue position.
QUEUE_AHEAD = 4
#: Where ``make gallery`` serves the Airflow UI.
GALLERY_PORT = int(os.environ.get("SPEEDPIX_DEMO_PORT", "28080"))
#: Each of those runs this long (the emulator's ``sleep-<seconds>`` workflows), so the queue lasts ~24 s.
OTHER_JOB_SECONDS = 6


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_up(url: str, process: subprocess.Popen, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"demo: the emulator exited with code {process.returncode}")
        try:
            urllib.request.urlopen(f"{url}/_emulator/stats", timeout=1).read()
            return
        except OSError:
            time.sleep(0.2)
    sys.exit("demo: the emulator did not start within 30 s")


def occupy_the_queue(env: dict[str, str], predictions: int) -> None:
    """Submit ``predictions`` through the provider's own hook, in a child with the demo's Airflow env."""
    code = (
        "from airflow_provider_speedpix.hooks.speedpix import SpeedPixHook\n"
        "hook = SpeedPixHook()\n"
        f"for n in range({predictions}):\n"
        f"    hook.create_prediction('sleep-{OTHER_JOB_SECONDS}', {{'text': 'another team job'}})\n"
    )
    subprocess.run([sys.executable, "-c", code], env=env, check=True)


def airflow_env(**extra: str) -> dict[str, str]:
    """The demo's Airflow: its own home and SQLite database under ``.demo``, the example DAGs."""
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "AIRFLOW_HOME": str(WORK / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags_examples"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        **extra,
    }


def last_run_id(env: dict[str, str]) -> str | None:
    listed = subprocess.run(
        [str(BIN / "airflow"), "dags", "list-runs", DAG_ID, "-o", "json"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    # the JSON is the last line: Airflow prints warnings (graphviz missing, ...) on stdout before it
    lines = [line for line in listed.stdout.splitlines() if line.startswith("[")]
    try:
        runs = json.loads(lines[-1]) if lines else []
    except ValueError:
        return None
    return runs[0]["run_id"] if runs else None


def gallery_url(run_id: str) -> str:
    return f"http://127.0.0.1:{GALLERY_PORT}/speedpix/gallery/dags/{DAG_ID}/runs/{quote(run_id, safe='')}"


def serve() -> int:
    """``make gallery``: the Airflow UI on the demo's database, so its gallery shows the demo's images."""
    env = airflow_env(AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS="True")  # a local demo: no login
    run_id = last_run_id(env) if (WORK / "airflow").is_dir() else None
    if run_id is None:
        sys.exit("demo: no demo run to show yet: run `make demo` first")
    print(f"SpeedPix gallery of the demo run (Ctrl-C stops the server): {gallery_url(run_id)}", flush=True)
    try:
        return subprocess.run(
            [str(BIN / "airflow"), "api-server", "--host", "127.0.0.1", "--port", str(GALLERY_PORT)],
            env=env,
            check=False,
        ).returncode
    except KeyboardInterrupt:
        return 0


def main() -> int:
    if sys.argv[1:] == ["--serve"]:
        return serve()
    shutil.rmtree(WORK, ignore_errors=True)
    output_dir = WORK / "output"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    secret = secrets.token_urlsafe(16)
    emulator = subprocess.Popen(
        [
            str(BIN / "speedpix-emulator"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--app-key",
            "demo-key",
            "--app-secret",
            secret,
            "--duration",
            "5",
            "--capacity",
            "1",
        ],
    )
    try:
        wait_until_up(url, emulator)
        env = airflow_env(
            AIRFLOW_CONN_SPEEDPIX_DEFAULT=json.dumps(
                {"conn_type": "speedpix", "host": url, "login": "demo-key", "password": secret}
            ),
            SPEEDPIX_OUTPUT_DIR=str(output_dir),
        )
        subprocess.run(
            [str(BIN / "airflow"), "db", "migrate"], env=env, check=True, stdout=subprocess.DEVNULL
        )
        occupy_the_queue(env, predictions=QUEUE_AHEAD)
        result = subprocess.run([str(BIN / "airflow"), "dags", "test", DAG_ID], env=env, check=False)
        if result.returncode != 0:
            print(f"demo: `airflow dags test {DAG_ID}` failed with code {result.returncode}", file=sys.stderr)
            return 1
        images = sorted(output_dir.rglob("*.png"))
        if not images or not images[0].read_bytes().startswith(b"\x89PNG\r\n\x1a\n"):
            print(f"demo: no PNG output under {output_dir}", file=sys.stderr)
            return 1
        with urllib.request.urlopen(f"{url}/_emulator/stats", timeout=5) as response:
            calls = json.load(response)["calls"]
    finally:
        emulator.terminate()
        try:
            emulator.wait(timeout=10)
        except subprocess.TimeoutExpired:
            emulator.kill()
    own = calls["comfy_prompt"] - QUEUE_AHEAD
    print(f"\nSpeedPix demo succeeded: the DAG made {own} prediction(s), queued behind {QUEUE_AHEAD} others.")
    print(f"Output image: {images[0]}")
    run_id = last_run_id(env)
    if run_id is not None:
        print(f"In the Airflow UI: `make gallery`, then open {gallery_url(run_id)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
