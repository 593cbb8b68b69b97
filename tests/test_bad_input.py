"""Bad input: every wrong connection field, argument and input value fails clearly, or is handled.

Each error case asserts (a) a ``SpeedPixError`` subclass, at DAG-parse time where the value is known then
(operator arguments that are not templated), else when the task runs and before any API call; (b) the
message names the field and says what to do; (c) no library traceback underneath (``__cause__`` unset,
``__context__`` suppressed or itself a ``SpeedPixError``). The cases that are not errors (bare host, sets,
datetimes, text that looks like a path, ``../`` in a server-provided name, unicode) assert what is sent or
saved. ``docs/reliability.md`` quotes the test ids.
"""

from __future__ import annotations

import asyncio
import datetime
import io
import json
import os
from pathlib import Path

import pytest

from airflow_provider_speedpix._inputs import BASE64_LIMIT
from airflow_provider_speedpix.emulator.png import make_png
from airflow_provider_speedpix.exceptions import (
    SpeedPixConfigError,
    SpeedPixDownloadError,
    SpeedPixError,
    SpeedPixInputError,
    SpeedPixResponseError,
)
from airflow_provider_speedpix.hooks.speedpix import MAX_RESPONSE_BYTES, SpeedPixHook
from airflow_provider_speedpix.operators.speedpix import SpeedPixRunOperator, output_files_plan
from airflow_provider_speedpix.sensors.speedpix import SpeedPixPredictionSensor

FAST = {"retry_limit": 1, "retry_delay": 0.01, "retry_max_delay": 0.02, "timeout": 5}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_clear(err: BaseException, *fragments: str) -> None:
    """(a) a SpeedPixError, (b) the message carries the field and the fix, (c) no library traceback."""
    assert isinstance(err, SpeedPixError), f"{type(err).__module__}.{type(err).__name__}: {err}"
    text = str(err)
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in {text!r}"
    assert err.__cause__ is None, repr(err.__cause__)
    assert (
        err.__context__ is None or err.__suppress_context__ or isinstance(err.__context__, SpeedPixError)
    ), repr(err.__context__)


def raised(call, *args, **kwargs) -> BaseException:
    with pytest.raises(SpeedPixError) as info:
        call(*args, **kwargs)
    return info.value


def set_connection(monkeypatch, conn_id: str = "speedpix_default", **fields) -> None:
    extra = {**FAST, **fields.pop("extra", {})}
    conn = {"conn_type": "speedpix", "host": "http://sp.test", "login": "key", "password": "secret-xyz"}
    conn.update(fields)
    conn["extra"] = extra
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(conn))


@pytest.fixture
def hook(speedpix_conn):
    return SpeedPixHook()


def no_api_calls(emulator) -> None:
    assert set(emulator.stats()["calls"].values()) == {0}, emulator.stats()["calls"]


def sent_inputs(emulator, prediction_id: str) -> dict:
    return emulator.app.state.emulator.tasks[prediction_id].inputs


# ---------------------------------------------------------------------- the connection
CONNECTION_CASES = {
    "empty_key": ({"login": ""}, ("App Key (login) is empty", "Set it to your SpeedPix app_key")),
    "blank_key": ({"login": "   "}, ("App Key (login) is empty", "Set it to your SpeedPix app_key")),
    "non_ascii_key": ({"login": "密钥"}, ("App Key (login) must be printable ASCII", "Copy the app_key")),
    "empty_secret": ({"password": ""}, ("App Secret (password) is empty", "Set it to your SpeedPix")),
    "endpoint_with_path": (
        {"host": "https://openai.edu-aliyun.com/scc/comfy_prompt"},
        ("has a path", "Set the Endpoint to https://openai.edu-aliyun.com only"),
    ),
    "endpoint_not_http": (
        {"host": "ftp://openai.edu-aliyun.com"},
        ("is not an http(s) URL", "Set the connection's Endpoint (host) to e.g."),
    ),
    "endpoint_bad_port": (
        {"host": "http://127.0.0.1:notaport"},
        ("has an invalid port", "Set the Endpoint to e.g."),
    ),
    "retry_limit_negative": ({"extra": {"retry_limit": -1}}, ("extra `retry_limit` must be >= 1",)),
    "retry_limit_zero": ({"extra": {"retry_limit": 0}}, ("extra `retry_limit` must be >= 1",)),
    "timeout_not_a_number": ({"extra": {"timeout": "soon"}}, ("extra `timeout` must be a number", "'soon'")),
    "timeout_zero": ({"extra": {"timeout": 0}}, ("extra `timeout` must be >=",)),
    "timeout_nan": ({"extra": {"timeout": "nan"}}, ("extra `timeout` must be >=",)),
    "timeout_infinite": ({"extra": {"timeout": "inf"}}, ("extra `timeout` must be >=",)),
    "retry_delay_negative": ({"extra": {"retry_delay": -1}}, ("extra `retry_delay` must be >= 0",)),
}


@pytest.mark.parametrize("case", list(CONNECTION_CASES))
def test_connection_field(monkeypatch, case):
    fields, fragments = CONNECTION_CASES[case]
    set_connection(monkeypatch, **fields)
    err = raised(lambda: SpeedPixHook().settings)
    assert type(err) is SpeedPixConfigError
    # endpoint errors name the Endpoint field (normalise_endpoint does not know the connection id)
    assert_clear(
        err, "Endpoint" if case.startswith("endpoint") else "Connection 'speedpix_default'", *fragments
    )
    assert "secret-xyz" not in str(err)


@pytest.mark.parametrize("case", ["timeout_nan", "endpoint_bad_port", "non_ascii_key"])
def test_connection_field_async(monkeypatch, case):
    """The trigger resolves the connection through ``asettings``: the same errors, no httpx traceback."""
    fields, fragments = CONNECTION_CASES[case]
    set_connection(monkeypatch, **fields)
    err = raised(asyncio.run, SpeedPixHook().aget_prediction("p-1"))
    assert_clear(err, *fragments)


def test_missing_connection(monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_SPEEDPIX_NOWHERE", raising=False)
    err = raised(lambda: SpeedPixHook("speedpix_nowhere").settings)
    # the Airflow not-found traceback is not chained underneath
    assert_clear(err, "speedpix_nowhere", "AIRFLOW_CONN_SPEEDPIX_NOWHERE", "SPEEDPIX_APP_KEY")


def test_missing_connection_async(monkeypatch):
    err = raised(asyncio.run, SpeedPixHook("speedpix_nowhere").aget_prediction("p-1"))
    assert_clear(err, "speedpix_nowhere", "SPEEDPIX_APP_KEY")


@pytest.mark.parametrize(
    ("host", "schema", "endpoint"),
    [
        ("openai.edu-aliyun.com", None, "https://openai.edu-aliyun.com"),
        ("openai.edu-aliyun.com", "http", "http://openai.edu-aliyun.com"),
        ("https://openai.edu-aliyun.com/", None, "https://openai.edu-aliyun.com"),
    ],
    ids=["bare_host_means_https", "bare_host_with_schema", "trailing_slash"],
)
def test_endpoint_without_scheme_is_normalised(monkeypatch, host, schema, endpoint):
    set_connection(monkeypatch, host=host, **({"schema": schema} if schema else {}))
    assert SpeedPixHook().settings.endpoint == endpoint


def test_unicode_connection_id(emulator, monkeypatch):
    set_connection(
        monkeypatch, "speedpix_生产", host=emulator.url, login=emulator.app_key, password=emulator.app_secret
    )
    prediction = SpeedPixHook("speedpix_生产").create_prediction("wf-1", {})
    assert prediction.id in emulator.app.state.emulator.tasks


# ---------------------------------------------------------------------- operator arguments (parse time)
@pytest.mark.parametrize(
    ("kwargs", "fragments"),
    [
        ({"poll_interval": 0}, ("`poll_interval` must be a number of seconds > 0", "got 0")),
        ({"poll_interval": -2.5}, ("`poll_interval` must be a number of seconds > 0",)),
        ({"poll_interval": "5"}, ("`poll_interval` must be a number of seconds > 0", "got '5'")),
        ({"timeout": 0}, ("`timeout` must be a number of seconds > 0",)),
        ({"timeout": -60}, ("`timeout` must be a number of seconds > 0", "got -60")),
        ({"file_encoding_strategy": "zip"}, ("`file_encoding_strategy` must be 'url'", "or 'base64'")),
    ],
    ids=[
        "poll_interval_zero",
        "poll_interval_negative",
        "poll_interval_str",
        "timeout_zero",
        "timeout_negative",
        "strategy",
    ],
)
def test_operator_argument_at_parse_time(kwargs, fragments):
    err = raised(SpeedPixRunOperator, task_id="t", workflow_id="wf-1", **kwargs)
    assert isinstance(err, SpeedPixConfigError)
    assert_clear(err, *fragments)


def test_wait_arguments_at_run_time(hook, emulator):
    for kwargs, field in (({"poll_interval": 0}, "`poll_interval`"), ({"timeout": -1}, "`timeout`")):
        err = raised(hook.wait_for_prediction, "p-1", **kwargs)
        assert_clear(err, field, "must be a number of seconds > 0")
    no_api_calls(emulator)


# ---------------------------------------------------------------------- prediction arguments (run time)
@pytest.mark.parametrize("workflow_id", ["", "   ", None], ids=["empty", "blank", "none"])
def test_workflow_id_empty(hook, emulator, workflow_id):
    err = raised(hook.create_prediction, workflow_id, {"text": "x"})
    assert_clear(err, "`workflow_id` must be a non-empty string", "Copy the id of the published workflow")
    no_api_calls(emulator)


def test_workflow_id_templated_to_empty(run_dag, speedpix_conn, capsys):
    dr = run_dag(
        """
import pendulum
from airflow.sdk import DAG
from airflow_provider_speedpix.operators.speedpix import SpeedPixRunOperator
dag = DAG("DAG_ID", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False)
SpeedPixRunOperator(task_id="run", dag=dag, workflow_id="{{ dag_run.conf.get('workflow', '') }}",
    inputs={"text": "x"}, deferrable=False, poll_interval=0.2)
"""
    )
    assert dr.state == "failed"
    out = capsys.readouterr().out
    assert "SpeedPixConfigError" in out
    assert "`workflow_id` must be a non-empty string" in out
    assert "check that a templated value renders to something" in out
    assert "requests.exceptions" not in out
    assert speedpix_conn.stats()["calls"]["comfy_prompt"] == 0


def test_alias_and_version_both(hook, emulator):
    err = raised(hook.create_prediction, "wf-1", {}, alias_id="main", version_id="v3")
    assert_clear(err, "`alias_id` ('main') or `version_id` ('v3'), not both")
    no_api_calls(emulator)


def test_resource_config_id_non_ascii(hook, emulator, tmp_path):
    image = tmp_path / "a.png"
    image.write_bytes(make_png(4, 4))
    err = raised(hook.create_prediction, "wf-1", {"image": str(image)}, resource_config_id="专属资源")
    assert_clear(err, "`resource_config_id`", "must be printable ASCII", "copy it from the SpeedPix console")
    no_api_calls(emulator)  # checked before the file is uploaded


def test_unsupported_file_encoding_strategy_at_run_time(hook, emulator):
    err = raised(hook.create_prediction, "wf-1", {}, file_encoding_strategy="inline")
    assert isinstance(err, SpeedPixInputError)
    assert_clear(err, "`file_encoding_strategy` must be 'url' (upload, any size) or 'base64'", "'inline'")
    no_api_calls(emulator)


@pytest.mark.parametrize("call", ["get_prediction", "aget_prediction", "sensor_poke"])
@pytest.mark.parametrize("prediction_id", ["", "  ", None], ids=["empty", "blank", "none"])
def test_prediction_id_empty(hook, emulator, call, prediction_id):
    if call == "get_prediction":
        err = raised(hook.get_prediction, prediction_id)
    elif call == "aget_prediction":
        err = raised(asyncio.run, hook.aget_prediction(prediction_id))
    else:
        sensor = SpeedPixPredictionSensor(task_id="wait", prediction_id=prediction_id)
        err = raised(sensor.poke, {})
    assert_clear(err, "`prediction_id` must be a non-empty string", "check the template or XCom")
    no_api_calls(emulator)


# ---------------------------------------------------------------------- inputs
@pytest.mark.parametrize("inputs", [["a", "b"], "text", 42], ids=["list", "str", "int"])
def test_inputs_not_a_dict(hook, emulator, inputs):
    err = raised(hook.create_prediction, "wf-1", inputs)
    assert isinstance(err, SpeedPixInputError)
    assert_clear(err, "`inputs` must be a dict of the workflow's input fields", "Example: inputs={")
    no_api_calls(emulator)


def test_inputs_bytes_rejected(hook, emulator):
    err = raised(hook.create_prediction, "wf-1", {"image": b"\x89PNG..."})
    assert_clear(err, "inputs['image']", "raw bytes cannot be sent as JSON", "io.BytesIO")
    no_api_calls(emulator)


def test_inputs_object_rejected(hook, emulator):
    class Widget:
        pass

    err = raised(hook.create_prediction, "wf-1", {"cfg": {"deep": [Widget()]}})
    assert_clear(err, "inputs['cfg']['deep'][0]", "Widget is not JSON-serialisable", "Convert it to str")
    no_api_calls(emulator)


def test_inputs_nan_rejected(hook, emulator):
    err = raised(hook.create_prediction, "wf-1", {"strength": float("nan")})
    assert_clear(err, "inputs['strength']", "pass a finite number")
    no_api_calls(emulator)


def test_inputs_set_becomes_list_and_datetime_iso(hook, emulator):
    when = datetime.datetime(2026, 3, 1, 12, 30, tzinfo=datetime.UTC)
    prediction = hook.create_prediction(
        "wf-1", {"tags": {"b", "a"}, "at": when, "day": when.date(), "pair": (1, 2)}
    )
    assert sent_inputs(emulator, prediction.id) == {
        "tags": ["a", "b"],
        "at": "2026-03-01T12:30:00+00:00",
        "day": "2026-03-01",
        "pair": [1, 2],
    }


def test_missing_local_media_path(hook, emulator, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = raised(hook.create_prediction, "wf-1", {"image": "./missing.png"})
    assert isinstance(err, SpeedPixInputError)
    assert_clear(err, "inputs['image']", "'missing.png' does not exist on this worker", "Fix the path")
    assert str(tmp_path / "missing.png") in str(err)  # where it was looked for
    no_api_calls(emulator)


@pytest.mark.parametrize("text", ["/not a path", "/imagine a cat", "~5 items", "../see above"])
def test_path_like_text_is_passed_through(hook, emulator, text):
    """The documented rule (_inputs.py): a missing path without a media suffix is text, sent as is."""
    prediction = hook.create_prediction("wf-1", {"prompt": text})
    assert sent_inputs(emulator, prediction.id) == {"prompt": text}
    assert emulator.stats()["calls"]["upload_put"] == 0


def test_directory_rejected(hook, emulator, tmp_path):
    (tmp_path / "frames").mkdir()
    err = raised(hook.create_prediction, "wf-1", {"image": f"{tmp_path}/frames"})
    assert_clear(err, "inputs['image']", "is a directory", "pass a single file")
    no_api_calls(emulator)


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0,
    reason="root can read a chmod 000 file, so there is nothing to reject; "
    "test_inputs.py::test_unreadable_file_rejected_even_as_root covers the rule with os.access patched",
)
def test_unreadable_file_rejected(hook, emulator, tmp_path):
    image = tmp_path / "secret.png"
    image.write_bytes(make_png(4, 4))
    image.chmod(0)
    try:
        err = raised(hook.create_prediction, "wf-1", {"image": str(image)})
    finally:
        image.chmod(0o600)
    assert_clear(err, "inputs['image']", "is not readable", "Fix its permissions")
    no_api_calls(emulator)


def test_unreadable_file_rejected_as_any_user(hook, emulator, tmp_path, monkeypatch):
    """Runs as root too: the permission check itself (``os.access``) says no."""
    from airflow_provider_speedpix import _inputs

    image = tmp_path / "secret.png"
    image.write_bytes(make_png(4, 4))
    monkeypatch.setattr(_inputs.os, "access", lambda path, mode: Path(path) != image)
    err = raised(hook.create_prediction, "wf-1", {"image": str(image)})
    assert_clear(err, "inputs['image']", "is not readable", "Fix its permissions")
    no_api_calls(emulator)


@pytest.mark.parametrize("strategy", ["url", "base64"])
def test_empty_file_rejected(hook, emulator, tmp_path, strategy):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    err = raised(hook.create_prediction, "wf-1", {"image": empty}, file_encoding_strategy=strategy)
    assert_clear(err, "inputs['image']", "is empty (0 bytes)", "pass a different file")
    no_api_calls(emulator)


def test_empty_stream_rejected_for_base64(hook, emulator):
    err = raised(hook.create_prediction, "wf-1", {"image": io.BytesIO()}, file_encoding_strategy="base64")
    assert_clear(err, "inputs['image']", "is empty (0 bytes)", "pass a different file")
    no_api_calls(emulator)


def test_base64_over_one_mib(hook, emulator, tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(PNG_MAGIC + b"\0" * BASE64_LIMIT)
    err = raised(hook.create_prediction, "wf-1", {"image": big}, file_encoding_strategy="base64")
    assert_clear(err, "inputs['image']", "over 1 MiB", "Use file_encoding_strategy='url'")
    no_api_calls(emulator)


def test_unicode_everywhere(hook, emulator, tmp_path):
    image = tmp_path / "商品 照片 ü.png"
    image.write_bytes(make_png(4, 4))
    prediction = hook.create_prediction("工作流-白底图", {"提示词": "白色背景 ✓", "图片": str(image)})
    inputs = sent_inputs(emulator, prediction.id)
    assert inputs["提示词"] == "白色背景 ✓"
    assert inputs["图片"].startswith(emulator.url)
    assert emulator.app.state.emulator.tasks[prediction.id].workflow_id == "工作流-白底图"
    [upload] = emulator.app.state.emulator.uploads.values()
    assert upload.original_filename == "商品 照片 ü.png"


# ---------------------------------------------------------------------- outputs and downloads
def test_output_dir_unwritable(hook, emulator, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    url = f"{emulator.url}/_emulator/files/outputs/x/output.png"
    err = raised(hook.download, url, blocker / "out" / "image.png")
    assert isinstance(err, SpeedPixDownloadError)
    assert_clear(err, "cannot create directory", str(blocker / "out"), "Choose a writable output_dir")
    assert emulator.stats()["calls"]["file_get"] == 0


@pytest.mark.parametrize(
    "url",
    ["ftp://cdn.example.com/out.png", "file:///etc/passwd", "/var/out.png", "data:image/png;base64,AAAA"],
    ids=["ftp", "file", "bare_path", "data_uri"],
)
def test_output_url_not_http(hook, emulator, tmp_path, url):
    err = raised(hook.download, url, tmp_path)
    assert isinstance(err, SpeedPixDownloadError)
    assert_clear(err, "Refusing to download", "only http(s) URLs are fetched")
    assert not list(tmp_path.iterdir())
    assert emulator.stats()["calls"]["file_get"] == 0


@pytest.mark.parametrize(
    "name",
    ["..%2F..%2Fevil.png", "..%5C..%5Cevil.png", "%2E%2E%2F%2E%2E%2Fevil.png", "a%2F..%2F..%2Fevil.png"],
)
def test_server_file_name_cannot_escape(hook, requests_mock, tmp_path, name):
    out = tmp_path / "deep" / "out"
    out.mkdir(parents=True)
    url = f"https://cdn.example.com/files/{name}"
    requests_mock.get(url, content=PNG_MAGIC)
    written = Path(hook.download(url, out))
    assert written.parent == out
    assert written.read_bytes() == PNG_MAGIC
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == [written]
    # the operator's plan names files after the output field; a hostile field name stays inside too
    [(_, _, destination)] = output_files_plan({"../../evil": {"url": url}}, str(out))
    assert destination.parent == out


def test_huge_api_response(monkeypatch, requests_mock):
    set_connection(monkeypatch)
    requests_mock.post("http://sp.test/scc/comfy_get_progress", content=b" " * (9 * 1024 * 1024))
    err = raised(SpeedPixHook().get_prediction, "p-1")
    assert isinstance(err, SpeedPixResponseError)
    assert_clear(err, "comfy_get_progress", f"larger than {MAX_RESPONSE_BYTES // 2**20} MiB", "refusing")
