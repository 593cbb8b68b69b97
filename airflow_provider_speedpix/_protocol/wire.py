"""The wire, without I/O: operation names and paths, request bodies, the response envelope and its errors.

Every request the hook sends is built here and every response is first read here (``read_envelope``), on
both transports; the emulator imports only the operation names. Reading never raises anything but a
``SpeedPixError``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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

    def unreadable(self, operation: str, problem: str) -> SpeedPixResponseError:
        """The error for an answer whose ``data`` does not say what the operation needs."""
        return SpeedPixResponseError(
            f"SpeedPix {operation}: {problem} (invoke id {self.invoke_id}).",
            operation=operation,
            invoke_id=self.invoke_id,
            request_id=self.request_id,
        )


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
        raise envelope.unreadable(UPLOAD_SIGN, "the response lacks uploadUrl or accessUrl")
    expire = data.get("expireTime")
    return upload_url, {
        "access_url": access_url,
        "object_key": str(data.get("objectKey") or ""),
        "path": data.get("path"),
        "expire_time": expire if isinstance(expire, int) and not isinstance(expire, bool) else None,
    }
