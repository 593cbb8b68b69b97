"""The trigger's terminal event: one schema (`_outcome.FINISHED_EVENT_FIELDS`), one check (`check_event`)."""

from __future__ import annotations

import pytest

from airflow_provider_speedpix._outcome import (
    FINISHED_EVENT_FIELDS,
    check_event,
    prediction_event,
    raise_for_event,
)
from airflow_provider_speedpix._protocol import Prediction
from airflow_provider_speedpix.exceptions import SpeedPixError, SpeedPixPredictionFailed

SUCCEEDED = Prediction(id="p-1", status="succeeded", output={"images": {"url": "http://h/x.png"}})


def test_the_trigger_event_carries_the_schema_and_passes_the_check():
    event = prediction_event(SUCCEEDED)
    assert set(FINISHED_EVENT_FIELDS) <= set(event)
    assert check_event(event, prediction_id="p-1") is event
    assert raise_for_event(event, prediction_id="p-1") is event
    failed = prediction_event(Prediction(id="p-2", status="failed", error="boom"))
    assert set(FINISHED_EVENT_FIELDS) <= set(failed)


def test_an_event_of_0_1_0_still_passes():
    """0.1.0's trigger sent status, prediction_id, prediction_status, output, error_code, message, invoke_id."""
    old = {
        "status": "success",
        "prediction_id": "p-1",
        "prediction_status": "succeeded",
        "output": None,
        "error_code": None,
        "message": None,
        "invoke_id": None,
    }
    assert raise_for_event(old, prediction_id="p-1") is old


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"output": None}, "lacks output"),  # None = the key removed, below
        ({"prediction_status": None}, "lacks prediction_status"),
        ({"prediction_status": "running"}, "says prediction_status='running'"),
    ],
)
def test_a_success_event_without_its_fields_is_refused(change, message):
    event = prediction_event(SUCCEEDED)
    for key, value in change.items():
        if value is None:
            del event[key]
        else:
            event[key] = value
    with pytest.raises(SpeedPixError, match=message) as info:
        raise_for_event(event)
    assert type(info.value) is SpeedPixError


@pytest.mark.parametrize("status", ["success", "failed", "timeout", "error"])
def test_an_event_for_another_prediction_is_refused(status):
    event = {**prediction_event(SUCCEEDED), "status": status}
    with pytest.raises(SpeedPixError, match="deferred on prediction p-mine") as info:
        raise_for_event(event, prediction_id="p-mine")
    assert type(info.value) is SpeedPixError
    assert check_event(event) is event  # without an expected id: no id check


def test_a_failed_event_for_this_prediction_still_raises_the_failure():
    event = prediction_event(Prediction(id="p-1", status="failed", error="boom", error_code="E1"))
    with pytest.raises(SpeedPixPredictionFailed):
        raise_for_event(event, prediction_id="p-1")


def test_the_event_carries_no_output_url_signature():
    """Airflow logs and stores trigger events whole: signed output URLs stay out of them."""
    from airflow_provider_speedpix._outcome import prediction_event

    signed = "http://h/_emulator/files/outputs/p/output.png?Expires=9&Signature=s3cret"
    event = prediction_event(
        Prediction(id="p", status="succeeded", output={"images": {"url": signed}}, images=[signed])
    )
    assert "s3cret" not in repr(event) and "?" not in repr(event)
    assert event["output"] == {"images": {"url": "http://h/_emulator/files/outputs/p/output.png"}}
