"""Fault injection for the SpeedPix emulator.

A fault is ``(operation, kind, times, delay)``. Operations are the names used in ``/_emulator/stats``:
``comfy_prompt``, ``comfy_get_progress``, ``comfy_get_result``, ``sp_create_temp_file_upload_sign``,
``upload_put``, ``file_get``. Pending faults of one operation fire on its next calls in FIFO order; a
fault with ``times=N`` answers N consecutive calls, then the next queued fault takes over.

Kinds, and whether they fire BEFORE the operation runs (nothing is created or stored) or AFTER it ran
(for ``comfy_prompt`` the task exists and is billed, the client just never gets a usable answer):

=================  ======  ============================================================================
kind               when    what the client sees
=================  ======  ============================================================================
``500``            before  HTTP 500, JSON body (backend error, no ``X-Ca-Error-Code``)
``502``            before  HTTP 502, plain-text body
``503``            before  HTTP 503, plain-text body
``429``            before  HTTP 429, gateway throttling: ``X-Ca-Error-Code: T429ID``
``throttled403``   before  HTTP 403, ``X-Ca-Error-Message: Throttled by APP Flow Control`` (the older
                           gateway style, message only)
``html``           before  HTTP 502, ``text/html`` error page (a proxy in the way)
``slow``           after   sleeps ``delay`` seconds, then the normal answer (read timeouts on create are
                           dangerous precisely because the task already exists)
``reset``          after   the TCP connection is dropped (RST) without any response
``malformed``      after   HTTP 200, body that is not JSON
``truncated``      after   HTTP 200, the normal JSON body cut in half (consistent Content-Length)
``missing_data``   after   HTTP 200, success envelope (status 10) without ``data``
=================  ======  ============================================================================

Signed calls pass the gateway checks (key, timestamp, signature, MD5, nonce) before any fault is
considered, so a fault only ever hits a request that would otherwise have been accepted.

:meth:`FaultInjector.around` is the one wrapper every operation (gateway call or storage request) runs
through: it counts the call, takes the next pending fault and answers BEFORE or AFTER the operation.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass

from fastapi import Request
from fastapi.responses import Response

from airflow_provider_speedpix._protocol import CREATE, PROGRESS, RESULT, UPLOAD_SIGN

from .gateway import GATEWAY_ERRORS, gateway_error_response
from .wire import JSON_TYPE, envelope, envelope_error, json_response, request_id

#: The storage side's operations (not gateway calls, so not in ``_protocol``).
UPLOAD_PUT = "upload_put"
FILE_GET = "file_get"
OPERATIONS = (CREATE, PROGRESS, RESULT, UPLOAD_SIGN, UPLOAD_PUT, FILE_GET)
BEFORE_KINDS = frozenset({"500", "502", "503", "429", "throttled403", "html"})
AFTER_KINDS = frozenset({"slow", "reset", "malformed", "truncated", "missing_data"})
KINDS = BEFORE_KINDS | AFTER_KINDS


@dataclass
class Fault:
    operation: str
    kind: str
    times: int = 1
    delay: float = 0.0

    def __post_init__(self) -> None:
        self.kind = str(self.kind)
        if self.operation not in OPERATIONS:
            raise ValueError(f"unknown operation {self.operation!r}; expected one of {', '.join(OPERATIONS)}")
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; expected one of {', '.join(sorted(KINDS))}")
        self.times = int(self.times)
        self.delay = float(self.delay)
        if self.times < 1:
            raise ValueError("times must be >= 1")
        if self.delay < 0:
            raise ValueError("delay must be >= 0")

    @property
    def fires_before(self) -> bool:
        return self.kind in BEFORE_KINDS

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def parse(cls, spec: str) -> Fault:
        """Parse the CLI form ``op:kind[:times[:delay]]``."""
        parts = spec.split(":")
        if not 2 <= len(parts) <= 4:
            raise ValueError(f"bad fault spec {spec!r}; expected op:kind[:times[:delay]]")
        times = int(parts[2]) if len(parts) > 2 and parts[2] else 1
        delay = float(parts[3]) if len(parts) > 3 and parts[3] else 0.0
        return cls(operation=parts[0], kind=parts[1], times=times, delay=delay)


class FaultQueue:
    """Per-operation FIFO of pending faults. Cheap when empty (one dict lookup)."""

    def __init__(self, faults: list[Fault] | None = None) -> None:
        self._lock = threading.Lock()
        self._queues: dict[str, deque[Fault]] = {}
        for fault in faults or ():
            self.add(fault)

    def add(self, fault: Fault) -> None:
        with self._lock:
            self._queues.setdefault(fault.operation, deque()).append(
                Fault(fault.operation, fault.kind, fault.times, fault.delay)
            )

    def take(self, operation: str) -> Fault | None:
        """Consume one shot of the oldest pending fault of ``operation`` (or return ``None``)."""
        queue = self._queues.get(operation)
        if not queue:
            return None
        with self._lock:
            if not queue:
                return None
            head = queue[0]
            head.times -= 1
            if head.times <= 0:
                queue.popleft()
            return Fault(head.operation, head.kind, 1, head.delay)

    def pending(self) -> list[dict]:
        with self._lock:
            return [f.to_dict() for op in OPERATIONS for f in self._queues.get(op, ())]

    def clear(self) -> None:
        with self._lock:
            self._queues.clear()


class FaultInjector:
    """Pending faults plus the per-operation counters (``calls``, ``faults_fired``) of ``/_emulator/stats``."""

    def __init__(self, faults: list[Fault] | None = None) -> None:
        self.queue = FaultQueue(faults)
        self.reset_counters()

    def reset_counters(self) -> None:
        self.calls = dict.fromkeys(OPERATIONS, 0)
        self.fired: dict[str, dict[str, int]] = {}

    def fire(self, operation: str) -> Fault | None:
        fault = self.queue.take(operation)
        if fault is not None:
            kinds = self.fired.setdefault(operation, {})
            kinds[fault.kind] = kinds.get(fault.kind, 0) + 1
        return fault

    async def around(
        self,
        operation: str,
        request: Request,
        run: Callable[[], Awaitable[Response]],
        refuse: Callable[[], Response | None] | None = None,
    ) -> Response:
        """Count the call and run it, unless a pending fault answers before or instead of it.

        ``refuse`` (object storage: token, expiry, content type) may turn the request away after the
        BEFORE faults; a refused request ran nothing, so an AFTER fault taken for it is spent unseen.
        """
        self.calls[operation] += 1
        fault = self.fire(operation)
        if fault is not None and fault.fires_before:
            return await fault_response(request, fault, None)
        refusal = refuse() if refuse is not None else None
        if refusal is not None:
            return refusal
        response = await run()
        if fault is not None:
            return await fault_response(request, fault, response)
        return response


def abort_connection(request: Request) -> None:
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


_HTML_502 = (
    "<html><head><title>502 Bad Gateway</title></head><body>"
    "<center><h1>502 Bad Gateway</h1></center><hr><center>Tengine</center></body></html>"
)


async def fault_response(request: Request, fault: Fault, normal: Response | None) -> Response:
    """The response a fired fault produces; ``normal`` is the operation's answer (AFTER kinds)."""
    kind = fault.kind
    rid = {"X-Ca-Request-Id": request_id()}
    if kind == "500":
        return json_response(
            envelope_error("InternalError", "emulated internal server error", status=500), 500, rid
        )
    if kind in ("502", "503"):
        text = "Bad Gateway" if kind == "502" else "Service Unavailable"
        return Response(text, status_code=int(kind), media_type="text/plain", headers=rid)
    if kind == "429":
        code, status = GATEWAY_ERRORS["throttled"]
        return gateway_error_response(code, status, "Throttled by APP Flow Control")
    if kind == "throttled403":
        return Response(
            b"", status_code=403, headers={**rid, "X-Ca-Error-Message": "Throttled by APP Flow Control"}
        )
    if kind == "html":
        return Response(_HTML_502, status_code=502, media_type="text/html", headers=rid)
    assert normal is not None
    if kind == "slow":
        await asyncio.sleep(fault.delay)
        return normal
    if kind == "reset":
        abort_connection(request)
        return Response(b"", status_code=500)  # never reaches the wire: the transport is gone
    if kind == "malformed":
        return Response(b"<<not json>> {status:", status_code=200, media_type=JSON_TYPE, headers=rid)
    if kind == "truncated":
        whole = bytes(normal.body)
        return Response(whole[: max(1, len(whole) // 2)], status_code=200, media_type=JSON_TYPE, headers=rid)
    if kind == "missing_data":
        return json_response(envelope(include_data=False), 200, rid)
    raise AssertionError(kind)
