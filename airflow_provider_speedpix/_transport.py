"""The HTTP funnel, once per stack: ``requests`` for workers, one shared ``httpx.AsyncClient`` per event
loop for triggers. Both sign with :func:`_signing.sign_request`, read with a size limit, map library
errors to :mod:`exceptions` (never quoting a URL's query string), parse with :mod:`_protocol` and retry
with :class:`_retry.RetryPolicy`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import os
import re
import time
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
#: Requests in flight per event loop: the limit starts here and never goes below it (enough for a
#: service on loopback or in the same region).
MIN_IN_FLIGHT = 16
#: ... and never above this, whatever the measured round-trip time: at most this many connections
#: from one triggerer to SpeedPix. 64 carries 1,000 status calls/s (5,000 predictions polled every 5 s)
#: at up to ~60 ms per call; a farther service gets fewer calls/s instead of more connections.
MAX_IN_FLIGHT = 64
#: In-flight limit = calls wanted per second x mean round trip x this headroom (Little's law).
IN_FLIGHT_HEADROOM = 1.5
#: How often (seconds) the limit is recomputed from what was measured since the last time.
IN_FLIGHT_WINDOW = 1.0

# One httpx.AsyncClient per event loop: every trigger in a triggerer shares its connection pool. It is
# closed when the last holder on its loop lets go (see hold_async_client).
_ASYNC_CLIENTS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = (
    weakref.WeakKeyDictionary()
)
_ASYNC_HOLDERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, int] = weakref.WeakKeyDictionary()
_ASYNC_SLOTS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, InFlightLimit] = (
    weakref.WeakKeyDictionary()
)


class _LaneStream(httpx.AsyncByteStream):
    """A response body that gives its lane back when it is closed."""

    def __init__(self, stream: Any, release: Callable[[], None]) -> None:
        self._stream = stream
        self._release: Callable[[], None] | None = release

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            release, self._release = self._release, None
            if release is not None:
                release()


class LaneTransport(httpx.AsyncBaseTransport):
    """Direct connections as ``lanes``: each an ``httpx.AsyncHTTPTransport`` with ONE keep-alive
    connection, lent to one request at a time.

    One httpcore pool of N connections costs O(queued requests x connections) per request (it scans
    every connection, and asks each idle socket whether it is readable, to assign each waiting request:
    benchmark B1 measured half of a status call's CPU there). A pool of one connection with one request
    does that scan once. Lanes are made on demand, at most ``size`` (requests beyond wait for a lane),
    and a lane's idle connection closes after ``keepalive_expiry`` as usual.
    """

    def __init__(self, size: int = MAX_IN_FLIGHT, *, keepalive_expiry: float = 60.0) -> None:
        self._size = size
        self._keepalive_expiry = keepalive_expiry
        self._ssl_context = httpx.create_ssl_context(trust_env=True)
        self._free: list[httpx.AsyncHTTPTransport] = []
        self._all: list[httpx.AsyncHTTPTransport] = []
        self._lanes = asyncio.Semaphore(size)

    def _new_lane(self) -> httpx.AsyncHTTPTransport:
        lane = httpx.AsyncHTTPTransport(
            verify=self._ssl_context,
            trust_env=True,
            limits=httpx.Limits(
                max_connections=1, max_keepalive_connections=1, keepalive_expiry=self._keepalive_expiry
            ),
        )
        self._all.append(lane)
        return lane

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await self._lanes.acquire()
        lane = self._free.pop() if self._free else self._new_lane()

        def release() -> None:
            self._free.append(lane)
            self._lanes.release()

        try:
            response = await lane.handle_async_request(request)
        except BaseException:
            release()
            raise
        if response.is_closed:  # already read (a transport that answers with a body in memory)
            release()
        else:
            response.stream = _LaneStream(response.stream, release)
        return response

    async def aclose(self) -> None:
        lanes, self._all, self._free = self._all, [], []
        for lane in lanes:
            with contextlib.suppress(Exception):
                await lane.aclose()


class InFlightLimit:
    """How many requests a loop has in flight at once, sized from what it measures (Little's law).

    Needed in flight = calls wanted per second x round-trip time. Every ``IN_FLIGHT_WINDOW`` seconds the
    limit becomes ``ceil(demand x mean round trip x IN_FLIGHT_HEADROOM)`` within ``[low, high]``, where
    demand counts the calls that asked for a slot (queued ones too: the calls wanted, not the calls the
    old limit let through) and the round trip is measured from getting a slot to the answer read. On
    loopback that stays at ``low``; 1,000 calls/s to a service 50 ms away get about 75. Requests beyond
    the limit wait in FIFO order; waiting costs nothing (a future each).
    """

    def __init__(self, low: int = MIN_IN_FLIGHT, high: int = MAX_IN_FLIGHT) -> None:
        self.low, self.high = low, max(high, low)
        self.limit = low
        self.active = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._window_start = time.monotonic()
        self._asked = 0
        self._rtt_sum = 0.0
        self._rtt_count = 0

    async def acquire(self) -> float:
        """Wait for a slot; returns the monotonic time it was granted (pass it to :meth:`release`)."""
        self._asked += 1
        if self.active < self.limit and not self._waiters:
            self.active += 1
            return time.monotonic()
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._release_slot()  # granted just as it was cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise
        return time.monotonic()

    def release(self, granted: float) -> None:
        now = time.monotonic()
        self._rtt_sum += now - granted
        self._rtt_count += 1
        if now - self._window_start >= IN_FLIGHT_WINDOW:
            self._resize(now)
        self._release_slot()

    def _resize(self, now: float) -> None:
        elapsed = now - self._window_start
        if self._rtt_count:
            demand = self._asked / elapsed
            rtt = self._rtt_sum / self._rtt_count
            self.limit = min(self.high, max(self.low, math.ceil(demand * rtt * IN_FLIGHT_HEADROOM)))
        self._window_start, self._asked, self._rtt_sum, self._rtt_count = now, 0, 0.0, 0

    def _release_slot(self) -> None:
        self.active -= 1
        while self._waiters and self.active < self.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.active += 1
                waiter.set_result(None)


def shared_async_client() -> httpx.AsyncClient:
    """The running loop's shared client (created on first use)."""
    loop = asyncio.get_running_loop()
    client = _ASYNC_CLIENTS.get(loop)
    if client is None or client.is_closed:
        # trust_env (the default): proxies are read from the environment once, here, and mounted per
        # host pattern (NO_PROXY entries mount "no proxy"), so each request follows its own host's rule.
        # Every other URL ("all://", the least specific pattern) goes through the lanes; a host that
        # NO_PROXY exempts from a configured proxy uses httpx's default pool.
        client = httpx.AsyncClient(
            trust_env=True,
            timeout=REQUEST_TIMEOUT,
            mounts={"all://": LaneTransport(MAX_IN_FLIGHT)},
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


def in_flight_limit() -> InFlightLimit:
    """The running loop's in-flight limit (:class:`InFlightLimit`).

    Thousands of triggers polling at once would otherwise queue inside httpx's pool, whose per-request
    bookkeeping grows with the queue (benchmark B1). Waiting here costs nothing.
    """
    loop = asyncio.get_running_loop()
    slots = _ASYNC_SLOTS.get(loop)
    if slots is None:
        slots = _ASYNC_SLOTS[loop] = InFlightLimit()
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

    def send_api(
        self, url: str, body: bytes, headers: Mapping[str, str], settings: SpeedPixSettings
    ) -> requests.Response:
        """POST one API call, prepared directly: what ``session.post`` would send (the session's headers,
        its proxies for this host, its ``verify``), without ``Session.request``'s generic merging of
        cookies, auth, params and hooks, which an API call does not use and which cost a third of a
        call's client CPU (benchmark B5). Streamed: the caller reads it with a size limit."""
        prepared = requests.PreparedRequest()
        prepared.method = "POST"
        prepared.url = url
        merged: requests.structures.CaseInsensitiveDict[str | bytes] = (
            requests.structures.CaseInsensitiveDict(self.headers)
        )
        merged.update(headers)
        merged["Content-Length"] = str(len(body))
        prepared.headers = merged
        prepared.body = body
        prepared.hooks = {"response": []}
        proxies = dict(self.proxies)
        for scheme, proxy in self.environ_proxies(url).items():
            proxies.setdefault(scheme, proxy)
        return self.send(
            prepared,
            stream=True,
            timeout=request_timeout(settings.timeout),
            verify=self.verify,
            cert=self.cert,
            proxies=proxies,
            allow_redirects=True,
        )

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
            if isinstance(session, _Session):
                response = session.send_api(
                    url, body, signed_headers(settings, operation, body, headers), settings
                )
            else:
                response = session.post(
                    url,
                    data=body,
                    headers=signed_headers(settings, operation, body, headers),
                    timeout=request_timeout(settings.timeout),
                    stream=True,
                )
            with response:
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
        slots = in_flight_limit()
        granted = await slots.acquire()
        try:
            response = await client.send(request, stream=True)
            try:
                length = response.headers.get("content-length", "")
                if (
                    length.isdigit()
                    and int(length) <= MAX_RESPONSE_BYTES
                    and "content-encoding" not in response.headers
                ):
                    content = await response.aread()  # announced, small, not inflated: read it whole
                else:
                    content = await aread_limited(response.aiter_bytes(), operation)
            finally:
                await response.aclose()
        except httpx.HTTPError as err:
            raise httpx_error(operation, err, settings.endpoint) from None
        finally:
            slots.release(granted)
        return proto.read_envelope(
            operation, response.status_code, response.headers, content, allow_failure=allow_failure
        )

    try:
        return await settings.retry_policy.arun(operation, attempt, log)
    finally:
        await release()
