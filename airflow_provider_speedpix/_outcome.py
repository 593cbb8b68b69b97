"""What a prediction or a trigger event means for the task, the argument checks, the progress log line
and the deferral rule: one home, so operator, sensor and trigger read as orchestration only."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from airflow_provider_speedpix._protocol import (
    Prediction,
    check_workflow_reference,
    iso,
    parse_datetime,
    parse_images,
    without_signatures,
)
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
#: Every SpeedPix trigger holds its event until this long after the deferral. Works around an Airflow race:
#: the scheduler reads the executor's "success" for the process that deferred only in a later loop, and if
#: the trigger fired and the task was queued (or is running) again by then, ``process_executor_events``
#: (``airflow/jobs/scheduler_job_runner.py``) takes that stale success for an external kill and fails the
#: try ("finished with state success, but the task instance's state attribute is queued"). Airflow 3.3.2
#: ignores it only while the task instance is ``scheduled`` (apache/airflow#66374, fixed by #66431); the
#: ``queued`` case is apache/airflow#67287 (fix #68741, after 3.3.2), the ``running`` one #72716 (open).
#: Only a prediction that ends within seconds of its deferral waits longer for it (docs/batch.md,
#: "Shortest round"). Delete once the floor Airflow ignores stale defer-exit events.
DEFER_HOLD_SECONDS = 10.0


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


#: What a terminal event for a finished prediction (:func:`prediction_event`) always carries: every release
#: of the trigger has sent these keys (``images`` and the timing came later and may be missing from an
#: event of 0.1.0). A ``success`` event without them is refused (:func:`check_event`): finishing on it
#: would return no outputs for a prediction that had some.
FINISHED_EVENT_FIELDS = ("prediction_id", "prediction_status", "output")


def prediction_event(prediction: Prediction) -> dict[str, Any]:
    """The terminal event for a finished prediction (plain JSON): outputs, default images and timing, with
    every output URL's signature removed (Airflow logs and stores events whole; the worker reads fresh
    signed URLs when it downloads). Its keys include :data:`FINISHED_EVENT_FIELDS`, which
    :func:`check_event` requires of a ``success`` event."""
    return {
        "status": "success" if prediction.succeeded else "failed",
        "prediction_id": prediction.id,
        "prediction_status": prediction.status,
        "output": without_signatures(prediction.output),
        "images": without_signatures(list(prediction.images)),
        "run_seconds": prediction.run_seconds,
        "started_at": iso(prediction.started_at),
        "finished_at": iso(prediction.finished_at),
        "workflow_id": prediction.workflow_id,
        "error_code": prediction.error_code,
        "message": prediction.error or prediction.message,
        "invoke_id": prediction.invoke_id,
    }


def prediction_from_event(event: dict[str, Any]) -> Prediction:
    """The finished :class:`Prediction` a terminal event describes (the inverse of
    :func:`prediction_event`, lenient about events from an older provider version)."""
    run_seconds = event.get("run_seconds")
    failed = event.get("status") == "failed"
    return Prediction(
        id=event["prediction_id"],
        status=event.get("prediction_status") or ("failed" if failed else "succeeded"),
        output=event.get("output"),
        images=parse_images(event.get("images")),
        run_seconds=float(run_seconds) if isinstance(run_seconds, int | float) else None,
        started_at=parse_datetime(event.get("started_at")),
        finished_at=parse_datetime(event.get("finished_at")),
        workflow_id=event.get("workflow_id") if isinstance(event.get("workflow_id"), str) else None,
        error=event.get("message") if failed else None,
        error_code=event.get("error_code") if failed else None,
        invoke_id=event.get("invoke_id"),
    )


def check_event(event: Any, *, prediction_id: str | None = None) -> dict[str, Any]:
    """Return ``event`` if it is one the trigger sends, else raise :class:`SpeedPixError`.

    Any event needs a known ``status`` and a ``prediction_id``; a ``success`` event also every key of
    :data:`FINISHED_EVENT_FIELDS` and ``prediction_status == "succeeded"``. With ``prediction_id`` (the
    prediction this try deferred on), an event about another prediction is refused: its outputs are not
    this task's.
    """
    if (
        not isinstance(event, dict)
        or event.get("status") not in EVENT_STATUSES
        or not isinstance(event.get("prediction_id"), str)
        or not event["prediction_id"]
    ):
        raise SpeedPixError(f"Unexpected event from SpeedPixPredictionTrigger: {event!r:.300}")
    if prediction_id is not None and event["prediction_id"] != prediction_id:
        raise SpeedPixError(
            f"The trigger's event is about prediction {event['prediction_id']}, but this task deferred on "
            f"prediction {prediction_id}; refusing to take another prediction's result as this task's. "
            "A retry reconnects to the stored prediction."
        )
    if event["status"] == "success":
        missing = [key for key in FINISHED_EVENT_FIELDS if key not in event]
        if missing or event.get("prediction_status") != "succeeded":
            problem = (
                f"lacks {', '.join(missing)}"
                if missing
                else f"says prediction_status={event.get('prediction_status')!r}"
            )
            raise SpeedPixError(
                f"The trigger's success event for prediction {event['prediction_id']} {problem}; refusing "
                f"to finish without the prediction's outputs: {event!r:.300}"
            )
    return event


def raise_for_event(
    event: Any, *, timeout: float | None = None, prediction_id: str | None = None
) -> dict[str, Any]:
    """Return a ``success`` event; raise the matching ``SpeedPixError`` for any other (or a malformed,
    :func:`check_event`) one. ``prediction_id``: the prediction the task deferred on, if known.

    One policy for the operator and the sensor.
    """
    event = check_event(event, prediction_id=prediction_id)
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


# ---------------------------------------------------------------------- what people see
ProgressKey = tuple[Any, ...]


def describe_progress(prediction: Prediction) -> str:
    """``queued, 3 ahead, ETA 12 s`` / ``running 42% (KSampler, step 12/20), ETA 7 s``: percentages, never
    the wire's fraction; the queue position while waiting; node and step where the service sends them."""
    if prediction.status == "waiting":
        text = "queued"
        if prediction.queue_position:
            text += f", {prediction.queue_position} ahead"
    else:
        text = prediction.status
        if prediction.percent is not None:
            text += f" {prediction.percent}%"
        if prediction.status == "running":
            detail = [prediction.node] if prediction.node else []
            if prediction.step is not None:
                detail.append(
                    f"step {prediction.step}/{prediction.steps}"
                    if prediction.steps is not None
                    else f"step {prediction.step}"
                )
            if detail:
                text += f" ({', '.join(detail)})"
    if prediction.eta_seconds is not None:
        eta = prediction.eta_seconds
        text += ", ETA <1 s" if 0 < eta < 0.5 else f", ETA {eta:.0f} s"
    return text


def log_progress(log: Any, prediction: Prediction, last: ProgressKey | None = None) -> ProgressKey:
    """Log ``Prediction <id> <describe_progress>`` when what it shows changed since ``last`` (status,
    queue position, whole percent, node, step; the ETA alone does not count) and the prediction is not
    finished; return what to pass as ``last`` next time. One helper for operator, sensor and trigger."""
    seen = (
        prediction.status,
        prediction.queue_position,
        prediction.percent,
        prediction.node,
        prediction.step,
        prediction.steps,
    )
    if seen != last and not prediction.finished:
        log.info("Prediction %s %s", prediction.id, describe_progress(prediction))
    return seen


def describe_finished(prediction: Prediction) -> str:
    """``succeeded: ran 0.9 s (2026-11-29T21:29:26.100+00:00 to ...), 2 default images``."""
    text = prediction.status
    details = []
    if prediction.run_seconds is not None:
        span = ""
        if prediction.started_at is not None and prediction.finished_at is not None:
            span = f" ({iso(prediction.started_at)} to {iso(prediction.finished_at)})"
        details.append(f"ran {prediction.run_seconds:g} s{span}")
    if prediction.images:
        details.append(f"{len(prediction.images)} default image{'s' if len(prediction.images) > 1 else ''}")
    return text + (": " + ", ".join(details) if details else "")


def describe_closing(prediction: Prediction, submitted_at: Any, files: list[str]) -> str:
    """The task's last line: ``Prediction p-1 succeeded after 41 s (ran 4.5 s), 2 files saved to /out``.
    "after" counts from the submit (queue included), when it is known; "ran" is SpeedPix's run time."""
    text = f"Prediction {prediction.id} {prediction.status}"
    if isinstance(submitted_at, int | float):
        text += f" after {max(time.time() - submitted_at, 0.0):.0f} s"
    if prediction.run_seconds is not None:
        text += f" (ran {prediction.run_seconds:g} s)"
    if not files:
        return text + ", no files saved (set output_dir to keep them)"
    folders = {f.rsplit("/", 1)[0] for f in files}  # s3://b/k too
    where = f" to {folders.pop()}" if len(folders) == 1 else ""
    return text + f", {len(files)} file{'s' if len(files) > 1 else ''} saved{where}"


# ---------------------------------------------------------------------- deferral
def hold_until() -> float | None:
    """The ``not_before`` of a trigger deferred to now: ``DEFER_HOLD_SECONDS`` from now (``None`` at 0)."""
    return time.time() + DEFER_HOLD_SECONDS if DEFER_HOLD_SECONDS else None


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
    ``timeout`` from now; the deferral's own timeout is ``DEFER_GRACE`` longer; the event comes no sooner
    than ``DEFER_HOLD_SECONDS`` from now."""
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
            not_before=hold_until(),
        ),
        "method_name": "execute_complete",
        "timeout": None if timeout is None else timedelta(seconds=timeout + DEFER_GRACE),
    }


def templated(value: Any) -> bool:
    return isinstance(value, str) and ("{{" in value or "{%" in value)


def resolved_at_runtime(value: Any) -> bool:
    """A template, or a value Airflow resolves when the task runs (``XComArg``, ``MappedArgument``...: what
    its template rendering calls ``resolve`` on): nothing to check while the DAG is parsed."""
    return templated(value) or (hasattr(value, "resolve") and hasattr(value, "iter_references"))


def check_reference_at_parse(workflow_id: Any, alias_id: Any, version_id: Any) -> None:
    """Check what is already known when the DAG file is parsed: literal values only. The rendered values
    are checked again when the task runs, before anything is uploaded or billed."""
    if not resolved_at_runtime(workflow_id):
        check_workflow_reference(workflow_id)
    if not resolved_at_runtime(alias_id) and not resolved_at_runtime(version_id):
        check_workflow_reference("-", alias_id=alias_id, version_id=version_id)
