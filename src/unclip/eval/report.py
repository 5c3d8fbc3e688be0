"""Write an evaluation: `eval.json` (everything), `report.md` (the tables) and one image grid per task."""

from __future__ import annotations

from pathlib import Path

from unclip.eval.geneval import FAILURES, TASK_ATTRIBUTES, Evaluation
from unclip.eval.judge_train import ATTRIBUTES
from unclip.eval.prompts import TASKS

FAILURE_NAMES = {"count": "number of objects", "content": "a shape or colour missing", "cell": "wrong cell",
                 "relation": "wrong way round"}


def _f(value) -> str:
    return "–" if value is None or value != value else f"{value:.3f}"


def markdown_report(result: dict, *, title: str = "unclip eval") -> str:
    """The scores per task, split and language, each beside the judge's own accuracy, then the
    judge's accuracy table, the Fréchet distance (judge features), diversity and the first failures."""
    splits, langs = list(result["by_split"]), list(result["by_lang"])
    head = ["task", "all", *splits, *langs, "judge accuracy"]
    lines = [f"# {title}", ""]
    meta = result.get("meta", {})
    if meta:
        lines += [" · ".join(f"{k}: `{v}`" for k, v in meta.items()), ""]
    if meta.get("trained_on", "shapes") != "shapes":
        lines += [f"**The model was trained on data.source={meta['trained_on']}.** These prompts and the judge are "
                  "shapes world's: the scores say how it draws shapes-world scenes, which means something only if "
                  "its data held them.", ""]
    lines += [f"{result['prompts']} prompts × {result['images_per_prompt']} images, seed {result['seed']}. "
              "A task's score is the fraction of its images that pass; overall is the unweighted mean of tasks.", "",
              "## GenEval-style scores", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for task in result["tasks"]:
        cells = [result["tasks"][task]] + [result["by_split"][s]["tasks"].get(task) for s in splits] \
            + [result["by_lang"][lg]["tasks"].get(task) for lg in langs] + [result["judge_support"].get(task)]
        lines.append(f"| {task} | " + " | ".join(_f(c) for c in cells) + " |")
    cells = [result["overall"]] + [result["by_split"][s]["overall"] for s in splits] \
        + [result["by_lang"][lg]["overall"] for lg in langs] + [result.get("judge_support_overall")]
    lines.append("| **overall** | " + " | ".join(f"**{_f(c)}**" for c in cells) + " |")
    lines += ["", "Judge accuracy: the judge's lowest accuracy, over held-out `test` and `unseen` renders, on the "
              "attributes the task's verdict rests on (" + "; ".join(f"{t}: {', '.join(a)}"
                                                                     for t, a in TASK_ATTRIBUTES.items()) + ")."]
    why = result.get("failures")
    if why:
        lines += ["", "## Why images fail", "",
                  "Each failing image counted once, by the first unmet part of its prompt.", "",
                  "| task | images failing | " + " | ".join(FAILURE_NAMES[k] for k in FAILURES) + " |",
                  "|---|---|" + "---|" * len(FAILURES)]
        for task, kinds in why.items():
            lines.append(f"| {task} | {sum(kinds.values())} | " + " | ".join(str(kinds[k]) for k in FAILURES) + " |")
    accuracy = result.get("judge_accuracy") or {}
    if accuracy:
        attributes = [a for a in ATTRIBUTES if any(a in s for s in accuracy.values())]
        lines += ["", "## The judge's own accuracy on held-out renders", "",
                  "| split | n | " + " | ".join(attributes) + " |", "|---|---|" + "---|" * len(attributes)]
        for split, acc in accuracy.items():
            lines.append(f"| {split} | {acc.get('n', '')} | " + " | ".join(_f(acc.get(a)) for a in attributes) + " |")
    fd, div = result.get("frechet_judge_features"), result.get("diversity", {})
    lines += ["", "## Fréchet distance (judge features) and diversity", "", "| measure | value |", "|---|---|"]
    if fd:
        lines += [f"| Fréchet distance (judge features), generated vs real renders of the same prompts | "
                  f"{fd['generated_vs_real']:.4g} |",
                  f"| Fréchet distance (judge features), real vs real (floor) | {fd['real_vs_real_floor']:.4g} |",
                  f"| images in each set | {fd.get('images', '')} |"]
    lines += [f"| diversity (mean pairwise judge-feature distance per prompt), generated | {_f(div.get('generated'))} |",
              f"| diversity, real renders | {_f(div.get('real'))} |", "",
              "The Fréchet distance uses the judge's penultimate features, not Inception's: it is not FID, and "
              "only numbers from the same judge compare."]
    if not fd and result.get("prompts_without_scene", 0) < result.get("prompts", 0):
        lines += ["", "One image has no covariance: a Fréchet distance needs two images or more."]
    if missing := result.get("prompts_without_scene"):
        lines += ["", f"{missing} of {result.get('prompts', '?')} prompts have no `scene`, so no real renders: "
                      + ("no Fréchet distance or real diversity can be measured." if not fd else
                         "they are left out of the Fréchet distance and of both diversities.")]
    if div.get("generated") is None:
        lines += ["", "With one image per prompt there is no diversity to measure (--images-per-prompt 2 or more)."]
    if fd and fd.get("images", 0) < fd.get("feature_dim", 0):
        lines += ["", f"With {fd['images']} images in {fd['feature_dim']} feature dimensions the covariances are "
                      "estimated from too few samples: both distances are inflated and the floor can even exceed "
                      "the generated one. Compare Fréchet distances only between runs of one size, ideally of "
                      f"{fd['feature_dim']} images or more (the whole shipped prompt set makes 384)."]
    failures = [r for r in result["records"] if not r["pass"]]
    if failures:
        lines += ["", f"## Failures ({len(failures)} images; the first 30)", "", "| task | split | lang | prompt | judge says |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['tag']} | {r['split']} | {r['lang']} | {r['prompt']} | {r['reason']} |" for r in failures[:30]]
    return "\n".join(lines) + "\n"


def write_evaluation(evaluation: Evaluation, out: str | Path, *, title: str = "unclip eval",
                     grid_prompts: int = 8, keep_images: bool = False) -> dict[str, Path]:
    """grid_<task>.png (the first `grid_prompts` prompts of each task), with `keep_images` every
    image as images/NNN.png, then report.md and eval.json, in `out`. An earlier run's report.md and
    eval.json go first, so a run stopped while writing leaves no numbers beside another run's images."""
    from unclip.data.preview import captioned_grid
    from unclip.io import atomic_write, save_image_atomic, write_json_atomic

    out = Path(out)
    result = evaluation.result
    for summary in ("eval.json", "report.md"):
        (out / summary).unlink(missing_ok=True)
    for stale in (out / "images").glob("*.png"):  # an earlier run's: read again by index, they would mislead
        if stale.stem.isdigit():
            stale.unlink()
    if keep_images:
        for i, image in enumerate(evaluation.images):
            save_image_atomic(out / "images" / f"{i:03d}.png", image)
    paths = {}
    n = result["images_per_prompt"]
    for task in TASKS:
        rows = [i for i, r in enumerate(result["records"]) if r["tag"] == task][: grid_prompts * n]
        if not rows or not evaluation.images:
            continue
        captions = [[(result["records"][i]["lang"], result["records"][i]["prompt"]),
                     ("en", "PASS" if result["records"][i]["pass"] else f"fail: {result['records'][i]['reason']}")]
                    for i in rows]
        images = [evaluation.images[i].resize((96, 96)) if evaluation.images[i].width < 96 else evaluation.images[i]
                  for i in rows]
        paths[f"grid_{task}"] = save_image_atomic(out / f"grid_{task}.png",
                                                  captioned_grid(images, captions, columns=max(n, 4)))
    for task in TASKS:  # an earlier run's grid of a task this run did not score
        if f"grid_{task}" not in paths:
            (out / f"grid_{task}.png").unlink(missing_ok=True)
    with atomic_write(out / "report.md", "w") as handle:
        handle.write(markdown_report(result, title=title))
    paths["markdown"] = out / "report.md"
    paths["json"] = write_json_atomic(out / "eval.json", result)
    return paths
