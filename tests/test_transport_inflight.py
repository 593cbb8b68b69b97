"""The async transport's in-flight limit (sized from the measured round trip) and its lanes."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import httpx
import pytest

from airflow_provider_speedpix import _transport
from airflow_provider_speedpix._transport import InFlightLimit, LaneTransport
from airflow_provider_speedpix.exceptions import SpeedPixResponseError


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


def test_lanes_reuse_one_connection_each_and_close() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        return httpx.Response(200, content=b"{}")

    async def main() -> None:
        lanes = LaneTransport(2)
        # a lane's own pool is replaced with a mock, to count lanes without sockets
        lanes._new_lane = lambda: lanes._all.append(httpx.MockTransport(handler)) or lanes._all[-1]  # type: ignore[method-assign]
        async with httpx.AsyncClient(mounts={"all://": lanes}) as client:
            responses = await asyncio.gather(*(client.get(f"http://x/{i}") for i in range(5)))
            assert all(r.status_code == 200 for r in responses)
            assert len(lanes._all) <= 2
            assert len(lanes._free) == len(lanes._all)  # every lane given back

    asyncio.run(main())
    assert sorted(seen) == [f"/{i}" for i in range(5)]


@pytest.mark.parametrize("content_encoding", [None, "gzip"])
def test_acall_reads_small_bodies_whole_and_limits_the_rest(monkeypatch, content_encoding) -> None:
    from airflow_provider_speedpix import _protocol as proto
    from airflow_provider_speedpix._settings import settings_from_env

    monkeypatch.setenv("SPEEDPIX_APP_KEY", "k")
    monkeypatch.setenv("SPEEDPIX_APP_SECRET", "s")
    monkeypatch.setenv("SPEEDPIX_ENDPOINT", "http://emulator.invalid")
    monkeypatch.setattr(_transport, "MAX_RESPONSE_BYTES", 64)
    big = b'{"data": {"a": "' + b"x" * 100 + b'"}}'

    def handler(request: httpx.Request) -> httpx.Response:
        headers = {"content-encoding": content_encoding} if content_encoding else {}
        if content_encoding:
            import gzip

            return httpx.Response(200, content=gzip.compress(big), headers=headers)
        return httpx.Response(200, content=big, headers=headers)

    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    monkeypatch.setattr(_transport, "shared_async_client", lambda: client)
    settings = dataclasses.replace(settings_from_env("speedpix_default"), retry_limit=1)
    with pytest.raises(SpeedPixResponseError, match="larger than"):
        asyncio.run(_transport.acall(settings, proto.PROGRESS, {"taskId": "t"}, log=logging.getLogger("t")))
    monkeypatch.setattr(_transport, "MAX_RESPONSE_BYTES", 1024)
    envelope = asyncio.run(
        _transport.acall(settings, proto.PROGRESS, {"taskId": "t"}, log=logging.getLogger("t"))
    )
    assert envelope is not None
