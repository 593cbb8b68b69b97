"""A batch of predictions with a rolling window: item states, window accounting, the failure policy, the
persisted form and the manifest rows. Pure: no network, no Airflow imports (the operator does the I/O).

An item moves ``queued`` -> ``in_flight`` (a prediction exists) -> ``succeeded`` | ``failed`` |
``timeout``; a failed prediction goes back to ``queued`` while the item has retries left. Everything the
worker must not forget is in :meth:`BatchState.chunk_value` (one ``task_state_store`` key per
:data:`CHUNK_SIZE` items), rewritten right after each create, so a retry (or a worker killed at any
point) never submits an item again whose prediction exists, except one created in the instant between
its create call and that write.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from airflow_provider_speedpix._storage import safe_filename
from airflow_provider_speedpix.exceptions import SpeedPixConfigError

#: Items per ``task_state_store`` key. Each ``set`` rewrites the whole key, so the chunk bounds the bytes
#: written per create (about 25 KB at 100 items: README, "Catalog scale").
CHUNK_SIZE = 100
STATE_PREFIX = "speedpix_batch"
META_KEY = f"{STATE_PREFIX}_meta"
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


def state_key(chunk: int) -> str:
    return f"{STATE_PREFIX}_{chunk}"


def chunk_count(total: int) -> int:
    return math.ceil(total / CHUNK_SIZE)


def item_folder(item_id: str) -> str:
    """The folder name of an item's outputs: its id, made a safe single path segment."""
    return safe_filename(item_id.replace("/", "_").replace("\\", "_"), fallback="item")


def short_fingerprint(fingerprint: str) -> str:
    version, _, digest = fingerprint.partition(":")
    return f"{version}:{digest[:FINGERPRINT_CHARS]}"


# ---------------------------------------------------------------------- parameters
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


def parse_items_text(text: str, name: str) -> list[dict[str, Any]]:
    """Rows of a CSV (header line, one item per row) or JSON-lines file (one JSON object per line);
    ``.json`` may also hold a JSON list of objects."""
    lower = name.lower()
    if lower.endswith(".csv"):
        return [dict(row) for row in csv.DictReader(io.StringIO(text))]
    if lower.endswith(".json") and text.lstrip().startswith("["):
        rows = json.loads(text)
    elif lower.endswith((".jsonl", ".ndjson", ".json")):
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError as err:
                raise SpeedPixConfigError(f"`items` file {name}, line {number}: not JSON ({err}).") from None
    else:
        raise SpeedPixConfigError(
            f"`items` file {name!r}: unknown format. Use a .csv file (a header row, one item per row) or a "
            ".jsonl / .ndjson file (one JSON object per line)."
        )
    if not isinstance(rows, list):
        raise SpeedPixConfigError(f"`items` file {name}: expected a list of objects.")
    return rows


def build_items(rows: Iterable[Any], item_id_field: str | None) -> list[Item]:
    """Give every row its id: the value of ``item_id_field`` (removed from the inputs), else its position.
    Ids must be unique, also once made safe as file names (they name the output folders)."""
    items: list[Item] = []
    seen: dict[str, str] = {}
    for index, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise SpeedPixConfigError(
                f"`items[{index}]` must be a dict of workflow inputs, got {type(row).__name__}."
            )
        inputs = dict(row)
        if item_id_field is not None:
            if item_id_field not in inputs or inputs[item_id_field] in (None, ""):
                raise SpeedPixConfigError(
                    f"`items[{index}]` has no `{item_id_field}` (item_id_field). Give every item an id, or "
                    "set item_id_field=None to number items by position."
                )
            item_id = str(inputs.pop(item_id_field))
        else:
            item_id = str(index)
        safe = item_folder(item_id).lower()
        if safe in seen:
            raise SpeedPixConfigError(
                f"`items[{index}]`: item id {item_id!r} is not unique (same output folder as "
                f"{seen[safe]!r}). Item ids name output folders and manifest rows; make them unique."
            )
        seen[safe] = item_id
        items.append(Item(index, item_id, inputs))
    return items


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

    def to_json(self) -> dict[str, Any]:
        data = {
            "s": self.status,
            "f": self.fingerprint,
            "p": self.prediction_id,
            "n": self.attempts,
            "t": self.created_at,
            "o": self.files,
            "r": self.run_seconds,
            "c": self.error_code,
            "m": self.message,
        }
        return {k: v for k, v in data.items() if v not in (None, [], 0) or k == "s"}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ItemState:
        return cls(
            status=data.get("s", QUEUED),
            fingerprint=data.get("f"),
            prediction_id=data.get("p"),
            attempts=int(data.get("n") or 0),
            created_at=data.get("t"),
            files=list(data.get("o") or []),
            run_seconds=data.get("r"),
            error_code=data.get("c"),
            message=data.get("m"),
        )


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
    """Item states keyed by item id, the window accounting and the persisted form (pure)."""

    def __init__(self, items: list[Item], *, max_in_flight: int, item_retries: int) -> None:
        self.items = items
        self.by_id = {item.item_id: item for item in items}
        self.max_in_flight = max_in_flight
        self.item_retries = item_retries
        self.states: dict[str, ItemState] = {item.item_id: ItemState() for item in items}
        self.dirty: set[int] = set()

    # -- persisted form --------------------------------------------------------------------------------
    def chunk_value(self, chunk: int) -> dict[str, Any]:
        """The ``task_state_store`` value of a chunk: the items of that chunk that have a record."""
        start = chunk * CHUNK_SIZE
        value = {}
        for item in self.items[start : start + CHUNK_SIZE]:
            state = self.states[item.item_id]
            if state.status != QUEUED or state.attempts or state.prediction_id:
                value[item.item_id] = state.to_json()
        return {"items": value}

    def load_chunk(self, value: Any, fingerprints: Mapping[str, str], *, new_try: bool) -> list[str]:
        """Fold a stored chunk in. A record whose fingerprint differs from the item's request now is
        dropped (the item is submitted anew); returns the ids of those. On a new task try, items that
        failed get fresh attempts; a timed-out prediction is reconnected to (it may still run)."""
        changed: list[str] = []
        if not isinstance(value, Mapping) or not isinstance(value.get("items"), Mapping):
            return changed
        for item_id, data in value["items"].items():
            if item_id not in self.states or not isinstance(data, Mapping):
                continue
            state = ItemState.from_json(data)
            if state.fingerprint != fingerprints.get(item_id):
                if state.prediction_id:
                    changed.append(item_id)
                self.states[item_id] = ItemState()
                self.dirty.add(self.by_id[item_id].chunk)
                continue
            if new_try and state.status == FAILED:
                state = ItemState(fingerprint=state.fingerprint)
                self.dirty.add(self.by_id[item_id].chunk)
            elif new_try and state.status == TIMEOUT:
                state.status, state.created_at = IN_FLIGHT, time.time()
                state.error_code = state.message = None
                self.dirty.add(self.by_id[item_id].chunk)
            self.states[item_id] = state
        return changed

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
        return max(0, self.max_in_flight - self.counts().in_flight)

    def next_to_submit(self) -> Item | None:
        if self.free_slots() <= 0:
            return None
        for item in self.items:
            if self.states[item.item_id].status == QUEUED:
                return item
        return None

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

    # -- transitions -----------------------------------------------------------------------------------
    def _touch(self, item_id: str) -> ItemState:
        self.dirty.add(self.by_id[item_id].chunk)
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

    # -- manifest --------------------------------------------------------------------------------------
    def manifest_rows(self) -> Iterator[dict[str, Any]]:
        for item in self.items:
            state = self.states[item.item_id]
            yield {
                "item_id": item.item_id,
                "prediction_id": state.prediction_id,
                "status": state.status,
                "files": state.files,
                "run_seconds": state.run_seconds,
                "attempts": state.attempts,
                "error_code": state.error_code,
                "message": state.message,
            }

    def manifest_bytes(self) -> bytes:
        return b"".join(
            json.dumps(row, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"
            for row in self.manifest_rows()
        )


# ---------------------------------------------------------------------- backpressure, progress
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
