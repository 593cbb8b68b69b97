"""SpeedPixBatchRunOperator through Airflow (``dag.test()``) against a real emulator over HTTP."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_speedpix.emulator.clock import Clock
from airflow_provider_speedpix.exceptions import SpeedPixConfigError, SpeedPixError
from airflow_provider_speedpix.hooks.speedpix import SpeedPixHook
from airflow_provider_speedpix.operators.batch import SpeedPixBatchRunOperator
from tests._helpers import with_upstream_value
from tests.conftest import FAST_RETRIES, use_emulator_connection
from tests.test_operator import PNG_MAGIC, ti_of, xcom

HEADER = """
from datetime import timedelta
import pendulum
from airflow.sdk import DAG, Asset
from airflow_provider_speedpix.operators.batch import SpeedPixBatchRunOperator
dag = DAG("DAG_ID", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False)
"""
SUMMARY_KEYS = {
    "total",
    "succeeded",
    "failed",
    "run_seconds",
    "predictions_created",
    "manifest",
    "output_dir",
}


@pytest.fixture
def batch_emulator(make_emulator, speedpix_conn, monkeypatch):
    """A private emulator on the real clock with 8 worker slots (a real FIFO queue) and short tasks."""
    emu = make_emulator(capacity=8, duration=0.3, clock=Clock())
    use_emulator_connection(monkeypatch, emu, **FAST_RETRIES)
    return emu


def batch_dag(out: Path, items: Any, **options: Any) -> str:
    args = {
        "workflow_id": "wf-white",
        "items": items,
        "output_dir": str(out),
        "max_in_flight": 8,
        "poll_interval": 0.1,
        "timeout": 60,
        **options,
    }
    raw = ("retries", "retry_delay", "outlets")
    rendered = ", ".join(f"{k}={v}" if k in raw else f"{k}={v!r}" for k, v in args.items())
    return HEADER + f"\nSpeedPixBatchRunOperator(task_id='batch', dag=dag, {rendered})\n"


def retried_batch_dag(out: Path, items: Any, **options: Any) -> str:
    """``batch_dag`` keyed by ``sku`` whose task is retried once, at once (for tests that kill a try)."""
    return batch_dag(
        out, items, item_id_field="sku", retries=1, retry_delay="timedelta(seconds=0)", **options
    )


def manifest(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def products(n: int, **extra: Any) -> list[dict]:
    return [{"sku": f"SKU-{i:03d}", "text": f"product {i}", **extra} for i in range(n)]


def patch_create(monkeypatch, wrapper):
    original = SpeedPixHook.create_prediction

    def create(self, workflow_id, inputs, **kwargs):
        return wrapper(lambda wf=workflow_id: original(self, wf, inputs, **kwargs), workflow_id, inputs)

    monkeypatch.setattr(SpeedPixHook, "create_prediction", create)


@pytest.mark.parametrize("deferrable", [True, False])
def test_happy_path_window_summary_manifest_files(run_dag, batch_emulator, tmp_path, deferrable, capsys):
    out = tmp_path / "out"
    dr = run_dag(
        batch_dag(
            out,
            products(30),
            item_id_field="sku",
            deferrable=deferrable,
            outlets="[Asset(name='batch_catalog', uri='file:///tmp/batch-catalog')]",
        )
    )
    assert dr.state == "success"
    summary = xcom(dr, "batch")
    assert set(summary) == SUMMARY_KEYS
    assert (summary["total"], summary["succeeded"], summary["failed"]) == (30, 30, 0)
    assert summary["predictions_created"] == 30
    assert summary["run_seconds"] == pytest.approx(30 * 0.27, abs=0.05)
    rows = manifest(summary["manifest"])
    assert summary["manifest"] == str(out / "manifest.jsonl")
    assert [r["item_id"] for r in rows] == [f"SKU-{i:03d}" for i in range(30)]
    assert {r["status"] for r in rows} == {"succeeded"}
    assert len({r["prediction_id"] for r in rows}) == 30
    for row in rows:
        [file] = row["files"]
        assert file == str(out / row["item_id"] / "images.png")
        assert Path(file).read_bytes()[:8] == PNG_MAGIC
    stats = batch_emulator.stats()
    assert stats["calls"]["comfy_prompt"] == 30 and stats["predictions"] == 30
    text = capsys.readouterr().out
    assert "Batch: " in text and "in flight" in text and "queued" in text
    assert not list(out.rglob("*.part"))  # atomic writes leave no partial files
    # the asset event carries the counts
    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session

    with create_session() as session:
        [event] = session.query(AssetEvent).filter_by(source_run_id=dr.run_id).all()
        assert event.extra["succeeded"] == 30 and event.extra["failed"] == 0


def test_the_window_is_never_exceeded(run_dag, batch_emulator, tmp_path, monkeypatch):
    """Never more than max_in_flight predictions unfinished at once (measured at every create)."""
    seen: list[int] = []
    live: set[str] = set()

    def wrapper(create, workflow_id, inputs):
        hook = SpeedPixHook()
        for pid in list(live):
            if hook.get_prediction(pid).finished:
                live.discard(pid)
        prediction = create()
        live.add(prediction.id)
        seen.append(len(live))
        return prediction

    patch_create(monkeypatch, wrapper)
    dr = run_dag(batch_dag(tmp_path / "out", products(20), max_in_flight=5, deferrable=False))
    assert dr.state == "success"
    assert max(seen) <= 5 and len(seen) == 20


@pytest.mark.parametrize("deferrable", [True, False])
def test_worker_dies_after_k_creates_retry_submits_only_the_rest(
    run_dag, batch_emulator, tmp_path, monkeypatch, deferrable
):
    """A try dies after its 10th create (each persisted right after it): the retry reconnects to those 10
    and submits only the other 20: exactly one comfy_prompt per item."""
    count = {"n": 0}

    def wrapper(create, workflow_id, inputs):
        count["n"] += 1
        if count["n"] == 11:
            raise SystemExit("worker killed")  # before the 11th create: like a kill between two creates
        return create()

    patch_create(monkeypatch, wrapper)
    dr = run_dag(retried_batch_dag(tmp_path / "out", products(30), max_in_flight=20, deferrable=deferrable))
    assert dr.state == "success"
    assert ti_of(dr, "batch").try_number == 2
    summary = xcom(dr, "batch")
    assert summary["succeeded"] == 30
    assert batch_emulator.stats()["calls"]["comfy_prompt"] == 30
    rows = manifest(summary["manifest"])
    assert all(r["attempts"] == 1 for r in rows)


def test_crash_after_persist_resubmits_nothing(run_dag, batch_emulator, tmp_path, monkeypatch):
    """Killed after a round's creates were all persisted (while polling): the retry creates nothing."""
    from airflow_provider_speedpix.operators import batch as batch_module

    died = {"done": False}
    original = batch_module.SpeedPixBatchRunOperator._wait_in_worker

    def wait(self):
        if not died["done"]:
            died["done"] = True
            raise SystemExit("worker killed while polling")
        return original(self)

    monkeypatch.setattr(batch_module.SpeedPixBatchRunOperator, "_wait_in_worker", wait)
    dr = run_dag(retried_batch_dag(tmp_path / "out", products(12), max_in_flight=20, deferrable=False))
    assert dr.state == "success"
    assert batch_emulator.stats()["calls"]["comfy_prompt"] == 12


def test_changed_request_is_never_reused(run_dag, batch_emulator, tmp_path, monkeypatch):
    """The items file changes between tries: the changed item gets a new prediction, the others are reused."""
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps(p) + "\n" for p in products(6)))
    killed = threading.Event()

    def wrapper(create, workflow_id, inputs):
        # The first try's create of the last item (one round of 6 creates on parallel threads, in no fixed
        # order): the try ends only once items 0-4 are created and persisted. The DAG's data changes and
        # the worker dies.
        if inputs["text"] == "product 5" and not killed.is_set():
            killed.set()
            lines = items.read_text().splitlines()
            lines[2] = json.dumps({"sku": "SKU-002", "text": "a different prompt"})
            items.write_text("\n".join(lines) + "\n")
            raise SystemExit("worker killed")
        return create()

    patch_create(monkeypatch, wrapper)
    dr = run_dag(retried_batch_dag(tmp_path / "out", str(items), deferrable=False))
    assert dr.state == "success"
    assert killed.is_set() and ti_of(dr, "batch").try_number == 2
    # 5 on the first try; the retry reuses 4, submits the changed item 2 and the never-submitted item 5
    assert batch_emulator.stats()["calls"]["comfy_prompt"] == 7
    tasks = batch_emulator.app.state.emulator.backend.tasks.values()
    assert sorted(t.inputs["text"] for t in tasks if t.inputs["text"].startswith("a different")) == [
        "a different prompt"
    ]


def failing_items(fail: set[int], n: int) -> list[dict]:
    return [{"sku": f"S{i}", "text": f"t{i}", **({"fail": True} if i in fail else {})} for i in range(n)]


def fail_marked(create, workflow_id, inputs):
    """Items marked ``fail`` run the emulator's failing workflow (the test's per-item fault)."""
    return create("wf-fail") if inputs.get("fail") else create()


@pytest.mark.parametrize(("max_failed", "expected"), [(2, "success"), (0.1, "success"), (1, "failed")])
def test_failure_policy(run_dag, batch_emulator, tmp_path, monkeypatch, max_failed, expected):
    patch_create(monkeypatch, fail_marked)
    out = tmp_path / "out"
    dr = run_dag(
        batch_dag(
            out, failing_items({3, 7}, 20), item_id_field="sku", max_failed_items=max_failed, deferrable=False
        )
    )
    assert dr.state == expected
    rows = manifest(str(out / "manifest.jsonl"))  # written in both cases
    failed = [r for r in rows if r["status"] == "failed"]
    assert [r["item_id"] for r in failed] == ["S3", "S7"]
    assert failed[0]["error_code"] == "WORKFLOW_EXECUTION_FAILED" and "KSampler" in failed[0]["message"]
    if expected == "success":
        summary = xcom(dr, "batch")
        assert (summary["succeeded"], summary["failed"]) == (18, 2)


@pytest.mark.parametrize("deferrable", [True, False])
def test_item_retries_resubmit_a_failed_prediction(
    run_dag, batch_emulator, tmp_path, monkeypatch, deferrable
):
    attempts: dict[str, int] = {}

    def flaky(create, workflow_id, inputs):
        attempts[inputs["text"]] = attempts.get(inputs["text"], 0) + 1
        if inputs.get("flaky") and attempts[inputs["text"]] <= 2:
            return create("wf-fail")  # fails twice, then succeeds
        return create()

    patch_create(monkeypatch, flaky)
    items = [{"text": f"t{i}", **({"flaky": True} if i in (1, 4) else {})} for i in range(8)]
    dr = run_dag(batch_dag(tmp_path / "out", items, item_retries=2, max_in_flight=4, deferrable=deferrable))
    assert dr.state == "success"
    summary = xcom(dr, "batch")
    assert (summary["succeeded"], summary["failed"]) == (8, 0)
    assert batch_emulator.stats()["calls"]["comfy_prompt"] == 8 + 2 * 2
    rows = {r["item_id"]: r for r in manifest(summary["manifest"])}
    assert rows["1"]["attempts"] == 3 and rows["0"]["attempts"] == 1


def test_item_retries_exhausted_count_as_failed(run_dag, batch_emulator, tmp_path, monkeypatch):
    patch_create(monkeypatch, fail_marked)
    dr = run_dag(
        batch_dag(
            tmp_path / "out", failing_items({0}, 3), item_retries=1, max_failed_items=1, deferrable=False
        )
    )
    assert dr.state == "success"
    assert batch_emulator.stats()["calls"]["comfy_prompt"] == 3 + 1
    rows = manifest(xcom(dr, "batch")["manifest"])
    assert rows[0]["status"] == "failed" and rows[0]["attempts"] == 2


@pytest.mark.parametrize("deferrable", [True, False])
def test_throttling_slows_down_never_fails(run_dag, batch_emulator, tmp_path, deferrable, capsys):
    # 429s beyond the hook's own retries (retry_limit=2 attempts): the 6 items' concurrent creates use up
    # 12 in the first round, which submits nothing and backs off; the next round submits all 6
    batch_emulator.inject("comfy_prompt", "429", times=12)
    dr = run_dag(
        batch_dag(
            tmp_path / "out", products(6), item_id_field="sku", poll_interval=0.2, deferrable=deferrable
        )
    )
    assert dr.state == "success"
    summary = xcom(dr, "batch")
    assert (summary["succeeded"], summary["failed"], summary["predictions_created"]) == (6, 0, 6)
    assert batch_emulator.stats()["faults_fired"]["comfy_prompt"]["429"] == 12
    assert "asked to slow down" in capsys.readouterr().out


def test_full_pool_backs_off_until_the_pool_frees(run_dag, batch_emulator, tmp_path, monkeypatch, capsys):
    batch_emulator.configure(full_pool_ids=["gpu-a"])
    refusals = {"n": 0}
    lock = threading.Lock()

    def wrapper(create, workflow_id, inputs):
        try:
            return create()
        except SpeedPixError:
            # the pool frees up after two refusals (counted as they happen: creates run concurrently)
            with lock:
                refusals["n"] += 1
                if refusals["n"] == 2:
                    batch_emulator.configure(full_pool_ids=[])
            raise

    patch_create(monkeypatch, wrapper)
    dr = run_dag(
        batch_dag(
            tmp_path / "out", products(4), resource_config_id="gpu-a", poll_interval=0.2, deferrable=False
        )
    )
    assert dr.state == "success"
    assert xcom(dr, "batch")["failed"] == 0
    assert "ResourcePoolFull" in capsys.readouterr().out


def test_csv_items_with_local_files_uploaded(run_dag, batch_emulator, tmp_path):
    from airflow_provider_speedpix.emulator.png import make_png

    image = tmp_path / "p.png"
    image.write_bytes(make_png(8, 8))
    csv_path = tmp_path / "items.csv"
    csv_path.write_text(f"sku,text,image\nA,red,{image}\nB,blue,{image}\n")
    dr = run_dag(batch_dag(tmp_path / "out", str(csv_path), item_id_field="sku", deferrable=False))
    assert dr.state == "success"
    rows = manifest(xcom(dr, "batch")["manifest"])
    assert [r["item_id"] for r in rows] == ["A", "B"]
    assert batch_emulator.stats()["calls"]["upload_put"] == 2


def test_state_is_forgotten_after_success(run_dag, batch_emulator, tmp_path):
    """A cleared task that had succeeded must generate anew: no key is left in task_state_store."""
    dr = run_dag(batch_dag(tmp_path / "out", products(3), deferrable=False))
    assert dr.state == "success"
    from airflow.utils.session import create_session

    try:
        from airflow.models.task_state_store import TaskStateStoreModel  # type: ignore[import-not-found]
    except ImportError:
        pytest.skip("task_state_store model not importable here")
    with create_session() as session:
        assert session.query(TaskStateStoreModel).filter_by(run_id=dr.run_id).count() == 0


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"output_dir": None}, "output_dir"),
        ({"max_in_flight": 0}, "max_in_flight"),
        ({"max_failed_items": 2.5}, "max_failed_items"),
        ({"item_retries": -1}, "item_retries"),
        ({"poll_interval": 0}, "poll_interval"),
        ({"items": None}, "items"),
    ],
)
def test_bad_parameters_fail_at_parse(options, needle):
    args = {"task_id": "b", "workflow_id": "wf", "items": [], "output_dir": "/tmp/x", **options}
    with pytest.raises(SpeedPixConfigError, match=needle):
        SpeedPixBatchRunOperator(**args)


def test_batch_example_dag(example_dags_folder, speedpix_conn, tmp_path):
    from tests.conftest import CATALOG
    from tests.test_example_dags import load, products_csv

    csv_path = products_csv(tmp_path / "products.csv", 5)
    dag = load(example_dags_folder, "speedpix_catalog_regeneration_batch")
    dr = dag.test(run_conf={"products_csv": str(csv_path)})
    assert dr.state == "success"
    summary = xcom(dr, "regenerate_catalog")
    assert (summary["total"], summary["succeeded"]) == (5, 5)
    run_folder = dr.run_id.replace(":", "_").replace("+", "_")
    files = sorted((CATALOG / run_folder).rglob("images.png"))
    assert [f.parent.name for f in files] == ["P0", "P1", "P2", "P3", "P4"]
    assert (CATALOG / run_folder / "manifest.jsonl").exists()
    assert speedpix_conn.stats()["calls"]["comfy_prompt"] == 5


# ---------------------------------------------------------------------- values resolved at runtime (XComArg)
def test_workflow_id_and_items_from_upstream_tasks_import_and_run(run_dag, batch_emulator, tmp_path):
    """`workflow_id=upstream.output` and `items=upstream.output` must not fail the DAG's import: the values
    exist only at runtime, where they are checked."""
    out = tmp_path / "out"
    dr = run_dag(
        HEADER
        + f"""
from airflow.providers.standard.operators.python import PythonOperator

with dag:
    pick = PythonOperator(task_id="pick", python_callable=lambda: "wf-white")
    rows = PythonOperator(
        task_id="rows", python_callable=lambda: [{{"sku": f"S{{i}}", "text": f"t{{i}}"}} for i in range(4)]
    )
    SpeedPixBatchRunOperator(task_id="batch", workflow_id=pick.output, items=rows.output, item_id_field="sku",
        output_dir={str(out)!r}, max_in_flight=2, deferrable=True, poll_interval=0.1, timeout=60)
"""
    )
    assert dr.state == "success"
    summary = xcom(dr, "batch")
    assert (summary["total"], summary["succeeded"]) == (4, 4)
    assert [r["item_id"] for r in manifest(summary["manifest"])] == ["S0", "S1", "S2", "S3"]
    tasks = batch_emulator.app.state.emulator.backend.tasks.values()
    assert sorted(t.workflow_id for t in tasks) == ["wf-white"] * 4


def test_workflow_id_from_upstream_is_checked_when_the_task_runs(run_dag, batch_emulator, tmp_path, capsys):
    """What an XComArg resolves to is checked before anything is uploaded or billed."""
    batch = (
        'SpeedPixBatchRunOperator(task_id="batch", workflow_id=value, items=[{"text": "x"}], '
        f"output_dir={str(tmp_path / 'out')!r}, deferrable=False, poll_interval=0.1)"
    )
    dr = run_dag(HEADER + with_upstream_value('""', batch))
    assert dr.state == "failed"
    assert batch_emulator.stats()["calls"].get("comfy_prompt", 0) == 0
    assert "workflow_id" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"workflow_id": ""}, "workflow_id"),
        ({"alias_id": "main", "version_id": "v1"}, "either `alias_id`"),
    ],
)
def test_literal_references_still_fail_at_parse(options, needle):
    args = {"task_id": "b", "workflow_id": "wf", "items": [], "output_dir": "/tmp/x", **options}
    with pytest.raises(SpeedPixConfigError, match=needle):
        SpeedPixBatchRunOperator(**args)


class DictStateStore:
    """``task_state_store`` as a dict (what survives between execute and execute_complete)."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def get(self, key: str) -> Any:
        return self.values.get(key)

    def set(self, key: str, value: Any) -> None:
        self.values[key] = json.loads(json.dumps(value))

    def delete(self, key: str) -> None:
        self.values.pop(key, None)


def test_due_predictions_are_collected_in_the_same_round(make_emulator, speedpix_conn, monkeypatch, tmp_path):
    """The trigger saw one of two finish and listed the other as due (ending within moments): on resume the
    worker reads the due one too, and the batch finishes in that round instead of deferring again."""
    from airflow.providers.common.compat.sdk import TaskDeferred

    emu = make_emulator(duration=1.0)  # a manual clock: nothing ends until advanced
    use_emulator_connection(monkeypatch, emu, **FAST_RETRIES)
    context: dict[str, Any] = {"task_state_store": DictStateStore()}

    def operator() -> SpeedPixBatchRunOperator:  # a fresh instance per entry point, as on a worker
        return SpeedPixBatchRunOperator(
            task_id="batch", workflow_id="wf-white", items=products(2), item_id_field="sku",
            output_dir=str(tmp_path / "out"), max_in_flight=2, deferrable=True,
        )  # fmt: skip

    with pytest.raises(TaskDeferred) as deferred:
        operator().execute(context)
    first, second = deferred.value.trigger.prediction_ids
    emu.clock.advance(2)
    event = {"status": "success", "finished": {first: "succeeded"}, "due": [second], "pending": 1}
    summary = operator().execute_complete(context, event)
    assert (summary["succeeded"], summary["total"]) == (2, 2)
    assert emu.stats()["calls"]["comfy_prompt"] == 2
    assert sorted(p.parent.name for p in (tmp_path / "out").rglob("*.png")) == ["SKU-000", "SKU-001"]

    # a due prediction that has not ended yet stays in flight: the worker defers again for it
    context = {"task_state_store": DictStateStore()}
    with pytest.raises(TaskDeferred) as deferred:
        operator().execute(context)
    first, second = deferred.value.trigger.prediction_ids
    emu.clock.advance(0.5)
    event = {"status": "success", "finished": {}, "due": [first, second], "pending": 2}
    with pytest.raises(TaskDeferred) as deferred:
        operator().execute_complete(context, event)
    assert deferred.value.trigger.prediction_ids == [first, second]
