"""Pytest fixtures for the local SpeedPix emulator.

Use from ``tests/conftest.py`` with either ``from tests.emulator_fixture import *`` or
``pytest_plugins = ["tests.emulator_fixture"]``.

* ``emulator_server`` (session): one :class:`EmulatorServer` on a free loopback port, task duration 1 s,
  key ``test-key``, secret ``test-secret-DO-NOT-LEAK``.
* ``emulator`` (function): the same server, reset (tasks, counters, nonces, faults, settings) before the test.
* ``make_emulator`` (function): a factory for a private server with any
  :class:`~airflow_provider_speedpix.emulator.EmulatorConfig` option (``capacity=2``, ``eta_error=0.3``,
  ``full_pool_ids={"a"}``, ``images_only_workflow_ids={...}``...). Its clock is a
  :class:`~airflow_provider_speedpix.emulator.ManualClock` unless ``clock=`` is given: move time with
  ``server.clock.advance(seconds)`` instead of sleeping. Servers stop at the end of the test.

Build signed headers with :func:`airflow_provider_speedpix._signing.sign_request`, or use
:func:`signed_post` below.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests

from airflow_provider_speedpix._signing import sign_request
from airflow_provider_speedpix.emulator import EmulatorConfig, EmulatorServer, ManualClock

EMULATOR_APP_KEY = "test-key"
EMULATOR_APP_SECRET = "test-secret-DO-NOT-LEAK"
EMULATOR_DURATION = 1.0

__all__ = [
    "EMULATOR_APP_KEY",
    "EMULATOR_APP_SECRET",
    "EMULATOR_DURATION",
    "emulator",
    "emulator_server",
    "make_emulator",
    "signed_post",
]


@pytest.fixture(scope="session")
def emulator_server() -> Iterator[EmulatorServer]:
    config = EmulatorConfig(
        app_key=EMULATOR_APP_KEY, app_secret=EMULATOR_APP_SECRET, duration=EMULATOR_DURATION
    )
    server = EmulatorServer(config)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def emulator(emulator_server: EmulatorServer) -> Iterator[EmulatorServer]:
    emulator_server.reset()
    yield emulator_server


@pytest.fixture
def make_emulator() -> Iterator[Callable[..., EmulatorServer]]:
    started: list[EmulatorServer] = []

    def make(**options: Any) -> EmulatorServer:
        options.setdefault("clock", ManualClock())
        config = EmulatorConfig(
            app_key=EMULATOR_APP_KEY, app_secret=EMULATOR_APP_SECRET, duration=EMULATOR_DURATION
        )
        server = EmulatorServer(config, **options)
        server.start()
        started.append(server)
        return server

    try:
        yield make
    finally:
        for server in started:
            server.stop()


def signed_post(
    server: EmulatorServer,
    path: str,
    body: Any,
    *,
    session: requests.Session | None = None,
    app_key: str | None = None,
    app_secret: str | None = None,
    extra_headers: dict[str, str] | None = None,
    **kwargs: Any,
) -> requests.Response:
    """POST ``body`` (a dict, serialised once, or raw bytes) to ``server`` with gateway signing headers."""
    raw = (
        body
        if isinstance(body, bytes)
        else json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    )
    headers = sign_request(
        method="POST",
        path=path,
        body=raw,
        app_key=app_key or server.app_key,
        app_secret=app_secret or server.app_secret,
    )
    headers.update(extra_headers or {})
    kwargs.setdefault("timeout", 10)
    return (session or requests).post(f"{server.url}{path}", data=raw, headers=headers, **kwargs)
