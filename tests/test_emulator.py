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
import urllib.parse
import zlib

import httpx
import pytest
import requests

from airflow_provider_speedpix._signing import compute_signature, sign_request, string_to_sign
from airflow_provider_speedpix.emulator import (
    GATEWAY_ERRORS,
    EmulatorConfig,
    ManualClock,
    create_app,
    parse_png,
)
from airflow_provider_speedpix.emulator.backend import NODES
from airflow_provider_speedpix.emulator.faults import Fault
from airflow_provider_speedpix.emulator.png import PNG_SIGNATURE, make_png
from airflow_provider_speedpix.emulator.server import EmulatorServer, RedactUploadTokens
from airflow_provider_speedpix.emulator.storage import sign_output
from tests._helpers import gateway_headers
from tests.emulator_fixture import EMULATOR_APP_KEY, EMULATOR_APP_SECRET, EMULATOR_DURATION, signed_post

PROMPT = "/scc/comfy_prompt"
PROGRESS = "/scc/comfy_get_progress"
RESULT = "/scc/comfy_get_result"
SIGN = "/scc/sp_create_temp_file_upload_sign"


@pytest.fixture(scope="module")
def clocked_server():
    """A private emulator on a :class:`ManualClock`: tests move time instead of sleeping."""
    config = EmulatorConfig(
        app_key=EMULATOR_APP_KEY,
        app_secret=EMULATOR_APP_SECRET,
        duration=EMULATOR_DURATION,
        clock=ManualClock(),
    )
    with EmulatorServer(config) as server:
        yield server


@pytest.fixture
def clocked(clocked_server):
    clocked_server.reset()
    return clocked_server


def create(emu, workflow_id="wf-123", pools="default", **extra):
    body = {
        "workflow_id": workflow_id,
        "version_id": None,
        "inputs": {"text": "a landscape"},
        "alias_id": "main",
        "randomise_seeds": None,
        "return_temp_files": None,
        **extra,
    }
    headers = {} if pools is None else {"X-SP-RESOURCE-CONFIG-ID": pools}
    r = signed_post(emu, PROMPT, body, extra_headers=headers)
    assert r.status_code == 200, r.headers
    return r.json()


def progress(emu, task_id):
    env = signed_post(emu, PROGRESS, {"taskId": task_id}).json()
    assert env["status"] == 10, env
    return env["data"]


def finish(emu, task_id):
    """Move the emulator's clock past the task's end (no sleeping) and return its terminal progress."""
    emu.clock.advance(emu.app.state.emulator.tasks[task_id].duration)
    data = progress(emu, task_id)
    assert data["status"] in ("succeeded", "failed")
    return data


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
    headers = gateway_headers(emulator, PROMPT, raw)
    tampered = raw.replace(b"wf-1", b"wf-2")
    r = requests.post(emulator.url + PROMPT, data=tampered, headers=headers, timeout=5)
    assert r.status_code == 400
    assert r.headers["X-Ca-Error-Code"] == "I400I5"
    assert emulator.stats()["predictions"] == 0


def test_httpx_reserialising_json_breaks_md5(emulator):
    """What the protocol page warns about: sign one serialisation, send another."""
    body = {"text": "产品 照片", "n": 1}
    raw = json.dumps(body).encode()  # ASCII-escaped, ", " separators
    headers = gateway_headers(emulator, PROGRESS, raw)
    r = httpx.post(emulator.url + PROGRESS, json=body, headers=headers)
    assert r.status_code == 400
    assert r.headers["X-Ca-Error-Code"] == "I400I5"


def test_nonce_replay_rejected(emulator):
    raw = b'{"workflow_id":"wf-1","inputs":{}}'
    headers = gateway_headers(emulator, PROMPT, raw)
    first = requests.post(emulator.url + PROMPT, data=raw, headers=headers, timeout=5)
    assert first.status_code == 200
    again = requests.post(emulator.url + PROMPT, data=raw, headers=headers, timeout=5)
    assert again.status_code == 400
    assert again.headers["X-Ca-Error-Code"] == "I400NC"
    stats = emulator.stats()
    assert stats["predictions"] == 1
    assert stats["rejected"] == {"I400NC": 1}


def progress_signed_at(emulator, skew: float) -> requests.Response:
    """A progress call whose signature says it was made ``skew`` seconds from now."""
    raw = b'{"taskId":"t"}'
    headers = gateway_headers(emulator, PROGRESS, raw, clock=lambda: time.time() + skew)
    return requests.post(emulator.url + PROGRESS, data=raw, headers=headers, timeout=5)


@pytest.mark.parametrize("skew", [-16 * 60, 16 * 60])
def test_stale_or_future_timestamp_rejected(emulator, skew):
    r = progress_signed_at(emulator, skew)
    assert r.status_code == 400
    assert r.headers["X-Ca-Error-Code"] == "I400HD"
    assert "X-Ca-Timestamp" in r.headers["X-Ca-Error-Message"]


def test_timestamp_inside_window_accepted(emulator):
    assert progress_signed_at(emulator, -14 * 60).status_code == 200


def test_wrong_app_key_rejected(emulator):
    r = signed_post(emulator, PROGRESS, {"taskId": "t"}, app_key="someone-else")
    assert r.status_code == 400
    assert r.headers["X-Ca-Error-Code"] == GATEWAY_ERRORS["invalid_app_key"][0] == "A400IK"


def test_missing_signature_header_rejected(emulator):
    raw = b'{"taskId":"t"}'
    headers = gateway_headers(emulator, PROGRESS, raw)
    del headers["x-ca-signature"]
    r = requests.post(emulator.url + PROGRESS, data=raw, headers=headers, timeout=5)
    assert r.status_code == 400
    assert r.headers["X-Ca-Error-Code"] == "I400MH"


def test_unsigned_or_unknown_path(emulator):
    r = requests.post(emulator.url + "/scc/comfy_cancel", data=b"{}", timeout=5)
    assert r.status_code == 404
    assert r.headers["X-Ca-Error-Code"] == "I404NF"


# -- lifecycle ----------------------------------------------------------------------------------------


def test_lifecycle_waiting_running_succeeded(clocked):
    clocked.configure(duration=2.0)
    task_id = create(clocked)["data"]["taskId"]
    seen = []
    for _ in range(60):
        data = progress(clocked, task_id)
        assert set(data) >= {"taskId", "progress", "etaRelative", "status"}
        assert data["taskId"] == task_id
        seen.append((data["status"], data["progress"], data["etaRelative"]))
        if data["status"] == "succeeded":
            break
        clocked.clock.advance(0.0625)  # exact in binary: the clock lands on 2.0 s
    statuses = [s for s, _, _ in seen]
    assert statuses[0] == "waiting"
    assert "running" in statuses
    assert statuses[-1] == "succeeded"
    order = {"waiting": 0, "running": 1, "succeeded": 2}
    assert [order[s] for s in statuses] == sorted(order[s] for s in statuses)
    # waiting for the first 10 % of the duration (polls at 0 .. 0.1875 s), then running until 2.0 s
    assert statuses.count("waiting") == 4
    running = [(p, eta) for s, p, eta in seen if s == "running"]
    progresses = [p for p, _ in running]
    assert progresses == sorted(progresses)
    assert len(set(progresses)) == len(progresses)
    assert all(0 <= p < 1 for p in progresses)  # a fraction on the wire, not a percentage
    assert all(0 <= eta <= 2 for _, eta in running)
    assert isinstance(running[0][1], float)  # fractional ETAs, as the reference types them (double)
    assert running[0] == (pytest.approx(0.05 / 1.8, abs=1e-3), pytest.approx(1.75))
    assert seen[-1][1:] == (1.0, 0.0)
    assert len(seen) == 33


def test_result_of_succeeded_task(clocked):
    emulator = clocked
    task_id = create(emulator, return_temp_files=True)["data"]["taskId"]
    finish(emulator, task_id)
    env = signed_post(emulator, RESULT, {"taskId": task_id}).json()
    assert env["status"] == 10
    data = env["data"]
    url = f"{emulator.url}/_emulator/files/outputs/{task_id}/output.png"
    assert data["taskId"] == task_id
    assert data["status"] == "succeeded"
    signed = data["result"]["images"]["url"]
    assert unsigned(signed) == url and "Signature=" in signed
    assert data["images"] == [signed]
    assert isinstance(data["info"], dict)
    for extra in ("subject_image", "mask_image"):
        r = requests.get(data["result"][extra]["url"], timeout=5)
        assert r.status_code == 200
        parse_png(r.content)


def test_result_without_temp_files_has_only_images(clocked):
    task_id = create(clocked)["data"]["taskId"]
    finish(clocked, task_id)
    result = signed_post(clocked, RESULT, {"taskId": task_id}).json()["data"]["result"]
    assert set(result) == {"images"}


def test_output_png_is_valid(clocked):
    emulator = clocked
    task_id = create(emulator)["data"]["taskId"]
    finish(emulator, task_id)
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
    assert hashlib.sha256(task_id.encode()).digest()[2:5] in raw  # the square, its colour from the task id
    assert requests.get(url, timeout=5).content == png  # deterministic


def unsigned(url: str) -> str:
    return url.split("?", 1)[0]


def test_output_urls_are_signed_and_expire(clocked):
    """Output URLs are pre-signed like a private bucket's: valid as handed out, refused without, with a
    changed signature or expiry, and after they expire."""
    emulator = clocked
    task_id = create(emulator)["data"]["taskId"]
    finish(emulator, task_id)
    url = result_data(emulator, task_id)["images"][0]
    query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
    assert set(query) == {"Expires", "Signature"}
    assert int(query["Expires"]) - emulator.clock.time() == pytest.approx(3600, abs=2)
    assert result_data(emulator, task_id)["images"][0] == url  # stable while valid
    assert requests.get(url, timeout=5).status_code == 200
    bare = unsigned(url)
    refused = requests.get(bare, timeout=5)
    assert refused.status_code == 403 and "<Code>AccessDenied</Code>" in refused.text
    signature = query["Signature"]
    forged = url.replace(signature, ("y" if signature[0] == "x" else "x") + signature[1:])  # always a change
    assert "SignatureDoesNotMatch" in requests.get(forged, timeout=5).text
    longer = url.replace(query["Expires"], str(int(query["Expires"]) + 3600))
    assert requests.get(longer, timeout=5).status_code == 403  # the expiry is signed too
    # a correctly signed URL whose time is up (the shared clock is not moved: other tests sign with it)
    config = emulator.app.state.emulator.config
    past = int(emulator.clock.time()) - 1
    key = f"outputs/{task_id}/output.png"
    expired_url = f"{bare}?Expires={past}&Signature={sign_output(config, key, past)}"
    expired = requests.get(expired_url, timeout=5)
    assert expired.status_code == 403 and "Request has expired" in expired.text


def test_output_is_derived_from_the_input_image(clocked):
    """The sample workflow puts the uploaded product on white: its background (the border colour of
    product.png) becomes white, the product's pixels stay; the mask is the product's silhouette."""
    from airflow_provider_speedpix import _png
    from tests.conftest import ROOT

    emulator = clocked
    product = (ROOT / "dags_examples" / "data" / "product.png").read_bytes()
    sign = signed_post(
        emulator,
        "/scc/sp_create_temp_file_upload_sign",
        {"contentType": "image/png", "originalFilename": "p.png"},
    ).json()["data"]
    assert requests.put(sign["uploadUrl"], data=product, headers={"Content-Type": "image/png"}, timeout=5).ok
    task_id = create(emulator, inputs={"image": sign["accessUrl"]}, return_temp_files=True)["data"]["taskId"]
    finish(emulator, task_id)
    result = result_data(emulator, task_id)["result"]
    source = _png.decode(product)
    output = _png.decode(requests.get(result["images"]["url"], timeout=5).content)
    mask = _png.decode(requests.get(result["mask_image"]["url"], timeout=5).content)
    assert (output.width, output.height) == (source.width, source.height)
    background = source.pixel(0, 0)
    assert background[:3] != (255, 255, 255)
    centre = (source.width // 2, source.height // 2)
    assert output.pixel(0, 0) == (255, 255, 255, 255)  # background -> white
    assert output.pixel(*centre) == source.pixel(*centre)  # the product is kept
    assert mask.pixel(0, 0)[:3] == (0, 0, 0) and mask.pixel(*centre)[:3] == (255, 255, 255)
    changed = sum(
        output.pixel(x, y) != source.pixel(x, y) for x in range(0, 128, 4) for y in range(0, 128, 4)
    )
    assert 0 < changed < 32 * 32


def test_output_from_base64_input_and_fallbacks():
    """A data URI input is used too; an input that is not a decodable PNG gets the generated image."""
    import base64

    from airflow_provider_speedpix import _png
    from airflow_provider_speedpix.emulator.png import derived_png, output_png

    small = make_png(16, 16, background=(10, 200, 10), square=(200, 10, 10))
    derived = _png.decode(derived_png(small))
    assert (derived.width, derived.height) == (64, 64)  # small inputs are enlarged to 64 px
    assert derived.pixel(0, 0) == (255, 255, 255, 255) and derived.pixel(32, 32)[:3] == (200, 10, 10)
    assert output_png("t", "output", b"not a png") == output_png("t", "output")
    interlaced = bytearray(small)
    ihdr = interlaced.index(b"IHDR") + 4
    interlaced[ihdr + 12] = 1  # interlace flag (CRC now wrong too): not decodable -> fallback
    assert output_png("t2", "output", bytes(interlaced)) == output_png("t2", "output")
    assert base64.b64encode(small)  # (data URIs go through Storage.input_image, tested end to end)


def test_generated_images_differ_per_task_and_per_output():
    """Every generated image (each task's outputs, their default-output names) is distinct, so a test that
    tells outputs apart never meets two equal ones by chance (a seed used to pick one of 16 positions)."""
    from airflow_provider_speedpix.emulator.png import output_png

    variants = ("output", "ComfyUI_00001_", "ComfyUI_00002_")
    images = [output_png(f"task-{i}", variant) for i in range(300) for variant in variants]
    assert len(set(images)) == len(images)


def test_make_png_sizes():
    info = parse_png(make_png(3, 2, square=None))
    assert info["raw"] == (b"\x00" + b"\xff" * 9) * 2


def test_failing_workflow(clocked):
    emulator = clocked
    task_id = create(emulator, "wf-fail")["data"]["taskId"]
    final = finish(emulator, task_id)
    assert final["status"] == "failed"
    assert final["progress"] == 1 and final["etaRelative"] == 0
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


def test_sleep_workflow_duration(clocked):
    env = create(clocked, "sleep-12.5")
    assert env["data"]["estimatedDurationInSeconds"] == 12.5
    data = progress(clocked, env["data"]["taskId"])
    assert data["status"] == "waiting"
    assert data["etaRelative"] == 12.5  # the clock stands still: the exact remaining time, a double
    clocked.clock.advance(5.25)
    assert progress(clocked, env["data"]["taskId"])["etaRelative"] == pytest.approx(7.25)


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
    headers = gateway_headers(emulator, PROGRESS, raw)
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)), httpx.Client() as client:
        client.post(emulator.url + PROGRESS, content=raw, headers=headers)
    assert progress_call(emulator).status_code == 200
    assert emulator.stats()["faults_fired"] == {"comfy_get_progress": {"reset": 2}}


def test_fault_slow_read_timeout(emulator):
    emulator.inject("comfy_get_progress", "slow", delay=3.0)  # far past the timeout, even on a busy machine
    with pytest.raises(requests.exceptions.ReadTimeout):
        progress_call(emulator, timeout=0.3)
    emulator.inject("comfy_get_progress", "slow", delay=0.3)
    started = time.monotonic()
    r = progress_call(emulator, timeout=5)
    assert r.status_code == 200
    assert time.monotonic() - started >= 0.3 - 0.005  # the server's loop may wake a timer up to 1 ms early


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
    # the timeout gives the server ample time to start the create before the client hangs up (a request
    # dropped before its handler runs creates nothing); the answer is held back far longer
    emulator.inject("comfy_prompt", "slow", delay=3.0)
    with pytest.raises(requests.exceptions.ReadTimeout):
        signed_post(emulator, PROMPT, {"workflow_id": "wf-1", "inputs": {}}, timeout=1.0)
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


def test_refused_put_is_not_spoiled_by_an_after_fault(emulator):
    """Storage refuses a bad pre-signed URL before anything runs; the AFTER fault taken is spent unseen."""
    data = sign_upload(emulator)
    emulator.inject("upload_put", "reset")
    bad = data["uploadUrl"].rsplit("Signature=", 1)[0] + "Signature=forged"
    r = requests.put(bad, data=b"x", headers={"Content-Type": "image/png"}, timeout=5)
    assert r.status_code == 403 and "<Code>SignatureDoesNotMatch</Code>" in r.text
    assert emulator.stats()["faults_fired"] == {"upload_put": {"reset": 1}}
    assert emulator.pending_faults() == []
    emulator.inject("upload_put", "503")  # a BEFORE fault answers even a bad URL
    assert requests.put(bad, data=b"x", headers={"Content-Type": "image/png"}, timeout=5).status_code == 503


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


# -- queue, progress, state, timing, default outputs, estimates, pools (issue 10) -------------------------


def result_data(emu, task_id):
    env = signed_post(emu, RESULT, {"taskId": task_id}).json()
    assert env["status"] == 10, env
    return env["data"]


def test_capacity_queues_in_fifo_order_with_true_positions(make_emulator):
    # a whole-second start: the epoch-ms begin times below are then exact (an arbitrary sub-ms fraction
    # near .5 rounded 0.1 s and 1.0 s after it differently, 1 run in ~5,000: 899 or 901 instead of 900)
    clock = ManualClock(start=int(time.time()))
    emu = make_emulator(capacity=2, clock=clock)  # duration 1 s: dispatch 0.1 s, running 0.9 s
    ids = [create(emu)["data"]["taskId"] for _ in range(5)]
    first = [progress(emu, t) for t in ids]
    assert [d["status"] for d in first] == ["waiting"] * 5
    assert [d["lastQueueRemaining"] for d in first] == [0, 0, 0, 1, 2]
    assert [d["etaRelative"] for d in first] == pytest.approx([1.0, 1.0, 1.9, 1.9, 2.8])
    emu.clock.advance(0.5)
    assert [progress(emu, t)["status"] for t in ids] == ["running"] * 2 + ["waiting"] * 3
    assert [progress(emu, t).get("lastQueueRemaining") for t in ids[2:]] == [0, 1, 2]
    # a slot frees at 1.0 s: the next two in line run at once (they waited out their dispatch time)
    emu.clock.advance(0.5)
    data = [progress(emu, t) for t in ids]
    assert [d["status"] for d in data] == ["succeeded"] * 2 + ["running"] * 2 + ["waiting"]
    assert data[4]["lastQueueRemaining"] == 0
    assert "lastQueueRemaining" not in data[2]
    emu.clock.advance(1.0)
    assert [progress(emu, t)["status"] for t in ids] == ["succeeded"] * 4 + ["running"]
    emu.clock.advance(0.9)
    assert {progress(emu, t)["status"] for t in ids} == {"succeeded"}
    # the timing starts when a task leaves the queue: 0.1 s, 1.0 s and 1.9 s after the first create
    begins = [result_data(emu, t)["taskBeginTime"] for t in ids]
    assert [b - begins[0] for b in begins] == [0, 0, 900, 900, 1800]
    assert {result_data(emu, t)["taskDuration"] for t in ids} == {900}


def test_later_arrivals_queue_behind_and_positions_shrink(make_emulator):
    emu = make_emulator(capacity=1)
    long_task = create(emu, "sleep-2")["data"]["taskId"]  # holds the slot until 2.0 s
    short = create(emu, "sleep-0.5")["data"]["taskId"]
    emu.clock.advance(0.5)
    late = create(emu, "sleep-0.1")["data"]["taskId"]
    assert progress(emu, long_task)["status"] == "running"
    assert progress(emu, short)["lastQueueRemaining"] == 0
    assert progress(emu, late)["lastQueueRemaining"] == 1
    emu.clock.advance(1.5)  # 2.0 s: the short task takes the slot, FIFO even though `late` is shorter
    assert progress(emu, short)["status"] == "running"
    assert progress(emu, late)["lastQueueRemaining"] == 0
    emu.clock.advance(0.45)
    assert progress(emu, short)["status"] == "succeeded"
    assert progress(emu, late)["status"] == "running"


def test_unlimited_capacity_has_no_queue(make_emulator):
    emu = make_emulator()
    ids = [create(emu)["data"]["taskId"] for _ in range(20)]
    assert {progress(emu, t)["lastQueueRemaining"] for t in ids} == {0}
    emu.clock.advance(0.1)
    assert {progress(emu, t)["status"] for t in ids} == {"running"}


def test_progress_is_a_fraction_rising_monotonically_with_node_state(make_emulator):
    emu = make_emulator(duration=10.0)
    task_id = create(emu)["data"]["taskId"]
    seen = []
    for _ in range(120):
        data = progress(emu, task_id)
        seen.append(data)
        if data["status"] == "succeeded":
            break
        emu.clock.advance(0.125)
    fractions = [d["progress"] for d in seen]
    assert all(0.0 <= p <= 1.0 for p in fractions)
    assert fractions == sorted(fractions)
    assert fractions[-1] == 1.0
    assert all(d["progress"] == 0 and "state" not in d for d in seen if d["status"] == "waiting")
    running = [d for d in seen if d["status"] == "running"]
    assert all(0 <= d["progress"] < 1 for d in running)
    labels = [label for label, _, _ in NODES]
    for d in running:
        state = d["state"]
        assert set(state) == {"node", "nodeIndex", "nodeCount", "step", "steps"}
        assert state["node"] == labels[state["nodeIndex"] - 1]
        assert state["nodeCount"] == len(NODES)
        assert 1 <= state["step"] <= state["steps"]
        assert state["node"] in d["message"]
    # nodes run in workflow order, steps rise inside a node, and the sampler shows its step counter
    positions = [(d["state"]["nodeIndex"], d["state"]["step"]) for d in running]
    assert positions == sorted(positions)
    assert positions[0][0] == 1 and positions[-1][0] == len(NODES)
    sampler = [d["state"] for d in running if d["state"]["node"] == "KSampler"]
    assert {s["steps"] for s in sampler} == {20}
    assert len({s["step"] for s in sampler}) > 10
    assert all("state" not in d for d in seen if d["status"] != "running")


def test_result_timing_follows_the_injected_clock(make_emulator):
    start = int(time.time()) + 0.25  # the gateway still checks request timestamps against this clock
    clock = ManualClock(start=start)
    emu = make_emulator(clock=clock, duration=4.0)
    task_id = create(emu)["data"]["taskId"]
    clock.advance(3.0)
    assert progress(emu, task_id)["status"] == "running"
    clock.advance(1.0)
    data = result_data(emu, task_id)
    begin_ms = int(start) * 1000 + 650  # created at .25 s, then 0.4 s of dispatch
    assert data["taskBeginTime"] == begin_ms
    assert data["taskDuration"] == 3600
    assert data["taskEndTime"] == data["taskBeginTime"] + data["taskDuration"] == begin_ms + 3600
    assert all(len(str(data[k])) == 13 for k in ("taskBeginTime", "taskEndTime"))
    assert all(isinstance(data[k], int) for k in ("taskBeginTime", "taskEndTime", "taskDuration"))


def test_images_only_workflow_has_outputs_only_in_images(make_emulator):
    emu = make_emulator(images_only_workflow_ids={"wf-plain"})
    task_id = create(emu, "wf-plain", return_temp_files=True)["data"]["taskId"]
    finish(emu, task_id)
    data = result_data(emu, task_id)
    assert data["result"] == {}
    assert len(data["images"]) == 2 and len(set(data["images"])) == 2
    pngs = []
    for url in data["images"]:
        r = requests.get(url, timeout=5)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        pngs.append(r.content)
        parse_png(r.content)
    assert pngs[0] != pngs[1]
    # the sample workflow's own output URL does not exist for it
    assert (
        requests.get(unsigned(data["images"][0]).replace("ComfyUI_00001_", "output"), timeout=5).status_code
        == 404
    )
    # other workflows keep their custom outputs (and the first default image)
    normal = create(emu)["data"]["taskId"]
    finish(emu, normal)
    assert result_data(emu, normal)["result"]["images"]["url"] == result_data(emu, normal)["images"][0]


def test_images_only_is_runtime_configurable(clocked):
    default = create(clocked, "wf-images-only")["data"]["taskId"]  # on by default for this id
    finish(clocked, default)
    assert result_data(clocked, default)["result"] == {}
    clocked.configure(images_only_workflow_ids=["wf-123"])
    task_id = create(clocked)["data"]["taskId"]
    finish(clocked, task_id)
    assert result_data(clocked, task_id)["result"] == {}
    clocked.reset()
    task_id = create(clocked)["data"]["taskId"]
    finish(clocked, task_id)
    assert set(result_data(clocked, task_id)["result"]) == {"images"}


def test_eta_error_stays_within_bounds_and_is_seeded(make_emulator):
    emu = make_emulator(duration=10.0, eta_error=0.3, seed=7)
    created = [create(emu)["data"] for _ in range(60)]
    estimates = [c["estimatedDurationInSeconds"] for c in created]
    assert all(7.0 <= e <= 13.0 for e in estimates)
    assert min(estimates) < 8.5 and max(estimates) > 11.5  # spread over the range, both sides
    assert any(e != round(e) for e in estimates)  # doubles
    # the progress estimate carries the same per-task error, for the whole life of the task
    emu.clock.advance(4.0)
    for c, estimate in zip(created, estimates, strict=True):
        assert progress(emu, c["taskId"])["etaRelative"] == pytest.approx(estimate * 0.6, abs=2e-3)
    # same seed, same creates: the same errors (reset re-seeds)
    emu.reset()
    assert [create(emu)["data"]["estimatedDurationInSeconds"] for _ in range(60)] == estimates
    other = make_emulator(duration=10.0, eta_error=0.3, seed=8)
    assert [create(other)["data"]["estimatedDurationInSeconds"] for _ in range(60)] != estimates


def test_eta_bias_is_always_off_the_same_way(make_emulator):
    emu = make_emulator(duration=10.0, eta_bias=0.5)
    assert {create(emu)["data"]["estimatedDurationInSeconds"] for _ in range(10)} == {15.0}
    emu.configure(eta_error=0.1)
    estimates = [create(emu)["data"]["estimatedDurationInSeconds"] for _ in range(40)]
    assert all(14.0 <= e <= 16.0 for e in estimates)
    emu.configure(eta_bias=-0.5, eta_error=0)
    task_id = create(emu)["data"]["taskId"]
    assert progress(emu, task_id)["etaRelative"] == 5.0
    with pytest.raises(ValueError, match="eta_bias"):
        emu.configure(eta_bias=-1)


@pytest.mark.parametrize(
    ("header", "pool"),
    [(None, "default"), ("default", "default"), ("a,b,default", "default"), ("a,c", "c"),
     ("c", "c"), ("a , default", "default")],
)  # fmt: skip
def test_resource_pools_route_and_fall_back(make_emulator, header, pool):
    emu = make_emulator(full_pool_ids={"a", "b"})
    env = create(emu, pools=header)
    assert env["status"] == 10, env
    task_id = env["data"]["taskId"]
    finish(emu, task_id)
    assert result_data(emu, task_id)["info"]["resourceConfigId"] == pool
    assert emu.app.state.emulator.tasks[task_id].resource_config_id == header


@pytest.mark.parametrize("header", ["a,b", "a", "b, a"])
def test_only_full_private_pools_is_an_error(make_emulator, header):
    emu = make_emulator(full_pool_ids={"a", "b"})
    r = signed_post(emu, PROMPT, {"workflow_id": "wf-1", "inputs": {}}, extra_headers={
        "X-SP-RESOURCE-CONFIG-ID": header})  # fmt: skip
    assert r.status_code == 200
    env = r.json()
    assert env["status"] != 10
    assert env["errCode"] == "ResourcePoolFull"
    assert env["subErrCode"] == "RESOURCE_POOL_FULL"
    assert "default" in env["subErrMessage"]
    assert env["data"] is None
    assert emu.stats()["predictions"] == 0


def test_full_pools_are_runtime_configurable(clocked):
    clocked.configure(full_pool_ids=["p1"])
    assert create(clocked, pools="p1")["errCode"] == "ResourcePoolFull"
    assert create(clocked, pools="p1,default")["status"] == 10
    clocked.reset()
    assert create(clocked, pools="p1")["status"] == 10


def test_create_app_takes_the_options():
    app = create_app(capacity=3, eta_error=0.2, eta_bias=0.1, seed=5, full_pool_ids={"a"})
    try:
        config = app.state.emulator.config
        assert (config.capacity, config.eta_error, config.eta_bias, config.seed) == (3, 0.2, 0.1, 5)
        assert config.full_pool_ids == {"a"}
        assert config.images_only_workflow_ids == {"wf-images-only"}
    finally:
        app.state.emulator.close()
    base = EmulatorConfig(app_key="k")
    app = create_app(base, capacity=0, images_only_workflow_ids={"x"})
    try:
        config = app.state.emulator.config
        assert config.app_key == "k" and config.capacity is None
        assert config.images_only_workflow_ids == {"x"}
        assert base.images_only_workflow_ids == {"wf-images-only"}  # the caller's config is untouched
    finally:
        app.state.emulator.close()
    with pytest.raises(ValueError, match="capacity"):
        create_app(capacity=-1)
    with pytest.raises(TypeError):
        create_app(no_such_option=1)


# -- CLI ----------------------------------------------------------------------------------------------


def test_cli_runs_serves_faults_and_stops_on_sigterm(tmp_path):
    secret = "cli-secret-DO-NOT-LEAK"
    env = {**os.environ, "SPEEDPIX_APP_SECRET": secret, "SPEEDPIX_APP_KEY": "cli-key"}
    log = tmp_path / "emulator.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "airflow_provider_speedpix.emulator", "--port", "0", "--duration", "0",
             "--fault", "comfy_get_progress:503:1", "--access-log", "--capacity", "2", "--eta-error", "0.25",
             "--eta-bias", "0.1", "--seed", "3", "--full-pool", "a", "--full-pool", "b",
             "--images-only-workflow", "wf-x"],
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

            config = requests.get(url + "/_emulator/config", timeout=5).json()
            assert (config["capacity"], config["eta_error"], config["eta_bias"], config["seed"]) == (
                2, 0.25, 0.1, 3)  # fmt: skip
            assert config["full_pool_ids"] == ["a", "b"]
            assert config["images_only_workflow_ids"] == ["wf-x"]
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
