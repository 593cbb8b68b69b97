"""What a batch leaves behind: where each item's files go, the manifest (one JSON row per item, written
atomically) and the summary returned as XCom and put on Asset events."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from airflow_provider_speedpix import _storage
from airflow_provider_speedpix._batch import BatchState, item_folder
from airflow_provider_speedpix._inputs import is_object_storage_path

#: The manifest's file name under ``output_dir``.
MANIFEST_NAME = "manifest.jsonl"
#: The summary's keys that go into an Asset event's ``extra``.
ASSET_EXTRA_KEYS = ("total", "succeeded", "failed", "run_seconds", "manifest")


def output_path(directory: Any, name: str) -> Any:
    """``directory / name`` for a local path (``~`` expanded), an object-storage URI or an
    ``ObjectStoragePath``."""
    if isinstance(directory, str | os.PathLike) and not is_object_storage_path(directory):
        text = os.fspath(directory)
        if "://" in text:
            from airflow.sdk import ObjectStoragePath

            return ObjectStoragePath(text) / name
        return Path(text).expanduser() / name
    return directory / name


def item_directory(output_dir: Any, item_id: str) -> Any:
    """``<output_dir>/<item id made a safe folder name>``: where an item's files go."""
    return output_path(output_dir, item_folder(item_id))


def manifest_rows(state: BatchState) -> Iterator[dict[str, Any]]:
    for item in state.items:
        item_state = state.states[item.item_id]
        yield {
            "item_id": item.item_id,
            "prediction_id": item_state.prediction_id,
            "status": item_state.status,
            "files": item_state.files,
            "run_seconds": item_state.run_seconds,
            "attempts": item_state.attempts,
            "error_code": item_state.error_code,
            "message": item_state.message,
        }


def manifest_bytes(state: BatchState) -> bytes:
    return b"".join(
        json.dumps(row, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"
        for row in manifest_rows(state)
    )


def write_manifest(state: BatchState, output_dir: Any) -> str:
    """Write ``<output_dir>/manifest.jsonl`` atomically (a reader never sees half of it); its location."""
    data = manifest_bytes(state)
    target = _storage.resolve_destination(MANIFEST_NAME, output_path(output_dir, MANIFEST_NAME))
    _storage.write_stream(iter([data]), target, expected_size=len(data))
    return str(target)


def summary(state: BatchState, *, created: int, manifest: str, output_dir: Any) -> dict[str, Any]:
    """The task's return value: counts and where to look, never the full list."""
    counts = state.counts()
    return {
        "total": counts.total,
        "succeeded": counts.succeeded,
        "failed": counts.failed,
        "run_seconds": state.total_run_seconds(),
        "predictions_created": created,
        "manifest": manifest,
        "output_dir": str(output_dir),
    }


def add_asset_extra(context: Any, outlets: Any, summary: dict[str, Any]) -> None:
    """Put the counts on the event of each ``Asset`` outlet."""
    from airflow.sdk import Asset

    for outlet in outlets or ():
        if isinstance(outlet, Asset):
            context["outlet_events"][outlet].extra = {key: summary[key] for key in ASSET_EXTRA_KEYS}
