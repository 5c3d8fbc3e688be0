"""Does the upsampler decide whether a drawing passes? The decoder's images judged after each enlargement.

    .venv/bin/python bench/upsampler_vs_bicubic.py [MODEL] [--tasks two_object position color_attr]

Draws the prompts of --tasks from the shipped prompt file as `unclip eval` does (4 images per
prompt, the same seeds, the model's candidates picked at the decoder's side) but stops at the
decoder's side, then enlarges every image twice — with the model's first upsampler and bicubically
— and lets the judge read both. Prints the pass rate per task for each, and how many images pass
only one way. The numbers in docs/model_card.md ("What the grids show") came from this script.
"""

from __future__ import annotations

import argparse
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default=None, help="model directory (default: the shipped model)")
    parser.add_argument("--tasks", nargs="+", default=["two_object", "position", "color_attr"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    import torch
    from PIL import Image

    torch.set_num_threads(args.threads)
    import unclip
    from unclip.eval.geneval import verdict
    from unclip.eval.judge import default_judge_dir, load_judge
    from unclip.eval.prompts import TASKS, read_prompts

    unknown = sorted(set(args.tasks) - set(TASKS))
    if unknown:
        parser.error(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    pipe = unclip.load(args.model)
    judge, _ = load_judge(default_judge_dir())
    prompts = [p for p in read_prompts() if p["tag"] in args.tasks]
    per_prompt, batch = 4, 4  # unclip eval's defaults: image i of prompt p has seed p·4 + i
    started = time.perf_counter()
    small = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        small += pipe.generate([p["prompt"] for p in chunk], n=per_prompt, seed=start * per_prompt,
                               size=pipe.sizes[0])
    side = pipe.sizes[1]
    enlarged = {"upsampler": [pipe.upscale(image, side, seed=i)[0] for i, image in enumerate(small)],
                "bicubic": [image.resize((side, side), Image.BICUBIC) for image in small]}
    passed = {}
    for name, images in enlarged.items():
        readings, _ = judge.read(images)
        passed[name] = [verdict(prompts[i // per_prompt]["expect"], r)[0] for i, r in enumerate(readings)]
    print(f"{len(small)} decoder images of {', '.join(args.tasks)} at {pipe.sizes[0]}², judged at {side}² "
          f"({time.perf_counter() - started:.0f} s)\n")
    print(f"| enlarged by | all | {' | '.join(args.tasks)} |")
    print(f"|---|---|{'---|' * len(args.tasks)}")
    for name, ok in passed.items():
        by_task = [[v for i, v in enumerate(ok) if prompts[i // per_prompt]["tag"] == t] for t in args.tasks]
        print(f"| {name} | {sum(ok) / len(ok):.3f} | " + " | ".join(f"{sum(v) / len(v):.3f}" for v in by_task) + " |")
    up, bi = passed["upsampler"], passed["bicubic"]
    print(f"\npass both ways {sum(a and b for a, b in zip(up, bi))}, only upsampled "
          f"{sum(a and not b for a, b in zip(up, bi))}, only bicubic {sum(b and not a for a, b in zip(up, bi))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
