"""InputPreparer: which values are files, how they are sent, and what is rejected."""

from __future__ import annotations

import base64
import datetime
import io
import os
from pathlib import Path, PurePosixPath

import pytest

from airflow_provider_speedpix._inputs import (
    BASE64_LIMIT,
    InputPreparer,
    check_strategy,
    guess_content_type,
    looks_like_local_path,
)
from airflow_provider_speedpix.exceptions import SpeedPixConfigError, SpeedPixInputError

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32


class FakeUploader:
    def __init__(self):
        self.calls: list[tuple[object, str, str]] = []

    def __call__(self, source, filename, where):
        self.calls.append((source, filename, where))
        return f"https://cdn.example/{len(self.calls)}/{filename}"


@pytest.fixture
def uploader():
    return FakeUploader()


@pytest.fixture
def png(tmp_path):
    path = tmp_path / "photo.png"
    path.write_bytes(PNG)
    return path


def prepare(inputs, uploader, strategy="url"):
    return InputPreparer(uploader, strategy).prepare(inputs)


# ---------------------------------------------------------------- path-like strings
def test_existing_path_uploaded_once_even_if_repeated(png, uploader):
    out = prepare({"image": str(png), "again": str(png), "nested": {"list": [str(png), png]}}, uploader)
    assert len(uploader.calls) == 1
    source, filename, where = uploader.calls[0]
    assert Path(source) == png
    assert filename == "photo.png"
    assert where == "inputs['image']"
    url = "https://cdn.example/1/photo.png"
    assert out == {"image": url, "again": url, "nested": {"list": [url, url]}}


def test_relative_path(png, uploader, monkeypatch):
    monkeypatch.chdir(png.parent)
    out = prepare({"image": "./photo.png", "other": "../" + png.parent.name + "/photo.png"}, uploader)
    assert len(uploader.calls) == 1  # both resolve to the same file
    assert out["image"] == out["other"] == "https://cdn.example/1/photo.png"


def test_tilde_path(png, uploader, monkeypatch):
    monkeypatch.setenv("HOME", str(png.parent))
    assert prepare({"image": "~/photo.png"}, uploader)["image"].endswith("/photo.png")
    assert Path(uploader.calls[0][0]) == png


def test_missing_media_path_is_error_naming_the_place(uploader, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpeedPixInputError) as info:
        prepare({"text": "hi", "image": "./missing.png"}, uploader)
    assert "inputs['image']" in str(info.value)
    assert "missing.png" in str(info.value)
    assert "does not exist" in str(info.value)
    assert uploader.calls == []


def test_missing_media_path_nested_place(uploader):
    with pytest.raises(SpeedPixInputError, match=r"inputs\['cfg'\]\['refs'\]\[1\]"):
        prepare({"cfg": {"refs": ["text", "/nope/does-not-exist.JPG"]}}, uploader)


@pytest.mark.parametrize("text", ["/not a file", "/imagine a red car", "./not-media.txt", "~nobody/x", "/"])
def test_nonexistent_non_media_path_like_text_passes_through(text, uploader):
    if Path(text).expanduser().exists() and text != "/":
        pytest.skip("exists on this machine")
    if text == "/":
        # "/" exists and is a directory: it is a path, so it is rejected as a directory
        with pytest.raises(SpeedPixInputError, match="directory"):
            prepare({"text": text}, uploader)
        return
    assert prepare({"text": text}, uploader) == {"text": text}
    assert uploader.calls == []


@pytest.mark.parametrize("text", ["photo.png", "https://x/y.png", "C:", "a prompt", "", "white background"])
def test_plain_strings_are_text(text, uploader):
    assert prepare({"text": text}, uploader) == {"text": text}
    assert uploader.calls == []


def test_looks_like_local_path():
    for value in ("/a", "./a", "../a", "~/a", "C:\\x", "d:/x"):
        assert looks_like_local_path(value), value
    for value in ("a/b", "http://x", "C:", "Ca/x", ""):
        assert not looks_like_local_path(value), value


def test_directory_rejected(tmp_path, uploader):
    with pytest.raises(SpeedPixInputError, match=r"inputs\['image'\].*directory"):
        prepare({"image": str(tmp_path)}, uploader)
    with pytest.raises(SpeedPixInputError, match="directory"):
        prepare({"image": tmp_path}, uploader)


def test_empty_file_rejected(tmp_path, uploader):
    empty = tmp_path / "empty.png"
    empty.touch()
    with pytest.raises(SpeedPixInputError, match=r"inputs\['image'\].*empty"):
        prepare({"image": str(empty)}, uploader)
    with pytest.raises(SpeedPixInputError, match="empty"):
        prepare({"image": empty}, uploader, "base64")
    assert uploader.calls == []


def test_unreadable_file_rejected(png, uploader):
    png.chmod(0)
    try:
        if os.access(png, os.R_OK):
            pytest.skip("running as a user (root) that can read a chmod 000 file")
        with pytest.raises(SpeedPixInputError, match="not readable"):
            prepare({"image": str(png)}, uploader)
    finally:
        png.chmod(0o644)


def test_unreadable_file_rejected_even_as_root(png, uploader, monkeypatch):
    """The same rule when the test runs as root: the access check itself is simulated."""
    import airflow_provider_speedpix._inputs as inputs_module

    monkeypatch.setattr(inputs_module.os, "access", lambda path, mode: Path(path) != png)
    with pytest.raises(SpeedPixInputError, match=r"inputs\['image'\].*not readable"):
        prepare({"image": str(png)}, uploader)
    assert uploader.calls == []


# ---------------------------------------------------------------- other value types
def test_path_objects_are_always_files(png, uploader, tmp_path):
    out = prepare({"image": png}, uploader)
    assert out["image"] == "https://cdn.example/1/photo.png"
    with pytest.raises(SpeedPixInputError, match="does not exist"):
        prepare({"image": tmp_path / "nothing.txt"}, uploader)


def test_pure_path(png, uploader):
    out = prepare({"image": PurePosixPath(str(png))}, uploader)
    assert out["image"].endswith("photo.png")


def test_bytesio_is_uploaded_each_time(uploader):
    first, second = io.BytesIO(PNG), io.BytesIO(PNG)
    out = prepare({"a": first, "b": second}, uploader)
    assert [c[0] for c in uploader.calls] == [first, second]
    assert [c[1] for c in uploader.calls] == ["file", "file"]
    assert out == {"a": "https://cdn.example/1/file", "b": "https://cdn.example/2/file"}


def test_named_file_object_uses_basename(png, uploader):
    with png.open("rb") as fh:
        prepare({"image": fh}, uploader)
    assert uploader.calls[0][1] == "photo.png"


@pytest.mark.parametrize("raw", [b"bytes", bytearray(b"x"), memoryview(b"x")])
def test_bytes_rejected(raw, uploader):
    with pytest.raises(SpeedPixInputError, match=r"inputs\['blob'\].*BytesIO"):
        prepare({"blob": raw}, uploader)


def test_sets_and_tuples_become_lists(uploader):
    out = prepare({"s": {"b", "a", "c"}, "f": frozenset({2, 1}), "t": (1, "x")}, uploader)
    assert out == {"s": ["a", "b", "c"], "f": [1, 2], "t": [1, "x"]}


def test_dates_and_times(uploader):
    out = prepare(
        {
            "dt": datetime.datetime(2025, 11, 24, 16, 0, 0, tzinfo=datetime.UTC),
            "d": datetime.date(2025, 1, 2),
            "t": datetime.time(3, 4, 5),
        },
        uploader,
    )
    assert out == {"dt": "2025-11-24T16:00:00+00:00", "d": "2025-01-02", "t": "03:04:05"}


def test_scalars_and_nested(png, uploader):
    out = prepare(
        {
            1: None,
            "b": True,
            "i": 3,
            "f": 1.5,
            "text": "白色背景",
            "nested": {"list": [{"img": str(png)}, [png]], 2: "x"},
        },
        uploader,
    )
    url = "https://cdn.example/1/photo.png"
    assert out == {
        "1": None,
        "b": True,
        "i": 3,
        "f": 1.5,
        "text": "白色背景",
        "nested": {"list": [{"img": url}, [url]], "2": "x"},
    }
    assert uploader.calls[0][2] == "inputs['nested']['list'][0]['img']"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_floats_rejected(value, uploader):
    with pytest.raises(SpeedPixInputError, match=r"inputs\['x'\].*finite"):
        prepare({"x": value}, uploader)


def test_unknown_object_rejected_by_name(uploader):
    class Widget:
        pass

    with pytest.raises(SpeedPixInputError, match=r"inputs\['w'\]\[0\]: Widget"):
        prepare({"w": [Widget()]}, uploader)


@pytest.mark.parametrize("inputs", [["a"], "text", None, 3])
def test_inputs_must_be_mapping(inputs, uploader):
    with pytest.raises(SpeedPixInputError, match="must be a dict"):
        prepare(inputs, uploader)


def test_input_error_is_config_error_and_value_error():
    assert issubclass(SpeedPixInputError, SpeedPixConfigError)
    assert issubclass(SpeedPixInputError, ValueError)


# ---------------------------------------------------------------- base64 strategy
def decode_data_uri(uri):
    header, _, payload = uri.partition(",")
    return header, base64.b64decode(payload)


def test_base64_path_and_bytesio(png, uploader):
    out = prepare({"image": str(png), "again": png, "raw": io.BytesIO(b"hello")}, uploader, "base64")
    assert uploader.calls == []
    header, data = decode_data_uri(out["image"])
    assert header == "data:image/png;base64"
    assert data == PNG
    assert out["again"] == out["image"]
    header, data = decode_data_uri(out["raw"])
    assert header == "data:application/octet-stream;base64"
    assert data == b"hello"


def test_base64_exactly_one_mib_ok_and_one_more_byte_fails(tmp_path, uploader):
    exact = tmp_path / "exact.jpg"
    exact.write_bytes(b"\xff" * BASE64_LIMIT)
    assert BASE64_LIMIT == 1024 * 1024
    header, data = decode_data_uri(prepare({"image": exact}, uploader, "base64")["image"])
    assert header == "data:image/jpeg;base64"
    assert len(data) == BASE64_LIMIT

    over = tmp_path / "over.jpg"
    over.write_bytes(b"\xff" * (BASE64_LIMIT + 1))
    with pytest.raises(SpeedPixInputError, match=r"inputs\['image'\]: over\.jpg is over 1 MiB.*'url'"):
        prepare({"image": str(over)}, uploader, "base64")
    with pytest.raises(SpeedPixInputError, match="over 1 MiB"):
        prepare({"image": io.BytesIO(b"\0" * (BASE64_LIMIT + 1))}, uploader, "base64")
    assert uploader.calls == []


def test_base64_empty_stream_rejected(uploader):
    with pytest.raises(SpeedPixInputError, match="empty"):
        prepare({"image": io.BytesIO(b"")}, uploader, "base64")


def test_base64_text_stream_rejected(uploader, png):
    """A text stream has no bytes of its own (its encoding and newlines decide them): refused by name."""
    with pytest.raises(SpeedPixInputError, match=r"inputs\['doc'\]: file is open in text mode.*'rb'"):
        prepare({"doc": io.StringIO("白")}, uploader, "base64")
    with png.open("r", encoding="latin-1") as text, pytest.raises(SpeedPixInputError, match="text mode"):
        prepare({"doc": text}, uploader, "base64")


class ShortReads(io.RawIOBase):
    """A pipe-like reader: each read returns at most 7 bytes, however many were asked for."""

    def __init__(self, data: bytes) -> None:
        self._inner = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._inner.read(min(7, len(buffer)))
        buffer[: len(data)] = data
        return len(data)


def test_base64_reads_a_short_reading_stream_to_its_end(uploader):
    out = prepare({"image": ShortReads(PNG)}, uploader, "base64")
    assert decode_data_uri(out["image"])[1] == PNG


@pytest.mark.parametrize("strategy", ["url", "base64"])
def test_same_stream_twice_is_sent_once(uploader, strategy):
    """The second use of one file object would read it at its end: it reuses the first result."""
    stream = io.BytesIO(PNG)
    out = prepare({"a": stream, "b": stream, "nested": [{"c": stream}]}, uploader, strategy)
    assert out["a"] == out["b"] == out["nested"][0]["c"]
    if strategy == "url":
        assert [c[2] for c in uploader.calls] == ["inputs['a']"]
    else:
        assert decode_data_uri(out["b"])[1] == PNG


def test_upload_check_is_named_at_its_input(uploader):
    """upload_file's own refusals (empty, text, ...) name the input field when raised while preparing."""

    def refuse(source, filename, where):
        raise SpeedPixInputError("upload_file: file is empty (0 bytes)", reason="file is empty (0 bytes)")

    with pytest.raises(SpeedPixInputError) as info:
        InputPreparer(refuse).prepare({"cfg": {"image": io.BytesIO()}})
    assert str(info.value) == "inputs['cfg']['image']: file is empty (0 bytes)"
    assert info.value.__cause__ is None and info.value.__suppress_context__


@pytest.mark.parametrize("strategy", ["URL", "b64", "", None, "file"])
def test_bad_strategy(strategy, uploader):
    with pytest.raises(SpeedPixInputError, match="file_encoding_strategy"):
        InputPreparer(uploader, strategy)
    with pytest.raises(SpeedPixInputError):
        check_strategy(strategy)


def test_guess_content_type():
    assert guess_content_type("a.png") == "image/png"
    assert guess_content_type("产品 照片.JPG") == "image/jpeg"
    assert guess_content_type("noext") == "application/octet-stream"


# ---------------------------------------------------------------- ObjectStoragePath
def test_object_storage_path(png, uploader, tmp_path):
    from airflow.sdk import ObjectStoragePath

    osp = ObjectStoragePath(f"file://{png}")
    out = prepare({"image": osp, "same": ObjectStoragePath(f"file://{png}")}, uploader)
    assert len(uploader.calls) == 1
    assert uploader.calls[0][1] == "photo.png"
    assert out["image"] == out["same"]

    b64 = prepare({"image": osp}, uploader, "base64")["image"]
    assert decode_data_uri(b64)[1] == PNG

    with pytest.raises(SpeedPixInputError, match="not a file"):
        prepare({"image": ObjectStoragePath(f"file://{tmp_path}/missing.png")}, uploader)
