"""The one retry policy: what is worth another attempt, and how long to wait before it.

Used by every API call (both transports), the upload PUT, the output GET, and, with the poll interval
as its base and no jitter, by the sync wait and the trigger between failed polls.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from airflow_provider_speedpix import _protocol as proto
from airflow_provider_speedpix.exceptions import (
    SpeedPixDownloadError,
    SpeedPixResponseError,
    SpeedPixServerError,
    SpeedPixThrottledError,
    SpeedPixTransportError,
    SpeedPixUploadError,
)

T = TypeVar("T")
_LOG = logging.getLogger(__name__)


def should_retry(operation: str, error: BaseException) -> bool:
    """What is retryable, for every request the provider makes.

    Throttling and connect failures never reached the backend, so even a create is retried. 5xx, read
    timeouts, resets and unreadable answers are retried only for operations that can safely be repeated:
    a ``comfy_prompt`` that timed out may have created (and billed) a prediction already. A storage
    request (upload PUT, output GET) says itself whether its failure is transient (``retryable``).
    """
    if isinstance(error, SpeedPixThrottledError):
        return True
    if isinstance(error, SpeedPixTransportError):
        return not error.reached_server or operation not in proto.NON_IDEMPOTENT
    if isinstance(error, SpeedPixServerError | SpeedPixResponseError):
        return operation not in proto.NON_IDEMPOTENT
    if isinstance(error, SpeedPixUploadError | SpeedPixDownloadError):
        return error.retryable
    return False


def retryable_status(status_code: int) -> bool:
    """For plain storage requests, which are safe to repeat: 5xx and throttling."""
    return status_code >= 500 or status_code == 429


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries in all; before try ``n + 1`` wait ``min(max_delay, delay * 2 ** (n - 1))``.

    With ``jitter`` the wait is drawn from the upper half of that, so many clients retrying together
    spread out; without it the wait is exact (used between failed polls, which have no herd to spread).
    """

    attempts: int
    delay: float
    max_delay: float
    jitter: bool = True

    def wait(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        cap = min(self.max_delay, self.delay * 2 ** (attempt - 1))
        if not self.jitter:
            return cap
        return cap * (0.5 + random.random() / 2)  # noqa: S311 - jitter, not a secret

    def with_attempts(self, attempts: int) -> RetryPolicy:
        return replace(self, attempts=attempts)

    def _next_wait(self, operation: str, error: BaseException, attempt: int, log: Any) -> float | None:
        if attempt >= self.attempts or not should_retry(operation, error):
            return None
        delay = self.wait(attempt)
        log.warning(
            "SpeedPix %s attempt %d/%d failed (%s); retrying in %.1fs",
            operation,
            attempt,
            self.attempts,
            error,
            delay,
        )
        return delay

    def run(self, operation: str, attempt: Callable[[], T], log: Any = _LOG) -> T:
        """Call ``attempt`` until it returns or fails for good (sync twin of :meth:`arun`)."""
        number = 1
        while True:
            try:
                return attempt()
            except Exception as err:  # decided by should_retry, re-raised as is
                delay = self._next_wait(operation, err, number, log)
                if delay is None:
                    raise
            time.sleep(delay)
            number += 1

    async def arun(self, operation: str, attempt: Callable[[], Awaitable[T]], log: Any = _LOG) -> T:
        """:meth:`run` for the event loop."""
        number = 1
        while True:
            try:
                return await attempt()
            except Exception as err:  # decided by should_retry, re-raised as is
                delay = self._next_wait(operation, err, number, log)
                if delay is None:
                    raise
            await asyncio.sleep(delay)
            number += 1
