"""SpeedPixPredictionTrigger: wait for a prediction on the triggerer, not on a worker."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from airflow.triggers.base import TriggerEvent

from airflow_provider_speedpix._outcome import (
    EVENT_STATUSES,
    MAX_CONSECUTIVE_ERRORS,
    ProgressKey,
    check_positive,
    log_progress,
    prediction_event,
    raise_for_event,
)
from airflow_provider_speedpix._polling import PollLoop
from airflow_provider_speedpix.exceptions import SpeedPixError
from airflow_provider_speedpix.hooks.speedpix import SpeedPixHook
from airflow_provider_speedpix.triggers._base import SpeedPixTrigger

__all__ = ["EVENT_STATUSES", "SpeedPixPredictionTrigger", "prediction_event", "raise_for_event"]


class SpeedPixPredictionTrigger(SpeedPixTrigger):
    """Poll one prediction until it finishes, the deadline passes, or a non-retryable error occurs.

    Yields exactly one :class:`TriggerEvent` whose ``status`` is ``success``, ``failed``, ``timeout`` or
    ``error``. A finished prediction's event (:func:`prediction_event`, plain JSON) carries everything the
    task needs to finish without another API call: ``output``, ``images``, ``run_seconds``,
    ``started_at`` / ``finished_at`` (ISO-8601), ``workflow_id``, ``invoke_id``, and for a failure
    ``error_code`` and ``message``. Progress is logged on change only (``_outcome.log_progress``, the
    operator's and sensor's helper too); no metrics are emitted here (the worker does that on resume).
    Its kwargs hold ids and times only (never a secret); the credentials are looked up from
    ``speedpix_conn_id`` on the triggerer. All triggers of a triggerer share one HTTP connection pool,
    closed when the last of them ends. The waiting rules are ``SpeedPixHook.wait_for_prediction``'s (one
    :class:`_polling.PollLoop`): each poll, retries included, is bounded by the time left before the
    deadline, so the ``timeout`` event comes at most ``_polling.LAST_POLL_SECONDS`` after it.
    :meth:`on_kill` (a user marked the deferred task failed/success or cleared it) warns that the
    prediction keeps running: SpeedPix has no cancel call.

    :param prediction_id: the prediction to wait for.
    :param speedpix_conn_id: the SpeedPix connection.
    :param poll_interval: seconds between polls near the expected end (the detection latency bound).
    :param max_poll_interval: longest sleep between polls while the end is far away.
    :param deadline: wall-clock UNIX time after which a ``timeout`` event is sent; ``None`` waits forever.
    :param created_at: wall-clock UNIX time the prediction was created (for the initial estimate).
    :param estimated_duration: ``estimatedDurationInSeconds`` from the create call, if known.
    :param max_consecutive_errors: transient failures in a row (each already retried by the hook)
        before giving up with an ``error`` event.
    :param not_before: wall-clock UNIX time before which the event is held (see the base class).
    """

    def __init__(
        self,
        prediction_id: str,
        speedpix_conn_id: str = SpeedPixHook.default_conn_name,
        poll_interval: float = 5.0,
        max_poll_interval: float = 60.0,
        deadline: float | None = None,
        created_at: float | None = None,
        estimated_duration: float | None = None,
        max_consecutive_errors: int = MAX_CONSECUTIVE_ERRORS,
        not_before: float | None = None,
    ) -> None:
        super().__init__()
        self.prediction_id = prediction_id
        self.speedpix_conn_id = speedpix_conn_id
        self.poll_interval = check_positive("poll_interval", poll_interval)
        self.max_poll_interval = max(max_poll_interval, poll_interval)
        self.deadline = deadline
        self.created_at = created_at
        self.estimated_duration = estimated_duration
        self.max_consecutive_errors = max_consecutive_errors
        self.not_before = not_before

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "prediction_id": self.prediction_id,
                "speedpix_conn_id": self.speedpix_conn_id,
                "poll_interval": self.poll_interval,
                "max_poll_interval": self.max_poll_interval,
                "deadline": self.deadline,
                "created_at": self.created_at,
                "estimated_duration": self.estimated_duration,
                "max_consecutive_errors": self.max_consecutive_errors,
                "not_before": self.not_before,
            },
        )

    def _event(self, status: str, message: str, **fields: Any) -> TriggerEvent:
        return TriggerEvent(
            {"status": status, "prediction_id": self.prediction_id, "message": message, **fields}
        )

    async def on_kill(self) -> None:
        """A user marked the deferred task failed or success, or cleared it: say that the prediction keeps
        running (and billing), since SpeedPix has no cancel call. Silent after the final event (Airflow
        may call this then too); never raises, never waits on the network."""
        if self._final_event_sent:
            return
        with contextlib.suppress(Exception):  # a log call must never turn a kill into an error
            self.log.warning(
                "Stopped waiting for SpeedPix prediction %s, but it keeps running and is billed until it "
                "finishes: SpeedPix has no cancel call. A new try of the task reconnects to it if it has "
                "not finished successfully.",
                self.prediction_id,
            )

    async def _wait(self) -> TriggerEvent:
        """Poll until there is something to tell: the one event ``run`` yields."""
        hook = SpeedPixHook(speedpix_conn_id=self.speedpix_conn_id)
        loop = PollLoop(
            poll_interval=self.poll_interval,
            max_interval=self.max_poll_interval,
            deadline=self.deadline,
            created_at=self.created_at,
            estimated_duration=self.estimated_duration,
            max_consecutive_errors=self.max_consecutive_errors,
        )
        last_logged: ProgressKey | None = None
        while True:
            try:
                prediction = await hook.aget_prediction(
                    self.prediction_id, time_left=loop.poll_budget(time.time())
                )
            except SpeedPixError as err:
                step = loop.failed(err, time.time())
                if step.action in ("sleep", "timeout"):
                    self.log.warning(
                        "Polling prediction %s failed (%s); next try in %.1fs",
                        self.prediction_id,
                        err,
                        step.delay,
                    )
            else:
                step = loop.answered(prediction, time.time())
                last_logged = log_progress(self.log, prediction, last_logged)
            if step.prediction is not None:  # done
                return TriggerEvent(prediction_event(step.prediction))
            if step.action == "error":
                return self._event(
                    "error", str(step.error), error_code=getattr(step.error, "error_code", None)
                )
            if step.action == "gave_up":
                return self._event(
                    "error",
                    f"Gave up after {loop.errors} failed polls in a row: {step.error}",
                    error_code=getattr(step.error, "error_code", None),
                )
            if step.action == "sleep" or step.delay > 0:
                await asyncio.sleep(step.delay)
            if step.action == "timeout":
                return self._timeout_event(loop.last_status)

    def _timeout_event(self, last_status: str | None) -> TriggerEvent:
        return self._event(
            "timeout",
            f"Prediction {self.prediction_id} did not finish before the deadline (last status: "
            f"{last_status or 'unknown'}). It may still be running; a task retry reconnects to it.",
            prediction_status=last_status,
        )
