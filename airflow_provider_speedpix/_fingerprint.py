"""What a prediction was asked to do, as a short stable digest: reuse a stored prediction only for the same ask.

A retry (or a cleared task) may find a prediction id from an earlier try in ``task_state_store``. Reusing
it is right only when it was made from the same request; after the DAG changed (another workflow, other
inputs) it would hand back the wrong images. The digest covers the workflow reference, the resource
configuration, the run options and the rendered inputs. File inputs count by what the user passed (the
path, the object-storage URI, the file object's name), never by the random URL their upload got, so the
same file gives the same digest on every try. A file object without a name counts by its content when it
can be re-read (seekable), and otherwise never matches: reusing a prediction made from bytes that cannot
be compared again could hand back the wrong result, so such a retry submits anew.

Pure: no network, no Airflow imports.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import uuid
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

from airflow_provider_speedpix._inputs import is_file_object, is_object_storage_path

#: Bump when the digest's inputs change meaning, so digests of older releases never match by accident.
VERSION = 1
_CHUNK = 1024 * 1024


def request_fingerprint(
    workflow_id: str,
    inputs: Mapping[str, Any] | None,
    *,
    alias_id: str | None = None,
    version_id: str | None = None,
    resource_config_id: str | None = None,
    **options: Any,
) -> str:
    """``"v1:<sha256 hex>"`` of everything that decides what a prediction produces."""
    return request_record(
        workflow_id,
        inputs,
        alias_id=alias_id,
        version_id=version_id,
        resource_config_id=resource_config_id,
        **options,
    )["fingerprint"]


def request_record(
    workflow_id: str,
    inputs: Mapping[str, Any] | None,
    *,
    alias_id: str | None = None,
    version_id: str | None = None,
    resource_config_id: str | None = None,
    **options: Any,
) -> dict[str, Any]:
    """What to keep beside a prediction id: ``{"fingerprint": request_fingerprint(...), "request": parts}``.

    ``parts`` are readable, so a log line can say *what* changed (:func:`request_changes`): the workflow
    reference, the resource configuration and the options as given (scalars; anything else as a digest),
    and the inputs only as a digest, since they may hold prompts, paths or URLs that do not belong in a
    store. Inputs are read once (a nameless stream is hashed once for both).
    """
    identity = _identity(dict(inputs or {}))
    ask = {
        "v": VERSION,
        "workflow_id": workflow_id,
        "alias_id": alias_id,
        "version_id": version_id,
        "resource_config_id": resource_config_id,
        "options": {k: _identity(v) for k, v in sorted(options.items())},
        "inputs": identity,
    }
    parts: dict[str, Any] = {
        "workflow_id": workflow_id,
        "alias_id": alias_id,
        "version_id": version_id,
        "resource_config_id": resource_config_id,
    }
    parts.update(sorted(options.items()))
    parts = {
        k: v if v is None or isinstance(v, (bool, int, float, str)) else _digest(_identity(v))
        for k, v in parts.items()
    }
    parts["inputs"] = _digest(identity)
    return {"fingerprint": _digest(ask), "request": parts}


def request_changes(before: Mapping[str, Any] | None, after: Mapping[str, Any]) -> list[str]:
    """``["workflow_id wf-a -> wf-b", "inputs changed"]``: how two :func:`request_record` parts differ
    (``before`` may be ``None``: an entry that kept no parts)."""
    if not isinstance(before, Mapping):
        return []
    changes = []
    for key in after:
        old, new = before.get(key), after[key]
        if old == new:
            continue
        if key == "inputs" or not _readable(old) or not _readable(new):
            changes.append(f"{key} changed")
        else:
            changes.append(
                f"{key} {old!s} -> {new!s}"
                if old is not None and new is not None
                else f"{key} {old!r} -> {new!r}"
            )
    return changes


def _readable(value: Any) -> bool:
    return value is None or (isinstance(value, (bool, int, float, str)) and len(str(value)) <= 80)


def _digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=repr)
    return f"v{VERSION}:" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _identity(value: Any) -> Any:
    """A JSON-able stand-in for ``value`` that is equal exactly when the user passed the same thing."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {"map": sorted(([str(k), _identity(v)] for k, v in value.items()), key=lambda kv: kv[0])}
    if isinstance(value, (list, tuple)):
        return {"list": [_identity(v) for v in value]}
    if isinstance(value, (set, frozenset)):
        return {"set": sorted((_identity(v) for v in value), key=repr)}
    if is_object_storage_path(value):
        return {"object": str(value)}
    if isinstance(value, PurePath):
        return {"path": os.fspath(value)}
    if isinstance(value, (datetime.date, datetime.time)):
        return {"time": value.isoformat()}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"bytes": hashlib.sha256(bytes(value)).hexdigest()}
    if is_file_object(value):
        return _file_object_identity(value)
    return {"repr": repr(value)}


def _file_object_identity(stream: Any) -> Any:
    name = getattr(stream, "name", None)
    if isinstance(name, (str, bytes)) and name:
        return {"file": os.fsdecode(name)}
    try:
        if stream.seekable():
            start = stream.tell()
            digest = hashlib.sha256()
            try:
                for chunk in iter(lambda: stream.read(_CHUNK), b""):
                    digest.update(chunk)
            finally:
                stream.seek(start)
            return {"content": digest.hexdigest()}
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    return {"unrepeatable": uuid.uuid4().hex}
