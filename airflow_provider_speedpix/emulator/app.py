"""A faithful local SpeedPix, assembled: gateway in front of the backend, object storage, admin.

The parts, one role each:

* :mod:`.gateway`: Alibaba Cloud API Gateway digest checks on every ``POST /scc/<operation>`` (the verify
  half of :mod:`airflow_provider_speedpix._signing`), nonce memory, ``X-Ca-Error-*`` refusals.
* :mod:`.backend`: ``comfy_prompt`` / ``comfy_get_progress`` / ``comfy_get_result``, the task lifecycle,
  the FIFO worker queue, estimate errors, resource pools.
* :mod:`.storage`: ``sp_create_temp_file_upload_sign``, pre-signed ``PUT /_emulator/upload/<key>``
  (streamed to disk) and ``GET /_emulator/files/<key>``.
* :mod:`.faults`: one wrapper every operation runs through (counts calls, fires injected faults).
* here: the shared state, the routes, and the admin endpoints ``GET /_emulator/stats``,
  ``POST /_emulator/reset``, ``GET|POST|DELETE /_emulator/faults``, ``GET|POST /_emulator/config``,
  ``GET /_emulator/health``.

Faults fire only on requests that passed the gateway checks. ``429``, ``throttled403``,
``500``/``502``/``503`` and ``html`` fire BEFORE the operation runs, so for ``comfy_prompt`` no task is
created; ``slow``, ``reset``, ``malformed``, ``truncated`` and ``missing_data`` fire AFTER it ran, so for
``comfy_prompt`` the task exists (``stats()["predictions"]`` shows it) although the client got no usable
answer. Every request that reaches an operation is counted in ``calls``, faulted or not; fired faults are
also counted in ``faults_fired[operation][kind]``.

All state lives on the event-loop thread; admin endpoints are the way to touch it from elsewhere (the
:class:`~airflow_provider_speedpix.emulator.server.EmulatorServer` helpers go through HTTP). Options are
described in ``docs/emulator.md``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from airflow_provider_speedpix._protocol import CREATE, PATHS, PROGRESS, RESULT, UPLOAD_SIGN
from airflow_provider_speedpix._signing import compute_signature  # noqa: F401 - kept importable here

from .backend import Backend, Task
from .config import (
    FIXED_SETTINGS,
    RUNTIME_SETTINGS,
    EmulatorConfig,
    copy_value,
    parse_runtime_changes,
)
from .faults import FILE_GET, UPLOAD_PUT, Fault, FaultInjector, FaultQueue
from .gateway import GATEWAY_ERRORS, REQUIRED_HEADERS, Gateway, GatewayError, not_found_response
from .storage import Storage, Upload
from .wire import JSON_TYPE, envelope, envelope_error, invalid_parameter, json_response, request_id

__all__ = [
    "GATEWAY_ERRORS",
    "JSON_TYPE",
    "REQUIRED_HEADERS",
    "RUNTIME_SETTINGS",
    "EmulatorApp",
    "EmulatorConfig",
    "EmulatorState",
    "GatewayError",
    "Task",
    "Upload",
    "create_app",
    "envelope",
    "envelope_error",
]

Operation = Callable[[dict, Mapping[str, str]], dict]


class EmulatorState:
    """Everything one emulator remembers: its gateway, backend, storage and faults."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.clock = config.clock
        self._initial = {name: copy_value(getattr(config, name)) for name in RUNTIME_SETTINGS}
        self.gateway = Gateway(config, self.clock)
        self.backend = Backend(config, self.clock)
        self.storage = Storage(config, self.clock, self.backend.output_available)
        self.injector = FaultInjector(config.faults)
        handlers: dict[str, Operation] = {
            CREATE: self.backend.create,
            PROGRESS: self.backend.progress,
            RESULT: self.backend.result,
            UPLOAD_SIGN: self.storage.sign_upload,
        }
        #: request path -> (operation name, handler); the paths are the client's (``_protocol.PATHS``)
        self.operations = {PATHS[name]: (name, handler) for name, handler in handlers.items()}

    # names older callers (tests, tools) reach for
    @property
    def tasks(self) -> dict[str, Task]:
        return self.backend.tasks

    @property
    def uploads(self) -> dict[str, Upload]:
        return self.storage.uploads

    @property
    def storage_dir(self) -> str:
        return self.storage.storage_dir

    @property
    def faults(self) -> FaultQueue:
        return self.injector.queue

    def verify(self, method: str, path: str, headers: Any, body: bytes) -> None:
        """Raise :class:`GatewayError` unless the request passes the gateway's digest checks."""
        self.gateway.verify(method, path, headers, body)

    def reset(self) -> None:
        """Forget tasks, uploads (and their files), counters, nonces and faults; restore settings."""
        for name, value in self._initial.items():
            setattr(self.config, name, copy_value(value))
        self.gateway.reset()
        self.backend.reset()
        self.storage.reset()
        self.injector.reset_counters()
        self.injector.queue.clear()

    def close(self) -> None:
        self.storage.close()

    def stats(self) -> dict:
        return {
            "calls": dict(self.injector.calls),
            "rejected": dict(self.gateway.rejected),
            "faults_fired": {op: dict(kinds) for op, kinds in self.injector.fired.items()},
            "predictions": self.backend.predictions,
            "tasks": len(self.backend.tasks),
            "uploads": self.storage.stored(),
        }

    def settings(self) -> dict:
        out: dict[str, Any] = {}
        for name in RUNTIME_SETTINGS + FIXED_SETTINGS:
            value = getattr(self.config, name)
            out[name] = sorted(value) if isinstance(value, set) else value
        return out

    # -- the signed path -------------------------------------------------------------------------------

    async def signed_call(self, request: Request) -> Response:
        found = self.operations.get(request.url.path)
        if found is None:
            self.gateway.count_rejection(GATEWAY_ERRORS["not_found"][0])
            return not_found_response(request.url.path)
        operation, handler = found
        body_bytes = await request.body()
        if self.config.latency:
            await asyncio.sleep(self.config.latency)  # a remote service: concurrent calls wait together
        refused = self.gateway.check("POST", request.url.path, request.headers, body_bytes)
        if refused is not None:
            return refused

        async def run() -> Response:
            return _backend_response(handler, body_bytes, request.headers)

        return await self.injector.around(operation, request, run)


def _backend_response(handler: Operation, body_bytes: bytes, headers: Mapping[str, str]) -> Response:
    rid = {"X-Ca-Request-Id": request_id()}
    try:
        body = json.loads(body_bytes) if body_bytes else {}
    except ValueError:
        return json_response(invalid_parameter("request body is not valid JSON"), 400, rid)
    if not isinstance(body, dict):
        return json_response(invalid_parameter("request body must be a JSON object", sub_code=""), 200, rid)
    return json_response(handler(body, headers), 200, rid)


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


def create_app(config: EmulatorConfig | None = None, **options: Any) -> FastAPI:
    """The emulator as an ASGI app. ``options`` are :class:`EmulatorConfig` fields (``capacity=2``...)."""
    if config is None:
        config = EmulatorConfig(**options)
    elif options:
        config = dataclasses.replace(config, **options)
    state = EmulatorState(config)
    app = EmulatorApp(
        title="SpeedPix emulator", docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False
    )
    app.state.emulator = state
    injector, storage = state.injector, state.storage

    async def upload_put(request: Request) -> Response:
        return await injector.around(
            UPLOAD_PUT, request, lambda: storage.put(request), refuse=lambda: storage.refuse_put(request)
        )

    async def file_get(request: Request) -> Response:
        return await injector.around(FILE_GET, request, lambda: storage.get(request))

    # Plain Starlette routes (no FastAPI dependency solving): the signed path is the hot one.
    app.add_route("/scc/{operation}", state.signed_call, methods=["POST"])
    app.add_route("/_emulator/upload/{key:path}", upload_put, methods=["PUT"])
    app.add_route("/_emulator/files/{key:path}", file_get, methods=["GET", "HEAD"])
    _add_admin_routes(app, state)
    return app


def _add_admin_routes(app: FastAPI, state: EmulatorState) -> None:
    async def stats(request: Request) -> Response:
        return json_response(state.stats())

    async def reset(request: Request) -> Response:
        state.reset()
        return json_response({"ok": True})

    async def list_faults(request: Request) -> Response:
        return json_response({"faults": state.faults.pending()})

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
            return json_response({"error": str(exc)}, 400)
        state.faults.add(fault)
        return json_response({"faults": state.faults.pending()})

    async def clear_faults(request: Request) -> Response:
        state.faults.clear()
        return json_response({"faults": []})

    async def get_config(request: Request) -> Response:
        return json_response(state.settings())

    async def set_config(request: Request) -> Response:
        try:
            parsed = parse_runtime_changes(json.loads(await request.body()))
        except (ValueError, TypeError) as exc:
            return json_response({"error": str(exc)}, 400)
        for name, value in parsed.items():
            setattr(state.config, name, value)
        return json_response(state.settings())

    async def health(request: Request) -> Response:
        return json_response({"ok": True})

    app.add_route("/_emulator/stats", stats, methods=["GET"])
    app.add_route("/_emulator/reset", reset, methods=["POST"])
    app.add_route("/_emulator/faults", list_faults, methods=["GET"])
    app.add_route("/_emulator/faults", add_fault, methods=["POST"])
    app.add_route("/_emulator/faults", clear_faults, methods=["DELETE"])
    app.add_route("/_emulator/config", get_config, methods=["GET"])
    app.add_route("/_emulator/config", set_config, methods=["POST"])
    app.add_route("/_emulator/health", health, methods=["GET"])
