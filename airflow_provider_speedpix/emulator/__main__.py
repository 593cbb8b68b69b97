"""``speedpix-emulator`` / ``python -m airflow_provider_speedpix.emulator``: run the emulator in the foreground."""

from __future__ import annotations

import argparse
import os
import signal
import sys

import uvicorn

from .app import EmulatorConfig, create_app
from .faults import Fault
from .server import bind_socket, make_uvicorn_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="speedpix-emulator", description="Local SpeedPix API emulator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--app-key", default=os.environ.get("SPEEDPIX_APP_KEY") or "emulator-key")
    parser.add_argument(
        "--app-secret",
        default=os.environ.get("SPEEDPIX_APP_SECRET") or "emulator-secret",
        help="defaults to $SPEEDPIX_APP_SECRET (prefer the environment: argv is visible to other users)",
    )
    parser.add_argument("--duration", type=float, default=3.0, help="seconds from create to terminal")
    parser.add_argument("--fail-workflow", action="append", default=None, metavar="ID")
    parser.add_argument("--missing-workflow", action="append", default=None, metavar="ID")
    parser.add_argument("--upload-ttl", type=float, default=3600.0, help="upload URL lifetime, seconds")
    parser.add_argument(
        "--fault", action="append", default=[], metavar="OP:KIND[:TIMES[:DELAY]]", help="repeatable"
    )
    parser.add_argument(
        "--images-only-workflow",
        action="append",
        default=None,
        metavar="ID",
        help="workflow without custom outputs: images only in data.images (repeatable; default "
        "wf-images-only)",
    )
    parser.add_argument(
        "--capacity",
        type=int,
        default=0,
        help="tasks running at once, the rest queue in FIFO order (0: no limit)",
    )
    parser.add_argument(
        "--eta-error", type=float, default=0.0, metavar="F", help="estimates wrong by up to ±F (0.3: ±30 %%)"
    )
    parser.add_argument(
        "--eta-bias",
        type=float,
        default=0.0,
        metavar="F",
        help="estimates always off by +F (-0.2: 20 %% short)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-task estimate errors")
    parser.add_argument(
        "--latency",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="added to every signed API call before it is answered (a remote service)",
    )
    parser.add_argument(
        "--full-pool",
        action="append",
        default=[],
        metavar="ID",
        help="private resource pool over its utilisation limit (repeatable)",
    )
    parser.add_argument("--public-url", default=None, help="base URL put in upload/output URLs")
    parser.add_argument("--storage-dir", default=None)
    parser.add_argument("--access-log", action="store_true", help="uvicorn access log (tokens redacted)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        faults = [Fault.parse(spec) for spec in args.fault]
        config = EmulatorConfig(
            app_key=args.app_key,
            app_secret=args.app_secret,
            duration=args.duration,
            upload_url_ttl_s=args.upload_ttl,
            storage_dir=args.storage_dir,
            faults=faults,
            capacity=args.capacity,
            eta_error=args.eta_error,
            eta_bias=args.eta_bias,
            seed=args.seed,
            latency=args.latency,
            full_pool_ids=set(args.full_pool),
        )
    except ValueError as exc:
        print(f"speedpix-emulator: {exc}", file=sys.stderr)
        return 2
    if args.fail_workflow is not None:
        config.failing_workflow_ids = set(args.fail_workflow)
    if args.missing_workflow is not None:
        config.missing_workflow_ids = set(args.missing_workflow)
    if args.images_only_workflow is not None:
        config.images_only_workflow_ids = set(args.images_only_workflow)
    sock = bind_socket(args.host, args.port)
    port = sock.getsockname()[1]
    url_host = f"[{args.host}]" if ":" in args.host else args.host
    config.public_url = (args.public_url or f"http://{url_host}:{port}").rstrip("/")
    app = create_app(config)
    server = uvicorn.Server(make_uvicorn_config(app, access_log=args.access_log, log_level="info"))
    print(f"SpeedPix emulator listening on http://{url_host}:{port} (app key {config.app_key})", flush=True)
    # uvicorn handles SIGINT/SIGTERM (graceful shutdown), then re-raises the signal to the handler that
    # was installed before it started: make that one a no-op so a requested stop exits with status 0.
    stop_requested: list[int] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda sig, frame: stop_requested.append(sig))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        app.state.emulator.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
