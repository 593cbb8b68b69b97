"""B5 per-call overhead: create + get round trips per second on one connection, ours vs the official SDK.

* ``hook`` - ``SpeedPixHook.create_prediction(...)`` + ``SpeedPixHook.get_prediction(id)`` (``requests``
  session, signing, envelope checks, retry policy).
* ``sdk``  - baseline: ``speedpix.Client(...).predictions.create(...)`` + ``.predictions.get(id)``
  (``httpx.Client``).

Same emulator (another process), same count, one client object each (so one keep-alive connection each),
interleaved in blocks (hook, sdk, hook, sdk, ...) so machine noise hits both alike. Predictions last an
hour, so each get is one ``comfy_get_progress`` call for both: a round trip is exactly two HTTP calls.
Reported: round trips per second of wall time and client CPU milliseconds per round trip.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c

BENCH = "B5 call overhead"
WORKFLOW = "sleep-3600"


def run(args: argparse.Namespace) -> list[dict]:
    import contextlib
    import os

    # production logging: the hook's INFO line per create is formatted and written (to /dev/null here)
    os.environ["BENCH_LOG_LEVEL"] = args.log_level
    with c.Emulator() as emu, open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        c.setup_env(emu.url)
        import speedpix

        from airflow_provider_speedpix.hooks.speedpix import SpeedPixHook

        hook = SpeedPixHook()
        sdk = speedpix.Client(c.APP_KEY, c.APP_SECRET, endpoint=emu.url)

        def ours() -> None:
            prediction = hook.create_prediction(WORKFLOW, {"prompt": "a cat"})
            assert hook.get_prediction(prediction.id).status == "waiting"

        def theirs() -> None:
            prediction = sdk.predictions.create(workflow_id=WORKFLOW, input={"prompt": "a cat"})
            assert sdk.predictions.get(prediction.id).status == "waiting"

        variants = {"hook": ours, "sdk": theirs}
        for fn in variants.values():  # warm-up: imports, connection lookup, keep-alive connection
            for _ in range(10):
                fn()
        emu.reset()
        wall = dict.fromkeys(variants, 0.0)
        cpu = dict.fromkeys(variants, 0.0)
        blocks = max(1, args.count // args.block)
        for _ in range(blocks):
            for name, fn in variants.items():
                w0, c0 = time.perf_counter(), c.cpu_seconds()
                for _ in range(args.block):
                    fn()
                wall[name] += time.perf_counter() - w0
                cpu[name] += c.cpu_seconds() - c0
        stats = emu.stats()
        sdk.close()
    count = blocks * args.block
    expected = 2 * count
    calls = stats["calls"]
    if calls["comfy_prompt"] != expected or calls["comfy_get_progress"] != expected:
        raise RuntimeError(f"unexpected call counts {calls} (expected {expected} of create and progress)")
    rate = {k: count / v for k, v in wall.items()}
    cpu_ms = {k: 1000 * v / count for k, v in cpu.items()}
    base = "official SDK"
    return [
        c.row(
            BENCH,
            "SpeedPixHook",
            "create+get round trips/s",
            rate["hook"],
            baseline=rate["sdk"],
            baseline_variant=base,
            n=count,
            better="higher",
            note=f"blocks of {args.block}, interleaved; logging at {args.log_level}; goal >= 1.0x",
        ),
        c.row(
            BENCH,
            "SpeedPixHook",
            "client CPU ms per round trip",
            cpu_ms["hook"],
            baseline=cpu_ms["sdk"],
            baseline_variant=base,
            n=count,
        ),
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=500, help="round trips per variant")
    parser.add_argument("--block", type=int, default=50, help="round trips per interleaved block")
    parser.add_argument("--log-level", default="INFO", help="Airflow logging level (production: INFO)")
    parser.add_argument("--json-out", default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    c.emit(run(args), json_out=args.json_out, title=BENCH)
    return 0


if __name__ == "__main__":
    sys.exit(main())
