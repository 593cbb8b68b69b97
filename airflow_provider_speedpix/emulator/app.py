"""A faithful local SpeedPix: Alibaba Cloud API Gateway digest checks in front of the SpeedPix backend.

What it emulates
----------------
* Gateway (every ``POST /scc/...``): required headers, ``x-ca-key``, timestamp within
  ``timestamp_window_s``, signature rebuilt with :mod:`airflow_provider_speedpix._signing` from the received
  headers and the received ``x-ca-signature-headers`` list, ``content-md5`` against the raw body bytes, and
  nonce replay (a nonce is remembered for the timestamp window; memory is bounded by pruning). Rejections
  carry the gateway's ``X-Ca-Error-Code`` / ``X-Ca-Error-Message`` headers (codes from the Alibaba Cloud
  API Gateway error-code table, see :data:`GATEWAY_ERRORS`) and never the secret or a computed signature.
* Backend operations ``comfy_prompt``, ``comfy_get_progress``, ``comfy_get_result``,
  ``sp_create_temp_file_upload_sign`` with the camelCase envelope; backend errors are envelope errors on
  HTTP 200.
* Object storage: pre-signed ``PUT /_emulator/upload/<key>?Expires=..&Signature=..`` (streamed to disk)
  and ``GET /_emulator/files/<key>`` for uploads and generated outputs (real PNGs).
* Admin: ``GET /_emulator/stats``, ``POST /_emulator/reset``, ``GET|POST|DELETE /_emulator/faults``,
  ``GET|POST /_emulator/config``.

Task lifecycle: ``waiting`` for the first 10 % of the task's duration, then ``running`` (progress rising
linearly 0-100, ``etaRelative`` = remaining whole seconds), then ``succeeded`` (``failed`` for workflow ids
in ``failing_workflow_ids``). A workflow id ``sleep-<seconds>`` lasts that many seconds.

Fault injection (see :mod:`.faults`): faults fire only on requests that passed the gateway checks.
``429``, ``throttled403``, ``500``/``502``/``503`` and ``html`` fire BEFORE the operation runs, so for
``comfy_prompt`` no task is created; ``slow``, ``reset``, ``malformed``, ``truncated`` and ``missing_data``
fire AFTER it ran, so for ``comfy_prompt`` the task exists (``stats()["predictions"]`` shows it) although
the client got no usable answer. Every request that reaches an operation is counted in ``calls``, faulted
or not; fired faults are also counted in ``faults_fired[operation][kind]``.

All state lives on the event-loop thread; admin endpoints are the way to touch it from elsewhere (the
:class:`~airflow_provider_speedpix.emulator.server.EmulatorServer` helpers go through HTTP).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import secrets
import shutil
import socket
import struct
import tempfile
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, Response

from airflow_provider_speedpix._signing import (
    compute_signature,
    content_md5,
    signatures_match,
    string_to_sign,
)

from .faults import OPERATIONS, Fault, FaultQueue
from .png import output_png

JSON_TYPE = "application/json; charset=utf-8"
SIGNED_OPERATIONS = (
    "comfy_prompt",
    "comfy_get_progress",
    "comfy_get_result",
    "sp_create_temp_file_upload_sign",
)
REQUIRED_HEADERS = (
    "x-ca-key",
    "x-ca-signature",
    "x-ca-timestamp",
    "x-ca-nonce",
    "x-ca-signature-method",
)

# Alibaba Cloud API Gateway error codes (VPC-type instances; six characters, in X-Ca-Error-Code).
GATEWAY_ERRORS = {
    "missing_header": ("I400MH", 400),  # Header `${HeaderName}` is Required
    "invalid_header": ("I400HD", 400),  # Invalid Header `${HeaderName}` ${Reason} (timestamp, method)
    "invalid_app_key": ("A400IK", 400),  # Invalid AppKey
    "invalid_signature": ("I400SG", 400),  # Invalid Signature, Server StringToSign:`...`
    "invalid_content_md5": ("I400I5", 400),  # Invalid Content-MD5
    "nonce_used": ("I400NC", 400),  # Invalid Nonce (used within the last 15 minutes)
    "not_found": ("I404NF", 404),  # API not found
    "throttled": ("T429ID", 429),  # Throttled (flow control)
}

_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class EmulatorConfig:
    app_key: str = "emulator-key"
    app_secret: str = field(default="emulator-secret", repr=False)
    public_url: str = "http://127.0.0.1:8000"
    duration: float = 3.0
    failing_workflow_ids: set[str] = field(default_factory=lambda: {"wf-fail"})
    missing_workflow_ids: set[str] = field(default_factory=lambda: {"wf-missing"})
    timestamp_window_s: float = 900.0
    upload_url_ttl_s: float = 3600.0
    storage_dir: str | None = None
    faults: list[Fault] = field(default_factory=list)


# runtime-changeable settings (POST /_emulator/config); reset restores their start values
RUNTIME_SETTINGS = (
    "duration",
    "failing_workflow_ids",
    "missing_workflow_ids",
    "timestamp_window_s",
    "upload_url_ttl_s",
)


@dataclass
class Task:
    task_id: str
    workflow_id: str
    created: float
    duration: float
    inputs: dict
    return_temp_files: bool
    failing: bool
    alias_id: str | None = None
    version_id: str | None = None
    resource_config_id: str | None = None

    def state(self, now: float) -> tuple[str, float, int]:
        """(status, progress, etaRelative) at monotonic time ``now``."""
        elapsed = now - self.created
        d = self.duration
        if elapsed >= d:
            return ("failed" if self.failing else "succeeded"), 100.0, 0
        eta = max(0, math.ceil(d - elapsed))
        if elapsed < 0.1 * d:
            return "waiting", 0.0, eta
        progress = round(min(99.9, (elapsed - 0.1 * d) / (0.9 * d) * 100.0), 1)
        return "running", progress, eta


@dataclass
class Upload:
    token: str
    expires: int
    content_type: str
    original_filename: str
    path: str | None = None
    stored_type: str | None = None
    size: int = 0


class GatewayError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.code, self.status = GATEWAY_ERRORS[kind]
        self.message = message


class EmulatorState:
    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self._initial = {name: _copy(getattr(config, name)) for name in RUNTIME_SETTINGS}
        self._own_storage = config.storage_dir is None
        self.storage_dir = config.storage_dir or tempfile.mkdtemp(prefix="speedpix-emulator-")
        os.makedirs(os.path.join(self.storage_dir, "objects"), exist_ok=True)
        self.faults = FaultQueue(config.faults)
        self._clear()

    def _clear(self) -> None:
        self.tasks: dict[str, Task] = {}
        self.uploads: dict[str, Upload] = {}
        self.nonces: set[str] = set()
        self.nonce_expiry: deque[tuple[float, str]] = deque()
        self.calls = dict.fromkeys(OPERATIONS, 0)
        self.rejected: dict[str, int] = {}
        self.faults_fired: dict[str, dict[str, int]] = {}
        self.predictions = 0

    def reset(self) -> None:
        """Forget tasks, uploads (and their files), counters, nonces and faults; restore settings."""
        self._clear()
        self.faults.clear()
        for name, value in self._initial.items():
            setattr(self.config, name, _copy(value))
        objects = os.path.join(self.storage_dir, "objects")
        shutil.rmtree(objects, ignore_errors=True)
        os.makedirs(objects, exist_ok=True)

    def close(self) -> None:
        if self._own_storage:
            shutil.rmtree(self.storage_dir, ignore_errors=True)

    def stats(self) -> dict:
        return {
            "calls": dict(self.calls),
            "rejected": dict(self.rejected),
            "faults_fired": {op: dict(kinds) for op, kinds in self.faults_fired.items()},
            "predictions": self.predictions,
            "tasks": len(self.tasks),
            "uploads": sum(1 for u in self.uploads.values() if u.path),
        }

    def settings(self) -> dict:
        out = {}
        for name in RUNTIME_SETTINGS:
            value = getattr(self.config, name)
            out[name] = sorted(value) if isinstance(value, set) else value
        out["public_url"] = self.config.public_url
        out["app_key"] = self.config.app_key
        return out

    # -- gateway ---------------------------------------------------------------------------------------

    def remember_nonce(self, nonce: str, now: float) -> bool:
        """Record ``nonce``; False if it was seen within the window. O(1) amortised, bounded memory."""
        expiry = self.nonce_expiry
        nonces = self.nonces
        while expiry and expiry[0][0] <= now:
            nonces.discard(expiry.popleft()[1])
        if nonce in nonces:
            return False
        nonces.add(nonce)
        expiry.append((now + self.config.timestamp_window_s, nonce))
        return True

    def verify(self, method: str, path: str, headers: Any, body: bytes) -> None:
        """Raise :class:`GatewayError` unless the request passes the gateway's digest checks."""
        for name in REQUIRED_HEADERS:
            if not headers.get(name):
                raise GatewayError("missing_header", f"Header `{name}` is Required")
        if headers["x-ca-key"] != self.config.app_key:
            raise GatewayError("invalid_app_key", "Invalid AppKey")
        method_name = headers["x-ca-signature-method"]
        if method_name != "HmacSHA256":
            raise GatewayError(
                "invalid_header", f"Invalid Header `X-Ca-Signature-Method` Unsupported `{method_name}`"
            )
        try:
            ts_ms = int(headers["x-ca-timestamp"])
        except ValueError:
            raise GatewayError("invalid_header", "Invalid Header `X-Ca-Timestamp` Invalid Format") from None
        if abs(time.time() - ts_ms / 1000.0) > self.config.timestamp_window_s:
            raise GatewayError("invalid_header", "Invalid Header `X-Ca-Timestamp` Timestamp Expired")
        signed = [n.strip() for n in headers.get("x-ca-signature-headers", "").split(",") if n.strip()]
        to_sign = string_to_sign(method=method, path=path, headers=headers, signed_header_names=signed)
        expected = compute_signature(self.config.app_secret, to_sign)
        if not signatures_match(expected, headers["x-ca-signature"]):
            shown = to_sign.replace("\n", "#")
            raise GatewayError("invalid_signature", f"Invalid Signature, Server StringToSign:`{shown}`")
        received_md5 = headers.get("content-md5")
        if received_md5 is not None and received_md5 != content_md5(body):
            raise GatewayError("invalid_content_md5", f"Invalid Content-MD5 `{received_md5}`")
        if not self.remember_nonce(headers["x-ca-nonce"], time.monotonic()):
            raise GatewayError("nonce_used", f"Invalid Nonce `{headers['x-ca-nonce']}` Nonce Used")

    # -- helpers -----------------------------------------------------------------------------------------

    def fire(self, operation: str) -> Fault | None:
        fault = self.faults.take(operation)
        if fault is not None:
            kinds = self.faults_fired.setdefault(operation, {})
            kinds[fault.kind] = kinds.get(fault.kind, 0) + 1
        return fault

    def task_duration(self, workflow_id: str) -> float:
        if workflow_id.startswith("sleep-"):
            try:
                value = float(workflow_id[len("sleep-") :])
                if math.isfinite(value) and value >= 0:
                    return value
            except ValueError:
                pass
        return float(self.config.duration)

    def output_url(self, task_id: str, variant: str = "output") -> str:
        return f"{self.config.public_url}/_emulator/files/outputs/{task_id}/{variant}.png"


def _copy(value: Any) -> Any:
    return set(value) if isinstance(value, set) else value


def _request_id() -> str:
    return str(uuid.uuid4())


def _json_bytes(payload: Any) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def envelope(
    data: Any = None,
    *,
    status: int = 10,
    err_code: str = "",
    err_message: str = "",
    sub_err_code: str = "",
    sub_err_message: str = "",
    include_data: bool = True,
) -> dict:
    out = {
        "status": status,
        "errCode": err_code,
        "errMessage": err_message,
        "subErrCode": sub_err_code,
        "subErrMessage": sub_err_message,
        "apiInvokeId": str(uuid.uuid4()),
    }
    if include_data:
        out["data"] = data
    return out


def envelope_error(code: str, message: str, sub_code: str = "", data: Any = None, status: int = 20) -> dict:
    return envelope(
        data,
        status=status,
        err_code=code,
        err_message=message,
        sub_err_code=sub_code,
        sub_err_message=message if sub_code else "",
    )


def _json_response(payload: Any, status_code: int = 200, headers: dict | None = None) -> Response:
    return Response(_json_bytes(payload), status_code=status_code, media_type=JSON_TYPE, headers=headers)


def _gateway_error_response(code: str, status: int, message: str) -> Response:
    # header values must be latin-1 and single-line
    safe = message.replace("\r", " ").replace("\n", "#").encode("latin-1", "replace").decode("latin-1")
    headers = {"X-Ca-Error-Code": code, "X-Ca-Error-Message": safe, "X-Ca-Request-Id": _request_id()}
    return Response(b"", status_code=status, headers=headers)


def _oss_error(status: int, code: str, message: str) -> Response:
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        f"<RequestId>{uuid.uuid4().hex.upper()[:24]}</RequestId><HostId>emulator</HostId></Error>"
    )
    return Response(body, status_code=status, media_type="application/xml", headers={"x-oss-request-id": ""})


def _abort_connection(request: Request) -> None:
    """Drop the client's TCP connection with an RST, without writing any response."""
    send = request.scope.get("speedpix.emulator.send")
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if transport is None:
        raise RuntimeError("cannot reach the connection's transport to reset it")
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def _fault_response(request: Request, fault: Fault, normal: Response | None) -> Response:
    """The response a fired fault produces; ``normal`` is the operation's answer (AFTER kinds)."""
    kind = fault.kind
    rid = {"X-Ca-Request-Id": _request_id()}
    if kind == "500":
        body = envelope_error("InternalError", "emulated internal server error", status=500)
        return _json_response(body, 500, rid)
    if kind == "502":
        return Response("Bad Gateway", status_code=502, media_type="text/plain", headers=rid)
    if kind == "503":
        return Response("Service Unavailable", status_code=503, media_type="text/plain", headers=rid)
    if kind == "429":
        code, status = GATEWAY_ERRORS["throttled"]
        return _gateway_error_response(code, status, "Throttled by APP Flow Control")
    if kind == "throttled403":
        headers = {**rid, "X-Ca-Error-Message": "Throttled by APP Flow Control"}
        return Response(b"", status_code=403, headers=headers)
    if kind == "html":
        html = (
            "<html><head><title>502 Bad Gateway</title></head><body>"
            "<center><h1>502 Bad Gateway</h1></center><hr><center>Tengine</center></body></html>"
        )
        return Response(html, status_code=502, media_type="text/html", headers=rid)
    assert normal is not None
    if kind == "slow":
        await asyncio.sleep(fault.delay)
        return normal
    if kind == "reset":
        _abort_connection(request)
        return Response(b"", status_code=500)  # never reaches the wire: the transport is gone
    if kind == "malformed":
        return Response(b"<<not json>> {status:", status_code=200, media_type=JSON_TYPE, headers=rid)
    if kind == "truncated":
        whole = bytes(normal.body)
        return Response(whole[: max(1, len(whole) // 2)], status_code=200, media_type=JSON_TYPE, headers=rid)
    if kind == "missing_data":
        return _json_response(envelope(include_data=False), 200, rid)
    raise AssertionError(kind)


class EmulatorApp(FastAPI):
    """FastAPI that keeps the server's raw ``send`` in the scope (used to reach the transport for resets)."""

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        scope["speedpix.emulator.send"] = send

        async def send_with_request_id(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or ())
                if not any(name.lower() == b"x-ca-request-id" for name, _ in headers):
                    headers.append((b"x-ca-request-id", str(uuid.uuid4()).encode("ascii")))
                    message = {**message, "headers": headers}
            await send(message)

        await super().__call__(scope, receive, send_with_request_id)


def create_app(config: EmulatorConfig) -> FastAPI:
    state = EmulatorState(config)
    app = EmulatorApp(
        title="SpeedPix emulator", docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False
    )
    app.state.emulator = state

    # -- operations -----------------------------------------------------------------------------------

    def op_comfy_prompt(body: dict, request: Request) -> dict:
        workflow_id = body.get("workflow_id")
        if not isinstance(workflow_id, str) or not workflow_id.strip():
            return envelope_error("InvalidParameter", "workflow_id is required", "INVALID_PARAMETER")
        inputs = body.get("inputs")
        if inputs is None:
            inputs = {}
        if not isinstance(inputs, dict):
            return envelope_error("InvalidParameter", "inputs must be a JSON object", "INVALID_PARAMETER")
        if workflow_id in config.missing_workflow_ids:
            return envelope_error(
                "WorkflowNotFound", f"workflow {workflow_id} not found", "WORKFLOW_NOT_FOUND"
            )
        task_id = uuid.uuid4().hex
        duration = state.task_duration(workflow_id)
        state.tasks[task_id] = Task(
            task_id=task_id,
            workflow_id=workflow_id,
            created=time.monotonic(),
            duration=duration,
            inputs=inputs,
            return_temp_files=bool(body.get("return_temp_files")),
            failing=workflow_id in config.failing_workflow_ids,
            alias_id=body.get("alias_id"),
            version_id=body.get("version_id"),
            resource_config_id=request.headers.get("x-sp-resource-config-id"),
        )
        state.predictions += 1
        return envelope({"taskId": task_id, "status": "waiting", "estimatedDurationInSeconds": duration})

    def _task_or_error(body: dict) -> Task | dict:
        task_id = body.get("taskId")
        if not isinstance(task_id, str) or not task_id:
            return envelope_error("InvalidParameter", "taskId is required", "INVALID_PARAMETER")
        task = state.tasks.get(task_id)
        if task is None:
            return envelope_error("TaskNotFound", f"task {task_id} not found", "TASK_NOT_FOUND")
        return task

    def op_comfy_get_progress(body: dict, request: Request) -> dict:
        task = _task_or_error(body)
        if isinstance(task, dict):
            return task
        status, progress, eta = task.state(time.monotonic())
        message = {
            "waiting": "queued",
            "running": f"running node {1 + int(progress // 20)} of 6",
            "succeeded": "finished",
            "failed": "execution failed",
        }[status]
        return envelope(
            {
                "taskId": task.task_id,
                "progress": progress,
                "etaRelative": eta,
                "message": message,
                "status": status,
            }
        )

    def op_comfy_get_result(body: dict, request: Request) -> dict:
        task = _task_or_error(body)
        if isinstance(task, dict):
            return task
        status, _, _ = task.state(time.monotonic())
        if status in ("waiting", "running"):
            return envelope_error(
                "TaskNotFinished",
                f"task {task.task_id} is not finished yet (status {status})",
                "TASK_NOT_FINISHED",
                data={"taskId": task.task_id, "status": status},
            )
        if status == "failed":
            return envelope_error(
                "TaskFailed",
                "Node #7 (KSampler) failed: emulated workflow execution failure",
                "WORKFLOW_EXECUTION_FAILED",
                data={"taskId": task.task_id, "status": "failed"},
            )
        url = state.output_url(task.task_id)
        result: dict[str, Any] = {"images": {"url": url}}
        if task.return_temp_files:
            result["subject_image"] = {"url": state.output_url(task.task_id, "subject_image")}
            result["mask_image"] = {"url": state.output_url(task.task_id, "mask_image")}
        return envelope(
            {
                "taskId": task.task_id,
                "status": "succeeded",
                "result": result,
                "images": [url],
                "info": {"workflowId": task.workflow_id, "durationSeconds": f"{task.duration:g}"},
            }
        )

    def op_sp_create_temp_file_upload_sign(body: dict, request: Request) -> dict:
        content_type = body.get("contentType") or "application/octet-stream"
        filename = body.get("originalFilename") or "file"
        if not isinstance(content_type, str) or not isinstance(filename, str):
            return envelope_error("InvalidParameter", "contentType and originalFilename must be strings")
        base = os.path.basename(filename.replace("\\", "/"))
        stem, dot, ext = base.rpartition(".") if "." in base else (base, "", "")
        stem = _UNSAFE_NAME.sub("_", stem).strip("_.") or "file"
        ext = _UNSAFE_NAME.sub("", ext)
        safe = f"{stem}.{ext}" if dot and ext else stem
        object_key = f"uploads/{time.strftime('%Y%m%d', time.gmtime())}/{uuid.uuid4().hex}/{safe}"
        expires = int(time.time() + config.upload_url_ttl_s)
        token = secrets.token_urlsafe(24)
        state.uploads[object_key] = Upload(
            token=token, expires=expires, content_type=content_type, original_filename=filename
        )
        base_url = config.public_url
        return envelope(
            {
                "uploadUrl": f"{base_url}/_emulator/upload/{object_key}?Expires={expires}&Signature={token}",
                "objectKey": object_key,
                "path": object_key,
                "expireTime": expires,
                "accessUrl": f"{base_url}/_emulator/files/{object_key}",
            }
        )

    handlers = {
        "comfy_prompt": op_comfy_prompt,
        "comfy_get_progress": op_comfy_get_progress,
        "comfy_get_result": op_comfy_get_result,
        "sp_create_temp_file_upload_sign": op_sp_create_temp_file_upload_sign,
    }

    async def signed_call(request: Request) -> Response:
        operation = request.path_params["operation"]
        body_bytes = await request.body()
        handler = handlers.get(operation)
        if handler is None:
            state.rejected["I404NF"] = state.rejected.get("I404NF", 0) + 1
            code, status = GATEWAY_ERRORS["not_found"]
            return _gateway_error_response(code, status, f"API not found: /scc/{operation}")
        try:
            state.verify("POST", request.url.path, request.headers, body_bytes)
        except GatewayError as exc:
            state.rejected[exc.code] = state.rejected.get(exc.code, 0) + 1
            return _gateway_error_response(exc.code, exc.status, exc.message)
        state.calls[operation] += 1
        fault = state.fire(operation)
        if fault is not None and fault.fires_before:
            return await _fault_response(request, fault, None)
        rid = {"X-Ca-Request-Id": _request_id()}
        try:
            body = json.loads(body_bytes) if body_bytes else {}
        except ValueError:
            response = _json_response(
                envelope_error("InvalidParameter", "request body is not valid JSON", "INVALID_PARAMETER"),
                400,
                rid,
            )
        else:
            if not isinstance(body, dict):
                payload = envelope_error("InvalidParameter", "request body must be a JSON object")
            else:
                payload = handler(body, request)
            response = _json_response(payload, 200, rid)
        if fault is not None:
            return await _fault_response(request, fault, response)
        return response

    # -- object storage --------------------------------------------------------------------------------

    async def upload_put(request: Request) -> Response:
        key = request.path_params["key"]
        state.calls["upload_put"] += 1
        fault = state.fire("upload_put")
        if fault is not None and fault.fires_before:
            return await _fault_response(request, fault, None)
        upload = state.uploads.get(key)
        token = request.query_params.get("Signature", "")
        expires = request.query_params.get("Expires", "")
        if upload is None or not secrets.compare_digest(token.encode(), upload.token.encode()):
            return _oss_error(
                403,
                "SignatureDoesNotMatch",
                "The request signature we calculated does not match the signature you provided.",
            )
        if expires != str(upload.expires):
            return _oss_error(403, "SignatureDoesNotMatch", "Expires does not match the signed value.")
        if time.time() >= upload.expires:
            return _oss_error(403, "AccessDenied", "Request has expired.")
        content_type = request.headers.get("content-type", "")
        if upload.content_type and content_type.split(";")[0].strip() != upload.content_type.split(";")[0]:
            return _oss_error(
                403,
                "SignatureDoesNotMatch",
                "Content-Type does not match the one the upload URL was signed for.",
            )
        objects = os.path.join(state.storage_dir, "objects")
        final = os.path.join(objects, uuid.uuid5(uuid.NAMESPACE_URL, key).hex)
        partial = f"{final}.{uuid.uuid4().hex}.part"
        size = 0
        try:
            with open(partial, "wb") as fh:
                async for chunk in request.stream():
                    if chunk:
                        fh.write(chunk)
                        size += len(chunk)
            os.replace(partial, final)
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
        upload.path = final
        upload.stored_type = content_type or upload.content_type
        upload.size = size
        response = Response(
            b"",
            status_code=200,
            headers={"ETag": f'"{uuid.uuid4().hex.upper()}"', "x-oss-request-id": uuid.uuid4().hex[:24]},
        )
        if fault is not None:
            return await _fault_response(request, fault, response)
        return response

    async def file_get(request: Request) -> Response:
        key = request.path_params["key"]
        state.calls["file_get"] += 1
        fault = state.fire("file_get")
        if fault is not None and fault.fires_before:
            return await _fault_response(request, fault, None)
        response = _serve_file(key)
        if fault is not None:
            return await _fault_response(request, fault, response)
        return response

    def _serve_file(key: str) -> Response:
        if key.startswith("outputs/"):
            parts = key.split("/")
            variants = ("output.png", "subject_image.png", "mask_image.png")
            if len(parts) == 3 and parts[2] in variants:
                task = state.tasks.get(parts[1])
                if task is not None and task.state(time.monotonic())[0] == "succeeded":
                    variant = parts[2][: -len(".png")]
                    if variant == "output" or task.return_temp_files:
                        return Response(output_png(task.task_id, variant), media_type="image/png")
            return _oss_error(404, "NoSuchKey", "The specified key does not exist.")
        upload = state.uploads.get(key)
        if upload is None or upload.path is None or not os.path.exists(upload.path):
            return _oss_error(404, "NoSuchKey", "The specified key does not exist.")
        return FileResponse(upload.path, media_type=upload.stored_type or "application/octet-stream")

    # -- admin -----------------------------------------------------------------------------------------

    async def stats(request: Request) -> Response:
        return _json_response(state.stats())

    async def reset(request: Request) -> Response:
        state.reset()
        return _json_response({"ok": True})

    async def list_faults(request: Request) -> Response:
        return _json_response({"faults": state.faults.pending()})

    async def add_fault(request: Request) -> Response:
        try:
            spec = json.loads(await request.body())
            fault = Fault(
                operation=spec["operation"],
                kind=str(spec["kind"]),
                times=spec.get("times", 1),
                delay=spec.get("delay", 0.0),
            )
        except (ValueError, KeyError, TypeError) as exc:
            return _json_response({"error": str(exc)}, 400)
        state.faults.add(fault)
        return _json_response({"faults": state.faults.pending()})

    async def clear_faults(request: Request) -> Response:
        state.faults.clear()
        return _json_response({"faults": []})

    async def get_config(request: Request) -> Response:
        return _json_response(state.settings())

    async def set_config(request: Request) -> Response:
        try:
            changes = json.loads(await request.body())
            if not isinstance(changes, dict):
                raise ValueError("body must be a JSON object")
            unknown = set(changes) - set(RUNTIME_SETTINGS)
            if unknown:
                raise ValueError(f"not changeable at runtime: {', '.join(sorted(unknown))}")
            parsed: dict[str, Any] = {}
            for name, value in changes.items():
                if name.endswith("_ids"):
                    if not isinstance(value, list | tuple | set):
                        raise ValueError(f"{name} must be a list")
                    parsed[name] = {str(v) for v in value}
                else:
                    number = float(value)
                    if not math.isfinite(number) or number < 0:
                        raise ValueError(f"{name} must be a non-negative number")
                    parsed[name] = number
        except (ValueError, TypeError) as exc:
            return _json_response({"error": str(exc)}, 400)
        for name, value in parsed.items():
            setattr(config, name, value)
        return _json_response(state.settings())

    async def health(request: Request) -> Response:
        return _json_response({"ok": True})

    # Plain Starlette routes (no FastAPI dependency solving): the signed path is the hot one.
    app.add_route("/scc/{operation}", signed_call, methods=["POST"])
    app.add_route("/_emulator/upload/{key:path}", upload_put, methods=["PUT"])
    app.add_route("/_emulator/files/{key:path}", file_get, methods=["GET", "HEAD"])
    app.add_route("/_emulator/stats", stats, methods=["GET"])
    app.add_route("/_emulator/reset", reset, methods=["POST"])
    app.add_route("/_emulator/faults", list_faults, methods=["GET"])
    app.add_route("/_emulator/faults", add_fault, methods=["POST"])
    app.add_route("/_emulator/faults", clear_faults, methods=["DELETE"])
    app.add_route("/_emulator/config", get_config, methods=["GET"])
    app.add_route("/_emulator/config", set_config, methods=["POST"])
    app.add_route("/_emulator/health", health, methods=["GET"])
    return app
