"""A small pure-Python PNG codec (``zlib`` and ``struct`` only; Pillow is not a dependency of Airflow).

Shared by the emulator (its sample workflow derives its output from the input image) and the gallery
plugin (server-side thumbnails). Decodes the non-interlaced PNGs that products and tests use: greyscale,
RGB, palette (with ``tRNS``), greyscale+alpha and RGBA, at bit depths 1-16, every filter type. Anything
else (interlaced, corrupt, too large) raises :class:`PNGError`, and callers fall back.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: decoding is pure Python: refuse images above this many pixels (callers fall back)
MAX_PIXELS = 4096 * 4096
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


class PNGError(ValueError):
    """Not a PNG this codec decodes."""


@dataclass(frozen=True)
class Image:
    """8-bit RGBA pixels, row-major, 4 bytes a pixel."""

    width: int
    height: int
    rgba: bytes

    def pixel(self, x: int, y: int) -> tuple[int, int, int, int]:
        i = 4 * (y * self.width + x)
        r, g, b, a = self.rgba[i : i + 4]
        return r, g, b, a


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def encode_rgb(width: int, height: int, rgb: bytes, *, level: int = 9) -> bytes:
    """8-bit truecolour PNG of ``rgb`` (3 bytes a pixel); rows use the Sub filter (smaller files)."""
    if width <= 0 or height <= 0 or len(rgb) != 3 * width * height:
        raise ValueError("rgb must hold 3 * width * height bytes")
    stride = 3 * width
    out = bytearray()
    for y in range(height):
        row = rgb[y * stride : (y + 1) * stride]
        out.append(1)  # Sub: each byte minus the same channel of the pixel to its left
        out += row[:3]
        out += bytes((row[i] - row[i - 3]) & 0xFF for i in range(3, stride))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        PNG_SIGNATURE
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(bytes(out), level))
        + _chunk(b"IEND", b"")
    )


def _chunks(data: bytes) -> dict[bytes, bytes]:
    if not data.startswith(PNG_SIGNATURE):
        raise PNGError("not a PNG: bad signature")
    pos, found = len(PNG_SIGNATURE), {}  # type: ignore[var-annotated]
    idat = bytearray()
    while pos + 12 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if len(body) != length:
            raise PNGError("truncated chunk")
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        if zlib.crc32(kind + body) & 0xFFFFFFFF != crc:
            raise PNGError(f"bad CRC in {kind!r} chunk")
        if kind == b"IDAT":
            idat += body
        else:
            found.setdefault(kind, body)
        pos += 12 + length
        if kind == b"IEND":
            break
    if b"IHDR" not in found or not idat:
        raise PNGError("no IHDR or IDAT")
    found[b"IDAT"] = bytes(idat)
    return found


def _unfilter(raw: bytes, height: int, stride: int, bpp: int) -> bytearray:
    out = bytearray(height * stride)
    prev = bytearray(stride)
    pos = 0
    for y in range(height):
        kind = raw[pos]
        line = bytearray(raw[pos + 1 : pos + 1 + stride])
        pos += 1 + stride
        if len(line) != stride:
            raise PNGError("image data too short")
        if kind == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 0xFF
        elif kind == 2:
            for i in range(stride):
                line[i] = (line[i] + prev[i]) & 0xFF
        elif kind == 3:
            for i in range(stride):
                left = line[i - bpp] if i >= bpp else 0
                line[i] = (line[i] + ((left + prev[i]) >> 1)) & 0xFF
        elif kind == 4:
            for i in range(stride):
                a = line[i - bpp] if i >= bpp else 0
                b = prev[i]
                c = prev[i - bpp] if i >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                line[i] = (line[i] + pred) & 0xFF
        elif kind != 0:
            raise PNGError(f"unknown filter type {kind}")
        out[y * stride : (y + 1) * stride] = line
        prev = line
    return out


def decode(data: bytes, *, max_pixels: int = MAX_PIXELS) -> Image:
    """Decode ``data`` to 8-bit RGBA. Raises :class:`PNGError` for what it does not handle."""
    chunks = _chunks(data)
    try:
        width, height, depth, colour, _comp, _filter, interlace = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
    except struct.error as err:
        raise PNGError(f"bad IHDR: {err}") from None
    if colour not in _CHANNELS or depth not in (1, 2, 4, 8, 16):
        raise PNGError(f"unsupported colour type {colour} / bit depth {depth}")
    if interlace:
        raise PNGError("interlaced PNGs are not supported")
    if width <= 0 or height <= 0 or width * height > max_pixels:
        raise PNGError(f"image size {width}x{height} not supported")
    channels = _CHANNELS[colour]
    bits = channels * depth
    stride = (width * bits + 7) // 8
    try:
        raw = zlib.decompress(chunks[b"IDAT"])
    except zlib.error as err:
        raise PNGError(f"bad image data: {err}") from None
    pixels = _unfilter(raw, height, stride, max(1, bits // 8))

    # samples per row, scaled to 8 bits
    def samples(row: bytes | bytearray) -> list[int]:
        if depth == 8:
            return list(row)
        if depth == 16:
            return list(row[0::2])
        per_byte, mask, scale = 8 // depth, (1 << depth) - 1, 255 // ((1 << depth) - 1)
        values = []
        for byte in row:
            for k in range(per_byte):
                values.append((byte >> (8 - depth * (k + 1))) & mask)
        values = values[: width * channels]
        return values if colour == 3 else [v * scale for v in values]

    palette: list[tuple[int, int, int, int]] = []
    if colour == 3:
        plte = chunks.get(b"PLTE", b"")
        alphas = chunks.get(b"tRNS", b"")
        palette = [
            (plte[i], plte[i + 1], plte[i + 2], alphas[i // 3] if i // 3 < len(alphas) else 255)
            for i in range(0, len(plte) - 2, 3)
        ]
        if not palette:
            raise PNGError("palette image without PLTE")
    out = bytearray(4 * width * height)
    o = 0
    for y in range(height):
        s = samples(pixels[y * stride : (y + 1) * stride])
        if colour == 2:
            for x in range(width):
                out[o : o + 4] = bytes((s[3 * x], s[3 * x + 1], s[3 * x + 2], 255))
                o += 4
        elif colour == 6:
            out[o : o + 4 * width] = bytes(s[: 4 * width])
            o += 4 * width
        elif colour == 0:
            for v in s[:width]:
                out[o : o + 4] = bytes((v, v, v, 255))
                o += 4
        elif colour == 4:
            for x in range(width):
                v = s[2 * x]
                out[o : o + 4] = bytes((v, v, v, s[2 * x + 1]))
                o += 4
        else:
            for index in s[:width]:
                if index >= len(palette):
                    raise PNGError("palette index out of range")
                out[o : o + 4] = bytes(palette[index])
                o += 4
    return Image(width, height, bytes(out))


def on_white(image: Image) -> bytes:
    """The image's RGB with transparency composited over white."""
    rgba = image.rgba
    rgb = bytearray(3 * image.width * image.height)
    for i in range(image.width * image.height):
        r, g, b, a = rgba[4 * i : 4 * i + 4]
        if a == 255:
            rgb[3 * i : 3 * i + 3] = bytes((r, g, b))
        else:
            rgb[3 * i : 3 * i + 3] = bytes(((c * a + 255 * (255 - a)) // 255) for c in (r, g, b))
    return bytes(rgb)


def scale_rgb(rgb: bytes, width: int, height: int, new_width: int, new_height: int) -> bytes:
    """Resample ``rgb``: box-average when shrinking (smooth thumbnails), nearest when enlarging."""
    out = bytearray(3 * new_width * new_height)
    o = 0
    for ny in range(new_height):
        y0 = ny * height // new_height
        y1 = max(y0 + 1, (ny + 1) * height // new_height)
        for nx in range(new_width):
            x0 = nx * width // new_width
            x1 = max(x0 + 1, (nx + 1) * width // new_width)
            if (y1 - y0) * (x1 - x0) == 1:
                i = 3 * (y0 * width + x0)
                out[o : o + 3] = rgb[i : i + 3]
            else:
                sums = [0, 0, 0]
                for y in range(y0, y1):
                    base = 3 * (y * width)
                    for x in range(x0, x1):
                        i = base + 3 * x
                        sums[0] += rgb[i]
                        sums[1] += rgb[i + 1]
                        sums[2] += rgb[i + 2]
                n = (y1 - y0) * (x1 - x0)
                out[o : o + 3] = bytes((sums[0] // n, sums[1] // n, sums[2] // n))
            o += 3
    return bytes(out)


def fit(width: int, height: int, max_side: int) -> tuple[int, int]:
    """``width`` x ``height`` shrunk (never enlarged) so that the longer side is at most ``max_side``."""
    if max(width, height) <= max_side:
        return width, height
    if width >= height:
        return max_side, max(1, round(height * max_side / width))
    return max(1, round(width * max_side / height)), max_side


def thumbnail(data: bytes, max_side: int = 256, *, max_pixels: int = MAX_PIXELS) -> bytes:
    """A PNG no larger than ``max_side`` on its longer side (transparency shown on white)."""
    image = decode(data, max_pixels=max_pixels)
    width, height = fit(image.width, image.height, max_side)
    rgb = on_white(image)
    if (width, height) != (image.width, image.height):
        rgb = scale_rgb(rgb, image.width, image.height, width, height)
    return encode_rgb(width, height, rgb)
