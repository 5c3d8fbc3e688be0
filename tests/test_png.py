import io

import numpy as np
import pytest
from PIL import Image

from unclip.data.png import pixels_complete, read_checked

from png_helpers import adam7_png, short_png


def _saved(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "1", "I;16"])
@pytest.mark.parametrize("size", [(1, 1), (7, 5), (13, 29), (64, 64)])
def test_every_whole_png_pillow_writes_is_complete(mode, size):
    rgba = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    image = Image.fromarray(rgba, "RGBA")
    image = image.convert("I").convert("I;16") if mode == "I;16" else image.convert(mode)
    assert pixels_complete(_saved(image))


@pytest.mark.parametrize("size", [(1, 1), (3, 2), (13, 29), (64, 64)])
def test_interlaced_pngs_are_counted_pass_by_pass(size):
    array = np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    data = adam7_png(array)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), array)  # a real Adam7 file
    assert pixels_complete(data)
    assert size[1] == 1 or not pixels_complete(adam7_png(array, passes=6))  # the last pass (odd rows) missing


def test_a_stream_that_ends_early_is_incomplete_though_pillow_reads_it(tmp_path):
    array = np.full((64, 64, 3), 200, dtype=np.uint8)
    data = short_png(array, rows=32)
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert decoded[:32].min() == 200 and decoded[32:].max() == 0  # Pillow: the missing half black, no error
    assert not pixels_complete(data)
    assert pixels_complete(short_png(array, rows=64))
    (tmp_path / "short.png").write_bytes(data)
    with pytest.raises(ValueError, match="a damaged PNG: its pixel data ends before the last row"):
        read_checked(tmp_path / "short.png")
    Image.fromarray(array).save(tmp_path / "whole.jpg")
    assert read_checked(tmp_path / "whole.jpg") == (tmp_path / "whole.jpg").read_bytes()  # not a PNG: nothing to count


def test_the_damage_is_said_as_it_is():
    """Every damaged PNG was 'a damaged PNG, its pixel data ends before the last row', also one cut
    off mid-chunk or with its bytes flipped (the server said what Pillow found)."""
    from unclip.data.png import damage

    data = _saved(Image.new("RGB", (16, 16), (1, 2, 3)))
    flipped = bytearray(data)
    flipped[20] ^= 0xFF  # inside IHDR, whose checksum then fails
    assert damage(data) is None and damage(b"not a png") is None
    assert damage(data[:len(data) - 20]).startswith("the file is cut off before its end")
    assert damage(data[:40]).startswith("the file is cut off before its end")
    assert damage(bytes(flipped)) == "its bytes are damaged (a chunk does not match its checksum)"
    assert damage(data[:8]) == "its header is damaged"
    assert damage(data[:-12]) is None  # whole pixels without the closing IEND: Pillow reads it whole too


def test_broken_chunks_are_incomplete():
    data = _saved(Image.new("RGB", (16, 16), (1, 2, 3)))
    assert not pixels_complete(data[:40])  # a chunk cut short
    assert not pixels_complete(data[:8])  # no header
