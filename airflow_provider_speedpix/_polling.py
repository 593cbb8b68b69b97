"""How long to wait before the next status poll, and when to stop. Pure; shared by the sync wait and
the trigger."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from airflow_provider_speedpix import _protocol as proto
from airflow_provider_speedpix._protocol import PROGRESS, RESULT, Prediction
from airflow_provider_speedpix._retry import RetryPolicy, should_retry, transient_code
from airflow_provider_speedpix.exceptions import (
    SpeedPixAPIError,
    SpeedPixNotFoundError,
    SpeedPixResponseError,
    SpeedPixServerError,
)

#: Fraction of the remaining time to sleep while the end is far away. Halving the remaining time each
#: poll needs about log2(remaining / poll_interval) calls instead of remaining / poll_interval.
FAR_FRACTION = 0.5
#: How far past the expected finish (in poll intervals) the last approach poll aims.
ARRIVAL_MARGIN = 0.05
#: The most an ETA trend may shrink the remaining time: an ETA that fell 3 s per second says the
#: estimate is 3x too long; a faster fall is noise (a queue that moved, a rounding), not a rate.
MAX_ETA_RATE = 3.0
#: ETA trends measured over less than this (seconds) are ignored.
MIN_TREND_SECONDS = 0.5
#: The least time one poll (its requests, retries and backoff) gets, even at or past the deadline: one
#: last answer is still worth asking for, and a ``timeout`` then comes at most this long after the
#: deadline, well inside the deferral's grace (``_outcome.DEFER_GRACE``).
LAST_POLL_SECONDS = 5.0
#: A prediction created this recently (seconds) may not be visible to the status call yet: "not found"
#: then is sat out like a transient failure instead of ending the wait.
NOT_FOUND_GRACE = 30.0
#: Words in a result call's error code that say "not finished yet", not "failed".
NOT_READY_WORDS = ("notfinished", "notready", "notcomplete", "inprogress", "running", "pending", "waiting")


def settle(prediction: Prediction, result: proto.Envelope) -> Prediction:
    """Fold the result call's answer into a prediction whose progress answer said it finished, trusting
    only a definite answer: a result that is not ready yet (``TaskNotFinished``, or ``data.status``
    ``waiting``/``running``) leaves it ``running`` (poll again); a busy-service code or a "not found"
    right after "finished" raises a transient error (a failed poll, sat out); only a success, or a
    failure the result call itself reports, ends it. A wrong "failed" would make a retry pay for a new
    prediction."""
    data = result.data if isinstance(result.data, dict) else {}
    said = str(data.get("status") or "").lower()
    code = result.code.lower().replace("_", "")
    failed = result.failed or result.status != proto.SUCCESS_ENVELOPE_STATUS
    if said in ("waiting", "running") or (failed and any(word in code for word in NOT_READY_WORDS)):
        prediction.status = "running"
        prediction.message = f"finishing (the result is not ready yet: {result.code or said})"
        return prediction
    if failed and said not in proto.TERMINAL_STATUSES:
        where = f"{RESULT} answered {result.code or '-'}: {result.reason or 'no message'}"
        where += f" (invoke id {result.invoke_id}, request id {result.request_id})"
        error_cls: type[SpeedPixAPIError] | None = None
        probe = SpeedPixAPIError(
            "", operation=RESULT, error_code=result.err_code, sub_error_code=result.sub_err_code
        )
        if transient_code(probe):
            error_cls, where = SpeedPixServerError, f"{where}; the service is busy, asking again."
        elif "notfound" in code:
            error_cls, where = SpeedPixResponseError, f"{where}, though progress said {prediction.status}."
        if error_cls is not None:
            raise error_cls(
                f"SpeedPix {where}",
                operation=RESULT,
                error_code=result.err_code or None,
                sub_error_code=result.sub_err_code or None,
                error_message=result.reason or None,
                request_id=result.request_id,
                invoke_id=result.invoke_id,
            )
    if not failed and said == "succeeded":
        prediction.status = "succeeded"  # the result call's own word, with the outputs, wins
    return proto.apply_result(prediction, result)


def next_poll_delay(
    prediction: Prediction | None,
    *,
    poll_interval: float,
    max_interval: float,
    elapsed: float | None = None,
    eta_rate: float | None = None,
) -> float:
    """Seconds until the next poll.

    When nothing is known, or the ETA has passed, poll every ``poll_interval``: that bounds detection
    latency just as a fixed interval would. Near the expected end, poll just after it. While the end is
    far, sleep ``FAR_FRACTION`` of the remaining time (never longer than ``max_interval``), so a wrong
    estimate is caught: an end that comes sooner than estimated by any share under ``FAR_FRACTION`` is
    still approached by a later poll, and one that comes later is met by polls every ``poll_interval``.
    The remaining time comes from the progress call's ``etaRelative`` or, before the first progress
    answer, from ``estimatedDurationInSeconds`` minus ``elapsed``.

    ``eta_rate`` is how fast the ETA fell between the last two answers, in seconds per second
    (:class:`PollLoop` measures it): an honest ETA falls by 1 each second, one that is 30 % too long by
    1.3. A rate above 1 shrinks the remaining time by that factor (at most ``MAX_ETA_RATE``); a rate below
    1 (a too-short ETA, or a queue) is not used to sleep longer than the ETA says.
    """
    remaining: float | None = None
    if prediction is not None:
        if prediction.eta_seconds is not None and prediction.status == "running":
            remaining = prediction.eta_seconds
            if eta_rate is not None and eta_rate > 1:
                remaining /= min(eta_rate, MAX_ETA_RATE)
        elif prediction.estimated_duration is not None and elapsed is not None:
            remaining = prediction.estimated_duration - elapsed
    if remaining is None or remaining <= 0:
        return poll_interval
    if remaining <= 2 * poll_interval:
        # Close to the end: aim just past the expected finish, so the finish is usually seen on the
        # first poll after it, but never wait longer than poll_interval (an ETA can be wrong).
        return min(poll_interval, max(remaining + ARRIVAL_MARGIN * poll_interval, poll_interval / 4))
    return max(poll_interval, min(remaining * FAR_FRACTION, max_interval))


def eta_trend(previous: tuple[float, float] | None, now: float, eta: float) -> float | None:
    """Seconds the ETA fell per second since ``previous`` (``(time, eta)`` of the last running answer),
    or ``None`` when there is no usable trend (no previous answer, too short apart, ETA not falling)."""
    if previous is None:
        return None
    then, before = previous
    if now - then < MIN_TREND_SECONDS or before <= eta:
        return None
    return (before - eta) / (now - then)


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
        not_found_grace: float | None = None,
    ) -> None:
        self.poll_interval = poll_interval
        self.max_interval = max(max_interval, poll_interval)
        self.deadline = deadline
        self.created_at = created_at
        self.estimated_duration = estimated_duration
        self.max_consecutive_errors = max_consecutive_errors
        # default: sit out "not found" for NOT_FOUND_GRACE when created_at is the creation time
        if not_found_grace is None:
            not_found_grace = NOT_FOUND_GRACE if created_at is not None else 0.0
        self.not_found_grace = not_found_grace
        self.errors = 0
        self.last_status: str | None = None
        self._last_eta: tuple[float, float] | None = None  # (now, ETA) of the last running answer
        self._backoff = RetryPolicy(
            attempts=max_consecutive_errors, delay=poll_interval, max_delay=self.max_interval, jitter=False
        )

    def _remaining(self, now: float) -> float | None:
        return None if self.deadline is None else self.deadline - now

    def poll_budget(self, now: float) -> float | None:
        """Seconds the next poll (requests, retries, backoff) may take: the time left before the deadline,
        but at least ``LAST_POLL_SECONDS``; ``None`` without a deadline."""
        remaining = self._remaining(now)
        return None if remaining is None else max(remaining, LAST_POLL_SECONDS)

    def _transient(self, error: BaseException, now: float) -> bool:
        if isinstance(error, SpeedPixNotFoundError) and self.created_at is not None:
            # just created: the status call may not know it yet
            return now - self.created_at < self.not_found_grace
        return should_retry(PROGRESS, error)

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
        rate = None
        if prediction.status == "running" and prediction.eta_seconds is not None:
            rate = eta_trend(self._last_eta, now, prediction.eta_seconds)
            self._last_eta = (now, prediction.eta_seconds)
        delay = next_poll_delay(
            prediction,
            poll_interval=self.poll_interval,
            max_interval=self.max_interval,
            elapsed=None if self.created_at is None else now - self.created_at,
            eta_rate=rate,
        )
        return Step("sleep", delay if remaining is None else min(delay, remaining))

    def failed(self, error: BaseException, now: float) -> Step:
        """A poll raised ``error`` (after the hook's own retries)."""
        if not self._transient(error, now):
            return Step("error", error=error)
        self.errors += 1
        if self.errors >= self.max_consecutive_errors:
            return Step("gave_up", error=error)
        delay = self._backoff.wait(self.errors)
        remaining = self._remaining(now)
        if remaining is not None and remaining <= delay:
            return Step("timeout", delay=max(remaining, 0), error=error)
        return Step("sleep", delay, error=error)
