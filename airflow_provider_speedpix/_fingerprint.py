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
    ask = {
        "v": VERSION,
        "workflow_id": workflow_id,
        "alias_id": alias_id,
        "version_id": version_id,
        "resource_config_id": resource_config_id,
        "options": {k: _identity(v) for k, v in sorted(options.items())},
        "inputs": _identity(dict(inputs or {})),
    }
    text = json.dumps(ask, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=repr)
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
