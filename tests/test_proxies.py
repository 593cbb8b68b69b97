"""Proxies: each request follows the environment's proxy rules for its own host, as plain ``requests``
does, on the worker's session and on the trigger's shared client (aiohttp, given requests' answer).

The hook talks to the emulator's API as ``localhost`` while upload and output URLs name ``127.0.0.1``:
two hosts that ``NO_PROXY`` can tell apart. :class:`RecordingProxy` is a small forward proxy on a real
socket that records which host each request was for and relays it.
"""

from __future__ import annotations

import asyncio
import http.client
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from airflow_provider_speedpix import _transport
from airflow_provider_speedpix.exceptions import SpeedPixTransportError
from airflow_provider_speedpix.hooks.speedpix import SpeedPixHook
from tests.conftest import use_speedpix_connection

PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authorization", "transfer-encoding"}


class RecordingProxy:
    """A forward proxy for plain http: records ``(method, host:port)`` and relays the exchange."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def relay(self) -> None:
                target = urllib.parse.urlsplit(self.path)
                outer.seen.append((self.command, target.netloc))
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                upstream = http.client.HTTPConnection(target.hostname, target.port, timeout=10)
                path = target.path + (f"?{target.query}" if target.query else "")
                upstream.request(self.command, path, body=body, headers=headers)
                answer = upstream.getresponse()
                data = answer.read()
                upstream.close()
                self.send_response(answer.status)
                for key, value in answer.getheaders():
                    if key.lower() not in HOP_BY_HOP | {"content-length"}:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(data)
                self.close_connection = True

            do_GET = do_POST = do_PUT = relay

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def hosts(self) -> set[str]:
        return {host.split(":")[0] for _, host in self.seen}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy():
    server = RecordingProxy()
    yield server
    server.close()


@pytest.fixture
def api_as_localhost(emulator, monkeypatch):
    """The connection names the API ``localhost``; storage URLs keep the emulator's ``127.0.0.1``."""
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    port = urllib.parse.urlsplit(emulator.url).port
    use_speedpix_connection(
        monkeypatch,
        host=f"http://localhost:{port}",
        login=emulator.app_key,
        password=emulator.app_secret,
        extra={"retry_delay": 0.01, "retry_max_delay": 0.05, "retry_limit": 2, "timeout": 5},
    )
    return emulator


def use_proxy(monkeypatch, proxy: RecordingProxy | str, no_proxy: str) -> None:
    url = proxy if isinstance(proxy, str) else proxy.url
    monkeypatch.setenv("HTTP_PROXY", url)
    monkeypatch.setenv("NO_PROXY", no_proxy)


def upload_and_download(tmp_path: Path) -> bytes:
    source = tmp_path / "in.png"
    source.write_bytes(b"\x89PNG" + b"proxied" * 100)
    hook = SpeedPixHook()
    uploaded = hook.upload_file(source)
    written = hook.download(uploaded.access_url, tmp_path / "out.png")
    assert written.read_bytes() == source.read_bytes()
    return source.read_bytes()


# ---------------------------------------------------------------------- the worker's session
def test_api_through_the_proxy_storage_direct(api_as_localhost, proxy, monkeypatch, tmp_path):
    use_proxy(monkeypatch, proxy, no_proxy="127.0.0.1")
    upload_and_download(tmp_path)
    assert proxy.seen  # the upload-sign call went through it
    assert proxy.hosts() == {"localhost"}
    assert {method for method, _ in proxy.seen} == {"POST"}


def test_storage_through_the_proxy_api_direct(api_as_localhost, proxy, monkeypatch, tmp_path):
    use_proxy(monkeypatch, proxy, no_proxy="localhost")
    upload_and_download(tmp_path)
    assert proxy.hosts() == {"127.0.0.1"}
    assert sorted({method for method, _ in proxy.seen}) == ["GET", "PUT"]


def test_proxies_are_looked_up_once_per_host(monkeypatch):
    """The B5 performance fix stays: no environment scan per request, one lookup per host."""
    lookups: list[str] = []
    real = requests.utils.get_environ_proxies

    def counting(url, no_proxy=None):
        lookups.append(urllib.parse.urlsplit(url).netloc)
        return real(url, no_proxy=no_proxy)

    monkeypatch.setattr(requests.utils, "get_environ_proxies", counting)
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.test:3128")
    monkeypatch.setenv("NO_PROXY", "storage.test")
    session = _transport.new_session()
    for _ in range(5):
        api = session.merge_environment_settings("http://api.test/scc/x", {}, None, None, None)
        storage = session.merge_environment_settings(
            "http://storage.test/k?Signature=s", {}, None, None, None
        )
    assert api["proxies"]["http"] == "http://proxy.test:3128"
    assert "http" not in storage["proxies"]
    assert lookups == ["api.test", "storage.test"]
    # an explicit per-request or per-session proxy still wins over the environment
    session.proxies["http"] = "http://mine.test:1"
    assert session.merge_environment_settings("http://api.test/", {}, None, None, None)["proxies"][
        "http"
    ] == ("http://mine.test:1")


def test_unreachable_proxy_is_named_and_never_reached_the_api(api_as_localhost, monkeypatch):
    use_proxy(monkeypatch, "http://127.0.0.1:9", no_proxy="")
    with pytest.raises(SpeedPixTransportError, match=r"proxy could not be reached.*NO_PROXY") as info:
        SpeedPixHook().get_prediction("any-id")
    assert info.value.reached_server is False
    assert info.value.__cause__ is None


# ---------------------------------------------------------------------- the trigger's shared client
@pytest.mark.parametrize(("no_proxy", "through_proxy"), [("127.0.0.1", True), ("localhost", False)])
def test_async_api_calls_follow_the_rule_for_their_host(
    api_as_localhost, proxy, monkeypatch, no_proxy, through_proxy
):
    prediction = SpeedPixHook().create_prediction("sleep-100", {})
    use_proxy(monkeypatch, proxy, no_proxy=no_proxy)
    status = asyncio.run(SpeedPixHook().aget_prediction(prediction.id)).status
    assert status == "waiting"
    assert proxy.hosts() == ({"localhost"} if through_proxy else set())


def test_async_unreachable_proxy_is_named_and_never_reached_the_api(api_as_localhost, monkeypatch):
    use_proxy(monkeypatch, "http://127.0.0.1:9", no_proxy="")
    with pytest.raises(SpeedPixTransportError, match=r"proxy could not be reached.*NO_PROXY") as info:
        asyncio.run(SpeedPixHook().aget_prediction("any-id"))
    assert info.value.reached_server is False
    assert info.value.__cause__ is None and info.value.__context__ is None
