"""`unclip explain clip` on a tiny CLIP (structure), and on a trained one (quality, slow)."""

import json
import re

import pytest

from unclip.cli import main

from tiny_models import save_tiny_clip


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip"))


def test_writes_figures_page_and_metrics(tiny_clip, tmp_path, capsys):
    out = tmp_path / "explain"
    assert main(["explain", "clip", "--model", str(tiny_clip), "--out", str(out), "-n", "40"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["similarity_diagonal_wins"] <= 8
    for split in ("test", "unseen"):
        for lang in ("en", "th"):
            assert set(metrics["zero_shot"][split][lang]) == {"colour", "shape"}
    assert -1 <= metrics["cosine_unmatched"] <= 1 and -1 <= metrics["cosine_matched"] <= 1
    page = (out / "tsne_image_text.html").read_text()
    assert not re.search(r'(src|href)="https?://', page)
    data = json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S).group(1))
    assert len(data["px"]) == 80  # every scene twice: its image and its caption
    # the captions are rings, the images dots, as × and ● in the PNG (were all alike: only hovering told them apart)
    assert len(re.findall(r'<circle class="pt" ', page)) == 40 and len(re.findall(r'<circle class="pt ring" ', page)) == 40
    assert all(int(i) >= 40 for i in re.findall(r'<circle class="pt ring" data-i="(\d+)"', page))
    # the legend counts each shape's scenes as images and captions, not as points (twice the scenes)
    counts = re.findall(r'<span class="n">\((\d+) images?, (\d+) captions?\)</span>', page)
    assert counts and all(images == captions for images, captions in counts)
    assert sum(int(images) for images, _ in counts) == 40 and len(counts) == page.count('<div class="item"')
    assert (out / "similarity.png").stat().st_size > 5000 and (out / "tsne_image_text.png").stat().st_size > 5000
    assert "CLIP explainer" in capsys.readouterr().out


def test_needs_a_model(tmp_path, capsys):
    assert main(["explain", "clip", "--model", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_without_a_model_it_explains_the_shipped_models_clip(tmp_path, monkeypatch):
    """--model was required, so a newcomer had to train a CLIP first; the shipped model holds one."""
    import unclip.explain.clipspace as clipspace
    from unclip.pipeline import default_model_dir

    asked = []
    monkeypatch.setattr(clipspace, "run_clip_space", lambda out, *, model_dir, **kw: asked.append(model_dir) or 1 / 0)
    with pytest.raises(ZeroDivisionError):  # stopped right after the model was chosen
        main(["explain", "clip", "--out", str(tmp_path / "o")])
    assert asked == [default_model_dir()]


@pytest.mark.slow
def test_trained_clip_puts_captions_next_to_their_images(tmp_path):
    """Needs runs/shapes/clip/model from `unclip train clip --preset shapes`."""
    from pathlib import Path

    model = Path("runs/shapes/clip/model")
    if not model.is_dir():
        pytest.fail("train the shapes CLIP first: unclip train clip --preset shapes")
    assert main(["explain", "clip", "--model", str(model), "--out", str(tmp_path)]) == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["similarity_diagonal_wins"] >= 6
    assert m["cosine_matched"] > m["cosine_unmatched"] + 0.2
    assert m["caption_nearest_image_same_shape"] >= 0.8
