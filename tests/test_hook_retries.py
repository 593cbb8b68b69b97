"""The retry policy on the wire: what is retried, how often, and that every attempt is freshly signed.

Sync path with requests-mock, async path against a scripted server on loopback (``tests/_scripted_http``),
then the same against the emulator's fault injection (real sockets: resets, slow answers).
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import io
import json
import time

import pytest
import requests
import urllib3

from airflow_provider_speedpix import _protocol as proto
from airflow_provider_speedpix import _retry as retry_module
from airflow_provider_speedpix import _transport as transport_module
from airflow_provider_speedpix._signing import compute_signature, string_to_sign
from airflow_provider_speedpix.exceptions import (
    SpeedPixAPIError,
    SpeedPixAuthError,
    SpeedPixDownloadError,
    SpeedPixResponseError,
    SpeedPixServerError,
    SpeedPixThrottledError,
    SpeedPixTransportError,
    SpeedPixUploadError,
)
from airflow_provider_speedpix.hooks.speedpix import SpeedPixHook, should_retry
from tests._scripted_http import (
    RESET,
    Answer,
    ScriptedServer,
    Stall,
    closed_port_url,
    full_backlog_port,
)
from tests.conftest import FakeClock, use_emulator_connection, use_speedpix_connection

BASE = "http://sp.test"
KEY, SECRET = "mock-key", "mock-secret-DO-NOT-LEAK"
CREATE_URL = f"{BASE}/scc/comfy_prompt"
PROGRESS_URL = f"{BASE}/scc/comfy_get_progress"
RESULT_URL = f"{BASE}/scc/comfy_get_result"
SIGN_URL = f"{BASE}/scc/sp_create_temp_file_upload_sign"
RETRY_LIMIT = 4


def use_connection(monkeypatch, host=BASE, **extra):
    base = {"retry_delay": 0.001, "retry_max_delay": 0.005, "timeout": 5, "retry_limit": RETRY_LIMIT}
    use_speedpix_connection(monkeypatch, host=host, login=KEY, password=SECRET, extra={**base, **extra})


@pytest.fixture
def hook(monkeypatch):
    use_connection(monkeypatch)
    return SpeedPixHook()


def envelope(data, **fields):
    return {"status": 10, "errCode": "", "errMessage": "", "apiInvokeId": "inv", "data": data, **fields}


CREATED = {"json": envelope({"taskId": "task-1", "status": "waiting", "estimatedDurationInSeconds": 3})}
RUNNING = {"json": envelope({"taskId": "task-1", "status": "running", "progress": 0.5, "etaRelative": 2})}
THROTTLED_429 = {
    "status_code": 429,
    "headers": {
        "X-Ca-Error-Code": "T429ID",
        "X-Ca-Error-Message": "Throttled by APP Flow Control",
        "X-Ca-Request-Id": "rq-429",
    },
}
THROTTLED_403 = {"status_code": 403, "headers": {"X-Ca-Error-Message": "Throttled by APP Flow Control"}}
SERVER_500 = {"status_code": 500, "json": {"status": 500, "errCode": "InternalError", "errMessage": "boom"}}
BAD_GATEWAY_HTML = {"status_code": 502, "text": "<html><body>502 Bad Gateway</body></html>"}
UNAVAILABLE_503 = {"status_code": 503, "text": "Service Unavailable"}
BAD_SIGNATURE_400 = {
    "status_code": 400,
    "headers": {
        "X-Ca-Error-Code": "I400SG",
        "X-Ca-Error-Message": "Invalid Signature, Server StringToSign:`x`",
    },
}


def connection_refused():
    reason = urllib3.exceptions.NewConnectionError(None, "Failed to establish a new connection: refused")
    return requests.exceptions.ConnectionError(urllib3.exceptions.MaxRetryError(None, BASE, reason))


def posts(requests_mock, url):
    return [r for r in requests_mock.request_history if r.method == "POST" and r.url == url]


def assert_freshly_signed(history, path):
    """Every attempt carries its own nonce, a current timestamp, a valid signature and a matching MD5."""
    nonces = [r.headers["x-ca-nonce"] for r in history]
    assert len(set(nonces)) == len(nonces)
    stamps = [int(r.headers["x-ca-timestamp"]) for r in history]
    assert stamps == sorted(stamps)
    assert len(set(stamps)) == len(stamps)
    assert all(abs(s / 1000 - time.time()) < 60 for s in stamps)
    signatures = [r.headers["x-ca-signature"] for r in history]
    assert len(set(signatures)) == len(signatures)
    for request in history:
        body = request.body if isinstance(request.body, bytes) else request.body.encode()
        assert request.headers["content-md5"] == base64.b64encode(hashlib.md5(body).digest()).decode()
        headers = dict(request.headers)
        expected = compute_signature(SECRET, string_to_sign(method="POST", path=path, headers=headers))
        assert request.headers["x-ca-signature"] == expected
    # the payload itself is identical on every attempt
    assert len({bytes(r.body) for r in history}) == 1


def slow_callback(payload, status_code=200, headers=None, delay=0.003):
    """A requests-mock callback that takes a few ms, so consecutive attempts get distinct timestamps."""

    def callback(request, context):
        time.sleep(delay)
        context.status_code = status_code
        context.headers.update(headers or {})
        return payload

    return callback


# ---------------------------------------------------------------- policy table
@pytest.mark.parametrize(
    ("operation", "error", "retried"),
    [
        ("comfy_prompt", SpeedPixThrottledError("t", operation="comfy_prompt"), True),
        ("comfy_prompt", SpeedPixTransportError("t", operation="x", reached_server=False), True),
        ("comfy_prompt", SpeedPixTransportError("t", operation="x", reached_server=True), False),
        ("comfy_prompt", SpeedPixServerError("t", operation="x"), False),
        ("comfy_prompt", SpeedPixResponseError("t", operation="x"), False),
        ("comfy_get_progress", SpeedPixTransportError("t", operation="x", reached_server=True), True),
        ("comfy_get_progress", SpeedPixServerError("t", operation="x"), True),
        ("comfy_get_result", SpeedPixResponseError("t", operation="x"), True),
        ("sp_create_temp_file_upload_sign", SpeedPixServerError("t", operation="x"), True),
        ("comfy_get_progress", SpeedPixAuthError("t", operation="x"), False),
        ("comfy_get_progress", SpeedPixAPIError("t", operation="x"), False),
        ("comfy_get_progress", ValueError("t"), False),
    ],
)
def test_should_retry(operation, error, retried):
    assert should_retry(operation, error) is retried


# ---------------------------------------------------------------- sync: create
@pytest.mark.parametrize("throttled", [THROTTLED_429, THROTTLED_403], ids=["429", "403-throttled"])
def test_throttled_create_is_retried_and_created_once(hook, requests_mock, throttled):
    requests_mock.post(CREATE_URL, [throttled, throttled, CREATED])
    prediction = hook.create_prediction("wf", {"text": "白色背景"})
    assert prediction.id == "task-1"
    assert len(posts(requests_mock, CREATE_URL)) == 3


def test_read_timeout_on_create_is_not_retried(hook, requests_mock):
    requests_mock.post(CREATE_URL, [{"exc": requests.exceptions.ReadTimeout}, CREATED])
    with pytest.raises(SpeedPixTransportError, match="no answer within the timeout") as info:
        hook.create_prediction("wf", {})
    assert info.value.reached_server is True
    assert info.value.operation == "comfy_prompt"
    assert len(posts(requests_mock, CREATE_URL)) == 1


def test_broken_connection_on_create_is_not_retried(hook, requests_mock):
    broken = requests.exceptions.ConnectionError(
        urllib3.exceptions.ProtocolError("Connection aborted.", ConnectionResetError(104, "reset"))
    )
    requests_mock.post(CREATE_URL, [{"exc": broken}, CREATED])
    with pytest.raises(SpeedPixTransportError, match="connection broken") as info:
        hook.create_prediction("wf", {})
    assert info.value.reached_server is True
    assert len(posts(requests_mock, CREATE_URL)) == 1


@pytest.mark.parametrize(
    "failure",
    [connection_refused(), requests.exceptions.ConnectTimeout("connect timed out")],
    ids=["refused", "connect-timeout"],
)
def test_connect_error_on_create_is_retried(hook, requests_mock, failure):
    requests_mock.post(CREATE_URL, [{"exc": failure}, {"exc": failure}, CREATED])
    assert hook.create_prediction("wf", {}).id == "task-1"
    assert len(posts(requests_mock, CREATE_URL)) == 3


@pytest.mark.parametrize(
    "failure", [SERVER_500, BAD_GATEWAY_HTML, UNAVAILABLE_503], ids=["500", "502", "503"]
)
def test_5xx_on_create_is_not_retried(hook, requests_mock, failure):
    requests_mock.post(CREATE_URL, [failure, CREATED])
    with pytest.raises(SpeedPixServerError) as info:
        hook.create_prediction("wf", {})
    assert info.value.status_code == failure["status_code"]
    assert len(posts(requests_mock, CREATE_URL)) == 1


@pytest.mark.parametrize(
    "answer",
    [{"text": "<<not json"}, {"json": {"status": 10, "errCode": ""}}, {"json": envelope({})}],
    ids=["malformed", "missing-data", "no-task-id"],
)
def test_unreadable_create_answer_is_not_retried(hook, requests_mock, answer):
    requests_mock.post(CREATE_URL, [answer, CREATED])
    with pytest.raises(SpeedPixResponseError):
        hook.create_prediction("wf", {})
    assert len(posts(requests_mock, CREATE_URL)) == 1


def test_400_on_create_is_not_retried(hook, requests_mock):
    requests_mock.post(CREATE_URL, [BAD_SIGNATURE_400, CREATED])
    with pytest.raises(SpeedPixAuthError, match="I400SG"):
        hook.create_prediction("wf", {})
    assert len(posts(requests_mock, CREATE_URL)) == 1


def test_backend_error_on_create_is_not_retried(hook, requests_mock):
    failed = {"json": envelope(None, errCode="InvalidParameter", errMessage="bad inputs", status=20)}
    requests_mock.post(CREATE_URL, [failed, CREATED])
    with pytest.raises(SpeedPixAPIError, match="bad inputs"):
        hook.create_prediction("wf", {})
    assert len(posts(requests_mock, CREATE_URL)) == 1


def test_throttling_retries_are_bounded(hook, requests_mock):
    requests_mock.post(CREATE_URL, [THROTTLED_429] * 10 + [CREATED])
    with pytest.raises(SpeedPixThrottledError) as info:
        hook.create_prediction("wf", {})
    assert info.value.request_id == "rq-429"
    assert len(posts(requests_mock, CREATE_URL)) == RETRY_LIMIT


def test_retry_limit_from_connection(monkeypatch, requests_mock):
    use_connection(monkeypatch, retry_limit=2)
    requests_mock.post(PROGRESS_URL, [UNAVAILABLE_503] * 5 + [RUNNING])
    with pytest.raises(SpeedPixServerError):
        SpeedPixHook().get_prediction("task-1")
    assert len(posts(requests_mock, PROGRESS_URL)) == 2


def test_retry_limit_one_means_no_retry(monkeypatch, requests_mock):
    use_connection(monkeypatch, retry_limit=1)
    requests_mock.post(CREATE_URL, [THROTTLED_429, CREATED])
    with pytest.raises(SpeedPixThrottledError):
        SpeedPixHook().create_prediction("wf", {})
    assert len(posts(requests_mock, CREATE_URL)) == 1


def test_create_retries_are_freshly_signed_with_exact_bytes(hook, requests_mock):
    throttled = {"text": slow_callback("", 429, THROTTLED_429["headers"])}
    created = {"text": slow_callback(json.dumps(CREATED["json"]))}
    requests_mock.post(CREATE_URL, [throttled, throttled, created])
    hook.create_prediction("wf", {"text": "白色背景的产品照片 ✨", "n": 1}, resource_config_id="dedicated")
    history = posts(requests_mock, CREATE_URL)
    assert len(history) == 3
    assert_freshly_signed(history, "/scc/comfy_prompt")
    body = history[0].body
    assert body == proto.encode_body(
        proto.create_prediction_body("wf", {"text": "白色背景的产品照片 ✨", "n": 1})
    )
    assert "白色背景".encode() in body and b"\\u" not in body
    for request in history:
        assert request.headers["Content-Type"] == "application/json; charset=utf-8"
        assert request.headers["Accept"] == "application/json; charset=utf-8"
        assert request.headers["X-SP-RESOURCE-CONFIG-ID"] == "dedicated"
        assert request.headers["x-ca-key"] == KEY
        assert SECRET not in json.dumps(dict(request.headers))


# ---------------------------------------------------------------- sync: reads
def test_5xx_on_progress_is_retried_then_succeeds(hook, requests_mock):
    requests_mock.post(PROGRESS_URL, [SERVER_500, BAD_GATEWAY_HTML, UNAVAILABLE_503, RUNNING])
    prediction = hook.get_prediction("task-1")
    assert (prediction.status, prediction.progress) == ("running", 0.5)
    history = posts(requests_mock, PROGRESS_URL)
    assert len(history) == 4
    nonces = {r.headers["x-ca-nonce"] for r in history}
    assert len(nonces) == 4


def test_progress_retries_are_freshly_signed(hook, requests_mock):
    failing = {"text": slow_callback("Service Unavailable", 503)}
    ok = {"text": slow_callback(json.dumps(RUNNING["json"]))}
    requests_mock.post(PROGRESS_URL, [failing, failing, ok])
    hook.get_prediction("task-1")
    history = posts(requests_mock, PROGRESS_URL)
    assert len(history) == 3
    assert_freshly_signed(history, "/scc/comfy_get_progress")
    assert history[0].body == b'{"taskId":"task-1"}'


@pytest.mark.parametrize(
    "failure",
    [
        {"exc": requests.exceptions.ReadTimeout},
        {"exc": requests.exceptions.ChunkedEncodingError},
        {"text": '{"status": 10, "data": {"taskId"'},  # truncated
        {"json": {"status": 10, "errCode": ""}},  # missing data
        THROTTLED_403,
    ],
    ids=["read-timeout", "broken", "truncated", "missing-data", "403-throttled"],
)
def test_transient_read_failures_are_retried(hook, requests_mock, failure):
    requests_mock.post(PROGRESS_URL, [failure, RUNNING])
    assert hook.get_prediction("task-1").status == "running"
    assert len(posts(requests_mock, PROGRESS_URL)) == 2


def test_result_is_retried_too(hook, requests_mock):
    requests_mock.post(PROGRESS_URL, [{"json": envelope({"status": "succeeded", "progress": 100})}])
    result = envelope({"result": {"images": {"url": "https://x/o.png"}}})
    requests_mock.post(RESULT_URL, [UNAVAILABLE_503, {"json": result}])
    assert hook.get_prediction("task-1").output == {"images": {"url": "https://x/o.png"}}
    assert len(posts(requests_mock, RESULT_URL)) == 2


@pytest.mark.parametrize(
    "failure",
    [
        BAD_SIGNATURE_400,
        {"status_code": 400, "json": envelope(None, errCode="InvalidParameter", errMessage="bad")},
        {"json": envelope(None, errCode="TaskNotFound", subErrCode="TASK_NOT_FOUND", subErrMessage="gone")},
    ],
    ids=["gateway-400", "backend-400", "not-found"],
)
def test_client_errors_on_progress_are_not_retried(hook, requests_mock, failure):
    requests_mock.post(PROGRESS_URL, [failure, RUNNING])
    with pytest.raises(SpeedPixAPIError):
        hook.get_prediction("task-1")
    assert len(posts(requests_mock, PROGRESS_URL)) == 1


def test_server_error_retries_are_bounded(hook, requests_mock):
    requests_mock.post(PROGRESS_URL, [UNAVAILABLE_503] * 10 + [RUNNING])
    with pytest.raises(SpeedPixServerError) as info:
        hook.get_prediction("task-1")
    assert info.value.status_code == 503
    assert len(posts(requests_mock, PROGRESS_URL)) == RETRY_LIMIT


def test_oversized_response_is_refused(hook, requests_mock, monkeypatch):
    monkeypatch.setattr(transport_module, "MAX_RESPONSE_BYTES", 100)
    requests_mock.post(CREATE_URL, [{"json": envelope({"taskId": "t", "pad": "x" * 500})}])
    with pytest.raises(SpeedPixResponseError, match="larger than"):
        hook.create_prediction("wf", {})
    assert len(posts(requests_mock, CREATE_URL)) == 1


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_gzip_response_is_decoded(monkeypatch, requests_mock, flavour):
    use_connection(monkeypatch)
    body = gzip.compress(json.dumps(RUNNING["json"]).encode())
    gzip_headers = {"Content-Encoding": "gzip"}
    if flavour == "sync":
        requests_mock.post(PROGRESS_URL, content=body, headers=gzip_headers)
        prediction = SpeedPixHook().get_prediction("task-1")
    else:
        prediction, _ = arun(monkeypatch, [Answer(200, gzip_headers, body)])
    assert prediction.status == "running"


# ---------------------------------------------------------------- sync: uploads
SIGNED = envelope(
    {
        "uploadUrl": "https://oss.test/put/a.png?Expires=1&Signature=SECRET-TOKEN",
        "accessUrl": "https://oss.test/get/a.png",
        "objectKey": "a.png",
        "expireTime": 1,
    }
)


def reading_put(status_code, text=""):
    """A PUT callback that consumes the body stream the way a real transport does."""
    seen: list[bytes] = []

    def callback(request, context):
        body = request.body
        data = body.read() if hasattr(body, "read") else b"".join(body) if body is not None else b""
        seen.append(data if isinstance(data, bytes) else data.encode())
        context.status_code = status_code
        return text

    return callback, seen


def test_upload_put_5xx_is_retried_with_the_same_bytes(hook, requests_mock):
    requests_mock.post(SIGN_URL, json=SIGNED)
    fail, failed_bodies = reading_put(503)
    ok, ok_bodies = reading_put(200)
    requests_mock.put("https://oss.test/put/a.png", [{"text": fail}, {"text": ok}])
    uploaded = hook.upload_file(io.BytesIO(b"PNGDATA" * 10), filename="a.png")
    assert uploaded.access_url == "https://oss.test/get/a.png"
    assert failed_bodies == ok_bodies == [b"PNGDATA" * 10]
    assert len(posts(requests_mock, SIGN_URL)) == 1


def test_upload_put_4xx_is_not_retried_and_url_not_leaked(hook, requests_mock):
    requests_mock.post(SIGN_URL, json=SIGNED)
    put = requests_mock.put(
        "https://oss.test/put/a.png",
        status_code=403,
        text="<Error><Code>SignatureDoesNotMatch</Code></Error>",
    )
    with pytest.raises(SpeedPixUploadError, match="SignatureDoesNotMatch") as info:
        hook.upload_file(io.BytesIO(b"x"), filename="a.png")
    assert "SECRET-TOKEN" not in str(info.value)
    assert put.call_count == 1


def test_expired_upload_url_is_signed_again_and_resent_in_full(hook, requests_mock):
    requests_mock.post(SIGN_URL, json=SIGNED)
    expired, expired_bodies = reading_put(
        403, "<Error><Code>AccessDenied</Code><Message>Request has expired.</Message></Error>"
    )
    ok, ok_bodies = reading_put(200)
    requests_mock.put("https://oss.test/put/a.png", [{"text": expired}, {"text": ok}])
    stream = io.BytesIO(b"HEAD" + b"payload" * 20)
    stream.seek(4)  # upload from the current position
    hook.upload_file(stream, filename="a.png")
    assert expired_bodies == ok_bodies == [b"payload" * 20]
    assert len(posts(requests_mock, SIGN_URL)) == 2


def test_expired_twice_gives_up(hook, requests_mock):
    requests_mock.post(SIGN_URL, json=SIGNED)
    expired, _ = reading_put(
        403, "<Error><Code>AccessDenied</Code><Message>Request has expired.</Message></Error>"
    )
    requests_mock.put("https://oss.test/put/a.png", [{"text": expired}] * 3)
    with pytest.raises(SpeedPixUploadError, match="AccessDenied"):
        hook.upload_file(io.BytesIO(b"x"), filename="a.png")
    assert len(posts(requests_mock, SIGN_URL)) == 2


# ---------------------------------------------------------------- async (a scripted server on loopback)
def a_running():
    return Answer(200, {"Content-Type": "application/json"}, json.dumps(RUNNING["json"]).encode())


def a_status(code, headers=None, text=""):
    return Answer(code, headers or {}, text.encode())


def arun(
    monkeypatch,
    script,
    *,
    aget=lambda: SpeedPixHook().aget_prediction("task-1"),
    settle: int | None = None,
    **extra,
):
    """Point the connection at a :class:`ScriptedServer` playing ``script``; run ``aget()`` on a new loop.
    Returns ``(result or raised error, recorded requests)``.

    ``settle``: before the server stops, wait (up to 10 s) until it has recorded that many requests. A
    client that gave up at its timeout may return before the server thread read its last request."""
    with ScriptedServer(script) as server:
        use_connection(monkeypatch, host=server.url, **extra)
        try:
            result = asyncio.run(aget())
        except Exception as err:
            result = err
        deadline = time.monotonic() + 10
        while settle is not None and len(server.requests) < settle and time.monotonic() < deadline:
            time.sleep(0.01)
        return result, server.requests


def test_async_5xx_and_throttling_retried(monkeypatch):
    script = [
        a_status(503, text="Service Unavailable"),
        a_status(429, headers=THROTTLED_429["headers"]),
        a_status(403, headers=THROTTLED_403["headers"]),
        a_status(502, text="<html>bad gateway</html>"),
        a_running(),
    ]
    prediction, requests_seen = arun(monkeypatch, script, retry_limit=5)
    assert prediction.status == "running"
    assert len(requests_seen) == 5
    nonces = {r.headers["x-ca-nonce"] for r in requests_seen}
    stamps = [int(r.headers["x-ca-timestamp"]) for r in requests_seen]
    assert len(nonces) == 5
    assert stamps == sorted(stamps) and len(set(stamps)) == 5
    for request in requests_seen:
        assert request.path == "/scc/comfy_get_progress"
        assert request.body == b'{"taskId":"task-1"}'
        assert request.headers["content-md5"] == base64.b64encode(hashlib.md5(request.body).digest()).decode()
        expected = compute_signature(
            SECRET, string_to_sign(method="POST", path="/scc/comfy_get_progress", headers=request.headers)
        )
        assert request.headers["x-ca-signature"] == expected


@pytest.mark.parametrize(
    ("failure", "timeout"),
    # read-timeout: the retry's answer must come within the timeout (else a third attempt), and the stall
    # must outlast it by far (else the client sees the dropped connection instead)
    [(Stall(3.0), 1.0), (RESET, 5)],
    ids=["read-timeout", "reset"],
)
def test_async_transport_errors_on_progress_retried(monkeypatch, failure, timeout):
    prediction, requests_seen = arun(monkeypatch, [failure, a_running()], timeout=timeout)
    assert prediction.status == "running"
    assert len(requests_seen) == 2


@pytest.mark.parametrize("where", ["refused", "connect-timeout"])
def test_async_never_sent_is_retried_even_for_a_create(monkeypatch, where):
    """Refused, or no connection within the timeout: the request never left, so even a create is retried
    (each attempt signed anew) and the error says reached_server False."""
    signed = []
    real = transport_module.signed_headers
    monkeypatch.setattr(transport_module, "signed_headers", lambda *a, **k: signed.append(1) or real(*a, **k))

    def create(url: str) -> SpeedPixTransportError:
        use_connection(monkeypatch, host=url, timeout=0.2)
        settings = SpeedPixHook().settings
        with pytest.raises(SpeedPixTransportError) as info:
            asyncio.run(transport_module.acall(settings, proto.CREATE, {"x": 1}, log=retry_module._LOG))
        return info.value

    if where == "refused":
        error = create(closed_port_url())
        assert "connection refused" in str(error)
    else:
        with full_backlog_port() as port:
            error = create(f"http://127.0.0.1:{port}")
        assert "connecting timed out" in str(error)
    assert error.reached_server is False
    assert len(signed) == RETRY_LIMIT


def test_async_tls_failure_is_named_and_never_left(monkeypatch):
    """An https endpoint that does not speak TLS (here: plain HTTP): the handshake fails before anything
    is sent, so it is retried even for a create, and the message points at the CA bundle."""
    with ScriptedServer([a_running()]) as server:
        use_connection(monkeypatch, host=server.url.replace("http://", "https://"), retry_limit=2)
        settings = SpeedPixHook().settings
        with pytest.raises(SpeedPixTransportError, match="TLS handshake failed") as info:
            asyncio.run(transport_module.acall(settings, proto.CREATE, {"x": 1}, log=retry_module._LOG))
        assert server.requests == []  # nothing reached the HTTP layer
    assert info.value.reached_server is False


def test_async_400_not_retried(monkeypatch):
    error, requests_seen = arun(
        monkeypatch, [a_status(400, headers=BAD_SIGNATURE_400["headers"]), a_running()]
    )
    assert isinstance(error, SpeedPixAuthError) and "I400SG" in str(error)
    assert len(requests_seen) == 1


def test_async_retries_bounded(monkeypatch):
    error, requests_seen = arun(monkeypatch, [Stall(3.0)], timeout=0.2, settle=RETRY_LIMIT)
    assert isinstance(error, SpeedPixTransportError), error
    assert "no answer within the timeout" in str(error) and error.reached_server is True
    assert len(requests_seen) == RETRY_LIMIT


def test_async_api_error_keeps_the_code_and_request_id(monkeypatch):
    error, _ = arun(monkeypatch, [a_status(429, headers=THROTTLED_429["headers"])], retry_limit=1)
    assert isinstance(error, SpeedPixThrottledError)
    assert (error.status_code, error.error_code, error.request_id) == (429, "T429ID", "rq-429")


def test_async_oversized_response_is_refused(monkeypatch):
    monkeypatch.setattr(transport_module, "MAX_RESPONSE_BYTES", 100)
    big = json.dumps(envelope({"status": "running", "pad": "x" * 500})).encode()
    error, _ = arun(
        monkeypatch, [Answer(200, {}, big)], aget=lambda: SpeedPixHook().aget_prediction("t"), retry_limit=1
    )
    assert isinstance(error, SpeedPixResponseError) and "larger than" in str(error)


def test_shared_async_client_is_per_loop():
    async def grab():
        first, second = transport_module.shared_async_client(), transport_module.shared_async_client()
        assert first is second
        await first.aclose()
        third = transport_module.shared_async_client()  # a closed client is replaced
        assert third is not first
        await third.aclose()
        return first

    assert asyncio.run(grab()) is not asyncio.run(grab())


# ---------------------------------------------------------------- emulator fault injection
@pytest.fixture
def emu_hook(emulator, monkeypatch):
    use_emulator_connection(monkeypatch, emulator, retry_delay=0.01, retry_max_delay=0.05, timeout=5)
    return SpeedPixHook()


def faults_fired(emulator, operation):
    return emulator.stats()["faults_fired"].get(operation, {})


def poll(flavour: str, hook: SpeedPixHook, prediction_id: str):
    """One status call through the sync (worker) or the async (trigger) transport."""
    if flavour == "sync":
        return hook.get_prediction(prediction_id)
    return asyncio.run(SpeedPixHook().aget_prediction(prediction_id))


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_emulator_reset_on_progress_is_retried(emulator, emu_hook, flavour):
    prediction = emu_hook.create_prediction("sleep-100", {})
    emulator.inject("comfy_get_progress", "reset", times=2)
    assert poll(flavour, emu_hook, prediction.id).status == "waiting"
    assert emulator.calls("comfy_get_progress") == 3
    assert faults_fired(emulator, "comfy_get_progress") == {"reset": 2}


@pytest.mark.parametrize("flavour", ["sync", "async"])
@pytest.mark.parametrize(
    "kind", ["500", "502", "503", "html", "malformed", "truncated", "missing_data", "429", "reset"]
)
def test_emulator_faults_on_progress_are_retried(emulator, emu_hook, kind, flavour):
    prediction = emu_hook.create_prediction("sleep-100", {})
    emulator.inject("comfy_get_progress", kind)
    assert poll(flavour, emu_hook, prediction.id).status == "waiting"
    assert emulator.calls("comfy_get_progress") == 2
    assert faults_fired(emulator, "comfy_get_progress") == {kind: 1}


def test_emulator_slow_create_times_out_once(emulator, monkeypatch):
    # 1 s: ample for the server to start the create before the client hangs up (a request dropped before
    # its handler runs creates nothing); the answer is held back 3 s, well past it even on a busy machine
    use_emulator_connection(monkeypatch, emulator, retry_delay=0.01, retry_max_delay=0.05, timeout=1.0)
    emulator.inject("comfy_prompt", "slow", delay=3.0)
    started = time.monotonic()
    with pytest.raises(SpeedPixTransportError, match="no answer within the timeout") as info:
        SpeedPixHook().create_prediction("wf-1", {"text": "白"})
    assert time.monotonic() - started < 3.0
    assert info.value.reached_server is True
    stats = emulator.stats()
    assert stats["calls"]["comfy_prompt"] == 1
    assert stats["predictions"] == 1  # the task exists: retrying would have billed a second one


@pytest.mark.parametrize("kind", ["429", "throttled403"])
def test_emulator_throttled_create_creates_exactly_one(emulator, emu_hook, kind):
    emulator.inject("comfy_prompt", kind, times=2)
    prediction = emu_hook.create_prediction("wf-1", {})
    stats = emulator.stats()
    assert stats["calls"]["comfy_prompt"] == 3
    assert stats["predictions"] == 1
    assert prediction.id in emulator.app.state.emulator.tasks


@pytest.mark.parametrize(
    ("kind", "error", "created"),
    [
        ("500", SpeedPixServerError, 0),
        ("502", SpeedPixServerError, 0),
        ("html", SpeedPixServerError, 0),
        ("malformed", SpeedPixResponseError, 1),
        ("truncated", SpeedPixResponseError, 1),
        ("missing_data", SpeedPixResponseError, 1),
        ("reset", SpeedPixTransportError, 1),
    ],
)
def test_emulator_create_failures_are_not_retried(emulator, emu_hook, kind, error, created):
    emulator.inject("comfy_prompt", kind)
    with pytest.raises(error):
        emu_hook.create_prediction("wf-1", {})
    stats = emulator.stats()
    assert stats["calls"]["comfy_prompt"] == 1
    assert stats["predictions"] == created


def test_emulator_upload_faults_are_retried(emulator, emu_hook, tmp_path):
    source = tmp_path / "a.png"
    source.write_bytes(b"\x89PNG" + b"data" * 100)
    emulator.inject("sp_create_temp_file_upload_sign", "503")
    emulator.inject("upload_put", "500")
    uploaded = emu_hook.upload_file(source)
    calls = emulator.stats()["calls"]
    assert calls["sp_create_temp_file_upload_sign"] == 2
    assert calls["upload_put"] == 2
    assert emu_hook.get_conn().get(uploaded.access_url, timeout=5).content == source.read_bytes()


def test_emulator_accepts_every_retry_nonce(emulator, emu_hook):
    """The emulator refuses replayed nonces: a retry that reused headers would be rejected (I400NC)."""
    prediction = emu_hook.create_prediction("sleep-100", {})
    emulator.inject("comfy_get_progress", "503", times=3)
    emu_hook.get_prediction(prediction.id)
    assert emulator.stats()["rejected"] == {}
    assert emulator.calls("comfy_get_progress") == 4


# ---------------------------------------------------------------- downloads
@pytest.fixture
def fake_time(monkeypatch):
    """The retry policy's clock: records backoff sleeps instead of sleeping."""
    return FakeClock().install(monkeypatch, retry_module)


OUT_URL = "https://cdn.test/out/output.png?Expires=1&Signature=SECRET-TOKEN"


def test_download_5xx_retried_with_backoff(hook, requests_mock, fake_time, tmp_path):
    get = requests_mock.get(OUT_URL, [{"status_code": 503}, {"status_code": 500}, {"content": b"PNG"}])
    written = hook.download(OUT_URL, tmp_path)
    assert written.read_bytes() == b"PNG"
    assert get.call_count == 3
    assert len(fake_time.sleeps) == 2  # one backoff between each attempt
    assert all(0 < s <= 0.005 for s in fake_time.sleeps)


def test_download_5xx_bounded_and_url_query_not_leaked(hook, requests_mock, fake_time, tmp_path):
    get = requests_mock.get(OUT_URL, status_code=503)
    with pytest.raises(SpeedPixDownloadError, match="HTTP 503") as info:
        hook.download(OUT_URL, tmp_path / "x.png")
    assert get.call_count == RETRY_LIMIT
    assert "SECRET-TOKEN" not in str(info.value)
    assert not list(tmp_path.iterdir())


def test_download_connection_errors_retried_then_bounded(hook, requests_mock, fake_time, tmp_path):
    get = requests_mock.get(OUT_URL, [{"exc": connection_refused()}, {"content": b"PNG"}])
    assert hook.download(OUT_URL, tmp_path).read_bytes() == b"PNG"
    assert get.call_count == 2
    requests_mock.get(OUT_URL, exc=requests.exceptions.ReadTimeout)
    with pytest.raises(SpeedPixDownloadError, match="no answer") as info:
        hook.download(OUT_URL, tmp_path / "y.png")
    assert "SECRET-TOKEN" not in str(info.value)


def test_download_4xx_not_retried(hook, requests_mock, fake_time, tmp_path):
    get = requests_mock.get(OUT_URL, status_code=403)
    with pytest.raises(SpeedPixDownloadError, match="HTTP 403"):
        hook.download(OUT_URL, tmp_path)
    assert get.call_count == 1
    assert fake_time.sleeps == []
