"""SpeedPixRunOperator through Airflow (``dag.test()``) against the emulator over real HTTP."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from airflow_provider_speedpix.exceptions import SpeedPixConfigError
from airflow_provider_speedpix.operators.speedpix import SpeedPixRunOperator, output_files_plan
from tests._helpers import with_upstream_value

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: The operator's return value; the README's "Return value (XCom)" documents each.
XCOM_KEYS = {
    "prediction_id",
    "status",
    "output",
    "images",
    "files",
    "run_seconds",
    "started_at",
    "finished_at",
}

HEADER = """
from datetime import timedelta
import pendulum
from airflow.sdk import DAG
from airflow_provider_speedpix.operators.speedpix import SpeedPixRunOperator
dag = DAG("DAG_ID", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False)
"""


def one_run_task(**arguments: object) -> str:
    """DAG code: :data:`HEADER` and one ``SpeedPixRunOperator(task_id="run", dag=dag, **arguments)``, each
    argument written as its ``repr``; ``poll_interval`` is 0.2 unless given."""
    arguments = {"poll_interval": 0.2, **arguments}
    written = ", ".join(f"{name}={value!r}" for name, value in arguments.items())
    return HEADER + f'\nSpeedPixRunOperator(task_id="run", dag=dag, {written})\n'


def ti_of(dag_run, task_id: str):
    [ti] = [ti for ti in dag_run.get_task_instances() if ti.task_id == task_id]
    return ti


def xcom(dag_run, task_id: str, key: str = "return_value"):
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = (
            session.query(XComModel)
            .filter_by(dag_id=dag_run.dag_id, run_id=dag_run.run_id, task_id=task_id, key=key)
            .one_or_none()
        )
        return None if row is None else XComModel.deserialize_value(row)


def image(tmp_path):
    from airflow_provider_speedpix.emulator.png import make_png

    path = tmp_path / "商品 photo.png"
    path.write_bytes(make_png(16, 16))
    return path


@pytest.mark.parametrize("deferrable", [True, False])
def test_run_saves_outputs_and_returns_xcom(run_dag, speedpix_conn, tmp_path, deferrable):
    src = image(tmp_path)
    out = tmp_path / "out"
    dr = run_dag(
        HEADER
        + f"""
SpeedPixRunOperator(task_id="run", dag=dag, workflow_id="wf-white", deferrable={deferrable},
    inputs={{"text": "白色背景 {{{{ dag_run.run_id }}}}", "image": {str(src)!r}, "nested": [{{"mask": {str(src)!r}}}]}},
    return_temp_files=True, poll_interval=0.2, timeout=60, output_dir={str(out)!r})
"""
    )
    assert dr.state == "success"
    result = xcom(dr, "run")
    assert set(result) == XCOM_KEYS
    assert result["status"] == "succeeded"
    assert result["output"]["images"]["url"].startswith(speedpix_conn.url)
    # the service lists the same file in `images`: kept in XCom, downloaded once under the field's name
    assert result["images"] == [result["output"]["images"]["url"]]
    assert result["run_seconds"] == 0.9
    assert datetime.fromisoformat(result["started_at"]) < datetime.fromisoformat(result["finished_at"])
    names = sorted(p.split("/")[-1] for p in result["files"])
    assert names == ["images.png", "mask_image.png", "subject_image.png"]
    for path in result["files"]:
        assert Path(path).read_bytes()[:8] == PNG_MAGIC
    assert xcom(dr, "run", "prediction_id") == result["prediction_id"]
    calls = speedpix_conn.stats()["calls"]
    assert calls["comfy_prompt"] == 1
    assert calls["upload_put"] == 1  # the same file twice in inputs is uploaded once
    # the rendered template reached the API; files did not need the triggerer's disk
    assert calls["file_get"] == 3


@pytest.mark.parametrize("deferrable", [True, False])
def test_default_output_workflow_saves_every_image(run_dag, stepped_emulator, tmp_path, deferrable, capsys):
    """A workflow without custom output fields: `result` is empty, the images are only in `images`.
    Every one is saved, under names that cannot overwrite each other. (On the stepped clock the worker's
    own wait always reads the prediction running once, whatever the machine's load.)"""
    out = tmp_path / "out"
    dr = run_dag(
        HEADER
        + f"""
SpeedPixRunOperator(task_id="run", dag=dag, workflow_id="wf-images-only", inputs={{"text": "x"}},
    deferrable={deferrable}, poll_interval=0.1, timeout=60, output_dir={str(out)!r})
"""
    )
    assert dr.state == "success"
    result = xcom(dr, "run")
    assert set(result) == XCOM_KEYS
    assert result["output"] is None
    assert [urlsplit(url).path.rsplit("/", 1)[-1] for url in result["images"]] == [
        "ComfyUI_00001_.png",
        "ComfyUI_00002_.png",
    ]
    assert [Path(p).name for p in result["files"]] == ["image_0.png", "image_1.png"]
    # each file holds its own URL's image: neither overwrote the other (the emulator's two images are
    # different PNGs for 15 task ids in 16: compare with what each URL serves, not with each other)
    from airflow_provider_speedpix.emulator.png import output_png

    saved = [Path(p).read_bytes() for p in result["files"]]
    assert all(data[:8] == PNG_MAGIC for data in saved)
    prediction_id = result["prediction_id"]
    assert saved == [output_png(prediction_id, "ComfyUI_00001_"), output_png(prediction_id, "ComfyUI_00002_")]
    assert stepped_emulator.calls("file_get") == 2
    assert result["run_seconds"] == 0.9
    started, finished = (datetime.fromisoformat(result[k]) for k in ("started_at", "finished_at"))
    assert started.tzinfo == UTC and (finished - started).total_seconds() == pytest.approx(0.9, abs=0.002)
    text = capsys.readouterr().out
    assert "succeeded: ran 0.9 s (" in text and "2 default images" in text
    assert "Saved images[0] to " in text and "Saved images[1] to " in text
    # the task log's closing line: wall time since the submit, SpeedPix's run time, what was kept where
    closing = re.search(rf"Prediction {prediction_id} succeeded after (\d+) s \(ran 0.9 s\), (.*)", text)
    assert closing is not None, text[-2000:]
    assert closing.group(2).startswith(f"2 files saved to {Path(result['files'][0]).parent} ")
    if not deferrable:  # the worker's own wait shows percentages (the trigger's: tests/test_progress.py)
        assert re.search(r"Prediction \w+ running \d+%", text)


def test_default_images_are_named_apart_from_custom_fields(tmp_path):
    output = {
        "image": ["http://h/custom/a.png", "http://h/custom/b.png"],  # image_0.png, image_1.png
        "preview": {"url": "http://h/custom/p"},  # a custom field keeps the URL's (missing) suffix
        "same": "http://h/shared.png",
    }
    images = [
        "http://h/default/ComfyUI_1.png",
        "http://h/default/noext",
        "http://h/shared.png",
        "http://h/d/x.JPG",
    ]
    plan = output_files_plan(output, str(tmp_path), images)
    assert [(where, dest.name) for where, _, dest in plan] == [
        ("output['image'][0]", "image_0.png"),
        ("output['image'][1]", "image_1.png"),
        ("output['preview']['url']", "preview"),
        ("output['same']", "same.png"),
        ("images[0]", "image_0-2.png"),  # would clash with the custom field's file
        ("images[1]", "image_1-2.png"),  # no suffix in the URL: .png
        ("images[3]", "image_3.JPG"),  # images[2] is output['same']: saved once
    ]
    names = [dest.name.lower() for _, _, dest in plan]
    assert len(names) == len(set(names))


def test_wait_for_completion_false_returns_id_at_once(run_dag, speedpix_conn):
    dr = run_dag(
        HEADER
        + """
SpeedPixRunOperator(task_id="submit", dag=dag, workflow_id="sleep-30", inputs={"text": "x"},
    wait_for_completion=False)
"""
    )
    assert dr.state == "success"
    prediction_id = xcom(dr, "submit")
    assert isinstance(prediction_id, str) and prediction_id
    calls = speedpix_conn.stats()["calls"]
    assert calls["comfy_prompt"] == 1 and calls["comfy_get_result"] == 0


@pytest.mark.parametrize("deferrable", [True, False])
def test_failed_workflow_fails_task_with_code_and_message(run_dag, speedpix_conn, deferrable, capsys):
    dr = run_dag(one_run_task(workflow_id="wf-fail", inputs={"text": "x"}, deferrable=deferrable, timeout=60))
    assert dr.state == "failed"
    assert ti_of(dr, "run").state == "failed"
    text = capsys.readouterr().out
    assert "SpeedPixPredictionFailed" in text
    assert "WORKFLOW_EXECUTION_FAILED" in text or "failed [" in text


@pytest.mark.parametrize("deferrable", [True, False])
def test_timeout_fails_task_naming_prediction(run_dag, speedpix_conn, deferrable, capsys):
    dr = run_dag(one_run_task(workflow_id="sleep-30", inputs={"text": "x"}, deferrable=deferrable, timeout=1))
    assert dr.state == "failed"
    assert "did not finish" in capsys.readouterr().out
    assert speedpix_conn.calls("comfy_prompt") == 1


# ---------------------------------------------------------------------- crash-safe resubmission
def test_retry_after_download_failure_does_not_resubmit(run_dag, speedpix_conn, tmp_path):
    """The prediction succeeded but saving its output failed: the retry downloads, never re-creates."""
    speedpix_conn.inject("file_get", "500", times=2)  # retry_limit=2 in the connection: try 1 fails
    dr = run_dag(
        HEADER
        + f"""
SpeedPixRunOperator(task_id="run", dag=dag, workflow_id="wf-white", inputs={{"text": "x"}},
    deferrable=True, poll_interval=0.2, timeout=60, output_dir={str(tmp_path / "out")!r},
    retries=1, retry_delay=timedelta(seconds=0))
"""
    )
    assert dr.state == "success"
    ti = ti_of(dr, "run")
    assert ti.try_number == 2
    assert speedpix_conn.calls("comfy_prompt") == 1
    assert (tmp_path / "out" / "images.png").read_bytes()[:8] == PNG_MAGIC
    assert xcom(dr, "run", "prediction_id") == xcom(dr, "run")["prediction_id"]  # republished on the retry


def test_worker_interrupted_while_waiting_reconnects(run_dag, speedpix_conn):
    """A non-deferrable wait dies mid-poll (as when the worker is lost): the retry waits on the same one."""
    speedpix_conn.inject("comfy_get_progress", "reset", times=2)  # both attempts of one poll: try 1 dies
    # max_consecutive_errors=1: the wait gives up on the first failed poll (default: it sits out 10)
    dr = run_dag(
        HEADER
        + """
SpeedPixRunOperator(task_id="run", dag=dag, workflow_id="sleep-2", inputs={"text": "x"},
    deferrable=False, poll_interval=0.2, timeout=60, max_consecutive_errors=1, retries=1,
    retry_delay=timedelta(seconds=0))
"""
    )
    assert dr.state == "success"
    assert ti_of(dr, "run").try_number == 2
    assert speedpix_conn.calls("comfy_prompt") == 1


def test_trigger_timeout_then_retry_reconnects(run_dag, speedpix_conn, capsys):
    dr = run_dag(
        HEADER
        + """
SpeedPixRunOperator(task_id="run", dag=dag, workflow_id="sleep-3", inputs={"text": "x"},
    deferrable=True, poll_interval=0.2, timeout=1, retries=2, retry_delay=timedelta(seconds=0))
"""
    )
    assert dr.state == "success"
    assert ti_of(dr, "run").try_number >= 2
    assert speedpix_conn.calls("comfy_prompt") == 1
    assert "from an earlier try" in capsys.readouterr().out


def test_failed_prediction_is_resubmitted_on_retry(run_dag, speedpix_conn):
    dr = run_dag(
        HEADER
        + """
SpeedPixRunOperator(task_id="run", dag=dag, workflow_id="wf-fail", inputs={"text": "x"},
    deferrable=True, poll_interval=0.2, retries=1, retry_delay=timedelta(seconds=0))
"""
    )
    assert dr.state == "failed"
    assert speedpix_conn.calls("comfy_prompt") == 2  # a failed prediction is not reused


def stored_state(dag_run):
    from airflow.models.task_state_store import TaskStateStoreModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = (
            session.query(TaskStateStoreModel).filter_by(dag_id=dag_run.dag_id, run_id=dag_run.run_id).all()
        )
        return {row.key: row.value for row in rows}


def test_state_is_kept_while_unfinished_and_forgotten_after_success(run_dag, speedpix_conn):
    """Retries reuse the stored id; once outputs are saved it is deleted, so a cleared task generates anew."""
    body = (
        HEADER
        + """
SpeedPixRunOperator(task_id="run", dag=dag, workflow_id="WORKFLOW", inputs={"text": "x"}, deferrable=True,
    poll_interval=0.2)
"""
    )
    failed = run_dag(body.replace("WORKFLOW", "wf-fail"))
    assert failed.state == "failed"
    assert "speedpix_prediction" in stored_state(failed)  # proves the store is written at all
    succeeded = run_dag(body.replace("WORKFLOW", "wf-white"))
    assert succeeded.state == "success"
    assert "speedpix_prediction" not in stored_state(succeeded)


# ---------------------------------------------------------------------- validation and helpers
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"poll_interval": 0}, "poll_interval"),
        ({"timeout": -1}, "timeout"),
        ({"file_encoding_strategy": "zip"}, "file_encoding_strategy"),
        ({"workflow_id": "  "}, "workflow_id"),
        ({"alias_id": "main", "version_id": "v1"}, "either `alias_id`"),
    ],
)
def test_bad_arguments_fail_at_dag_parse_time(kwargs, message):
    with pytest.raises(SpeedPixConfigError, match=message):
        SpeedPixRunOperator(task_id="t", **{"workflow_id": "wf", **kwargs})


def test_templated_ids_are_checked_when_rendered_not_at_parse_time():
    SpeedPixRunOperator(task_id="t", workflow_id="{{ var.value.wf }}", alias_id="main", version_id="{{ v }}")


def test_template_fields_cover_what_authors_template():
    assert {"workflow_id", "inputs", "alias_id", "version_id", "resource_config_id", "output_dir"} <= set(
        SpeedPixRunOperator.template_fields
    )


def test_output_files_plan_names_files_after_fields(tmp_path):
    output = {
        "images": {"url": "http://h/a/out.png"},
        "subject_image": {"url": "http://h/b/s.png?Expires=1&Signature=x"},
        "gallery": ["http://h/c/1.jpg", "http://h/c/2.jpg"],
        "note": "not a url",
    }
    plan = output_files_plan(output, str(tmp_path))
    assert [p[2].name for p in plan] == ["images.png", "subject_image.png", "gallery_0.jpg", "gallery_1.jpg"]
    assert all(p[2].parent == tmp_path for p in plan)
    plan = output_files_plan({"../../evil": {"url": "http://h/x.png"}}, str(tmp_path))
    assert plan[0][2].parent == tmp_path


def run_after_an_earlier_try(run_dag, monkeypatch, entry):
    """Run a deferrable wf-white task whose stored state, before its first look, holds ``entry(record)``
    (``record``: what this try would store), as if an earlier try had kept it."""
    from airflow_provider_speedpix.operators import speedpix as operator_module

    real_resume = operator_module.SpeedPixRunOperator._resume

    def resume_after_an_earlier_try(self, store, record):
        if store is not None and store.get(operator_module.STATE_KEY) is None:
            store.set(operator_module.STATE_KEY, entry(record))
        return real_resume(self, store, record)

    monkeypatch.setattr(operator_module.SpeedPixRunOperator, "_resume", resume_after_an_earlier_try)
    return run_dag(one_run_task(workflow_id="wf-white", inputs={"text": "x"}, deferrable=True))


def test_stored_prediction_unknown_to_the_api_is_replaced(run_dag, speedpix_conn, monkeypatch, capsys):
    """A stored id the API no longer knows (expired) must not wedge every retry: submit anew."""
    # the same request (so only the expiry decides), made by a prediction the API forgot
    dr = run_after_an_earlier_try(
        run_dag, monkeypatch, lambda record: {"prediction_id": "expired-prediction-id", **record}
    )
    assert dr.state == "success"
    assert speedpix_conn.calls("comfy_prompt") == 1
    assert "unknown to SpeedPix" in capsys.readouterr().out


# ---------------------------------------------------------------------- a stored prediction is reused only for the same request
def workflows_created(emulator) -> list[str]:
    """The workflow id of every prediction the emulator was asked for, in creation order."""
    tasks = sorted(emulator.app.state.emulator.tasks.values(), key=lambda task: task.seq)
    return [task.workflow_id for task in tasks]


def test_retry_after_the_request_changed_submits_anew(run_dag, speedpix_conn, tmp_path, capsys):
    """Try 1 runs wf-a; its prediction succeeds but saving fails, so its id stays stored. Try 2 of the same
    task instance asks for wf-b with other inputs (as after the DAG changed and the task was cleared): it
    must create a new prediction and save wf-b's image, not hand back wf-a's."""
    from airflow_provider_speedpix.emulator.png import output_png

    blocker = tmp_path / "blocker"
    blocker.write_text("a file where try 1's output folder should be")
    out = tmp_path / "out"
    dr = run_dag(
        HEADER
        + f"""
SpeedPixRunOperator(task_id="run", dag=dag, deferrable=True, poll_interval=0.2, timeout=60,
    workflow_id="{{{{ 'wf-a' if ti.try_number == 1 else 'wf-b' }}}}",
    inputs={{"text": "{{{{ 'a red mug' if ti.try_number == 1 else 'a blue mug' }}}}"}},
    output_dir="{{{{ {str(blocker / "sub")!r} if ti.try_number == 1 else {str(out)!r} }}}}",
    retries=1, retry_delay=timedelta(seconds=0))
"""
    )
    assert dr.state == "success"
    assert ti_of(dr, "run").try_number == 2
    assert workflows_created(speedpix_conn) == ["wf-a", "wf-b"]
    result = xcom(dr, "run")
    [wf_b] = [t.task_id for t in speedpix_conn.app.state.emulator.tasks.values() if t.workflow_id == "wf-b"]
    assert result["prediction_id"] == wf_b
    assert (out / "images.png").read_bytes() == output_png(wf_b)
    text = capsys.readouterr().out
    assert (
        "was made from a different request (workflow_id wf-a -> wf-b, inputs changed); submitting a new one"
        in text
    )
    assert "already succeeded; not submitting again" not in text


def test_retry_with_other_options_submits_anew_and_says_which(run_dag, speedpix_conn, tmp_path, capsys):
    """Options count too (return_temp_files here), and the log names the option."""
    speedpix_conn.inject("file_get", "500", times=2)  # try 1's download fails: its id stays stored
    dr = run_dag(
        HEADER
        + f"""
class Op(SpeedPixRunOperator):
    def execute(self, context):
        self.return_temp_files = context["ti"].try_number > 1
        return super().execute(context)

Op(task_id="run", dag=dag, workflow_id="wf-white", inputs={{"text": "x"}}, deferrable=False,
    poll_interval=0.2, timeout=60, output_dir={str(tmp_path / "out")!r}, retries=1,
    retry_delay=timedelta(seconds=0))
"""
    )
    assert dr.state == "success"
    assert speedpix_conn.calls("comfy_prompt") == 2
    assert "(return_temp_files False -> True)" in capsys.readouterr().out


def test_entry_without_fingerprint_counts_as_different(run_dag, speedpix_conn, monkeypatch, capsys):
    """An entry kept by 0.1.0 (id only) cannot prove it was the same request: submit anew, no lookup."""
    dr = run_after_an_earlier_try(
        run_dag, monkeypatch, lambda record: {"prediction_id": "legacy-prediction-id", "created_at": 1.0}
    )
    assert dr.state == "success"
    calls = speedpix_conn.stats()["calls"]
    assert calls["comfy_prompt"] == 1
    text = capsys.readouterr().out
    assert "Prediction legacy-prediction-id from an earlier try was made from a different request" in text
    assert "older provider version" in text


def test_stored_state_keeps_fingerprint_and_readable_parts_but_no_inputs(run_dag, speedpix_conn, tmp_path):
    import json

    src = image(tmp_path)
    dr = run_dag(
        HEADER
        + f"""
SpeedPixRunOperator(task_id="run", dag=dag, workflow_id="wf-fail", version_id="v7",
    inputs={{"text": "secret prompt text", "image": {str(src)!r}}}, deferrable=True, poll_interval=0.2)
"""
    )
    assert dr.state == "failed"
    raw = stored_state(dr)["speedpix_prediction"]
    state = json.loads(raw) if isinstance(raw, str) else raw
    assert state["fingerprint"].startswith("v1:")
    assert state["request"]["workflow_id"] == "wf-fail" and state["request"]["version_id"] == "v7"
    assert state["request"]["inputs"].startswith("v1:")
    text = json.dumps(state)
    assert "secret prompt text" not in text and str(src) not in text and "http" not in text


# ---------------------------------------------------------------------- outputs of different task instances never share a name
def xcoms(dag_run, task_id: str) -> list:
    """Every map index's return value, by map index."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = (
            session.query(XComModel)
            .filter_by(dag_id=dag_run.dag_id, run_id=dag_run.run_id, task_id=task_id, key="return_value")
            .order_by(XComModel.map_index)
            .all()
        )
        return [XComModel.deserialize_value(row) for row in rows]


@pytest.mark.parametrize("deferrable", [True, False])
def test_mapped_instances_sharing_output_dir_keep_their_own_files(
    run_dag, speedpix_conn, tmp_path, deferrable
):
    """`.partial(output_dir=D).expand(...)`: each instance saves under D/<map_index>/, every XCom points at its
    own file, and each file holds its own prediction's image."""
    from airflow_provider_speedpix.emulator.png import output_png

    out = tmp_path / "catalog"
    dr = run_dag(
        HEADER
        + f"""
SpeedPixRunOperator.partial(task_id="run", dag=dag, workflow_id="wf-white", deferrable={deferrable},
    poll_interval=0.2, timeout=60, output_dir={str(out)!r}
).expand(inputs=[{{"text": "a"}}, {{"text": "b"}}, {{"text": "c"}}])
"""
    )
    assert dr.state == "success"
    results = xcoms(dr, "run")
    assert len(results) == 3
    assert [r["files"] for r in results] == [[str(out / str(i) / "images.png")] for i in range(3)]
    assert len({r["prediction_id"] for r in results}) == 3
    for result in results:
        assert Path(result["files"][0]).read_bytes() == output_png(result["prediction_id"])


def test_tasks_sharing_output_dir_keep_their_own_files(run_dag, speedpix_conn, tmp_path):
    """Two tasks given the same output_dir (a template here) save under D/<task_id>/; a task with its own
    output_dir keeps it as is."""
    from airflow_provider_speedpix.emulator.png import output_png

    out, alone = tmp_path / "shared", tmp_path / "alone"
    template = str(out) + "/{{ ds }}"
    dr = run_dag(
        HEADER
        + f"""
for name in ("front", "back"):
    SpeedPixRunOperator(task_id=name, dag=dag, workflow_id="wf-white", inputs={{"text": name}},
        deferrable=True, poll_interval=0.2, timeout=60, output_dir={template!r})
SpeedPixRunOperator(task_id="side", dag=dag, workflow_id="wf-white", inputs={{"text": "side"}},
    deferrable=True, poll_interval=0.2, timeout=60, output_dir={str(alone)!r})
"""
    )
    assert dr.state == "success"
    ds = dr.logical_date.strftime("%Y-%m-%d")
    for task_id in ("front", "back"):
        result = xcom(dr, task_id)
        assert result["files"] == [str(out / ds / task_id / "images.png")]
        assert Path(result["files"][0]).read_bytes() == output_png(result["prediction_id"])
    assert xcom(dr, "side")["files"] == [str(alone / "images.png")]


def test_output_dir_given_per_instance_is_used_as_is(run_dag, speedpix_conn, tmp_path):
    """`.expand(output_dir=[...])`: each instance already has its own folder; no map-index folder added."""
    dirs = [str(tmp_path / name) for name in ("sku-1", "sku-2")]
    dr = run_dag(
        HEADER
        + f"""
SpeedPixRunOperator.partial(task_id="run", dag=dag, workflow_id="wf-white", inputs={{"text": "x"}},
    deferrable=True, poll_interval=0.2, timeout=60).expand(output_dir={dirs!r})
"""
    )
    assert dr.state == "success"
    assert [r["files"] for r in xcoms(dr, "run")] == [[d + "/images.png"] for d in dirs]


# ---------------------------------------------------------------------- values resolved at runtime (XComArg)
def test_workflow_id_from_an_upstream_task_imports_and_runs(run_dag, speedpix_conn, tmp_path):
    """`workflow_id=upstream.output` (and a mapped task's `.partial(workflow_id=...)`) must not fail the DAG's
    import: the value exists only at runtime, where it is checked."""
    dr = run_dag(
        HEADER
        + f"""
from airflow.sdk import task

with dag:
    @task
    def pick():
        return "wf-white"

    @task
    def version():
        return None

    wf = pick()
    SpeedPixRunOperator(task_id="run", workflow_id=wf, alias_id="main", version_id=version(),
        inputs={{"text": "x"}}, deferrable=True, poll_interval=0.2, timeout=60)
    SpeedPixRunOperator.partial(task_id="mapped", workflow_id=wf, deferrable=False, poll_interval=0.2,
        timeout=60, output_dir={str(tmp_path / "out")!r}).expand(inputs=[{{"text": "a"}}, {{"text": "b"}}])
"""
    )
    assert dr.state == "success"
    assert xcom(dr, "run")["status"] == "succeeded"
    assert [len(r["files"]) for r in xcoms(dr, "mapped")] == [1, 1]
    assert workflows_created(speedpix_conn) == ["wf-white"] * 3


@pytest.mark.parametrize(
    ("upstream", "call", "message"),
    [
        ('""', 'workflow_id=value, inputs={"text": "x"}', "workflow_id"),
        ('"v1"', 'workflow_id="wf-white", alias_id="main", version_id=value', "either `alias_id`"),
        ('["not", "a", "dict"]', 'workflow_id="wf-white", inputs=value', "`inputs` must be a dict"),
    ],
)
def test_values_from_upstream_are_checked_when_the_task_runs(
    run_dag, speedpix_conn, capsys, upstream, call, message
):
    """What an XComArg resolves to is checked before anything is uploaded or billed."""
    operator = f'SpeedPixRunOperator(task_id="run", {call}, deferrable=True, poll_interval=0.2)'
    dr = run_dag(HEADER + with_upstream_value(upstream, operator))
    assert dr.state == "failed"
    assert speedpix_conn.calls("comfy_prompt") == 0
    assert speedpix_conn.calls("upload_put") == 0
    assert message in capsys.readouterr().out


def test_parse_time_checks_skip_values_resolved_at_runtime_but_check_literals():
    from airflow.sdk import DAG, task

    with DAG("parse_checks", schedule=None):

        @task
        def upstream():
            return "x"

        value = upstream()
        SpeedPixRunOperator(task_id="a", workflow_id=value)
        SpeedPixRunOperator(task_id="b", workflow_id="wf", alias_id="main", version_id=value)
        SpeedPixRunOperator(task_id="c", workflow_id="wf", alias_id=value, version_id="v1")
        SpeedPixRunOperator(task_id="d", workflow_id=value, inputs=value)
        SpeedPixRunOperator(task_id="e", workflow_id="wf", alias_id="{{ params.a }}", version_id="v1")
        SpeedPixRunOperator(task_id="f", workflow_id="{% if true %}wf{% endif %}")
        # literal values are still checked while parsing, whatever else is resolved at runtime
        with pytest.raises(SpeedPixConfigError, match="either `alias_id`"):
            SpeedPixRunOperator(task_id="g", workflow_id=value, alias_id="main", version_id="v1")
        with pytest.raises(SpeedPixConfigError, match="workflow_id"):
            SpeedPixRunOperator(task_id="h", workflow_id="  ", version_id=value)
        with pytest.raises(SpeedPixConfigError, match="workflow_id"):
            SpeedPixRunOperator(task_id="i", workflow_id=None)


# ---------------------------------------------------------------------- execute_complete checks the event
class FakeStore:
    def __init__(self, value=None):
        self.value = value

    def get(self, key, default=None):
        return self.value if key == "speedpix_prediction" and self.value is not None else default

    def set(self, key, value, **_):
        self.value = value

    def delete(self, key):
        self.value = None


SUCCESS = {
    "status": "success",
    "prediction_id": "p-1",
    "prediction_status": "succeeded",
    "output": {"images": {"url": "http://h/x.png"}},
    "images": [],
}


@pytest.mark.parametrize("missing", ["output", "prediction_status"])
def test_execute_complete_refuses_a_success_event_without_its_fields(tmp_path, missing):
    from airflow_provider_speedpix.exceptions import SpeedPixError

    op = SpeedPixRunOperator(task_id="t", workflow_id="wf", output_dir=str(tmp_path))
    event = {k: v for k, v in SUCCESS.items() if k != missing}
    with pytest.raises(SpeedPixError, match=f"lacks {missing}"):
        op.execute_complete({"task_state_store": FakeStore({"prediction_id": "p-1"})}, event, "p-1")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["deferral", "store"])
def test_execute_complete_refuses_an_event_for_another_prediction(tmp_path, where):
    """The id this try deferred on comes with the deferral (next_kwargs), else from task_state_store."""
    from airflow_provider_speedpix.exceptions import SpeedPixError

    op = SpeedPixRunOperator(task_id="t", workflow_id="wf", output_dir=str(tmp_path))
    store = FakeStore({"prediction_id": "p-mine"} if where == "store" else None)
    deferred = "p-mine" if where == "deferral" else None
    for event in (SUCCESS, {"status": "failed", "prediction_id": "p-1", "prediction_status": "failed"}):
        with pytest.raises(SpeedPixError, match="deferred on prediction p-mine") as info:
            op.execute_complete({"task_state_store": store}, dict(event), deferred)
        assert type(info.value) is SpeedPixError  # not a failed prediction of this task's
    assert list(tmp_path.iterdir()) == []
