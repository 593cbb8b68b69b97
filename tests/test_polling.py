"""The adaptive delay under wrong estimates: pure functions, exact values, injected clocks."""

from __future__ import annotations

import pytest

from airflow_provider_speedpix._polling import MAX_ETA_RATE, PollLoop, eta_trend, next_poll_delay
from airflow_provider_speedpix._protocol import Prediction


def running(eta: float) -> Prediction:
    return Prediction(id="t", status="running", eta_seconds=eta)


def test_without_a_trend_the_delay_is_unchanged() -> None:
    assert next_poll_delay(running(40), poll_interval=2, max_interval=60) == 20
    assert next_poll_delay(running(40), poll_interval=2, max_interval=60, eta_rate=None) == 20
    assert next_poll_delay(running(40), poll_interval=2, max_interval=60, eta_rate=1.0) == 20


def test_an_eta_falling_faster_than_time_shrinks_the_remaining_time() -> None:
    # the ETA fell 2 s per second: it is twice too long, 40 s means 20 s
    assert next_poll_delay(running(40), poll_interval=2, max_interval=60, eta_rate=2.0) == 10
    # near the end by the corrected time: aim just past it, never longer than poll_interval
    assert next_poll_delay(running(6), poll_interval=2, max_interval=60, eta_rate=2.0) == 2
    assert next_poll_delay(running(3), poll_interval=2, max_interval=60, eta_rate=2.0) == pytest.approx(1.6)


def test_the_correction_is_capped_and_never_lengthens_the_sleep() -> None:
    assert (
        next_poll_delay(running(60), poll_interval=2, max_interval=60, eta_rate=100) == 60 / MAX_ETA_RATE / 2
    )
    # a slow-falling ETA (too short, or a queue) does not make the sleep longer than the ETA says
    assert next_poll_delay(running(40), poll_interval=2, max_interval=60, eta_rate=0.5) == 20


def test_eta_trend() -> None:
    assert eta_trend(None, 10.0, 30.0) is None
    assert eta_trend((0.0, 50.0), 10.0, 37.0) == pytest.approx(1.3)
    assert eta_trend((0.0, 50.0), 0.2, 40.0) is None  # too close together
    assert eta_trend((0.0, 50.0), 10.0, 50.0) is None  # not falling (a queue, a stall)
    assert eta_trend((0.0, 50.0), 10.0, 55.0) is None


def test_poll_loop_learns_the_trend_between_running_answers() -> None:
    loop = PollLoop(poll_interval=2, max_interval=60)
    # an ETA 30 % too long: a 100 s job reports 130 s, and 13 s less every 10 s
    first = loop.answered(running(130), now=0.0)
    assert first.action == "sleep" and first.delay == 60  # no trend yet: half the ETA, capped
    second = loop.answered(running(130 - 1.3 * 60), now=60.0)  # 52 s said, 40 s true
    assert second.delay == pytest.approx(52 / 1.3 / 2)
    # a waiting answer does not break the trend
    assert loop.answered(Prediction(id="t", status="waiting"), now=61.0).delay == 2


def test_a_long_eta_still_meets_the_end_within_a_poll_interval() -> None:
    """Simulate a 100 s job whose ETA is 30 % too long: the poll after the end is at most poll_interval
    late, as with a fixed interval, at a fraction of the calls."""
    duration, factor, poll = 100.0, 1.3, 2.0
    loop = PollLoop(poll_interval=poll, max_interval=60)
    now, calls = 0.0, 0
    while True:
        calls += 1
        if now >= duration:
            break
        step = loop.answered(running(round((duration - now) * factor, 3)), now=now)
        now += step.delay
    assert now - duration <= poll
    assert calls <= 0.5 * (duration / poll)
