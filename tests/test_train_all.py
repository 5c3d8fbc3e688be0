"""`unclip train all`: every stage in one command, skipped when complete, resumed when interrupted."""

import shlex

import numpy as np
import pytest

from unclip.config import preset


def test_train_all_trains_assembles_and_skips_finished_stages(tmp_path):
    import unclip
    from unclip.errors import ModelFormatError
    from unclip.modeldir import read_manifest
    from unclip.train.all import STAGES, train_all

    cfg = preset("tiny")
    root, out = tmp_path / "runs", tmp_path / "model"
    first = train_all(cfg, root=root, out=out, progress=False, evaluate=False, embed_pairs=64, fit_samples=64)
    assert set(first) == set(STAGES)
    manifest = read_manifest(out)
    for stage in ("clip", "prior", "ar_prior", "decoder", "upsampler1"):
        assert (root / stage / "model" / "unclip.json").is_file(), stage
        assert stage in manifest.provenance or stage.replace("prior", "diffusion_prior") in manifest.provenance
    images = unclip.load(out).generate("a red circle", n=1, seed=0, steps=2)
    assert images[0].size == (64, 64) and np.asarray(images[0]).std() > 0

    # a lost decoder is retrained, nothing else; asking for no stage that is missing is an error
    import shutil

    shutil.rmtree(root / "decoder" / "model")
    again = train_all(cfg, root=root, out=out, progress=False, evaluate=False, embed_pairs=64, fit_samples=64)
    assert set(again) == {"decoder"}
    shutil.rmtree(root / "decoder" / "model")
    with pytest.raises(ModelFormatError, match="stage decoder is not complete"):
        train_all(cfg, root=root, out=out, stages=["clip"], progress=False, evaluate=False)


@pytest.mark.parametrize("source", ["webdataset", "folder"])
def test_train_all_on_your_own_data(tmp_path, source, capsys):
    """The whole cascade from image–caption shards or a caption folder, through the CLI: the tokenizer
    learns the data's captions (webdataset runs failed there, reading the shards as a folder), the
    priors' statistics come from the data's pairs, not shapes world's, and every stage is evaluated
    on the data's first pairs (shapes-world evaluations were skipped, leaving nothing)."""
    from unclip.cli import main
    from unclip.clip.embed import load_embeddings
    from unclip.data.export import export_folder, export_webdataset
    from unclip.prior.stage import load_ar_prior
    from unclip.train.data import source_captions

    if source == "webdataset":
        export_webdataset(tmp_path / "data", split="val", n=60, size=32, shard_size=25, lang="th", progress=False)
        path = str(tmp_path / "data" / "{000000..000002}.tar")
    else:
        export_folder(tmp_path / "data", split="val", n=60, size=32, lang="th", progress=False)
        path = str(tmp_path / "data")
    root = tmp_path / "runs"
    argv = ["train", "all", "--preset", "tiny", "--run-dir", str(root), "--embed-pairs", "40",
            "--set", f"data.source={source}", "--set", f"data.path={path}"]
    assert main(argv) == 0
    captions = load_embeddings(root / "emb")["captions"]
    assert f"try: unclip generate {shlex.quote(captions[0])} --model {root / 'model'}" in capsys.readouterr().out

    data = preset("tiny").data
    own = source_captions(type(data)(source=source, path=path), 100)
    assert len(own) == 60 and all(any("\u0e00" <= c <= "\u0e7f" for c in caption) for caption in own)  # Thai val
    from unclip.modeldir import read_manifest  # each stage evaluated on the data's own first pairs

    evaluation = read_manifest(root / "model").evaluation
    assert evaluation["clip"]["pairs"] == 60 and evaluation["clip"]["chance_r1"] == pytest.approx(1 / 60, abs=1e-4)
    assert 0 <= evaluation["clip"]["text_to_image_r1"] <= evaluation["clip"]["text_to_image_r5"] <= 1
    for prior in ("diffusion_prior", "ar_prior"):
        assert evaluation[prior]["n"] == 60 and -1 <= evaluation[prior]["cosine"] <= 1
    assert evaluation["decoder"]["split"] == "the first 16 training pairs"
    assert evaluation["upsampler1"]["split"] == "the first 16 training images" and evaluation["upsampler1"]["psnr"] > 0
    assert (root / "decoder" / "samples.png").is_file() and (root / "upsampler1" / "samples.png").is_file()
    ar = load_ar_prior(root / "model")
    z_i = load_embeddings(root / "emb")["image_embeds"]
    np.testing.assert_allclose(ar.quantizer.mean.numpy(), z_i.astype(np.float32).mean(axis=0), atol=1e-3)  # fp16 shards
