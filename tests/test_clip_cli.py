"""The CLIP stage through its real entry points, on the tiny preset and shapes world."""

import json

import numpy as np
import pytest
import torch

from unclip.cli import main
from unclip.clip.embed import load_embeddings
from unclip.errors import DataError
from unclip.modeldir import read_manifest

TINY = ["--preset", "tiny", "--set", "clip.train.steps=6", "--set", "clip.train.batch_size=8"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    assert main(["train", "clip", *TINY, "--run-dir", str(root / "run"), "--out", str(root / "model"),
                 "--no-eval"]) == 0
    return root


def test_train_writes_model_metrics_and_checkpoint(clip_dir):
    manifest = read_manifest(clip_dir / "model")
    assert manifest.config["name"] == "tiny" and manifest.provenance["steps"] == 6
    assert {"tokenizer/tokenizer.json", "text_encoder/model.safetensors", "image_encoder/model.safetensors"} <= set(
        manifest.files)
    rows = [json.loads(line) for line in (clip_dir / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and all(np.isfinite(r["loss"]) for r in rows)
    assert (clip_dir / "run" / "checkpoint.pt").is_file()


def test_rerun_resumes_and_more_steps_continue(clip_dir, capsys):
    assert main(["train", "clip", *TINY, "--set", "clip.train.steps=8", "--run-dir", str(clip_dir / "run"),
                 "--out", str(clip_dir / "model8"), "--no-eval"]) == 2  # another config: refused
    assert "another config" in capsys.readouterr().err
    assert main(["train", "clip", *TINY, "--run-dir", str(clip_dir / "run"), "--out", str(clip_dir / "model"),
                 "--no-eval"]) == 0
    rows = (clip_dir / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 6  # nothing left to train; the log was not duplicated


def test_an_out_that_is_not_a_model_is_refused_before_training(tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    assert main(["train", "clip", *TINY, "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "notes"),
                 "--no-eval"]) == 2
    assert "is a directory without unclip.json" in capsys.readouterr().err
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    assert not (tmp_path / "run").exists()  # refused before any training


def test_init_fine_tunes_a_trained_clip_and_refuses_another_network(clip_dir, tmp_path, capsys):
    """--init starts from a model directory's CLIP and tokenizer (here with twins); another network is refused."""
    from unclip.clip.stage import load_clip

    base = clip_dir / "model"
    assert main(["train", "clip", *TINY, "--set", "clip.hard_negatives=0.5", "--init", str(base),
                 "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "model"), "--no-eval"]) == 0
    manifest = read_manifest(tmp_path / "model")
    assert manifest.provenance["init"]["from"] == str(base) and manifest.provenance["init"]["provenance"]["steps"] == 6
    assert manifest.provenance["init"]["seed_offset"] > 0  # it draws other samples than the run it continues
    before, after = load_clip(base), load_clip(tmp_path / "model")
    captions = ["a red circle", "ดาวสีเขียว"]
    assert after.tokenize(captions).input_ids.tolist() == before.tokenize(captions).input_ids.tolist()
    z_before, z_after = (m.encode_captions(captions).detach().numpy() for m in (before, after))
    assert not np.allclose(z_after, z_before)  # trained on from there
    assert main(["train", "clip", *TINY, "--set", "clip.text_layers=3", "--init", str(base),
                 "--run-dir", str(tmp_path / "other"), "--no-eval"]) == 2
    assert "CLIP network differs" in capsys.readouterr().err


def test_init_ranker_starts_the_text_tower_from_a_models_ranking_tower(clip_dir, tmp_path, capsys):
    """--init-ranker: the text tower starts from the model's rank_text_encoder/, not its own tower (at lr 0
    the result is that tower exactly), and the run records which tower it took; a model without one is refused."""
    import shutil

    from unclip.clip.stage import load_clip
    from unclip.modeldir import RANKER, save_model_dir

    base = clip_dir / "model"
    text_only = [*TINY, "--set", "clip.train_towers=text"]
    assert main(["train", "clip", *text_only, "--init", str(base), "--run-dir", str(tmp_path / "tuned_run"),
                 "--out", str(tmp_path / "tuned"), "--no-eval"]) == 0

    def components(tmp):  # the base CLIP carrying the tuned text tower as its ranking tower
        for folder in ("tokenizer", "text_encoder", "image_encoder"):
            shutil.copytree(base / folder, tmp / folder)
        shutil.copytree(tmp_path / "tuned" / "text_encoder", tmp / RANKER)

    save_model_dir(tmp_path / "ranked", read_manifest(base), components)
    assert main(["train", "clip", *text_only, "--set", "clip.train.lr=0", "--init", str(tmp_path / "ranked"),
                 "--init-ranker", "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "model"),
                 "--no-eval"]) == 0
    captions = ["a red circle left of a blue square", "ดาวสีเขียว"]
    z = {name: load_clip(tmp_path / name).encode_captions(captions) for name in ("tuned", "model")}
    assert torch.equal(z["model"], z["tuned"])
    assert not torch.allclose(load_clip(base).encode_captions(captions), z["tuned"])
    assert read_manifest(tmp_path / "model").provenance["init"]["tower"] == RANKER
    assert main(["train", "clip", *text_only, "--init", str(base), "--init-ranker",
                 "--run-dir", str(tmp_path / "none"), "--no-eval"]) == 2
    assert "has no ranking tower" in capsys.readouterr().err
    assert not (tmp_path / "none" / "model").exists()


def test_text_only_fine_tune_keeps_every_image_embedding(clip_dir, tmp_path):
    """clip.train_towers=text: the text tower learns, the image tower (so every z_i a decoder was trained
    on) stays bit for bit what it was."""
    import torch

    from unclip.clip.stage import load_clip

    base = clip_dir / "model"
    assert main(["train", "clip", *TINY, "--set", "clip.train_towers=\"text\"", "--set", "clip.train.lr=1e-2",
                 "--init", str(base), "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "model"),
                 "--no-eval"]) == 0
    before, after = load_clip(base), load_clip(tmp_path / "model")
    assert after.config.train_towers == "text"
    pixels = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(after.encode_image(pixels), before.encode_image(pixels))
        assert not torch.allclose(after.encode_captions(["a red circle"]), before.encode_captions(["a red circle"]))
    assert all(torch.equal(p, q) for p, q in zip(after.vision.parameters(), before.vision.parameters()))


def test_eval_classify_and_embed(clip_dir, tmp_path, capsys):
    model = str(clip_dir / "model")
    assert main(["clip", "eval", model, "-n", "8", "--retrieval-n", "20", "--out", str(tmp_path / "e.json")]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert set(result["zero_shot"]) == {"test", "unseen"} and set(result["zero_shot"]["test"]) == {"en", "th"}
    assert set(result["zero_shot"]["unseen"]["th"]) == {"colour", "shape", "size", "position", "count",
                                                       "colour_binding", "shape_binding", "relation"}
    assert 0.0 <= result["retrieval"]["th"]["r5"] <= 1.0

    assert main(["data", "export", "--out", str(tmp_path / "f"), "--format", "folder", "-n", "2", "--size", "16"]) == 0
    image = str(tmp_path / "f" / "000000000.png")
    capsys.readouterr()
    assert main(["clip", "classify", image, "--model", model, "--json",
                 "--labels", "a red circle", "วงกลมสีแดง", "a blue star"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert set(row["probs"]) == {"a red circle", "วงกลมสีแดง", "a blue star"}
    assert sum(row["probs"].values()) == pytest.approx(1.0, abs=1e-4)
    assert main(["clip", "classify", image, "--model", model, "--labels", "only one"]) == 2
    assert main(["clip", "classify", image, "--model", model, "--labels", "a red circle", "a red circle "]) == 2
    assert "'a red circle' read as the same words" in capsys.readouterr().err  # one would vanish from the JSON
    # labels are read as prompts are: "A  Red Circle" is "a red circle" (raw, the shipped CLIP read it as
    # another caption), so the two are one label twice
    assert main(["clip", "classify", image, "--model", model, "--labels", "A  Red Circle", "a red circle"]) == 2
    assert "'A  Red Circle', 'a red circle' read as the same words" in capsys.readouterr().err
    assert main(["clip", "classify", image, "--model", model, "--json", "--labels", "A Red Circle", "a blue star"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert set(row["probs"]) == {"A Red Circle", "a blue star"}  # shown as given
    assert main(["clip", "classify", image, "--json", "--labels", "a red circle", "a blue star"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["label"] in ("a red circle", "a blue star")  # the shipped CLIP

    out = tmp_path / "emb"
    assert main(["embed", model, "--out", str(out), "-n", "25", "--shard-size", "10"]) == 0
    emb = load_embeddings(out)
    assert emb["image_embeds"].shape == (25, 16) and list(emb["keys"][:2]) == ["train-000000000", "train-000000001"]
    assert np.allclose(np.linalg.norm(emb["image_embeds"].astype(np.float32), axis=1), 1, atol=2e-3)
    assert main(["embed", model, "--out", str(out), "-n", "25", "--shard-size", "10"]) == 0  # its own folder: again
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep")
    for argv, words in ((["--out", str(tmp_path / "notes")], "holds files that are not embeddings (todo.txt)"),
                        (["--out", str(tmp_path / "e2"), "--source", "folder"], "--source folder needs --path"),
                        (["--out", str(tmp_path / "e2"), "--split", "bogus"], "shapes world's splits are"),
                        (["--out", str(tmp_path / "e2"), "--split", "val", "-n", "5001"], "val split holds 5000")):
        assert main(["embed", model, "-n", "4", *argv]) == 2  # before the CLIP loads
        assert words in capsys.readouterr().err


def test_binding_accuracy_asks_which_of_two_bindings_the_embedding_holds(clip_dir):
    """Each binding question puts a two-object scene's caption against one rebinding of its words."""
    from unclip.clip.stage import load_clip
    from unclip.clip.zeroshot import BINDINGS, attribute_accuracy, candidates
    from unclip.data.world import INVERSE, canonical_caption, sample

    scene = next(s for s in (sample("test", i).scene for i in range(100)) if s.kind == "pair"
                 and s.objects[0].colour != s.objects[1].colour and s.objects[0].shape != s.objects[1].shape)
    (a, b), relation = scene.objects, scene.relation
    for attribute, wrong in (("colour_binding", ((b.colour, a.shape), (a.colour, b.shape), relation)),
                             ("shape_binding", ((a.colour, b.shape), (b.colour, a.shape), relation)),
                             ("relation", ((a.colour, a.shape), (b.colour, b.shape), INVERSE[relation]))):
        right, other = candidates(scene, attribute)
        assert right == scene and (*((o.colour, o.shape) for o in other.objects), other.relation) == wrong

    model = load_clip(clip_dir / "model")
    for attribute in BINDINGS:
        def caption_of(pick, attribute=attribute):
            return lambda scenes, lang: model.encode_captions(
                [canonical_caption(candidates(s, attribute)[pick], lang=lang) for s in scenes])
        # an embedding that holds the true caption wins every question; the rebinding's, none
        assert attribute_accuracy(model, split="test", lang="th", attribute=attribute, n=20, embed=caption_of(0)) == 1.0
        assert attribute_accuracy(model, split="unseen", lang="en", attribute=attribute, n=20,
                                  embed=caption_of(1)) == 0.0
    # an embedding that tells nothing (constant: every caption ties) or is broken (NaN) wins nothing;
    # argmax read both as the true caption, so a prior sampling NaN scored 1.000 everywhere
    for broken in (0.0, float("nan")):
        embed = lambda scenes, lang, broken=broken: torch.full((len(scenes), 16), broken)  # noqa: E731
        for attribute in ("shape", "relation"):
            assert attribute_accuracy(model, split="test", lang="en", attribute=attribute, n=10, embed=embed) == 0.0


def test_image_binding_asks_whether_a_prior_lands_nearer_the_right_render(clip_dir):
    """A prior that hands over the true render's z_i scores 1, one that hands over the rebinding's 0."""
    from unclip.clip.stage import load_clip
    from unclip.clip.zeroshot import BINDINGS, candidates, render_and_encode, scenes_for
    from unclip.data.world import canonical_caption
    from unclip.prior.metrics import image_binding_accuracy

    model = load_clip(clip_dir / "model")
    render = render_and_encode(model)
    for binding in BINDINGS:
        scenes = list(scenes_for("test", binding, 12, 0))
        z_t = model.encode_captions([canonical_caption(s, lang="en") for s in scenes])
        for pick, expected in ((0, 1.0), (1, 0.0)):
            answer = render([candidates(s, binding)[pick] for s in scenes], "en")

            def predict(text_states, text_mask, z, generator, z_t=z_t, answer=answer):
                return answer[(z @ z_t.t()).argmax(1)]  # look each caption up among the scenes'

            assert image_binding_accuracy(model, predict, split="test", lang="en", binding=binding,
                                          n=12) == expected


def test_embed_webdataset_shards_align_by_key(clip_dir, tmp_path):
    from unclip.clip.embed import embed_dataset
    from unclip.clip.stage import load_clip
    from unclip.data.export import export_webdataset

    export_webdataset(tmp_path / "wds", split="val", n=12, size=16, shard_size=5, progress=False)
    out = embed_dataset(load_clip(clip_dir / "model"), tmp_path / "emb", source="webdataset",
                        path=str(tmp_path / "wds" / "{000000..000002}.tar"), progress=False)
    meta = json.loads((out / "meta.json").read_text())
    assert [s["name"] for s in meta["shards"]] == ["000000.npz", "000001.npz", "000002.npz"]
    assert list(load_embeddings(out)["keys"]) == [f"{i:09d}" for i in range(12)]

    (out / "000001.npz").unlink()
    with pytest.raises(DataError, match="000001.npz is missing"):
        load_embeddings(out)
    meta["shards"][0]["count"] = 4
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="000000.npz is misaligned"):
        load_embeddings(out)


@pytest.mark.parametrize("source", ["webdataset", "shapes"])
def test_an_interrupted_embed_keeps_the_shards_it_finished(clip_dir, tmp_path, caplog, source):
    """Rerun after a stop, `unclip embed` kept nothing and embedded every shard again (hours on big
    data); it keeps each shard the same CLIP wrote whole, and redoes missing, damaged or stale ones."""
    import shutil

    import numpy as np

    from unclip.data.export import export_webdataset

    model = str(clip_dir / "model")
    if source == "webdataset":
        export_webdataset(tmp_path / "wds", split="val", n=12, size=16, shard_size=4, progress=False)
        where = ["--source", "webdataset", "--path", str(tmp_path / "wds" / "{000000..000002}.tar")]
    else:
        where = ["--source", "shapes", "-n", "12", "--shard-size", "4"]
    embed = ["embed", model, *where, "--out", str(tmp_path / "emb")]
    assert main(embed) == 0
    first = load_embeddings(tmp_path / "emb")
    (tmp_path / "emb" / "000001.npz").unlink()  # stopped before this shard was written
    (tmp_path / "emb" / "000002.npz").write_bytes(b"cut short")
    with caplog.at_level("INFO", logger="unclip.clip.embed"):
        assert main(embed) == 0
    assert "kept 1 of 3 shard(s)" in caplog.text
    again = load_embeddings(tmp_path / "emb")
    assert list(again["keys"]) == list(first["keys"])
    np.testing.assert_array_equal(again["image_embeds"], first["image_embeds"])
    if source == "shapes":  # the same keys in Thai, or of another seed, are other pairs: nothing is kept
        caplog.clear()
        with caplog.at_level("INFO", logger="unclip.clip.embed"):
            assert main([*embed, "--lang", "th"]) == 0
        thai = load_embeddings(tmp_path / "emb")
        assert "kept" not in caplog.text and list(thai["keys"]) == list(first["keys"])
        assert all(any("\u0e00" <= ch <= "\u0e7f" for ch in c) for c in thai["captions"])
        assert main(embed) == 0  # back to the first run's data: embedded again, as it was
        np.testing.assert_array_equal(load_embeddings(tmp_path / "emb")["text_embeds"], first["text_embeds"])

    other = tmp_path / "other"  # another CLIP (retrained): nothing of the first is kept
    shutil.copytree(clip_dir / "model", other)
    assert main(["train", "clip", *TINY, "--init", model, "--run-dir", str(tmp_path / "run"), "--out", str(other),
                 "--no-eval"]) == 0
    caplog.clear()
    with caplog.at_level("INFO", logger="unclip.clip.embed"):
        assert main(["embed", str(other), *where, "--out", str(tmp_path / "emb")]) == 0
    assert "kept" not in caplog.text
    assert not np.array_equal(load_embeddings(tmp_path / "emb")["image_embeds"], first["image_embeds"])


def test_an_embed_interrupted_over_an_earlier_one_leaves_no_meta_json_to_vouch_for_the_mix(clip_dir, tmp_path,
                                                                                              monkeypatch):
    """A rerun into a finished folder stopped after one shard left the first run's meta.json, which
    vouched for a folder now holding shards of both runs (here English+Thai and Thai captions)."""
    from unclip.clip import embed as embed_module

    embed = ["embed", str(clip_dir / "model"), "-n", "12", "--shard-size", "4", "--out", str(tmp_path / "emb")]
    assert main(embed) == 0
    write_shard, written = embed_module._write_shard, []

    def stopped_after_one(*args, **kwargs):
        if written:
            raise KeyboardInterrupt
        written.append(write_shard(*args, **kwargs))

    monkeypatch.setattr(embed_module, "_write_shard", stopped_after_one)
    assert main([*embed, "--lang", "th"]) == 130
    assert written and not (tmp_path / "emb" / "meta.json").exists()
    with pytest.raises(DataError, match="meta.json is missing"):
        load_embeddings(tmp_path / "emb")
    monkeypatch.undo()
    assert main([*embed, "--lang", "th"]) == 0  # run again: resumes, and the folder is whole
    captions = load_embeddings(tmp_path / "emb")["captions"]
    assert len(captions) == 12 and all(any("\u0e00" <= ch <= "\u0e7f" for ch in c) for c in captions)


@pytest.mark.slow
def test_shapes_clip_reaches_its_targets(tmp_path):
    """Issue 3's targets on the shapes preset: ≈10 min on 2 cores."""
    assert main(["train", "clip", "--preset", "shapes", "--run-dir", str(tmp_path / "run"),
                 "--out", str(tmp_path / "model")]) == 0
    zs = read_manifest(tmp_path / "model").evaluation["clip"]["zero_shot"]
    for lang in ("en", "th"):
        for attribute in ("colour", "shape"):
            assert zs["test"][lang][attribute] >= 0.95
            assert zs["unseen"][lang][attribute] >= 0.90
    for split in ("test", "unseen"):
        for attribute in ("colour", "shape"):
            assert zs[split]["th"][attribute] >= zs[split]["en"][attribute] - 0.02


def _own_data_clip(tmp_path):
    """A tiny CLIP whose manifest says it was trained on a folder of the user's pairs."""
    import shutil

    from tiny_models import save_tiny_clip

    model = tmp_path / "own"
    shutil.copytree(save_tiny_clip(tmp_path), model)
    manifest = json.loads((model / "unclip.json").read_text())
    manifest["config"]["data"].update(source="folder", path="/my/pairs")
    (model / "unclip.json").write_text(json.dumps(manifest))
    return model


def test_eval_of_a_clip_trained_on_other_data_says_its_tests_are_shapes_worlds(tmp_path, caplog):
    """A CLIP trained on your own folder scored shapes-world zero-shot numbers without a word."""
    model = _own_data_clip(tmp_path)
    with caplog.at_level("WARNING"):
        assert main(["clip", "eval", str(model), "-n", "2", "--retrieval-n", "4", "--out", str(tmp_path / "e.json")]) == 0
    assert "trained on data.source=folder; these zero-shot and retrieval tests are shapes world's" in caplog.text
    assert json.loads((tmp_path / "e.json").read_text())["trained_on"] == "folder"


def test_classify_with_a_clip_trained_on_other_data_warns_about_words_its_captions_never_use(tmp_path, caplog):
    """Labels with words a CLIP trained on your own data never read were taken without a word."""
    from unclip.words import CaptionWords

    model = _own_data_clip(tmp_path)
    CaptionWords.of(["a red circle", "a blue square"]).save(model / "tokenizer")  # as its CLIP run writes it
    assert main(["data", "export", "--out", str(tmp_path / "f"), "--format", "folder", "-n", "1", "--size", "16"]) == 0
    with caplog.at_level("WARNING", logger="unclip.clip.cli"):
        assert main(["clip", "classify", str(tmp_path / "f" / "000000000.png"), "--model", str(model),
                     "--labels", "a red circle", "a blue sqare"]) == 0
    assert ("label 'a blue sqare': this CLIP read none of 'sqare' in the 2 training captions it learnt its words "
            "from (did you mean 'square'?)") in caplog.text
    assert "'a red circle'" not in caplog.text
