import dataclasses

import numpy as np
import pytest

from unclip.data.render import render
from unclip.data.world import BACKGROUNDS, COLORS, SHAPES, Obj, Scene, sample


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
    scene = sample("train", 0).scene
    for i in range(200):
        scene = sample("train", i).scene
        pixels = np.asarray(render(scene, 64)).astype(int)
        for o in scene.objects:
            if o.shape in ("cross", "star", "heart"):
                continue  # their centre pixel can be background-adjacent after anti-aliasing
            x, y = int(o.cx * 64), int(o.cy * 64)
            assert np.abs(pixels[y, x] - COLORS[o.colour].rgb).max() <= 12, (i, o)
    moved = dataclasses.replace(scene, background="black")
    assert render(moved, 16).size == (16, 16)
