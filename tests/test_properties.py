"""Property tests (issue 5, section 4): the signer, input preparation and response parsing.

* Signer: any method, path, body, key and secret signs into headers the emulator's gateway verifier
  accepts (called directly, and over HTTP for a subset); changing a body byte, a secret character, the
  path or the method makes it refuse.
* Inputs: arbitrary nested JSON with file objects and paths in it keeps its shape, each file becomes the
  uploader's URL, everything else is unchanged; path-looking strings follow the documented rules.
* Parsing: arbitrary bytes, JSON, status codes and headers never raise anything but a ``SpeedPixError``.
"""

from __future__ import annotations

import functools
import io
import json
import os
import re
import tempfile
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from airflow_provider_speedpix import _protocol as proto
from airflow_provider_speedpix._inputs import MEDIA_SUFFIXES, InputPreparer
from airflow_provider_speedpix._outcome import (
    describe_finished,
    describe_progress,
    prediction_event,
    prediction_from_event,
)
from airflow_provider_speedpix._protocol.prediction import _fraction
from airflow_provider_speedpix._signing import sign_request
from airflow_provider_speedpix.emulator.app import EmulatorConfig, EmulatorState, GatewayError
from airflow_provider_speedpix.exceptions import SpeedPixError, SpeedPixInputError

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------------- strategies
methods = st.sampled_from(["POST", "GET", "PUT", "post", "Get"])
paths = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=60).map(lambda t: "/" + t)
secrets_ = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40)
keys = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)
bodies = st.one_of(
    st.just(b""),
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v, ensure_ascii=False).encode("utf-8")),
)


# ---------------------------------------------------------------------- signer
@pytest.fixture(scope="module")
def gateway_state():
    """The emulator's gateway state; its ``verify`` is the verifier the HTTP server runs."""
    state = EmulatorState(EmulatorConfig())
    yield state
    state.close()


def verify(state: EmulatorState, key: str, secret: str, method: str, path: str, headers, body: bytes):
    state.config.app_key, state.config.app_secret = key, secret
    state.verify(method, path, headers, body)


@SETTINGS
@given(method=methods, path=paths, body=bodies, key=keys, secret=secrets_)
@example(method="POST", path="/scc/comfy_prompt", body=b"", key="k", secret="s")
@example(method="PUT", path="/路径/?q=1", body='{"文本":"白色"}'.encode(), key="ключ", secret="秘密")
def test_signed_requests_pass_the_emulator_verifier(gateway_state, method, path, body, key, secret):
    headers = sign_request(method=method, path=path, body=body, app_key=key, app_secret=secret)
    verify(gateway_state, key, secret, method, path, headers, body)  # raises GatewayError if refused


@SETTINGS
@given(
    method=methods,
    path=paths,
    body=bodies.filter(bool),
    key=keys,
    secret=secrets_,
    data=st.data(),
)
def test_tampering_is_refused(gateway_state, method, path, body, key, secret, data):
    headers = sign_request(method=method, path=path, body=body, app_key=key, app_secret=secret)

    # any byte of the body flipped (to any other value)
    index = data.draw(st.integers(0, len(body) - 1), label="body index")
    delta = data.draw(st.integers(1, 255), label="xor")
    tampered = body[:index] + bytes([body[index] ^ delta]) + body[index + 1 :]
    with pytest.raises(GatewayError, match="Content-MD5"):
        verify(gateway_state, key, secret, method, path, dict(headers), tampered)

    # any character of the secret changed: the gateway's secret differs from the signer's
    position = data.draw(st.integers(0, len(secret) - 1), label="secret index")
    other = data.draw(st.characters(blacklist_categories=("Cs",)).filter(lambda c: c != secret[position]))
    wrong = secret[:position] + other + secret[position + 1 :]
    with pytest.raises(GatewayError, match="Invalid Signature"):
        verify(gateway_state, key, wrong, method, path, dict(headers), body)

    # another path or method
    with pytest.raises(GatewayError, match="Invalid Signature"):
        verify(gateway_state, key, secret, method, path + "x", dict(headers), body)
    other_method = "DELETE" if method.upper() != "DELETE" else "POST"
    with pytest.raises(GatewayError, match="Invalid Signature"):
        verify(gateway_state, key, secret, other_method, path, dict(headers), body)

    # and the untouched request still passes (fresh nonce: the verifier remembers used ones)
    fresh = sign_request(method=method, path=path, body=body, app_key=key, app_secret=secret)
    verify(gateway_state, key, secret, method, path, fresh, body)


@pytest.fixture(scope="module")
def clean_emulator(emulator_server):
    """The session's emulator, reset once for this module (faults, latency or settings an earlier test
    left would change its answers); module-scoped, as Hypothesis runs every example in one test call."""
    emulator_server.reset()
    return emulator_server


@FEW
@given(body=bodies, secret_suffix=st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=8))
@example(body='{"taskId":"任务"}'.encode(), secret_suffix="")
def test_signed_requests_pass_the_gateway_over_http(clean_emulator, body, secret_suffix):
    """The real server: whatever the backend says about the body, the gateway accepts the signature."""
    path = "/scc/comfy_get_progress"
    headers = sign_request(
        method="POST",
        path=path,
        body=body,
        app_key=clean_emulator.app_key,
        app_secret=clean_emulator.app_secret + secret_suffix,
    )
    response = requests.post(clean_emulator.url + path, data=body, headers=headers, timeout=10)
    if secret_suffix:
        assert response.headers.get("X-Ca-Error-Code") == "I400SG"
    else:
        assert "X-Ca-Error-Code" not in response.headers, response.headers.get("X-Ca-Error-Message")
        assert response.status_code in (200, 400)  # the backend's verdict on the body, not the gateway's


# ---------------------------------------------------------------------- input preparation
def _is_pathlike_text(text: str) -> bool:
    """The documented rule, written independently: leading ``/ ./ ../ ~`` or ``X:`` + separator.

    (The code accepts any character before the colon, not only a drive letter; both are excluded here.)
    """
    return text.startswith(("/", "./", "../", "~")) or bool(re.match(r"^.:[\\/]", text, re.DOTALL))


plain_text = st.text(max_size=30).filter(lambda t: not _is_pathlike_text(t))


class FakeUploader:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, str, str]] = []

    def __call__(self, source: Any, filename: str, where: str) -> str:
        self.calls.append((source, filename, where))
        return f"https://uploads.example/{len(self.calls)}/{filename}"

    def url_of(self, source: Any) -> str:
        for i, (seen, filename, _) in enumerate(self.calls, start=1):
            if seen is source or (isinstance(seen, Path) and isinstance(source, Path) and seen == source):
                return f"https://uploads.example/{i}/{filename}"
        raise AssertionError(f"{source!r} was never uploaded")


@pytest.fixture(scope="module")
def real_files():
    with tempfile.TemporaryDirectory(prefix="speedpix-props-") as folder:
        files = []
        for name in ("a.png", "商品 b.jpg", "c.bin"):
            path = Path(folder) / name
            path.write_bytes(b"\x89PNG" + name.encode())
            files.append(path)
        yield files


def inputs_with_files(files: list[Path]):
    leaves = (
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False, allow_infinity=False)
        | plain_text
        | st.builds(lambda b: io.BytesIO(b"x" + b), st.binary(max_size=20))
        | st.sampled_from(files)
    )
    tree = st.recursive(
        leaves,
        lambda children: (
            st.lists(children, max_size=4)
            | st.lists(children, max_size=3).map(tuple)
            | st.dictionaries(st.text(max_size=8), children, max_size=4)
        ),
        max_leaves=25,
    )
    return st.dictionaries(st.text(max_size=8), tree, max_size=5)


def check_same_shape(original: Any, prepared: Any, uploader: FakeUploader) -> None:
    if isinstance(original, dict):
        assert isinstance(prepared, dict) and list(prepared) == list(original)
        for key in original:
            check_same_shape(original[key], prepared[key], uploader)
    elif isinstance(original, list | tuple):
        assert isinstance(prepared, list) and len(prepared) == len(original)
        for a, b in zip(original, prepared, strict=True):
            check_same_shape(a, b, uploader)
    elif isinstance(original, io.BytesIO | Path):
        assert prepared == uploader.url_of(original)
    else:
        assert type(prepared) is type(original) and prepared == original


@SETTINGS
@given(data=st.data())
def test_prepared_inputs_keep_their_shape_and_files_become_urls(real_files, data):
    inputs = data.draw(inputs_with_files(real_files), label="inputs")
    uploader = FakeUploader()
    prepared = InputPreparer(uploader).prepare(inputs)

    json.dumps(prepared, allow_nan=False)  # plain JSON
    proto.encode_body({"inputs": prepared})  # and the exact bytes the hook would sign and send
    check_same_shape(inputs, prepared, uploader)

    # each distinct path is uploaded once, each file object once per occurrence
    uploaded_paths = [src for src, _, _ in uploader.calls if isinstance(src, Path)]
    assert len(uploaded_paths) == len(set(uploaded_paths))
    for source, filename, where in uploader.calls:
        assert where.startswith("inputs[")
        assert filename == (source.name if isinstance(source, Path) else "file")


@SETTINGS
@given(
    prefix=st.sampled_from(["/", "./", "../", "~/", "~", "C:/", "C:\\", "0:/"]),
    rest=st.text(max_size=20),
    suffix=st.sampled_from(["", ".txt", ".PNG", ".jpg", ".mp4", ".json", ".tar.gz", ".x"]),
)
@example(prefix="~", rest="about 5 items", suffix="")  # pathlib raises RuntimeError for "~about"
@example(prefix="~", rest="nosuchuser/x", suffix=".png")
@example(prefix="/", rest="x\x00y", suffix=".png")  # Path.resolve() raises ValueError on a NUL
@example(prefix="~", rest="\x00", suffix="")
def test_path_like_strings_that_do_not_exist(prefix, rest, suffix):
    """Not on disk: a media suffix is an error naming the place; anything else is sent as text."""
    missing = f"nonexistent-{uuid.uuid4().hex}/"
    value = prefix + ("" if prefix == "~" else missing) + rest + suffix
    assume(not os.path.lexists(os.path.expanduser(value.replace("\x00", ""))))  # "~" alone is $HOME
    expect_error = Path(value).suffix.lower() in MEDIA_SUFFIXES
    uploader = FakeUploader()
    try:
        prepared = InputPreparer(uploader).prepare({"field": [value]})
    except SpeedPixInputError as err:
        assert expect_error, err
        assert "inputs['field'][0]" in str(err) and "does not exist" in str(err)
    else:
        assert not expect_error
        assert prepared == {"field": [value]}
    assert uploader.calls == []


# ---------------------------------------------------------------------- response parsing
numbers = st.one_of(
    st.integers(-(10**20), 10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1796000000100, 1796000000, 0, -1, 10**18, "1796000000100"]),
)
node_state_keys = st.sampled_from(
    ["node", "nodeIndex", "nodeCount", "step", "steps", "value", "max", "nodeName", "title", "x"]
)
node_states = st.dictionaries(node_state_keys, json_values | numbers, max_size=6) | json_values.map(
    json.dumps
)
header_names = st.sampled_from(
    ["X-Ca-Error-Code", "X-Ca-Error-Message", "x-ca-error-code", "X-Ca-Request-Id", "Content-Type", "X-Other"]
)
headers_ = st.dictionaries(header_names, st.text(max_size=40), max_size=4)
envelope_like = st.fixed_dictionaries(
    {},
    optional={
        "status": st.one_of(st.just(10), st.integers(), json_values),
        "errCode": json_values,
        "errMessage": json_values,
        "subErrCode": json_values,
        "subErrMessage": json_values,
        "apiInvokeId": json_values,
        "data": st.one_of(
            json_values,
            st.fixed_dictionaries(
                {},
                optional={
                    "taskId": json_values,
                    "status": st.sampled_from(["waiting", "running", "succeeded", "failed", "WAITING"])
                    | json_values,
                    "progress": json_values,
                    "etaRelative": json_values,
                    "estimatedDurationInSeconds": json_values,
                    "message": json_values,
                    "result": json_values,
                    "images": json_values,
                    "info": json_values,
                    "lastQueueRemaining": json_values,
                    "state": json_values | node_states,
                    "taskDuration": json_values | numbers,
                    "taskBeginTime": json_values | numbers,
                    "taskEndTime": json_values | numbers,
                    "uploadUrl": json_values,
                    "accessUrl": json_values,
                    "objectKey": json_values,
                    "expireTime": json_values,
                },
            ),
        ),
    },
)
contents = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    envelope_like.map(lambda v: json.dumps(v, ensure_ascii=False).encode()),
)


def must_be_speedpix_error(call, *args) -> Any:
    """``call(*args)``: its result, or None after a ``SpeedPixError`` with a message; anything else fails."""
    try:
        return call(*args)
    except SpeedPixError as err:
        assert str(err)
        return None


def parse_everything(status_code: int, headers: dict, content: bytes) -> None:
    for operation in (proto.CREATE, proto.PROGRESS, proto.RESULT, proto.UPLOAD_SIGN):
        for allow_failure in (False, True):
            read = functools.partial(proto.read_envelope, allow_failure=allow_failure)
            envelope = must_be_speedpix_error(read, operation, status_code, headers, content)
            if envelope is None:
                continue
            if isinstance(envelope.data, dict):
                must_be_speedpix_error(proto.parse_created, envelope)
                progress = must_be_speedpix_error(proto.parse_progress, "p-1", envelope)
                must_be_speedpix_error(proto.parse_upload_sign, envelope)
                if progress is not None:
                    check_shown_to_people(progress)
            prediction = must_be_speedpix_error(
                proto.apply_result, proto.Prediction(id="p-1", status="succeeded"), envelope
            )
            check_shown_to_people(prediction)
            event = prediction_event(prediction)
            json.dumps(event, allow_nan=False)  # an event payload must be plain JSON
            assert prediction_from_event(event).images == prediction.images
            data = prediction.to_dict()
            json.dumps(data, allow_nan=False)
            assert proto.Prediction.from_dict(json.loads(json.dumps(data))) == prediction


def check_shown_to_people(prediction: proto.Prediction) -> None:
    """Whatever the service sent: a fraction 0..1, a whole percent 0..100, sane counts, aware UTC times,
    URL strings, and a progress line that renders."""
    assert prediction.progress is None or 0 <= prediction.progress <= 1
    assert prediction.percent is None or (
        isinstance(prediction.percent, int) and 0 <= prediction.percent <= 100
    )
    for count in (prediction.queue_position, prediction.node_index, prediction.node_count, prediction.step):
        assert count is None or (isinstance(count, int) and count >= 0)
    assert prediction.node is None or (isinstance(prediction.node, str) and len(prediction.node) <= 83)
    assert prediction.run_seconds is None or prediction.run_seconds >= 0
    for moment in (prediction.started_at, prediction.finished_at):
        assert moment is None or moment.utcoffset() == timedelta(0)
    assert all(isinstance(url, str) and url for url in prediction.images)
    assert isinstance(describe_progress(prediction), str)
    assert isinstance(describe_finished(prediction), str)


@SETTINGS
@given(status_code=st.integers(100, 599), headers=headers_, content=contents)
@example(status_code=200, headers={}, content=b"[" * 5_000)  # json.loads: RecursionError
@example(  # float(int) beyond the float range: OverflowError
    status_code=200,
    headers={},
    content=b'{"status":10,"data":{"taskId":"t","status":"running","progress":' + b"9" * 400 + b"}}",
)
@example(status_code=200, headers={}, content=b'{"status":10,"data":{"progress":NaN,"status":"running"}}')
@example(status_code=403, headers={"X-Ca-Error-Message": "Throttled"}, content=b"")
def test_parsing_never_raises_anything_but_speedpix_errors(status_code, headers, content):
    parse_everything(status_code, headers, content)


@SETTINGS
@given(value=json_values | numbers | node_states)
@example(value={"node": {"nested": 1}, "step": -3, "steps": 1e300})
@example(value='{"node": "KSampler", "step": 12, "steps": 20}')
@example(value="{" * 3000)
@example(value={"value": 3, "max": 20, "node": 7})
def test_node_state_parsing_is_lenient(value):
    state = proto.parse_node_state(value)
    assert set(state) <= {"node", "node_index", "node_count", "step", "steps"}
    prediction = proto.Prediction(id="p", status="running", progress=0.5, **state)
    check_shown_to_people(prediction)


@SETTINGS
@given(value=json_values | numbers)
def test_progress_is_always_a_fraction_or_none(value):
    fraction = _fraction(value)
    assert fraction is None or 0 <= fraction <= 1
