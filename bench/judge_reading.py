"""The judge's two readings of one model's generated images, against a count that uses no network.

    .venv/bin/python bench/judge_reading.py [MODEL] [--images DIR] [--sheet PNG] [--threads 2]

Generates the images of the shipped prompt set as `unclip eval MODEL` does (same seeds; default
sampling) into --images (default out/judge_reading/<model name>-<hash of its path>; an existing folder of
NNN.png images is read instead of regenerated), then reads each one with the shipped judge twice:
by place (`unclip.eval.judge.read_objects`, what `unclip eval` uses) and class by class (each class
map's mass rounded on its own, the reading until session 8). For each task it prints both scores,
how many verdicts changed, and how often each reading's number of objects equals the number of
connected components of non-background pixels. --sheet draws the images whose verdict changed,
with both readings. The numbers in docs/eval.md ("The judge").
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import torch


def by_class(out: dict) -> list[dict]:
    """The class-by-class reading: each class's mass rounded; centres from the whole map."""
    from unclip.data.world import cell_of
    from unclip.eval.judge import CLASSES, MAX_COUNT, SIZE_NAMES

    counts = out["count"].round().clamp(0, MAX_COUNT).long()
    readings = []
    for b in range(len(counts)):
        objects = []
        for k in counts[b].nonzero().flatten().tolist():
            n, (colour, shape) = int(counts[b, k]), CLASSES[k]
            cx, cy = (float(v) for v in out["centre"][b, k])
            for _ in range(n):
                obj = {"colour": colour, "shape": shape, "size": SIZE_NAMES[int(out["size"][b, k].argmax())]}
                objects.append(obj | ({"cx": cx, "cy": cy, "cell": cell_of(cx, cy)} if n == 1 else {}))
        readings.append({"objects": objects})
    return readings


def pixel_objects(image, min_area: int = 30) -> int:
    """Connected components (8-neighbour) of pixels farther than 0.2 from the border's median colour."""
    from scipy import ndimage

    a = np.asarray(image.convert("RGB")).astype(np.float32) / 255
    background = np.median(np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]]), axis=0)
    labels, n = ndimage.label(np.abs(a - background).max(-1) > 0.2, structure=np.ones((3, 3)))
    return int((np.asarray(ndimage.sum(labels > 0, labels, range(1, n + 1))) >= min_area).sum())


def generate(model: Path, prompts: list[dict], folder: Path, n: int = 4, batch: int = 4) -> None:
    import unclip
    from tqdm.auto import tqdm

    pipe = unclip.load(model)
    folder.mkdir(parents=True, exist_ok=True)
    for start in tqdm(range(0, len(prompts), batch), desc="generate"):
        images = pipe.generate([p["prompt"] for p in prompts[start:start + batch]], n=n, seed=start * n)
        for j, image in enumerate(images):
            image.save(folder / f"{start * n + j:03d}.png")


def sheet(rows: list[dict], folder: Path, path: Path) -> None:
    from PIL import Image, ImageDraw, ImageFont

    from unclip.pipeline import default_model_dir

    fonts = default_model_dir().parent / "fonts"
    font = ImageFont.truetype(str(fonts / "NotoSans-Latin.ttf"), 11)
    thai = ImageFont.truetype(str(fonts / "NotoSansThai-Regular.ttf"), 11)
    width, height, cols = 400, 192, 3
    page = Image.new("RGB", (cols * width, max(1, -(-len(rows) // cols)) * height), "white")
    draw = ImageDraw.Draw(page)
    for j, r in enumerate(rows):
        x, y = (j % cols) * width, (j // cols) * height
        page.paste(Image.open(folder / f"{r['i']:03d}.png").convert("RGB").resize((128, 128)), (x, y))
        said = {k: ", ".join(f"{o['colour']} {o['shape']}" for o in r[k]["objects"]) or "nothing"
                for k in ("by_place", "by_class")}
        draw.multiline_text((x + 132, y + 4), f"{r['tag']}\npixels: {r['pixels']} objects\nclass by class: "
                            f"{said['by_class']}\nby place: {said['by_place']}\n"
                            f"{'PASS' if r['place_pass'] else 'fail'} (was {'PASS' if r['class_pass'] else 'fail'})",
                            fill="black", font=font, spacing=2)
        is_thai = any("\u0e00" <= ch <= "\u0e7f" for ch in r["prompt"])
        draw.text((x + 2, y + 130), r["prompt"][:60], fill="navy", font=thai if is_thai else font)
    page.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="model directory (default: the shipped model)")
    parser.add_argument("--images", help="folder of generated images (default: out/judge_reading/<model name>-<hash of its path>)")
    parser.add_argument("--sheet", help="draw the images whose verdict changed into this PNG")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from PIL import Image

    from unclip.eval.geneval import check
    from unclip.eval.judge import decode, default_judge_dir, load_judge, to_batch
    from unclip.eval.prompts import read_prompts
    from unclip.pipeline import default_model_dir

    model = Path(args.model) if args.model else default_model_dir()
    # one folder per model path: every assembled model is a folder called "model"
    where = hashlib.sha1(str(model.resolve()).encode()).hexdigest()[:8]
    folder = Path(args.images or Path("out/judge_reading") / f"{model.resolve().name}-{where}")
    prompts = read_prompts()
    if not (folder / f"{len(prompts) * 4 - 1:03d}.png").is_file():
        generate(model, prompts, folder)
    images = [Image.open(folder / f"{i:03d}.png") for i in range(len(prompts) * 4)]
    judge, _ = load_judge(default_judge_dir())
    place, klass = [], []
    with torch.no_grad():
        for start in range(0, len(images), 64):
            out = judge(to_batch(images[start:start + 64]))
            place += decode(out)
            klass += by_class(out)
    rows = []
    for i, image in enumerate(images):
        p = prompts[i // 4]
        rows.append({"i": i, "tag": p["tag"], "prompt": p["prompt"], "pixels": pixel_objects(image),
                     "place_pass": check(p["expect"], place[i])[0], "class_pass": check(p["expect"], klass[i])[0],
                     "by_place": place[i], "by_class": klass[i]})
    tasks = list(dict.fromkeys(r["tag"] for r in rows))
    print("| task | class by class | by place | verdicts changed (fail → pass / pass → fail) "
          "| objects = pixel components: class by class / by place |\n|---|---|---|---|---|")
    for task in tasks + ["overall"]:
        rs = [r for r in rows if task in ("overall", r["tag"])]

        def score(key, rs=rs, task=task):  # overall: the unweighted mean over tasks, as `unclip eval`
            if task != "overall":
                return np.mean([r[key] for r in rs])
            return np.mean([np.mean([r[key] for r in rows if r["tag"] == t]) for t in tasks])

        up = sum(r["place_pass"] and not r["class_pass"] for r in rs)
        down = sum(r["class_pass"] and not r["place_pass"] for r in rs)
        agree = [np.mean([len(r[k]["objects"]) == r["pixels"] for r in rs]) for k in ("by_class", "by_place")]
        print(f"| {task} | {score('class_pass'):.3f} | {score('place_pass'):.3f} | {up} / {down} "
              f"| {agree[0]:.3f} / {agree[1]:.3f} |")
    (folder / "readings.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    if args.sheet:
        sheet([r for r in rows if r["place_pass"] != r["class_pass"]], folder, Path(args.sheet))
        print(f"sheet: {args.sheet}")


if __name__ == "__main__":
    main()
