"""Nightly catalog regeneration at catalog scale: every product in ONE task, a rolling window in flight.

The same job as ``speedpix_catalog_regeneration`` (one mapped task per product), shaped for thousands of
products: ``SpeedPixBatchRunOperator`` keeps ``max_in_flight`` predictions running, waits on the
triggerer between rounds, and saves ``<SPEEDPIX_CATALOG_URI>/<run>/<product_id>/images.png`` plus a
``manifest.jsonl`` (one row per product: prediction id, status, files, run seconds, error). A retry never
pays twice for a product whose prediction is running or done. Up to 1% of products may fail without
failing the run (they are listed in the manifest); each failed prediction is tried once more first.
The ``speedpix_catalog`` Asset event carries the counts. Trigger with ``{"products_csv": "/path.csv"}``.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pendulum
from airflow.sdk import DAG, Asset, task

from airflow_provider_speedpix.operators.batch import SpeedPixBatchRunOperator

DEFAULT_CSV = str(Path(__file__).parent / "data" / "products.csv")
CATALOG_URI = os.environ.get("SPEEDPIX_CATALOG_URI", "file:///tmp/speedpix-catalog")
catalog_asset = Asset(name="speedpix_catalog", uri=CATALOG_URI)

with DAG(
    dag_id="speedpix_catalog_regeneration_batch",
    schedule="@daily",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    params={"products_csv": DEFAULT_CSV},
    tags=["speedpix", "example"],
) as dag:

    @task
    def load_products(params: dict | None = None) -> list[dict]:
        """One item per product row: its id and the workflow's inputs (image paths made absolute)."""
        csv_path = Path((params or {}).get("products_csv") or DEFAULT_CSV)
        with csv_path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        return [
            {
                "product_id": row["product_id"],
                "text": row["prompt"],
                "image": str((csv_path.parent / row["image"]).resolve()),
            }
            for row in rows
        ]

    SpeedPixBatchRunOperator(
        task_id="regenerate_catalog",
        workflow_id="{{ var.value.get('speedpix_catalog_workflow_id', 'wf-white-background') }}",
        items=load_products(),
        item_id_field="product_id",
        output_dir=CATALOG_URI + "/{{ run_id | replace(':', '_') | replace('+', '_') }}",
        max_in_flight=100,
        max_failed_items=0.01,
        item_retries=1,
        deferrable=True,
        poll_interval=2.0,
        timeout=1800,
        retries=2,
        outlets=[catalog_asset],
    )
