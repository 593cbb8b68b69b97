"""The floor of B1: a minimal HTTP/1.1 keep-alive client on raw asyncio streams (benchmark only).

It does what any client must do for one status call and nothing else: sign the request (the same
``sign_request`` as the provider), write it on a pooled keep-alive connection, read the status line,
headers and a ``Content-Length`` body, and parse the JSON envelope. No proxies, no timeouts, no retries,
no chunked encoding, no TLS: it only works against the emulator, which is why it is a floor and not a
client.
"""

from __future__ import annotations

import asyncio
import json
import urllib.parse
from typing import Any

from airflow_provider_speedpix import _protocol as proto
from airflow_provider_speedpix._signing import sign_request


class RawPool:
    """``size`` keep-alive connections to one ``http://host:port``; a request waits for a free one."""

    def __init__(self, url: str, size: int) -> None:
        parts = urllib.parse.urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.authority = parts.netloc.encode()
        self.size = size
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._slots = asyncio.Semaphore(size)

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        async with self._slots:
            if self._idle:
                reader, writer = self._idle.pop()
            else:
                reader, writer = await asyncio.open_connection(self.host, self.port)
            head = [f"POST {path} HTTP/1.1", f"Host: {self.authority.decode()}"]
            head += [f"{k}: {v}" for k, v in headers.items()]
            head.append(f"Content-Length: {len(body)}")
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
            raw = await reader.readuntil(b"\r\n\r\n")
            lines = raw.split(b"\r\n")
            status = int(lines[0].split(b" ", 2)[1])
            length = 0
            for line in lines[1:]:
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            content = await reader.readexactly(length)
            self._idle.append((reader, writer))
            return status, content

    async def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()


async def progress(pool: RawPool, prediction_id: str, app_key: str, app_secret: str) -> dict[str, Any]:
    """One signed ``comfy_get_progress`` call; returns the envelope's ``data``."""
    path = proto.PATHS[proto.PROGRESS]
    body = json.dumps({"taskId": prediction_id}).encode()
    headers = sign_request(method="POST", path=path, body=body, app_key=app_key, app_secret=app_secret)
    status, content = await pool.post(path, body, headers)
    if status != 200:
        raise RuntimeError(f"status {status}")
    return json.loads(content)["data"]
