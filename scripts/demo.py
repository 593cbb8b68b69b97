"""`make demo`: run the example DAG end to end against the bundled emulator, on Airflow's default SQLite.

Starts the emulator on a free loopback port, points a ``speedpix_default`` connection at it, runs
``airflow dags test speedpix_white_background``, checks the saved output is a PNG, prints its path and
stops the emulator.
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

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".demo"
BIN = Path(sys.executable).parent
DAG_ID = "speedpix_white_background"


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


def main() -> int:
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
        ],
    )
    try:
        wait_until_up(url, emulator)
        env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "AIRFLOW_HOME": str(WORK / "airflow"),
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags_examples"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW_CONN_SPEEDPIX_DEFAULT": json.dumps(
                {"conn_type": "speedpix", "host": url, "login": "demo-key", "password": secret}
            ),
            "SPEEDPIX_OUTPUT_DIR": str(output_dir),
        }
        subprocess.run(
            [str(BIN / "airflow"), "db", "migrate"], env=env, check=True, stdout=subprocess.DEVNULL
        )
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
    print(f"\nSpeedPix demo succeeded: the emulator saw {calls['comfy_prompt']} prediction(s).")
    print(f"Output image: {images[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
