"""How much of the candidates' worth the CLIP pick finds: every candidate judged, not only the kept one.

    .venv/bin/python bench/candidate_oracle.py [--k 6] [--tasks two_object position color_attr] [--objects N]
                                               [--rerank-clip DIR] [--steps S] [--out DIR]

`unclip generate` draws k candidates per image (z_i and decoder image each) and keeps the one whose
CLIP image embedding is closest to the caption's z_t (`Pipeline.best_candidates`, default k=3).
This script generates the shipped prompts of --tasks with K candidates per image, upsamples and
judges *every* candidate, and reports per task, for each k ≤ K (the first k candidates):

- `one`: the mean pass rate of a single candidate (what k=1 scores, in expectation);
- `clip@k`: the pass rate of the candidate CLIP keeps among the first k (what `generate` does);
- `clip128@k`: the same with CLIP reading the upsampled 128² image instead of the 32² one;
- `oracle@k`: the rate at which any of the first k passes (what a perfect picker would score).

- with `--rerank-clip DIR` (a CLIP with the model's own image tower, e.g. a `clip.train_towers=text`
  fine-tune): `rerank@k` / `rerank128@k`, the candidate that CLIP's text tower puts closest.

The gap between clip@k and oracle@k is what a better picker could gain; between oracle@k and
oracle@K, what more candidates could. It writes candidates.json (the prompts in the order drawn,
every candidate's scores and verdict) and embeddings.pt (every candidate's z_i at 32² and 128²,
every prompt's z_t) into --out, so that another text tower's pick can be scored without drawing
again (bench/twin_pick.py). The numbers in docs/model_card.md ("Sampling sweeps") came from this script.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory (default: the shipped model)")
    parser.add_argument("--k", type=int, default=6, help="candidates drawn per image")
    parser.add_argument("--tasks", nargs="+", default=["two_object", "position", "color_attr"],
                        help="GenEval-style tasks of the shipped prompts (default: the three two-object ones)")
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--prompts-per-task", type=int, default=None, help="the first N prompts of each task")
    parser.add_argument("--objects", type=int, default=None,
                        help="only the prompts that ask for this many objects (2: the position task's relations)")
    parser.add_argument("--rerank-clip", default=None,
                        help="a CLIP directory with the model's image tower whose text tower also picks")
    parser.add_argument("--steps", type=int, default=None, help="decoder steps (default: the model's)")
    parser.add_argument("--out", default="out/bench/candidate_oracle", help="output folder")
    args = parser.parse_args()
    from unclip.eval.prompts import TASKS

    if unknown := [t for t in args.tasks if t not in TASKS]:
        parser.error(f"unknown task(s) {', '.join(unknown)}; tasks are {', '.join(TASKS)}")

    import unclip
    from unclip.eval.geneval import verdict
    from unclip.eval.judge import default_judge_dir, load_judge
    from unclip.eval.prompts import default_prompts_path, read_prompts

    torch.set_num_threads(2)
    pipe = unclip.load(args.model) if args.model else unclip.load()
    judge, _ = load_judge(default_judge_dir())
    prompts = [p for p in read_prompts(default_prompts_path()) if p["tag"] in args.tasks
               and args.objects in (None, p["expect"].get("objects"))]
    if args.prompts_per_task:
        prompts = [p for task in args.tasks for p in [q for q in prompts if q["tag"] == task][:args.prompts_per_task]]
    k, n = args.k, args.images_per_prompt
    reranker = None
    if args.rerank_clip:
        from unclip.clip.stage import load_clip

        reranker = load_clip(args.rerank_clip).to(pipe.device).eval()
    scores32: list[torch.Tensor] = []
    z32s: list[torch.Tensor] = []

    def keep_all(images, text_embeds, kk, keep=1):  # record CLIP's scores at 32², keep every candidate
        z = torch.nn.functional.normalize(pipe.encode_image(images.clamp(-1, 1)).float(), dim=-1)
        t = torch.nn.functional.normalize(text_embeds.float().to(z.device), dim=-1)
        scores32.append((z * t).sum(-1).cpu())
        z32s.append(z.cpu())
        return torch.arange(len(images))

    def unit(x):
        return torch.nn.functional.normalize(x.float(), dim=-1).cpu()

    pipe.best_candidates = keep_all
    started = time.time()
    rows = []
    saved = {"z32": [], "z128": [], "z_t": [], "rerank_z_t": []}
    for p_index, prompt in enumerate(prompts):
        images = pipe.generate([prompt["prompt"]], n=n, seed=p_index * n, candidates=k, upsampled_candidates=1,
                               steps=args.steps)  # n·k, image-major; one pick (keep_all), at 32²
        with torch.no_grad():
            z = torch.nn.functional.normalize(pipe.encode_image(images).float(), dim=-1)
            t = torch.nn.functional.normalize(pipe.encode_text([prompt["prompt"]]).embeds.float(), dim=-1)
            s128 = (z * t.to(z.device)).sum(-1).cpu()
            t2 = unit(reranker.encode_captions([prompt["prompt"]])) if reranker is not None else None
        readings, _ = judge.read(images)
        s32, z32 = scores32.pop(), z32s.pop()
        for key, value in (("z32", z32), ("z128", unit(z)), ("z_t", unit(t)), ("rerank_z_t", t2)):
            if value is not None:
                saved[key].append(value)
        for j, reading in enumerate(readings):
            ok, kind, _ = verdict(prompt["expect"], reading)
            row = {"prompt": p_index, "tag": prompt["tag"], "image": j // k, "candidate": j % k,
                   "clip32": float(s32[j]), "clip128": float(s128[j]), "pass": bool(ok), "failure": kind}
            if t2 is not None:
                row["rerank32"], row["rerank128"] = float(z32[j] @ t2[0]), float(unit(z[j]) @ t2[0])
            rows.append(row)
        print(f"{p_index + 1}/{len(prompts)} prompts, {time.time() - started:.0f} s", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(rows, k, args.tasks)
    torch.save({key: torch.cat(v) for key, v in saved.items() if v}, out / "embeddings.pt")
    (out / "candidates.json").write_text(json.dumps({"k": k, "tasks": args.tasks, "summary": summary,
                                                     "prompts": prompts, "candidates": rows}, indent=1))
    for task, by_k in summary.items():
        print(task, json.dumps(by_k))
    print(f"{out / 'candidates.json'}  ({time.time() - started:.0f} s)")
    return 0


def summarise(rows: list[dict], k: int, tasks: list[str]) -> dict:
    """{task or "mean": {"one": rate, "clip@j": …, "clip128@j": …, "oracle@j": …}} for j = 1..k."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["tag"], row["prompt"], row["image"]), []).append(row)
    summary = {}
    for task in tasks:
        images = [sorted(g, key=lambda r: r["candidate"]) for key, g in groups.items() if key[0] == task]
        if not images:
            continue
        rates = {"one": sum(r["pass"] for g in images for r in g) / sum(len(g) for g in images)}
        pickers = {"clip": "clip32", "clip128": "clip128"}
        if "rerank32" in images[0][0]:
            pickers.update(rerank="rerank32", rerank128="rerank128")
        for j in range(1, k + 1):
            first = [g[:j] for g in images]
            for name, score in pickers.items():
                rates[f"{name}@{j}"] = sum(max(g, key=lambda r, s=score: r[s])["pass"] for g in first) / len(first)
            rates[f"oracle@{j}"] = sum(any(r["pass"] for r in g) for g in first) / len(first)
        summary[task] = {key: round(value, 3) for key, value in rates.items()}
    if summary:
        keys = next(iter(summary.values())).keys()
        summary["mean"] = {key: round(sum(s[key] for s in summary.values()) / len(summary), 3) for key in keys}
    return summary


if __name__ == "__main__":
    raise SystemExit(main())
