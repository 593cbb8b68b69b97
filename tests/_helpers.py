"""Small helpers shared by several test modules (fixtures live in ``conftest.py``)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

import pytest

from airflow_provider_speedpix._signing import sign_request


def gateway_headers(server: Any, path: str, body: bytes, **options: Any) -> dict[str, str]:
    """Gateway signing headers for a POST of ``body`` to ``server``'s ``path``, with ``server``'s own key
    and secret; ``options`` go to :func:`sign_request` as given (``clock=``, ``nonce=``...)."""
    return sign_request(
        method="POST", path=path, body=body, app_key=server.app_key, app_secret=server.app_secret, **options
    )


def with_upstream_value(returns: str, then: str) -> str:
    """DAG code to follow a header that defines ``dag``: a ``@task`` ``upstream`` that returns ``returns``
    (Python source), its XComArg bound to ``value``, then the line ``then`` (which may use ``value``)."""
    lines = [
        "from airflow.sdk import task",
        "with dag:",
        "    @task",
        "    def upstream():",
        f"        return {returns}",
        "    value = upstream()",
        f"    {then}",
    ]
    return "\n" + "\n".join(lines) + "\n"


async def cancel_after(awaitable: Awaitable[Any], seconds: float) -> None:
    """Run ``awaitable`` as a task for ``seconds``, then cancel it, as the triggerer does on a user action,
    and check that it ended cancelled."""
    task = asyncio.ensure_future(awaitable)
    await asyncio.sleep(seconds)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def said(capsys, caplog) -> str:
    """All a test printed and logged since the last read: stdout, stderr and the captured log records."""
    captured = capsys.readouterr()
    return captured.out + captured.err + caplog.text
