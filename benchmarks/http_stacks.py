"""Which async HTTP stack for the trigger: client CPU per signed status call, closed loop, one event loop.

Not part of ``make bench`` (it chose the stack; B1 measures the result). Each variant runs in a fresh child
process against one emulator: ``--concurrency`` workers each make ``--count`` / concurrency signed
``comfy_get_progress`` calls back to back (after the same number as warm-up), and the child reports its CPU
time per call. Variants:

* ``floor``       - raw asyncio streams (``_floor.py``): the least any client can spend.
* ``aiohttp``     - a minimal ``aiohttp.ClientSession.post`` (the stack the provider uses since issue 12).
* ``httpx``       - ``httpx.AsyncClient`` (the provider's stack before issue 12) with a pool of ``concurrency`` connections, ``client.post``.
* ``httpx_pool2x`` - the same with twice the connections and no keep-alive expiry (pool tuning).
* ``httpcore``    - ``httpcore.AsyncConnectionPool`` directly (httpx's engine without httpx's models).
* ``hook``        - the provider: ``SpeedPixHook.aget_prediction`` (the loop's shared aiohttp session,
  in-flight limit, proxies per host, timeouts, retries, error mapping, whole reads).

Usage: ``.venv/bin/python benchmarks/http_stacks.py --concurrency 16 [--latency 0.05]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c

VARIANTS = ("floor", "aiohttp", "httpx", "httpx_pool2x", "httpcore", "hook")


async def _child(args: argparse.Namespace) -> dict:
    import _floor

    from airflow_provider_speedpix import _protocol as proto
    from airflow_provider_speedpix._signing import sign_request
    from airflow_provider_speedpix.hooks.speedpix import SpeedPixHook

    ids = json.loads(Path(args.ids_file).read_text())
    conc, url, path = args.concurrency, args.url, proto.PATHS[proto.PROGRESS]

    def signed(pid: str) -> tuple[bytes, dict[str, str]]:
        body = json.dumps({"taskId": pid}).encode()
        return body, sign_request(
            method="POST", path=path, body=body, app_key=c.APP_KEY, app_secret=c.APP_SECRET
        )

    slots = asyncio.Semaphore(conc)
    if args.child == "floor":
        pool = _floor.RawPool(url, conc)

        async def call(pid: str) -> None:
            await _floor.progress(pool, pid, c.APP_KEY, c.APP_SECRET)

    elif args.child == "hook":
        hook = SpeedPixHook()

        async def call(pid: str) -> None:
            await hook.aget_prediction(pid)

    elif args.child == "aiohttp":
        import aiohttp

        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conc))

        async def call(pid: str) -> None:
            body, headers = signed(pid)
            async with session.post(url + path, data=body, headers=headers) as response:
                json.loads(await response.read())

    elif args.child == "httpcore":
        import httpcore

        core = httpcore.AsyncConnectionPool(max_connections=conc, max_keepalive_connections=conc)

        async def call(pid: str) -> None:
            body, headers = signed(pid)
            async with slots:
                response = await core.request("POST", url + path, content=body, headers=headers)
            json.loads(response.content)

    else:
        import httpx

        size = conc * (2 if args.child == "httpx_pool2x" else 1)
        expiry = None if args.child == "httpx_pool2x" else 5.0
        client = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=size, max_keepalive_connections=size, keepalive_expiry=expiry)
        )

        async def call(pid: str) -> None:
            body, headers = signed(pid)
            async with slots:
                response = await client.post(url + path, content=body, headers=headers)
            json.loads(response.content)

    done = 0

    async def worker(k: int) -> None:
        nonlocal done
        i = k
        while done < args.count:
            done += 1
            await call(ids[i % len(ids)])
            i += conc

    await asyncio.gather(*(worker(k) for k in range(conc)))  # warm-up
    done = 0
    cpu0, wall0 = c.cpu_seconds(), time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(conc)))
    cpu, wall = c.cpu_seconds() - cpu0, time.perf_counter() - wall0
    return {"variant": args.child, "cpu_ms_per_call": 1000 * cpu / done, "calls_per_s": done / wall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--ids-file", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        c.setup_env(args.url)
        print(json.dumps(asyncio.run(_child(args))))
        return 0
    with c.Emulator(latency=args.latency) as emu, c.temp_dir("speedpix-stacks-") as tmp:
        c.setup_env(emu.url)
        ids_file = tmp / "ids.json"
        created = asyncio.run(c.acreate_predictions(emu.url, "sleep-3600", 500))
        ids_file.write_text(json.dumps([pid for pid, _, _ in created]))
        for variant in args.variants.split(","):
            cmd = [
                sys.executable,
                __file__,
                "--child",
                variant,
                "--ids-file",
                str(ids_file),
                "--url",
                emu.url,
            ]
            cmd += ["--concurrency", str(args.concurrency), "--count", str(args.count)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=os.environ)
            lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
            print(lines[-1] if lines else f"{variant}: failed {out.stderr[-500:]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
