"""GenEval-style prompt files (DESIGN §6): one JSON object per line.

    {"id": "colors-unseen-th-003", "tag": "colors", "split": "unseen", "lang": "th",
     "prompt": "ดาวสีเขียว", "expect": {"objects": 1, "include": [{"shape": "star", "colour": "green", "count": 1}]},
     "scene": {...the shapes-world scene the prompt was written from...}}

Every prompt is the caption of a real scene, written by the world's own caption templates
(`world.caption`), so its English and Thai wording is what the model was trained on; a template
is redrawn until it names exactly the attributes the task is about (no size, a position only
where the task checks one). The English and Thai prompt of one (tag, split, number) describe the
same scene. Scenes have a black background.

`expect` is what the judge checks (`geneval.check`): the image holds exactly `objects` objects,
and for each `include` entry exactly `count` objects of its shape (and colour, when given), in
its 3×3 `cell` when given, in `relation` [name, j] to the object of entry j when given.

| tag | scene | the prompt names | checked |
| --- | --- | --- | --- |
| single_object | one object | colour, shape | 1 object of that shape |
| colors | one object | colour, shape | 1 object of that shape, in that colour |
| counting | 2–4 copies | number, colour, shape | exactly n objects, all of that shape |
| two_object | two objects | colours, shapes, relation | 2 objects, the two shapes |
| color_attr | two objects | colours, shapes, relation | 2 objects, each shape in its own colour |
| position | one object / two objects | + cell / relation | the cell, or the relation of the two |

Colour is checked only where the task is about colour (GenEval's convention); position checks a
colour only when both objects share a shape, to tell them apart. Split `seen` uses train-split
scenes (no held-out colour–shape pair); `unseen` uses the world's unseen scenes, whose first object
is a held-out pair.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from unclip.data.world import (COLORS, INVERSE, POSITION_EN, POSITION_TH, POSITIONS, SHAPES, SIZE_TH, Scene, caption,
                               sample_scene)
from unclip.errors import DataError

TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
SPLITS = ("seen", "unseen")
LANGS = ("en", "th")
PROMPT_STREAM = 98  # prompt scenes: rng [seed, 98, task, split, number], disjoint from the data splits
DEFAULT_PER_GROUP = 4  # prompts per (task, split, lang) in the shipped file: 96 prompts, 384 images
KIND = {"single_object": "single", "colors": "single", "counting": "count", "two_object": "pair",
        "color_attr": "pair"}


def default_prompts_path() -> Path:
    return Path(__file__).resolve().parent / "prompts.jsonl"


def _scene(task: str, split: str, number: int, seed: int) -> Scene:
    """The scene of prompt `number`: position alternates one-object (even) and two-object (odd) scenes."""
    kind = KIND.get(task) or ("single" if number % 2 == 0 else "pair")
    rng = np.random.default_rng([seed, PROMPT_STREAM, TASKS.index(task), SPLITS.index(split), number])
    while True:
        scene = sample_scene(rng, "unseen" if split == "unseen" else "train")
        if scene.kind == kind:
            return Scene(kind=scene.kind, objects=scene.objects, relation=scene.relation, count=scene.count)


def _names_size(text: str, scene: Scene, lang: str) -> bool:
    if lang == "th":
        return "ขนาด" in text and any(SIZE_TH[o.size] in text for o in scene.objects)
    return any(word in text.split() for word in ("small", "large"))


def _names_cell(text: str, scene: Scene, lang: str) -> bool:
    position = scene.objects[0].position
    return POSITION_TH[position] in text if lang == "th" else any(p in text for p in POSITION_EN[position])


def _mention(obj, lang: str) -> str:
    return f"{SHAPES[obj.shape][0]}สี{COLORS[obj.colour].th}" if lang == "th" else f"{obj.colour} {obj.shape}"


def prompt_text(task: str, scene: Scene, lang: str, rng: np.random.Generator) -> str:
    """A training-template caption of `scene` that names no size, and a cell only for position."""
    want_cell = task == "position" and scene.kind == "single"
    for _ in range(1000):
        text = caption(scene, lang=lang, rng=rng)
        if _names_size(text, scene, lang) or (scene.kind == "single" and _names_cell(text, scene, lang) != want_cell):
            continue
        return text
    raise DataError(f"no caption template of a {scene.kind} scene fits task {task}")  # pragma: no cover


def expectation(task: str, scene: Scene, text: str, lang: str) -> dict:
    """What an image for prompt `text` (of `scene`, for `task`) must show; see the module docstring."""
    objs = list(scene.objects)
    if task == "counting":
        return {"objects": scene.count, "include": [{"shape": objs[0].shape, "count": scene.count}]}
    if scene.kind == "single":
        entry = {"shape": objs[0].shape, "count": 1}
        if task == "colors":
            entry["colour"] = objs[0].colour
        if task == "position":
            entry["cell"] = objs[0].position
        return {"objects": 1, "include": [entry]}
    # two objects: the prompt may say the pair from the reference's side ("b right of a")
    a, b = objs
    relation = scene.relation
    if text.find(_mention(b, lang)) < text.find(_mention(a, lang)):
        a, b, relation = b, a, INVERSE[relation]
    if task == "two_object":
        if a.shape == b.shape:
            return {"objects": 2, "include": [{"shape": a.shape, "count": 2}]}
        return {"objects": 2, "include": [{"shape": a.shape, "count": 1}, {"shape": b.shape, "count": 1}]}
    with_colour = task == "color_attr" or a.shape == b.shape
    include = [{"shape": o.shape, "count": 1, **({"colour": o.colour} if with_colour else {})} for o in (a, b)]
    if task == "position":
        include[0]["relation"] = [relation, 1]
    return {"objects": 2, "include": include}


def make_prompts(*, per_group: int = DEFAULT_PER_GROUP, seed: int = 0, tasks=TASKS, splits=SPLITS,
                 langs=LANGS) -> list[dict]:
    """`per_group` prompts for every (task, split, lang); the langs of one number share a scene."""
    if per_group < 1:
        raise DataError(f"per_group={per_group}: ask for at least one prompt per task, split and language")
    for name, given, valid in (("task", tasks, TASKS), ("split", splits, SPLITS), ("lang", langs, LANGS)):
        unknown = [v for v in given if v not in valid]
        if unknown:
            raise DataError(f"unknown {name} {unknown[0]!r}; valid: {', '.join(valid)}")
    prompts = []
    for task in tasks:
        for split in splits:
            for number in range(per_group):
                scene = _scene(task, split, number, seed)
                for lang in langs:
                    rng = np.random.default_rng([seed, PROMPT_STREAM, TASKS.index(task), SPLITS.index(split), number,
                                                 LANGS.index(lang)])
                    text = prompt_text(task, scene, lang, rng)
                    prompts.append({"id": f"{task}-{split}-{lang}-{number:03d}", "tag": task, "split": split,
                                    "lang": lang, "prompt": text, "expect": expectation(task, scene, text, lang),
                                    "scene": scene.to_dict()})
    return prompts


def write_prompts(path: str | Path, prompts: list[dict]) -> Path:
    from unclip.io import atomic_write

    with atomic_write(path, "w") as handle:
        for p in prompts:
            handle.write(json.dumps(p, ensure_ascii=False, separators=(",", ":")) + "\n")
    return Path(path)


def _whole(value, least: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _problem(p) -> str:
    """What keeps one prompt-file line from being scored ("" when nothing does): every field scoring,
    the grids and the real renders read, with names the world and the judge know."""
    if not isinstance(p, dict):
        return f"each line must be a JSON object, not {type(p).__name__}"
    if missing := [k for k in ("tag", "split", "lang", "prompt", "expect") if k not in p]:
        return f"lacks {', '.join(missing)}"
    if p["tag"] not in TASKS:
        return f"has unknown tag {p['tag']!r}; valid: {', '.join(TASKS)}"
    if p["lang"] not in LANGS or not isinstance(p["split"], str) or not isinstance(p["prompt"], str):
        return f"lang must be one of {', '.join(LANGS)} (got {p['lang']!r}), split and prompt strings"
    expect = p["expect"]
    if not isinstance(expect, dict) or not _whole(expect.get("objects")) or not isinstance(expect.get("include"), list):
        return "expect needs a whole number 'objects' (1 or more) and an 'include' list"
    include = expect["include"]
    for i, entry in enumerate(include):
        where = f"expect.include[{i}]"
        if not isinstance(entry, dict) or entry.get("shape") not in SHAPES or not _whole(entry.get("count")):
            return f"{where} needs a 'shape' (one of {', '.join(SHAPES)}) and a whole 'count' (1 or more)"
        if "colour" in entry and entry["colour"] not in COLORS:
            return f"{where}: unknown colour {entry['colour']!r}; the world's: {', '.join(COLORS)}"
        if "cell" in entry and entry["cell"] not in POSITIONS:
            return f"{where}: unknown cell {entry['cell']!r}; cells: {', '.join(POSITIONS)}"
        if "relation" in entry:
            relation = entry["relation"]
            if (not isinstance(relation, list) or len(relation) != 2 or relation[0] not in INVERSE
                    or not _whole(relation[1], 0) or relation[1] >= len(include) or relation[1] == i):
                return (f"{where}: relation must be [name, j]: a name of {', '.join(INVERSE)} and the index j of "
                        "another include entry")
    if "scene" in p:
        try:
            scene = Scene.from_dict(p["scene"])
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            return f"its scene cannot be read ({type(err).__name__}: {err}); leave 'scene' out to skip real renders"
        if strange := [o for o in scene.objects if o.shape not in SHAPES or o.colour not in COLORS]:
            return (f"its scene has an object the world cannot draw ({strange[0].colour} {strange[0].shape}); leave "
                    "'scene' out to skip real renders")
    return ""


def read_prompts(path: str | Path | None = None) -> list[dict]:
    """Prompts of a JSONL file (default: the shipped set); each line is checked for the fields scoring needs."""
    path = Path(path) if path is not None else default_prompts_path()
    if path.is_dir():
        raise DataError(f"prompt file {path} is a folder; give the .jsonl file itself")
    if not path.is_file():
        raise DataError(f"prompt file {path} does not exist (write one with `unclip eval prompts --out FILE`)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"prompt file {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            p = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number} is not valid JSON: {err}") from None
        problem = _problem(p)
        if problem:  # said before any image is drawn, not as a KeyError after all of them
            raise DataError(f"{path}:{number}: {problem}")
        p.setdefault("id", f"{p['tag']}-{number:03d}")
        prompts.append(p)
    if not prompts:
        raise DataError(f"prompt file {path} holds no prompts")
    return prompts


def limit(prompts: list[dict], per_group: int) -> list[dict]:
    """The first `per_group` prompts of every (tag, split, lang) group, in file order."""
    seen: dict[tuple, int] = {}
    kept = []
    for p in prompts:
        key = (p["tag"], p["split"], p["lang"])
        seen[key] = seen.get(key, 0) + 1
        if seen[key] <= per_group:
            kept.append(p)
    return kept
