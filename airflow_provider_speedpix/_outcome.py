"""What a prediction or a trigger event means for the task, the argument checks, the progress log line
and the deferral rule: one home, so operator, sensor and trigger read as orchestration only."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from airflow_provider_speedpix._protocol import Prediction
from airflow_provider_speedpix.exceptions import (
    SpeedPixConfigError,
    SpeedPixError,
    SpeedPixPredictionFailed,
    SpeedPixTimeoutError,
)

EVENT_STATUSES = ("success", "failed", "timeout", "error")
#: The deferral outlives the trigger's own deadline a little, so the trigger's clean event comes first.
DEFER_GRACE = 60.0
#: Failed polls in a row (each already retried by the hook) a wait sits out before giving up.
MAX_CONSECUTIVE_ERRORS = 10


# ---------------------------------------------------------------------- checks
def check_positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise SpeedPixConfigError(f"`{name}` must be a number of seconds > 0, got {value!r}.")
    return float(value)


def check_prediction_id(prediction_id: Any) -> str:
    if not isinstance(prediction_id, str) or not prediction_id.strip():
        raise SpeedPixConfigError(
            f"`prediction_id` must be a non-empty string, got {prediction_id!r} (check the template or XCom "
            "it comes from)."
        )
    return prediction_id


# ---------------------------------------------------------------------- outcomes
def raise_for_prediction(prediction: Prediction) -> Prediction:
    """Return a succeeded prediction; raise :class:`SpeedPixPredictionFailed` for failed/canceled."""
    if prediction.status in ("failed", "canceled"):
        raise SpeedPixPredictionFailed(
            prediction.id,
            error_code=prediction.error_code,
            error_message=prediction.error,
            status=prediction.status,
        )
    return prediction


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


# ---------------------------------------------------------------------- progress log line
ProgressKey = tuple[str, int, Any]


def log_progress(log: Any, prediction: Prediction, last: ProgressKey | None = None) -> ProgressKey:
    """Log ``Prediction <id> <status>: progress N%, ETA Ss`` unless it equals ``last`` (or the prediction
    finished); return what to pass as ``last`` next time."""
    seen = (prediction.status, int(prediction.progress or 0), prediction.eta_seconds)
    if seen != last and not prediction.finished:
        log.info("Prediction %s %s: progress %s%%, ETA %ss", prediction.id, seen[0], seen[1], seen[2])
    return seen


# ---------------------------------------------------------------------- deferral
def defer_to_trigger(
    prediction_id: str,
    *,
    speedpix_conn_id: str,
    poll_interval: float,
    timeout: float | None,
    created_at: float | None = None,
    estimated_duration: float | None = None,
    max_consecutive_errors: int = MAX_CONSECUTIVE_ERRORS,
) -> dict[str, Any]:
    """Keyword arguments for ``self.defer(...)`` (operator and sensor): the trigger's deadline is
    ``timeout`` from now; the deferral's own timeout is ``DEFER_GRACE`` longer."""
    from airflow_provider_speedpix.triggers.speedpix import SpeedPixPredictionTrigger

    return {
        "trigger": SpeedPixPredictionTrigger(
            prediction_id=prediction_id,
            speedpix_conn_id=speedpix_conn_id,
            poll_interval=poll_interval,
            max_poll_interval=max(poll_interval * 12, 60.0),
            deadline=None if timeout is None else time.time() + timeout,
            created_at=created_at,
            estimated_duration=estimated_duration,
            max_consecutive_errors=max_consecutive_errors,
        ),
        "method_name": "execute_complete",
        "timeout": None if timeout is None else timedelta(seconds=timeout + DEFER_GRACE),
    }
