"""Alibaba Cloud API Gateway digest signing (HmacSHA256), as SpeedPix expects it.

Pure functions, no I/O and no Airflow imports: the hook (sync and async), the emulator's verifier and
the tests all use this one module, so the string-to-sign is defined exactly once.
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
