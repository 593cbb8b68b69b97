"""Nightly catalog regeneration: one SpeedPix prediction per product, outputs kept in object storage.

``data/products.csv`` lists the products (``product_id,name,image,prompt``; ``image`` relative to the CSV).
Each product becomes one mapped, deferrable ``SpeedPixRunOperator``: hundreds wait on the triggerer while
the worker slots stay free. Results go to ``<SPEEDPIX_CATALOG_URI>/<run>/<product_id>/images.png``:
``file:///tmp/speedpix-catalog`` by default, ``s3://aws_default@my-bucket/catalog`` in production (only the
URI changes). The ``speedpix_catalog`` Asset is updated when the run is done, so downstream DAGs can be
scheduled on fresh images. Trigger with ``{"products_csv": "/path/to/other.csv"}`` to use another list.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pendulum
from airflow.sdk import DAG, Asset, task

from airflow_provider_speedpix.operators.speedpix import SpeedPixRunOperator

DEFAULT_CSV = str(Path(__file__).parent / "data" / "products.csv")
CATALOG_URI = os.environ.get("SPEEDPIX_CATALOG_URI", "file:///tmp/speedpix-catalog")
catalog_asset = Asset(name="speedpix_catalog", uri=CATALOG_URI)

with DAG(
    dag_id="speedpix_catalog_regeneration",
    schedule="@daily",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    params={"products_csv": DEFAULT_CSV},
    max_active_tasks=256,
    tags=["speedpix", "example"],
    doc_md=__doc__,  # shown on the DAG's page in the Airflow UI
) as dag:

    @task
    def load_products(params: dict | None = None, run_id: str | None = None) -> list[dict]:
        """One set of operator arguments per product row."""
        csv_path = Path((params or {}).get("products_csv") or DEFAULT_CSV)
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
        workflow_id="{{ var.value.get('speedpix_catalog_workflow_id', 'wf-white-background') }}",
        deferrable=True,
        poll_interval=2.0,
        timeout=1800,
        retries=2,
    ).expand_kwargs(load_products())

    @task(outlets=[catalog_asset])
    def publish(results: list[dict]) -> dict:
        """Summarise the run; updating the Asset lets downstream DAGs start on fresh images."""
        files = [path for result in results for path in result["files"]]
        print(f"Regenerated {len(results)} products, {len(files)} files under {CATALOG_URI}")
        return {"products": len(results), "files": len(files)}

    publish(regenerate.output)
