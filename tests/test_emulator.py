"""The SpeedPix emulator over real HTTP on loopback: gateway checks, lifecycle, storage, faults, admin."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import tracemalloc
import zlib

import httpx
import pytest
import requests

from airflow_provider_speedpix._signing import compute_signature, sign_request, string_to_sign
from airflow_provider_speedpix.emulator import GATEWAY_ERRORS, parse_png
from airflow_provider_speedpix.emulator.faults import Fault
from airflow_provider_speedpix.emulator.png import PNG_SIGNATURE, make_png
from airflow_provider_speedpix.emulator.server import RedactUploadTokens
from tests.emulator_fixture import EMULATOR_APP_SECRET, signed_post

PROMPT = "/scc/comfy_prompt"
PROGRESS = "/scc/comfy_get_progress"
RESULT = "/scc/comfy_get_result"
SIGN = "/scc/sp_create_temp_file_upload_sign"


def create(emu, workflow_id="wf-123", **extra):
    body = {
        "workflow_id": workflow_id,
        "version_id": None,
        "inputs": {"text": "a landscape"},
        "alias_id": "main",
        "randomise_seeds": None,
        "return_temp_files": None,
        **extra,
    }
    r = signed_post(emu, PROMPT, body, extra_headers={"X-SP-RESOURCE-CONFIG-ID": "default"})
    assert r.status_code == 200, r.headers
    return r.json()


def wait_terminal(emu, task_id, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        data = signed_post(emu, PROGRESS, {"taskId": task_id}).json()["data"]
        if data["status"] in ("succeeded", "failed"):
            return data
        time.sleep(0.05)
    raise AssertionError("task did not finish in time")


def assert_no_secret(response, server):
    blob = json.dumps(dict(response.headers)) + response.text
    assert EMULATOR_APP_SECRET not in blob
    assert server.app_secret not in blob


# -- gateway ------------------------------------------------------------------------------------------


def test_signed_call_accepted_with_envelope_and_request_id(emulator):
    r = signed_post(emulator, PROMPT, {"workflow_id": "wf-1", "inputs": {}})
    assert r.status_code == 200
    assert r.headers["X-Ca-Request-Id"]
    assert r.headers["Content-Type"].startswith("application/json")
    env = r.json()
    assert env["status"] == 10
    assert env["errCode"] == env["subErrCode"] == ""
    assert env["apiInvokeId"]
    assert env["data"]["status"] == "waiting"
    assert env["data"]["estimatedDurationInSeconds"] == pytest.approx(1.0)
    assert emulator.stats()["predictions"] == 1


def test_wrong_secret_is_invalid_signature_with_string_to_sign(emulator):
    raw = b'{"taskId":"x"}'
    r = signed_post(emulator, PROGRESS, raw, app_secret="not-the-secret")
    assert r.status_code == 400
    assert r.headers["X-Ca-Error-Code"] == "I400SG"
    message = r.headers["X-Ca-Error-Message"]
    assert message.startswith("Invalid Signature, Server StringToSign:`POST#application/json; charset=utf-8#")
    assert message.endswith("#/scc/comfy_get_progress`")
    assert "x-ca-key:test-key#" in message
    assert r.headers["X-Ca-Request-Id"]
    # the server's own signature and the secret never come back
    sent = r.request.headers
    to_sign = string_to_sign(method="POST", path=PROGRESS, headers=dict(sent))
    assert compute_signature(EMULATOR_APP_SECRET, to_sign) not in json.dumps(dict(r.headers))
    assert_no_secret(r, emulator)
    stats = emulator.stats()
    assert stats["rejected"] == {"I400SG": 1}
    assert stats["calls"]["comfy_get_progress"] == 0


def test_body_tampered_after_signing_is_content_md5_error(emulator):
    raw = json.dumps({"workflow_id": "wf-1", "inputs": {}}).encode()
    headers = sign_request(
        method="POST", path=PROMPT, body=raw, app_key=emulator.app_key, app_secret=emulator.app_secret
    )
    tampered = raw.replace(b"wf-1", b"wf-2")
    r = requests.post(emulator.url + PROMPT, data=tampered, headers=headers, timeout=5)
    assert r.status_code == 400
    assert r.headers["X-Ca-Error-Code"] == "I400I5"
    assert emulator.stats()["predictions"] == 0


def test_httpx_reserialising_json_breaks_md5(emulator):
    """What the protocol page warns about: sign one serialisation, send another."""
    body = {"text": "产品 照片", "n": 1}
    raw = json.dumps(body).encode()  # ASCII-escaped, ", " separators
    headers = sign_request(
        method="POST", path=PROGRESS, body=raw, app_key=emulator.app_key, app_secret=emulator.app_secret
    )
    r = httpx.post(emulator.url + PROGRESS, json=body, headers=headers)
    assert r.status_code == 400
    assert r.headers["X-Ca-Error-Code"] == "I400I5"


def test_nonce_replay_rejected(emulator):
    raw = b'{"workflow_id":"wf-1","inputs":{}}'
    headers = sign_request(
        method="POST", path=PROMPT, body=raw, app_key=emulator.app_key, app_secret=emulator.app_secret
    )
    first = requests.post(emulator.url + PROMPT, data=raw, headers=headers, timeout=5)
    assert first.status_code == 200
    again = requests.post(emulator.url + PROMPT, data=raw, headers=headers, timeout=5)
    assert again.status_code == 400
    assert again.headers["X-Ca-Error-Code"] == "I400NC"
    stats = emulator.stats()
    assert stats["predictions"] == 1
    assert stats["rejected"] == {"I400NC": 1}


@pytest.mark.parametrize("skew", [-16 * 60, 16 * 60])
def test_stale_or_future_timestamp_rejected(emulator, skew):
    raw = b'{"taskId":"t"}'
    headers = sign_request(
        method="POST",
        path=PROGRESS,
        body=raw,
        app_key=emulator.app_key,
        app_secret=emulator.app_secret,
        clock=lambda: time.time() + skew,
    )
    r = requests.post(emulator.url + PROGRESS, data=raw, headers=headers, timeout=5)
    assert r.status_code == 400
    assert r.headers["X-Ca-Error-Code"] == "I400HD"
    assert "X-Ca-Timestamp" in r.headers["X-Ca-Error-Message"]


def test_timestamp_inside_window_accepted(emulator):
    raw = b'{"taskId":"t"}'
    headers = sign_request(
        method="POST",
        path=PROGRESS,
        body=raw,
        app_key=emulator.app_key,
        app_secret=emulator.app_secret,
        clock=lambda: time.time() - 14 * 60,
    )
    r = requests.post(emulator.url + PROGRESS, data=raw, headers=headers, timeout=5)
    assert r.status_code == 200


def test_wrong_app_key_rejected(emulator):
    r = signed_post(emulator, PROGRESS, {"taskId": "t"}, app_key="someone-else")
    assert r.status_code == 400
    assert r.headers["X-Ca-Error-Code"] == GATEWAY_ERRORS["invalid_app_key"][0] == "A400IK"


def test_missing_signature_header_rejected(emulator):
    raw = b'{"taskId":"t"}'
    headers = sign_request(
        method="POST", path=PROGRESS, body=raw, app_key=emulator.app_key, app_secret=emulator.app_secret
    )
    del headers["x-ca-signature"]
    r = requests.post(emulator.url + PROGRESS, data=raw, headers=headers, timeout=5)
    assert r.status_code == 400
    assert r.headers["X-Ca-Error-Code"] == "I400MH"


def test_unsigned_or_unknown_path(emulator):
    r = requests.post(emulator.url + "/scc/comfy_cancel", data=b"{}", timeout=5)
    assert r.status_code == 404
    assert r.headers["X-Ca-Error-Code"] == "I404NF"


# -- lifecycle ----------------------------------------------------------------------------------------


def test_lifecycle_waiting_running_succeeded(emulator):
    emulator.configure(duration=2.0)
    task_id = create(emulator)["data"]["taskId"]
    seen = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        env = signed_post(emulator, PROGRESS, {"taskId": task_id}).json()
        data = env["data"]
        assert set(data) >= {"taskId", "progress", "etaRelative", "status"}
        assert data["taskId"] == task_id
        seen.append((data["status"], data["progress"], data["etaRelative"]))
        if data["status"] == "succeeded":
            break
        time.sleep(0.05)
    statuses = [s for s, _, _ in seen]
    assert statuses[0] == "waiting"
    assert "running" in statuses
    assert statuses[-1] == "succeeded"
    order = {"waiting": 0, "running": 1, "succeeded": 2}
    assert [order[s] for s in statuses] == sorted(order[s] for s in statuses)
    running = [(p, eta) for s, p, eta in seen if s == "running"]
    progresses = [p for p, _ in running]
    assert progresses == sorted(progresses)
    assert all(0 <= p < 100 for p in progresses)
    assert all(0 <= eta <= 2 for _, eta in running)
    assert isinstance(running[0][1], int)
    assert seen[-1][1:] == (100.0, 0)


def test_result_of_succeeded_task(emulator):
    task_id = create(emulator, return_temp_files=True)["data"]["taskId"]
    wait_terminal(emulator, task_id)
    env = signed_post(emulator, RESULT, {"taskId": task_id}).json()
    assert env["status"] == 10
    data = env["data"]
    url = f"{emulator.url}/_emulator/files/outputs/{task_id}/output.png"
    assert data["taskId"] == task_id
    assert data["status"] == "succeeded"
    assert data["result"]["images"] == {"url": url}
    assert data["images"] == [url]
    assert isinstance(data["info"], dict)
    for extra in ("subject_image", "mask_image"):
        r = requests.get(data["result"][extra]["url"], timeout=5)
        assert r.status_code == 200
        parse_png(r.content)


def test_result_without_temp_files_has_only_images(emulator):
    task_id = create(emulator)["data"]["taskId"]
    wait_terminal(emulator, task_id)
    result = signed_post(emulator, RESULT, {"taskId": task_id}).json()["data"]["result"]
    assert set(result) == {"images"}


def test_output_png_is_valid(emulator):
    task_id = create(emulator)["data"]["taskId"]
    wait_terminal(emulator, task_id)
    url = signed_post(emulator, RESULT, {"taskId": task_id}).json()["data"]["result"]["images"]["url"]
    r = requests.get(url, timeout=5)
    assert r.status_code == 200
    assert r.headers["content-type"] == "image/png"
    png = r.content
    assert png[:8] == PNG_SIGNATURE
    info = parse_png(png)
    assert info["chunks"][0] == "IHDR" and info["chunks"][-1] == "IEND" and "IDAT" in info["chunks"]
    assert (info["width"], info["height"], info["bit_depth"], info["colour_type"]) == (64, 64, 8, 2)
    # independent decode: IDAT payload inflates to height * (1 + 3 * width) bytes, white first row
    idat_start = png.index(b"IDAT") + 4
    idat_len = int.from_bytes(png[idat_start - 8 : idat_start - 4], "big")
    raw = zlib.decompress(png[idat_start : idat_start + idat_len])
    assert len(raw) == 64 * (1 + 3 * 64)
    assert raw[:4] == b"\x00\xff\xff\xff"
    assert b"\x80\x80\x80" in raw  # the grey square
    assert requests.get(url, timeout=5).content == png  # deterministic


def test_make_png_sizes():
    info = parse_png(make_png(3, 2, square=None))
    assert info["raw"] == (b"\x00" + b"\xff" * 9) * 2


def test_failing_workflow(emulator):
    task_id = create(emulator, "wf-fail")["data"]["taskId"]
    final = wait_terminal(emulator, task_id)
    assert final["status"] == "failed"
    assert final["progress"] == 100 and final["etaRelative"] == 0
    env = signed_post(emulator, RESULT, {"taskId": task_id}).json()
    assert env["status"] != 10
    assert env["errCode"]
    assert env["subErrCode"] == "WORKFLOW_EXECUTION_FAILED"
    assert "failed" in env["subErrMessage"]
    assert env["data"] == {"taskId": task_id, "status": "failed"}


def test_missing_workflow(emulator):
    env = create(emulator, "wf-missing")
    assert env["errCode"] == "WorkflowNotFound"
    assert "wf-missing" in env["errMessage"]
    assert env["data"] is None
    assert emulator.stats()["predictions"] == 0


@pytest.mark.parametrize(
    "body",
    [{"workflow_id": "", "inputs": {}}, {"inputs": {}}, {"workflow_id": "wf", "inputs": ["x"]}],
)
def test_invalid_create_body(emulator, body):
    r = signed_post(emulator, PROMPT, body)
    assert r.status_code == 200
    assert r.json()["errCode"] == "InvalidParameter"
    assert emulator.stats()["predictions"] == 0


def test_unknown_task_id(emulator):
    for path in (PROGRESS, RESULT):
        r = signed_post(emulator, path, {"taskId": "nope"})
        assert r.status_code == 200
        env = r.json()
        assert env["errCode"] == "TaskNotFound"
        assert env["status"] != 10


def test_result_before_finished(emulator):
    emulator.configure(duration=30)
    task_id = create(emulator)["data"]["taskId"]
    env = signed_post(emulator, RESULT, {"taskId": task_id}).json()
    assert env["status"] != 10
    assert env["errCode"] == "TaskNotFinished"
    assert "not finished" in env["errMessage"]
    # output does not exist yet either
    assert (
        requests.get(f"{emulator.url}/_emulator/files/outputs/{task_id}/output.png", timeout=5).status_code
        == 404
    )


def test_sleep_workflow_duration(emulator):
    env = create(emulator, "sleep-12.5")
    assert env["data"]["estimatedDurationInSeconds"] == 12.5
    data = signed_post(emulator, PROGRESS, {"taskId": env["data"]["taskId"]}).json()["data"]
    assert data["status"] == "waiting"
    assert data["etaRelative"] in (12, 13)


def test_configure_duration_and_reset_restores_it(emulator):
    assert emulator.configure(duration=0)["duration"] == 0
    task_id = create(emulator)["data"]["taskId"]
    assert signed_post(emulator, PROGRESS, {"taskId": task_id}).json()["data"]["status"] == "succeeded"
    emulator.reset()
    assert create(emulator)["data"]["estimatedDurationInSeconds"] == 1.0
    with pytest.raises(ValueError):
        emulator.configure(app_secret="x")


# -- uploads ------------------------------------------------------------------------------------------


def sign_upload(emu, filename="input.png", content_type="image/png"):
    env = signed_post(emu, SIGN, {"contentType": content_type, "originalFilename": filename}).json()
    assert env["status"] == 10, env
    return env["data"]


def test_upload_round_trip_non_ascii_filename(emulator):
    data = sign_upload(emulator, "产品 照片.png")
    assert set(data) >= {"uploadUrl", "objectKey", "path", "expireTime", "accessUrl"}
    assert data["objectKey"].isascii() and " " not in data["objectKey"]
    assert data["objectKey"].endswith(".png")
    assert data["uploadUrl"].isascii() and data["accessUrl"].isascii()
    assert data["expireTime"] > time.time() + 3000
    payload = make_png(8, 8)
    r = requests.put(data["uploadUrl"], data=payload, headers={"Content-Type": "image/png"}, timeout=5)
    assert r.status_code == 200
    got = requests.get(data["accessUrl"], timeout=5)
    assert got.status_code == 200
    assert got.content == payload
    assert got.headers["content-type"] == "image/png"
    stats = emulator.stats()
    assert stats["calls"]["sp_create_temp_file_upload_sign"] == 1
    assert stats["calls"]["upload_put"] == 1
    assert stats["calls"]["file_get"] == 1


def test_expired_upload_url(emulator):
    emulator.configure(upload_url_ttl_s=0)
    data = sign_upload(emulator)
    r = requests.put(data["uploadUrl"], data=b"x", headers={"Content-Type": "image/png"}, timeout=5)
    assert r.status_code == 403
    assert "<Code>AccessDenied</Code>" in r.text
    assert "Request has expired." in r.text
    assert requests.get(data["accessUrl"], timeout=5).status_code == 404


def test_upload_bad_token(emulator):
    data = sign_upload(emulator)
    bad = data["uploadUrl"].rsplit("Signature=", 1)[0] + "Signature=forged"
    r = requests.put(bad, data=b"x", headers={"Content-Type": "image/png"}, timeout=5)
    assert r.status_code == 403
    assert "<Code>SignatureDoesNotMatch</Code>" in r.text


def test_upload_wrong_content_type(emulator):
    data = sign_upload(emulator)
    r = requests.put(data["uploadUrl"], data=b"x", headers={"Content-Type": "text/plain"}, timeout=5)
    assert r.status_code == 403
    assert "SignatureDoesNotMatch" in r.text


def test_multi_mb_upload_is_streamed(emulator):
    chunk = os.urandom(64 * 1024)
    n_chunks = 192  # 12 MiB
    data = sign_upload(emulator, "big.bin", "application/octet-stream")

    def body():
        for _ in range(n_chunks):
            yield chunk

    tracemalloc.start()
    try:
        r = requests.put(
            data["uploadUrl"], data=body(), headers={"Content-Type": "application/octet-stream"}, timeout=30
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert r.status_code == 200
    # the server runs in this process: its buffering shows up here too
    assert peak < 4 * 1024 * 1024, peak
    got = requests.get(data["accessUrl"], timeout=30, stream=True)
    digest = hashlib.sha256()
    size = 0
    for part in got.iter_content(256 * 1024):
        digest.update(part)
        size += len(part)
    assert size == len(chunk) * n_chunks
    assert digest.hexdigest() == hashlib.sha256(chunk * n_chunks).hexdigest()


def test_upload_url_token_redacted_in_logs():
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:1", "PUT", "/_emulator/upload/k.png?Expires=1&Signature=s3cr3t-token", "1.1", 200), None,
    )  # fmt: skip
    RedactUploadTokens().filter(record)
    assert "s3cr3t-token" not in record.getMessage()
    assert "Signature=REDACTED" in record.getMessage()


# -- faults -------------------------------------------------------------------------------------------


def progress_call(emu, **kwargs):
    return signed_post(emu, PROGRESS, {"taskId": "nope"}, **kwargs)


@pytest.mark.parametrize(
    ("kind", "status", "content_type"),
    [("500", 500, "application/json"), ("502", 502, "text/plain"), ("503", 503, "text/plain"),
     ("html", 502, "text/html")],
)  # fmt: skip
def test_fault_http_errors(emulator, kind, status, content_type):
    emulator.inject("comfy_get_progress", kind)
    r = progress_call(emulator)
    assert r.status_code == status
    assert r.headers["content-type"].startswith(content_type)
    assert "X-Ca-Error-Code" not in r.headers
    assert progress_call(emulator).status_code == 200


def test_fault_429_is_gateway_throttling(emulator):
    emulator.inject("comfy_get_progress", 429)
    r = progress_call(emulator)
    assert r.status_code == 429
    assert r.headers["X-Ca-Error-Code"] == GATEWAY_ERRORS["throttled"][0]
    assert "Throttled" in r.headers["X-Ca-Error-Message"]


def test_fault_throttled403(emulator):
    emulator.inject("comfy_get_progress", "throttled403")
    r = progress_call(emulator)
    assert r.status_code == 403
    assert "Throttled" in r.headers["X-Ca-Error-Message"]


def test_fault_malformed_truncated_missing_data(emulator):
    emulator.inject("comfy_get_progress", "malformed")
    emulator.inject("comfy_get_progress", "truncated")
    emulator.inject("comfy_get_progress", "missing_data")
    r = progress_call(emulator)
    assert r.status_code == 200
    with pytest.raises(ValueError):
        r.json()
    r = progress_call(emulator)
    assert r.status_code == 200
    assert r.text.startswith('{"status":')
    with pytest.raises(ValueError):
        r.json()
    r = progress_call(emulator)
    env = r.json()
    assert env["status"] == 10 and "data" not in env


def test_fault_reset_with_requests_and_httpx(emulator):
    emulator.inject("comfy_get_progress", "reset", times=2)
    with pytest.raises(requests.exceptions.ConnectionError):
        progress_call(emulator)
    raw = b'{"taskId":"nope"}'
    headers = sign_request(
        method="POST", path=PROGRESS, body=raw, app_key=emulator.app_key, app_secret=emulator.app_secret
    )
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)), httpx.Client() as client:
        client.post(emulator.url + PROGRESS, content=raw, headers=headers)
    assert progress_call(emulator).status_code == 200
    assert emulator.stats()["faults_fired"] == {"comfy_get_progress": {"reset": 2}}


def test_fault_slow_read_timeout(emulator):
    emulator.inject("comfy_get_progress", "slow", delay=1.0)
    with pytest.raises(requests.exceptions.ReadTimeout):
        progress_call(emulator, timeout=0.3)
    emulator.inject("comfy_get_progress", "slow", delay=0.3)
    started = time.monotonic()
    r = progress_call(emulator, timeout=5)
    assert r.status_code == 200
    assert time.monotonic() - started >= 0.3


def test_fault_times_and_fifo(emulator):
    emulator.inject("comfy_get_progress", "503", times=2)
    emulator.inject("comfy_get_progress", "500")
    assert len(emulator.pending_faults()) == 2
    assert [progress_call(emulator).status_code for _ in range(4)] == [503, 503, 500, 200]
    assert emulator.pending_faults() == []
    emulator.inject("comfy_get_result", "502")
    emulator.clear_faults()
    assert emulator.pending_faults() == []
    stats = emulator.stats()
    assert stats["calls"]["comfy_get_progress"] == 4
    assert stats["faults_fired"] == {"comfy_get_progress": {"503": 2, "500": 1}}


def test_faults_only_hit_their_operation(emulator):
    emulator.inject("comfy_get_result", "503")
    assert progress_call(emulator).status_code == 200
    assert signed_post(emulator, RESULT, {"taskId": "x"}).status_code == 503


def test_gateway_rejection_does_not_consume_fault(emulator):
    emulator.inject("comfy_get_progress", "503")
    assert progress_call(emulator, app_secret="wrong").status_code == 400
    assert progress_call(emulator).status_code == 503


def test_invalid_fault_rejected(emulator):
    with pytest.raises(ValueError):
        emulator.inject("comfy_prompt", "teapot")
    with pytest.raises(ValueError):
        emulator._admin("POST", "/_emulator/faults", {"operation": "nope", "kind": "500"})
    assert Fault.parse("comfy_prompt:slow:3:2.5") == Fault("comfy_prompt", "slow", 3, 2.5)


@pytest.mark.parametrize("kind", ["429", "throttled403", "500", "502", "503", "html"])
def test_create_side_before_faults_create_nothing(emulator, kind):
    emulator.inject("comfy_prompt", kind)
    r = signed_post(emulator, PROMPT, {"workflow_id": "wf-1", "inputs": {}})
    assert r.status_code != 200
    stats = emulator.stats()
    assert stats["predictions"] == 0
    assert stats["calls"]["comfy_prompt"] == 1
    assert stats["faults_fired"] == {"comfy_prompt": {kind: 1}}


def test_create_side_slow_and_reset_create_the_task(emulator):
    emulator.inject("comfy_prompt", "slow", delay=0.8)
    with pytest.raises(requests.exceptions.ReadTimeout):
        signed_post(emulator, PROMPT, {"workflow_id": "wf-1", "inputs": {}}, timeout=0.2)
    assert emulator.stats()["predictions"] == 1
    emulator.inject("comfy_prompt", "reset")
    with pytest.raises(requests.exceptions.ConnectionError):
        signed_post(emulator, PROMPT, {"workflow_id": "wf-1", "inputs": {}})
    assert emulator.stats()["predictions"] == 2


def test_upload_and_file_faults(emulator):
    data = sign_upload(emulator)
    emulator.inject("upload_put", "503")
    r = requests.put(data["uploadUrl"], data=b"abc", headers={"Content-Type": "image/png"}, timeout=5)
    assert r.status_code == 503
    assert requests.put(data["uploadUrl"], data=b"abc", headers={"Content-Type": "image/png"}, timeout=5).ok
    emulator.inject("file_get", "reset")
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(data["accessUrl"], timeout=5)
    assert requests.get(data["accessUrl"], timeout=5).content == b"abc"


# -- stats / reset ------------------------------------------------------------------------------------


def test_stats_counters_and_reset(emulator):
    create(emulator)
    progress_call(emulator)
    progress_call(emulator)
    signed_post(emulator, RESULT, {"taskId": "x"})
    signed_post(emulator, PROGRESS, {"taskId": "x"}, app_key="bad")
    emulator.inject("comfy_get_result", "503")
    stats = emulator.stats()
    assert stats["calls"] == {
        "comfy_prompt": 1,
        "comfy_get_progress": 2,
        "comfy_get_result": 1,
        "sp_create_temp_file_upload_sign": 0,
        "upload_put": 0,
        "file_get": 0,
    }
    assert stats["rejected"] == {"A400IK": 1}
    assert stats["predictions"] == 1
    assert emulator.calls("comfy_get_progress") == 2
    emulator.reset()
    stats = emulator.stats()
    assert set(stats["calls"].values()) == {0}
    assert stats["rejected"] == {} and stats["faults_fired"] == {} and stats["predictions"] == 0
    assert emulator.pending_faults() == []


def test_every_response_has_request_id(emulator):
    assert requests.get(emulator.url + "/_emulator/stats", timeout=5).headers["X-Ca-Request-Id"]
    emulator.inject("comfy_get_progress", "502")
    assert progress_call(emulator).headers["X-Ca-Request-Id"]


# -- CLI ----------------------------------------------------------------------------------------------


def test_cli_runs_serves_faults_and_stops_on_sigterm(tmp_path):
    secret = "cli-secret-DO-NOT-LEAK"
    env = {**os.environ, "SPEEDPIX_APP_SECRET": secret, "SPEEDPIX_APP_KEY": "cli-key"}
    log = tmp_path / "emulator.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "airflow_provider_speedpix.emulator", "--port", "0", "--duration", "0",
             "--fault", "comfy_get_progress:503:1", "--access-log"],
            stdout=subprocess.PIPE, stderr=out, env=env,
        )  # fmt: skip
        try:
            line = proc.stdout.readline().decode()
            assert "http://127.0.0.1:" in line
            url = line.split()[line.split().index("on") + 1]
            raw = b'{"taskId":"t"}'

            def call(path):
                headers = sign_request(
                    method="POST", path=path, body=raw, app_key="cli-key", app_secret=secret
                )
                return requests.post(url + path, data=raw, headers=headers, timeout=5)

            assert call(PROGRESS).status_code == 503
            assert call(PROGRESS).json()["errCode"] == "TaskNotFound"
            up = call(SIGN).json()["data"]
            requests.put(
                up["uploadUrl"], data=b"x", headers={"Content-Type": "application/octet-stream"}, timeout=5
            )
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=15) == 0
    output = log.read_text() + proc.stdout.read().decode() + line
    assert secret not in output
    assert up["uploadUrl"].split("Signature=")[1] not in output
    assert "PUT /_emulator/upload/" in output  # the access log was on, token redacted
