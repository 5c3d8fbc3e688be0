"""Degradations of an upsampler's low-resolution conditioning (paper §2.1, appendix).

"We corrupt the conditioning images with gaussian blur for the first upsampling stage, and we
use a more diverse BSR degradation for the second" (Zhang et al. 2021, "Designing a practical
degradation model for deep blind image super-resolution"). They teach the upsampler to clean up
what the stage before it leaves, and are applied in training only.

Images are float [B, 3, H, W] in [-1, 1]. Every random choice comes from the `generator`
passed in, so a seed gives the same degraded images on every run.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F

from unclip.config import UpsamplerConfig
from unclip.errors import ConfigError


def gaussian_kernel(size: int, sigma: float) -> torch.Tensor:
    """Normalised 1-D gaussian [size] (size odd), weights ∝ exp(-x² / 2σ²), x = -(size-1)/2 … (size-1)/2."""
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def gaussian_blur(images: torch.Tensor, *, kernel: int, sigma: float) -> torch.Tensor:
    """Separable gaussian blur of [B, C, H, W] with reflected borders; same shape."""
    if kernel % 2 == 0 or kernel < 1:
        raise ConfigError(f"blur kernel size {kernel} must be a positive odd number")
    if sigma <= 0:
        return images
    channels, pad = images.shape[1], kernel // 2
    k = gaussian_kernel(kernel, sigma).to(images)
    x = F.pad(images, (pad, pad, pad, pad), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, kernel).expand(channels, 1, 1, kernel), groups=channels)  # along W
    return F.conv2d(x, k.view(1, 1, kernel, 1).expand(channels, 1, kernel, 1), groups=channels)  # along H


def _uniform(generator: torch.Generator | None, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _jpeg(image: torch.Tensor, quality: int) -> torch.Tensor:
    """JPEG round trip of one image [3, H, W] in [-1, 1] at `quality` (PIL, 4:2:0)."""
    from PIL import Image

    array = ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(array, "RGB").save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    decoded = np.asarray(Image.open(buffer).convert("RGB"), dtype=np.float32)
    return torch.from_numpy(decoded).permute(2, 0, 1).to(image) / 127.5 - 1.0


RESIZE_MODES = ("area", "bilinear", "bicubic")


def area_weights(side: int, small: int) -> torch.Tensor:
    """[small, side]: how much of each of `side` pixels falls in each of `small` (the area resize,
    separable: `W @ x @ W.T`). torch's mode="area" is an adaptive pool whose windows are whole
    pixels, so at a factor like 0.6 it moved the content by up to a third of a pixel, and the
    conditioning no longer lay over its target."""
    edges = torch.arange(small + 1, dtype=torch.float64) * side / small
    pixels = torch.arange(side, dtype=torch.float64)
    overlap = (torch.minimum(edges[1:, None], pixels + 1) - torch.maximum(edges[:-1, None], pixels)).clamp(min=0)
    return (overlap * small / side).float()


def bsr_degrade(images: torch.Tensor, *, generator: torch.Generator | None, blur_sigma: tuple[float, ...],
                scale: tuple[float, ...], noise: tuple[float, ...], jpeg_quality: tuple[int, ...]) -> torch.Tensor:
    """BSR-style chain per image [B, 3, H, W] → [B, 3, H, W]: blur, resize down and back, noise, JPEG.

    Per image: blur with σ ~ U(blur_sigma) (kernel 2⌈3σ⌉+1), shrink by a factor ~ U(scale) with
    a random interpolation and bicubic back to the original side, add gaussian noise with
    std ~ U(noise), JPEG at quality ~ U{jpeg_quality}. The order is fixed (the BSR paper shuffles it).
    """
    out = []
    side = images.shape[-1]
    for image in images:
        x = image[None]  # [1, 3, H, W]
        sigma = _uniform(generator, *blur_sigma)
        x = gaussian_blur(x, kernel=2 * math.ceil(3 * sigma) + 1, sigma=sigma)
        factor = _uniform(generator, *scale)
        mode = RESIZE_MODES[int(torch.randint(len(RESIZE_MODES), (), generator=generator))]
        small = max(4, round(side * factor))
        if small < side:
            if mode == "area":
                area = area_weights(side, small).to(x)
                x = area @ x @ area.t()
            else:
                x = F.interpolate(x, size=(small, small), mode=mode, align_corners=False, antialias=True)
            x = F.interpolate(x, size=(side, side), mode="bicubic", align_corners=False)
        std = _uniform(generator, *noise)
        x = x + std * torch.randn(x.shape, generator=generator).to(x)
        quality = int(torch.randint(jpeg_quality[0], jpeg_quality[1] + 1, (), generator=generator))
        out.append(_jpeg(x[0], quality))
    return torch.stack(out).clamp(-1, 1)


def degrade(images: torch.Tensor, cfg: UpsamplerConfig, *, generator: torch.Generator | None) -> torch.Tensor:
    """The degradation `cfg.degradation` of low-resolution images [B, 3, h, w] (same shape)."""
    if cfg.degradation == "blur":
        return gaussian_blur(images, kernel=cfg.blur_kernel, sigma=cfg.blur_sigma)
    if cfg.degradation == "bsr":
        return bsr_degrade(images, generator=generator, blur_sigma=cfg.bsr_blur_sigma, scale=cfg.bsr_scale,
                           noise=cfg.bsr_noise, jpeg_quality=cfg.bsr_jpeg_quality)
    raise ConfigError(f"unknown degradation {cfg.degradation!r}; use blur or bsr")
