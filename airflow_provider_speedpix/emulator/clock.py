"""The emulator's notion of time, injectable so tests move it instead of sleeping.

Every part of the emulator (gateway timestamp window and nonce memory, task lifecycle, upload URL expiry)
reads time through one :class:`Clock`. :class:`ManualClock` starts at the real time (so requests signed
with the real clock pass the gateway) and only moves when told to.
"""

from __future__ import annotations

import threading
import time


class Clock:
    """Wall-clock and monotonic time (the real ones)."""

    def time(self) -> float:
        """Seconds since the epoch (timestamps, expiry, ``taskBeginTime``)."""
        return time.time()

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (task lifecycle, nonce memory)."""
        return time.monotonic()


class ManualClock(Clock):
    """A clock that stands still until :meth:`advance`; safe to move from another thread."""

    def __init__(self, start: float | None = None) -> None:
        self._lock = threading.Lock()
        self._wall = time.time() if start is None else float(start)
        self._offset = 0.0

    def time(self) -> float:
        return self._wall + self._offset

    def monotonic(self) -> float:
        return self._offset

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock does not go back")
        with self._lock:
            self._offset += seconds
