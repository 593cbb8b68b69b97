"""The emulator's ``--latency`` option: every signed API call is answered that much later (a remote
service), concurrent calls wait together, and admin calls are not delayed."""

from __future__ import annotations

import concurrent.futures
import time

import pytest
import requests

from airflow_provider_speedpix import _protocol as proto
from airflow_provider_speedpix.emulator import EmulatorConfig
from airflow_provider_speedpix.emulator.__main__ import build_parser
from airflow_provider_speedpix.emulator.config import parse_runtime_changes
from tests.emulator_fixture import signed_post

PROGRESS_PATH = proto.PATHS[proto.PROGRESS]
#: the emulator's event loop (uvloop: a millisecond clock cached per loop iteration) can end a sleep up
#: to ~1 ms early, so a delay is only ever measured to within this much
TIMER_SLACK = 0.005


def _timed_progress(server, session=None) -> float:
    started = time.perf_counter()
    response = signed_post(server, PROGRESS_PATH, {"taskId": "no-such-task"}, session=session)
    assert response.status_code == 200  # a backend answer (task not found), past the gateway
    return time.perf_counter() - started


def test_latency_delays_each_signed_call(make_emulator) -> None:
    server = make_emulator(latency=1.0)  # long enough that a loaded machine's own delays stay below it
    with requests.Session() as session:
        _timed_progress(server, session)  # connect
        assert _timed_progress(server, session) >= 1.0 - TIMER_SLACK
        started = time.perf_counter()
        requests.get(f"{server.url}/_emulator/health", timeout=10)
        assert time.perf_counter() - started < 1.0  # admin calls are not delayed


def test_concurrent_calls_wait_together(make_emulator) -> None:
    server = make_emulator(latency=0.5)
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        durations = list(pool.map(lambda _: _timed_progress(server), range(8)))
    assert min(durations) >= 0.5 - TIMER_SLACK
    assert time.perf_counter() - started < 8 * 0.5  # not one after another


def test_latency_is_a_runtime_setting_and_reset_restores_it(make_emulator) -> None:
    server = make_emulator()
    assert server.configure(latency=1.0)["latency"] == 1.0
    assert _timed_progress(server) >= 1.0 - TIMER_SLACK
    server.reset()
    assert _timed_progress(server) < 1.0


def test_latency_validation_and_cli() -> None:
    assert EmulatorConfig().latency == 0.0
    with pytest.raises(ValueError, match="latency"):
        EmulatorConfig(latency=-1)
    with pytest.raises(ValueError, match="latency"):
        parse_runtime_changes({"latency": float("nan")})
    assert build_parser().parse_args(["--latency", "0.05"]).latency == 0.05
    assert build_parser().parse_args([]).latency == 0.0
