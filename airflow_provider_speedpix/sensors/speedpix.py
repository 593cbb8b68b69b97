"""SpeedPixPredictionSensor: wait for a prediction that was started elsewhere."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.sdk import (
    AirflowSensorTimeout,
    AirflowSkipException,
    BaseSensorOperator,
    PokeReturnValue,
    conf,
)

from airflow_provider_speedpix import _metrics, _outcome
from airflow_provider_speedpix._protocol import Prediction, without_signatures
from airflow_provider_speedpix.exceptions import SpeedPixPredictionFailed, SpeedPixTimeoutError
from airflow_provider_speedpix.hooks.speedpix import SpeedPixHook

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Context


class SpeedPixSensorError(RuntimeError):
    """Waiting failed for another reason than the prediction's own failure or the timeout (the trigger's
    ``error`` event: credentials refused, unknown prediction, too many failed polls).

    Deliberately not an ``AirflowException``: in deferrable mode Airflow turns every ``AirflowException``
    from ``execute_complete`` into a skip when ``soft_fail`` is set, while poke mode fails on the same
    error. The original ``SpeedPixError`` is its ``__cause__``.
    """


class SpeedPixPredictionSensor(BaseSensorOperator):
    """Wait until a SpeedPix prediction finishes; return its output (the result dict with its URLs; for a
    workflow without custom output fields, its default images as ``{"images": [url, ...]}``).

    Use it for a prediction submitted by ``SpeedPixRunOperator(wait_for_completion=False)`` or by another
    system. A failed prediction raises :class:`SpeedPixPredictionFailed` with the API's code and message.
    ``timeout`` (the sensor's) bounds the wait. With ``soft_fail=True`` a failed prediction or a timeout
    skips the task, in both modes; any other error (credentials, unknown prediction, too many failed
    polls) still fails it (in deferrable mode as :class:`SpeedPixSensorError`).

    :param prediction_id: the prediction to wait for (templated).
    :param speedpix_conn_id: the SpeedPix connection.
    :param deferrable: wait on the triggerer instead of poking from a worker. Default:
        ``[operators] default_deferrable``.
    """

    template_fields: Sequence[str] = ("prediction_id", "speedpix_conn_id")
    ui_color = "#ffd3a3"

    def __init__(
        self,
        *,
        prediction_id: str,
        speedpix_conn_id: str = SpeedPixHook.default_conn_name,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("poke_interval", 5.0)
        super().__init__(**kwargs)
        _outcome.check_positive("poke_interval", float(self.poke_interval))
        self.prediction_id = prediction_id
        self.speedpix_conn_id = speedpix_conn_id
        self.deferrable = deferrable
        self._last_progress: _outcome.ProgressKey | None = None

    @cached_property
    def hook(self) -> SpeedPixHook:
        return SpeedPixHook(speedpix_conn_id=self.speedpix_conn_id)

    def execute(self, context: Context) -> Any:
        if not self.deferrable:
            return super().execute(context)
        result = self.poke(context)
        if result:
            return result.xcom_value if isinstance(result, PokeReturnValue) else None
        self.defer(
            **_outcome.defer_to_trigger(
                self.prediction_id,
                speedpix_conn_id=self.speedpix_conn_id,
                poll_interval=float(self.poke_interval),
                timeout=float(self.timeout),
            )
        )

    def poke(self, context: Context) -> PokeReturnValue | bool:
        prediction = self.hook.get_prediction(self.prediction_id)
        if not prediction.finished:
            self._last_progress = _outcome.log_progress(self.log, prediction, self._last_progress)
            return False
        self._finished(prediction)
        try:
            _outcome.raise_for_prediction(prediction)
        except SpeedPixPredictionFailed as err:
            if self.soft_fail:
                raise AirflowSkipException(str(err)) from err
            raise
        return PokeReturnValue(is_done=True, xcom_value=without_signatures(prediction.output_or_images))

    def execute_complete(self, context: Context, event: dict[str, Any] | None = None) -> Any:
        """Resume after the trigger fired. ``soft_fail`` skips only a failed prediction or a timeout, as in
        poke mode: any other end of the wait (an ``error`` event, an unreadable event) fails the task,
        raised as :class:`SpeedPixSensorError`, which Airflow's ``resume_execution`` does not turn into a
        skip (it skips on any ``AirflowException``)."""
        if (
            isinstance(event, dict)
            and event.get("status") in ("success", "failed")
            and event.get("prediction_id")
        ):
            self._finished(_outcome.prediction_from_event(event))
        try:
            event = _outcome.raise_for_event(event, timeout=float(self.timeout))
            return _outcome.prediction_from_event(event).output_or_images  # unsigned in the event already
        except SpeedPixTimeoutError as err:
            # as in poke mode: a timed-out sensor fails for good; a retry would restart the whole wait
            raise AirflowSensorTimeout(str(err)) from err
        except SpeedPixPredictionFailed:
            raise  # soft_fail: skipped by the sensor base class, as poke() skips it
        except Exception as err:
            if getattr(self, "never_fail", False):
                raise AirflowSkipException(f"Skipping due to never_fail: {err}") from err
            raise SpeedPixSensorError(str(err)) from err

    def _finished(self, prediction: Prediction) -> None:
        """Log the terminal state and emit its metrics (the workflow id only where the service names it)."""
        self.log.info("Prediction %s %s", prediction.id, _outcome.describe_finished(prediction))
        _metrics.finished(prediction)
