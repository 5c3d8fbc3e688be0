"""`unclip train all`: every stage in one command, skipped when complete, resumed when interrupted."""

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
