"""Extra links "SpeedPix outputs" and "SpeedPix console": stored before the task defers, read back by
Airflow's api-server while the task is deferred and after it finished, never holding a secret."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any
from urllib.parse import quote

import pytest

from airflow_provider_speedpix import get_provider_info
from airflow_provider_speedpix.links import (
    GALLERY_PATH,
    SpeedPixConsoleLink,
    SpeedPixOutputsLink,
    console_url,
    outputs_url,
)
from airflow_provider_speedpix.operators.batch import SpeedPixBatchRunOperator
from airflow_provider_speedpix.operators.speedpix import SpeedPixRunOperator
from tests.test_gallery import api  # noqa: F401 - the api-server app and a signed-in TestClient
from tests.test_operator import HEADER, ti_of, xcom

LINK_KEYS = {"SpeedPix outputs": "speedpix_outputs_link", "SpeedPix console": "speedpix_console_link"}


def gallery_url(dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> str:
    path = f"/speedpix/gallery/dags/{dag_id}/runs/{quote(run_id, safe='')}"
    return f"{path}?task_id={task_id}&map_index={map_index}"


def links_via_api(client: Any, dag_id: str, run_id: str, task_id: str) -> dict[str, str | None]:
    response = client.get(
        f"/api/v2/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances/{task_id}/links"
    )
    assert response.status_code == 200, response.text
    return response.json()["extra_links"]


@pytest.fixture
def while_deferred(monkeypatch, api):  # noqa: F811
    """Calls Airflow's extra-links API for every task at the moment it has deferred: ``dag.test()`` runs
    the trigger inline right then, before the task resumes. Yields ``{task_id: (return value, links)}``
    as seen then (no return value yet: the task has not finished)."""
    from airflow.sdk.definitions import dag as dag_module

    seen: dict[str, tuple[Any, dict[str, str | None]]] = {}
    original = dag_module._run_inline_trigger

    def look_then_run(trigger: Any, task_sdk_ti: Any) -> Any:
        dag_id, run_id, task_id = task_sdk_ti.dag_id, task_sdk_ti.run_id, task_sdk_ti.task_id
        result = xcom(SimpleNamespace(dag_id=dag_id, run_id=run_id), task_id)
        seen.setdefault(task_id, (result, links_via_api(api, dag_id, run_id, task_id)))
        return original(trigger, task_sdk_ti)

    monkeypatch.setattr(dag_module, "_run_inline_trigger", look_then_run)
    return seen


def test_links_are_there_while_deferred_and_after(run_dag, speedpix_conn, tmp_path, while_deferred, api):  # noqa: F811
    out = tmp_path / "out"
    dr = run_dag(
        HEADER
        + f"""
from airflow_provider_speedpix.operators.batch import SpeedPixBatchRunOperator
SpeedPixRunOperator(task_id="run", dag=dag, workflow_id="wf-white", inputs={{"text": "x"}}, deferrable=True,
    poll_interval=0.1, timeout=60, output_dir={str(out)!r})
SpeedPixBatchRunOperator(task_id="batch", dag=dag, workflow_id="wf-white", items=[{{"text": "y"}}],
    deferrable=True, poll_interval=0.1, timeout=60, output_dir={str(out / "batch")!r})
"""
    )
    assert dr.state == "success"
    console = speedpix_conn.url.rstrip("/") + "/"
    for task_id in ("run", "batch"):
        expected = {
            "SpeedPix console": console,
            "SpeedPix outputs": gallery_url(dr.dag_id, dr.run_id, task_id),
        }
        result, links = while_deferred[task_id]
        assert result is None
        assert links == expected, task_id
        assert links_via_api(api, dr.dag_id, dr.run_id, task_id) == expected  # still there after the resume
        assert xcom(dr, task_id, SpeedPixOutputsLink.xcom_key) == expected["SpeedPix outputs"]
        assert ti_of(dr, task_id).state == "success"


def test_get_link_reads_the_stored_url(run_dag, speedpix_conn):
    """What the api-server runs for a serialized operator (an ``XComOperatorLink`` by the link's name
    and xcom_key), and the links an operator declares."""
    from airflow.serialization.definitions.operatorlink import XComOperatorLink

    dr = run_dag(
        HEADER
        + """
SpeedPixRunOperator(task_id="run", dag=dag, workflow_id="wf-white", inputs={"text": "x"}, deferrable=False,
    poll_interval=0.1, timeout=60)
"""
    )
    ti = ti_of(dr, "run")
    link = XComOperatorLink(name=SpeedPixConsoleLink.name, xcom_key=SpeedPixConsoleLink.xcom_key)
    assert link.get_link(ti.task, ti_key=ti.key) == speedpix_conn.url.rstrip("/") + "/"
    # no output_dir: nothing is saved, so no outputs link (empty: the api-server shows no button)
    outputs = XComOperatorLink(name=SpeedPixOutputsLink.name, xcom_key=SpeedPixOutputsLink.xcom_key)
    assert outputs.get_link(ti.task, ti_key=ti.key) == ""
    for operator in (SpeedPixRunOperator, SpeedPixBatchRunOperator):
        assert {link.name: link.xcom_key for link in operator.operator_extra_links} == LINK_KEYS


def test_links_hold_no_secret(run_dag, speedpix_conn, tmp_path):
    dr = run_dag(
        HEADER
        + f"""
SpeedPixRunOperator(task_id="run", dag=dag, workflow_id="wf-white", inputs={{"text": "x"}}, deferrable=True,
    poll_interval=0.1, timeout=60, output_dir={str(tmp_path)!r})
"""
    )
    for key in LINK_KEYS.values():
        value = xcom(dr, "run", key)
        assert speedpix_conn.app_secret not in value and speedpix_conn.app_key not in value
        assert "Signature" not in value and "Expires" not in value


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("s3://bucket/out/run 1", "https://s3.console.aws.amazon.com/s3/buckets/bucket?prefix=out/run%201/"),
        ("s3://aws_default@bucket/out/", "https://s3.console.aws.amazon.com/s3/buckets/bucket?prefix=out/"),
        ("s3://bucket", "https://s3.console.aws.amazon.com/s3/buckets/bucket?prefix="),
        ("gs://bucket/a/b", "https://console.cloud.google.com/storage/browser/bucket/a/b/"),
    ],
)
def test_object_storage_outputs_open_the_storage_console(location, expected):
    from airflow.sdk import ObjectStoragePath

    assert outputs_url(location, dag_id="d", run_id="r", task_id="t") == expected
    assert outputs_url(ObjectStoragePath(location), dag_id="d", run_id="r", task_id="t") == expected


def test_local_outputs_open_the_gallery_under_the_base_url(monkeypatch, tmp_path):
    from airflow_provider_speedpix.plugins.gallery import URL_PREFIX

    assert GALLERY_PATH.startswith(URL_PREFIX + "/gallery/dags/")
    run_id = "manual__2026-01-01T00:00:00+00:00"
    assert outputs_url(tmp_path, dag_id="d", run_id=run_id, task_id="t", map_index=3) == gallery_url(
        "d", run_id, "t", 3
    )
    monkeypatch.setenv("AIRFLOW__API__BASE_URL", "https://airflow.example.com/team/")
    assert outputs_url("file:///x", dag_id="d", run_id="r", task_id="t") == (
        "https://airflow.example.com/team" + gallery_url("d", "r", "t")
    )


def test_console_is_the_endpoint_origin():
    assert (
        console_url("https://user:secret@openai.edu-aliyun.com/scc/x?token=1")
        == "https://openai.edu-aliyun.com/"
    )
    assert console_url(None) == "https://openai.edu-aliyun.com/"


def test_provider_info_registers_the_links():
    from airflow.sdk._shared.module_loading import import_string

    classes = [import_string(path) for path in get_provider_info()["extra-links"]]
    assert classes == [SpeedPixOutputsLink, SpeedPixConsoleLink]
