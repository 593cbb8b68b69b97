"""SpeedPixPredictionTrigger: ``run()`` driven directly with asyncio against the emulator (no Airflow DB)."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from typing import Any

import pytest

from airflow_provider_speedpix import _transport as transport_module
from airflow_provider_speedpix._protocol import Prediction
from airflow_provider_speedpix.exceptions import (
    SpeedPixError,
    SpeedPixPredictionFailed,
    SpeedPixTimeoutError,
)
from airflow_provider_speedpix.hooks.speedpix import SpeedPixHook
from airflow_provider_speedpix.triggers import speedpix as trigger_module
from airflow_provider_speedpix.triggers.speedpix import (
    SpeedPixPredictionTrigger,
    prediction_event,
    raise_for_event,
)
from tests.conftest import FakeClock, use_speedpix_connection

CLASSPATH = "airflow_provider_speedpix.triggers.speedpix.SpeedPixPredictionTrigger"


async def collect(trigger: SpeedPixPredictionTrigger, limit: float = 30.0) -> list[dict[str, Any]]:
    """Run the generator to its end (bounded): a trigger that keeps going after its event fails here."""

    async def drain() -> list[dict[str, Any]]:
        return [event.payload async for event in trigger.run()]

    return await asyncio.wait_for(drain(), timeout=limit)


def run_trigger(trigger: SpeedPixPredictionTrigger, limit: float = 30.0) -> dict[str, Any]:
    """The one event the trigger yields (asserts there is exactly one and the generator ended)."""
    events = asyncio.run(collect(trigger, limit))
    assert len(events) == 1, events
    return events[0]


def create(workflow_id: str = "sleep-1") -> Prediction:
    return SpeedPixHook().create_prediction(workflow_id, {"text": "x"})


def rebuild(trigger: SpeedPixPredictionTrigger) -> SpeedPixPredictionTrigger:
    """What a triggerer does after a restart: import the classpath, call it with the stored kwargs."""
    from airflow.models.trigger import Trigger
    from airflow.sdk._shared.module_loading import import_string

    classpath, kwargs = trigger.serialize()
    stored = Trigger._decrypt_kwargs(Trigger.encrypt_kwargs(kwargs))  # the metadata DB round trip
    return import_string(classpath)(**stored)


# ---------------------------------------------------------------------- serialization
def test_serialize_round_trip_plain_json_without_secret(speedpix_conn):
    before = time.time()
    trigger = SpeedPixPredictionTrigger(
        prediction_id="p-123",
        speedpix_conn_id="speedpix_default",
        poll_interval=0.5,
        max_poll_interval=7.0,
        deadline=time.time() + 600,
        created_at=before,
        estimated_duration=12.0,
        max_consecutive_errors=4,
        not_before=before + 10,
    )
    classpath, kwargs = trigger.serialize()
    assert classpath == CLASSPATH
    assert kwargs["not_before"] == before + 10
    text = json.dumps(kwargs)  # plain JSON types only
    assert json.loads(text) == kwargs
    assert speedpix_conn.app_secret not in text
    assert speedpix_conn.app_key not in text
    assert kwargs["prediction_id"] == "p-123"
    # an absolute wall-clock time (survives a restart), not a duration or a monotonic reading
    assert isinstance(kwargs["deadline"], float)
    assert before + 599 < kwargs["deadline"] < time.time() + 601

    again = rebuild(trigger)
    assert type(again) is SpeedPixPredictionTrigger
    assert again.serialize() == (classpath, kwargs)


def test_kwargs_survive_airflow_setting_its_own_attributes():
    trigger = SpeedPixPredictionTrigger(prediction_id="p-1")
    # the triggerer sets these on every instance; they must not clobber what we poll
    trigger.task_id = "sensor"
    trigger.trigger_id = 42
    assert trigger.serialize()[1]["prediction_id"] == "p-1"
    assert trigger.prediction_id == "p-1"


# ---------------------------------------------------------------------- the hold after a deferral
@pytest.mark.parametrize("workflow", ["sleep-0.1", "wf-fail"])
def test_event_is_held_until_not_before(speedpix_conn, workflow):
    """Whatever the event (here success and failed), it goes out no sooner than ``not_before``: a
    prediction that ends within seconds of its deferral would otherwise meet Airflow's stale executor
    event (``_outcome.DEFER_HOLD_SECONDS``). The prediction is read once it ended, not again after."""
    speedpix_conn.configure(duration=0.1)
    prediction = create(workflow)
    hold = 1.5
    started = time.time()
    event = run_trigger(
        SpeedPixPredictionTrigger(prediction.id, poll_interval=0.1, not_before=started + hold)
    )
    assert time.time() - started >= hold
    assert event["prediction_id"] == prediction.id
    assert event["status"] == ("success" if workflow == "sleep-0.1" else "failed")
    assert speedpix_conn.stats()["calls"]["comfy_get_result"] == 1


def test_deferral_holds_the_event_for_defer_hold_seconds(monkeypatch):
    """Operator and sensor defer through ``defer_to_trigger``: its trigger's ``not_before`` is
    ``DEFER_HOLD_SECONDS`` from the deferral (and absent when the hold is 0, as in the other tests)."""
    from airflow_provider_speedpix import _outcome

    assert (
        _outcome.defer_to_trigger("p-1", speedpix_conn_id="c", poll_interval=5.0, timeout=None)[
            "trigger"
        ].not_before
        is None
    )
    monkeypatch.setattr(_outcome, "DEFER_HOLD_SECONDS", 10.0)
    before = time.time()
    trigger = _outcome.defer_to_trigger("p-1", speedpix_conn_id="c", poll_interval=5.0, timeout=None)[
        "trigger"
    ]
    assert before + 10.0 <= trigger.not_before <= time.time() + 10.0
    assert rebuild(trigger).not_before == trigger.not_before  # kept across a triggerer restart


# ---------------------------------------------------------------------- terminal events
def test_success_event_once_with_output(speedpix_conn):
    prediction = create("sleep-1")
    event = run_trigger(SpeedPixPredictionTrigger(prediction.id, poll_interval=0.1))
    assert event["status"] == "success"
    assert event["prediction_id"] == prediction.id
    assert event["prediction_status"] == "succeeded"
    assert event["output"]["images"]["url"].startswith(speedpix_conn.url)
    # everything the operator needs to finish without another call (values: tests/test_progress.py)
    assert event["images"] == [event["output"]["images"]["url"]]
    assert event["run_seconds"] == 0.9
    assert event["started_at"] < event["finished_at"] and event["started_at"].endswith("+00:00")
    assert event["workflow_id"] == "sleep-1" and event["invoke_id"]
    json.dumps(event)  # the event crosses processes as JSON
    assert raise_for_event(event) is event
    calls = speedpix_conn.stats()["calls"]
    assert calls["comfy_get_result"] == 1  # fetched once, on the terminal poll only
    assert calls["comfy_prompt"] == 1


def test_failed_event_carries_code_and_message(speedpix_conn):
    prediction = create("wf-fail")
    event = run_trigger(SpeedPixPredictionTrigger(prediction.id, poll_interval=0.1))
    assert event["status"] == "failed"
    assert event["prediction_id"] == prediction.id
    assert event["error_code"] == "WORKFLOW_EXECUTION_FAILED"
    assert "KSampler" in event["message"]
    assert event["output"] is None
    with pytest.raises(SpeedPixPredictionFailed) as info:
        raise_for_event(event)
    assert info.value.error_code == "WORKFLOW_EXECUTION_FAILED"


def test_deadline_in_the_past_times_out_after_one_poll(speedpix_conn):
    prediction = create("sleep-30")
    event = run_trigger(
        SpeedPixPredictionTrigger(prediction.id, poll_interval=0.1, deadline=time.time() - 1), limit=5
    )
    assert event["status"] == "timeout"
    assert event["prediction_id"] == prediction.id
    assert event["prediction_status"] == "waiting"
    assert speedpix_conn.calls("comfy_get_progress") == 1


def test_short_deadline_times_out_on_time(speedpix_conn, monkeypatch):
    """Real polls, the trigger's clock faked: it sleeps exactly up to the deadline, then ends."""
    prediction = create("sleep-30")
    clock = FakeClock().install(monkeypatch, trigger_module)
    event = run_trigger(
        SpeedPixPredictionTrigger(prediction.id, poll_interval=0.2, deadline=clock.now + 1.0), limit=10
    )
    assert event["status"] == "timeout"
    assert event["prediction_status"] in ("waiting", "running")
    assert prediction.id in event["message"]
    assert sum(clock.sleeps) == pytest.approx(1.0)  # neither early nor past the deadline
    assert speedpix_conn.calls("comfy_get_progress") == len(clock.sleeps) + 1


def test_finished_prediction_wins_over_a_passed_deadline(speedpix_conn):
    prediction = create("sleep-0.2")
    time.sleep(0.4)  # setup only: let the emulated task finish before the trigger starts
    event = run_trigger(SpeedPixPredictionTrigger(prediction.id, deadline=time.time() - 10), limit=5)
    assert event["status"] == "success"


def test_wrong_secret_is_one_error_event_without_retries(speedpix_conn, monkeypatch):
    prediction = create("sleep-1")
    use_speedpix_connection(
        monkeypatch,
        host=speedpix_conn.url,
        login=speedpix_conn.app_key,
        password="not-the-secret",
        extra={"retry_delay": 0.01, "retry_max_delay": 0.05, "retry_limit": 3},
    )
    event = run_trigger(SpeedPixPredictionTrigger(prediction.id, poll_interval=0.05), limit=10)
    assert event["status"] == "error"
    assert event["prediction_id"] == prediction.id
    assert "App Secret" in event["message"]
    assert "not-the-secret" not in json.dumps(event)
    assert sum(speedpix_conn.stats()["rejected"].values()) == 1  # not retried: auth is not transient
    with pytest.raises(SpeedPixError, match="App Secret"):
        raise_for_event(event)


def test_unknown_prediction_is_one_error_event(speedpix_conn):
    event = run_trigger(SpeedPixPredictionTrigger("no-such-task", poll_interval=0.05), limit=10)
    assert event["status"] == "error"
    assert event["prediction_id"] == "no-such-task"
    assert "not found" in event["message"]
    assert event["error_code"]
    assert speedpix_conn.calls("comfy_get_progress") == 1


def test_missing_connection_and_env_is_an_error_event(monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_SPEEDPIX_DEFAULT", raising=False)
    event = run_trigger(SpeedPixPredictionTrigger("p-1", speedpix_conn_id="speedpix_nowhere"), limit=10)
    assert event["status"] == "error"
    assert "speedpix_nowhere" in event["message"]


# ---------------------------------------------------------------------- transient errors
@pytest.mark.parametrize("kind", ["503", "reset", "malformed"])
def test_transient_poll_errors_are_sat_out(speedpix_conn, kind):
    prediction = create("sleep-0.5")
    # retry_limit=2 in the connection: 6 faults = 3 failed trigger polls, each already retried by the hook
    speedpix_conn.inject("comfy_get_progress", kind, times=6)
    event = run_trigger(
        SpeedPixPredictionTrigger(prediction.id, poll_interval=0.05, max_consecutive_errors=4), limit=20
    )
    assert event["status"] == "success"
    assert speedpix_conn.stats()["faults_fired"]["comfy_get_progress"][kind] == 6
    assert speedpix_conn.calls("comfy_get_progress") >= 7


def test_consecutive_errors_exhausted_gives_one_error_event(speedpix_conn):
    prediction = create("sleep-1")
    speedpix_conn.inject("comfy_get_progress", "503", times=100)
    event = run_trigger(
        SpeedPixPredictionTrigger(
            prediction.id, poll_interval=0.01, max_poll_interval=0.02, max_consecutive_errors=3
        ),
        limit=20,
    )
    assert event["status"] == "error"
    assert "3 failed polls" in event["message"]
    assert speedpix_conn.calls("comfy_get_progress") == 3 * 2  # 3 trigger polls x retry_limit 2
    with pytest.raises(SpeedPixError, match="3 failed polls"):
        raise_for_event(event)


def test_transient_errors_until_the_deadline_give_timeout_not_error(speedpix_conn):
    prediction = create("sleep-30")
    speedpix_conn.inject("comfy_get_progress", "503", times=1000)
    event = run_trigger(
        SpeedPixPredictionTrigger(
            prediction.id, poll_interval=0.1, max_consecutive_errors=1000, deadline=time.time() + 1.0
        ),
        limit=10,
    )
    assert event["status"] == "timeout"
    assert event["prediction_status"] is None


# ---------------------------------------------------------------------- scripted (no network, no sleeping)
class Script:
    """Replace ``aget_prediction`` with a scripted sequence, and the trigger's clock and ``asyncio.sleep``
    with a fake clock that sleeping advances (no real waiting)."""

    def __init__(self, monkeypatch, steps: list[Any]) -> None:
        self.steps = list(steps)
        self.polls = 0
        self.budgets: list[float | None] = []
        self.clock = FakeClock().install(monkeypatch, trigger_module)
        self.sleeps = self.clock.sleeps
        script = self

        async def aget_prediction(hook, prediction_id, *, time_left=None):
            script.polls += 1
            script.budgets.append(time_left)
            step = script.steps.pop(0)
            if isinstance(step, BaseException):
                raise step
            return step

        monkeypatch.setattr(SpeedPixHook, "aget_prediction", aget_prediction)

    @property
    def now(self) -> float:
        return self.clock.now


def running(progress: float, eta: float | None = 5, status: str = "running") -> Prediction:
    return Prediction(id="p-1", status=status, progress=progress, eta_seconds=eta)


def test_progress_is_logged_only_when_it_changes(monkeypatch, capsys):
    done = Prediction(id="p-1", status="succeeded", progress=1.0, output={"images": {"url": "u"}})
    steps = [
        running(0, status="waiting"),
        running(0, status="waiting"),
        running(0.004, status="waiting"),  # same whole percent
        running(0.1),
        running(0.102),
        running(0.107),
        running(0.5),
        running(0.5),
        done,
    ]
    script = Script(monkeypatch, steps)
    capsys.readouterr()
    event = run_trigger(SpeedPixPredictionTrigger("p-1", poll_interval=1.0))
    assert event["status"] == "success"
    assert script.polls == 9
    assert len(script.sleeps) == 8
    captured = capsys.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines() if "Prediction p-1 " in line]
    assert len(lines) == 3, lines
    assert "Prediction p-1 queued, ETA 5 s" in lines[0]
    assert "Prediction p-1 running 10%, ETA 5 s" in lines[1]
    assert "Prediction p-1 running 50%, ETA 5 s" in lines[2]


def test_error_backoff_doubles_caps_and_resets_after_a_good_poll(monkeypatch):
    from airflow_provider_speedpix.exceptions import SpeedPixServerError

    def boom() -> SpeedPixServerError:
        return SpeedPixServerError("HTTP 503", operation="comfy_get_progress", status_code=503)

    done = Prediction(id="p-1", status="succeeded", output={})
    steps = [boom(), boom(), boom(), boom(), running(50, eta=None), boom(), done]
    script = Script(monkeypatch, steps)
    event = run_trigger(
        SpeedPixPredictionTrigger("p-1", poll_interval=1.0, max_poll_interval=5.0, max_consecutive_errors=5)
    )
    assert event["status"] == "success"
    # 1, 2, 4, then capped at 5; a good poll resets the count (so the last error waits 1 again)
    assert script.sleeps == [1.0, 2.0, 4.0, 5.0, 1.0, 1.0]


def test_sleeps_never_overshoot_the_deadline(monkeypatch):
    steps = [running(5, eta=600), running(6, eta=600)]
    script = Script(monkeypatch, steps)
    deadline = script.now + 3.0
    event = run_trigger(
        SpeedPixPredictionTrigger("p-1", poll_interval=1.0, max_poll_interval=60.0, deadline=deadline)
    )
    # far from the end a 60 s sleep would be due; the deadline (3 s away) bounds it, and the poll at the
    # deadline ends it
    assert script.sleeps == [pytest.approx(3.0)]
    assert script.polls == 2
    assert event["status"] == "timeout"
    assert event["prediction_status"] == "running"


# ---------------------------------------------------------------------- restart
def test_restart_rebuilds_from_kwargs_and_does_not_resubmit(clocked_conn, monkeypatch):
    # the emulator's clock stands still until the restart: the first trigger's poll always finds the
    # prediction unfinished, however late it comes
    emulator = clocked_conn
    prediction = create("sleep-1.5")
    trigger = SpeedPixPredictionTrigger(prediction.id, poll_interval=0.1, deadline=time.time() + 60)
    original = SpeedPixHook.aget_prediction
    first_poll = None

    async def spy(hook, prediction_id, **kwargs):
        result = await original(hook, prediction_id, **kwargs)
        first_poll.set()
        return result

    monkeypatch.setattr(SpeedPixHook, "aget_prediction", spy)

    async def die_after_first_poll() -> None:
        nonlocal first_poll
        first_poll = asyncio.Event()
        task = asyncio.create_task(collect(trigger))
        await asyncio.wait_for(first_poll.wait(), timeout=10)
        task.cancel()  # the triggerer dies while the trigger waits
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(die_after_first_poll())
    assert emulator.stats()["calls"]["comfy_get_result"] == 0  # it really was cut short

    emulator.clock.advance(1.5)  # the prediction finished while the triggerer was down
    event = run_trigger(rebuild(trigger))
    assert event["status"] == "success"
    assert event["prediction_id"] == prediction.id
    stats = emulator.stats()
    assert stats["calls"]["comfy_prompt"] == 1
    assert stats["predictions"] == 1


# ---------------------------------------------------------------------- one shared client
def test_many_triggers_share_one_client_per_loop(speedpix_conn, monkeypatch):
    created: list[transport_module.AsyncClient] = []

    class CountingClient(transport_module.AsyncClient):
        def __init__(self) -> None:
            super().__init__()
            created.append(self)

    monkeypatch.setattr(transport_module, "AsyncClient", CountingClient)
    ids = [create("sleep-1").id for _ in range(50)]

    async def main() -> tuple[list[list[dict]], transport_module.AsyncClient | None]:
        results = await asyncio.gather(
            *(collect(SpeedPixPredictionTrigger(i, poll_interval=0.2)) for i in ids)
        )
        return results, transport_module._ASYNC_CLIENTS.get(asyncio.get_running_loop())

    results, loop_client = asyncio.run(main())
    assert [len(events) for events in results] == [1] * 50
    assert {events[0]["status"] for events in results} == {"success"}
    assert sorted(events[0]["prediction_id"] for events in results) == sorted(ids)
    assert len(created) == 1
    # the last trigger to finish closed it (tests/test_trigger_lifecycle.py)
    assert loop_client is None and created[0].closed


# ---------------------------------------------------------------------- adaptive polling
def test_polling_adapts_to_eta_but_detects_the_end_promptly(speedpix_conn, monkeypatch):
    """Two sleep-8 predictions polled at poll_interval 0.5 in one loop: one trigger knows the estimate
    from the create call (as the operator passes it), one only sees progress ETAs (as the sensor)."""
    duration, poll = 8.0, 0.5
    polls: dict[str, int] = {}
    original = SpeedPixHook.aget_prediction

    async def counting(hook, prediction_id, **kwargs):
        polls[prediction_id] = polls.get(prediction_id, 0) + 1
        return await original(hook, prediction_id, **kwargs)

    monkeypatch.setattr(SpeedPixHook, "aget_prediction", counting)
    # Each prediction timed from just before its own create call: the emulator (in this process, on the
    # same monotonic clock) starts its task after that, so it cannot be seen finished sooner than
    # `duration` later, however long either create call takes.
    before_first = time.monotonic()
    with_estimate = create(f"sleep-{duration:g}")
    created_at = time.time()  # as the operator records it, just after its create call
    before_second = time.monotonic()
    eta_only = create(f"sleep-{duration:g}")
    before_create = {with_estimate.id: before_first, eta_only.id: before_second}
    finished: dict[str, float] = {}

    async def watch(trigger: SpeedPixPredictionTrigger) -> dict:
        [event] = await collect(trigger)
        finished[trigger.prediction_id] = time.monotonic() - before_create[trigger.prediction_id]
        return event

    async def main() -> list[dict]:
        return await asyncio.gather(
            watch(
                SpeedPixPredictionTrigger(
                    with_estimate.id,
                    poll_interval=poll,
                    created_at=created_at,
                    estimated_duration=with_estimate.estimated_duration,
                )
            ),
            watch(SpeedPixPredictionTrigger(eta_only.id, poll_interval=poll)),
        )

    events = asyncio.run(main())
    assert [e["status"] for e in events] == ["success", "success"]
    fixed = duration / poll  # what a fixed 0.5 s interval would need: 16 polls
    for prediction_id in (with_estimate.id, eta_only.id):
        assert polls[prediction_id] <= fixed / 2, polls
        # detection latency stays bounded by the poll interval (slack for a loaded machine)
        assert duration <= finished[prediction_id] <= duration + 2 * poll + 1.5, finished
    assert speedpix_conn.calls("comfy_get_progress") == sum(polls.values())


# ---------------------------------------------------------------------- never blocks the loop
def test_run_never_blocks_the_event_loop(speedpix_conn, monkeypatch):
    """No sync connection lookup or ``time.sleep`` on the loop thread, and no other blocking either.

    Blocking the loop would show as one long loop step: sleeping out a poll interval there (0.6 s, the
    first delay with no estimate), or waiting for the 1.5 s prediction. asyncio's debug mode times each
    step (a callback, or a task running to its next ``await``) and reports those longer than
    ``slow_callback_duration`` (0.5 s, under the shortest such blocking); the time the loop sits idle
    waiting for I/O or a timer is not counted, so a loaded machine descheduling the process then (or
    between heartbeats, as a wall-clock heartbeat measured) does not fail the test.
    """
    prediction = create("sleep-1.5")
    on_loop: list[str] = []
    loop_thread: list[int] = []

    def flag(name):
        def check(*args, **kwargs):
            if loop_thread and threading.get_ident() == loop_thread[0]:
                on_loop.append(name)
            return original[name](*args, **kwargs)

        return check

    original = {"get_connection": SpeedPixHook.get_connection, "sleep": time.sleep}
    monkeypatch.setattr(SpeedPixHook, "get_connection", staticmethod(flag("get_connection")))
    monkeypatch.setattr(time, "sleep", flag("sleep"))

    slow_steps: list[str] = []

    class SlowSteps(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("Executing "):  # asyncio's "Executing <step> took 0.6 seconds"
                slow_steps.append(record.getMessage())

    async def main() -> list[dict]:
        loop = asyncio.get_running_loop()
        assert loop.get_debug()
        loop.slow_callback_duration = 0.5
        loop_thread.append(threading.get_ident())
        return await collect(SpeedPixPredictionTrigger(prediction.id, poll_interval=0.6))

    # reported whatever logging configuration earlier tests (Airflow's) left behind
    asyncio_log = logging.getLogger("asyncio")
    handler, disabled, level = SlowSteps(logging.WARNING), asyncio_log.disabled, asyncio_log.level
    asyncio_log.disabled = False
    asyncio_log.setLevel(logging.WARNING)
    asyncio_log.addHandler(handler)
    try:
        events = asyncio.run(main(), debug=True)
    finally:
        asyncio_log.removeHandler(handler)
        asyncio_log.disabled = disabled
        asyncio_log.setLevel(level)
    assert [e["status"] for e in events] == ["success"]
    assert on_loop == []  # no sync connection lookup, no time.sleep on the loop thread
    assert slow_steps == []  # and nothing else held the loop for 0.5 s


# ---------------------------------------------------------------------- raise_for_event
@pytest.mark.parametrize(
    "event",
    [
        None,
        "success",
        [],
        {},
        {"status": "success"},  # no prediction id
        {"status": "success", "prediction_id": ""},
        {"status": "weird", "prediction_id": "p-1"},
        {"prediction_id": "p-1"},
    ],
)
def test_raise_for_event_rejects_malformed_events(event):
    with pytest.raises(SpeedPixError, match="Unexpected event") as info:
        raise_for_event(event)
    assert type(info.value) is SpeedPixError


def test_raise_for_event_failed():
    event = {
        "status": "failed",
        "prediction_id": "p-9",
        "prediction_status": "failed",
        "error_code": "WORKFLOW_EXECUTION_FAILED",
        "message": "Node #7 failed",
    }
    with pytest.raises(SpeedPixPredictionFailed) as info:
        raise_for_event(event)
    err = info.value
    assert (err.prediction_id, err.error_code, err.error_message) == (
        "p-9",
        "WORKFLOW_EXECUTION_FAILED",
        "Node #7 failed",
    )
    assert "p-9" in str(err) and "WORKFLOW_EXECUTION_FAILED" in str(err) and "Node #7 failed" in str(err)


def test_raise_for_event_timeout_names_the_prediction():
    event = {"status": "timeout", "prediction_id": "p-7", "prediction_status": "running", "message": "late"}
    with pytest.raises(SpeedPixTimeoutError) as info:
        raise_for_event(event, timeout=30)
    assert info.value.prediction_id == "p-7"
    assert info.value.last_status == "running"
    assert "p-7" in str(info.value) and "30s" in str(info.value)


def test_raise_for_event_error_keeps_code_and_message():
    event = {"status": "error", "prediction_id": "p-5", "error_code": "I400SG", "message": "bad signature"}
    with pytest.raises(SpeedPixError) as info:
        raise_for_event(event)
    assert type(info.value) is SpeedPixError
    assert "p-5" in str(info.value) and "I400SG" in str(info.value) and "bad signature" in str(info.value)


def test_prediction_event_for_failed_and_canceled():
    failed = Prediction(id="p-1", status="failed", error="boom", error_code="E1", message="execution failed")
    assert prediction_event(failed)["status"] == "failed"
    assert prediction_event(failed)["message"] == "boom"  # the error, not the progress message
    canceled = Prediction(id="p-2", status="canceled")
    with pytest.raises(SpeedPixPredictionFailed):
        raise_for_event(prediction_event(canceled))
