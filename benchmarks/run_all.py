"""Run every benchmark (``make bench``), print one markdown table and write ``benchmarks/results/latest.md``.

Each benchmark runs in its own process with its own emulator process. Default sizes (the issue's) take an
estimated 20-25 minutes on a 2-core machine; ``--quick`` runs tiny sizes (about 2 minutes) to check that
everything works. Every number is a ratio against a baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c

FULL = {
    "b1_trigger_fleet.py": ["--cases", "1000:0,5000:0,5000:0.05", "--window", "20"],
    "b3_upload_memory.py": ["--size-mb", "1024"],
    "b4_adaptive_polling.py": ["--durations", "2,5,10,20,40,80,120", "--repeat", "3"],
    "b5_call_overhead.py": ["--count", "500", "--block", "50"],
    "b6_batch.py": ["--items", "1000", "--window", "200", "--seconds", "20"],
}
QUICK = {
    "b1_trigger_fleet.py": ["--cases", "200:0,200:0.05", "--window", "8"],
    "b3_upload_memory.py": ["--size-mb", "64"],
    "b4_adaptive_polling.py": ["--durations", "2,5,10", "--repeat", "2"],
    "b5_call_overhead.py": ["--count", "200", "--block", "50"],
    "b6_batch.py": ["--items", "40", "--window", "20", "--seconds", "5"],
}
B2_ROW = c.row(
    "B2 deferral",
    "deferrable (100 mapped tasks, 4 slots)",
    "wall time; worker-slot-seconds",
    None,
    baseline_variant="blocking",
    note="measured by the end-to-end suite in tests/e2e (`make e2e`), not here",
)


def b2_rows() -> list[dict]:
    """B2 comes from the end-to-end suite: use its ``results/b2_deferral.json`` when present."""
    path = c.RESULTS_DIR / "b2_deferral.json"
    try:
        data = json.loads(path.read_text())
        ours, base = data["deferrable"], data["blocking_projected_to_deferrable_prediction_length"]
        note = (
            f"from `{data.get('command', 'make e2e')}` at {data.get('date', '?')}; blocking measured with "
            f"{data['blocking_measured']['prediction_seconds']:g} s predictions and projected to "
            f"{ours['prediction_seconds']:g} s"
        )
        label = f"deferrable ({ours['prediction_seconds']:g} s predictions)"
        return [
            c.row(
                "B2 deferral",
                label,
                "wall time (s)",
                ours["run_wall_seconds"],
                baseline=base["wall_seconds"],
                baseline_variant="blocking",
                n=100,
                note=note,
            ),
            c.row(
                "B2 deferral",
                label,
                "worker-slot-seconds",
                ours["worker_slot_seconds"],
                baseline=base["worker_slot_seconds"],
                baseline_variant="blocking",
                n=100,
                note=note,
            ),
        ]
    except (OSError, ValueError, KeyError, TypeError):
        return [B2_ROW]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the benchmarks run")
    parser.add_argument("--only", default="", help="comma-separated subset, e.g. b1,b5")
    parser.add_argument(
        "--output", default=None, help="default: results/latest.md, or results/quick.md with --quick"
    )
    args = parser.parse_args(argv)
    if args.output is None:
        args.output = str(c.RESULTS_DIR / ("quick.md" if args.quick else "latest.md"))
    plan = QUICK if args.quick else FULL
    if args.only:
        wanted = {w.strip().lower() for w in args.only.split(",")}
        plan = {k: v for k, v in plan.items() if k.split("_")[0] in wanted}

    command = (
        "make bench"
        if not (argv or sys.argv[1:])
        else " ".join(["python benchmarks/run_all.py", *sys.argv[1:]])
    )
    machine = c.machine_info()
    started = time.monotonic()
    rows: list[dict] = []
    failures: list[str] = []
    timings: list[str] = []
    for script, extra in plan.items():
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            cmd = [sys.executable, str(c.BENCH_DIR / script), *extra, "--json-out", out.name]
            print(f"\n$ {shlex.join(cmd[1:])}", flush=True)
            t0 = time.monotonic()
            proc = subprocess.run(cmd, cwd=c.ROOT, check=False)
            timings.append(f"{script} {time.monotonic() - t0:.0f}s")
            if proc.returncode != 0:
                failures.append(f"{script} exited {proc.returncode}")
                continue
            rows += json.loads(Path(out.name).read_text() or "[]")
        if script.startswith("b1_"):
            rows += b2_rows()
    total = time.monotonic() - started

    header = [
        f"Benchmarks run {machine['date']} on {machine['platform']}, {machine['cpu_count']} CPUs "
        f"(load average at start {machine['loadavg_1m']}, at end {c.machine_info()['loadavg_1m']}), "
        f"Python {machine['python']}, "
        f"Airflow {machine['airflow']}.",
        "",
        f"Command: `{command}` ({total / 60:.1f} min: {', '.join(timings)}).",
        "",
        "Ratio = value / baseline, both measured in the same run; lower is better except for "
        "rates and throughput.",
        "",
    ]
    text = "\n".join(header) + c.markdown_table(rows) + "\n"
    if failures:
        text += "\nFailed: " + "; ".join(failures) + "\n"
    print("\n" + text)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text)
    print(f"written to {args.output}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
