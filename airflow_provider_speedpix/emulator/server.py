"""Run the emulator in a background thread on a free port (tests, benchmarks, notebooks).

>>> with EmulatorServer(duration=1.0) as emu:          # doctest: +SKIP
...     client = speedpix.Client(emu.app_key, emu.app_secret, endpoint=emu.url)
...     emu.inject("comfy_prompt", "429")
...     emu.stats()["calls"]["comfy_prompt"]

Helper methods (``stats``, ``inject``, ``reset``, ``configure``...) talk to the admin endpoints over HTTP,
so they are safe to call from any thread while the server runs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import uvicorn

from .app import EmulatorConfig, create_app
from .clock import Clock
from .faults import Fault

_SECRET_QUERY = re.compile(r"(Signature=)[^&\s\"']+")


class RedactUploadTokens(logging.Filter):
    """Scrub pre-signed upload tokens (``Signature=...``) from log records (uvicorn's access log)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and record.args:
            record.args = tuple(
                _SECRET_QUERY.sub(r"\1REDACTED", a) if isinstance(a, str) else a for a in record.args
            )
        if isinstance(record.msg, str) and "Signature=" in record.msg:
            record.msg = _SECRET_QUERY.sub(r"\1REDACTED", record.msg)
        return True


def _install_redaction() -> None:
    for name in ("uvicorn.access", "uvicorn.error"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactUploadTokens) for f in logger.filters):
            logger.addFilter(RedactUploadTokens())


def best_uvicorn_options() -> dict[str, Any]:
    """``httptools`` and ``uvloop`` when importable, else uvicorn's pure-Python fallbacks."""
    options: dict[str, Any] = {"http": "h11", "loop": "asyncio"}
    try:
        import httptools  # noqa: F401

        options["http"] = "httptools"
    except ImportError:
        pass
    try:
        import uvloop  # noqa: F401

        options["loop"] = "uvloop"
    except ImportError:
        pass
    return options


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def make_uvicorn_config(app: Any, *, access_log: bool = False, log_level: str = "warning") -> uvicorn.Config:
    _install_redaction()
    return uvicorn.Config(
        app,
        log_level=log_level,
        access_log=access_log,
        timeout_graceful_shutdown=2,
        timeout_keep_alive=30,
        server_header=False,
        **best_uvicorn_options(),
    )


class EmulatorServer:
    """The emulator served by uvicorn in a daemon thread."""

    def __init__(
        self,
        config: EmulatorConfig | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        access_log: bool = False,
        **config_overrides: Any,
    ) -> None:
        base = config or EmulatorConfig()
        self.config = dataclasses.replace(base, **config_overrides) if config_overrides else base
        self.host = host
        self.port = port
        self.access_log = access_log
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self.app: Any = None

    # -- lifecycle -------------------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> EmulatorServer:
        if self._thread is not None:
            return self
        self._sock = bind_socket(self.host, self.port)
        self.port = self._sock.getsockname()[1]
        url_host = f"[{self.host}]" if ":" in self.host else self.host
        self.config.public_url = f"http://{url_host}:{self.port}"
        self.app = create_app(self.config)
        self._server = uvicorn.Server(make_uvicorn_config(self.app, access_log=self.access_log))
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, name="speedpix-emulator", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._admin("GET", "/_emulator/health", timeout=1.0)
                return self
            except (OSError, urllib.error.URLError):
                if not self._thread.is_alive() or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("the SpeedPix emulator did not start") from None
                time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        if self._sock is not None:
            self._sock.close()
        if self.app is not None:
            self.app.state.emulator.close()
        self._server = self._thread = self._sock = None

    def __enter__(self) -> EmulatorServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- properties ------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return self.config.public_url

    @property
    def app_key(self) -> str:
        return self.config.app_key

    @property
    def app_secret(self) -> str:
        return self.config.app_secret

    @property
    def clock(self) -> Clock:
        """The emulator's clock (a :class:`~.clock.ManualClock` lets tests move time: same process)."""
        return self.config.clock

    # -- admin helpers (over HTTP) ---------------------------------------------------------------------

    def _admin(self, method: str, path: str, payload: Any = None, timeout: float = 10.0) -> Any:
        data = None if payload is None else json.dumps(payload).encode("utf-8")
        request = urllib.request.Request(f"{self.url}{path}", data=data, method=method)  # noqa: S310
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - loopback
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")
            raise ValueError(f"emulator admin call {method} {path} failed: {exc.code} {detail}") from None

    def stats(self) -> dict:
        return self._admin("GET", "/_emulator/stats")

    def calls(self, operation: str) -> int:
        return self.stats()["calls"][operation]

    def inject(self, operation: str, kind: str, times: int = 1, delay: float = 0.0) -> None:
        Fault(operation, str(kind), times, delay)  # validate locally for a clear error
        self._admin(
            "POST",
            "/_emulator/faults",
            {"operation": operation, "kind": str(kind), "times": times, "delay": delay},
        )

    def pending_faults(self) -> list[dict]:
        return self._admin("GET", "/_emulator/faults")["faults"]

    def clear_faults(self) -> None:
        self._admin("DELETE", "/_emulator/faults")

    def reset(self) -> None:
        self._admin("POST", "/_emulator/reset")

    def configure(self, **settings: Any) -> dict:
        """Change runtime settings (``config.RUNTIME_SETTINGS``: ``duration``, ``upload_url_ttl_s``,
        ``timestamp_window_s``, ``eta_error``, ``eta_bias``, the ``*_workflow_ids`` and ``full_pool_ids``);
        :meth:`reset` restores the start values."""
        payload = {k: sorted(v) if isinstance(v, set | frozenset) else v for k, v in settings.items()}
        return self._admin("POST", "/_emulator/config", payload)
