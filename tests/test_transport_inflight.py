"""The async transport: its in-flight limit (sized from the measured round trip), body reads, proxies, TLS."""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import logging
import ssl

import pytest
import requests

from airflow_provider_speedpix import _transport
from airflow_provider_speedpix._protocol import PROGRESS
from airflow_provider_speedpix._settings import settings_from_env
from airflow_provider_speedpix._transport import InFlightLimit
from airflow_provider_speedpix.exceptions import (
    SpeedPixConfigError,
    SpeedPixResponseError,
    SpeedPixTransportError,
)
from tests._scripted_http import Answer, ScriptedServer, Stall


def test_limit_is_demand_times_round_trip_within_its_bounds() -> None:
    def sized(demand_per_s: float, rtt: float, seconds: float = 2.0) -> int:
        slots = InFlightLimit(low=4, high=20)
        calls = int(demand_per_s * seconds)
        slots._asked, slots._rtt_sum, slots._rtt_count = calls, calls * rtt, calls
        slots._resize(slots._window_start + seconds)
        assert (slots._asked, slots._rtt_count) == (0, 0)  # a new window
        return slots.limit

    assert sized(100, 0.001) == 4  # loopback: the floor
    assert sized(200, 0.05) == 15  # ceil(200/s x 0.05 s x 1.5)
    assert sized(1000, 0.5) == 20  # never above the bound


def test_the_limit_rises_at_once_and_falls_slowly() -> None:
    slots = InFlightLimit(low=4, high=200)

    def window(demand_per_s: float, rtt: float) -> int:
        slots._asked, slots._rtt_sum, slots._rtt_count = (
            int(demand_per_s),
            demand_per_s * rtt,
            int(demand_per_s),
        )
        slots._resize(slots._window_start + 1.0)
        return slots.limit

    assert window(1000, 0.05) == 75  # straight up
    assert window(100, 0.05) == 67  # a quiet second: 10 % down, not to 8
    assert window(100, 0.05) == 60
    assert [window(100, 0.001) for _ in range(40)][-1] == 4  # idle for long: back to the floor
    assert window(1000, 0.05) == 75


def test_round_trips_are_measured_from_grant_to_release(monkeypatch) -> None:
    clock = [100.0]
    monkeypatch.setattr(_transport.time, "monotonic", lambda: clock[0])

    async def main() -> InFlightLimit:
        slots = InFlightLimit(low=1, high=64)
        for _ in range(40):  # 40 calls of 0.05 s each, back to back: 2 s
            granted = await slots.acquire()
            clock[0] += 0.05
            slots.release(granted)
        return slots

    slots = asyncio.run(main())
    assert slots.limit == 2  # the window closed after 1 s: 20 calls/s x 0.05 s x 1.5 = 1.5 -> 2


def test_waiters_are_served_in_order_and_cancelled_waiters_give_their_slot_on() -> None:
    async def main() -> list[int]:
        slots = InFlightLimit(low=1, high=1)
        order: list[int] = []
        first = await slots.acquire()

        async def user(i: int) -> None:
            granted = await slots.acquire()
            order.append(i)
            slots.release(granted)

        tasks = [asyncio.create_task(user(i)) for i in range(3)]
        await asyncio.sleep(0)
        tasks[1].cancel()
        slots.release(first)
        await asyncio.gather(*tasks, return_exceptions=True)
        assert slots.active == 0
        return order

    assert asyncio.run(main()) == [0, 2]


@pytest.mark.parametrize("shape", ["announced", "gzip", "chunked"])
def test_acall_reads_small_bodies_whole_and_limits_the_rest(monkeypatch, shape) -> None:
    """Announced and small: read whole; compressed (limited as inflated) or unannounced: read in chunks
    with the limit. Either way a body over ``MAX_RESPONSE_BYTES`` is refused, one under it is read."""
    monkeypatch.setattr(_transport, "MAX_RESPONSE_BYTES", 64)
    big = b'{"data": {"a": "' + b"x" * 100 + b'"}}'
    answer = {
        "announced": Answer(200, {}, big),
        "gzip": Answer(200, {"Content-Encoding": "gzip"}, gzip.compress(big)),  # < 64 bytes compressed
        "chunked": Answer(200, {}, big, chunked=True),
    }[shape]
    with ScriptedServer([answer]) as server:
        monkeypatch.setenv("SPEEDPIX_APP_KEY", "k")
        monkeypatch.setenv("SPEEDPIX_APP_SECRET", "s")
        monkeypatch.setenv("SPEEDPIX_ENDPOINT", server.url)
        settings = dataclasses.replace(settings_from_env("speedpix_default"), retry_limit=1)

        def call() -> object:
            return asyncio.run(
                _transport.acall(settings, PROGRESS, {"taskId": "t"}, log=logging.getLogger("t"))
            )

        with pytest.raises(SpeedPixResponseError, match="larger than"):
            call()
        monkeypatch.setattr(_transport, "MAX_RESPONSE_BYTES", 1024)
        assert call().data == {"a": "x" * 100}  # type: ignore[attr-defined]


def test_each_url_gets_the_proxy_of_its_own_host(monkeypatch) -> None:
    """requests' rules (HTTP_PROXY, NO_PROXY), looked up once per URL, on the async client too."""
    lookups: list[str] = []
    real = requests.utils.get_environ_proxies

    def counting(url, no_proxy=None):
        lookups.append(url)
        return real(url, no_proxy=no_proxy)

    monkeypatch.setattr(requests.utils, "get_environ_proxies", counting)
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.test:3128")
    monkeypatch.setenv("NO_PROXY", "direct.test")

    async def main() -> list[str | None]:
        client = _transport.AsyncClient()
        try:
            urls = ["http://api.test/scc/a", "http://direct.test/scc/a", "https://api.test/scc/a"]
            return [client.route(url)[0] for url in urls * 3]
        finally:
            await client.aclose()

    assert asyncio.run(main()) == ["http://proxy.test:3128", None, None] * 3  # no HTTPS_PROXY set
    assert len(lookups) == 3


def test_https_gets_the_tls_context_of_the_ca_bundle_variables(monkeypatch, tmp_path) -> None:
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR"):
        monkeypatch.delenv(name, raising=False)
    default = _transport.ssl_context()
    assert default.verify_mode == ssl.CERT_REQUIRED and default.check_hostname
    assert default is _transport.ssl_context()  # built once
    assert default.get_ca_certs()  # certifi's bundle, as requests uses

    async def routes() -> tuple[object, object]:
        client = _transport.AsyncClient()
        try:
            return client.route("http://api.test/x")[1], client.route("https://api.test/x")[1]
        finally:
            await client.aclose()

    assert asyncio.run(routes()) == (True, default)
    missing = tmp_path / "missing.pem"
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(missing))
    # read, not ignored: a wrong path is a config error naming the variable, and only for https
    with pytest.raises(SpeedPixConfigError, match=r"missing\.pem.*REQUESTS_CA_BUNDLE.*Fix or unset"):
        asyncio.run(routes())
    monkeypatch.setenv("SPEEDPIX_APP_KEY", "k")
    monkeypatch.setenv("SPEEDPIX_APP_SECRET", "s")
    monkeypatch.setenv("SPEEDPIX_ENDPOINT", "https://api.invalid")

    async def call() -> None:
        settings = settings_from_env("speedpix_default")
        with pytest.raises(SpeedPixConfigError):
            await _transport.acall(settings, PROGRESS, {"taskId": "t"}, log=logging.getLogger("t"))
        assert asyncio.get_running_loop() not in _transport._ASYNC_CLIENTS  # let go of, and closed

    asyncio.run(call())


def _stalled_settings(monkeypatch, url: str, timeout: float):
    monkeypatch.setenv("SPEEDPIX_APP_KEY", "k")
    monkeypatch.setenv("SPEEDPIX_APP_SECRET", "s")
    monkeypatch.setenv("SPEEDPIX_ENDPOINT", url)
    return dataclasses.replace(settings_from_env("speedpix_default"), retry_limit=1, timeout=timeout)


def test_the_watchdog_times_out_an_attempt_and_only_its_own_cancellation(monkeypatch) -> None:
    """Past its timeout an attempt is cancelled by the loop's watchdog and reported as a timeout; a
    cancellation from outside (the triggerer) stays a CancelledError; nothing is left watched and the
    watchdog stops ticking once idle."""
    log = logging.getLogger("t")
    watched: list[float] = []
    real_watch = _transport.Watchdog.watch

    def watch(self, task, seconds):
        watched.append(seconds)
        return real_watch(self, task, seconds)

    monkeypatch.setattr(_transport.Watchdog, "watch", watch)
    with ScriptedServer([Stall(2.0)]) as server:
        settings = _stalled_settings(monkeypatch, server.url, timeout=0.2)

        async def main() -> None:
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(SpeedPixTransportError, match="no answer within the timeout") as info:
                await _transport.acall(settings, PROGRESS, {"taskId": "t"}, log=log)
            assert info.value.reached_server is True
            # watched for the timeout plus one tick; it fired well before the server's 2 s stall ended
            # (the bound leaves room for a loaded machine; the exact deadline is checked, not timed)
            assert watched == [pytest.approx(0.2 + _transport.WATCHDOG_TICK)]
            assert 0.2 <= loop.time() - started < 1.5
            task = asyncio.create_task(_transport.acall(settings, PROGRESS, {"taskId": "t"}, log=log))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            dog = _transport.watchdog()
            assert dog._deadlines == {} and dog._fired == set()
            await asyncio.sleep(3 * _transport.WATCHDOG_TICK)
            assert dog._ticking is False

        asyncio.run(main())


def test_a_cancellation_from_outside_wins_over_the_watchdog_firing_at_the_same_time(monkeypatch) -> None:
    log = logging.getLogger("t")
    with ScriptedServer([Stall(2.0)]) as server:
        settings = _stalled_settings(monkeypatch, server.url, timeout=5.0)

        async def main() -> None:
            task = asyncio.create_task(_transport.acall(settings, PROGRESS, {"taskId": "t"}, log=log))
            dog = _transport.watchdog()
            while task not in dog._deadlines:
                await asyncio.sleep(0.01)
            dog._deadlines[task] = 0.0  # overdue: the next check fires
            task.cancel()  # ... and the triggerer cancels it too, before it runs again
            dog._check()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(main())
