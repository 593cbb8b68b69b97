"""End to end on a real Airflow 3 deployment: the README quickstart example ``speedpix_white_background``
(``dags_examples/speedpix_white_background.py``, one deferrable ``SpeedPixRunOperator``, not mapped), run
unmodified. Run with ``make e2e``.

The task uploads the product photo, submits one prediction, defers to the triggerer, resumes on a worker,
saves the PNG and deletes its ``task_state_store`` entry (``_forget``). It runs twice: in the suite's default
deployment (``SIMPLE_AUTH_MANAGER_ALL_ADMINS=True``) and in one with real logins, as the gallery browser test
starts it (``tests/e2e/test_gallery_browser.py``), since a report said that after the resume the final
``task_state_store.delete`` got 404 "Task instance ... not found" there.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from airflow_provider_speedpix.emulator.png import PNG_SIGNATURE
from tests.e2e._helpers import return_value
from tests.e2e.deployment import Deployment

pytestmark = pytest.mark.e2e

DAG_ID = "speedpix_white_background"
TASK_ID = "white_background"
STATE_KEY = "speedpix_prediction"


def auth_env(kind: str, folder: Path) -> dict[str, str]:
    if kind == "all-admins":
        return {}
    # the gallery browser test's settings: no "everyone is admin", one read-only user with a password
    (folder / "passwords.json").write_text(json.dumps({"viewer": "viewer-password"}))
    return {
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "viewer:viewer",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(folder / "passwords.json"),
    }


def task_log(deployment: Deployment, run_id: str) -> str:
    folder = deployment.home / "logs" / f"dag_id={DAG_ID}" / f"run_id={run_id}" / f"task_id={TASK_ID}"
    return "\n".join(
        f"===== {path.name}\n{path.read_text(errors='replace')[-4000:]}"
        for path in sorted(folder.glob("attempt=*.log*"))
    )


@pytest.mark.parametrize("auth", ["all-admins", "real-logins"])
def test_white_background_example_defers_resumes_and_forgets(auth, tmp_path, e2e_results):
    started = time.monotonic()
    folder = tmp_path
    out = folder / "output"
    extra_env = {"SPEEDPIX_OUTPUT_DIR": str(out), **auth_env(auth, folder)}
    # 3 s: the trigger holds the event until 10 s after the deferral (_outcome.DEFER_HOLD_SECONDS), the
    # workaround for Airflow's stale executor event that a deferral this short could otherwise meet
    with Deployment(emulator_duration=3.0, extra_env=extra_env) as deployment:
        deployment.wait_for_dags([DAG_ID], timeout=180)
        run_id = deployment.trigger(DAG_ID)
        deferred_seen = False

        def sample() -> None:
            nonlocal deferred_seen
            deferred_seen |= deployment.task_states(DAG_ID, run_id, TASK_ID).get("deferred", 0) > 0

        state = deployment.wait_for_run(DAG_ID, run_id, timeout=300, on_sample=sample, interval=0.3)
        tis = deployment.task_instances(DAG_ID, run_id)
        calls = deployment.emulator_stats()["calls"]
        result = return_value(deployment, DAG_ID, run_id, TASK_ID) or {}
        leftover = deployment.query(
            "SELECT count(*) FROM task_state_store WHERE dag_id = ? AND key = ?", (DAG_ID, STATE_KEY)
        )[0][0]
        log = task_log(deployment, run_id)
        e2e_results[f"example_white_background[{auth}]"] = {
            "final_state": state,
            "try_number": [ti["try_number"] for ti in tis],
            "deferred_seen": deferred_seen,
            "comfy_prompt": calls.get("comfy_prompt"),
            "files": [Path(p).name for p in result.get("files", [])],
            "state_store_left": leftover,
            "seconds": round(time.monotonic() - started, 1),
        }
        assert state == "success", f"{log}\n{deployment.log_tails(['api-server', 'scheduler'])}"
        assert [(ti["state"], ti["try_number"]) for ti in tis] == [("success", 1)], tis
        assert deferred_seen or "Deferring: prediction" in log, log
        assert calls.get("comfy_prompt") == 1, calls
        files = [Path(p) for p in result["files"]]
        assert files and all(p.is_file() and p.is_relative_to(out) for p in files), result
        assert any(p.suffix == ".png" and p.read_bytes().startswith(PNG_SIGNATURE) for p in files), files
        assert leftover == 0, "the task_state_store entry outlived the successful task"
