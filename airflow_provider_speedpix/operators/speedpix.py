"""SpeedPixRunOperator: run a published SpeedPix workflow and keep its outputs."""

from __future__ import annotations

import time
from collections.abc import Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.providers.common.compat.sdk import BaseOperator, conf

from airflow_provider_speedpix import _metrics
from airflow_provider_speedpix._fingerprint import request_changes, request_record
from airflow_provider_speedpix._inputs import check_strategy
from airflow_provider_speedpix._outcome import (
    DEFER_GRACE,
    MAX_CONSECUTIVE_ERRORS,
    ProgressKey,
    check_event,
    check_positive,
    check_reference_at_parse,
    defer_to_trigger,
    describe_closing,
    describe_finished,
    log_progress,
    prediction_from_event,
    raise_for_event,
    raise_for_prediction,
)
from airflow_provider_speedpix._outputs import instance_output_base, output_files_plan
from airflow_provider_speedpix._protocol import (
    Prediction,
    check_workflow_reference,
    iso,
    without_signatures,
)
from airflow_provider_speedpix.exceptions import (
    SpeedPixConfigError,
    SpeedPixNotFoundError,
    SpeedPixPredictionFailed,
)
from airflow_provider_speedpix.hooks.speedpix import DEFAULT_POLL_INTERVAL, SpeedPixHook
from airflow_provider_speedpix.links import OPERATOR_LINKS, persist_links

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Context

#: task_state_store key holding the prediction of the current (unfinished) task instance.
STATE_KEY = "speedpix_prediction"
#: Longest wait for a prediction, seconds per try (not per request: see the hook's ``REQUEST_TIMEOUT``).
WAIT_TIMEOUT = 3600.0
#: Old name of :data:`WAIT_TIMEOUT`, kept for callers that import it.
DEFAULT_TIMEOUT = WAIT_TIMEOUT
__all__ = [
    "DEFAULT_TIMEOUT",
    "DEFER_GRACE",
    "STATE_KEY",
    "WAIT_TIMEOUT",
    "SpeedPixRunOperator",
    "output_files_plan",
]


class SpeedPixRunOperator(BaseOperator):
    """Run a published SpeedPix workflow: submit, wait (on the triggerer by default), save the outputs.

    Local files in ``inputs`` are uploaded from the worker before it defers, and outputs are downloaded on
    the worker after it resumes: the triggerer never needs the worker's disk. The prediction id is kept in
    ``task_state_store`` (Airflow 3.3+) with a fingerprint of the request, so a retry reconnects to a running
    or finished prediction instead of paying for a second one, but only when it was made from the same
    request (a changed DAG submits anew). Returns ``{"prediction_id", "status", "output", "images", "files",
    "run_seconds", "started_at", "finished_at"}`` (README, "Return value"): ``output`` is the custom
    result (None when the workflow has no custom output fields), ``images`` the default output's URLs;
    these URLs are temporary, ``files`` are the saved copies.

    :param workflow_id: the published workflow's id.
    :param inputs: the workflow's input fields; local paths, ``Path``, ``ObjectStoragePath`` and file
        objects are uploaded (or inlined with ``file_encoding_strategy="base64"``). Templated, nested.
    :param alias_id: version alias (``main`` when neither alias nor version is given).
    :param version_id: pin a version instead of an alias.
    :param resource_config_id: dedicated compute; else the connection's, else shared compute.
    :param randomise_seeds: ask the workflow to randomise its seeds.
    :param return_temp_files: also return intermediate files (e.g. ``subject_image``, ``mask_image``).
    :param file_encoding_strategy: ``url`` (upload, default) or ``base64`` (inline, up to 1 MiB per file).
    :param wait_for_completion: False: submit and return the prediction id at once.
    :param deferrable: wait on the triggerer (frees the worker slot). Default:
        ``[operators] default_deferrable``.
    :param poll_interval: seconds between status polls near the expected end.
    :param timeout: longest wait for the prediction, seconds per try (``None``: no limit).
    :param max_consecutive_errors: failed status polls in a row (each already retried) that the wait sits
        out before failing, on the triggerer and on a worker alike.
    :param output_dir: local directory or object-storage URI / ``ObjectStoragePath`` to save every output
        file into (streamed). ``None``: nothing is downloaded. Instances sharing it get a folder of their
        own in it (``<map_index>/`` for ``.partial(output_dir=...)``, ``<task_id>/`` for tasks given the
        same one): README, "Where files are saved".
    :param speedpix_conn_id: the SpeedPix connection.
    """

    template_fields: Sequence[str] = (
        "workflow_id",
        "inputs",
        "alias_id",
        "version_id",
        "resource_config_id",
        "output_dir",
        "speedpix_conn_id",
    )
    template_fields_renderers: ClassVar[dict[str, str]] = {"inputs": "json"}
    #: ``output_dir`` as given to the constructor (before rendering); see ``_outputs.instance_output_base``.
    _output_dir_as_written: Any = None
    ui_color = "#ff9f43"
    #: "SpeedPix outputs" and "SpeedPix console", stored in XCom before the task defers (``links.py``)
    operator_extra_links = OPERATOR_LINKS

    def __init__(
        self,
        *,
        workflow_id: str,
        inputs: dict[str, Any] | None = None,
        alias_id: str | None = None,
        version_id: str | None = None,
        resource_config_id: str | None = None,
        randomise_seeds: bool | None = None,
        return_temp_files: bool | None = None,
        file_encoding_strategy: str = "url",
        wait_for_completion: bool = True,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        timeout: float | None = WAIT_TIMEOUT,
        max_consecutive_errors: int = MAX_CONSECUTIVE_ERRORS,
        output_dir: Any = None,
        speedpix_conn_id: str = SpeedPixHook.default_conn_name,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.workflow_id = workflow_id
        self.inputs = inputs if inputs is not None else {}
        self.alias_id = alias_id
        self.version_id = version_id
        self.resource_config_id = resource_config_id
        self.randomise_seeds = randomise_seeds
        self.return_temp_files = return_temp_files
        self.file_encoding_strategy = check_strategy(file_encoding_strategy)
        check_reference_at_parse(workflow_id, alias_id, version_id)  # literal values fail the DAG's import
        self.wait_for_completion = wait_for_completion
        self.deferrable = deferrable
        self.poll_interval = check_positive("poll_interval", poll_interval)
        self.timeout = None if timeout is None else check_positive("timeout", timeout)
        self.max_consecutive_errors = max_consecutive_errors
        self.output_dir = output_dir
        # kept unrendered: tells task instances sharing an output_dir apart (_output_base)
        self._output_dir_as_written = output_dir
        self.speedpix_conn_id = speedpix_conn_id
        self._last_progress: ProgressKey | None = None
        self._state: dict[str, Any] = {}
        # what OpenLineage reports (_lineage.run_lineage): the last finished prediction seen, the saved files
        self._last_prediction: Prediction | None = None
        self._saved_files: list[str] = []

    @cached_property
    def hook(self) -> SpeedPixHook:
        return SpeedPixHook(speedpix_conn_id=self.speedpix_conn_id)

    # ------------------------------------------------------------------ execute
    def execute(self, context: Context) -> Any:
        store = context.get("task_state_store")
        self._persist_links(context)
        record = self._request_record()  # rendered values, before any upload
        prediction = self._resume(store, record)
        if prediction is None:
            prediction = self.hook.create_prediction(self.workflow_id, self.inputs, **self._request_options())
            self._state = {
                "prediction_id": prediction.id,
                "created_at": time.time(),
                "estimated_duration": prediction.estimated_duration,
                **record,
            }
            if store is not None:
                store.set(STATE_KEY, self._state)
            _metrics.created(self.workflow_id)
        # Published at once (a new try starts with empty XCom, so a resumed prediction is published too).
        context["ti"].xcom_push(key="prediction_id", value=prediction.id)
        if not self.wait_for_completion:
            self._forget(store)
            return prediction.id
        if prediction.finished:
            return self._finish(context, raise_for_prediction(prediction))
        if self.deferrable:
            self._defer(prediction)
        self.log.info(
            "Waiting for prediction %s in this worker (deferrable=False): the task holds a worker slot "
            "until it finishes. Use deferrable=True to wait on the triggerer instead.",
            prediction.id,
        )
        try:
            finished = self.hook.wait_for_prediction(
                prediction.id,
                poll_interval=self.poll_interval,
                timeout=self.timeout,
                on_update=self._log_progress,
                estimated_duration=prediction.estimated_duration,
                max_consecutive_errors=self.max_consecutive_errors,
            )
        except SpeedPixPredictionFailed as err:
            self._report(Prediction(id=err.prediction_id, status=err.status or "failed"))
            raise
        return self._finish(context, finished)

    def execute_complete(
        self,
        context: Context,
        event: dict[str, Any] | None = None,
        deferred_prediction_id: str | None = None,
    ) -> Any:
        """Resume on the worker after the trigger fired: check the event, download, return. The event
        carries outputs (unsigned), default images and timing; only a download reads the result again, for
        fresh signed URLs."""
        store = context.get("task_state_store")
        saved = store.get(STATE_KEY) if store is not None else None
        self._state = saved if isinstance(saved, dict) else {}
        # The prediction this try deferred on: passed along with the deferral (next_kwargs), else the stored
        # one (a deferral made by 0.1.0). An event about any other prediction is refused.
        expected = deferred_prediction_id or self._state.get("prediction_id")
        event = check_event(event, prediction_id=expected if isinstance(expected, str) else None)
        if event["status"] == "failed":
            self._report(prediction_from_event(event))
        event = raise_for_event(event, timeout=self.timeout)
        prediction = prediction_from_event(event)
        if self.output_dir and (prediction.output is not None or prediction.images):
            # The event's URLs carry no signature (Airflow logs and keeps events); read fresh ones.
            prediction = self.hook.get_prediction(prediction.id)
            raise_for_prediction(prediction)
        return self._finish(context, prediction)

    # ------------------------------------------------------------------ steps
    def _request_record(self) -> dict[str, Any]:
        """Check the rendered request (templates and XComArgs are only known now) and return its
        fingerprint and readable parts (:func:`request_record`), computed before anything is uploaded."""
        check_workflow_reference(self.workflow_id, alias_id=self.alias_id, version_id=self.version_id)
        if not isinstance(self.inputs, dict):
            raise SpeedPixConfigError(
                f"`inputs` must be a dict of the workflow's input fields, got {type(self.inputs).__name__} "
                f"({self.inputs!r:.100}); check the template or XCom it comes from."
            )
        for name in ("resource_config_id", "alias_id", "version_id"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise SpeedPixConfigError(f"`{name}` must be a string or None, got {value!r:.100}.")
        return request_record(self.workflow_id, self.inputs, **self._request_options())

    def _request_options(self) -> dict[str, Any]:
        """Everything but the workflow id and inputs that decides what a prediction does: what is sent,
        and what its fingerprint covers (one list for both)."""
        return {
            "alias_id": self.alias_id,
            "version_id": self.version_id,
            "resource_config_id": self.resource_config_id,
            "randomise_seeds": self.randomise_seeds,
            "return_temp_files": self.return_temp_files,
            "file_encoding_strategy": self.file_encoding_strategy,
        }

    def _resume(self, store: Any, record: dict[str, Any]) -> Prediction | None:
        """A retry picks up the prediction of an earlier try instead of paying for a new one, but only one
        made from the same request: after the DAG changed (and the task was cleared) it would be the wrong
        images."""
        if store is None:
            self.log.warning(
                "task_state_store is not available (Airflow < 3.3): a retry of this task submits a new "
                "prediction even if an earlier try's prediction is still running."
            )
            return None
        saved = store.get(STATE_KEY)
        if not isinstance(saved, dict) or not saved.get("prediction_id"):
            return None
        if saved.get("fingerprint") != record["fingerprint"]:
            changes = request_changes(saved.get("request"), record["request"])
            why = (
                f"({', '.join(changes)})"
                if changes
                else "(kept without a record of its request, by an older provider version)"
                if not saved.get("fingerprint")
                else "(options or inputs changed)"
            )
            self.log.warning(
                "Prediction %s from an earlier try was made from a different request %s; submitting a new one.",
                saved["prediction_id"],
                why,
            )
            return None
        self._state = saved
        try:
            prediction = self.hook.get_prediction(saved["prediction_id"])
        except SpeedPixNotFoundError:
            self.log.warning(
                "Prediction %s from an earlier try is unknown to SpeedPix (expired?); submitting a new one.",
                saved["prediction_id"],
            )
            return None
        if prediction.status in ("waiting", "running"):
            self.log.info(
                "Reconnecting to prediction %s from an earlier try (%s).", prediction.id, prediction.status
            )
        elif prediction.succeeded:
            self.log.info(
                "Prediction %s from an earlier try already succeeded; not submitting again.", prediction.id
            )
        else:
            self.log.warning(
                "Prediction %s from an earlier try ended %s (%s); submitting a new one.",
                prediction.id,
                prediction.status,
                prediction.error,
            )
            return None
        prediction.estimated_duration = saved.get("estimated_duration")
        return prediction

    def _defer(self, prediction: Prediction) -> None:
        self.log.info(
            "Deferring: prediction %s is polled by the triggerer; this worker slot is freed.", prediction.id
        )
        self.defer(
            **defer_to_trigger(
                prediction.id,
                speedpix_conn_id=self.speedpix_conn_id,
                poll_interval=self.poll_interval,
                timeout=self.timeout,
                created_at=self._state.get("created_at", time.time()),
                estimated_duration=prediction.estimated_duration,
                max_consecutive_errors=self.max_consecutive_errors,
            ),
            kwargs={"deferred_prediction_id": prediction.id},
        )

    def _finish(self, context: Context, prediction: Prediction) -> dict[str, Any]:
        store = context.get("task_state_store")
        self._last_prediction = prediction
        self.log.info("Prediction %s %s", prediction.id, describe_finished(prediction))
        if not self._state.get("reported"):  # a retry after a failed download does not count it again
            self._report(prediction)
            if store is not None and self._state.get("prediction_id"):
                self._state["reported"] = True
                store.set(STATE_KEY, self._state)
        files: list[str] = []
        self._saved_files = files  # for lineage: what is saved, even before a failed download
        if self.output_dir:
            plan = output_files_plan(prediction.output, self._output_base(context), prediction.images)
            for where, url, destination in plan:
                saved = self.hook.download(url, destination)
                self.log.info("Saved %s to %s", where, saved)
                files.append(str(saved))
        elif prediction.output is None and prediction.images:
            self.log.info(
                "The workflow returned its output as %d default image URL(s) in `images` (temporary URLs): "
                "set output_dir to keep the files.",
                len(prediction.images),
            )
        self._forget(store)
        self.log.info("%s", describe_closing(prediction, self._state.get("created_at"), files))
        return {
            "prediction_id": prediction.id,
            "status": prediction.status,
            "output": without_signatures(prediction.output),
            "images": without_signatures(list(prediction.images)),
            "files": files,
            "run_seconds": prediction.run_seconds,
            "started_at": iso(prediction.started_at),
            "finished_at": iso(prediction.finished_at),
        }

    def _output_base(self, context: Context) -> Any:
        return instance_output_base(self, context)

    def _report(self, prediction: Prediction) -> None:
        """Metrics for a terminal state seen on this worker (``docs/metrics.md``)."""
        self._last_prediction = prediction
        created_at = self._state.get("created_at")
        _metrics.finished(
            prediction,
            workflow_id=self.workflow_id,
            submitted_at=created_at if isinstance(created_at, int | float) else None,
        )

    def _forget(self, store: Any) -> None:
        """Done: a later clear/re-run of this task must generate anew, not reuse this prediction."""
        if store is not None:
            store.delete(STATE_KEY)

    def _log_progress(self, prediction: Prediction) -> None:
        self._last_progress = log_progress(self.log, prediction, self._last_progress)

    def _persist_links(self, context: Context) -> None:
        """The extra links' URLs, in XCom before anything is submitted or deferred (``links.py``)."""
        saves = self.output_dir and self.wait_for_completion
        persist_links(
            context,
            output_location=self._output_base(context) if saves else None,
            endpoint=lambda: self.hook.settings.endpoint,
        )

    # ------------------------------------------------------------------ OpenLineage
    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        """Input files, saved files and the ``speedpixPrediction`` run facet (docs/operators.md,
        "OpenLineage"). Called by the OpenLineage provider's listener when it is installed."""
        from airflow_provider_speedpix._lineage import run_lineage

        return run_lineage(self)

    def get_openlineage_facets_on_failure(self, task_instance: Any) -> Any:
        """As on completion: the facet then names the failed prediction, its status and error code."""
        from airflow_provider_speedpix._lineage import run_lineage

        return run_lineage(self)

    def on_kill(self) -> None:
        """SpeedPix has no cancel call: say so, with the id, so a person can follow up."""
        prediction_id = self._state.get("prediction_id")
        self.log.warning(
            "Task killed. SpeedPix has no cancel API: prediction %s (if it was submitted) keeps running and "
            "billing until it finishes. A retry of this task reconnects to it.",
            prediction_id or "(see log above)",
        )
