"""End to end on a real Airflow 3 deployment: the DAG changes, the failed task is cleared, and the new try must
run the NEW request, not hand back the old prediction (issue 11, item 1). Run with ``make e2e``.

Try 1 runs workflow ``wf-a``; its prediction succeeds but saving its output fails (the output folder's parent
is a file), so the task fails with the prediction id still in ``task_state_store``. The author then edits the
DAG file to ``wf-b`` with other inputs and a writable folder, and runs ``airflow tasks clear``. The emulator
gives ``wf-b`` a workflow without custom output fields (``images_only_workflow_ids``), so its saved files
(``image_0.png``, ``image_1.png``) cannot be mistaken for ``wf-a``'s (``images.png``).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e._helpers import return_value, wait_until
from tests.e2e.deployment import BIN

pytestmark = pytest.mark.e2e

DAG_ID = "speedpix_e2e_changed_dag"
TASK_ID = "generate"
DAG_TEMPLATE = '''"""e2e only (tests/e2e/test_changed_dag.py): rewritten by the test between two tries."""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG

from airflow_provider_speedpix.operators.speedpix import SpeedPixRunOperator

with DAG(
    dag_id={dag_id!r},
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["speedpix", "e2e"],
):
    SpeedPixRunOperator(
        task_id={task_id!r},
        workflow_id={workflow_id!r},
        inputs={{"text": {text!r}}},
        output_dir={output_dir!r},
        deferrable=True,
        poll_interval=0.5,
        timeout=300,
    )
'''


def write_dag(deployment, **fields: str) -> Path:
    path = deployment.dags / f"{DAG_ID}.py"
    path.write_text(DAG_TEMPLATE.format(dag_id=DAG_ID, task_id=TASK_ID, **fields), encoding="utf-8")
    return path


def dag_hash(deployment) -> str | None:
    rows = deployment.query(
        "SELECT dag_hash FROM serialized_dag WHERE dag_id = ? ORDER BY created_at DESC LIMIT 1", (DAG_ID,)
    )
    return rows[0][0] if rows else None


def stored_prediction(deployment) -> dict | None:
    rows = deployment.query(
        "SELECT value FROM task_state_store WHERE dag_id = ? AND task_id = ? AND key = 'speedpix_prediction'",
        (DAG_ID, TASK_ID),
    )
    if not rows:
        return None
    value = rows[0][0]
    return json.loads(value) if isinstance(value, str) else value


def task_log(deployment, run_id: str, attempt: int) -> str:
    folder = deployment.home / "logs" / f"dag_id={DAG_ID}" / f"run_id={run_id}" / f"task_id={TASK_ID}"
    return "\n".join(
        path.read_text(errors="replace") for path in sorted(folder.glob(f"attempt={attempt}.log*"))
    )


def test_changed_dag_then_clear_runs_the_new_request(deployment, tmp_path, e2e_results):
    from airflow_provider_speedpix.emulator.png import output_png

    started = time.monotonic()
    deployment.emulator_reset()
    deployment.emulator_config(duration=2.0, images_only_workflow_ids=["wf-b"])
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where try 1's output folder should be")
    out = tmp_path / "out"

    # try 1: wf-a succeeds on SpeedPix, saving fails -> the task fails, its prediction id stays stored
    write_dag(deployment, workflow_id="wf-a", text="a red mug", output_dir=str(blocker / "out"))
    deployment.wait_for_dags([DAG_ID], timeout=180)
    first_hash = dag_hash(deployment)
    run_id = deployment.trigger(DAG_ID)
    assert deployment.wait_for_run(DAG_ID, run_id, timeout=240) == "failed"
    stored = stored_prediction(deployment)
    assert stored and stored["request"]["workflow_id"] == "wf-a", stored
    old_id = stored["prediction_id"]
    assert deployment.emulator_stats()["calls"]["comfy_prompt"] == 1

    # the author changes the DAG file; once the dag-processor has re-serialized it, clear the task
    write_dag(deployment, workflow_id="wf-b", text="a blue mug", output_dir=str(out))
    wait_until(
        deployment,
        lambda: dag_hash(deployment) not in (None, first_hash),
        timeout=240,
        what="the dag-processor to re-parse the changed DAG file",
        pause=1.0,
    )
    cleared = subprocess.run(
        [str(BIN / "airflow"), "tasks", "clear", "-y", DAG_ID],
        env=deployment.env,
        cwd=deployment.home,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert cleared.returncode == 0, f"{cleared.stdout}\n{cleared.stderr}"
    # a cleared run goes back to queued, then to success or failed
    wait_until(
        deployment,
        lambda: deployment.run_state(DAG_ID, run_id) not in ("failed", None),
        timeout=60,
        what="the cleared run to leave `failed`",
        pause=0.5,
    )
    state = deployment.wait_for_run(DAG_ID, run_id, timeout=240)

    result = return_value(deployment, DAG_ID, run_id, TASK_ID) or {}
    retry_log = task_log(deployment, run_id, 2)
    calls = deployment.emulator_stats()["calls"]
    e2e_results["changed_dag_clear"] = {
        "final_state": state,
        "comfy_prompt": calls.get("comfy_prompt"),
        "first_prediction": old_id,
        "second_prediction": result.get("prediction_id"),
        "files": [Path(p).name for p in result.get("files", [])],
        "seconds": round(time.monotonic() - started, 1),
    }
    assert state == "success", f"{retry_log[-3000:]}\n{deployment.log_tails(['scheduler'])}"
    assert calls.get("comfy_prompt") == 2, (
        f"the cleared try did not submit wf-b: {calls}\n{retry_log[-3000:]}"
    )
    new_id = result["prediction_id"]
    assert new_id != old_id
    # wf-b's outputs (a workflow without custom output fields), each holding wf-b's prediction's image
    assert sorted(Path(p).name for p in result["files"]) == ["image_0.png", "image_1.png"], result
    assert not (out / "images.png").exists()
    assert (out / "image_0.png").read_bytes() == output_png(new_id, "ComfyUI_00001_")
    assert "made from a different request (workflow_id wf-a -> wf-b, inputs changed)" in retry_log
    assert stored_prediction(deployment) is None  # forgotten once the outputs are saved
