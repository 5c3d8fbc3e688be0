"""The diffusion prior: guidance drops only the conditioning, drop rate, best-of-2, normalisation,
training, sampling, save → load and the CLI."""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from unclip.config import TrainConfig, preset
from unclip.prior.diffusion import DiffusionPrior, pick_best
from unclip.train.trainer import train

from tiny_models import caption_world

D, L, W, CONTEXT = 16, 6, 32, 8


def _prior(**changes) -> DiffusionPrior:
    torch.manual_seed(0)
    z_i = F.normalize(torch.randn(500, D) + 2.0 * torch.arange(D) / D, dim=-1)
    return DiffusionPrior.from_data(replace(preset("tiny").prior, **changes), z_i=z_i, text_width=W,
                                    context_length=CONTEXT)


def _world(seed=0):
    """Captions of 8 kinds: text states and z_t tell the kind; z_i is near the kind's centre; odd
    kinds have shorter captions."""
    return caption_world(dim=D, length=L, width=W, seed=seed, short_odd=True)


def _transformer_inputs(prior: DiffusionPrior, run) -> list[dict]:
    """The inputs of every PriorTransformer call made by `run()`."""
    seen = []

    def hook(module, args, kwargs):
        seen.append({"hidden_states": args[0].clone(), "timestep": args[1].clone(),
                     **{k: v.detach().clone() for k, v in kwargs.items() if torch.is_tensor(v)}})

    handle = prior.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return seen


def test_transformer_reads_the_paper_sequence():
    prior = _prior()
    config = prior.transformer.config
    # [caption tokens (context) | z_t | timestep | noised z_i | learned query], output at the query
    assert config.num_embeddings == CONTEXT and config.additional_embeddings == 4
    assert config.added_emb_type == "prd" and config.embedding_dim == D
    assert prior.diffusion.prediction_type == "sample"  # paper §2.2: predicts the clean z_i
    betas = prior.diffusion.betas
    assert betas[-1] == pytest.approx(0.999) and betas[0] < 1e-3  # cosine schedule


def test_guidance_drop_replaces_only_the_conditioning():
    batch = _world()(6, torch.Generator().manual_seed(1))

    def inputs(cond_drop):
        prior = _prior(cond_drop=cond_drop)
        torch.manual_seed(3)
        return _transformer_inputs(prior, lambda: prior.training_losses(batch))[0], prior

    kept, _ = inputs(0.0)
    dropped, prior = inputs(1.0)
    # the noised z_i and the timesteps reaching the transformer are identical in dropped and kept rows
    assert torch.equal(kept["hidden_states"], dropped["hidden_states"])
    assert torch.equal(kept["timestep"], dropped["timestep"])
    assert not torch.allclose(kept["hidden_states"], torch.zeros_like(kept["hidden_states"]))
    # the conditioning is replaced by the learned nulls, the same for every row
    assert not torch.allclose(kept["proj_embedding"], dropped["proj_embedding"])
    assert torch.equal(dropped["proj_embedding"], prior.cond.null_z_t.detach().expand(6, D))
    for key in ("encoder_hidden_states", "attention_mask"):
        assert torch.equal(dropped[key], dropped[key][:1].expand_as(dropped[key]))
    assert dropped["attention_mask"][0].tolist() == [True] + [False] * (CONTEXT - 1)  # one null token
    assert kept["attention_mask"][:, :L].equal(batch["text_mask"].bool())
    assert torch.equal(kept["proj_embedding"], batch["z_t"])


def test_condition_drop_rate_is_ten_percent():
    n = 20_000
    prior = _prior()
    batch = _world()(n, torch.Generator().manual_seed(2))
    torch.manual_seed(4)
    with torch.no_grad():
        seen = _transformer_inputs(prior, lambda: prior.training_losses(batch))[0]
    null = (seen["proj_embedding"] == prior.cond.null_z_t).all(dim=1)
    null_token = prior.cond.text_in(prior.cond.null_text)
    null_text = ((~seen["attention_mask"][:, 1:]).all(dim=1)
                 & torch.isclose(seen["encoder_hidden_states"][:, 0], null_token).all(dim=1))
    assert torch.equal(null, null_text)  # caption and z_t are dropped together
    rate = null.float().mean().item()
    assert abs(rate - 0.1) < 4 * math.sqrt(0.1 * 0.9 / n), rate


def test_guided_sampling_gives_both_branches_the_same_noised_input():
    prior = _prior().eval()
    batch = _world()(3, torch.Generator().manual_seed(5))
    calls = _transformer_inputs(prior, lambda: prior.sample(
        batch["text_states"], batch["text_mask"], batch["z_t"], guidance_scale=3.0, best_of=2,
        generator=torch.Generator().manual_seed(0)))
    assert len(calls) == preset("tiny").prior.sample_steps
    for call in calls:  # rows: 2 candidates × 3 captions conditional, then the same 6 null
        cond_x, null_x = call["hidden_states"].chunk(2)
        assert torch.equal(cond_x, null_x) and torch.equal(*call["timestep"].chunk(2))
        assert torch.equal(call["proj_embedding"][6:], prior.cond.null_z_t.detach().expand(6, D))
        assert torch.equal(call["proj_embedding"][:6], torch.cat([batch["z_t"]] * 2))


def test_best_of_two_keeps_the_higher_dot_product():
    z_t = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), dim=-1)
    candidates = F.normalize(torch.tensor([[[0.9, 0.1], [0.9, 0.1], [1.0, -1.0]],
                                           [[0.1, 0.9], [0.1, 0.9], [1.0, 1.1]]]), dim=-1)  # [2, 3, 2]
    assert torch.equal(pick_best(candidates, z_t), torch.stack([candidates[0, 0], candidates[1, 1], candidates[1, 2]]))

    # inside sampling: best-of-2 returns, per caption, the better of the two candidates that the
    # same noise gives when both are drawn as plain samples
    prior = _prior().eval()
    batch = _world()(40, torch.Generator().manual_seed(6))
    args = (batch["text_states"], batch["text_mask"], batch["z_t"])
    best = prior.sample(*args, best_of=2, generator=torch.Generator().manual_seed(7))
    twice = prior.sample(*(torch.cat([a, a]) for a in args), best_of=1, generator=torch.Generator().manual_seed(7))
    candidates = twice.reshape(2, 40, D)
    dots = (candidates * batch["z_t"]).sum(-1)  # [2, 40]
    assert torch.allclose(best, candidates[dots.argmax(0), torch.arange(40)], atol=1e-6)
    assert ((best * batch["z_t"]).sum(-1) >= dots.max(0).values - 1e-6).all()
    assert 0 < (dots[1] > dots[0]).sum() < 40  # both candidates win sometimes: the choice matters


@pytest.mark.parametrize("normalization", ["scalar", "per_dim"])
def test_normalisation_is_computed_from_data_and_kept_out_of_training(normalization):
    prior = _prior(normalization=normalization)
    z_i = F.normalize(torch.randn(500, D) + 2.0 * torch.arange(D) / D, dim=-1)
    x = prior.normalise(z_i)
    assert x.mean(0).abs().max() < 0.2 and prior.transformer.clip_mean.norm() > 0.5
    if normalization == "scalar":
        assert x.pow(2).mean().item() == pytest.approx(1.0, abs=0.1)
        assert torch.all(prior.transformer.clip_std == prior.transformer.clip_std[0, 0])
    else:
        assert torch.allclose(x.std(0), torch.ones(D), atol=0.15)
    assert torch.allclose(prior.denormalise(x), z_i, atol=1e-5)
    state = prior.state_dict()  # saved with the weights, never trained
    assert "transformer.clip_mean" in state and "transformer.clip_std" in state
    trainable = {id(p) for p in prior.parameters() if p.requires_grad}
    assert id(prior.transformer.clip_mean) not in trainable and id(prior.transformer.clip_std) not in trainable


def test_training_reduces_the_loss_and_beats_the_caption_baseline(tmp_path):
    draw = _world()
    fit = draw(2000, torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    prior = DiffusionPrior.from_data(replace(preset("tiny").prior, width=64, heads=4, layers=2, timesteps=1000),
                                     z_i=fit["z_i"], text_width=W, context_length=L)
    held = draw(512, torch.Generator().manual_seed(9))

    def loss():
        torch.manual_seed(11)
        with torch.no_grad():
            return prior.eval().training_losses(held)["loss"].item()

    def feed(start):
        gen = torch.Generator().manual_seed(start)
        while True:
            yield draw(64, gen)

    before = loss()
    cfg = TrainConfig(steps=250, batch_size=64, lr=2e-3, warmup_steps=10, lr_schedule="constant", log_every=50,
                      ckpt_every=1000)
    train(prior, feed, cfg=cfg, run_dir=tmp_path, run_config={}, progress=False, stage_name="diffusion_prior")
    after = loss()
    assert after < 0.5 * before, (before, after)  # measured: 1.19 → 0.24
    test = draw(300, torch.Generator().manual_seed(5))
    z = prior.sample(test["text_states"], test["text_mask"], test["z_t"], steps=16,
                     generator=torch.Generator().manual_seed(0))
    cosine = (z * test["z_i"]).sum(1).mean().item()
    baseline = (test["z_t"] * test["z_i"]).sum(1).mean().item()
    assert cosine > baseline + 0.15, (cosine, baseline)  # measured: 0.82 vs 0.38


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmsolver++"])
def test_every_sampler_repeats_for_a_seed_yields_steps_and_returns_unit_vectors(sampler):
    prior = _prior().eval()
    b = _world()(4, torch.Generator().manual_seed(8))
    args = (b["text_states"], b["text_mask"], b["z_t"])
    options = {"sampler": sampler, "steps": 4, "eta": 1.0, "guidance_scale": 2.0}
    steps = list(prior.sample_loop(*args, **options, generator=torch.Generator().manual_seed(0)))
    assert len(steps) == 4 and all(s.x_t.shape == (8, D) for s in steps)  # best of 2: 2 × 4 rows
    a = prior.sample(*args, **options, generator=torch.Generator().manual_seed(0))
    c = prior.sample(*args, **options, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, prior.sample(*args, **options, generator=torch.Generator().manual_seed(0)))
    assert not torch.equal(a, c) and torch.allclose(a.norm(dim=1), torch.ones(4), atol=1e-5)


def test_cli_trains_saves_and_loads_the_same_prior(tmp_path):
    from unclip.cli import main
    from unclip.clip.stage import load_clip
    from unclip.modeldir import load_checkpoint, read_manifest
    from unclip.prior.data import sample_pairs
    from unclip.prior.stage import build_diffusion_prior, load_diffusion_prior, prior_scheduler

    from tiny_models import save_tiny_clip

    cfg = preset("tiny")
    clip_dir = save_tiny_clip(tmp_path)
    argv = ["train", "prior", "--kind", "diffusion", "--preset", "tiny", "--clip", str(clip_dir),
            "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "model"), "--fit-samples", "200",
            "--no-eval"]
    assert main(argv) == 0
    manifest = read_manifest(tmp_path / "model")
    for name in ("prior/diffusion_pytorch_model.safetensors", "prior/config.json",
                 "prior_scheduler/scheduler_config.json", "prior_cond/model.safetensors",
                 "text_encoder/model.safetensors"):
        assert name in manifest.files, name
    assert manifest.provenance["diffusion_prior"]["steps"] == cfg.prior.train.steps
    loaded = load_diffusion_prior(tmp_path / "model")
    trained = build_diffusion_prior(cfg, load_clip(clip_dir), fit_samples=200)
    fitted_mean = trained.transformer.clip_mean.clone()
    trained.load_state_dict(load_checkpoint(tmp_path / "run" / "checkpoint.pt")["model"])
    assert torch.equal(loaded.transformer.clip_mean, fitted_mean) and fitted_mean.norm() > 0  # statistics saved
    assert torch.equal(loaded.transformer.clip_std, trained.transformer.clip_std)
    pairs = sample_pairs(load_clip(tmp_path / "model"), split="val", n=6, lang="th")
    args = (pairs["text_states"], pairs["text_mask"], pairs["z_t"])
    a = loaded.sample(*args, guidance_scale=2.0, generator=torch.Generator().manual_seed(3))
    b = trained.eval().sample(*args, guidance_scale=2.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    scheduler = type(prior_scheduler(cfg)).from_pretrained(tmp_path / "model" / "prior_scheduler")
    assert scheduler.config.num_train_timesteps == cfg.prior.timesteps
    assert scheduler.config.prediction_type == "sample"


def test_priors_fit_their_statistics_on_the_training_data(tmp_path):
    """Trained on a caption folder, the diffusion prior's z_i normalisation and the AR prior's PCA
    come from that folder's pairs (they came from shapes-world renders whatever the data), or from
    the embedding folder `unclip train all` writes of them."""
    from dataclasses import replace

    import numpy as np
    from PIL import Image

    from unclip.clip.stage import load_clip
    from unclip.data.folder import FolderDataset
    from unclip.prior.stage import build_ar_prior, build_diffusion_prior

    from tiny_models import save_tiny_clip

    rng = np.random.default_rng(0)
    folder = tmp_path / "own"
    folder.mkdir()
    for i in range(24):  # vertical colour gradients: nothing like a shapes-world render
        top, bottom = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        ramp = np.linspace(0, 1, 40)[:, None, None]
        pixels = np.broadcast_to(top * (1 - ramp) + bottom * ramp, (40, 40, 3)).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(f"a gradient, number {i}")
    clip = load_clip(save_tiny_clip(tmp_path))
    shapes_cfg = preset("tiny")
    cfg = replace(shapes_cfg, data=replace(shapes_cfg.data, source="folder", path=str(folder)))
    items = FolderDataset(folder, size=clip.config.image_size)
    with torch.no_grad():
        z_i = clip.encode_image(torch.stack([items[i]["image"] for i in range(len(items))]))
    mean = z_i.mean(dim=0)

    diffusion = build_diffusion_prior(cfg, clip, fit_samples=5000)  # a folder of 24 gives its 24
    torch.testing.assert_close(diffusion.transformer.clip_mean[0], mean, atol=1e-5, rtol=0)
    ar = build_ar_prior(cfg, clip, fit_samples=5000)
    torch.testing.assert_close(ar.quantizer.mean, mean, atol=1e-5, rtol=0)
    shapes_mean = build_diffusion_prior(shapes_cfg, clip, fit_samples=200).transformer.clip_mean[0]
    assert (shapes_mean - mean).norm() > 0.1  # what the folder-trained priors were fitted on before
    # on shapes world, the scene mix the prior trains on (data.scenes) is the one its statistics see
    from unclip.prior.data import fit_pairs

    pairs_only = replace(shapes_cfg, data=replace(shapes_cfg.data, scenes=(0.0, 1.0, 0.0)))
    two = fit_pairs(clip, pairs_only.data, n=40)["z_t"]
    assert not torch.allclose(two, fit_pairs(clip, shapes_cfg.data, n=40)["z_t"])
    from unclip.prior.data import sample_pairs

    assert torch.equal(two, sample_pairs(clip, split="train", n=40, lang=shapes_cfg.data.lang,
                                         seed=shapes_cfg.data.seed, scenes=(0.0, 1.0, 0.0))["z_t"])

    embeddings = {"image_embeds": rng.normal(size=(30, mean.shape[0])).astype(np.float32),
                  "text_embeds": rng.normal(size=(30, mean.shape[0])).astype(np.float32), "captions": ["x"] * 30}
    from_embeddings = build_diffusion_prior(cfg, clip, fit_samples=20, embeddings=embeddings)
    torch.testing.assert_close(from_embeddings.transformer.clip_mean[0],
                               torch.from_numpy(embeddings["image_embeds"][:20].mean(axis=0)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["diffusion", "ar"])
def test_init_starts_a_prior_from_a_trained_ones_weights_and_statistics(tmp_path, capsys, kind):
    """--init carries the network and its statistics (z_i normalisation; PCA and dot buckets), records where
    they came from, and refuses another architecture."""
    from unclip.cli import main
    from unclip.modeldir import read_manifest
    from unclip.prior.stage import load_ar_prior, load_diffusion_prior

    from tiny_models import save_tiny_clip

    clip_dir = save_tiny_clip(tmp_path)
    common = ["train", "prior", "--kind", kind, "--preset", "tiny", "--clip", str(clip_dir), "--no-eval"]
    assert main([*common, "--run-dir", str(tmp_path / "a"), "--out", str(tmp_path / "first"),
                 "--fit-samples", "200"]) == 0
    section = "prior" if kind == "diffusion" else "ar_prior"
    # statistics fitted on other pairs and a learning rate that moves nothing: only --init explains equal weights
    assert main([*common, "--run-dir", str(tmp_path / "b"), "--out", str(tmp_path / "second"), "--fit-samples", "60",
                 "--set", f"{section}.train.lr=1e-12", "--init", str(tmp_path / "first")]) == 0
    load = load_diffusion_prior if kind == "diffusion" else load_ar_prior
    first, second = (load(tmp_path / name).state_dict() for name in ("first", "second"))
    assert first.keys() == second.keys()
    assert all(torch.allclose(first[k].float(), second[k].float(), atol=1e-6) for k in first)
    record = read_manifest(tmp_path / "second").provenance[f"{kind}_prior"]["init"]
    assert record["from"] == str(tmp_path / "first") and record["provenance"]["steps"] > 0
    assert record["seed_offset"] > 0  # a continuation draws other samples than the run it continues
    other = "prior.width=48" if kind == "diffusion" else "ar_prior.width=48"
    assert main([*common, "--run-dir", str(tmp_path / "c"), "--set", other, "--init", str(tmp_path / "first")]) == 2
    assert "architecture differs" in capsys.readouterr().err
