"""e2e: 500 items in one SpeedPixBatchRunOperator task, window 100, deferrable.

Run on one machine with kills (tests/e2e/test_batch_deployment.py) and on Celery with outputs in S3
(tests/e2e/test_distributed.py, (4), with ``seconds`` 2), where ``SPEEDPIX_CATALOG_URI`` is the bucket.
"""

from __future__ import annotations

import os
from datetime import timedelta

import pendulum
from airflow.sdk import DAG

from airflow_provider_speedpix.operators.batch import SpeedPixBatchRunOperator

CATALOG_URI = os.environ.get("SPEEDPIX_CATALOG_URI", "file:///tmp/speedpix-catalog")

with DAG(
    dag_id="speedpix_e2e_batch",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    params={"seconds": 5},
    tags=["speedpix", "e2e"],
) as dag:
    SpeedPixBatchRunOperator(
        task_id="batch",
        workflow_id="sleep-{{ params.seconds }}",
        items=[{"sku": f"SKU-{i:04d}", "text": f"product {i} on white"} for i in range(500)],
        item_id_field="sku",
        output_dir=CATALOG_URI + "/batch/{{ run_id | replace(':', '_') | replace('+', '_') }}",
        max_in_flight=100,
        deferrable=True,
        poll_interval=1.0,
        timeout=600,
        retries=3,
        retry_delay=timedelta(seconds=1),
    )
