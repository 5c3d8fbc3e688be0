import math

import pytest
import torch
import torch.nn.functional as F

from unclip.config import ARPriorConfig, TrainConfig
from unclip.errors import ModelFormatError
from unclip.prior.ar import DOT_BUCKETS, ARPrior, top_half_dot_buckets
from unclip.prior.pca import PCAQuantizer
from unclip.train.trainer import train

from tiny_models import caption_world

D, L, W = 16, 6, 8


def _world(seed=0):
    return caption_world(dim=D, length=L, width=W, seed=seed)


def test_pca_keeps_fewest_components_reaching_the_variance():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2000, 4, generator=g) @ torch.randn(4, 32, generator=g) + 0.01 * torch.randn(2000, 32, generator=g)
    q = PCAQuantizer.fit(z, variance=0.99, buckets=1024)
    assert q.components == 4 and q.explained[-1] >= 0.99 and q.explained[-2] < 0.99


def test_quantize_round_trip_error_is_bounded():
    z = F.normalize(torch.randn(3000, D), dim=-1)
    q = PCAQuantizer.fit(z, variance=0.99, buckets=1024)
    coeffs = q.project(z)
    inside = ((coeffs >= q.low) & (coeffs <= q.high)).all(dim=1)
    error = (q.project(q.decode(q.encode(z))) - coeffs).abs()[inside]
    assert inside.float().mean() > 0.95
    assert (error <= q.width() / 2 + 1e-5).all()
    assert F.cosine_similarity(q.decode(q.encode(z)), z).mean() > 0.99


def test_condition_drop_rate_is_ten_percent():
    draw = _world()
    batch = draw(512, torch.Generator().manual_seed(1))
    prior = ARPrior.from_data(ARPriorConfig(width=32, layers=1, heads=2, buckets=32), z_i=batch["z_i"],
                              z_t=batch["z_t"], text_width=W, context_length=L)
    rate = sum(1 - prior.training_losses(batch)["keep_rate"].item() for _ in range(40)) / 40
    assert abs(rate - 0.1) < 4 * math.sqrt(0.1 * 0.9 / (512 * 40))


def test_null_branch_replaces_only_the_conditioning():
    draw = _world()
    a, b = draw(4, torch.Generator().manual_seed(2)), draw(4, torch.Generator().manual_seed(3))
    prior = ARPrior.from_data(ARPriorConfig(width=32, layers=1, heads=2, buckets=32), z_i=a["z_i"], z_t=a["z_t"],
                              text_width=W, context_length=L).eval()
    codes = prior.quantizer.encode(a["z_i"])[:, :-1]
    null = torch.zeros(4, dtype=torch.bool)
    dot = prior.dot_bucket(a["z_i"], a["z_t"])
    with torch.no_grad():
        out_a = prior._logits(a["text_states"], a["text_mask"], a["z_t"], dot, codes, null)
        out_b = prior._logits(b["text_states"], b["text_mask"], b["z_t"], dot.flip(0), codes, null)
        other_codes = prior._logits(a["text_states"], a["text_mask"], a["z_t"], dot, codes.flip(0), null)
        cond = prior._logits(a["text_states"], a["text_mask"], a["z_t"], dot, codes, ~null)
    assert torch.allclose(out_a, out_b, atol=1e-5)  # the conditioning is gone
    assert not torch.allclose(out_a, other_codes)  # the sequence being modelled is not
    assert not torch.allclose(out_a, cond)


def test_dot_token_is_drawn_from_the_top_half():
    draws = top_half_dot_buckets(4000, generator=torch.Generator().manual_seed(0))
    assert draws.min() == DOT_BUCKETS // 2 and draws.max() == DOT_BUCKETS - 1


def test_trained_prior_beats_the_caption_baseline_and_seeds_repeat(tmp_path):
    torch.manual_seed(0)
    draw = _world()
    fit = draw(4000, torch.Generator().manual_seed(1))
    prior = ARPrior.from_data(ARPriorConfig(width=64, layers=2, heads=4, buckets=64), z_i=fit["z_i"],
                              z_t=fit["z_t"], text_width=W, context_length=L)

    def feed(start):
        gen = torch.Generator().manual_seed(start)
        while True:
            yield draw(64, gen)

    cfg = TrainConfig(steps=300, batch_size=64, lr=2e-3, warmup_steps=10, lr_schedule="constant",
                      log_every=100, ckpt_every=1000)
    train(prior, feed, cfg=cfg, run_dir=tmp_path, run_config={}, progress=False, stage_name="ar_prior")
    test = draw(300, torch.Generator().manual_seed(5))
    args = (test["text_states"], test["text_mask"], test["z_t"])
    z = prior.sample(*args, generator=torch.Generator().manual_seed(0))
    cosine = (z * test["z_i"]).sum(1).mean().item()
    baseline = (test["z_t"] * test["z_i"]).sum(1).mean().item()
    assert cosine > baseline + 0.15, (cosine, baseline)  # measured: 0.64 vs 0.38
    again = prior.sample(*args, generator=torch.Generator().manual_seed(0))
    assert torch.equal(z, again)
    guided = prior.sample(*args, generator=torch.Generator().manual_seed(0), guidance_scale=2.0)
    assert guided.shape == z.shape and torch.allclose(guided.norm(dim=1), torch.ones(300), atol=1e-5)


def test_cli_trains_saves_and_loads_the_same_prior(tmp_path, capsys):
    from unclip.cli import main
    from unclip.clip.stage import load_clip
    from unclip.config import preset
    from unclip.modeldir import load_checkpoint, read_manifest
    from unclip.prior.data import sample_pairs
    from unclip.prior.stage import build_ar_prior, load_ar_prior

    from tiny_models import save_tiny_clip

    cfg = preset("tiny")
    clip_dir = save_tiny_clip(tmp_path)
    argv = ["train", "prior", "--kind", "ar", "--preset", "tiny", "--clip", str(clip_dir),
            "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "model"), "--fit-samples", "200",
            "--no-eval"]
    assert main(argv) == 0
    manifest = read_manifest(tmp_path / "model")
    assert "ar_prior/model.safetensors" in manifest.files and "text_encoder/model.safetensors" in manifest.files
    loaded = load_ar_prior(tmp_path / "model")
    trained = build_ar_prior(cfg, load_clip(clip_dir), fit_samples=200)
    trained.load_state_dict(load_checkpoint(tmp_path / "run" / "checkpoint.pt")["model"])
    pairs = sample_pairs(load_clip(tmp_path / "model"), split="val", n=6, lang="th")
    args = (pairs["text_states"], pairs["text_mask"], pairs["z_t"])
    a = loaded.sample(*args, generator=torch.Generator().manual_seed(3))
    b = trained.eval().sample(*args, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    shape_file = tmp_path / "model" / "ar_prior" / "config.json"
    shape_file.write_bytes(b"{" * shape_file.stat().st_size)  # same size: only parsing can tell
    with pytest.raises(ModelFormatError, match="config.json is corrupt"):
        load_ar_prior(tmp_path / "model")
    with pytest.raises(ModelFormatError, match="holds no autoregressive prior"):
        load_ar_prior(clip_dir)
