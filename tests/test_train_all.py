"""`unclip train all`: every stage in one command, skipped when complete, resumed when interrupted."""

import shlex

import numpy as np
import pytest

from unclip.config import preset


def test_train_all_trains_assembles_and_skips_finished_stages(tmp_path, caplog):
    import unclip
    from unclip.errors import ModelFormatError
    from unclip.modeldir import read_manifest
    from unclip.train.all import STAGES, train_all

    cfg = preset("tiny")
    root, out = tmp_path / "runs", tmp_path / "model"
    first = train_all(cfg, root=root, out=out, progress=False, evaluate=False, embed_pairs=64, fit_samples=64)
    assert set(first) == set(STAGES)
    manifest = read_manifest(out)
    for stage in ("clip", "diffusion_prior", "ar_prior", "decoder", "upsampler1"):  # the standalone verbs' folders
        assert (root / stage / "model" / "unclip.json").is_file() and stage in manifest.provenance, stage
        assert manifest.provenance[stage]["autocast"] == "no", stage  # the tiny preset trains in float32
    images = unclip.load(out).generate("a red circle", n=1, seed=0, steps=2)
    assert images[0].size == (64, 64) and np.asarray(images[0]).std() > 0

    # a lost decoder is retrained, nothing else; asking for no stage that is missing is an error
    import shutil

    shutil.rmtree(root / "decoder" / "model")
    with caplog.at_level("WARNING", logger="unclip.train.all"):
        again = train_all(cfg, root=root, out=out, progress=False, evaluate=False, embed_pairs=64, fit_samples=64)
        assert set(again) == {"decoder"} and caplog.text == ""  # the same config: skipped in silence
        # how a stage runs (compile, loader workers) is no reason to call it stale
        changed = cfg.override(["upsamplers.0.train.steps=8", "decoder.train.compile=true",
                                "prior.train.num_workers=2"])
        assert train_all(changed, root=root, out=out, progress=False, evaluate=False) == {}
    assert "upsamplers at" in caplog.text and "(upsamplers.0.train.steps: 4 → 8)" in caplog.text  # kept, said
    assert "decoder at" not in caplog.text and "prior at" not in caplog.text
    (root / "diffusion_prior").rename(root / "prior")  # a root begun when train all named its folder so
    assert train_all(cfg, root=root, out=out, progress=False, evaluate=False) == {}  # kept there, not trained again
    assert not (root / "diffusion_prior").exists()
    # a second run in the same root (its embed and assemble steps included) is refused while one runs
    import fcntl

    from unclip.errors import TrainingError

    with open(root / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(TrainingError, match="another unclip process .*is training in .*choose another --run-dir"):
            train_all(cfg, root=root, out=out, stages=["embed"], progress=False, evaluate=False)
    shutil.rmtree(root / "decoder" / "model")
    with pytest.raises(ModelFormatError, match=r"stage\(s\) decoder not complete .*\(checked before any training\)"):
        train_all(cfg, root=root, out=out, stages=["clip"], progress=False, evaluate=False)

    # a CLIP trained again: what learnt from the old one is trained again from the start (it was
    # skipped, and the model kept the old CLIP); the upsampler reads no CLIP and stays
    from unclip.pipeline.assemble import clip_fingerprint

    shutil.rmtree(root / "clip")
    with pytest.raises(ModelFormatError, match=r"stage\(s\) prior, ar_prior learnt from another CLIP than the "
                                               r"one this call trains.*add them to --stages \(checked before any"):
        train_all(cfg, root=root, out=out, stages=["clip", "embed", "decoder"], progress=False, evaluate=False)
    assert not (root / "clip").exists()
    caplog.clear()
    with caplog.at_level("WARNING", logger="unclip.train.all"):
        redone = train_all(cfg.override(["clip.init_temperature=0.1"]), root=root, out=out, progress=False,
                           evaluate=False, embed_pairs=64, fit_samples=64)
    assert set(redone) == {"clip", "embed", "prior", "ar_prior", "decoder"}
    assert "prior at" in caplog.text and "learnt from another CLIP" in caplog.text
    assert "holds embeddings of another CLIP" in caplog.text
    assert clip_fingerprint(read_manifest(out)) == clip_fingerprint(read_manifest(root / "clip" / "model"))

    # your own data in a root of shapes-world stages: every stage was skipped as complete, and the
    # model assembled was shapes world's; refused before anything is touched
    import json

    from unclip.data.export import export_folder
    from unclip.errors import ConfigError

    export_folder(tmp_path / "pairs", split="val", n=12, size=16, progress=False)
    own = cfg.override(["data.source=folder", f"data.path={tmp_path / 'pairs'}"])
    before = (out / "unclip.json").read_bytes()
    with pytest.raises(ConfigError, match=r"holds stages trained on other data: clip at .*data\.path: '' → "
                                          r".*upsamplers at .*a root of its own \(--run-dir.*checked before any"):
        train_all(own, root=root, out=out, stages=["embed"], progress=False, evaluate=False)
    assert (out / "unclip.json").read_bytes() == before and json.loads((root / "emb" / "meta.json").read_text())["source"] \
        == "shapes"
    # with those stages deleted they train on it; embeddings of other data are made again, not reused
    for folder in ("clip", "upsampler1"):
        shutil.rmtree(root / folder)
    caplog.clear()
    with caplog.at_level("WARNING", logger="unclip.train.all"):
        assert set(train_all(own, root=root, out=out, progress=False, evaluate=False, embed_pairs=64,
                             fit_samples=64)) == set(STAGES)
    assert "holds embeddings of other data than data.source=folder" in caplog.text
    meta = json.loads((root / "emb" / "meta.json").read_text())
    assert (meta["source"], meta["total"]) == ("folder", 12)


@pytest.mark.parametrize(("source", "holdout"), [("webdataset", 0.0), ("folder", 0.0), ("webdataset", 0.25)])
def test_train_all_on_your_own_data(tmp_path, source, holdout, capsys):
    """The whole cascade from image–caption shards or a caption folder, through the CLI: the tokenizer
    learns the data's captions (webdataset runs failed there, reading the shards as a folder), the
    priors' statistics come from the data's pairs, not shapes world's, and every stage is evaluated
    on the data's first pairs (shapes-world evaluations were skipped, leaving nothing), or on the
    pairs `data.holdout` kept out of training."""
    from unclip.cli import main
    from unclip.clip.embed import load_embeddings
    from unclip.data.export import export_folder, export_webdataset
    from unclip.modeldir import read_manifest
    from unclip.prior.data import training_rows
    from unclip.prior.stage import load_ar_prior
    from unclip.clip.stage import own_captions
    from unclip.train.data import held_out

    if source == "webdataset":
        export_webdataset(tmp_path / "data", split="val", n=60, size=32, shard_size=25, lang="th", progress=False)
        path = str(tmp_path / "data" / "{000000..000002}.tar")
    else:
        export_folder(tmp_path / "data", split="val", n=60, size=32, lang="th", progress=False)
        path = str(tmp_path / "data")
    root = tmp_path / "runs"
    argv = ["train", "all", "--preset", "tiny", "--run-dir", str(root), "--embed-pairs", "40",
            "--set", f"data.source={source}", "--set", f"data.path={path}", "--set", f"data.holdout={holdout}",
            "--set", "decoder.train.eval_every=2", "--set", "decoder.train.eval_batches=1"]
    assert main(argv) == 0
    embeddings = load_embeddings(root / "emb")
    data = type(preset("tiny").data)(source=source, path=path, holdout=holdout)
    first = own_captions(data, 1)[0]  # the first training caption: what the tools suggest trying
    assert f"try: unclip generate {shlex.quote(first)} --model {root / 'model'}" in capsys.readouterr().out
    import unclip

    kept_out = sum(held_out(f"{i:09d}", holdout) for i in range(60))  # the export's keys
    pipe = unclip.load(root / "model")
    assert pipe.example_prompt == first  # the server page's placeholder
    # the words of the captions its tokenizer learnt from (Thai ones here, which are not split) came along
    assert pipe.unknown_words(f"{first} a zebra") == ["a", "zebra"]
    assert pipe.prompt_warnings("a zebra")[0].startswith(f"none of the {60 - kept_out} training captions this model")

    own = own_captions(data, 100)  # the tokenizer's corpus: the training pairs' captions
    assert len(own) == 60 - kept_out and all(any("\u0e00" <= c <= "\u0e7f" for c in caption) for caption in own)
    evaluated = kept_out if holdout else 60
    label = f"the first {{}} held-out pairs" if holdout else "the first {} training pairs (none held out)"
    evaluation = read_manifest(root / "model").evaluation  # each stage measured on the data's own pairs
    assert evaluation["clip"]["pairs"] == evaluated and evaluation["clip"]["data"] == label.format(evaluated)
    assert evaluation["clip"]["chance_r1"] == pytest.approx(1 / evaluated, abs=1e-4)
    assert 0 <= evaluation["clip"]["text_to_image_r1"] <= evaluation["clip"]["text_to_image_r5"] <= 1
    for prior in ("diffusion_prior", "ar_prior"):
        assert evaluation[prior]["n"] == evaluated and -1 <= evaluation[prior]["cosine"] <= 1
    assert evaluation["decoder"]["split"] == label.format(min(16, evaluated))
    assert evaluation["upsampler1"]["split"] == label.format(min(16, evaluated))
    assert evaluation["upsampler1"]["psnr"] > 0
    assert (root / "decoder" / "samples.png").is_file() and (root / "upsampler1" / "samples.png").is_file()

    from unclip.train.metrics import read_metrics

    validated = [r["step"] for r in read_metrics(root / "decoder" / "metrics.jsonl") if "val_loss" in r]
    assert validated == ([2, 4] if holdout else [])  # the held-out pairs' loss, when some are held out

    rows = training_rows(embeddings, holdout)  # the priors never see a held-out pair
    assert len(rows["keys"]) == len(embeddings["keys"]) - sum(held_out(str(k), holdout) for k in embeddings["keys"])
    ar = load_ar_prior(root / "model")
    np.testing.assert_allclose(ar.quantizer.mean.numpy(), rows["image_embeds"].astype(np.float32).mean(axis=0),
                               atol=1e-3)  # fp16 shards


def test_unclip_train_all_no_eval_skips_the_stages_evaluations(tmp_path, monkeypatch, capsys):
    """--no-eval reaches train_all: on --preset tiny the evaluations are most of the run's time."""
    import unclip.train.all as train_all_module
    from unclip.cli import main

    calls = []
    monkeypatch.setattr(train_all_module, "train_all", lambda cfg, **kwargs: calls.append(kwargs) or {})
    for flags, evaluate in (([], True), (["--no-eval"], False)):
        main(["train", "all", "--preset", "tiny", "--run-dir", str(tmp_path / "runs"), *flags])  # no model: 2
        assert calls[-1]["evaluate"] is evaluate
