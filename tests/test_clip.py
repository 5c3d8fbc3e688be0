import math

import pytest
import torch
import torch.nn.functional as F

from unclip.clip.model import ClipModel, contrastive_loss
from unclip.clip.stage import load_clip, save_clip
from unclip.clip.zeroshot import classify
from unclip.config import TrainConfig, preset
from unclip.tokenizer import Tokenizer
from unclip.train.trainer import train

WORDS = ["red", "blue", "green", "yellow"]
RGB = torch.tensor([[1.0, -1, -1], [-1, -1, 1], [-1, 1, -1], [1, 1, -1]])


def test_loss_matches_hand_computation_3x3():
    z_i = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]), dim=-1)
    z_t = F.normalize(torch.tensor([[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]]), dim=-1)
    scale = 2.0
    sims = [[sum(a * b for a, b in zip(i, t)) for t in z_t.tolist()] for i in z_i.tolist()]

    def ce(rows):
        return sum(math.log(sum(math.exp(scale * s) for s in row)) - scale * row[k] for k, row in enumerate(rows)) / 3

    columns = [list(col) for col in zip(*sims)]
    expected = (ce(sims) + ce(columns)) / 2
    got = contrastive_loss(z_i, z_t, torch.tensor(math.log(scale)))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_duplicate_captions_are_positives_of_each_other():
    z = F.normalize(torch.randn(4, 8), dim=-1)
    groups = torch.tensor([0, 0, 1, 2])
    plain = contrastive_loss(z, z, torch.tensor(0.0))
    grouped = contrastive_loss(z, z, torch.tensor(0.0), groups=groups)
    distinct = contrastive_loss(z, z, torch.tensor(0.0), groups=torch.arange(4))
    assert distinct.item() == pytest.approx(plain.item(), rel=1e-6)
    assert grouped.item() != pytest.approx(plain.item())


def _toy():
    tok = Tokenizer.train([f"a {w} square" for w in WORDS] * 20, vocab_size=300, context_length=24)
    torch.manual_seed(0)
    return ClipModel.from_config(preset("tiny").clip, tokenizer=tok)


def _colour_feed(start):
    g = torch.Generator().manual_seed(start)
    while True:
        idx = torch.randint(0, 4, (16,), generator=g)
        img = RGB[idx][:, :, None, None].expand(16, 3, 16, 16) + 0.2 * torch.randn(16, 3, 16, 16, generator=g)
        yield {"image": img, "caption": [f"a {WORDS[i]} square" for i in idx]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    model = _toy()
    before = model.training_losses(next(_colour_feed(99)))["loss"].item()
    cfg = TrainConfig(steps=40, batch_size=16, lr=3e-3, warmup_steps=4, log_every=5, ckpt_every=20)
    result = train(model, _colour_feed, cfg=cfg, run_dir=tmp_path_factory.mktemp("run"), run_config={},
                   progress=False, stage_name="clip")
    return model, before, result


def test_a_few_steps_reduce_the_loss(trained):
    model, before, result = trained
    after = model.training_losses(next(_colour_feed(99)))["loss"].item()
    assert after < before - 0.5, (before, after)
    assert result.metrics["acc_i2t"] == 1.0


def test_zero_shot_on_a_separable_toy(trained):
    model, _, _ = trained
    images = RGB[:, :, None, None].expand(4, 3, 16, 16)
    probs = classify(model, images, [f"a {w} square" for w in WORDS])
    assert probs.argmax(dim=1).tolist() == [0, 1, 2, 3]
    assert probs.diag().min() > 0.5


def test_save_load_identical_embeddings(trained, tmp_path):
    model, _, _ = trained
    save_clip(model, tmp_path / "clip", cfg=preset("tiny"))
    again = load_clip(tmp_path / "clip")
    images = torch.randn(3, 3, 16, 16).clamp(-1, 1)
    captions = ["a red square", "a blue square", "something never seen ยีราฟ"]
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), again.encode_image(images))
        assert torch.equal(model.encode_captions(captions), again.encode_captions(captions))
    assert again.logit_scale.item() == pytest.approx(model.logit_scale.item())


def test_a_checkpoint_with_a_scalar_temperature_still_loads():
    """logit_scale became shape [1] (FSDP2 shards no 0-d parameter); training checkpoints written
    before hold it 0-d and resume."""
    model = _toy()
    old = {**model.state_dict(), "logit_scale": torch.tensor(2.5)}
    model.load_state_dict(old)
    assert model.logit_scale.shape == (1,) and model.logit_scale.item() == 2.5


def test_text_embedding_pools_at_the_end_token():
    model = _toy().eval()
    tokens = model.tokenize(["a red square"])
    n = int(tokens.attention_mask.sum())
    with torch.no_grad():
        base = model.encode_text(tokens).embeds
        # The highest id after the end token: pooling at argmax(input_ids), the legacy CLIP path,
        # would read a padding position and change the embedding.
        tokens.input_ids[0, n:] = model.tokenizer.vocab_size - 1
        after_pad = model.encode_text(tokens).embeds
        tokens.input_ids[0, 1] = 7  # a real token changes the embedding
        changed = model.encode_text(tokens).embeds
    assert torch.allclose(base, after_pad, atol=1e-6)
    assert not torch.allclose(base, changed, atol=1e-3)


def test_captions_trimmed_to_the_longest_embed_as_in_the_full_context():
    model = _toy().eval()
    captions = ["a red square", "a big blue circle", "ดาว"]
    tokens = model.tokenize(captions)
    trimmed = tokens.trimmed()
    assert trimmed.input_ids.shape[1] == int(tokens.attention_mask.sum(dim=1).max()) < model.tokenizer.context_length
    with torch.no_grad():
        full = model.encode_text(tokens).embeds
        short = model.encode_captions(captions)
    assert torch.allclose(full, short, atol=1e-6)


def test_the_towers_use_plain_attention():
    """The fused CPU attention made a bf16 training step 1.7× slower at these sizes (docs/clip.md)."""
    model = _toy()
    assert model.text.config._attn_implementation == model.vision.config._attn_implementation == "eager"


def test_the_activation_setting_reaches_both_towers():
    import dataclasses

    from transformers.activations import GELUActivation, QuickGELUActivation

    tok = Tokenizer.train([f"a {w} square" for w in WORDS] * 20, vocab_size=300, context_length=24)
    for name, kind in (("quick_gelu", QuickGELUActivation), ("gelu", GELUActivation)):
        model = ClipModel.from_config(dataclasses.replace(preset("tiny").clip, activation=name), tokenizer=tok)
        for tower in (model.text, model.vision):
            acts = [m for m in tower.modules() if isinstance(m, (GELUActivation, QuickGELUActivation))]
            assert acts and all(type(a) is kind for a in acts)


def test_the_gpu_preset_keeps_the_shipped_models_clip():
    """`shapes` may change its CPU recipe; `shapes-gpu` must still describe the CLIP the shipped model holds."""
    import dataclasses
    from pathlib import Path

    import unclip
    from unclip.config import UnclipConfig
    from unclip.modeldir import read_manifest

    def network(clip):  # twin settings are moot without twins; fields the manifest predates take their defaults
        return {k: v for k, v in dataclasses.asdict(clip).items() if k != "train" and not k.startswith("twin_")}

    shipped = UnclipConfig.from_dict(read_manifest(Path(unclip.__file__).parent / "assets" / "model").config).clip
    assert shipped.hard_negatives == 0.0 and shipped.activation == "quick_gelu"
    assert network(preset("shapes-gpu").clip) == network(shipped)


def test_a_stage_on_other_data_than_its_clip_is_warned_about(tmp_path, caplog):
    """`unclip train prior --clip DIR` without the --set data.* of the CLIP's run trained on shapes world
    with a CLIP of other data, silently."""
    from dataclasses import replace

    from unclip.clip.stage import warn_if_other_data

    from tiny_models import save_tiny_clip

    clip_dir = save_tiny_clip(tmp_path)  # trained (as far as its manifest says) on shapes world
    cfg = preset("tiny")
    with caplog.at_level("WARNING", logger="unclip.clip.stage"):
        warn_if_other_data(cfg, clip_dir, "decoder")
        assert caplog.text == ""
        warn_if_other_data(replace(cfg, data=replace(cfg.data, source="folder", path="my_pairs")), clip_dir, "decoder")
    assert "trained on shapes and this decoder run trains on folder (my_pairs)" in caplog.text
