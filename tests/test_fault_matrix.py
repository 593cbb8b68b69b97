"""The fault matrix: every operation x every fault, against the emulator's fault injection (real sockets).

Each cell states the expected behaviour (retried then succeeded, or failed fast with a specific exception
and message) and the exact number of attempts the emulator saw, plus the ``comfy_prompt`` calls and
created predictions (never a hidden duplicate). Cells that make no sense are listed in ``NOT_APPLICABLE``
with the reason; ``test_every_cell_is_decided`` keeps the table complete. ``docs/reliability.md`` quotes
the test ids (``test_sync_cell[create-429]``, ``test_async_cell[progress-reset]``,
``test_trigger_cell[result-missing_data]``...).

The connection uses ``retry_limit`` 3: a short 5xx burst (2 answers) is absorbed, a long one (3) is not.
Gateway signature / timestamp / nonce errors are produced by sabotaging the signing of the one faulted
operation's requests (a wrong secret, a clock one hour behind, a nonce already used), so the other calls
of the same hook method still pass the gateway.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from airflow_provider_speedpix import _protocol as proto
from airflow_provider_speedpix import _transport as transport_module
from airflow_provider_speedpix._signing import sign_request
from airflow_provider_speedpix.emulator.png import make_png
from airflow_provider_speedpix.exceptions import (
    SpeedPixAuthError,
    SpeedPixDownloadError,
    SpeedPixError,
    SpeedPixNotFoundError,
    SpeedPixResponseError,
    SpeedPixServerError,
    SpeedPixTransportError,
    SpeedPixUploadError,
)
from airflow_provider_speedpix.hooks.speedpix import SpeedPixHook
from airflow_provider_speedpix.triggers.speedpix import SpeedPixPredictionTrigger
from tests._helpers import gateway_headers
from tests.conftest import use_emulator_connection

RETRY_LIMIT = 3
NORMAL_TIMEOUT = 5.0
#: the `slow` cells' timeout, for the faulted call only (setup calls use NORMAL_TIMEOUT); it also bounds
#: the retry's normal answer, so it is generous for a loaded machine
FAST_TIMEOUT = 1.0
SLOW_DELAY = 3.0  # how long a `slow` fault holds its answer back: far past FAST_TIMEOUT
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIXED_NONCE = "fault-matrix-fixed-nonce"

#: matrix row -> the emulator's name for the faulted operation (its counter in stats()["calls"])
OPERATIONS = {
    "create": "comfy_prompt",
    "progress": "comfy_get_progress",
    "result": "comfy_get_result",
    "upload_sign": "sp_create_temp_file_upload_sign",
    "upload_put": "upload_put",
    "download": "file_get",
}
FAULTS = (
    "5xx_short",  # 503 x (retry_limit - 1)
    "5xx_long",  # 503 x retry_limit
    "429",  # gateway throttling, X-Ca-Error-Code T429ID
    "throttled403",  # older gateway style: 403 + X-Ca-Error-Message "Throttled ..."
    "reset",  # TCP RST after the operation ran
    "slow",  # answer held back past the client's timeout, after the operation ran
    "malformed",  # HTTP 200, not JSON
    "truncated",  # HTTP 200, the JSON cut in half
    "html",  # HTTP 502 HTML error page (a proxy)
    "signature",  # gateway I400SG
    "timestamp",  # gateway I400HD (clock skew)
    "nonce",  # gateway I400NC (replay)
    "missing_data",  # success envelope without `data`
    "unknown",  # unknown workflow / prediction / file
    "expired",  # pre-signed upload URL expired
)

GATEWAY_CODES = {"signature": "I400SG", "timestamp": "I400HD", "nonce": "I400NC"}
EMULATOR_KINDS = {"5xx_short": "503", "5xx_long": "503"}


@dataclass(frozen=True)
class Expect:
    """One cell. ``attempts``: requests the faulted operation received (gateway rejections excluded).

    ``error is None`` means the call succeeded (after ``attempts - 1`` retries). ``prompt_calls`` and
    ``predictions`` are the increase during the cell: 0 for every row but ``create``.
    """

    attempts: int
    error: type[SpeedPixError] | None = None
    fragment: str = ""
    prompt_calls: int = 0
    predictions: int = 0
    extra_calls: tuple[tuple[str, int], ...] = ()  # other operations' exact call counts


def ok(attempts: int, **kw: Any) -> Expect:
    return Expect(attempts, **kw)


def fails(attempts: int, error: type[SpeedPixError], fragment: str, **kw: Any) -> Expect:
    return Expect(attempts, error, fragment, **kw)


def auth(fragment: str, **kw: Any) -> Expect:
    return fails(0, SpeedPixAuthError, fragment, **kw)


SIG, CLOCK, REPLAY = "App Secret", "clock", "replayed"
READ_ROW = {  # progress and result behave the same: both are safe to repeat
    "5xx_short": ok(RETRY_LIMIT),
    "5xx_long": fails(RETRY_LIMIT, SpeedPixServerError, "HTTP 503"),
    "429": ok(2),
    "throttled403": ok(2),
    "reset": ok(2),
    "slow": ok(2),
    "malformed": ok(2),
    "truncated": ok(2),
    "html": ok(2),
    "signature": auth(SIG),
    "timestamp": auth(CLOCK),
    "nonce": auth(REPLAY),
    "missing_data": ok(2),
}

CELLS: dict[tuple[str, str], Expect] = {
    # create: retried only when the request provably never reached the backend (throttling)
    **{
        ("create", fault): expect
        for fault, expect in {
            "5xx_short": fails(1, SpeedPixServerError, "HTTP 503", prompt_calls=1),
            "5xx_long": fails(1, SpeedPixServerError, "HTTP 503", prompt_calls=1),
            "429": ok(2, prompt_calls=2, predictions=1),
            "throttled403": ok(2, prompt_calls=2, predictions=1),
            "reset": fails(1, SpeedPixTransportError, "connection broken", prompt_calls=1, predictions=1),
            "slow": fails(
                1, SpeedPixTransportError, "no answer within the timeout", prompt_calls=1, predictions=1
            ),
            "malformed": fails(
                1, SpeedPixResponseError, "expected the JSON envelope", prompt_calls=1, predictions=1
            ),
            "truncated": fails(
                1, SpeedPixResponseError, "expected the JSON envelope", prompt_calls=1, predictions=1
            ),
            "html": fails(1, SpeedPixServerError, "an HTML page", prompt_calls=1),
            "signature": auth(SIG),
            "timestamp": auth(CLOCK),
            "nonce": auth(REPLAY),
            "missing_data": fails(1, SpeedPixResponseError, "no `data`", prompt_calls=1, predictions=1),
            "unknown": fails(1, SpeedPixNotFoundError, "not found", prompt_calls=1),
        }.items()
    },
    **{("progress", fault): expect for fault, expect in READ_ROW.items()},
    ("progress", "unknown"): fails(1, SpeedPixNotFoundError, "not found"),
    **{("result", fault): expect for fault, expect in READ_ROW.items()},
    # upload_file's signing call; the PUT runs once after a successful sign
    # (a read's row, but a failed sign sends no PUT)
    **{
        ("upload_sign", fault): expect
        for fault, expect in {
            **READ_ROW,
            "5xx_short": ok(RETRY_LIMIT, extra_calls=(("upload_put", 1),)),
            "5xx_long": fails(RETRY_LIMIT, SpeedPixServerError, "HTTP 503", extra_calls=(("upload_put", 0),)),
            "signature": auth(SIG, extra_calls=(("upload_put", 0),)),
            # the first URL expires before its PUT: signed again, the whole file sent again
            "expired": ok(2, extra_calls=(("upload_put", 2),)),
        }.items()
    },
    # the PUT to the pre-signed URL (object storage, not behind the API gateway); idempotent
    **{
        ("upload_put", fault): expect
        for fault, expect in {
            "5xx_short": ok(RETRY_LIMIT, extra_calls=(("sp_create_temp_file_upload_sign", 1),)),
            "5xx_long": fails(RETRY_LIMIT, SpeedPixUploadError, "HTTP 503"),
            "429": ok(2),
            "throttled403": fails(1, SpeedPixUploadError, "HTTP 403"),
            "reset": ok(2),
            "slow": ok(2),
            "malformed": ok(1),  # a 200 to a PUT: its body is not read
            "html": ok(2),
            "signature": fails(
                1,
                SpeedPixUploadError,
                "SignatureDoesNotMatch",
                extra_calls=(("sp_create_temp_file_upload_sign", 1),),
            ),
            "expired": fails(
                2, SpeedPixUploadError, "AccessDenied", extra_calls=(("sp_create_temp_file_upload_sign", 2),)
            ),
        }.items()
    },
    # streaming an output file (a plain GET of a temporary URL); idempotent
    **{
        ("download", fault): expect
        for fault, expect in {
            "5xx_short": ok(RETRY_LIMIT),
            "5xx_long": fails(RETRY_LIMIT, SpeedPixDownloadError, "HTTP 503"),
            "429": ok(2),
            "throttled403": fails(1, SpeedPixDownloadError, "HTTP 403"),
            "reset": ok(2),
            "slow": ok(2),
            "html": ok(2),
            "unknown": fails(1, SpeedPixDownloadError, "HTTP 404"),
        }.items()
    },
}

NOT_APPLICABLE = {
    ("create", "expired"): "no upload URL involved",
    ("progress", "expired"): "no upload URL involved",
    ("result", "expired"): "no upload URL involved",
    ("result", "unknown"): "result is only asked after progress answered `finished`: see progress-unknown",
    ("upload_sign", "unknown"): "the call names no existing object",
    ("upload_put", "truncated"): "a PUT's response body is never read (see upload_put-malformed)",
    ("upload_put", "missing_data"): "a PUT's response body is never read (see upload_put-malformed)",
    ("upload_put", "timestamp"): "pre-signed URL, not gateway-signed",
    ("upload_put", "nonce"): "pre-signed URL, not gateway-signed",
    ("upload_put", "unknown"): "an unknown key answers SignatureDoesNotMatch: see upload_put-signature",
    ("download", "malformed"): "the body is the file itself; a consistent HTTP answer is saved as sent",
    ("download", "truncated"): "only a broken stream is detectable: test_hook.py::"
    "test_stream_broken_mid_body_leaves_no_partial_file_and_is_retryable",
    ("download", "missing_data"): "not an API envelope",
    ("download", "signature"): "output URLs are fetched unsigned",
    ("download", "timestamp"): "output URLs are fetched unsigned",
    ("download", "nonce"): "output URLs are fetched unsigned",
    ("download", "expired"): "an expired output URL answers 403/404: see download-unknown",
}


# ---------------------------------------------------------------------- plumbing
def use_connection(monkeypatch, emulator, *, timeout: float = NORMAL_TIMEOUT) -> None:
    use_emulator_connection(
        monkeypatch,
        emulator,
        retry_limit=RETRY_LIMIT,
        retry_delay=0.01,
        retry_max_delay=0.03,
        timeout=timeout,
    )


def sabotage_signing(monkeypatch, emulator, fault: str, operation: str) -> None:
    """Make the gateway refuse every request of ``operation`` (only that one) for the reason ``fault``."""
    target = proto.PATHS[operation]
    if fault == "nonce":  # the nonce must have been seen before: use it once on a harmless call
        body = proto.encode_body({"contentType": "image/png", "originalFilename": "prime.png"})
        path = proto.PATHS[proto.UPLOAD_SIGN]
        headers = gateway_headers(emulator, path, body, nonce=lambda: FIXED_NONCE)
        assert requests.post(emulator.url + path, data=body, headers=headers, timeout=5).status_code == 200

    def signer(**kwargs: Any) -> dict[str, str]:
        if kwargs["path"] == target:
            if fault == "signature":
                kwargs["app_secret"] = "not-the-secret"
            elif fault == "timestamp":
                kwargs["clock"] = lambda: time.time() - 3600
            else:
                kwargs["nonce"] = lambda: FIXED_NONCE
        return sign_request(**kwargs)

    monkeypatch.setattr(transport_module, "sign_request", signer)


def arm(monkeypatch, emulator, row: str, fault: str) -> None:
    """Install ``fault`` for ``row``'s operation (after the cell's setup calls)."""
    operation = OPERATIONS[row]
    if fault in GATEWAY_CODES:
        if row == "upload_put":  # forge the pre-signed URL's signature instead
            real = proto.parse_upload_sign

            def forged(envelope):
                url, fields = real(envelope)
                return url.replace("Signature=", "Signature=forged"), fields

            monkeypatch.setattr(proto, "parse_upload_sign", forged)
        else:
            sabotage_signing(monkeypatch, emulator, fault, operation)
    elif fault == "expired":
        emulator.configure(upload_url_ttl_s=0)
        if row == "upload_sign":  # only the first URL is born expired
            real_sign = proto.parse_upload_sign

            def sign_then_extend(envelope):
                emulator.configure(upload_url_ttl_s=3600)
                return real_sign(envelope)

            monkeypatch.setattr(proto, "parse_upload_sign", sign_then_extend)
    elif fault == "unknown":
        pass  # the action itself names something unknown
    elif fault == "5xx_short":
        emulator.inject(operation, "503", times=RETRY_LIMIT - 1)
    elif fault == "5xx_long":
        emulator.inject(operation, "503", times=RETRY_LIMIT)
    elif fault == "slow":
        emulator.inject(operation, "slow", delay=SLOW_DELAY)
    else:
        emulator.inject(operation, fault)


@dataclass
class Cell:
    """What a row needs: its setup (before the fault is armed) and its action."""

    hook: SpeedPixHook
    emulator: Any
    tmp_path: Path
    prediction_id: str | None = None
    output_url: str | None = None

    def setup(self, row: str, fault: str) -> None:
        if row == "progress":
            self.prediction_id = self.hook.create_prediction("sleep-100", {}).id
        elif row in ("result", "download"):
            self.prediction_id = self.hook.create_prediction("sleep-0", {}).id
            if row == "download":
                done = self.hook.get_prediction(self.prediction_id)
                self.output_url = done.output["images"]["url"]
                if fault == "unknown":
                    self.output_url = self.output_url.replace(self.prediction_id, "no-such-task")
        if fault == "unknown" and row == "progress":
            self.prediction_id = "no-such-task"

    def act(self, row: str, fault: str) -> Any:
        if row == "create":
            return self.hook.create_prediction("wf-missing" if fault == "unknown" else "wf-1", {"text": "x"})
        if row in ("progress", "result"):
            return self.hook.get_prediction(self.prediction_id)
        if row in ("upload_sign", "upload_put"):
            return self.hook.upload_file(self.source())
        return self.hook.download(self.output_url, self.tmp_path / "out" / "saved.png")

    async def aact(self, row: str) -> Any:
        return await self.hook.aget_prediction(self.prediction_id)

    def source(self) -> Path:
        path = self.tmp_path / "input.png"
        if not path.exists():
            path.write_bytes(make_png(8, 8))
        return path

    def check_success(self, row: str, value: Any) -> None:
        if row == "create":
            assert value.id in self.emulator.app.state.emulator.tasks
        elif row == "progress":
            assert value.status == "waiting"
        elif row == "result":
            assert value.status == "succeeded"
            assert value.output["images"]["url"].startswith(self.emulator.url)
        elif row in ("upload_sign", "upload_put"):
            fetched = requests.get(value.access_url, timeout=5)
            assert fetched.content == self.source().read_bytes()
        else:
            assert Path(value).read_bytes()[:8] == PNG_MAGIC
            assert not list(Path(value).parent.glob("*.part"))


def counters(emulator) -> dict[str, Any]:
    stats = emulator.stats()
    return {**stats["calls"], "predictions": stats["predictions"], "rejected": dict(stats["rejected"])}


def check_counts(emulator, before: dict[str, Any], row: str, fault: str, expect: Expect) -> None:
    after = counters(emulator)
    delta = {key: after[key] - before[key] for key in (*OPERATIONS.values(), "predictions")}
    assert delta[OPERATIONS[row]] == expect.attempts, delta
    if row != "create":
        assert delta["comfy_prompt"] == 0, "a non-create cell must never call comfy_prompt"
    else:
        assert delta["comfy_prompt"] == expect.prompt_calls, delta
    assert delta["predictions"] == expect.predictions, delta
    for operation, count in expect.extra_calls:
        assert delta[operation] == count, (operation, delta)
    if fault in GATEWAY_CODES and row != "upload_put":
        code = GATEWAY_CODES[fault]
        assert after["rejected"].get(code, 0) - before["rejected"].get(code, 0) == 1  # not retried


def check_error(err: BaseException, expect: Expect, secret: str) -> None:
    assert type(err) is expect.error, f"{type(err).__name__}: {err}"
    assert expect.fragment in str(err)
    assert secret not in str(err)
    assert "Signature=" not in str(err)  # never the pre-signed URL's query string
    # a SpeedPixError of its own, not a library traceback chained underneath
    assert err.__cause__ is None
    assert err.__suppress_context__ or err.__context__ is None or isinstance(err.__context__, SpeedPixError)


def cell_ids(cells: dict[tuple[str, str], Any]) -> list[str]:
    return [f"{row}-{fault}" for row, fault in cells]


# ---------------------------------------------------------------------- the table is complete
def test_every_cell_is_decided():
    every = {(row, fault) for row in OPERATIONS for fault in FAULTS}
    assert set(CELLS) | set(NOT_APPLICABLE) == every
    assert not set(CELLS) & set(NOT_APPLICABLE)
    assert {row for row, _ in CELLS} == set(OPERATIONS)
    assert {fault for _, fault in CELLS} == set(FAULTS)


# ---------------------------------------------------------------------- the hook, sync and async
def check_cell(emulator, monkeypatch, tmp_path, row: str, fault: str, flavour: str) -> None:
    """One cell through the sync hook (every row) or the async hook (the trigger's reads): one body."""
    expect = CELLS[row, fault]
    use_connection(monkeypatch, emulator)
    cell = Cell(SpeedPixHook(), emulator, tmp_path)
    cell.setup(row, fault)
    if fault == "slow":  # the short timeout for the faulted call only, not for the setup
        use_connection(monkeypatch, emulator, timeout=FAST_TIMEOUT)
        cell.hook = SpeedPixHook()
    arm(monkeypatch, emulator, row, fault)

    def act() -> Any:
        return cell.act(row, fault) if flavour == "sync" else asyncio.run(cell.aact(row))

    before = counters(emulator)
    started = time.monotonic()
    if expect.error is None:
        cell.check_success(row, act())
    else:
        with pytest.raises(SpeedPixError) as info:
            act()
        check_error(info.value, expect, emulator.app_secret)
        if row == "download":
            assert not (tmp_path / "out" / "saved.png").exists()
    check_counts(emulator, before, row, fault, expect)
    if fault == "slow" and expect.error is not None:
        assert time.monotonic() - started < SLOW_DELAY  # failed at the timeout, did not wait it out
    assert emulator.stats()["faults_fired"].get(OPERATIONS[row], {}) or fault in (
        *GATEWAY_CODES,
        "unknown",
        "expired",
    )


@pytest.mark.parametrize(("row", "fault"), list(CELLS), ids=cell_ids(CELLS))
def test_sync_cell(emulator, monkeypatch, tmp_path, row, fault):
    check_cell(emulator, monkeypatch, tmp_path, row, fault, "sync")


#: the async hook serves the trigger, which only reads (progress and result)
ASYNC_CELLS = {key: CELLS[key] for key in CELLS if key[0] in ("progress", "result")}


@pytest.mark.parametrize(("row", "fault"), list(ASYNC_CELLS), ids=cell_ids(ASYNC_CELLS))
def test_async_cell(emulator, monkeypatch, tmp_path, row, fault):
    check_cell(emulator, monkeypatch, tmp_path, row, fault, "async")


# ---------------------------------------------------------------------- the trigger's run()
#: (row, fault) -> (faults injected, expected event status, message fragment). The trigger sits out
#: transient errors (each poll already retried RETRY_LIMIT times by the hook) and ends on anything else.
TRIGGER_CELLS = {
    ("progress", "5xx_long"): (2 * RETRY_LIMIT, "success", ""),
    ("progress", "reset"): (2 * RETRY_LIMIT, "success", ""),
    ("progress", "slow"): (1, "success", ""),
    ("progress", "html"): (RETRY_LIMIT, "success", ""),
    ("progress", "truncated"): (RETRY_LIMIT, "success", ""),
    ("progress", "429"): (RETRY_LIMIT, "success", ""),
    ("result", "missing_data"): (RETRY_LIMIT, "success", ""),
    ("result", "malformed"): (2 * RETRY_LIMIT, "success", ""),
    ("result", "throttled403"): (RETRY_LIMIT, "success", ""),
    ("progress", "signature"): (0, "error", "App Secret"),
    ("result", "timestamp"): (0, "error", "clock"),
    ("progress", "unknown"): (0, "error", "not found"),
}


@pytest.mark.parametrize(("row", "fault"), list(TRIGGER_CELLS), ids=cell_ids(TRIGGER_CELLS))
def test_trigger_cell(emulator, monkeypatch, row, fault):
    times, status, fragment = TRIGGER_CELLS[row, fault]
    use_connection(monkeypatch, emulator)
    operation = OPERATIONS[row]
    prediction_id = (
        "no-such-task" if fault == "unknown" else SpeedPixHook().create_prediction("sleep-0.3", {}).id
    )
    if fault == "slow":  # the short timeout for the trigger's polls only, not for the create
        use_connection(monkeypatch, emulator, timeout=FAST_TIMEOUT)
    if fault in GATEWAY_CODES:
        sabotage_signing(monkeypatch, emulator, fault, operation)
    elif times:
        kind = EMULATOR_KINDS.get(fault, fault)
        emulator.inject(operation, kind, times=times, delay=SLOW_DELAY if fault == "slow" else 0.0)
    trigger = SpeedPixPredictionTrigger(
        prediction_id, poll_interval=0.05, max_poll_interval=0.1, max_consecutive_errors=5
    )

    async def drain() -> list[dict[str, Any]]:
        return [event.payload async for event in trigger.run()]

    events = asyncio.run(asyncio.wait_for(drain(), timeout=30))
    assert len(events) == 1, events
    [event] = events
    assert event["status"] == status, event
    assert event["prediction_id"] == prediction_id
    assert fragment in (event.get("message") or "")
    assert emulator.app_secret not in json.dumps(event)
    stats = emulator.stats()
    assert stats["calls"]["comfy_prompt"] == (0 if fault == "unknown" else 1)
    assert stats["predictions"] == (0 if fault == "unknown" else 1)
    if status == "success":
        assert event["output"]["images"]["url"].startswith(emulator.url)
        assert stats["faults_fired"][operation] == {EMULATOR_KINDS.get(fault, fault): times}
        assert stats["calls"][operation] >= times + 1
    elif fault in GATEWAY_CODES:
        assert stats["rejected"] == {GATEWAY_CODES[fault]: 1}  # one refused poll, no retries
    else:
        assert stats["calls"][operation] == 1
