"""SpeedPixBatchRunOperator: one task runs a whole catalog with a rolling window of predictions."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from datetime import timedelta
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.providers.common.compat.sdk import BaseOperator, conf

from airflow_provider_speedpix import _batch, _metrics, _storage
from airflow_provider_speedpix._batch import BatchState, Item
from airflow_provider_speedpix._fingerprint import request_fingerprint
from airflow_provider_speedpix._inputs import check_strategy, is_object_storage_path
from airflow_provider_speedpix._outcome import DEFER_GRACE, MAX_CONSECUTIVE_ERRORS, check_positive
from airflow_provider_speedpix._protocol import CREATE, PROGRESS, Prediction, check_workflow_reference
from airflow_provider_speedpix._retry import should_retry
from airflow_provider_speedpix.exceptions import (
    SpeedPixAuthError,
    SpeedPixConfigError,
    SpeedPixError,
    SpeedPixInputError,
    SpeedPixNotFoundError,
)
from airflow_provider_speedpix.hooks.speedpix import DEFAULT_POLL_INTERVAL, SpeedPixHook
from airflow_provider_speedpix.operators.speedpix import WAIT_TIMEOUT, output_files_plan
from airflow_provider_speedpix.triggers.batch import LOST, SpeedPixBatchTrigger

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Context

__all__ = ["MANIFEST_NAME", "SpeedPixBatchRunOperator"]

#: Shortest deferral (see ``min_defer_seconds``).
MIN_DEFER_SECONDS = 10.0
#: The manifest's file name under ``output_dir``.
MANIFEST_NAME = "manifest.jsonl"


def _templated(value: Any) -> bool:
    return isinstance(value, str) and "{{" in value


def _join(directory: Any, name: str) -> Any:
    if isinstance(directory, str | os.PathLike) and not is_object_storage_path(directory):
        text = os.fspath(directory)
        if "://" in text:
            from airflow.sdk import ObjectStoragePath

            return ObjectStoragePath(text) / name
        return Path(text).expanduser() / name
    return directory / name


class SpeedPixBatchRunOperator(BaseOperator):
    """Run one published SpeedPix workflow over many items in one task, ``max_in_flight`` at a time.

    The worker submits up to ``max_in_flight`` predictions (uploading local files from the worker),
    records each prediction id in ``task_state_store`` right after its create, and waits, on the
    triggerer by default (:class:`~airflow_provider_speedpix.triggers.batch.SpeedPixBatchTrigger`, which
    only reads) or in the worker (``deferrable=False``). Each time enough of the window finished it saves
    their outputs to ``<output_dir>/<item_id>/`` (the single operator's file names), submits more, and
    waits again. At the end it writes ``<output_dir>/manifest.jsonl`` (one JSON row per item: ``item_id``,
    ``prediction_id``, ``status``, ``files``, ``run_seconds``, ``attempts``, ``error_code``, ``message``)
    atomically and returns a summary (XCom): ``{"total", "succeeded", "failed", "run_seconds",
    "predictions_created", "manifest", "output_dir"}``. Asset outlets get an event with the counts.

    A retry of the task (or a worker or triggerer killed at any point) never submits an item again whose
    prediction exists and is running or succeeded, unless the item's request changed (its fingerprint);
    failed items get new predictions on a new try. Throttling and full resource pools slow submission down
    (back off, try again later); they never fail an item.

    :param workflow_id: the published workflow's id (one workflow for all items).
    :param items: a list of input dicts, or a ``.csv`` / ``.jsonl`` file path or ``ObjectStoragePath``
        (one item per row; every column except ``item_id_field`` is an input). Templated.
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
    :param min_defer_seconds: shortest deferral (deferrable only). A trigger that fires within a few
        seconds of the deferral can resume the task before the scheduler has processed the executor's
        report of the deferring process; Airflow 3.3 then takes the report for an external state change
        and fails the try ("finished with state success, but the task instance's state attribute is
        queued"), seen on a loaded 2-core machine with 5 s rounds. A retry resumes the batch without
        resubmitting anything, but a floor of 10 s avoids the spurious retry. ``0`` in tests.
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
        min_defer_seconds: float = MIN_DEFER_SECONDS,
        speedpix_conn_id: str = SpeedPixHook.default_conn_name,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if (
            isinstance(min_defer_seconds, bool)
            or not isinstance(min_defer_seconds, int | float)
            or (min_defer_seconds < 0)
        ):
            raise SpeedPixConfigError(
                f"`min_defer_seconds` must be a number of seconds >= 0, got {min_defer_seconds!r}."
            )
        self.min_defer_seconds = float(min_defer_seconds)
        if output_dir is None or output_dir == "":
            raise SpeedPixConfigError(
                "`output_dir` is required for SpeedPixBatchRunOperator: output URLs are temporary, so every "
                "item's files and the manifest are saved there. Pass a local directory or an object-storage "
                "URI, e.g. output_dir='s3://aws_default@bucket/catalog/{{ run_id }}'."
            )
        if items is None:
            raise SpeedPixConfigError(
                "`items` is required: a list of input dicts, or a .csv / .jsonl file path or ObjectStoragePath."
            )
        self.workflow_id = workflow_id
        self.items = items
        self.output_dir = output_dir
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
        if not any(_templated(v) for v in (workflow_id, alias_id, version_id)):
            check_workflow_reference(workflow_id, alias_id=alias_id, version_id=version_id)
        self.deferrable = deferrable
        self.poll_interval = check_positive("poll_interval", poll_interval)
        self.timeout = None if timeout is None else check_positive("timeout", timeout)
        self.max_consecutive_errors = max_consecutive_errors
        self.speedpix_conn_id = speedpix_conn_id
        self._state: BatchState | None = None
        self._store: Any = None
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
        self._setup(context, new_try=True)
        return self._run(context, None)

    def execute_complete(self, context: Context, event: dict[str, Any] | None = None) -> Any:
        """Resume after the trigger fired: read each finished prediction, save, top up, wait again."""
        self._setup(context, new_try=False)
        if not isinstance(event, dict) or event.get("status") not in ("success", "error"):
            raise SpeedPixError(f"Unexpected event from SpeedPixBatchTrigger: {event!r:.300}")
        if event["status"] == "error":
            code = f" [{event['error_code']}]" if event.get("error_code") else ""
            raise SpeedPixError(
                f"Waiting for the batch's predictions failed{code}: {event.get('message')}. A retry of this "
                "task reconnects to every recorded prediction."
            )
        finished = event.get("finished")
        return self._run(context, self._read_finished(finished if isinstance(finished, dict) else {}))

    # ------------------------------------------------------------------ setup and persistence
    def _load_rows(self) -> list[Any]:
        items = self.items
        if isinstance(items, str | os.PathLike) or is_object_storage_path(items):
            text_path = os.fspath(items) if isinstance(items, str | os.PathLike) else str(items)
            if is_object_storage_path(items) or "://" in text_path:
                from airflow.sdk import ObjectStoragePath

                source = items if is_object_storage_path(items) else ObjectStoragePath(text_path)
                text = source.read_text(encoding="utf-8")
            else:
                try:
                    text = Path(text_path).expanduser().read_text(encoding="utf-8")
                except OSError as err:
                    raise SpeedPixConfigError(
                        f"`items`: cannot read {text_path!r} ({err.strerror}). Pass a readable .csv / .jsonl "
                        "file or a list of input dicts."
                    ) from None
            return _batch.parse_items_text(text, text_path)
        if isinstance(items, dict):
            raise SpeedPixConfigError("`items` must be a list of input dicts (one per item), not one dict.")
        try:
            return list(items)
        except TypeError:
            raise SpeedPixConfigError(
                f"`items` must be a list of input dicts or a file path, got {type(items).__name__}."
            ) from None

    def _fingerprint(self, item: Item) -> str:
        return _batch.short_fingerprint(
            request_fingerprint(
                self.workflow_id,
                item.inputs,
                alias_id=self.alias_id,
                version_id=self.version_id,
                resource_config_id=self.resource_config_id,
                randomise_seeds=self.randomise_seeds,
                return_temp_files=self.return_temp_files,
                file_encoding_strategy=self.file_encoding_strategy,
            )
        )

    def _setup(self, context: Context, *, new_try: bool) -> None:
        items = _batch.build_items(self._load_rows(), self.item_id_field)
        if not items:
            self.log.warning("`items` is empty: nothing to run.")
        self._state = BatchState(items, max_in_flight=self.max_in_flight, item_retries=self.item_retries)
        self._fingerprints = {item.item_id: self._fingerprint(item) for item in items}
        self._store = context.get("task_state_store")
        now = time.time()
        if self._store is None:
            self.log.warning(
                "task_state_store is not available (Airflow < 3.3): a retry of this task submits every item "
                "again, and deferrable=True cannot keep the batch's state between rounds."
            )
            if self.deferrable:
                raise SpeedPixConfigError(
                    "SpeedPixBatchRunOperator with deferrable=True needs task_state_store (Airflow 3.3+); "
                    "use deferrable=False on older Airflow."
                )
        else:
            meta = self._store.get(_batch.META_KEY)
            self._meta = dict(meta) if isinstance(meta, dict) else {}
            for chunk in range(_batch.chunk_count(len(items))):
                changed = self.state.load_chunk(
                    self._store.get(_batch.state_key(chunk)), self._fingerprints, new_try=new_try
                )
                for item_id in changed:
                    self.log.warning(
                        "Item %s changed since its stored prediction was made (another request): not reusing "
                        "it; submitting anew.",
                        item_id,
                    )
        self._meta.setdefault("created", 0)
        self._meta.setdefault("throttled", 0)
        if new_try:
            counts = self.state.counts()
            self._meta.update(try_started_at=now, done_at_start=counts.done)
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
        """Write the chunks that changed (or ``chunks``) and the small meta key."""
        if self._store is None:
            self.state.dirty.clear()
            return
        for chunk in sorted(self.state.dirty if chunks is None else chunks):
            self._store.set(_batch.state_key(chunk), self.state.chunk_value(chunk))
            self.state.dirty.discard(chunk)
        if chunks is None:
            self._store.set(_batch.META_KEY, self._meta)

    # ------------------------------------------------------------------ the loop
    def _run(self, context: Context, finished: dict[str, Any] | None) -> Any:
        while True:
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

    def _read_finished(self, finished: dict[str, str]) -> dict[str, Any]:
        """The worker reads every prediction the trigger saw finish (the event carries no URLs)."""
        read: dict[str, Any] = {}
        for prediction_id, status in finished.items():
            if status == LOST:
                read[prediction_id] = LOST
                continue
            try:
                read[prediction_id] = self.hook.get_prediction(prediction_id)
            except SpeedPixNotFoundError:
                read[prediction_id] = LOST
        return read

    def _collect(self, finished: dict[str, Any]) -> None:
        """Record finished predictions: save a success's files, resubmit or fail a failure."""
        by_pid = {self.state.states[i.item_id].prediction_id: i for i in self.state.in_flight()}
        for prediction_id, prediction in finished.items():
            item = by_pid.get(prediction_id)
            if item is None:
                continue
            if prediction == LOST:
                self.log.warning(
                    "Item %s: prediction %s is unknown to SpeedPix (expired?); submitting anew.",
                    item.item_id,
                    prediction_id,
                )
                self.state.lost(item.item_id)
            else:
                self._record(item, prediction)

    def _record(self, item: Item, prediction: Prediction) -> None:
        state = self.state.states[item.item_id]
        _metrics.finished(prediction, workflow_id=self.workflow_id, submitted_at=state.created_at)
        if prediction.succeeded:
            directory = _join(self.output_dir, _batch.item_folder(item.item_id))
            files = []
            for _where, url, destination in output_files_plan(
                prediction.output, directory, prediction.images
            ):
                files.append(str(self.hook.download(url, destination)))
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
        if self.timeout is None:
            return
        now = time.time()
        for item in self.state.in_flight():
            state = self.state.states[item.item_id]
            if not state.prediction_id or state.created_at is None or state.created_at + self.timeout > now:
                continue
            read = self._read_finished({state.prediction_id: "finished"})
            prediction = read.get(state.prediction_id)
            if isinstance(prediction, Prediction) and prediction.finished:
                self._collect(read)
            elif prediction == LOST:
                self.state.lost(item.item_id)
            else:
                self.log.warning(
                    "Item %s: prediction %s did not finish within %g s; recorded as timeout (not resubmitted).",
                    item.item_id,
                    state.prediction_id,
                    self.timeout,
                )
                self.state.timed_out(item.item_id, self.timeout)

    def _check_failures(self) -> None:
        counts = self.state.counts()
        limit = _batch.failure_limit(self.max_failed_items, counts.total)
        if counts.failed <= limit:
            return
        self._save()
        manifest = self._write_manifest()
        raise SpeedPixError(
            f"{counts.failed} of {counts.total} items failed, more than max_failed_items="
            f"{self.max_failed_items!r} allows ({limit}). Each item's error is in the manifest {manifest}. "
            "A retry of this task reconnects to predictions in flight and submits the failed items anew."
        )

    def _top_up(self) -> None:
        """Submit queued items until the window is full; a throttle or a full pool ends this round."""
        while (item := self.state.next_to_submit()) is not None:
            if self._wake_at is not None and time.time() < self._wake_at:
                return
            try:
                prediction = self.hook.create_prediction(
                    self.workflow_id,
                    item.inputs,
                    alias_id=self.alias_id,
                    version_id=self.version_id,
                    resource_config_id=self.resource_config_id,
                    randomise_seeds=self.randomise_seeds,
                    return_temp_files=self.return_temp_files,
                    file_encoding_strategy=self.file_encoding_strategy,
                )
            except SpeedPixError as err:
                if _batch.is_backpressure(err):
                    self._meta["throttled"] = int(self._meta.get("throttled") or 0) + 1
                    delay = _batch.backoff_delay(self._meta["throttled"], self.poll_interval)
                    self._wake_at = time.time() + delay
                    self.log.warning(
                        "SpeedPix asked to slow down (%s); %d in flight, next submission in %.0f s.",
                        getattr(err, "error_code", None) or type(err).__name__,
                        self.state.counts().in_flight,
                        delay,
                    )
                    return
                if isinstance(err, SpeedPixAuthError) or (
                    isinstance(err, SpeedPixNotFoundError) and getattr(err, "operation", None) == CREATE
                ):
                    raise  # every item would fail the same way; recorded predictions are kept
                retry = not isinstance(err, SpeedPixInputError)  # an input error repeats on every try
                self.state.states[item.item_id].attempts += 1
                self.state.failed(item.item_id, getattr(err, "error_code", None), str(err), retry=retry)
                self.log.warning("Item %s: submitting failed: %s", item.item_id, err)
                self._save({item.chunk})
                continue
            self.state.submitted(item.item_id, prediction.id, self._fingerprints[item.item_id], time.time())
            self._save({item.chunk})  # before the next create: a crash now never submits this item again
            self._meta["created"] = int(self._meta.get("created") or 0) + 1
            self._meta["throttled"] = 0
            _metrics.created(self.workflow_id)

    def _wake_time(self) -> float | None:
        """When the worker must look again even if nothing finished: after a backoff, or when the first
        in-flight item reaches its timeout."""
        candidates = [self._wake_at] if self._wake_at is not None else []
        if self.timeout is not None:
            candidates += [
                (self.state.states[i.item_id].created_at or time.time()) + self.timeout
                for i in self.state.in_flight()
            ]
        return min(candidates) if candidates else None

    def _defer(self) -> None:
        ids = [self.state.states[i.item_id].prediction_id or "" for i in self.state.in_flight()]
        wake_at = self._wake_time()
        self.defer(
            trigger=SpeedPixBatchTrigger(
                prediction_ids=ids,
                min_finished=self.state.resume_threshold(),
                speedpix_conn_id=self.speedpix_conn_id,
                poll_interval=self.poll_interval,
                max_poll_interval=max(self.poll_interval * 12, 60.0),
                wake_at=wake_at,
                not_before=time.time() + self.min_defer_seconds if self.min_defer_seconds else None,
                max_consecutive_errors=self.max_consecutive_errors,
            ),
            method_name="execute_complete",
            timeout=None
            if wake_at is None
            else timedelta(seconds=max(0.0, wake_at - time.time()) + DEFER_GRACE),
        )

    def _wait_in_worker(self) -> dict[str, Any]:
        """deferrable=False: poll the window from this worker until something finished or it is time to
        submit again (the same accounting as the trigger, without a resume's cost: threshold 1)."""
        error_rounds = 0
        last_error: SpeedPixError | None = None
        while True:
            wake_at = self._wake_time()
            delay = self.poll_interval if wake_at is None else min(self.poll_interval, wake_at - time.time())
            time.sleep(max(0.0, delay))
            finished: dict[str, Any] = {}
            failures = 0
            in_flight = self.state.in_flight()
            for item in in_flight:
                prediction_id = self.state.states[item.item_id].prediction_id or ""
                try:
                    prediction = self.hook.get_prediction(prediction_id)
                except SpeedPixNotFoundError:
                    finished[prediction_id] = LOST
                    continue
                except SpeedPixError as err:
                    if not should_retry(PROGRESS, err):
                        raise
                    failures += 1
                    last_error = err
                    continue
                if prediction.finished:
                    finished[prediction_id] = prediction
            error_rounds = error_rounds + 1 if in_flight and failures == len(in_flight) else 0
            if error_rounds >= self.max_consecutive_errors and last_error is not None:
                raise last_error
            if finished or (wake_at is not None and time.time() >= wake_at):
                if self._wake_at is not None and time.time() >= self._wake_at:
                    self._wake_at = None
                return finished

    # ------------------------------------------------------------------ results
    def _log_progress(self) -> None:
        counts = self.state.counts()
        key = (counts.done, counts.failed, counts.in_flight, counts.queued)
        if key == self._last_progress:
            return
        self._last_progress = key
        self.log.info(
            "Batch: %s",
            _batch.describe_counts(
                counts,
                started_at=self._meta.get("try_started_at"),
                done_at_start=int(self._meta.get("done_at_start") or 0),
                now=time.time(),
            ),
        )

    def _write_manifest(self) -> str:
        target = _join(self.output_dir, MANIFEST_NAME)
        data = self.state.manifest_bytes()
        target = _storage.resolve_destination(MANIFEST_NAME, target)
        _storage.write_stream(iter([data]), target, expected_size=len(data))
        return str(target)

    def _finish(self, context: Context) -> dict[str, Any]:
        counts = self.state.counts()
        manifest = self._write_manifest()
        summary = {
            "total": counts.total,
            "succeeded": counts.succeeded,
            "failed": counts.failed,
            "run_seconds": self.state.total_run_seconds(),
            "predictions_created": int(self._meta.get("created") or 0),
            "manifest": manifest,
            "output_dir": str(self.output_dir),
        }
        self.log.info(
            "Batch finished: %d succeeded, %d failed of %d items (%g s of SpeedPix run time); manifest %s",
            counts.succeeded,
            counts.failed,
            counts.total,
            summary["run_seconds"],
            manifest,
        )
        self._emit_asset_events(context, summary)
        if self._store is not None:  # done: a cleared task must generate anew, not reuse these
            for chunk in range(_batch.chunk_count(counts.total)):
                self._store.delete(_batch.state_key(chunk))
            self._store.delete(_batch.META_KEY)
        return summary

    def _emit_asset_events(self, context: Context, summary: dict[str, Any]) -> None:
        from airflow.sdk import Asset

        extra = {k: summary[k] for k in ("total", "succeeded", "failed", "run_seconds", "manifest")}
        for outlet in self.outlets or ():
            if isinstance(outlet, Asset):
                context["outlet_events"][outlet].extra = extra

    def on_kill(self) -> None:
        """SpeedPix has no cancel call: say what keeps running; a retry reconnects to it."""
        in_flight = self.state.counts().in_flight if self._state is not None else "some"
        self.log.warning(
            "Task killed. SpeedPix has no cancel API: %s predictions in flight keep running and billing until "
            "they finish. A retry of this task reconnects to them (their ids are in task_state_store).",
            in_flight,
        )
