"""Fire and forget, then wait elsewhere: submit a prediction without waiting, pick it up with a sensor.

Useful when the submitting DAG should not wait (or another system submits), and in tests of the sensor.
"""

from __future__ import annotations

from pathlib import Path

import pendulum
from airflow.sdk import DAG, task

from airflow_provider_speedpix.operators.speedpix import SpeedPixRunOperator
from airflow_provider_speedpix.sensors.speedpix import SpeedPixPredictionSensor

with DAG(
    dag_id="speedpix_fire_and_forget",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["speedpix", "example"],
    doc_md=__doc__,  # shown on the DAG's page in the Airflow UI
) as dag:
    submit = SpeedPixRunOperator(
        task_id="submit",
        workflow_id="{{ var.value.get('speedpix_workflow_id', 'wf-white-background') }}",
        inputs={"text": "white background", "image": str(Path(__file__).parent / "data" / "product.png")},
        wait_for_completion=False,  # returns the prediction id at once
    )

    wait = SpeedPixPredictionSensor(
        task_id="wait",
        prediction_id="{{ ti.xcom_pull(task_ids='submit') }}",
        deferrable=True,
        poke_interval=1.0,
        timeout=600,
    )

    @task
    def report(output: dict) -> str:
        url = output["images"]["url"]
        print(f"Output image (temporary URL): {url}")
        return url

    submit >> wait
    report(wait.output)
