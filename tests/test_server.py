"""`unclip serve`: the OpenAI Images API on a live loopback server, driven by the official client.

The server runs a tiny untrained model (built as in test_pipeline.py) in a thread of this
process; the page (test_server_page.py) and the schemathesis run (test_server_schema.py) use
the same helpers.
"""

import base64
import io
import json
import re
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import httpx2 as httpx
import numpy as np
import pytest
from PIL import Image

from png_helpers import short_png

_MODEL = {}


def tiny_model(tmp_path_factory):
    """A tiny untrained model directory with both priors and one ×4 upsampler (16² → 64²), built once."""
    if "dir" not in _MODEL:
        from tiny_models import save_tiny_clip, save_tiny_stages

        from unclip.pipeline.assemble import assemble

        root = tmp_path_factory.mktemp("server-model")
        dirs = save_tiny_stages(root, save_tiny_clip(root))
        _MODEL["dir"] = assemble(root / "model", decoder=dirs["decoder"], prior=dirs["prior"],
                                 ar_prior=dirs["ar_prior"], upsamplers=(dirs["upsampler"],))
    return _MODEL["dir"]


@contextmanager
def live_server(pipe, **options):
    """A live server for `pipe` on a free loopback port; yields its base URL."""
    from unclip.serve.app import ServerOptions, create_app
    from unclip.serve.run import running

    with running(create_app(pipe, ServerOptions(**options))) as url:
        yield url


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def scene(side=64, seed=0) -> Image.Image:
    from unclip.data.render import render
    from unclip.data.world import sample

    return render(sample("val", seed, lang="en").scene, side).convert("RGB")


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    import unclip

    # float32: these tests check that a seed redraws its image across batches to 1/255, which an
    # untrained tiny model only holds in float32 (docs/pipeline.md, "Seeds")
    return unclip.load(tiny_model(tmp_path_factory), precision="float32")


@pytest.fixture(scope="module")
def server(pipe):
    with live_server(pipe) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key="unused-on-loopback", max_retries=0)


def _open(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def _array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


# --- the three endpoints through the official client -------------------------------------------


def test_generations_with_the_openai_client_are_seeded_sized_and_fetchable(client, server):
    assert [m.id for m in client.models.list().data] == ["unclip-tiny"]
    first = client.images.generate(model="dall-e-2", prompt="a red circle", n=2, size="64x64", extra_body={"seed": 7})
    assert first.size == "64x64" and [d.seed for d in first.data] == [7, 8]
    assert first.warnings == []
    assert len(client.images.generate(prompt="a red circle", n=None, size="16x16").data) == 1  # null n: OpenAI's 1
    odd = httpx.post(f"{server}/v1/images/generations", json={"prompt": "a red dog", "size": "16x16", "steps": 2})
    assert odd.status_code == 200 and odd.json()["warnings"] == [
        "this model never saw 'dog' in training; that word means nothing to it"]
    images = [_open(httpx.get(d.url).content) for d in first.data]
    assert all(image.size == (64, 64) for image in images)
    params = json.loads(images[1].text["unclip"])
    assert params["verb"] == "generate" and params["seed"] == 8 and params["prompt"] == "a red circle"
    # image 1 of the batch drew from seed 8: asked alone with seed 8, it is the same image
    alone = client.images.generate(prompt="a red circle", size="64x64", response_format="b64_json",
                                   extra_body={"seed": 8})
    assert alone.data[0].url is None
    assert np.abs(_array(_open(base64.b64decode(alone.data[0].b64_json))) - _array(images[1])).max() <= 1
    # an OpenAI size: the whole cascade (64²) resized to 256²; a native size: the decoder's own 16²
    big = client.images.generate(prompt="วงกลมสีแดง", size="256x256", response_format="b64_json",
                                 extra_body={"steps": 3, "guidance_scale": 2.0, "prior_guidance_scale": 1.5})
    assert big.size == "256x256" and _open(base64.b64decode(big.data[0].b64_json)).size == (256, 256)
    small = client.images.generate(prompt="a blue star", size="16x16", response_format="b64_json",
                                   extra_body={"prior": "ar", "sampler": "ddpm"})
    assert _open(base64.b64decode(small.data[0].b64_json)).size == (16, 16)
    assert client.models.retrieve("unclip-tiny").id == "unclip-tiny"


def test_edits_repaint_only_the_transparent_region(client):
    original = scene()
    image = original.convert("RGBA")
    mask = image.copy()
    mask.paste((0, 0, 0, 0), (0, 0, 32, 64))  # the left half is transparent: repaint it
    out = client.images.edit(image=("image.png", png(image), "image/png"), mask=("mask.png", png(mask), "image/png"),
                             prompt="a green star", n=2, size="64x64", response_format="b64_json",
                             extra_body={"seed": 3, "steps": 3, "resample": 1})
    assert [d.seed for d in out.data] == [3, 4]
    for item in out.data:
        edited = _array(_open(base64.b64decode(item.b64_json)))
        assert np.array_equal(edited[:, 32:], _array(original)[:, 32:])  # the opaque half is kept
        assert not np.array_equal(edited[:, :32], _array(original)[:, :32])
    # no mask: the image's own transparent pixels mark the edit
    holed = image.copy()
    holed.paste((0, 0, 0, 0), (0, 0, 64, 16))
    out = client.images.edit(image=("image.png", png(holed), "image/png"), prompt="a green star", size="256x256",
                             extra_body={"steps": 2, "resample": 1})
    assert _open(httpx.get(out.data[0].url).content).size == (256, 256)


def test_variations_of_an_uploaded_png(client):
    out = client.images.create_variation(image=("a.png", png(scene(side=200)), "image/png"), n=3, size="64x64",
                                         response_format="b64_json", extra_body={"seed": 11, "steps": 3, "eta": 1.0})
    images = [_array(_open(base64.b64decode(d.b64_json))) for d in out.data]
    assert len(images) == 3 and images[0].shape == (64, 64, 3) and [d.seed for d in out.data] == [11, 12, 13]
    assert not np.array_equal(images[0], images[1])
    decoder_only = client.images.create_variation(image=("a.png", png(scene()), "image/png"), size="16x16",
                                                  extra_body={"steps": 2})
    assert _open(httpx.get(decoder_only.data[0].url).content).size == (16, 16)
    assert decoder_only.warnings == []
    # an image smaller than the model reads is upscaled: the answer says so, not only the server's log
    small = client.images.create_variation(image=("a.png", png(scene(side=8)), "image/png"), size="16x16",
                                           extra_body={"steps": 2})
    assert len(small.warnings) == 1 and "an input image is 8×8, smaller than the" in small.warnings[0]


def test_a_request_larger_than_max_batch_is_made_max_batch_images_at_a_time(pipe, monkeypatch):
    """--max-batch bounds the images of one pipeline call (the memory a call takes); a request with a
    larger n ran as one call. Split, each image still draws from its own seed, so nothing changes, and
    a variation request's image is inverted once (each piece inverted it again)."""
    calls = []
    invert = pipe.decoder.invert
    monkeypatch.setattr(pipe.decoder, "invert", lambda *a, **k: calls.append(("invert", len(a[0]))) or invert(*a, **k))

    class Counting:  # the pipe, counting the images of each call
        def __getattr__(self, name):
            return getattr(pipe, name)

        def generate(self, prompts, **kw):
            calls.append(("generate", len(prompts)))
            return pipe.generate(prompts, **kw)

        def variations(self, image, n, **kw):
            calls.append(("vary", n))
            return pipe.variations(image, n=n, **kw)

    asks = {_GEN: {"json": {"prompt": "a red circle", "n": 3, "seed": 5, "size": "16x16", "steps": 2,
                            "response_format": "b64_json"}},
            _VARY: {"data": {"n": "3", "seed": "5", "size": "16x16", "steps": "2", "response_format": "b64_json"},
                    "files": {"image": ("a.png", png(scene()), "image/png")}}}
    answers = {}
    for max_batch in (2, 8):
        calls.clear()
        with live_server(Counting(), max_batch=max_batch) as url:
            for path, ask in asks.items():
                answer = httpx.post(url + path, timeout=60, **ask)
                assert answer.status_code == 200, answer.text
                answers[path, max_batch] = [_array(_open(base64.b64decode(d["b64_json"])))
                                            for d in answer.json()["data"]]
        assert calls == ([("generate", 2), ("generate", 1), ("invert", 1), ("vary", 2), ("vary", 1)] if max_batch == 2
                         else [("generate", 3), ("vary", 3), ("invert", 1)])
    for path in asks:
        assert [d.shape for d in answers[path, 2]] == [(16, 16, 3)] * 3
        assert all(np.abs(a - b).max() <= 1 for a, b in zip(answers[path, 2], answers[path, 8], strict=True))


# --- errors: the OpenAI error JSON with the right status -----------------------------------------


def _header_only_png(side: int) -> bytes:
    """A PNG whose header claims side × side pixels but holds almost no data (a decompression bomb)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    scene().save(buffer, format="JPEG")
    return buffer.getvalue()


def _png_with_text(megabytes: float) -> bytes:
    """A PNG of `scene()` carrying a zTXt chunk that inflates to `megabytes` (and compresses to a few kB)."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("notes", "x" * int(megabytes * 2**20), zip=True)
    buffer = io.BytesIO()
    scene().save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def _png_with_damaged_pixels() -> bytes:
    """A PNG of `scene()` whose chunks are whole and match their checksums, but whose compressed pixel stream
    has a damaged byte."""
    import struct
    import zlib

    data = bytearray(png(scene()))
    start = data.index(b"IDAT")
    (length,) = struct.unpack(">I", data[start - 4:start])
    data[start + 4 + length // 2] ^= 0xFF
    data[start + 4 + length:start + 8 + length] = struct.pack(">I", zlib.crc32(data[start:start + 4 + length]))
    return bytes(data)


_RGBA = scene().convert("RGBA")
_HOLE = _RGBA.copy()
_HOLE.paste((0, 0, 0, 0), (0, 0, 32, 32))
_GEN, _VARY, _EDIT = "/v1/images/generations", "/v1/images/variations", "/v1/images/edits"
ERRORS = {
    # name: (path, request keyword arguments, status, param)
    "empty prompt": (_GEN, {"json": {"prompt": ""}}, 400, "prompt"),
    "blank prompt": (_GEN, {"json": {"prompt": "   "}}, 400, "prompt"),
    "prompt over 1000 characters": (_GEN, {"json": {"prompt": "a" * 1001}}, 400, "prompt"),
    "no prompt": (_GEN, {"json": {"n": 1}}, 400, "prompt"),
    "prompt not a string": (_GEN, {"json": {"prompt": 5}}, 400, "prompt"),
    "n = 0": (_GEN, {"json": {"prompt": "a", "n": 0}}, 400, "n"),
    "n = 11": (_GEN, {"json": {"prompt": "a", "n": 11}}, 400, "n"),
    "n as text": (_GEN, {"json": {"prompt": "a", "n": "2"}}, 400, "n"),
    "n as a boolean": (_GEN, {"json": {"prompt": "a", "n": True}}, 400, "n"),
    "unknown size": (_GEN, {"json": {"prompt": "a", "size": "100x100"}}, 400, "size"),
    "dall-e-3 size": (_GEN, {"json": {"prompt": "a", "size": "1792x1024"}}, 400, "size"),
    "unknown response_format": (_GEN, {"json": {"prompt": "a", "response_format": "jpeg"}}, 400, "response_format"),
    "unknown field": (_GEN, {"json": {"prompt": "a", "style": "vivid"}}, 400, "style"),
    "unknown model": (_GEN, {"json": {"prompt": "a", "model": "gpt-image-1"}}, 400, "model"),
    "steps = 0": (_GEN, {"json": {"prompt": "a", "steps": 0}}, 400, "steps"),
    "steps past the timesteps": (_GEN, {"json": {"prompt": "a", "steps": 10**6}}, 400, "steps"),
    "negative seed": (_GEN, {"json": {"prompt": "a", "seed": -1}}, 400, "seed"),
    "seed + i past the limit": (_GEN, {"json": {"prompt": "a", "seed": 2**53 - 1, "n": 2}}, 400, "seed"),
    "no body": (_GEN, {"content": b"", "headers": {"content-type": "application/json"}}, 400, None),
    "guidance NaN": (_GEN, {"content": b'{"prompt": "a", "guidance_scale": NaN}',
                            "headers": {"content-type": "application/json"}}, 400, "guidance_scale"),
    "unknown prior": (_GEN, {"json": {"prompt": "a", "prior": "gan"}}, 400, "prior"),
    "broken JSON": (_GEN, {"content": b'{"prompt": ', "headers": {"content-type": "application/json"}}, 400, None),
    "JSON array": (_GEN, {"json": [1, 2]}, 400, None),
    "form body for JSON": (_GEN, {"data": {"prompt": "a"}}, 400, None),
    "JSON sent as text/plain": (_GEN, {"content": b'{"prompt": "a"}', "headers": {"content-type": "text/plain"}},
                                400, None),
    "JPEG upload": (_VARY, {"files": {"image": ("a.jpg", _jpeg(), "image/jpeg")}}, 400, "image"),
    "cut-off JPEG": (_VARY, {"files": {"image": ("a.jpg", _jpeg()[:len(_jpeg()) // 2], "image/jpeg")}}, 400, "image"),
    "non-square PNG": (_VARY, {"files": {"image": ("a.png", png(scene().crop((0, 0, 64, 48))), "image/png")}},
                       400, "image"),
    "truncated PNG": (_VARY, {"files": {"image": ("a.png", png(scene())[:300], "image/png")}}, 400, "image"),
    "PNG whose pixels end early": (_VARY, {"files": {"image": ("a.png", short_png(np.asarray(scene()), rows=40),
                                                               "image/png")}}, 400, "image"),
    "PNG whose pixel data is damaged": (_VARY, {"files": {"image": ("a.png", _png_with_damaged_pixels(),
                                                                    "image/png")}}, 400, "image"),
    "PNG with 2 MB of compressed text": (_VARY, {"files": {"image": ("a.png", _png_with_text(2), "image/png")}},
                                         400, "image"),
    "PNG of 4 MB": (_VARY, {"files": {"image": ("a.png", png(scene()) + bytes(4 * 2**20), "image/png")}},
                    400, "image"),
    "bomb past PIL's limit": (_VARY, {"files": {"image": ("a.png", _header_only_png(100_000), "image/png")}},
                              400, "image"),
    "bomb past the side limit": (_VARY, {"files": {"image": ("a.png", _header_only_png(5000), "image/png")}},
                                 400, "image"),
    "no image": (_VARY, {"files": {"mask": ("m.png", png(_HOLE), "image/png")}}, 400, "mask"),
    "image missing": (_VARY, {"data": {"n": "1"}, "files": {}}, 400, None),
    "image as text": (_VARY, {"data": {"image": "abc"}, "files": {"x": ("x", b"", "text/plain")}}, 400, "image"),
    "n as a file": (_VARY, {"files": {"image": ("a.png", png(scene()), "image/png"), "n": ("n", b"1", "text/plain")}},
                    400, "n"),
    "PNG signature, then garbage": (_VARY, {"files": {"image": ("a.png", png(scene())[:8] + bytes(64), "image/png")}},
                                    400, "image"),
    "prompt for variations": (_VARY, {"data": {"prompt": "a"}, "files": {"image": ("a.png", png(scene()),
                                                                                   "image/png")}}, 400, "prompt"),
    "n = 11 in a form": (_VARY, {"data": {"n": "11"}, "files": {"image": ("a.png", png(scene()), "image/png")}},
                         400, "n"),
    "JSON for multipart": (_VARY, {"json": {"n": 1}}, 400, None),
    "mask of another size": (_EDIT, {"data": {"prompt": "a"}, "files": {
        "image": ("a.png", png(_RGBA), "image/png"), "mask": ("m.png", png(_HOLE.resize((32, 32))), "image/png")}},
                             400, "mask"),
    "mask without alpha": (_EDIT, {"data": {"prompt": "a"}, "files": {
        "image": ("a.png", png(_RGBA), "image/png"), "mask": ("m.png", png(scene()), "image/png")}}, 400, "mask"),
    "opaque mask": (_EDIT, {"data": {"prompt": "a"}, "files": {
        "image": ("a.png", png(_RGBA), "image/png"), "mask": ("m.png", png(_RGBA), "image/png")}}, 400, "mask"),
    "no mask, opaque image": (_EDIT, {"data": {"prompt": "a"}, "files": {"image": ("a.png", png(scene()),
                                                                                  "image/png")}}, 400, "image"),
    "prompt in TIS-620, charset not named": (_EDIT, {"files": {"image": ("a.png", png(_HOLE), "image/png"),
                                                              "prompt": (None, "วงกลมสีแดง".encode("tis-620"))}},
                                             400, "prompt"),
    "edit without prompt": (_EDIT, {"files": {"image": ("a.png", png(_HOLE), "image/png")}}, 400, "prompt"),
    "resample = 0": (_EDIT, {"data": {"prompt": "a", "resample": "0"}, "files": {
        "image": ("a.png", png(_HOLE), "image/png")}}, 400, "resample"),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_bad_requests_get_the_openai_error_json(server, name):
    path, kwargs, status, param = ERRORS[name]
    started = time.perf_counter()
    response = httpx.post(server + path, timeout=30, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and error["message"], error
    assert time.perf_counter() - started < 5  # refused up front: no image was inflated, no job queued
    words = {"seed + i past the limit": "at most 9007199254740990", "no body": "must be a JSON object",
             "bomb past PIL's limit": "is 100000×100000; at most 4096×4096",
             "JSON sent as text/plain": "Content-Type: application/json; the request said text/plain",
             "form body for JSON": "said application/x-www-form-urlencoded",
             "n as a file": "'n' must be sent as a text field",
             "prompt in TIS-620, charset not named": "'prompt' is not utf-8 text",
             "PNG signature, then garbage": "could not be decoded as a PNG (its header is damaged)",
             "JPEG upload": "'image' must be a PNG file; this one is a JPEG. Save it as a square PNG under 4 MB",
             "cut-off JPEG": "'image' must be a PNG file; this one is a JPEG",
             "non-square PNG": "must be square; got 64×48. Crop it to a square",
             "truncated PNG": "the file is cut off before its end, as a download or copy that stopped early is. "
                              "Download or save the image again and send the whole file.",
             "PNG whose pixels end early": "its pixel data ends before the last row. Download or save the image again",
             "PNG whose pixel data is damaged": "its pixel data is damaged. Download or save the image again",
             "PNG with 2 MB of compressed text": "it carries a compressed text chunk (metadata such as a comment) that "
                                                 "inflates to over 1 MB, more than the server reads. Save the image "
                                                 "again without its text metadata"}
    assert words.get(name, "") in error["message"] and "'None'" not in error["message"], error
    assert " object at 0x" not in error["message"], error  # no Python reprs
    assert not re.search(r"Plugin|MAX_|PIL|data stream|decoder", error["message"]), error  # nor Pillow's internals


def test_png_text_past_what_pillow_inflates_in_all_is_refused_in_plain_words():
    """Pillow's refusal named its internals: "Too much memory used in text chunks: …>MAX_TEXT_MEMORY"."""
    from PIL import PngImagePlugin

    from unclip.serve.schemas import ApiError
    from unclip.serve.uploads import read_png

    info = PngImagePlugin.PngInfo()
    for i in range(65):  # 65 chunks of just under 1 MB each: none past the limit of one, 64 MB in all
        info.add_text(f"notes {i}", "x" * (2**20 - 100), zip=True)
    buffer = io.BytesIO()
    scene().save(buffer, format="PNG", pnginfo=info)
    with pytest.raises(ApiError) as refused:
        read_png(buffer.getvalue(), param="mask")
    assert refused.value.status == 400 and refused.value.param == "mask"
    assert str(refused.value) == (
        "Invalid input image - 'mask' could not be decoded as a PNG: its compressed text chunks (metadata such as "
        "comments) inflate to over 64 MB in all, more than the server reads. Save the image again without its "
        "text metadata")


def test_form_text_is_read_in_its_declared_charset_and_never_as_a_silent_fallback():
    from unclip.serve.app import _text_field
    from unclip.serve.schemas import ApiError

    thai, form = "วงกลมสีแดง", "multipart/form-data; boundary=b"
    assert _text_field("prompt", "café " + thai, b"--b\r\n..." + ("café " + thai).encode() + b"\r\n", form) == "café " + thai
    # named in the Content-Type, TIS-620 is read as Thai (starlette decodes it so)
    tis = thai.encode("tis-620")
    assert _text_field("prompt", thai, b"..." + tis + b"\r\n", form + "; charset=TIS-620") == thai
    # not named: starlette's latin-1 fallback gives mojibake, which is refused rather than drawn
    with pytest.raises(ApiError, match="'prompt' is not utf-8 text"):
        _text_field("prompt", tis.decode("latin-1"), b"..." + tis + b"\r\n", form)
    with pytest.raises(ApiError, match="charset 'x-klingon', which is unknown"):
        _text_field("prompt", "a", b"a", form + "; charset=x-klingon")


def test_unknown_paths_methods_models_and_images_are_errors_too(server, client):
    import openai

    for method, path, status in (("GET", "/v1/nothing", 404), ("GET", _GEN, 405), ("DELETE", "/v1/models", 405),
                                 ("GET", "/v1/models/dall-e-5", 404), ("GET", "/images/expired.png", 404)):
        response = httpx.request(method, server + path)
        assert response.status_code == status and set(response.json()["error"]) == {"message", "type", "param", "code"}
    # HEAD is GET without the body (it answered 405 on an image's URL and on the page)
    url = client.images.generate(prompt="a red circle", size="16x16", extra_body={"steps": 1}).data[0].url
    head, get = httpx.head(url), httpx.get(url)
    assert head.status_code == 200 and head.headers["content-type"] == "image/png" and head.content == b""
    assert int(head.headers["content-length"]) == len(get.content)
    assert httpx.head(server + "/images/expired.png").status_code == 404
    assert httpx.head(server + "/").status_code == 200
    with pytest.raises(openai.BadRequestError) as raised:  # the client reads the error JSON as OpenAI's
        client.images.generate(prompt="a red circle", n=11)
    assert raised.value.body["param"] == "n" and raised.value.status_code == 400


def test_oversized_bodies_are_refused_before_they_are_read(server):
    host, port = server.removeprefix("http://").split(":")

    def raw(head: bytes, body: bytes = b"") -> tuple[int, dict]:
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(head + body)
            reply = b""
            while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
                part = sock.recv(65536)
                if not part:
                    break
                reply += part
        status = int(reply.split(b" ", 2)[1])
        return status, json.loads(reply.split(b"\r\n\r\n", 1)[1])

    # a declared 50 MB upload: answered at once, nothing read
    status, body = raw(b"POST /v1/images/edits HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                       b"boundary=b\r\nContent-Length: 52428800\r\n\r\n")
    assert status == 413 and body["error"]["type"] == "invalid_request_error"
    assert body["error"]["code"] == "request_too_large" and "uploads must be PNGs under 4 MB" in body["error"]["message"]
    # a chunked body with no length: refused once it passes the limit
    chunk = b"x" * 65536
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(6)) + b"0\r\n\r\n"
    status, body = raw(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Transfer-Encoding: chunked\r\n\r\n", chunked)
    assert status == 413 and "larger than 256 KiB, the limit for a JSON request" in body["error"]["message"]
    assert body["error"]["code"] == "request_too_large"


def test_a_client_that_leaves_mid_upload_is_no_server_error(pipe):
    """An upload cut off by its client raised ClientDisconnect out of the app: a 500 and an "Exception
    in ASGI application" traceback in the log, as for a bug, for a request nobody is there to read."""
    import asyncio

    from unclip.serve.app import create_app

    app = create_app(pipe)
    part = b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n\x89PNG'
    messages = [{"type": "http.request", "body": part, "more_body": True}, {"type": "http.disconnect"}]
    sent = []

    async def receive():
        return messages.pop(0)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": _VARY, "raw_path": _VARY.encode(), "root_path": "", "query_string": b"",
             "headers": [(b"host", b"x"), (b"content-type", b"multipart/form-data; boundary=b"),
                         (b"content-length", b"100000")], "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    asyncio.run(app(scope, receive, send))  # raised ClientDisconnect
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 499


# --- load: batching, a bounded queue, cancellation -----------------------------------------------


def _raw_request(url: str, path: str, job: str, **kwargs) -> socket.socket:
    """Send a request on a socket of our own and return it unread, so that closing it is a
    client going away."""
    request = httpx.Request("POST", url + path, headers={"Unclip-Job": job}, **kwargs)
    body = request.read()
    host, port = url.removeprefix("http://").split(":")
    head = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}"] + [f"{k}: {v}" for k, v in request.headers.items()
                                                                 if k.lower() != "host"]
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body)
    return sock


def _wait_for(url: str, check, what: str, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _job(url: str, job: str) -> dict:
    response = httpx.get(f"{url}/api/jobs/{job}")
    return response.json() if response.status_code == 200 else {}


def test_queue_batches_refuses_with_429_and_cancels_when_the_client_leaves(pipe):
    import openai

    with live_server(pipe, max_queue=3, max_batch=8) as url:
        # a long edit (RePaint, 100 steps × 20 resamplings) occupies the worker
        slow = _raw_request(url, _EDIT, "slow", data={"prompt": "a green star", "steps": "100", "resample": "20"},
                            files={"image": ("a.png", png(_HOLE), "image/png")})
        _wait_for(url, lambda: _job(url, "slow").get("step", 0) >= 1, "the slow edit to start sampling")
        # a queued request whose client leaves is dropped from the queue
        gone = _raw_request(url, _GEN, "gone", json={"prompt": "a red circle"})
        _wait_for(url, lambda: _job(url, "gone").get("state") == "queued", "the request to queue")
        gone.close()
        _wait_for(url, lambda: _job(url, "gone").get("state") == "cancelled", "the queued request to be cancelled")
        # three generations wait behind the edit ...
        answers = {}

        def ask(i: int) -> None:
            answers[i] = httpx.post(url + _GEN, timeout=60, json={
                "prompt": ["a red circle", "a blue square", "ดาวสีเขียว"][i], "size": "64x64", "response_format":
                "b64_json"})

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
        for thread in threads:
            thread.start()
        _wait_for(url, lambda: httpx.get(url + "/api/status").json()["queued"] == 3, "three queued requests")
        # ... and the queue is full: 429, Retry-After, the OpenAI error JSON
        refused = httpx.post(url + _GEN, json={"prompt": "a red circle"})
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert refused.json()["error"]["message"].startswith("The server is busy: its queue is full (3 waiting); retry after")
        from openai import OpenAI

        with pytest.raises(openai.RateLimitError):
            OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0).images.generate(prompt="a red circle")
        # the edit's client leaves: its work stops, and the queued generations run as one batch
        left = time.monotonic()
        slow.close()
        for thread in threads:
            thread.join(60)
        assert time.monotonic() - left < 10  # the edit alone would have run for minutes
        assert _job(url, "slow")["state"] == "cancelled"
        assert all(answers[i].status_code == 200 for i in range(3))
        status = httpx.get(url + "/api/status").json()
        assert status["cancelled"] == 2 and status["refused"] == 2 and status["largest_batch"] == 3
        # batched, each request kept its own seed: asked alone with that seed, it is the same image
        seeds = [answers[i].json()["data"][0]["seed"] for i in range(3)]
        assert len(set(seeds)) == 3  # each drew its own seed, batched in one call all the same
        again = httpx.post(url + _GEN, timeout=60, json={"prompt": "a blue square", "size": "64x64", "seed":
                                                         answers[1].json()["data"][0]["seed"], "response_format":
                                                         "b64_json"}).json()
        batched = _open(base64.b64decode(answers[1].json()["data"][0]["b64_json"]))
        assert np.abs(_array(_open(base64.b64decode(again["data"][0]["b64_json"]))) - _array(batched)).max() <= 1


# --- the API key, the command line, the URL store and the size mapping ---------------------------


def test_an_api_key_guards_the_api_but_not_the_page(pipe):
    import openai
    from openai import OpenAI

    with live_server(pipe, api_key="sekrit") as url:
        missing = httpx.get(url + "/v1/models")
        assert missing.status_code == 401 and missing.headers["WWW-Authenticate"] == "Bearer"
        assert missing.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(url + "/api/info").status_code == 401
        info = httpx.get(url + "/api/info", headers={"Authorization": "Bearer sekrit"}).json()
        assert info["example_prompt"] == "a red circle above a blue square"  # the page's placeholder
        with pytest.raises(openai.AuthenticationError):
            OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        out = OpenAI(base_url=f"{url}/v1", api_key="sekrit", max_retries=0).images.generate(
            prompt="a red circle", extra_body={"steps": 2})
        assert httpx.get(out.data[0].url).status_code == 200  # the URL is the capability
        assert "<textarea" in httpx.get(url + "/").text
        assert httpx.get(url + "/docs").status_code == 404  # a page of CDN scripts, blank offline
        spec = httpx.get(url + "/openapi.json").json()
        assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


def test_a_model_that_samples_nan_answers_500_not_the_clients_fault(pipe, monkeypatch):
    real = pipe.decoder.sample
    monkeypatch.setattr(pipe.decoder, "sample", lambda *a, **k: real(*a, **k) * float("nan"))
    with live_server(pipe) as url:
        answer = httpx.post(url + "/v1/images/generations", json={"prompt": "a red circle", "steps": 2})
    assert answer.status_code == 500, answer.text
    error = answer.json()["error"]
    assert error["type"] == "server_error" and "non-finite values" in error["message"]


def test_a_batch_that_fails_after_sampling_fails_alone_and_the_worker_goes_on(pipe, monkeypatch):
    """The PNG encoding ran outside the worker's guard: an error there ended the worker thread and
    every request after it waited for ever."""
    from unclip.serve import worker

    real = worker.encode_png
    with live_server(pipe) as url:
        monkeypatch.setattr(worker, "encode_png", lambda *a, **k: 1 / 0)
        answer = httpx.post(url + "/v1/images/generations", json={"prompt": "a red circle", "steps": 2}, timeout=60)
        assert answer.status_code == 500 and answer.json()["error"]["type"] == "server_error", answer.text
        monkeypatch.setattr(worker, "encode_png", real)
        again = httpx.post(url + "/v1/images/generations", json={"prompt": "a red circle", "steps": 2}, timeout=60)
        assert again.status_code == 200, again.text


def test_serve_refuses_a_public_address_without_a_key(capsys, monkeypatch):
    from unclip.cli import main
    from unclip.serve.run import is_loopback

    monkeypatch.delenv("UNCLIP_API_KEY", raising=False)
    assert main(["serve", "--host", "0.0.0.0"]) == 2
    assert "API key is required" in capsys.readouterr().err
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.8.0.1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4") and not is_loopback("example.org")


def test_serve_refuses_a_taken_port_before_loading_the_model(capsys, monkeypatch):
    import unclip
    from unclip.cli import main

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the port was checked")

    monkeypatch.setattr(unclip, "load", no_load)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", "--port", str(taken.getsockname()[1])]) == 2
    assert "Address already in use; is another server there? Pick another --port" in capsys.readouterr().err


def test_unclip_serve_runs_on_loopback_and_stops_on_interrupt(pipe):
    import signal

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "unclip", "serve", str(pipe.directory), "--port", str(port),
                                "--threads", "1", "--log-level", "warning"], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        line = process.stdout.readline()
        assert f"http://127.0.0.1:{port}/" in line, line
        url = f"http://127.0.0.1:{port}"
        models = _wait_for(url, lambda: _models(url), "the server to answer", timeout=60)
        assert models["data"][0]["id"] == "unclip-tiny"
        answer = httpx.post(url + _GEN, timeout=60, json={"prompt": "a red circle", "steps": 2})
        assert answer.status_code == 200 and answer.json()["size"] == "64x64"
        # Ctrl-C with a long edit running: it was cut off after uvicorn's grace period with a traceback
        # and a plain-text 500; the worker now stops at once and the request gets the error JSON
        answers = []
        slow = threading.Thread(target=lambda: answers.append(httpx.post(
            url + _EDIT, timeout=60, data={"prompt": "a green star", "steps": "100", "resample": "20"},
            files={"image": ("a.png", png(_HOLE), "image/png")})))
        slow.start()
        _wait_for(url, lambda: httpx.get(url + "/api/status").json()["running"] >= 1, "the edit to start")
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 0
    slow.join(30)
    assert answers[0].status_code == 503 and "retry" in answers[0].json()["error"]["message"]
    assert "Traceback" not in process.stdout.read()


def _models(url: str) -> dict:
    try:
        return httpx.get(url + "/v1/models").json()
    except httpx.TransportError:
        return {}


def test_url_images_expire_and_the_store_keeps_its_size():
    from unclip.serve.store import ImageStore

    store = ImageStore(ttl_s=0.2, max_bytes=10)
    first = store.put(b"123456")
    assert store.get(first)[0] == b"123456" and 0 < store.get(first)[1] <= 0.2
    second = store.put(b"abcdef")  # 12 bytes > 10: the oldest goes
    assert store.get(first) is None and store.get(second)[0] == b"abcdef"
    time.sleep(0.25)
    assert store.get(second) is None and len(store) == 0


def test_sizes_map_onto_the_cascade():
    from unclip.serve.schemas import parse_size, size_choices

    assert size_choices([32, 128]) == ["32x32", "128x128", "256x256", "512x512", "1024x1024"]
    assert parse_size(None, [32, 128]) == (128, 128)          # default: the model's largest side
    assert parse_size("32x32", [32, 128]) == (32, 32)         # a native side stops the cascade there
    assert parse_size("256x256", [32, 128]) == (256, 128)     # larger than the model: last stage, resized
    assert parse_size("256x256", [64, 256, 1024]) == (256, 256)  # Karlo-like: 256² is native
    assert parse_size("512x512", [64, 256, 1024]) == (512, 1024)  # the next stage up, then shrunk


def test_retry_after_is_the_running_calls_remaining_time_weighted_by_steps():
    """A full queue's Retry-After said 2 s while a 120-step job had 29 s to run: the rate is now per
    image of default steps, a call's images weigh by their steps (an edit's by its resamplings too),
    and the wait is what the running call has left."""
    from unclip.serve.worker import Busy, Job, Task, Worker

    worker = Worker(pipe=None, model_id="m", max_queue=1, default_steps=25)
    worker.seconds_per_image = 2.0
    long = Task(kind="generate", n=2, side=64, cascade_side=64, prompt="a", options={"steps": 100})
    edit = Task(kind="edit", n=1, side=64, cascade_side=64, prompt="a", options={"steps": 50})
    assert worker._cost(long) == 8 and worker._cost(edit) == 10  # 2 images × 4; 2 × the default 5 resamplings

    async def refused() -> Busy:
        worker._queue.clear()
        worker.submit(Task(kind="generate", n=1, side=64, cascade_side=64, prompt="b"))
        with pytest.raises(Busy) as busy:
            worker.submit(Task(kind="generate", n=1, side=64, cascade_side=64, prompt="c"))
        return busy.value

    import asyncio

    assert asyncio.run(refused()).retry_after == 2  # nothing runs: the queue's head, 1 image × 2 s
    loop = asyncio.new_event_loop()
    worker._running, worker._started = [Job(long, "j", loop)], time.perf_counter() - 6
    assert asyncio.run(refused()).retry_after == 10  # 8 × 2 s − the 6 s it has run
    worker._started -= 100
    assert asyncio.run(refused()).retry_after == 1  # overdue: come back at once
    loop.close()


def test_uploads_decode_two_at_a_time(pipe, monkeypatch):
    """A burst of small PNGs that decode to hundreds of MB each took the server's memory through
    Starlette's ~40 threads before any queue bound it: decoding now takes turns, two at a time."""
    from unclip.serve import uploads

    active, most, lock = [0], [0], threading.Lock()
    real = uploads.read_png

    def slow_read(data, *, param):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        time.sleep(0.3)
        with lock:
            active[0] -= 1
        return real(data, param=param)

    monkeypatch.setattr(uploads, "read_png", slow_read)
    with live_server(pipe) as url:
        def vary() -> int:
            return httpx.post(url + _VARY, timeout=60, data={"size": "16x16", "steps": "1"},
                              files={"image": ("a.png", png(scene()), "image/png")}).status_code

        threads = [threading.Thread(target=lambda: codes.append(vary())) for _ in range(5)]
        codes: list[int] = []
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert codes == [200] * 5 and most[0] == 2
