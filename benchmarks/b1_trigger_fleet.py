"""B1 trigger fleet: N in-flight predictions polled by real SpeedPixPredictionTrigger.run() in ONE event loop.

Variants (each in a fresh child process, so RSS deltas are not polluted by the other variant):

* ``shared``      - the provider as shipped: every trigger uses the loop's one ``httpx.AsyncClient``.
* ``per_trigger`` - baseline, the usual pattern: ``shared_async_client`` is monkeypatched so every trigger
  gets (and keeps) its own ``httpx.AsyncClient``.

Per variant: N predictions lasting an hour are created beforehand (not measured); the triggers start
staggered over one poll interval (a triggerer picks triggers up over time, not all in one tick) with
``max_poll_interval == poll_interval`` so each polls at a fixed period; after every trigger has polled once
plus one more interval (warm-up), a fixed window is measured:

* poll lag: how late each poll's ``asyncio.sleep`` in the trigger module wakes vs. when it asked to (p50/p99);
* status-call latency: duration of each ``aget_prediction`` (includes waiting for a pooled connection);
* CPU seconds per status call: this process's CPU during the window / ``comfy_get_progress`` calls the
  emulator counted in the window;
* RSS per in-flight prediction: (RSS at the end of the window - RSS before the triggers started) / N;
* startup: seconds from launching the triggers until every one has completed its first poll;
* saturation: emulator CPU utilisation (1.0 = one core, it is single-threaded) and achieved / expected
  poll rate. If the server is the bottleneck the lag numbers describe the server, and the table says so.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c

BENCH = "B1 trigger fleet"
VARIANTS = ("per_trigger", "shared")  # baseline first
PREDICTION_SECONDS = 3600  # in flight for the whole measurement


# ------------------------------------------------------------------------------------------- child


async def _child_main(args: argparse.Namespace) -> dict:
    import httpx

    import airflow_provider_speedpix._transport as transport_mod
    import airflow_provider_speedpix.triggers.speedpix as trig_mod
    from airflow_provider_speedpix.hooks.speedpix import SpeedPixHook
    from airflow_provider_speedpix.triggers.speedpix import SpeedPixPredictionTrigger

    ids = json.loads(Path(args.ids_file).read_text())
    n = len(ids)
    interval = args.poll_interval
    loop = asyncio.get_running_loop()
    real_sleep = asyncio.sleep

    measuring = False
    created_in_window = 0
    if args.child == "per_trigger":
        clients: dict[asyncio.Task | None, httpx.AsyncClient] = {}

        def per_trigger_client() -> httpx.AsyncClient:
            task = asyncio.current_task()
            client = clients.get(task)
            if client is None:
                nonlocal created_in_window
                created_in_window += measuring
                client = clients[task] = httpx.AsyncClient(timeout=transport_mod.REQUEST_TIMEOUT)
            return client

        transport_mod.shared_async_client = per_trigger_client  # type: ignore[assignment]

    lags: list[float] = []
    latencies: list[float] = []
    calls = 0
    errors = 0
    first_polled: set[str] = set()

    class TimedAsyncio:
        """The trigger module's view of ``asyncio``: ``sleep`` records how late it woke."""

        def __getattr__(self, name: str):
            return getattr(asyncio, name)

        @staticmethod
        async def sleep(delay: float, result=None):
            due = loop.time() + delay
            await real_sleep(delay)
            if measuring:
                lags.append(loop.time() - due)
            return result

    trig_mod.asyncio = TimedAsyncio()  # type: ignore[assignment]
    original_get = SpeedPixHook.aget_prediction

    async def timed_get(self, prediction_id: str):
        nonlocal calls, errors
        started = loop.time()
        try:
            result = await original_get(self, prediction_id)
        except Exception:
            errors += 1
            raise
        first_polled.add(prediction_id)
        if measuring:
            latencies.append(loop.time() - started)
            calls += 1
        return result

    SpeedPixHook.aget_prediction = timed_get  # type: ignore[method-assign]

    emulator = c.Emulator()
    emulator.url = args.url
    emulator.proc = type("P", (), {"pid": args.emulator_pid})()  # only .pid is used below

    # warm-up: imports, connection lookup, one client (and, for per_trigger, one extra client)
    await asyncio.create_task(SpeedPixHook().aget_prediction(ids[0]))
    first_polled.clear()
    gc.collect()
    rss_before = c.rss_bytes()

    events: list = []

    async def run_one(i: int, prediction_id: str) -> None:
        await real_sleep(i * interval / n)
        trigger = SpeedPixPredictionTrigger(
            prediction_id, poll_interval=interval, max_poll_interval=interval, max_consecutive_errors=1000
        )
        async for event in trigger.run():
            events.append(event)  # not expected within the window (predictions last an hour)

    launched = loop.time()
    tasks = [asyncio.create_task(run_one(i, pid)) for i, pid in enumerate(ids)]
    while len(first_polled) < n and loop.time() - launched < args.startup_timeout:
        await real_sleep(0.1)
    startup = loop.time() - launched
    await real_sleep(interval)  # steady state

    stats0 = await asyncio.to_thread(emulator.stats)
    emu_cpu0, cpu0, t0 = emulator.cpu_seconds(), c.cpu_seconds(), loop.time()
    measuring = True
    await real_sleep(args.window)
    measuring = False
    elapsed = loop.time() - t0
    cpu = c.cpu_seconds() - cpu0
    emu_cpu = emulator.cpu_seconds() - emu_cpu0
    stats1 = await asyncio.to_thread(emulator.stats)
    rss_after = c.rss_bytes()

    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)

    progress_calls = stats1["calls"]["comfy_get_progress"] - stats0["calls"]["comfy_get_progress"]
    mean_latency = sum(latencies) / len(latencies) if latencies else 0.0
    expected_rate = n / (interval + mean_latency)
    return {
        "variant": args.child,
        "n": n,
        "poll_interval": interval,
        "window": elapsed,
        "startup_s": startup,
        "all_started": len(first_polled) >= n,
        "lag_p50": c.percentile(lags, 50),
        "lag_p99": c.percentile(lags, 99),
        "lag_max": max(lags) if lags else float("nan"),
        "latency_p50": c.percentile(latencies, 50),
        "latency_p99": c.percentile(latencies, 99),
        "client_calls": calls,
        "progress_calls": progress_calls,
        "errors": errors,
        "events": len(events),
        "clients_created_in_window": created_in_window,
        "cpu_s": cpu,
        "cpu_per_call": cpu / progress_calls if progress_calls else float("nan"),
        "rss_per_prediction": (rss_after - rss_before) / n,
        "rss_before": rss_before,
        "rss_after": rss_after,
        "emulator_cpu_util": emu_cpu / elapsed,
        "achieved_rate": progress_calls / elapsed,
        "expected_rate": expected_rate,
    }


# ------------------------------------------------------------------------------------------ parent


def auto_interval(n: int, max_rate: float) -> float:
    """5 s, or longer when N / 5 s would exceed ``max_rate`` status calls per second."""
    return max(5.0, round(n / max_rate, 1))


def run(args: argparse.Namespace) -> list[dict]:
    rows: list[dict] = []
    with c.Emulator(duration=3.0) as emu, tempfile.TemporaryDirectory(prefix="speedpix-b1-") as tmp:
        c.setup_env(emu.url)
        for n in args.sizes:
            interval = args.poll_interval or auto_interval(n, args.max_rate)
            results = {}
            for variant in VARIANTS:
                emu.reset()
                created = asyncio.run(c.acreate_predictions(emu.url, f"sleep-{PREDICTION_SECONDS}", n))
                ids_file = Path(tmp) / f"ids-{n}.json"
                ids_file.write_text(json.dumps([pid for pid, _, _ in created]))
                cmd = [sys.executable, __file__, "--child", variant, "--ids-file", str(ids_file)]
                cmd += ["--url", emu.url, "--emulator-pid", str(emu.pid), "--window", str(args.window)]
                cmd += ["--poll-interval", str(interval), "--startup-timeout", str(args.startup_timeout)]
                timeout = args.startup_timeout + args.window + 2 * interval + 120
                results[variant] = res = c.child_json(cmd, timeout=timeout, log=sys.stderr)
                print(f"# B1 n={n} {variant}: {json.dumps(res)}", file=sys.stderr, flush=True)
            rows += _rows(n, interval, results)
    return rows


def _rows(n: int, interval: float, results: dict) -> list[dict]:
    base, ours = results["per_trigger"], results["shared"]
    out = []
    spec = [
        ("poll lag p50 (s)", "lag_p50"),
        ("poll lag p99 (s)", "lag_p99"),
        ("status call latency p99 (s)", "latency_p99"),
        ("CPU s per status call", "cpu_per_call"),
        ("RSS per in-flight prediction (KiB)", "rss_per_prediction"),
        ("startup to all polling (s)", "startup_s"),
    ]
    for metric, key in spec:
        scale = 1 / 1024 if key == "rss_per_prediction" else 1
        out.append(
            c.row(
                BENCH,
                "shared client",
                metric,
                ours[key] * scale,
                baseline=base[key] * scale,
                baseline_variant="client per trigger",
                n=n,
            )
        )
    for name, res in (("shared client", ours), ("client per trigger", base)):
        saturated = res["emulator_cpu_util"] > 0.85 or res["achieved_rate"] < 0.9 * res["expected_rate"]
        note = (
            f"poll every {interval:g}s; {res['achieved_rate']:.0f}/{res['expected_rate']:.0f} calls/s "
            f"achieved/expected; emulator CPU {res['emulator_cpu_util']:.0%} of a core"
            + ("; SATURATED" if saturated else "")
            + (f"; {res['errors']} errors" if res["errors"] else "")
            + ("" if res["all_started"] else "; not all triggers polled before the window")
        )
        out.append(
            c.row(
                BENCH,
                name,
                "status calls/s in window",
                res["achieved_rate"],
                n=n,
                better="higher",
                note=note,
            )
        )
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,2000,5000", help="comma-separated fleet sizes")
    parser.add_argument("--window", type=float, default=30.0, help="measured seconds per variant")
    parser.add_argument(
        "--poll-interval", type=float, default=None, help="default: 5 s, longer above --max-rate"
    )
    parser.add_argument(
        "--max-rate",
        type=float,
        default=500.0,
        help="status calls/s the emulator is asked to serve at most (picks the poll interval)",
    )
    parser.add_argument("--startup-timeout", type=float, default=420.0)
    parser.add_argument("--json-out", default=None)
    # child mode
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--ids-file", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--emulator-pid", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.sizes = [int(s) for s in str(args.sizes).split(",") if s.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        c.raise_fd_limit()
        c.setup_env(args.url)
        print(json.dumps(asyncio.run(_child_main(args))))
        return 0
    c.emit(run(args), json_out=args.json_out, title=BENCH)
    return 0


if __name__ == "__main__":
    sys.exit(main())
