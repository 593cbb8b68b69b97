"""What the hook needs from an Airflow connection (or the environment), read and checked once.

The connection form is declared once, as ``conn-fields`` in :func:`get_provider_info`; Airflow 3.2+
reads it from there and :func:`connection_form_widgets` builds the 3.0/3.1 form from the same
declaration.
"""

from __future__ import annotations

import math
import os
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from airflow.providers.common.compat.sdk import mask_secret

from airflow_provider_speedpix._retry import RetryPolicy
from airflow_provider_speedpix.exceptions import SpeedPixConfigError

DEFAULT_ENDPOINT = "https://openai.edu-aliyun.com"
#: Seconds per HTTP request (not per wait: see the operator's ``WAIT_TIMEOUT``).
REQUEST_TIMEOUT = 30.0
DEFAULT_RETRY_LIMIT = 5
DEFAULT_RETRY_DELAY = 1.0
DEFAULT_RETRY_MAX_DELAY = 30.0
ENV_KEY, ENV_SECRET, ENV_ENDPOINT = "SPEEDPIX_APP_KEY", "SPEEDPIX_APP_SECRET", "SPEEDPIX_ENDPOINT"


@dataclass(frozen=True)
class SpeedPixSettings:
    """What the hook needs from a connection. ``repr`` never shows the secret."""

    endpoint: str
    app_key: str
    app_secret: str
    resource_config_id: str | None = None
    timeout: float = REQUEST_TIMEOUT
    retry_limit: int = DEFAULT_RETRY_LIMIT
    retry_delay: float = DEFAULT_RETRY_DELAY
    retry_max_delay: float = DEFAULT_RETRY_MAX_DELAY

    def __repr__(self) -> str:
        return f"SpeedPixSettings(endpoint={self.endpoint!r}, app_key={self.app_key!r}, app_secret='***')"

    @property
    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(attempts=self.retry_limit, delay=self.retry_delay, max_delay=self.retry_max_delay)


def normalise_endpoint(host: str | None, *, scheme: str | None = None, port: int | None = None) -> str:
    """``http://127.0.0.1:8000``, ``openai.edu-aliyun.com`` (means https) -> base URL without a slash."""
    raw = (host or "").strip()
    if not raw:
        return DEFAULT_ENDPOINT
    if "://" not in raw:
        raw = f"{scheme if scheme in ('http', 'https') else 'https'}://{raw}"
    parsed = urllib.parse.urlsplit(raw)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise SpeedPixConfigError(
            f"Endpoint {host!r} is not an http(s) URL. Set the connection's Endpoint (host) to e.g. "
            f"{DEFAULT_ENDPOINT} or http://127.0.0.1:8000."
        )
    if parsed.path not in ("", "/") or parsed.query or parsed.fragment:
        raise SpeedPixConfigError(
            f"Endpoint {host!r} has a path; the API paths (/scc/...) are added by the hook. Set the "
            f"Endpoint to {parsed.scheme}://{parsed.netloc} only."
        )
    try:
        parsed_port = parsed.port
    except ValueError:
        raise SpeedPixConfigError(
            f"Endpoint {host!r} has an invalid port. Set the Endpoint to e.g. http://127.0.0.1:8000."
        ) from None
    netloc = parsed.netloc
    if port and not parsed_port:
        netloc = f"{netloc}:{port}"
    return f"{parsed.scheme}://{netloc}"


def settings_from(
    *,
    host: str | None,
    login: str | None,
    password: str | None,
    extra: Mapping[str, Any],
    source: str,
    **kw: Any,
) -> SpeedPixSettings:
    """Check and normalise a connection's fields; ``source`` names it in every error."""
    if not (login or "").strip():
        raise SpeedPixConfigError(f"{source}: the App Key (login) is empty. Set it to your SpeedPix app_key.")
    if not login.strip().isascii() or not login.strip().isprintable():  # type: ignore[union-attr]
        raise SpeedPixConfigError(
            f"{source}: the App Key (login) must be printable ASCII (it is sent as a header). Copy the "
            "app_key from the SpeedPix console again."
        )
    if not (password or "").strip():
        raise SpeedPixConfigError(
            f"{source}: the App Secret (password) is empty. Set it to your SpeedPix app_secret."
        )

    def number(name: str, default: float, cast: Callable[[Any], Any] = float, minimum: float = 0) -> Any:
        value = extra.get(name)
        if value in (None, ""):
            return default
        try:
            result = cast(value)
        except (TypeError, ValueError):
            raise SpeedPixConfigError(f"{source}: extra `{name}` must be a number, got {value!r}.") from None
        if not math.isfinite(result) or result < minimum:
            raise SpeedPixConfigError(f"{source}: extra `{name}` must be >= {minimum}, got {value!r}.")
        return result

    return SpeedPixSettings(
        endpoint=normalise_endpoint(host, **kw),
        app_key=login.strip(),  # type: ignore[union-attr]
        app_secret=password,  # type: ignore[arg-type]
        resource_config_id=(str(extra.get("resource_config_id") or "").strip() or None),
        timeout=number("timeout", REQUEST_TIMEOUT, minimum=0.001),
        retry_limit=number("retry_limit", DEFAULT_RETRY_LIMIT, int, minimum=1),
        retry_delay=number("retry_delay", DEFAULT_RETRY_DELAY),
        retry_max_delay=number("retry_max_delay", DEFAULT_RETRY_MAX_DELAY),
    )


def settings_from_connection(conn: Any, extra: Mapping[str, Any], conn_id: str) -> SpeedPixSettings:
    return settings_from(
        host=conn.host,
        login=conn.login,
        password=conn.password,
        extra=extra,
        source=f"Connection {conn_id!r}",
        scheme=conn.schema,
        port=conn.port,
    )


def settings_from_env(conn_id: str) -> SpeedPixSettings:
    """The fallback when there is no connection ``conn_id``: ``SPEEDPIX_*`` environment variables."""
    key, secret = os.environ.get(ENV_KEY), os.environ.get(ENV_SECRET)
    if not key or not secret:
        raise SpeedPixConfigError(
            f"No Airflow connection {conn_id!r} and no {ENV_KEY} / {ENV_SECRET} in the "
            f"environment. Fix it either way: create a connection of type 'speedpix' with id "
            f"{conn_id!r} (Login = app_key, Password = app_secret, Host = endpoint), e.g. "
            f'AIRFLOW_CONN_{conn_id.upper()}=\'{{"conn_type": "speedpix", "login": '
            f'"KEY", "password": "SECRET"}}\'; or export {ENV_KEY} and {ENV_SECRET} '
            f"(and optionally {ENV_ENDPOINT})."
        )
    mask_secret(secret)  # env secrets are not masked by Airflow on their own
    return settings_from(
        host=os.environ.get(ENV_ENDPOINT), login=key, password=secret, extra={}, source="Environment"
    )


def connection_type() -> dict[str, Any]:
    """This provider's entry in ``get_provider_info()["connection-types"]``."""
    from airflow_provider_speedpix import get_provider_info

    return get_provider_info()["connection-types"][0]


def connection_form_widgets() -> dict[str, Any]:
    """Extra fields for the Airflow 3.0/3.1 form, built from the ``conn-fields`` 3.2+ reads."""
    from flask_babel import lazy_gettext
    from wtforms import FloatField, IntegerField, StringField
    from wtforms.validators import NumberRange, Optional

    field_types = {"string": StringField, "integer": IntegerField, "number": FloatField}
    widgets = {}
    declared = connection_type()
    placeholders = declared["ui-field-behaviour"].get("placeholders", {})
    # No field has a default value: a pre-filled default would be saved into `extra` and pin it there.
    for name, spec in declared["conn-fields"].items():
        schema = spec["schema"]
        kind = next(t for t in schema["type"] if t != "null")
        validators = [Optional()]
        if "minimum" in schema:
            validators.append(NumberRange(min=schema["minimum"]))
        widgets[name] = field_types[kind](
            lazy_gettext(spec["label"]),
            description=spec.get("description", ""),
            validators=validators,
            default=schema.get("default"),
            render_kw={"placeholder": placeholders[name]} if name in placeholders else None,
        )
    return widgets
