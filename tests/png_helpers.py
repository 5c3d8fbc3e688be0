"""PNGs Pillow does not write: one whose pixel stream ends early, and an interlaced (Adam7) one."""

import struct
import zlib

import numpy as np

from unclip.data.png import ADAM7, SIGNATURE


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png(array: np.ndarray, stream: bytes, interlace: int) -> bytes:
    height, width, _ = array.shape
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, interlace)  # 8-bit RGB
    return SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(stream)) + _chunk(b"IEND", b"")


def short_png(array: np.ndarray, rows: int) -> bytes:
    """An 8-bit RGB PNG of `array` [H, W, 3] whose complete, valid stream holds only its first `rows` rows."""
    return _png(array, b"".join(b"\x00" + row.tobytes() for row in array[:rows]), 0)


def adam7_png(array: np.ndarray, passes: int = 7) -> bytes:
    """`array` [H, W, 3] uint8 as an interlaced 8-bit RGB PNG (holding only its first `passes` passes)."""
    subimages = (array[y0::dy, x0::dx] for x0, y0, dx, dy in ADAM7[:passes])
    stream = b"".join(b"\x00" + row.tobytes() for sub in subimages if sub.size for row in sub)
    return _png(array, stream, 1)
