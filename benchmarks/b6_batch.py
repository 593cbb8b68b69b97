"""B6: one SpeedPixBatchRunOperator task against N mapped deferrable SpeedPixRunOperator tasks.

On the e2e deployment (``tests/e2e/deployment.py``: scheduler, triggerer, LocalExecutor with 4 slots, on
SQLite), with the emulator's ``--capacity`` equal to the window (a real FIFO queue): N items of S seconds
as one batch task (window W, deferrable) and as N mapped deferrable tasks, run one after the other on the
same deployment. Reports each run's wall time (dag run start to end, from the metadata DB), the ratio
mapped / batch (goal >= 10x at N=1,000, W=200, S=20) and the batch's wall time against the ideal
ceil(N / W) x S (goal <= 1.5x).

    python benchmarks/b6_batch.py --items 1000 --window 200 --seconds 20     # the issue's size (~25 min)
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import _common as c

BENCH = "B6 batch"

BATCH_DAG = """
import os
import pendulum
from airflow.sdk import DAG
from airflow_provider_speedpix.operators.batch import SpeedPixBatchRunOperator

with DAG("b6_batch", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False,
         tags=["speedpix", "bench"]) as dag:
    SpeedPixBatchRunOperator(
        task_id="batch", workflow_id="sleep-{seconds}",
        items=[{{"text": f"product {{i}}"}} for i in range({items})],
        output_dir=os.environ["SPEEDPIX_CATALOG_URI"] + "/b6/{{{{ run_id | replace(':', '_') | replace('+', '_') }}}}",
        max_in_flight={window}, deferrable=True, poll_interval=2.0, timeout=3600, retries=3)
"""

MAPPED_DAG = """
import os
import pendulum
from airflow.sdk import DAG
from airflow_provider_speedpix.operators.speedpix import SpeedPixRunOperator

with DAG("b6_mapped", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False,
         max_active_tasks=4096, tags=["speedpix", "bench"]) as dag:
    SpeedPixRunOperator.partial(
        task_id="run", workflow_id="sleep-{seconds}", deferrable=True, poll_interval=2.0, timeout=3600,
        output_dir=os.environ["SPEEDPIX_CATALOG_URI"] + "/b6-mapped/{{{{ run_id | replace(':', '_') | replace('+', '_') }}}}/{{{{ ti.map_index }}}}",
    ).expand(inputs=[{{"text": f"product {{i}}"}} for i in range({items})])
"""


def deployment_class():
    from tests.e2e.deployment import Deployment

    class CapacityDeployment(Deployment):
        """The e2e deployment with the emulator's ``--capacity`` set (a fixed FIFO of worker slots)."""

        capacity = 0

        def _spawn(self, name, argv, env=None):  # type: ignore[no-untyped-def]
            if name == "emulator" and self.capacity:
                argv = [*argv, "--capacity", str(self.capacity)]
            return super()._spawn(name, argv, env)

    return CapacityDeployment


def wall_seconds(dep, dag_id: str, run_id: str) -> float:
    [(start, end)] = dep.query(
        "SELECT julianday(start_date), julianday(end_date) FROM dag_run WHERE dag_id = ? AND run_id = ?",
        (dag_id, run_id),
    )
    return (end - start) * 86400


def run(args: argparse.Namespace) -> list[dict]:
    cls = deployment_class()
    dep = cls(parallelism=4, emulator_duration=float(args.seconds))
    dep.capacity = args.window
    ideal = math.ceil(args.items / args.window) * args.seconds
    results: dict[str, float] = {}
    calls: dict[str, int] = {}
    states: dict[str, str] = {}
    dep.start(timeout=300)
    try:
        (dep.dags / "b6_batch.py").write_text(
            BATCH_DAG.format(items=args.items, window=args.window, seconds=args.seconds)
        )
        variants = [("batch", "b6_batch")]
        if not args.skip_mapped:
            (dep.dags / "b6_mapped.py").write_text(MAPPED_DAG.format(items=args.items, seconds=args.seconds))
            variants.append(("mapped", "b6_mapped"))
        dep.wait_for_dags([dag_id for _, dag_id in variants], timeout=300)
        for name, dag_id in variants:
            dep.emulator_reset()
            run_id = dep.trigger(dag_id)
            t0 = time.monotonic()
            state = dep.wait_for_run(dag_id, run_id, timeout=args.timeout, interval=2.0)
            print(f"{name}: {state} in {time.monotonic() - t0:.1f}s (poll)", flush=True)
            if state != "success" and name == "batch":
                raise SystemExit(f"{dag_id} ended {state}\n{dep.log_tails()}")
            results[name] = wall_seconds(dep, dag_id, run_id)
            states[name] = f"{state}, task states {dep.task_states(dag_id, run_id)}"
            calls[name] = dep.emulator_stats()["calls"].get("comfy_prompt", 0)
    finally:
        dep.stop()
    size = f"N={args.items}, W={args.window}, S={args.seconds:g}s, 4 slots, capacity {args.window}"
    rows = [
        c.row(
            BENCH,
            "batch (1 task)",
            "wall time (s) vs ideal ceil(N/W) x S",
            results["batch"],
            baseline=ideal,
            baseline_variant="ideal",
            n=args.items,
            note=f"{size}; comfy_prompt {calls['batch']}; goal <= 1.5x",
        )
    ]
    if "mapped" in results:
        rows.append(
            c.row(
                BENCH,
                "batch (1 task)",
                "wall time (s) vs mapped deferrable",
                results["batch"],
                baseline=results["mapped"],
                baseline_variant=f"{args.items} mapped deferrable tasks",
                n=args.items,
                note=f"{size}; speed-up {results['mapped'] / results['batch']:.1f}x (goal >= 10x); "
                f"mapped run: {states['mapped']}",
            )
        )
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--window", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--timeout", type=float, default=7200.0, help="longest wait per run")
    parser.add_argument("--skip-mapped", action="store_true", help="only the batch against the ideal")
    parser.add_argument("--json-out", default=None)
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    c.emit(run(args), json_out=args.json_out, title=BENCH)
