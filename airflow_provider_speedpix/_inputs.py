"""Turn a prediction's ``inputs`` into plain JSON: files become URLs (uploaded) or base64 data URIs.

Rules, following the official SDK so users' inputs mean the same thing here:

- A string counts as a local path only when it starts with ``/``, ``./``, ``../``, ``~`` or a drive
  letter (``C:``). If such a file exists it is sent as a file. If it does not exist and ends with a
  known media suffix (``.png``, ``.jpg``, ``.mp4``...) it is an error (almost certainly a typo or a file
  missing on this worker); any other such string is sent as text (e.g. a prompt starting with ``/``).
- ``pathlib.Path``, Airflow ``ObjectStoragePath`` and binary file objects are always files.
- ``bytes`` are rejected (wrap them in ``io.BytesIO`` to send them as a file), sets and tuples become
  lists, dates and datetimes ISO 8601 strings; anything else that is not JSON is rejected by name.
"""

from __future__ import annotations

import base64
import datetime
import io
import math
import mimetypes
import os
import stat
from collections.abc import Callable, Mapping
from pathlib import Path, PurePath
from typing import IO, Any, Literal

from airflow_provider_speedpix.exceptions import SpeedPixInputError

FileEncodingStrategy = Literal["url", "base64"]
FILE_ENCODING_STRATEGIES = ("url", "base64")
BASE64_LIMIT = 1024 * 1024
MEDIA_SUFFIXES = frozenset(
    [
        ".jpg",
        ".jpeg",
        ".png",
        ".gif",
        ".bmp",
        ".webp",
        ".tif",
        ".tiff",
        ".heic",
        ".mp4",
        ".mov",
        ".avi",
        ".webm",
        ".mkv",
        ".mp3",
        ".wav",
        ".json",
        ".safetensors",
    ]
)
_PATH_PREFIXES = ("/", "./", "../", "~")

#: ``upload(source, filename, where) -> access_url``; ``source`` is a path, ObjectStoragePath or file object.
Uploader = Callable[[Any, str, str], str]


def looks_like_local_path(value: str) -> bool:
    return value.startswith(_PATH_PREFIXES) or (len(value) > 2 and value[1] == ":" and value[2] in "\\/")


def expand_user(path: Path) -> Path:
    """``path.expanduser()``, but ``~name`` of an unknown user (or a NUL byte) stays as written.

    pathlib raises RuntimeError / ValueError there; a prompt such as ``"~5 items"`` must stay text.
    """
    try:
        return path.expanduser()
    except (RuntimeError, ValueError):
        return path


def file_named_by(value: str) -> Path | None:
    """The local file a string input names, or ``None`` for text: it looks like a path and the file
    exists or has a media suffix (a missing ``/data/x.png`` is then reported, not sent as text)."""
    if not looks_like_local_path(value):
        return None
    path = expand_user(Path(value))
    return path if path.exists() or path.suffix.lower() in MEDIA_SUFFIXES else None


def is_object_storage_path(value: Any) -> bool:
    """True for Airflow's ``ObjectStoragePath`` (checked without importing it eagerly)."""
    cls = type(value)
    return any(c.__name__ == "ObjectStoragePath" for c in cls.__mro__) and hasattr(value, "open")


def is_file_object(value: Any) -> bool:
    return isinstance(value, io.IOBase) or (hasattr(value, "read") and callable(value.read))


def check_strategy(strategy: str) -> FileEncodingStrategy:
    if strategy not in FILE_ENCODING_STRATEGIES:
        raise SpeedPixInputError(
            f"`file_encoding_strategy` must be 'url' (upload, any size) or 'base64' (inline, up to 1 MiB), "
            f"got {strategy!r}."
        )
    return strategy  # type: ignore[return-value]


def guess_content_type(filename: str) -> str:
    return mimetypes.guess_type(filename)[0] or "application/octet-stream"


def _local_file(path: Path, where: str) -> Path:
    if path.is_dir():
        raise SpeedPixInputError(f"{where}: {str(path)!r} is a directory; pass a single file.")
    if not path.exists():
        raise SpeedPixInputError(
            f"{where}: file {str(path)!r} does not exist on this worker (resolved to {_resolved(path)!r}). "
            "Fix the path, or upload it first with SpeedPixHook.upload_file and pass its URL."
        )
    if not os.access(path, os.R_OK):
        raise SpeedPixInputError(
            f"{where}: file {str(path)!r} is not readable by this worker's user. Fix its permissions "
            "(e.g. chmod a+r) or make it readable by the user the worker runs as."
        )
    if stat.S_ISREG(path.stat().st_mode) and path.stat().st_size == 0:
        # (a named pipe or device reports 0 too: it is read to its end when uploaded instead)
        raise SpeedPixInputError(
            f"{where}: file {str(path)!r} is empty (0 bytes); nothing to send. Check that the task that "
            "writes it finished, or pass a different file."
        )
    return path


def _resolved(path: Path) -> str:
    try:
        return str(path.resolve())
    except (OSError, RuntimeError, ValueError):  # e.g. a NUL byte in the path
        return str(path)


def _read_at_most(stream: IO[bytes], limit: int, filename: str, where: str) -> bytes:
    """Up to ``limit`` bytes: read until the end, since a pipe or socket may return less per call."""
    if isinstance(stream, io.TextIOBase):
        raise _text_stream(filename, where)
    data = bytearray()
    while len(data) < limit:
        chunk = stream.read(limit - len(data))
        if isinstance(chunk, str):
            raise _text_stream(filename, where)
        if not chunk:
            break
        data += chunk
    return bytes(data)


def _text_stream(filename: str, where: str) -> SpeedPixInputError:
    return SpeedPixInputError(
        f"{where}: {filename or 'the file'} is open in text mode; files are sent as their bytes. Open it in "
        "binary mode (open(path, 'rb')), pass its path, or wrap text in io.BytesIO(text.encode())."
    )


def _data_uri(stream: IO[bytes], filename: str, where: str) -> str:
    data = _read_at_most(stream, BASE64_LIMIT + 1, filename, where)
    if len(data) > BASE64_LIMIT:
        raise SpeedPixInputError(
            f"{where}: {filename or 'the file'} is over 1 MiB, the limit for file_encoding_strategy='base64'. "
            "Use file_encoding_strategy='url' (the default), which uploads files of any size."
        )
    if not data:
        raise SpeedPixInputError(
            f"{where}: {filename or 'the file'} is empty (0 bytes); nothing to send. Check that it was "
            "written completely, or pass a different file."
        )
    return f"data:{guess_content_type(filename)};base64,{base64.b64encode(data).decode('ascii')}"


class InputPreparer:
    """Walks ``inputs`` once; sends each distinct file once.

    Paths and ``ObjectStoragePath`` are told apart by where they point; a file object by identity (the
    same object used twice is read once: a second read would find it at its end), kept alive here so
    its id cannot be reused by another object meanwhile.
    """

    def __init__(self, upload: Uploader, strategy: str = "url") -> None:
        self._upload = upload
        self._strategy = check_strategy(strategy)
        self._done: dict[str, str] = {}
        self._streams: dict[int, tuple[Any, str]] = {}

    def prepare(self, inputs: Any) -> dict[str, Any]:
        if not isinstance(inputs, Mapping):
            raise SpeedPixInputError(
                f"`inputs` must be a dict of the workflow's input fields, got {type(inputs).__name__}. "
                "Example: inputs={'text': 'white background', 'image': '/data/product.png'}."
            )
        return {str(k): self._value(v, f"inputs[{k!r}]") for k, v in inputs.items()}

    def _value(self, value: Any, where: str) -> Any:
        if value is None or isinstance(value, bool | int | float):
            if isinstance(value, float) and not math.isfinite(value):
                raise SpeedPixInputError(f"{where}: {value!r} is not valid JSON; pass a finite number.")
            return value
        if isinstance(value, str):
            path = file_named_by(value)
            return value if path is None else self._file(_local_file(path, where), where)
        if isinstance(value, Mapping):
            return {str(k): self._value(v, f"{where}[{k!r}]") for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            items = sorted(value, key=repr) if isinstance(value, set | frozenset) else value
            return [self._value(v, f"{where}[{i}]") for i, v in enumerate(items)]
        if is_object_storage_path(value):
            if not value.is_file():
                raise SpeedPixInputError(f"{where}: {value} does not exist or is not a file.")
            return self._file(value, where)
        if isinstance(value, PurePath):
            return self._file(_local_file(expand_user(Path(value)), where), where)
        if is_file_object(value):
            return self._file(value, where)
        if isinstance(value, bytes | bytearray | memoryview):
            raise SpeedPixInputError(
                f"{where}: raw bytes cannot be sent as JSON. Wrap them in io.BytesIO(...) to send them as a "
                "file, or decode them to str if they are text."
            )
        if isinstance(value, datetime.date | datetime.time):
            return value.isoformat()
        raise SpeedPixInputError(
            f"{where}: {type(value).__name__} is not JSON-serialisable. Convert it to str, int, float, bool, "
            "list or dict, or pass a path / file object to send a file."
        )

    def _file(self, source: Any, where: str) -> str:
        stream = is_file_object(source) and not is_object_storage_path(source)
        if stream:
            if id(source) in self._streams:
                return self._streams[id(source)][1]
            key = ""
        else:
            key = str(source.resolve()) if isinstance(source, Path) else str(source)
            if key in self._done:
                return self._done[key]
        filename = _filename_of(source)
        if self._strategy == "base64":
            if stream:
                result = _data_uri(source, filename, where)
            else:
                with source.open("rb") as opened:
                    result = _data_uri(opened, filename, where)
        else:
            try:
                result = self._upload(source, filename, where)
            except SpeedPixInputError as err:  # a check of upload_file's: name the input instead
                raise err.at(where) from None
        if stream:
            self._streams[id(source)] = (source, result)
        else:
            self._done[key] = result
        return result


def _filename_of(source: Any) -> str:
    if isinstance(source, PurePath) or is_object_storage_path(source):
        return source.name
    name = getattr(source, "name", None)
    return os.path.basename(name) if isinstance(name, str) and name else "file"
