"""A prediction as the API reference describes it, read leniently from progress and result answers.

``Prediction`` (status, progress 0..1, queue position, node progress, ETA, outputs, default images, task
timing) and the places of its output URLs. Pure: shared by the sync and async paths, the trigger's events
and the operator's resume.
"""

from __future__ import annotations

import json
import math
import urllib.parse
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

from airflow_provider_speedpix._protocol.wire import (
    CREATE,
    KNOWN_STATUSES,
    PROGRESS,
    SUCCESS_ENVELOPE_STATUS,
    TERMINAL_STATUSES,
    Envelope,
    _short,
)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except (ValueError, OverflowError):  # OverflowError: an integer beyond the float range
        return None
    return number if math.isfinite(number) else None


#: Above this a count or step is nonsense, not a value to show.
MAX_COUNT = 10**9
#: A timestamp below this (about 1973 in milliseconds) is read as seconds: some gateways send 10 digits.
MS_THRESHOLD = 1e11
MAX_LABEL = 80


def _count(value: Any) -> int | None:
    """A non-negative whole number (``3``, ``3.0``, ``"3"``), else None."""
    number = _number(value)
    if number is None or number < 0 or number > MAX_COUNT:
        return None
    return int(number)


def _fraction(value: Any) -> float | None:
    """``progress`` as a fraction 0..1.

    The reference sends a fraction (``0.42``). A value in (1, 100] is read as a percentage, as some gateways
    send (``42`` -> ``0.42``); a value above 100, a negative one, NaN or anything that is not a number is
    ignored (None): showing no percentage beats showing a wrong one. Note ``1`` is read as the fraction
    (100 %), not as 1 %.
    """
    number = _number(value)
    if number is None or number < 0 or number > 100:
        return None
    return number if number <= 1 else number / 100


def _seconds(value: Any, *, scale: float = 1.0) -> float | None:
    number = _number(value)
    return None if number is None or number < 0 else number / scale


def _timestamp(value: Any) -> datetime | None:
    """A 13-digit epoch-milliseconds timestamp (10 digits are read as seconds) as an aware UTC datetime."""
    number = _number(value)
    if number is None or number <= 0:
        return None
    seconds = number / 1000 if number >= MS_THRESHOLD else number
    try:
        return datetime.fromtimestamp(seconds, tz=UTC)
    except (OverflowError, OSError, ValueError):  # beyond what datetime can hold
        return None


def _label(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return None
    text = " ".join(str(value).split())
    return (text if len(text) <= MAX_LABEL else text[:MAX_LABEL] + "...") or None


def _first(mapping: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        if mapping.get(key) is not None:
            return mapping[key]
    return None


def parse_node_state(value: Any) -> dict[str, Any]:
    """The per-node progress in ``state``, read leniently: ``{"node", "node_index", "node_count", "step",
    "steps"}`` with only the keys that were present and sensible.

    The reference gives ``state`` no schema. Besides the emulator's ``{"node", "nodeIndex", "nodeCount",
    "step", "steps"}`` this reads ComfyUI's own progress shape ``{"node", "value", "max"}``, a few spellings
    of the same names, and the same object sent as a JSON string. Anything else gives ``{}``.
    """
    if isinstance(value, str) and value.lstrip()[:1] == "{":
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            return {}
    if not isinstance(value, Mapping):
        return {}
    found = {
        "node": _label(_first(value, "node", "nodeName", "node_name", "nodeTitle", "title", "label")),
        "node_index": _count(_first(value, "nodeIndex", "node_index")),
        "node_count": _count(_first(value, "nodeCount", "node_count", "nodes")),
        "step": _count(_first(value, "step", "value", "currentStep", "current_step")),
        "steps": _count(_first(value, "steps", "max", "totalSteps", "total_steps")),
    }
    return {key: item for key, item in found.items() if item is not None}


def parse_images(value: Any) -> list[str]:
    """``data.images``, the default output: URL strings (an item ``{"url": ...}`` counts too)."""
    if isinstance(value, str | Mapping):
        value = [value]
    if not isinstance(value, list | tuple):
        return []
    urls = []
    for item in value:
        if isinstance(item, Mapping):
            item = item.get("url")
        if isinstance(item, str) and item.strip():
            urls.append(item.strip())
    return urls


def _status(value: Any, operation: str, envelope: Envelope) -> str:
    status = str(value or "").lower()
    if status not in KNOWN_STATUSES:
        raise envelope.unreadable(operation, f"unknown prediction status {_short(str(value))!r}")
    return status


_DATETIME_FIELDS = ("started_at", "finished_at")


@dataclass
class Prediction:
    """A prediction as the provider sees it. ``to_dict`` / ``from_dict`` give a plain-JSON form (datetimes
    as ISO-8601 strings).

    ``progress`` is the fraction 0..1 (see :func:`_fraction` for values above 1); :attr:`percent` is what
    people see. ``queue_position`` (``lastQueueRemaining``: tasks ahead in the queue) is set only while
    ``waiting``; ``node``, ``node_index``, ``node_count``, ``step``, ``steps`` come from ``state`` where
    present. Once finished: ``output`` is the workflow's custom ``result`` (None when empty), ``images``
    the default output (``data.images``, a list of URLs), ``run_seconds`` the billed running time
    (``taskDuration``), ``started_at`` / ``finished_at`` aware UTC datetimes (``taskBeginTime`` /
    ``taskEndTime``), ``workflow_id`` from ``info.workflowId`` when the service says it.
    """

    id: str
    status: str
    progress: float | None = None
    eta_seconds: float | None = None
    estimated_duration: float | None = None
    message: str | None = None
    output: Any = None
    error: str | None = None
    error_code: str | None = None
    invoke_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    queue_position: int | None = None
    node: str | None = None
    node_index: int | None = None
    node_count: int | None = None
    step: int | None = None
    steps: int | None = None
    images: list[str] = field(default_factory=list)
    run_seconds: float | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    workflow_id: str | None = None

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"

    @property
    def percent(self) -> int | None:
        """``progress`` as a whole percentage 0..100 (rounded down: 99.9 % is not done), or None."""
        if self.progress is None:
            return None
        return max(0, min(100, math.floor(self.progress * 100 + 1e-9)))

    @property
    def output_or_images(self) -> Any:
        """The custom ``result`` when there is one, else the default images as ``{"images": [url, ...]}``
        (None when there is neither): what ``hook.run`` and the sensor return."""
        if self.output is not None or not self.images:
            return self.output
        return {"images": list(self.images)}

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in _DATETIME_FIELDS:
            if data[key] is not None:
                data[key] = data[key].isoformat()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Prediction:
        values = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        for key in _DATETIME_FIELDS:
            values[key] = parse_datetime(values.get(key))
        return cls(**values)


def parse_datetime(value: Any) -> datetime | None:
    """An ISO-8601 string (as ``to_dict`` writes) or a datetime, as an aware UTC datetime; else None."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return None
    if not isinstance(value, datetime):
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def parse_created(envelope: Envelope) -> Prediction:
    data = envelope.data
    task_id = data.get("taskId")
    if not task_id or not isinstance(task_id, str):
        raise envelope.unreadable(CREATE, "the response has no taskId")
    return Prediction(
        id=task_id,
        status=_status(data.get("status") or "waiting", CREATE, envelope),
        estimated_duration=_number(data.get("estimatedDurationInSeconds")),
        invoke_id=envelope.invoke_id,
    )


def parse_progress(prediction_id: str, envelope: Envelope) -> Prediction:
    data = envelope.data
    message = data.get("message")
    status = _status(data.get("status"), PROGRESS, envelope)
    return Prediction(
        id=prediction_id,
        status=status,
        progress=_fraction(data.get("progress")),
        eta_seconds=_number(data.get("etaRelative")),
        message=_short(str(message)) if message else None,
        invoke_id=envelope.invoke_id,
        queue_position=_count(data.get("lastQueueRemaining")) if status == "waiting" else None,
        **parse_node_state(data.get("state")),
    )


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, Mapping | list | tuple | str) and not value)


def apply_result(prediction: Prediction, envelope: Envelope) -> Prediction:
    """Fold a ``comfy_get_result`` envelope into a finished prediction.

    ``output`` is the custom ``result`` (``{}``, ``null`` or absent: None) and ``images`` the default
    output; both are kept when both are present.
    """
    prediction.invoke_id = envelope.invoke_id or prediction.invoke_id
    if envelope.status != SUCCESS_ENVELOPE_STATUS or envelope.failed:
        prediction.status = "failed" if prediction.status == "succeeded" else prediction.status
        prediction.error = envelope.reason or prediction.message or "the workflow failed"
        prediction.error_code = envelope.code or None
        prediction.output = None
        prediction.images = []
        return prediction
    data = envelope.data if isinstance(envelope.data, dict) else {}
    result = data.get("result")
    prediction.output = None if _empty(result) else result
    prediction.images = parse_images(data.get("images"))
    started, finished = _timestamp(data.get("taskBeginTime")), _timestamp(data.get("taskEndTime"))
    run_seconds = _seconds(data.get("taskDuration"), scale=1000)
    if run_seconds is None and started is not None and finished is not None and finished >= started:
        run_seconds = (finished - started).total_seconds()
    prediction.run_seconds, prediction.started_at, prediction.finished_at = run_seconds, started, finished
    info = data.get("info")
    prediction.extra = {"info": info} if info is not None else {}
    if isinstance(info, Mapping) and isinstance(info.get("workflowId"), str) and info["workflowId"]:
        prediction.workflow_id = _label(info["workflowId"])
    return prediction


class OutputURL(NamedTuple):
    """One URL of a prediction's outputs and its place: ``root`` ``"output"`` (the custom result; ``path``
    the keys leading to it, ``("images", "url")``, ``("gallery", 0)``) or ``"images"`` (the default output;
    ``path`` is ``(index,)``)."""

    path: tuple[str | int, ...]
    url: str
    root: str = "output"

    @property
    def where(self) -> str:
        """The place as Python would index it: ``output['images']['url']``, ``images[0]``."""
        return self.root + "".join(f"[{key!r}]" for key in self.path)

    @property
    def stem(self) -> str:
        """A file name without suffix: the field path (``images``, ``subject_image``, ``gallery_0``; a
        trailing ``url`` key is dropped) or ``image_<n>`` for a default image."""
        if self.root == "images":
            return f"image_{self.path[0] if self.path else 0}"
        return "_".join(str(key) for key in self.path if key != "url") or "output"


def iter_output_urls(output: Any, path: tuple[str | int, ...] = ()) -> list[OutputURL]:
    """Every http(s) URL in a result, with its place, in document order."""
    found: list[OutputURL] = []
    if isinstance(output, Mapping):
        for key, value in output.items():
            found += iter_output_urls(value, (*path, key))
    elif isinstance(output, list | tuple):
        for index, value in enumerate(output):
            found += iter_output_urls(value, (*path, index))
    elif isinstance(output, str) and output.startswith(("http://", "https://")):
        found.append(OutputURL(path, output))
    return found


def iter_prediction_urls(output: Any, images: Any = ()) -> list[OutputURL]:
    """Every output URL of a prediction: the custom result's (document order), then each default image
    (root ``"images"``) whose URL the result does not already hold (the service may list the same file in
    both; it is fetched once, under the result's name)."""
    found = iter_output_urls(output)
    seen = {place.url for place in found}
    for index, url in enumerate(images or ()):
        if isinstance(url, str) and url.startswith(("http://", "https://")) and url not in seen:
            seen.add(url)
            found.append(OutputURL((index,), url, "images"))
    return found


def unsigned_url(url: str) -> str:
    """Scheme, host and path of ``url``: its query string (a storage URL's signature) and any user info
    dropped. What may be logged, stored in XCom or put in a trigger event."""
    parts = urllib.parse.urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}{parts.path}" if parts.scheme else url.partition("?")[0]


def without_signatures(value: Any) -> Any:
    """``value`` with every http(s) URL in it (nested in dicts and lists) replaced by :func:`unsigned_url`.

    Output URLs are temporary signed storage URLs: the signature is a credential for its lifetime, so it
    never goes where Airflow keeps or shows things (events, XCom, logs). The worker downloads with fresh
    URLs it reads from the API (``docs/operators.md``, "Output URLs")."""
    if isinstance(value, str):
        return unsigned_url(value) if value.startswith(("http://", "https://")) else value
    if isinstance(value, Mapping):
        return {k: without_signatures(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [without_signatures(v) for v in value]
    return value
