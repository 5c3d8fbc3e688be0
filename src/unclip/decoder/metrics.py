"""How good are the decoder and the upsamplers? Numbers measured on shapes-world renders.

- `decode_clip_similarity`: encode a real image to z_i, decode it, and take the cosine between
  the CLIP image embeddings of the decoded and the real image (paper §3: the decoder inverts
  the CLIP image encoder); reported beside the same cosine against a different real image.
- `upsampler_quality`: PSNR and SSIM of the upsampled low-res render against the real high-res
  render, beside the same numbers for plain bicubic upscaling (the baseline to beat).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from unclip.clip.model import ClipModel
from unclip.decoder.data import low_res, upsample
from unclip.decoder.model import Decoder
from unclip.decoder.upsampler import Upsampler


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio [B] in dB of images [B, C, H, W] in [-1, 1], on the [0, 1] scale."""
    mse = ((x.clamp(-1, 1) - y.clamp(-1, 1)) / 2).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(1.0 / mse.clamp(min=1e-10))


def ssim(x: torch.Tensor, y: torch.Tensor, *, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity [B] (Wang et al. 2004: gaussian window 11, σ 1.5, K1 0.01, K2 0.03)
    of images [B, C, H, W] in [-1, 1], computed on [0, 1] per channel and averaged, in float32
    also under autocast (bf16 window sums would push it past 1)."""
    with torch.autocast(x.device.type, enabled=False):
        return _ssim(x.float(), y.float(), window=window, sigma=sigma)


def _ssim(x: torch.Tensor, y: torch.Tensor, *, window: int, sigma: float) -> torch.Tensor:
    from unclip.decoder.degrade import gaussian_kernel

    x, y = (x.clamp(-1, 1) + 1) / 2, (y.clamp(-1, 1) + 1) / 2
    channels = x.shape[1]
    window = min(window, x.shape[-1])
    k1 = gaussian_kernel(window, sigma).to(x)
    kernel = (k1[:, None] * k1[None, :]).expand(channels, 1, window, window)  # [C, 1, w, w]
    blur = lambda z: F.conv2d(z, kernel, groups=channels)  # noqa: E731  valid windows only
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(dim=1)


def _renders(split: str, n: int, size: int, *, seed: int, lang: str = "en") -> tuple[torch.Tensor, list[str]]:
    from unclip.data.shapes import ShapesDataset

    data = ShapesDataset(split, size=size, lang=lang, seed=seed)
    items = [data[i] for i in range(n)]
    return torch.stack([item["image"] for item in items]), [item["caption"] for item in items]


@torch.no_grad()
def upsampler_quality(upsampler: Upsampler, *, n: int = 16, split: str = "val", seed: int = 0, batch_size: int = 8,
                      steps: int | None = None, sampler: str | None = None, start: float | None = None,
                      degraded: bool = False, sheet: str | Path | None = None,
                      images: torch.Tensor | None = None) -> dict[str, float]:
    """Mean PSNR / SSIM of the upsampler and of bicubic upscaling against real high-res renders.

    The conditioning is the render shrunk to the input side (box filter); with `degraded` it
    also goes through the stage's training degradation (seeded). With `sheet`, a PNG of bicubic
    upscaling, the upsampler's output and the real image, row by row, is written there. `images`
    [n, 3, out, out] replaces the renders of `split` (data that is not shapes world).
    """
    from unclip.decoder.degrade import degrade

    cfg = upsampler.config
    high = _renders(split, n, cfg.out_resolution, seed=seed)[0] if images is None else images
    n = len(high)
    generator = torch.Generator().manual_seed(seed)
    sums = {"psnr": 0.0, "ssim": 0.0, "psnr_bicubic": 0.0, "ssim_bicubic": 0.0}
    outs, bicubics = [], []
    for first in range(0, n, batch_size):
        target = high[first:first + batch_size]
        low = low_res(target, cfg)
        if degraded:
            low = degrade(low, cfg, generator=generator)
        out = upsampler.sample(low, steps=steps, sampler=sampler, start=start, generator=generator).cpu()
        bicubic = upsample(low, cfg.out_resolution)
        sums["psnr"] += psnr(out, target).sum().item()
        sums["ssim"] += ssim(out, target).sum().item()
        sums["psnr_bicubic"] += psnr(bicubic, target).sum().item()
        sums["ssim_bicubic"] += ssim(bicubic, target).sum().item()
        outs.append(out)
        bicubics.append(bicubic)
    if sheet is not None:
        write_sheet(sheet, [("bicubic", torch.cat(bicubics)), ("upsampled", torch.cat(outs)), ("real", high)],
                    cell=cfg.out_resolution)
    return {**{k: round(v / n, 4) for k, v in sums.items()}, "n": n,
            "steps": cfg.sample_steps if steps is None else steps, "sampler": sampler or cfg.sampler,
            "start": cfg.sample_start if start is None else start, "split": split,
            "degraded_conditioning": degraded}


@torch.no_grad()
def decode_clip_similarity(decoder: Decoder, clip: ClipModel, *, n: int = 16, split: str = "val", seed: int = 0,
                           batch_size: int = 8, steps: int | None = None, guidance_scale: float | None = None,
                           sampler: str | None = None, with_caption: bool = True,
                           sheet: str | Path | None = None,
                           pairs: tuple[torch.Tensor, list[str]] | None = None) -> dict[str, float]:
    """Mean cosine between CLIP(decode(z_i of a real image)) and CLIP(the real image).

    Both images are seen by CLIP at the decoder's resolution, so resolution is not counted
    against the decoder. `shuffled` is the same cosine against the next image of the batch: the
    level that says "no better than a random image of the data set". With `sheet`, a PNG of the
    real images (top) over their decodings (bottom) is written there. `pairs` (images [n, 3, S, S]
    with S ≥ the CLIP's and the decoder's side, captions) replaces the renders of `split`.
    """
    from unclip.decoder.data import decoder_batch

    side = max(clip.config.image_size, decoder.config.resolution)
    images, captions = _renders(split, n, side, seed=seed) if pairs is None else pairs
    n = len(captions)
    generator = torch.Generator().manual_seed(seed)
    cos, shuffled, reals, fakes = [], [], [], []
    for start in range(0, n, batch_size):
        batch = decoder_batch(clip, images[start:start + batch_size], captions[start:start + batch_size],
                              resolution=decoder.config.resolution)
        decoded = decoder.sample(batch["z_i"], batch["text_states"] if with_caption else None,
                                 batch["text_mask"] if with_caption else None, steps=steps,
                                 guidance_scale=guidance_scale, sampler=sampler, generator=generator)
        real = clip.encode_image(batch["image"])  # the real image at the decoder's resolution
        fake = clip.encode_image(decoded)
        cos.append((real * fake).sum(dim=1))
        shuffled.append((real.roll(1, dims=0) * fake).sum(dim=1))
        reals.append(batch["image"].cpu())
        fakes.append(decoded.cpu())
    if sheet is not None:
        write_sheet(sheet, [("real", torch.cat(reals)), ("decoded from its z_i", torch.cat(fakes))],
                    captions=captions)
    cfg = decoder.config
    return {"clip_similarity": round(torch.cat(cos).mean().item(), 4),
            "clip_similarity_shuffled": round(torch.cat(shuffled).mean().item(), 4), "n": n,
            "steps": cfg.sample_steps if steps is None else steps,
            "guidance_scale": cfg.guidance_scale if guidance_scale is None else guidance_scale,
            "sampler": sampler or cfg.sampler, "split": split}


def write_sheet(path: str | Path, rows: list[tuple[str, torch.Tensor]], *, captions: list[str] | None = None,
                cell: int = 96, columns: int = 8) -> Path:
    """A PNG comparing image rows: each entry (label, images [N, 3, h, w] in [-1, 1]) becomes a
    row of N images scaled to `cell` (nearest neighbour, so pixels stay visible), labelled; the
    first row also carries `captions`. At most `columns` images per row."""
    from PIL import Image

    from unclip.data.preview import captioned_grid
    from unclip.data.shapes import to_pil
    from unclip.io import save_image_atomic
    from unclip.tokenizer import has_thai

    count = min(columns, *(len(images) for _, images in rows))
    tiles, labels = [], []
    for r, (label, images) in enumerate(rows):
        for i in range(count):
            tiles.append(to_pil(images[i]).resize((cell, cell), Image.Resampling.NEAREST))
            text = f"{label}: {captions[i]}" if captions and r == 0 else label
            labels.append([("th" if has_thai(text) else "en", text)])
    return save_image_atomic(path, captioned_grid(tiles, labels, columns=count))
