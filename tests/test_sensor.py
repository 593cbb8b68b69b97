"""SpeedPixPredictionSensor through Airflow (``dag.test()``, poke and deferrable) against the emulator."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from airflow.providers.common.compat.sdk import AirflowSensorTimeout, AirflowSkipException

from airflow_provider_speedpix._protocol import Prediction
from airflow_provider_speedpix.exceptions import (
    SpeedPixAuthError,
    SpeedPixError,
    SpeedPixPredictionFailed,
    SpeedPixTimeoutError,
)
from airflow_provider_speedpix.hooks.speedpix import SpeedPixHook
from airflow_provider_speedpix.sensors.speedpix import SpeedPixPredictionSensor, SpeedPixSensorError
from airflow_provider_speedpix.triggers.speedpix import SpeedPixPredictionTrigger
from tests.test_operator import ti_of, xcom

HEADER = """
import datetime
import pendulum
from airflow.sdk import DAG
from airflow_provider_speedpix.operators.speedpix import SpeedPixRunOperator
from airflow_provider_speedpix.sensors.speedpix import SpeedPixPredictionSensor
dag = DAG("DAG_ID", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False)
"""


@pytest.fixture(scope="module", autouse=True)
def warm_airflow(airflow_db):
    """Pay ``dag.test()``'s one-time start-up (the in-process execution API) before any timing matters:
    otherwise the first sensor starts seconds after its prediction was created."""
    import importlib.util

    from tests.conftest import DAGS_FOLDER

    path = DAGS_FOLDER / "t_sensor_warm_up.py"
    path.write_text(
        HEADER.replace("DAG_ID", "t_sensor_warm_up")
        + "from airflow.providers.standard.operators.empty import EmptyOperator\n"
        + 'EmptyOperator(task_id="noop", dag=dag)\n'
    )
    try:
        spec = importlib.util.spec_from_file_location("t_sensor_warm_up", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert module.dag.test().state == "success"
    finally:
        path.unlink()


@pytest.fixture
def spy(monkeypatch):
    """Record how the sensor ran in ``dag.test()`` (same process): deferral resumes and raised errors."""
    record: dict[str, list] = {"resumed": [], "raised": []}

    def wrap(name):
        original = getattr(SpeedPixPredictionSensor, name)

        def wrapper(self, *args, **kwargs):
            if name == "execute_complete":
                record["resumed"].append(kwargs.get("event", args[1] if len(args) > 1 else None))
            try:
                return original(self, *args, **kwargs)
            except Exception as err:
                record["raised"].append(err)
                raise

        monkeypatch.setattr(SpeedPixPredictionSensor, name, wrapper)

    wrap("poke")
    wrap("execute_complete")
    return record


def sensor_dag(prediction_id: str, deferrable: bool, **options) -> str:
    extra = "".join(f", {k}={v!r}" for k, v in options.items())
    return HEADER + (
        f'SpeedPixPredictionSensor(task_id="wait", dag=dag, prediction_id={prediction_id!r}, '
        f"deferrable={deferrable}, poke_interval=0.2{extra})\n"
    )


def without_query(url: str) -> str:
    """An output URL without its (signed, temporary) query string."""
    return url.split("?", 1)[0]


def create(workflow_id: str) -> str:
    return SpeedPixHook().create_prediction(workflow_id, {"text": "x"}).id


# ---------------------------------------------------------------------- success
@pytest.mark.parametrize("deferrable", [False, True], ids=["poke", "deferrable"])
def test_sensor_returns_output_of_existing_prediction(run_dag, stepped_emulator, spy, deferrable):
    emu = stepped_emulator
    prediction_id = create("sleep-1.5")  # done at the 4th status read (emulated 0, 0.6, 1.2, 1.8 s)
    dr = run_dag(sensor_dag(prediction_id, deferrable, timeout=60))
    assert dr.state == "success"
    assert ti_of(dr, "wait").state == "success"
    output = xcom(dr, "wait")
    assert list(output) == ["images"]
    assert without_query(output["images"]["url"]) == (
        f"{emu.url}/_emulator/files/outputs/{prediction_id}/output.png"
    )
    assert emu.calls("comfy_prompt") == 1
    if deferrable:  # it really waited on the trigger and resumed with its success event
        [event] = spy["resumed"]
        assert event["status"] == "success" and event["prediction_id"] == prediction_id
    else:
        assert spy["resumed"] == []
        assert emu.calls("comfy_get_progress") >= 3  # poked until done


@pytest.mark.parametrize("deferrable", [False, True], ids=["poke", "deferrable"])
def test_sensor_returns_default_images_of_a_workflow_without_custom_outputs(
    run_dag, stepped_emulator, deferrable, capsys
):
    prediction_id = create("wf-images-only")  # queued at the first poke (stepped clock), done at the 3rd
    dr = run_dag(sensor_dag(prediction_id, deferrable, timeout=60))
    assert dr.state == "success"
    base = f"{stepped_emulator.url}/_emulator/files/outputs/{prediction_id}"
    images = xcom(dr, "wait")["images"]
    assert [without_query(url) for url in images] == [
        f"{base}/ComfyUI_00001_.png",
        f"{base}/ComfyUI_00002_.png",
    ]
    text = capsys.readouterr().out
    assert f"Prediction {prediction_id} succeeded: ran 0.9 s (" in text and "2 default images" in text
    if not deferrable:  # poked from the worker: the same progress line as operator and trigger
        assert f"Prediction {prediction_id} queued" in text


@pytest.mark.parametrize("deferrable", [False, True], ids=["poke", "deferrable"])
def test_submit_then_sense_with_templated_id(run_dag, speedpix_conn, deferrable):
    dr = run_dag(
        HEADER
        + f"""
submit = SpeedPixRunOperator(task_id="submit", dag=dag, workflow_id="sleep-1", inputs={{"text": "x"}},
    wait_for_completion=False)
wait = SpeedPixPredictionSensor(task_id="wait", dag=dag, deferrable={deferrable}, poke_interval=0.2,
    timeout=60, prediction_id="{{{{ ti.xcom_pull(task_ids='submit') }}}}")
submit >> wait
"""
    )
    assert dr.state == "success"
    prediction_id = xcom(dr, "submit")
    assert isinstance(prediction_id, str) and prediction_id
    assert without_query(xcom(dr, "wait")["images"]["url"]).endswith(f"/outputs/{prediction_id}/output.png")
    assert speedpix_conn.calls("comfy_prompt") == 1


def test_finished_prediction_does_not_defer(run_dag, speedpix_conn, spy):
    prediction_id = create("sleep-0.1")
    time.sleep(0.3)  # setup only: the emulated task is finished before the sensor starts
    dr = run_dag(sensor_dag(prediction_id, True, timeout=60))
    assert dr.state == "success"
    assert xcom(dr, "wait")["images"]["url"]
    assert spy["resumed"] == []  # answered by the first poke, no trigger needed
    assert speedpix_conn.calls("comfy_get_progress") == 1


# ---------------------------------------------------------------------- failure
@pytest.mark.parametrize("deferrable", [False, True], ids=["poke", "deferrable"])
def test_failed_prediction_fails_task_with_code_and_message(
    run_dag, stepped_emulator, spy, deferrable, capsys
):
    prediction_id = create("wf-fail")  # unfinished at the first poke (stepped clock): deferrable defers
    dr = run_dag(sensor_dag(prediction_id, deferrable, timeout=60))
    assert dr.state == "failed"
    assert ti_of(dr, "wait").state == "failed"
    [err] = spy["raised"]
    assert isinstance(err, SpeedPixPredictionFailed)
    assert err.prediction_id == prediction_id
    assert err.error_code == "WORKFLOW_EXECUTION_FAILED"
    assert "KSampler" in err.error_message
    assert len(spy["resumed"]) == (1 if deferrable else 0)
    out = capsys.readouterr().out
    assert "SpeedPixPredictionFailed" in out and "WORKFLOW_EXECUTION_FAILED" in out


@pytest.mark.parametrize("deferrable", [False, True], ids=["poke", "deferrable"])
def test_failed_prediction_with_soft_fail_skips(run_dag, stepped_emulator, spy, deferrable):
    prediction_id = create("wf-fail")  # unfinished at the first poke (stepped clock): deferrable defers
    dr = run_dag(sensor_dag(prediction_id, deferrable, timeout=60, soft_fail=True))
    assert ti_of(dr, "wait").state == "skipped"
    assert dr.state == "success"
    [err] = spy["raised"]
    # poke mode skips inside poke(); deferrable mode raises and the sensor base class turns it into a skip
    failure = err.__cause__ if deferrable is False else err
    assert len(spy["resumed"]) == (1 if deferrable else 0)
    assert isinstance(failure, SpeedPixPredictionFailed)
    assert failure.error_code == "WORKFLOW_EXECUTION_FAILED"
    if not deferrable:
        assert isinstance(err, AirflowSkipException) and "WORKFLOW_EXECUTION_FAILED" in str(err)


# ---------------------------------------------------------------------- timeout
@pytest.mark.parametrize("soft_fail", [False, True], ids=["fails", "soft_fail"])
def test_deferrable_sensor_timeout(run_dag, speedpix_conn, spy, soft_fail):
    prediction_id = create("sleep-30")
    started = time.monotonic()
    dr = run_dag(sensor_dag(prediction_id, True, timeout=2, soft_fail=soft_fail))
    took = time.monotonic() - started
    assert ti_of(dr, "wait").state == ("skipped" if soft_fail else "failed")
    assert dr.state == ("success" if soft_fail else "failed")
    [event] = spy["resumed"]  # the trigger's own timeout event came first, not the deferral timeout
    assert event["status"] == "timeout" and event["prediction_id"] == prediction_id
    [err] = spy["raised"]
    assert isinstance(err, AirflowSensorTimeout)  # a sensor timeout, as in poke mode (not retried)
    assert isinstance(err.__cause__, SpeedPixTimeoutError) and err.__cause__.prediction_id == prediction_id
    assert prediction_id in str(err)
    assert took < 20
    assert speedpix_conn.calls("comfy_prompt") == 1
    assert speedpix_conn.calls("comfy_get_result") == 0


def test_poke_sensor_timeout(run_dag, speedpix_conn):
    prediction_id = create("sleep-30")
    dr = run_dag(sensor_dag(prediction_id, False, timeout=1))
    assert ti_of(dr, "wait").state == "failed"
    assert dr.state == "failed"


# ---------------------------------------------------------------------- deferral details (no DB)
def test_defer_passes_ids_and_an_absolute_deadline(speedpix_conn):
    from airflow.providers.common.compat.sdk import TaskDeferred

    prediction_id = create("sleep-30")
    sensor = SpeedPixPredictionSensor(
        task_id="wait", prediction_id=prediction_id, deferrable=True, poke_interval=3, timeout=120
    )
    before = time.time()
    with pytest.raises(TaskDeferred) as info:
        sensor.execute({})
    deferred = info.value
    assert deferred.method_name == "execute_complete"
    trigger = deferred.trigger
    assert isinstance(trigger, SpeedPixPredictionTrigger)
    kwargs = trigger.serialize()[1]
    assert kwargs["prediction_id"] == prediction_id
    assert kwargs["speedpix_conn_id"] == "speedpix_default"
    assert kwargs["poll_interval"] == 3.0
    assert before + 120 <= kwargs["deadline"] <= time.time() + 120
    # the deferral outlives the trigger's deadline, so the trigger's clean timeout event arrives first
    assert deferred.timeout > timedelta(seconds=120)


def test_execute_complete_policy():
    sensor = SpeedPixPredictionSensor(task_id="wait", prediction_id="p-1", timeout=30)
    output = {"images": {"url": "http://x/y.png"}}
    success = {
        "status": "success",
        "prediction_id": "p-1",
        "prediction_status": "succeeded",
        "output": output,
    }
    assert sensor.execute_complete({}, success) == output
    with pytest.raises(SpeedPixPredictionFailed):
        sensor.execute_complete({}, {"status": "failed", "prediction_id": "p-1", "error_code": "E"})
    with pytest.raises(AirflowSensorTimeout, match="p-1") as info:
        sensor.execute_complete({}, {"status": "timeout", "prediction_id": "p-1"})
    assert isinstance(info.value.__cause__, SpeedPixTimeoutError)
    with pytest.raises(SpeedPixSensorError, match="I400SG") as error:
        sensor.execute_complete({}, {"status": "error", "prediction_id": "p-1", "error_code": "I400SG"})
    assert isinstance(error.value.__cause__, SpeedPixError)
    with pytest.raises(SpeedPixSensorError, match="Unexpected event"):
        sensor.execute_complete({}, None)


def test_prediction_id_is_templated():
    assert "prediction_id" in SpeedPixPredictionSensor.template_fields


@pytest.mark.parametrize("deferrable", [False, True], ids=["poke", "deferrable"])
def test_sensor_timeout_is_not_retried(run_dag, speedpix_conn, deferrable):
    """A sensor that ran out of time fails for good in both modes: a retry would start the whole wait
    again (Airflow raises AirflowSensorTimeout for exactly this reason)."""
    prediction_id = create("sleep-30")
    dr = run_dag(
        sensor_dag(prediction_id, deferrable, timeout=1, retries=2, retry_delay=timedelta(seconds=0))
    )
    ti = ti_of(dr, "wait")
    assert ti.state == "failed"
    assert ti.try_number == 1


# ---------------------------------------------------------------------- soft_fail: the same rule in both modes
OUTCOMES = ["failed", "timeout", "error"]
#: only a failed prediction or a timeout may skip; an error (credentials, unknown id, ...) fails
SOFT_FAIL_STATE = {"failed": "skipped", "timeout": "skipped", "error": "failed"}


def final_state(run) -> str:
    try:
        run()
    except AirflowSkipException:
        return "skipped"
    except BaseException:
        return "failed"
    return "success"


@pytest.mark.parametrize("outcome", OUTCOMES)
def test_soft_fail_in_poke_mode(monkeypatch, outcome):
    def get_prediction(hook, prediction_id, **kwargs):
        if outcome == "error":
            raise SpeedPixAuthError("refused: check the App Secret", operation="comfy_get_progress")
        status = "failed" if outcome == "failed" else "running"
        return Prediction(id=prediction_id, status=status, error="boom", error_code="E1")

    monkeypatch.setattr(SpeedPixHook, "get_prediction", get_prediction)
    sensor = SpeedPixPredictionSensor(
        task_id="wait", prediction_id="p-1", soft_fail=True, poke_interval=0.05, timeout=0.2
    )
    assert final_state(lambda: sensor.execute({})) == SOFT_FAIL_STATE[outcome]


@pytest.mark.parametrize("outcome", OUTCOMES)
def test_soft_fail_in_deferrable_mode(outcome):
    """Through the sensor base class's ``resume_execution``, as the worker resumes a deferred sensor."""
    sensor = SpeedPixPredictionSensor(task_id="wait", prediction_id="p-1", soft_fail=True, timeout=30)
    event = {"status": outcome, "prediction_id": "p-1", "error_code": "I400SG", "message": "refused"}
    state = final_state(lambda: sensor.resume_execution("execute_complete", {"event": event}, {}))
    assert state == SOFT_FAIL_STATE[outcome]


def test_error_event_with_soft_fail_fails_the_deferred_sensor(run_dag, speedpix_conn, spy, monkeypatch):
    """End to end in ``dag.test()``: the trigger's polls are refused (its error event), the poke was fine."""

    async def refused(hook, prediction_id, **kwargs):
        raise SpeedPixAuthError(
            "SpeedPix gateway refused: check the App Secret", operation="comfy_get_progress"
        )

    monkeypatch.setattr(SpeedPixHook, "aget_prediction", refused)
    prediction_id = create("sleep-30")
    dr = run_dag(sensor_dag(prediction_id, True, timeout=60, soft_fail=True))
    [event] = spy["resumed"]
    assert event["status"] == "error"
    assert ti_of(dr, "wait").state == "failed"  # not skipped: poke mode fails on the same error
    [err] = spy["raised"]
    assert isinstance(err, SpeedPixSensorError) and "App Secret" in str(err)


def test_never_fail_still_skips_an_error_event():
    sensor = SpeedPixPredictionSensor(task_id="wait", prediction_id="p-1", never_fail=True, timeout=30)
    event = {"status": "error", "prediction_id": "p-1", "message": "refused"}
    assert final_state(lambda: sensor.resume_execution("execute_complete", {"event": event}, {})) == "skipped"
