"""SpeedPixPredictionTrigger: wait for a prediction on the triggerer, not on a worker."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

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

__all__ = ["EVENT_STATUSES", "SpeedPixPredictionTrigger", "prediction_event", "raise_for_event"]


class SpeedPixPredictionTrigger(BaseTrigger):
    """Poll one prediction until it finishes, the deadline passes, or a non-retryable error occurs.

    Yields exactly one :class:`TriggerEvent` whose ``status`` is ``success``, ``failed``, ``timeout`` or
    ``error``. A finished prediction's event (:func:`prediction_event`, plain JSON) carries everything the
    task needs to finish without another API call: ``output``, ``images``, ``run_seconds``,
    ``started_at`` / ``finished_at`` (ISO-8601), ``workflow_id``, ``invoke_id``, and for a failure
    ``error_code`` and ``message``. Progress is logged on change only (``_outcome.log_progress``, the
    operator's and sensor's helper too); no metrics are emitted here (the worker does that on resume).
    Its kwargs hold ids and times only (never a secret); the credentials are looked up from
    ``speedpix_conn_id`` on the triggerer. All triggers of a triggerer share one HTTP connection pool.
    The waiting rules are ``SpeedPixHook.wait_for_prediction``'s (one :class:`_polling.PollLoop`).

    :param prediction_id: the prediction to wait for.
    :param speedpix_conn_id: the SpeedPix connection.
    :param poll_interval: seconds between polls near the expected end (the detection latency bound).
    :param max_poll_interval: longest sleep between polls while the end is far away.
    :param deadline: wall-clock UNIX time after which a ``timeout`` event is sent; ``None`` waits forever.
    :param created_at: wall-clock UNIX time the prediction was created (for the initial estimate).
    :param estimated_duration: ``estimatedDurationInSeconds`` from the create call, if known.
    :param max_consecutive_errors: transient failures in a row (each already retried by the hook)
        before giving up with an ``error`` event.
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
            },
        )

    def _event(self, status: str, message: str, **fields: Any) -> TriggerEvent:
        return TriggerEvent(
            {"status": status, "prediction_id": self.prediction_id, "message": message, **fields}
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
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
                prediction = await hook.aget_prediction(self.prediction_id)
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
                yield TriggerEvent(prediction_event(step.prediction))
                return
            if step.action == "error":
                yield self._event(
                    "error", str(step.error), error_code=getattr(step.error, "error_code", None)
                )
                return
            if step.action == "gave_up":
                yield self._event(
                    "error",
                    f"Gave up after {loop.errors} failed polls in a row: {step.error}",
                    error_code=getattr(step.error, "error_code", None),
                )
                return
            if step.action == "sleep" or step.delay > 0:
                await asyncio.sleep(step.delay)
            if step.action == "timeout":
                yield self._timeout_event(loop.last_status)
                return

    def _timeout_event(self, last_status: str | None) -> TriggerEvent:
        return self._event(
            "timeout",
            f"Prediction {self.prediction_id} did not finish before the deadline (last status: "
            f"{last_status or 'unknown'}). It may still be running; a task retry reconnects to it.",
            prediction_status=last_status,
        )
