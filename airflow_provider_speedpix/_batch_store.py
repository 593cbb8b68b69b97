"""How a batch remembers its items between rounds and tries: ``task_state_store``, one key per
:data:`_batch.CHUNK_SIZE` items plus a small meta key.

Everything the worker must not forget (each item's prediction id, request fingerprint, attempts, files)
is in its chunk's value, rewritten right after each create, so a retry (or a worker killed at any point)
never submits an item again whose prediction exists, except one created in the instant between its
create call and that write. Why this store and this chunk size: docs/batch.md, "Where the state lives".
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from airflow_provider_speedpix._batch import (
    CHUNK_SIZE,
    FAILED,
    IN_FLIGHT,
    QUEUED,
    TIMEOUT,
    BatchState,
    ItemState,
)
from airflow_provider_speedpix.exceptions import SpeedPixConfigError

STATE_PREFIX = "speedpix_batch"
META_KEY = f"{STATE_PREFIX}_meta"
#: Short keys: a chunk holds 100 of these, rewritten on every create.
_FIELDS = {
    "s": "status",
    "f": "fingerprint",
    "p": "prediction_id",
    "n": "attempts",
    "t": "created_at",
    "o": "files",
    "r": "run_seconds",
    "c": "error_code",
    "m": "message",
}


def state_key(chunk: int) -> str:
    return f"{STATE_PREFIX}_{chunk}"


def chunk_count(total: int) -> int:
    return math.ceil(total / CHUNK_SIZE)


def item_to_json(state: ItemState) -> dict[str, Any]:
    data = {short: getattr(state, name) for short, name in _FIELDS.items()}
    return {k: v for k, v in data.items() if v not in (None, [], 0) or k == "s"}


def item_from_json(data: Mapping[str, Any]) -> ItemState:
    return ItemState(
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


def chunk_value(state: BatchState, chunk: int) -> dict[str, Any]:
    """The ``task_state_store`` value of a chunk: the items of that chunk that have a record."""
    start = chunk * CHUNK_SIZE
    value = {}
    for item in state.items[start : start + CHUNK_SIZE]:
        item_state = state.states[item.item_id]
        if item_state.status != QUEUED or item_state.attempts or item_state.prediction_id:
            value[item.item_id] = item_to_json(item_state)
    return {"items": value}


def load_chunk(state: BatchState, value: Any, fingerprints: Mapping[str, str], *, new_try: bool) -> list[str]:
    """Fold a stored chunk into ``state``. A record whose fingerprint differs from the item's request now
    is dropped (the item is submitted anew); returns the ids of those. On a new task try, items that
    failed get fresh attempts; a timed-out prediction is reconnected to (it may still run)."""
    changed: list[str] = []
    if not isinstance(value, Mapping) or not isinstance(value.get("items"), Mapping):
        return changed
    for item_id, data in value["items"].items():
        if item_id not in state.states or not isinstance(data, Mapping):
            continue
        item_state = item_from_json(data)
        chunk = state.by_id[item_id].chunk
        if item_state.fingerprint != fingerprints.get(item_id):
            if item_state.prediction_id:
                changed.append(item_id)
            state.states[item_id] = ItemState()
            state.dirty.add(chunk)
            continue
        if new_try and item_state.status == FAILED:
            item_state = ItemState(fingerprint=item_state.fingerprint)
            state.dirty.add(chunk)
        elif new_try and item_state.status == TIMEOUT:
            item_state.status, item_state.created_at = IN_FLIGHT, time.time()
            item_state.error_code = item_state.message = None
            state.dirty.add(chunk)
        state.states[item_id] = item_state
    return changed


class BatchStore:
    """A batch's keys in the task instance's ``task_state_store`` (``None`` before Airflow 3.3: then
    nothing is kept, which only ``deferrable=False`` can live with, and every method is a no-op)."""

    def __init__(self, store: Any, log: Any, *, deferrable: bool) -> None:
        self.store = store
        self.log = log
        if store is not None:
            return
        if deferrable:
            raise SpeedPixConfigError(
                "SpeedPixBatchRunOperator with deferrable=True needs task_state_store (Airflow 3.3+); "
                "use deferrable=False on older Airflow."
            )
        log.warning(
            "task_state_store is not available (Airflow < 3.3): a retry of this task submits every item "
            "again."
        )

    def load(self, state: BatchState, fingerprints: Mapping[str, str], *, new_try: bool) -> dict[str, Any]:
        """Fold every stored chunk into ``state`` (an item whose stored prediction was made for another
        request is not reused, and said so); return the meta value."""
        if self.store is None:
            return {}
        meta = self.store.get(META_KEY)
        for chunk in range(chunk_count(len(state.items))):
            stored = self.store.get(state_key(chunk))
            for item_id in load_chunk(state, stored, fingerprints, new_try=new_try):
                self.log.warning(
                    "Item %s changed since its stored prediction was made (another request): not reusing "
                    "it; submitting anew.",
                    item_id,
                )
        return dict(meta) if isinstance(meta, Mapping) else {}

    def save(
        self, state: BatchState, meta: Mapping[str, Any] | None = None, chunks: set[int] | None = None
    ) -> None:
        """Write the chunks that changed (or ``chunks``), and ``meta`` when given."""
        if self.store is None:
            state.dirty.clear()
            return
        for chunk in sorted(state.dirty if chunks is None else chunks):
            self.store.set(state_key(chunk), chunk_value(state, chunk))
            state.dirty.discard(chunk)
        if meta is not None:
            self.store.set(META_KEY, dict(meta))

    def write_chunk(self, chunk: int, value: dict[str, Any]) -> None:
        if self.store is not None:
            self.store.set(state_key(chunk), value)

    def forget(self, total: int) -> None:
        """The batch is done: a cleared task must generate anew, not reuse these predictions."""
        if self.store is None:
            return
        for chunk in range(chunk_count(total)):
            self.store.delete(state_key(chunk))
        self.store.delete(META_KEY)


class ChunkWriter:
    """Saves chunks for several threads that change one :class:`BatchState`: :meth:`change` applies a
    change under a lock and numbers it; :meth:`save` returns once a write that holds that change is done.
    Changes made while a write is in flight go out together in the next one (a group commit), so N
    threads each saving after each create cost far fewer than N writes."""

    def __init__(self, store: BatchStore, state: BatchState) -> None:
        self._store = store
        self._state = state
        self._change_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._version = 0
        self._written: dict[int, int] = {}

    def change(self, apply: Callable[[], None]) -> int:
        with self._change_lock:
            apply()
            self._version += 1
            return self._version

    def save(self, chunk: int, version: int) -> None:
        with self._write_lock:
            if self._written.get(chunk, 0) >= version:
                return  # an earlier write already held this change
            with self._change_lock:
                current, value = self._version, chunk_value(self._state, chunk)
            self._store.write_chunk(chunk, value)
            self._written[chunk] = current
