"""SpeedPixHook: credentials, signing, uploads, predictions, downloads, retries.

Every API call goes through one funnel per transport (``_call`` on ``requests``, ``_acall`` on a shared
``httpx.AsyncClient``); both sign with :mod:`airflow_provider_speedpix._signing`, parse with
:mod:`airflow_provider_speedpix._protocol` and retry with the same policy (:func:`should_retry`).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import math
import os
import re
import time
import urllib.parse
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx
import requests
import tenacity
import urllib3
from airflow.providers.common.compat.sdk import AirflowNotFoundException, BaseHook, mask_secret

from airflow_provider_speedpix import _protocol as proto
from airflow_provider_speedpix._inputs import (
    InputPreparer,
    _local_file,
    check_strategy,
    expand_user,
    guess_content_type,
    is_file_object,
    is_object_storage_path,
)
from airflow_provider_speedpix._polling import next_poll_delay
from airflow_provider_speedpix._protocol import Prediction, UploadedFile
from airflow_provider_speedpix._signing import sign_request
from airflow_provider_speedpix.exceptions import (
    SpeedPixAPIError,
    SpeedPixAuthError,
    SpeedPixConfigError,
    SpeedPixDownloadError,
    SpeedPixError,
    SpeedPixPredictionFailed,
    SpeedPixResponseError,
    SpeedPixServerError,
    SpeedPixThrottledError,
    SpeedPixTimeoutError,
    SpeedPixTransportError,
    SpeedPixUploadError,
)

DEFAULT_ENDPOINT = "https://openai.edu-aliyun.com"
DEFAULT_TIMEOUT = 30.0
DEFAULT_RETRY_LIMIT = 5
DEFAULT_RETRY_DELAY = 1.0
DEFAULT_RETRY_MAX_DELAY = 30.0
DEFAULT_POLL_INTERVAL = 2.0
MAX_RESPONSE_BYTES = 8 * 1024 * 1024
CHUNK = 1024 * 1024
ENV_KEY, ENV_SECRET, ENV_ENDPOINT = "SPEEDPIX_APP_KEY", "SPEEDPIX_APP_SECRET", "SPEEDPIX_ENDPOINT"

# One httpx.AsyncClient per event loop: every trigger in a triggerer shares its connection pool.
_ASYNC_CLIENTS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = (
    weakref.WeakKeyDictionary()
)
_ASYNC_SLOTS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
    weakref.WeakKeyDictionary()
)
MAX_IN_FLIGHT = 16


def shared_async_client() -> httpx.AsyncClient:
    """The running loop's shared client (created on first use)."""
    loop = asyncio.get_running_loop()
    client = _ASYNC_CLIENTS.get(loop)
    if client is None or client.is_closed:
        client = httpx.AsyncClient(
            timeout=DEFAULT_TIMEOUT,
            limits=httpx.Limits(
                max_connections=MAX_IN_FLIGHT, max_keepalive_connections=MAX_IN_FLIGHT, keepalive_expiry=60
            ),
        )
        _ASYNC_CLIENTS[loop] = client
    return client


def _in_flight_slots() -> asyncio.Semaphore:
    """Bounds concurrent requests per loop to the pool size.

    Thousands of triggers polling at once would otherwise queue inside httpx's pool, whose per-request
    bookkeeping grows with the queue (measured in benchmarks/b1: CPU per call doubled at 1,000 triggers).
    Waiting on a semaphore costs nothing.
    """
    loop = asyncio.get_running_loop()
    slots = _ASYNC_SLOTS.get(loop)
    if slots is None:
        slots = _ASYNC_SLOTS[loop] = asyncio.Semaphore(MAX_IN_FLIGHT)
    return slots


class _RedactQueryStrings(logging.Filter):
    """urllib3 logs each request line at DEBUG; a pre-signed upload URL's query string is a credential."""

    _QUERY = re.compile(r"\?[^\s\"']+")

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                self._QUERY.sub("?<redacted>", a) if isinstance(a, str) else a for a in record.args
            )
        return True


_URLLIB3_LOG = logging.getLogger("urllib3.connectionpool")
if not any(isinstance(f, _RedactQueryStrings) for f in _URLLIB3_LOG.filters):
    _URLLIB3_LOG.addFilter(_RedactQueryStrings())


@dataclass(frozen=True)
class SpeedPixSettings:
    """What the hook needs from a connection. ``repr`` never shows the secret."""

    endpoint: str
    app_key: str
    app_secret: str
    resource_config_id: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    retry_limit: int = DEFAULT_RETRY_LIMIT
    retry_delay: float = DEFAULT_RETRY_DELAY
    retry_max_delay: float = DEFAULT_RETRY_MAX_DELAY

    def __repr__(self) -> str:
        return f"SpeedPixSettings(endpoint={self.endpoint!r}, app_key={self.app_key!r}, app_secret='***')"


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


def _settings_from(
    *,
    host: str | None,
    login: str | None,
    password: str | None,
    extra: Mapping[str, Any],
    source: str,
    **kw: Any,
) -> SpeedPixSettings:
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
        timeout=number("timeout", DEFAULT_TIMEOUT, minimum=0.001),
        retry_limit=number("retry_limit", DEFAULT_RETRY_LIMIT, int, minimum=1),
        retry_delay=number("retry_delay", DEFAULT_RETRY_DELAY),
        retry_max_delay=number("retry_max_delay", DEFAULT_RETRY_MAX_DELAY),
    )


def should_retry(operation: str, error: BaseException) -> bool:
    """The single retry policy for both transports.

    Throttling and connect failures never reached the backend, so even a create is retried. 5xx, read
    timeouts, resets and unreadable answers are retried only for operations that can safely be repeated:
    a ``comfy_prompt`` that timed out may have created (and billed) a prediction already.
    """
    if isinstance(error, SpeedPixThrottledError):
        return True
    if isinstance(error, SpeedPixTransportError):
        return not error.reached_server or operation not in proto.NON_IDEMPOTENT
    if isinstance(error, SpeedPixServerError | SpeedPixResponseError):
        return operation not in proto.NON_IDEMPOTENT
    return False


def _requests_error(operation: str, err: requests.RequestException, host: str) -> SpeedPixTransportError:
    """Map a requests failure; the message names the host only (never a URL with a query string)."""
    reason = err.args[0] if err.args else None
    reason = getattr(reason, "reason", reason)
    never_sent = isinstance(err, requests.exceptions.ConnectTimeout) or isinstance(
        reason, urllib3.exceptions.NewConnectionError
    )
    if isinstance(err, requests.exceptions.ConnectTimeout):
        what = "connecting timed out"
    elif never_sent:
        what = "connection refused or host unreachable"
    elif isinstance(err, requests.exceptions.ReadTimeout):
        what = "no answer within the timeout"
    else:
        what = f"connection broken ({type(reason).__name__ if reason is not None else type(err).__name__})"
    return SpeedPixTransportError(
        f"SpeedPix {operation} to {host}: {what}.", operation=operation, reached_server=not never_sent
    )


def _httpx_error(operation: str, err: httpx.HTTPError, host: str) -> SpeedPixTransportError:
    never_sent = isinstance(err, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)
    if isinstance(err, httpx.TimeoutException):
        what = "connecting timed out" if never_sent else "no answer within the timeout"
    else:
        what = (
            "connection refused or host unreachable"
            if never_sent
            else f"connection broken ({type(err).__name__})"
        )
    return SpeedPixTransportError(
        f"SpeedPix {operation} to {host}: {what}.", operation=operation, reached_server=not never_sent
    )


def _safe_filename(name: str, fallback: str = "output") -> str:
    """A file name from a server-provided URL that cannot escape the destination directory."""
    name = urllib.parse.unquote(name).replace("\\", "/").rsplit("/", 1)[-1]
    name = re.sub(r"[^\w.\-]+", "_", name).strip("._") or fallback
    return name[:200]


class SpeedPixHook(BaseHook):
    """Talk to SpeedPix with an Airflow connection of type ``speedpix``.

    Host = endpoint (``https://openai.edu-aliyun.com`` by default; a bare host means https), Login = app_key,
    Password = app_secret. Extras: ``resource_config_id``, ``timeout`` (seconds per request),
    ``retry_limit`` (attempts), ``retry_delay`` and ``retry_max_delay`` (backoff, seconds). Without the
    connection, ``SPEEDPIX_APP_KEY`` / ``SPEEDPIX_APP_SECRET`` / ``SPEEDPIX_ENDPOINT`` are used.

    :param speedpix_conn_id: the Airflow connection to use.
    """

    conn_name_attr = "speedpix_conn_id"
    default_conn_name = "speedpix_default"
    conn_type = "speedpix"
    hook_name = "SpeedPix"

    def __init__(self, speedpix_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.speedpix_conn_id = speedpix_conn_id
        self._settings: SpeedPixSettings | None = None
        self._session: requests.Session | None = None

    # ------------------------------------------------------------------ connection form (3.0 / 3.1)
    @classmethod
    def get_connection_form_widgets(cls) -> dict[str, Any]:
        """Extra fields for the Airflow 3.0/3.1 form, built from the ``conn-fields`` 3.2+ reads."""
        from flask_babel import lazy_gettext
        from wtforms import FloatField, IntegerField, StringField
        from wtforms.validators import NumberRange, Optional

        field_types = {"string": StringField, "integer": IntegerField, "number": FloatField}
        widgets = {}
        for name, spec in _connection_type()["conn-fields"].items():
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
            )
        return widgets

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        """Relabel host/login/password and hide what SpeedPix does not use."""
        return _connection_type()["ui-field-behaviour"]

    # ------------------------------------------------------------------ settings
    def _settings_from_connection(self, conn: Any, extra: Mapping[str, Any]) -> SpeedPixSettings:
        return _settings_from(
            host=conn.host,
            login=conn.login,
            password=conn.password,
            extra=extra,
            source=f"Connection {self.speedpix_conn_id!r}",
            scheme=conn.schema,
            port=conn.port,
        )

    def _settings_from_env(self) -> SpeedPixSettings:
        key, secret = os.environ.get(ENV_KEY), os.environ.get(ENV_SECRET)
        if not key or not secret:
            raise SpeedPixConfigError(
                f"No Airflow connection {self.speedpix_conn_id!r} and no {ENV_KEY} / {ENV_SECRET} in the "
                f"environment. Fix it either way: create a connection of type 'speedpix' with id "
                f"{self.speedpix_conn_id!r} (Login = app_key, Password = app_secret, Host = endpoint), e.g. "
                f'AIRFLOW_CONN_{self.speedpix_conn_id.upper()}=\'{{"conn_type": "speedpix", "login": '
                f'"KEY", "password": "SECRET"}}\'; or export {ENV_KEY} and {ENV_SECRET} '
                f"(and optionally {ENV_ENDPOINT})."
            )
        mask_secret(secret)  # env secrets are not masked by Airflow on their own
        return _settings_from(
            host=os.environ.get(ENV_ENDPOINT), login=key, password=secret, extra={}, source="Environment"
        )

    @property
    def settings(self) -> SpeedPixSettings:
        """Resolved once per hook: the connection, else the environment."""
        if self._settings is None:
            try:
                conn = self.get_connection(self.speedpix_conn_id)
            except AirflowNotFoundException:
                conn = None  # fall back below, outside the handler: no chained not-found traceback
            if conn is None:
                self._settings = self._settings_from_env()
            else:
                self._settings = self._settings_from_connection(conn, conn.extra_dejson)
        return self._settings

    async def asettings(self) -> SpeedPixSettings:
        """The same, without blocking the event loop (for triggers)."""
        if self._settings is None:
            from airflow.providers.common.compat.connection import (
                get_async_connection,
                get_async_extra_dejson,
            )

            try:
                conn = await get_async_connection(self.speedpix_conn_id)
            except AirflowNotFoundException:
                conn = None  # fall back below, outside the handler: no chained not-found traceback
            if conn is None:
                self._settings = self._settings_from_env()
            else:
                self._settings = self._settings_from_connection(conn, await get_async_extra_dejson(conn))
        return self._settings

    def get_conn(self) -> requests.Session:
        """The hook's ``requests.Session`` (keep-alive across calls)."""
        if self._session is None:
            session = requests.Session()
            session.headers["User-Agent"] = "airflow-provider-speedpix"
            # Read proxy and CA settings from the environment once, not on every request (trust_env scans
            # the whole environment and ~/.netrc per call: a quarter of a status call's CPU).
            session.proxies.update(requests.utils.get_environ_proxies(self.settings.endpoint))
            ca_bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
            if ca_bundle:
                session.verify = ca_bundle
            session.trust_env = False
            self._session = session
        return self._session

    # ------------------------------------------------------------------ the funnel
    def _retrying(self, operation: str, settings: SpeedPixSettings, cls: type = tenacity.Retrying) -> Any:
        def log_retry(state: tenacity.RetryCallState) -> None:
            assert state.outcome is not None
            self.log.warning(
                "SpeedPix %s attempt %d/%d failed (%s); retrying in %.1fs",
                operation,
                state.attempt_number,
                settings.retry_limit,
                state.outcome.exception(),
                state.upcoming_sleep,
            )

        return cls(
            stop=tenacity.stop_after_attempt(settings.retry_limit),
            wait=tenacity.wait_random_exponential(
                multiplier=settings.retry_delay, max=settings.retry_max_delay
            ),
            retry=tenacity.retry_if_exception(lambda e: should_retry(operation, e)),
            before_sleep=log_retry,
            reraise=True,
        )

    def _headers(
        self, settings: SpeedPixSettings, operation: str, body: bytes, extra: Mapping[str, str]
    ) -> dict:
        headers = sign_request(
            method="POST",
            path=proto.PATHS[operation],
            body=body,
            app_key=settings.app_key,
            app_secret=settings.app_secret,
        )
        headers.update(extra)
        return headers

    def _call(
        self,
        operation: str,
        payload: Mapping[str, Any],
        *,
        headers: Mapping[str, str] | None = None,
        allow_failure: bool = False,
    ) -> proto.Envelope:
        settings = self.settings
        body = proto.encode_body(payload)
        url = settings.endpoint + proto.PATHS[operation]
        for attempt in self._retrying(operation, settings):
            with attempt:
                try:
                    with self.get_conn().post(
                        url,
                        data=body,
                        headers=self._headers(settings, operation, body, headers or {}),
                        timeout=settings.timeout,
                        stream=True,
                    ) as response:
                        content = _read_limited(response.iter_content(CHUNK), operation)
                except requests.RequestException as err:
                    raise _requests_error(operation, err, settings.endpoint) from None
                return proto.read_envelope(
                    operation, response.status_code, response.headers, content, allow_failure=allow_failure
                )
        raise AssertionError("unreachable")  # pragma: no cover

    async def _acall(
        self, operation: str, payload: Mapping[str, Any], *, allow_failure: bool = False
    ) -> proto.Envelope:
        settings = await self.asettings()
        body = proto.encode_body(payload)
        url = settings.endpoint + proto.PATHS[operation]
        client = shared_async_client()
        async for attempt in self._retrying(operation, settings, tenacity.AsyncRetrying):
            with attempt:
                request = client.build_request(
                    "POST",
                    url,
                    content=body,
                    headers=self._headers(settings, operation, body, {}),
                    timeout=settings.timeout,
                )
                try:
                    async with _in_flight_slots():
                        response = await client.send(request, stream=True)
                        try:
                            chunks = [c async for c in _alimited(response.aiter_bytes(), operation)]
                        finally:
                            await response.aclose()
                except httpx.HTTPError as err:
                    raise _httpx_error(operation, err, settings.endpoint) from None
                return proto.read_envelope(
                    operation,
                    response.status_code,
                    response.headers,
                    b"".join(chunks),
                    allow_failure=allow_failure,
                )
        raise AssertionError("unreachable")  # pragma: no cover

    # ------------------------------------------------------------------ files
    def upload_file(
        self, source: Any, *, filename: str | None = None, content_type: str | None = None
    ) -> UploadedFile:
        """Upload a path, binary file object or ``ObjectStoragePath``; returns its ``access_url``.

        The bytes are streamed to the pre-signed URL, so memory does not grow with the file size.
        """
        with _open_source(source) as (stream, name):
            filename = filename or name
            content_type = content_type or guess_content_type(filename)
            size = _size_of(stream)
            # The first PUT consumes the stream: rewind before sending it again (a stream that cannot be
            # rewound is not re-signed, its bytes are gone).
            start = stream.tell() if _seekable(stream) else None
            for sign_attempt in range(2):  # a URL that expired between sign and PUT is signed again
                if start is not None:
                    stream.seek(start)
                envelope = self._call(
                    proto.UPLOAD_SIGN, {"contentType": content_type, "originalFilename": filename}
                )
                upload_url, fields = proto.parse_upload_sign(envelope)
                last = sign_attempt == 1 or start is None
                expired = self._put(upload_url, stream, content_type, size, filename, last=last)
                if not expired:
                    break
            self.log.info("Uploaded %s (%s bytes) to SpeedPix as %s", filename, size, fields["access_url"])
            return UploadedFile(filename=filename, content_type=content_type, size=size, **fields)

    def _put(
        self,
        upload_url: str,
        stream: IO[bytes],
        content_type: str,
        size: int | None,
        filename: str,
        last: bool,
    ) -> bool:
        """PUT the stream; returns True when the URL had expired (and ``last`` is False)."""
        settings = self.settings
        host = urllib.parse.urlsplit(upload_url).netloc
        start = stream.tell() if _seekable(stream) else None
        headers = {"Content-Type": content_type}
        if size is not None:
            headers["Content-Length"] = str(size)
        attempts = settings.retry_limit if start is not None else 1
        for attempt in range(1, attempts + 1):
            if start is not None:
                stream.seek(start)
            body: Any = stream if size is not None else iter(lambda: stream.read(CHUNK), b"")
            try:
                response = self.get_conn().put(
                    upload_url, data=body, headers=headers, timeout=settings.timeout
                )
            except requests.RequestException as err:
                error: SpeedPixError = SpeedPixUploadError(
                    f"Uploading {filename!r}: {_requests_error('upload', err, host)}"
                )
                retry = True
            else:
                if response.status_code < 300:
                    return False
                text = response.text[:300]
                if response.status_code == 403 and "expired" in text.lower() and not last:
                    return True
                error = SpeedPixUploadError(
                    f"Uploading {filename!r} to {host} failed: HTTP {response.status_code} "
                    f"{_xml_code(text)}. The pre-signed URL is single-use and short-lived; run the task again."
                )
                retry = _retryable_status(response.status_code)
            if not retry or attempt == attempts:
                raise error
            delay = _backoff(settings, attempt)
            self.log.warning("%s; retrying in %.1fs", error, delay)
            time.sleep(delay)
        return False  # pragma: no cover

    def download(self, url: str, destination: Any) -> Any:
        """Stream ``url`` to ``destination`` (a file path, a directory, or an ``ObjectStoragePath``).

        A destination that is an existing directory (or ends with ``/``) gets the URL's file name, made
        safe: a server-provided name can never write outside that directory. Returns the written path.
        """
        scheme = urllib.parse.urlsplit(str(url)).scheme
        if scheme not in ("http", "https"):
            raise SpeedPixDownloadError(
                f"Refusing to download {_url_for_log(str(url))[:100]!r}: only http(s) URLs are fetched (got scheme {scheme!r})."
            )
        target = _resolve_destination(url, destination)
        settings = self.settings
        host = urllib.parse.urlsplit(url).netloc
        for attempt in range(1, settings.retry_limit + 1):
            failure: SpeedPixDownloadError | None = None
            try:
                with self.get_conn().get(url, stream=True, timeout=settings.timeout) as response:
                    if response.status_code >= 400:
                        error = SpeedPixDownloadError(
                            f"Downloading {_url_for_log(url)} failed: HTTP {response.status_code}. Output URLs "
                            "are temporary; download soon after the prediction finishes."
                        )
                        if not _retryable_status(response.status_code) or attempt == settings.retry_limit:
                            raise error
                    else:  # a 5xx falls through to the backoff below (a bare `continue` skipped it)
                        _write_stream(response.iter_content(CHUNK), target)
                        return target
            except requests.RequestException as err:
                # Raised below, outside this block: requests' error names the full URL (the query string of
                # a pre-signed URL is a credential) and would stay chained as __context__ even `from None`.
                failure = SpeedPixDownloadError(
                    f"Downloading {_url_for_log(url)}: {_requests_error('download', err, host)}"
                )
            if failure is not None and attempt == settings.retry_limit:
                raise failure
            time.sleep(_backoff(settings, attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    # ------------------------------------------------------------------ predictions
    def create_prediction(
        self,
        workflow_id: str,
        inputs: Mapping[str, Any],
        *,
        alias_id: str | None = None,
        version_id: str | None = None,
        resource_config_id: str | None = None,
        randomise_seeds: bool | None = None,
        return_temp_files: bool | None = None,
        file_encoding_strategy: str = "url",
    ) -> Prediction:
        """Start a prediction (billed). Local files in ``inputs`` are uploaded or inlined first.

        Retried only where the request provably did not reach the backend, so it never creates two.
        """
        check_strategy(file_encoding_strategy)
        resource = resource_config_id or self.settings.resource_config_id or "default"
        if not resource.isascii() or not resource.isprintable():
            raise SpeedPixConfigError(
                f"`resource_config_id` {resource!r} must be printable ASCII (it is sent as a header); copy "
                "it from the SpeedPix console."
            )
        proto.create_prediction_body(
            workflow_id, {}, alias_id=alias_id, version_id=version_id
        )  # validate early
        preparer = InputPreparer(
            lambda src, name, where: self.upload_file(src, filename=name).access_url, file_encoding_strategy
        )
        body = proto.create_prediction_body(
            workflow_id,
            preparer.prepare(inputs),
            alias_id=alias_id,
            version_id=version_id,
            randomise_seeds=randomise_seeds,
            return_temp_files=return_temp_files,
        )
        envelope = self._call(proto.CREATE, body, headers={"X-SP-RESOURCE-CONFIG-ID": resource})
        prediction = proto.parse_created(envelope)
        self.log.info(
            "Created SpeedPix prediction %s (workflow %s, estimated %ss, invoke id %s)",
            prediction.id,
            body["workflow_id"],
            prediction.estimated_duration,
            prediction.invoke_id,
        )
        return prediction

    def get_prediction(self, prediction_id: str) -> Prediction:
        """Status, progress and ETA; once finished also the output (or error code and message)."""
        payload = {"taskId": _check_id(prediction_id)}
        prediction = proto.parse_progress(prediction_id, self._call(proto.PROGRESS, payload))
        if prediction.finished:
            proto.apply_result(prediction, self._call(proto.RESULT, payload, allow_failure=True))
        return prediction

    async def aget_prediction(self, prediction_id: str) -> Prediction:
        """:meth:`get_prediction` for the event loop (used by the trigger)."""
        payload = {"taskId": _check_id(prediction_id)}
        prediction = proto.parse_progress(prediction_id, await self._acall(proto.PROGRESS, payload))
        if prediction.finished:
            proto.apply_result(prediction, await self._acall(proto.RESULT, payload, allow_failure=True))
        return prediction

    def wait_for_prediction(
        self,
        prediction_id: str,
        *,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        timeout: float | None = None,
        max_poll_interval: float | None = None,
        on_update: Callable[[Prediction], None] | None = None,
    ) -> Prediction:
        """Block until the prediction finishes; raise on failure or after ``timeout`` seconds."""
        check_positive("poll_interval", poll_interval)
        if timeout is not None:
            check_positive("timeout", timeout)
        started = time.monotonic()
        while True:
            prediction = self.get_prediction(prediction_id)
            if on_update is not None:
                on_update(prediction)
            if prediction.finished:
                return raise_for_prediction(prediction)
            elapsed = time.monotonic() - started
            delay = next_poll_delay(
                prediction, poll_interval=poll_interval, max_interval=max_poll_interval or poll_interval * 10
            )
            if timeout is not None:
                if elapsed >= timeout:
                    raise SpeedPixTimeoutError(prediction_id, timeout=timeout, last_status=prediction.status)
                delay = min(delay, max(timeout - elapsed, 0.01))
            time.sleep(delay)

    def run(self, workflow_id: str, inputs: Mapping[str, Any], *, wait: bool = True, **options: Any) -> Any:
        """Like the SDK's ``client.run``: the output dict, or the :class:`Prediction` when ``wait=False``.

        ``options`` are :meth:`create_prediction`'s keywords plus ``poll_interval`` and ``timeout``.
        """
        wait_options = {
            k: options.pop(k) for k in ("poll_interval", "timeout", "max_poll_interval") if k in options
        }
        prediction = self.create_prediction(workflow_id, inputs, **options)
        if not wait:
            return prediction
        return self.wait_for_prediction(prediction.id, **wait_options).output

    # ------------------------------------------------------------------ connection test
    def test_connection(self) -> tuple[bool, str]:
        """Make one real signed call and say whether the gateway accepted the credentials."""
        try:
            settings = self.settings
            self._call(proto.PROGRESS, {"taskId": "airflow-connection-test"})
        except SpeedPixAuthError as err:
            return False, f"Credentials rejected: {err}"
        except SpeedPixAPIError as err:
            if isinstance(err, SpeedPixServerError | SpeedPixThrottledError | SpeedPixResponseError):
                return False, str(err)
            return True, f"Credentials accepted by {settings.endpoint} (probe answered: {err.error_code})."
        except SpeedPixError as err:
            return False, str(err)
        return True, f"Credentials accepted by {settings.endpoint}."


# ---------------------------------------------------------------------- helpers
def _connection_type() -> dict[str, Any]:
    from airflow_provider_speedpix import get_provider_info

    return get_provider_info()["connection-types"][0]


def _retryable_status(status_code: int) -> bool:
    """For plain storage requests (upload PUT, output GET), which are safe to repeat: 5xx and throttling."""
    return status_code >= 500 or status_code == 429


def _backoff(settings: SpeedPixSettings, attempt: int) -> float:
    """Capped exponential delay before storage-request attempt ``attempt + 1``."""
    return min(settings.retry_max_delay, settings.retry_delay * 2 ** (attempt - 1))


def check_positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise SpeedPixConfigError(f"`{name}` must be a number of seconds > 0, got {value!r}.")
    return float(value)


def _check_id(prediction_id: Any) -> str:
    if not isinstance(prediction_id, str) or not prediction_id.strip():
        raise SpeedPixConfigError(
            f"`prediction_id` must be a non-empty string, got {prediction_id!r} (check the template or XCom "
            "it comes from)."
        )
    return prediction_id


def raise_for_prediction(prediction: Prediction) -> Prediction:
    """Return a succeeded prediction; raise :class:`SpeedPixPredictionFailed` for failed/canceled."""
    if prediction.status in ("failed", "canceled"):
        raise SpeedPixPredictionFailed(
            prediction.id,
            error_code=prediction.error_code,
            error_message=prediction.error,
            status=prediction.status,
        )
    return prediction


def _read_limited(chunks: Iterator[bytes], operation: str) -> bytes:
    buffer = bytearray()
    for chunk in chunks:
        buffer += chunk
        if len(buffer) > MAX_RESPONSE_BYTES:
            raise SpeedPixResponseError(
                f"SpeedPix {operation}: response larger than {MAX_RESPONSE_BYTES // 2**20} MiB; refusing to read it.",
                operation=operation,
            )
    return bytes(buffer)


async def _alimited(chunks: Any, operation: str) -> Any:
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            raise SpeedPixResponseError(
                f"SpeedPix {operation}: response larger than {MAX_RESPONSE_BYTES // 2**20} MiB; refusing to read it.",
                operation=operation,
            )
        yield chunk


def _xml_code(text: str) -> str:
    match = re.search(r"<Code>([^<]{1,64})</Code>", text)
    return match.group(1) if match else ""


def _url_for_log(url: str) -> str:
    """Scheme, host and path only: query strings of storage URLs are credentials."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def _seekable(stream: Any) -> bool:
    try:
        return bool(stream.seekable())
    except (AttributeError, OSError, ValueError):
        return False


def _size_of(stream: Any) -> int | None:
    with contextlib.suppress(AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return os.fstat(stream.fileno()).st_size - stream.tell()
    if _seekable(stream):
        here = stream.tell()
        end = stream.seek(0, os.SEEK_END)
        stream.seek(here)
        return end - here
    return None


@contextlib.contextmanager
def _open_source(source: Any) -> Iterator[tuple[IO[bytes], str]]:
    """Yield ``(binary stream, file name)`` for any supported upload source, closing what it opened."""
    if is_object_storage_path(source):
        if not source.is_file():
            raise SpeedPixConfigError(f"upload_file: {source} does not exist or is not a file.")
        with source.open("rb") as stream:
            yield stream, source.name
    elif isinstance(source, str | os.PathLike):
        path = _local_file(expand_user(Path(source)), "upload_file")
        with path.open("rb") as stream:
            yield stream, path.name
    elif is_file_object(source):
        name = getattr(source, "name", None)
        yield source, os.path.basename(name) if isinstance(name, str) and name else "file"
    else:
        raise SpeedPixConfigError(
            f"upload_file: cannot upload a {type(source).__name__}; pass a path, a binary file object or an "
            "ObjectStoragePath."
        )


def _resolve_destination(url: str, destination: Any) -> Any:
    name = _safe_filename(urllib.parse.urlsplit(url).path)
    if is_object_storage_path(destination):
        if str(destination).endswith("/") or destination.is_dir():
            destination = destination / name
        # Local and other hierarchical file systems need the folder; object stores ignore this.
        with contextlib.suppress(OSError, NotImplementedError):
            destination.parent.mkdir(parents=True, exist_ok=True)
        return destination
    if not isinstance(destination, str | os.PathLike):
        raise SpeedPixDownloadError(
            f"download: destination must be a path or ObjectStoragePath, got {type(destination).__name__}."
        )
    path = Path(destination).expanduser()
    if str(destination).endswith(("/", os.sep)) or path.is_dir():
        path = path / name
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SpeedPixDownloadError(
            f"download: cannot create directory {str(path.parent)!r} ({err.strerror}). Choose a writable "
            "output_dir."
        ) from None
    return path


def _write_stream(chunks: Iterator[bytes], target: Any) -> None:
    """Write chunks to ``target``; a local file appears only when complete (written as ``.part`` first).

    A broken stream (a ``requests`` error) is re-raised for the caller to retry; a file-system error
    becomes a :class:`SpeedPixDownloadError` naming the destination.
    """
    local = isinstance(target, Path)
    partial = target.with_name(target.name + ".part") if local else target
    try:
        with partial.open("wb") as out:
            for chunk in chunks:
                out.write(chunk)
        if local:
            os.replace(partial, target)
    except BaseException as err:
        if local:
            with contextlib.suppress(OSError):
                partial.unlink()
        if isinstance(err, OSError) and not isinstance(err, requests.RequestException):
            reason = err.strerror or str(err)
            raise SpeedPixDownloadError(
                f"download: cannot write {target} ({reason}). Choose a writable output_dir."
            ) from None
        raise


__all__ = ["SpeedPixHook", "SpeedPixSettings", "raise_for_prediction", "shared_async_client", "should_retry"]
