"""How long to wait before the next status poll, and when to stop. Pure; shared by the sync wait and
the trigger."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from airflow_provider_speedpix._protocol import PROGRESS, Prediction
from airflow_provider_speedpix._retry import RetryPolicy, should_retry

#: Fraction of the remaining time to sleep while the end is far away. Halving the remaining time each
#: poll needs about log2(remaining / poll_interval) calls instead of remaining / poll_interval.
FAR_FRACTION = 0.5
#: How far past the expected finish (in poll intervals) the last approach poll aims.
ARRIVAL_MARGIN = 0.05


def next_poll_delay(
    prediction: Prediction | None,
    *,
    poll_interval: float,
    max_interval: float,
    elapsed: float | None = None,
) -> float:
    """Seconds until the next poll.

    When nothing is known, or the ETA has passed, poll every ``poll_interval``: that bounds detection
    latency just as a fixed interval would. Near the expected end, poll just after it. While the end is far, sleep a fraction of the remaining time,
    never longer than ``max_interval``. The remaining time comes from the progress call's ``etaRelative``
    or, before the first progress answer, from ``estimatedDurationInSeconds`` minus ``elapsed``.
    """
    remaining: float | None = None
    if prediction is not None:
        if prediction.eta_seconds is not None and prediction.status == "running":
            remaining = prediction.eta_seconds
        elif prediction.estimated_duration is not None and elapsed is not None:
            remaining = prediction.estimated_duration - elapsed
    if remaining is None or remaining <= 0:
        return poll_interval
    if remaining <= 2 * poll_interval:
        # Close to the end: aim just past the expected finish, so the finish is usually seen on the
        # first poll after it, but never wait longer than poll_interval (an ETA can be wrong).
        return min(poll_interval, max(remaining + ARRIVAL_MARGIN * poll_interval, poll_interval / 4))
    return max(poll_interval, min(remaining * FAR_FRACTION, max_interval))


@dataclass(frozen=True)
class Step:
    """What to do after a poll: ``sleep`` ``delay`` seconds and poll again, or end (after sleeping
    ``delay``) with ``done`` (the prediction finished), ``timeout`` (the deadline passed), ``error`` (a
    failure another poll will not fix) or ``gave_up`` (too many failed polls in a row)."""

    action: Literal["sleep", "done", "timeout", "error", "gave_up"]
    delay: float = 0.0
    prediction: Prediction | None = None
    error: BaseException | None = None


class PollLoop:
    """The waiting rules, pure, driven by ``SpeedPixHook.wait_for_prediction`` (sync) and the trigger
    (async): the same deadline handling, the same tolerance of failed polls (their backoff from the one
    :class:`RetryPolicy`), the same adaptive delay with ``elapsed``. The driver supplies the clock: any
    clock works as long as ``now``, ``deadline`` and ``created_at`` use the same one.
    """

    def __init__(
        self,
        *,
        poll_interval: float,
        max_interval: float,
        deadline: float | None = None,
        created_at: float | None = None,
        estimated_duration: float | None = None,
        max_consecutive_errors: int = 10,
    ) -> None:
        self.poll_interval = poll_interval
        self.max_interval = max(max_interval, poll_interval)
        self.deadline = deadline
        self.created_at = created_at
        self.estimated_duration = estimated_duration
        self.max_consecutive_errors = max_consecutive_errors
        self.errors = 0
        self.last_status: str | None = None
        self._backoff = RetryPolicy(
            attempts=max_consecutive_errors, delay=poll_interval, max_delay=self.max_interval, jitter=False
        )

    def _remaining(self, now: float) -> float | None:
        return None if self.deadline is None else self.deadline - now

    def answered(self, prediction: Prediction, now: float) -> Step:
        """A poll answered with ``prediction``."""
        self.errors = 0
        self.last_status = prediction.status
        if prediction.finished:
            return Step("done", prediction=prediction)
        remaining = self._remaining(now)
        if remaining is not None and remaining <= 0:
            return Step("timeout")
        if prediction.status == "waiting" and self.estimated_duration is not None:
            prediction.estimated_duration = self.estimated_duration
        delay = next_poll_delay(
            prediction,
            poll_interval=self.poll_interval,
            max_interval=self.max_interval,
            elapsed=None if self.created_at is None else now - self.created_at,
        )
        return Step("sleep", delay if remaining is None else min(delay, remaining))

    def failed(self, error: BaseException, now: float) -> Step:
        """A poll raised ``error`` (after the hook's own retries)."""
        if not should_retry(PROGRESS, error):
            return Step("error", error=error)
        self.errors += 1
        if self.errors >= self.max_consecutive_errors:
            return Step("gave_up", error=error)
        delay = self._backoff.wait(self.errors)
        remaining = self._remaining(now)
        if remaining is not None and remaining <= delay:
            return Step("timeout", delay=max(remaining, 0), error=error)
        return Step("sleep", delay, error=error)
