"""SpeedPixBatchTrigger: wait on the triggerer until enough predictions of a batch's window finished."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from airflow.triggers.base import TriggerEvent

from airflow_provider_speedpix._batch_wait import LOST, poll_budget, verdict
from airflow_provider_speedpix._outcome import MAX_CONSECUTIVE_ERRORS, check_positive
from airflow_provider_speedpix._polling import next_poll_delay
from airflow_provider_speedpix._protocol import Prediction
from airflow_provider_speedpix.exceptions import SpeedPixError
from airflow_provider_speedpix.hooks.speedpix import SpeedPixHook
from airflow_provider_speedpix.triggers._base import SpeedPixTrigger

__all__ = ["BATCH_EVENT_STATUSES", "LOST", "SpeedPixBatchTrigger"]

#: ``success``: enough finished (or the wake-up time came); ``error``: polling failed for good.
BATCH_EVENT_STATUSES = ("success", "error")
#: Status polls in flight at once per trigger (the shared client also caps its connections).
MAX_CONCURRENT_POLLS = 16
#: Prediction ids quoted in the ``on_kill`` warning (the rest are counted).
IDS_IN_KILL_WARNING = 5
#: A prediction still running whose ETA is at most this is listed in the event as ``due``: it will most
#: likely have ended by the time the worker resumes (a few seconds), which reads it in the same round.
DUE_SECONDS = 5.0


async def _sleep(seconds: float) -> None:
    """The one wait between polling rounds (tests replace it to run without sleeping)."""
    await asyncio.sleep(seconds)


class SpeedPixBatchTrigger(SpeedPixTrigger):
    """Poll a set of predictions (read-only, the triggerer's shared HTTP client, at most
    ``max_concurrency`` requests at once) and yield one event when ``min_finished`` of them finished, all
    of them did, or ``wake_at`` passed (to top the window up after a backoff, or to time items out).

    The event is small: ``{"status": "success", "finished": {prediction_id: status}, "pending": n,
    "message"}`` with ``status`` ``succeeded`` / ``failed`` / ``canceled`` / ``lost`` per finished
    prediction; no output URLs (they may be signed): the worker reads each finished prediction again.
    Polling failures that another poll may fix are sat out (``max_consecutive_errors`` rounds in a row in
    which every poll failed give an ``error`` event). Nothing is created or changed here, no metrics are
    emitted, and the kwargs hold ids and times only.

    Like :class:`~airflow_provider_speedpix.triggers.speedpix.SpeedPixPredictionTrigger`, it holds the
    loop's shared client for its whole run (released when the run ends and in :meth:`cleanup`), bounds
    each poll by the time left before ``wake_at`` (``_batch_wait.poll_budget``), and its
    :meth:`on_kill` warns that the predictions still in flight keep running and billing.

    :param prediction_ids: the predictions to watch.
    :param min_finished: how many must have finished before the event (capped at the number watched).
    :param wake_at: wall-clock UNIX time at which to fire with whatever finished; ``None``: no limit.
    :param not_before: wall-clock UNIX time before which no event is sent: the operator sets it
        ``_outcome.DEFER_HOLD_SECONDS`` after the deferral, a workaround for an Airflow race (docs/batch.md,
        "Shortest round"). Until then the trigger goes on polling, so a round resumes with all that finished.
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
        self._pending: list[str] = list(dict.fromkeys(self.prediction_ids))

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

    async def on_kill(self) -> None:
        """A user marked the deferred task failed or success, or cleared it: say that the predictions in
        flight keep running (and billing), since SpeedPix has no cancel call. Silent after the final event
        (Airflow may call this then too); never raises, never waits on the network."""
        if self._final_event_sent:
            return
        with contextlib.suppress(Exception):  # a log call must never turn a kill into an error
            shown = ", ".join(self._pending[:IDS_IN_KILL_WARNING])
            more = len(self._pending) - IDS_IN_KILL_WARNING
            self.log.warning(
                "Stopped waiting for %d SpeedPix predictions of this batch (%s%s), but they keep running and "
                "are billed until they finish: SpeedPix has no cancel call. A new try of the task reconnects "
                "to them (their ids are in task_state_store).",
                len(self._pending),
                shown or "-",
                f" and {more} more" if more > 0 else "",
            )

    async def _wait(self) -> TriggerEvent:
        """Poll until there is something to tell: the one event ``run`` yields."""
        hook = SpeedPixHook(speedpix_conn_id=self.speedpix_conn_id)
        slots = asyncio.Semaphore(self.max_concurrency)
        finished: dict[str, str] = {}
        error_rounds = 0
        last_error: BaseException | None = None

        async def poll(prediction_id: str) -> Prediction | BaseException:
            async with slots:
                try:
                    return await hook.aget_prediction(
                        prediction_id, time_left=poll_budget(self.wake_at, time.time())
                    )
                except SpeedPixError as err:
                    return err

        while True:
            pending = self._pending
            answers = await asyncio.gather(*(poll(p) for p in pending)) if pending else []
            delays: list[float] = []
            due: list[str] = []
            failures = 0
            for prediction_id, answer in zip(pending, answers, strict=True):
                if isinstance(answer, BaseException):
                    said = verdict(answer)
                    if said == "fatal":
                        return self._error(f"Polling prediction {prediction_id} failed: {answer}", answer)
                    if said == "lost":
                        finished[prediction_id] = LOST
                    else:
                        failures += 1
                        last_error = answer
                elif answer.finished:
                    finished[prediction_id] = answer.status
                else:
                    eta = answer.eta_seconds if answer.status == "running" else None
                    if eta is not None and eta <= DUE_SECONDS:
                        due.append(prediction_id)
                    delays.append(
                        next_poll_delay(
                            answer, poll_interval=self.poll_interval, max_interval=self.max_poll_interval
                        )
                    )
            self._pending = [p for p in pending if p not in finished]
            error_rounds = error_rounds + 1 if answers and failures == len(answers) else 0
            if error_rounds >= self.max_consecutive_errors:
                return self._error(
                    f"Gave up after {error_rounds} polling rounds in a row failed: {last_error}", last_error
                )
            now = time.time()
            woke = self.wake_at is not None and now >= self.wake_at
            enough = len(finished) >= max(1, self.min_finished) or (self.prediction_ids and not self._pending)
            early = self.not_before is not None and now < self.not_before
            if (enough or woke) and not early:
                return TriggerEvent(
                    {
                        "status": "success",
                        "finished": finished,
                        "due": due,
                        "pending": len(self._pending),
                        "message": f"{len(finished)} of {len(self.prediction_ids)} predictions finished",
                    }
                )
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
