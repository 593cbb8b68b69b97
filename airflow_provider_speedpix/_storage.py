"""Bytes in and out: open and size an upload source, stream it to a pre-signed URL, stream an output
URL to a local path or an ``ObjectStoragePath`` (a local file appears only when complete), and the safe
file names that keep a server-provided name inside its destination.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import urllib.parse
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
from airflow_provider_speedpix._protocol import UploadedFile
from airflow_provider_speedpix._retry import retryable_status
from airflow_provider_speedpix._settings import SpeedPixSettings
from airflow_provider_speedpix._transport import CHUNK, requests_error
from airflow_provider_speedpix.exceptions import (
    SpeedPixConfigError,
    SpeedPixDownloadError,
    SpeedPixError,
    SpeedPixUploadError,
)

#: ``sign(content_type, filename) -> (upload_url, UploadedFile fields)``: the API's upload-sign call.
Signer = Callable[[str, str], tuple[str, dict[str, Any]]]


def safe_filename(name: str, fallback: str = "output") -> str:
    """A file name from a server-provided URL that cannot escape the destination directory."""
    name = urllib.parse.unquote(name).replace("\\", "/").rsplit("/", 1)[-1]
    name = re.sub(r"[^\w.\-]+", "_", name).strip("._") or fallback
    return name[:200]


def url_for_log(url: str) -> str:
    """Scheme, host and path only: query strings of storage URLs are credentials."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def _xml_code(text: str) -> str:
    match = re.search(r"<Code>([^<]{1,64})</Code>", text)
    return match.group(1) if match else ""


# ---------------------------------------------------------------------- upload
def _seekable(stream: Any) -> bool:
    try:
        return bool(stream.seekable())
    except (AttributeError, OSError, ValueError):
        return False


def size_of(stream: Any) -> int | None:
    with contextlib.suppress(AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return os.fstat(stream.fileno()).st_size - stream.tell()
    if _seekable(stream):
        here = stream.tell()
        end = stream.seek(0, os.SEEK_END)
        stream.seek(here)
        return end - here
    return None


@contextlib.contextmanager
def open_source(source: Any) -> Iterator[tuple[IO[bytes], str]]:
    """Yield ``(binary stream, file name)`` for any supported upload source, closing what it opened."""
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
    """Sign, then stream ``source`` to the pre-signed URL; a URL that expired before its PUT is signed
    again and the whole stream sent again (when it can be rewound)."""
    with open_source(source) as (stream, name):
        filename = filename or name
        content_type = content_type or guess_content_type(filename)
        size = size_of(stream)
        # The first PUT consumes the stream: rewind before sending it again (a stream that cannot be
        # rewound is not re-signed, its bytes are gone).
        start = stream.tell() if _seekable(stream) else None
        for sign_attempt in range(2):
            if start is not None:
                stream.seek(start)
            upload_url, fields = sign(content_type, filename)
            last = sign_attempt == 1 or start is None
            if not put(session, settings, upload_url, stream, content_type, size, filename, last, log):
                break
        log.info("Uploaded %s (%s bytes) to SpeedPix as %s", filename, size, fields["access_url"])
        return UploadedFile(filename=filename, content_type=content_type, size=size, **fields)


def put(
    session: requests.Session,
    settings: SpeedPixSettings,
    upload_url: str,
    stream: IO[bytes],
    content_type: str,
    size: int | None,
    filename: str,
    last: bool,
    log: Any,
) -> bool:
    """PUT the stream; returns True when the URL had expired (and ``last`` is False)."""
    host = urllib.parse.urlsplit(upload_url).netloc
    start = stream.tell() if _seekable(stream) else None
    headers = {"Content-Type": content_type}
    if size is not None:
        headers["Content-Length"] = str(size)

    def attempt() -> bool:
        if start is not None:
            stream.seek(start)
        body: Any = stream if size is not None else iter(lambda: stream.read(CHUNK), b"")
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

    policy = settings.retry_policy
    return (
        policy.run("upload", attempt, log)
        if start is not None
        else policy.with_attempts(1).run("upload", attempt, log)
    )


# ---------------------------------------------------------------------- download
def download(
    session: requests.Session, settings: SpeedPixSettings, url: str, destination: Any, log: Any
) -> Any:
    """Stream ``url`` to ``destination``; returns the written path (see ``SpeedPixHook.download``)."""
    scheme = urllib.parse.urlsplit(str(url)).scheme
    if scheme not in ("http", "https"):
        raise SpeedPixDownloadError(
            f"Refusing to download {url_for_log(str(url))[:100]!r}: only http(s) URLs are fetched (got scheme {scheme!r})."
        )
    target = resolve_destination(url, destination)
    host = urllib.parse.urlsplit(url).netloc

    def attempt() -> Any:
        try:
            with session.get(url, stream=True, timeout=settings.timeout) as response:
                if response.status_code >= 400:
                    raise SpeedPixDownloadError(
                        f"Downloading {url_for_log(url)} failed: HTTP {response.status_code}. Output URLs "
                        "are temporary; download soon after the prediction finishes.",
                        retryable=retryable_status(response.status_code),
                    )
                write_stream(response.iter_content(CHUNK), target)
                return target
        except requests.RequestException as err:
            # Raised below, outside this block: requests' error names the full URL (the query string of
            # a pre-signed URL is a credential) and would stay chained as __context__ even `from None`.
            failure: SpeedPixError = requests_error("download", err, host)
        raise SpeedPixDownloadError(f"Downloading {url_for_log(url)}: {failure}", retryable=True)

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


def write_stream(chunks: Iterator[bytes], target: Any) -> None:
    """Write chunks to ``target``; a local file appears only when complete (written as ``.part`` first).

    A broken stream (a ``requests`` error) is re-raised for the caller to retry; a file-system error
    becomes a :class:`SpeedPixDownloadError` naming the destination.
    """
    local = isinstance(target, Path)
    partial = target.with_name(target.name + ".part") if local else target
    try:
        with partial.open("wb") as out:
            for chunk in chunks:
                out.write(chunk)
        if local:
            os.replace(partial, target)
    except BaseException as err:
        if local:
            with contextlib.suppress(OSError):
                partial.unlink()
        if isinstance(err, OSError) and not isinstance(err, requests.RequestException):
            reason = err.strerror or str(err)
            raise SpeedPixDownloadError(
                f"download: cannot write {target} ({reason}). Choose a writable output_dir."
            ) from None
        raise
