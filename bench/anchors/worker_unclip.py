"""unclip at the anchor config: `.venv/bin/python bench/anchors/worker_unclip.py {decoder|prior} STEPS [PRECISION [compile]]`.

Decoder: `unclip.decoder.model.Decoder` as in bench/bench_decoder.py (hybrid loss, CFG drops),
50-step DDIM unguided. Prior: `unclip.prior.diffusion.DiffusionPrior` (width 128, 4 layers,
4 heads, predicts x_start), 64-step DDIM, one sample per caption (best_of=1), unguided. Both train
with unclip's trainer's AdamW (`fused=True`); with `compile`, their network is compiled as
`train.compile` does it (`trainer.COMPILE_UNITS`), the compile itself in the warm-up steps.
"""

from __future__ import annotations

import sys

import torch

from _common import CLIP_DIM, DECODER, PRIOR, TEXT_WIDTH, TOKENS, benchmark, setup
from unclip.config import DecoderConfig, PriorConfig, TrainConfig
from unclip.decoder.model import Decoder
from unclip.prior.diffusion import DiffusionPrior
from unclip.train.trainer import compile_units

COMPILED = len(sys.argv) > 4 and sys.argv[4] == "compile"
IMPL = "unclip-compiled" if COMPILED else "unclip"


def fused_adamw(params):
    """The optimizer unclip's trainer builds on the CPU (its betas and eps aside: the anchors' defaults)."""
    return torch.optim.AdamW(params, lr=1e-4, fused=True)


def prepared(model):
    if COMPILED:
        compile_units(model)
    return model


def decoder(steps: int) -> None:
    cfg = DecoderConfig(resolution=32, base_channels=64, channel_mult=(1, 2, 2), layers_per_block=1,
                        attention_resolutions=(16,), head_dim=32, cross_attention_dim=128, clip_tokens=4,
                        timesteps=1000, train=TrainConfig(batch_size=DECODER["train_batch"]))
    model = prepared(Decoder.from_config(cfg, clip_dim=CLIP_DIM, text_width=TEXT_WIDTH))

    def sampler(small):
        args = (small["z_i"], small["text_states"], small["text_mask"])
        return lambda n: lambda: model.sample(*args, sampler="ddim", steps=n, guidance_scale=1.0,
                                              generator=torch.Generator().manual_seed(0))

    benchmark(IMPL, "decoder", model, lambda b: model.training_losses(b)["loss"], sampler, steps=steps,
              optimizer=fused_adamw)

def prior(steps: int) -> None:
    cfg = PriorConfig(width=PRIOR["width"], layers=PRIOR["depth"], heads=PRIOR["heads"], timesteps=1000,
                      sampler="ddim", best_of=1, guidance_scale=1.0)
    model = prepared(DiffusionPrior.from_config(cfg, clip_dim=CLIP_DIM, text_width=TEXT_WIDTH, context_length=TOKENS))

    def sampler(small):
        args = (small["text_states"], small["text_mask"], small["z_t"])
        return lambda n: lambda: model.sample(*args, steps=n, generator=torch.Generator().manual_seed(0))

    benchmark(IMPL, "prior", model, lambda b: model.training_losses(b)["loss"], sampler, steps=steps,
              optimizer=fused_adamw)

if __name__ == "__main__":
    stage, steps = setup()
    {"decoder": decoder, "prior": prior}[stage](steps)
