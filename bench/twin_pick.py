"""Would CLIP pick better by contrast with the prompt's binding twins? Scored offline, no drawing.

    .venv/bin/python bench/twin_pick.py [DIR ...]      # default: out/bench/candidate_oracle

Reads what `bench/candidate_oracle.py` wrote into DIR (every candidate's judged verdict, its CLIP
z_i at 32² and 128², each prompt's z_t) and re-picks the candidates with

    score = cos(z_i, z_t) − λ · max over twins cos(z_i, z_twin)

where the twins of a two-object prompt are the same words with its two shapes swapped, its two
colours swapped, its relation turned round, or one shape written twice ("a cyan star over an
orange triangle" → "a cyan triangle over an orange star", "… an orange cyan …", "… under …",
"a cyan star over an orange star", "a cyan triangle over an orange triangle"): the drawings the
decoder makes when it fails. One-object and counting prompts have no twins and keep CLIP's pick.
The twins are written from each prompt's scene in the prompt file, so this is the best such a
picker could do; λ = 0 is the default picker. It prints, per task and for the first k candidates,
the judged pass rate of the kept candidate. The model's CLIP text tower encodes the twins (the
shipped model unless --model).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F


def substitute(text: str, mapping: dict[str, str]) -> str:
    """Replace every key of `mapping` at once (longest first), so a swap does not undo itself."""
    keys = sorted(mapping, key=len, reverse=True)
    for i, key in enumerate(keys):
        text = text.replace(key, f"\0{i}\0")
    for i, key in enumerate(keys):
        text = text.replace(f"\0{i}\0", mapping[key])
    return text


def twins(prompt: dict) -> list[str]:
    """The prompt's text with its binding undone in each way the decoder fails (none for one object)."""
    from unclip.data.world import COLORS, INVERSE, RELATION_EN, RELATION_TH, SHAPES

    scene, text, thai = prompt["scene"], prompt["prompt"], prompt["lang"] == "th"
    if scene["kind"] != "pair":
        return []
    a, b = scene["objects"]
    shape = (lambda s: SHAPES[s][0]) if thai else (lambda s: s)
    colour = (lambda c: "สี" + COLORS[c].th) if thai else (lambda c: " " + c)
    sa, sb, ca, cb = shape(a["shape"]), shape(b["shape"]), colour(a["colour"]), colour(b["colour"])
    out = []
    if sa != sb:
        out += [substitute(text, {sa: sb, sb: sa}), substitute(text, {sb: sa}), substitute(text, {sa: sb})]
    if ca != cb:
        out.append(substitute(text, {ca: cb, cb: ca}))
    phrases = RELATION_TH if thai else RELATION_EN
    for i, phrase in enumerate(phrases[scene["relation"]]):
        if phrase in text:
            turned = phrases[INVERSE[scene["relation"]]]
            out.append(text.replace(phrase, turned[min(i, len(turned) - 1)]))
            break
    return [t for t in dict.fromkeys(out) if t != text]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="*", default=["out/bench/candidate_oracle"],
                        help="candidate_oracle.py output folders")
    parser.add_argument("--model", default=None, help="model whose CLIP encodes the twins (default: the shipped one)")
    parser.add_argument("--lams", type=float, nargs="+", default=[0.0, 0.3, 1.0], help="λ values to score")
    args = parser.parse_args()

    import unclip
    from unclip.eval.prompts import default_prompts_path, read_prompts

    torch.set_num_threads(2)
    pipe = unclip.load(args.model) if args.model else unclip.load()
    for folder in map(Path, args.dirs):
        found = json.loads((folder / "candidates.json").read_text())
        saved = torch.load(folder / "embeddings.pt")
        tasks, k_max = found["tasks"], found["k"]
        # the prompts as drawn (files from before they were saved: all of the tasks' prompts, in file order)
        prompts = found.get("prompts") or [p for p in read_prompts(default_prompts_path()) if p["tag"] in tasks]
        passed = torch.tensor([c["pass"] for c in found["candidates"]]).view(len(prompts), -1, k_max)  # [P, n, K]
        z_t = F.normalize(saved["z_t"].float(), dim=-1)  # [P, D]
        with torch.no_grad():
            z_twins = [F.normalize(pipe.encode_text(t).embeds.float(), dim=-1) if (t := twins(p)) else None
                       for p in prompts]
        print(f"{folder}: {len(prompts)} prompts × {passed.shape[1]} images × {k_max} candidates; "
              f"pass rate of the kept candidate, {' / '.join(tasks)} | mean")
        for side in ("z32", "z128"):
            z = F.normalize(saved[side].float(), dim=-1).view(*passed.shape, -1)  # [P, n, K, D]
            for lam in args.lams:
                scores = torch.stack([z[i] @ z_t[i] - (lam * (z[i] @ tw.T).amax(-1) if tw is not None else 0)
                                      for i, tw in enumerate(z_twins)])  # [P, n, K]
                cells = []
                for k in sorted({3, k_max} & set(range(1, k_max + 1))):
                    kept = passed[..., :k].gather(-1, scores[..., :k].argmax(-1, keepdim=True)).float()
                    rates = [kept[[i for i, p in enumerate(prompts) if p["tag"] == t]].mean().item() for t in tasks]
                    cells.append(f"@{k} " + " ".join(f"{r:.3f}" for r in rates) + f" | {sum(rates) / len(rates):.3f}")
                print(f"  {side[1:]}² λ={lam:<4}", "   ".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
