"""Issue #11 §6: the trigger's ``on_kill`` and the shared async client's lifetime."""

from __future__ import annotations

import asyncio
import gc
import logging

import psutil
import pytest

from airflow_provider_speedpix import _transport as transport_module
from airflow_provider_speedpix._protocol import Prediction
from airflow_provider_speedpix.hooks.speedpix import SpeedPixHook
from airflow_provider_speedpix.triggers.speedpix import SpeedPixPredictionTrigger
from tests._helpers import cancel_after, said
from tests.test_trigger import Script, collect, create, run_trigger


# ---------------------------------------------------------------------- on_kill
def test_on_kill_warns_that_the_prediction_keeps_running(capsys, caplog):
    caplog.set_level(logging.WARNING)
    trigger = SpeedPixPredictionTrigger("p-42")
    capsys.readouterr()
    asyncio.run(asyncio.wait_for(trigger.on_kill(), timeout=1))  # bounded: no network, no waiting
    text = said(capsys, caplog)
    assert "p-42" in text
    assert "keeps running" in text and "no cancel call" in text


def test_on_kill_while_waiting_warns(speedpix_conn, capsys, caplog):
    """As the triggerer does on a user action: cancel the run mid-wait, then call on_kill."""
    caplog.set_level(logging.WARNING)
    prediction = create("sleep-30")
    trigger = SpeedPixPredictionTrigger(prediction.id, poll_interval=0.1)

    async def main() -> None:
        await cancel_after(collect(trigger), 0.5)
        await trigger.on_kill()

    capsys.readouterr()
    asyncio.run(main())
    assert f"{prediction.id}, but it keeps running" in said(capsys, caplog)


def test_on_kill_is_silent_after_the_final_event(monkeypatch, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    Script(monkeypatch, [Prediction(id="p-1", status="succeeded", output={})])
    trigger = SpeedPixPredictionTrigger("p-1", poll_interval=1.0)
    assert run_trigger(trigger)["status"] == "success"
    capsys.readouterr()
    caplog.clear()
    asyncio.run(trigger.on_kill())
    assert "keeps running" not in said(capsys, caplog)


def test_on_kill_never_raises(monkeypatch):
    trigger = SpeedPixPredictionTrigger("p-1")

    class Broken:
        def warning(self, *args, **kwargs):
            raise RuntimeError("log handler broke")

    monkeypatch.setattr(SpeedPixPredictionTrigger, "log", Broken())
    asyncio.run(trigger.on_kill())


# ---------------------------------------------------------------------- the shared client
@pytest.fixture
def clients(monkeypatch) -> list[transport_module.AsyncClient]:
    """Every shared client (``_transport.AsyncClient``) made while the test runs."""
    created: list[transport_module.AsyncClient] = []

    class Recorded(transport_module.AsyncClient):
        def __init__(self) -> None:
            super().__init__()
            created.append(self)

    monkeypatch.setattr(transport_module, "AsyncClient", Recorded)
    return created


@pytest.fixture
def no_unclosed_warnings(caplog, recwarn):
    """aiohttp reports a session or connector never closed through the loop's exception handler (the
    ``asyncio`` logger) and ``ResourceWarning``; collect both once the test's clients are gone."""
    caplog.set_level(logging.ERROR, logger="asyncio")
    yield
    gc.collect()
    unclosed = [r.getMessage() for r in caplog.records if "nclosed" in r.getMessage()]
    unclosed += [str(w.message) for w in recwarn if issubclass(w.category, ResourceWarning)]
    assert unclosed == []


def open_sockets_to(port: int) -> int:
    return sum(
        1
        for c in psutil.Process().net_connections(kind="tcp")
        if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
    )


def test_client_is_closed_after_the_last_trigger_and_no_socket_stays_open(
    speedpix_conn, clients, no_unclosed_warnings
):
    port = int(speedpix_conn.url.rsplit(":", 1)[1])
    ids = [create("sleep-0.3").id for _ in range(4)]
    before = open_sockets_to(port)  # the sync hook's keep-alive connections, not ours

    async def main() -> None:
        for prediction_id in ids[:2]:  # one after another
            [event] = await collect(SpeedPixPredictionTrigger(prediction_id, poll_interval=0.1))
            assert event["status"] == "success"
        results = await asyncio.gather(
            *(collect(SpeedPixPredictionTrigger(i, poll_interval=0.1)) for i in ids[2:])
        )
        assert [r[0]["status"] for r in results] == ["success", "success"]
        assert transport_module._ASYNC_CLIENTS.get(asyncio.get_running_loop()) is None

    for _ in range(3):  # as dag.test() does: a new loop each time
        asyncio.run(main())
    assert clients and all(client.closed for client in clients)
    assert open_sockets_to(port) <= before


def test_finishing_one_trigger_does_not_close_the_client_another_uses(clocked_conn, clients):
    # On an emulator clock that moves only when told, the long prediction is still running when the
    # short one has finished however slowly the machine runs, and finishes only after that.
    emulator = clocked_conn
    short, long = create("sleep-0.2"), create("sleep-1.5")
    emulator.clock.advance(0.5)  # the short one is done, the long one runs

    async def main() -> tuple[dict, dict]:
        slow = asyncio.create_task(collect(SpeedPixPredictionTrigger(long.id, poll_interval=0.1)))
        [first] = await collect(SpeedPixPredictionTrigger(short.id, poll_interval=0.1))
        in_use = transport_module._ASYNC_CLIENTS.get(asyncio.get_running_loop())
        assert in_use is not None and not in_use.closed
        assert not slow.done()
        emulator.clock.advance(1.5)  # now the long one is done too: seen by its next poll
        [second] = await slow
        assert in_use.closed
        return first, second

    first, second = asyncio.run(main())
    assert (first["status"], second["status"]) == ("success", "success")
    assert len(clients) == 1  # the long trigger kept polling through the same client


def test_cleanup_lets_go_even_when_run_never_finished(speedpix_conn, clients, monkeypatch):
    """A triggerer restart cancels the run; cleanup() (run on every exit) releases the client."""
    prediction = create("sleep-30")
    trigger = SpeedPixPredictionTrigger(prediction.id, poll_interval=0.1)
    polled: list[asyncio.Event] = []
    original = SpeedPixHook.aget_prediction

    async def spy(hook, prediction_id, **kwargs):
        result = await original(hook, prediction_id, **kwargs)
        polled[0].set()  # the client exists and has answered: the trigger now waits for its next poll
        return result

    monkeypatch.setattr(SpeedPixHook, "aget_prediction", spy)

    async def main() -> None:
        polled.append(asyncio.Event())
        events = trigger.run()
        task = asyncio.create_task(events.__anext__())
        await asyncio.wait_for(polled[0].wait(), timeout=10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await trigger.cleanup()
        await trigger.cleanup()  # twice is harmless
        assert transport_module._ASYNC_CLIENTS.get(asyncio.get_running_loop()) is None

    asyncio.run(main())
    assert clients and all(client.closed for client in clients)


def test_standalone_async_calls_close_their_client(speedpix_conn, clients, no_unclosed_warnings):
    prediction = create("sleep-1")
    port = int(speedpix_conn.url.rsplit(":", 1)[1])
    before = open_sockets_to(port)
    asyncio.run(SpeedPixHook().aget_prediction(prediction.id))
    assert len(clients) == 1 and clients[0].closed
    assert open_sockets_to(port) <= before
