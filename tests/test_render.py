import numpy as np
import pytest
from PIL import Image

from unclip.data.preview import font, wrap, write_preview
from unclip.data.render import OUTLINES, render
from unclip.data.vocabulary import thai_words
from unclip.data.world import BACKGROUNDS, COLORS, SHAPES, Obj, Scene, sample
from unclip.errors import DataError


def test_same_scene_same_pixels():
    for i in range(20):
        scene = sample("train", i).scene
        assert np.array_equal(np.asarray(render(scene, 64)), np.asarray(render(scene, 64)))


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("background", sorted(BACKGROUNDS))
def test_pixels_match_the_scene(shape, background):
    colour = "red"
    scene = Scene(kind="single", objects=(Obj(shape, colour, "large", 0.5, 0.5, "center"),), background=background)
    pixels = np.asarray(render(scene, 64)).astype(int)
    assert np.abs(pixels[32, 32] - COLORS[colour].rgb).max() <= 2, shape
    assert np.abs(pixels[1, 1] - BACKGROUNDS[background][0]).max() == 0
    # the shape stays inside its radius (0.22 · 64 ≈ 14 px) and covers a fair part of that disc
    covered = np.abs(pixels - COLORS[colour].rgb).max(axis=2) < 60
    ys, xs = np.nonzero(covered)
    assert np.hypot(xs - 31.5, ys - 31.5).max() <= 0.22 * 64 + 1.5
    assert covered.sum() > 0.3 * np.pi * (0.22 * 64) ** 2


def test_anti_aliased_edges():
    scene = Scene(kind="single", objects=(Obj("circle", "white", "large", 0.5, 0.5, "center"),))
    pixels = np.asarray(render(scene, 32))[..., 0]
    assert len(np.unique(pixels)) > 5  # intermediate values on the rim


def test_shapes_differ_from_each_other():
    images = {s: np.asarray(render(Scene(kind="single", objects=(Obj(s, "blue", "large", 0.5, 0.5, "center"),)), 32))
              for s in SHAPES}
    names = sorted(images)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert np.abs(images[a].astype(int) - images[b]).sum() > 500, (a, b)


def test_each_object_is_where_the_scene_says():
    for i in range(200):
        scene = sample("train", i).scene
        pixels = np.asarray(render(scene, 64)).astype(int)
        for o in scene.objects:  # every shape is solid at its centre
            x, y = int(o.cx * 64), int(o.cy * 64)
            assert np.abs(pixels[y, x] - COLORS[o.colour].rgb).max() <= 12, (i, o)
        background = np.asarray(BACKGROUNDS[scene.background][0])
        assert np.array_equal(pixels[0, 0], background), (i, scene)  # a corner is always background


def test_every_outline_fits_its_unit_circle():
    for shape, outline in OUTLINES.items():
        assert np.hypot(outline[:, 0], outline[:, 1]).max() == pytest.approx(1.0), shape


@pytest.mark.parametrize("lang", ["en", "th"])
def test_preview_wraps_captions_between_words(lang):
    face = font(lang, 13)
    for i in range(300):
        text = sample("train", i, lang=lang).caption
        lines = wrap(text, face, 150, lang)
        assert all(face.getlength(line) <= 150 for line in lines), lines
        assert "".join(lines).replace(" ", "") == text.replace(" ", "")
        if lang == "en":
            assert " ".join(lines) == text
        else:  # every line is whole Thai words: no word, vowel or tone mark cut in two
            assert sum((thai_words(line) for line in lines), []) == thai_words(text), lines


def test_a_thai_prompt_with_words_outside_the_world_wraps_between_them_too():
    """The README's Thai prompt says สี่เหลี่ยม (a rectangle), no word of the world's own: its
    letters stay together on one line ("สี่เหลี่ย" then "ม" was how a grid label broke)."""
    face = font("th", 13)
    lines = wrap("วงกลมสีแดงอยู่เหนือสี่เหลี่ยมสีน้ำเงิน", face, 150, "th")
    assert lines == ["วงกลมสีแดงอยู่เหนือสี่", "เหลี่ยมสีน้ำเงิน"]
    assert thai_words("หมาสีแดงกินวงกลม") == ["หมา", "สี", "แดง", "กิน", "วงกลม"]  # unknown runs kept whole


def test_preview_grid(tmp_path):
    path = write_preview(tmp_path / "p.png", split="unseen", n=5, size=32, seed=1)
    image = Image.open(path)
    assert image.mode == "RGB" and image.width >= 5 * 32 and image.height > 32 + 2 * 13
    with pytest.raises(DataError, match="valid splits"):
        write_preview(tmp_path / "q.png", split="training")
    with pytest.raises(DataError, match="at least 8"):
        write_preview(tmp_path / "q.png", size=4)
    assert not (tmp_path / "q.png").exists()


def test_grid_labels_draw_greek_and_accented_letters():
    """textdiff labels its images "θ = 0.25", and captions of your own data may be French or Polish: the
    Latin font held ASCII only, so "θ = 0.25" was drawn "= 0.25" and "café" as "caf"."""
    face = font("en", 13)
    for text in ("θ", "é", "ñ", "Ł", "ü", "–", "“"):
        assert face.getmask(text).getbbox() is not None, text
    assert face.getlength("θ = 0.25") > face.getlength(" = 0.25") + 4
