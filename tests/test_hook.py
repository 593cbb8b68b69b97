"""SpeedPixHook against the in-process emulator: real HTTP, real signing, real uploads and downloads."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from airflow_provider_speedpix._inputs import BASE64_LIMIT
from airflow_provider_speedpix._protocol import Prediction, UploadedFile, without_signatures
from airflow_provider_speedpix.exceptions import (
    SpeedPixAuthError,
    SpeedPixConfigError,
    SpeedPixDownloadError,
    SpeedPixError,
    SpeedPixInputError,
    SpeedPixNotFoundError,
    SpeedPixPredictionFailed,
    SpeedPixTimeoutError,
    SpeedPixUploadError,
)
from airflow_provider_speedpix.hooks import speedpix as hook_module
from airflow_provider_speedpix.hooks.speedpix import (
    DEFAULT_ENDPOINT,
    SpeedPixHook,
    normalise_endpoint,
)
from tests.conftest import FakeClock, use_speedpix_connection

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EXTRA = {"retry_delay": 0.01, "retry_max_delay": 0.05, "timeout": 5}


def set_connection(monkeypatch, emulator, **overrides):
    conn = {"host": emulator.url, "login": emulator.app_key, "password": emulator.app_secret}
    extra = {**EXTRA, **(overrides.pop("extra", None) or {})}
    conn.update(overrides)
    use_speedpix_connection(monkeypatch, extra=extra, **conn)


@pytest.fixture
def hook(emulator, monkeypatch):
    set_connection(monkeypatch, emulator)
    return SpeedPixHook()


@pytest.fixture
def png_file(tmp_path):
    path = tmp_path / "input.png"
    path.write_bytes(PNG_MAGIC + b"pixels" * 100)
    return path


def emulator_tasks(emulator):
    """The emulator's task table (same process; read-only use)."""
    return emulator.app.state.emulator.tasks


def only_task(emulator):
    tasks = list(emulator_tasks(emulator).values())
    assert len(tasks) == 1
    return tasks[0]


def fetch(hook, url):
    response = hook.get_conn().get(url, timeout=5)
    assert response.status_code == 200, response.text
    return response.content


# ---------------------------------------------------------------- settings / connection
def test_settings_from_connection(hook, emulator):
    settings = hook.settings
    assert settings.endpoint == emulator.url
    assert settings.app_key == "test-key"
    assert settings.app_secret == emulator.app_secret
    assert (settings.timeout, settings.retry_delay, settings.retry_max_delay) == (5, 0.01, 0.05)
    assert emulator.app_secret not in repr(settings)


def test_env_fallback(emulator, monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_SPEEDPIX_DEFAULT", raising=False)
    monkeypatch.setenv("SPEEDPIX_APP_KEY", emulator.app_key)
    monkeypatch.setenv("SPEEDPIX_APP_SECRET", emulator.app_secret)
    monkeypatch.setenv("SPEEDPIX_ENDPOINT", emulator.url)
    hook = SpeedPixHook()
    assert hook.settings.endpoint == emulator.url
    prediction = hook.create_prediction("sleep-0", {"text": "hi"})
    assert hook.get_prediction(prediction.id).succeeded
    assert emulator.calls("comfy_prompt") == 1


def test_env_fallback_default_endpoint(monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_SPEEDPIX_DEFAULT", raising=False)
    monkeypatch.setenv("SPEEDPIX_APP_KEY", "k")
    monkeypatch.setenv("SPEEDPIX_APP_SECRET", "s")
    monkeypatch.delenv("SPEEDPIX_ENDPOINT", raising=False)
    assert SpeedPixHook().settings.endpoint == DEFAULT_ENDPOINT


def test_no_connection_and_no_env_names_both_fixes(monkeypatch):
    for name in (
        "AIRFLOW_CONN_SPEEDPIX_DEFAULT",
        "SPEEDPIX_APP_KEY",
        "SPEEDPIX_APP_SECRET",
        "SPEEDPIX_ENDPOINT",
    ):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SpeedPixConfigError) as info:
        SpeedPixHook().settings  # noqa: B018
    message = str(info.value)
    assert "speedpix_default" in message
    assert "AIRFLOW_CONN_SPEEDPIX_DEFAULT" in message
    assert "SPEEDPIX_APP_KEY" in message and "SPEEDPIX_APP_SECRET" in message


def test_only_key_in_env_is_not_enough(monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_SPEEDPIX_DEFAULT", raising=False)
    monkeypatch.setenv("SPEEDPIX_APP_KEY", "k")
    monkeypatch.delenv("SPEEDPIX_APP_SECRET", raising=False)
    with pytest.raises(SpeedPixConfigError, match="SPEEDPIX_APP_SECRET"):
        SpeedPixHook().settings  # noqa: B018


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"login": ""}, "App Key"),
        ({"password": ""}, "App Secret"),
        ({"extra": {"timeout": "abc"}}, "timeout"),
        ({"extra": {"retry_limit": 0}}, "retry_limit"),
        ({"host": "http://127.0.0.1:1/api/v1"}, "has a path"),
        ({"host": "ftp://example.com"}, "not an http"),
    ],
)
def test_bad_connection_fields(emulator, monkeypatch, overrides, match):
    set_connection(monkeypatch, emulator, **overrides)
    with pytest.raises(SpeedPixConfigError, match=match):
        SpeedPixHook().settings  # noqa: B018


def test_bare_host_means_https(emulator, monkeypatch):
    set_connection(monkeypatch, emulator, host="openai.edu-aliyun.com")
    assert SpeedPixHook().settings.endpoint == "https://openai.edu-aliyun.com"
    set_connection(monkeypatch, emulator, host="127.0.0.1", schema="http", port=8080)
    assert SpeedPixHook().settings.endpoint == "http://127.0.0.1:8080"


def test_normalise_endpoint():
    assert normalise_endpoint(None) == DEFAULT_ENDPOINT
    assert normalise_endpoint("  ") == DEFAULT_ENDPOINT
    assert normalise_endpoint("example.com") == "https://example.com"
    assert normalise_endpoint("http://127.0.0.1:8000/") == "http://127.0.0.1:8000"
    assert normalise_endpoint("example.com", port=444) == "https://example.com:444"
    assert normalise_endpoint("example.com:9", port=444) == "https://example.com:9"
    for bad in ("https://example.com/scc", "https://example.com?x=1", "https://example.com/#f", "http://"):
        with pytest.raises(SpeedPixConfigError):
            normalise_endpoint(bad)


def test_resource_config_id_from_connection_and_argument(emulator, monkeypatch):
    set_connection(monkeypatch, emulator, extra={"resource_config_id": "dedicated-1"})
    hook = SpeedPixHook()
    first = hook.create_prediction("sleep-0", {})
    second = hook.create_prediction("sleep-0", {}, resource_config_id="dedicated-2")
    tasks = emulator_tasks(emulator)
    assert tasks[first.id].resource_config_id == "dedicated-1"
    assert tasks[second.id].resource_config_id == "dedicated-2"


def test_resource_config_id_defaults_to_default(hook, emulator):
    prediction = hook.create_prediction("sleep-0", {})
    assert emulator_tasks(emulator)[prediction.id].resource_config_id == "default"


# ---------------------------------------------------------------- test_connection
def test_test_connection_good(hook, emulator):
    ok, message = hook.test_connection()
    assert ok is True
    assert message == f"Connected to SpeedPix at {emulator.url}: the credentials were accepted."
    assert emulator.stats()["predictions"] == 0  # the probe never creates anything


INTERNAL_NAMES = ("comfy_", "sp_create", "TaskNotFound", "probe", "airflow-connection-test")


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("503", "answered with a server error (HTTP 503"),
        ("429", "is throttling requests right now"),
        ("malformed", "answered, but not as SpeedPix does. Check the Endpoint"),
    ],
)
def test_test_connection_failures_in_the_users_words(emulator, monkeypatch, kind, expected):
    set_connection(monkeypatch, emulator, extra={"retry_limit": 1})
    emulator.inject("comfy_get_progress", kind, times=5)
    ok, message = SpeedPixHook().test_connection()
    assert ok is False
    assert expected in message
    assert not [name for name in INTERNAL_NAMES if name in message], message


def test_test_connection_wrong_secret(emulator, monkeypatch):
    set_connection(monkeypatch, emulator, password="wrong-secret-value")
    ok, message = SpeedPixHook().test_connection()
    assert ok is False
    assert "App Key" in message and "App Secret" in message
    assert "I400SG" in message
    assert message.startswith(f"SpeedPix at {emulator.url} rejected the credentials (HTTP 400, I400SG")
    assert not [name for name in INTERNAL_NAMES if name in message], message
    assert "wrong-secret-value" not in message
    assert emulator.app_secret not in message
    assert emulator.stats()["rejected"] == {"I400SG": 1}


def test_test_connection_wrong_key(emulator, monkeypatch):
    set_connection(monkeypatch, emulator, login="nobody")
    ok, message = SpeedPixHook().test_connection()
    assert ok is False
    assert "App Key" in message


def test_test_connection_unreachable(emulator, monkeypatch):
    set_connection(monkeypatch, emulator, host="http://127.0.0.1:1", extra={"retry_limit": 1})
    ok, message = SpeedPixHook().test_connection()
    assert ok is False
    assert message.startswith("Could not reach SpeedPix at http://127.0.0.1:1.")
    assert not [name for name in INTERNAL_NAMES if name in message], message


def test_test_connection_bad_config(monkeypatch):
    for name in ("AIRFLOW_CONN_SPEEDPIX_DEFAULT", "SPEEDPIX_APP_KEY", "SPEEDPIX_APP_SECRET"):
        monkeypatch.delenv(name, raising=False)
    ok, message = SpeedPixHook().test_connection()
    assert ok is False
    assert "SPEEDPIX_APP_KEY" in message


def test_connection_form_prefills_no_defaults_and_explains_every_extra():
    """Airflow 3.3's connection form (``ProvidersManager`` -> the UI's ``hook_meta``) pre-fills a field
    with its schema default and then saves it into ``extra``; ours have none, so a connection saved
    unchanged keeps following the provider's defaults. Every extra has help text naming its default."""
    from airflow.providers_manager import ProvidersManager

    from airflow_provider_speedpix import _settings

    widgets = {
        name.split("__")[-1]: info.field
        for name, info in ProvidersManager().connection_form_widgets.items()
        if name.startswith("extra__speedpix__")
    }
    assert set(widgets) == {"resource_config_id", "timeout", "retry_limit", "retry_delay", "retry_max_delay"}
    for name, field in widgets.items():
        assert field["value"] is None, name
        assert "default" not in field["schema"], name
        assert field["description"], name
    defaults = {
        "timeout": _settings.REQUEST_TIMEOUT,
        "retry_limit": _settings.DEFAULT_RETRY_LIMIT,
        "retry_delay": _settings.DEFAULT_RETRY_DELAY,
        "retry_max_delay": _settings.DEFAULT_RETRY_MAX_DELAY,
    }
    for name, default in defaults.items():
        assert widgets[name]["description"].endswith(f"Empty: {default:g}."), name
    # an extra saved as the form leaves it (empty values) means the provider's defaults
    saved = {name: None for name in widgets}
    settings = _settings.settings_from(host=None, login="k", password="s", extra=saved, source="test")
    assert (settings.timeout, settings.retry_limit, settings.retry_delay, settings.retry_max_delay) == (
        tuple(defaults.values())
    )


# ---------------------------------------------------------------- upload_file
def assert_uploaded(hook, uploaded, content, filename, content_type="image/png"):
    assert isinstance(uploaded, UploadedFile)
    assert uploaded.filename == filename
    assert uploaded.content_type == content_type
    assert uploaded.size == len(content)
    assert str(uploaded) == uploaded.access_url
    assert "Signature" not in repr(uploaded)
    assert fetch(hook, uploaded.access_url) == content


def test_upload_path_str(hook, emulator, png_file):
    uploaded = hook.upload_file(str(png_file))
    assert_uploaded(hook, uploaded, png_file.read_bytes(), "input.png")
    calls = emulator.stats()["calls"]
    assert calls["sp_create_temp_file_upload_sign"] == 1
    assert calls["upload_put"] == 1
    assert emulator.stats()["uploads"] == 1


def test_upload_path_object_and_overrides(hook, png_file):
    uploaded = hook.upload_file(png_file, filename="renamed.jpg", content_type="image/jpeg")
    assert_uploaded(hook, uploaded, png_file.read_bytes(), "renamed.jpg", "image/jpeg")


def test_upload_bytesio(hook):
    content = PNG_MAGIC + b"in memory"
    uploaded = hook.upload_file(io.BytesIO(content), filename="mem.png")
    assert_uploaded(hook, uploaded, content, "mem.png")
    # without a name: a generic one
    unnamed = hook.upload_file(io.BytesIO(b"x"))
    assert unnamed.filename == "file"
    assert unnamed.content_type == "application/octet-stream"


def test_upload_bytesio_from_current_position(hook):
    stream = io.BytesIO(b"HEADER" + PNG_MAGIC)
    stream.seek(6)
    uploaded = hook.upload_file(stream, filename="tail.png")
    assert uploaded.size == len(PNG_MAGIC)
    assert fetch(hook, uploaded.access_url) == PNG_MAGIC


def test_upload_non_ascii_file_name(hook, emulator, tmp_path):
    path = tmp_path / "产品 照片.png"
    path.write_bytes(PNG_MAGIC + "白".encode())
    uploaded = hook.upload_file(path)
    assert_uploaded(hook, uploaded, path.read_bytes(), "产品 照片.png")
    upload = next(iter(emulator.app.state.emulator.uploads.values()))
    assert upload.original_filename == "产品 照片.png"


def test_upload_object_storage_path(hook, png_file):
    from airflow.sdk import ObjectStoragePath

    uploaded = hook.upload_file(ObjectStoragePath(f"file://{png_file}"))
    assert_uploaded(hook, uploaded, png_file.read_bytes(), "input.png")


class ReadOnlyStream:
    """A binary reader that cannot seek or report its size (a pipe, a socket, a streaming body)."""

    def __init__(self, data):
        self._inner = io.BytesIO(data)

    def read(self, size=-1):
        return self._inner.read(size)


def test_upload_non_seekable_stream(hook, emulator):
    content = PNG_MAGIC + b"streamed" * 1000
    uploaded = hook.upload_file(ReadOnlyStream(content), filename="piped.png")
    assert uploaded.size == len(content)  # spooled first, then sent with its exact size (_storage.py)
    assert fetch(hook, uploaded.access_url) == content


@pytest.mark.parametrize("as_stream", [False, True], ids=["path", "bytesio"])
def test_upload_url_expired_before_put_is_signed_again(hook, emulator, monkeypatch, png_file, as_stream):
    """The first pre-signed URL is already expired; the second PUT must resend the whole file."""
    emulator.configure(upload_url_ttl_s=0)
    from airflow_provider_speedpix import _storage

    real_put = _storage.put

    def put_then_extend_ttl(*args, **kwargs):
        try:
            return real_put(*args, **kwargs)
        finally:
            emulator.configure(upload_url_ttl_s=3600)

    monkeypatch.setattr(_storage, "put", put_then_extend_ttl)
    source = io.BytesIO(png_file.read_bytes()) if as_stream else png_file
    uploaded = hook.upload_file(source, filename="input.png")
    assert fetch(hook, uploaded.access_url) == png_file.read_bytes()
    calls = emulator.stats()["calls"]
    assert calls["sp_create_temp_file_upload_sign"] == 2
    assert calls["upload_put"] == 2


def test_upload_url_always_expired_gives_up(hook, emulator, png_file):
    emulator.configure(upload_url_ttl_s=0)
    with pytest.raises(SpeedPixUploadError, match="AccessDenied") as info:
        hook.upload_file(png_file)
    assert "Signature" not in str(info.value)
    assert emulator.stats()["calls"]["sp_create_temp_file_upload_sign"] == 2


def test_upload_rejects_bad_sources(hook, emulator, tmp_path):
    with pytest.raises(SpeedPixConfigError, match="does not exist"):
        hook.upload_file(tmp_path / "missing.png")
    with pytest.raises(SpeedPixConfigError, match="directory"):
        hook.upload_file(tmp_path)
    with pytest.raises(SpeedPixConfigError, match="cannot upload a int"):
        hook.upload_file(42)
    assert emulator.stats()["calls"]["sp_create_temp_file_upload_sign"] == 0


# ---------------------------------------------------------------- create_prediction
def test_create_prediction_text_with_chinese(hook, emulator):
    text = "白色背景的产品照片，柔和光线 ✨"  # noqa: RUF001 - a real Chinese full-width comma
    prediction = hook.create_prediction("wf-1", {"text": text, "strength": 0.5})
    assert isinstance(prediction, Prediction)
    assert prediction.status == "waiting"
    assert prediction.estimated_duration == pytest.approx(1.0)
    assert prediction.invoke_id
    task = only_task(emulator)
    assert task.task_id == prediction.id
    assert task.inputs == {"text": text, "strength": 0.5}
    assert task.alias_id == "main" and task.version_id is None
    stats = emulator.stats()
    assert stats["calls"]["comfy_prompt"] == 1
    assert stats["predictions"] == 1
    assert stats["rejected"] == {}


def test_create_prediction_version_and_flags(hook, emulator):
    hook.create_prediction("wf-1", {}, version_id="v2", return_temp_files=True)
    task = only_task(emulator)
    assert (task.version_id, task.alias_id, task.return_temp_files) == ("v2", None, True)


def test_create_prediction_nested_files_uploaded_once_each(hook, emulator, png_file, tmp_path):
    other = tmp_path / "mask.png"
    other.write_bytes(PNG_MAGIC + b"mask")
    inputs = {
        "image": str(png_file),
        "refs": [str(png_file), {"mask": other, "weight": 1}],
        "cfg": {"again": png_file, "stream": io.BytesIO(b"bytes")},
    }
    hook.create_prediction("wf-1", inputs)
    stats = emulator.stats()
    assert stats["calls"]["sp_create_temp_file_upload_sign"] == 3
    assert stats["calls"]["upload_put"] == 3
    assert stats["calls"]["comfy_prompt"] == 1
    sent = only_task(emulator).inputs
    assert sent["image"] == sent["refs"][0] == sent["cfg"]["again"]
    assert sent["refs"][1]["weight"] == 1
    assert fetch(hook, sent["image"]) == png_file.read_bytes()
    assert fetch(hook, sent["refs"][1]["mask"]) == other.read_bytes()
    assert fetch(hook, sent["cfg"]["stream"]) == b"bytes"


def test_create_prediction_base64(hook, emulator, png_file):
    hook.create_prediction("wf-1", {"image": png_file}, file_encoding_strategy="base64")
    value = only_task(emulator).inputs["image"]
    assert value.startswith("data:image/png;base64,")
    assert base64.b64decode(value.split(",", 1)[1]) == png_file.read_bytes()
    assert emulator.stats()["calls"]["sp_create_temp_file_upload_sign"] == 0


def test_create_prediction_base64_limit(hook, emulator, tmp_path):
    exact = tmp_path / "exact.png"
    exact.write_bytes(b"\x01" * BASE64_LIMIT)
    hook.create_prediction("wf-1", {"image": exact}, file_encoding_strategy="base64")
    over = tmp_path / "over.png"
    over.write_bytes(b"\x01" * (BASE64_LIMIT + 1))
    with pytest.raises(SpeedPixInputError, match=r"inputs\['image'\].*1 MiB"):
        hook.create_prediction("wf-1", {"image": over}, file_encoding_strategy="base64")
    assert emulator.stats()["calls"]["comfy_prompt"] == 1


def test_create_prediction_validates_before_any_call(hook, emulator, png_file, tmp_path):
    with pytest.raises(SpeedPixConfigError, match="alias_id"):
        hook.create_prediction("wf-1", {"image": png_file}, alias_id="a", version_id="v")
    with pytest.raises(SpeedPixConfigError, match="workflow_id"):
        hook.create_prediction(" ", {"image": png_file})
    with pytest.raises(SpeedPixInputError, match="file_encoding_strategy"):
        hook.create_prediction("wf-1", {"image": png_file}, file_encoding_strategy="inline")
    with pytest.raises(SpeedPixInputError, match=r"inputs\['image'\]"):
        hook.create_prediction("wf-1", {"image": str(tmp_path / "missing.png")})
    calls = emulator.stats()["calls"]
    assert calls["comfy_prompt"] == calls["sp_create_temp_file_upload_sign"] == 0


def test_create_prediction_missing_workflow(hook, emulator):
    with pytest.raises(SpeedPixNotFoundError, match="wf-missing") as info:
        hook.create_prediction("wf-missing", {})
    assert info.value.sub_error_code == "WORKFLOW_NOT_FOUND"
    assert emulator.stats()["calls"]["comfy_prompt"] == 1  # a definite answer is not retried
    assert emulator.stats()["predictions"] == 0


# ---------------------------------------------------------------- get_prediction
@pytest.fixture
def clocked(make_emulator, monkeypatch):
    """A private emulator on a ManualClock (time moves only with ``clocked.clock.advance``), and the
    connection pointing at it: exact values, no sleeping."""
    server = make_emulator()
    set_connection(monkeypatch, server)
    return server


def test_get_prediction_waiting(clocked):
    hook = SpeedPixHook()
    prediction = hook.create_prediction("sleep-100", {})
    current = hook.get_prediction(prediction.id)
    assert current.status == "waiting"
    assert current.progress == 0
    assert current.eta_seconds == 100
    assert current.queue_position == 0
    assert current.output is None
    assert clocked.stats()["calls"]["comfy_get_result"] == 0


def test_get_prediction_running(clocked):
    hook = SpeedPixHook()
    prediction = hook.create_prediction("sleep-10", {})  # waiting for 1 s, then running for 9 s
    clocked.clock.advance(5.5)  # half way through the running time
    current = hook.get_prediction(prediction.id)
    assert current.status == "running"
    assert (current.progress, current.percent, current.eta_seconds) == (0.5, 50, 4.5)
    assert (current.node, current.node_index, current.node_count, current.step, current.steps) == (
        "KSampler",
        3,
        5,
        11,
        20,
    )
    assert current.message == "executing KSampler (step 11/20)"
    assert current.queue_position is None
    assert current.output is None and not current.finished
    assert clocked.stats()["calls"]["comfy_get_result"] == 0


def test_get_prediction_succeeded(clocked):
    hook = SpeedPixHook()
    created_wall = clocked.clock.time()
    prediction = hook.create_prediction("wf-1", {}, return_temp_files=True)  # 1 s: 0.1 waiting, 0.9 running
    clocked.clock.advance(1)
    done = hook.get_prediction(prediction.id)
    assert done.succeeded and done.finished
    assert (done.progress, done.percent) == (1, 100)
    assert set(done.output) == {"images", "subject_image", "mask_image"}
    assert urlsplit(done.output["images"]["url"]).path.endswith(f"/{prediction.id}/output.png")
    assert done.images == [done.output["images"]["url"]]
    assert done.run_seconds == 0.9
    begin_ms = round((created_wall + 0.1) * 1000)
    assert done.started_at == datetime.fromtimestamp(begin_ms / 1000, tz=UTC)
    assert done.finished_at == datetime.fromtimestamp((begin_ms + 900) / 1000, tz=UTC)
    assert done.workflow_id == "wf-1"
    assert done.error is None
    assert clocked.stats()["calls"]["comfy_get_result"] == 1


def test_get_prediction_failed(clocked):
    hook = SpeedPixHook()
    prediction = hook.create_prediction("wf-fail", {})
    clocked.clock.advance(1)  # past the task's duration
    failed = hook.get_prediction(prediction.id)
    assert failed.finished
    assert failed.status == "failed"
    assert failed.error_code == "WORKFLOW_EXECUTION_FAILED"
    assert "KSampler" in failed.error
    assert failed.output is None


def test_get_prediction_unknown_id(hook):
    with pytest.raises(SpeedPixNotFoundError, match="no-such-task"):
        hook.get_prediction("no-such-task")


@pytest.mark.parametrize("bad", ["", "  ", None, 5])
def test_get_prediction_bad_id(hook, emulator, bad):
    with pytest.raises(SpeedPixConfigError, match="prediction_id"):
        hook.get_prediction(bad)
    assert emulator.stats()["calls"]["comfy_get_progress"] == 0


def test_aget_prediction_matches_sync(hook, emulator):
    prediction = hook.create_prediction("sleep-0", {}, return_temp_files=True)
    sync = hook.get_prediction(prediction.id)
    result = asyncio.run(SpeedPixHook().aget_prediction(prediction.id))
    assert result.invoke_id and result.invoke_id != sync.invoke_id  # a real second call
    sync.invoke_id = result.invoke_id = None
    assert result == sync
    assert emulator.stats()["calls"]["comfy_get_result"] == 2


def test_aget_prediction_running_and_failed(clocked):
    hook = SpeedPixHook()
    running = hook.create_prediction("sleep-100", {})
    assert asyncio.run(SpeedPixHook().aget_prediction(running.id)).status == "waiting"
    failing = hook.create_prediction("wf-fail", {})
    clocked.clock.advance(1)  # past wf-fail's duration
    failed = asyncio.run(SpeedPixHook().aget_prediction(failing.id))
    assert (failed.status, failed.error_code) == ("failed", "WORKFLOW_EXECUTION_FAILED")


def test_aget_prediction_wrong_secret(emulator, monkeypatch):
    set_connection(monkeypatch, emulator, password="nope")
    with pytest.raises(SpeedPixAuthError, match="I400SG"):
        asyncio.run(SpeedPixHook().aget_prediction("x"))


# ---------------------------------------------------------------- wait_for_prediction / run
def test_wait_for_prediction_success(clocked):
    hook = SpeedPixHook()
    prediction = hook.create_prediction("wf-1", {})  # 1 s of emulator time
    seen = []

    def on_update(update):
        seen.append(update)
        clocked.clock.advance(0.5)  # time moves only between polls: the first poll sees the task waiting

    started = time.monotonic()
    done = hook.wait_for_prediction(prediction.id, poll_interval=0.05, timeout=10, on_update=on_update)
    assert time.monotonic() - started < 5
    assert done.succeeded
    assert without_signatures(done.output) == {
        "images": {"url": f"{clocked.url}/_emulator/files/outputs/{prediction.id}/output.png"}
    }
    assert "Signature=" in done.output["images"]["url"]  # the hook hands signed URLs to its caller
    assert seen[-1] is done
    assert [p.status for p in seen[:-1]] and all(not p.finished for p in seen[:-1])
    assert seen[0].status == "waiting"
    assert clocked.stats()["calls"]["comfy_get_result"] == 1


def test_wait_for_prediction_failure(hook):
    prediction = hook.create_prediction("wf-fail", {})
    with pytest.raises(SpeedPixPredictionFailed) as info:
        hook.wait_for_prediction(prediction.id, poll_interval=0.05, timeout=10)
    err = info.value
    assert err.prediction_id == prediction.id
    assert err.error_code == "WORKFLOW_EXECUTION_FAILED"
    assert "KSampler" in err.error_message
    assert prediction.id in str(err) and "WORKFLOW_EXECUTION_FAILED" in str(err) and "KSampler" in str(err)


def test_wait_for_prediction_timeout(hook, emulator, monkeypatch):
    """Real polls, the wait's clock faked: it sleeps exactly up to the deadline, then raises."""
    prediction = hook.create_prediction("sleep-100", {})
    clock = FakeClock().install(monkeypatch, hook_module)
    with pytest.raises(SpeedPixTimeoutError) as info:
        hook.wait_for_prediction(prediction.id, poll_interval=0.05, timeout=0.3)
    assert sum(clock.sleeps) == pytest.approx(0.3)  # neither early nor past the deadline
    assert emulator.calls("comfy_get_progress") == len(clock.sleeps) + 1
    assert info.value.prediction_id == prediction.id
    assert info.value.last_status in ("waiting", "running")
    assert prediction.id in str(info.value) and "0.3s" in str(info.value)


@pytest.mark.parametrize(
    "kwargs", [{"poll_interval": 0}, {"poll_interval": -1}, {"timeout": 0}, {"timeout": True}]
)
def test_wait_for_prediction_bad_arguments(hook, kwargs):
    with pytest.raises(SpeedPixConfigError):
        hook.wait_for_prediction("x", **kwargs)


def test_run_returns_output(hook, emulator, png_file):
    output = hook.run("wf-1", {"text": "白", "image": str(png_file)}, poll_interval=0.05, timeout=10)
    assert set(output) == {"images"}
    assert fetch(hook, output["images"]["url"]).startswith(PNG_MAGIC)
    stats = emulator.stats()["calls"]
    assert stats["comfy_prompt"] == 1
    assert stats["upload_put"] == 1


def test_run_without_wait(hook, emulator):
    prediction = hook.run("sleep-100", {}, wait=False, timeout=1)
    assert isinstance(prediction, Prediction)
    assert prediction.status == "waiting"
    assert emulator.stats()["calls"]["comfy_get_progress"] == 0


def test_run_failure_and_timeout(hook):
    with pytest.raises(SpeedPixPredictionFailed):
        hook.run("wf-fail", {}, poll_interval=0.05, timeout=10)
    with pytest.raises(SpeedPixTimeoutError):
        hook.run("sleep-100", {}, poll_interval=0.05, timeout=0.2)


# ---------------------------------------------------------------- download
@pytest.fixture
def output_url(hook):
    prediction = hook.create_prediction("sleep-0", {})
    return hook.get_prediction(prediction.id).output["images"]["url"]


def test_download_to_file_path(hook, emulator, output_url, tmp_path):
    target = tmp_path / "nested" / "dir" / "result.png"
    written = hook.download(output_url, str(target))
    assert Path(written) == target
    assert target.read_bytes().startswith(PNG_MAGIC)
    assert not list(target.parent.glob("*.part"))
    assert emulator.stats()["calls"]["file_get"] == 1


def test_download_to_directory(hook, output_url, tmp_path):
    written = hook.download(output_url, tmp_path)
    assert written == tmp_path / "output.png"
    assert written.read_bytes().startswith(PNG_MAGIC)
    # a not-yet-existing directory given with a trailing slash
    written = hook.download(output_url, f"{tmp_path}/new/")
    assert written == tmp_path / "new" / "output.png"
    assert written.is_file()


def test_download_to_object_storage_path(hook, output_url, tmp_path):
    from airflow.sdk import ObjectStoragePath

    target = ObjectStoragePath(f"file://{tmp_path}/osp.png")
    written = hook.download(output_url, target)
    assert (tmp_path / "osp.png").read_bytes().startswith(PNG_MAGIC)
    assert str(written) == str(target)
    into_dir = hook.download(output_url, ObjectStoragePath(f"file://{tmp_path}/"))
    assert into_dir.name == "output.png"
    assert (tmp_path / "output.png").read_bytes().startswith(PNG_MAGIC)


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "ftp://host/x.png", "/local/path.png", "javascript:alert(1)", ""]
)
def test_download_rejects_non_http(hook, emulator, tmp_path, url):
    with pytest.raises(SpeedPixDownloadError, match="only http"):
        hook.download(url, tmp_path)
    assert not list(tmp_path.iterdir())
    assert emulator.stats()["calls"]["file_get"] == 0


def test_download_missing_file_is_not_retried(hook, emulator, tmp_path):
    with pytest.raises(SpeedPixDownloadError, match="HTTP 404") as info:
        hook.download(
            f"{emulator.url}/_emulator/files/outputs/nope/output.png?token=SECRETQ", tmp_path / "x.png"
        )
    assert "SECRETQ" not in str(info.value)
    assert emulator.stats()["calls"]["file_get"] == 1
    assert not (tmp_path / "x.png").exists()


def test_download_retries_5xx(hook, emulator, output_url, tmp_path):
    emulator.inject("file_get", "503", times=2)
    written = hook.download(output_url, tmp_path)
    assert written.read_bytes().startswith(PNG_MAGIC)
    assert emulator.stats()["calls"]["file_get"] == 3


@pytest.mark.parametrize(
    "name",
    ["..%2F..%2Fevil.png", "..%5C..%5Cevil.png", "%2E%2E%2Fevil.png", "%2E%2E", "%2F", "evil.png%00"],
)
def test_download_url_file_name_stays_inside_directory(hook, requests_mock, tmp_path, name):
    inside = tmp_path / "out"
    inside.mkdir()
    url = f"https://cdn.example.com/files/{name}?Signature=abc"
    requests_mock.get(url, content=PNG_MAGIC)
    written = Path(hook.download(url, inside))
    assert written.parent == inside
    assert written.read_bytes() == PNG_MAGIC
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == [written.name]
    assert not written.name.startswith(".")


# ---------------------------------------------------------------- secrets never leak
def test_secret_never_in_errors_or_logs(emulator, monkeypatch, caplog, capfd, png_file, tmp_path):
    caplog.set_level(logging.INFO)
    set_connection(monkeypatch, emulator, extra={"retry_limit": 2})
    hook = SpeedPixHook()
    secret = emulator.app_secret
    messages: list[str] = []

    def expect_error(fn, *args, **kwargs):
        with pytest.raises(SpeedPixError) as info:
            fn(*args, **kwargs)
        messages.append(str(info.value))
        messages.append(repr(info.value))

    hook.run("wf-1", {"image": png_file}, poll_interval=0.05, timeout=10)
    expect_error(hook.create_prediction, "wf-missing", {})
    expect_error(
        hook.wait_for_prediction, hook.create_prediction("wf-fail", {}).id, poll_interval=0.05, timeout=10
    )
    expect_error(hook.get_prediction, "missing-task")
    emulator.inject("comfy_get_progress", "500", times=2)
    expect_error(hook.get_prediction, "x")
    emulator.inject("comfy_get_progress", "html", times=2)
    expect_error(hook.get_prediction, "x")
    emulator.inject("comfy_prompt", "malformed")
    expect_error(hook.create_prediction, "wf-1", {})
    expect_error(hook.download, "file:///etc/passwd", tmp_path)
    messages.append(repr(hook.settings))
    messages.append(str(hook.test_connection()))

    # a wrong secret that extends the real one must not leak either
    set_connection(monkeypatch, emulator, password=secret + "-WRONG")
    wrong = SpeedPixHook()
    expect_error(wrong.create_prediction, "wf-1", {})
    expect_error(lambda: asyncio.run(wrong.aget_prediction("x")))
    messages.append(str(wrong.test_connection()))

    logs = caplog.text + "".join(capfd.readouterr())
    assert "Created SpeedPix prediction" in logs  # the hook's own log lines were captured
    for text in [*messages, logs]:
        assert secret not in text
        assert "Signature=" not in text  # pre-signed upload URLs are credentials too
    assert len(messages) >= 12


def test_upload_url_query_redacted_from_urllib3_debug_log(hook, png_file, caplog):
    """Even at DEBUG, urllib3's request lines must not carry the pre-signed URL's credentials."""
    import logging

    with caplog.at_level(logging.DEBUG, logger="urllib3.connectionpool"):
        hook.upload_file(png_file)
    lines = [r.getMessage() for r in caplog.records if r.name == "urllib3.connectionpool"]
    put_lines = [line for line in lines if '"PUT ' in line]
    assert put_lines, lines  # the PUT was logged at all, so the check below means something
    assert not [line for line in lines if "Signature=" in line or "Expires=" in line]
    assert all("?<redacted>" in line for line in put_lines)


def test_stream_broken_mid_body_leaves_no_partial_file_and_is_retryable(tmp_path):
    """A dropped connection mid-download is re-raised as the transport error (so download retries it),
    not reported as an unwritable destination, and no half-written file stays behind."""
    import requests

    from airflow_provider_speedpix._storage import write_stream as _write_stream

    def chunks():
        yield b"partial"
        raise requests.exceptions.ChunkedEncodingError("connection broken mid-body")

    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        _write_stream(chunks(), tmp_path / "out.png")
    assert list(tmp_path.iterdir()) == []
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SpeedPixDownloadError, match="Choose a writable output_dir"):
        _write_stream(iter([b"data"]), blocker / "out.png")
