"""SpeedPixBatchRunOperator: one task runs a whole catalog with a rolling window of predictions.

The operator is the worker's round: read what finished, save it, top the window up, wait (defer or poll).
Items come from :mod:`_batch_items`, the state machine is :mod:`_batch`, what survives a retry is kept by
:mod:`_batch_store`, the manifest and summary are :mod:`_batch_manifest`, and the wait on the triggerer is
:class:`~airflow_provider_speedpix.triggers.batch.SpeedPixBatchTrigger`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.providers.common.compat.sdk import BaseOperator, conf

from airflow_provider_speedpix import _batch, _batch_manifest, _batch_wait, _metrics
from airflow_provider_speedpix._batch import BatchState, Item
from airflow_provider_speedpix._batch_items import build_items, load_rows
from airflow_provider_speedpix._batch_manifest import MANIFEST_NAME
from airflow_provider_speedpix._batch_store import BatchStore, ChunkWriter
from airflow_provider_speedpix._batch_wait import LOST
from airflow_provider_speedpix._concurrency import CONCURRENCY, concurrently
from airflow_provider_speedpix._fingerprint import request_fingerprint
from airflow_provider_speedpix._inputs import check_strategy
from airflow_provider_speedpix._outcome import (
    DEFER_GRACE,
    MAX_CONSECUTIVE_ERRORS,
    check_positive,
    check_reference_at_parse,
    hold_until,
)
from airflow_provider_speedpix._outputs import output_files_plan
from airflow_provider_speedpix._protocol import Prediction, check_workflow_reference
from airflow_provider_speedpix.exceptions import SpeedPixError
from airflow_provider_speedpix.hooks.speedpix import DEFAULT_POLL_INTERVAL, SpeedPixHook
from airflow_provider_speedpix.links import OPERATOR_LINKS, persist_links
from airflow_provider_speedpix.operators.speedpix import WAIT_TIMEOUT
from airflow_provider_speedpix.triggers.batch import SpeedPixBatchTrigger

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Context

__all__ = ["MANIFEST_NAME", "SpeedPixBatchRunOperator"]


class SpeedPixBatchRunOperator(BaseOperator):
    """Run one published SpeedPix workflow over many items in one task, ``max_in_flight`` at a time.

    The worker submits up to ``max_in_flight`` predictions (local files uploaded from the worker),
    records each id in ``task_state_store`` right after its create, and waits (on the triggerer by
    default, read-only); each time enough of the window finished it saves their files to
    ``<output_dir>/<item_id>/``, submits more and waits again. At the end it writes
    ``<output_dir>/manifest.jsonl`` (one JSON row per item) atomically and returns a summary: ``{"total",
    "succeeded", "failed", "run_seconds", "predictions_created", "manifest", "output_dir"}``; Asset
    outlets get an event with the counts. A retry (or a worker or triggerer killed at any point) never
    submits an item again whose prediction exists and is running or succeeded, unless its request
    changed; throttling and full resource pools slow submission down, never fail an item. docs/batch.md
    has the details.

    :param workflow_id: the published workflow's id (one workflow for all items). Templated; an XComArg
        works too.
    :param items: a list of input dicts, or a ``.csv`` / ``.jsonl`` file path or ``ObjectStoragePath``
        (one item per row; every column except ``item_id_field`` is an input). Templated; an XComArg
        works too.
    :param item_id_field: the field holding each item's id (removed from its inputs); ``None``: the
        item's position (``0``, ``1``...). Ids name output folders and manifest rows.
    :param max_in_flight: predictions running at once (the window); match your SpeedPix concurrency.
    :param output_dir: local directory or object-storage URI / ``ObjectStoragePath`` for the outputs and
        the manifest (required: output URLs are temporary).
    :param max_failed_items: failed items tolerated: a count (``int``) or a fraction of all items
        (``float`` 0..1). More fails the task (after writing the manifest); fewer are reported.
    :param item_retries: new predictions for an item whose prediction failed, before it counts as failed.
    :param deferrable: wait on the triggerer between rounds. Default: ``[operators] default_deferrable``.
    :param poll_interval: seconds between status polls near the expected end.
    :param timeout: longest wait for one item's prediction, seconds from its create (``None``: no limit);
        an item past it is recorded ``timeout`` (not resubmitted: it may still run).
    :param max_consecutive_errors: polling rounds in a row in which every poll failed before giving up.
    :param speedpix_conn_id: the SpeedPix connection.

    ``alias_id``, ``version_id``, ``resource_config_id``, ``randomise_seeds``, ``return_temp_files`` and
    ``file_encoding_strategy`` are :class:`SpeedPixRunOperator`'s and apply to every item.
    """

    template_fields: Sequence[str] = (
        "workflow_id",
        "items",
        "alias_id",
        "version_id",
        "resource_config_id",
        "output_dir",
        "speedpix_conn_id",
    )
    template_fields_renderers: ClassVar[dict[str, str]] = {"items": "json"}
    ui_color = "#ff9f43"
    #: "SpeedPix outputs" (output_dir) and "SpeedPix console", stored in XCom before the task defers
    operator_extra_links = OPERATOR_LINKS

    def __init__(
        self,
        *,
        workflow_id: str,
        items: Any,
        output_dir: Any,
        item_id_field: str | None = None,
        max_in_flight: int = 10,
        max_failed_items: int | float = 0,
        item_retries: int = 0,
        alias_id: str | None = None,
        version_id: str | None = None,
        resource_config_id: str | None = None,
        randomise_seeds: bool | None = None,
        return_temp_files: bool | None = None,
        file_encoding_strategy: str = "url",
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        timeout: float | None = WAIT_TIMEOUT,
        max_consecutive_errors: int = MAX_CONSECUTIVE_ERRORS,
        speedpix_conn_id: str = SpeedPixHook.default_conn_name,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_reference_at_parse(workflow_id, alias_id, version_id)  # literal values fail the DAG's import
        self.workflow_id = workflow_id
        self.items = _batch.check_items(items)
        self.output_dir = _batch.check_output_dir(output_dir)
        self.item_id_field = item_id_field
        self.max_in_flight = _batch.check_window(max_in_flight)
        self.max_failed_items = _batch.check_max_failed(max_failed_items)
        self.item_retries = _batch.check_item_retries(item_retries)
        self.alias_id = alias_id
        self.version_id = version_id
        self.resource_config_id = resource_config_id
        self.randomise_seeds = randomise_seeds
        self.return_temp_files = return_temp_files
        self.file_encoding_strategy = check_strategy(file_encoding_strategy)
        self.deferrable = deferrable
        self.poll_interval = check_positive("poll_interval", poll_interval)
        self.timeout = None if timeout is None else check_positive("timeout", timeout)
        self.max_consecutive_errors = max_consecutive_errors
        self.speedpix_conn_id = speedpix_conn_id
        self._state: BatchState | None = None
        self._store: BatchStore  # set by _setup
        self._fingerprints: dict[str, str] = {}
        self._meta: dict[str, Any] = {}
        self._wake_at: float | None = None
        self._last_progress: tuple[int, ...] | None = None

    @cached_property
    def hook(self) -> SpeedPixHook:
        return SpeedPixHook(speedpix_conn_id=self.speedpix_conn_id)

    @property
    def state(self) -> BatchState:
        assert self._state is not None  # set by _setup
        return self._state

    # ------------------------------------------------------------------ entry points
    def execute(self, context: Context) -> Any:
        self._persist_links(context)
        self._setup(context, new_try=True)
        return self._run(context, None)

    def execute_complete(self, context: Context, event: dict[str, Any] | None = None) -> Any:
        """Resume after the trigger fired: read each finished prediction, save, top up, wait again."""
        self._setup(context, new_try=False)
        finished, due = _batch_wait.finished_of(event)
        read = _batch_wait.read_finished(self.hook, finished)
        # the trigger expected these to end within moments: most have by now, and are collected in this
        # round instead of holding their window slots until the next one
        read.update(_batch_wait.read_due(self.hook, due))
        return self._run(context, read)

    # ------------------------------------------------------------------ setup
    def _options(self) -> dict[str, Any]:
        """The run options every item's request carries (its fingerprint hashes the same ones)."""
        names = ("alias_id", "version_id", "resource_config_id", "randomise_seeds", "return_temp_files")
        return {name: getattr(self, name) for name in (*names, "file_encoding_strategy")}

    def _setup(self, context: Context, *, new_try: bool) -> None:
        # the rendered values (templates and XComArgs are only known now), before anything is billed
        check_workflow_reference(self.workflow_id, alias_id=self.alias_id, version_id=self.version_id)
        items = build_items(load_rows(self.items), self.item_id_field)
        if not items:
            self.log.warning("`items` is empty: nothing to run.")
        self._state = BatchState(items, max_in_flight=self.max_in_flight, item_retries=self.item_retries)
        options = self._options()
        self._fingerprints = {
            item.item_id: _batch.short_fingerprint(
                request_fingerprint(self.workflow_id, item.inputs, **options)
            )
            for item in items
        }
        self._store = BatchStore(context.get("task_state_store"), self.log, deferrable=self.deferrable)
        self._meta = self._store.load(self.state, self._fingerprints, new_try=new_try)
        self._meta.setdefault("created", 0)
        self._meta.setdefault("throttled", 0)
        if new_try:
            counts = self.state.counts()
            self._meta.update(try_started_at=time.time(), done_at_start=counts.done)
            self.log.info(
                "Batch of %d items, window %d: %d done and %d in flight from an earlier try (reconnected, "
                "not resubmitted), %d to submit.",
                counts.total,
                self.max_in_flight,
                counts.done,
                counts.in_flight,
                counts.queued,
            )
        self._save()

    def _save(self, chunks: set[int] | None = None) -> None:
        """Write the chunks that changed (or ``chunks``); the meta key too unless ``chunks`` is given."""
        self._store.save(self.state, self._meta if chunks is None else None, chunks)

    # ------------------------------------------------------------------ the round
    def _run(self, context: Context, finished: dict[str, Any] | None) -> Any:
        while True:
            if finished and all(isinstance(p, Prediction) and p.succeeded for p in finished.values()):
                # their slots are free: SpeedPix starts on the next items while this worker saves files
                self.state.has_ended(finished)
                self._top_up()
            if finished:
                self._collect(finished)
            self._expire_overdue()
            self._check_failures()
            if self.state.all_done():
                return self._finish(context)
            self._top_up()
            self._log_progress()
            self._save()
            if self.state.all_done():
                return self._finish(context)
            if self.deferrable:
                self._defer()
            finished = self._wait_in_worker()

    def _collect(self, finished: dict[str, Any]) -> None:
        """Record finished predictions: save the successes' files (``CONCURRENCY`` downloads at a
        time), resubmit or fail a failure."""
        by_pid = {self.state.states[i.item_id].prediction_id: i for i in self.state.in_flight()}
        done = [(by_pid[pid], prediction) for pid, prediction in finished.items() if pid in by_pid]
        succeeded = [(item, p) for item, p in done if isinstance(p, Prediction) and p.succeeded]
        self.hook.get_conn()
        saved = concurrently(lambda pair: self._download(*pair), succeeded)
        for files in saved:
            if isinstance(files, BaseException):
                raise files  # nothing recorded is lost: a retry reads these predictions again
        files_of = {item.item_id: files for (item, _p), files in zip(succeeded, saved, strict=True)}
        for item, prediction in done:
            if prediction == LOST:
                self.log.warning(
                    "Item %s: prediction %s is unknown to SpeedPix (expired?); submitting anew.",
                    item.item_id,
                    self.state.states[item.item_id].prediction_id,
                )
                self.state.lost(item.item_id)
            else:
                self._record(item, prediction, files_of.get(item.item_id, []))

    def _download(self, item: Item, prediction: Prediction) -> list[str]:
        directory = _batch_manifest.item_directory(self.output_dir, item.item_id)
        plan = output_files_plan(prediction.output, directory, prediction.images)
        return [str(self.hook.download(url, destination)) for _where, url, destination in plan]

    def _record(self, item: Item, prediction: Prediction, files: list[str]) -> None:
        state = self.state.states[item.item_id]
        _metrics.finished(prediction, workflow_id=self.workflow_id, submitted_at=state.created_at)
        if prediction.succeeded:
            self.state.succeeded(item.item_id, files, prediction.run_seconds)
            return
        retry = self.state.failed(item.item_id, prediction.error_code, prediction.error or prediction.status)
        self.log.warning(
            "Item %s: prediction %s %s [%s] %s (attempt %d of %d)%s",
            item.item_id,
            prediction.id,
            prediction.status,
            prediction.error_code or "-",
            prediction.error or "",
            state.attempts,
            self.item_retries + 1,
            "; submitting it again" if retry else "",
        )

    def _expire_overdue(self) -> None:
        for item in self.state.overdue(self.timeout, time.time()):
            prediction_id = self.state.states[item.item_id].prediction_id or ""
            read = _batch_wait.read_finished(self.hook, {prediction_id: "finished"})
            prediction = read.get(prediction_id)
            if isinstance(prediction, Prediction) and prediction.finished:
                self._collect(read)
            elif prediction == LOST:
                self.state.lost(item.item_id)
            else:
                self.log.warning(
                    "Item %s: prediction %s did not finish within %g s; recorded as timeout (not resubmitted).",
                    item.item_id,
                    prediction_id,
                    self.timeout,
                )
                self.state.timed_out(item.item_id, self.timeout)

    def _check_failures(self) -> None:
        counts = self.state.counts()
        limit = _batch.failure_limit(self.max_failed_items, counts.total)
        if counts.failed <= limit:
            return
        self._save()
        manifest = _batch_manifest.write_manifest(self.state, self.output_dir)
        raise SpeedPixError(
            f"{counts.failed} of {counts.total} items failed, more than max_failed_items="
            f"{self.max_failed_items!r} allows ({limit}). Each item's error is in the manifest {manifest}. "
            "A retry of this task reconnects to predictions in flight and submits the failed items anew."
        )

    def _top_up(self) -> None:
        """Submit queued items until the window is full, ``CONCURRENCY`` creates at a time. Each
        thread has its item's id saved before it creates again (saves that overlap go out as one write),
        so, as in the single operator, only the instant between a create and its save can be lost; a
        throttle or a full pool ends this round."""
        options = self._options()
        self.hook.get_conn()  # one session (and its connection pool) for the threads below
        writer = ChunkWriter(self._store, self.state)

        def submit(item: Item) -> Prediction:
            prediction = self.hook.create_prediction(self.workflow_id, item.inputs, **options)
            fingerprint = self._fingerprints[item.item_id]
            version = writer.change(
                lambda: self.state.submitted(item.item_id, prediction.id, fingerprint, time.time())
            )
            writer.save(item.chunk, version)  # before this thread's next create: never submitted twice
            return prediction

        while group := self.state.next_group(CONCURRENCY):
            if self._wake_at is not None and time.time() < self._wake_at:
                return
            slow_down: BaseException | None = None
            abort: BaseException | None = None
            failed: set[int] = set()
            for item, outcome in zip(group, concurrently(submit, group), strict=True):
                if isinstance(outcome, Prediction):
                    self._meta["created"] = int(self._meta.get("created") or 0) + 1
                    self._meta["throttled"] = 0
                    _metrics.created(self.workflow_id)
                    continue
                said = _batch.create_failure(outcome) if isinstance(outcome, SpeedPixError) else "abort"
                if said == "abort":
                    abort = abort or outcome  # every item would fail the same way; recorded ones are kept
                elif said == "slow_down":
                    slow_down = slow_down or outcome  # not submitted: the item stays queued
                else:
                    self.state.states[item.item_id].attempts += 1
                    retry = said == "retry"
                    self.state.failed(
                        item.item_id, getattr(outcome, "error_code", None), str(outcome), retry=retry
                    )
                    self.log.warning("Item %s: submitting failed: %s", item.item_id, outcome)
                    failed.add(item.chunk)
            if failed:
                self._save(failed)
            if abort is not None:
                raise abort
            if slow_down is not None:
                self._meta["throttled"] = int(self._meta.get("throttled") or 0) + 1
                delay = _batch.backoff_delay(self._meta["throttled"], self.poll_interval)
                self._wake_at = time.time() + delay
                self.log.warning(
                    "SpeedPix asked to slow down (%s); %d in flight, next submission in %.0f s.",
                    getattr(slow_down, "error_code", None) or type(slow_down).__name__,
                    self.state.counts().in_flight,
                    delay,
                )
                return

    def _wake_time(self) -> float | None:
        return self.state.wake_time(self.timeout, self._wake_at, time.time())

    def _defer(self) -> None:
        wake_at = self._wake_time()
        self.defer(
            trigger=SpeedPixBatchTrigger(
                prediction_ids=self.state.in_flight_ids(),
                min_finished=self.state.resume_threshold(),
                speedpix_conn_id=self.speedpix_conn_id,
                poll_interval=self.poll_interval,
                max_poll_interval=max(self.poll_interval * 12, 60.0),
                wake_at=wake_at,
                not_before=hold_until(),
                max_consecutive_errors=self.max_consecutive_errors,
            ),
            method_name="execute_complete",
            timeout=None
            if wake_at is None
            else timedelta(seconds=max(0.0, wake_at - time.time()) + DEFER_GRACE),
        )

    def _wait_in_worker(self) -> dict[str, Any]:
        """deferrable=False: poll the window from this worker until something finished or it is time to
        submit again (the trigger's rules without a resume's cost: threshold 1)."""
        error_rounds = 0
        while True:
            wake_at = self._wake_time()
            delay = self.poll_interval if wake_at is None else min(self.poll_interval, wake_at - time.time())
            time.sleep(max(0.0, delay))
            ids = self.state.in_flight_ids()
            polled = _batch_wait.poll_round(self.hook, ids, wake_at=wake_at)
            error_rounds = error_rounds + 1 if ids and polled.failures == len(ids) else 0
            if error_rounds >= self.max_consecutive_errors and polled.last_error is not None:
                raise polled.last_error
            if polled.finished or (wake_at is not None and time.time() >= wake_at):
                if self._wake_at is not None and time.time() >= self._wake_at:
                    self._wake_at = None
                return polled.finished

    # ------------------------------------------------------------------ results
    def _log_progress(self) -> None:
        counts = self.state.counts()
        key = (counts.done, counts.failed, counts.in_flight, counts.queued)
        if key == self._last_progress:
            return
        self._last_progress = key
        started_at, done_at_start = self._meta.get("try_started_at"), self._meta.get("done_at_start")
        text = _batch.describe_counts(
            counts, started_at=started_at, done_at_start=int(done_at_start or 0), now=time.time()
        )
        self.log.info("Batch: %s", text)

    def _finish(self, context: Context) -> dict[str, Any]:
        manifest = _batch_manifest.write_manifest(self.state, self.output_dir)
        created = int(self._meta.get("created") or 0)
        summary = _batch_manifest.summary(
            self.state, created=created, manifest=manifest, output_dir=self.output_dir
        )
        self.log.info(
            "Batch finished: %d succeeded, %d failed of %d items (%g s of SpeedPix run time); manifest %s",
            summary["succeeded"],
            summary["failed"],
            summary["total"],
            summary["run_seconds"],
            manifest,
        )
        _batch_manifest.add_asset_extra(context, self.outlets, summary)
        self._store.forget(summary["total"])  # done: a cleared task must generate anew, not reuse these
        return summary

    def _persist_links(self, context: Context) -> None:
        """The extra links' URLs, in XCom before anything is submitted or deferred (``links.py``)."""
        persist_links(context, output_location=self.output_dir, endpoint=lambda: self.hook.settings.endpoint)

    # ------------------------------------------------------------------ OpenLineage
    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        """Input files (the catalog's and the items'), ``output_dir`` and the ``speedpixBatch`` run facet
        with the counts (docs/batch.md, "Lineage and links"). Called by the OpenLineage provider's
        listener when it is installed."""
        from airflow_provider_speedpix._lineage import batch_lineage

        return batch_lineage(self, finished=True)

    def get_openlineage_facets_on_failure(self, task_instance: Any) -> Any:
        """As on completion, with the counts so far; the manifest only when one was written."""
        from airflow_provider_speedpix._lineage import batch_lineage

        return batch_lineage(self, finished=False)

    def on_kill(self) -> None:
        """SpeedPix has no cancel call: say what keeps running; a retry reconnects to it."""
        in_flight = self.state.counts().in_flight if self._state is not None else "some"
        self.log.warning(
            "Task killed. SpeedPix has no cancel API: %s predictions in flight keep running and billing until "
            "they finish. A retry of this task reconnects to them (their ids are in task_state_store).",
            in_flight,
        )
