"""The HTTP funnel, once per stack: ``requests`` for workers, one shared ``httpx.AsyncClient`` per event
loop for triggers. Both sign with :func:`_signing.sign_request`, read with a size limit, map library
errors to :mod:`exceptions` (never quoting a URL's query string), parse with :mod:`_protocol` and retry
with :class:`_retry.RetryPolicy`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import urllib.parse
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import Any

import httpx
import requests
import urllib3

from airflow_provider_speedpix import _protocol as proto
from airflow_provider_speedpix._retry import request_timeout
from airflow_provider_speedpix._settings import REQUEST_TIMEOUT, SpeedPixSettings
from airflow_provider_speedpix._signing import sign_request
from airflow_provider_speedpix.exceptions import SpeedPixResponseError, SpeedPixTransportError

MAX_RESPONSE_BYTES = 8 * 1024 * 1024
CHUNK = 1024 * 1024
MAX_IN_FLIGHT = 16

# One httpx.AsyncClient per event loop: every trigger in a triggerer shares its connection pool. It is
# closed when the last holder on its loop lets go (see hold_async_client).
_ASYNC_CLIENTS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = (
    weakref.WeakKeyDictionary()
)
_ASYNC_HOLDERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, int] = weakref.WeakKeyDictionary()
_ASYNC_SLOTS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
    weakref.WeakKeyDictionary()
)


def shared_async_client() -> httpx.AsyncClient:
    """The running loop's shared client (created on first use)."""
    loop = asyncio.get_running_loop()
    client = _ASYNC_CLIENTS.get(loop)
    if client is None or client.is_closed:
        # trust_env (the default): proxies are read from the environment once, here, and mounted per
        # host pattern (NO_PROXY entries mount "no proxy"), so each request follows its own host's rule.
        client = httpx.AsyncClient(
            trust_env=True,
            timeout=REQUEST_TIMEOUT,
            limits=httpx.Limits(
                max_connections=MAX_IN_FLIGHT, max_keepalive_connections=MAX_IN_FLIGHT, keepalive_expiry=60
            ),
        )
        _ASYNC_CLIENTS[loop] = client
    return client


def hold_async_client() -> Callable[[], Awaitable[None]]:
    """Count one more user of the running loop's shared client; return the coroutine function that lets
    go (safe to call more than once). The last one to let go closes the client and its sockets, so a
    loop that ends (each ``asyncio.run``, as in ``dag.test()``) leaks nothing; the next user on the loop
    gets a new client. Each trigger holds it for its whole run, each API call for its own duration."""
    loop = asyncio.get_running_loop()
    _ASYNC_HOLDERS[loop] = _ASYNC_HOLDERS.get(loop, 0) + 1
    released = False

    async def release() -> None:
        nonlocal released
        if released:
            return
        released = True
        left = _ASYNC_HOLDERS.get(loop, 1) - 1
        if left > 0:
            _ASYNC_HOLDERS[loop] = left
            return
        _ASYNC_HOLDERS.pop(loop, None)
        client = _ASYNC_CLIENTS.pop(loop, None)  # the next user creates a new one, even mid-close
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()

    return release


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


class _Session(requests.Session):
    """A ``requests.Session`` that follows the environment's proxy rules for each request's own host.

    ``trust_env`` is off: with it, ``requests`` scans the whole environment and ~/.netrc on every call (a
    quarter of a status call's CPU, benchmark B5). Instead the proxies for a host (``HTTP(S)_PROXY``,
    ``ALL_PROXY`` and ``NO_PROXY``, read by ``requests`` itself) are looked up once per scheme, host and
    port and remembered: the API endpoint, the upload host and each download host each get their own
    answer, as with plain ``requests``. Proxies set on ``session.proxies`` or per request still win.
    """

    _MAX_HOSTS = 256

    def __init__(self) -> None:
        super().__init__()
        self.trust_env = False
        self._environ_proxies: dict[tuple[str, str, int | None], dict[str, str]] = {}

    def environ_proxies(self, url: str) -> dict[str, str]:
        """The environment's proxies for ``url``'s host (empty when NO_PROXY covers it)."""
        parts = urllib.parse.urlsplit(url)
        try:
            key = (parts.scheme.lower(), (parts.hostname or "").lower(), parts.port)
        except ValueError:  # an invalid port: let requests report it
            return {}
        proxies = self._environ_proxies.get(key)
        if proxies is None:
            if len(self._environ_proxies) >= self._MAX_HOSTS:
                self._environ_proxies.clear()
            proxies = self._environ_proxies[key] = requests.utils.get_environ_proxies(url)
        return proxies

    def merge_environment_settings(
        self, url: Any, proxies: Any, stream: Any, verify: Any, cert: Any
    ) -> dict[str, Any]:
        merged = dict(proxies or {})
        for scheme, proxy in self.environ_proxies(url).items():
            if scheme not in merged and scheme not in self.proxies:
                merged[scheme] = proxy
        return super().merge_environment_settings(url, merged, stream, verify, cert)

    def rebuild_proxies(self, prepared_request: Any, proxies: Any) -> dict[str, str]:
        """On a redirect: the new host's own proxies, not the first host's."""
        fresh = dict(self.proxies)
        for scheme, proxy in self.environ_proxies(prepared_request.url).items():
            fresh.setdefault(scheme, proxy)
        return super().rebuild_proxies(prepared_request, fresh)


def new_session(endpoint: str = "") -> requests.Session:
    """A keep-alive ``requests.Session``: proxies per host (remembered), the CA bundle read once.

    ``endpoint`` is not used any more (proxies used to be resolved from it alone, for every host).
    """
    session = _Session()
    session.headers["User-Agent"] = "airflow-provider-speedpix"
    ca_bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    if ca_bundle:
        session.verify = ca_bundle
    return session


# ---------------------------------------------------------------------- error mapping
_PROXY_HINT = "check HTTPS_PROXY / HTTP_PROXY / NO_PROXY for this host"


def requests_error(operation: str, err: requests.RequestException, host: str) -> SpeedPixTransportError:
    """Map a requests failure; the message names the host only (never a URL with a query string)."""
    reason = err.args[0] if err.args else None
    reason = getattr(reason, "reason", reason)
    # A ProxyError is raised before the request left for its host (the proxy could not be reached,
    # or refused the tunnel).
    never_sent = isinstance(
        err, requests.exceptions.ConnectTimeout | requests.exceptions.ProxyError
    ) or isinstance(reason, urllib3.exceptions.NewConnectionError)
    if isinstance(err, requests.exceptions.ProxyError):
        what = f"the proxy could not be reached or refused ({_PROXY_HINT})"
    elif isinstance(err, requests.exceptions.ConnectTimeout):
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


def httpx_error(operation: str, err: httpx.HTTPError, host: str) -> SpeedPixTransportError:
    never_sent = isinstance(
        err, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout | httpx.ProxyError
    )
    if isinstance(err, httpx.ProxyError):
        what = f"the proxy refused the connection ({_PROXY_HINT})"
    elif isinstance(err, httpx.TimeoutException):
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


# ---------------------------------------------------------------------- size-limited reads
def _too_large(operation: str) -> SpeedPixResponseError:
    return SpeedPixResponseError(
        f"SpeedPix {operation}: response larger than {MAX_RESPONSE_BYTES // 2**20} MiB; refusing to read it.",
        operation=operation,
    )


def read_limited(chunks: Iterator[bytes], operation: str) -> bytes:
    buffer = bytearray()
    for chunk in chunks:
        buffer += chunk
        if len(buffer) > MAX_RESPONSE_BYTES:
            raise _too_large(operation)
    return bytes(buffer)


async def aread_limited(chunks: AsyncIterator[bytes], operation: str) -> bytes:
    buffer = bytearray()
    async for chunk in chunks:
        buffer += chunk
        if len(buffer) > MAX_RESPONSE_BYTES:
            raise _too_large(operation)
    return bytes(buffer)


# ---------------------------------------------------------------------- the funnel
def signed_headers(
    settings: SpeedPixSettings, operation: str, body: bytes, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Fresh signature headers (new nonce and timestamp): called once per attempt."""
    headers = sign_request(
        method="POST",
        path=proto.PATHS[operation],
        body=body,
        app_key=settings.app_key,
        app_secret=settings.app_secret,
    )
    headers.update(extra or {})
    return headers


def call(
    session: requests.Session,
    settings: SpeedPixSettings,
    operation: str,
    payload: Mapping[str, Any],
    *,
    headers: Mapping[str, str] | None = None,
    allow_failure: bool = False,
    log: Any,
) -> proto.Envelope:
    """One API call from a worker: signed, size-limited, parsed, retried by the policy."""
    body = proto.encode_body(payload)
    url = settings.endpoint + proto.PATHS[operation]

    def attempt() -> proto.Envelope:
        try:
            with session.post(
                url,
                data=body,
                headers=signed_headers(settings, operation, body, headers),
                timeout=request_timeout(settings.timeout),
                stream=True,
            ) as response:
                content = read_limited(response.iter_content(CHUNK), operation)
        except requests.RequestException as err:
            raise requests_error(operation, err, settings.endpoint) from None
        return proto.read_envelope(
            operation, response.status_code, response.headers, content, allow_failure=allow_failure
        )

    return settings.retry_policy.run(operation, attempt, log)


async def acall(
    settings: SpeedPixSettings,
    operation: str,
    payload: Mapping[str, Any],
    *,
    allow_failure: bool = False,
    log: Any,
) -> proto.Envelope:
    """:func:`call` on the event loop, through the loop's shared client and in-flight limit."""
    body = proto.encode_body(payload)
    url = settings.endpoint + proto.PATHS[operation]
    release = hold_async_client()
    client = shared_async_client()

    async def attempt() -> proto.Envelope:
        request = client.build_request(
            "POST",
            url,
            content=body,
            headers=signed_headers(settings, operation, body),
            timeout=request_timeout(settings.timeout),
        )
        try:
            async with _in_flight_slots():
                response = await client.send(request, stream=True)
                try:
                    content = await aread_limited(response.aiter_bytes(), operation)
                finally:
                    await response.aclose()
        except httpx.HTTPError as err:
            raise httpx_error(operation, err, settings.endpoint) from None
        return proto.read_envelope(
            operation, response.status_code, response.headers, content, allow_failure=allow_failure
        )

    try:
        return await settings.retry_policy.arun(operation, attempt, log)
    finally:
        await release()
