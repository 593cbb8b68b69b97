"""Progress as the API reference describes it (issue 10): the fraction 0..1 shown as a percentage, the queue
position, per-node progress, the default ``images`` output and the task's timing, through the sync hook,
the async hook and the trigger, against the emulator on a manual clock (exact values, no sleeping).
"""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import pytest

from airflow_provider_speedpix import _outcome as outcome_module
from airflow_provider_speedpix._outcome import (
    describe_closing,
    describe_finished,
    describe_progress,
    log_progress,
    prediction_event,
    prediction_from_event,
)
from airflow_provider_speedpix._protocol import Prediction
from airflow_provider_speedpix.hooks.speedpix import SpeedPixHook
from airflow_provider_speedpix.triggers import speedpix as trigger_module
from airflow_provider_speedpix.triggers.speedpix import SpeedPixPredictionTrigger
from tests.conftest import FakeClock, use_speedpix_connection

EXTRA = {"retry_delay": 0.01, "retry_max_delay": 0.05, "retry_limit": 2, "timeout": 5}


@pytest.fixture
def emu(make_emulator, monkeypatch):
    """One worker slot (a real queue) on a manual clock; ``speedpix_default`` points at it."""
    server = make_emulator(capacity=1)
    use_speedpix_connection(
        monkeypatch, host=server.url, login=server.app_key, password=server.app_secret, extra=EXTRA
    )
    return server


def get(path: str, prediction_id: str) -> Prediction:
    """One ``get_prediction`` through the sync hook or its async twin (same parser, other transport)."""
    if path == "sync":
        return SpeedPixHook().get_prediction(prediction_id)
    return asyncio.run(SpeedPixHook().aget_prediction(prediction_id))


PATHS = pytest.mark.parametrize("path", ["sync", "async"])


def create(workflow_id: str) -> str:
    return SpeedPixHook().create_prediction(workflow_id, {"text": "x"}).id


# ---------------------------------------------------------------------- sync and async hook
@PATHS
def test_queue_position_while_waiting(emu, path):
    first, second, third = create("sleep-10"), create("sleep-10"), create("sleep-10")
    # one slot: `first` has it; `second` is next (0 tasks ahead without a slot); `third` has 1 ahead
    assert [get(path, pid).queue_position for pid in (first, second, third)] == [0, 0, 1]
    waiting = get(path, third)
    assert (waiting.status, waiting.progress, waiting.percent) == ("waiting", 0, 0)
    assert waiting.eta_seconds == 28  # 2 x 9 s running ahead + its own 10 s
    assert describe_progress(waiting) == "queued, 1 ahead, ETA 28 s"
    emu.clock.advance(10)  # `first` ended: `second` runs, `third` is next
    assert get(path, third).queue_position == 0
    emu.clock.advance(9)
    running = get(path, third)
    assert running.status == "running" and running.queue_position is None


@PATHS
def test_node_progress_while_running(emu, path):
    prediction_id = create("sleep-10")  # waits 1 s, runs 9 s
    emu.clock.advance(1 + 9 * 0.5)
    running = get(path, prediction_id)
    assert (running.progress, running.percent, running.eta_seconds) == (0.5, 50, 4.5)
    assert (running.node, running.node_index, running.node_count, running.step, running.steps) == (
        "KSampler",
        3,
        5,
        11,
        20,
    )
    assert describe_progress(running) == "running 50% (KSampler, step 11/20), ETA 4 s"
    emu.clock.advance(9 * 0.45)  # 95 %: the decoder, a one-step node
    late = get(path, prediction_id)
    assert (late.percent, late.node, late.node_index, late.step, late.steps) == (95, "VAEDecode", 4, 1, 1)


@PATHS
def test_images_only_workflow_output_and_timing(emu, path, monkeypatch):
    created_wall = emu.clock.time()
    prediction_id = create("wf-images-only")  # 1 s: 0.1 s waiting, 0.9 s running
    emu.clock.advance(1)
    done = get(path, prediction_id)
    assert done.succeeded and (done.progress, done.percent) == (1, 100)
    assert done.output is None
    assert [urlsplit(url).path.rsplit("/", 1)[-1] for url in done.images] == [
        "ComfyUI_00001_.png",
        "ComfyUI_00002_.png",
    ]
    assert all(url.startswith(f"{emu.url}/_emulator/files/outputs/{prediction_id}/") for url in done.images)
    assert done.output_or_images == {"images": done.images}
    assert done.run_seconds == 0.9
    begin_ms = round((created_wall + 0.1) * 1000)
    assert done.started_at == datetime.fromtimestamp(begin_ms / 1000, tz=UTC)
    assert done.finished_at == datetime.fromtimestamp((begin_ms + 900) / 1000, tz=UTC)
    assert done.started_at.tzinfo is UTC
    assert done.workflow_id == "wf-images-only"
    assert describe_finished(done).startswith("succeeded: ran 0.9 s (")
    assert describe_finished(done).endswith(", 2 default images")
    clock = FakeClock().install(monkeypatch, outcome_module)  # "after" is read off a clock that stands still
    closing = describe_closing(done, clock.now - 41.4, ["s3://b/run/image_0.png", "s3://b/run/image_1.png"])
    assert (
        closing == f"Prediction {prediction_id} succeeded after 41 s (ran 0.9 s), 2 files saved to s3://b/run"
    )
    assert describe_closing(done, None, []).endswith(
        "succeeded (ran 0.9 s), no files saved (set output_dir to keep them)"
    )


def test_hook_run_returns_default_images_instead_of_nothing(emulator, monkeypatch):
    use_speedpix_connection(
        monkeypatch, host=emulator.url, login=emulator.app_key, password=emulator.app_secret, extra=EXTRA
    )
    output = SpeedPixHook().run("wf-images-only", {"text": "x"}, poll_interval=0.05, timeout=10)
    assert list(output) == ["images"] and len(output["images"]) == 2


# ---------------------------------------------------------------------- trigger
class LinkedClock(FakeClock):
    """The trigger's clock: its sleeps move the emulator's manual clock, so the task advances exactly as
    far as the trigger waited and nothing really waits."""

    def __init__(self, server: Any) -> None:
        super().__init__()
        self.server = server

    def sleep(self, seconds: float) -> None:
        super().sleep(seconds)
        self.server.clock.advance(seconds)


def test_trigger_event_and_log_carry_every_new_field(emu, monkeypatch, capsys):
    create("sleep-2"), create("sleep-2")
    created_wall = emu.clock.time()
    prediction_id = create("wf-images-only")  # third in a one-slot queue
    LinkedClock(emu).install(monkeypatch, trigger_module)
    capsys.readouterr()

    async def one_event() -> dict:
        trigger = SpeedPixPredictionTrigger(prediction_id, poll_interval=0.1, max_poll_interval=0.5)
        events = [event.payload async for event in trigger.run()]
        assert len(events) == 1
        return events[0]

    event = asyncio.run(one_event())
    assert event["status"] == "success"
    assert event["output"] is None
    assert [urlsplit(url).path.rsplit("/", 1)[-1] for url in event["images"]] == [
        "ComfyUI_00001_.png",
        "ComfyUI_00002_.png",
    ]
    assert event["run_seconds"] == 0.9
    # queued behind two 2 s tasks (each 0.2 s dispatch + 1.8 s running): starts at 0.2 + 1.8 + 1.8 = 3.8 s
    begin_ms = round((created_wall + 3.8) * 1000)
    assert event["started_at"] == datetime.fromtimestamp(begin_ms / 1000, tz=UTC).isoformat()
    assert event["finished_at"] == datetime.fromtimestamp((begin_ms + 900) / 1000, tz=UTC).isoformat()
    assert event["workflow_id"] == "wf-images-only" and event["invoke_id"]
    finished = prediction_from_event(event)
    assert finished.images == event["images"] and finished.started_at.tzinfo is UTC

    out = capsys.readouterr().out
    lines = [
        line.split(f"Prediction {prediction_id} ", 1)[1].split(" [", 1)[0]
        for line in out.splitlines()
        if f"Prediction {prediction_id} " in line
    ]
    assert lines[0].startswith("queued, 1 ahead, ETA ")
    assert any(line.startswith("queued, ETA ") for line in lines)  # next in line: nobody ahead
    running = [line for line in lines if line.startswith("running")]
    assert running and all(
        re.fullmatch(r"running \d+% \(\w+, step \d+/\d+\), ETA (\d+|<1) s", r) for r in running
    )
    assert len(lines) == len(set(lines))  # on change only


# ---------------------------------------------------------------------- the log line itself
class Recorder:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, message: str, *args: Any) -> None:
        self.lines.append(message % args)


def at(status: str, progress: float | None = None, **fields: Any) -> Prediction:
    return Prediction(id="p-1", status=status, progress=progress, **fields)


def test_log_progress_shows_percentages_queue_and_node_on_change_only():
    log, last = Recorder(), None
    for prediction in [
        at("waiting", 0, queue_position=3, eta_seconds=40.2),
        at("waiting", 0, queue_position=3, eta_seconds=38.0),  # only the ETA moved: not logged
        at("waiting", 0, queue_position=2, eta_seconds=30.0),
        at("waiting", 0, queue_position=0, eta_seconds=12.0),
        at("running", 0.02, node="LoadImage", step=1, steps=1, eta_seconds=9.4),
        at("running", 0.421, node="KSampler", step=12, steps=20, eta_seconds=7.2),
        at("running", 0.428, node="KSampler", step=12, steps=20, eta_seconds=7.0),  # same 42 %, same step
        at("running", 0.43, node="KSampler", step=13, steps=20, eta_seconds=6.8),
        at("running", 0.9, eta_seconds=None),  # a gateway without state or ETA
        at("running", 0.95, eta_seconds=0.4),
        at("running", None, node="VAEDecode", step=2),
        at("succeeded", 1.0),  # finished: the task's own line says so
    ]:
        last = log_progress(log, prediction, last)
    assert log.lines == [
        "Prediction p-1 queued, 3 ahead, ETA 40 s",
        "Prediction p-1 queued, 2 ahead, ETA 30 s",
        "Prediction p-1 queued, ETA 12 s",
        "Prediction p-1 running 2% (LoadImage, step 1/1), ETA 9 s",
        "Prediction p-1 running 42% (KSampler, step 12/20), ETA 7 s",
        "Prediction p-1 running 43% (KSampler, step 13/20), ETA 7 s",
        "Prediction p-1 running 90%",
        "Prediction p-1 running 95%, ETA <1 s",
        "Prediction p-1 running (VAEDecode, step 2)",
    ]


def test_percentage_gateway_shows_the_same_percent():
    assert describe_progress(at("running", 0.42)) == describe_progress(
        Prediction.from_dict({"id": "p-1", "status": "running", "progress": 0.42})
    )
    assert describe_progress(at("running", 0.42)) == "running 42%"


def test_sensor_poke_logs_on_change_only(emulator, monkeypatch, capsys):
    """The sensor (poke mode, one instance across pokes) uses the same helper and remembers what it said."""
    from airflow_provider_speedpix.sensors.speedpix import SpeedPixPredictionSensor

    use_speedpix_connection(
        monkeypatch, host=emulator.url, login=emulator.app_key, password=emulator.app_secret, extra=EXTRA
    )
    prediction_id = create("sleep-100")
    sensor = SpeedPixPredictionSensor(task_id="wait", prediction_id=prediction_id)
    capsys.readouterr()
    for _ in range(3):
        assert sensor.poke({}) is False
    lines = [line for line in capsys.readouterr().out.splitlines() if f"Prediction {prediction_id}" in line]
    assert len(lines) == 1, lines
    assert f"Prediction {prediction_id} queued, ETA 100 s" in lines[0]


def test_prediction_event_round_trip_is_plain_json():
    import json

    finished = Prediction(
        id="p-1",
        status="succeeded",
        output={"images": {"url": "https://h/o.png"}},
        images=["https://h/o.png", "https://h/1.png"],
        run_seconds=0.9,
        started_at=datetime(2026, 11, 30, 0, 53, 20, 100000, tzinfo=UTC),
        finished_at=datetime(2026, 11, 30, 0, 53, 21, tzinfo=UTC),
        workflow_id="wf-1",
        invoke_id="inv-1",
    )
    event = json.loads(json.dumps(prediction_event(finished)))
    again = prediction_from_event(event)
    for name in (
        "id",
        "status",
        "output",
        "images",
        "run_seconds",
        "started_at",
        "finished_at",
        "workflow_id",
    ):
        assert getattr(again, name) == getattr(finished, name), name
    # an event from before this version (no timing keys) still finishes
    old = prediction_from_event({"status": "success", "prediction_id": "p-2", "output": {"a": 1}})
    assert (old.status, old.output, old.images, old.run_seconds, old.started_at) == (
        "succeeded",
        {"a": 1},
        [],
        None,
        None,
    )
