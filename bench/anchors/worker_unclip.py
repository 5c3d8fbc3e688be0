"""unclip at the anchor config: `.venv/bin/python bench/anchors/worker_unclip.py {decoder|prior} STEPS`.

Decoder: `unclip.decoder.model.Decoder` as in bench/bench_decoder.py (hybrid loss, CFG drops),
50-step DDIM unguided. Prior: `unclip.prior.diffusion.DiffusionPrior` (width 128, 4 layers,
4 heads, predicts x_start), 64-step DDIM, one sample per caption (best_of=1), unguided.
"""

from __future__ import annotations

import torch

from _common import CLIP_DIM, DECODER, PRIOR, TEXT_WIDTH, TOKENS, benchmark, setup
from unclip.config import DecoderConfig, PriorConfig, TrainConfig
from unclip.decoder.model import Decoder
from unclip.prior.diffusion import DiffusionPrior


def decoder(steps: int) -> None:
    cfg = DecoderConfig(resolution=32, base_channels=64, channel_mult=(1, 2, 2), layers_per_block=1,
                        attention_resolutions=(16,), head_dim=32, cross_attention_dim=128, clip_tokens=4,
                        timesteps=1000, train=TrainConfig(batch_size=DECODER["train_batch"]))
    model = Decoder.from_config(cfg, clip_dim=CLIP_DIM, text_width=TEXT_WIDTH)

    def sampler(small):
        args = (small["z_i"], small["text_states"], small["text_mask"])
        return lambda n: lambda: model.sample(*args, sampler="ddim", steps=n, guidance_scale=1.0,
                                              generator=torch.Generator().manual_seed(0))

    benchmark("unclip", "decoder", model, lambda b: model.training_losses(b)["loss"], sampler, steps=steps)

def prior(steps: int) -> None:
    cfg = PriorConfig(width=PRIOR["width"], layers=PRIOR["depth"], heads=PRIOR["heads"], timesteps=1000,
                      sampler="ddim", best_of=1, guidance_scale=1.0)
    model = DiffusionPrior.from_config(cfg, clip_dim=CLIP_DIM, text_width=TEXT_WIDTH, context_length=TOKENS)

    def sampler(small):
        args = (small["text_states"], small["text_mask"], small["z_t"])
        return lambda n: lambda: model.sample(*args, steps=n, generator=torch.Generator().manual_seed(0))

    benchmark("unclip", "prior", model, lambda b: model.training_losses(b)["loss"], sampler, steps=steps)

if __name__ == "__main__":
    stage, steps = setup()
    {"decoder": decoder, "prior": prior}[stage](steps)
