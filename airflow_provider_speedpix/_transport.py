"""The HTTP funnel, once per stack: ``requests`` for workers, one shared ``aiohttp.ClientSession`` per event
loop for triggers. Both sign with :func:`_signing.sign_request`, read with a size limit, map library
errors to :mod:`exceptions` (never quoting a URL, a header or the library's own message), parse with
:mod:`_protocol` and retry with :class:`_retry.RetryPolicy`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import math
import os
import re
import socket
import ssl
import time
import urllib.parse
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import Any

import aiohttp
import requests
import urllib3

from airflow_provider_speedpix import _protocol as proto
from airflow_provider_speedpix._retry import request_timeout
from airflow_provider_speedpix._settings import SpeedPixSettings
from airflow_provider_speedpix._signing import sign_request
from airflow_provider_speedpix.exceptions import (
    SpeedPixConfigError,
    SpeedPixResponseError,
    SpeedPixTransportError,
)

MAX_RESPONSE_BYTES = 8 * 1024 * 1024
CHUNK = 1024 * 1024
USER_AGENT = "airflow-provider-speedpix"
#: Requests in flight per event loop: the limit starts here and never goes below it (enough for a
#: service on loopback or in the same region).
MIN_IN_FLIGHT = 16
#: ... and never above this, whatever the measured round-trip time: at most this many connections from
#: one triggerer to SpeedPix. Sized for the busiest triggerer we plan for, 5,000 predictions polled every
#: 5 s (1,000 status calls/s): needed in flight = calls/s x round trip, so 128 carries it up to ~85 ms
#: per call with the 1.5x headroom (128 ms without), a service in another region. A farther service
#: gets fewer calls/s (longer poll periods) instead of more connections: the bound protects the service
#: (and the gateway's per-client connection limits) from one triggerer opening hundreds of sockets.
MAX_IN_FLIGHT = 128
#: In-flight limit = calls wanted per second x mean round trip x this headroom (Little's law).
IN_FLIGHT_HEADROOM = 1.5
#: How often (seconds) the limit is recomputed from what was measured since the last time.
IN_FLIGHT_WINDOW = 1.0
#: ... and how far it may fall at each recomputation (to this fraction): it rises at once, but falls
#: slowly. A fleet's polls come in waves (each comes back one interval after its last answer), so one
#: quiet second must not starve the next busy one (benchmark B1, +50 ms: the limit swung 34-128).
IN_FLIGHT_DECAY = 0.9
#: Seconds an idle keep-alive connection of the async client stays open.
KEEPALIVE_SECONDS = 60.0
#: How often (seconds) a loop's :class:`Watchdog` looks for API attempts past their timeout: a timeout
#: fires up to this much late.
WATCHDOG_TICK = 0.05

# One AsyncClient per event loop: every trigger in a triggerer shares its connections. It is closed when
# the last holder on its loop lets go (see hold_async_client).
_ASYNC_CLIENTS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncClient] = (
    weakref.WeakKeyDictionary()
)
_ASYNC_HOLDERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, int] = weakref.WeakKeyDictionary()
_ASYNC_SLOTS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, InFlightLimit] = (
    weakref.WeakKeyDictionary()
)
_WATCHDOGS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Watchdog] = weakref.WeakKeyDictionary()
_SSL_CONTEXTS: dict[tuple[str | None, str], ssl.SSLContext] = {}


class InFlightLimit:
    """How many requests a loop has in flight at once, sized from what it measures (Little's law).

    Needed in flight = calls wanted per second x round-trip time. Every ``IN_FLIGHT_WINDOW`` seconds the
    limit becomes ``ceil(demand x mean round trip x IN_FLIGHT_HEADROOM)`` within ``[low, high]``, where
    demand counts the calls that asked for a slot (queued ones too: the calls wanted, not the calls the
    old limit let through) and the round trip is measured from getting a slot to the answer read. On
    loopback that stays at ``low``; 1,000 calls/s to a service 50 ms away get about 75. The limit rises
    at once but falls by at most ``IN_FLIGHT_DECAY`` per window. Requests beyond the limit wait in FIFO
    order; waiting costs nothing (a future each).
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
            needed = math.ceil(demand * rtt * IN_FLIGHT_HEADROOM)
            self.limit = min(self.high, max(self.low, needed, math.floor(self.limit * IN_FLIGHT_DECAY)))
        self._window_start, self._asked, self._rtt_sum, self._rtt_count = now, 0, 0.0, 0

    def _release_slot(self) -> None:
        self.active -= 1
        while self._waiters and self.active < self.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.active += 1
                waiter.set_result(None)


class Watchdog:
    """Times out a loop's API attempts with one periodic check instead of timers per request.

    aiohttp's read timeout arms two timers per request and cancels them, and a cancelled timer stays in
    the loop's heap, with its context, until it would have fired: at 1,000 calls/s and a 30 s timeout,
    ~60,000 dead timers that the garbage collector walks again and again (benchmark B1). Here an attempt
    notes its deadline; every ``WATCHDOG_TICK`` seconds, while any attempt runs, the overdue ones are
    cancelled (:meth:`forget` then says it was the watchdog, not someone else, that cancelled).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._deadlines: dict[asyncio.Task[Any], float] = {}
        self._fired: set[asyncio.Task[Any]] = set()
        self._ticking = False

    def watch(self, task: asyncio.Task[Any], seconds: float) -> None:
        self._deadlines[task] = self._loop.time() + seconds
        if not self._ticking:
            self._ticking = True
            self._loop.call_later(WATCHDOG_TICK, self._check)

    def forget(self, task: asyncio.Task[Any]) -> bool:
        """Stop watching ``task``; True if the watchdog cancelled it for its timeout."""
        self._deadlines.pop(task, None)
        if task in self._fired:
            self._fired.discard(task)
            return True
        return False

    def _check(self) -> None:
        now = self._loop.time()
        for task, deadline in self._deadlines.items():
            if deadline <= now and task not in self._fired:
                self._fired.add(task)
                task.cancel()  # schedules the cancellation: nothing here changes while iterating
        self._ticking = bool(self._deadlines)
        if self._ticking:
            self._loop.call_later(WATCHDOG_TICK, self._check)


def watchdog() -> Watchdog:
    """The running loop's :class:`Watchdog`."""
    loop = asyncio.get_running_loop()
    dog = _WATCHDOGS.get(loop)
    if dog is None:
        dog = _WATCHDOGS[loop] = Watchdog(loop)
    return dog


# ---------------------------------------------------------------------- proxies and TLS, both stacks
class EnvironProxies:
    """The environment's proxies for a URL's scheme, host and port, looked up once each.

    ``requests`` reads them itself (``HTTP(S)_PROXY``, ``ALL_PROXY``, ``NO_PROXY``), so the worker's
    session and the trigger's client follow the same rules for each host: the API endpoint, the upload
    host and each download host get their own answer.
    """

    _MAX_HOSTS = 256

    def __init__(self) -> None:
        self._known: dict[tuple[str, str, int | None], dict[str, str]] = {}

    def __call__(self, url: str) -> dict[str, str]:
        """``{scheme: proxy URL}`` for ``url``'s host (empty when NO_PROXY covers it)."""
        parts = urllib.parse.urlsplit(url)
        try:
            key = (parts.scheme.lower(), (parts.hostname or "").lower(), parts.port)
        except ValueError:  # an invalid port: let the HTTP library report it
            return {}
        proxies = self._known.get(key)
        if proxies is None:
            if len(self._known) >= self._MAX_HOSTS:
                self._known.clear()
            proxies = self._known[key] = requests.utils.get_environ_proxies(url)
        return proxies


def ssl_context() -> ssl.SSLContext:
    """The async client's TLS verification, from the variables the worker's ``requests`` reads
    (``REQUESTS_CA_BUNDLE``, ``CURL_CA_BUNDLE``), then OpenSSL's (``SSL_CERT_FILE``, ``SSL_CERT_DIR``),
    else the bundle ``requests`` uses (certifi's). Built once per setting (loading a bundle takes ~10 ms)."""
    env = os.environ
    names = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR")
    name = next((n for n in names if env.get(n)), None)
    where = env[name] if name else requests.certs.where()
    key = (name, where)
    context = _SSL_CONTEXTS.get(key)
    if context is None:
        try:
            if os.path.isdir(where):  # a directory of certificates (c_rehash), as requests accepts too
                context = ssl.create_default_context(capath=where)
            else:
                context = ssl.create_default_context(cafile=where)
        except (OSError, ssl.SSLError) as err:
            fix = f"Fix or unset {name}." if name else "Reinstall certifi."
            raise SpeedPixConfigError(
                f"The CA bundle {where!r} ({name or 'certifi'}) cannot be used for TLS "
                f"({type(err).__name__}: {err.strerror or err}). {fix}"
            ) from None
        _SSL_CONTEXTS[key] = context
    return context


# ---------------------------------------------------------------------- the async client
class AsyncClient:
    """One event loop's client for API calls: an ``aiohttp.ClientSession`` over at most ``MAX_IN_FLIGHT``
    keep-alive connections, with the environment's proxy for each URL (requests' rules, as the worker's
    session: :class:`EnvironProxies`) and the TLS context of :func:`ssl_context` for https.

    aiohttp's own ``trust_env`` is off: it would read the environment and ~/.netrc in a worker thread on
    every request. No cookies (an API call sets none) and no redirects (a signed call is never re-sent
    to another host).
    """

    _MAX_URLS = 256

    def __init__(self) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=MAX_IN_FLIGHT, limit_per_host=0, keepalive_timeout=KEEPALIVE_SECONDS
            ),
            headers={"User-Agent": USER_AGENT},
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )
        self._environ_proxies = EnvironProxies()
        self._routes: dict[str, tuple[str | None, ssl.SSLContext | bool]] = {}

    @property
    def closed(self) -> bool:
        return self.session.closed

    def route(self, url: str) -> tuple[str | None, ssl.SSLContext | bool]:
        """The proxy ``url`` goes through (``None``: direct) and its TLS context (``True``: plain http),
        remembered per URL."""
        known = self._routes.get(url)
        if known is None:
            if len(self._routes) >= self._MAX_URLS:
                self._routes.clear()
            proxy = requests.utils.select_proxy(url, self._environ_proxies(url))
            tls = ssl_context() if url[:6].lower() == "https:" else True
            known = self._routes[url] = (proxy, tls)
        return known

    async def aclose(self) -> None:
        """Close the session and every connection (the sockets are gone once the loop runs again)."""
        await self.session.close()


def shared_async_client() -> AsyncClient:
    """The running loop's shared client (created on first use)."""
    loop = asyncio.get_running_loop()
    client = _ASYNC_CLIENTS.get(loop)
    if client is None or client.closed:
        client = _ASYNC_CLIENTS[loop] = AsyncClient()
    return client


def _hold(loop: asyncio.AbstractEventLoop) -> None:
    _ASYNC_HOLDERS[loop] = _ASYNC_HOLDERS.get(loop, 0) + 1


async def _let_go(loop: asyncio.AbstractEventLoop) -> None:
    """One holder fewer; the last one closes the loop's client."""
    left = _ASYNC_HOLDERS.get(loop, 1) - 1
    if left > 0:
        _ASYNC_HOLDERS[loop] = left
        return
    _ASYNC_HOLDERS.pop(loop, None)
    client = _ASYNC_CLIENTS.pop(loop, None)  # the next user creates a new one, even mid-close
    if client is not None:
        with contextlib.suppress(Exception):
            await client.aclose()


def hold_async_client() -> Callable[[], Awaitable[None]]:
    """Count one more user of the running loop's shared client; return the coroutine function that lets
    go (safe to call more than once). The last one to let go closes the client and its sockets, so a
    loop that ends (each ``asyncio.run``, as in ``dag.test()``) leaks nothing; the next user on the loop
    gets a new client. Each trigger holds it for its whole run, each API call for its own duration."""
    loop = asyncio.get_running_loop()
    _hold(loop)
    released = False

    async def release() -> None:
        nonlocal released
        if not released:
            released = True
            await _let_go(loop)

    return release


def in_flight_limit() -> InFlightLimit:
    """The running loop's in-flight limit (:class:`InFlightLimit`).

    Thousands of triggers polling at once wait here (a future each, FIFO) rather than inside the HTTP
    client, and the limit follows the measured round trip.
    """
    loop = asyncio.get_running_loop()
    slots = _ASYNC_SLOTS.get(loop)
    if slots is None:
        slots = _ASYNC_SLOTS[loop] = InFlightLimit()
    return slots


# ---------------------------------------------------------------------- the worker's session
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

    def __init__(self) -> None:
        super().__init__()
        self.trust_env = False
        self.environ_proxies = EnvironProxies()

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
    session.headers["User-Agent"] = USER_AGENT
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


def aiohttp_error(
    operation: str, err: aiohttp.ClientError | TimeoutError, host: str
) -> SpeedPixTransportError:
    """Map an aiohttp failure; the message names the host only. aiohttp's own text and attributes carry
    the full URL and (``request_info``) the signed headers, so nothing of ``err`` but its type is kept."""
    never_sent = isinstance(err, aiohttp.ClientConnectorError | aiohttp.ClientHttpProxyError)
    if isinstance(err, aiohttp.ClientProxyConnectionError | aiohttp.ClientHttpProxyError):
        what = f"the proxy could not be reached or refused ({_PROXY_HINT})"
    elif isinstance(err, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError):
        what = "the TLS handshake failed (check the CA bundle: REQUESTS_CA_BUNDLE / SSL_CERT_FILE)"
    elif isinstance(err, aiohttp.ClientConnectorError):
        if isinstance(err.os_error, socket.gaierror):
            what = "the host name could not be resolved"
        else:
            what = "connection refused or host unreachable"
    elif isinstance(err, aiohttp.ConnectionTimeoutError):
        never_sent = True  # no connection within the timeout: nothing was written
        what = "connecting timed out"
    elif isinstance(err, TimeoutError):
        what = "no answer within the timeout"
    else:
        what = f"connection broken ({type(err).__name__})"
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


async def _aread(response: aiohttp.ClientResponse, operation: str) -> bytes:
    """An API answer's body: read whole when announced, small and not compressed; else in chunks with the
    size limit (a compressed body is limited as inflated)."""
    length = response.content_length
    if length is not None and length <= MAX_RESPONSE_BYTES and "Content-Encoding" not in response.headers:
        return await response.read()
    return await aread_limited(response.content.iter_chunked(CHUNK), operation)


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
    """:func:`call` on the event loop, through the loop's shared client and in-flight limit.

    Written flat (no closures, few coroutines): a triggerer has thousands of these in flight or queued,
    and every object each one keeps alive is work for the garbage collector (benchmark B1).
    """
    body = proto.encode_body(payload)
    url = settings.endpoint + proto.PATHS[operation]
    loop = asyncio.get_running_loop()
    _hold(loop)
    try:
        attempt = functools.partial(
            _attempt, shared_async_client(), settings, operation, url, body, allow_failure
        )
        return await settings.retry_policy.arun(operation, attempt, log)
    finally:
        await _let_go(loop)


async def _attempt(
    client: AsyncClient,
    settings: SpeedPixSettings,
    operation: str,
    url: str,
    body: bytes,
    allow_failure: bool,
) -> proto.Envelope:
    """One try of :func:`acall`, signed once it has a slot (a fresh timestamp), size-limited, mapped.

    Timed out per phase: connecting (a new connection: aiohttp's ``connect`` timeout, never reached the
    service) within ``seconds``, the whole attempt within ``seconds`` plus one tick (the loop's
    :class:`Watchdog`: no timers per request)."""
    proxy, tls = client.route(url)
    seconds = request_timeout(settings.timeout)
    slots = in_flight_limit()
    granted = await slots.acquire()
    task = asyncio.current_task()
    assert task is not None  # an attempt always runs in a task
    dog = watchdog()
    cancelling = task.cancelling()
    dog.watch(task, seconds + WATCHDOG_TICK)
    failure: SpeedPixTransportError | None = None
    try:
        async with client.session.post(
            url,
            data=body,
            headers=signed_headers(settings, operation, body),
            proxy=proxy,
            ssl=tls,
            timeout=_connect_timeout(seconds),
            allow_redirects=False,
        ) as response:
            content = await _aread(response, operation)
    except asyncio.CancelledError:
        if not dog.forget(task) or task.uncancel() > cancelling:
            raise  # cancelled by someone else (the triggerer, a deadline), not for the timeout
        failure = SpeedPixTransportError(
            f"SpeedPix {operation} to {settings.endpoint}: no answer within the timeout.",
            operation=operation,
            reached_server=True,
        )
    except (aiohttp.ClientError, TimeoutError) as err:
        failure = aiohttp_error(operation, err, settings.endpoint)
    finally:
        dog.forget(task)
        slots.release(granted)
    if failure is not None:
        # raised outside the handler: aiohttp's exception (its URL, its request_info's headers with the
        # signature) is not even kept as a suppressed __context__
        raise failure
    return proto.read_envelope(
        operation, response.status, response.headers, content, allow_failure=allow_failure
    )


@functools.lru_cache(maxsize=64)
def _connect_timeout(seconds: float) -> aiohttp.ClientTimeout:
    """aiohttp's timeouts for an attempt: only ``connect`` (getting a new connection), exact (not rounded
    up to a whole second), so that it fires before the watchdog's. Cached: most calls use the
    connection's own timeout, not one cut by a deadline."""
    return aiohttp.ClientTimeout(total=None, connect=seconds, sock_read=None, ceil_threshold=math.inf)
