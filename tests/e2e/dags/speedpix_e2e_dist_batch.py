"""e2e-distributed only: the batch operator on Celery, 500 items, window 100, deferrable, outputs to S3.

One ``SpeedPixBatchRunOperator`` task over 500 items of a short ``sleep-<seconds>`` workflow (2 s by default,
so the stage takes a few minutes on a loaded 2-core machine). Its files and ``manifest.jsonl`` go to
``<SPEEDPIX_CATALOG_URI>/batch/<run>``: ``s3://aws_moto@speedpix-e2e/catalog/batch/<run>`` in the distributed
deployment (moto's S3 through the ``aws_moto`` connection). Each round resumes on whichever Celery worker
picks it up and waits on whichever triggerer takes the trigger (``tests/e2e/test_distributed.py``, (4)).
"""

from __future__ import annotations

import os
from datetime import timedelta

import pendulum
from airflow.sdk import DAG

from airflow_provider_speedpix.operators.batch import SpeedPixBatchRunOperator

CATALOG_URI = os.environ.get("SPEEDPIX_CATALOG_URI", "file:///tmp/speedpix-catalog")
ITEMS = 500

with DAG(
    dag_id="speedpix_e2e_dist_batch",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    params={"seconds": 2},
    tags=["speedpix", "e2e"],
):
    SpeedPixBatchRunOperator(
        task_id="batch",
        workflow_id="sleep-{{ params.seconds }}",
        items=[{"sku": f"SKU-{i:04d}", "text": f"product {i} on white"} for i in range(ITEMS)],
        item_id_field="sku",
        output_dir=CATALOG_URI + "/batch/{{ run_id | replace(':', '_') | replace('+', '_') }}",
        max_in_flight=100,
        deferrable=True,
        poll_interval=1.0,
        timeout=600,
        retries=2,
        retry_delay=timedelta(seconds=5),
    )
