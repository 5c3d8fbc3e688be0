"""The shipped model with its candidates kept by another CLIP (docs/model_card.md).

    .venv/bin/python bench/rerank_candidates.py RANKER_CLIP_DIR|none K OUT_DIR [TASK ...]

Generates the shipped prompt set (or only TASKs) with K candidates per image, keeps the one the
RANKER CLIP puts closest to the caption (`none`: the model's own CLIP, the default sampling) and
judges them as `unclip eval` does; prints the task scores and writes eval.json and report.md into
OUT_DIR. Seeds depend on prompt position, so compare runs over the same tasks only.
"""
import json, sys, time
from pathlib import Path
import torch
import unclip
from unclip.clip.stage import load_clip
from unclip.eval.geneval import evaluate
from unclip.eval.judge import default_judge_dir, load_judge
from unclip.eval.prompts import default_prompts_path, read_prompts
from unclip.eval.report import write_evaluation

torch.set_num_threads(2)
if len(sys.argv) < 4 or sys.argv[1] in ("-h", "--help"):
    print(__doc__)
    raise SystemExit(0 if sys.argv[1:2] in (["-h"], ["--help"]) else 2)
ranker_dir, k, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
tasks = sys.argv[4:]
from unclip.eval.prompts import TASKS  # noqa: E402 - after the usage check, which needs no torch

if unknown := [t for t in tasks if t not in TASKS]:
    sys.exit(f"unknown task(s) {', '.join(unknown)}; tasks are {', '.join(TASKS)}")
pipe = unclip.load()
if ranker_dir != "none":
    ranker = load_clip(ranker_dir).eval()
    seen = {}
    encode_text = pipe.encode_text

    def recording(prompts, *a, **kw):
        seen["rows"] = list(prompts) if not isinstance(prompts, str) else [prompts]
        return encode_text(prompts, *a, **kw)

    pipe.encode_text = recording

    @torch.no_grad()
    def best(images, text_embeds, kk, keep=1):  # the model's default: one kept, picked at the decoder's size
        z = ranker.encode_image(pipe.pixels(images.clamp(-1, 1), ranker.config.image_size).cpu())
        t = ranker.encode_captions(seen["rows"])
        z, t = (torch.nn.functional.normalize(x.float(), dim=-1) for x in (z, t))
        scores = (z * t).sum(-1).view(-1, kk)
        return scores.argmax(dim=1).cpu() + torch.arange(len(scores)) * kk

    pipe.best_candidates = best
judge, accuracy = load_judge(default_judge_dir())
prompts = read_prompts(default_prompts_path())
if tasks:
    prompts = [p for p in prompts if p["tag"] in tasks]
t0 = time.time()
ev = evaluate(pipe, judge, prompts, 4, 0, judge_accuracy=accuracy, batch_prompts=4, progress=False,
              generate_options={"candidates": k, **({"upsampled_candidates": 1} if ranker_dir != "none" else {})})
ev.result["meta"] = {"ranker": ranker_dir, "candidates": k, "tasks": tasks or "all"}
write_evaluation(ev, out, title=f"rerank {ranker_dir} k={k}")
r = ev.result
scores = {"overall": round(r["overall"], 3), **{t: round(v, 3) for t, v in r["tasks"].items()}}
print(json.dumps(scores), f"{time.time() - t0:.0f}s")
