"""A scripted HTTP/1.1 server on 127.0.0.1 for the async transport's narrow cases (error mapping, retries,
body limits) that the emulator's faults do not cover: each request gets the next step of the script (the
last step repeats), and every request is recorded as it arrived. It runs in its own thread, so a test's
``asyncio.run`` talks to it over a real socket, as the trigger talks to SpeedPix.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Answer:
    """An HTTP response; ``chunked`` sends the body without a Content-Length."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    chunked: bool = False


@dataclass
class Stall:
    """Answer nothing for ``seconds``, then drop the connection (a read timeout for the client)."""

    seconds: float


#: Drop the connection without answering (a reset / "server disconnected" for the client).
RESET = "reset"

Step = Answer | Stall | str


@dataclass
class Recorded:
    path: str
    headers: Message
    body: bytes


class ScriptedServer:
    """``with ScriptedServer([Answer(503), Answer(200, body=...)]) as server:`` ... ``server.url``."""

    def __init__(self, script: list[Step]) -> None:
        self.script = list(script)
        self.requests: list[Recorded] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                outer.requests.append(Recorded(self.path, self.headers, self.rfile.read(length)))
                time.sleep(0.002)  # distinct millisecond timestamps between attempts
                step = outer.script.pop(0) if len(outer.script) > 1 else outer.script[0]
                if isinstance(step, Stall):
                    time.sleep(step.seconds)
                if not isinstance(step, Answer):
                    self.close_connection = True
                    return
                self.send_response(step.status)
                for key, value in step.headers.items():
                    self.send_header(key, value)
                if step.chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(step.body), step.body))
                else:
                    self.send_header("Content-Length", str(len(step.body)))
                    self.end_headers()
                    self.wfile.write(step.body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> ScriptedServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def closed_port_url() -> str:
    """``http://127.0.0.1:PORT`` where nothing listens: connecting is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


@contextlib.contextmanager
def full_backlog_port() -> Iterator[int]:
    """A port that accepts no connection in time: its listen backlog is already full, so connecting hangs
    (for aiohttp a ``ConnectionTimeoutError``, whose message is the full URL, query string included)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):  # fills the backlog
            yield port
