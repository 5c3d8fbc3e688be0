"""Whether a PNG holds all of its pixels.

Pillow decodes a PNG whose compressed pixel stream ends cleanly but early without a word and
fills the missing rows with black (a file cut at a chunk boundary and given a new end, or written
by a broken encoder). `pixels_complete` counts the bytes the stream inflates to against what the
header promises, so such a file is refused like any other corrupt image instead of being read as
an image with a black band.
"""

from __future__ import annotations

import os
import struct
import zlib

SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by colour type: grey, RGB, palette, grey + alpha, RGBA
ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def is_png(data: bytes) -> bool:
    return data.startswith(SIGNATURE)


def damage(data: bytes) -> str | None:
    """What keeps the PNG `data` from decoding whole, in plain words, or None: every row its header
    declares inflates (and for anything that is not a PNG, which this cannot judge). A chunk cut off
    at the end of the file, a chunk other than the pixel data whose bytes fail its checksum (as
    Pillow checks them), a damaged header, a pixel stream that does not inflate or ends early."""
    if not is_png(data):
        return None
    header, stream, offset = None, [], len(SIGNATURE)
    while offset + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[offset:offset + 8])
        if not kind.isalpha():
            return "its bytes are damaged (a chunk's name is not one)"
        body, crc = data[offset + 8:offset + 8 + length], data[offset + 8 + length:offset + 12 + length]
        if len(body) < length or (len(crc) < 4 and kind not in (b"IDAT", b"IEND")):
            return "the file is cut off before its end, as a download or copy that stopped early is"
        if kind != b"IDAT" and len(crc) == 4 and zlib.crc32(kind + body) != struct.unpack(">I", crc)[0]:
            return "its bytes are damaged (a chunk does not match its checksum)"
        if kind == b"IHDR" and length >= 13:
            header = struct.unpack(">IIBBBBB", body[:13])
        elif kind == b"IDAT":
            stream.append(body)
        elif kind == b"IEND":
            break
        offset += 12 + length
    else:
        if len(SIGNATURE) < offset < len(data):  # stopped inside the next chunk's length and name
            return "the file is cut off before its end, as a download or copy that stopped early is"
    if header is None or header[3] not in CHANNELS:
        return "its header is damaged"
    width, height, depth, colour, _, _, interlace = header
    expected = _raw_size(width, height, CHANNELS[colour] * depth, interlace == 1)
    try:
        inflated = zlib.decompressobj().decompress(b"".join(stream), expected)
    except zlib.error:
        return "its pixel data is damaged"
    return None if len(inflated) == expected else "its pixel data ends before the last row"


def pixels_complete(data: bytes) -> bool:
    """Whether the PNG `data` inflates to every row its header declares (`damage`: False for a PNG
    whose chunks or stream are broken, too; True for anything that is not a PNG)."""
    return damage(data) is None


def check_complete(data: bytes) -> None:
    """Raise ValueError (what Pillow raises for other damage, so callers' handlers catch it) when the
    PNG `data` is damaged (`damage`), saying how."""
    if (what := damage(data)) is not None:
        raise ValueError(f"a damaged PNG: {what}")


def read_checked(path: str | os.PathLike) -> bytes:
    """A file's bytes, read once, after `check_complete`: open them with `io.BytesIO`."""
    with open(path, "rb") as handle:
        data = handle.read()
    check_complete(data)
    return data


def open_bytes(data: bytes):
    """`PIL.Image.open` of an image file's bytes; what PIL cannot identify says so without naming its
    in-memory buffer ("cannot identify image file <_io.BytesIO object at 0x…>")."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise UnidentifiedImageError("not an image file PIL can read (PNG, JPEG, WebP, GIF, BMP, TIFF, …)") from None


def _raw_size(width: int, height: int, bits_per_pixel: int, interlaced: bool) -> int:
    """Bytes of filtered scanlines (one filter byte per row) a width × height image inflates to."""
    def rows(w: int, h: int) -> int:
        return 0 if w == 0 or h == 0 else h * (1 + (w * bits_per_pixel + 7) // 8)

    if not interlaced:
        return rows(width, height)
    return sum(rows(max(0, -(-(width - x0) // dx)), max(0, -(-(height - y0) // dy))) for x0, y0, dx, dy in ADAM7)
