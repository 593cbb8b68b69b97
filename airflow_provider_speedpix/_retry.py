"""The one retry policy: what is worth another attempt, and how long to wait before it.

Used by every API call (both transports), the upload PUT, the output GET, and, with the poll interval
as its base and no jitter, by the sync wait and the trigger between failed polls.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from airflow_provider_speedpix import _protocol as proto
from airflow_provider_speedpix.exceptions import (
    SpeedPixAPIError,
    SpeedPixDownloadError,
    SpeedPixResponseError,
    SpeedPixServerError,
    SpeedPixThrottledError,
    SpeedPixTransportError,
    SpeedPixUploadError,
)

T = TypeVar("T")
_LOG = logging.getLogger(__name__)

#: Words in a backend envelope's error code (HTTP 200, ``errCode`` / ``subErrCode`` set) that say the
#: service could not answer right now, not that the request or the prediction is bad.
TRANSIENT_CODE_WORDS = ("internal", "unavailable", "busy", "throttl", "timeout", "toomany", "overload")
#: The least a request gets when the time left is (almost) gone: one last answer is still worth asking.
MIN_REQUEST_TIMEOUT = 0.1

# Monotonic time by which every request and retry in this context (thread or asyncio task) must end.
_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("speedpix_deadline", default=None)


@contextmanager
def within(seconds: float | None) -> Iterator[None]:
    """Bound every request, retry and backoff inside the block to ``seconds`` from now (``None``: no
    bound; a nested block never extends an outer one). Each request's timeout is cut to the time left
    (:func:`request_timeout`) and no retry is started whose backoff would not end before it."""
    if seconds is None:
        yield
        return
    deadline = time.monotonic() + max(seconds, 0.0)
    outer = _DEADLINE.get()
    token = _DEADLINE.set(deadline if outer is None else min(outer, deadline))
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def time_left() -> float | None:
    """Seconds left in the innermost :func:`within` block, or ``None`` outside any."""
    deadline = _DEADLINE.get()
    return None if deadline is None else deadline - time.monotonic()


def request_timeout(timeout: float) -> float:
    """``timeout`` (the connection's per-request timeout) cut to the time left, if bounded."""
    left = time_left()
    return timeout if left is None else max(MIN_REQUEST_TIMEOUT, min(timeout, left))


def transient_code(error: BaseException) -> bool:
    """A plain backend envelope error whose code says "try again later" (``InternalError``,
    ``ServiceUnavailable``, ``SystemBusy``, ``Throttling``...): not a verdict on the request."""
    if type(error) is not SpeedPixAPIError:
        return False
    codes = f"{error.error_code or ''} {error.sub_error_code or ''}".lower().replace("_", "")
    return any(word in codes for word in TRANSIENT_CODE_WORDS)


def should_retry(operation: str, error: BaseException) -> bool:
    """What is retryable, for every request the provider makes.

    Throttling and connect failures never reached the backend, so even a create is retried. 5xx, read
    timeouts, resets and unreadable answers are retried only for operations that can safely be repeated:
    a ``comfy_prompt`` that timed out may have created (and billed) a prediction already; so are
    backend envelope errors whose code says the service is busy (:func:`transient_code`). A storage
    request (upload PUT, output GET) says itself whether its failure is transient (``retryable``).
    """
    if isinstance(error, SpeedPixThrottledError):
        return True
    if isinstance(error, SpeedPixTransportError):
        return not error.reached_server or operation not in proto.NON_IDEMPOTENT
    if isinstance(error, SpeedPixServerError | SpeedPixResponseError) or transient_code(error):
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
        left = time_left()
        if left is not None and left <= delay + MIN_REQUEST_TIMEOUT:
            log.warning(
                "SpeedPix %s attempt %d/%d failed (%s); no time left for another before the deadline",
                operation,
                attempt,
                self.attempts,
                error,
            )
            return None
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
