"""The decoder and prior compute plain attention on the CPU and the fused kernel elsewhere, with equal results."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0

import unclip.attention
from unclip.attention import PlainOnCpu
from unclip.config import preset
from unclip.decoder.model import Decoder
from unclip.prior.diffusion import DiffusionPrior


def _decoder() -> tuple[Decoder, torch.nn.Module, tuple, dict]:
    torch.manual_seed(0)
    decoder = Decoder.from_config(replace(preset("tiny").decoder, attention_resolutions=(16, 8)), clip_dim=16,
                                  text_width=32)
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[1, 2:] = 0
    keep = torch.ones(3, dtype=torch.bool)
    cond = decoder.text_proj(F.normalize(torch.randn(3, 16), dim=-1), torch.randn(3, 5, 32), mask, keep_z=keep,
                             keep_text=keep)
    return decoder, decoder.unet, (torch.randn(3, 3, 16, 16), torch.tensor([10, 500, 990])), cond


def _prior() -> tuple[DiffusionPrior, torch.nn.Module, tuple, dict]:
    torch.manual_seed(0)
    prior = DiffusionPrior.from_config(preset("tiny").prior, clip_dim=16, text_width=32, context_length=6)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[0, 3:] = 0
    batch = {"text_states": torch.randn(3, 6, 32), "text_mask": mask, "z_t": F.normalize(torch.randn(3, 16), dim=-1),
             "z_i": F.normalize(torch.randn(3, 16), dim=-1)}
    return prior, prior.transformer, (batch,), {}


@pytest.mark.parametrize("build", [_decoder, _prior], ids=["decoder", "prior"])
def test_plain_attention_computes_what_the_fused_kernel_does(build, monkeypatch):
    model, network, args, kwargs = build()
    assert network.attn_processors and all(isinstance(p, PlainOnCpu) for p in network.attn_processors.values())
    plain_calls = []  # plain attention in float32, to compare exactly
    monkeypatch.setattr(unclip.attention, "plain_here", lambda x: plain_calls.append(1) or True)
    calls = []
    network.register_forward_pre_hook(lambda *_: calls.append(1))

    def output():
        torch.manual_seed(1)
        with torch.no_grad():
            if isinstance(model, Decoder):
                return model.unet_fn(*args, **kwargs)
            return model.training_losses(*args)["loss"]

    plain = output()
    network.set_attn_processor(AttnProcessor2_0())
    fused = output()
    assert calls == [1, 1]
    assert plain_calls and len(plain_calls) == len(network.attn_processors)  # every layer went the plain way once
    assert torch.allclose(plain, fused, atol=1e-5, rtol=1e-5)


def test_the_processor_picks_plain_attention_only_on_the_cpu_in_reduced_precision():
    processor, calls = PlainOnCpu(), []
    processor.plain = lambda attn, x, **kw: calls.append("plain")
    processor.fused = lambda attn, x, **kw: calls.append("fused")
    processor(None, torch.zeros(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        processor(None, torch.zeros(1))
    processor(None, torch.zeros(1, dtype=torch.bfloat16))
    processor(None, torch.zeros(1, device="meta", dtype=torch.bfloat16))
    assert calls == ["fused", "plain", "plain", "fused"]
