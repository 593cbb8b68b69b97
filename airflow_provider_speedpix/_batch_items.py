"""Where a batch's items come from: a list of input dicts, or a CSV / JSON-lines file (local path,
object-storage URI or ``ObjectStoragePath``), and how each item gets its id."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from airflow_provider_speedpix._batch import Item, item_folder
from airflow_provider_speedpix._inputs import is_object_storage_path
from airflow_provider_speedpix.exceptions import SpeedPixConfigError


def load_rows(items: Any) -> list[Any]:
    """The rows of ``items`` as rendered: a list (or any iterable) of dicts, or a file read whole."""
    if isinstance(items, str | os.PathLike) or is_object_storage_path(items):
        name = os.fspath(items) if isinstance(items, str | os.PathLike) else str(items)
        if is_object_storage_path(items) or "://" in name:
            from airflow.sdk import ObjectStoragePath

            source = items if is_object_storage_path(items) else ObjectStoragePath(name)
            text = source.read_text(encoding="utf-8")
        else:
            try:
                text = Path(name).expanduser().read_text(encoding="utf-8")
            except OSError as err:
                raise SpeedPixConfigError(
                    f"`items`: cannot read {name!r} ({err.strerror}). Pass a readable .csv / .jsonl file or "
                    "a list of input dicts."
                ) from None
        return parse_items_text(text, name)
    if isinstance(items, dict):
        raise SpeedPixConfigError("`items` must be a list of input dicts (one per item), not one dict.")
    try:
        return list(items)
    except TypeError:
        raise SpeedPixConfigError(
            f"`items` must be a list of input dicts or a file path, got {type(items).__name__}."
        ) from None


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
