"""Bytes in and out: open and size an upload source (spooling one whose size cannot be known to a
temporary file), stream exactly its bytes to a pre-signed URL, stream an output URL to a local path or an
``ObjectStoragePath`` (the destination appears only when complete), and the safe file names that keep a
server-provided name inside its destination.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import stat
import tempfile
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import requests

from airflow_provider_speedpix._inputs import (
    _local_file,
    expand_user,
    guess_content_type,
    is_file_object,
    is_object_storage_path,
)
from airflow_provider_speedpix._protocol import UploadedFile, unsigned_url
from airflow_provider_speedpix._retry import retryable_status
from airflow_provider_speedpix._settings import SpeedPixSettings
from airflow_provider_speedpix._transport import CHUNK, requests_error
from airflow_provider_speedpix.exceptions import (
    SpeedPixConfigError,
    SpeedPixDownloadError,
    SpeedPixError,
    SpeedPixInputError,
    SpeedPixUploadError,
)

#: ``sign(content_type, filename) -> (upload_url, UploadedFile fields)``: the API's upload-sign call.
Signer = Callable[[str, str], tuple[str, dict[str, Any]]]


def safe_filename(name: str, fallback: str = "output") -> str:
    """A file name from a server-provided URL that cannot escape the destination directory."""
    name = urllib.parse.unquote(name).replace("\\", "/").rsplit("/", 1)[-1]
    name = re.sub(r"[^\w.\-]+", "_", name).strip("._") or fallback
    return name[:200]


def _xml_code(text: str) -> str:
    match = re.search(r"<Code>([^<]{1,64})</Code>", text)
    return match.group(1) if match else ""


# ---------------------------------------------------------------------- upload
#: A stream whose size cannot be known is copied to a temporary file first: in memory up to this many
#: bytes, on disk beyond (so memory does not grow with the stream), then uploaded with its exact size.
SPOOL_IN_MEMORY = 1024 * 1024
SPOOL_CHUNK = 256 * 1024


def _seekable(stream: Any) -> bool:
    try:
        return bool(stream.seekable())
    except (AttributeError, OSError, ValueError):
        return False


def _source_error(reason: str) -> SpeedPixInputError:
    """An upload source that cannot be sent (input preparation re-places it with ``err.at(where)``)."""
    return SpeedPixInputError(f"upload_file: {reason}", reason=reason)


def _text_error(name: str) -> SpeedPixInputError:
    return _source_error(
        f"{name} is open in text mode; files are sent as their bytes. Open it in binary mode "
        "(open(path, 'rb')), pass its path, or wrap text in io.BytesIO(text.encode())."
    )


def _is_plain_file(stream: Any) -> bool:
    """An ``open(path, 'rb')`` object: its bytes are exactly the file's bytes from ``tell()``."""
    if isinstance(stream, io.FileIO):
        return True
    return isinstance(stream, io.BufferedReader | io.BufferedRandom) and isinstance(
        getattr(stream, "raw", None), io.FileIO
    )


def _fd_is_regular(stream: Any) -> bool | None:
    """Whether the stream's descriptor is a regular file (None: it has no descriptor)."""
    try:
        return stat.S_ISREG(os.fstat(stream.fileno()).st_mode)
    except (AttributeError, OSError, ValueError, TypeError, io.UnsupportedOperation):
        return None


def size_of(stream: Any) -> int | None:
    """Exactly how many bytes ``stream`` yields from its current position, or None when only reading
    it to the end can tell (a pipe, a socket, an HTTP body, a decompressing or other wrapping reader)."""
    if _is_plain_file(stream):
        # fstat is the truth only for a regular file read as is; a pipe or socket reports 0 or nothing.
        return max(0, os.fstat(stream.fileno()).st_size - stream.tell()) if _fd_is_regular(stream) else None
    if isinstance(stream, io.BytesIO):
        return max(0, len(stream.getbuffer()) - stream.tell())
    if _fd_is_regular(stream) is False or not _seekable(stream):
        return None
    # Any other seekable reader (fsspec files, zip members, temporary files): its own end. A wrapper
    # that cannot seek to its end (gzip) is read to the end instead.
    try:
        here = stream.tell()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None
    try:
        end = stream.seek(0, os.SEEK_END)
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        end = None
    stream.seek(here)
    return end - here if isinstance(end, int) and isinstance(here, int) and end >= here else None


def _check_binary(stream: Any, name: str) -> None:
    """Refuse a text stream before anything is sent (a seekable one is peeked at and rewound)."""
    if isinstance(stream, io.TextIOBase):
        raise _text_error(name)
    if _is_plain_file(stream) or isinstance(stream, io.BytesIO) or not _seekable(stream):
        return  # binary by type, or checked chunk by chunk while spooling
    try:
        here = stream.tell()
        first = stream.read(1)
        stream.seek(here)
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return  # size_of cannot measure it either: spooled, and checked chunk by chunk
    if isinstance(first, str):
        raise _text_error(name)


def _chunk_bytes(chunk: Any, name: str) -> bytes | None:
    """``chunk`` as bytes; None at the end of the stream."""
    if isinstance(chunk, bytes | bytearray | memoryview):
        return bytes(chunk) if chunk else None
    if isinstance(chunk, str):
        raise _text_error(name)
    if chunk is None:
        raise _source_error(
            f"{name} returned no data without reaching its end (a non-blocking stream); pass a blocking "
            "stream, or write it to a file first and pass the file."
        )
    raise _source_error(f"{name}: read() returned {type(chunk).__name__}, not bytes; pass a binary stream.")


@contextlib.contextmanager
def _spooled(stream: Any, name: str) -> Iterator[tuple[IO[bytes], int]]:
    """Copy the rest of ``stream`` to a temporary file (memory bounded): yield it rewound and its size."""
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY, prefix="speedpix-upload-") as spool:
        size = 0
        while (chunk := _chunk_bytes(stream.read(SPOOL_CHUNK), name)) is not None:
            spool.write(chunk)
            size += len(chunk)
        spool.seek(0)
        yield spool, size


@contextlib.contextmanager
def _opened(source: Any) -> Iterator[tuple[Any, str]]:
    """``(stream, file name)`` for any supported upload source, closing what it opened."""
    if is_object_storage_path(source):
        if not source.is_file():
            raise SpeedPixConfigError(f"upload_file: {source} does not exist or is not a file.")
        with source.open("rb") as stream:
            yield stream, source.name
    elif isinstance(source, str | os.PathLike):
        path = _local_file(expand_user(Path(source)), "upload_file")
        with path.open("rb") as stream:
            yield stream, path.name
    elif is_file_object(source):
        name = getattr(source, "name", None)
        yield source, os.path.basename(name) if isinstance(name, str) and name else "file"
    else:
        raise SpeedPixConfigError(
            f"upload_file: cannot upload a {type(source).__name__}; pass a path, a binary file object or an "
            "ObjectStoragePath."
        )


@contextlib.contextmanager
def open_source(source: Any) -> Iterator[tuple[IO[bytes], str, int]]:
    """Yield ``(seekable binary stream at its first byte to send, file name, exact size)``.

    A stream whose size cannot be known is spooled to a temporary file first. Text, empty and
    non-blocking streams are refused with :class:`SpeedPixInputError` before any request is made.
    """
    with _opened(source) as (stream, name):
        _check_binary(stream, name)
        size = size_of(stream)
        with contextlib.ExitStack() as spool:
            if size is None:
                stream, size = spool.enter_context(_spooled(stream, name))
            if size == 0:
                raise _source_error(
                    f"{name} is empty (0 bytes from its current position); nothing to send. Check that it was "
                    "written completely and not already read (rewind it with .seek(0)), or pass a different file."
                )
            yield stream, name, size


class _ExactBody:
    """The request body: exactly ``size`` bytes of ``stream`` from where it stands (``len()`` tells
    ``requests`` the Content-Length; no chunked encoding). A source that ends early is an error, never a
    short upload."""

    def __init__(self, stream: IO[bytes], size: int, filename: str) -> None:
        self._stream = stream
        self._left = size
        self._size = size
        self._filename = filename

    def __len__(self) -> int:
        return self._left

    def read(self, amount: int = -1) -> bytes:
        if self._left <= 0:
            return b""
        # at least CHUNK per read, whatever block size the HTTP library asks for (urllib3: 16 KiB): a
        # wrapped source (fsspec's file objects, ObjectStoragePath) pays its Python layers per read
        want = self._left if amount is None or amount < 0 else min(max(amount, CHUNK), self._left)
        data = self._stream.read(want)
        if not data:
            raise SpeedPixUploadError(
                f"Uploading {self._filename!r}: the source ended after {self._size - self._left} of "
                f"{self._size} bytes; was it changed while uploading? Upload a file that is not being written."
            )
        self._left -= len(data)
        return bytes(data)


def upload(
    session: requests.Session,
    settings: SpeedPixSettings,
    source: Any,
    sign: Signer,
    *,
    filename: str | None,
    content_type: str | None,
    log: Any,
) -> UploadedFile:
    """Sign, then stream ``source`` to the pre-signed URL with its exact Content-Length; a URL that
    expired before its PUT is signed again and the whole stream sent again."""
    with open_source(source) as (stream, name, size):
        filename = filename or name
        content_type = content_type or guess_content_type(filename)
        start = stream.tell()
        for sign_attempt in range(2):
            stream.seek(start)
            upload_url, fields = sign(content_type, filename)
            if not put(
                session, settings, upload_url, stream, content_type, size, filename, sign_attempt == 1, log
            ):
                break
        log.info("Uploaded %s (%s bytes) to SpeedPix as %s", filename, size, fields["access_url"])
        return UploadedFile(filename=filename, content_type=content_type, size=size, **fields)


def put(
    session: requests.Session,
    settings: SpeedPixSettings,
    upload_url: str,
    stream: IO[bytes],
    content_type: str,
    size: int,
    filename: str,
    last: bool,
    log: Any,
) -> bool:
    """PUT ``size`` bytes of the (seekable) stream from its current position, rewinding to that position
    before every attempt; returns True when the URL had expired (and ``last`` is False)."""
    host = urllib.parse.urlsplit(upload_url).netloc
    start = stream.tell()
    headers = {"Content-Type": content_type, "Content-Length": str(size)}

    def attempt() -> bool:
        stream.seek(start)
        body = _ExactBody(stream, size, filename)
        try:
            response = session.put(upload_url, data=body, headers=headers, timeout=settings.timeout)
        except requests.RequestException as err:
            failure = requests_error("upload", err, host)
        else:
            if response.status_code < 300:
                return False
            text = response.text[:300]
            if response.status_code == 403 and "expired" in text.lower() and not last:
                return True
            raise SpeedPixUploadError(
                f"Uploading {filename!r} to {host} failed: HTTP {response.status_code} "
                f"{_xml_code(text)}. The pre-signed URL is single-use and short-lived; run the task again.",
                retryable=retryable_status(response.status_code),
            )
        raise SpeedPixUploadError(f"Uploading {filename!r}: {failure}", retryable=True)

    return settings.retry_policy.run("upload", attempt, log)


# ---------------------------------------------------------------------- download
def download(
    session: requests.Session, settings: SpeedPixSettings, url: str, destination: Any, log: Any
) -> Any:
    """Stream ``url`` to ``destination``; returns the written path (see ``SpeedPixHook.download``)."""
    scheme = urllib.parse.urlsplit(str(url)).scheme
    if scheme not in ("http", "https"):
        raise SpeedPixDownloadError(
            f"Refusing to download {unsigned_url(str(url))[:100]!r}: only http(s) URLs are fetched (got scheme {scheme!r})."
        )
    target = resolve_destination(url, destination)
    host = urllib.parse.urlsplit(url).netloc

    def attempt() -> Any:
        try:
            with session.get(url, stream=True, timeout=settings.timeout) as response:
                if response.status_code >= 400:
                    raise SpeedPixDownloadError(
                        f"Downloading {unsigned_url(url)} failed: HTTP {response.status_code}. Output URLs "
                        "are temporary; download soon after the prediction finishes.",
                        retryable=retryable_status(response.status_code),
                    )
                write_stream(
                    response.iter_content(CHUNK), target, expected_size=_expected_size(response.headers)
                )
                return target
        except requests.RequestException as err:
            # Raised below, outside this block: requests' error names the full URL (the query string of
            # a pre-signed URL is a credential) and would stay chained as __context__ even `from None`.
            failure: SpeedPixError = requests_error("download", err, host)
        raise SpeedPixDownloadError(f"Downloading {unsigned_url(url)}: {failure}", retryable=True)

    return settings.retry_policy.run("download", attempt, log)


def resolve_destination(url: str, destination: Any) -> Any:
    """A directory (existing, or ending with ``/``) gets the URL's safe file name; parents are made."""
    name = safe_filename(urllib.parse.urlsplit(url).path)
    if is_object_storage_path(destination):
        if str(destination).endswith("/") or destination.is_dir():
            destination = destination / name
        # Local and other hierarchical file systems need the folder; object stores ignore this.
        with contextlib.suppress(OSError, NotImplementedError):
            destination.parent.mkdir(parents=True, exist_ok=True)
        return destination
    if not isinstance(destination, str | os.PathLike):
        raise SpeedPixDownloadError(
            f"download: destination must be a path or ObjectStoragePath, got {type(destination).__name__}."
        )
    path = Path(destination).expanduser()
    if str(destination).endswith(("/", os.sep)) or path.is_dir():
        path = path / name
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SpeedPixDownloadError(
            f"download: cannot create directory {str(path.parent)!r} ({err.strerror}). Choose a writable "
            "output_dir."
        ) from None
    return path


def _expected_size(headers: Any) -> int | None:
    """The body's size from Content-Length, when the bytes written are the bytes sent (not decoded)."""
    if headers.get("Content-Encoding", "identity").strip().lower() not in ("", "identity"):
        return None
    try:
        size = int(headers.get("Content-Length", ""))
    except ValueError:
        return None
    return size if size >= 0 else None


def _temporary_sibling(target: Any) -> Any:
    """A unique name beside ``target`` for the bytes in flight (renamed onto ``target`` when complete)."""
    return target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.part")


def _move_into_place(partial: Any, target: Any) -> None:
    """Rename ``partial`` onto ``target``: ``os.replace`` locally; fsspec's ``mv`` for object storage
    (a rename where the file system has one, copy then delete where it has not)."""
    if isinstance(partial, Path):
        os.replace(partial, target)
        return
    fs = target.fs
    try:
        fs.mv(partial.path, target.path)
    except NotImplementedError:
        fs.copy(partial.path, target.path)
        fs.rm(partial.path)


def _remove(partial: Any) -> None:
    with contextlib.suppress(Exception):  # best effort: the original error is what matters
        if isinstance(partial, Path):
            partial.unlink(missing_ok=True)
        elif partial.exists():
            partial.fs.rm(partial.path)


def write_stream(chunks: Iterator[bytes], target: Any, *, expected_size: int | None = None) -> None:
    """Write chunks to ``target`` atomically: to a temporary sibling first, moved onto ``target`` only
    when complete (and ``expected_size`` bytes long, when given); on any failure the temporary is
    deleted and ``target`` is left as it was. Works for local paths and any ``ObjectStoragePath``.

    A broken stream (a ``requests`` error) is re-raised for the caller to retry; a short body is a
    retryable :class:`SpeedPixDownloadError`; a file-system error becomes a
    :class:`SpeedPixDownloadError` naming the destination.
    """
    partial = _temporary_sibling(target)
    try:
        written = 0
        with partial.open("wb") as out:
            for chunk in chunks:
                out.write(chunk)
                written += len(chunk)
        if expected_size is not None and written != expected_size:
            raise SpeedPixDownloadError(
                f"download: the body of {target.name} ended after {written} of {expected_size} bytes "
                "(connection cut); nothing was saved.",
                retryable=True,
            )
        _move_into_place(partial, target)
    except BaseException as err:
        _remove(partial)
        if isinstance(err, OSError) and not isinstance(err, requests.RequestException):
            reason = err.strerror or str(err)
            raise SpeedPixDownloadError(
                f"download: cannot write {target} ({reason}). Choose a writable output_dir."
            ) from None
        raise
