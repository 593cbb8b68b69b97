"""SpeedPixBatchTrigger: wait on the triggerer until enough predictions of a batch's window finished."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_provider_speedpix._outcome import MAX_CONSECUTIVE_ERRORS, check_positive
from airflow_provider_speedpix._polling import next_poll_delay
from airflow_provider_speedpix._protocol import PROGRESS, Prediction
from airflow_provider_speedpix._retry import should_retry
from airflow_provider_speedpix.exceptions import SpeedPixError, SpeedPixNotFoundError
from airflow_provider_speedpix.hooks.speedpix import SpeedPixHook

__all__ = ["BATCH_EVENT_STATUSES", "LOST", "SpeedPixBatchTrigger"]

#: ``success``: enough finished (or the wake-up time came); ``error``: polling failed for good.
BATCH_EVENT_STATUSES = ("success", "error")
#: The status reported for a prediction SpeedPix does not know (expired): the worker submits it anew.
LOST = "lost"
#: Status polls in flight at once per trigger (the shared client also caps its connections).
MAX_CONCURRENT_POLLS = 16


async def _sleep(seconds: float) -> None:
    """The one wait between polling rounds (tests replace it to run without sleeping)."""
    await asyncio.sleep(seconds)


class SpeedPixBatchTrigger(BaseTrigger):
    """Poll a set of predictions (read-only, the triggerer's shared HTTP client, at most
    ``max_concurrency`` requests at once) and yield one event when ``min_finished`` of them finished, all
    of them did, or ``wake_at`` passed (to top the window up after a backoff, or to time items out).

    The event is small: ``{"status": "success", "finished": {prediction_id: status}, "pending": n,
    "message"}`` with ``status`` ``succeeded`` / ``failed`` / ``canceled`` / ``lost`` per finished
    prediction; no output URLs (they may be signed): the worker reads each finished prediction again.
    Polling failures that another poll may fix are sat out (``max_consecutive_errors`` rounds in a row in
    which every poll failed give an ``error`` event). Nothing is created or changed here, no metrics are
    emitted, and the kwargs hold ids and times only.

    :param prediction_ids: the predictions to watch.
    :param min_finished: how many must have finished before the event (capped at the number watched).
    :param wake_at: wall-clock UNIX time at which to fire with whatever finished; ``None``: no limit.
    :param not_before: wall-clock UNIX time before which no ``success`` event is sent (see
        ``SpeedPixBatchRunOperator``'s ``min_defer_seconds``).
    """

    def __init__(
        self,
        prediction_ids: list[str],
        min_finished: int = 1,
        speedpix_conn_id: str = SpeedPixHook.default_conn_name,
        poll_interval: float = 5.0,
        max_poll_interval: float = 60.0,
        wake_at: float | None = None,
        not_before: float | None = None,
        max_concurrency: int = MAX_CONCURRENT_POLLS,
        max_consecutive_errors: int = MAX_CONSECUTIVE_ERRORS,
    ) -> None:
        super().__init__()
        self.prediction_ids = list(prediction_ids)
        self.min_finished = max(0, min(int(min_finished), len(self.prediction_ids)))
        self.speedpix_conn_id = speedpix_conn_id
        self.poll_interval = check_positive("poll_interval", poll_interval)
        self.max_poll_interval = max(max_poll_interval, poll_interval)
        self.wake_at = wake_at
        self.not_before = not_before
        self.max_concurrency = max(1, int(max_concurrency))
        self.max_consecutive_errors = max_consecutive_errors

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "prediction_ids": self.prediction_ids,
                "min_finished": self.min_finished,
                "speedpix_conn_id": self.speedpix_conn_id,
                "poll_interval": self.poll_interval,
                "max_poll_interval": self.max_poll_interval,
                "wake_at": self.wake_at,
                "not_before": self.not_before,
                "max_concurrency": self.max_concurrency,
                "max_consecutive_errors": self.max_consecutive_errors,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        hook = SpeedPixHook(speedpix_conn_id=self.speedpix_conn_id)
        slots = asyncio.Semaphore(self.max_concurrency)
        finished: dict[str, str] = {}
        pending = list(dict.fromkeys(self.prediction_ids))
        error_rounds = 0
        last_error: BaseException | None = None

        async def poll(prediction_id: str) -> Prediction | BaseException:
            async with slots:
                try:
                    return await hook.aget_prediction(prediction_id)
                except SpeedPixError as err:
                    return err

        while True:
            answers = await asyncio.gather(*(poll(p) for p in pending)) if pending else []
            delays: list[float] = []
            failures = 0
            for prediction_id, answer in zip(pending, answers, strict=True):
                if isinstance(answer, SpeedPixNotFoundError):
                    finished[prediction_id] = LOST
                elif isinstance(answer, BaseException):
                    if not should_retry(PROGRESS, answer):
                        yield self._error(f"Polling prediction {prediction_id} failed: {answer}", answer)
                        return
                    failures += 1
                    last_error = answer
                elif answer.finished:
                    finished[prediction_id] = answer.status
                else:
                    delays.append(
                        next_poll_delay(
                            answer, poll_interval=self.poll_interval, max_interval=self.max_poll_interval
                        )
                    )
            pending = [p for p in pending if p not in finished]
            error_rounds = error_rounds + 1 if answers and failures == len(answers) else 0
            if error_rounds >= self.max_consecutive_errors:
                yield self._error(
                    f"Gave up after {error_rounds} polling rounds in a row failed: {last_error}", last_error
                )
                return
            now = time.time()
            woke = self.wake_at is not None and now >= self.wake_at
            enough = len(finished) >= max(1, self.min_finished) or (self.prediction_ids and not pending)
            early = self.not_before is not None and now < self.not_before
            if (enough or woke) and not early:
                yield TriggerEvent(
                    {
                        "status": "success",
                        "finished": finished,
                        "pending": len(pending),
                        "message": f"{len(finished)} of {len(self.prediction_ids)} predictions finished",
                    }
                )
                return
            if failures:
                self.log.warning(
                    "%d of %d status polls failed (%s); polling again", failures, len(answers), last_error
                )
            delay = min(delays) if delays else self.poll_interval
            if failures:
                delay = min(self.max_poll_interval, self.poll_interval * 2 ** min(error_rounds, 6))
            if self.wake_at is not None:
                delay = min(delay, max(0.0, self.wake_at - now))
            if early and (enough or woke):
                delay = self.not_before - now  # type: ignore[operator]  # early implies not_before is set
            await _sleep(delay)

    def _error(self, message: str, error: BaseException | None) -> TriggerEvent:
        return TriggerEvent(
            {"status": "error", "message": message, "error_code": getattr(error, "error_code", None)}
        )
