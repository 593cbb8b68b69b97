"""The Alibaba Cloud API Gateway in front of SpeedPix: digest checks on every ``POST /scc/...``.

Required headers, ``x-ca-key``, the signature method, then :func:`~airflow_provider_speedpix._signing.
verify_request` (timestamp within ``timestamp_window_s``, signature rebuilt from the received headers and
the received ``x-ca-signature-headers`` list, ``content-md5`` against the raw body bytes), then nonce
replay (a nonce is remembered for the timestamp window; memory is bounded by pruning). Rejections carry
the gateway's ``X-Ca-Error-Code`` / ``X-Ca-Error-Message`` headers (codes from the Alibaba Cloud API
Gateway error-code table, :data:`GATEWAY_ERRORS`) and never the secret or a computed signature.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING

from fastapi.responses import Response

from airflow_provider_speedpix._signing import SignatureVerificationError, verify_request

from .clock import Clock
from .wire import request_id

if TYPE_CHECKING:
    from .config import EmulatorConfig

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


class GatewayError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.code, self.status = GATEWAY_ERRORS[kind]
        self.message = message


def gateway_error_response(code: str, status: int, message: str) -> Response:
    """An answer from the gateway itself: empty body, the error in ``X-Ca-Error-*`` headers."""
    # header values must be latin-1 and single-line
    safe = message.replace("\r", " ").replace("\n", "#").encode("latin-1", "replace").decode("latin-1")
    headers = {"X-Ca-Error-Code": code, "X-Ca-Error-Message": safe, "X-Ca-Request-Id": request_id()}
    return Response(b"", status_code=status, headers=headers)


def not_found_response(path: str) -> Response:
    code, status = GATEWAY_ERRORS["not_found"]
    return gateway_error_response(code, status, f"API not found: {path}")


class NonceMemory:
    """Nonces seen within the window. O(1) amortised per request, memory bounded by pruning."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self._seen: set[str] = set()
        self._expiry: deque[tuple[float, str]] = deque()

    def remember(self, nonce: str, now: float, window_s: float) -> bool:
        """Record ``nonce``; False if it was seen within the window."""
        while self._expiry and self._expiry[0][0] <= now:
            self._seen.discard(self._expiry.popleft()[1])
        if nonce in self._seen:
            return False
        self._seen.add(nonce)
        self._expiry.append((now + window_s, nonce))
        return True


class Gateway:
    """The digest checks. Key, secret and window are read on every call (they change at runtime)."""

    def __init__(self, config: EmulatorConfig, clock: Clock) -> None:
        self._config = config
        self._clock = clock
        self.nonces = NonceMemory()
        self.rejected: dict[str, int] = {}

    def reset(self) -> None:
        self.nonces.clear()
        self.rejected = {}

    def count_rejection(self, code: str) -> None:
        self.rejected[code] = self.rejected.get(code, 0) + 1

    def verify(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> None:
        """Raise :class:`GatewayError` unless the request passes the gateway's digest checks."""
        app_key, app_secret = self._config.app_key, self._config.app_secret
        window_s = self._config.timestamp_window_s
        for name in REQUIRED_HEADERS:
            if not headers.get(name):
                raise GatewayError("missing_header", f"Header `{name}` is Required")
        if headers["x-ca-key"] != app_key:
            raise GatewayError("invalid_app_key", "Invalid AppKey")
        method_name = headers["x-ca-signature-method"]
        if method_name != "HmacSHA256":
            raise GatewayError(
                "invalid_header", f"Invalid Header `X-Ca-Signature-Method` Unsupported `{method_name}`"
            )
        try:
            verify_request(
                method=method,
                path=path,
                headers=headers,
                body=body,
                app_secret=app_secret,
                tolerance_s=window_s,
                clock=self._clock.time,
            )
        except SignatureVerificationError as exc:
            raise _as_gateway_error(exc, headers) from None
        if not self.nonces.remember(headers["x-ca-nonce"], self._clock.monotonic(), window_s):
            raise GatewayError("nonce_used", f"Invalid Nonce `{headers['x-ca-nonce']}` Nonce Used")

    def check(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> Response | None:
        """:meth:`verify` as a response: None when accepted, else the gateway's refusal (counted)."""
        try:
            self.verify(method, path, headers, body)
        except GatewayError as exc:
            self.count_rejection(exc.code)
            return gateway_error_response(exc.code, exc.status, exc.message)
        return None


def _as_gateway_error(exc: SignatureVerificationError, headers: Mapping[str, str]) -> GatewayError:
    if exc.reason == "timestamp_format":
        return GatewayError("invalid_header", "Invalid Header `X-Ca-Timestamp` Invalid Format")
    if exc.reason == "timestamp_expired":
        return GatewayError("invalid_header", "Invalid Header `X-Ca-Timestamp` Timestamp Expired")
    if exc.reason == "content_md5":
        return GatewayError("invalid_content_md5", f"Invalid Content-MD5 `{headers.get('content-md5')}`")
    shown = exc.string_to_sign.replace("\n", "#")
    return GatewayError("invalid_signature", f"Invalid Signature, Server StringToSign:`{shown}`")
