"""UNets that diffusers' UnCLIPPipeline can run for an exported unclip model.

`unclip export-diffusers` copies this file into an exported component folder (as
`unclip_unet_<prediction>_<steps>_<target>.py`: diffusers caches custom modules by name), rewrites
the constants below for that component, and names the class in
`model_index.json`, so diffusers loads it as a custom component:
`UnCLIPPipeline.from_pretrained(path, trust_remote_code=True)`. It imports only torch and diffusers.

Why:
- Caption mask. UnCLIPPipeline passes the decoder's caption mask [B, K + L] as `attention_mask`.
  Karlo's SimpleCrossAttn blocks read that argument as the cross-attention mask, but the
  CrossAttn blocks of unclip's decoder (Transformer2DModel) apply `attention_mask` to
  self-attention over pixels, where a [B, K + L] mask fails. The decoder class hands the mask on
  as `encoder_attention_mask`, which every block type reads as the cross-attention mask.
- Prediction. diffusers' UnCLIPScheduler understands ε and x_0 predictions only; a network
  trained to predict v (Salimans & Ho 2022; unclip's shapes preset) has its output converted to
  ε = √ᾱ_t v + √(1 − ᾱ_t) x_t on the cosine schedule, so the scheduler sees what it expects.
- Residual upsamplers. An upsampler trained on r = image − u (u: the upsampled low-res image)
  sees x_t^r = x_t − √ᾱ_t u for diffusers' image-space x_t; both share the same noise ε, so the
  output converted to ε is what diffusers' image-space scheduler needs.
"""

import functools
import math

import torch
from diffusers import UNet2DConditionModel, UNet2DModel

PREDICTION_TYPE = "epsilon"  # what the network predicts; rewritten per component by the export
TIMESTEPS = 1000  # training timesteps of its cosine schedule; rewritten by the export
TARGET = "image"  # upsamplers: "residual" when the network diffuses image − upsampled low-res; rewritten


@functools.lru_cache(maxsize=4)
def _alphas_cumprod(timesteps: int) -> torch.Tensor:
    """ᾱ [T] (float64) of diffusers' squaredcos_cap_v2 schedule."""
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    betas = torch.tensor([min(1 - f((i + 1) / timesteps) / f(i / timesteps), 0.999) for i in range(timesteps)],
                         dtype=torch.float64)
    return torch.cumprod(1 - betas, dim=0)


def _abar(timestep, like: torch.Tensor) -> torch.Tensor:
    """ᾱ_t [B, 1, 1, 1] for a timestep (int, 0-d or [B]) on `like`'s device and dtype."""
    t = torch.as_tensor(timestep).long().flatten().cpu()
    abar = _alphas_cumprod(TIMESTEPS)[t].to(like)
    abar = abar.expand(like.shape[0]) if abar.numel() == 1 else abar
    return abar.view(-1, 1, 1, 1)


def as_epsilon(output: torch.Tensor, x_t: torch.Tensor, timestep) -> torch.Tensor:
    """The output [B, C (+ C), H, W] with its first C channels (C = x_t's) as ε; extra channels
    (a learned variance) pass through."""
    if PREDICTION_TYPE == "epsilon":
        return output
    if PREDICTION_TYPE != "v_prediction":  # noqa: SIM102
        raise ValueError(f"unclip_unet.py converts v_prediction only, not {PREDICTION_TYPE!r}")
    abar = _abar(timestep, x_t)
    c = x_t.shape[1]
    eps = abar.sqrt() * output[:, :c] + (1 - abar).sqrt() * x_t
    return torch.cat([eps, output[:, c:]], dim=1)


def _result(out, sample: torch.Tensor, return_dict: bool):
    if not return_dict:
        return (sample,)
    out.sample = sample
    return out


class UnclipUNet2DConditionModel(UNet2DConditionModel):
    """The decoder: `attention_mask` (when no encoder mask is given) masks the caption; the output is ε."""

    def forward(self, sample, timestep, encoder_hidden_states, *args, attention_mask=None,
                encoder_attention_mask=None, return_dict: bool = True, **kwargs):
        if attention_mask is not None and encoder_attention_mask is None:
            attention_mask, encoder_attention_mask = None, attention_mask  # [B, K + L]: 1 = attend
        out = super().forward(sample, timestep, encoder_hidden_states, *args, attention_mask=attention_mask,
                              encoder_attention_mask=encoder_attention_mask, return_dict=True, **kwargs)
        return _result(out, as_epsilon(out.sample, sample, timestep), return_dict)


class UnclipUNet2DModel(UNet2DModel):
    """A ×4 upsampler: the input is [x_t, upsampled low-res image]; the output is ε."""

    def forward(self, sample, timestep, *args, return_dict: bool = True, **kwargs):
        c = sample.shape[1] // 2
        x_t, low = sample[:, :c], sample[:, c:]
        if TARGET == "residual":
            x_t = x_t - _abar(timestep, x_t).sqrt() * low  # the residual's x_t, same noise
            sample = torch.cat([x_t, low], dim=1)
        out = super().forward(sample, timestep, *args, return_dict=True, **kwargs)
        return _result(out, as_epsilon(out.sample, x_t, timestep), return_dict)
