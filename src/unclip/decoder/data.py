"""Batches for the decoder and the upsamplers, built on the image–caption feeds of `unclip.train.data`.

Decoder: each batch's images are encoded on the fly by the frozen CLIP (no gradients) into z_i
and the caption's token states; the images are resized to the decoder's resolution.

Upsampler: the high-resolution image is shrunk ×4 (area), degraded (`degrade`), upsampled
back with bicubic interpolation, and a random crop of `crop_fraction` of the side is taken at
the same place from both (paper §2.1: trained on crops of 1/4 of the target size, run at full
size). Crops and degradations come from a generator seeded by the batch's position in the
feed, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from unclip.clip.model import ClipModel
from unclip.config import UpsamplerConfig
from unclip.decoder.degrade import degrade


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Images [B, C, H, W] → [B, C, size, size]: box filter for whole-number shrinks, else bicubic."""
    side = images.shape[-1]
    if side == size:
        return images
    if side > size and side % size == 0:
        return F.interpolate(images, size=(size, size), mode="area")
    return F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False,
                         antialias=side > size).clamp(-1, 1)


def upsample(low: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic upsampling [B, C, h, h] → [B, C, size, size], clamped to [-1, 1]: the upsamplers' conditioning."""
    return F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)


@torch.no_grad()
def decoder_batch(clip: ClipModel, images: torch.Tensor, captions: list[str], *, resolution: int) -> dict:
    """image [B, 3, R, R], z_i [B, D], text_states [B, L, W], text_mask [B, L] from images and captions."""
    text = clip.encode_text(clip.tokenize(list(captions)))
    return {"image": resize(images, resolution), "z_i": clip.encode_image(images),
            "text_states": text.token_states.float(), "text_mask": text.mask}


def decoder_feed(clip: ClipModel, image_feed: Callable[[int], Iterator[dict]], *,
                 resolution: int) -> Callable[[int], Iterator[dict]]:
    """Wrap an image–caption feed (images at any side ≥ R) into a decoder feed."""
    clip.eval().requires_grad_(False)

    def make(start: int) -> Iterator[dict]:
        for batch in image_feed(start):
            yield decoder_batch(clip, batch["image"], batch["caption"], resolution=resolution)

    return make


def low_res(images: torch.Tensor, cfg: UpsamplerConfig) -> torch.Tensor:
    """The clean low-resolution version [B, 3, r, r] of high-resolution images [B, 3, S, S]."""
    return resize(images, cfg.in_resolution)


def training_pair(images: torch.Tensor, cfg: UpsamplerConfig, *, generator: torch.Generator | None) -> dict:
    """image: crops [B, 3, c, c] of the high-res images; low: the same crops of the degraded
    low-res images upsampled to the high-res side (c = crop_fraction · out_resolution)."""
    side = cfg.out_resolution
    images = resize(images, side)
    cond = upsample(degrade(low_res(images, cfg), cfg, generator=generator), side)  # [B, 3, S, S]
    crop = max(8, round(side * cfg.crop_fraction))
    if crop >= side:
        return {"image": images, "low": cond}
    offsets = torch.randint(0, side - crop + 1, (images.shape[0], 2), generator=generator)
    image_crops, cond_crops = [], []
    for i, (y, x) in enumerate(offsets.tolist()):
        image_crops.append(images[i, :, y:y + crop, x:x + crop])
        cond_crops.append(cond[i, :, y:y + crop, x:x + crop])
    return {"image": torch.stack(image_crops), "low": torch.stack(cond_crops)}


def upsampler_feed(image_feed: Callable[[int], Iterator[dict]], cfg: UpsamplerConfig, *, batch_size: int,
                   seed: int, device: torch.device | str = "cpu") -> Callable[[int], Iterator[dict]]:
    """Wrap an image feed (images at `out_resolution`) into an upsampler feed of training pairs,
    made on `device` (resizing, blurring and cropping a batch costs more than a GPU step)."""

    def make(start: int) -> Iterator[dict]:
        position = start
        for batch in image_feed(start):
            generator = torch.Generator().manual_seed(seed * 1_000_003 + position)
            position += batch_size
            yield training_pair(batch["image"].to(device), cfg, generator=generator)

    return make
