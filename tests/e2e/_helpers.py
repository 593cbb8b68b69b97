"""Small helpers shared by the e2e test modules (the deployment itself lives in ``deployment.py``)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import pytest

T = TypeVar("T")


def wait_until(
    deployment: Any,
    condition: Callable[[], T],
    timeout: float,
    what: str,
    *,
    pause: float = 0.5,
    components: Iterable[str] | None = None,
    check_alive: bool = False,
) -> T:
    """Call ``condition`` every ``pause`` seconds until it returns something true, and return that; after
    ``timeout`` seconds fail the test, naming ``what`` and showing ``deployment``'s log tails (of
    ``components``, or of all). With ``check_alive``, a component that exited meanwhile ends the wait at once
    (``deployment.check_alive()`` raises)."""
    deadline = time.monotonic() + timeout
    while True:
        if check_alive:
            deployment.check_alive()
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(
                f"Timed out after {timeout:.0f}s waiting for {what}\n{deployment.log_tails(components)}"
            )
        time.sleep(pause)


def return_value(deployment: Any, dag_id: str, run_id: str, task_id: str) -> Any:
    """The ``return_value`` XCom of a task of a run, decoded from the metadata DB (None if there is none)."""
    rows = deployment.query(
        "SELECT value FROM xcom WHERE dag_id = ? AND run_id = ? AND task_id = ? AND key = 'return_value'",
        (dag_id, run_id, task_id),
    )
    if not rows:
        return None
    value = rows[0][0]
    value = json.loads(value) if isinstance(value, str | bytes) else value
    return json.loads(value) if isinstance(value, str) else value
