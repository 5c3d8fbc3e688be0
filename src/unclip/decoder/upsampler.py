"""A ×4 upsampler stage (paper §2.1): P(x_high | x_low) on a diffusers UNet2DModel.

Convolutions only (no attention blocks, no attention in the middle block), no caption, no
guidance. The conditioning is the low-resolution image upsampled (bicubic) to the output side
and concatenated to x_t as 3 extra input channels. Trained on random crops of 1/4 of the
output side (`unclip.decoder.data.training_pair`), run at full size: a fully convolutional
network does not care.

Batches (`training_losses`) hold image [B, 3, c, c] (high-res crops, [-1, 1]) and low
[B, 3, c, c] (the matching crops of the degraded, upsampled low-res image).

`target="residual"` diffuses image − low instead of the image (as in residual diffusion
super-resolution, e.g. SR3's successors): the network then only has to add the detail bicubic
upsampling lacks, and an undertrained network errs toward bicubic instead of toward a wrong
mean colour. The paper does not say which it used; the shapes preset uses the residual
(docs/decoder.md).
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import replace

import torch
from torch import nn

from unclip.config import UpsamplerConfig
from unclip.decoder.data import upsample
from unclip.decoder.model import norm_groups
from unclip.diffusion import GaussianDiffusion, SampleStep, run, sample_loop


def unet_config(cfg: UpsamplerConfig) -> dict:
    """UNet2DModel arguments: plain residual blocks at every level, x_t and the conditioning in."""
    channels = [cfg.base_channels * m for m in cfg.channel_mult]
    return {
        "sample_size": cfg.out_resolution,
        "in_channels": 6,  # x_t [3] + upsampled low-res image [3]
        "out_channels": 6 if cfg.variance == "learned_range" else 3,
        "down_block_types": ("DownBlock2D",) * len(channels),
        "up_block_types": ("UpBlock2D",) * len(channels),
        "block_out_channels": tuple(channels),
        "layers_per_block": cfg.layers_per_block,
        "add_attention": False,  # paper §2.1: convolutions only
        "norm_num_groups": norm_groups(channels),
    }


class Upsampler(nn.Module):
    """UNet2DModel (`unet`) and the diffusion process of one ×4 stage."""

    def __init__(self, *, config: UpsamplerConfig):
        super().__init__()
        from diffusers import UNet2DModel

        self.config = config
        self.unet = UNet2DModel(**unet_config(config))
        self.diffusion = GaussianDiffusion.from_schedule(config.noise_schedule, config.timesteps,
                                                         prediction_type=config.prediction_type,
                                                         variance=config.variance)

    @classmethod
    def from_config(cls, config: UpsamplerConfig) -> Upsampler:
        return cls(config=config)

    @property
    def device(self) -> torch.device:
        return self.unet.conv_in.weight.device

    def unet_fn(self, x_t: torch.Tensor, t: torch.Tensor, *, low: torch.Tensor) -> torch.Tensor:
        """model_fn: x_t [B, 3, S, S], t [B], low [B, 3, S, S] (upsampled conditioning) → output."""
        return self.unet(torch.cat([x_t, low], dim=1), t).sample.float()  # float32 also under autocast

    def target_of(self, image: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        """What the diffusion runs on: the image, or with `target="residual"` its difference from the
        upsampled conditioning (image - low, [B, 3, S, S])."""
        return image - low if self.config.target == "residual" else image

    def training_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """Diffusion loss on high-res crops given their upsampled, degraded low-res crops."""
        low = batch["low"].to(self.device)
        x_start = self.target_of(batch["image"].to(self.device), low)
        t = torch.randint(0, self.diffusion.num_timesteps, (x_start.shape[0],), device=self.device)
        losses = self.diffusion.training_losses(self.unet_fn, x_start, t=t, cond={"low": low})
        return {k: v.mean() for k, v in losses.items()}

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        return self.training_losses(batch)

    @torch.no_grad()
    def sample_loop(self, low_res: torch.Tensor, *, steps: int | None = None, sampler: str | None = None,
                    eta: float | None = None, start: float | None = None, generator: torch.Generator | None = None,
                    x_T: torch.Tensor | None = None) -> Generator[SampleStep, None, torch.Tensor]:
        """×4 images [B, 3, 4r, 4r] in [-1, 1] from low-res images [B, 3, r, r] (not degraded at inference).

        start < 1 starts the chain from the bicubic upsampling noised to that level (its residual,
        zero, with `target="residual"`) instead of from pure noise.
        """
        cfg = self.config
        side = cfg.out_resolution * low_res.shape[-1] // cfg.in_resolution
        low = upsample(low_res.to(self.device, torch.float32), side)
        loop = sample_loop(
            self.unet_fn, self.diffusion, shape=(low.shape[0], 3, side, side), x_T=x_T,
            sampler=sampler or cfg.sampler, steps=cfg.sample_steps if steps is None else steps,
            eta=cfg.eta if eta is None else eta, start=cfg.sample_start if start is None else start,
            init=low if cfg.target == "image" else None, generator=generator, clip_denoised=True, cond={"low": low},
            device=self.device)
        if cfg.target == "image":
            return (yield from loop)
        for step in loop:  # residual: steps show the image the residual predicts
            yield replace(step, pred_x0=(step.pred_x0 + low).clamp(-1, 1))
        return (step.x_t + low).clamp(-1, 1)

    def sample(self, low_res: torch.Tensor, *, callback: Callable[[SampleStep], None] | None = None,
               **kwargs) -> torch.Tensor:
        """`sample_loop` run to the end: [B, 3, 4r, 4r] in [-1, 1]."""
        return run(self.sample_loop(low_res, **kwargs), callback)
