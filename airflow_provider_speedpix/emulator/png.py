"""The emulator's output images, built with ``zlib`` and ``struct`` only (no Pillow).

The sample workflow is "put the product on a white background", and its output is derived from the input
image so a person can check it against the input: the input's background (the colour of its border) is
replaced by white and the product kept (``output`` / ``subject_image``), ``mask_image`` is the product's
silhouette, and the two default images of an images-only workflow are the product on white and its mirror
image. Inputs the codec (:mod:`airflow_provider_speedpix._png`) cannot decode, and tasks without an image
input, get the generated image instead: a ``background`` canvas with a ``square``, valid signature,
``IHDR``/``IDAT``/``IEND`` chunks with correct CRCs, 8-bit RGB, filter type 0 on every row.
"""

from __future__ import annotations

import functools
import hashlib
import struct
import zlib
from typing import Literal

from airflow_provider_speedpix import _png

#: outputs are at least this many pixels on their longer side (small inputs are enlarged by a whole factor)
MIN_OUTPUT_SIDE = 64
#: colour distance (sum over R, G, B) under which a pixel counts as the background
BACKGROUND_TOLERANCE = 60

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
    square: tuple[int, int, int] | Literal["seeded"] | None = "seeded",
    seed: str = "",
) -> bytes:
    """Return PNG bytes: a ``background`` canvas with a ``square`` in the middle.

    ``seed`` (e.g. a task id) moves the square deterministically and, with ``square="seeded"`` (the
    default), picks its colour: different seeds give different, reproducible images (two of 16 x 16
    positions x 2**24 colours). Unseeded, the square is grey, always at the same place.
    """
    if width <= 0 or height <= 0:
        raise ValueError("width and height must be positive")
    digest = hashlib.sha256(seed.encode("utf-8")).digest() if seed else bytes(5)
    if square == "seeded":
        square = (digest[2], digest[3], digest[4]) if seed else (128, 128, 128)
    dx = digest[0] % max(1, width // 4)
    dy = digest[1] % max(1, height // 4) - height // 8 if seed else 0
    x0, x1 = width // 4 + dx - width // 8, 3 * width // 4 + dx - width // 8
    y0, y1 = height // 4 + dy, 3 * height // 4 + dy
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
def output_png(task_id: str, variant: str = "output", source: bytes | None = None) -> bytes:
    """The (cached) image served for ``outputs/<task_id>/<variant>.png``: derived from ``source`` (the
    task's input image) when it decodes, else the generated image."""
    if source is not None:
        try:
            return derived_png(source, variant)
        except _png.PNGError:
            pass
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


def _background(image: _png.Image) -> tuple[int, int, int]:
    """The input's background colour: the most common colour of its border pixels (on white)."""
    counts: dict[tuple[int, int, int], int] = {}
    w, h = image.width, image.height
    border = [(x, y) for x in range(w) for y in (0, h - 1)] + [(x, y) for y in range(h) for x in (0, w - 1)]
    for x, y in border:
        r, g, b, a = image.pixel(x, y)
        key = (
            (r * a + 255 * (255 - a)) // 255,
            (g * a + 255 * (255 - a)) // 255,
            (b * a + 255 * (255 - a)) // 255,
        )
        counts[key] = counts.get(key, 0) + 1
    return max(counts, key=lambda k: counts[k])


def derived_png(source: bytes, variant: str = "output") -> bytes:
    """``source`` with its background replaced by white (``mask_image``: the product white on black;
    ``ComfyUI_00002_``: mirrored). Raises :class:`~airflow_provider_speedpix._png.PNGError` for inputs
    the codec does not decode."""
    image = _png.decode(source, max_pixels=2048 * 2048)
    w, h = image.width, image.height
    rgb = bytearray(_png.on_white(image))
    bg = _background(image)
    for i in range(w * h):
        r, g, b = rgb[3 * i : 3 * i + 3]
        is_bg = abs(r - bg[0]) + abs(g - bg[1]) + abs(b - bg[2]) <= BACKGROUND_TOLERANCE
        if variant == "mask_image":
            rgb[3 * i : 3 * i + 3] = b"\x00\x00\x00" if is_bg else b"\xff\xff\xff"
        elif is_bg:
            rgb[3 * i : 3 * i + 3] = b"\xff\xff\xff"
    if variant == "ComfyUI_00002_":
        rows = [rgb[3 * w * y : 3 * w * (y + 1)] for y in range(h)]
        rgb = bytearray(
            b"".join(b"".join(bytes(row[3 * x : 3 * x + 3]) for x in reversed(range(w))) for row in rows)
        )
    factor = -(-MIN_OUTPUT_SIDE // max(w, h)) if max(w, h) < MIN_OUTPUT_SIDE else 1
    if factor > 1:
        return _png.encode_rgb(
            w * factor, h * factor, _png.scale_rgb(bytes(rgb), w, h, w * factor, h * factor)
        )
    return _png.encode_rgb(w, h, bytes(rgb))
