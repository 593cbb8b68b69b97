"""The batch's pure logic (``_batch``) and SpeedPixBatchTrigger driven directly, without sleeping."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from airflow_provider_speedpix import _batch, _batch_store
from airflow_provider_speedpix._batch import BatchState
from airflow_provider_speedpix._batch_items import build_items, parse_items_text
from airflow_provider_speedpix._batch_manifest import manifest_bytes
from airflow_provider_speedpix._protocol import Prediction
from airflow_provider_speedpix.exceptions import (
    SpeedPixAPIError,
    SpeedPixConfigError,
    SpeedPixNotFoundError,
    SpeedPixServerError,
    SpeedPixThrottledError,
)
from airflow_provider_speedpix.triggers import batch as trigger_module
from airflow_provider_speedpix.triggers.batch import SpeedPixBatchTrigger
from tests._helpers import cancel_after, said


def state_of(n: int, window: int = 4, retries: int = 0) -> BatchState:
    return BatchState(
        build_items([{"x": i} for i in range(n)], None), max_in_flight=window, item_retries=retries
    )


# ---------------------------------------------------------------------- items and parameters
def test_csv_and_jsonl_items_with_id_field():
    rows = parse_items_text("sku,text\nA-1,red mug\nB-2,blue mug\n", "p.csv")
    items = build_items(rows, "sku")
    assert [(i.item_id, i.inputs) for i in items] == [
        ("A-1", {"text": "red mug"}),
        ("B-2", {"text": "blue mug"}),
    ]
    rows = parse_items_text('{"sku": "A", "n": 1}\n\n{"sku": "B", "n": 2}\n', "p.jsonl")
    assert [i.inputs for i in build_items(rows, "sku")] == [{"n": 1}, {"n": 2}]
    assert [i.item_id for i in build_items(rows, None)] == ["0", "1"]


@pytest.mark.parametrize(
    ("rows", "field", "needle"),
    [
        ([{"id": "a"}, {"id": "a"}], "id", "not unique"),
        ([{"id": "a/b"}, {"id": "a_b"}], "id", "not unique"),  # the same output folder
        ([{"x": 1}], "id", "has no `id`"),
        (["text"], None, "must be a dict"),
    ],
)
def test_bad_items_name_the_item_and_the_fix(rows, field, needle):
    with pytest.raises(SpeedPixConfigError, match=needle):
        build_items(rows, field)


def test_unknown_file_format_and_bad_json_line():
    with pytest.raises(SpeedPixConfigError, match=r"\.csv.*\.jsonl"):
        parse_items_text("x", "items.txt")
    with pytest.raises(SpeedPixConfigError, match="line 2"):
        parse_items_text('{"a": 1}\n{oops\n', "items.jsonl")


@pytest.mark.parametrize(
    ("check", "value", "needle"),
    [
        (_batch.check_window, 0, "max_in_flight"),
        (_batch.check_window, True, "max_in_flight"),
        (_batch.check_item_retries, -1, "item_retries"),
        (_batch.check_max_failed, 1.5, "fraction"),
        (_batch.check_max_failed, -2, "max_failed_items"),
        (_batch.check_max_failed, "5", "max_failed_items"),
    ],
)
def test_bad_parameters_name_the_field(check, value, needle):
    with pytest.raises(SpeedPixConfigError, match=needle):
        check(value)


def test_failure_limit_count_and_fraction():
    assert _batch.failure_limit(3, 100) == 3
    assert _batch.failure_limit(0.05, 100) == 5
    assert _batch.failure_limit(0.0, 100) == 0
    assert _batch.failure_limit(1.0, 7) == 7


# ---------------------------------------------------------------------- state machine
def test_window_accounting_and_resume_threshold():
    state = state_of(10, window=4)
    for n in range(4):
        [item] = state.next_group(1)
        assert item.index == n
        state.submitted(item.item_id, f"p{n}", "fp", 0.0)
    assert state.next_group(1) == []  # window full
    assert state.resume_threshold() == 1  # ceil(4 * 0.25) with items still queued
    state.succeeded("0", ["f"], 1.5)
    counts = state.counts()
    assert (counts.succeeded, counts.in_flight, counts.queued) == (1, 3, 6)
    assert [i.index for i in state.next_group(1)] == [4]


def test_next_group_fills_the_window_in_order():
    state = state_of(10, window=5, retries=1)
    assert [i.index for i in state.next_group(3)] == [0, 1, 2]
    for item in state.next_group(3):
        state.submitted(item.item_id, f"p{item.index}", "fp", 0.0)
    assert [i.index for i in state.next_group(8)] == [3, 4]  # only 2 free slots left
    state.failed("1", "E", "boom", retry=True)  # back in the queue, ahead of later items
    assert [i.index for i in state.next_group(8)] == [1, 3, 4]
    # a prediction known to have ended frees its slot before it is collected, and only once
    state.has_ended(["p0", "unknown"])
    assert [i.index for i in state.next_group(8)] == [1, 3, 4, 5]
    state.succeeded("0", ["f"], 1.0)
    assert [i.index for i in state.next_group(8)] == [1, 3, 4, 5]


class GatedStore:
    """A ``task_state_store`` double whose first write waits until ``changes`` have been made, so the
    other threads' saves are certain to overlap it (no reliance on thread timing)."""

    def __init__(self, writer_version: Callable[[], int], changes: int) -> None:
        self.values: dict[str, Any] = {}
        self.writes = 0
        self._version = writer_version
        self._changes = changes

    def set(self, key: str, value: Any) -> None:
        if self.writes == 0:
            deadline = time.monotonic() + 10
            while self._version() < self._changes and time.monotonic() < deadline:
                time.sleep(0.001)
        self.values[key] = json.loads(json.dumps(value))
        self.writes += 1


def test_chunk_writer_saves_every_change_before_returning_in_fewer_writes():
    """Eight threads each save right after their change: when save() returns, the stored chunk holds that
    change; the saves that waited behind the first write go out together as one write."""
    from concurrent.futures import ThreadPoolExecutor

    state = state_of(8, window=8)
    writer: _batch_store.ChunkWriter | None = None
    backend = GatedStore(lambda: writer._version, changes=8)  # type: ignore[union-attr]
    store = _batch_store.BatchStore(backend, log=None, deferrable=True)
    writer = _batch_store.ChunkWriter(store, state)
    unsaved: list[str] = []

    def submit(item):
        version = writer.change(lambda: state.submitted(item.item_id, f"p-{item.item_id}", "fp", 0.0))
        writer.save(item.chunk, version)
        stored = backend.values[_batch_store.state_key(item.chunk)]
        if f"p-{item.item_id}" not in json.dumps(stored):
            unsaved.append(item.item_id)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(submit, state.items))
    assert unsaved == []
    assert writer._version == 8
    # the first write holds what existed when it began (one change or more); one more write holds the
    # rest, where a writer without group commit would make eight
    assert 1 <= backend.writes <= 2


def test_item_retries_then_failed_for_good():
    state = state_of(1, retries=2)
    for attempt in (1, 2, 3):
        state.submitted("0", f"p{attempt}", "fp", 0.0)
        retried = state.failed("0", "E", "boom")
        assert retried is (attempt < 3)
    assert state.states["0"].status == _batch.FAILED and state.states["0"].attempts == 3
    assert state.counts().failed == 1 and state.all_done()


def test_chunks_round_trip_and_changed_request_is_not_reused():
    state = state_of(250)
    state.submitted("5", "p5", "fp-5", 1.0)
    state.succeeded("120", ["a.png"], 2.0)
    assert state.dirty == {0, 1}
    values = {chunk: _batch_store.chunk_value(state, chunk) for chunk in range(_batch_store.chunk_count(250))}
    assert set(values) == {0, 1, 2} and values[2] == {"items": {}}
    json.dumps(values)  # plain JSON for task_state_store

    fresh = state_of(250)
    fingerprints = {str(i): f"fp-{i}" for i in range(250)}
    fingerprints["120"] = None  # the stored success had no fingerprint recorded: treated as another request
    changed = []
    for value in values.values():
        changed += _batch_store.load_chunk(fresh, value, fingerprints, new_try=True)
    assert fresh.states["5"].status == _batch.IN_FLIGHT and fresh.states["5"].prediction_id == "p5"
    assert changed == []  # no prediction id on item 120: nothing to warn about
    fingerprints["5"] = "fp-other"
    again = state_of(250)
    assert _batch_store.load_chunk(again, values[0], fingerprints, new_try=False) == ["5"]
    assert again.states["5"].status == _batch.QUEUED  # submitted anew


def test_new_try_resubmits_failed_but_reconnects_timed_out():
    state = state_of(2)
    state.submitted("0", "p0", "fp", 0.0)
    state.failed("0", "E", "x")
    state.submitted("1", "p1", "fp", 0.0)
    state.timed_out("1", 10)
    value = _batch_store.chunk_value(state, 0)
    fresh = state_of(2)
    _batch_store.load_chunk(fresh, value, {"0": "fp", "1": "fp"}, new_try=True)
    assert fresh.states["0"].status == _batch.QUEUED and fresh.states["0"].attempts == 0
    assert fresh.states["1"].status == _batch.IN_FLIGHT and fresh.states["1"].prediction_id == "p1"
    resumed = state_of(2)
    _batch_store.load_chunk(resumed, value, {"0": "fp", "1": "fp"}, new_try=False)
    assert resumed.states["0"].status == _batch.FAILED


def test_manifest_rows_are_json_lines():
    state = state_of(2, retries=0)
    state.submitted("0", "p0", "fp", 0.0)
    state.succeeded("0", ["/o/0/images.png"], 0.9)
    state.submitted("1", "p1", "fp", 0.0)
    state.failed("1", "WORKFLOW_EXECUTION_FAILED", "Node #7 failed")
    rows = [json.loads(line) for line in manifest_bytes(state).decode().splitlines()]
    assert rows[0] == {
        "item_id": "0",
        "prediction_id": "p0",
        "status": "succeeded",
        "files": ["/o/0/images.png"],
        "run_seconds": 0.9,
        "attempts": 1,
        "error_code": None,
        "message": None,
    }
    assert rows[1]["status"] == "failed" and rows[1]["error_code"] == "WORKFLOW_EXECUTION_FAILED"


def test_backpressure_is_throttle_or_full_pool_only():
    assert _batch.is_backpressure(SpeedPixThrottledError("t", operation="comfy_prompt", status_code=429))
    full = SpeedPixAPIError("f", operation="comfy_prompt", error_code="ResourcePoolFull")
    assert _batch.is_backpressure(full)
    assert not _batch.is_backpressure(SpeedPixServerError("s", operation="comfy_prompt", status_code=500))
    assert _batch.backoff_delay(1, 2.0) == 2.0 and _batch.backoff_delay(3, 2.0) == 8.0
    assert _batch.backoff_delay(50, 2.0) == _batch.MAX_BACKOFF


def test_progress_line_with_eta():
    counts = _batch.Counts(total=100, succeeded=40, failed=2, in_flight=10, queued=48)
    text = _batch.describe_counts(counts, started_at=0.0, done_at_start=0, now=42.0)
    assert text == "42/100 done (2 failed), 10 in flight, 48 queued, ETA 58 s"


# ---------------------------------------------------------------------- trigger
class FakeHook:
    """Answers from a script per prediction id: a status string, an exception, or a list of those."""

    created = 0

    def __init__(self, script: dict[str, Any], etas: dict[str, float] | None = None) -> None:
        self.script = script
        self.etas = etas or {}
        self.calls: list[str] = []
        self.budgets: list[float | None] = []
        self.active = 0
        self.peak = 0

    def __call__(self, speedpix_conn_id: str) -> FakeHook:
        return self

    async def aget_prediction(self, prediction_id: str, *, time_left: float | None = None) -> Prediction:
        self.calls.append(prediction_id)
        self.budgets.append(time_left)
        self.active += 1
        self.peak = max(self.peak, self.active)
        await asyncio.sleep(0)
        self.active -= 1
        answer = self.script[prediction_id]
        if isinstance(answer, list):
            answer = answer.pop(0) if len(answer) > 1 else answer[0]
        if isinstance(answer, BaseException):
            raise answer
        return Prediction(id=prediction_id, status=answer, eta_seconds=self.etas.get(prediction_id, 1.0))

    def create_prediction(self, *args: Any, **kwargs: Any) -> None:  # pragma: no cover - must not happen
        FakeHook.created += 1
        raise AssertionError("the trigger must never create")


def run_trigger(monkeypatch, trigger: SpeedPixBatchTrigger, hook: FakeHook, clock: list[float]) -> list[dict]:
    async def fake_sleep(seconds: float) -> None:
        clock[0] += seconds

    monkeypatch.setattr(trigger_module, "SpeedPixHook", hook)
    monkeypatch.setattr(trigger_module, "_sleep", fake_sleep)
    monkeypatch.setattr(trigger_module.time, "time", lambda: clock[0])

    async def drain() -> list[dict]:
        return [event.payload async for event in trigger.run()]

    return asyncio.run(asyncio.wait_for(drain(), 10))


def test_trigger_fires_at_threshold_with_small_event(monkeypatch):
    hook = FakeHook(
        {
            "a": ["running", "succeeded"],
            "b": ["running", "running", "failed"],
            "c": "running",
            "d": ["running", "succeeded"],
        }
    )
    hook.etas = {"c": trigger_module.DUE_SECONDS + 0.5}
    trigger = SpeedPixBatchTrigger(["a", "b", "c", "d"], min_finished=2, poll_interval=1.0)
    [event] = run_trigger(monkeypatch, trigger, hook, [1000.0])
    assert event["status"] == "success"
    assert event["finished"] == {"a": "succeeded", "d": "succeeded"}
    assert event["pending"] == 2
    # running and expected to end within DUE_SECONDS: the worker reads it in the same round; c is not due
    assert event["due"] == ["b"]
    assert "url" not in json.dumps(event)
    assert FakeHook.created == 0


def test_trigger_fires_when_all_finished_below_threshold_and_reports_lost(monkeypatch):
    hook = FakeHook({"a": "succeeded", "b": SpeedPixNotFoundError("gone", operation="comfy_get_progress")})
    [event] = run_trigger(monkeypatch, SpeedPixBatchTrigger(["a", "b"], min_finished=5), hook, [0.0])
    assert event["finished"] == {"a": "succeeded", "b": "lost"}


def test_trigger_wakes_at_wake_at_with_what_finished(monkeypatch):
    clock = [1000.0]
    hook = FakeHook({"a": "running", "b": "running"})
    trigger = SpeedPixBatchTrigger(["a", "b"], min_finished=2, poll_interval=5.0, wake_at=1012.0)
    [event] = run_trigger(monkeypatch, trigger, hook, clock)
    assert event == {
        "status": "success",
        "finished": {},
        "due": ["a", "b"],
        "pending": 2,
        "message": "0 of 2 predictions finished",
    }
    assert clock[0] == 1012.0  # never slept past the wake-up time


def test_trigger_without_ids_just_waits_for_wake_at(monkeypatch):
    clock = [0.0]
    [event] = run_trigger(monkeypatch, SpeedPixBatchTrigger([], wake_at=30.0), FakeHook({}), clock)
    assert event["finished"] == {} and clock[0] == 30.0


def test_trigger_sits_out_transient_errors_then_gives_up(monkeypatch):
    flaky = SpeedPixServerError("502", operation="comfy_get_progress", status_code=502)
    hook = FakeHook({"a": [flaky, flaky, "succeeded"]})
    [event] = run_trigger(monkeypatch, SpeedPixBatchTrigger(["a"], max_consecutive_errors=5), hook, [0.0])
    assert event["finished"] == {"a": "succeeded"}
    hook = FakeHook({"a": flaky})
    [event] = run_trigger(monkeypatch, SpeedPixBatchTrigger(["a"], max_consecutive_errors=3), hook, [0.0])
    assert event["status"] == "error" and "3 polling rounds" in event["message"]
    assert len(hook.calls) == 3


def test_trigger_polls_with_bounded_concurrency(monkeypatch):
    ids = [f"p{i}" for i in range(50)]
    hook = FakeHook(dict.fromkeys(ids, "succeeded"))
    [event] = run_trigger(
        monkeypatch, SpeedPixBatchTrigger(ids, min_finished=50, max_concurrency=7), hook, [0.0]
    )
    assert len(event["finished"]) == 50
    assert hook.peak <= 7


def test_trigger_serialize_round_trip_is_plain_json():
    trigger = SpeedPixBatchTrigger(["a", "b"], min_finished=1, poll_interval=0.5, wake_at=1.5e9)
    path, kwargs = trigger.serialize()
    assert path == "airflow_provider_speedpix.triggers.batch.SpeedPixBatchTrigger"
    again = SpeedPixBatchTrigger(**json.loads(json.dumps(kwargs)))
    assert again.serialize() == (path, kwargs)
    assert set(kwargs) == {
        "prediction_ids",
        "min_finished",
        "speedpix_conn_id",
        "poll_interval",
        "max_poll_interval",
        "wake_at",
        "not_before",
        "max_concurrency",
        "max_consecutive_errors",
    }


def test_trigger_holds_its_event_until_not_before(monkeypatch):
    """A deferral shorter than the scheduler's executor-event lag fails the try in Airflow 3.3."""
    clock = [1000.0]
    hook = FakeHook({"a": "succeeded", "b": ["running", "succeeded"]})
    trigger = SpeedPixBatchTrigger(["a", "b"], min_finished=1, poll_interval=1.0, not_before=1010.0)
    [event] = run_trigger(monkeypatch, trigger, hook, clock)
    assert clock[0] >= 1010.0
    assert event["finished"] == {"a": "succeeded", "b": "succeeded"}  # kept polling while holding


# ---------------------------------------------------------------------- trigger lifecycle
def test_trigger_bounds_each_poll_by_the_time_left_to_wake_at(monkeypatch):
    from airflow_provider_speedpix._polling import LAST_POLL_SECONDS

    clock = [1000.0]
    hook = FakeHook({"a": "running"})
    trigger = SpeedPixBatchTrigger(["a"], min_finished=1, poll_interval=5.0, wake_at=1012.0)
    run_trigger(monkeypatch, trigger, hook, clock)
    assert hook.budgets[0] == 12.0  # the whole time left before the wake-up
    assert min(hook.budgets) == LAST_POLL_SECONDS  # never less than one last poll's worth
    hook = FakeHook({"a": "succeeded"})
    run_trigger(monkeypatch, SpeedPixBatchTrigger(["a"]), hook, [0.0])
    assert hook.budgets == [None]  # no wake-up: no bound beyond the hook's own


@pytest.fixture
def held(monkeypatch) -> list[str]:
    """Records the trigger's hold and release of the shared client (``_transport.hold_async_client``)."""
    from airflow_provider_speedpix import _transport

    calls: list[str] = []

    def hold():
        calls.append("hold")

        async def release():
            calls.append("release")

        return release

    monkeypatch.setattr(_transport, "hold_async_client", hold)
    return calls


def test_trigger_holds_the_shared_client_for_its_run_and_lets_go(monkeypatch, held):
    hook = FakeHook({"a": ["running", "succeeded"]})
    seen_during_run: list[list[str]] = []
    original = hook.aget_prediction

    async def spy(prediction_id: str, *, time_left: float | None = None) -> Prediction:
        seen_during_run.append(list(held))
        return await original(prediction_id, time_left=time_left)

    hook.aget_prediction = spy  # type: ignore[method-assign]
    trigger = SpeedPixBatchTrigger(["a"], poll_interval=1.0)
    [event] = run_trigger(monkeypatch, trigger, hook, [0.0])
    assert event["status"] == "success"
    assert seen_during_run and all(s == ["hold"] for s in seen_during_run)  # held while polling
    assert held == ["hold", "release"]
    asyncio.run(trigger.cleanup())  # cleanup after the run: released once only
    assert held == ["hold", "release"]


def test_trigger_cleanup_releases_a_run_that_never_finished(monkeypatch, held):
    monkeypatch.setattr(trigger_module, "SpeedPixHook", FakeHook({"a": "running"}))
    trigger = SpeedPixBatchTrigger(["a"], poll_interval=60.0)

    async def main() -> None:
        await cancel_after(trigger.run().__anext__(), 0.05)
        await trigger.cleanup()
        await trigger.cleanup()

    asyncio.run(main())
    assert held == ["hold", "release"]


def test_trigger_on_kill_warns_with_count_and_a_few_ids(capsys, caplog):
    import logging

    caplog.set_level(logging.WARNING)
    ids = [f"p-{i}" for i in range(12)]
    trigger = SpeedPixBatchTrigger(ids, min_finished=3)
    capsys.readouterr()
    asyncio.run(asyncio.wait_for(trigger.on_kill(), timeout=1))  # bounded: no network, no waiting
    text = said(capsys, caplog)
    assert "12 SpeedPix predictions" in text and "p-0, p-1, p-2, p-3, p-4 and 7 more" in text
    assert "p-5" not in text
    assert "keep running" in text and "billed" in text and "no cancel call" in text


def test_trigger_on_kill_counts_only_those_still_in_flight(monkeypatch, capsys, caplog):
    """Killed mid-wait (the triggerer cancels the run, then calls on_kill): the finished ones are not listed."""
    import logging

    caplog.set_level(logging.WARNING)
    monkeypatch.setattr(trigger_module, "SpeedPixHook", FakeHook({"a": "succeeded", "b": "running"}))
    trigger = SpeedPixBatchTrigger(["a", "b"], min_finished=2, poll_interval=60.0)
    asleep: list[asyncio.Event] = []

    async def sleep(seconds: float) -> None:
        asleep[0].set()  # its first round is done: "a" finished, "b" still in flight
        await asyncio.sleep(seconds)

    monkeypatch.setattr(trigger_module, "_sleep", sleep)

    async def main() -> None:
        asleep.append(asyncio.Event())
        # cancelled as the triggerer does on a user action, once it waits for its next round
        run = asyncio.ensure_future(trigger.run().__anext__())
        await asyncio.wait_for(asleep[0].wait(), timeout=10)
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
        await trigger.on_kill()

    capsys.readouterr()
    asyncio.run(main())
    text = said(capsys, caplog)
    assert "1 SpeedPix predictions of this batch (b)" in text


def test_trigger_on_kill_is_silent_after_the_final_event(monkeypatch, capsys, caplog):
    import logging

    caplog.set_level(logging.DEBUG)
    trigger = SpeedPixBatchTrigger(["a"], poll_interval=1.0)
    [event] = run_trigger(monkeypatch, trigger, FakeHook({"a": "succeeded"}), [0.0])
    assert event["status"] == "success"
    capsys.readouterr()
    caplog.clear()
    asyncio.run(trigger.on_kill())
    assert "keep running" not in said(capsys, caplog)


def test_trigger_on_kill_never_raises(monkeypatch):
    class Broken:
        def warning(self, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError("log handler broke")

    monkeypatch.setattr(SpeedPixBatchTrigger, "log", Broken())
    asyncio.run(SpeedPixBatchTrigger(["a"]).on_kill())


# ---------------------------------------------------------------------- the worker's polling round
def test_worker_poll_round_bounds_each_poll_and_sorts_the_answers():
    from airflow_provider_speedpix import _batch_wait
    from airflow_provider_speedpix._polling import LAST_POLL_SECONDS

    flaky = SpeedPixServerError("502", operation="comfy_get_progress", status_code=502)
    answers: dict[str, Any] = {
        "done": Prediction(id="done", status="succeeded"),
        "busy": Prediction(id="busy", status="running"),
        "gone": SpeedPixNotFoundError("gone", operation="comfy_get_progress"),
        "flaky": flaky,
    }
    budgets: list[float | None] = []

    class Hook:
        def get_prediction(self, prediction_id: str, *, time_left: float | None = None) -> Prediction:
            budgets.append(time_left)
            answer = answers[prediction_id]
            if isinstance(answer, BaseException):
                raise answer
            return answer

    import time

    polled = _batch_wait.poll_round(Hook(), list(answers), wake_at=time.time() + 1000)
    assert set(polled.finished) == {"done", "gone"} and polled.finished["gone"] == _batch_wait.LOST
    assert (polled.failures, polled.last_error) == (1, flaky)
    assert all(b is not None and 990 < b <= 1000 for b in budgets)
    budgets.clear()
    _batch_wait.poll_round(Hook(), ["done"], wake_at=time.time() - 5)
    assert budgets == [LAST_POLL_SECONDS]
    fatal = SpeedPixAPIError("bad request", operation="comfy_get_progress", status_code=400)
    answers["bad"] = fatal
    with pytest.raises(SpeedPixAPIError):
        _batch_wait.poll_round(Hook(), ["bad"], wake_at=None)
