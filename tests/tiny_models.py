"""Untrained tiny stages that many tests start from (nothing is downloaded: each test builds its own)."""

from __future__ import annotations

from pathlib import Path

import torch


def save_tiny_clip(root: Path, seed: int = 0) -> Path:
    """An untrained CLIP of the `tiny` preset with a small BPE of its own, saved to root/clip{seed}."""
    from unclip.clip.model import ClipModel
    from unclip.clip.stage import save_clip
    from unclip.config import preset
    from unclip.tokenizer import train_shapes_tokenizer

    cfg = preset("tiny")
    torch.manual_seed(seed)
    tokenizer = train_shapes_tokenizer(vocab_size=600, context_length=32, corpus_size=1000)
    clip = ClipModel.from_config(cfg.clip, tokenizer=tokenizer).eval()
    return save_clip(clip, Path(root) / f"clip{seed}", cfg=cfg)


def save_tiny_stages(root: Path, clip_dir: Path) -> dict[str, Path]:
    """Untrained tiny stage directories, as the `unclip train` verbs would write them."""
    from unclip.clip.stage import load_clip
    from unclip.config import preset
    from unclip.decoder.stage import build_decoder, save_decoder, save_upsampler, with_clip_config
    from unclip.decoder.upsampler import Upsampler
    from unclip.prior.stage import build_ar_prior, build_diffusion_prior, save_diffusion_prior, save_prior

    cfg = with_clip_config(preset("tiny"), clip_dir)
    clip = load_clip(clip_dir)
    torch.manual_seed(0)
    decoder = build_decoder(cfg)
    with torch.no_grad():  # an untrained UNet is no denoiser; damped, DDIM inversion holds (test_decoder.py)
        decoder.unet.conv_out.weight.mul_(0.02)
    root = Path(root)
    dirs = {"decoder": save_decoder(decoder, clip, root / "decoder", cfg=cfg, clip_dir=clip_dir)}
    dirs["ar_prior"] = save_prior(clip, build_ar_prior(cfg, clip, fit_samples=64), root / "ar", cfg=cfg,
                                  clip_dir=clip_dir, evaluation={}, provenance={})
    dirs["prior"] = save_diffusion_prior(clip, build_diffusion_prior(cfg, clip, fit_samples=64), root / "prior",
                                         cfg=cfg, clip_dir=clip_dir, evaluation={}, provenance={})
    dirs["upsampler"] = save_upsampler(Upsampler.from_config(cfg.upsamplers[0]), root / "up", cfg=cfg, stage=1)
    return dirs


def caption_world(*, dim: int, length: int, width: int, seed: int = 0, short_odd: bool = False):
    """A toy prior data set: `draw(n, generator)` gives captions of 8 kinds whose text states
    [n, length, width] and z_t [n, dim] tell the kind, and z_i near the kind's centre (unit
    vectors); with `short_odd` the odd kinds' captions end after 4 tokens (mask 0 beyond)."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(8, dim, generator=g), dim=-1)
    states = torch.randn(8, length, width, generator=g)

    def draw(n: int, gen: torch.Generator) -> dict:
        c = torch.randint(0, 8, (n,), generator=gen)
        mask = torch.ones(n, length, dtype=torch.long)
        if short_odd:
            mask[c % 2 == 1, 4:] = 0
        z_i = F.normalize(centres[c] + 0.15 * torch.randn(n, dim, generator=gen), dim=-1)
        z_t = F.normalize(centres[c] + 0.5 * torch.randn(n, dim, generator=gen), dim=-1)
        return {"text_states": states[c], "text_mask": mask, "z_t": z_t, "z_i": z_i}

    return draw
