"""Pure protocol helpers: envelope reading, parsing, request bodies, output URLs, poll delays."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from airflow_provider_speedpix import _protocol as proto
from airflow_provider_speedpix._polling import next_poll_delay
from airflow_provider_speedpix._protocol import (
    OutputURL,
    Prediction,
    apply_result,
    create_prediction_body,
    encode_body,
    iter_output_urls,
    parse_created,
    parse_progress,
    parse_upload_sign,
    read_envelope,
)
from airflow_provider_speedpix.exceptions import (
    SpeedPixAPIError,
    SpeedPixAuthError,
    SpeedPixConfigError,
    SpeedPixError,
    SpeedPixNotFoundError,
    SpeedPixResponseError,
    SpeedPixServerError,
    SpeedPixThrottledError,
)


def env_bytes(data=None, *, status=10, err_code="", err_message="", sub_code="", sub_message="", **extra):
    doc = {
        "status": status,
        "errCode": err_code,
        "errMessage": err_message,
        "subErrCode": sub_code,
        "subErrMessage": sub_message,
        "apiInvokeId": "invoke-1",
        **extra,
    }
    if data is not None:
        doc["data"] = data
    return json.dumps(doc, ensure_ascii=False).encode()


# ---------------------------------------------------------------- read_envelope: gateway errors
def gateway_headers(code, message, request_id="req-42"):
    return {"X-Ca-Error-Code": code, "X-Ca-Error-Message": message, "X-Ca-Request-Id": request_id}


def test_gateway_invalid_signature_is_auth_error_without_string_to_sign():
    headers = gateway_headers("I400SG", "Invalid Signature, Server StringToSign:`POST#application/json#...`")
    with pytest.raises(SpeedPixAuthError) as info:
        read_envelope("comfy_prompt", 400, headers, b"")
    err = info.value
    assert err.error_code == "I400SG"
    assert err.error_message == "Invalid Signature"
    assert err.request_id == "req-42"
    assert err.status_code == 400
    assert err.operation == "comfy_prompt"
    assert "I400SG" in str(err) and "req-42" in str(err)
    assert "App Key and App Secret" in str(err)
    assert "StringToSign" not in str(err)


def test_gateway_headers_are_case_insensitive():
    headers = {"x-ca-error-code": "A400IK", "x-ca-error-message": "Invalid AppKey", "x-ca-request-id": "r1"}
    with pytest.raises(SpeedPixAuthError) as info:
        read_envelope("comfy_get_progress", 400, headers, b"")
    assert (info.value.error_code, info.value.error_message, info.value.request_id) == (
        "A400IK",
        "Invalid AppKey",
        "r1",
    )


def test_gateway_timestamp_error_hints_at_clock():
    headers = gateway_headers("I400HD", "Invalid Header `X-Ca-Timestamp` Timestamp Expired")
    with pytest.raises(SpeedPixAuthError, match="clock"):
        read_envelope("comfy_prompt", 400, headers, b"")


def test_gateway_nonce_error_hints_at_replay():
    headers = gateway_headers("I400NC", "Invalid Nonce `abc` Nonce Used")
    with pytest.raises(SpeedPixAuthError, match="replayed"):
        read_envelope("comfy_prompt", 400, headers, b"")


@pytest.mark.parametrize(
    ("status", "headers"),
    [
        (429, gateway_headers("T429ID", "Throttled by APP Flow Control")),
        (429, {}),  # bare 429 without gateway headers
        (403, {"X-Ca-Error-Message": "Throttled by APP Flow Control", "X-Ca-Request-Id": "req-42"}),
        (403, gateway_headers("T403AF", "Throttled by API Flow Control")),
    ],
)
def test_throttling(status, headers):
    with pytest.raises(SpeedPixThrottledError) as info:
        read_envelope("comfy_prompt", status, headers, b"")
    assert info.value.status_code == status
    assert isinstance(info.value, SpeedPixAPIError)
    if headers:
        assert info.value.request_id == "req-42"


def test_gateway_5xx_is_server_error():
    with pytest.raises(SpeedPixServerError) as info:
        read_envelope("comfy_get_progress", 503, gateway_headers("X503BE", "Backend unavailable"), b"")
    assert info.value.error_code == "X503BE"


def test_gateway_other_4xx_is_plain_api_error():
    with pytest.raises(SpeedPixAPIError) as info:
        read_envelope("comfy_prompt", 404, gateway_headers("I404NF", "API not found"), b"")
    assert type(info.value) is SpeedPixAPIError
    assert info.value.error_code == "I404NF"


def test_long_gateway_message_is_shortened():
    headers = gateway_headers("I400SG", "x" * 5000)
    with pytest.raises(SpeedPixAuthError) as info:
        read_envelope("comfy_prompt", 400, headers, b"")
    assert len(info.value.error_message) <= proto.MAX_ERROR_TEXT + 3


# ---------------------------------------------------------------- read_envelope: unreadable bodies
def test_html_page_5xx_is_server_error_naming_html():
    html = b"<html><head><title>502 Bad Gateway</title></head><body>Tengine</body></html>"
    with pytest.raises(SpeedPixServerError, match="HTML page") as info:
        read_envelope("comfy_get_progress", 502, {"X-Ca-Request-Id": "r"}, html)
    assert info.value.request_id == "r"


def test_html_page_200_is_response_error():
    with pytest.raises(SpeedPixResponseError, match=r"HTML page.*endpoint"):
        read_envelope("comfy_get_progress", 200, {}, b"\n  <!DOCTYPE html><html></html>")


def test_truncated_json_is_response_error():
    full = env_bytes({"taskId": "t1", "status": "waiting"})
    with pytest.raises(SpeedPixResponseError, match="not a JSON object"):
        read_envelope("comfy_prompt", 200, {}, full[: len(full) // 2])


@pytest.mark.parametrize("content", [b"", b"   ", b"[1, 2]", b'"text"', b"null", b"\xff\xfe garbage"])
def test_non_object_bodies(content):
    with pytest.raises(SpeedPixResponseError):
        read_envelope("comfy_prompt", 200, {}, content)


def test_empty_body_message():
    with pytest.raises(SpeedPixResponseError, match="empty body"):
        read_envelope("comfy_prompt", 200, {}, b"")


def test_missing_data_is_response_error():
    with pytest.raises(SpeedPixResponseError, match="no `data`") as info:
        read_envelope("comfy_get_progress", 200, {"X-Ca-Request-Id": "r9"}, env_bytes())
    assert info.value.invoke_id == "invoke-1"
    assert info.value.request_id == "r9"


def test_data_not_a_dict_is_response_error():
    with pytest.raises(SpeedPixResponseError):
        read_envelope("comfy_get_progress", 200, {}, env_bytes(data=["x"]))


# ---------------------------------------------------------------- read_envelope: backend errors
def test_envelope_err_code_raises_with_sub_message_preferred():
    content = env_bytes(
        {"x": 1},
        status=20,
        err_code="InvalidParameter",
        err_message="outer",
        sub_code="INVALID_PARAMETER",
        sub_message="workflow_id is required",
    )
    with pytest.raises(SpeedPixAPIError) as info:
        read_envelope("comfy_prompt", 200, {"X-Ca-Request-Id": "r2"}, content)
    err = info.value
    assert type(err) is SpeedPixAPIError
    assert err.error_code == "InvalidParameter"
    assert err.sub_error_code == "INVALID_PARAMETER"
    assert err.error_message == "workflow_id is required"
    assert err.invoke_id == "invoke-1"
    assert err.request_id == "r2"
    assert "INVALID_PARAMETER" in str(err) and "workflow_id is required" in str(err)


def test_envelope_err_message_used_without_sub_message():
    with pytest.raises(SpeedPixAPIError) as info:
        read_envelope("comfy_prompt", 200, {}, env_bytes({}, err_code="Boom", err_message="it broke"))
    assert info.value.error_message == "it broke"


def test_sub_err_code_alone_means_failure():
    with pytest.raises(SpeedPixAPIError):
        read_envelope("comfy_prompt", 200, {}, env_bytes({}, sub_code="X"))


def test_not_found_codes():
    content = env_bytes(
        {}, err_code="WorkflowNotFound", sub_code="WORKFLOW_NOT_FOUND", sub_message="workflow wf-x not found"
    )
    with pytest.raises(SpeedPixNotFoundError, match="wf-x"):
        read_envelope("comfy_prompt", 200, {}, content)
    with pytest.raises(SpeedPixNotFoundError):
        read_envelope("comfy_prompt", 404, {}, env_bytes({}))


def test_backend_http_status_classes():
    with pytest.raises(SpeedPixServerError):
        read_envelope("comfy_get_progress", 500, {}, env_bytes(status=500, err_code="InternalError"))
    with pytest.raises(SpeedPixAuthError):
        read_envelope("comfy_get_progress", 401, {}, env_bytes({}))
    with pytest.raises(SpeedPixAPIError) as info:
        read_envelope("comfy_get_progress", 400, {}, env_bytes({}))
    assert type(info.value) is SpeedPixAPIError
    assert info.value.status_code == 400


def test_allow_failure_keeps_failed_envelope():
    content = env_bytes(
        {"taskId": "t"}, status=20, err_code="TaskFailed", sub_code="WF_FAILED", sub_message="node 7 failed"
    )
    envelope = read_envelope("comfy_get_result", 200, {}, content, allow_failure=True)
    assert envelope.failed
    assert envelope.code == "WF_FAILED"
    assert envelope.reason == "node 7 failed"
    # a failed envelope without data is fine with allow_failure too
    no_data = env_bytes(status=20, err_code="TaskFailed", err_message="bad")
    assert read_envelope("comfy_get_result", 200, {}, no_data, allow_failure=True).reason == "bad"


def test_successful_envelope_fields():
    envelope = read_envelope("comfy_prompt", 200, {"x-ca-request-id": "rq"}, env_bytes({"taskId": "t"}))
    assert envelope.status == 10
    assert not envelope.failed
    assert envelope.data == {"taskId": "t"}
    assert envelope.invoke_id == "invoke-1"
    assert envelope.request_id == "rq"


def test_bool_status_is_not_an_int():
    envelope = read_envelope("comfy_prompt", 200, {}, env_bytes({}, status=True))
    assert envelope.status is None


def test_every_parse_error_is_a_speedpix_error():
    for content in (b"{", b"<html>", b"[]", env_bytes(), env_bytes({}, err_code="E")):
        for status in (200, 400, 500):
            with pytest.raises(SpeedPixError):
                read_envelope("comfy_prompt", status, {}, content)


# ---------------------------------------------------------------- parse_*
def ok(data):
    return read_envelope("x", 200, {}, env_bytes(data))


def test_parse_created():
    pred = parse_created(ok({"taskId": "t-1", "status": "waiting", "estimatedDurationInSeconds": "12.5"}))
    assert (pred.id, pred.status, pred.estimated_duration, pred.invoke_id) == (
        "t-1",
        "waiting",
        12.5,
        "invoke-1",
    )
    assert not pred.finished
    # missing status defaults to waiting
    assert parse_created(ok({"taskId": "t-2"})).status == "waiting"


@pytest.mark.parametrize("data", [{}, {"taskId": ""}, {"taskId": 5}, {"taskId": None}])
def test_parse_created_without_task_id(data):
    with pytest.raises(SpeedPixResponseError, match="taskId"):
        parse_created(ok(data))


def test_parse_progress():
    pred = parse_progress(
        "t-1",
        ok({"taskId": "t-1", "progress": 0.42, "etaRelative": 7, "message": "node 3", "status": "RUNNING"}),
    )
    assert (pred.status, pred.progress, pred.eta_seconds, pred.message) == ("running", 0.42, 7.0, "node 3")
    assert pred.percent == 42


@pytest.mark.parametrize(
    ("wire", "fraction", "percent"),
    [
        (0, 0.0, 0),
        (0.42, 0.42, 42),
        (0.999, 0.999, 99),  # rounded down: not done until it is
        (1, 1.0, 100),  # 1 is the fraction (100 %), not 1 %
        ("0.5", 0.5, 50),
        (1.5, 0.015, 1),  # (1, 100]: a gateway sending percentages
        (42, 0.42, 42),
        (100, 1.0, 100),
        (100.5, None, None),  # above 100: nonsense, ignored
        (1e9, None, None),
        (-0.1, None, None),  # negative: ignored
        (float("nan"), None, None),
        (None, None, None),
    ],
)
def test_progress_is_a_fraction_and_percentages_are_divided(wire, fraction, percent):
    pred = parse_progress("t", ok({"status": "running", "progress": wire}))
    assert pred.progress == (pytest.approx(fraction) if fraction is not None else None)
    assert pred.percent == percent


def test_percent_never_leaves_0_to_100():
    assert Prediction(id="t", status="running", progress=0.29).percent == 29  # 28.999999999999996 in floats
    assert Prediction(id="t", status="running", progress=7).percent == 100
    assert Prediction(id="t", status="running", progress=-1).percent == 0
    assert Prediction(id="t", status="running").percent is None


@pytest.mark.parametrize(
    ("wire", "expected"),
    [(3, 3), (0, 0), (3.0, 3), ("3", 3), (-1, None), ("x", None), (True, None), (None, None)],
)
def test_queue_position_while_waiting(wire, expected):
    pred = parse_progress("t", ok({"status": "waiting", "progress": 0, "lastQueueRemaining": wire}))
    assert pred.queue_position == expected


def test_queue_position_only_while_waiting():
    pred = parse_progress("t", ok({"status": "running", "progress": 0.1, "lastQueueRemaining": 4}))
    assert pred.queue_position is None


def test_node_state_emulator_shape():
    state = {"node": "KSampler", "nodeIndex": 3, "nodeCount": 5, "step": 12, "steps": 20}
    pred = parse_progress("t", ok({"status": "running", "progress": 0.5, "state": state}))
    assert (pred.node, pred.node_index, pred.node_count, pred.step, pred.steps) == ("KSampler", 3, 5, 12, 20)


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        ({"node": "7", "value": 3, "max": 20}, {"node": "7", "step": 3, "steps": 20}),  # ComfyUI's shape
        ('{"node": "VAEDecode", "step": 1}', {"node": "VAEDecode", "step": 1}),  # JSON text
        ({"nodeName": "Save", "nodeIndex": "5"}, {"node": "Save", "node_index": 5}),
        ({"node": 12}, {"node": "12"}),
        ({"node": {"id": 1}, "step": -1, "steps": 1e30, "nodeCount": True}, {}),
        ({"node": "  spaced \n label  "}, {"node": "spaced label"}),
        ({"node": "x" * 200}, {"node": "x" * 80 + "..."}),
        ({}, {}),
        ([1, 2], {}),
        ("running", {}),
        ("{not json", {}),
        (5, {}),
        (None, {}),
    ],
)
def test_node_state_odd_shapes_never_crash(state, expected):
    assert proto.parse_node_state(state) == expected
    pred = parse_progress("t", ok({"status": "running", "progress": 0.5, "state": state}))
    assert {k: getattr(pred, k) for k in expected} == expected


@pytest.mark.parametrize("value", [float("nan"), "inf", "abc", True, None, [1]])
def test_parse_progress_ignores_bad_numbers(value):
    pred = parse_progress("t", ok({"status": "running", "progress": value, "etaRelative": value}))
    assert pred.progress is None and pred.eta_seconds is None


@pytest.mark.parametrize("status", ["paused", "", None, 3])
def test_unknown_status_is_response_error(status):
    with pytest.raises(SpeedPixResponseError, match="unknown prediction status"):
        parse_progress("t-1", ok({"status": status}))


def test_known_statuses():
    for status in ("waiting", "running", "succeeded", "failed", "canceled"):
        assert parse_progress("t", ok({"status": status})).status == status
    assert parse_progress("t", ok({"status": "succeeded"})).finished
    assert parse_progress("t", ok({"status": "canceled"})).finished


def test_apply_result_success():
    pred = Prediction(id="t", status="succeeded")
    envelope = ok(
        {
            "taskId": "t",
            "result": {"images": {"url": "https://x/out.png"}},
            "images": ["https://x/out.png"],
            "taskDuration": 900,
            "taskBeginTime": 1796000000100,
            "taskEndTime": 1796000001000,
            "info": {"a": 1, "workflowId": "wf-9"},
        }
    )
    apply_result(pred, envelope)
    assert pred.output == {"images": {"url": "https://x/out.png"}}  # both kept
    assert pred.images == ["https://x/out.png"]
    assert pred.run_seconds == 0.9
    assert pred.started_at == datetime(2026, 11, 30, 0, 53, 20, 100000, tzinfo=UTC)
    assert pred.finished_at == datetime(2026, 11, 30, 0, 53, 21, tzinfo=UTC)
    assert pred.workflow_id == "wf-9"
    assert pred.extra == {"info": {"a": 1, "workflowId": "wf-9"}}
    assert pred.error is None and pred.succeeded
    assert pred.output_or_images == pred.output


@pytest.mark.parametrize("result", [{}, None, "absent", [], ""])
def test_apply_result_images_only_workflow(result):
    data = {"taskId": "t", "images": ["https://x/ComfyUI_00001_.png", "https://x/ComfyUI_00002_.png"]}
    if result != "absent":
        data["result"] = result
    pred = apply_result(Prediction(id="t", status="succeeded"), ok(data))
    assert pred.output is None
    assert pred.images == data["images"]
    assert pred.output_or_images == {"images": data["images"]}
    assert (pred.run_seconds, pred.started_at, pred.finished_at) == (None, None, None)


@pytest.mark.parametrize(
    ("images", "expected"),
    [
        ("https://x/a.png", ["https://x/a.png"]),
        (
            [{"url": "https://x/a.png"}, "", None, 3, " https://x/b.png "],
            ["https://x/a.png", "https://x/b.png"],
        ),
        ({"url": "https://x/a.png"}, ["https://x/a.png"]),
        (5, []),
        (None, []),
    ],
)
def test_apply_result_images_are_read_leniently(images, expected):
    pred = apply_result(Prediction(id="t", status="succeeded"), ok({"result": {}, "images": images}))
    assert pred.images == expected


@pytest.mark.parametrize(
    ("fields", "run_seconds", "started"),
    [
        ({"taskDuration": "1500"}, 1.5, None),
        (
            {"taskBeginTime": 1796000000, "taskEndTime": 1796000002},
            2.0,
            datetime(2026, 11, 30, 0, 53, 20, tzinfo=UTC),
        ),
        ({"taskDuration": -5, "taskBeginTime": 10**30}, None, None),
        ({"taskDuration": float("nan"), "taskBeginTime": "soon"}, None, None),
        (
            {"taskBeginTime": 1796000002000, "taskEndTime": 1796000000000},
            None,
            datetime(2026, 11, 30, 0, 53, 22, tzinfo=UTC),
        ),
    ],
)
def test_apply_result_timing_edge_cases(fields, run_seconds, started):
    pred = apply_result(Prediction(id="t", status="succeeded"), ok({"result": {}, **fields}))
    assert pred.run_seconds == run_seconds
    assert pred.started_at == started


def test_apply_result_failure_turns_succeeded_into_failed():
    pred = Prediction(id="t", status="succeeded", message="finished")
    content = env_bytes(
        {"taskId": "t"}, status=20, err_code="TaskFailed", sub_code="WF_FAILED", sub_message="node 7 failed"
    )
    apply_result(pred, read_envelope("comfy_get_result", 200, {}, content, allow_failure=True))
    assert pred.status == "failed"
    assert pred.error == "node 7 failed"
    assert pred.error_code == "WF_FAILED"
    assert pred.output is None


def test_apply_result_non_success_status_without_codes():
    pred = Prediction(id="t", status="failed", message="execution failed")
    envelope = read_envelope("comfy_get_result", 200, {}, env_bytes({}, status=30), allow_failure=True)
    apply_result(pred, envelope)
    assert pred.status == "failed"
    assert pred.error == "execution failed"


def test_prediction_round_trip():
    pred = Prediction(
        id="t",
        status="succeeded",
        progress=1.0,
        extra={"a": [1]},
        queue_position=None,
        node="KSampler",
        step=3,
        steps=20,
        images=["https://x/a.png"],
        run_seconds=0.9,
        started_at=datetime(2026, 11, 30, 0, 53, 20, 100000, tzinfo=UTC),
        finished_at=datetime(2026, 11, 30, 0, 53, 21, tzinfo=UTC),
    )
    data = json.loads(json.dumps(pred.to_dict()))
    assert data["started_at"] == "2026-11-30T00:53:20.100000+00:00"
    assert Prediction.from_dict({**data, "unknown": 1}) == pred
    # older dicts without the new keys, and naive or odd times
    assert Prediction.from_dict({"id": "t", "status": "waiting"}).images == []
    naive = Prediction.from_dict({"id": "t", "status": "succeeded", "started_at": "2026-11-29T09:33:20"})
    assert naive.started_at == datetime(2026, 11, 29, 9, 33, 20, tzinfo=UTC)
    assert (
        Prediction.from_dict({"id": "t", "status": "succeeded", "finished_at": "later"}).finished_at is None
    )


def test_parse_upload_sign():
    url, fields = parse_upload_sign(
        ok(
            {
                "uploadUrl": "https://oss/u?Signature=s",
                "accessUrl": "https://oss/a.png",
                "objectKey": "k",
                "path": "p",
                "expireTime": 1795534487,
            }
        )
    )
    assert url == "https://oss/u?Signature=s"
    assert fields == {
        "access_url": "https://oss/a.png",
        "object_key": "k",
        "path": "p",
        "expire_time": 1795534487,
    }
    assert "Signature" not in json.dumps(fields)


def test_parse_upload_sign_missing_urls():
    with pytest.raises(SpeedPixResponseError, match="uploadUrl or accessUrl") as info:
        parse_upload_sign(ok({"uploadUrl": "https://oss/u?Signature=topsecret"}))
    assert "topsecret" not in str(info.value)


# ---------------------------------------------------------------- encode_body / create_prediction_body
def test_encode_body_raw_utf8_compact():
    body = encode_body({"text": "白色背景 ✨", "n": 1})
    assert body == '{"text":"白色背景 ✨","n":1}'.encode()
    assert b"\\u" not in body


@pytest.mark.parametrize("bad", [{"x": float("nan")}, {"x": {1, 2}}, {"x": b"raw"}, {"x": object()}])
def test_encode_body_rejects_non_json(bad):
    with pytest.raises(SpeedPixConfigError, match="not JSON-serialisable"):
        encode_body(bad)


def test_create_prediction_body_defaults_alias_main():
    body = create_prediction_body(" wf-1 ", {"text": "hi"})
    assert body == {
        "workflow_id": "wf-1",
        "version_id": None,
        "inputs": {"text": "hi"},
        "alias_id": "main",
        "randomise_seeds": None,
        "return_temp_files": None,
    }
    # unset fields are sent as null, like the SDK
    assert b'"version_id":null' in encode_body(body)


def test_create_prediction_body_version_only():
    body = create_prediction_body("wf", {}, version_id="v3", randomise_seeds=True, return_temp_files=True)
    assert body["version_id"] == "v3" and body["alias_id"] is None
    assert body["randomise_seeds"] is True and body["return_temp_files"] is True


def test_alias_and_version_names_both():
    with pytest.raises(SpeedPixConfigError) as info:
        create_prediction_body("wf", {}, alias_id="prod-alias", version_id="v-77")
    assert "prod-alias" in str(info.value) and "v-77" in str(info.value)
    assert "alias_id" in str(info.value) and "version_id" in str(info.value)


@pytest.mark.parametrize("workflow_id", ["", "   ", None, 5])
def test_empty_workflow_id(workflow_id):
    with pytest.raises(SpeedPixConfigError, match="workflow_id"):
        create_prediction_body(workflow_id, {})


# ---------------------------------------------------------------- iter_output_urls
def test_iter_output_urls_document_order():
    output = {
        "images": {"url": "https://h/out.png"},
        "subject_image": {"url": "http://h/subject.png"},
        "list": ["ftp://nope", "https://h/a.png", {"deep": ["https://h/b.png"]}],
        "text": "not a url",
        "n": 3,
    }
    found = iter_output_urls(output)
    assert [(place.path, place.url) for place in found] == [
        (("images", "url"), "https://h/out.png"),
        (("subject_image", "url"), "http://h/subject.png"),
        (("list", 1), "https://h/a.png"),
        (("list", 2, "deep", 0), "https://h/b.png"),
    ]
    assert [place.where for place in found] == [
        "output['images']['url']",
        "output['subject_image']['url']",
        "output['list'][1]",
        "output['list'][2]['deep'][0]",
    ]


def test_iter_output_urls_scalars():
    assert iter_output_urls(None) == []
    [place] = iter_output_urls("https://x/y.png")
    assert place == OutputURL(path=(), url="https://x/y.png")
    assert place.where == "output"


def test_iter_prediction_urls_adds_default_images_once():
    output = {"images": {"url": "https://h/out.png"}, "gallery": ["https://h/g.png"]}
    images = ["https://h/out.png", "https://h/extra.jpg", "not a url", "https://h/extra.jpg"]
    found = proto.iter_prediction_urls(output, images)
    assert [(p.root, p.where, p.stem, p.url) for p in found] == [
        ("output", "output['images']['url']", "images", "https://h/out.png"),
        ("output", "output['gallery'][0]", "gallery_0", "https://h/g.png"),
        ("images", "images[1]", "image_1", "https://h/extra.jpg"),  # the same file as output: once
    ]
    assert [p.stem for p in proto.iter_prediction_urls(None, ["https://a/1", "https://a/2"])] == [
        "image_0",
        "image_1",
    ]


# ---------------------------------------------------------------- next_poll_delay
def test_poll_delay_without_information_is_poll_interval():
    assert next_poll_delay(None, poll_interval=2, max_interval=20) == 2
    assert next_poll_delay(Prediction(id="t", status="waiting"), poll_interval=2, max_interval=20) == 2


def test_poll_delay_far_from_end_uses_fraction_capped():
    running = Prediction(id="t", status="running", eta_seconds=10)
    assert next_poll_delay(running, poll_interval=1, max_interval=20) == 5
    long = Prediction(id="t", status="running", eta_seconds=1000)
    assert next_poll_delay(long, poll_interval=1, max_interval=20) == 20


def test_poll_delay_near_end_is_poll_interval():
    near = Prediction(id="t", status="running", eta_seconds=3)
    assert next_poll_delay(near, poll_interval=2, max_interval=20) == 2
    done = Prediction(id="t", status="running", eta_seconds=0)
    assert next_poll_delay(done, poll_interval=2, max_interval=20) == 2


def test_poll_delay_uses_estimate_minus_elapsed_before_progress():
    created = Prediction(id="t", status="waiting", estimated_duration=60)
    assert next_poll_delay(created, poll_interval=1, max_interval=100, elapsed=20) == 20
    assert next_poll_delay(created, poll_interval=1, max_interval=100, elapsed=59) == 1
    assert next_poll_delay(created, poll_interval=1, max_interval=100, elapsed=90) == 1
    # without elapsed the estimate is not used
    assert next_poll_delay(created, poll_interval=1, max_interval=100) == 1


def test_poll_delay_never_below_poll_interval():
    pred = Prediction(id="t", status="running", eta_seconds=5)
    assert next_poll_delay(pred, poll_interval=2, max_interval=0.5) == 2


def test_without_signatures_drops_every_url_query_and_user_info_but_keeps_text():
    from airflow_provider_speedpix._protocol import unsigned_url, without_signatures

    signed = "https://oss.example/outputs/a.png?Expires=1&Signature=s3cret"
    value = {
        "images": {"url": signed},
        "gallery": [signed, "https://u:p@h/b.jpg?x=1#frag", "a prompt? with a question"],
        "n": 3,
    }
    assert without_signatures(value) == {
        "images": {"url": "https://oss.example/outputs/a.png"},
        "gallery": ["https://oss.example/outputs/a.png", "https://h/b.jpg", "a prompt? with a question"],
        "n": 3,
    }
    assert unsigned_url(signed) == "https://oss.example/outputs/a.png"
    assert "s3cret" not in repr(without_signatures([value, (signed,)]))
