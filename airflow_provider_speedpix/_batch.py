"""A batch of predictions with a rolling window: item states, window accounting, the failure policy,
backpressure and the progress line. Pure: no network, no Airflow imports (the operator does the I/O).

An item moves ``queued`` -> ``in_flight`` (a prediction exists) -> ``succeeded`` | ``failed`` |
``timeout``; a failed prediction goes back to ``queued`` while the item has retries left. Where items
come from is :mod:`_batch_items`; how the state is kept between rounds and tries (one
``task_state_store`` key per :data:`CHUNK_SIZE` items, rewritten right after each create) is
:mod:`_batch_store`; the manifest and the summary are :mod:`_batch_manifest`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from airflow_provider_speedpix._storage import safe_filename
from airflow_provider_speedpix.exceptions import SpeedPixConfigError

#: Items per ``task_state_store`` key. Each ``set`` rewrites the whole key, so the chunk bounds the bytes
#: written per create (14-23 KB at 100 items: docs/batch.md, "Where the state lives").
CHUNK_SIZE = 100
#: Fingerprint digits kept per item (of the 64 hex digits of ``request_fingerprint``).
FINGERPRINT_CHARS = 24
#: With items still queued, the trigger wakes the worker once this fraction of the window finished.
RESUME_FRACTION = 0.25
#: Longest pause before trying to submit again after a throttle or a full resource pool.
MAX_BACKOFF = 60.0

QUEUED, IN_FLIGHT, SUCCEEDED, FAILED, TIMEOUT = "queued", "in_flight", "succeeded", "failed", "timeout"
DONE = frozenset({SUCCEEDED, FAILED, TIMEOUT})
#: Error codes that mean "slow down", never "this item failed".
BACKPRESSURE_CODES = frozenset({"ResourcePoolFull", "RESOURCE_POOL_FULL"})


def item_folder(item_id: str) -> str:
    """The folder name of an item's outputs: its id, made a safe single path segment."""
    return safe_filename(item_id.replace("/", "_").replace("\\", "_"), fallback="item")


def short_fingerprint(fingerprint: str) -> str:
    version, _, digest = fingerprint.partition(":")
    return f"{version}:{digest[:FINGERPRINT_CHARS]}"


# ---------------------------------------------------------------------- parameters
def check_items(value: Any) -> Any:
    if value is None:
        raise SpeedPixConfigError(
            "`items` is required: a list of input dicts, or a .csv / .jsonl file path or ObjectStoragePath."
        )
    return value


def check_output_dir(value: Any) -> Any:
    if value is None or (isinstance(value, str) and not value):
        raise SpeedPixConfigError(
            "`output_dir` is required for SpeedPixBatchRunOperator: output URLs are temporary, so every "
            "item's files and the manifest are saved there. Pass a local directory or an object-storage "
            "URI, e.g. output_dir='s3://aws_default@bucket/catalog/{{ run_id }}'."
        )
    return value


def check_window(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SpeedPixConfigError(
            f"`max_in_flight` must be an integer >= 1 (the number of predictions kept running at once), "
            f"got {value!r}. Match it to your SpeedPix concurrency, e.g. max_in_flight=100."
        )
    return value


def check_item_retries(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SpeedPixConfigError(
            f"`item_retries` must be an integer >= 0 (new predictions for an item whose prediction "
            f"failed), got {value!r}."
        )
    return value


def check_max_failed(value: Any) -> int | float:
    """A count (int >= 0) or a fraction of the items (float in [0, 1])."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SpeedPixConfigError(
            f"`max_failed_items` must be a count (int >= 0) or a fraction of the items (float 0..1), got "
            f"{value!r}. Example: max_failed_items=0.02 tolerates 2% failed items."
        )
    if isinstance(value, int) and value < 0:
        raise SpeedPixConfigError(f"`max_failed_items` must be >= 0, got {value!r}.")
    if isinstance(value, float) and not 0.0 <= value <= 1.0:
        raise SpeedPixConfigError(
            f"`max_failed_items` as a float is a fraction of the items and must be within 0..1, got "
            f"{value!r}; pass an int for a count."
        )
    return value


def failure_limit(max_failed: int | float, total: int) -> int:
    """How many failed items the task tolerates (more fails it)."""
    if isinstance(max_failed, float):
        return math.floor(max_failed * total + 1e-9)
    return max_failed


# ---------------------------------------------------------------------- items
@dataclass(frozen=True)
class Item:
    """One unit of work: its id (names its outputs and manifest row) and the workflow inputs."""

    index: int
    item_id: str
    inputs: dict[str, Any]

    @property
    def chunk(self) -> int:
        return self.index // CHUNK_SIZE


# ---------------------------------------------------------------------- state
@dataclass
class ItemState:
    """What is known about one item. ``attempts``: predictions created for it (this task instance)."""

    status: str = QUEUED
    fingerprint: str | None = None
    prediction_id: str | None = None
    attempts: int = 0
    created_at: float | None = None
    files: list[str] = field(default_factory=list)
    run_seconds: float | None = None
    error_code: str | None = None
    message: str | None = None


@dataclass
class Counts:
    total: int
    succeeded: int
    failed: int
    in_flight: int
    queued: int

    @property
    def done(self) -> int:
        return self.succeeded + self.failed


class BatchState:
    """Item states keyed by item id and the window accounting (pure). ``dirty``: the chunks changed since
    they were last saved (:mod:`_batch_store`)."""

    def __init__(self, items: list[Item], *, max_in_flight: int, item_retries: int) -> None:
        self.items = items
        self.by_id = {item.item_id: item for item in items}
        self.max_in_flight = max_in_flight
        self.item_retries = item_retries
        self.states: dict[str, ItemState] = {item.item_id: ItemState() for item in items}
        self.dirty: set[int] = set()
        #: in flight, but known to have ended (not collected yet): their window slots are free already
        self.ended: set[str] = set()

    # -- queries ---------------------------------------------------------------------------------------
    def with_status(self, *statuses: str) -> list[Item]:
        return [item for item in self.items if self.states[item.item_id].status in statuses]

    def in_flight(self) -> list[Item]:
        return self.with_status(IN_FLIGHT)

    def counts(self) -> Counts:
        tally = {QUEUED: 0, IN_FLIGHT: 0, SUCCEEDED: 0, FAILED: 0, TIMEOUT: 0}
        for state in self.states.values():
            tally[state.status] += 1
        return Counts(
            total=len(self.items),
            succeeded=tally[SUCCEEDED],
            failed=tally[FAILED] + tally[TIMEOUT],
            in_flight=tally[IN_FLIGHT],
            queued=tally[QUEUED],
        )

    def free_slots(self) -> int:
        return max(0, self.max_in_flight - self.counts().in_flight + len(self.ended))

    def has_ended(self, prediction_ids: Iterable[str]) -> None:
        """These predictions ended (the trigger said so): submit into their slots before collecting them."""
        by_prediction = {self.states[i.item_id].prediction_id: i.item_id for i in self.in_flight()}
        self.ended.update(by_prediction[p] for p in prediction_ids if p in by_prediction)

    def next_group(self, size: int) -> list[Item]:
        """The next queued items, in order, as many as ``size`` and the window's free slots allow."""
        room = min(size, self.free_slots())
        group: list[Item] = []
        for item in self.items:
            if len(group) >= room:
                break
            if self.states[item.item_id].status == QUEUED:
                group.append(item)
        return group

    def all_done(self) -> bool:
        return all(state.status in DONE for state in self.states.values())

    def resume_threshold(self) -> int:
        """How many in-flight predictions must finish before the worker is worth waking: with items
        still queued, a fraction of the window (to top it up); else all of them."""
        in_flight = self.counts().in_flight
        if not self.with_status(QUEUED):
            return in_flight
        return max(1, min(in_flight, math.ceil(self.max_in_flight * RESUME_FRACTION)))

    def total_run_seconds(self) -> float:
        return round(sum(s.run_seconds or 0.0 for s in self.states.values()), 3)

    def in_flight_ids(self) -> list[str]:
        return [self.states[item.item_id].prediction_id or "" for item in self.in_flight()]

    def overdue(self, timeout: float | None, now: float) -> list[Item]:
        """In-flight items whose prediction was created more than ``timeout`` seconds before ``now``."""
        if timeout is None:
            return []
        return [
            item
            for item in self.in_flight()
            if (state := self.states[item.item_id]).prediction_id
            and state.created_at is not None
            and state.created_at + timeout <= now
        ]

    def wake_time(self, timeout: float | None, backoff_until: float | None, now: float) -> float | None:
        """When the worker must look again even if nothing finished: after a backoff, or when the first
        in-flight item reaches its timeout."""
        candidates = [backoff_until] if backoff_until is not None else []
        if timeout is not None:
            candidates += [(self.states[i.item_id].created_at or now) + timeout for i in self.in_flight()]
        return min(candidates) if candidates else None

    # -- transitions -----------------------------------------------------------------------------------
    def _touch(self, item_id: str) -> ItemState:
        self.dirty.add(self.by_id[item_id].chunk)
        self.ended.discard(item_id)
        return self.states[item_id]

    def submitted(self, item_id: str, prediction_id: str, fingerprint: str, now: float) -> None:
        state = self._touch(item_id)
        state.status, state.prediction_id, state.fingerprint = IN_FLIGHT, prediction_id, fingerprint
        state.attempts += 1
        state.created_at = now
        state.error_code = state.message = None

    def succeeded(self, item_id: str, files: list[str], run_seconds: float | None) -> None:
        state = self._touch(item_id)
        state.status, state.files, state.run_seconds = SUCCEEDED, files, run_seconds

    def failed(
        self, item_id: str, error_code: str | None, message: str | None, *, retry: bool = True
    ) -> bool:
        """The item's prediction (or its create) failed: back to the queue while retries are left
        (returns True), else failed for good."""
        state = self._touch(item_id)
        state.error_code, state.message = error_code, (message or "")[:500] or None
        if retry and state.attempts <= self.item_retries:
            state.status = QUEUED
            return True
        state.status = FAILED
        return False

    def lost(self, item_id: str) -> None:
        """Its prediction is unknown to SpeedPix (expired): submit again without counting an attempt."""
        state = self._touch(item_id)
        state.status, state.prediction_id = QUEUED, None
        state.attempts = max(0, state.attempts - 1)

    def timed_out(self, item_id: str, timeout: float | None) -> None:
        state = self._touch(item_id)
        state.status, state.error_code = TIMEOUT, "Timeout"
        state.message = (
            f"did not finish within {timeout:g} s; it may still be running (a task retry reconnects to it)"
            if timeout is not None
            else "did not finish before the deadline"
        )


# ---------------------------------------------------------------------- backpressure, progress
def create_failure(error: BaseException) -> Literal["slow_down", "abort", "retry", "final"]:
    """What a failed create means: ``slow_down`` (a throttle or a full pool: back off, never fail the
    item), ``abort`` (every item would fail the same way: credentials, an unknown workflow), ``final`` (the
    item's inputs were refused: a new try repeats that) or ``retry`` (the item may be submitted again)."""
    from airflow_provider_speedpix._protocol import CREATE
    from airflow_provider_speedpix.exceptions import (
        SpeedPixAuthError,
        SpeedPixInputError,
        SpeedPixNotFoundError,
    )

    if is_backpressure(error):
        return "slow_down"
    if isinstance(error, SpeedPixAuthError) or (
        isinstance(error, SpeedPixNotFoundError) and getattr(error, "operation", None) == CREATE
    ):
        return "abort"
    return "final" if isinstance(error, SpeedPixInputError) else "retry"


def backoff_delay(rounds: int, poll_interval: float) -> float:
    """Pause after ``rounds`` throttled submission rounds in a row (1-based), doubling, capped."""
    return min(MAX_BACKOFF, max(poll_interval, 1.0) * 2 ** max(0, rounds - 1))


def is_backpressure(error: BaseException) -> bool:
    """A throttle or a full resource pool: slow submission down, never fail the item."""
    from airflow_provider_speedpix.exceptions import SpeedPixThrottledError

    if isinstance(error, SpeedPixThrottledError):
        return True
    codes = {getattr(error, "error_code", None), getattr(error, "sub_error_code", None)}
    return bool(codes & BACKPRESSURE_CODES)


def describe_counts(counts: Counts, *, started_at: float | None, done_at_start: int, now: float) -> str:
    """``120/500 done (3 failed), 100 in flight, 277 queued, ETA 4 min``; the ETA from this run's rate."""
    text = (
        f"{counts.done}/{counts.total} done ({counts.failed} failed), {counts.in_flight} in flight, "
        f"{counts.queued} queued"
    )
    progressed = counts.done - done_at_start
    remaining = counts.total - counts.done
    if remaining and progressed > 0 and started_at is not None and now > started_at:
        eta = remaining * (now - started_at) / progressed
        text += f", ETA {eta:.0f} s" if eta < 120 else f", ETA {eta / 60:.0f} min"
    return text
