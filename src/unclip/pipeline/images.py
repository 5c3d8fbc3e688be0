"""Images and masks as the pipeline reads them, and its images as PIL images.

`open_rgb` reads a square RGB image from a PIL image or a path, `mask_tensor` a mask as
[1, 1, side, side] in {0, 1}; `check_finite` refuses NaN images; `to_pil` is the way out.
"""

from __future__ import annotations

import math
import os

import torch

from unclip.errors import DataError, SamplingError


def open_rgb(item):
    """A square RGB PIL image from a PIL image or a path; other modes are converted, other shapes refused."""
    from PIL import Image, ImageOps

    from unclip.data.png import open_bytes, read_checked
    from unclip.data.shapes import to_rgb

    if isinstance(item, Image.Image):
        image = item
    elif not isinstance(item, (str, os.PathLike)):
        raise DataError(f"an image is a PIL image, a path or a tensor, not {type(item).__name__}")
    else:
        try:
            with open_bytes(read_checked(item)) as opened:
                opened.load()
                image = ImageOps.exif_transpose(opened)  # upright, as the training data was read
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise DataError(f"cannot read the image {item}: {err}") from None
    named = "the image" if isinstance(item, Image.Image) else f"the image {item}"  # which of two (interpolate)
    if not image.width:  # a 0×0 image failed deep in torch's resize
        raise DataError(f"{named} is {image.width}×{image.height}: it has no pixels")
    if image.width != image.height:
        raise DataError(f"{named} is {image.width}×{image.height}; unclip works on square images, so crop it "
                        f"to a square first (e.g. the centre {min(image.size)}×{min(image.size)})")
    return to_rgb(image)


def mask_tensor(mask, side: int) -> torch.Tensor:
    """A mask (PIL image, path, or tensor or array [H, W] / [1, 1, H, W] in [0, 1] or 0 … 255) as
    [1, 1, side, side] in {0, 1}: values of ½ and above (128 and above in bytes) repaint, or, for an
    image with transparency, its fully transparent pixels."""
    import numpy as np
    import torch.nn.functional as F
    from PIL import Image, ImageOps

    transparent = False  # whether the mask's transparency marks the region
    if isinstance(mask, np.ndarray):
        if mask.dtype.kind not in "biuf":  # torch.from_numpy raised a TypeError listing its dtypes
            raise DataError(f"a mask array holds numbers in [0, 1] (1 = repaint) or bytes; got dtype {mask.dtype}")
        mask = torch.from_numpy(mask)
    if isinstance(mask, torch.Tensor):
        if mask.ndim not in (2, 3, 4) or math.prod(mask.shape[:-2]) != 1 or not mask.numel():
            raise DataError(f"a mask tensor must be [H, W] (or [1, H, W], [1, 1, H, W]); got {tuple(mask.shape)}")
        m = mask.float().view(1, 1, *mask.shape[-2:])
        if not torch.isfinite(m).all() or m.min() < 0 or m.max() > 255:
            raise DataError("a mask tensor holds values in [0, 1] (1 = repaint), or bytes in 0 … 255; this one has "
                            "values outside them")
        m = m / 255 if m.max() > 1 else m  # bytes, as read from an image
    elif not isinstance(mask, (Image.Image, str, os.PathLike)):
        raise DataError(f"a mask is a PIL image, a path, or a tensor or array [H, W] in [0, 1] (1 = repaint); "
                        f"got {type(mask).__name__}")
    else:
        from unclip.data.png import open_bytes, read_checked
        from unclip.data.shapes import has_alpha

        try:
            pil = mask if isinstance(mask, Image.Image) else open_bytes(read_checked(mask))
            pil.load()
            if not isinstance(mask, Image.Image):
                pil = ImageOps.exif_transpose(pil)  # upright, as `open_rgb` reads the image
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise DataError(f"cannot read the mask {mask}: {err}") from None
        transparent = has_alpha(pil)  # an alpha channel, a transparent palette entry or a colour key
        if transparent:  # fully transparent = paint (the OpenAI convention, as the server reads edits)
            alpha = np.asarray(pil.convert("RGBA").getchannel("A"))
            m = torch.from_numpy((alpha == 0).astype(np.float32))[None, None]
        else:
            m = torch.from_numpy(np.asarray(pil.convert("L"), dtype=np.float32) / 255.0)[None, None]
    if m.shape[-1] != m.shape[-2]:
        raise DataError(f"the mask must be square like the image; got {m.shape[-1]}×{m.shape[-2]}")
    m = (m >= 0.5).float()  # white (≥ ½) repaints: a JPEG mask's ringing or a faint grey is not white
    if m.sum() == 0 and transparent:
        raise DataError("the mask has an alpha channel, so its fully transparent pixels mark the region to repaint, "
                        "and it has none: erase the region, or save the mask without transparency, region white")
    if m.sum() == 0:
        raise DataError("the mask is empty: mark the region to repaint in white (or transparent)")
    # any coverage paints the whole pixel: a region smaller than half a decoder pixel would vanish
    return (F.interpolate(m, size=(side, side), mode="area") > 0).float()


def check_finite(images: torch.Tensor, stage: str, sampler: str, steps: int) -> None:
    """Refuse to hand on images with NaN or infinite values (they would save as black)."""
    if not torch.isfinite(images).all():
        raise SamplingError(
            f"the {stage} produced non-finite values ({sampler}, {steps} steps): try another sampler, more steps "
            "or a guidance scale nearer 1; if every setting fails, the model's training diverged")


def to_pil(images: torch.Tensor) -> list:
    """Images [B, 3, R, R] in [-1, 1] → PIL RGB images."""
    from unclip.data.shapes import to_pil as one

    return [one(image) for image in images]
