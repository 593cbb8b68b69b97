"""e2e-distributed only: four non-deferrable SpeedPix predictions with retries, for the Celery-worker kill.

Each mapped task waits in its Celery worker slot (``deferrable=False``) on a 90 s ``sleep-90`` workflow (long enough to be still running when the retry comes, after
``[scheduler] task_instance_heartbeat_timeout``); the
suite SIGKILLs one whole worker (its pool and task processes) once every prediction exists, and each retry
must reconnect to its own prediction through ``task_state_store`` (in PostgreSQL).
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import DAG

from airflow_provider_speedpix.operators.speedpix import SpeedPixRunOperator

with DAG(
    dag_id="speedpix_e2e_dist_blocking",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["speedpix", "e2e"],
):
    SpeedPixRunOperator.partial(
        task_id="wait_in_worker",
        workflow_id="sleep-90",
        deferrable=False,
        poll_interval=1.0,
        timeout=300,
        retries=2,
        retry_delay=timedelta(seconds=1),
    ).expand(inputs=[{"text": f"e2e worker kill {i}"} for i in range(4)])
