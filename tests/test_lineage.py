"""OpenLineage: the events the OpenLineage provider's listener really emits for the SpeedPix operators.

DAGs run with ``dag.test()`` against the session's emulator in a child Python whose
``[openlineage] transport`` is the file transport (the listener is chosen when Airflow loads plugins, so
it is configured before anything imports Airflow); every event lands as one JSON line. Those tests skip
where the installed provider emits no task events on this Airflow (the floor virtualenv: see
``openlineage_provider``). A second child blocks every OpenLineage import and runs the operator: the
provider works without it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_speedpix.emulator.png import make_png
from tests.conftest import DAGS_FOLDER, FAST_RETRIES, ROOT

#: The first OpenLineage provider whose listener emits task events on Airflow 3.3 (2.16 and older fail on
#: its stricter metrics registry or on modules Airflow 3 removed); pyproject.toml's test extra.
MIN_PROVIDER = "2.17.0"

RUN_HEADER = """
import pendulum
from airflow.sdk import DAG
from airflow_provider_speedpix.operators.speedpix import SpeedPixRunOperator
from airflow_provider_speedpix.operators.batch import SpeedPixBatchRunOperator
dag = DAG("DAG_ID", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False)
"""

#: The child: ``dag.test()`` each DAG file given, in order.
RUNNER = """
import importlib.util, sys
for path in sys.argv[1:]:
    spec = importlib.util.spec_from_file_location(path.rsplit("/", 1)[-1][:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.dag.test()
"""

#: Makes every OpenLineage import fail, as when neither the provider nor the client is installed. The
#: provider's package and its provider-info stay importable: Airflow finds the installed distribution's
#: entry point and would stop at a failing one (an uninstalled provider has none).
BLOCK_OPENLINEAGE = """
import sys
ALLOWED = ("airflow.providers.openlineage", "airflow.providers.openlineage.get_provider_info")
class _Block:
    def find_spec(self, name, path=None, target=None):
        blocked = name == "openlineage" or name.startswith(("openlineage.", "airflow.providers.openlineage."))
        if blocked and name not in ALLOWED:
            raise ImportError(f"blocked for the test: {name}")
        return None
sys.meta_path.insert(0, _Block())
"""
#: After the run: nothing of OpenLineage was imported.
NOTHING_IMPORTED = """
imported = [m for m in sys.modules if m.startswith(("openlineage", "airflow.providers.openlineage."))]
assert imported in ([], ["airflow.providers.openlineage.get_provider_info"]), imported
"""


def connection_env(emulator: Any) -> dict[str, str]:
    conn = {
        "conn_type": "speedpix",
        "host": emulator.url,
        "login": emulator.app_key,
        "password": emulator.app_secret,
        "extra": FAST_RETRIES,
    }
    return {"AIRFLOW_CONN_SPEEDPIX_DEFAULT": json.dumps(conn)}


def run_in_child(
    bodies: dict[str, str], env: dict[str, str], *, prelude: str = "", postlude: str = ""
) -> tuple[dict[str, str], str]:
    """Write each DAG body (``DAG_ID`` filled in) and ``dag.test()`` them in a child Python; returns
    ``{key: dag_id}`` and the child's output."""
    dag_ids = {key: f"ol_{key}_{uuid.uuid4().hex[:8]}" for key in bodies}
    paths = []
    for key, body in bodies.items():
        path = DAGS_FOLDER / f"{dag_ids[key]}.py"
        path.write_text(textwrap.dedent(body).replace("DAG_ID", dag_ids[key]))
        paths.append(str(path))
    try:
        done = subprocess.run(
            [sys.executable, "-c", prelude + RUNNER + postlude, *paths],
            env={**os.environ, **env},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=420,
        )
    finally:
        for path in paths:
            Path(path).unlink()
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    return dag_ids, output


@pytest.fixture(scope="module")
def openlineage_provider() -> str:
    """The installed OpenLineage provider's version; skips where none that works here is installed (the
    floor virtualenv: its requests 2.32.2 admits no OpenLineage client newer than 1.31, so no provider
    newer than 2.4)."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    try:
        installed = version("apache-airflow-providers-openlineage")
    except PackageNotFoundError:
        pytest.skip("apache-airflow-providers-openlineage is not installed")
    if Version(installed) < Version(MIN_PROVIDER):
        pytest.skip(f"apache-airflow-providers-openlineage {installed} emits no task events on this Airflow")
    return installed


@pytest.fixture(scope="module")
def lineage(openlineage_provider, airflow_db, emulator_server, tmp_path_factory):
    """One child run of four DAGs (run operator succeeded / failed, batch succeeded / failed) with the
    file transport; yields the files used and the events by ``(key, eventType)`` of each task's job."""
    emulator_server.reset()
    tmp = tmp_path_factory.mktemp("lineage")
    image = tmp / "product shot.png"
    image.write_bytes(make_png(8, 8))
    events_file = tmp / "events.jsonl"
    places = {"image": image, "run_out": tmp / "run_out", "batch_out": tmp / "batch_out"}
    run = "SpeedPixRunOperator(task_id='t', dag=dag, deferrable=True, poll_interval=0.1, timeout=60, "
    batch = "SpeedPixBatchRunOperator(task_id='t', dag=dag, deferrable=False, poll_interval=0.1, timeout=60, "
    items = [{"text": f"item {i}", "image": str(image)} for i in range(3)]
    bodies = {
        "run_ok": RUN_HEADER
        + run
        + f"workflow_id='wf-white', inputs={{'text': 'white', 'image': {str(image)!r}}}, "
        f"output_dir={str(places['run_out'])!r})",
        "run_fail": RUN_HEADER + run + "workflow_id='wf-fail', inputs={'text': 'x'})",
        "batch_ok": RUN_HEADER
        + batch
        + f"workflow_id='wf-white', items={items!r}, output_dir={str(places['batch_out'])!r})",
        "batch_fail": RUN_HEADER
        + batch
        + f"workflow_id='wf-fail', items=[{{'text': 'x'}}], output_dir={str(tmp / 'fail_out')!r})",
    }
    env = {
        **connection_env(emulator_server),
        "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps(
            {"type": "file", "log_file_path": str(events_file), "append": True}
        ),
        "AIRFLOW__OPENLINEAGE__NAMESPACE": "speedpix_tests",
    }
    dag_ids, _ = run_in_child(bodies, env)
    events: dict[tuple[str, str], dict[str, Any]] = {}
    for line in events_file.read_text().splitlines():
        event = json.loads(line)
        for key, dag_id in dag_ids.items():
            if event["job"]["name"] == f"{dag_id}.t":
                events[(key, event["eventType"])] = event
    return places, dag_ids, events


def facet_of(event: dict[str, Any], name: str) -> dict[str, Any]:
    facet = event["run"]["facets"][name]
    assert facet["_schemaURL"].endswith("RunFacet")
    return {k: v for k, v in facet.items() if not k.startswith("_")}


def xcom_value(dag_id: str, key: str) -> Any:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = session.query(XComModel).filter_by(dag_id=dag_id, task_id="t", key=key).one()
        return XComModel.deserialize_value(row)


def names(datasets: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(d["namespace"], d["name"]) for d in datasets]


# ---------------------------------------------------------------------- emitted events
def test_run_operator_complete_event(lineage):
    places, dag_ids, events = lineage
    event = events[("run_ok", "COMPLETE")]
    assert names(event["inputs"]) == [("file", str(places["image"]))]
    assert names(event["outputs"]) == [("file", str(places["run_out"] / "images.png"))]
    facet = facet_of(event, "speedpixPrediction")
    assert facet.pop("invokeId")  # the API's apiInvokeId of the call that read the result
    assert facet == {
        "predictionId": xcom_value(dag_ids["run_ok"], "prediction_id"),
        "workflowId": "wf-white",
        "aliasId": "main",
        "status": "succeeded",
        "runSeconds": 0.9,
    }


def test_run_operator_fail_event_names_the_failed_prediction(lineage):
    _, dag_ids, events = lineage
    event = events[("run_fail", "FAIL")]
    assert ("run_fail", "COMPLETE") not in events
    assert event["inputs"] == [] and event["outputs"] == []
    facet = facet_of(event, "speedpixPrediction")
    assert facet["predictionId"] == xcom_value(dag_ids["run_fail"], "prediction_id")
    assert (facet["status"], facet["errorCode"]) == ("failed", "WORKFLOW_EXECUTION_FAILED")
    assert "runSeconds" not in facet  # a failed task has no timing
    assert "WORKFLOW_EXECUTION_FAILED" in event["run"]["facets"]["errorMessage"]["message"]


def test_batch_operator_complete_event(lineage):
    places, dag_ids, events = lineage
    event = events[("batch_ok", "COMPLETE")]
    # the same input file in every item is one dataset; the outputs are output_dir, not each file
    assert names(event["inputs"]) == [("file", str(places["image"]))]
    assert names(event["outputs"]) == [("file", str(places["batch_out"]))]
    facet = facet_of(event, "speedpixBatch")
    summary = xcom_value(dag_ids["batch_ok"], "return_value")
    assert facet == {
        "workflowId": "wf-white",
        "aliasId": "main",
        "total": 3,
        "succeeded": 3,
        "failed": 0,
        "predictionsCreated": 3,
        "runSeconds": summary["run_seconds"],
        "manifest": summary["manifest"],
    }
    assert facet["runSeconds"] == pytest.approx(2.7)


def test_batch_operator_fail_event_carries_counts_and_manifest(lineage):
    _, _, events = lineage
    facet = facet_of(events[("batch_fail", "FAIL")], "speedpixBatch")
    assert (facet["total"], facet["succeeded"], facet["failed"]) == (1, 0, 1)
    assert Path(facet["manifest"]).name == "manifest.jsonl" and Path(facet["manifest"]).exists()


def test_operators_work_without_openlineage(airflow_db, emulator, tmp_path):
    """Every OpenLineage import fails in the child: the provider imports, registers and runs a DAG."""
    check = """
import sys
import airflow_provider_speedpix, airflow_provider_speedpix.operators.batch
from airflow_provider_speedpix import _lineage
try:
    _lineage.facet_classes()
except ImportError:
    pass
else:
    raise SystemExit("the OpenLineage import was not blocked")
assert "extra-links" in airflow_provider_speedpix.get_provider_info()
"""
    body = RUN_HEADER + (
        "SpeedPixRunOperator(task_id='t', dag=dag, workflow_id='wf-white', inputs={'text': 'x'}, "
        f"deferrable=True, poll_interval=0.1, timeout=60, output_dir={str(tmp_path)!r})"
    )
    dag_ids, _ = run_in_child(
        {"no_ol": body},
        connection_env(emulator),
        prelude=BLOCK_OPENLINEAGE + check,
        postlude=NOTHING_IMPORTED,
    )
    assert xcom_value(dag_ids["no_ol"], "return_value")["status"] == "succeeded"
    assert xcom_value(dag_ids["no_ol"], "speedpix_outputs_link")  # links need no OpenLineage either


# ---------------------------------------------------------------------- naming rules
@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("/data/a.png", ("file", "/data/a.png")),
        ("/data/../data/a.png", ("file", "/data/a.png")),
        ("file:///data/a.png", ("file", "/data/a.png")),
        ("s3://bucket/out/a.png", ("s3://bucket", "out/a.png")),
        ("s3://aws_default@bucket/out/", ("s3://bucket", "out")),
        ("gs://bucket/k", ("gs://bucket", "k")),
        ("s3://bucket", ("s3://bucket", "/")),
    ],
)
def test_dataset_names_follow_openlineage_naming(location, expected):
    from airflow_provider_speedpix._lineage import dataset_name

    assert dataset_name(location) == expected


def test_object_storage_path_inputs_and_text_that_is_no_file(tmp_path):
    from airflow.sdk import ObjectStoragePath

    from airflow_provider_speedpix._lineage import dataset_name, input_files

    local = tmp_path / "a.png"
    local.write_bytes(b"x")
    remote = ObjectStoragePath("s3://aws_default@bucket/in/b.png")
    with local.open("rb") as opened:
        found = input_files(
            {"a": str(local), "b": [remote], "c": "s3://bucket/as-text.png", "d": "/a prompt", "e": opened}
        )
    assert [dataset_name(f) for f in found] == [
        ("file", str(local)),
        ("s3://bucket", "in/b.png"),
        ("file", str(local)),
    ]


def test_many_files_are_named_by_their_folders():
    from airflow_provider_speedpix._lineage import MAX_DATASETS, datasets

    files = [f"/data/{i % 3}/{i}.png" for i in range(MAX_DATASETS + 1)]
    assert datasets(files) == [
        ("file", "/data/0"),
        ("file", "/data/1"),
        ("file", "/data/2"),
    ]
    assert len(datasets(files[:MAX_DATASETS])) == MAX_DATASETS
