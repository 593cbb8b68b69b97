"""The request fingerprint: equal exactly when the same thing was asked."""

from __future__ import annotations

import datetime
import io
import os
from pathlib import Path

import pytest
from airflow.sdk import ObjectStoragePath

from airflow_provider_speedpix._fingerprint import request_fingerprint


def fp(workflow_id: str = "wf-a", inputs: dict | None = None, **kw) -> str:
    return request_fingerprint(workflow_id, {"text": "t"} if inputs is None else inputs, **kw)


def test_same_request_same_digest_and_format() -> None:
    a, b = fp(inputs={"x": 1, "y": [1, 2]}), fp(inputs={"y": [1, 2], "x": 1})
    assert a == b
    assert a.startswith("v1:") and len(a) == 3 + 64


@pytest.mark.parametrize(
    "change",
    [
        {"workflow_id": "wf-b"},
        {"alias_id": "beta"},
        {"version_id": "v2"},
        {"resource_config_id": "pool-a"},
        {"randomise_seeds": True},
        {"return_temp_files": True},
        {"file_encoding_strategy": "base64"},
        {"inputs": {"text": "other"}},
        {"inputs": {"text": "t", "extra": None}},
        {"inputs": {"text": ["t"]}},
        {"inputs": {"text": 1}},
    ],
)
def test_any_change_changes_the_digest(change: dict) -> None:
    assert fp(**change) != fp()


def test_files_count_by_what_the_user_passed(tmp_path: Path) -> None:
    image = tmp_path / "mug.png"
    image.write_bytes(b"\x89PNG one")
    before = fp(inputs={"image": image})
    image.write_bytes(b"\x89PNG two")  # same path: same ask (the upload URL differs every try anyway)
    assert fp(inputs={"image": image}) == before
    assert fp(inputs={"image": tmp_path / "cup.png"}) != before
    # a Path and the same text are different asks (text may be a prompt)
    assert fp(inputs={"image": str(image)}) != before


def test_object_storage_paths_count_by_uri() -> None:
    a = ObjectStoragePath("file:///data/a.png")
    assert fp(inputs={"i": a}) == fp(inputs={"i": ObjectStoragePath("file:///data/a.png")})
    assert fp(inputs={"i": a}) != fp(inputs={"i": ObjectStoragePath("file:///data/b.png")})


def test_named_file_objects_count_by_name_and_are_not_consumed(tmp_path: Path) -> None:
    path = tmp_path / "in.png"
    path.write_bytes(b"abc")
    with open(path, "rb") as f1, open(path, "rb") as f2:
        f1.read(1)
        assert fp(inputs={"i": f1}) == fp(inputs={"i": f2})
        assert f1.tell() == 1 and f2.tell() == 0


def test_unnamed_seekable_streams_count_by_content_and_keep_their_position() -> None:
    s = io.BytesIO(b"hello")
    s.seek(2)
    digest = fp(inputs={"i": s})
    assert s.tell() == 2
    assert digest == fp(inputs={"i": io.BytesIO(b"llo")})
    assert digest != fp(inputs={"i": io.BytesIO(b"hello")})


def test_unrepeatable_streams_never_match() -> None:
    r, w = os.pipe()
    os.close(w)
    with os.fdopen(r, "rb", buffering=0) as pipe:
        # a pipe's name is its fd number (an int), so it counts as unnamed and cannot be re-read
        assert fp(inputs={"i": pipe}) != fp(inputs={"i": pipe})


def test_dates_bytes_sets_and_unicode_are_stable() -> None:
    inputs = {
        "when": datetime.date(2026, 11, 29),
        "raw": b"\x00\x01",
        "tags": {"b", "a"},
        "text": "白色背景 \ud800",  # a lone surrogate must not crash the digest
    }
    assert fp(inputs=inputs) == fp(inputs=dict(reversed(list(inputs.items()))))
    assert fp(inputs={**inputs, "raw": b"\x00\x02"}) != fp(inputs=inputs)
