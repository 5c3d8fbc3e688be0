"""Uploaded PNGs read safely, edit masks from their alpha channel, answers encoded as PNG.

An upload must be a PNG smaller than 4 MB (`MAX_IMAGE_BYTES`), square, and at most
`MAX_SIDE` pixels on a side. The side is read from the PNG header before any pixel is
decoded, so a decompression bomb (a small file that claims a huge canvas) is refused without
being inflated. Accepted images are shrunk to the side the model works at before they reach the
pipeline. A refused upload is a 400 naming its parameter, whose message says in plain words what is
wrong with the file and what to do (never Pillow's own words, which name its internals).
"""

from __future__ import annotations

import io
import json
import struct
import warnings

from PIL import Image, PngImagePlugin
from PIL.PngImagePlugin import PngInfo

from unclip.data.png import damage, is_png
from unclip.data.shapes import has_alpha
from unclip.serve.schemas import MAX_IMAGE_BYTES, ApiError

MAX_SIDE = 4096  # 4096² RGBA decodes to 64 MiB
AGAIN = "Download or save the image again and send the whole file."
FORMATS = ((b"\xff\xd8\xff", "a JPEG"), (b"GIF8", "a GIF"), (b"BM", "a BMP"), (b"II*\0", "a TIFF"),
           (b"MM\0*", "a TIFF"))  # by their first bytes; WebP is RIFF….WEBP
CUT = ("image file is truncated", "truncated file read", "truncated png file")  # Pillow's words for a cut file


def _format(data: bytes) -> str:
    """What a non-PNG upload is, in words ("a JPEG"), for the message that refuses it."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "a WebP image"
    return next((name for head, name in FORMATS if data.startswith(head)), "not an image file unclip knows")


def _damage(err: Exception) -> str:
    """What is wrong with a PNG Pillow refused, and what to do, in plain words: Pillow's own message names its
    internals ("…too large for PngImagePlugin.MAX_TEXT_CHUNK", "broken data stream when reading image file")."""
    text = str(err)
    if "MAX_TEXT_CHUNK" in text:
        return ("it carries a compressed text chunk (metadata such as a comment) that inflates to over "
                f"{PngImagePlugin.MAX_TEXT_CHUNK / 2**20:g} MB, more than the server reads. Save the image again "
                "without its text metadata")
    if "MAX_TEXT_MEMORY" in text:
        return ("its compressed text chunks (metadata such as comments) inflate to over "
                f"{PngImagePlugin.MAX_TEXT_MEMORY / 2**20:g} MB in all, more than the server reads. Save the image "
                "again without its text metadata")
    if isinstance(err, EOFError) or text.lower().startswith(CUT):
        return f"the file is cut off before its end, as a download or copy that stopped early is. {AGAIN}"
    if "checksum" in text:
        return f"its bytes are damaged (a chunk does not match its checksum). {AGAIN}"
    if isinstance(err, OSError):  # the compressed pixel stream, or a row's filter, is corrupt
        return f"its pixel data is damaged. {AGAIN}"
    return f"one of its chunks is damaged, or holds values a PNG cannot have. {AGAIN}"


def read_png(data: bytes, *, param: str) -> Image.Image:
    """A decoded square PNG (any mode) from uploaded bytes, or a 400 `ApiError` naming `param` whose message
    says in plain words what is wrong with the file and what to do."""
    if not data:
        raise ApiError(400, f"'{param}' is empty: upload a square PNG smaller than 4 MB", param=param,
                       code="invalid_image")
    if len(data) >= MAX_IMAGE_BYTES:
        raise ApiError(400, f"Invalid input image - '{param}' must be a PNG less than 4 MB; got "
                            f"{len(data) / 2**20:.1f} MB. Shrink it, or save it with more compression",
                       param=param, code="image_too_large")
    if not is_png(data):
        raise ApiError(400, f"Invalid input image - '{param}' must be a PNG file; this one is {_format(data)}. "
                            "Save it as a square PNG under 4 MB and send that", param=param,
                       code="invalid_image_format")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=["PNG"])
            width, height = image.size  # from the header: nothing is inflated yet
            if width != height:
                raise ApiError(400, f"Invalid input image - '{param}' must be square; got {width}×{height}. "
                                    "Crop it to a square", param=param, code="invalid_image_size")
            if width > MAX_SIDE:
                raise ApiError(400, f"Invalid input image - '{param}' is {width}×{height}; at most "
                                    f"{MAX_SIDE}×{MAX_SIDE} is accepted. Shrink it", param=param,
                               code="image_too_large")
            image.load()
    except ApiError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # refused by PIL in `open`
        width, height = struct.unpack(">II", data[16:24])  # IHDR, the chunk every PNG starts with
        raise ApiError(400, f"Invalid input image - '{param}' is {width}×{height}; at most {MAX_SIDE}×{MAX_SIDE} "
                            "is accepted. Shrink it", param=param, code="image_too_large") from None
    except Image.UnidentifiedImageError:  # its message names a BytesIO object, nothing the client sent
        raise ApiError(400, f"Invalid input image - '{param}' could not be decoded as a PNG (its header is "
                            f"damaged). {AGAIN}", param=param, code="invalid_image") from None
    except Exception as err:  # noqa: BLE001 - a corrupt file raises many kinds of errors inside PIL
        raise ApiError(400, f"Invalid input image - '{param}' could not be decoded as a PNG: {_damage(err)}",
                       param=param, code="invalid_image") from None
    if (what := damage(data)) is not None:
        raise ApiError(400, f"Invalid input image - '{param}' is a damaged PNG: {what}. {AGAIN}", param=param,
                       code="invalid_image")
    return image


def edit_mask(image: Image.Image, mask: Image.Image | None) -> Image.Image:
    """The region to repaint as an L image (255 = repaint): the mask's, or else the image's,
    fully transparent pixels (alpha 0), as the OpenAI Images API defines them."""
    source, param = (image, "image") if mask is None else (mask, "mask")
    if mask is not None and mask.size != image.size:
        raise ApiError(400, f"Invalid mask - the mask is {mask.width}×{mask.height} and the image "
                            f"{image.width}×{image.height}; they must be the same size", param="mask",
                       code="invalid_mask")
    if not has_alpha(source):
        what = "the mask" if mask is not None else "the image (sent without a mask)"
        raise ApiError(400, f"Invalid {param} - {what} has no alpha channel; its fully transparent pixels mark "
                            "the region to edit, so send an RGBA PNG", param=param, code="invalid_mask")
    alpha = source.convert("RGBA").getchannel("A")
    hole = alpha.point(lambda a: 255 if a == 0 else 0)
    if hole.getbbox() is None:
        raise ApiError(400, f"Invalid {param} - it has no fully transparent pixels, so there is nothing to edit",
                       param=param, code="invalid_mask")
    return hole


def fit(image: Image.Image, side: int, *, resample: int = Image.Resampling.LANCZOS) -> Image.Image:
    """`image` shrunk to side × side when larger (the pipeline never needs more)."""
    return image if image.width <= side else image.resize((side, side), resample)


def rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as RGB (16-bit and palette images included; `unclip.data.shapes.to_rgb`)."""
    from unclip.data.shapes import to_rgb

    try:
        return to_rgb(image)
    except (ValueError, OSError) as err:
        raise ApiError(400, f"Invalid input image - its pixel format cannot be read as RGB ({err})",
                       param="image", code="invalid_image") from None


def encode_png(image: Image.Image, side: int, params: dict) -> bytes:
    """PNG bytes of `image` resized (Lanczos) to side × side, carrying `params` as JSON in the
    PNG text chunk "unclip", like every image the unclip CLI writes."""
    if image.width != side:
        image = image.resize((side, side), Image.Resampling.LANCZOS)
    info = PngInfo()
    info.add_text("unclip", json.dumps(params, ensure_ascii=False))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()
