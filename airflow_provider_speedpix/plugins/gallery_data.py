"""What the gallery shows: the SpeedPix predictions of a DAG run (or one task instance), read from Airflow.

Sources, all written by the provider's own operators:

* XCom ``return_value`` of ``SpeedPixRunOperator`` (``prediction_id``, ``status``, ``files``,
  ``run_seconds``, ...; the README's XCom table) and its early XCom ``prediction_id``, which is all a
  failed task leaves behind;
* the ``manifest`` named by the return value of ``SpeedPixBatchRunOperator`` (JSON lines: ``item_id``,
  ``prediction_id``, ``status``, ``files``, ``run_seconds``, ``error_code``, ``message``);
* the rendered template fields (``workflow_id``, ``speedpix_conn_id``) of each task instance;
* for a failed prediction without a manifest row, SpeedPix itself (one status read through the task's
  connection), so the failure shows its error code.

Files are read where the task saved them: local paths, or object-storage URIs through Airflow's
``ObjectStoragePath`` (``s3://conn_id@bucket/key`` ...). Only files listed there can ever be read: callers
ask for a file by its position in that list, never by path.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

#: files larger than this are not read for a preview
MAX_PREVIEW_SOURCE_BYTES = 32 * 1024 * 1024
#: at most this many failed predictions are looked up on SpeedPix for one page
MAX_ERROR_LOOKUPS = 20
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif")


@dataclass
class Prediction:
    """One prediction as the gallery shows it."""

    task_id: str
    map_index: int
    prediction_id: str | None
    status: str
    workflow_id: str | None = None
    run_seconds: float | None = None
    files: list[str] = field(default_factory=list)
    item_id: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    #: positions of ``files`` in the task instance's file list (what the file endpoints take)
    file_indexes: list[int] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return self.status not in ("succeeded", "success", "running", "waiting", "queued")


@dataclass
class TaskEntry:
    """One SpeedPix task instance of the run and its predictions."""

    task_id: str
    map_index: int
    state: str | None
    predictions: list[Prediction] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    manifest: str | None = None
    manifest_error: str | None = None

    def add(self, prediction: Prediction) -> None:
        prediction.file_indexes = []
        for path in prediction.files:
            prediction.file_indexes.append(len(self.files))
            self.files.append(path)
        self.predictions.append(prediction)


def _number(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _strings(values: Any) -> list[str]:
    return [str(v) for v in values] if isinstance(values, list | tuple) else []


def is_batch_result(value: Any) -> bool:
    return isinstance(value, dict) and "manifest" in value and "total" in value


def is_run_result(value: Any) -> bool:
    return isinstance(value, dict) and "prediction_id" in value and "files" in value


def open_binary(location: str):
    """Open a saved file for reading: a local path or an ``ObjectStoragePath`` URI."""
    if "://" in location and not location.startswith("file://"):
        from airflow.sdk import ObjectStoragePath

        return ObjectStoragePath(location).open("rb")
    if location.startswith("file://"):
        from urllib.parse import unquote, urlsplit

        location = unquote(urlsplit(location).path)
    return open(location, "rb")


def read_limited(location: str, limit: int = MAX_PREVIEW_SOURCE_BYTES) -> bytes:
    """The file's bytes; :class:`ValueError` when it is larger than ``limit``."""
    with open_binary(location) as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{os.path.basename(location)} is larger than {limit} bytes")
    return data


def read_manifest(location: str) -> list[dict[str, Any]]:
    rows = []
    for line in read_limited(location).decode("utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            if isinstance(row, dict):
                rows.append(row)
    return rows


def manifest_predictions(task: TaskEntry, rows: Iterable[dict[str, Any]], workflow_id: str | None) -> None:
    for row in rows:
        task.add(
            Prediction(
                task_id=task.task_id,
                map_index=task.map_index,
                prediction_id=row.get("prediction_id"),
                status=str(row.get("status") or "unknown"),
                workflow_id=row.get("workflow_id") or workflow_id,
                run_seconds=_number(row.get("run_seconds")),
                files=_strings(row.get("files")),
                item_id=None if row.get("item_id") is None else str(row.get("item_id")),
                error_code=row.get("error_code"),
                error_message=row.get("message") or row.get("error_message"),
            )
        )


ErrorLookup = Callable[[str, str], tuple[str | None, str | None]]


def speedpix_error(conn_id: str, prediction_id: str) -> tuple[str | None, str | None]:
    """``(error code, message)`` of a finished prediction, read from SpeedPix (one quick status read)."""
    from airflow_provider_speedpix.hooks.speedpix import SpeedPixHook

    hook = SpeedPixHook(speedpix_conn_id=conn_id)
    hook._settings = _quick(hook.settings)
    prediction = hook.get_prediction(prediction_id)
    if not prediction.finished:
        return None, f"still {prediction.status} on SpeedPix"
    return prediction.error_code, prediction.error


def _quick(settings: Any) -> Any:
    import dataclasses

    return dataclasses.replace(settings, timeout=min(settings.timeout, 5.0), retry_limit=1)


def collect(
    session: Any,
    dag_id: str,
    run_id: str,
    *,
    task_id: str | None = None,
    map_index: int | None = None,
    error_lookup: ErrorLookup | None = speedpix_error,
) -> list[TaskEntry]:
    """The run's SpeedPix task instances (or the one asked for), in task order."""
    from airflow.models.renderedtifields import RenderedTaskInstanceFields
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.xcom import XComModel
    from sqlalchemy import select

    where = [XComModel.dag_id == dag_id, XComModel.run_id == run_id]
    if task_id is not None:
        where.append(XComModel.task_id == task_id)
    if map_index is not None:
        where.append(XComModel.map_index == map_index)
    xcoms = session.scalars(
        select(XComModel).where(*where, XComModel.key.in_(("return_value", "prediction_id")))
    ).all()
    values: dict[tuple[str, int], dict[str, Any]] = {}
    for row in xcoms:
        try:
            value = XComModel.deserialize_value(row)
        except Exception as err:  # an XCom another backend wrote: not ours to show
            log.debug("Gallery: skipping XCom %s of %s: %s", row.key, row.task_id, err)
            continue
        values.setdefault((row.task_id, row.map_index), {})[row.key] = value

    ours = {
        key: found
        for key, found in values.items()
        if "prediction_id" in found
        or is_run_result(found.get("return_value"))
        or is_batch_result(found.get("return_value"))
    }
    if not ours:
        return []
    ti_where = [TaskInstance.dag_id == dag_id, TaskInstance.run_id == run_id]
    states = {
        (ti.task_id, ti.map_index): ti.state for ti in session.scalars(select(TaskInstance).where(*ti_where))
    }
    rendered = {
        (r.task_id, r.map_index): r.rendered_fields or {}
        for r in session.scalars(
            select(RenderedTaskInstanceFields).where(
                RenderedTaskInstanceFields.dag_id == dag_id, RenderedTaskInstanceFields.run_id == run_id
            )
        )
    }
    lookups = 0
    entries = []
    for (tid, index), found in sorted(ours.items()):
        state = states.get((tid, index))
        fields = rendered.get((tid, index), {})
        workflow_id = fields.get("workflow_id") if isinstance(fields.get("workflow_id"), str) else None
        task = TaskEntry(task_id=tid, map_index=index, state=str(state) if state is not None else None)
        result: Any = found.get("return_value")
        if is_batch_result(result):
            task.manifest = str(result["manifest"])
            try:
                manifest_predictions(task, read_manifest(task.manifest), workflow_id)
            except (OSError, ValueError) as err:
                task.manifest_error = f"Could not read the manifest {task.manifest}: {err}"
        elif is_run_result(result):
            task.add(
                Prediction(
                    task_id=tid,
                    map_index=index,
                    prediction_id=result.get("prediction_id"),
                    status=str(result.get("status") or "succeeded"),
                    workflow_id=workflow_id,
                    run_seconds=_number(result.get("run_seconds")),
                    files=_strings(result.get("files")),
                )
            )
        else:  # only the early prediction id: the task has not finished, or failed
            prediction = Prediction(
                task_id=tid,
                map_index=index,
                prediction_id=str(found["prediction_id"]),
                status="failed" if state in ("failed", "upstream_failed") else str(state or "running"),
                workflow_id=workflow_id,
            )
            if prediction.status == "failed" and error_lookup is not None and lookups < MAX_ERROR_LOOKUPS:
                lookups += 1
                conn_id = fields.get("speedpix_conn_id") or "speedpix_default"
                try:
                    prediction.error_code, prediction.error_message = error_lookup(
                        str(conn_id), str(prediction.prediction_id)
                    )
                except Exception as err:  # SpeedPix unreachable: say so, show the rest
                    log.info("Gallery: could not read prediction %s: %s", prediction.prediction_id, err)
                    prediction.error_message = "the error could not be read from SpeedPix"
            task.add(prediction)
        entries.append(task)
    return entries


def is_image(location: str) -> bool:
    return location.lower().split("?")[0].endswith(IMAGE_SUFFIXES)
