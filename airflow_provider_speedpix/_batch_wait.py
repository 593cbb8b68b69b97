"""Reading a batch's predictions (read-only): what one status answer means for the window, one polling
round on the worker (``deferrable=False``), and re-reading what the trigger saw finish. The trigger
(:mod:`triggers.batch`) polls the same way on the event loop, with the same :func:`verdict` and
:func:`poll_budget`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

from airflow_provider_speedpix._concurrency import concurrently
from airflow_provider_speedpix._polling import LAST_POLL_SECONDS
from airflow_provider_speedpix._protocol import PROGRESS, Prediction
from airflow_provider_speedpix._retry import should_retry
from airflow_provider_speedpix.exceptions import SpeedPixError, SpeedPixNotFoundError

#: The status reported for a prediction SpeedPix does not know (expired): the worker submits it anew.
LOST = "lost"

Verdict = Literal["lost", "fatal", "retry"]


def verdict(error: BaseException) -> Verdict:
    """What a failed status poll means for the window: ``lost`` (unknown to SpeedPix: submit anew),
    ``fatal`` (a failure another poll will not fix) or ``retry`` (a failed poll to sit out)."""
    if isinstance(error, SpeedPixNotFoundError):
        return "lost"
    return "retry" if should_retry(PROGRESS, error) else "fatal"


def poll_budget(wake_at: float | None, now: float) -> float | None:
    """Seconds one poll (requests, retries, backoff) may take: the time left before ``wake_at``, but at
    least ``LAST_POLL_SECONDS`` (as ``_polling.PollLoop.poll_budget``); ``None`` without a wake-up."""
    return None if wake_at is None else max(wake_at - now, LAST_POLL_SECONDS)


@dataclass
class PollRound:
    """One round over the window: the finished predictions (id -> :class:`Prediction` or :data:`LOST`)
    and the polls that failed (sat out)."""

    finished: dict[str, Any] = field(default_factory=dict)
    failures: int = 0
    last_error: SpeedPixError | None = None


def poll_round(hook: Any, prediction_ids: list[str], *, wake_at: float | None) -> PollRound:
    """Poll each prediction once from the worker, each poll bounded by :func:`poll_budget`; a ``fatal``
    failure is raised."""
    polled = PollRound()
    for prediction_id in prediction_ids:
        try:
            prediction = hook.get_prediction(prediction_id, time_left=poll_budget(wake_at, time.time()))
        except SpeedPixError as err:
            said = verdict(err)
            if said == "fatal":
                raise
            if said == "lost":
                polled.finished[prediction_id] = LOST
            else:
                polled.failures += 1
                polled.last_error = err
            continue
        if prediction.finished:
            polled.finished[prediction_id] = prediction
    return polled


def finished_of(event: Any) -> tuple[dict[str, str], list[str]]:
    """The ``finished`` map (id -> status) and the ``due`` ids (expected to end within moments) of a
    :class:`SpeedPixBatchTrigger` event; raise for an ``error`` event or one the trigger does not send."""
    if not isinstance(event, dict) or event.get("status") not in ("success", "error"):
        raise SpeedPixError(f"Unexpected event from SpeedPixBatchTrigger: {event!r:.300}")
    if event["status"] == "error":
        code = f" [{event['error_code']}]" if event.get("error_code") else ""
        raise SpeedPixError(
            f"Waiting for the batch's predictions failed{code}: {event.get('message')}. A retry of this "
            "task reconnects to every recorded prediction."
        )
    finished = event.get("finished")
    due = event.get("due")
    return (
        finished if isinstance(finished, dict) else {},
        [p for p in due if isinstance(p, str)] if isinstance(due, list) else [],
    )


def read_finished(hook: Any, finished: dict[str, str]) -> dict[str, Any]:
    """Read each prediction the trigger saw finish again (its event carries no URLs), ``CONCURRENCY`` at
    a time: id -> :class:`Prediction`, or :data:`LOST` for one SpeedPix does not know."""
    read: dict[str, Any] = {p: LOST for p, status in finished.items() if status == LOST}
    ids = [p for p in finished if p not in read]
    for prediction_id, answer in zip(ids, concurrently(hook.get_prediction, ids), strict=True):
        if isinstance(answer, SpeedPixNotFoundError):
            read[prediction_id] = LOST
        elif isinstance(answer, BaseException):
            raise answer
        else:
            read[prediction_id] = answer
    return read


def read_due(hook: Any, due: list[str]) -> dict[str, Any]:
    """Those of ``due`` that have finished by now (id -> :class:`Prediction`); the rest, and any read
    that fails, are left to the next wait."""
    answers = concurrently(hook.get_prediction, due)
    return {p: a for p, a in zip(due, answers, strict=True) if isinstance(a, Prediction) and a.finished}
