"""Metrics through Airflow's own stats client (``docs/metrics.md``): what the operator and the sensor emit
on the worker, with which tags, and that the triggerer emits nothing. ``Stats.incr`` / ``Stats.timing`` are
captured, so a missing or renamed metric fails here."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from airflow.providers.common.compat.sdk import Stats

from airflow_provider_speedpix import _metrics
from airflow_provider_speedpix._protocol import Prediction
from airflow_provider_speedpix.hooks.speedpix import SpeedPixHook
from airflow_provider_speedpix.operators import speedpix as operator_module
from airflow_provider_speedpix.triggers.speedpix import SpeedPixPredictionTrigger
from tests.test_operator import HEADER, xcom
from tests.test_sensor import sensor_dag

SUCCESS_METRICS = {
    ("incr", "speedpix.prediction.created"),
    ("incr", "speedpix.prediction.succeeded"),
    ("timing", "speedpix.prediction.queue_time"),
    ("timing", "speedpix.prediction.run_time"),
}


class Recorded:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any, dict | None]] = []

    def incr(self, stat: str, count: int | None = None, rate: float | None = None, *, tags=None) -> None:
        self.calls.append(("incr", stat, count, tags))

    def timing(self, stat: str, dt: Any, *, tags=None) -> None:
        self.calls.append(("timing", stat, dt, tags))

    def names(self) -> set[tuple[str, str]]:
        return {(kind, stat) for kind, stat, _, _ in self.calls}

    def value(self, stat: str) -> Any:
        [value] = [dt for _, name, dt, _ in self.calls if name == stat]
        return value


@pytest.fixture
def stats(monkeypatch) -> Recorded:
    recorded = Recorded()
    monkeypatch.setattr(Stats, "incr", staticmethod(recorded.incr))
    monkeypatch.setattr(Stats, "timing", staticmethod(recorded.timing))
    return recorded


def run_operator(run_dag, workflow_id: str, deferrable: bool, **options: Any):
    extra = "".join(f", {k}={v!r}" for k, v in options.items())
    return run_dag(
        HEADER
        + f"""
SpeedPixRunOperator(task_id="run", dag=dag, workflow_id={workflow_id!r}, inputs={{"text": "x"}},
    deferrable={deferrable}, poll_interval=0.1, timeout=60{extra})
"""
    )


@pytest.fixture
def one_clock(stepped_emulator, monkeypatch):
    """The ``stepped_emulator`` (tests/conftest.py), and the operator reading
    its submit time from that emulator's clock: worker and SpeedPix share one clock, which moves only with
    status reads, so nothing (a slow create round trip, a loaded machine) passes between SpeedPix
    stamping the task and the operator noting the submit."""
    emulator = stepped_emulator
    monkeypatch.setattr(operator_module, "time", emulator.clock)  # the module reads only time.time()
    return emulator


@pytest.mark.parametrize("deferrable", [True, False])
def test_operator_success_emits_every_metric_tagged_with_the_workflow(run_dag, one_clock, stats, deferrable):
    dr = run_operator(run_dag, "sleep-1", deferrable)  # 0.1 s dispatch, then 0.9 s running
    assert dr.state == "success"
    assert stats.names() == SUCCESS_METRICS
    assert len(stats.calls) == len(SUCCESS_METRICS)  # each once
    assert all(tags == {"workflow_id": "sleep-1"} for _, _, _, tags in stats.calls)
    assert stats.value("speedpix.prediction.run_time") == timedelta(seconds=0.9)
    assert stats.value("speedpix.prediction.run_time").total_seconds() == xcom(dr, "run")["run_seconds"]
    # taskBeginTime (whole ms) minus the submit time the operator stored: the emulator's dispatch delay
    queue_time = stats.value("speedpix.prediction.queue_time").total_seconds()
    assert queue_time == pytest.approx(0.1, abs=0.001)


@pytest.mark.parametrize("deferrable", [True, False])
def test_operator_failure_emits_created_and_failed(run_dag, speedpix_conn, stats, deferrable):
    dr = run_operator(run_dag, "wf-fail", deferrable)
    assert dr.state == "failed"
    assert stats.names() == {("incr", "speedpix.prediction.created"), ("incr", "speedpix.prediction.failed")}
    assert all(tags == {"workflow_id": "wf-fail"} for _, _, _, tags in stats.calls)


def test_retry_after_a_failed_download_counts_the_success_once(run_dag, speedpix_conn, stats, tmp_path):
    speedpix_conn.inject("file_get", "500", times=2)  # retry_limit=2: try 1's download fails
    dr = run_operator(run_dag, "wf-1", True, output_dir=str(tmp_path), retries=1, retry_delay=0)
    assert dr.state == "success"
    assert [stat for _, stat, _, _ in stats.calls].count("speedpix.prediction.succeeded") == 1
    assert [stat for _, stat, _, _ in stats.calls].count("speedpix.prediction.created") == 1


def test_submit_only_counts_the_creation(run_dag, speedpix_conn, stats):
    assert run_operator(run_dag, "sleep-30", False, wait_for_completion=False).state == "success"
    assert stats.calls == [("incr", "speedpix.prediction.created", None, {"workflow_id": "sleep-30"})]


@pytest.mark.parametrize("deferrable", [False, True], ids=["poke", "deferrable"])
def test_sensor_emits_the_outcome_with_the_workflow_the_service_names(
    run_dag, speedpix_conn, stats, deferrable
):
    prediction_id = SpeedPixHook().create_prediction("sleep-1", {"text": "x"}).id
    failing_id = SpeedPixHook().create_prediction("wf-fail", {"text": "x"}).id
    assert run_dag(sensor_dag(prediction_id, deferrable, timeout=60)).state == "success"
    # the sensor does not know the submit time: no queue_time; the result's info names the workflow
    assert stats.names() == {
        ("incr", "speedpix.prediction.succeeded"),
        ("timing", "speedpix.prediction.run_time"),
    }
    assert all(tags == {"workflow_id": "sleep-1"} for _, _, _, tags in stats.calls)
    stats.calls.clear()
    assert run_dag(sensor_dag(failing_id, deferrable, timeout=60)).state == "failed"
    assert stats.calls == [("incr", "speedpix.prediction.failed", None, {})]  # a failure names no workflow


def test_the_triggerer_emits_nothing(speedpix_conn, stats):
    prediction_id = SpeedPixHook().create_prediction("sleep-0.3", {"text": "x"}).id

    async def run() -> list:
        return [e async for e in SpeedPixPredictionTrigger(prediction_id, poll_interval=0.05).run()]

    assert len(asyncio.run(run())) == 1
    assert stats.calls == []


def test_metrics_never_fail_a_task(monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("statsd is down")

    monkeypatch.setattr(Stats, "incr", staticmethod(boom))
    _metrics.created("wf")
    _metrics.finished(Prediction(id="p", status="succeeded", run_seconds=1.0), workflow_id="wf")


def test_the_real_stats_client_accepts_our_calls():
    """No patching: the installed client takes these names, tags and timedelta values."""
    _metrics.created("wf-1")
    _metrics.finished(Prediction(id="p", status="failed"), workflow_id="wf-1", submitted_at=0.0)
    _metrics.finished(Prediction(id="p", status="succeeded", run_seconds=0.9))


def test_queue_time_is_skipped_when_unknown_or_negative(stats):
    from datetime import UTC, datetime

    started = datetime(2026, 11, 30, tzinfo=UTC)
    _metrics.finished(Prediction(id="p", status="succeeded", started_at=started), submitted_at=None)
    _metrics.finished(
        Prediction(id="p", status="succeeded", started_at=started), submitted_at=started.timestamp() + 5
    )  # worker clock ahead of SpeedPix's
    assert ("timing", "speedpix.prediction.queue_time") not in stats.names()
    _metrics.finished(
        Prediction(id="p", status="succeeded", started_at=started), submitted_at=started.timestamp() - 2.5
    )
    assert stats.value("speedpix.prediction.queue_time") == timedelta(seconds=2.5)
