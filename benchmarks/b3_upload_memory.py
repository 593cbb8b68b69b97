"""B3 upload memory: peak RSS added while uploading a large file, streaming vs reading it into memory.

Variants, each in a fresh child process (so one variant's heap cannot hide the other's peak):

* ``hook``          - ``SpeedPixHook.upload_file(path)``: the provider (streams the file to the pre-signed URL).
* ``sdk``           - baseline: the official SDK, ``speedpix.Client(...).files.create(path)``, which does
  ``httpx.put(url, content=file.read())``.
* ``requests_read`` - the same read-into-memory pattern on ``requests`` (sign with the hook, then
  ``requests.put(url, data=f.read())``), to separate the HTTP library from the pattern.

Each child first does a 1-byte warm-up upload (imports, connection lookup, sessions), then records RSS,
samples RSS every 2 ms in a thread while uploading, and reports peak - before (also cross-checked with
``ru_maxrss``). Throughput = file size / upload wall time. The file is sparse (created instantly); the
emulator writes it to a temporary storage directory that is deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c

BENCH = "B3 upload memory"
VARIANTS = ("sdk", "requests_read", "hook", "hook_objectstorage")


def _child(args: argparse.Namespace) -> dict:
    import requests

    from airflow_provider_speedpix import _protocol as proto
    from airflow_provider_speedpix.hooks.speedpix import SpeedPixHook

    path = Path(args.file)
    tiny = path.with_name("warmup.bin")
    tiny.write_bytes(b"x")
    if args.child == "hook":
        hook = SpeedPixHook()

        def upload(p: Path) -> None:
            hook.upload_file(p)

    elif args.child == "hook_objectstorage":
        from airflow.sdk import ObjectStoragePath

        hook = SpeedPixHook()

        def upload(p: Path) -> None:
            hook.upload_file(ObjectStoragePath(f"file://{p}"))

    elif args.child == "sdk":
        import speedpix

        client = speedpix.Client(c.APP_KEY, c.APP_SECRET, endpoint=args.url, timeout=600)

        def upload(p: Path) -> None:
            client.files.create(p)

    else:
        hook = SpeedPixHook()
        session = requests.Session()

        def upload(p: Path) -> None:
            envelope = hook._call(
                proto.UPLOAD_SIGN, {"contentType": "application/octet-stream", "originalFilename": p.name}
            )
            url, _ = proto.parse_upload_sign(envelope)
            with p.open("rb") as f:
                response = session.put(
                    url, data=f.read(), headers={"Content-Type": "application/octet-stream"}, timeout=600
                )
            response.raise_for_status()

    upload(tiny)
    rss_before = c.rss_bytes()
    peak = rss_before
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        import psutil

        proc = psutil.Process()
        while not stop.is_set():
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    upload(path)
    elapsed = time.perf_counter() - started
    stop.set()
    sampler.join()
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    size = path.stat().st_size
    return {
        "variant": args.child,
        "size": size,
        "seconds": elapsed,
        "mib_per_s": size / 2**20 / elapsed,
        "peak_added": max(peak, maxrss) - rss_before,
        "peak_added_sampled": peak - rss_before,
        "rss_before": rss_before,
    }


def run(args: argparse.Namespace) -> list[dict]:
    size = int(args.size_mb * 2**20)
    results: dict[str, dict] = {}
    with c.temp_dir("speedpix-b3-") as tmp:
        storage = tmp / "storage"
        storage.mkdir()
        big = tmp / "upload.bin"
        with big.open("wb") as f:
            f.truncate(size)  # sparse: reads as zeros, created instantly
        with c.Emulator(storage_dir=str(storage)) as emu:
            c.setup_env(emu.url)
            for variant in VARIANTS:
                emu.reset()  # also deletes the previous variant's stored upload
                cmd = [sys.executable, __file__, "--child", variant, "--file", str(big), "--url", emu.url]
                results[variant] = res = c.child_json(cmd, timeout=900, log=sys.stderr)
                print(f"# B3 {variant}: {json.dumps(res)}", file=sys.stderr, flush=True)
                stored = emu.stats()["uploads"]
                if stored != 2:  # warm-up + the big file
                    raise RuntimeError(f"{variant}: emulator stored {stored} uploads, expected 2")
            emu.reset()
    sdk, fair = results["sdk"], results["requests_read"]
    n = f"{args.size_mb:g} MiB"
    rows = []
    for variant, label in (
        ("hook", "upload_file(path), streamed"),
        ("hook_objectstorage", "upload_file(ObjectStoragePath file://), streamed"),
    ):
        res = results[variant]
        for base, base_label in ((fair, "requests, f.read() (fair)"), (sdk, "official SDK files.create")):
            rows.append(
                c.row(
                    BENCH,
                    label,
                    "peak RSS added (MiB)",
                    res["peak_added"] / 2**20,
                    baseline=base["peak_added"] / 2**20,
                    baseline_variant=base_label,
                    n=n,
                    note="floor: 0 (streamed in 1 MiB chunks)" if base is fair else "",
                )
            )
            rows.append(
                c.row(
                    BENCH,
                    label,
                    "throughput (MiB/s)",
                    res["mib_per_s"],
                    baseline=base["mib_per_s"],
                    baseline_variant=base_label,
                    n=n,
                    better="higher",
                )
            )
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=1024.0, help="file size in MiB")
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        c.setup_env(args.url)
        print(json.dumps(_child(args)))
        return 0
    c.emit(run(args), json_out=args.json_out, title=BENCH)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
