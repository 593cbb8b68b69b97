"""The official ``speedpix`` SDK (reference client) against the emulator, unmodified.

If the emulator accepts what the SDK sends and the SDK can parse what the emulator answers, the emulator
speaks the protocol the real service speaks (as far as the published client can tell).
"""

from __future__ import annotations

import asyncio

import pytest

from airflow_provider_speedpix.emulator import make_png, parse_png

speedpix = pytest.importorskip("speedpix")
from speedpix.exceptions import PredictionError  # noqa: E402


@pytest.fixture
def client(emulator):
    with speedpix.Client(emulator.app_key, emulator.app_secret, endpoint=emulator.url) as c:
        yield c


@pytest.fixture
def input_png(tmp_path):
    path = tmp_path / "input.png"
    path.write_bytes(make_png(16, 16))
    return path


def test_seed_quickstart_unmodified(emulator, client, input_png, tmp_path):
    output = client.run(
        workflow_id="your_workflow_id",
        input={"text": "A beautiful landscape painting", "image": str(input_png)},
        alias_id="main",
    )
    output["images"]["url"].save(tmp_path / "output.png")
    saved = (tmp_path / "output.png").read_bytes()
    info = parse_png(saved)
    assert (info["width"], info["height"]) == (64, 64)
    stats = emulator.stats()
    assert stats["calls"]["comfy_prompt"] == 1
    assert stats["predictions"] == 1
    assert stats["calls"]["sp_create_temp_file_upload_sign"] == 1
    assert stats["calls"]["upload_put"] == 1
    assert stats["uploads"] == 1
    assert stats["rejected"] == {}


def test_uploaded_input_reaches_the_task(emulator, client, input_png):
    import requests

    uploaded = client.files.create(input_png)
    assert uploaded.access_url.startswith(emulator.url)
    assert uploaded.object_key.endswith(".png")
    assert requests.get(uploaded.access_url, timeout=5).content == input_png.read_bytes()
    stats = emulator.stats()
    assert stats["calls"]["sp_create_temp_file_upload_sign"] == 1
    assert stats["calls"]["upload_put"] == 1


def test_files_create_non_ascii_name(emulator, client, tmp_path):
    path = tmp_path / "产品 照片.png"
    path.write_bytes(make_png(8, 8))
    uploaded = client.files.create(path)
    assert uploaded.access_url.isascii()
    assert uploaded.content_type == "image/png"


def test_predictions_create_then_wait(emulator, client):
    prediction = client.predictions.create(
        workflow_id="wf-123", input={"text": "hi"}, return_temp_files=True, resource_config_id="default"
    )
    assert prediction.status == "waiting"
    prediction = prediction.wait(polling_interval=0.1)
    assert prediction.status == "succeeded"
    assert prediction.error is None
    assert prediction.invoke_id
    parse_png(prediction.output["images"]["url"].read())
    parse_png(prediction.output["mask_image"]["url"].read())
    assert emulator.stats()["calls"]["comfy_prompt"] == 1


def test_failing_workflow_surfaces_sdk_error(emulator, client):
    with pytest.raises(PredictionError):
        client.run(workflow_id="wf-fail", input={"text": "x"}, polling_interval=0.1)
    prediction = client.predictions.create(workflow_id="wf-fail", input={}).wait(polling_interval=0.1)
    assert prediction.status == "failed"
    assert prediction.error_code == "WORKFLOW_EXECUTION_FAILED"
    assert "failed" in prediction.error


def test_missing_workflow_surfaces_sdk_error(emulator, client):
    with pytest.raises(Exception, match="WorkflowNotFound"):
        client.predictions.create(workflow_id="wf-missing", input={})
    assert emulator.stats()["predictions"] == 0


def test_async_run(emulator, input_png, tmp_path):
    async def main():
        async with speedpix.Client(emulator.app_key, emulator.app_secret, endpoint=emulator.url) as c:
            out = await c.async_run(
                workflow_id="your_workflow_id",
                input={"text": "A beautiful landscape painting", "image": str(input_png)},
                alias_id="main",
                polling_interval=0.2,
            )
            return await out["images"]["url"].async_read()

    parse_png(asyncio.run(main()))
    stats = emulator.stats()
    assert stats["calls"]["comfy_prompt"] == 1
    assert stats["calls"]["upload_put"] == 1
