"""Decoder throughput at the anchor config (bench/anchors/_common.py), beside the anchors.

    .venv/bin/python bench/bench_decoder.py

32² images, base 64, channel multipliers (1, 2, 2), one res block per level, attention 4 × 32
heads at 16², 64-d z_i, 77 text token states, cross-attention width 128, 1000 timesteps, two
threads, random init. Measures training images/s (batch 16: forward, hybrid loss, backward,
AdamW) and the latency of 50 DDIM steps for a batch of 4 (unguided: 4 UNet rows per step;
guided: the conditional and null rows in one batch of 8). The raw diffusers anchor (UNet +
UnCLIPTextProjModel, MSE on eps, DDIMScheduler) is re-measured in the same process, since
absolute times drift from machine to machine and with load. Median of REPEATS runs each.
"""

from __future__ import annotations

import resource
import statistics
import time

import torch

from unclip.config import DecoderConfig, TrainConfig
from unclip.decoder.model import Decoder, unet_config

ANCHORS = {"diffusers 0.42.1": (36.4, 2.03), "lucidrains 1.15.6": (29.8, 2.38)}  # img/s, s per 50-step batch of 4
CFG = DecoderConfig(resolution=32, base_channels=64, channel_mult=(1, 2, 2), layers_per_block=1,
                    attention_resolutions=(16,), head_dim=32, cross_attention_dim=128, clip_tokens=4,
                    timesteps=1000, train=TrainConfig(batch_size=16))
CLIP_DIM, TEXT_WIDTH, TOKENS = 64, 64, 77
TRAIN_STEPS, REPEATS = 8, 3


def batch(n: int, g: torch.Generator) -> dict:
    return {"image": torch.rand(n, 3, 32, 32, generator=g) * 2 - 1,
            "z_i": torch.nn.functional.normalize(torch.randn(n, CLIP_DIM, generator=g), dim=-1),
            "text_states": torch.randn(n, TOKENS, TEXT_WIDTH, generator=g),
            "text_mask": torch.ones(n, TOKENS, dtype=torch.long)}


def train_rate(step_fn, params) -> float:
    """Median images/s of REPEATS timed windows of TRAIN_STEPS optimizer steps (after one warm-up step)."""
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    data = batch(CFG.train.batch_size, g)

    def one():
        loss = step_fn(data)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    one()
    rates = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        for _ in range(TRAIN_STEPS):
            one()
        rates.append(TRAIN_STEPS * CFG.train.batch_size / (time.perf_counter() - start))
    return statistics.median(rates)


def latency(fn) -> float:
    fn()  # warm-up
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def diffusers_anchor() -> tuple[float, float, float]:
    """The raw diffusers decoder of the anchor table: params (M), train img/s, 50-step DDIM latency."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_config(CFG))
    proj = UnCLIPTextProjModel(clip_extra_context_tokens=4, clip_embeddings_dim=CLIP_DIM, time_embed_dim=256,
                               cross_attention_dim=128)
    params = sum(p.numel() for p in [*unet.parameters(), *proj.parameters()]) / 1e6
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")

    def cond(b):
        hidden, addend = proj(image_embeddings=b["z_i"], prompt_embeds=b["z_i"], text_encoder_hidden_states=b["text_states"],
                              do_classifier_free_guidance=False)
        mask = torch.nn.functional.pad(b["text_mask"], (4, 0), value=1)
        return {"encoder_hidden_states": hidden, "class_labels": addend, "encoder_attention_mask": mask}

    def step(b):
        t = torch.randint(0, 1000, (len(b["image"]),))
        noise = torch.randn_like(b["image"])
        x_t = scheduler.add_noise(b["image"], noise, t)
        return (unet(x_t, t, **cond(b)).sample[:, :3] - noise).pow(2).mean()

    rate = train_rate(step, [*unet.parameters(), *proj.parameters()])
    small = batch(4, torch.Generator().manual_seed(1))

    @torch.no_grad()
    def sample():
        c = cond(small)
        x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        scheduler.set_timesteps(50)
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t, **c).sample[:, :3], t, x).prev_sample
        return x

    return params, rate, latency(sample)


def main() -> None:
    import argparse

    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # --help, and nothing else
    torch.set_num_threads(2)
    torch.manual_seed(0)
    decoder = Decoder.from_config(CFG, clip_dim=CLIP_DIM, text_width=TEXT_WIDTH)
    params = sum(p.numel() for p in decoder.parameters()) / 1e6
    rate = train_rate(lambda b: decoder.training_losses(b)["loss"], decoder.parameters())
    decoder.eval()
    small = batch(4, torch.Generator().manual_seed(1))
    args = (small["z_i"], small["text_states"], small["text_mask"])
    unguided = latency(lambda: decoder.sample(*args, sampler="ddim", steps=50, guidance_scale=1.0,
                                              generator=torch.Generator().manual_seed(0)))
    guided = latency(lambda: decoder.sample(*args, sampler="ddim", steps=50, guidance_scale=3.0,
                                            generator=torch.Generator().manual_seed(0)))
    d_params, d_rate, d_latency = diffusers_anchor()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    print(f"decoder at the anchor config, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'':34} {'params':>8} {'train img/s':>12} {'50-step DDIM, batch 4':>22}")
    print(f"{'unclip (hybrid loss, CFG drops)':34} {params:7.2f}M {rate:12.1f} {unguided:20.2f} s")
    print(f"{'unclip, guided (one batch of 8)':34} {'':8} {'':12} {guided:20.2f} s")
    print(f"{'diffusers, re-measured here':34} {d_params:7.2f}M {d_rate:12.1f} {d_latency:20.2f} s")
    for name, (anchor_rate, anchor_latency) in ANCHORS.items():
        print(f"{name + ' (anchor table)':34} {'':8} {anchor_rate:12.1f} {anchor_latency:20.2f} s")
    print(f"unclip / diffusers re-measured: train {rate / d_rate:.2f}×, sampling {d_latency / unguided:.2f}× "
          f"(>1 is faster); peak RSS {rss:.0f} MiB (whole process)")


if __name__ == "__main__":
    main()
