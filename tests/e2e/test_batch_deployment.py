"""e2e: SpeedPixBatchRunOperator on a real deployment (scheduler, triggerer, LocalExecutor), with the
triggerer SIGKILLed once and the worker task SIGKILLed once mid-run.

500 items of 5 s (emulator workflow ``sleep-5``), window 100, deferrable: every item succeeds, SpeedPix
gets exactly one ``comfy_prompt`` per item, and the manifest lists all 500 with their files.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.e2e._helpers import wait_until

pytestmark = pytest.mark.e2e

DAG_ID = "speedpix_e2e_batch"
ITEMS = 500


def batch_ti(deployment, run_id: str) -> dict | None:
    tis = deployment.task_instances(DAG_ID, run_id)
    return tis[0] if tis else None


def test_batch_survives_triggerer_and_worker_sigkill(deployment, e2e_results):
    deployment.wait_for_dags([DAG_ID], timeout=180)
    deployment.emulator_reset()
    started = time.monotonic()
    run_id = deployment.trigger(DAG_ID)

    def created() -> int:
        return deployment.emulator_stats()["calls"].get("comfy_prompt", 0)

    # 1. The triggerer dies while it watches the first window (the task is deferred).
    wait_until(
        deployment,
        lambda: created() >= 100 and (batch_ti(deployment, run_id) or {}).get("state") == "deferred",
        timeout=180,
        what="the first window submitted and deferred",
        pause=0.2,
    )
    deployment.kill_triggerer(signal.SIGKILL)
    triggerer_killed_at_creates = created()
    time.sleep(2)
    deployment.start_triggerer()

    # 2. The worker dies in a later round while it saves finished items' files: mid-run, but not in the one
    #    documented window between a create and its save (a kill there may submit that item again).
    def downloading() -> bool:
        calls = deployment.emulator_stats()["calls"]
        before = (calls.get("comfy_prompt", 0), calls.get("file_get", 0))
        time.sleep(0.05)
        calls = deployment.emulator_stats()["calls"]
        return calls.get("comfy_prompt", 0) == before[0] and calls.get("file_get", 0) > before[1]

    def running_pid():
        ti = batch_ti(deployment, run_id)
        if not ti or ti["state"] != "running" or created() < 200 or not downloading():
            return None
        return deployment.task_process(ti["id"])

    pid = wait_until(
        deployment, running_pid, timeout=300, what="the batch task running in a later round", pause=0.05
    )
    os.kill(pid, signal.SIGKILL)
    worker_killed_at_creates = created()

    state = deployment.wait_for_run(DAG_ID, run_id, timeout=900)
    elapsed = time.monotonic() - started
    stats = deployment.emulator_stats()
    [ti] = deployment.task_instances(DAG_ID, run_id)
    run_folder = run_id.replace(":", "_").replace("+", "_")
    manifest_path = deployment.catalog_dir / "batch" / run_folder / "manifest.jsonl"
    rows = (
        [json.loads(line) for line in manifest_path.read_text().splitlines()]
        if manifest_path.exists()
        else []
    )
    e2e_results["batch_sigkill"] = {
        "state": state,
        "seconds": round(elapsed, 1),
        "try_number": ti["try_number"],
        "comfy_prompt": stats["calls"].get("comfy_prompt"),
        "triggerer_killed_at_creates": triggerer_killed_at_creates,
        "worker_killed_at_creates": worker_killed_at_creates,
        "manifest_rows": len(rows),
    }
    assert state == "success", deployment.log_tails()
    assert ti["try_number"] >= 2  # the killed worker's try failed and the retry finished the batch
    assert len(rows) == ITEMS and {r["status"] for r in rows} == {"succeeded"}
    assert len({r["prediction_id"] for r in rows}) == ITEMS
    assert all(r["attempts"] == 1 for r in rows)
    for row in rows[:: ITEMS // 10]:
        [file] = row["files"]
        assert Path(file.removeprefix("file://")).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert stats["calls"]["comfy_prompt"] == ITEMS, "exactly one comfy_prompt per item"
    assert stats["predictions"] == ITEMS
