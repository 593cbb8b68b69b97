"""SpeedPixPredictionTrigger: wait for a prediction on the triggerer, not on a worker."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_provider_speedpix._polling import next_poll_delay
from airflow_provider_speedpix._protocol import Prediction
from airflow_provider_speedpix.exceptions import (
    SpeedPixError,
    SpeedPixPredictionFailed,
    SpeedPixResponseError,
    SpeedPixServerError,
    SpeedPixThrottledError,
    SpeedPixTimeoutError,
    SpeedPixTransportError,
)
from airflow_provider_speedpix.hooks.speedpix import SpeedPixHook, check_positive

#: Errors the trigger sits out (with backoff) instead of ending: the next poll may well succeed.
TRANSIENT = (SpeedPixTransportError, SpeedPixServerError, SpeedPixThrottledError, SpeedPixResponseError)
EVENT_STATUSES = ("success", "failed", "timeout", "error")


def prediction_event(prediction: Prediction) -> dict[str, Any]:
    """The terminal event for a finished prediction (plain JSON)."""
    return {
        "status": "success" if prediction.succeeded else "failed",
        "prediction_id": prediction.id,
        "prediction_status": prediction.status,
        "output": prediction.output,
        "error_code": prediction.error_code,
        "message": prediction.error or prediction.message,
        "invoke_id": prediction.invoke_id,
    }


def raise_for_event(event: Any, *, timeout: float | None = None) -> dict[str, Any]:
    """Return a ``success`` event; raise the matching ``SpeedPixError`` for any other (or a malformed) one.

    One policy for the operator and the sensor.
    """
    if (
        not isinstance(event, dict)
        or event.get("status") not in EVENT_STATUSES
        or not event.get("prediction_id")
    ):
        raise SpeedPixError(f"Unexpected event from SpeedPixPredictionTrigger: {event!r:.300}")
    status, prediction_id = event["status"], event["prediction_id"]
    if status == "success":
        return event
    if status == "failed":
        raise SpeedPixPredictionFailed(
            prediction_id,
            error_code=event.get("error_code"),
            error_message=event.get("message"),
            status=event.get("prediction_status") or "failed",
        )
    if status == "timeout":
        raise SpeedPixTimeoutError(prediction_id, timeout=timeout, last_status=event.get("prediction_status"))
    code = f" [{event['error_code']}]" if event.get("error_code") else ""
    raise SpeedPixError(
        f"Waiting for SpeedPix prediction {prediction_id} failed{code}: {event.get('message')}"
    )


class SpeedPixPredictionTrigger(BaseTrigger):
    """Poll one prediction until it finishes, the deadline passes, or a non-retryable error occurs.

    Yields exactly one :class:`TriggerEvent` whose ``status`` is ``success``, ``failed``, ``timeout`` or
    ``error``. Its kwargs hold ids and times only (never a secret); the credentials are looked up from
    ``speedpix_conn_id`` on the triggerer. All triggers of a triggerer share one HTTP connection pool.

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
        max_consecutive_errors: int = 10,
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

    def _remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.time()

    def _event(self, status: str, message: str, **fields: Any) -> TriggerEvent:
        return TriggerEvent(
            {"status": status, "prediction_id": self.prediction_id, "message": message, **fields}
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        hook = SpeedPixHook(speedpix_conn_id=self.speedpix_conn_id)
        errors = 0
        last_seen: tuple[Any, ...] | None = None
        while True:
            try:
                prediction = await hook.aget_prediction(self.prediction_id)
            except TRANSIENT as err:
                errors += 1
                remaining = self._remaining()
                if errors >= self.max_consecutive_errors:
                    yield self._event(
                        "error",
                        f"Gave up after {errors} failed polls in a row: {err}",
                        error_code=getattr(err, "error_code", None),
                    )
                    return
                delay = min(self.max_poll_interval, self.poll_interval * 2 ** (errors - 1))
                self.log.warning(
                    "Polling prediction %s failed (%s); next try in %.1fs", self.prediction_id, err, delay
                )
                if remaining is not None and remaining <= delay:
                    await asyncio.sleep(max(remaining, 0))
                    yield self._timeout_event(last_seen[0] if last_seen else None)
                    return
                await asyncio.sleep(delay)
                continue
            except SpeedPixError as err:
                yield self._event("error", str(err), error_code=getattr(err, "error_code", None))
                return
            errors = 0
            if prediction.finished:
                yield TriggerEvent(prediction_event(prediction))
                return
            seen = (prediction.status, int(prediction.progress or 0), prediction.eta_seconds)
            if seen != last_seen:
                last_seen = seen
                self.log.info(
                    "Prediction %s %s: progress %s%%, ETA %ss",
                    self.prediction_id,
                    prediction.status,
                    seen[1],
                    prediction.eta_seconds,
                )
            remaining = self._remaining()
            if remaining is not None and remaining <= 0:
                yield self._timeout_event(prediction.status)
                return
            if prediction.status == "waiting" and self.estimated_duration is not None:
                prediction.estimated_duration = self.estimated_duration
            elapsed = None if self.created_at is None else time.time() - self.created_at
            delay = next_poll_delay(
                prediction,
                poll_interval=self.poll_interval,
                max_interval=self.max_poll_interval,
                elapsed=elapsed,
            )
            await asyncio.sleep(delay if remaining is None else min(delay, remaining))

    def _timeout_event(self, last_status: str | None) -> TriggerEvent:
        return self._event(
            "timeout",
            f"Prediction {self.prediction_id} did not finish before the deadline (last status: "
            f"{last_status or 'unknown'}). It may still be running; a task retry reconnects to it.",
            prediction_status=last_status,
        )
