"""Shapes world (DESIGN §5): seeded scenes of coloured shapes with English and Thai captions.

Everything about sample i of a split comes from `np.random.default_rng([seed, split id, i])`,
never from global state, so any worker, rank or order gives the same sample for the same index.
This module is numpy only; `render.py` draws scenes, `shapes.py` wraps them as torch data sets and
`vocabulary.py` reads text against the captions' words.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from unclip.errors import DataError


@dataclass(frozen=True)
class Colour:
    """A colour's RGB fill and its Thai name (the English name is its key in COLORS)."""

    rgb: tuple[int, int, int]
    th: str


COLORS: dict[str, Colour] = {
    "red": Colour((220, 40, 40), "แดง"),
    "orange": Colour((245, 140, 20), "ส้ม"),
    "yellow": Colour((240, 220, 30), "เหลือง"),
    "green": Colour((40, 180, 60), "เขียว"),
    "cyan": Colour((30, 200, 220), "ฟ้า"),
    "blue": Colour((40, 70, 220), "น้ำเงิน"),
    "purple": Colour((140, 50, 200), "ม่วง"),
    "pink": Colour((240, 120, 190), "ชมพู"),
    "white": Colour((245, 245, 245), "ขาว"),
}
# shape → (Thai name, Thai classifier used when counting)
SHAPES: dict[str, tuple[str, str]] = {
    "circle": ("วงกลม", "วง"),
    "square": ("สี่เหลี่ยมจัตุรัส", "รูป"),
    "triangle": ("สามเหลี่ยม", "รูป"),
    "star": ("ดาว", "ดวง"),
    "heart": ("หัวใจ", "ดวง"),
    "cross": ("กากบาท", "อัน"),
    "hexagon": ("หกเหลี่ยม", "รูป"),
    "diamond": ("ข้าวหลามตัด", "รูป"),
}
SIZES: dict[str, float] = {"small": 0.12, "large": 0.22}  # radius as a fraction of the canvas side
SIZE_TH = {"small": "เล็ก", "large": "ใหญ่"}
# 3×3 grid cell → (column, row), English phrases, Thai word
POSITIONS: dict[str, tuple[int, int]] = {
    "top-left": (0, 0), "top": (1, 0), "top-right": (2, 0),
    "left": (0, 1), "center": (1, 1), "right": (2, 1),
    "bottom-left": (0, 2), "bottom": (1, 2), "bottom-right": (2, 2),
}
POSITION_EN = {
    "top-left": ("in the top-left corner", "at the top left"), "top": ("at the top", "at the top"),
    "top-right": ("in the top-right corner", "at the top right"), "left": ("on the left", "on the left side"),
    "center": ("in the center", "in the middle"), "right": ("on the right", "on the right side"),
    "bottom-left": ("in the bottom-left corner", "at the bottom left"), "bottom": ("at the bottom", "at the bottom"),
    "bottom-right": ("in the bottom-right corner", "at the bottom right"),
}
POSITION_TH = {
    "top-left": "มุมบนซ้าย", "top": "ด้านบน", "top-right": "มุมบนขวา", "left": "ด้านซ้าย", "center": "ตรงกลาง",
    "right": "ด้านขวา", "bottom-left": "มุมล่างซ้าย", "bottom": "ด้านล่าง", "bottom-right": "มุมล่างขวา",
}
# relation of the subject to the reference → English phrases, Thai phrases, inverse relation
RELATIONS = ("left of", "right of", "above", "below")
RELATION_EN = {"left of": ("to the left of", "left of"), "right of": ("to the right of", "right of"),
               "above": ("above", "over"), "below": ("below", "under")}
RELATION_TH = {"left of": ("อยู่ทางซ้ายของ",), "right of": ("อยู่ทางขวาของ",),
               "above": ("อยู่เหนือ", "อยู่ด้านบนของ"), "below": ("อยู่ใต้", "อยู่ด้านล่างของ")}
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
# the grid cell each relation points to, whose words ("top", "บน") a phrase for it may borrow ("on top of")
RELATION_CELL = {"left of": "left", "right of": "right", "above": "top", "below": "bottom"}
COUNTS = (2, 3, 4)
COUNT_EN = {2: "two", 3: "three", 4: "four"}
COUNT_TH = {2: "สอง", 3: "สาม", 4: "สี่"}
BACKGROUNDS: dict[str, tuple[tuple[int, int, int], str]] = {
    "black": ((0, 0, 0), ""), "gray": ((128, 128, 128), "เทา"), "white": ((245, 245, 245), "ขาว"),
}
HELD_OUT = frozenset({
    ("green", "star"), ("purple", "triangle"), ("orange", "heart"), ("cyan", "square"),
    ("pink", "hexagon"), ("yellow", "cross"), ("blue", "diamond"), ("white", "circle"),
})
# Every Thai word the captions use, so that Thai (written without spaces) can be split into words.
THAI_WORDS = frozenset(
    [c.th for c in COLORS.values()] + [b[1] for b in BACKGROUNDS.values() if b[1]]
    + [w for pair in SHAPES.values() for w in pair] + list(SIZE_TH.values()) + list(COUNT_TH.values())
    + "สี ขนาด อยู่ ที่ ทาง ของ ซ้าย ขวา เหนือ ใต้ ด้าน บน ล่าง มุม ตรง กลาง รูป พื้นหลัง".split()
)
SPLITS = {"train": 0, "val": 1, "test": 2, "unseen": 3}  # split name → its id in every sample's seed
SPLIT_LENGTHS = {"val": 5000, "test": 5000, "unseen": 5000}  # train is endless
KINDS = ("single", "pair", "count")
KIND_WEIGHTS = (0.4, 0.35, 0.25)
BACKGROUND_WEIGHTS = (0.7, 0.15, 0.15)  # black, gray, white

SEEN_PAIRS = tuple((c, s) for c in COLORS for s in SHAPES if (c, s) not in HELD_OUT)
HELD_OUT_PAIRS = tuple(sorted(HELD_OUT))


@dataclass(frozen=True)
class Obj:
    """One shape: centre (cx, cy) in [0, 1] with y down; `position` is its 3×3 grid cell."""

    shape: str
    colour: str
    size: str
    cx: float
    cy: float
    position: str

    def to_dict(self) -> dict[str, Any]:
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "cx": self.cx, "cy": self.cy,
                "position": self.position}


@dataclass(frozen=True)
class Scene:
    """kind "single" (one object), "pair" (objects[0] `relation` objects[1]) or "count" (copies)."""

    kind: str
    objects: tuple[Obj, ...]
    background: str = "black"
    relation: str | None = None
    count: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "objects": [o.to_dict() for o in self.objects], "background": self.background,
                "relation": self.relation, "count": self.count}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scene:
        return cls(kind=data["kind"], objects=tuple(Obj(**o) for o in data["objects"]),
                   background=data.get("background", "black"), relation=data.get("relation"),
                   count=data.get("count"))


@dataclass(frozen=True)
class Sample:
    """Sample `index` of `split`: its scene and one caption in `lang` ("en" or "th").

    `key` ("val-000000042") names it uniquely across splits for one seed.
    """

    key: str
    split: str
    index: int
    scene: Scene
    lang: str
    caption: str


def cell_of(cx: float, cy: float) -> str:
    col, row = min(2, int(cx * 3)), min(2, int(cy * 3))
    return next(name for name, cr in POSITIONS.items() if cr == (col, row))


def _rng(split: str, index: int, seed: int) -> np.random.Generator:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    if index < 0 or (split in SPLIT_LENGTHS and index >= SPLIT_LENGTHS[split]):
        limit = SPLIT_LENGTHS.get(split)
        raise DataError(f"index {index} is outside split {split!r}" + (f" (0..{limit - 1})" if limit else ""))
    return np.random.default_rng([seed, SPLITS[split], index])


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def _clamp(v: float, r: float) -> float:
    return min(max(v, r + 0.02), 1 - r - 0.02)


def sample_scene(rng: np.random.Generator, split: str, *, scenes: tuple[float, ...] = KIND_WEIGHTS) -> Scene:
    """A random scene; `unseen` scenes hold a held-out pair in their first object.

    scenes: relative odds of KINDS. Changing them changes which kind a sample is and nothing else
    drawn before it: the kind takes one uniform draw whatever the odds."""
    odds = np.asarray(scenes, dtype=float)
    if odds.shape != (len(KINDS),) or not np.isfinite(odds).all() or odds.min() < 0 or odds.sum() <= 0:
        raise DataError(f"scene odds {list(scenes)} must be {len(KINDS)} non-negative numbers, not all zero, for "
                        f"{', '.join(KINDS)} scenes, e.g. {list(KIND_WEIGHTS)}")
    kind = KINDS[int(rng.choice(3, p=odds / odds.sum()))]
    first = _pick(rng, HELD_OUT_PAIRS if split == "unseen" else SEEN_PAIRS)
    if kind == "single":
        size = _pick(rng, tuple(SIZES))
        position = _pick(rng, tuple(POSITIONS))
        col, row = POSITIONS[position]
        r = SIZES[size]
        cx = _clamp((col + 0.5) / 3 + rng.uniform(-0.04, 0.04), r)
        cy = _clamp((row + 0.5) / 3 + rng.uniform(-0.04, 0.04), r)
        objects = (Obj(first[1], first[0], size, cx, cy, cell_of(cx, cy)),)
        scene = Scene(kind="single", objects=objects)
    elif kind == "pair":
        second = _pick(rng, SEEN_PAIRS)
        while second == first:
            second = _pick(rng, SEEN_PAIRS)
        relation = _pick(rng, RELATIONS)
        # subject and reference sit a half-canvas apart on the relation's axis, ±0.06 on the other
        near, far = 0.25 + rng.uniform(-0.02, 0.02), 0.75 + rng.uniform(-0.02, 0.02)
        a_main, b_main = (near, far) if relation in ("left of", "above") else (far, near)
        a_cross, b_cross = 0.5 + rng.uniform(-0.06, 0.06), 0.5 + rng.uniform(-0.06, 0.06)
        horizontal = relation in ("left of", "right of")
        objects = []
        for (colour, shape), main, cross in ((first, a_main, a_cross), (second, b_main, b_cross)):
            size = _pick(rng, tuple(SIZES))
            cx, cy = (main, cross) if horizontal else (cross, main)
            objects.append(Obj(shape, colour, size, cx, cy, cell_of(cx, cy)))
        scene = Scene(kind="pair", objects=tuple(objects), relation=relation)
    else:
        count = _pick(rng, COUNTS)
        size = _pick(rng, tuple(SIZES))
        if size == "small":  # distinct cells of the 3×3 grid
            cells = [(c + 0.5) / 3 for c in range(3)]
            slots = [(x, y) for y in cells for x in cells]
            jitter = 0.03
        else:  # a 2×2 grid fits four large shapes without overlap
            slots = [(x, y) for y in (0.27, 0.73) for x in (0.27, 0.73)]
            jitter = 0.01
        chosen = rng.permutation(len(slots))[:count]
        objects = []
        for k in sorted(chosen.tolist()):
            x, y = slots[k]
            cx, cy = x + rng.uniform(-jitter, jitter), y + rng.uniform(-jitter, jitter)
            objects.append(Obj(first[1], first[0], size, cx, cy, cell_of(cx, cy)))
        scene = Scene(kind="count", objects=tuple(objects), count=count)
    background = ("black", "gray", "white")[int(rng.choice(3, p=BACKGROUND_WEIGHTS))]
    if any(o.colour == background for o in scene.objects):
        background = "black"
    return Scene(kind=scene.kind, objects=scene.objects, background=background, relation=scene.relation,
                 count=scene.count)


# --- captions --------------------------------------------------------------------------------


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def plural(shape: str) -> str:
    """A shape's English plural (crosses, circles)."""
    return shape + ("es" if shape.endswith("s") else "s")


def _en_object(obj: Obj, with_size: bool) -> str:
    words = f"{obj.size} {obj.colour} {obj.shape}" if with_size else f"{obj.colour} {obj.shape}"
    return f"{_article(words)} {words}"


def _th_object(obj: Obj, with_size: bool, prefix: str = "") -> str:
    shape_th = SHAPES[obj.shape][0]
    text = f"{prefix}{shape_th}สี{COLORS[obj.colour].th}"
    return text + (f"ขนาด{SIZE_TH[obj.size]}" if with_size else "")


def _background(scene: Scene, lang: str) -> str:
    if scene.background == "black":
        return ""
    if lang == "en":
        return f" on a {scene.background} background"
    return f" บนพื้นหลังสี{BACKGROUNDS[scene.background][1]}"


def caption(scene: Scene, *, lang: str, rng: np.random.Generator | None = None) -> str:
    """A caption of `scene` in `lang` ("en" or "th"); random template when `rng` is given.

    Without `rng` this is the canonical caption, which names every attribute. Colour and shape
    words are in every caption; size, position phrasing, articles and word order vary.
    """
    canonical = rng is None
    rng = rng or np.random.default_rng(0)
    coin = (lambda p: True) if canonical else (lambda p: bool(rng.random() < p))
    choose = (lambda options: options[0]) if canonical else (lambda options: _pick(rng, options))
    bg = _background(scene, lang)
    if lang not in ("en", "th"):
        raise DataError(f"unknown caption language {lang!r}; use en or th")
    if scene.kind == "single":
        obj = scene.objects[0]
        size, where = coin(0.6), coin(0.7)
        if lang == "en":
            text = _en_object(obj, size)
            if where:
                text += " " + choose(POSITION_EN[obj.position])
            return (text if canonical or coin(0.8) else "a picture of " + text) + bg
        text = _th_object(obj, size, prefix="" if canonical or coin(0.7) else "รูป")
        if where:
            text += choose(("อยู่", "ที่", "")) + POSITION_TH[obj.position]
        return text + bg
    if scene.kind == "pair":
        a, b = scene.objects
        relation = scene.relation
        if not canonical and coin(0.3):  # the same scene said from the reference's side
            a, b, relation = b, a, INVERSE[relation]
        size_a, size_b = coin(0.5), coin(0.5)
        if lang == "en":
            return f"{_en_object(a, size_a)} {choose(RELATION_EN[relation])} {_en_object(b, size_b)}{bg}"
        return f"{_th_object(a, size_a)}{choose(RELATION_TH[relation])}{_th_object(b, size_b)}{bg}"
    obj, count = scene.objects[0], scene.count
    size = coin(0.5)
    if lang == "en":
        words = f"{obj.size} {obj.colour}" if size else obj.colour
        return f"{COUNT_EN[count]} {words} {plural(obj.shape)}{bg}"
    return f"{_th_object(obj, size)}{COUNT_TH[count]}{SHAPES[obj.shape][1]}{bg}"


def canonical_caption(scene: Scene, *, lang: str) -> str:
    """The one deterministic caption naming every attribute; zero-shot classification and the prior's
    metrics use it (GenEval prompts use the random templates: `unclip.eval.prompts`)."""
    return caption(scene, lang=lang)


def sample(split: str, index: int, *, seed: int = 0, lang: str = "mix",
           scenes: tuple[float, ...] = KIND_WEIGHTS) -> Sample:
    """Sample `index` of `split`: its scene (of KINDS with odds `scenes`) and a caption in `lang`
    ("en", "th" or "mix": 50/50)."""
    if lang not in ("en", "th", "mix"):
        raise DataError(f"unknown caption language {lang!r}; use en, th or mix")
    rng = _rng(split, index, seed)
    scene = sample_scene(rng, split, scenes=scenes)
    if lang == "mix":
        lang = ("en", "th")[int(rng.integers(2))]
    text = caption(scene, lang=lang, rng=rng)
    return Sample(key=f"{split}-{index:09d}", split=split, index=index, scene=scene, lang=lang, caption=text)
