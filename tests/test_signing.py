"""Alibaba Cloud API Gateway digest signing: a fixed test vector computed independently of the module."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time

import pytest

from airflow_provider_speedpix._signing import (
    SignatureVerificationError,
    content_md5,
    gateway_date,
    sign_request,
    signatures_match,
    string_to_sign,
    verify_request,
)

CLOCK = 1764000000.123
NONCE = "6f1c2a3b-0d4e-4f5a-8b6c-7d8e9f0a1b2c"
APP_KEY = "key-123"
APP_SECRET = "secret-XYZ"
PATH = "/scc/comfy_prompt"
BODY = json.dumps(
    {"workflow_id": "wf-123", "inputs": {"text": "白色背景的产品照片 ✨"}},
    ensure_ascii=False,
    separators=(",", ":"),
).encode("utf-8")
JSON_TYPE = "application/json; charset=utf-8"

# Pinned once computed by hand below; a change here means every deployed signature changed.
PINNED_MD5 = "9CPTjktHCCgWJrksGybNig=="
PINNED_SIGNATURE = "mQjmLMP/PUdsozZ4JqjTehTUS1ieLhCs0i72D9KTkhQ="


def _vector() -> dict[str, str]:
    return sign_request(
        method="POST",
        path=PATH,
        body=BODY,
        app_key=APP_KEY,
        app_secret=APP_SECRET,
        clock=lambda: CLOCK,
        nonce=lambda: NONCE,
    )


def test_body_really_is_raw_utf8():
    assert "白".encode() in BODY
    assert b"\\u" not in BODY


def test_vector_matches_independent_computation():
    headers = _vector()
    expected_md5 = base64.b64encode(hashlib.md5(BODY).digest()).decode("ascii")
    # The string-to-sign written out literally, in the order of the protocol page
    # (signed headers sorted by name: key, nonce, signature-method, timestamp).
    expected_to_sign = (
        "POST\n"
        "application/json; charset=utf-8\n"
        f"{expected_md5}\n"
        "application/json; charset=utf-8\n"
        "Mon, 24 Nov 2025 16:00:00 GMT+00:00\n"
        "x-ca-key:key-123\n"
        "x-ca-nonce:6f1c2a3b-0d4e-4f5a-8b6c-7d8e9f0a1b2c\n"
        "x-ca-signature-method:HmacSHA256\n"
        "x-ca-timestamp:1764000000123\n"
        "/scc/comfy_prompt"
    )
    expected_signature = base64.b64encode(
        hmac.new(APP_SECRET.encode("utf-8"), expected_to_sign.encode("utf-8"), hashlib.sha256).digest()
    ).decode("ascii")

    assert headers["content-md5"] == expected_md5 == PINNED_MD5
    assert headers["x-ca-signature"] == expected_signature == PINNED_SIGNATURE
    assert headers["date"] == "Mon, 24 Nov 2025 16:00:00 GMT+00:00"
    assert headers["x-ca-timestamp"] == "1764000000123"
    assert headers["x-ca-nonce"] == NONCE
    assert headers["x-ca-key"] == APP_KEY
    assert headers["x-ca-signature-method"] == "HmacSHA256"
    assert headers["x-ca-signature-headers"] == "x-ca-timestamp,x-ca-key,x-ca-nonce,x-ca-signature-method"
    assert headers["Content-Type"] == JSON_TYPE
    assert headers["Accept"] == JSON_TYPE
    # the module's own string_to_sign agrees with the literal one (checked, not used for the expectation)
    assert string_to_sign(method="post", path=PATH, headers=headers) == expected_to_sign


def test_secret_not_in_headers():
    headers = _vector()
    assert all(APP_SECRET not in v for v in headers.values())


def test_signature_depends_on_every_signed_part():
    base = _vector()["x-ca-signature"]

    def sig(**over):
        kw = {
            "method": "POST",
            "path": PATH,
            "body": BODY,
            "app_key": APP_KEY,
            "app_secret": APP_SECRET,
            "clock": lambda: CLOCK,
            "nonce": lambda: NONCE,
        }
        kw.update(over)
        return sign_request(**kw)["x-ca-signature"]

    variants = [
        sig(path="/scc/comfy_get_progress"),
        sig(body=BODY + b" "),
        sig(app_key="other"),
        sig(app_secret="other"),
        sig(clock=lambda: CLOCK + 1),
        sig(nonce=lambda: "another-nonce"),
    ]
    assert base not in variants
    assert len(set(variants)) == len(variants)


def test_content_md5_of_exact_bytes():
    assert content_md5(BODY) == base64.b64encode(hashlib.md5(BODY).digest()).decode()
    # escaped ASCII form of the same JSON has a different MD5: the bytes matter, not the document
    escaped = json.dumps(json.loads(BODY), separators=(",", ":")).encode()
    assert escaped != BODY
    assert content_md5(escaped) != content_md5(BODY)


def test_empty_body_has_no_content_md5_and_empty_line():
    headers = sign_request(
        method="POST",
        path=PATH,
        body=b"",
        app_key=APP_KEY,
        app_secret=APP_SECRET,
        clock=lambda: CLOCK,
        nonce=lambda: NONCE,
    )
    assert "content-md5" not in {k.lower() for k in headers}
    to_sign = (
        "POST\n"
        "application/json; charset=utf-8\n"
        "\n"
        "application/json; charset=utf-8\n"
        "Mon, 24 Nov 2025 16:00:00 GMT+00:00\n"
        "x-ca-key:key-123\n"
        f"x-ca-nonce:{NONCE}\n"
        "x-ca-signature-method:HmacSHA256\n"
        "x-ca-timestamp:1764000000123\n"
        "/scc/comfy_prompt"
    )
    expected = base64.b64encode(
        hmac.new(APP_SECRET.encode(), to_sign.encode(), hashlib.sha256).digest()
    ).decode()
    assert headers["x-ca-signature"] == expected


def test_two_calls_get_fresh_nonce_and_timestamp():
    kw = {"method": "POST", "path": PATH, "body": BODY, "app_key": APP_KEY, "app_secret": APP_SECRET}
    first = sign_request(**kw)
    time.sleep(0.002)
    second = sign_request(**kw)
    assert first["x-ca-nonce"] != second["x-ca-nonce"]
    assert int(second["x-ca-timestamp"]) > int(first["x-ca-timestamp"])
    assert first["x-ca-signature"] != second["x-ca-signature"]
    # the nonce is a UUID4 and the timestamp is epoch milliseconds close to now
    assert re.fullmatch(
        r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", first["x-ca-nonce"]
    )
    assert abs(int(first["x-ca-timestamp"]) / 1000 - time.time()) < 60


def test_date_format():
    assert gateway_date(0) == "Thu, 01 Jan 1970 00:00:00 GMT+00:00"
    assert gateway_date(CLOCK) == "Mon, 24 Nov 2025 16:00:00 GMT+00:00"
    assert re.fullmatch(
        r"(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d\d (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) \d{4} "
        r"\d\d:\d\d:\d\d GMT\+00:00",
        sign_request(method="POST", path=PATH, body=b"", app_key="k", app_secret="s")["date"],
    )


def test_signatures_match():
    sig = _vector()["x-ca-signature"]
    assert signatures_match(sig, sig)
    assert not signatures_match(sig, sig[:-2] + "A=")
    assert not signatures_match(sig, "")
    assert not signatures_match(sig, "ü" * len(sig))


# -- the verify half (what the emulator's gateway runs), against the same pinned vector ---------------


def _verify(headers, body=BODY, secret=APP_SECRET, clock=lambda: CLOCK, path=PATH, method="POST"):
    verify_request(method=method, path=path, headers=headers, body=body, app_secret=secret, clock=clock)


def test_verify_accepts_the_pinned_vector():
    headers = _vector()
    assert headers["x-ca-signature"] == PINNED_SIGNATURE
    _verify(headers)
    # header names are matched case-insensitively, as a server receives them
    _verify({k.upper(): v for k, v in headers.items()})
    # at the edge of the 15-minute window, either side
    _verify(headers, clock=lambda: CLOCK + 900)
    _verify(headers, clock=lambda: CLOCK - 900)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"body": BODY + b" "}, "content_md5"),
        ({"secret": APP_SECRET + "x"}, "signature"),
        ({"path": "/scc/comfy_get_progress"}, "signature"),
        ({"method": "PUT"}, "signature"),
        ({"clock": lambda: CLOCK + 900.2}, "timestamp_expired"),
        ({"clock": lambda: CLOCK - 900.2}, "timestamp_expired"),
    ],
)
def test_verify_refuses_each_changed_part(change, reason):
    with pytest.raises(SignatureVerificationError) as info:
        _verify(_vector(), **change)
    assert info.value.reason == reason
    assert APP_SECRET not in str(info.value) + info.value.string_to_sign


@pytest.mark.parametrize(
    ("header", "value", "reason"),
    [
        ("x-ca-signature", PINNED_SIGNATURE[:-2] + "A=", "signature"),
        ("x-ca-signature", "", "signature"),
        ("x-ca-nonce", "another-nonce", "signature"),
        ("x-ca-key", "other", "signature"),
        ("x-ca-timestamp", "soon", "timestamp_format"),
        ("content-md5", PINNED_MD5.replace("9", "8"), "signature"),
    ],
)
def test_verify_refuses_tampered_headers(header, value, reason):
    headers = {**_vector(), header: value}
    with pytest.raises(SignatureVerificationError) as info:
        _verify(headers)
    assert info.value.reason == reason


def test_verify_reports_its_string_to_sign_on_signature_errors():
    with pytest.raises(SignatureVerificationError) as info:
        _verify(_vector(), secret="wrong")
    assert info.value.string_to_sign == string_to_sign(method="POST", path=PATH, headers=_vector())
    assert info.value.string_to_sign.endswith("\n/scc/comfy_prompt")
