"""Attention kernels by device and precision, for the diffusers networks (decoder UNet, prior transformer).

diffusers runs its attention through torch's fused `scaled_dot_product_attention`. On the CPU,
at unclip's sizes (≤ 256 tokens, head width 32), the fused kernel's backward in bf16 costs about
as much as the rest of a training step: plain matmul-softmax attention trains the prior 1.9× and the
shapes decoder 1.35× faster there (docs/performance.md). In float32 on the CPU, and on a GPU, the
fused kernel is as fast or faster. `PlainOnCpu` picks per call, by the activations' device and
precision, so a model moved between devices or run in another precision needs no re-setup; the
weights and the function computed are the same.
"""

from __future__ import annotations

import torch
from torch import nn


class PlainOnCpu:
    """A diffusers attention processor: plain attention on the CPU in bf16, the fused kernel otherwise."""

    def __init__(self):
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

        self.plain, self.fused = AttnProcessor(), AttnProcessor2_0()

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> torch.Tensor:
        processor = self.plain if plain_here(hidden_states) else self.fused
        return processor(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                         attention_mask=attention_mask, temb=temb)


def plain_here(x: torch.Tensor) -> bool:
    """True on the CPU in reduced precision (bf16/fp16 activations, or under CPU autocast)."""
    return x.device.type == "cpu" and (x.dtype != torch.float32 or torch.is_autocast_enabled("cpu"))


def plain_attention_on_cpu(network: nn.Module) -> nn.Module:
    """Give every attention layer of a diffusers `network` the `PlainOnCpu` processor; returns it."""
    network.set_attn_processor(PlainOnCpu())
    return network
