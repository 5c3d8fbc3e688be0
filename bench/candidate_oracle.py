"""How much of the candidates' worth the CLIP pick finds: every candidate judged, not only the kept one.

    .venv/bin/python bench/candidate_oracle.py [--k 6] [--tasks two_object position color_attr] [--out DIR]

`unclip generate` draws k candidates per image (z_i and decoder image each) and keeps the one whose
CLIP image embedding is closest to the caption's z_t (`Pipeline.best_candidates`, default k=3).
This script generates the shipped prompts of --tasks with K candidates per image, upsamples and
judges *every* candidate, and reports per task, for each k ≤ K (the first k candidates):

- `one`: the mean pass rate of a single candidate (what k=1 scores, in expectation);
- `clip@k`: the pass rate of the candidate CLIP keeps among the first k (what `generate` does);
- `clip128@k`: the same with CLIP reading the upsampled 128² image instead of the 32² one;
- `oracle@k`: the rate at which any of the first k passes (what a perfect picker would score).

The gap between clip@k and oracle@k is what a better picker could gain; between oracle@k and
oracle@K, what more candidates could. It writes candidates.json (every candidate's scores and
verdict) into --out. The numbers in docs/model_card.md ("Sampling sweeps") came from this script.
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
    parser.add_argument("--tasks", nargs="+", default=["two_object", "position", "color_attr"])
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--prompts-per-task", type=int, default=None, help="the first N prompts of each task")
    parser.add_argument("--out", default="out/bench/candidate_oracle", help="output folder")
    args = parser.parse_args()

    import unclip
    from unclip.eval.geneval import verdict
    from unclip.eval.judge import default_judge_dir, load_judge
    from unclip.eval.prompts import default_prompts_path, read_prompts

    torch.set_num_threads(2)
    pipe = unclip.load(args.model) if args.model else unclip.load()
    judge, _ = load_judge(default_judge_dir())
    prompts = [p for p in read_prompts(default_prompts_path()) if p["tag"] in args.tasks]
    if args.prompts_per_task:
        prompts = [p for task in args.tasks for p in [q for q in prompts if q["tag"] == task][:args.prompts_per_task]]
    k, n = args.k, args.images_per_prompt
    scores32: list[torch.Tensor] = []

    def keep_all(images, text_embeds, kk, keep=1):  # record CLIP's scores at 32², keep every candidate
        z = torch.nn.functional.normalize(pipe.encode_image(images.clamp(-1, 1)).float(), dim=-1)
        t = torch.nn.functional.normalize(text_embeds.float().to(z.device), dim=-1)
        scores32.append((z * t).sum(-1).cpu())
        return torch.arange(len(images))

    pipe.best_candidates = keep_all
    started = time.time()
    rows = []
    for p_index, prompt in enumerate(prompts):
        images = pipe.generate([prompt["prompt"]], n=n, seed=p_index * n, candidates=k)  # n·k, image-major
        with torch.no_grad():
            z = torch.nn.functional.normalize(pipe.encode_image(images).float(), dim=-1)
            t = torch.nn.functional.normalize(pipe.encode_text([prompt["prompt"]]).embeds.float(), dim=-1)
            s128 = (z * t.to(z.device)).sum(-1).cpu()
        readings, _ = judge.read(images)
        s32 = scores32.pop()
        for j, reading in enumerate(readings):
            ok, kind, _ = verdict(prompt["expect"], reading)
            rows.append({"prompt": p_index, "tag": prompt["tag"], "image": j // k, "candidate": j % k,
                         "clip32": float(s32[j]), "clip128": float(s128[j]), "pass": bool(ok), "failure": kind})
        print(f"{p_index + 1}/{len(prompts)} prompts, {time.time() - started:.0f} s", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(rows, k, args.tasks)
    (out / "candidates.json").write_text(json.dumps({"k": k, "tasks": args.tasks, "summary": summary,
                                                     "candidates": rows}, indent=1))
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
        for j in range(1, k + 1):
            first = [g[:j] for g in images]
            rates[f"clip@{j}"] = sum(max(g, key=lambda r: r["clip32"])["pass"] for g in first) / len(first)
            rates[f"clip128@{j}"] = sum(max(g, key=lambda r: r["clip128"])["pass"] for g in first) / len(first)
            rates[f"oracle@{j}"] = sum(any(r["pass"] for r in g) for g in first) / len(first)
        summary[task] = {key: round(value, 3) for key, value in rates.items()}
    if summary:
        keys = next(iter(summary.values())).keys()
        summary["mean"] = {key: round(sum(s[key] for s in summary.values()) / len(summary), 3) for key in keys}
    return summary


if __name__ == "__main__":
    raise SystemExit(main())
