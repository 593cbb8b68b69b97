"""The gallery plugin's data layer and routes, through Airflow's own api-server app and a TestClient.

Real ``dag.test()`` runs against the emulator write the XComs, rendered fields and files the gallery
reads; the api-server app (``airflow.api_fastapi.app.create_app``) mounts the plugin from its
``airflow.plugins`` entry point, and requests carry a JWT from Airflow's auth manager. Authorization is
the auth manager's ``is_authorized_dag``: a user it refuses for a DAG gets 403 on every route.
"""

from __future__ import annotations

import json
import re

import pytest

from airflow_provider_speedpix import _png
from airflow_provider_speedpix.plugins import gallery, gallery_data
from tests.conftest import ROOT
from tests.test_operator import HEADER, ti_of

PRODUCT = ROOT / "dags_examples" / "data" / "product.png"


@pytest.fixture(scope="module")
def api():
    """Airflow's api-server app (plugins mounted) and a TestClient; all users are admins by default."""
    from airflow.api_fastapi.app import create_app, get_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
    from fastapi.testclient import TestClient

    mp = pytest.MonkeyPatch()
    mp.setenv(
        "AIRFLOW__CORE__AUTH_MANAGER",
        "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
    )
    mp.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS", "True")
    app = create_app(apps="core")
    client = TestClient(app)
    token = get_auth_manager().generate_jwt(SimpleAuthManagerUser(username="tester", role="admin"))
    client.headers["Authorization"] = f"Bearer {token}"
    yield client
    mp.undo()


@pytest.fixture
def run_with_images(run_dag, tmp_path):
    """One run: a succeeded task with two saved files (output + temp files) and a failed one."""
    out = tmp_path / "out"
    dr = run_dag(
        HEADER
        + f"""
SpeedPixRunOperator(task_id="white", dag=dag, workflow_id="wf-white", deferrable=False, poll_interval=0.1,
    inputs={{"image": {str(PRODUCT)!r}, "text": "white"}}, return_temp_files=True, output_dir={str(out)!r})
SpeedPixRunOperator(task_id="broken", dag=dag, workflow_id="wf-fail", inputs={{"text": "x"}},
    deferrable=False, poll_interval=0.1, timeout=60)
"""
    )
    assert ti_of(dr, "white").state == "success" and ti_of(dr, "broken").state == "failed"
    return dr


def page_url(dr, **query) -> str:
    from urllib.parse import quote, urlencode

    url = f"/speedpix/gallery/dags/{dr.dag_id}/runs/{quote(dr.run_id, safe='')}"
    return url + ("?" + urlencode(query) if query else "")


# ---------------------------------------------------------------------- data layer
def test_collect_reads_results_failures_and_workflow(run_with_images):
    from airflow.utils.session import create_session

    dr = run_with_images
    looked_up = []

    def lookup(conn_id, prediction_id):
        looked_up.append((conn_id, prediction_id))
        return gallery_data.speedpix_error(conn_id, prediction_id)

    with create_session() as session:
        entries = {
            e.task_id: e for e in gallery_data.collect(session, dr.dag_id, dr.run_id, error_lookup=lookup)
        }
    assert set(entries) == {"white", "broken"}
    [white] = entries["white"].predictions
    assert white.status == "succeeded" and white.workflow_id == "wf-white"
    assert white.run_seconds is not None and white.run_seconds > 0
    assert len(white.files) == 3 and white.file_indexes == [0, 1, 2]
    [broken] = entries["broken"].predictions
    assert broken.failed and broken.workflow_id == "wf-fail"
    assert broken.error_code == "WORKFLOW_EXECUTION_FAILED" and "KSampler" in broken.error_message
    assert looked_up == [("speedpix_default", broken.prediction_id)]  # the task's connection, once


def test_collect_reads_a_batch_manifest(tmp_path, monkeypatch):
    """A batch task's return value names its manifest; each row becomes one prediction."""
    image = tmp_path / "item-1" / "images.png"
    image.parent.mkdir()
    image.write_bytes(PRODUCT.read_bytes())
    manifest = tmp_path / "manifest.jsonl"
    rows = [
        {"item_id": "sku-1", "prediction_id": "p1", "status": "succeeded", "files": [str(image)],
         "run_seconds": 2.5, "attempts": 1, "error_code": None, "message": None},
        {"item_id": "sku-2", "prediction_id": "p2", "status": "failed", "files": [], "run_seconds": None,
         "attempts": 2, "error_code": "WORKFLOW_EXECUTION_FAILED", "message": "Node #7 failed"},
    ]  # fmt: skip
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = gallery_data.TaskEntry(task_id="batch", map_index=-1, state="success")
    gallery_data.manifest_predictions(task, gallery_data.read_manifest(str(manifest)), "wf-batch")
    assert [p.item_id for p in task.predictions] == ["sku-1", "sku-2"]
    assert task.files == [str(image)] and task.predictions[0].file_indexes == [0]
    assert task.predictions[1].failed and task.predictions[1].error_code == "WORKFLOW_EXECUTION_FAILED"
    assert all(p.workflow_id == "wf-batch" for p in task.predictions)
    assert gallery_data.is_batch_result({"manifest": str(manifest), "total": 2, "succeeded": 1})
    html = gallery.render("d", "r", [task])
    assert "sku-2" in html and "Node #7 failed" in html and "WORKFLOW_EXECUTION_FAILED" in html


def test_thumbnail_is_small_png():
    big = _png.encode_rgb(600, 300, bytes(range(256)) * (600 * 300 * 3 // 256) + bytes(600 * 300 * 3 % 256))
    thumb = _png.decode(_png.thumbnail(big, 240))
    assert (thumb.width, thumb.height) == (240, 120)


# ---------------------------------------------------------------------- routes
def test_page_shows_thumbnails_details_and_failures(api, run_with_images):
    dr = run_with_images
    page = api.get(page_url(dr), headers={"Accept": "text/html"})
    assert page.status_code == 200, page.text
    html = page.text
    prediction_id = ti_of(dr, "white").xcom_pull(task_ids="white", key="prediction_id")
    assert prediction_id in html and "wf-white" in html and "wf-fail" in html
    assert "WORKFLOW_EXECUTION_FAILED" in html
    assert "3 files, 1 failed" in html
    thumbs = re.findall(r"<img class='thumb' src='([^']+)'", html)
    assert len(thumbs) == 3
    base = page_url(dr).rsplit("/", 1)[0] + "/"
    for src in thumbs:
        response = api.get(base + src.removeprefix("./"))
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        assert response.headers["cache-control"].startswith("private")
        preview = _png.decode(response.content)
        assert max(preview.width, preview.height) <= gallery.THUMB_SIDE
    # the full file is there too, and it is the derived image (product on white)
    full = api.get(base + thumbs[0].removeprefix("./").replace("/thumb/", "/file/"))
    assert full.status_code == 200
    assert _png.decode(full.content).pixel(0, 0) == (255, 255, 255, 255)


def test_task_instance_view_and_unknown_files(api, run_with_images):
    dr = run_with_images
    html = api.get(page_url(dr, task_id="broken", map_index=-1)).text
    assert "wf-fail" in html and "wf-white" not in html
    base = page_url(dr).rsplit("/", 1)[0] + "/"
    from urllib.parse import quote

    run = quote(dr.run_id, safe="")
    assert api.get(f"{base}{run}/thumb/white/-1/3").status_code == 404  # only 3 files: 0..2
    assert api.get(f"{base}{run}/thumb/nope/-1/0").status_code == 404
    assert api.get(f"{base}{run}/file/white/-1/..%2F..%2Fetc%2Fpasswd").status_code in (404, 422)


def test_access_follows_airflows_auth(api, run_with_images, monkeypatch):
    """No session: 401 (a browser is sent to the login page). A user the auth manager refuses for this
    DAG: 403 on the page, the thumbnails and the files; the same user still sees other DAGs."""
    from airflow.api_fastapi.app import get_auth_manager

    dr = run_with_images
    url = page_url(dr)
    thumb = url + "/thumb/white/-1/0"
    anonymous = {"Authorization": ""}
    assert api.get(url, headers=anonymous).status_code == 401
    to_login = api.get(url, headers={**anonymous, "Accept": "text/html"}, follow_redirects=False)
    assert to_login.status_code == 307 and "/auth/" in to_login.headers["location"]

    manager = get_auth_manager()
    real = manager.is_authorized_dag
    asked = []

    def is_authorized_dag(*, method, user, access_entity=None, details=None):
        asked.append((method, access_entity, details.id if details else None))
        if details is not None and details.id == dr.dag_id:
            return False
        return real(method=method, user=user, access_entity=access_entity, details=details)

    monkeypatch.setattr(manager, "is_authorized_dag", is_authorized_dag)
    for path in (url, thumb, url + "/file/white/-1/0"):
        response = api.get(path)
        assert response.status_code == 403, path
        assert b"PNG" not in response.content and "wf-white" not in response.text
    assert asked[0][:2] == ("GET", gallery_data_entity())
    other = api.get("/speedpix/gallery/dags/some_other_dag/runs/r1")
    assert other.status_code == 200 and "No SpeedPix task" in other.text


def gallery_data_entity():
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity

    return DagAccessEntity.XCOM


def test_plugin_is_registered_with_its_views():
    from airflow import plugins_manager

    plugins_manager.ensure_plugins_loaded() if hasattr(plugins_manager, "ensure_plugins_loaded") else None
    names = {p.name for p in plugins_manager._get_plugins()[0]}
    assert "speedpix_gallery" in names
    views = {v["destination"]: v for v in gallery.SpeedPixGalleryPlugin.external_views}
    assert set(views) == {"dag_run", "task_instance"}
    assert "{RUN_ID}" in views["dag_run"]["href"] and "{TASK_ID}" in views["task_instance"]["href"]
