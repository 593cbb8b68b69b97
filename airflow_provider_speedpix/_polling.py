"""How long to wait before the next status poll. Pure; shared by the sync wait and the trigger."""

from __future__ import annotations

from airflow_provider_speedpix._protocol import Prediction

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
