"""A real, deterministic PNG built with ``zlib`` and ``struct`` only (no Pillow).

The emulator's "workflow outputs" are these images: valid signature, ``IHDR``/``IDAT``/``IEND`` chunks with
correct CRCs, 8-bit RGB, filter type 0 on every row, so any decoder (and ``zlib.decompress`` of the
``IDAT`` payload) accepts them.
"""

from __future__ import annotations

import functools
import hashlib
import struct
import zlib

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def make_png(
    width: int = 64,
    height: int = 64,
    *,
    background: tuple[int, int, int] = (255, 255, 255),
    square: tuple[int, int, int] | None = (128, 128, 128),
    seed: str = "",
) -> bytes:
    """Return PNG bytes: a ``background`` canvas with a ``square`` in the middle.

    ``seed`` (e.g. a task id) shifts the square deterministically, so different tasks can produce
    different but reproducible images.
    """
    if width <= 0 or height <= 0:
        raise ValueError("width and height must be positive")
    offset = hashlib.sha256(seed.encode("utf-8")).digest()[0] % max(1, width // 4) if seed else 0
    x0, x1 = width // 4 + offset - width // 8, 3 * width // 4 + offset - width // 8
    y0, y1 = height // 4, 3 * height // 4
    bg = bytes(background)
    rows = []
    for y in range(height):
        if square is not None and y0 <= y < y1:
            row = bytearray(bg * width)
            for x in range(max(0, x0), min(width, x1)):
                row[3 * x : 3 * x + 3] = bytes(square)
            rows.append(b"\x00" + bytes(row))
        else:
            rows.append(b"\x00" + bg * width)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit, truecolour RGB
    return (
        PNG_SIGNATURE
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(b"".join(rows), 9))
        + _chunk(b"IEND", b"")
    )


@functools.lru_cache(maxsize=256)
def output_png(task_id: str, variant: str = "output") -> bytes:
    """The (cached) image served for ``outputs/<task_id>/<variant>.png``."""
    if variant == "mask_image":
        return make_png(background=(0, 0, 0), square=(255, 255, 255), seed=task_id)
    if variant == "subject_image":
        return make_png(background=(255, 255, 255), square=(200, 80, 60), seed=task_id)
    # the sample workflow's output keeps its historic seed; other images (default outputs) differ from it
    return make_png(seed=task_id if variant == "output" else f"{task_id}/{variant}")


def parse_png(data: bytes) -> dict:
    """Minimal PNG reader used by tests and tools: checks CRCs, returns IHDR fields and raw pixels."""
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError("not a PNG: bad signature")
    pos = len(PNG_SIGNATURE)
    chunks: list[bytes] = []
    idat = b""
    header: dict = {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        if zlib.crc32(kind + body) & 0xFFFFFFFF != crc:
            raise ValueError(f"bad CRC in {kind!r} chunk")
        chunks.append(kind)
        if kind == b"IHDR":
            w, h, depth, colour, _, _, _ = struct.unpack(">IIBBBBB", body)
            header = {"width": w, "height": h, "bit_depth": depth, "colour_type": colour}
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
        if kind == b"IEND":
            break
    if not chunks or chunks[0] != b"IHDR" or chunks[-1] != b"IEND" or b"IDAT" not in chunks:
        raise ValueError(f"bad chunk layout: {chunks!r}")
    raw = zlib.decompress(idat)
    return {**header, "chunks": [c.decode("ascii") for c in chunks], "raw": raw}
