"""The ×4 upsamplers: degradations, training crops, convolution-only UNet, train → save → load, metrics, CLI."""

import math
from dataclasses import replace

import pytest
import torch

from unclip.config import UnclipConfig, UpsamplerConfig, preset
from unclip.decoder.data import low_res, training_pair, upsample, upsampler_feed
from unclip.decoder.degrade import bsr_degrade, degrade, gaussian_blur, gaussian_kernel
from unclip.decoder.metrics import psnr, ssim
from unclip.decoder.upsampler import Upsampler


def _two_stage() -> UnclipConfig:
    """tiny with a second ×4 stage (64² → 256², BSR-degraded conditioning)."""
    cfg = preset("tiny")
    second = replace(cfg.upsamplers[0], in_resolution=64, out_resolution=256, degradation="bsr")
    return replace(cfg, upsamplers=(cfg.upsamplers[0], second))


def _images(n=4, side=64, seed=0) -> torch.Tensor:
    """Flat-coloured blocks (shapes-world-like edges) in [-1, 1]: [n, 3, side, side]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(side, side), mode="nearest")


@pytest.mark.parametrize("target", ["image", "residual"])
def test_a_truncated_start_begins_at_the_bicubic_upsampling(target, monkeypatch):
    """From start ≈ 0 (timestep 1 of 1000) a network that predicts v = 0 leaves the chain's start
    almost as it is: the bicubic upsampling for both targets (the image itself, or a zero residual
    added back to it). For the image target, starting from pure noise gives nothing like it."""
    cfg = replace(preset("tiny").upsamplers[0], target=target, prediction_type="v_prediction", timesteps=1000)
    upsampler = Upsampler(config=cfg).eval()
    monkeypatch.setattr(upsampler, "unet_fn", lambda x_t, t, low: torch.zeros_like(x_t))
    low_res_images = _images(n=2, side=cfg.in_resolution)
    bicubic = upsample(low_res_images, cfg.out_resolution)
    out = upsampler.sample(low_res_images, steps=1, sampler="ddpm", start=0.001,
                           generator=torch.Generator().manual_seed(0))
    assert (out - bicubic.clamp(-1, 1)).abs().max() < 0.05
    if target == "image":
        noise = upsampler.sample(low_res_images, steps=1, sampler="ddpm", start=1.0,
                                 generator=torch.Generator().manual_seed(0))
        assert (noise - bicubic.clamp(-1, 1)).abs().mean() > 0.2


def test_stage_one_blur_is_the_papers_kernel():
    w = math.exp(-1 / (2 * 0.6**2))
    assert torch.allclose(gaussian_kernel(3, 0.6), torch.tensor([w, 1, w]) / (1 + 2 * w))
    flat = torch.full((1, 3, 8, 8), 0.3)
    assert torch.allclose(gaussian_blur(flat, kernel=3, sigma=0.6), flat)
    dot = torch.zeros(1, 1, 5, 5)
    dot[0, 0, 2, 2] = 1
    blurred = gaussian_blur(dot, kernel=3, sigma=0.6)[0, 0]
    c, e = 1 / (1 + 2 * w), w / (1 + 2 * w)
    assert blurred[2, 2].item() == pytest.approx(c * c) and blurred[1, 2].item() == pytest.approx(e * c)
    assert blurred[1, 1].item() == pytest.approx(e * e) and blurred.sum().item() == pytest.approx(1.0)
    cfg = UpsamplerConfig()
    assert torch.equal(degrade(_images(), cfg, generator=None), degrade(_images(), cfg, generator=None))


def test_bsr_degradation_is_deterministic_for_a_seed_and_differs_across_seeds():
    cfg = replace(UpsamplerConfig(), degradation="bsr")
    images = _images(n=3)
    a = degrade(images, cfg, generator=torch.Generator().manual_seed(0))
    b = degrade(images, cfg, generator=torch.Generator().manual_seed(0))
    c = degrade(images, cfg, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert a.shape == images.shape and a.abs().max() <= 1
    assert 0.0 < (a - images).abs().mean() < 0.5  # degraded, but still the same picture
    heavy = bsr_degrade(images, generator=torch.Generator().manual_seed(0), blur_sigma=(2.0, 2.0), scale=(0.25, 0.25),
                        noise=(0.2, 0.2), jpeg_quality=(10, 10))
    light = bsr_degrade(images, generator=torch.Generator().manual_seed(0), blur_sigma=(0.1, 0.1), scale=(1.0, 1.0),
                        noise=(0.0, 0.0), jpeg_quality=(95, 95))
    assert (heavy - images).abs().mean() > 2 * (light - images).abs().mean()


def test_bsr_area_resize_keeps_the_content_where_it_was():
    """torch's mode="area" pools whole-pixel windows: at a factor 77/128 it moved a square by a third
    of a pixel, so the conditioning no longer lay over its target."""
    from unclip.decoder.degrade import area_weights

    x = torch.zeros(1, 1, 128, 128)
    x[..., 40:60, 50:70] = 1

    def centre(image):
        grid = (torch.arange(image.shape[-1]) + 0.5) / image.shape[-1]
        mass = image[0, 0]
        return float((mass.sum(1) * grid).sum() / mass.sum()), float((mass.sum(0) * grid).sum() / mass.sum())

    w = area_weights(128, 77)
    small = w @ x @ w.t()
    assert max(abs(a - b) for a, b in zip(centre(small), centre(x))) < 1e-4
    assert float(small.sum()) == pytest.approx(float(x.sum()) * (77 / 128) ** 2, rel=1e-5)  # an average: mass kept
    pooled = torch.nn.functional.interpolate(x, size=(77, 77), mode="area")
    assert max(abs(a - b) for a, b in zip(centre(pooled), centre(x))) > 1e-3  # what it replaces
    y = torch.rand(1, 3, 8, 8)  # at a whole factor it is the plain average
    assert torch.allclose(area_weights(8, 4) @ y @ area_weights(8, 4).t(), torch.nn.functional.avg_pool2d(y, 2))


def test_training_pairs_are_quarter_crops_of_matching_regions():
    cfg = preset("tiny").upsamplers[0]  # 16² → 64², crops of 16²
    images = _images(n=3, side=64)
    pair = training_pair(images, cfg, generator=torch.Generator().manual_seed(3))
    assert pair["image"].shape == (3, 3, 16, 16) and pair["low"].shape == (3, 3, 16, 16)
    offsets = torch.randint(0, 64 - 16 + 1, (3, 2), generator=torch.Generator().manual_seed(3))
    cond = upsample(degrade(low_res(images, cfg), cfg, generator=None), 64)
    for i, (y, x) in enumerate(offsets.tolist()):
        assert torch.equal(pair["image"][i], images[i, :, y:y + 16, x:x + 16])
        assert torch.equal(pair["low"][i], cond[i, :, y:y + 16, x:x + 16])
    feed = upsampler_feed(lambda start: iter([{"image": images}] * 3), cfg, batch_size=3, seed=0)
    first, again = next(feed(0)), next(feed(0))
    assert torch.equal(first["image"], again["image"])  # the same position gives the same crops


def test_upsampler_is_convolutional_and_runs_at_full_size():
    up = Upsampler.from_config(preset("tiny").upsamplers[0]).eval()
    names = {type(m).__name__ for m in up.unet.modules()}
    assert not any("Attention" in n or "Attn" in n or "Transformer" in n for n in names), names
    low = _images(n=2, side=16)
    steps = list(up.sample_loop(low, steps=3, generator=torch.Generator().manual_seed(0)))
    assert len(steps) == 3 and steps[-1].x_t.shape == (2, 3, 64, 64)
    bigger = up.sample(_images(n=1, side=32), steps=2, generator=torch.Generator().manual_seed(0))
    assert bigger.shape == (1, 3, 128, 128)  # any input side, ×4


def test_psnr_and_ssim_match_their_definitions():
    x = _images(n=2, side=32)
    assert torch.all(ssim(x, x) > 0.9999) and torch.all(psnr(x, x) >= 99)
    noisy_x = (x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # metrics stay float32 inside a bf16 sampling context
        assert torch.allclose(ssim(noisy_x, x), ssim(noisy_x.double(), x.double()).float(), atol=1e-5)
    shifted = (x + 0.2).clamp(-1, 1)
    mse = ((shifted - x) / 2).pow(2).flatten(1).mean(1)
    assert torch.allclose(psnr(shifted, x), 10 * torch.log10(1 / mse))
    noisy = (x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    assert torch.all(ssim(noisy, x) < ssim(gaussian_blur(noisy, kernel=3, sigma=0.6), x))


@pytest.mark.parametrize("stage", [1, 2])
def test_tiny_upsamplers_train_save_and_reload_to_the_same_samples(tmp_path, stage):
    from unclip.decoder.stage import UPSAMPLER_DIRS, load_upsampler, save_upsampler
    from unclip.modeldir import read_manifest
    from unclip.train.data import shapes_feed
    from unclip.train.trainer import train

    cfg = _two_stage()
    uc = cfg.upsamplers[stage - 1]
    tc = replace(uc.train, steps=2)
    torch.manual_seed(0)
    up = Upsampler.from_config(uc)
    feed = upsampler_feed(shapes_feed(size=uc.out_resolution, batch_size=tc.batch_size, lang="en", seed=0), uc,
                          batch_size=tc.batch_size, seed=0)
    result = train(up, feed, cfg=tc, run_dir=tmp_path / "run", run_config=cfg.to_dict(), progress=False,
                   stage_name=f"upsampler{stage}")
    assert result.step == 2 and math.isfinite(result.metrics["loss"])
    save_upsampler(up, tmp_path / "model", cfg=cfg, stage=stage)
    unet_dir, scheduler_dir = UPSAMPLER_DIRS[stage]
    files = read_manifest(tmp_path / "model").files
    assert f"{unet_dir}/diffusion_pytorch_model.safetensors" in files and f"{scheduler_dir}/scheduler_config.json" in files
    loaded = load_upsampler(tmp_path / "model", stage)
    low = _images(n=1, side=uc.in_resolution)
    a = loaded.sample(low, steps=2, generator=torch.Generator().manual_seed(5))
    b = up.sample(low, steps=2, generator=torch.Generator().manual_seed(5))
    assert a.shape == (1, 3, uc.out_resolution, uc.out_resolution) and torch.equal(a, b)


def test_cli_trains_an_upsampler(tmp_path, capsys):
    from unclip.cli import main
    from unclip.decoder.stage import load_upsampler
    from unclip.modeldir import read_manifest

    argv = ["train", "upsampler", "--stage", "1", "--preset", "tiny", "--run-dir", str(tmp_path / "run"),
            "--out", str(tmp_path / "model"), "--eval-samples", "2", "--set", "upsamplers.0.train.steps=2"]
    assert main(argv) == 0
    evaluation = read_manifest(tmp_path / "model").evaluation["upsampler1"]
    assert {"psnr", "ssim", "psnr_bicubic", "ssim_bicubic"} <= set(evaluation) and evaluation["n"] == 2
    assert "psnr_bicubic" in capsys.readouterr().out
    assert (tmp_path / "run" / "samples.png").is_file()
    assert load_upsampler(tmp_path / "model", 1).config.out_resolution == 64
    assert main(argv[:3] + ["2"] + argv[4:]) == 2  # tiny has one stage: a clear error, not a crash


def test_residual_target_diffuses_the_detail_over_bicubic():
    cfg = replace(preset("tiny").upsamplers[0], target="residual", prediction_type="sample")
    torch.manual_seed(0)
    up = Upsampler.from_config(cfg).eval()
    image, low = _images(n=2, side=64), _images(n=2, side=64, seed=1)
    assert torch.equal(up.target_of(image, low), image - low)
    with torch.no_grad():  # a network predicting a zero residual returns bicubic upsampling exactly
        up.unet.conv_out.weight.zero_()
        up.unet.conv_out.bias.zero_()
    small = _images(n=2, side=16, seed=2)
    steps = list(up.sample_loop(small, steps=3, generator=torch.Generator().manual_seed(0)))
    out = up.sample(small, steps=3, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, upsample(small, 64), atol=1e-6)
    assert torch.allclose(steps[-1].pred_x0, out, atol=1e-6)  # steps show images, not residuals
