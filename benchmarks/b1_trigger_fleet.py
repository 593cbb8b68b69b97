"""B1 trigger fleet: N in-flight predictions polled by real SpeedPixPredictionTrigger.run() in ONE event loop.

Variants (each in a fresh child process, so RSS and CPU are not shared):

* ``shared``      - the provider as shipped: every trigger uses the loop's one ``aiohttp.ClientSession``
  (``_transport.AsyncClient``; in-flight limit sized from the measured round trip).
* ``floor``       - the floor: N plain coroutines make the same signed status call on the same schedule
  with a minimal HTTP/1.1 keep-alive client on raw asyncio streams (``_floor.py``), as many connections
  as the provider may open. No trigger, no retries, no timeouts: what one call must cost at least.
* ``per_trigger`` - (``--variants``) the usual pattern: every trigger creates its own client (its own
  ``aiohttp.ClientSession`` and connection pool).

Per variant: N predictions lasting an hour are created beforehand (not measured); the pollers start
staggered over one poll interval with a fixed period (``max_poll_interval == poll_interval``); after every
one has polled once plus one more interval (warm-up), a fixed window is measured:

* achieved status calls/s (emulator-counted) against the needed N / interval;
* effective poll period: time between two completed polls of the same prediction (sleep + waiting for a
  slot + the call), p50/p99, against the interval;
* CPU seconds per status call: this process's CPU during the window / status calls the emulator counted;
* RSS per in-flight prediction and startup (until every poller has polled once);
* emulator CPU (1.0 = one core; it is single-threaded) to tell when the server is the bottleneck;
* diagnostics: the loop's lag (how late a 0.1 s sleep wakes), the in-flight limit once a second, and the
  garbage collector's runs and CPU per generation in the window.

``--cases 1000:0,5000:0,5000:0.05`` picks fleet sizes and the latency (seconds) the emulator adds to each call.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c

BENCH = "B1 trigger fleet"
VARIANTS = ("floor", "shared", "per_trigger")
PREDICTION_SECONDS = 3600  # in flight for the whole measurement
LAG_PROBE = 0.1  # seconds: the window is measured in steps of this, each noting how late it woke


# ------------------------------------------------------------------------------------------- child


async def _child_main(args: argparse.Namespace) -> dict:
    import _floor

    import airflow_provider_speedpix._transport as transport_mod
    from airflow_provider_speedpix.hooks.speedpix import SpeedPixHook
    from airflow_provider_speedpix.triggers.speedpix import SpeedPixPredictionTrigger

    ids = json.loads(Path(args.ids_file).read_text())
    n = len(ids)
    interval = args.poll_interval
    loop = asyncio.get_running_loop()
    real_sleep = asyncio.sleep

    measuring = False
    created_in_window = 0
    clients: dict[asyncio.Task | None, transport_mod.AsyncClient] = {}
    if args.child == "per_trigger":

        def per_trigger_client() -> transport_mod.AsyncClient:
            task = asyncio.current_task()
            client = clients.get(task)
            if client is None:
                nonlocal created_in_window
                created_in_window += measuring
                client = clients[task] = transport_mod.AsyncClient()
            return client

        transport_mod.shared_async_client = per_trigger_client  # type: ignore[assignment]

    lags: list[float] = []
    latencies: list[float] = []
    periods: list[float] = []
    last_done: dict[str, float] = {}
    calls = 0
    errors = 0
    first_polled: set[str] = set()

    original_get = SpeedPixHook.aget_prediction

    def polled(prediction_id: str, started: float) -> None:
        nonlocal calls
        now = loop.time()
        first_polled.add(prediction_id)
        previous = last_done.get(prediction_id)
        last_done[prediction_id] = now
        if measuring:
            latencies.append(now - started)
            calls += 1
            if previous is not None:
                periods.append(now - previous)

    async def timed_get(self, prediction_id: str, **kwargs):
        nonlocal errors
        started = loop.time()
        try:
            result = await original_get(self, prediction_id, **kwargs)
        except Exception:
            errors += 1
            raise
        polled(prediction_id, started)
        return result

    SpeedPixHook.aget_prediction = timed_get  # type: ignore[method-assign]

    emulator = c.Emulator()
    emulator.url = args.url
    emulator.proc = type("P", (), {"pid": args.emulator_pid})()  # only .pid is used below

    pool = _floor.RawPool(args.url, transport_mod.MAX_IN_FLIGHT)

    async def floor_poller(prediction_id: str) -> None:
        nonlocal errors
        while True:
            started = loop.time()
            try:
                await _floor.progress(pool, prediction_id, c.APP_KEY, c.APP_SECRET)
            except Exception:
                errors += 1
            else:
                polled(prediction_id, started)
            await real_sleep(interval)

    # warm-up: imports, connection lookup, one client (and, for per_trigger, one extra client)
    if args.child == "floor":
        await _floor.progress(pool, ids[0], c.APP_KEY, c.APP_SECRET)
    else:
        await asyncio.create_task(SpeedPixHook().aget_prediction(ids[0]))
    first_polled.clear()
    last_done.clear()
    gc.collect()
    rss_before = c.rss_bytes()

    events: list = []

    async def run_one(i: int, prediction_id: str) -> None:
        await real_sleep(i * interval / n)
        if args.child == "floor":
            await floor_poller(prediction_id)
            return
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
    gc_runs: dict[int, list[float]] = {0: [], 1: [], 2: []}
    gc_started = [0.0]

    def gc_timer(phase: str, info: dict) -> None:
        if phase == "start":
            gc_started[0] = time.process_time()
        elif measuring:
            gc_runs[info["generation"]].append(time.process_time() - gc_started[0])

    gc.callbacks.append(gc_timer)
    measuring = True
    limits: list[int] = []
    ticks = round(args.window / LAG_PROBE)
    for tick in range(ticks):  # the loop's lag (how late a short sleep wakes), the in-flight limit
        due = loop.time() + LAG_PROBE
        await real_sleep(LAG_PROBE)
        lags.append(loop.time() - due)
        slots = transport_mod._ASYNC_SLOTS.get(loop)
        if tick % round(1 / LAG_PROBE) == 0 and slots is not None:
            limits.append(slots.limit)
    measuring = False
    elapsed = loop.time() - t0
    cpu = c.cpu_seconds() - cpu0
    emu_cpu = emulator.cpu_seconds() - emu_cpu0
    stats1 = await asyncio.to_thread(emulator.stats)
    rss_after = c.rss_bytes()

    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)

    await pool.close()
    for client in clients.values():
        await client.aclose()
    progress_calls = stats1["calls"]["comfy_get_progress"] - stats0["calls"]["comfy_get_progress"]
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
        "period_p50": c.percentile(periods, 50),
        "period_p99": c.percentile(periods, 99),
        "in_flight_limit": max(limits) if limits else None,
        "in_flight_limits": limits,
        "client_calls": calls,
        "progress_calls": progress_calls,
        "errors": errors,
        "events": len(events),
        "clients_created_in_window": created_in_window,
        "cpu_s": cpu,
        "gc_runs": {gen: len(runs) for gen, runs in gc_runs.items()},
        "gc_cpu_s": {gen: round(sum(runs), 3) for gen, runs in gc_runs.items()},
        "cpu_per_call": cpu / progress_calls if progress_calls else float("nan"),
        "rss_per_prediction": (rss_after - rss_before) / n,
        "rss_before": rss_before,
        "rss_after": rss_after,
        "emulator_cpu_util": emu_cpu / elapsed,
        "achieved_rate": progress_calls / elapsed,
        "needed_rate": n / interval,
    }


# ------------------------------------------------------------------------------------------ parent


def run(args: argparse.Namespace) -> list[dict]:
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="speedpix-b1-") as tmp:
        for n, latency in args.cases:
            interval = args.poll_interval
            results = {}
            with c.Emulator(duration=3.0, latency=latency) as emu:
                c.setup_env(emu.url)
                for variant in args.variants:
                    emu.reset()
                    created = asyncio.run(
                        c.acreate_predictions(emu.url, f"sleep-{PREDICTION_SECONDS}", n, concurrency=64)
                    )
                    ids_file = Path(tmp) / f"ids-{n}.json"
                    ids_file.write_text(json.dumps([pid for pid, _, _ in created]))
                    cmd = [sys.executable, __file__, "--child", variant, "--ids-file", str(ids_file)]
                    cmd += ["--url", emu.url, "--emulator-pid", str(emu.pid), "--window", str(args.window)]
                    cmd += ["--poll-interval", str(interval), "--startup-timeout", str(args.startup_timeout)]
                    cmd += ["--gc-threshold", str(args.gc_threshold)]
                    timeout = args.startup_timeout + args.window + 2 * interval + 120
                    results[variant] = res = c.child_json(cmd, timeout=timeout, log=sys.stderr)
                    print(
                        f"# B1 n={n} latency={latency} {variant}: {json.dumps(res)}",
                        file=sys.stderr,
                        flush=True,
                    )
            rows += _rows(n, interval, latency, results)
    return rows


def _rows(n: int, interval: float, latency: float, results: dict) -> list[dict]:
    ours = results["shared"]
    floor = results.get("floor")
    case = f"{n} @ {interval:g}s" + (f", +{latency * 1000:g} ms/call" if latency else "")
    label = "shared client"
    out = []
    rate_ok = ours["achieved_rate"] >= 0.95 * ours["needed_rate"]
    period_ok = ours["period_p99"] <= 1.2 * interval

    def load(res: dict) -> str:
        note = f"emulator CPU {res['emulator_cpu_util']:.0%} of a core"
        note += f"; {res['errors']} errors" if res["errors"] else ""
        note += "" if res["all_started"] else "; not all pollers polled before the window"
        return note

    out.append(
        c.row(
            BENCH,
            label,
            "status calls/s achieved",
            ours["achieved_rate"],
            baseline=ours["needed_rate"],
            baseline_variant="needed: N / interval",
            n=case,
            better="higher",
            note=f"goal >= 0.95x: {'met' if rate_ok else 'NOT met'}; {load(ours)}; in-flight limit {ours['in_flight_limit']}",
        )
    )
    out.append(
        c.row(
            BENCH,
            label,
            "effective poll period p99 (s)",
            ours["period_p99"],
            baseline=interval,
            baseline_variant="the interval",
            n=case,
            note=f"goal <= 1.2x: {'met' if period_ok else 'NOT met'}; p50 {ours['period_p50']:.2f} s; status call latency p99 {ours['latency_p99']:.3f} s",
        )
    )
    if floor is not None:
        cpu_ok = ours["cpu_per_call"] <= 2 * floor["cpu_per_call"]
        out.append(
            c.row(
                BENCH,
                label,
                "CPU ms per status call",
                1000 * ours["cpu_per_call"],
                baseline=1000 * floor["cpu_per_call"],
                baseline_variant="floor: raw asyncio streams",
                n=case,
                note=f"goal <= 2x: {'met' if cpu_ok else 'NOT met'}; floor achieved {floor['achieved_rate']:.0f} calls/s, period p99 {floor['period_p99']:.2f} s; {load(floor)}",
            )
        )
    base = results.get("per_trigger")
    out.append(
        c.row(
            BENCH,
            label,
            "RSS per in-flight prediction (KiB)",
            ours["rss_per_prediction"] / 1024,
            baseline=None if base is None else base["rss_per_prediction"] / 1024,
            baseline_variant=None if base is None else "client per trigger",
            n=case,
            note=f"startup to all polling {ours['startup_s']:.1f} s (the stagger alone is {interval:g} s)",
        )
    )
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cases",
        default="1000:0,5000:0,5000:0.05",
        help="comma-separated N:latency (seconds added per call)",
    )
    parser.add_argument("--variants", default="floor,shared", help="of floor, shared, per_trigger")
    parser.add_argument("--window", type=float, default=20.0, help="measured seconds per variant")
    parser.add_argument("--poll-interval", type=float, default=5.0)
    parser.add_argument("--startup-timeout", type=float, default=420.0)
    parser.add_argument("--json-out", default=None)
    parser.add_argument(
        "--gc-threshold",
        type=int,
        default=0,
        help="the garbage collector's generation-0 threshold in the children (default: Python's, 700)",
    )
    # child mode
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--latency", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--ids-file", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--emulator-pid", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.cases = [
        (int(n), float(lat)) for n, _, lat in (x.partition(":") for x in args.cases.split(",") if x)
    ]
    args.variants = [v for v in args.variants.split(",") if v]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        c.raise_fd_limit()
        if args.gc_threshold:
            gc.set_threshold(args.gc_threshold, *gc.get_threshold()[1:])
        c.setup_env(args.url)
        print(json.dumps(asyncio.run(_child_main(args))))
        return 0
    c.emit(run(args), json_out=args.json_out, title=BENCH)
    return 0


if __name__ == "__main__":
    sys.exit(main())
