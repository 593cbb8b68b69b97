"""Airflow metrics for SpeedPix predictions, through Airflow's own stats client (StatsD / OpenTelemetry as
configured in ``[metrics]``). Names, types, units and tags: ``docs/metrics.md``.

Emitted on the worker only (operator and sensor), never from the triggerer. A metric never fails a task.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from airflow_provider_speedpix._protocol import Prediction

PREFIX = "speedpix.prediction"
CREATED = f"{PREFIX}.created"
SUCCEEDED = f"{PREFIX}.succeeded"
FAILED = f"{PREFIX}.failed"
QUEUE_TIME = f"{PREFIX}.queue_time"
RUN_TIME = f"{PREFIX}.run_time"

log = logging.getLogger(__name__)


def _stats() -> Any:
    from airflow.providers.common.compat.sdk import Stats

    return Stats


def _tags(workflow_id: str | None) -> dict[str, str]:
    return {"workflow_id": workflow_id} if workflow_id else {}


def created(workflow_id: str | None) -> None:
    """A prediction was submitted (billed work started)."""
    try:
        _stats().incr(CREATED, tags=_tags(workflow_id))
    except Exception:  # metrics are best effort
        log.debug("Could not emit %s", CREATED, exc_info=True)


def finished(
    prediction: Prediction, *, workflow_id: str | None = None, submitted_at: float | None = None
) -> None:
    """A terminal state was observed: ``succeeded`` or ``failed`` (a canceled prediction counts as failed),
    and the timers where their inputs are known.

    ``queue_time`` is ``started_at`` (``taskBeginTime``) minus ``submitted_at`` (UNIX time the operator
    recorded right after the create); skipped when either is unknown or the difference is negative (clock
    skew between this worker and SpeedPix). ``run_time`` is ``taskDuration``.
    """
    tags = _tags(workflow_id or prediction.workflow_id)
    try:
        stats = _stats()
        stats.incr(SUCCEEDED if prediction.succeeded else FAILED, tags=tags)
        if prediction.run_seconds is not None:
            stats.timing(RUN_TIME, timedelta(seconds=prediction.run_seconds), tags=tags)
        if prediction.started_at is not None and submitted_at is not None:
            queued = prediction.started_at.timestamp() - submitted_at
            if queued >= 0:
                stats.timing(QUEUE_TIME, timedelta(seconds=queued), tags=tags)
    except Exception:  # metrics are best effort
        log.debug("Could not emit SpeedPix prediction metrics", exc_info=True)
