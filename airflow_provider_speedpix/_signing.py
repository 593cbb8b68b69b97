"""Alibaba Cloud API Gateway digest signing (HmacSHA256), as SpeedPix expects it.

Pure functions, no I/O and no Airflow imports: the hook (sync and async), the emulator's gateway and
the tests all use this one module, so the string-to-sign is defined exactly once. Both halves live here,
as stripe-python keeps generate and verify together: :func:`sign_request` builds the headers and
:func:`verify_request` checks them (constant-time comparison, a timestamp tolerance window).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
import uuid
from collections.abc import Callable, Mapping

JSON_CONTENT_TYPE = "application/json; charset=utf-8"
SIGNATURE_METHOD = "HmacSHA256"
SIGNED_HEADERS = ("x-ca-timestamp", "x-ca-key", "x-ca-nonce", "x-ca-signature-method")


def content_md5(body: bytes) -> str:
    """``base64(MD5(body))``; the gateway checks it against the bytes it received."""
    return base64.b64encode(hashlib.md5(body).digest()).decode("ascii")  # noqa: S324 - protocol-mandated


def gateway_date(epoch_seconds: float) -> str:
    """RFC 1123 date in GMT with the ``+00:00`` suffix the official SDKs send."""
    return time.strftime("%a, %d %b %Y %H:%M:%S GMT+00:00", time.gmtime(epoch_seconds))


def string_to_sign(
    *,
    method: str,
    path: str,
    headers: Mapping[str, str],
    signed_header_names: tuple[str, ...] | list[str] = SIGNED_HEADERS,
) -> str:
    """Build the gateway's string-to-sign from request headers (names are matched case-insensitively).

    ``signed_header_names`` come from ``x-ca-signature-headers``; they are listed sorted by name, as the
    gateway does.
    """
    lower = {k.lower(): v for k, v in headers.items()}
    lines = [
        method.upper(),
        lower.get("accept", ""),
        lower.get("content-md5", ""),
        lower.get("content-type", ""),
        lower.get("date", ""),
    ]
    lines += [f"{name}:{lower.get(name, '')}" for name in sorted(n.lower() for n in signed_header_names)]
    lines.append(path)
    return "\n".join(lines)


def compute_signature(app_secret: str, to_sign: str) -> str:
    """``base64(HMAC-SHA256(app_secret, string_to_sign))``."""
    digest = hmac.new(app_secret.encode("utf-8"), to_sign.encode("utf-8"), hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


def sign_request(
    *,
    method: str,
    path: str,
    body: bytes,
    app_key: str,
    app_secret: str,
    clock: Callable[[], float] = time.time,
    nonce: Callable[[], str] = lambda: str(uuid.uuid4()),
) -> dict[str, str]:
    """Return every header a gateway-signed request needs.

    ``body`` must be the exact bytes that go on the wire. ``clock`` and ``nonce`` are injectable so a
    test can pin a vector; in normal use each call yields a fresh timestamp and nonce, which is what
    makes a retried request acceptable to the gateway.
    """
    now = clock()
    headers = {
        "date": gateway_date(now),
        "x-ca-key": app_key,
        "x-ca-timestamp": str(int(now * 1000)),
        "x-ca-nonce": nonce(),
        "x-ca-signature-method": SIGNATURE_METHOD,
        "x-ca-signature-headers": ",".join(SIGNED_HEADERS),
        "Content-Type": JSON_CONTENT_TYPE,
        "Accept": JSON_CONTENT_TYPE,
    }
    if body:
        headers["content-md5"] = content_md5(body)
    headers["x-ca-signature"] = compute_signature(
        app_secret, string_to_sign(method=method, path=path, headers=headers)
    )
    return headers


def signatures_match(expected: str, received: str) -> bool:
    """Constant-time comparison, for verifiers."""
    return hmac.compare_digest(expected.encode("ascii", "replace"), received.encode("ascii", "replace"))


#: How far a request's ``x-ca-timestamp`` may be from the verifier's clock (the gateway allows 15 minutes).
DEFAULT_TOLERANCE_S = 900.0


class SignatureVerificationError(ValueError):
    """A signed request failed :func:`verify_request`.

    ``reason`` is one of ``timestamp_format``, ``timestamp_expired``, ``signature``, ``content_md5``.
    ``string_to_sign`` is the verifier's own string-to-sign (safe to show: it holds no secret).
    """

    def __init__(self, reason: str, message: str, string_to_sign: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.string_to_sign = string_to_sign


def verify_request(
    *,
    method: str,
    path: str,
    headers: Mapping[str, str],
    body: bytes,
    app_secret: str,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    clock: Callable[[], float] = time.time,
) -> None:
    """Check a request signed by :func:`sign_request`; raise :class:`SignatureVerificationError` if not.

    In the gateway's order: the timestamp is within ``tolerance_s`` of ``clock()``, the signature rebuilt
    from the received headers and the received ``x-ca-signature-headers`` list matches (constant time),
    and ``content-md5``, when sent, is the MD5 of ``body``. The caller checks the key, the signature
    method and nonce reuse (they need the verifier's own state).
    """
    lower = {k.lower(): v for k, v in headers.items()}
    try:
        timestamp_ms = int(lower.get("x-ca-timestamp", ""))
    except ValueError:
        raise SignatureVerificationError("timestamp_format", "x-ca-timestamp is not an integer") from None
    if abs(clock() - timestamp_ms / 1000.0) > tolerance_s:
        raise SignatureVerificationError("timestamp_expired", "x-ca-timestamp is outside the tolerance")
    signed = [n.strip() for n in lower.get("x-ca-signature-headers", "").split(",") if n.strip()]
    to_sign = string_to_sign(method=method, path=path, headers=lower, signed_header_names=signed)
    if not signatures_match(compute_signature(app_secret, to_sign), lower.get("x-ca-signature", "")):
        raise SignatureVerificationError("signature", "the signature does not match", to_sign)
    received_md5 = lower.get("content-md5")
    if received_md5 is not None and received_md5 != content_md5(body):
        raise SignatureVerificationError("content_md5", "content-md5 does not match the body", to_sign)
