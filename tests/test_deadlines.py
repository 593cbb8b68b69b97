"""Issue #11 §6: a poll never outlives the deadline, and only a definite terminal answer ends a wait.

The deadline tests run over real sockets against the emulator with a fault that makes the progress call
hang or fail; the state tests script the API's answers (envelopes) for the one parser path every wait
uses (``get_prediction`` / ``aget_prediction``: sync wait, sensor poke, trigger, operator reconnect).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from airflow_provider_speedpix import _polling
from airflow_provider_speedpix import _protocol as proto
from airflow_provider_speedpix._polling import PollLoop
from airflow_provider_speedpix._retry import should_retry
from airflow_provider_speedpix.exceptions import (
    SpeedPixAPIError,
    SpeedPixNotFoundError,
    SpeedPixResponseError,
    SpeedPixServerError,
    SpeedPixTimeoutError,
)
from airflow_provider_speedpix.hooks.speedpix import SpeedPixHook
from airflow_provider_speedpix.triggers.speedpix import SpeedPixPredictionTrigger
from tests.conftest import use_emulator_connection
from tests.test_trigger import run_trigger

#: What a poll at the deadline may add in these tests (LAST_POLL_SECONDS is patched to it).
LAST_POLL = 0.5
#: Slack for a loaded machine on top of that.
SLACK = 1.5


@pytest.fixture
def patient_conn(speedpix_conn, monkeypatch):
    """Settings where one poll can take long: 10 s per request, 4 attempts, backoff 2-8 s. Without a
    bound, one poll with a hanging progress call takes 40 s and more (the defaults: up to ~165 s)."""
    use_emulator_connection(
        monkeypatch, speedpix_conn, retry_delay=2.0, retry_max_delay=8.0, retry_limit=4, timeout=10
    )
    monkeypatch.setattr(_polling, "LAST_POLL_SECONDS", LAST_POLL)
    return speedpix_conn


# ---------------------------------------------------------------------- deadline
@pytest.mark.parametrize("kind", ["slow", "503"])
def test_trigger_timeout_event_comes_right_after_the_deadline(patient_conn, kind):
    prediction = SpeedPixHook().create_prediction("sleep-30", {"text": "x"})
    patient_conn.inject("comfy_get_progress", kind, times=50, delay=30)
    started = time.monotonic()
    event = run_trigger(
        SpeedPixPredictionTrigger(prediction.id, poll_interval=0.2, deadline=time.time() + 1.0), limit=120
    )
    took = time.monotonic() - started
    assert event["status"] == "timeout"
    assert event["prediction_id"] == prediction.id
    assert took < 1.0 + LAST_POLL + SLACK, took


@pytest.mark.parametrize("kind", ["slow", "503"])
def test_sync_wait_times_out_right_after_its_timeout(patient_conn, kind):
    prediction = SpeedPixHook().create_prediction("sleep-30", {"text": "x"})
    patient_conn.inject("comfy_get_progress", kind, times=50, delay=30)
    started = time.monotonic()
    with pytest.raises(SpeedPixTimeoutError) as info:
        SpeedPixHook().wait_for_prediction(prediction.id, poll_interval=0.2, timeout=1.0)
    took = time.monotonic() - started
    assert info.value.prediction_id == prediction.id
    assert took < 1.0 + LAST_POLL + SLACK, took


def test_a_poll_at_the_deadline_still_gets_its_answer(speedpix_conn):
    """The bound never starves the last poll: a finished prediction wins over a passed deadline."""
    prediction = SpeedPixHook().create_prediction("sleep-0.1", {"text": "x"})
    time.sleep(0.3)  # setup only: the emulated task is finished
    event = run_trigger(SpeedPixPredictionTrigger(prediction.id, deadline=time.time() - 30), limit=10)
    assert event["status"] == "success"


def test_poll_budget_is_the_time_left_but_never_below_the_last_poll():
    loop = PollLoop(poll_interval=1.0, max_interval=10.0, deadline=100.0)
    assert loop.poll_budget(40.0) == 60.0
    assert loop.poll_budget(99.0) == _polling.LAST_POLL_SECONDS
    assert loop.poll_budget(500.0) == _polling.LAST_POLL_SECONDS
    assert PollLoop(poll_interval=1.0, max_interval=10.0).poll_budget(1.0) is None


# ---------------------------------------------------------------------- scripted answers
def envelope(data: Any = None, *, status: int = 10, code: str = "", sub: str = "", message: str = ""):
    return proto.Envelope(
        status=status,
        err_code=code,
        err_message=message,
        sub_err_code=sub,
        sub_err_message="",
        invoke_id="inv-1",
        data=data,
    )


def progress(status: str) -> proto.Envelope:
    return envelope({"taskId": "p-1", "status": status, "progress": 1 if status != "running" else 0.5})


SUCCEEDED = envelope(
    {"taskId": "p-1", "status": "succeeded", "result": {"images": {"url": "http://x/o.png"}}, "images": []}
)
TASK_FAILED = envelope(
    {"taskId": "p-1", "status": "failed"}, status=20, code="TaskFailed", sub="WORKFLOW_EXECUTION_FAILED"
)
NOT_FINISHED = envelope(
    {"taskId": "p-1", "status": "running"}, status=20, code="TaskNotFinished", sub="TASK_NOT_FINISHED"
)
NOT_FINISHED_NO_DATA = envelope(None, status=20, code="TaskNotFinished")
BUSY = envelope(None, status=20, code="InternalError", message="system busy")
RESULT_NOT_FOUND = envelope(None, status=20, code="TaskNotFound", sub="TASK_NOT_FOUND")


class Answers:
    """Replace the hook's sync and async API calls with scripted envelopes (or exceptions), in order."""

    def __init__(self, monkeypatch, answers: list[Any]) -> None:
        self.answers = list(answers)
        self.asked: list[str] = []
        script = self

        def answer(operation: str) -> proto.Envelope:
            script.asked.append(operation)
            item = script.answers.pop(0)
            if isinstance(item, BaseException):
                raise item
            return item

        def call(hook, operation, payload, **kwargs):
            return answer(operation)

        async def acall(hook, operation, payload, **kwargs):
            return answer(operation)

        monkeypatch.setattr(SpeedPixHook, "_call", call)
        monkeypatch.setattr(SpeedPixHook, "_acall", acall)


def get(mode: str) -> proto.Prediction:
    hook = SpeedPixHook()
    if mode == "sync":
        return hook.get_prediction("p-1")
    return asyncio.run(hook.aget_prediction("p-1"))


MODES = pytest.mark.parametrize("mode", ["sync", "async"])


@MODES
@pytest.mark.parametrize("said", ["succeeded", "failed"])
@pytest.mark.parametrize("result", [NOT_FINISHED, NOT_FINISHED_NO_DATA], ids=["with_data", "code_only"])
def test_result_not_ready_is_not_an_ending(monkeypatch, mode, said, result):
    """Progress says finished, the result call says not finished yet: poll again, never "failed"."""
    Answers(monkeypatch, [progress(said), result])
    prediction = get(mode)
    assert prediction.status == "running"
    assert not prediction.finished
    assert "not ready" in prediction.message


@MODES
@pytest.mark.parametrize(
    ("answer", "error", "match"),
    [(BUSY, SpeedPixServerError, "busy"), (RESULT_NOT_FOUND, SpeedPixResponseError, "TASK_NOT_FOUND")],
    ids=["busy_result_is_not_a_failed_prediction", "result_not_found_after_finished"],
)
def test_a_transient_result_answer_is_an_error_to_retry(monkeypatch, mode, answer, error, match):
    """Progress says succeeded, the result call answers busy or not found: a retryable error, no ending."""
    Answers(monkeypatch, [progress("succeeded"), answer])
    with pytest.raises(error, match=match) as info:
        get(mode)
    assert should_retry(proto.PROGRESS, info.value)


@MODES
def test_a_definite_failure_still_ends_as_failed(monkeypatch, mode):
    Answers(monkeypatch, [progress("failed"), TASK_FAILED])
    prediction = get(mode)
    assert prediction.status == "failed"
    assert prediction.error_code == "WORKFLOW_EXECUTION_FAILED"


@MODES
def test_a_result_with_outputs_wins_over_a_failed_progress_answer(monkeypatch, mode):
    Answers(monkeypatch, [progress("failed"), SUCCEEDED])
    prediction = get(mode)
    assert prediction.succeeded
    assert prediction.output == {"images": {"url": "http://x/o.png"}}


@MODES
def test_canceled_is_a_definite_ending(monkeypatch, mode):
    canceled = envelope({"taskId": "p-1", "status": "canceled"}, status=20, code="TaskCanceled")
    Answers(monkeypatch, [progress("canceled"), canceled])
    assert get(mode).status == "canceled"


def test_transient_envelope_codes_are_retried_for_reads_only():
    busy = SpeedPixAPIError("x", operation=proto.PROGRESS, error_code="ServiceUnavailable")
    assert should_retry(proto.PROGRESS, busy)
    assert should_retry(proto.RESULT, busy)
    assert not should_retry(proto.CREATE, busy)  # may have created (and billed) one already
    bad = SpeedPixAPIError("x", operation=proto.PROGRESS, error_code="InvalidParameter")
    assert not should_retry(proto.PROGRESS, bad)


def test_progress_envelope_busy_is_retried_by_the_hook(speedpix_conn, monkeypatch):
    """A busy envelope (HTTP 200, errCode InternalError) on a progress call is retried, not an error."""
    prediction = SpeedPixHook().create_prediction("sleep-0.1", {"text": "x"})
    time.sleep(0.3)
    real = proto.read_envelope
    busy = {"left": 1}

    def read_envelope(operation, status_code, headers, content, *, allow_failure=False):
        if operation == proto.PROGRESS and busy["left"]:
            busy["left"] -= 1
            content = b'{"status": 20, "errCode": "InternalError", "errMessage": "busy", "data": null}'
        return real(operation, status_code, headers, content, allow_failure=allow_failure)

    monkeypatch.setattr(proto, "read_envelope", read_envelope)
    assert SpeedPixHook().get_prediction(prediction.id).succeeded
    assert busy["left"] == 0


# ---------------------------------------------------------------------- through the waits
def test_trigger_keeps_waiting_through_a_result_not_ready(monkeypatch):
    Answers(
        monkeypatch,
        [progress("succeeded"), NOT_FINISHED, progress("succeeded"), BUSY, progress("succeeded"), SUCCEEDED],
    )
    from airflow_provider_speedpix.triggers import speedpix as trigger_module
    from tests.conftest import FakeClock

    FakeClock().install(monkeypatch, trigger_module)
    event = run_trigger(SpeedPixPredictionTrigger("p-1", poll_interval=1.0))
    assert event["status"] == "success"
    assert event["output"] == {"images": {"url": "http://x/o.png"}}


def test_sync_wait_keeps_waiting_through_a_result_not_ready(monkeypatch):
    from airflow_provider_speedpix.hooks import speedpix as hook_module
    from tests.conftest import FakeClock

    Answers(monkeypatch, [progress("failed"), NOT_FINISHED, progress("succeeded"), SUCCEEDED])
    FakeClock().install(monkeypatch, hook_module)
    done = SpeedPixHook().wait_for_prediction("p-1", poll_interval=1.0, timeout=60)
    assert done.succeeded


def test_unknown_status_is_sat_out_not_an_ending(monkeypatch):
    from airflow_provider_speedpix.triggers import speedpix as trigger_module
    from tests.conftest import FakeClock

    odd = envelope({"taskId": "p-1", "status": "preparing"})
    Answers(monkeypatch, [odd, odd, progress("succeeded"), SUCCEEDED])
    FakeClock().install(monkeypatch, trigger_module)
    event = run_trigger(SpeedPixPredictionTrigger("p-1", poll_interval=1.0, max_consecutive_errors=5))
    assert event["status"] == "success"


def test_not_found_right_after_create_is_sat_out(monkeypatch):
    from airflow_provider_speedpix.triggers import speedpix as trigger_module
    from tests.conftest import FakeClock

    missing = SpeedPixNotFoundError("task not found", operation=proto.PROGRESS, error_code="TaskNotFound")
    Answers(monkeypatch, [missing, missing, progress("succeeded"), SUCCEEDED])
    clock = FakeClock().install(monkeypatch, trigger_module)
    event = run_trigger(SpeedPixPredictionTrigger("p-1", poll_interval=1.0, created_at=clock.now))
    assert event["status"] == "success"


def test_not_found_long_after_create_or_for_a_foreign_id_ends_at_once():
    missing = SpeedPixNotFoundError("task not found", operation=proto.PROGRESS)
    fresh = PollLoop(poll_interval=1.0, max_interval=10.0, created_at=100.0)
    assert fresh.failed(missing, 110.0).action == "sleep"
    assert fresh.failed(missing, 100.0 + _polling.NOT_FOUND_GRACE + 1).action == "error"
    foreign = PollLoop(poll_interval=1.0, max_interval=10.0)  # the sensor: no creation time
    assert foreign.failed(missing, 110.0).action == "error"
