"""No credential ever lands anywhere Airflow keeps things (issue 5, section 3).

A distinctive app_secret (and a distinctive wrong one) drive real ``dag.test()`` runs against a private
emulator: the deferrable white-background example (upload, trigger, download), a non-deferrable run, a
failing workflow, a gateway authentication failure, fire-and-forget + sensor and a broken upload. Every
signature the signer produces and every pre-signed upload URL the API hands out is recorded while it
happens; then the captured task/trigger output, the log files, every row of the metadata database
(XComs, rendered template fields, trigger kwargs, task instances...), the raw files under AIRFLOW_HOME,
the exception chains and the emulator's own log are searched for all of them, and for the query strings
of the pre-signed output URLs the emulator hands out (``?Expires=..&Signature=..``, as OSS signs them). Each scanner is shown to
find a planted needle, so a clean result means something.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import traceback
import urllib.parse
import uuid
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from airflow_provider_speedpix import _protocol, _signing
from airflow_provider_speedpix.emulator import app as emulator_app
from airflow_provider_speedpix.emulator.app import EmulatorConfig
from airflow_provider_speedpix.emulator.backend import Backend
from airflow_provider_speedpix.emulator.server import EmulatorServer
from airflow_provider_speedpix.exceptions import (
    SpeedPixAuthError,
    SpeedPixDownloadError,
    SpeedPixUploadError,
)
from airflow_provider_speedpix.hooks.speedpix import SpeedPixHook
from tests._scripted_http import full_backlog_port
from tests.conftest import ROOT, use_speedpix_connection
from tests.test_example_dags import load
from tests.test_operator import HEADER, one_run_task, ti_of, xcom

APP_KEY = "leak-test-key"
SECRET = "SeCrEt-" + uuid.uuid4().hex
WRONG_SECRET = "SeCrEt-WRONG-" + uuid.uuid4().hex
EXTRA = {"retry_delay": 0.01, "retry_max_delay": 0.05, "retry_limit": 2, "timeout": 5}
EMULATOR_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "airflow_provider_speedpix")
AIRFLOW_HOME = Path(os.environ["AIRFLOW_HOME"])
PRODUCT = ROOT / "dags_examples" / "data" / "product.png"


# ---------------------------------------------------------------------- the emulator and its log
class LogCollector(logging.Handler):
    """Keeps every record the emulator's loggers emit, as the emulator's log would show it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = record.getMessage()
        except Exception:  # a broken record still counts: keep what we have
            line = f"{record.msg} {record.args}"
        if record.exc_info and record.exc_info[1] is not None:
            line += "\n" + "".join(traceback.format_exception(*record.exc_info))
        self.lines.append(line)


@pytest.fixture(scope="module")
def leak_emulator(emulator_server) -> Iterator[EmulatorServer]:
    """A private emulator whose app_secret is :data:`SECRET`, with its access log on and collected.

    ``emulator_server`` first: starting a uvicorn server reconfigures the uvicorn loggers, so the shared
    one must not start after our handler is attached.
    """
    config = EmulatorConfig(app_key=APP_KEY, app_secret=SECRET, duration=0.5)
    with EmulatorServer(config, access_log=True) as server:
        server.log = LogCollector()  # type: ignore[attr-defined]
        yield server


@pytest.fixture
def emulator_log(leak_emulator) -> Iterator[LogCollector]:
    """The emulator's log lines of this test (handler (re)attached, access log at INFO)."""
    collector: LogCollector = leak_emulator.log
    collector.lines.clear()
    saved = []
    for name in EMULATOR_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level, logger.disabled))
        logger.disabled = False
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)
        if collector not in logger.handlers:
            logger.addHandler(collector)
    yield collector
    for logger, level, disabled in saved:
        logger.removeHandler(collector)
        logger.setLevel(level)
        logger.disabled = disabled


def set_connection(monkeypatch, server: EmulatorServer, password: str = SECRET) -> None:
    use_speedpix_connection(monkeypatch, host=server.url, login=APP_KEY, password=password, extra=EXTRA)


@pytest.fixture
def leak_conn(speedpix_conn, leak_emulator, emulator_log, monkeypatch) -> EmulatorServer:
    """``speedpix_default`` -> the private emulator (set after ``speedpix_conn``, so it wins)."""
    leak_emulator.reset()
    set_connection(monkeypatch, leak_emulator)
    return leak_emulator


# ---------------------------------------------------------------------- recording what must not leak
@dataclass
class Recorder:
    signatures: list[str] = field(default_factory=list)
    upload_urls: list[str] = field(default_factory=list)
    #: pre-signed output URLs the emulator handed out (``?Expires=..&Signature=..``, like OSS's)
    output_urls: list[str] = field(default_factory=list)

    def tokens(self, urls: list[str] | None = None) -> list[str]:
        return [
            value
            for url in (self.upload_urls if urls is None else urls)
            for key, value in urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query)
            if key.lower() == "signature"
        ]

    def needles(self, *extra: str) -> dict[str, str]:
        found = {"app_secret": SECRET, "wrong app_secret": WRONG_SECRET}
        found.update({f"needle {i}": value for i, value in enumerate(extra)})
        found.update({f"x-ca-signature #{i}": sig for i, sig in enumerate(self.signatures)})
        for i, url in enumerate(self.upload_urls):
            found[f"upload URL query #{i}"] = urllib.parse.urlsplit(url).query
        found.update({f"upload Signature= token #{i}": token for i, token in enumerate(self.tokens())})
        for i, url in enumerate(dict.fromkeys(self.output_urls)):
            found[f"output URL query #{i}"] = urllib.parse.urlsplit(url).query
        for i, token in enumerate(dict.fromkeys(self.tokens(self.output_urls))):
            found[f"output Signature= token #{i}"] = token
        # the same values URL-encoded (a signature has '+', '/' and '=')
        for name, value in list(found.items()):
            quoted = urllib.parse.quote(value, safe="")
            if quoted != value:
                found[f"{name} (url-encoded)"] = quoted
        return {name: value for name, value in found.items() if value}


@pytest.fixture
def recorder(monkeypatch) -> Recorder:
    """Learn every signature computed (client and emulator side) and every pre-signed upload URL."""
    rec = Recorder()
    real_signature = _signing.compute_signature
    real_parse = _protocol.parse_upload_sign

    def compute_signature(app_secret: str, to_sign: str) -> str:
        signature = real_signature(app_secret, to_sign)
        rec.signatures.append(signature)
        return signature

    def parse_upload_sign(envelope):
        upload_url, fields = real_parse(envelope)
        rec.upload_urls.append(upload_url)
        return upload_url, fields

    monkeypatch.setattr(_signing, "compute_signature", compute_signature)
    monkeypatch.setattr(emulator_app, "compute_signature", compute_signature)
    monkeypatch.setattr(_protocol, "parse_upload_sign", parse_upload_sign)

    real_output_url = Backend.output_url

    def output_url(self, task_id: str, variant: str = "output") -> str:
        url = real_output_url(self, task_id, variant)
        rec.output_urls.append(url)
        return url

    monkeypatch.setattr(Backend, "output_url", output_url)
    return rec


# ---------------------------------------------------------------------- scanners
def scan_text(needles: dict[str, str], text: str, where: str) -> list[str]:
    return [f"{name} found in {where}" for name, value in needles.items() if value in text]


def _cell_texts(cell) -> Iterator[str]:
    if cell is None:
        return
    if isinstance(cell, bytes | bytearray | memoryview):
        raw = bytes(cell)
        yield raw.decode("utf-8", "replace")
        with contextlib.suppress(zlib.error):  # serialized DAGs and similar blobs are zlib-compressed
            yield zlib.decompress(raw).decode("utf-8", "replace")
    else:
        yield str(cell)


def scan_database(needles: dict[str, str], engine) -> list[str]:
    """Every cell of every table of the database behind ``engine``."""
    import sqlalchemy as sa

    hits = []
    with engine.connect() as connection:
        for table in sa.inspect(connection).get_table_names():
            for row in connection.execute(sa.text(f'SELECT * FROM "{table}"')):
                for column, cell in row._mapping.items():
                    for text in _cell_texts(cell):
                        hits += scan_text(needles, text, f"table {table}.{column}")
    return sorted(set(hits))


def scan_files(needles: dict[str, str], root: Path) -> list[str]:
    """The raw bytes of every file under ``root`` (the SQLite file and its journal included)."""
    hits = []
    encoded = {name: value.encode("utf-8") for name, value in needles.items()}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        hits += [f"{name} found in file {path}" for name, value in encoded.items() if value in data]
    return hits


def exception_chain(err: BaseException) -> list[BaseException]:
    """``err`` and everything it chains to (``__cause__`` and ``__context__``, suppressed or not)."""
    seen: list[BaseException] = []
    todo = [err]
    while todo:
        current = todo.pop()
        if current is None or any(current is s for s in seen):
            continue
        seen.append(current)
        todo += [current.__cause__, current.__context__]
    return seen


def scan_exception(needles: dict[str, str], err: BaseException) -> list[str]:
    hits = []
    for i, exc in enumerate(exception_chain(err)):
        texts = [str(exc), repr(exc), repr(exc.args), repr(vars(exc))]
        texts.append("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        for text in texts:
            hits += scan_text(needles, text, f"exception #{i} {type(exc).__name__}")
    return sorted(set(hits))


def _engine():
    from airflow.utils.session import create_session

    with create_session() as session:
        return session.get_bind()


def run_rows(dag_run) -> dict[str, list]:
    """The rows Airflow keeps for one run (and all trigger rows), to check each place is not empty."""
    from airflow.models.renderedtifields import RenderedTaskInstanceFields
    from airflow.models.trigger import Trigger
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        where = {"dag_id": dag_run.dag_id, "run_id": dag_run.run_id}
        xcoms = session.query(XComModel).filter_by(**where).all()
        rendered = session.query(RenderedTaskInstanceFields).filter_by(**where).all()
        triggers = session.query(Trigger).all()
        return {
            "xcom": [(x.key, x.value, XComModel.deserialize_value(x)) for x in xcoms],
            "rendered": [(r.task_id, r.rendered_fields, r.k8s_pod_yaml) for r in rendered],
            "trigger_raw": [t.encrypted_kwargs for t in triggers],
            "trigger_kwargs": [t.kwargs for t in triggers],
            "task_instances": [
                (ti.task_id, ti.state, ti.next_method, ti.next_kwargs, ti.rendered_map_index)
                for ti in dag_run.get_task_instances(session=session)
            ],
        }


def assert_nothing_kept(
    needles: dict[str, str], *, output: str, dag_run=None, emulator_log: Iterable[str] = ()
) -> None:
    """Zero occurrences in the run's output, its DB rows, every DB cell, AIRFLOW_HOME and the emulator log."""
    hits = scan_text(needles, output, "captured task/trigger output")
    hits += scan_text(needles, "\n".join(emulator_log), "the emulator's log")
    if dag_run is not None:
        for place, rows in run_rows(dag_run).items():
            hits += scan_text(needles, json.dumps(rows, default=repr), f"{place} rows")
    hits += scan_database(needles, _engine())
    hits += scan_files(needles, AIRFLOW_HOME)
    assert hits == [], "\n".join(hits)


# ---------------------------------------------------------------------- the scanners can fail
def test_scanners_find_planted_needles(tmp_path, emulator_log, recorder):
    import sqlalchemy as sa

    planted = "SeCrEt-PLANTED-" + uuid.uuid4().hex
    recorder.signatures.append("planted/Signature+value=")
    recorder.upload_urls.append("http://h/_emulator/upload/k?Expires=1&Signature=PlantedToken123")
    recorder.output_urls.append("http://h/_emulator/files/outputs/t/output.png?Expires=2&Signature=OutTok456")
    needles = recorder.needles(planted)

    assert scan_text(needles, f"log line {planted} end", "x") == ["needle 0 found in x"]
    assert scan_text(needles, "a=planted%2FSignature%2Bvalue%3D", "x")  # the url-encoded form
    assert scan_text(needles, "PUT /k?Expires=1&Signature=PlantedToken123", "x")
    assert scan_text(needles, '{"url": "http://h/o.png?Expires=2&Signature=OutTok456"}', "x") == [
        "output URL query #0 found in x",
        "output Signature= token #0 found in x",
    ]
    assert scan_text(needles, "saved http://h/_emulator/files/outputs/t/output.png", "x") == []

    engine = sa.create_engine("sqlite://")
    with engine.begin() as connection:
        connection.execute(sa.text("CREATE TABLE t (a TEXT, b BLOB)"))
        connection.execute(
            sa.text("INSERT INTO t VALUES (:a, :b)"),
            {"a": "nothing", "b": zlib.compress(json.dumps({"k": planted}).encode())},
        )
    assert scan_database(needles, engine) == ["needle 0 found in table t.b"]

    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.log").write_bytes(b"\x00binary " + planted.encode() + b" \xff")
    assert [h.split(" found")[0] for h in scan_files(needles, tmp_path)] == ["needle 0"]

    try:
        try:
            raise ConnectionError(f"PUT http://h/k?Signature=PlantedToken123 {planted}")
        except ConnectionError:
            raise SpeedPixUploadError("Uploading: connection broken") from None
    except SpeedPixUploadError as err:
        assert scan_exception(needles, err)  # found in the suppressed __context__

    logging.getLogger("uvicorn.error").warning("planted %s", planted)
    assert scan_text(needles, "\n".join(emulator_log.lines), "log") == ["needle 0 found in log"]


def test_run_rows_sees_each_place(leak_conn, recorder, run_dag, capfd):
    """The per-run places are really populated (so a clean scan of them means something)."""
    dr = run_dag(
        HEADER
        + """
SpeedPixRunOperator(task_id="run", dag=dag, workflow_id="wf-white", inputs={"text": "{{ run_id }}"},
    deferrable=True, poll_interval=0.2, timeout=60)
"""
    )
    assert dr.state == "success"
    rows = run_rows(dr)
    prediction_id = xcom(dr, "run", "prediction_id")
    assert {key for key, _, _ in rows["xcom"]} == {
        "prediction_id",
        "return_value",
        "speedpix_outputs_link",
        "speedpix_console_link",
    }
    assert any(dr.run_id in json.dumps(r[1]) for r in rows["rendered"])
    assert any(kw.get("prediction_id") == prediction_id for kw in rows["trigger_kwargs"])
    assert "Created SpeedPix prediction" in capfd.readouterr().out
    assert recorder.signatures  # signing happened and was recorded


# ---------------------------------------------------------------------- DAG runs
def test_white_background_example_deferrable(
    leak_conn, recorder, example_dags_folder, tmp_path, monkeypatch, capfd
):
    monkeypatch.setenv("SPEEDPIX_OUTPUT_DIR", str(tmp_path / "output"))
    dr = load(example_dags_folder, "speedpix_white_background").test()
    out, err = capfd.readouterr()
    output = out + err
    assert dr.state == "success", output[-3000:]
    assert list((tmp_path / "output").rglob("images.png"))
    assert recorder.signatures and recorder.tokens()  # signed calls and one upload happened
    assert leak_conn.stats()["uploads"] == 1
    assert "Signature=REDACTED" in "\n".join(leak_conn.log.lines)  # the PUT is in the access log
    assert "Uploaded" in output and "Deferring" in output
    assert_run_kept_nothing(recorder, leak_conn, output, dr)


def _output(capfd) -> str:
    out, err = capfd.readouterr()
    return out + err


def run_task(run_dag, capfd, workflow_id: str, inputs: dict, *, deferrable: bool):
    """``dag.test()`` one SpeedPixRunOperator task (polling every 0.1 s, timeout 60 s): the run and its output."""
    arguments = {"inputs": inputs, "deferrable": deferrable, "poll_interval": 0.1, "timeout": 60}
    dr = run_dag(one_run_task(workflow_id=workflow_id, **arguments))
    return dr, _output(capfd)


def assert_run_kept_nothing(recorder, server, output: str, dag_run) -> None:
    """No recorded secret, signature or URL token in the output, the run's rows or ``server``'s log."""
    assert_nothing_kept(recorder.needles(), output=output, dag_run=dag_run, emulator_log=server.log.lines)


def test_non_deferrable_run_with_uploads(leak_conn, recorder, run_dag, tmp_path, capfd):
    image = PRODUCT  # the examples' input image
    mask = tmp_path / "mask.png"
    mask.write_bytes(image.read_bytes() + b"mask")
    dr = run_dag(
        HEADER
        + f"""
from pathlib import Path
SpeedPixRunOperator(task_id="run", dag=dag, workflow_id="wf-white", deferrable=False,
    inputs={{"text": "白色背景", "image": {str(image)!r}, "refs": [{{"mask": Path({str(mask)!r})}}]}},
    return_temp_files=True, poll_interval=0.1, timeout=60, output_dir={str(tmp_path / "out")!r})
"""
    )
    output = _output(capfd)
    assert dr.state == "success", output[-3000:]
    assert len(recorder.tokens()) == 2 and leak_conn.stats()["uploads"] == 2
    assert len(xcom(dr, "run")["files"]) == 3
    assert "Waiting for prediction" in output
    assert_run_kept_nothing(recorder, leak_conn, output, dr)


@pytest.mark.parametrize("deferrable", [True, False])
def test_failing_workflow(leak_conn, recorder, run_dag, capfd, deferrable):
    dr, output = run_task(run_dag, capfd, "wf-fail", {"text": "x"}, deferrable=deferrable)
    assert dr.state == "failed"
    assert "WORKFLOW_EXECUTION_FAILED" in output  # the failure (and its traceback) is in what we scan
    assert recorder.signatures
    assert_run_kept_nothing(recorder, leak_conn, output, dr)


def test_gateway_rejects_wrong_secret(leak_conn, recorder, run_dag, capfd, monkeypatch):
    set_connection(monkeypatch, leak_conn, password=WRONG_SECRET)
    dr, output = run_task(run_dag, capfd, "wf-white", {"image": str(PRODUCT)}, deferrable=True)
    assert dr.state == "failed" and ti_of(dr, "run").state == "failed"
    assert "SpeedPixAuthError" in output and "I400SG" in output
    assert leak_conn.stats()["rejected"] == {"I400SG": 1}
    # the client's signature (wrong secret) and the one the gateway expected (right secret) were recorded
    assert len(recorder.signatures) >= 2
    assert_run_kept_nothing(recorder, leak_conn, output, dr)


def test_fire_and_forget_then_sensor_example(leak_conn, recorder, example_dags_folder, capfd):
    dr = load(example_dags_folder, "speedpix_fire_and_forget").test()
    output = _output(capfd)
    assert dr.state == "success", output[-3000:]
    assert xcom(dr, "report").startswith(leak_conn.url)
    assert recorder.tokens() and recorder.signatures
    assert_run_kept_nothing(recorder, leak_conn, output, dr)


def test_broken_upload_fails_without_the_presigned_url(leak_conn, recorder, run_dag, capfd):
    """requests' own error for the failed PUT names the full URL (query included); ours must not."""
    leak_conn.inject("upload_put", "reset", times=10)
    dr, output = run_task(run_dag, capfd, "wf-white", {"image": str(PRODUCT)}, deferrable=False)
    assert dr.state == "failed"
    assert "SpeedPixUploadError" in output and "Uploading 'product.png'" in output
    assert recorder.tokens()
    assert leak_conn.stats()["predictions"] == 0
    assert_run_kept_nothing(recorder, leak_conn, output, dr)


# ---------------------------------------------------------------------- exception texts
def _hook(monkeypatch, server, password=SECRET) -> SpeedPixHook:
    set_connection(monkeypatch, server, password=password)
    return SpeedPixHook()


def test_exceptions_of_a_wrong_secret(leak_conn, recorder, monkeypatch):
    import asyncio

    hook = _hook(monkeypatch, leak_conn, WRONG_SECRET)
    image = PRODUCT  # the examples' input image
    errors = []
    calls = {
        "create": lambda: hook.create_prediction("wf-white", {"text": "x"}),
        "get": lambda: hook.get_prediction("p-1"),
        "aget": lambda: asyncio.run(hook.aget_prediction("p-1")),
        "upload": lambda: hook.upload_file(image),
        "run": lambda: hook.run("wf-white", {"image": str(image)}),
    }
    for name, call in calls.items():
        with pytest.raises(SpeedPixAuthError) as info:
            call()
        assert "I400SG" in str(info.value), name
        errors.append(info.value)
    ok, message = hook.test_connection()
    assert ok is False and "I400SG" in message
    needles = recorder.needles()
    assert len(recorder.signatures) >= 2 * len(calls)  # client's and gateway's, per call
    hits = [hit for err in errors for hit in scan_exception(needles, err)]
    hits += scan_text(needles, message, "test_connection message")
    assert hits == []


def test_exceptions_of_a_broken_upload(leak_conn, recorder, monkeypatch):
    hook = _hook(monkeypatch, leak_conn)
    leak_conn.inject("upload_put", "reset", times=10)
    with pytest.raises(SpeedPixUploadError) as broken:
        hook.upload_file(io.BytesIO(b"\x89PNG data"), filename="a.png")
    leak_conn.configure(upload_url_ttl_s=0)  # every pre-signed URL is already expired at the PUT
    with pytest.raises(SpeedPixUploadError, match="AccessDenied") as expired:
        hook.upload_file(io.BytesIO(b"\x89PNG data"), filename="b.png")
    assert len(recorder.tokens()) >= 3  # one for the reset, two (signed again) for the expired URL
    needles = recorder.needles()
    assert scan_exception(needles, broken.value) + scan_exception(needles, expired.value) == []


def test_exceptions_of_a_failed_download(leak_conn, monkeypatch, tmp_path):
    """Output URLs of real storage are pre-signed too: their query string stays out of errors."""
    hook = _hook(monkeypatch, leak_conn)
    token = "DownloadToken" + uuid.uuid4().hex
    needles = {"download Signature= token": token}
    for url in (
        f"{leak_conn.url}/_emulator/files/outputs/nope/output.png?Expires=1&Signature={token}",
        f"http://127.0.0.1:1/output.png?Expires=1&Signature={token}",  # connection refused
    ):
        with pytest.raises(SpeedPixDownloadError) as info:
            hook.download(url, tmp_path / "out.png")
        assert scan_exception(needles, info.value) == []


def test_errors_logs_and_events_of_the_async_transport(leak_conn, recorder, monkeypatch, caplog, capfd):
    """aiohttp's exceptions carry the full URL (``ConnectionTimeoutError``'s message) and the signed
    headers (``request_info``): none of it, nor the library's exception itself, may reach an error, a log
    line or a trigger's event. Resets and read timeouts (emulator), a connect timeout, a refused port."""
    import asyncio
    import socket

    from airflow_provider_speedpix.exceptions import SpeedPixError, SpeedPixTransportError
    from airflow_provider_speedpix.triggers.speedpix import SpeedPixPredictionTrigger

    caplog.set_level(logging.DEBUG)
    extra = {**EXTRA, "timeout": 0.3}
    prediction = _hook(monkeypatch, leak_conn).create_prediction("sleep-100", {})
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        refused = f"http://127.0.0.1:{probe.getsockname()[1]}"
    errors: list[BaseException] = []
    events: list[dict] = []
    urls = [leak_conn.url, refused]

    def poll(url: str) -> None:
        use_speedpix_connection(monkeypatch, host=url, login=APP_KEY, password=SECRET, extra=extra)
        with pytest.raises(SpeedPixTransportError) as info:
            asyncio.run(SpeedPixHook().aget_prediction(prediction.id))
        errors.append(info.value)
        trigger = SpeedPixPredictionTrigger(prediction.id, poll_interval=0.1, max_consecutive_errors=1)

        async def drain() -> list[dict]:
            return [event.payload async for event in trigger.run()]

        events.extend(asyncio.run(asyncio.wait_for(drain(), timeout=30)))

    leak_conn.inject("comfy_get_progress", "reset", times=4)
    poll(leak_conn.url)
    # held back far past the 0.3 s timeout (only a client stalled 1.7 s could still see it arrive); much
    # longer would hold up this module's emulator shutdown, which waits for the answers still sleeping
    leak_conn.inject("comfy_get_progress", "slow", times=4, delay=2.0)
    poll(leak_conn.url)
    poll(refused)
    with full_backlog_port() as port:
        urls.append(f"http://127.0.0.1:{port}")
        poll(urls[-1])
    assert [e["status"] for e in events] == ["error"] * 4
    assert {e.reached_server for e in errors} == {True, False}
    assert all(isinstance(e, SpeedPixError) for err in errors for e in exception_chain(err))
    needles = recorder.needles(*(f"{url}/scc/comfy_get_progress" for url in urls))
    assert len(recorder.signatures) >= 8
    hits = [hit for err in errors for hit in scan_exception(needles, err)]
    hits += scan_text(needles, json.dumps(events), "trigger events")
    logged = capfd.readouterr()
    text = logged.out + logged.err + caplog.text
    assert "attempt 1/2 failed" in text  # the retry warnings are in there
    hits += scan_text(needles, text, "logs and output")
    assert hits == []


# ---------------------------------------------------------------------- masking
def test_env_fallback_secret_is_masked(monkeypatch):
    from airflow.providers.common.compat.sdk import redact

    secret = "SeCrEt-ENV-" + uuid.uuid4().hex
    conn_id = "speedpix_env_only_" + uuid.uuid4().hex[:8]
    monkeypatch.delenv(f"AIRFLOW_CONN_{conn_id.upper()}", raising=False)
    monkeypatch.setenv("SPEEDPIX_APP_KEY", "env-key")
    monkeypatch.setenv("SPEEDPIX_APP_SECRET", secret)
    monkeypatch.setenv("SPEEDPIX_ENDPOINT", "http://127.0.0.1:1")
    assert redact(f"x {secret} y") == f"x {secret} y"  # not masked yet: the check below can fail

    hook = SpeedPixHook(speedpix_conn_id=conn_id)
    settings = hook.settings
    assert settings.app_secret == secret  # it really came from the environment
    assert redact(f"x {secret} y") == "x *** y"
    assert secret not in repr(settings) and secret not in str(settings)
    assert "***" in repr(settings)


def test_env_fallback_secret_is_masked_on_the_async_path(monkeypatch):
    import asyncio

    from airflow.providers.common.compat.sdk import redact

    secret = "SeCrEt-AENV-" + uuid.uuid4().hex
    monkeypatch.setenv("SPEEDPIX_APP_KEY", "env-key")
    monkeypatch.setenv("SPEEDPIX_APP_SECRET", secret)
    assert redact(secret) == secret
    settings = asyncio.run(SpeedPixHook(speedpix_conn_id="speedpix_env_only_async").asettings())
    assert settings.app_secret == secret
    assert redact(secret) == "***"
    assert secret not in repr(settings)


def test_connection_secret_is_registered_with_the_masker_in_tasks(leak_conn, run_dag, capfd):
    """Inside a task, Airflow's masker knows the connection's password (the worker redacts task logs).

    ``dag.test()`` prints task logs without that redaction (no supervisor in between), which makes the
    output scans in this module stricter than a deployment: a logged secret would show up there.
    """
    dr = run_dag(
        """
import pendulum
from airflow.sdk import DAG, task
from airflow.providers.common.compat.sdk import redact
from airflow_provider_speedpix.hooks.speedpix import SpeedPixHook
with DAG("DAG_ID", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")) as dag:
    @task
    def show():
        settings = SpeedPixHook().settings
        return [len(settings.app_secret), redact("secret: " + settings.app_secret), repr(settings)]
    show()
"""
    )
    output = _output(capfd)
    assert dr.state == "success"
    length, redacted, shown = xcom(dr, "show")
    assert length == len(SECRET)  # the task really held it
    assert redacted == "secret: ***"
    assert "app_secret='***'" in shown
    assert_nothing_kept({"app_secret": SECRET}, output=output, dag_run=dr)
