"""Product photo to white background: the SpeedPix SDK quickstart as one deferrable Airflow task.

Needs a ``speedpix_default`` connection (or SPEEDPIX_APP_KEY / SPEEDPIX_APP_SECRET). The workflow id comes
from the Airflow Variable ``speedpix_workflow_id``; the output lands under ``SPEEDPIX_OUTPUT_DIR``
(``/tmp/speedpix-output`` by default), one folder per run.

The saved image shows in the Airflow UI: the DAG run's **SpeedPix images** tab (docs/gallery.md).
"""

from __future__ import annotations

import os
from pathlib import Path

import pendulum
from airflow.sdk import DAG

from airflow_provider_speedpix.operators.speedpix import SpeedPixRunOperator

PRODUCT_IMAGE = str(Path(__file__).parent / "data" / "product.png")
OUTPUT_DIR = os.environ.get("SPEEDPIX_OUTPUT_DIR", "/tmp/speedpix-output")

with DAG(
    dag_id="speedpix_white_background",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["speedpix", "example"],
    doc_md=__doc__,  # shown on the DAG's page in the Airflow UI
) as dag:
    SpeedPixRunOperator(
        task_id="white_background",
        workflow_id="{{ var.value.get('speedpix_workflow_id', 'wf-white-background') }}",
        inputs={
            "text": "A bright product shot on a pure white background",
            "image": PRODUCT_IMAGE,  # a local path: uploaded by the worker before it defers
        },
        alias_id="main",
        output_dir=OUTPUT_DIR + "/{{ run_id | replace(':', '_') | replace('+', '_') }}",
        deferrable=True,
        poll_interval=1.0,
        timeout=600,
        retries=2,
    )
