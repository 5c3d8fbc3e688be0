"""Hard-negative twins: a shapes-world scene and the same scene with exactly one attribute changed.

In a batch of random shapes-world pairs few captions differ from another only by the shape, so a
contrastive loss is mostly satisfied by colour, and shape is learned slowly (docs/clip.md). NegCLIP
(Yuksekgonul et al. 2023, "When and why vision-language models behave like bags-of-words") adds
hard negatives by perturbing captions; shapes world can do better, because it has the structured
scene: a twin is a second *rendered* scene that differs from the first in one attribute (mostly the
shape: same colour, size and position), so both the image and the caption are hard negatives of
the other pair. The twin's caption is drawn with the original's template choices, so the two
captions differ only in the changed words.

`TwinsDataset` is the endless train split with twins woven in: item 2k is train sample 2k, and
item 2k + 1 is, for a `fraction` of the k, the twin of item 2k (otherwise train sample 2k + 1). The
two sit next to each other in every even-sized batch. Every item is a pure function of (index,
seed), like the plain split's.

A twin never holds a held-out colour–shape pair (they stay unseen), never gives an object the
background's colour, and never makes the two objects of a pair scene the same colour and shape.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
from torch.utils.data import Dataset

from unclip.data.world import (
    COLORS, HELD_OUT, INVERSE, POSITIONS, SHAPES, SIZES, SPLITS, Obj, Sample, Scene, _clamp, _rng, caption,
    cell_of, sample_scene,
)

# What a twin changes, and how often: the shape most of the time, since that is what random batches
# teach least; "where" is the grid cell of a one-object scene or the relation of a pair scene.
TWIN_ATTRIBUTES = ("shape", "colour", "size", "where")
TWIN_WEIGHTS = (0.7, 0.1, 0.1, 0.1)
TWIN_STREAM = len(SPLITS)  # the seed id of the twin draws, beside the splits' ids


def _pick(rng: np.random.Generator, items: list):
    return items[int(rng.integers(len(items)))]


def _replace_object(scene: Scene, k: int, **changes) -> Scene:
    objects = list(scene.objects)
    objects[k] = dataclasses.replace(objects[k], **changes)
    return dataclasses.replace(scene, objects=tuple(objects))


def _allowed(scene: Scene, k: int, colour: str, shape: str) -> bool:
    """May object k of `scene` be `colour` `shape`? Not held out, not the background, not its partner."""
    if (colour, shape) in HELD_OUT or colour == scene.background:
        return False
    return not (scene.kind == "pair" and (colour, shape) == (scene.objects[1 - k].colour, scene.objects[1 - k].shape))


def twin_scene(scene: Scene, attribute: str, rng: np.random.Generator) -> Scene | None:
    """`scene` with `attribute` of one object changed (every copy in a counting scene); None where
    that attribute cannot change (a counting scene's size or layout, a move that leaves the cell)."""
    k = int(rng.integers(2)) if scene.kind == "pair" else 0
    obj = scene.objects[k]
    if attribute in ("shape", "colour"):
        if attribute == "shape":
            options = [s for s in SHAPES if s != obj.shape and _allowed(scene, k, obj.colour, s)]
        else:
            options = [c for c in COLORS if c != obj.colour and _allowed(scene, k, c, obj.shape)]
        value = _pick(rng, options)
        if scene.kind == "count":
            return dataclasses.replace(scene, objects=tuple(dataclasses.replace(o, **{attribute: value})
                                                            for o in scene.objects))
        return _replace_object(scene, k, **{attribute: value})
    if scene.kind == "count":
        return None
    if attribute == "size":
        size = "large" if obj.size == "small" else "small"
        if scene.kind == "pair":  # pair objects sit half a canvas apart: either size fits
            return _replace_object(scene, k, size=size)
        cx, cy = _clamp(obj.cx, SIZES[size]), _clamp(obj.cy, SIZES[size])
        if cell_of(cx, cy) != obj.position:
            return None
        return _replace_object(scene, k, size=size, cx=cx, cy=cy)
    if attribute != "where":
        raise ValueError(f"unknown twin attribute {attribute!r}; use one of {', '.join(TWIN_ATTRIBUTES)}")
    if scene.kind == "pair":  # the objects trade places: "a left of b" becomes "a right of b"
        a, b = scene.objects
        moved = (dataclasses.replace(a, cx=b.cx, cy=b.cy, position=b.position),
                 dataclasses.replace(b, cx=a.cx, cy=a.cy, position=a.position))
        return dataclasses.replace(scene, objects=moved, relation=INVERSE[scene.relation])
    col, row = POSITIONS[obj.position]
    target = _pick(rng, [p for p in POSITIONS if p != obj.position])
    new_col, new_row = POSITIONS[target]
    r = SIZES[obj.size]
    cx, cy = _clamp(obj.cx + (new_col - col) / 3, r), _clamp(obj.cy + (new_row - row) / 3, r)
    if cell_of(cx, cy) != target:
        return None
    return _replace_object(scene, k, cx=cx, cy=cy, position=target)


def twin_sample(index: int, *, seed: int = 0, lang: str = "mix") -> tuple[Sample, Sample, str]:
    """(train sample `index`, its twin, the attribute the twin changed).

    The twin's caption is drawn with the same random template choices as the original's; where the
    chosen attribute cannot change or the caption does not mention it (size and position are
    optional words), the twin changes the shape instead, which every caption names.
    """
    rng = _rng("train", index, seed)
    scene = sample_scene(rng, "train")
    if lang == "mix":
        lang = ("en", "th")[int(rng.integers(2))]
    template_state = copy.deepcopy(rng)
    original = Sample(key=f"train-{index:09d}", split="train", index=index, scene=scene, lang=lang,
                      caption=caption(scene, lang=lang, rng=rng))
    twin_rng = np.random.default_rng([seed, TWIN_STREAM, index])
    attribute = TWIN_ATTRIBUTES[int(twin_rng.choice(len(TWIN_ATTRIBUTES), p=TWIN_WEIGHTS))]
    for attempt in (attribute, "shape"):
        edited = twin_scene(scene, attempt, twin_rng)
        if edited is None:
            continue
        text = caption(edited, lang=lang, rng=copy.deepcopy(template_state))
        if text != original.caption:
            twin = dataclasses.replace(original, key=f"{original.key}-twin", scene=edited, caption=text)
            return original, twin, attempt
    raise AssertionError("a shape twin always exists and every caption names the shape")  # unreachable


def is_twin(k: int, *, seed: int, fraction: float) -> bool:
    """Whether items 2k and 2k + 1 of the twin stream are a twin pair."""
    return fraction > 0 and float(np.random.default_rng([seed, TWIN_STREAM + 1, k]).random()) < fraction


class TwinsDataset(Dataset):
    """The endless train split with a `fraction` of its consecutive pairs (2k, 2k + 1) made twins.

    Items are the dicts of `ShapesDataset` (image, caption, lang, scene, key).
    """

    def __init__(self, *, size: int, lang: str = "mix", seed: int = 0, fraction: float = 0.5,
                 length: int = 2**62):
        from unclip.data.shapes import _check

        _check("train", size, lang)
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"twin fraction {fraction} must be in [0, 1]")
        self.size, self.lang, self.seed, self.fraction, self.length = size, lang, seed, fraction, length

    def __len__(self) -> int:
        return self.length

    def sample(self, index: int) -> Sample:
        k, second = divmod(index, 2)
        if second and is_twin(k, seed=self.seed, fraction=self.fraction):
            return twin_sample(index - 1, seed=self.seed, lang=self.lang)[1]
        from unclip.data.world import sample

        return sample("train", index, seed=self.seed, lang=self.lang)

    def __getitem__(self, index: int) -> dict:
        from unclip.data.render import render
        from unclip.data.shapes import to_tensor

        if not 0 <= index < self.length:
            raise IndexError(index)
        s = self.sample(index)
        return {"image": to_tensor(render(s.scene, self.size)), "caption": s.caption, "lang": s.lang,
                "scene": json.dumps(s.scene.to_dict(), ensure_ascii=False, separators=(",", ":")), "key": s.key}
