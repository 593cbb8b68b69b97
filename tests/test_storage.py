"""Bytes in and out, against the real emulator: every upload source sends exactly its bytes (or is refused
before any billed call), and every download destination is written completely or not at all.

Uploads: the emulator keeps what each PUT stored (``EmulatorState.uploads[key].path``); each test compares
those bytes with what was passed. Downloads cut off mid-body come from :class:`CutOffServer`, a tiny
HTTP server on a real socket that announces the whole Content-Length, sends half the body and closes
(the emulator's faults either answer before any byte or send a consistent, shorter answer).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import socket
import threading
import tracemalloc
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from airflow_provider_speedpix._storage import size_of, write_stream
from airflow_provider_speedpix.exceptions import (
    SpeedPixDownloadError,
    SpeedPixError,
    SpeedPixInputError,
)
from airflow_provider_speedpix.hooks.speedpix import SpeedPixHook

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: over the spool's in-memory threshold (1 MiB), not a multiple of any chunk size
CONTENT = PNG_MAGIC + os.urandom(3 * 1024 * 1024 + 12345)


@pytest.fixture
def hook(speedpix_conn):
    return SpeedPixHook()


def stored(emulator) -> list[bytes]:
    """The bytes of every upload the emulator stored, in upload order."""
    uploads = emulator.app.state.emulator.uploads.values()
    return [Path(u.path).read_bytes() for u in uploads if u.path]


def api_calls(emulator) -> dict[str, int]:
    return {op: n for op, n in emulator.stats()["calls"].items() if n}


def assert_refused_before_any_call(err: BaseException, emulator, *fragments: str) -> None:
    assert isinstance(err, SpeedPixInputError), repr(err)
    for fragment in fragments:
        assert fragment in str(err), (fragment, str(err))
    assert err.__cause__ is None
    assert api_calls(emulator) == {}  # not even the upload-sign call, let alone the billed create


def feed(write_end, data: bytes) -> threading.Thread:
    """Write ``data`` into a pipe or socket from a thread (it blocks until read), then close it."""

    def run() -> None:
        with write_end:
            write_end.write(data)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.fixture(params=["pipe", "socket"])
def unsized_stream(request) -> Iterator[io.BufferedReader]:
    """A stream whose descriptor is a pipe or a socket: fstat says 0, only reading tells its size."""
    if request.param == "pipe":
        read_fd, write_fd = os.pipe()
        reader = os.fdopen(read_fd, "rb")
        writer = feed(os.fdopen(write_fd, "wb"), CONTENT)
    else:
        left, right = socket.socketpair()
        reader = left.makefile("rb")
        writer = feed(right.makefile("wb"), CONTENT)
        right.close()
        left.close()  # the makefile objects keep the sockets open
    with reader:
        yield reader
    writer.join(5)


# ---------------------------------------------------------------------- uploads: exactly its bytes
def test_same_file_object_twice_is_uploaded_once_and_its_url_reused(hook, emulator, tmp_path):
    path = tmp_path / "in.png"
    path.write_bytes(CONTENT)
    with path.open("rb") as stream:
        prediction = hook.create_prediction("wf-1", {"a": stream, "b": stream})
    sent = emulator.app.state.emulator.tasks[prediction.id].inputs
    assert sent["a"] == sent["b"]
    assert stored(emulator) == [CONTENT]
    assert emulator.stats()["calls"]["upload_put"] == 1


@pytest.mark.parametrize("kind", ["bytesio", "file_at_its_end", "empty_pipe", "object_storage_path"])
def test_empty_stream_with_url_strategy_is_refused_before_any_call(hook, emulator, tmp_path, kind):
    from airflow.sdk import ObjectStoragePath

    path = tmp_path / "in.png"
    path.write_bytes(b"" if kind == "object_storage_path" else CONTENT)
    with contextlib.ExitStack() as stack:
        if kind == "bytesio":
            value = io.BytesIO()
        elif kind == "file_at_its_end":
            value = stack.enter_context(path.open("rb"))
            value.read()
        elif kind == "empty_pipe":
            read_fd, write_fd = os.pipe()
            os.close(write_fd)
            value = stack.enter_context(os.fdopen(read_fd, "rb"))
        else:
            value = ObjectStoragePath(f"file://{path}")
        with pytest.raises(SpeedPixError) as info:
            hook.create_prediction("wf-1", {"image": value})
    assert_refused_before_any_call(info.value, emulator, "inputs['image']: ", "is empty (0 bytes", "pass a")


def test_streamed_http_response_body_is_uploaded_exactly(hook, emulator, tmp_path):
    source = tmp_path / "src.png"
    source.write_bytes(CONTENT)
    served = hook.upload_file(source).access_url
    with requests.get(served, stream=True, timeout=10) as response:
        uploaded = hook.upload_file(response.raw, filename="relayed.png")
    assert uploaded.size == len(CONTENT)
    assert stored(emulator) == [CONTENT, CONTENT]


def put_headers(hook) -> list[dict[str, str]]:
    """Records the headers of every PUT the hook's session sends."""
    seen: list[dict[str, str]] = []

    def record(response, *args, **kwargs):
        if response.request.method == "PUT":
            seen.append(dict(response.request.headers))

    hook.get_conn().hooks["response"].append(record)
    return seen


def test_pipe_and_socket_streams_are_uploaded_exactly(hook, emulator, unsized_stream):
    """Exact bytes, with an exact Content-Length: a strict gateway refuses chunked PUTs."""
    assert size_of(unsized_stream) is None
    headers = put_headers(hook)
    prediction = hook.create_prediction("wf-1", {"image": unsized_stream})
    assert stored(emulator) == [CONTENT]
    assert [(h.get("Content-Length"), h.get("Transfer-Encoding")) for h in headers] == [
        (str(len(CONTENT)), None)
    ]
    assert emulator.app.state.emulator.tasks[prediction.id].inputs["image"].startswith(emulator.url)


def test_reader_whose_bytes_differ_from_its_file_size_is_uploaded_exactly(hook, emulator, tmp_path):
    """A gzip reader has the compressed file's descriptor; its bytes are the decompressed ones."""
    packed = tmp_path / "in.png.gz"
    packed.write_bytes(gzip.compress(CONTENT))
    assert packed.stat().st_size != len(CONTENT)
    with gzip.open(packed, "rb") as reader:
        uploaded = hook.upload_file(reader, filename="in.png")
    assert uploaded.size == len(CONTENT)
    assert stored(emulator) == [CONTENT]


@pytest.mark.parametrize("kind", ["open_r", "stringio"])
def test_text_stream_is_refused_before_any_call(hook, emulator, tmp_path, kind):
    path = tmp_path / "notes.txt"
    path.write_text("line one\r\nline two\n", newline="")
    text = path.open("r") if kind == "open_r" else io.StringIO("text")
    with text, pytest.raises(SpeedPixError) as info:
        hook.create_prediction("wf-1", {"doc": text})
    assert_refused_before_any_call(info.value, emulator, "inputs['doc']: ", "text mode", "open(path, 'rb')")


def test_file_opened_at_an_offset_sends_the_rest_and_retries_from_there(hook, emulator, tmp_path):
    path = tmp_path / "in.png"
    path.write_bytes(b"HEADER" + CONTENT)
    emulator.inject("upload_put", "500")
    with path.open("rb") as stream:
        stream.seek(6)
        uploaded = hook.upload_file(stream, filename="in.png")
    assert uploaded.size == len(CONTENT)
    assert stored(emulator) == [CONTENT]
    assert emulator.stats()["calls"]["upload_put"] == 2


def test_stream_of_unknown_size_is_retried_after_a_5xx(hook, emulator, unsized_stream):
    """Spooled first, so a failed PUT can be sent again (before: one attempt, the bytes were gone)."""
    emulator.inject("upload_put", "503")
    hook.upload_file(unsized_stream, filename="in.png")
    assert stored(emulator) == [CONTENT]
    assert emulator.stats()["calls"]["upload_put"] == 2


class ReadOnly:
    """Only ``read``: no seek, no size, no descriptor."""

    def __init__(self, data: bytes) -> None:
        self._inner = io.BytesIO(data)

    def read(self, size: int = -1) -> bytes:
        return self._inner.read(size)


def test_unknown_size_is_sent_with_an_exact_content_length_never_chunked(monkeypatch, requests_mock):
    from tests.test_hook_retries import SIGN_URL, SIGNED, use_connection

    use_connection(monkeypatch)
    requests_mock.post(SIGN_URL, json=SIGNED)
    bodies: list[bytes] = []

    def record(request, context):
        bodies.append(request.body.read())
        return ""

    put = requests_mock.put("https://oss.test/put/a.png", text=record)
    uploaded = SpeedPixHook().upload_file(ReadOnly(b"streamed" * 1000), filename="a.png")
    headers = put.last_request.headers
    assert headers["Content-Length"] == "8000"
    assert "Transfer-Encoding" not in headers
    assert bodies == [b"streamed" * 1000]
    assert uploaded.size == 8000


class GeneratedRaw(io.RawIOBase):
    """``size`` bytes made on the fly, 64 KiB at a time; not seekable, no descriptor."""

    def __init__(self, size: int) -> None:
        self._left = size
        self._block = bytes(range(256)) * 256

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), len(self._block), self._left)
        buffer[:n] = self._block[:n]
        self._left -= n
        return n


def test_large_stream_of_unknown_size_does_not_grow_memory(hook, emulator):
    size = 64 * 1024 * 1024
    tracemalloc.start()
    try:
        uploaded = hook.upload_file(io.BufferedReader(GeneratedRaw(size)), filename="big.bin")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert uploaded.size == size
    assert peak < 8 * 1024 * 1024, f"peak {peak / 2**20:.1f} MiB"
    upload = next(u for u in emulator.app.state.emulator.uploads.values() if u.path)
    assert upload.size == size
    digest = hashlib.sha256()
    expected = hashlib.sha256()
    with open(upload.path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    reference = GeneratedRaw(size)
    for block in iter(lambda: reference.read(1 << 20), b""):
        expected.update(block)
    assert digest.hexdigest() == expected.hexdigest()


def test_object_storage_path_in_memory_is_uploaded_exactly(hook, emulator, memory_dir):
    source = memory_dir / "in.png"
    source.write_bytes(CONTENT)
    uploaded = hook.upload_file(source)
    assert (uploaded.filename, uploaded.size) == ("in.png", len(CONTENT))
    assert stored(emulator) == [CONTENT]


# ---------------------------------------------------------------------- downloads: all or nothing
class CutOffServer:
    """Answers every GET with 200, the full Content-Length, half the body, then closes the connection."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.gets = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                outer.gets += 1
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(outer.body)))
                self.end_headers()
                self.wfile.write(outer.body[: len(outer.body) // 2])
                self.wfile.flush()
                self.close_connection = True

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/out/output.png?Signature=SECRET"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> CutOffServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def memory_dir():
    """A fresh ``memory://`` directory as an ``ObjectStoragePath`` (the fsspec in-memory file system)."""
    from airflow.sdk import ObjectStoragePath
    from airflow.sdk.io import attach
    from fsspec.implementations.memory import MemoryFileSystem

    attach("memory", fs=MemoryFileSystem())
    root = ObjectStoragePath(f"memory://speedpix-tests/{uuid.uuid4().hex}")
    root.mkdir(parents=True, exist_ok=True)
    yield root
    root.fs.rm(root.path, recursive=True)


def listing(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture(params=["local_path", "file_object_storage_path", "memory_object_storage_path"])
def destination_dir(request, tmp_path, memory_dir):
    from airflow.sdk import ObjectStoragePath

    if request.param == "local_path":
        (tmp_path / "dest").mkdir()
        return tmp_path / "dest"
    if request.param == "file_object_storage_path":
        (tmp_path / "dest-osp").mkdir()
        return ObjectStoragePath(f"file://{tmp_path}/dest-osp/")
    return memory_dir


def test_download_cut_off_every_time_leaves_nothing(hook, destination_dir):
    """Every attempt is cut mid-body: the task fails and the destination holds no partial file."""
    with CutOffServer(CONTENT) as server, pytest.raises(SpeedPixDownloadError) as info:
        hook.download(server.url, destination_dir / "saved.png")
    assert server.gets == 2  # the connection's retry_limit: a cut body is retried
    assert "SECRET" not in str(info.value)
    assert listing(destination_dir) == []


def test_download_cut_off_keeps_the_previous_file_intact(hook, destination_dir):
    target = destination_dir / "saved.png"
    target.write_bytes(b"the previous, complete file")
    with CutOffServer(CONTENT) as server, pytest.raises(SpeedPixDownloadError):
        hook.download(server.url, target)
    assert target.read_bytes() == b"the previous, complete file"
    assert listing(destination_dir) == ["saved.png"]


def test_download_to_every_destination_kind_is_complete(hook, emulator, tmp_path, destination_dir):
    source = tmp_path / "src.png"
    source.write_bytes(CONTENT)
    url = hook.upload_file(source).access_url
    written = hook.download(url, destination_dir / "saved.png")
    assert written.read_bytes() == CONTENT
    assert "saved.png" in listing(destination_dir)
    assert not [name for name in listing(destination_dir) if name.endswith(".part")]


@pytest.mark.parametrize("kind", ["local_path", "memory_object_storage_path"])
def test_short_body_is_refused_and_nothing_kept(tmp_path, memory_dir, kind):
    """A body shorter than its Content-Length (checked even where the HTTP library does not) is a
    retryable download error and leaves no file."""
    directory = tmp_path if kind == "local_path" else memory_dir
    with pytest.raises(SpeedPixDownloadError, match="ended after 3 of 10 bytes") as info:
        write_stream(iter([b"abc"]), directory / "out.png", expected_size=10)
    assert info.value.retryable
    assert listing(directory) == []
