"""B4 adaptive polling: status calls per prediction and detection latency, adaptive vs fixed interval.

Predictions of varied durations (``sleep-<s>`` workflows) are waited for with the real
``SpeedPixPredictionTrigger.run()`` (``created_at`` and ``estimated_duration`` from the create answer,
exactly as the operator passes them; ``poll_interval`` and ``max_poll_interval`` as the operator's
defaults, 2 s and 60 s).

* ``adaptive`` - the provider as shipped (``_polling.next_poll_delay``).
* ``fixed``    - baseline: ``_polling.next_poll_delay`` (which the trigger's poll loop calls) is monkeypatched to return
  ``poll_interval`` always, i.e. the usual fixed-interval loop.

Both variants run concurrently in ONE event loop (the patched function dispatches on a context variable
set per trigger task), so they see the same machine noise and the total runtime is about the longest
duration. Each duration gets a random fraction of the poll interval added (seeded; the same for both
variants). Detection latency = time the trigger yields its event - (create time + duration).
Status calls = ``comfy_get_progress`` calls made by that trigger (each trigger also makes one
``comfy_get_result`` call at the end, the same for both).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c

BENCH = "B4 adaptive polling"
VARIANTS = ("fixed", "sdk", "adaptive")
SDK_INTERVAL = 1.0  # the official SDK's default poll interval (``client.run``)
#: estimate-error scenarios: name -> emulator options (each scenario gets its own emulator process)
SCENARIOS = {
    "exact ETA": {},
    "ETA ±30% random": {"eta_error": 0.3},
    "ETA +30% biased": {"eta_bias": 0.3},
}


def _conn_id(index: int) -> str:
    return f"speedpix_b4_{index}"


async def _run(args: argparse.Namespace, emulators: list[c.Emulator]) -> dict[str, dict[str, list[dict]]]:
    import airflow_provider_speedpix._polling as polling_mod
    from airflow_provider_speedpix._polling import next_poll_delay
    from airflow_provider_speedpix.hooks.speedpix import SpeedPixHook
    from airflow_provider_speedpix.triggers.speedpix import SpeedPixPredictionTrigger

    variant_var: contextvars.ContextVar[str] = contextvars.ContextVar("variant")
    calls_var: contextvars.ContextVar[list[int]] = contextvars.ContextVar("calls")

    def dispatch(prediction, *, poll_interval, max_interval, **kwargs):
        variant = variant_var.get()
        if variant == "fixed":
            return poll_interval
        if variant == "sdk":
            return SDK_INTERVAL
        return next_poll_delay(prediction, poll_interval=poll_interval, max_interval=max_interval, **kwargs)

    polling_mod.next_poll_delay = dispatch  # type: ignore[assignment]
    original_get = SpeedPixHook.aget_prediction

    async def counted_get(self, prediction_id: str, **kwargs):
        calls_var.get()[0] += 1
        return await original_get(self, prediction_id, **kwargs)

    SpeedPixHook.aget_prediction = counted_get  # type: ignore[method-assign]

    results: dict[str, dict[str, list[dict]]] = {s: {v: [] for v in VARIANTS} for s in SCENARIOS}

    async def one(index: int, scenario: str, variant: str, nominal: float, duration: float) -> None:
        variant_var.set(variant)
        calls_var.set(counter := [0])
        emu = emulators[index]
        [(prediction_id, estimate, created_at)] = await c.acreate_predictions(
            emu.url, f"sleep-{duration:g}", 1, concurrency=1
        )
        trigger = SpeedPixPredictionTrigger(
            prediction_id,
            speedpix_conn_id=_conn_id(index),
            poll_interval=args.poll_interval,
            max_poll_interval=args.max_poll_interval,
            created_at=created_at,
            estimated_duration=estimate,
        )
        async for event in trigger.run():
            detected = time.time()
            results[scenario][variant].append(
                {
                    "duration": nominal,
                    "status": event.payload["status"],
                    "status_calls": counter[0],
                    "latency": detected - (created_at + duration),
                }
            )
            break

    # Real durations are not multiples of the poll interval: add a random fraction of it (seeded, and the
    # same for every variant) so a fixed loop is not lucky enough to poll exactly at every finish.
    rng = random.Random(args.seed)
    jobs = []
    for _ in range(args.repeat):
        for d in args.durations:
            actual = round(d + rng.uniform(0, args.poll_interval), 2)
            for index, scenario in enumerate(SCENARIOS):
                jobs += [one(index, scenario, variant, d, actual) for variant in VARIANTS]
    await asyncio.wait_for(asyncio.gather(*jobs), timeout=max(args.durations) + 180)
    return results


def _summary(items: list[dict], durations: list[float]) -> dict:
    bad = [i for i in items if i["status"] != "success"]
    if bad:
        raise RuntimeError(f"{len(bad)} triggers did not succeed: {bad[:3]}")
    calls = [i["status_calls"] for i in items]
    latencies = [i["latency"] for i in items]
    return {
        "calls_per_prediction": sum(calls) / len(calls),
        "latency_p50": c.percentile(latencies, 50),
        "latency_p95": c.percentile(latencies, 95),
        "latency_max": max(latencies),
        "by_duration": {
            f"{d:g}": sum(i["status_calls"] for i in items if i["duration"] == d)
            / sum(1 for i in items if i["duration"] == d)
            for d in durations
        },
    }


def run(args: argparse.Namespace) -> list[dict]:
    import json as _json
    import os

    with contextlib.ExitStack() as stack:
        emulators = [stack.enter_context(c.Emulator(seed=args.seed)) for _ in SCENARIOS]
        c.setup_env(emulators[0].url)
        for index, (emu, options) in enumerate(zip(emulators, SCENARIOS.values(), strict=True)):
            if options:
                emu.configure(**options)
            os.environ["AIRFLOW_CONN_" + _conn_id(index).upper()] = _json.dumps(
                {"conn_type": "speedpix", "host": emu.url, "login": c.APP_KEY, "password": c.APP_SECRET}
            )
        results = asyncio.run(_run(args, emulators))
        stats = [emu.stats() for emu in emulators]
    n = f"{len(args.durations) * args.repeat} x {args.durations[0]:g}-{max(args.durations):g}s"
    rows = []
    for index, (scenario, by_variant) in enumerate(results.items()):
        summary = {v: _summary(items, args.durations) for v, items in by_variant.items()}
        print(f"# B4 {scenario}: {json.dumps(summary)}", file=sys.stderr, flush=True)
        client_total = sum(i["status_calls"] for items in by_variant.values() for i in items)
        server_total = stats[index]["calls"]["comfy_get_progress"]
        ours = summary["adaptive"]
        for base_key, base_label in (
            ("fixed", f"fixed {args.poll_interval:g}s"),
            ("sdk", f"SDK default {SDK_INTERVAL:g}s"),
        ):
            base = summary[base_key]
            calls_ratio = ours["calls_per_prediction"] / base["calls_per_prediction"]
            met = ours["latency_p95"] <= base["latency_p95"] and calls_ratio <= 0.5
            per_d = ", ".join(
                f"{d}s: {ours['by_duration'][d]:.1f} vs {base['by_duration'][d]:.1f}"
                for d in ours["by_duration"]
            )
            label = f"adaptive, {scenario}"
            goal = f"goal (p95 <= baseline p95 at <= 0.5x its calls): {'met' if met else 'NOT met'}"
            rows.append(
                c.row(
                    BENCH,
                    label,
                    "status calls per prediction",
                    ours["calls_per_prediction"],
                    baseline=base["calls_per_prediction"],
                    baseline_variant=base_label,
                    n=n,
                    note=f"{goal}; per duration {per_d}"
                    + (
                        f"; emulator counted {server_total} progress calls, triggers {client_total}"
                        if base_key == "fixed"
                        else ""
                    ),
                )
            )
            rows.append(
                c.row(
                    BENCH,
                    label,
                    "detection latency p95 (s)",
                    ours["latency_p95"],
                    baseline=base["latency_p95"],
                    baseline_variant=base_label,
                    n=n,
                    note=f"p50 {ours['latency_p50']:.2f} vs {base['latency_p50']:.2f}; max {ours['latency_max']:.2f} vs {base['latency_max']:.2f}",
                )
            )
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--durations", default="2,5,10,20,40,80,120", help="seconds, comma-separated")
    parser.add_argument("--repeat", type=int, default=3, help="predictions per duration and variant")
    parser.add_argument("--poll-interval", type=float, default=2.0)
    parser.add_argument("--max-poll-interval", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    args.durations = [float(d) for d in str(args.durations).split(",") if d.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    c.emit(run(args), json_out=args.json_out, title=BENCH)
    return 0


if __name__ == "__main__":
    sys.exit(main())
