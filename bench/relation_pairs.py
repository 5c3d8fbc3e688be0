"""How well each text tower reads "left of / right of / above / below", by the kind of pair.

    .venv/bin/python bench/relation_pairs.py [--model DIR] [--ranker CLIP_DIR] [--n 200]

`unclip clip eval`'s relation score asks only about pairs of two colours and two shapes. A pair of one
colour ("a purple square right of a purple heart") can be told from its places-traded twin by the
shapes alone, and one of one shape by the colours alone. This script draws N two-object scenes of
each kind (two colours and shapes; one colour; one shape) from far along the train stream, renders
each and its places-traded twin, and reports, per language and per text tower (the model's own, its
ranking tower `rank_text_encoder/` if it has one, and the text tower of --ranker, a
`clip.train_towers=text` fine-tune of the model's CLIP):

- t2i: how often the caption's z_t is nearer the scene's render than the twin's render (what
  ranking candidates asks: which image fits the caption);
- i2t: how often the render is nearer its own caption than the twin's caption.

The numbers in docs/clip.md ("Binding") came from this script.
"""

from __future__ import annotations

import argparse

import torch

KINDS = ("two colours and shapes", "one colour", "one shape")


def pair_kind(scene) -> str:
    a, b = scene.objects
    return KINDS[1] if a.colour == b.colour else KINDS[2] if a.shape == b.shape else KINDS[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory (default: the shipped model)")
    parser.add_argument("--ranker", default=None, help="a CLIP directory whose text tower is scored too")
    parser.add_argument("--n", type=int, default=200, help="scenes of each kind (default: 200)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import unclip
    from unclip.clip.zeroshot import candidates, render_and_encode
    from unclip.data.world import canonical_caption, sample

    pipe = unclip.load(args.model, precision="float32")
    other = None
    if args.ranker:
        from unclip.clip.stage import load_clip

        other = load_clip(args.ranker).eval()
    found = {kind: [] for kind in KINDS}
    index = 50_000_000  # far beyond the training runs' reach (a run of 2,000 steps × 128 reads 256 k)
    while min(map(len, found.values())) < args.n:
        scene = sample("train", index, lang="en").scene
        index += 1
        if scene.kind == "pair" and len(found[pair_kind(scene)]) < args.n:
            found[pair_kind(scene)].append(scene)
    render = render_and_encode(pipe.clip)
    print(f"{args.n} scenes of each kind; t2i / i2t: the right one of scene and places-traded twin")
    print("| lang | pair | " + " | ".join(["own"] + (["ranking"] if pipe.ranker is not None else [])
                                          + (["--ranker"] if other is not None else [])) + " |")
    print("|---|---|" + "---|" * (1 + (pipe.ranker is not None) + (other is not None)))
    for lang in ("en", "th"):
        for kind, scenes in found.items():
            twins = [candidates(s, "relation")[1] for s in scenes]
            with torch.no_grad():
                right, wrong = render(scenes, lang), render(twins, lang)
                own_r = pipe.encode_text([canonical_caption(s, lang=lang) for s in scenes])
                own_w = pipe.encode_text([canonical_caption(s, lang=lang) for s in twins])
                towers = [(own_r.embeds, own_w.embeds)]
                if pipe.ranker is not None:
                    towers.append((own_r.rank_embeds, own_w.rank_embeds))
                if other is not None:
                    towers.append(tuple(other.encode_captions([canonical_caption(s, lang=lang) for s in group])
                                        for group in (scenes, twins)))
            cells = []
            for z_r, z_w in towers:
                z_r, z_w = torch.nn.functional.normalize(z_r.float(), dim=-1), torch.nn.functional.normalize(
                    z_w.float(), dim=-1)
                t2i = ((z_r * right).sum(-1) > (z_r * wrong).sum(-1)).float().mean()
                i2t = ((z_r * right).sum(-1) > (z_w * right).sum(-1)).float().mean()
                cells.append(f"{t2i:.3f} / {i2t:.3f}")
            print(f"| {lang} | {kind} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
