"""The pipeline: assembling stages, the one decode path, every task, slerp, bad input."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from unclip.config import preset
from unclip.errors import ConfigError, DataError, ModelFormatError, SamplingError
from unclip.pipeline.checks import generators
from unclip.pipeline.images import to_pil
from unclip.pipeline.latent import pca_truncate, slerp, slerp_rows, text_direction

from tiny_models import save_tiny_clip, save_tiny_stages


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from unclip.pipeline.assemble import assemble

    root = tmp_path_factory.mktemp("pipeline")
    dirs = save_tiny_stages(root, save_tiny_clip(root))
    return assemble(root / "model", decoder=dirs["decoder"], prior=dirs["prior"], ar_prior=dirs["ar_prior"],
                    upsamplers=(dirs["upsampler"],))


@pytest.fixture(scope="module")
def pipe(model_dir):
    import unclip

    return unclip.load(model_dir, precision="float32")  # exact seed checks on an untrained model


def _image(side=64, seed=0):
    from unclip.data.render import render
    from unclip.data.world import sample

    return render(sample("val", seed, lang="en").scene, side)


def _array(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


# --- latent operations ---------------------------------------------------------------------------


def test_slerp_endpoints_norm_and_angle():
    g = torch.Generator().manual_seed(0)
    a, b = (torch.nn.functional.normalize(torch.randn(3, 16, generator=g), dim=-1) for _ in range(2))
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-6) and torch.allclose(slerp(a, b, 1.0), b, atol=1e-6)
    theta = torch.arccos((a * b).sum(-1))
    for t in (0.25, 0.5, 0.8):
        mid = slerp(a, b, t)
        assert torch.allclose(mid.norm(dim=-1), torch.ones(3), atol=1e-6)  # stays on the sphere
        assert torch.allclose(torch.arccos((mid * a).sum(-1).clamp(-1, 1)), t * theta, atol=1e-4)  # constant rate
    many = slerp(a[:1], b[:1], torch.linspace(0, 1, 5)[:, None])
    assert many.shape == (5, 16) and torch.allclose(many[2], slerp(a[:1], b[:1], 0.5)[0], atol=1e-6)
    assert torch.allclose(slerp(a, a, 0.3), a, atol=1e-6)  # parallel: no division by zero
    x, y = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    assert torch.allclose(slerp_rows(x, y, 0.0), x, atol=1e-5) and slerp_rows(x, y, 0.5).shape == x.shape


def test_text_direction_and_pca_truncation():
    z_t0, z_t = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.0, 1.0, 0.0]])
    assert torch.allclose(text_direction(z_t, z_t0), torch.tensor([[-1.0, 1.0, 0.0]]) / math.sqrt(2))
    with pytest.raises(DataError, match="same CLIP embedding"):
        text_direction(z_t, z_t)
    basis, mean = torch.eye(3)[:2], torch.zeros(3)
    z = torch.nn.functional.normalize(torch.tensor([[3.0, 4.0, 1.0]]), dim=-1)
    assert torch.allclose(pca_truncate(z, mean=mean, basis=basis, k=1), torch.tensor([[1.0, 0.0, 0.0]]))
    assert torch.allclose(pca_truncate(z, mean=mean, basis=basis, k=2), torch.tensor([[0.6, 0.8, 0.0]]))
    with pytest.raises(ConfigError, match="k=3"):
        pca_truncate(z, mean=mean, basis=basis, k=3)


# --- assembling and loading ----------------------------------------------------------------------


def test_assembled_model_holds_every_stage_and_refuses_a_foreign_clip(model_dir, tmp_path):
    from unclip.modeldir import read_manifest
    from unclip.pipeline.assemble import assemble

    manifest = read_manifest(model_dir)
    for comp in ("tokenizer", "text_encoder", "image_encoder", "decoder", "text_proj", "prior", "ar_prior",
                 "super_res_first"):
        assert (model_dir / comp).is_dir(), comp
    assert manifest.resolutions == (16, 64) and manifest.extra["priors"] == ["prior", "ar_prior"]
    other = save_tiny_stages(tmp_path, save_tiny_clip(tmp_path, seed=1))
    with pytest.raises(ModelFormatError, match="different CLIP"):
        assemble(tmp_path / "mixed", decoder=model_dir, ar_prior=other["ar_prior"])
    with pytest.raises(ModelFormatError, match="holds no prior"):
        assemble(tmp_path / "wrong", decoder=model_dir, prior=other["decoder"])
    with pytest.raises(ModelFormatError, match="needs a prior"):
        assemble(tmp_path / "none", decoder=model_dir)


def test_an_assemble_half_killed_midway_leaves_nothing_the_next_one_keeps(model_dir, tmp_path):
    """kill -9 after `assemble --half` wrote its float32 copy left `.assemble.XXXX/` (a whole model)
    beside OUT for good; named like a model save's own temporary folder, the next save removes it."""
    import subprocess
    import sys

    from unclip.cli import main
    from unclip.modeldir import read_manifest

    argv = ["assemble", "--decoder", str(model_dir), "--prior", str(model_dir), "--out", str(tmp_path / "model"),
            "--half"]
    script = ("import os, sys\n"
              "from unclip import modeldir\n"
              "from unclip.cli import main\n"
              "modeldir.half_model_dir = lambda source, target: os._exit(9)\n"  # killed, no cleanup
              "main(sys.argv[1:])\n")
    assert subprocess.run([sys.executable, "-c", script, *argv]).returncode == 9
    assert list(tmp_path.glob(".*"))  # the float32 copy, left behind
    assert main(argv) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert read_manifest(tmp_path / "model").extra["weights_dtype"] == "float16"


def _text_tuned_clip(model_dir, out, noise: float, *, temperature_shift: float = 0.0):
    """The model's CLIP with its text tower (and temperature) moved and its image tower not, as a
    `clip.train_towers=text` fine-tune leaves it, saved at `out`: (the CLIP, its directory)."""
    from unclip.clip.stage import load_clip, save_clip

    cfg = preset("tiny")
    tuned = load_clip(model_dir)
    tuned.use_config(replace(cfg.clip, train_towers="text"))
    with torch.no_grad():
        for p in tuned.text.parameters():
            p.add_(noise * torch.randn_like(p))
        tuned.logit_scale.add_(temperature_shift)
    return tuned, save_clip(tuned, out, cfg=replace(cfg, clip=tuned.config))


def test_a_text_tuned_clip_replaces_the_decoders_own_and_no_other(model_dir, tmp_path):
    """assemble --clip: a CLIP whose text tower moved and image tower did not (clip.train_towers=text)
    is carried with priors trained against it and the decoder as it was; any other CLIP is refused."""
    import unclip
    from unclip.modeldir import load_weights, read_manifest
    from unclip.pipeline.assemble import assemble

    tuned, clip_dir = _text_tuned_clip(model_dir, tmp_path / "tuned", 0.01, temperature_shift=0.5)
    stages = save_tiny_stages(tmp_path / "stages", clip_dir)  # priors trained against the tuned CLIP
    out = assemble(tmp_path / "model", decoder=model_dir, prior=stages["prior"], ar_prior=stages["ar_prior"],
                   upsamplers=(model_dir,), clip=clip_dir)
    for part, source in (("text_encoder", clip_dir), ("image_encoder", model_dir), ("decoder", model_dir),
                         ("prior", stages["prior"])):
        ours, theirs = (load_weights(next((d / part).glob("*.safetensors"))) for d in (out, source))
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), part
    manifest = read_manifest(out)
    assert manifest.config["clip"]["train_towers"] == "text"
    assert manifest.stats["clip_logit_scale"] == pytest.approx(float(tuned.logit_scale))
    pipe = unclip.load(out, precision="float32")
    assert len(pipe.generate("a red circle", n=1, steps=2, seed=0)) == 1

    foreign = save_tiny_clip(tmp_path, seed=1)  # another image tower: the decoder's z_i would move
    with pytest.raises(ModelFormatError, match="image embeddings"):
        assemble(tmp_path / "x", decoder=model_dir, prior=stages["prior"], clip=foreign)
    with pytest.raises(ModelFormatError, match="different CLIP"):  # a prior of the decoder's own CLIP
        assemble(tmp_path / "y", decoder=model_dir, prior=model_dir, clip=clip_dir)


def test_a_ranking_tower_ranks_the_candidates_and_changes_nothing_else(model_dir, tmp_path):
    """assemble --ranker: a text-tuned CLIP's tower is carried as rank_text_encoder/; its z_t ranks the
    diffusion prior's best-of samples and the decoder's candidates, while every stage reads the
    model's own text tower (one candidate and best-of 1 draw what the model without it draws)."""
    import unclip
    from unclip.modeldir import RANKER, load_weights, read_manifest
    from unclip.pipeline.assemble import assemble

    tuned, clip_dir = _text_tuned_clip(model_dir, tmp_path / "tuned", 0.05)
    out = assemble(tmp_path / "ranked", decoder=model_dir, prior=model_dir, ar_prior=model_dir,
                   upsamplers=(model_dir,), ranker=clip_dir)
    for part, source in ((RANKER, clip_dir / "text_encoder"), ("text_encoder", model_dir / "text_encoder")):
        ours, theirs = (load_weights(d / "model.safetensors") for d in (out / part, source))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs), part
    manifest = read_manifest(out)
    assert RANKER in manifest.extra["components"] and "ranker" in manifest.provenance

    plain, ranked = unclip.load(model_dir, precision="float32"), unclip.load(out, precision="float32")
    prompts = ["a red circle", "a blue square above a green heart", "วงกลมสีแดง"]
    a, b = plain.encode_text(prompts), ranked.encode_text(prompts)
    assert a.rank_embeds is None and torch.equal(a.ranking, a.embeds)
    assert torch.equal(a.embeds, b.embeds) and torch.equal(a.token_states, b.token_states)
    truth = tuned.encode_captions([ranked.read_form(p) for p in prompts])
    assert torch.allclose(b.rank_embeds, truth, atol=1e-5) and not torch.allclose(b.rank_embeds, b.embeds, atol=1e-2)

    # best-of: the prior keeps the sample nearest the ranking z_t; ranked against -z_t it keeps the farthest
    away = replace(b, rank_embeds=-b.embeds)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ranked.prior, "config", replace(ranked.prior.config, best_of=4))
        near = ranked.prior_sample(replace(b, rank_embeds=b.embeds), seed=list(range(3)))
        far = ranked.prior_sample(away, seed=list(range(3)))
    assert not torch.allclose(near, far)
    assert ((near * b.embeds).sum(-1) > (far * b.embeds).sum(-1)).all()

    # the decoder's candidates are ranked by the ranking tower's z_t
    seen = {}

    def best(images, text_embeds, k, *, keep=1):
        seen["embeds"] = text_embeds
        return torch.arange(0, len(images), k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ranked, "best_candidates", best)
        ranked.generate(prompts[:1], n=1, steps=2, seed=0, candidates=3, upsample=False)
    assert torch.allclose(seen["embeds"], truth[:1].expand(3, -1), atol=1e-5)

    # one candidate, best-of 1: nothing is ranked, so the model draws what it draws without the tower
    with pytest.MonkeyPatch.context() as mp:
        for pipe in (plain, ranked):
            mp.setattr(pipe.prior, "config", replace(pipe.prior.config, best_of=1))
        same = [_array(pipe.generate("a red circle", n=1, steps=2, seed=3, upsample=False)[0])
                for pipe in (plain, ranked)]
    assert np.array_equal(*same)

    again = assemble(tmp_path / "again", decoder=model_dir, prior=model_dir, upsamplers=(model_dir,), ranker=out)
    assert torch.equal(load_weights(again / RANKER / "model.safetensors")["text_model.final_layer_norm.weight"],
                       load_weights(out / RANKER / "model.safetensors")["text_model.final_layer_norm.weight"])
    assert read_manifest(again).provenance["ranker"] == manifest.provenance["ranker"]
    foreign = save_tiny_clip(tmp_path, seed=1)  # another image tower: its z_t ranks in another space
    with pytest.raises(ModelFormatError, match="--ranker"):
        assemble(tmp_path / "x", decoder=model_dir, prior=model_dir, ranker=foreign)


def test_rank_steer_moves_the_priors_z_i_toward_the_ranking_z_t_keeping_its_norm(model_dir):
    """prior.rank_steer: each prior's z_i is moved toward its caption's ranking z_t, its norm kept;
    0 (the default) leaves z_i as the prior drew it, and the ablations are not steered."""
    import unclip

    pipe = unclip.load(model_dir, precision="float32")
    text = pipe.encode_text(["a red circle", "a blue square above a green heart"])
    unit = torch.nn.functional.normalize
    for prior in ("diffusion", "ar"):
        plain = pipe.prior_sample(text, prior=prior, seed=[0, 1])
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(pipe, "config", replace(pipe.config, prior=replace(pipe.config.prior, rank_steer=1.0)))
            steered = pipe.prior_sample(text, prior=prior, seed=[0, 1])
            caption = pipe.prior_sample(text, prior="caption")
        assert torch.allclose(steered.norm(dim=-1), plain.norm(dim=-1), atol=1e-5), prior
        closer = (unit(steered, dim=-1) * text.ranking).sum(-1) - (unit(plain, dim=-1) * text.ranking).sum(-1)
        assert (closer > 0.01).all(), (prior, closer)
        expected = unit(unit(plain, dim=-1) + unit(text.ranking, dim=-1), dim=-1) * plain.norm(dim=-1, keepdim=True)
        assert torch.allclose(steered, expected, atol=1e-5), prior
        assert torch.equal(caption, text.embeds.float())
    with pytest.raises(ConfigError, match="rank_steer"):
        pipe.config.override(["prior.rank_steer=-0.5"])


def test_clip_fingerprint_reads_weights_and_tokenizer_not_the_writers_version():
    """A CLIP re-saved under another transformers version (its config.json records the version)
    is the same CLIP to `assemble`; different weights are not."""
    from unclip.modeldir import Manifest
    from unclip.pipeline.assemble import clip_fingerprint

    def manifest(config_sha: str, weights_sha: str) -> Manifest:
        files = {"text_encoder/config.json": {"sha256": config_sha},
                 "text_encoder/model.safetensors": {"sha256": weights_sha},
                 "tokenizer/tokenizer.json": {"sha256": "t"}, "decoder/config.json": {"sha256": "d"}}
        return Manifest(config={}, files=files)

    assert clip_fingerprint(manifest("v5.17", "w")) == clip_fingerprint(manifest("v5.24", "w"))
    assert clip_fingerprint(manifest("v5.17", "w")) != clip_fingerprint(manifest("v5.17", "other"))
    assert set(clip_fingerprint(manifest("a", "w"))) == {"text_encoder/model.safetensors", "tokenizer/tokenizer.json"}


# --- generate ------------------------------------------------------------------------------------


def test_bfloat16_precision_samples_under_autocast_close_to_float32(pipe):
    """precision="bfloat16" changes the UNets' arithmetic (outputs differ) but not what they draw
    (outputs stay close); an unknown precision is refused."""
    z_i = pipe.encode_image([_image()])
    try:
        outs = {}
        for precision in ("float32", "bfloat16"):
            pipe.set_precision(precision)
            outs[precision] = pipe.decode(z_i, sampler="ddim", steps=4, seed=3)
    finally:
        pipe.set_precision("float32")
    difference = (outs["float32"] - outs["bfloat16"]).abs()
    assert outs["bfloat16"].dtype == torch.float32 and outs["bfloat16"].shape == (1, 3, 64, 64)
    assert 0 < difference.max() and difference.mean() < 0.05, difference.mean()
    with pytest.raises(ConfigError, match="precision"):
        pipe.set_precision("float16")


def test_auto_precision_is_bfloat16_only_where_the_device_computes_it(pipe, monkeypatch):
    """On a CPU without bf16 units (AVX2 only) bf16 autocast is emulated, 30× slower than float32
    there, so precision="auto" samples in float32; with them, in bfloat16."""
    import unclip.pipeline.pipeline as module

    try:
        for native, expected in ((False, "float32"), (True, "bfloat16")):
            monkeypatch.setattr(module, "native_bf16", lambda device, native=native: native)
            pipe.set_precision("auto")
            assert pipe.precision == expected
    finally:
        pipe.set_precision("float32")


def test_a_list_of_seeds_gives_each_image_its_own(pipe):
    both = pipe.generate(["a red circle", "a blue square"], n=1, seed=[7, 2], size=16)
    alone = [pipe.generate("a red circle", seed=7, size=16)[0], pipe.generate("a blue square", seed=2, size=16)[0]]
    assert all(np.abs(_array(a) - _array(b)).max() <= 1 for a, b in zip(both, alone))
    with pytest.raises(ConfigError, match="3 seeds for 2 images"):
        pipe.generate(["a red circle", "a blue square"], seed=[1, 2, 3])


def test_the_diffusion_prior_samples_a_batch_as_it_samples_each_caption_alone(pipe):
    from dataclasses import replace

    before = pipe.prior.config
    pipe.prior.config = replace(before, best_of=2, sampler="ddpm")  # noise at every step, two draws per caption
    try:
        captions = ["a red circle", "a blue square", "วงกลมสีแดง"]
        batch = pipe.prior_sample(pipe.encode_text(captions), seed=5)
        alone = torch.cat([pipe.prior_sample(pipe.encode_text([c]), seed=5 + i) for i, c in enumerate(captions)])
    finally:
        pipe.prior.config = before
    assert batch.shape == alone.shape and torch.allclose(batch, alone, atol=1e-5)
    assert not torch.allclose(batch[0], batch[1], atol=1e-3)


def test_generate_is_seeded_and_a_batch_of_one_equals_the_batch(pipe):
    seen = []
    images = pipe.generate(["a red circle", "วงกลมสีแดง"], n=2, seed=3, callback=lambda stage, step: seen.append(stage))
    assert len(images) == 4 and images[0].size == (64, 64)
    assert {"prior", "decoder", "upsampler1"} <= set(seen)
    again = pipe.generate(["a red circle", "วงกลมสีแดง"], n=2, seed=3)
    assert all(np.array_equal(_array(a), _array(b)) for a, b in zip(images, again))
    other = pipe.generate("a red circle", n=1, seed=4)  # image 1 of the batch used seed 3 + 1
    assert np.abs(_array(other[0]) - _array(images[1])).max() <= 1  # equal up to float rounding
    assert not np.array_equal(_array(images[0]), _array(images[1]))
    ar = pipe.generate("a red circle", prior="ar", seed=3)
    assert ar[0].size == (64, 64)
    assert pipe.sizes == [16, 64] and pipe.generate("a red circle", seed=3, size=16)[0].size == (16, 16)
    with pytest.raises(ConfigError, match="16×16, 64×64; size 48"):
        pipe.generate("a red circle", size=48)


def test_bad_input_is_a_clear_error(pipe, tmp_path):
    from PIL import Image

    from png_helpers import short_png

    damaged = tmp_path / "damaged.png"
    damaged.write_bytes(short_png(np.full((64, 64, 3), 90, dtype=np.uint8), rows=40))  # Pillow reads it, black below
    with pytest.raises(DataError, match="damaged.png: a damaged PNG: its pixel data ends before the last row"):
        pipe.variations(damaged)
    with pytest.raises(DataError, match="mask .*damaged.png: a damaged PNG"):
        pipe.inpaint(_image(), damaged)
    with pytest.raises(DataError, match="empty"):
        pipe.generate("  ")
    with pytest.raises(ConfigError, match="unknown prior"):
        pipe.generate("a red circle", prior="gan")
    with pytest.raises(DataError, match="square"):
        pipe.variations(Image.new("RGB", (40, 30)))
    Image.new("RGB", (40, 30)).save(tmp_path / "wide.png")  # of two images, the one to crop is named
    with pytest.raises(DataError, match=r"the image \S*wide.png is 40×30; unclip works on square images"):
        pipe.interpolate(_image(), tmp_path / "wide.png")
    with pytest.raises(DataError, match="cannot read"):
        pipe.encode_image("/nonexistent/image.png")
    with pytest.raises(DataError, match=r"\[B, 3, S, S\]"):
        pipe.encode_image(torch.zeros(2, 1, 8, 8))
    with pytest.raises(DataError, match="mask is empty"):
        pipe.inpaint(_image(), Image.new("L", (64, 64), 0))
    with pytest.raises(DataError, match="square"):
        pipe.inpaint(_image(), Image.new("L", (64, 32), 255))
    long = " ".join(["a red circle above a blue square"] * 20)
    assert pipe.encode_text(long).mask.shape[1] == 32  # cut to the context, with a warning
    for seed in (-1, 2**63, 1.7, "3"):  # refused, not wrapped, overflowed or truncated
        with pytest.raises(ConfigError, match="seed"):
            pipe.generate("a red circle", seed=seed)
    with pytest.raises(ConfigError, match="at most 9223372036854775806"):
        pipe.generate("a red circle", n=2, seed=2**63 - 1)
    for eta in (float("nan"), 5.0, -1.0):  # was blamed on the model as non-finite images, or accepted
        with pytest.raises(ConfigError, match="DDIM η"):
            pipe.variations(_image(), n=1, eta=eta)
    for call in (lambda: pipe.variations(_image(), n=0), lambda: pipe.inpaint(_image(), _image(), n=0),
                 lambda: pipe.text_diff(_image(), "a", "b", thetas=[]), lambda: pipe.pca_probe(_image(), dims=[])):
        with pytest.raises(ConfigError, match="n=0|give one or more"):
            call()
    from unclip.pipeline import check_device

    for device, words in (("foo", "not a torch device"), ("cuda:99", "not available|1 CUDA device|CUDA device")):
        with pytest.raises(ConfigError, match=words):
            check_device(device)


def test_a_network_that_returns_nan_is_an_error_not_a_black_image(pipe, monkeypatch):
    real = pipe.decoder.sample
    monkeypatch.setattr(pipe.decoder, "sample", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(SamplingError, match=r"the decoder produced non-finite values \(ddim, 3 steps\)"):
        pipe.generate("a red circle", sampler="ddim", steps=3)
    monkeypatch.setattr(pipe.decoder, "sample", real)
    up = pipe.upsamplers[0].sample
    monkeypatch.setattr(pipe.upsamplers[0], "sample", lambda *a, **k: up(*a, **k) * float("inf"))
    with pytest.raises(SamplingError, match="the upsampler 1 produced non-finite values"):
        pipe.generate("a red circle", steps=2)


def test_inpainting_with_a_network_that_returns_nan_names_the_decoder(pipe, monkeypatch):
    """RePaint's images went on unchecked: black images at the decoder's side, and with upsampling
    the error blamed the upsampler."""
    real = pipe.decoder.guided_fn
    monkeypatch.setattr(pipe.decoder, "guided_fn", lambda *a, **k: (lambda x, t: real(*a, **k)(x, t) * float("nan")))
    mask = torch.zeros(64, 64)
    mask[32:] = 1
    for options in ({"upsample": False}, {}):
        with pytest.raises(SamplingError, match=r"the decoder produced non-finite values \(RePaint, 2 steps\)"):
            pipe.inpaint(_image(), mask, steps=2, resample=1, seed=0, **options)


def test_inpainting_keeps_no_autograd_graph(pipe, monkeypatch):
    """RePaint ran with gradients on: every UNet call's graph was kept to the end, and four 32² images of
    the shipped model at the defaults took 18.9 GB (twelve were killed for want of memory on 24 GB)."""
    import unclip.diffusion

    real, seen = unclip.diffusion.repaint_loop, []

    def recording(*args, **kwargs):
        seen.append(torch.is_grad_enabled())
        return (yield from real(*args, **kwargs))

    monkeypatch.setattr(unclip.diffusion, "repaint_loop", recording)
    mask = torch.zeros(64, 64)
    mask[32:] = 1
    assert len(pipe.inpaint(_image(), mask, steps=2, resample=1, seed=0, upsample=False)) == 1
    assert seen == [False] and torch.is_grad_enabled()


def test_inpainting_hands_the_upsamplers_images_in_range(pipe, monkeypatch):
    import unclip.diffusion

    monkeypatch.setattr(unclip.diffusion, "run", lambda loop, callback=None: torch.full((1, 3, 16, 16), 1.5))
    seen, real = [], pipe.upsamplers[0].sample
    monkeypatch.setattr(pipe.upsamplers[0], "sample", lambda low, **k: seen.append(low.abs().max()) or real(low, **k))
    mask = torch.zeros(64, 64)
    mask[32:] = 1
    pipe.inpaint(_image(), mask, steps=2, resample=1, seed=0)
    assert seen == [1.0]  # clamped like `decode`'s images


# --- manipulations -------------------------------------------------------------------------------


def test_inversion_then_eta_zero_decoding_reconstructs_the_image(pipe):
    image = _image()
    z_i, x_T = pipe.invert(image, steps=10)
    again = pipe.decode(z_i, x_T=x_T, sampler="ddim", eta=0.0, steps=10, upsample=False)
    target = pipe.pixels(image, pipe.config.decoder.resolution)
    assert (again - target).pow(2).mean() < 1e-3
    small = np.asarray(_image(side=16).convert("RGB"), dtype=np.int16)
    variations = pipe.variations(image, n=2, eta=0.0, steps=10, seed=0, upsample=False)
    assert all(np.abs(_array(v) - small).mean() < 8 for v in variations)  # η = 0: the image itself
    varied = pipe.variations(image, n=2, eta=1.0, steps=10, seed=0, upsample=False)
    assert not np.array_equal(_array(varied[0]), _array(varied[1]))
    assert pipe.variations(image, n=1, steps=4, seed=0)[0].size == (64, 64)


def test_images_of_different_sizes_are_read_once_each_and_resized_alike(pipe, tmp_path, monkeypatch):
    import unclip.data.png as png

    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    _image(side=16).save(paths[0])
    _image(side=48, seed=1).save(paths[1])
    reads, read = [], png.read_checked
    monkeypatch.setattr(png, "read_checked", lambda path: reads.append(path) or read(path))
    both = pipe.pixels([str(p) for p in paths], 32)
    assert sorted(reads) == sorted(str(p) for p in paths)  # each caller's file opened once
    alone = torch.cat([pipe.pixels(str(p), 32) for p in paths])
    assert both.shape == (2, 3, 32, 32) and torch.equal(both, alone)


def test_what_is_decoded_from_an_inverted_x_T_is_not_clipped_on_the_way(pipe):
    """The inversion does not clip its predicted images, so decoding its x_T must not either: clipped,
    the shipped model gave a black background back grey (variations at η = 0, the inverted ends of an
    interpolation, text diff at θ = 0 all ~12× further from the image than the inversion allows)."""
    image = _image(seed=2)
    z_i, x_T = pipe.invert(image, steps=10)
    args = (z_i, None, None)
    exact = pipe.decoder.sample(*args, x_T=x_T, sampler="ddim", eta=0.0, steps=10, clip_denoised=False).clamp(-1, 1)
    clipped = pipe.decoder.sample(*args, x_T=x_T, sampler="ddim", eta=0.0, steps=10)
    assert (exact - clipped).abs().max() > 0.01  # this image's predictions leave [-1, 1] on the way
    expected = _array(to_pil(exact)[0])
    assert np.array_equal(_array(pipe.variations(image, n=1, eta=0.0, steps=10, upsample=False)[0]), expected)
    seen, real = [], pipe.decoder.sample

    def spy(*a, **k):
        seen.append(k["clip_denoised"])
        return real(*a, **k)

    pipe.decoder.sample = spy
    try:
        pipe.text_diff(image, "a red circle", "a blue circle", thetas=(0.0,), steps=2)
        pipe.interpolate(image, _image(seed=3), n=2, mode="inverted", steps=2)
        pipe.interpolate(image, _image(seed=3), n=2, mode="fixed", steps=2)  # fresh noise: clipped as usual
    finally:
        del pipe.decoder.sample
    assert seen == [False, False, True]


def test_interpolation_text_diff_and_pca_probe_shapes(pipe):
    a, b = _image(seed=0), _image(seed=1)
    frames = pipe.interpolate(a, b, n=3, steps=4)
    assert len(frames) == 3 and frames[0].size == (64, 64)
    inverted = pipe.interpolate(a, b, n=3, mode="inverted", steps=4)
    assert len(inverted) == 3
    edits = pipe.text_diff(a, "a red circle", "a blue circle", thetas=(0.0, 0.25), steps=4)
    assert len(edits) == 2
    probe = pipe.pca_probe(a, dims=[1, 2], steps=4)
    assert len(probe) == 2
    with pytest.raises(ConfigError, match="at least its two endpoints"):
        pipe.interpolate(a, b, n=1)


def test_frames_that_share_x_t_share_the_upsamplers_noise_too(pipe):
    """Frame i of an interpolation, text diff or PCA probe was upsampled with seed + i: frames of equal
    latents differed at full size (an interpolation flickered), and seed 2^63 − 1 was refused."""
    from unclip.config import MAX_SEED

    a = _image(seed=0)
    def spread(frames) -> int:  # the largest difference of any frame from the first, in levels of 255
        arrays = [np.asarray(f).astype(int) for f in frames]
        assert arrays[0].shape == (64, 64, 3)  # the tiny model's 16² decoder and 64² upsampler
        return max(np.abs(arrays[0] - f).max() for f in arrays[1:])

    for seed in (0, MAX_SEED):  # slerp of a row with itself may move z_i by an ulp: 1 level at most
        assert spread(pipe.interpolate(a, a, n=3, steps=2, seed=seed)) <= 1
    assert spread(pipe.text_diff(a, "a red circle", "a blue circle", thetas=(0.0, 0.0), steps=2)) <= 1
    assert spread(pipe.pca_probe(a, dims=[2, 2], steps=2, seed=MAX_SEED)) <= 1


def test_a_mask_repaints_where_it_is_white_not_where_it_is_faintly_grey():
    """Any value above 0 repainted: a JPEG mask's ringing or a faint grey outside the region turned
    most of the image into repainted area."""
    from PIL import Image

    from unclip.pipeline.images import mask_tensor

    clean = np.zeros((64, 64), np.uint8)
    clean[16:48, 16:48] = 255
    faint = clean + (np.random.default_rng(0).integers(0, 3, clean.shape) * (clean == 0)).astype(np.uint8)
    grey = clean.copy()
    grey[40:48, 16:48] = 127  # under half: not white
    for side in (16, 64):
        want = mask_tensor(clean, side)
        assert torch.equal(mask_tensor(faint, side), want)
        assert torch.equal(mask_tensor(Image.fromarray(faint), side), want)
        assert mask_tensor(grey, side).sum() < want.sum()
    assert mask_tensor(clean, 64).sum() == 32 * 32


def test_text_diff_refuses_captions_without_a_direction_before_inverting(pipe, monkeypatch):
    """Two captions with one embedding give no direction: said before the image's DDIM inversion,
    the slow part, not after it."""
    monkeypatch.setattr(pipe, "invert", lambda *a, **k: pytest.fail("inverted before the captions were checked"))
    with pytest.raises(DataError, match="same CLIP embedding"):
        pipe.text_diff(_image(), "a red circle", "a red circle", thetas=[0.5])


def test_inpaint_keeps_the_known_pixels(pipe):
    from PIL import Image

    image = _image()
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (32, 0, 64, 64))  # repaint the right half
    out = pipe.inpaint(image, mask, prompt="a red circle", steps=4, resample=2, seed=0)
    assert len(out) == 1 and out[0].size == (64, 64)
    assert np.array_equal(_array(out[0])[:, :32], _array(image.convert("RGB"))[:, :32])
    assert not np.array_equal(_array(out[0])[:, 32:], _array(image.convert("RGB"))[:, 32:])
    speck = Image.new("L", (64, 64), 0)
    speck.paste(255, (40, 40, 42, 42))  # 2×2 pixels: under half of one 16² decoder pixel (4×4 here)
    out = _array(pipe.inpaint(image, speck, prompt="a red circle", steps=4, resample=2, seed=0)[0])
    before = _array(image.convert("RGB"))
    changed = np.argwhere((out != before).any(-1))
    assert len(changed) and changed.min(0).tolist() == [40, 40] and changed.max(0).tolist() == [41, 41]
    with pytest.raises(ConfigError, match="resample=0"):
        pipe.inpaint(image, speck, resample=0)


# --- command line --------------------------------------------------------------------------------


def test_every_cli_verb_runs_on_the_tiny_model(model_dir, tmp_path, capsys):
    import json

    from PIL import Image

    from unclip.cli import main

    a, b, mask = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "mask.png"
    _image(seed=0).save(a)
    _image(seed=1).save(b)
    m = Image.new("L", (64, 64), 0)
    m.paste(255, (0, 0, 64, 32))
    m.save(mask)
    common = ["--model", str(model_dir), "--steps", "3", "--quiet"]
    runs = {
        "generate": ["generate", "a red circle", "ดาวสีเขียว", "-n", "2", "--seed", "5"],
        "vary": ["vary", str(a), "-n", "2"],
        "interpolate": ["interpolate", str(a), str(b), "-n", "3"],
        "textdiff": ["textdiff", str(a), "a red circle", "a blue circle", "--thetas", "0", "0.3"],
        "inpaint": ["inpaint", str(a), str(mask), "--prompt", "a green star", "-n", "1", "--resample", "1"],
        "probe": ["probe", str(a), "--dims", "1", "3"],
    }
    counts = {"generate": 4, "vary": 2, "interpolate": 3, "textdiff": 2, "inpaint": 1, "probe": 2}
    for verb, argv in runs.items():
        out = tmp_path / f"{verb}.png"
        assert main([*argv, *common, "--out", str(out)]) == 0, verb
        assert out.is_file() and "image(s)" in capsys.readouterr().out
        singles = sorted(tmp_path.glob(f"{verb}-*.png"))
        assert len(singles) == counts[verb], verb
        with Image.open(singles[-1]) as image:
            params = json.loads(image.text["unclip"])
            assert image.size == (64, 64)
        assert params["verb"] == verb and params["index"] == counts[verb] - 1 and params["steps"] == 3
    # every verb that decodes stops at --size; upscale runs the upsamplers alone
    assert main([*runs["vary"], *common, "--size", "16", "--out", str(tmp_path / "small.png")]) == 0
    assert main(["upscale", str(tmp_path / "small-0.png"), "-n", "2", "--model", str(model_dir), "--quiet",
                 "--upsampler-steps", "2", "--out", str(tmp_path / "up.png")]) == 0
    for name, side in (("small-1.png", 16), ("up-1.png", 64)):
        with Image.open(tmp_path / name) as image:
            assert image.size == (side, side) and json.loads(image.text["unclip"])["size"] == side, name
    with Image.open(tmp_path / "up-1.png") as image:  # the cascade's options as applied, so the image can be redrawn
        params = json.loads(image.text["unclip"])
    assert params["upsamplers"][0]["steps"] == 2 and params["precision"] in ("float32", "bfloat16")
    capsys.readouterr()
    with Image.open(tmp_path / "generate-1.png") as image:
        params = json.loads(image.text["unclip"])
    assert params["label"] == "a red circle" and params["image_seed"] == 6  # --seed 5, image 1
    assert params["model"] == str(model_dir) and params["sampler"] and params["guidance_scale"] is not None
    Image.new("RGB", (4, 4)).save(tmp_path / "generate-9.png")  # not unclip's: kept
    assert main([*runs["generate"][:2], "-n", "1", *common, "--out", str(tmp_path / "generate.png")]) == 0
    assert "images " + str(tmp_path / "generate-0.png") + "\n" in capsys.readouterr().out  # one image, named
    # the earlier run's images 1-3 went with it, so the folder holds this run's alone (and the stranger)
    assert sorted(p.name for p in tmp_path.glob("generate-*.png")) == ["generate-0.png", "generate-9.png"]

    assert main(["generate", "", *common]) == 2  # empty prompt: a clear error, status 2
    assert "empty" in capsys.readouterr().err
    # textdiff names which of its captions is empty (it said "prompt '' is empty"), before the model loads
    assert main(["textdiff", str(a), "a red circle", " ", "--model", str(tmp_path / "none"), "--quiet"]) == 2
    assert "the text diff's target ' ' is empty" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:  # not a PNG: refused before anything is generated
        main(["generate", "a red circle", *common, "--out", str(tmp_path / "grid.jpg")])
    assert stop.value.code == 2 and "is not a .png path" in capsys.readouterr().err
    assert main(["generate", "a red circle", "-n", "1", *common, "--out", str(tmp_path / "folder")]) == 0
    assert (tmp_path / "folder" / "generate.png").is_file() and (tmp_path / "folder" / "generate-0.png").is_file()
    with pytest.raises(SystemExit):
        main(["generate", "a red circle", *common, "--steps", "0"])
    assert "--steps: 0 is too small" in capsys.readouterr().err
    for scale in ("nan", "inf", "-1"):  # refused at once, not as a broken image after sampling
        with pytest.raises(SystemExit):
            main(["generate", "a red circle", *common, "--guidance-scale", scale])
        assert "give a number from 0 to 50" in capsys.readouterr().err


def test_prompts_with_words_the_model_never_saw_are_warned_about_once(model_dir, caplog):
    import logging

    from PIL import Image

    import unclip

    pipe = unclip.load(model_dir)  # a tiny model of the shapes preset: trained on shapes-world captions
    assert pipe.unknown_words("a dog on a red skateboard") == ["dog", "skateboard"]
    with caplog.at_level(logging.WARNING, logger="unclip.pipeline.pipeline"):
        pipe.encode_text(["a dog on a red skateboard"] * 3 + ["a red circle", "ดาวสีเขียว"])
    assert len(caplog.records) == 1 and "never saw 'dog', 'skateboard' in training; those words" in caplog.text
    assert caplog.text.rstrip().endswith("(the words it knows: docs/shapes_world.md)")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="unclip.pipeline.pipeline"):
        pipe.encode_text(["แมวสีแดง"])
    assert "โมเดลนี้ไม่เคยเห็นคำว่า 'แมว'" in caplog.text and "(คำที่โมเดลรู้จัก: docs/shapes_world.md)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="unclip.pipeline.pipeline"):
        pipe.encode_text(["a dog on a red skateboard"])  # another call, e.g. the next batch: not again
        pipe.encode_text(["😀 !!!"])
    assert len(caplog.records) == 1 and "it has no words, only symbols or emoji" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="unclip.pipeline.pipeline"):
        pipe.generate("a red circle", steps=2, candidates=2)  # its own 16² candidates, read by CLIP
        assert "upscaled" not in caplog.text
        pipe.encode_image(Image.new("RGB", (4, 4)))  # a caller's tiny image
    assert "an input image is 4×4" in caplog.text
    long = " ".join(["a red circle above a blue square"] * 8)  # what a server answer carries, beside the images
    reads = pipe.clip.tokenizer.context_length - 2
    assert pipe.prompt_warnings(long) == [f"it is longer than the {reads} tokens this model reads; the rest was left out"]
    assert pipe.prompt_warnings("a red circle") == []
    # Thai as it is typed: a count in Thai digits, ํ้า for ้ำ, a tone mark before its vowel: no false warning
    assert pipe.prompt_warnings("หัวใจสีเหลือง ๓ ดวง") == pipe.prompt_warnings("ดาวสีน\u0e4d\u0e49\u0e32เงิน") == []
    assert pipe.prompt_warnings("ส\u0e48\u0e35เหล\u0e48\u0e35ยมจัตุรัสสีแดง") == []
    assert pipe.prompt_warnings("a pink circel") == [  # a misspelt shape: the word it was meant to be
        "this model never saw 'circel' in training; that word means nothing to it (did you mean 'circle'?)"]
    assert pipe.prompt_warnings("ดาวสีชมภู") == [  # said in Thai for a Thai prompt
        "โมเดลนี้ไม่เคยเห็นคำว่า 'ชมภู' ตอนฝึก คำนี้จึงไม่มีความหมายสำหรับโมเดล (หมายถึง 'ชมพู' หรือเปล่า?)"]
    assert pipe.prompt_warnings(" ".join(["ดาวสีแดง"] * 12)) == [
        f"ข้อความนี้ยาวเกิน {reads} โทเคนที่โมเดลนี้อ่านได้ ส่วนที่เกินถูกตัดทิ้ง"]
    assert pipe.example_prompt == "a red circle above a blue square"
    pipe.config = replace(pipe.config, data=replace(pipe.config.data, source="folder"))
    assert pipe.unknown_words("a dog on a red skateboard") == []  # other data, saved without its words
    from unclip.words import CaptionWords

    pipe.clip.tokenizer.words = CaptionWords.of(["A dog on a skateboard.", "a red bus", "หมาสีแดง"])
    with caplog.at_level(logging.WARNING, logger="unclip.pipeline.pipeline"):
        pipe.encode_text(["a cat on a bus"])  # the log names where its words are, not shapes world's docs
    assert f"uses 'cat'; that word means little or nothing to it (the words it knows: {model_dir}/tokenizer/" \
           "words.json)" in caplog.text
    assert pipe.unknown_words("a dog on a red skateboard") == [] == pipe.unknown_words("แมวสีดำ")  # Thai: unsplit
    assert pipe.prompt_warnings("A cat on a red skatebord, 3 times") == [
        "none of the 3 training captions this model read its words from uses 'cat', 'skatebord', 'times'; those "
        "words mean little or nothing to it (did you mean 'skateboard' for 'skatebord'?)"]
    pipe.clip.tokenizer.words = None
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="unclip.pipeline.pipeline"):
        pipe.encode_text(["⭕ 🟥"])  # emoji captions may be what it learnt: no "no words" warning, no shapes docs
    assert pipe.prompt_warnings("⭕ 🟥") == [] and caplog.text == ""
    assert pipe.example_prompt == ""  # its CLIP's manifest keeps no training caption


def test_a_relation_the_world_never_says_is_warned_about_with_the_world_s_phrasing(pipe, caplog):
    """"อยู่บน" and "on top of" are made of words the world's captions use, so no word warning
    came, though the model never saw either phrase: its captions say "อยู่เหนือ", "above"."""
    import logging

    assert pipe.prompt_warnings("วงกลมสีแดงอยู่บนสี่เหลี่ยมสีน้ำเงิน") == [
        "คำบรรยายของ shapes world ไม่ใช้ 'อยู่บน' บอกตำแหน่งของรูปทรงหนึ่งเทียบกับอีกรูปทรง "
        "แต่ใช้ 'อยู่เหนือ' หรือ 'อยู่ด้านบนของ' โมเดลจึงอาจวางรูปทรงไม่ตรงกับที่สั่ง"]
    assert pipe.prompt_warnings("A red circle on top of a blue square") == [
        "'on top of' is not how shapes world's captions say where one shape is from another; they say 'above' "
        "or 'over', so this model may not place the shapes as asked"]
    assert pipe.prompt_warnings("ดาวสีเขียวอยู่หลังหัวใจสีชมภู") == [  # a word unknown, a relation of no direction
        "โมเดลนี้ไม่เคยเห็นคำว่า 'ชมภู' ตอนฝึก คำนี้จึงไม่มีความหมายสำหรับโมเดล (หมายถึง 'ชมพู' หรือเปล่า?)",
        "คำบรรยายของ shapes world ไม่ใช้ 'อยู่หลัง' บอกตำแหน่งของรูปทรงหนึ่งเทียบกับอีกรูปทรง แต่ใช้ 'อยู่ทางซ้ายของ', "
        "'อยู่ทางขวาของ', 'อยู่เหนือ', 'อยู่ด้านบนของ', 'อยู่ใต้' หรือ 'อยู่ด้านล่างของ' "
        "โมเดลจึงอาจวางรูปทรงไม่ตรงกับที่สั่ง"]
    assert pipe.prompt_warnings("a red circle to the left of a blue square") == []
    assert pipe.prompt_warnings("วงกลมสีแดงอยู่เหนือสี่เหลี่ยมจัตุรัสสีน้ำเงิน") == []
    with caplog.at_level(logging.WARNING, logger="unclip.pipeline.pipeline"):
        pipe.encode_text(["a green star under of a red heart"])
    assert "'under of' is not how shapes world's captions say" in caplog.text and "'below' or 'under'" in caplog.text


def test_a_damaged_weight_file_of_the_right_size_is_refused_at_load(model_dir, tmp_path):
    import shutil

    import unclip

    copy = shutil.copytree(model_dir, tmp_path / "model")
    weights = copy / "prior" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one weight: it would load and sample wrong, silently
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelFormatError, match="diffusion_pytorch_model.safetensors is corrupt: its sha256"):
        unclip.load(copy)


@pytest.mark.parametrize("stage, shape_file, key", [("prior", "prior_cond", "clip_dim"), ("ar_prior", "ar_prior", "dim")])
def test_a_prior_shape_file_without_its_numbers_is_refused_at_load(model_dir, tmp_path, stage, shape_file, key):
    """A prior's shape file, edited with its manifest record to match, was a KeyError from the loader."""
    import json
    import shutil

    from unclip.modeldir import MANIFEST, file_record
    from unclip.prior.stage import load_ar_prior, load_diffusion_prior

    copy = shutil.copytree(model_dir, tmp_path / "model")
    (copy / shape_file / "config.json").write_text("{}")
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["files"][f"{shape_file}/config.json"] = file_record(copy / shape_file / "config.json")
    (copy / MANIFEST).write_text(json.dumps(manifest))
    load = load_diffusion_prior if stage == "prior" else load_ar_prior
    with pytest.raises(ModelFormatError, match=f"{shape_file}/config.json lacks the whole number\\(s\\) {key}"):
        load(copy)


def test_the_python_api_names_what_was_wrong_with_its_arguments(model_dir):
    from PIL import Image

    import unclip

    pipe = unclip.load(model_dir)
    for prompt, message in ((None, "a string or a list of strings, not NoneType"), (5, "not int"),
                            (["a red circle", None], "None is a NoneType, not a string"), ([], "no prompt given")):
        with pytest.raises(DataError, match=message):
            pipe.generate(prompt, n=1, steps=2)
    with pytest.raises(ConfigError, match="steps=0 must be between 1"):  # 0 steps was the default, silently
        pipe.generate("a red circle", n=1, steps=0)
    with pytest.raises(ConfigError, match="seed 'abc': give a whole number"):
        pipe.generate("a red circle", n=1, steps=2, seed="abc")
    with pytest.raises(DataError, match="an image is a PIL image, a path or a tensor, not NoneType"):
        pipe.interpolate(Image.new("RGB", (16, 16)), None, n=2, steps=2)


def test_every_guided_sampler_refuses_an_unusable_guidance_scale(model_dir):
    import unclip

    pipe = unclip.load(model_dir)
    for options in ({"guidance_scale": float("nan")}, {"prior_guidance_scale": -2.0}):
        with pytest.raises(ConfigError, match="give a number from 0 to 50"):
            pipe.generate(["a red circle"], n=1, steps=2, **options)
    with pytest.raises(ConfigError, match="give a number from 0 to 50"):
        pipe.generate(["a red circle"], n=1, steps=2, prior="ar", prior_guidance_scale=float("inf"))
    # any real number is a scale: a Fraction or a numpy scalar draws what the equal float draws
    from fractions import Fraction

    for prior in ("diffusion", "ar"):
        drawn = [np.asarray(pipe.generate(["a red circle"], n=1, steps=2, seed=1, prior=prior, guidance_scale=g,
                                          prior_guidance_scale=g)[0]) for g in (Fraction(3, 2), np.float32(1.5), 1.5)]
        assert np.array_equal(drawn[0], drawn[2]) and np.array_equal(drawn[1], drawn[2]), prior


def test_generate_samples_in_batches_that_change_no_image(model_dir, tmp_path, monkeypatch):
    """Any -n runs in flat memory: batches of BATCH images, each written before the next, with the
    images (seed + i) of one big call; the grid shows the first GRID_MAX."""
    import json

    from PIL import Image

    from unclip.cli import main
    from unclip.pipeline import cli as pipeline_cli

    argv = ["generate", "a red circle", "ดาวสีเขียว", "-n", "3", "--model", str(model_dir), "--steps", "3",
            "--quiet", "--seed", "7"]
    assert main([*argv, "--out", str(tmp_path / "whole" / "g.png")]) == 0
    monkeypatch.setattr(pipeline_cli, "BATCH", 4)
    monkeypatch.setattr(pipeline_cli, "GRID_MAX", 4)
    assert main([*argv, "--out", str(tmp_path / "batched" / "g.png")]) == 0
    for i in range(6):
        with Image.open(tmp_path / "whole" / f"g-{i}.png") as a, Image.open(tmp_path / "batched" / f"g-{i}.png") as b:
            assert json.loads(b.text["unclip"])["index"] == i
            assert np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max() <= 1, i
    assert not (tmp_path / "batched" / "g-6.png").exists()
    with Image.open(tmp_path / "whole" / "g.png") as whole, Image.open(tmp_path / "batched" / "g.png") as grid:
        assert grid.height < whole.height  # one row of 4 images, not two rows holding 6
    assert main(["generate", "a red circle", "--model", str(tmp_path / "missing")]) == 2
    assert main(["assemble", "--decoder", str(model_dir), "--ar-prior", str(model_dir),
                 "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "ar_prior").is_dir() and not (tmp_path / "again" / "prior").exists()


def test_the_prior_ablations_replace_z_i(pipe):
    text = pipe.encode_text(["a red circle", "a blue square"])
    torch.testing.assert_close(pipe.prior_sample(text, prior="caption"), text.embeds.float())
    null = pipe.prior_sample(text, prior="none")
    assert null.shape == text.embeds.shape and torch.equal(null[0], null[1])
    assert len(pipe.generate("a red circle", prior="none", seed=0, size=16)) == 1
    with pytest.raises(ConfigError, match="caption, none"):
        pipe.generate("a red circle", prior="zt")


def test_variations_and_inpainting_stop_the_cascade_at_a_size(pipe):
    image = pipe.generate("a red circle", seed=1)[0]
    assert pipe.variations(image, n=1, seed=0, size=16)[0].size == (16, 16)
    assert pipe.variations(image, n=1, seed=0, size=64)[0].size == (64, 64)
    mask = torch.zeros(64, 64)
    mask[:, 32:] = 1
    small = pipe.inpaint(image, mask, "a blue square", seed=0, size=16)[0]
    full = pipe.inpaint(image, mask, "a blue square", seed=0)[0]
    assert small.size == (16, 16) and full.size == (64, 64)
    kept = np.asarray(full)[:, :32].astype(int) - np.asarray(image)[:, :32].astype(int)
    assert np.abs(kept).max() == 0  # the known half is the original's, pixel for pixel
    with pytest.raises(ConfigError, match="size 48"):
        pipe.inpaint(image, mask, size=48)
    assert pipe.inpaint(image, mask, "a blue square", seed=0, upsample=False)[0].size == (16, 16)
    # every verb that decodes stops where it is asked to
    other = pipe.generate("a blue square", seed=2)[0]
    assert {i.size for i in pipe.interpolate(image, other, n=2, steps=2, size=16)} == {(16, 16)}
    assert {i.size for i in pipe.text_diff(image, "a red circle", "a blue circle", [0, 0.5], steps=2,
                                           upsample=False)} == {(16, 16)}
    assert {i.size for i in pipe.pca_probe(image, [1, 2], steps=2, size=16)} == {(16, 16)}
    assert pipe.pca_probe(image, [1], steps=2)[0].size == (64, 64)
    with pytest.raises(ConfigError, match="size 48"):
        pipe.interpolate(image, other, size=48)


def test_upscale_enlarges_an_image_with_the_upsamplers_alone(pipe, caplog):
    image = pipe.generate("a red circle", seed=1, size=16)[0]
    big = pipe.upscale(image, n=2, seed=0)
    assert [b.size for b in big] == [(64, 64)] * 2 and np.asarray(big[0]).tolist() != np.asarray(big[1]).tolist()
    assert np.asarray(pipe.upscale(image, n=2, seed=0)[1]).tolist() == np.asarray(big[1]).tolist()  # seeded
    assert "already no smaller" not in caplog.text
    assert pipe.upscale(image.resize((64, 64)), seed=0)[0].size == (64, 64)  # a 64² image enters at 16²
    assert "the image is 64×64, already no smaller than the 64×64 upscale makes" in caplog.text  # not silently
    with pytest.raises(ConfigError, match="enters the cascade at 16² and leaves at 64² or more"):
        pipe.upscale(image, size=16)
    # `upsample` takes decoder images only, and no more stages than there are
    x = pipe.pixels(image, 16)
    assert pipe.upsample(x, 1, generator=generators(0, 1)).shape == (1, 3, 64, 64)
    with pytest.raises(DataError, match=r"a tensor \[B, 3, 16, 16\]"):
        pipe.upsample(pipe.pixels(image, 64), 1)
    with pytest.raises(ConfigError, match="stages=2: this model has 1 upsampler"):
        pipe.upsample(x, 2)


def test_candidate_seeds_keep_each_images_own_seed_first():
    from unclip.pipeline.checks import candidate_seeds

    assert candidate_seeds(5, 2, 1) == [5, 6] and candidate_seeds([9, 3], 2, 1) == [9, 3]
    three = candidate_seeds(5, 2, 3)
    assert three[0] == 5 and three[3] == 6 and len(set(three)) == 6 and three == candidate_seeds(5, 2, 3)
    assert candidate_seeds([5, 6], 2, 3) == three
    g = torch.Generator()
    assert candidate_seeds(g, 2, 3) is g and candidate_seeds(None, 2, 3) is None
    with pytest.raises(ConfigError, match="3 seeds for 2 images"):
        candidate_seeds([1, 2, 3], 2, 2)


def test_candidates_keep_the_image_clip_puts_closest_to_the_caption(pipe):
    side = pipe.config.decoder.resolution
    plain = pipe.generate(["a red circle", "a blue square"], n=2, seed=3, steps=2, size=side)
    same = pipe.generate(["a red circle", "a blue square"], n=2, seed=3, steps=2, size=side, candidates=1)
    assert [np.asarray(a).tolist() for a in plain] == [np.asarray(b).tolist() for b in same]
    best = pipe.generate(["a red circle", "a blue square"], n=2, seed=3, steps=2, size=side, candidates=3)
    assert len(best) == 4 and best[0].size == (side, side)
    # candidate 0 of each image is the plain image: the kept one is at least as close to its caption
    text = pipe.encode_text(["a red circle"] * 2 + ["a blue square"] * 2)
    cos = lambda images: torch.nn.functional.cosine_similarity(  # noqa: E731
        pipe.encode_image(images), torch.nn.functional.normalize(text.embeds.float(), dim=-1))
    assert torch.all(cos(best) >= cos(plain) - 1e-4)
    # best_candidates picks the row whose CLIP embedding is the caption embedding it is given
    images = torch.rand(6, 3, side, side, generator=torch.Generator().manual_seed(0)) * 2 - 1
    target = pipe.encode_image(images)[[1, 5]].repeat_interleave(3, dim=0)
    assert pipe.best_candidates(images, target, 3).tolist() == [1, 5]
    with pytest.raises(ConfigError, match="candidates=0"):
        pipe.generate("a red circle", candidates=0)


def test_upsampled_candidates_are_compared_again_at_the_final_size(pipe):
    from unclip.pipeline.checks import candidate_seeds

    prompts, side, k = ["a red circle", "a blue square"], pipe.config.decoder.resolution, 3
    rows = [p for p in prompts for _ in range(2) for _ in range(k)]  # each image's k candidates, in order
    seeds = candidate_seeds(3, 4, k)
    pixels = lambda images: np.stack([np.asarray(i).astype(int) for i in images])  # noqa: E731
    small, final = pixels(pipe.generate(rows, seed=seeds, steps=2, size=side)), pipe.generate(rows, seed=seeds, steps=2)
    embeds = torch.nn.functional.normalize(pipe.encode_text(rows).embeds.float(), dim=-1)
    cos_small = torch.nn.functional.cosine_similarity(pipe.encode_image(torch.tensor(
        small).permute(0, 3, 1, 2).float() / 127.5 - 1), embeds).view(4, k)
    cos_final = torch.nn.functional.cosine_similarity(pipe.encode_image(final), embeds).view(4, k)
    final = pixels(final)

    def which(kept) -> list[int]:  # the candidate each kept image is (nearest in pixels, and near)
        picks = []
        for i, image in enumerate(pixels(kept)):
            distance = np.abs(final[i * k:(i + 1) * k] - image).reshape(k, -1).max(axis=1)
            picks.append(int(distance.argmin()))
            assert distance.min() <= 2
        return picks

    assert cos_small.argmax(dim=1).tolist() != cos_final.argmax(dim=1).tolist()  # so the picks below differ
    one = pipe.generate(prompts, n=2, seed=3, steps=2, candidates=k)
    assert np.array_equal(pixels(one), pixels(pipe.generate(prompts, n=2, seed=3, steps=2, candidates=k,
                                                              upsampled_candidates=1)))
    assert which(one) == cos_small.argmax(dim=1).tolist()  # 1: the closest at the decoder's size
    every = pipe.generate(prompts, n=2, seed=3, steps=2, candidates=k, upsampled_candidates=k)
    assert which(every) == cos_final.argmax(dim=1).tolist()  # all k: the closest at the final size
    two = pipe.generate(prompts, n=2, seed=3, steps=2, candidates=k, upsampled_candidates=2)
    shortlist = cos_small.topk(2, dim=1).indices  # [4, 2]
    assert which(two) == [int(s[cos_final[i, s].argmax()]) for i, s in enumerate(shortlist)]
    # at the decoder's own size there is nothing to compare again
    at_side = pipe.generate(prompts, n=2, seed=3, steps=2, candidates=k, upsampled_candidates=k, size=side)
    assert np.array_equal(pixels(at_side), pixels(pipe.generate(prompts, n=2, seed=3, steps=2, candidates=k, size=side)))
    with pytest.raises(ConfigError, match="upsampled_candidates=0"):
        pipe.generate("a red circle", upsampled_candidates=0)


def test_upsampler_sampling_can_be_set_for_every_later_call(model_dir):
    import unclip

    pipe = unclip.load(model_dir)
    before = pipe.upsamplers[0].config
    pipe.set_upsampler_sampling(steps=3)
    assert pipe.upsamplers[0].config.sample_steps == 3 and pipe.upsamplers[0].config.sampler == before.sampler
    pipe.set_upsampler_sampling(sampler="dpmsolver++")
    assert pipe.upsamplers[0].config.sampler == "dpmsolver++" and pipe.upsamplers[0].config.sample_steps == 3
    steps = []
    pipe.generate("a red circle", n=1, seed=0, steps=2, callback=lambda stage, step: steps.append(stage))
    assert steps.count("upsampler1") == 3
    pipe.set_upsampler_sampling(start=0.2)
    assert pipe.upsamplers[0].config.sample_start == 0.2 and pipe.upsamplers[0].config.sample_steps == 3
    with pytest.raises(ConfigError, match="upsampler steps"):
        pipe.set_upsampler_sampling(steps=0)
    with pytest.raises(ConfigError, match="upsampler sampler"):
        pipe.set_upsampler_sampling(sampler="euler")
    with pytest.raises(ConfigError, match="upsampler start"):
        pipe.set_upsampler_sampling(start=0)
    with pytest.raises(ConfigError, match=r"upsampler 1: 500 steps from noise level 0.2 .* too many; at most"):
        pipe.set_upsampler_sampling(steps=500)  # said before any image is drawn, naming the stage
    assert pipe.upsamplers[0].config.sample_steps == 3  # and nothing changed
    pipe.set_upsampler_sampling(steps=[4], sampler=["ddim"])  # one per stage (this model has one)
    assert (pipe.upsamplers[0].config.sample_steps, pipe.upsamplers[0].config.sampler) == (4, "ddim")
    with pytest.raises(ConfigError, match=r"upsampler steps=\[4, 5\]: give one value for every stage or one per"):
        pipe.set_upsampler_sampling(steps=[4, 5])


# --- what callers pass ---------------------------------------------------------------------------


def _bad_calls(pipe, image):
    from dataclasses import replace

    from PIL import Image

    z = pipe.encode_image(image)
    side = pipe.config.decoder.resolution
    text = pipe.encode_text(["a red circle", "a blue star"])
    return {
        "NaN z_t": (lambda: pipe.prior_sample(replace(text, embeds=text.embeds * float("nan"))), DataError, "NaN"),
        "NaN token states (AR)": (lambda: pipe.prior_sample(replace(text, token_states=text.token_states * float("nan")),
                                                            prior="ar"), DataError, "NaN"),
        "z_t of another width": (lambda: pipe.prior_sample(replace(text, embeds=text.embeds[:, :4])), DataError,
                                 "z_t \\[B, 16\\]"),
        "z_t of one caption, states of two (AR)": (lambda: pipe.prior_sample(replace(text, embeds=text.embeds[:1]),
                                                                             prior="ar"), DataError, "for one B"),
        "a caption string for an encoding": (lambda: pipe.prior_sample("a red circle"), DataError, "TextEncoding"),
        "AR temperature 0": (lambda: pipe.ar_prior.sample(text.token_states.float(), text.mask, text.embeds,
                                                          temperature=0), ConfigError, "temperature=0"),
        "z_i of one dimension": (lambda: pipe.decode(z[0], upsample=False), DataError, r"z_i must be a tensor \[B, "),
        "x_T of another side": (lambda: pipe.decode(z, x_T=torch.randn(1, 3, side // 2, side // 2)), DataError,
                                "x_T must be a tensor"),
        "x_T of another batch": (lambda: pipe.decode(z, x_T=torch.randn(2, 3, side, side)), DataError, "x_T must"),
        "NaN z_i": (lambda: pipe.decode(torch.full_like(z, float("nan"))), DataError, "NaN"),
        "z_i as a list": (lambda: pipe.decode(z.tolist()), DataError, "got list"),
        "NaN mask": (lambda: pipe.inpaint(image, torch.full((64, 64), float("nan"))), DataError, r"\[0, 1\]"),
        "negative mask": (lambda: pipe.inpaint(image, -torch.ones(64, 64)), DataError, r"\[0, 1\]"),
        "no mask": (lambda: pipe.inpaint(image, None), DataError, "got NoneType"),
        "two masks": (lambda: pipe.inpaint(image, torch.ones(2, 64, 64)), DataError, r"\[H, W\]"),
        "float n": (lambda: pipe.generate("a red circle", n=2.0), ConfigError, "n=2.0: give a whole number"),
        "bool n": (lambda: pipe.generate("a red circle", n=True), ConfigError, "whole number"),
        "float steps": (lambda: pipe.generate("a red circle", steps=2.5), ConfigError, "steps=2.5"),
        "float upsampler steps": (lambda: pipe.set_upsampler_sampling(steps=2.5), ConfigError, "whole number"),
        "text guidance": (lambda: pipe.generate("a red circle", guidance_scale="3"), ConfigError, "guidance scale"),
        "array seed": (lambda: pipe.generate("a red circle", seed=np.array([1])), ConfigError, "seed"),
        "text size": (lambda: pipe.generate("a red circle", size="32"), ConfigError, "whole number"),
        "bytes prompt": (lambda: pipe.generate(b"a red circle"), DataError, "not bytes"),
        "blank prior": (lambda: pipe.generate("a red circle", prior=""), ConfigError, "unknown prior ''"),
        "size beyond upsample=False": (lambda: pipe.generate("a red circle", upsample=False, size=pipe.sizes[-1]),
                                       ConfigError, "upsample=False"),
        "one angle": (lambda: pipe.text_diff(image, "a", "b", thetas=0.5), ConfigError, "list of numbers"),
        "one PCA dimension": (lambda: pipe.pca_probe(image, 4), ConfigError, "list of whole numbers"),
        "bool image tensor": (lambda: pipe.pixels(torch.zeros(1, 3, 8, 8, dtype=torch.bool), 32), DataError, "bool"),
        "empty image tensor": (lambda: pipe.pixels(torch.zeros(0, 3, 8, 8), 32), DataError, "must be"),
        "two images to vary": (lambda: pipe.variations([image, image]), DataError, "one image; got 2"),
        "a batch to interpolate": (lambda: pipe.interpolate(torch.zeros(2, 3, 8, 8), image), DataError, "one image"),
        "two seeds for one x_T": (lambda: pipe.interpolate(image, image, seed=[1, 2]), ConfigError, "one seed"),
        "unknown device": (lambda: pipe.to("bogus"), ConfigError, "not a torch device"),
        "a number for a model": (lambda: __import__("unclip").load(5), ConfigError, "not int"),
        "a callback that is no function": (lambda: pipe.generate("a red circle", steps=2, callback=5), ConfigError,
                                           "callback=5"),
        "a 0×0 image": (lambda: pipe.variations(Image.new("RGB", (0, 0))), DataError, "0×0: it has no pixels"),
        "a mask array of objects": (lambda: pipe.inpaint(image, np.array([[None]])), DataError, "dtype object"),
        "integer z_i": (lambda: pipe.decode(z.long()), DataError, "z_i must hold real numbers"),
        "integer x_T": (lambda: pipe.decode(z, x_T=torch.zeros(1, 3, side, side, dtype=torch.long)), DataError,
                        "x_T must hold real numbers"),
        "a caption string for an encoding (decode)": (lambda: pipe.decode(z, "a red circle"), DataError,
                                                      "TextEncoding"),
        "two captions for one z_i": (lambda: pipe.decode(z, text), DataError, "2 captions for 1 z_i"),
        "NaN z_i to invert with": (lambda: pipe.invert(image, z_i=torch.full_like(z, float("nan"))), DataError, "NaN"),
        "three z_i for one image": (lambda: pipe.invert(image, z_i=z.expand(3, -1)), DataError, "3 z_i for 1 images"),
        "more candidates than a batch": (lambda: pipe.generate("a red circle", candidates=10**6), ConfigError,
                                         "candidates=1000000: draw 1 to 64"),
        "a billion images": (lambda: pipe.generate("a red circle", n=10**9), ConfigError, "at most 100,000 images"),
        "a billion variations": (lambda: pipe.variations(image, n=10**9), ConfigError, "at most 100,000 images"),
        # a non-empty string is truthy: upsample="no" upsampled
        "a string for upsample": (lambda: pipe.generate("a red circle", upsample="no"), ConfigError,
                                  "upsample='no': give True or False"),
        "a number for upsample (decode)": (lambda: pipe.decode(z, upsample=0), ConfigError, "upsample=0: give True"),
        "a string for inverted": (lambda: pipe.decode(z, inverted="no"), ConfigError, "inverted='no': give True"),
        "a string for upsample (variations)": (lambda: pipe.variations(image, upsample="no"), ConfigError, "upsample="),
        "a string for upsample (interpolate)": (lambda: pipe.interpolate(image, image, upsample="no"), ConfigError,
                                                "upsample="),
        "a string for upsample (text diff)": (lambda: pipe.text_diff(image, "a", "b", upsample="no"), ConfigError,
                                              "upsample="),
        "a string for upsample (inpaint)": (lambda: pipe.inpaint(image, torch.ones(64, 64), upsample="no"),
                                            ConfigError, "upsample="),
        "a string for upsample (PCA probe)": (lambda: pipe.pca_probe(image, upsample="no"), ConfigError, "upsample="),
        "no candidates per group": (lambda: pipe.best_candidates(torch.zeros(2, 3, side, side), text.embeds, 0),
                                    ConfigError, "k=0: the candidates of one image come in groups of k, 1 or more"),
        "negative candidates per group": (lambda: pipe.best_candidates(torch.zeros(2, 3, side, side), text.embeds, -2),
                                          ConfigError, "k=-2"),
        "keep more than a group": (lambda: pipe.best_candidates(torch.zeros(2, 3, side, side), text.embeds, 2, keep=3),
                                   ConfigError, "keep=3: keep 1 to k=2"),
        "candidates not in whole groups": (lambda: pipe.best_candidates(torch.zeros(3, 3, side, side),
                                                                        text.embeds[:1].expand(3, -1), 2),
                                           DataError, "B a multiple of k=2"),
        "one z_t for two candidates": (lambda: pipe.best_candidates(torch.zeros(2, 3, side, side), text.embeds[:1], 2),
                                       DataError, r"one caption z_t per image, \[2, D\]; got \(1, 16\)"),
    }


def test_bad_arguments_are_clear_errors_before_any_work(pipe):
    image = _image()
    for name, (call, error, message) in _bad_calls(pipe, image).items():
        with pytest.raises(error, match=message):
            call()


def test_inpainting_a_tensor_keeps_its_pixels_outside_the_mask(pipe):
    image = pipe.pixels(_image(side=64), 64)[0]  # [3, 64, 64], what a caller holding tensors passes
    mask = torch.zeros(64, 64)
    mask[32:] = 1
    out = _array(pipe.inpaint(image, mask, steps=3, resample=1, seed=3)[0])
    side = out.shape[0]
    original = _array(to_pil(pipe.pixels(image, side))[0])
    assert np.abs(out[: side // 2] - original[: side // 2]).max() <= 1


def test_how_each_task_seeds_its_stages(pipe, monkeypatch):
    """generate seeds the prior and the decoder afresh from one seed (the prior's starting noise is
    the decoder's first x_T values: decoupled, the shipped model judged lower, docs/pipeline.md);
    inpainting draws one stream per image, so its upsampler's noise is not RePaint's."""
    import unclip.diffusion.sampling as sampling

    drawn, noise = [], sampling._noise
    monkeypatch.setattr(sampling, "_noise", lambda *a, **k: drawn.append(noise(*a, **k)) or drawn[-1])
    pipe.generate("a red circle", seed=7, candidates=1, size=pipe.sizes[0], steps=2)
    prior = next(x for x in drawn if x.ndim == 2)[0]  # the first row of each stage's first draw
    decoder = next(x for x in drawn if x.ndim == 4)[0].flatten()
    assert torch.equal(prior, decoder[: prior.numel()])
    drawn.clear()
    mask = torch.zeros(64, 64)
    mask[32:] = 1
    pipe.inpaint(_image(), mask, prompt="a red circle", steps=2, resample=1, seed=7)
    prior = next(x for x in drawn if x.ndim == 2)[0]
    repaint, upsampler = (next(x for x in drawn if x.ndim == 4 and x.shape[-1] == side)[0].flatten()
                          for side in pipe.sizes[:2])
    assert not torch.equal(prior, repaint[: prior.numel()])
    assert not torch.equal(upsampler[:100], repaint[:100])


def test_a_large_n_runs_in_pieces_that_draw_the_same_images(pipe, monkeypatch):
    import unclip.pipeline.checks as checks
    import unclip.pipeline.pipeline as pipeline

    whole = pipe.generate(["a red circle", "a blue square"], n=2, seed=5, steps=2, size=pipe.sizes[0])
    for module in (checks, pipeline):  # the images drawn (`batch_pieces`) and the prompts encoded in pieces
        monkeypatch.setattr(module, "GENERATE_BATCH", 3)
    pieces = pipe.generate(["a red circle", "a blue square"], n=2, seed=5, steps=2, size=pipe.sizes[0])
    assert len(pieces) == 4
    assert all(np.abs(_array(a) - _array(b)).max() <= 1 for a, b in zip(whole, pieces))


def test_decode_runs_many_rows_in_pieces_that_draw_the_same_images(pipe, monkeypatch):
    """variations, interpolations, text diffs and PCA probes decode every image in one batch: 2,000
    variations of a 32² model held 4 GB; in pieces, memory is one piece's."""
    import unclip.pipeline.checks as module

    z = pipe.encode_image(_image()).expand(5, -1)
    whole = pipe.decode(z, seed=3, steps=2)
    sizes = []
    sample = pipe.decoder.sample
    monkeypatch.setattr(pipe.decoder, "sample", lambda z_i, *a, **k: sizes.append(len(z_i)) or sample(z_i, *a, **k))
    monkeypatch.setattr(module, "GENERATE_BATCH", 2)
    pieces = pipe.decode(z, seed=3, steps=2)
    assert sizes == [2, 2, 1]  # a batch's float sums differ in the last bits from a piece's
    assert all(np.abs(_array(a) - _array(b)).max() <= 1 for a, b in zip(to_pil(whole), to_pil(pieces)))


def test_many_prompts_are_encoded_in_pieces(pipe, monkeypatch):
    """encode_text ran any list in one batch: 20,000 prompts took 6 GB."""
    import unclip.pipeline.pipeline as module

    prompts = ["a red circle", "a blue square", "ดาวสีเขียว", "a green star", "a red circle"]
    whole = pipe.encode_text(prompts)
    sizes = []
    encode = pipe.clip.encode_text
    monkeypatch.setattr(pipe.clip, "encode_text", lambda tokens: sizes.append(len(tokens.input_ids)) or encode(tokens))
    monkeypatch.setattr(module, "GENERATE_BATCH", 2)
    pieces = pipe.encode_text(prompts)
    assert sizes == [2, 2, 1]
    for name in ("embeds", "token_states", "mask"):
        assert torch.allclose(getattr(pieces, name).float(), getattr(whole, name).float(), atol=1e-5), name


def test_one_call_returns_at_most_max_images(pipe, monkeypatch):
    """n = 10⁹ built a list of 10⁹ prompts and seeds before the first image: memory ran out."""
    import unclip.pipeline.checks as module

    monkeypatch.setattr(module, "MAX_IMAGES", 3)
    with pytest.raises(ConfigError, match="n=2 for each of 2 prompts: one call returns at most 3 images"):
        pipe.generate(["a red circle", "a blue square"], n=2)
    for call in (lambda: pipe.variations(_image(), n=4), lambda: pipe.interpolate(_image(), _image(1), n=4),
                 lambda: pipe.inpaint(_image(), torch.ones(64, 64), n=4), lambda: pipe.upscale(_image(), n=4)):
        with pytest.raises(ConfigError, match="n=4: one call returns at most 3 images"):
            call()


def test_loading_leaves_the_callers_random_numbers_alone(model_dir):
    import unclip

    torch.manual_seed(0)
    expected = torch.randn(3)
    torch.manual_seed(0)
    unclip.load(model_dir)
    assert torch.equal(torch.randn(3), expected)


def test_tasks_with_one_shared_x_T_take_a_list_of_one_seed(pipe):
    image = _image()
    one = pipe.interpolate(image, _image(seed=1), n=2, steps=2, seed=4)
    listed = pipe.interpolate(image, _image(seed=1), n=2, steps=2, seed=[4])
    assert all(np.array_equal(_array(a), _array(b)) for a, b in zip(one, listed))
    assert len(pipe.pca_probe(image, [1], steps=2, seed=[4])) == 1


def test_prompts_are_read_as_the_world_writes_captions(pipe):
    assert pipe.read_form("A  Red\u200bCircle ") == "a redcircle"
    assert torch.equal(pipe.encode_text("ดาว สี เขียว").embeds, pipe.encode_text("ดาวสีเขียว").embeds)
    assert torch.equal(pipe.encode_text("A Red Circle").embeds, pipe.encode_text("a red circle").embeds)
    with pytest.raises(DataError, match="empty"):
        pipe.generate("\u200b")


def test_a_run_killed_while_writing_its_images_leaves_no_grid_over_two_runs(tmp_path, monkeypatch):
    from PIL import Image

    import unclip.pipeline.cli as cli

    out = tmp_path / "x.png"
    first = [Image.new("RGB", (8, 8), "red")] * 3
    cli.write_outputs(first, out, labels=["a"] * 3, params={"seed": 1000})
    assert out.is_file()

    real = cli.write_singles

    def killed(images, out, **kwargs):
        real(images[:1], out, **kwargs)  # one new image written, then the kill
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "write_singles", killed)
    with pytest.raises(KeyboardInterrupt):
        cli.write_outputs([Image.new("RGB", (8, 8), "blue")] * 3, out, labels=["b"] * 3, params={"seed": 0})
    assert not out.exists()  # the old grid went first


def test_transparent_masks_are_read_like_the_server_reads_them(tmp_path):
    """Transparent = repaint means fully transparent (alpha 0, the OpenAI convention and the
    server's), whatever carries the transparency: a palette PNG's transparent index was read as its
    colour, and a mask a little transparent everywhere repainted the whole image."""
    from PIL import Image

    from unclip.pipeline.images import mask_tensor

    right = torch.zeros(1, 1, 16, 16)
    right[..., 8:] = 1
    palette = Image.new("P", (64, 64), 1)
    palette.putpalette([0, 0, 0] * 256)  # both indices black: only the transparency tells them apart
    palette.paste(0, (32, 0, 64, 64))
    palette.save(tmp_path / "p.png", transparency=0)
    faint = Image.new("RGBA", (64, 64), (0, 0, 0, 250))
    faint.paste((0, 0, 0, 0), (32, 0, 64, 64))
    for mask in (str(tmp_path / "p.png"), faint, faint.convert("LA"), faint.convert("PA")):
        assert torch.equal(mask_tensor(mask, 16), right)
    opaque = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    opaque.paste((255, 255, 255, 255), (32, 0, 64, 64))  # white on an opaque layer
    with pytest.raises(DataError, match="alpha channel, so its fully transparent pixels mark the region to repaint, and it has none"):
        mask_tensor(opaque, 16)


def test_a_mask_file_is_read_upright_like_the_image(tmp_path):
    """`open_rgb` turns an image by its EXIF orientation; the mask beside it was read as stored, so
    a photo's mask painted a quarter turn away from what its viewer showed."""
    from PIL import Image

    from unclip.pipeline.images import mask_tensor

    stored = Image.new("L", (64, 64), 0)
    stored.paste(255, (0, 32, 64, 64))  # stored: the bottom half white
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: turn 90° clockwise to view, so the white half shows on the left
    stored.save(tmp_path / "mask.png", exif=exif)
    left = torch.zeros(1, 1, 16, 16)
    left[..., :8] = 1
    assert torch.equal(mask_tensor(str(tmp_path / "mask.png"), 16), left)


def test_masks_as_bytes_and_listed_generators_are_understood(pipe):
    image = _image()
    ones = torch.zeros(64, 64)
    ones[32:] = 1
    as_ones = _array(pipe.inpaint(image, ones, steps=2, resample=1, seed=1)[0])
    as_bytes = _array(pipe.inpaint(image, (ones * 255).to(torch.uint8).numpy(), steps=2, resample=1, seed=1)[0])
    assert np.array_equal(as_ones, as_bytes)
    listed = pipe.generate(["a red circle"], seed=[torch.Generator().manual_seed(3)], candidates=2, steps=2)
    again = pipe.generate(["a red circle"], seed=[torch.Generator().manual_seed(3)], candidates=2, steps=2)
    assert np.array_equal(_array(listed[0]), _array(again[0]))


def test_boolean_arguments_take_numpy_bools_and_best_candidates_keeps_whole_groups(pipe):
    z = pipe.encode_image(_image())
    assert pipe.decode(z, seed=0, steps=2, upsample=np.False_).shape[-1] == pipe.sizes[0]
    images = pipe.decode(z.expand(4, -1), seed=0, steps=2, upsample=False)
    text = pipe.encode_text(["a red circle"] * 4).embeds
    assert pipe.best_candidates(images, text, 2, keep=2).tolist() in ([0, 1, 2, 3], [1, 0, 2, 3], [0, 1, 3, 2],
                                                                      [1, 0, 3, 2])
    assert pipe.best_candidates(images, text, 1).tolist() == [0, 1, 2, 3]


def test_a_z_i_far_longer_than_clips_is_the_callers_error_not_the_models(pipe):
    """z_i scaled by 1e6 was decoded, and the NaN or noise it gave was blamed on the model's training."""
    z = pipe.encode_image(_image())
    assert pipe.unit_z_i and torch.allclose(z.norm(dim=-1), torch.ones(1))
    for call in (lambda: pipe.decode(z * 1e6, seed=0, steps=2), lambda: pipe.invert(_image(), z_i=z * 1e6, steps=2),
                 lambda: pipe.decode(torch.cat([z, z * 3]), seed=0, steps=2, upsample=False)):
        with pytest.raises(DataError, match=r"z_i row \d has length (1e\+06|3): this model's decoder learnt from "
                                            r"unit-length CLIP image embeddings .*z_i / z_i.norm\(dim=-1, keepdim"):
            call()
    # the decoder's own null z_i (the "none" ablation) is short, a sum of two embeddings no longer than 2
    assert pipe.decode(torch.cat([z + z.flip(-1), z * 0]), seed=0, steps=2, upsample=False).shape[0] == 2


def test_inpaint_and_upscale_draw_many_images_in_pieces_that_change_none(pipe, monkeypatch):
    """inpaint and upscale sampled all n images in one batch, so memory grew with n; in pieces of
    GENERATE_BATCH, image i still draws from its own seed."""
    import unclip.diffusion
    import unclip.pipeline.checks as module

    mask = torch.zeros(64, 64)
    mask[32:] = 1
    small = pipe.generate("a red circle", seed=1, size=16)[0]
    calls = {
        "inpaint": lambda: pipe.inpaint(_image(), mask, n=3, steps=2, resample=1, seed=4),
        "inpaint a prompt": lambda: pipe.inpaint(_image(), mask, "a blue square", n=3, steps=2, resample=1, seed=4),
        "upscale": lambda: pipe.upscale(small, n=3, seed=4),
    }
    whole = {name: call() for name, call in calls.items()}
    rows = []
    loop, up = unclip.diffusion.repaint_loop, pipe.upsamplers[0].sample
    monkeypatch.setattr(unclip.diffusion, "repaint_loop", lambda fn, d, known, *a, **k: rows.append(len(known))
                        or loop(fn, d, known, *a, **k))
    monkeypatch.setattr(pipe.upsamplers[0], "sample", lambda low, **k: rows.append(len(low)) or up(low, **k))
    monkeypatch.setattr(module, "GENERATE_BATCH", 2)
    for name, call in calls.items():
        rows.clear()
        pieces = call()
        assert rows == ([2, 1] if name == "upscale" else [2, 2, 1, 1]), name  # RePaint, upsampler, per piece
        assert len(pieces) == 3 and all(np.abs(_array(a) - _array(b)).max() <= 1
                                        for a, b in zip(whole[name], pieces)), name


def test_variations_reuse_a_given_inversion_and_draw_the_same_images(pipe, monkeypatch):
    image = _image()
    direct = pipe.variations(image, n=2, seed=3, steps=3, size=16)
    inversion = pipe.invert(image, steps=3)
    inverted = []
    real = pipe.decoder.invert
    monkeypatch.setattr(pipe.decoder, "invert", lambda *a, **k: inverted.append(1) or real(*a, **k))
    again = pipe.variations(image, n=2, seed=3, steps=3, size=16, inversion=inversion)
    assert inverted == [] and all(np.array_equal(_array(a), _array(b)) for a, b in zip(direct, again))
    for bad, words in ((inversion[0], "got Tensor"), ((inversion[0].expand(2, -1), inversion[1]), r"got \[\(2, 16\)"),
                       ((inversion[0] * 1e6, inversion[1]), "has length 1e\\+06")):
        with pytest.raises(DataError, match=words):
            pipe.variations(image, n=1, steps=3, inversion=bad)


def test_latent_task_loose_ends(pipe, tmp_path, capsys):
    """Opposite vectors slerped through zero; upscale refused a list of one image; an interpolation of
    more than 64 frames showed no image B in its grid; upscale's PNGs did not record the seed that
    redraws each; vary/inpaint/upscale -n and probe --dims were checked only after the model loaded."""
    from unclip.cli import main
    from unclip.pipeline.cli import GRID_MAX, grid_rows, recorded_params

    z = torch.nn.functional.normalize(torch.randn(1, 8), dim=-1)
    with pytest.raises(DataError, match="opposite vectors"):
        slerp(z, -z, 0.5)
    assert torch.allclose(slerp(z, z.clone(), 0.5), z)  # parallel: still the linear fallback
    assert pipe.upscale([_image()], seed=0)[0].size == (64, 64)
    rows = grid_rows(70, spread=True)
    assert len(rows) == GRID_MAX and rows[0] == 0 and rows[-1] == 69 and rows == sorted(set(rows))
    assert grid_rows(70) == list(range(GRID_MAX)) and grid_rows(5, spread=True) == [0, 1, 2, 3, 4]
    _image().resize((16, 16)).save(tmp_path / "small.png")
    out = tmp_path / "up.png"
    assert main(["upscale", str(tmp_path / "small.png"), "-n", "2", "--seed", "5", "--out", str(out),
                 "--model", str(pipe.directory), "--quiet"]) == 0
    assert recorded_params(tmp_path / "up-1.png")["image_seed"] == 6
    for argv in (["vary", "x.png", "-n", "200001"], ["inpaint", "x.png", "m.png", "-n", "0"],
                 ["upscale", "x.png", "-n", "100001"], ["probe", "x.png", "--dims", "0"]):
        with pytest.raises(SystemExit) as stop:  # refused by the parser, before any model is read
            main([*argv, "--model", "/nonexistent"])
        err = capsys.readouterr().err
        assert stop.value.code == 2
        assert ("out of range" in err or "too small" in err) and "nonexistent" not in err, err
