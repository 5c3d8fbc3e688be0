"""The decoder stage (paper §2.1): P(x | z_i, caption) on a diffusers UNet2DConditionModel.

A GLIDE-style UNet whose timestep embedding gets a projection of z_i added
(`class_embed_type="identity"`, the addend passed as `class_labels`) and whose cross-attention
context is 4 tokens projected from z_i followed by the caption's CLIP token states
(`TextProj`). Trained with a cosine schedule, learned variance and the hybrid loss
(improved DDPM), dropping z_i 10% and the caption 50% of the time for classifier-free guidance.

Batches (`training_losses`) hold image [B, 3, R, R] in [-1, 1], z_i [B, D], text_states
[B, L, W] and text_mask [B, L]: the frozen CLIP's encodings (see `unclip.decoder.data`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator

import torch
from torch import nn

from unclip.attention import plain_attention_on_cpu
from unclip.config import DecoderConfig, check_guidance_scale
from unclip.decoder.text_proj import TextProj
from unclip.diffusion import GaussianDiffusion, SampleStep, cfg_mix, invert_loop, run, sample_loop


def norm_groups(channels: list[int]) -> int:
    """GroupNorm groups dividing every block width (32 when they allow it)."""
    return math.gcd(32, *channels)


def unet_config(cfg: DecoderConfig) -> dict:
    """UNet2DConditionModel arguments: cross-attention blocks at `attention_resolutions`."""
    channels = [cfg.base_channels * m for m in cfg.channel_mult]
    sides = [cfg.resolution // 2**i for i in range(len(channels))]
    attention = [side in cfg.attention_resolutions for side in sides]
    return {
        "sample_size": cfg.resolution,
        "in_channels": 3,
        "out_channels": 6 if cfg.variance == "learned_range" else 3,
        "down_block_types": tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        "up_block_types": tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "block_out_channels": tuple(channels),
        "layers_per_block": cfg.layers_per_block,
        # diffusers' `attention_head_dim` is the number of heads (diffusers issue #2011)
        "attention_head_dim": tuple(max(1, c // cfg.head_dim) for c in channels),
        "cross_attention_dim": cfg.cross_attention_dim,
        "class_embed_type": "identity",  # z_i's projection is added to the timestep embedding
        "norm_num_groups": norm_groups(channels),
    }


def draw_keep(batch: int, *, z_drop: float, text_drop: float, generator: torch.Generator | None = None,
              device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Independent CFG keep masks [B] bool for z_i (dropped w.p. z_drop) and caption (text_drop).

    Always draws the same random numbers whatever the probabilities, so changing them never
    changes the noise or timesteps of a run.
    """
    u = torch.rand(2, batch, generator=generator, device=device)
    return u[0] >= z_drop, u[1] >= text_drop


class Decoder(nn.Module):
    """UNet2DConditionModel (`unet`) + TextProj (`text_proj`) + the diffusion process of `config`."""

    def __init__(self, *, config: DecoderConfig, clip_dim: int, text_width: int, unet: nn.Module | None = None):
        """`unet`: an existing UNet2DConditionModel (an imported model's) instead of one built from `config`."""
        super().__init__()
        from diffusers import UNet2DConditionModel

        self.config = config
        # An imported UNet keeps its own processors (Karlo's added-KV attention is not the plain kind).
        self.unet = plain_attention_on_cpu(UNet2DConditionModel(**unet_config(config))) if unet is None else unet
        time_embed_dim = 4 * config.base_channels if unet is None else unet.time_embedding.linear_2.out_features
        self.text_proj = TextProj(clip_dim=clip_dim, text_width=text_width, time_embed_dim=time_embed_dim,
                                  cross_attention_dim=config.cross_attention_dim, clip_tokens=config.clip_tokens,
                                  time_text=config.time_text, text_null=config.text_null)
        self.diffusion = GaussianDiffusion.from_schedule(config.noise_schedule, config.timesteps,
                                                         prediction_type=config.prediction_type,
                                                         variance=config.variance)

    @classmethod
    def from_config(cls, config: DecoderConfig, *, clip_dim: int, text_width: int) -> Decoder:
        return cls(config=config, clip_dim=clip_dim, text_width=text_width)

    @property
    def device(self) -> torch.device:
        return self.text_proj.learned_classifier_free_guidance_embeddings.device

    def unet_fn(self, x_t: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        """model_fn for the diffusion math: x_t [B, 3, R, R], t [B] → output [B, 3 or 6, R, R]."""
        return self.unet(x_t, t, **cond).sample.float()  # float32 for the diffusion math, also under autocast

    # --- training --------------------------------------------------------------------------------

    def training_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """Hybrid loss on a batch (image, z_i, text_states, text_mask; z_t too with time_text="pooled");
        CFG drops only the conditioning."""
        x_start = batch["image"].to(self.device)
        n = x_start.shape[0]
        t = torch.randint(0, self.diffusion.num_timesteps, (n,), device=self.device)
        noise = torch.randn_like(x_start)
        keep_z, keep_text = draw_keep(n, z_drop=self.config.z_drop, text_drop=self.config.text_drop, device=self.device)
        z_t = batch.get("z_t")
        cond = self.text_proj(batch["z_i"].to(self.device), batch["text_states"].to(self.device),
                              batch["text_mask"].to(self.device), keep_z=keep_z, keep_text=keep_text,
                              text_embeds=None if z_t is None else z_t.to(self.device))
        losses = self.diffusion.training_losses(self.unet_fn, x_start, t=t, noise=noise, cond=cond,
                                                vlb_weight=self.config.vlb_weight)
        return {k: v.mean() for k, v in losses.items()}

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        return self.training_losses(batch)

    # --- sampling --------------------------------------------------------------------------------

    def guided_fn(self, z_i: torch.Tensor, text_states: torch.Tensor | None, text_mask: torch.Tensor | None,
                  guidance_scale: float, *, text_embeds: torch.Tensor | None = None,
                  ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """model_fn(x_t, t) with CFG: conditional and null rows in one UNet batch, then `cfg_mix`.

        The null branch drops z_i and the caption together; at guidance_scale 1 it is skipped.
        text_embeds [B, D]: the captions' z_t, read only with time_text="pooled".
        """
        n = z_i.shape[0]
        ones = torch.ones(n, dtype=torch.bool, device=z_i.device)
        guidance_scale = check_guidance_scale(guidance_scale)  # a float: Fraction or numpy scales mix too
        if guidance_scale == 1.0:
            cond = self.text_proj(z_i, text_states, text_mask, keep_z=ones, keep_text=ones, text_embeds=text_embeds)
            return lambda x_t, t: self.unet_fn(x_t, t, **cond)
        both = lambda x: None if x is None else torch.cat([x, x])  # noqa: E731  [2B, ...]
        keep = torch.cat([ones, ~ones])  # [2B]: conditional rows, then null rows
        cond = self.text_proj(both(z_i), both(text_states), both(text_mask), keep_z=keep, keep_text=keep,
                              text_embeds=both(text_embeds))

        def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            out = self.unet_fn(torch.cat([x_t, x_t]), torch.cat([t, t]), **cond)  # [2B, C', R, R]
            out_cond, out_uncond = out.chunk(2)
            return cfg_mix(out_cond, out_uncond, guidance_scale, variance=self.config.variance)

        return model_fn

    @torch.no_grad()
    def sample_loop(self, z_i: torch.Tensor, text_states: torch.Tensor | None = None,
                    text_mask: torch.Tensor | None = None, *, text_embeds: torch.Tensor | None = None,
                    guidance_scale: float | None = None, steps: int | None = None, sampler: str | None = None,
                    eta: float | None = None, generator: torch.Generator | None = None,
                    x_T: torch.Tensor | None = None, clip_denoised: bool = True,
                    ) -> Generator[SampleStep, None, torch.Tensor]:
        """Images [B, 3, R, R] in [-1, 1] from z_i [B, D] and caption states (None: no caption).

        text_embeds [B, D]: the captions' z_t (time_text="pooled" only). Unset options take the
        config's values. Yields every step; returns the images.
        """
        cfg = self.config
        z_i = z_i.to(self.device, torch.float32)
        text_states = None if text_states is None else text_states.to(self.device, torch.float32)
        text_mask = None if text_mask is None else text_mask.to(self.device)
        text_embeds = None if text_embeds is None else text_embeds.to(self.device, torch.float32)
        model_fn = self.guided_fn(z_i, text_states, text_mask,
                                  cfg.guidance_scale if guidance_scale is None else guidance_scale,
                                  text_embeds=text_embeds)
        shape = (z_i.shape[0], 3, cfg.resolution, cfg.resolution)
        return (yield from sample_loop(
            model_fn, self.diffusion, shape=shape, x_T=x_T, sampler=sampler or cfg.sampler,
            steps=cfg.sample_steps if steps is None else steps, eta=cfg.eta if eta is None else eta,
            generator=generator, clip_denoised=clip_denoised, device=self.device))

    def sample(self, z_i: torch.Tensor, text_states: torch.Tensor | None = None,
               text_mask: torch.Tensor | None = None, *, callback: Callable[[SampleStep], None] | None = None,
               **kwargs) -> torch.Tensor:
        """`sample_loop` run to the end: images [B, 3, R, R] in [-1, 1]."""
        return run(self.sample_loop(z_i, text_states, text_mask, **kwargs), callback)

    @torch.no_grad()
    def invert(self, images: torch.Tensor, z_i: torch.Tensor, text_states: torch.Tensor | None = None,
               text_mask: torch.Tensor | None = None, *, text_embeds: torch.Tensor | None = None,
               steps: int | None = None, guidance_scale: float = 1.0,
               callback: Callable[[SampleStep], None] | None = None) -> torch.Tensor:
        """x_T [B, 3, R, R] of images [B, 3, R, R] by DDIM inversion given their conditioning.

        `sample(z_i, ..., x_T=x_T, sampler="ddim", eta=0, steps=steps, guidance_scale=same,
        clip_denoised=False)` reconstructs the images: (z_i, x_T) is the bipartite latent (paper §3).
        """
        z_i = z_i.to(self.device, torch.float32)
        text_states = None if text_states is None else text_states.to(self.device, torch.float32)
        text_mask = None if text_mask is None else text_mask.to(self.device)
        text_embeds = None if text_embeds is None else text_embeds.to(self.device, torch.float32)
        model_fn = self.guided_fn(z_i, text_states, text_mask, guidance_scale, text_embeds=text_embeds)
        loop = invert_loop(model_fn, self.diffusion, images.to(self.device, torch.float32),
                           steps=self.config.sample_steps if steps is None else steps)
        return run(loop, callback)
