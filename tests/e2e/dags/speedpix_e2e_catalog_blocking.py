"""e2e only: the catalog regeneration DAG with ``deferrable=False``, for the B2 deferral comparison.

Same shape as ``dags_examples/speedpix_catalog_regeneration.py`` (one mapped ``SpeedPixRunOperator`` per
CSV row, outputs saved under ``SPEEDPIX_CATALOG_URI``), but every task waits for its prediction in its
worker slot.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pendulum
from airflow.sdk import DAG, task

from airflow_provider_speedpix.operators.speedpix import SpeedPixRunOperator

CATALOG_URI = os.environ.get("SPEEDPIX_CATALOG_URI", "file:///tmp/speedpix-catalog")

with DAG(
    dag_id="speedpix_e2e_catalog_blocking",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    params={"products_csv": ""},
    max_active_tasks=256,
    tags=["speedpix", "e2e"],
):

    @task
    def load_products(params: dict | None = None, run_id: str | None = None) -> list[dict]:
        csv_path = Path((params or {})["products_csv"])
        run_folder = (run_id or "manual").replace(":", "_").replace("+", "_")
        with csv_path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        return [
            {
                "inputs": {"text": row["prompt"], "image": str((csv_path.parent / row["image"]).resolve())},
                "output_dir": f"{CATALOG_URI}/{run_folder}/{row['product_id']}",
            }
            for row in rows
        ]

    regenerate = SpeedPixRunOperator.partial(
        task_id="regenerate",
        workflow_id="wf-white-background",
        deferrable=False,
        poll_interval=1.0,
        timeout=1800,
        retries=2,
    ).expand_kwargs(load_products())

    @task
    def publish(results: list[dict]) -> dict:
        files = [path for result in results for path in result["files"]]
        return {"products": len(results), "files": len(files)}

    publish(regenerate.output)
