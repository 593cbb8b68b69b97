"""What every SpeedPix trigger does around its own wait: hold the loop's shared client, yield one event."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_provider_speedpix import _transport


class SpeedPixTrigger(BaseTrigger):
    """Base of the SpeedPix triggers: ``run`` holds the event loop's shared HTTP client for the whole wait
    (the last holder closes it, so nothing leaks when a loop ends), yields exactly the one event ``_wait``
    returns, and lets go of the client on every exit; ``cleanup`` (also on a triggerer restart) lets go too.
    The event goes out no sooner than ``not_before`` (wall-clock UNIX time; the operators set it
    ``_outcome.DEFER_HOLD_SECONDS`` after the deferral, a workaround for an Airflow race).
    ``_final_event_sent`` tells ``on_kill`` that the wait is over."""

    not_before: float | None = None
    _final_event_sent: bool = False
    _release_client: Callable[[], Awaitable[None]] | None = None

    async def _wait(self) -> TriggerEvent:
        raise NotImplementedError

    async def run(self) -> AsyncIterator[TriggerEvent]:
        self._release_client = _transport.hold_async_client()
        try:
            event = await self._wait()
            self._final_event_sent = True  # before yielding: on_kill may come as soon as the event is out
            if self.not_before is not None and (early := self.not_before - time.time()) > 0:
                await asyncio.sleep(early)
            yield event
        finally:
            await self._let_go_of_client()

    async def cleanup(self) -> None:
        """Runs on every exit (also a triggerer restart): local resources only, never the predictions."""
        await self._let_go_of_client()
        await super().cleanup()

    async def _let_go_of_client(self) -> None:
        release, self._release_client = self._release_client, None
        if release is not None:
            await release()
