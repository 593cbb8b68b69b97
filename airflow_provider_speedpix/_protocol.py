"""The SpeedPix wire protocol without I/O: operation paths, request bodies, response parsing and types.

The sync hook, the async hook path (used by the trigger) and the tests all go through these functions,
so a response is parsed in exactly one place. Parsing never raises anything but a ``SpeedPixError``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

from airflow_provider_speedpix.exceptions import (
    SpeedPixAPIError,
    SpeedPixAuthError,
    SpeedPixConfigError,
    SpeedPixNotFoundError,
    SpeedPixResponseError,
    SpeedPixServerError,
    SpeedPixThrottledError,
)

CREATE = "comfy_prompt"
PROGRESS = "comfy_get_progress"
RESULT = "comfy_get_result"
UPLOAD_SIGN = "sp_create_temp_file_upload_sign"
PATHS = {op: f"/scc/{op}" for op in (CREATE, PROGRESS, RESULT, UPLOAD_SIGN)}
#: Operations that start billed work. Everything else may be repeated freely.
NON_IDEMPOTENT = frozenset({CREATE})

SUCCESS_ENVELOPE_STATUS = 10
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "canceled"})
KNOWN_STATUSES = frozenset({"waiting", "running"}) | TERMINAL_STATUSES
MAX_ERROR_TEXT = 500


def encode_body(payload: Mapping[str, Any]) -> bytes:
    """Serialise a request body once; these exact bytes are signed (content-md5) and sent.

    Compact separators and raw UTF-8 (no ``\\uXXXX`` escapes), as the official SDK sends.
    """
    try:
        return json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as err:
        raise SpeedPixConfigError(
            f"Request body is not JSON-serialisable ({err}). Pass only str, int, float, bool, None, lists "
            "and dicts in `inputs` (files are uploaded for you)."
        ) from None


def create_prediction_body(
    workflow_id: str,
    inputs: Mapping[str, Any],
    *,
    alias_id: str | None = None,
    version_id: str | None = None,
    randomise_seeds: bool | None = None,
    return_temp_files: bool | None = None,
) -> dict[str, Any]:
    """The ``comfy_prompt`` body. ``alias_id`` defaults to ``main`` when no version is pinned."""
    workflow_id, alias_id = check_workflow_reference(workflow_id, alias_id=alias_id, version_id=version_id)
    return {
        "workflow_id": workflow_id,
        "version_id": version_id,
        "inputs": dict(inputs),
        "alias_id": alias_id,
        "randomise_seeds": randomise_seeds,
        "return_temp_files": return_temp_files,
    }


def check_workflow_reference(
    workflow_id: Any, *, alias_id: str | None = None, version_id: str | None = None
) -> tuple[str, str | None]:
    """Check which workflow version a prediction names; return ``(workflow_id, alias_id)`` as sent."""
    if not isinstance(workflow_id, str) or not workflow_id.strip():
        raise SpeedPixConfigError(
            f"`workflow_id` must be a non-empty string, got {workflow_id!r}. Copy the id of the published "
            "workflow from the SpeedPix console (check that a templated value renders to something)."
        )
    if alias_id and version_id:
        raise SpeedPixConfigError(
            f"Pass either `alias_id` ({alias_id!r}) or `version_id` ({version_id!r}), not both: an alias "
            "already points at a version."
        )
    if version_id is None and alias_id is None:
        alias_id = "main"
    return workflow_id.strip(), alias_id


@dataclass(frozen=True)
class Envelope:
    """A backend response envelope, already checked for errors."""

    status: int | None
    err_code: str
    err_message: str
    sub_err_code: str
    sub_err_message: str
    invoke_id: str | None
    data: Any
    request_id: str | None = None

    @property
    def failed(self) -> bool:
        return bool(self.err_code or self.sub_err_code)

    @property
    def reason(self) -> str:
        return self.sub_err_message or self.err_message or ""

    @property
    def code(self) -> str:
        return self.sub_err_code or self.err_code or ""


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR_TEXT else text[:MAX_ERROR_TEXT] + "..."


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:
        value = {k.lower(): v for k, v in headers.items()}.get(name.lower())
    return value or None


def _gateway_error(
    operation: str, status_code: int, headers: Mapping[str, str], request_id: str | None
) -> SpeedPixAPIError:
    code = _header(headers, "X-Ca-Error-Code") or ""
    raw = _header(headers, "X-Ca-Error-Message") or ""
    # The gateway echoes its StringToSign on signature errors; it holds no secret, but it is noise.
    message = _short(raw.split(", Server StringToSign", 1)[0])
    common: dict[str, Any] = {
        "operation": operation,
        "status_code": status_code,
        "error_code": code,
        "error_message": message,
        "request_id": request_id,
    }
    where = f"{operation}: HTTP {status_code} {code} {message} (request id {request_id})"
    if status_code == 429 or "throttl" in message.lower():
        return SpeedPixThrottledError(f"SpeedPix gateway throttled {where}. Retried with backoff.", **common)
    if status_code in (400, 401, 403):
        hint = "Check the connection's App Key and App Secret"
        if "timestamp" in message.lower() or "date" in message.lower():
            hint = "Check this machine's clock (the gateway allows 15 minutes of skew)"
        elif "nonce" in message.lower():
            hint = "A request was replayed; this is a bug if it persists"
        return SpeedPixAuthError(f"SpeedPix gateway refused {where}. {hint}.", **common)
    if status_code >= 500:
        return SpeedPixServerError(f"SpeedPix gateway error {where}.", **common)
    return SpeedPixAPIError(f"SpeedPix gateway error {where}.", **common)


def read_envelope(
    operation: str,
    status_code: int,
    headers: Mapping[str, str],
    content: bytes,
    *,
    allow_failure: bool = False,
) -> Envelope:
    """Turn one HTTP response into an :class:`Envelope`, or raise the matching ``SpeedPixError``.

    ``allow_failure`` keeps a failed envelope (``comfy_get_result`` reports a failed task that way).
    """
    request_id = _header(headers, "X-Ca-Request-Id")
    # The older gateway style signals throttling with X-Ca-Error-Message alone (no X-Ca-Error-Code).
    if _header(headers, "X-Ca-Error-Code") or _header(headers, "X-Ca-Error-Message") or status_code == 429:
        raise _gateway_error(operation, status_code, headers, request_id)
    text = content.decode("utf-8", errors="replace")
    try:
        doc = json.loads(text) if text.strip() else None
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the interpreter's stack
        doc = None
    if not isinstance(doc, dict):
        kind = "an HTML page" if text.lstrip()[:1] == "<" else ("an empty body" if not text.strip() else "")
        what = kind or "a body that is not a JSON object"
        common: dict[str, Any] = {
            "operation": operation,
            "status_code": status_code,
            "request_id": request_id,
        }
        if status_code >= 500:
            raise SpeedPixServerError(
                f"SpeedPix {operation}: HTTP {status_code} with {what} (request id {request_id}).", **common
            )
        raise SpeedPixResponseError(
            f"SpeedPix {operation}: HTTP {status_code} with {what}; expected the JSON envelope "
            f"(request id {request_id}). Is the connection's endpoint the SpeedPix API?",
            **common,
        )

    def text_of(key: str) -> str:
        value = doc.get(key)
        return "" if value is None else str(value)

    status = doc.get("status")
    envelope = Envelope(
        status=status if isinstance(status, int) and not isinstance(status, bool) else None,
        err_code=text_of("errCode"),
        err_message=_short(text_of("errMessage")),
        sub_err_code=text_of("subErrCode"),
        sub_err_message=_short(text_of("subErrMessage")),
        invoke_id=text_of("apiInvokeId") or None,
        data=doc.get("data"),
        request_id=request_id,
    )
    if status_code >= 400 or (envelope.failed and not allow_failure):
        error_cls: type[SpeedPixAPIError] = SpeedPixAPIError
        if status_code >= 500:
            error_cls = SpeedPixServerError
        elif status_code in (401, 403):
            error_cls = SpeedPixAuthError
        elif status_code == 404 or "notfound" in envelope.code.lower().replace("_", ""):
            error_cls = SpeedPixNotFoundError
        raise error_cls(
            f"SpeedPix {operation} failed: HTTP {status_code}, code {envelope.code or '-'}: "
            f"{envelope.reason or 'no message'} (invoke id {envelope.invoke_id}, request id {request_id}).",
            operation=operation,
            status_code=status_code,
            error_code=envelope.err_code or None,
            sub_error_code=envelope.sub_err_code or None,
            error_message=envelope.reason or None,
            request_id=request_id,
            invoke_id=envelope.invoke_id,
        )
    if not isinstance(envelope.data, dict) and not (allow_failure and envelope.failed):
        raise SpeedPixResponseError(
            f"SpeedPix {operation}: the response has no `data` object (invoke id {envelope.invoke_id}, "
            f"request id {request_id}).",
            operation=operation,
            status_code=status_code,
            request_id=request_id,
            invoke_id=envelope.invoke_id,
        )
    return envelope


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
        raise SpeedPixResponseError(
            f"SpeedPix {operation}: unknown prediction status {_short(str(value))!r} "
            f"(invoke id {envelope.invoke_id}).",
            operation=operation,
            invoke_id=envelope.invoke_id,
            request_id=envelope.request_id,
        )
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
        raise SpeedPixResponseError(
            f"SpeedPix {CREATE}: the response has no taskId (invoke id {envelope.invoke_id}).",
            operation=CREATE,
            invoke_id=envelope.invoke_id,
            request_id=envelope.request_id,
        )
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


@dataclass(frozen=True)
class UploadedFile:
    """A file uploaded to SpeedPix's temporary storage. Pass ``access_url`` as an input value.

    The pre-signed upload URL is a credential and is deliberately not kept here.
    """

    access_url: str
    object_key: str
    path: str | None
    expire_time: int | None
    filename: str
    content_type: str
    size: int | None

    def __str__(self) -> str:
        return self.access_url


def parse_upload_sign(envelope: Envelope) -> tuple[str, dict[str, Any]]:
    """Return ``(upload_url, fields)``; the URL is secret and must only be used for the PUT."""
    data = envelope.data
    upload_url, access_url = data.get("uploadUrl"), data.get("accessUrl")
    if not isinstance(upload_url, str) or not upload_url or not isinstance(access_url, str) or not access_url:
        raise SpeedPixResponseError(
            f"SpeedPix {UPLOAD_SIGN}: the response lacks uploadUrl or accessUrl (invoke id "
            f"{envelope.invoke_id}).",
            operation=UPLOAD_SIGN,
            invoke_id=envelope.invoke_id,
            request_id=envelope.request_id,
        )
    expire = data.get("expireTime")
    return upload_url, {
        "access_url": access_url,
        "object_key": str(data.get("objectKey") or ""),
        "path": data.get("path"),
        "expire_time": expire if isinstance(expire, int) and not isinstance(expire, bool) else None,
    }


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
