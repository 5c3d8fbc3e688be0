"""The decoder stage: conditioning, classifier-free guidance, training, sampling, inversion, save/load, CLI."""

import json
from dataclasses import replace

import pytest
import torch

from unclip.config import preset
from unclip.decoder.model import Decoder, draw_keep, unet_config

from tiny_models import save_tiny_clip

CLIP_DIM, TEXT_WIDTH = 16, 32


def _decoder(**changes) -> Decoder:
    torch.manual_seed(0)
    return Decoder.from_config(replace(preset("tiny").decoder, **changes), clip_dim=CLIP_DIM, text_width=TEXT_WIDTH)


def _batch(n=6, length=5, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[1::2, 3:] = 0  # some captions are shorter
    return {"image": torch.rand(n, 3, 16, 16, generator=g) * 2 - 1,
            "z_i": torch.nn.functional.normalize(torch.randn(n, CLIP_DIM, generator=g), dim=-1),
            "text_states": torch.randn(n, length, TEXT_WIDTH, generator=g), "text_mask": mask}


def _unet_inputs(decoder: Decoder, batch: dict, seed: int) -> dict:
    """The keyword inputs that reach the UNet in one `training_losses` call."""
    seen = {}

    def hook(module, args, kwargs):
        seen.update(sample=args[0].clone(), timestep=args[1].clone(),
                    **{k: v.detach().clone() for k, v in kwargs.items() if torch.is_tensor(v)})

    handle = decoder.unet.register_forward_pre_hook(hook, with_kwargs=True)
    torch.manual_seed(seed)
    decoder.training_losses(batch)
    handle.remove()
    return seen


def test_unet_follows_the_anchor_layout():
    cfg = replace(preset("shapes").decoder, resolution=32, base_channels=64, channel_mult=(1, 2, 2),
                  attention_resolutions=(16,), head_dim=32, cross_attention_dim=128)
    unet = unet_config(cfg)
    assert unet["down_block_types"] == ("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    assert unet["up_block_types"] == ("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    assert unet["attention_head_dim"][1] == 4  # 128 channels at 16² = 4 heads × 32
    assert unet["out_channels"] == 6 and unet["class_embed_type"] == "identity"  # learned variance; z_i → time emb


def test_guidance_drop_replaces_only_the_conditioning():
    batch = _batch()
    kept = _unet_inputs(_decoder(z_drop=0.0, text_drop=0.0), batch, seed=1)
    dropped = _unet_inputs(_decoder(z_drop=1.0, text_drop=1.0), batch, seed=1)
    # the noised input and the timesteps reaching the UNet are identical in dropped and kept rows
    assert torch.equal(kept["sample"], dropped["sample"]) and torch.equal(kept["timestep"], dropped["timestep"])
    assert not torch.allclose(kept["encoder_hidden_states"], dropped["encoder_hidden_states"])
    assert not torch.allclose(kept["class_labels"], dropped["class_labels"])
    # dropped rows carry the null conditioning, the same for every row whatever its z_i and caption
    for key in ("class_labels", "encoder_hidden_states"):
        assert torch.allclose(dropped[key], dropped[key][:1].expand_as(dropped[key]))
    k = preset("tiny").decoder.clip_tokens
    assert dropped["encoder_attention_mask"][0].tolist() == [1] * (k + 1) + [0] * 4  # z_i tokens + one null token
    assert torch.equal(kept["encoder_attention_mask"][:, k:], batch["text_mask"])


def test_guidance_drops_z_and_caption_independently_at_their_rates():
    n = 200_000
    keep_z, keep_text = draw_keep(n, z_drop=0.1, text_drop=0.5, generator=torch.Generator().manual_seed(0))
    for rate, p in (((~keep_z).float().mean(), 0.1), ((~keep_text).float().mean(), 0.5),
                    ((~keep_z & ~keep_text).float().mean(), 0.05)):
        assert abs(rate.item() - p) < 4 * (p * (1 - p) / n) ** 0.5  # within 4 binomial standard deviations
    # and inside training, per row: a dropped z_i row has the null z_i in the time addend and in the
    # context tokens, a kept row in neither, and the caption (never dropped here) is kept in every row
    decoder = _decoder(z_drop=0.5, text_drop=0.0)
    batch = _batch(n=32)
    seen = _unet_inputs(decoder, batch, seed=2)
    proj, k = decoder.text_proj, preset("tiny").decoder.clip_tokens
    null = proj(proj.learned_classifier_free_guidance_embeddings.detach()[None], None, None,
                keep_z=torch.ones(1, dtype=torch.bool), keep_text=torch.ones(1, dtype=torch.bool))
    null_time = torch.isclose(seen["class_labels"], null["class_labels"].detach()).all(dim=1)
    null_tokens = torch.isclose(seen["encoder_hidden_states"][:, :k],
                                null["encoder_hidden_states"][:, :k].detach()).flatten(1).all(dim=1)
    assert torch.equal(null_time, null_tokens) and 0 < null_time.sum() < 32
    assert torch.equal(seen["encoder_attention_mask"][:, k:], batch["text_mask"])


def test_learned_variance_loss_is_finite_and_trains_both_parts():
    decoder = _decoder()
    losses = decoder.training_losses(_batch())
    assert set(losses) == {"loss", "mse", "vb"} and all(torch.isfinite(v) for v in losses.values())
    assert losses["vb"] >= 0 and losses["loss"] >= losses["mse"]
    losses["loss"].backward()
    assert decoder.unet.conv_out.weight.grad.abs().sum() > 0
    assert decoder.text_proj.learned_classifier_free_guidance_embeddings.grad is not None


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmsolver++"])
def test_every_sampler_repeats_for_a_seed_and_yields_steps(sampler):
    decoder = _decoder().eval()
    b = _batch(n=2)
    args = (b["z_i"], b["text_states"], b["text_mask"])
    steps = list(decoder.sample_loop(*args, sampler=sampler, steps=4, eta=1.0, generator=torch.Generator().manual_seed(0)))
    assert len(steps) == 4 and all(s.x_t.shape == (2, 3, 16, 16) for s in steps)
    a = decoder.sample(*args, sampler=sampler, steps=4, eta=1.0, generator=torch.Generator().manual_seed(0))
    c = decoder.sample(*args, sampler=sampler, steps=4, eta=1.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, steps[-1].x_t) and not torch.equal(a, c) and a.abs().max() <= 1
    unguided = decoder.sample(*args, sampler=sampler, steps=4, guidance_scale=1.0, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(a, unguided)  # the guided run mixed in the null branch
    captionless = decoder.sample(b["z_i"], sampler=sampler, steps=2, generator=torch.Generator().manual_seed(0))
    assert captionless.shape == (2, 3, 16, 16)


def test_ddim_inversion_then_sampling_reconstructs_the_image():
    decoder = _decoder().eval()
    # An untrained UNet is not a denoiser: near the top of the cosine schedule DDIM inversion only
    # holds for a model whose eps varies with x_t the way a denoiser's does, so the output layer is
    # damped here (tests/test_diffusion.py checks convergence with an exact denoiser).
    with torch.no_grad():
        decoder.unet.conv_out.weight.mul_(0.02)
    b = _batch(n=2)
    args = (b["z_i"], b["text_states"], b["text_mask"])
    x_T = decoder.invert(b["image"], *args, steps=10, guidance_scale=3.0)
    again = decoder.sample(*args, x_T=x_T, sampler="ddim", eta=0.0, steps=10, guidance_scale=3.0, clip_denoised=False)
    assert (again - b["image"]).pow(2).mean() < 1e-3
    other_steps = decoder.sample(*args, x_T=x_T, sampler="ddim", eta=0.0, steps=7, guidance_scale=3.0,
                                 clip_denoised=False)
    assert (other_steps - b["image"]).pow(2).mean() > 1e-2  # the inversion is tied to its own step grid


def test_tiny_decoder_trains_through_the_trainer_and_reloads_to_the_same_samples(tmp_path):
    from diffusers import DDPMScheduler

    from unclip.clip.stage import load_clip
    from unclip.decoder.data import decoder_feed
    from unclip.decoder.stage import build_decoder, load_decoder, save_decoder, with_clip_config
    from unclip.modeldir import read_manifest
    from unclip.train.data import shapes_feed
    from unclip.train.trainer import train

    clip_dir = save_tiny_clip(tmp_path)
    cfg = with_clip_config(preset("tiny"), clip_dir)
    clip = load_clip(clip_dir)
    decoder = build_decoder(cfg)
    feed = decoder_feed(clip, shapes_feed(size=16, batch_size=4, lang="mix", seed=0), resolution=16)
    first = next(feed(0))
    assert first["image"].shape == (4, 3, 16, 16) and first["z_i"].shape == (4, 16)
    assert first["text_states"].shape[::2] == (4, 32) and not first["z_i"].requires_grad
    result = train(decoder, feed, cfg=cfg.decoder.train, run_dir=tmp_path / "run", run_config=cfg.to_dict(),
                   progress=False, stage_name="decoder")
    assert result.step == 4 and all(torch.isfinite(torch.tensor(v)) for v in result.metrics.values())
    save_decoder(decoder, clip, tmp_path / "model", cfg=cfg, clip_dir=clip_dir)
    manifest = read_manifest(tmp_path / "model")
    for name in ("decoder/diffusion_pytorch_model.safetensors", "text_proj/model.safetensors",
                 "text_proj/config.json", "decoder_scheduler/scheduler_config.json", "text_encoder/model.safetensors"):
        assert name in manifest.files
    scheduler = DDPMScheduler.from_pretrained(tmp_path / "model" / "decoder_scheduler")
    assert scheduler.config.variance_type == "learned_range"
    assert torch.allclose(scheduler.alphas_cumprod.double(), decoder.diffusion.alphas_cumprod, atol=1e-6)
    loaded = load_decoder(tmp_path / "model")
    args = (first["z_i"][:2], first["text_states"][:2], first["text_mask"][:2])
    a = loaded.sample(*args, generator=torch.Generator().manual_seed(7))
    b = decoder.sample(*args, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_cli_trains_a_decoder(tmp_path, capsys):
    from unclip.cli import main
    from unclip.decoder.stage import load_decoder
    from unclip.modeldir import read_manifest

    clip_dir = save_tiny_clip(tmp_path)
    argv = ["train", "decoder", "--preset", "tiny", "--clip", str(clip_dir), "--run-dir", str(tmp_path / "run"),
            "--out", str(tmp_path / "model"), "--eval-samples", "2", "--set", "decoder.train.steps=2"]
    assert main(argv) == 0
    evaluation = read_manifest(tmp_path / "model").evaluation["decoder"]
    assert -1 <= evaluation["clip_similarity"] <= 1 and evaluation["n"] == 2
    assert "clip_similarity" in capsys.readouterr().out
    assert (tmp_path / "run" / "metrics.jsonl").is_file()
    from PIL import Image

    with Image.open(tmp_path / "run" / "samples.png") as sheet:  # real row over decoded row, 2 columns
        assert sheet.width > 2 * 96 and sheet.height > 2 * 96
    assert load_decoder(tmp_path / "model").config.train.steps == 2


def test_init_continues_from_a_model_and_records_its_history(tmp_path, capsys, monkeypatch):
    """`--init`: the run starts from the model's weights (lr 0 keeps them exactly), the new
    provenance holds the old one under "init", and another architecture is refused."""
    from unclip.cli import main
    from unclip.decoder.stage import load_decoder
    from unclip.modeldir import read_manifest

    clip_dir = save_tiny_clip(tmp_path)
    common = ["train", "decoder", "--preset", "tiny", "--clip", str(clip_dir), "--no-eval",
              "--set", "decoder.train.steps=2", "--set", "decoder.train.ema_decay=0"]
    assert main([*common, "--run-dir", str(tmp_path / "a"), "--out", str(tmp_path / "first")]) == 0
    assert main([*common, "--run-dir", str(tmp_path / "b"), "--out", str(tmp_path / "second"),
                 "--init", str(tmp_path / "first"), "--set", "decoder.train.lr=0"]) == 0
    first, second = load_decoder(tmp_path / "first"), load_decoder(tmp_path / "second")
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    record = read_manifest(tmp_path / "second").provenance["decoder"]
    assert record["init"]["from"] == str(tmp_path / "first")
    assert record["init"]["provenance"] == read_manifest(tmp_path / "first").provenance["decoder"]
    # a continuation draws other samples and noise than the run it continues (it replayed them
    # exactly), and the same ones on every resume: the offset comes from the weights it starts from
    from unclip.modeldir import continuation_seed

    offset = continuation_seed(tmp_path / "first", ["decoder", "text_proj"])
    assert record["init"]["seed_offset"] == offset > 0
    import unclip.train.data as feeds

    captions, feed_for = [], feeds.feed_for

    def watched(data, **kwargs):
        feed = feed_for(data, **kwargs)
        captions.append(next(feed(0))["caption"][:4])
        return feed

    monkeypatch.setattr(feeds, "feed_for", watched)
    for run, init in (("e", []), ("f", ["--init", str(tmp_path / "first")]), ("g", ["--init", str(tmp_path / "first")])):
        assert main([*common, "--run-dir", str(tmp_path / run), "--out", str(tmp_path / f"m{run}"), *init]) == 0
    assert captions[1] != captions[0] and captions[2] == captions[1]
    assert main([*common, "--run-dir", str(tmp_path / "c"), "--out", str(tmp_path / "third"),
                 "--init", str(tmp_path / "first"), "--set", "decoder.base_channels=8"]) == 2
    assert "architecture differs" in capsys.readouterr().err and not (tmp_path / "third").exists()
    other_clip = save_tiny_clip(tmp_path, seed=1)  # continued against another CLIP: z_i of another space
    other = [a if a != str(clip_dir) else str(other_clip) for a in common]
    assert main([*other, "--run-dir", str(tmp_path / "h"), "--out", str(tmp_path / "fifth"),
                 "--init", str(tmp_path / "first")]) == 2
    assert "its decoder learnt from another CLIP than --clip gives" in capsys.readouterr().err


def test_raw_decoder_script_writes_the_checkpoints_raw_weights(tmp_path):
    """scripts/raw_decoder.py: the same run's raw weights in a model directory beside the EMA one,
    to judge one against the other."""
    import runpy
    from pathlib import Path

    from unclip.cli import main
    from unclip.decoder.stage import load_decoder
    from unclip.modeldir import read_manifest
    from unclip.train.trainer import load_checkpoint

    clip_dir = save_tiny_clip(tmp_path)
    assert main(["train", "decoder", "--preset", "tiny", "--clip", str(clip_dir), "--no-eval", "--run-dir",
                 str(tmp_path / "run"), "--set", "decoder.train.steps=3", "--set", "decoder.train.ema_decay=0.9"]) == 0
    script = Path(__file__).resolve().parents[1] / "scripts" / "raw_decoder.py"
    assert runpy.run_path(str(script))["main"]([str(tmp_path / "run"), str(tmp_path / "raw")]) == 0
    raw, ema = load_decoder(tmp_path / "raw"), load_decoder(tmp_path / "run" / "model")
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["model"]
    assert all(torch.equal(raw.state_dict()[k], v.float()) for k, v in state.items())
    assert any(not torch.equal(a, b) for a, b in zip(raw.state_dict().values(), ema.state_dict().values()))
    assert read_manifest(tmp_path / "raw").provenance["decoder"]["weights"] == "raw (no EMA), checkpoint step 3"


def test_a_decoder_continues_on_its_clip_or_one_tuned_from_it_and_on_no_other(tmp_path, capsys):
    """scripts/rebase_default_gpu.sh continues the shipped decoder on a CLIP fine-tuned from its own
    (`unclip train clip --init`): that lineage is accepted; a CLIP trained apart is refused."""
    from unclip.cli import main

    clip = ["train", "clip", "--preset", "tiny", "--no-eval", "--set", "clip.train.steps=2",
            "--set", "clip.train.batch_size=8"]
    assert main([*clip, "--run-dir", str(tmp_path / "ca"), "--out", str(tmp_path / "a")]) == 0
    assert main([*clip, "--run-dir", str(tmp_path / "cb"), "--out", str(tmp_path / "tuned"),
                 "--init", str(tmp_path / "a")]) == 0
    assert main([*clip, "--run-dir", str(tmp_path / "cc"), "--out", str(tmp_path / "apart"),
                 "--set", "clip.train.seed=7"]) == 0
    decoder = ["train", "decoder", "--preset", "tiny", "--no-eval", "--set", "decoder.train.steps=1"]
    assert main([*decoder, "--clip", str(tmp_path / "a"), "--run-dir", str(tmp_path / "d"),
                 "--out", str(tmp_path / "dec")]) == 0
    for clip_dir, code in (("a", 0), ("tuned", 0), ("apart", 2)):
        assert main([*decoder, "--clip", str(tmp_path / clip_dir), "--init", str(tmp_path / "dec"),
                     "--run-dir", str(tmp_path / f"d-{clip_dir}"), "--out", str(tmp_path / f"dec-{clip_dir}")]) == code
    assert "and --clip was not fine-tuned from it" in capsys.readouterr().err
