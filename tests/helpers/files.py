"""Files the prediction tests feed: PNG images of given pixels, and the CSV they get back."""

from __future__ import annotations

import csv
import struct
import zlib
from pathlib import Path

import numpy as np


def png_bytes(pixels: np.ndarray, bits: int = 8) -> bytes:
    """A PNG of (H, W, C) pixels (C 1 gray, 3 RGB, 4 RGBA) at 8 or 16 bits per sample."""
    height, width, channels = pixels.shape
    color_type = {1: 0, 3: 2, 4: 6}[channels]
    dtype = ">u2" if bits == 16 else "u1"
    raw = b"".join(b"\x00" + row.astype(dtype).tobytes() for row in pixels)

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, bits, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))
