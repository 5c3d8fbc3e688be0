"""GenEval-style scoring (DESIGN §6), Fréchet distance in the judge's feature space, diversity.

`evaluate(pipe, judge, prompts)` generates `images_per_prompt` images per prompt, lets the frozen
judge read each one, and passes or fails it against the prompt's `expect` (`check`). A task's
score is the mean over its images; overall is the unweighted mean of the tasks; both again per
split (seen/unseen) and per language.

Beside the scores:
- Fréchet distance (judge features): ‖μ_g − μ_r‖² + Tr(Σ_g + Σ_r − 2(Σ_g Σ_r)^½) between the
  judge's penultimate features of the generated images and of real renders of the same prompts,
  with the real-vs-real floor (two independent sets of real renders). It is not FID: the
  features are the judge's, not Inception's, so only numbers from the same judge compare.
- diversity: mean pairwise L2 distance of the judge features of one prompt's images, averaged
  over prompts, for the generated images and for real renders.

A real render of a prompt is a fresh world scene of the same layout (kind, relation, count, and
cell where the task names one) carrying the prompt's colour–shape bindings; sizes and jitter are
redrawn, so the real set varies the way the prompt allows.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from unclip.data.world import Scene, plural, sample_scene
from unclip.eval.judge import Judge, relation_of
from unclip.eval.prompts import TASKS

# the judge attributes each task's verdict rests on (reported beside the task's score)
TASK_ATTRIBUTES = {"single_object": ("objects", "shape"), "two_object": ("objects", "shape"),
                   "counting": ("count", "shape"), "colors": ("objects", "colour_shape"),
                   "position": ("shape", "cell", "relation"), "color_attr": ("objects", "colour_shape")}


# --- pass / fail -------------------------------------------------------------------------------


def _describe(entry: dict, count: int = 1) -> str:
    """"red circle", or with a count other than one "red circles"."""
    return " ".join(filter(None, (entry.get("colour"), entry["shape"] if count == 1 else plural(entry["shape"]))))


# Why an image fails, by the first unmet part of its prompt: the number of objects, the objects'
# shapes (and colours, where the task asks), a lone object's cell, or two objects' relation.
FAILURES = ("count", "content", "cell", "relation")


def verdict(expect: dict, reading: dict) -> tuple[bool, str | None, str]:
    """(passes, the FAILURES kind or None, why) for a reading (`Judge.read`) against an expectation.

    Exactly `objects` objects; per include entry exactly `count` of its shape (and colour); its
    `cell`; its `relation` [name, j] to entry j's object, from the two read centres.
    """
    objects = reading["objects"]
    if len(objects) != expect["objects"]:
        return False, "count", f"{len(objects)} object(s), expected {expect['objects']}"
    matched = []
    for entry in expect["include"]:
        found = [o for o in objects if o["shape"] == entry["shape"]
                 and ("colour" not in entry or o["colour"] == entry["colour"])]
        if len(found) != entry["count"]:
            return False, "content", f"{len(found)} {_describe(entry, len(found))}, expected {entry['count']}"
        matched.append(found)
    for entry, found in zip(expect["include"], matched):
        if "cell" in entry and found[0].get("cell") != entry["cell"]:
            return False, "cell", f"{_describe(entry)} at {found[0].get('cell', '?')}, expected {entry['cell']}"
        if "relation" in entry:
            relation, j = entry["relation"]
            a, b = found[0], matched[j][0]
            if "cx" not in a or "cx" not in b:
                return False, "relation", "cannot place the objects"
            actual = relation_of(a, b)
            if actual != relation:
                return False, "relation", (f"{_describe(entry)} {actual} {_describe(expect['include'][j])}, "
                                           f"expected {relation}")
    return True, None, "pass"


def check(expect: dict, reading: dict) -> tuple[bool, str]:
    """(passes, why): `verdict` without the kind."""
    ok, _, reason = verdict(expect, reading)
    return ok, reason


def scene_reading(scene: Scene) -> dict:
    """The reading a perfect judge gives of a real scene (same form as `Judge.read`)."""
    from collections import Counter

    from unclip.data.world import cell_of

    counts = Counter((o.colour, o.shape) for o in scene.objects)
    objects = []
    for o in scene.objects:
        obj = {"colour": o.colour, "shape": o.shape, "size": o.size}
        if counts[(o.colour, o.shape)] == 1:
            obj |= {"cx": o.cx, "cy": o.cy, "cell": cell_of(o.cx, o.cy)}
        objects.append(obj)
    return {"objects": objects}


def summarise(records: Sequence[dict]) -> dict:
    """Task scores (mean pass over images), overall (unweighted mean of tasks), per split and lang.

    records: one per image with "tag", "split", "lang", "pass" and "failure" (a FAILURES kind or
    None); "failures" counts, per task, the images failing for each kind.
    """
    def scores(rows: Sequence[dict]) -> dict:
        tasks = {t: float(np.mean([r["pass"] for r in rows if r["tag"] == t]))
                 for t in TASKS if any(r["tag"] == t for r in rows)}
        return {"tasks": tasks, "overall": float(np.mean(list(tasks.values()))) if tasks else float("nan"),
                "images": len(rows)}

    result = scores(records)
    for key, name in (("split", "by_split"), ("lang", "by_lang")):
        values = sorted({r[key] for r in records})
        result[name] = {v: scores([r for r in records if r[key] == v]) for v in values}
    result["failures"] = {t: {kind: sum(r["tag"] == t and r.get("failure") == kind for r in records)
                              for kind in FAILURES} for t in result["tasks"]}
    return result


def judge_support(accuracy: dict[str, dict[str, float]], attributes: Sequence[str]) -> float | None:
    """The judge's worst accuracy, over held-out splits, on the attributes a score rests on."""
    if any(all(a not in split for split in accuracy.values()) for a in attributes):
        return None  # an attribute the judge was never measured on: unknown, not the others' minimum
    values = [split[a] for split in accuracy.values() for a in attributes if a in split]
    return min(values) if values else None


# --- Fréchet distance and diversity ------------------------------------------------------------


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean [F] and covariance [F, F] (unbiased) of features [N, F], in float64."""
    x = np.asarray(features, dtype=np.float64)
    return x.mean(0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def frechet_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    """‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2(Σ1 Σ2)^½), with Tr (Σ1 Σ2)^½ = Σ √eig(Σ1^½ Σ2 Σ1^½), exact for PSD Σ."""
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # Σ1^½
    middle = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    cross = np.sqrt(np.clip(middle, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * cross)


def frechet_distance(a, b) -> float:
    """Fréchet distance between two feature sets [N, F] and [M, F] (gaussians fitted to each)."""
    return max(0.0, frechet_from_stats(*feature_stats(a), *feature_stats(b)))


def diversity(features, groups: Sequence[int]) -> float | None:
    """Mean pairwise L2 distance of the features [N, F] within each group, averaged over groups."""
    x = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    groups = list(groups)
    means = []
    for g in dict.fromkeys(groups):
        rows = x[[i for i, h in enumerate(groups) if h == g]]
        if len(rows) > 1:
            d = torch.cdist(rows, rows)
            means.append(float(d.sum() / (len(rows) * (len(rows) - 1))))
    return float(np.mean(means)) if means else None  # one image per group: no distance to average (JSON has no NaN)


# --- real renders of a prompt ------------------------------------------------------------------


def realise(prompt: dict, rng: np.random.Generator) -> Scene | None:
    """A fresh world scene that the prompt describes (module docstring), or None without a scene."""
    if "scene" not in prompt:
        return None
    target = Scene.from_dict(prompt["scene"])
    while True:
        s = sample_scene(rng, "train")
        if s.kind != target.kind or s.relation != target.relation or s.count != target.count:
            continue
        if s.kind == "single" and prompt["tag"] == "position" and s.objects[0].position != target.objects[0].position:
            continue
        bindings = itertools.cycle(target.objects)
        objects = tuple(dataclasses.replace(o, colour=t.colour, shape=t.shape) for o, t in zip(s.objects, bindings))
        return Scene(kind=s.kind, objects=objects, relation=s.relation, count=s.count)


def real_renders(prompts: Sequence[dict], per_prompt: int, size: int, *, seed: int) -> tuple[list, list[int]]:
    """`per_prompt` real renders (side `size`) of every prompt with a scene, and their prompt numbers."""
    from unclip.data.render import render

    images, groups = [], []
    for number, prompt in enumerate(prompts):
        rng = np.random.default_rng([seed, 99, number])
        for _ in range(per_prompt):
            scene = realise(prompt, rng)
            if scene is None:
                break
            images.append(render(scene, size))
            groups.append(number)
    return images, groups


# --- the evaluation ----------------------------------------------------------------------------


@dataclass
class Evaluation:
    """`result`: everything as JSON-ready data; `images`: the generated PIL images, one per record."""

    result: dict
    images: list = field(default_factory=list)


def _read_drawn(folder: Path, first: int, count: int) -> list | None:
    """Images `first` .. `first + count - 1` (NNNNN.png) from `folder`, or None unless all are there whole."""
    from PIL import Image

    images = []
    for i in range(first, first + count):
        try:
            with Image.open(folder / f"{i:05d}.png") as image:
                images.append(image.convert("RGB"))
        except (OSError, ValueError):
            return None
    return images


def evaluate(pipe, judge: Judge, prompts: Sequence[dict], images_per_prompt: int = 4, seed: int = 0, *,
             judge_accuracy: dict | None = None, batch_prompts: int = 4, progress: bool = True,
             generate_options: dict | None = None, callback: Callable | None = None,
             drawn: Path | None = None) -> Evaluation:
    """Generate, judge and score (module docstring).

    pipe: anything with `generate(prompts, n, seed=...)` returning n PIL images per prompt; image
    i of prompt p uses seed `seed + p·images_per_prompt + i`, so a prompt's images do not depend
    on `batch_prompts`. judge_accuracy: the judge's own accuracy per split and attribute (from
    its directory), reported beside every score. drawn: a folder that keeps each batch's images
    (NNNNN.png, written atomically) as they are drawn, and whose whole batches are read instead of
    drawn again, so a stopped run resumes; it must hold only images of these settings (`unclip
    eval` keys it to them).
    """
    from tqdm.auto import tqdm

    from unclip.io import save_image_atomic

    prompts = list(prompts)
    n = images_per_prompt
    images = []
    bar = tqdm(total=len(prompts) * n, desc="generate", unit="image", disable=not progress)
    for start in range(0, len(prompts), batch_prompts):
        chunk = prompts[start:start + batch_prompts]
        batch = _read_drawn(drawn, start * n, len(chunk) * n) if drawn is not None else None
        if batch is None:
            batch = pipe.generate([p["prompt"] for p in chunk], n=n, seed=seed + start * n, callback=callback,
                                  **(generate_options or {}))
            if drawn is not None:
                for i, image in enumerate(batch, start=start * n):
                    save_image_atomic(drawn / f"{i:05d}.png", image)
        images += batch
        bar.update(len(chunk) * n)
    bar.close()
    readings, features = judge.read(images)
    records = []
    for i, (reading, image) in enumerate(zip(readings, images)):
        p = prompts[i // n]
        ok, kind, reason = verdict(p["expect"], reading)
        records.append({"id": p.get("id"), "tag": p["tag"], "split": p["split"], "lang": p["lang"],
                        "prompt": p["prompt"], "seed": seed + i, "pass": ok, "failure": kind, "reason": reason,
                        "reading": reading})
    result = summarise(records)
    accuracy = judge_accuracy or {}
    result["judge_accuracy"] = accuracy
    result["judge_support"] = {t: judge_support(accuracy, TASK_ATTRIBUTES[t]) for t in result["tasks"]}
    result["judge_support_overall"] = judge_support(
        accuracy, sorted({a for t in result["tasks"] for a in TASK_ATTRIBUTES[t]}))
    side = images[0].width
    real_a, groups_a = real_renders(prompts, n, side, seed=seed + 1)
    real_b, _ = real_renders(prompts, n, side, seed=seed + 2)
    with_scene = set(groups_a)
    feats_a = judge.read(real_a)[1] if real_a else None
    if len(real_a) > 1:  # a covariance needs two images (one image and prompt crashed below, feats_a unset)
        feats_b = judge.read(real_b)[1]
        generated = features[[i for i in range(len(images)) if i // n in with_scene]]
        result["frechet_judge_features"] = {
            "generated_vs_real": frechet_distance(generated, feats_a),
            "real_vs_real_floor": frechet_distance(feats_b, feats_a),
            "images": len(generated), "feature_dim": int(features.shape[1]),
            "note": "Fréchet distance in the judge's penultimate feature space (not FID)"}
    # over the prompts with real renders when there are any, so that the two numbers compare
    judged = [i for i in range(len(images)) if not real_a or i // n in with_scene]
    result["diversity"] = {"generated": diversity(features[judged], [i // n for i in judged]),
                           "real": diversity(feats_a, groups_a) if real_a else None,
                           "prompts": len({i // n for i in judged}),
                           "note": "mean pairwise L2 distance of judge features among one prompt's images"}
    result["prompts_without_scene"] = len(prompts) - len(with_scene)
    result.update({"images_per_prompt": n, "prompts": len(prompts), "seed": seed, "records": records})
    return Evaluation(result=result, images=images)
