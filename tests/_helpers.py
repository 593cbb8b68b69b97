"""Small helpers shared by several test modules (fixtures live in ``conftest.py``)."""

from __future__ import annotations

from typing import Any

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
