"""Hard-negative twins: a shapes-world scene and the same scene with exactly one attribute changed.

In a batch of random shapes-world pairs few captions differ from another only by the shape, so a
contrastive loss is mostly satisfied by colour, and shape is learned slowly (docs/clip.md). NegCLIP
(Yuksekgonul et al. 2023, "When and why vision-language models behave like bags-of-words") adds
hard negatives by perturbing captions; shapes world can do better, because it has the structured
scene: a twin is a second *rendered* scene that differs from the first in one attribute (mostly the
shape: same colour, size and position), so both the image and the caption are hard negatives of
the other pair. The twin's caption is drawn with the original's template choices, so the two
captions differ only in the changed words.

A *twin group* generalises the pair: a scene and `group` − 1 versions of it that each set the same
attribute of the same object to a different value (a shape sweep: the same red circle as a square,
a star, a heart), so every two of them are hard negatives of each other, as the candidates of a
zero-shot shape question are (`unclip.clip.zeroshot`). A group of two is a twin pair.

`TwinsDataset` is the endless train split with twin groups woven in: item g·k is train sample g·k,
and items g·k + 1 … g·k + g − 1 are, for a `fraction` of the k, its variants (otherwise train samples
g·k + 1 …). A batch whose size is a multiple of g holds every group whole. Every item is a pure
function of (index, seed), like the plain split's.

A twin never holds a held-out colour–shape pair (they stay unseen), never gives an object the
background's colour, and never makes the two objects of a pair scene the same colour and shape.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
from torch.utils.data import Dataset

from unclip.config import ClipConfig
from unclip.data.world import (
    COLORS, HELD_OUT, INVERSE, KIND_WEIGHTS, POSITIONS, SHAPES, SIZES, SPLITS, Obj, Sample, Scene, _clamp, _rng,
    caption, cell_of, sample_scene,
)

# What a twin changes, and how often by default (`clip.twin_weights` sets it): the shape most of the
# time, since that is what random batches teach least; "where" is the grid cell of a one-object scene
# or the relation of a pair scene; "binding" trades the colours, the shapes or the places of a pair
# scene's two objects, which leaves the caption's words and changes what goes with what.
TWIN_ATTRIBUTES = ("shape", "colour", "size", "where", "binding")
TWIN_WEIGHTS = ClipConfig.twin_weights
TWIN_STREAM = len(SPLITS)  # the seed id of the twin draws, beside the splits' ids
MAX_GROUP = 6  # a shape group needs group − 1 new shapes, and five are always allowed


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


def variants(scene: Scene, attribute: str, rng: np.random.Generator, n: int = 1) -> list[Scene]:
    """Up to `n` versions of `scene`, each with `attribute` of the same object set to a different new
    value (every copy in a counting scene), so any two of them, and each with `scene`, differ in that
    attribute alone. Fewer where the attribute has fewer values to take (a size flips, a pair's objects
    trade places once, a pair has three rebindings), none where it cannot change (a counting scene's
    size or layout, a move that leaves the cell, the binding of one object). The first variant draws
    from `rng` the same way whatever `n` is."""
    k = int(rng.integers(2)) if scene.kind == "pair" else 0
    obj = scene.objects[k]
    if attribute in ("shape", "colour"):
        if attribute == "shape":
            options = [s for s in SHAPES if s != obj.shape and _allowed(scene, k, obj.colour, s)]
        else:
            options = [c for c in COLORS if c != obj.colour and _allowed(scene, k, c, obj.shape)]
        found = []
        for _ in range(min(n, len(options))):
            value = _pick(rng, options)
            options.remove(value)
            if scene.kind == "count":
                found.append(dataclasses.replace(scene, objects=tuple(
                    dataclasses.replace(o, **{attribute: value}) for o in scene.objects)))
            else:
                found.append(_replace_object(scene, k, **{attribute: value}))
        return found
    if scene.kind == "count" or (attribute == "binding" and scene.kind != "pair"):
        return []
    if attribute == "binding":
        return _bindings(scene, rng, n)
    if attribute == "size":
        size = "large" if obj.size == "small" else "small"
        if scene.kind == "pair":  # pair objects sit half a canvas apart: either size fits
            return [_replace_object(scene, k, size=size)]
        cx, cy = _clamp(obj.cx, SIZES[size]), _clamp(obj.cy, SIZES[size])
        if cell_of(cx, cy) != obj.position:
            return []
        return [_replace_object(scene, k, size=size, cx=cx, cy=cy)]
    if attribute != "where":
        raise ValueError(f"unknown twin attribute {attribute!r}; use one of {', '.join(TWIN_ATTRIBUTES)}")
    if scene.kind == "pair":  # the objects trade places: "a left of b" becomes "a right of b"
        return [traded(scene, "place")]
    col, row = POSITIONS[obj.position]
    targets = [p for p in POSITIONS if p != obj.position]
    r = SIZES[obj.size]
    found = []
    for _ in range(min(n, len(targets))):
        target = _pick(rng, targets)
        targets.remove(target)
        new_col, new_row = POSITIONS[target]
        cx, cy = _clamp(obj.cx + (new_col - col) / 3, r), _clamp(obj.cy + (new_row - row) / 3, r)
        if cell_of(cx, cy) != target:
            break
        found.append(_replace_object(scene, k, cx=cx, cy=cy, position=target))
    return found


def traded(scene: Scene, what: str) -> Scene:
    """A two-object scene with its objects' `what` ("colour", "shape" or "place") traded; trading places
    turns the relation round ("a left of b" becomes "a right of b")."""
    a, b = scene.objects
    if what == "place":
        moved = (dataclasses.replace(a, cx=b.cx, cy=b.cy, position=b.position),
                 dataclasses.replace(b, cx=a.cx, cy=a.cy, position=a.position))
        return dataclasses.replace(scene, objects=moved, relation=INVERSE[scene.relation])
    return dataclasses.replace(scene, objects=(dataclasses.replace(a, **{what: getattr(b, what)}),
                                               dataclasses.replace(b, **{what: getattr(a, what)})))


def _bindings(scene: Scene, rng: np.random.Generator, n: int) -> list[Scene]:
    """Up to `n` of a pair scene's rebindings, in random order: its objects' colours traded ("a red
    circle left of a blue square" → "a blue circle left of a red square"), their shapes traded, their
    places traded. Each holds the scene's colours, shapes and places, bound differently; a trade that
    changes nothing (two objects of one colour) or makes a held-out pair is left out."""
    a, b = scene.objects
    found = [traded(scene, "place")]
    for what in ("colour", "shape"):
        if getattr(a, what) != getattr(b, what):
            rebound = traded(scene, what)
            if all((o.colour, o.shape) not in HELD_OUT for o in rebound.objects):
                found.append(rebound)
    return [found[int(k)] for k in rng.permutation(len(found))[:n]]


def twin_group(index: int, *, seed: int = 0, lang: str = "mix", group: int = 2,
               weights: tuple[float, ...] = TWIN_WEIGHTS,
               scenes: tuple[float, ...] = KIND_WEIGHTS) -> tuple[list[Sample], str]:
    """([train sample `index`, then `group` − 1 variants of it], the attribute the variants change).

    The attribute is drawn with relative `weights` over TWIN_ATTRIBUTES (shape, colour, size, where, binding).
    Every caption is drawn with the same random template choices as the original's. Where the drawn
    attribute has fewer than `group` − 1 values to take, or a caption does not mention it (size and
    position are optional words), the group changes the shape instead, which every caption names and
    which has at least five values to take (eight shapes less the original's, its colour's held-out
    shape and a pair partner's).
    """
    check_group(group)
    rng = _rng("train", index, seed)
    scene = sample_scene(rng, "train", scenes=scenes)
    if lang == "mix":
        lang = ("en", "th")[int(rng.integers(2))]
    template_state = copy.deepcopy(rng)
    original = Sample(key=f"train-{index:09d}", split="train", index=index, scene=scene, lang=lang,
                      caption=caption(scene, lang=lang, rng=rng))
    twin_rng = np.random.default_rng([seed, TWIN_STREAM, index])
    p = np.asarray(check_weights(weights), dtype=np.float64)
    attribute = TWIN_ATTRIBUTES[int(twin_rng.choice(len(TWIN_ATTRIBUTES), p=p / p.sum()))]
    for attempt in (attribute, "shape"):
        edited = variants(scene, attempt, twin_rng, group - 1)
        texts = [caption(e, lang=lang, rng=copy.deepcopy(template_state)) for e in edited]
        if len(edited) == group - 1 and len({original.caption, *texts}) == group:
            suffixes = ["-twin", *(f"-twin{j}" for j in range(2, group))]
            return [original, *(dataclasses.replace(original, key=original.key + suffix, scene=e, caption=text)
                                for suffix, e, text in zip(suffixes, edited, texts))], attempt
    raise AssertionError("a shape group always exists and every caption names the shape")  # unreachable


def check_group(group: int) -> int:
    """`group`, if a twin group of that many scenes can always be built."""
    if not 2 <= group <= MAX_GROUP:
        raise ValueError(f"a twin group holds 2 to {MAX_GROUP} scenes, not {group}")
    return group


def check_weights(weights: tuple[float, ...]) -> tuple[float, ...]:
    """`weights`, one non-negative weight per TWIN_ATTRIBUTES with a positive sum, padded with zeros
    where the tail is left out (configs written before "binding" existed hold four)."""
    if not 1 <= len(weights) <= len(TWIN_ATTRIBUTES) or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"twin weights {list(weights)} must be up to {len(TWIN_ATTRIBUTES)} non-negative numbers, "
                         f"not all zero, for {', '.join(TWIN_ATTRIBUTES)}")
    return tuple(weights) + (0.0,) * (len(TWIN_ATTRIBUTES) - len(weights))


def twin_sample(index: int, *, seed: int = 0, lang: str = "mix") -> tuple[Sample, Sample, str]:
    """(train sample `index`, its twin, the attribute the twin changed): a group of two."""
    (original, twin), attribute = twin_group(index, seed=seed, lang=lang)
    return original, twin, attribute


def is_twin(k: int, *, seed: int, fraction: float) -> bool:
    """Whether group k of the twin stream (items k·group … k·group + group − 1) is a twin group."""
    return fraction > 0 and float(np.random.default_rng([seed, TWIN_STREAM + 1, k]).random()) < fraction


class TwinsDataset(Dataset):
    """The endless train split with a `fraction` of its consecutive groups of `group` items made twin
    groups: item k·group is train sample k·group, and for a twin group items k·group + 1 … are its
    variants (`twin_group`); elsewhere item i is train sample i.

    Items are the dicts of `ShapesDataset` (image, caption, lang, scene, key).
    """

    def __init__(self, *, size: int, lang: str = "mix", seed: int = 0, fraction: float = 0.5, group: int = 2,
                 weights: tuple[float, ...] = TWIN_WEIGHTS, length: int = 2**62,
                 scenes: tuple[float, ...] = KIND_WEIGHTS):
        from unclip.data.shapes import _check

        _check("train", size, lang)
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"twin fraction {fraction} must be in [0, 1]")
        self.size, self.lang, self.seed, self.fraction = size, lang, seed, fraction
        self.group, self.weights, self.length = check_group(group), check_weights(tuple(weights)), length
        self.scenes = tuple(scenes)
        self._last: tuple[int, list[Sample]] | None = None  # items come in order: each group is built once

    def _group(self, start: int) -> list[Sample]:
        if self._last is None or self._last[0] != start:
            self._last = start, twin_group(start, seed=self.seed, lang=self.lang, group=self.group,
                                           weights=self.weights, scenes=self.scenes)[0]
        return self._last[1]

    def __len__(self) -> int:
        return self.length

    def sample(self, index: int) -> Sample:
        k, j = divmod(index, self.group)
        if j and is_twin(k, seed=self.seed, fraction=self.fraction):
            return self._group(index - j)[j]
        from unclip.data.world import sample

        return sample("train", index, seed=self.seed, lang=self.lang, scenes=self.scenes)

    def __getitem__(self, index: int) -> dict:
        from unclip.data.render import render
        from unclip.data.shapes import to_tensor

        if not 0 <= index < self.length:
            raise IndexError(index)
        s = self.sample(index)
        return {"image": to_tensor(render(s.scene, self.size)), "caption": s.caption, "lang": s.lang,
                "scene": json.dumps(s.scene.to_dict(), ensure_ascii=False, separators=(",", ":")), "key": s.key}
