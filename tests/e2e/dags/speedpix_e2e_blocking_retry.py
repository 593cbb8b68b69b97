"""e2e only: one non-deferrable SpeedPix prediction with a retry, for the worker-SIGKILL test.

The task waits in its worker (``deferrable=False``) on a 20 s ``sleep-20`` workflow; the suite SIGKILLs the
task process once the prediction exists, and the retry must reconnect to that same prediction.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import DAG

from airflow_provider_speedpix.operators.speedpix import SpeedPixRunOperator

with DAG(
    dag_id="speedpix_e2e_blocking_retry",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["speedpix", "e2e"],
):
    SpeedPixRunOperator(
        task_id="wait_in_worker",
        workflow_id="sleep-20",
        inputs={"text": "e2e worker kill"},
        deferrable=False,
        poll_interval=1.0,
        timeout=300,
        retries=1,
        retry_delay=timedelta(seconds=1),
    )
