"""Which way round the decoder draws two objects: from the true z_i (a perfect prior) or the prior's.

    .venv/bin/python bench/decoder_layout.py [--model DIR] [--n 128] [--steps 12] [--lang en|th]
                                             [--steer 0 0.5 1 2]

For N two-object scenes from far along the train stream, the decoder draws one image (no
candidates, ancestral DDPM at --steps, no guidance, upsampled to 128²) from each scene's caption
and, as z_i, either the CLIP image embedding of the scene's render (the z_i a perfect prior would
give) or the diffusion prior's sample for the caption. The shipped judge reads every image; an
image counts as "both drawn" when it shows exactly the scene's two objects (colour and shape,
one of each), and of those, "right way round" when the judge's centres stand in the caption's
relation. Tells apart what the prior costs (the layout of its z_i) from what the decoder costs
(drawing the layout z_i holds). --steer adds a row per value: the prior's z_i steered toward the
ranking z_t by that much (`prior.rank_steer`, docs/pipeline.md "Steering"; 0 is the plain prior's).
The numbers in docs/pipeline.md ("Steering") came from here.
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory (default: the shipped model)")
    parser.add_argument("--n", type=int, default=128, help="two-object scenes (default: 128)")
    parser.add_argument("--steps", type=int, default=12, help="decoder DDPM steps (default: 12, the shipped default)")
    parser.add_argument("--lang", default="en", choices=["en", "th"])
    parser.add_argument("--steer", type=float, nargs="+", default=[0.0],
                        help="prior.rank_steer values to draw the prior's z_i with (default: 0, the model's own "
                             "setting ignored)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import unclip
    from unclip.clip.zeroshot import render_and_encode
    from unclip.data.world import canonical_caption, sample
    from unclip.eval.judge import default_judge_dir, load_judge, relation_of

    from dataclasses import replace

    pipe = unclip.load(args.model, precision="float32")
    plain = replace(pipe.config, prior=replace(pipe.config.prior, rank_steer=0.0))
    render = render_and_encode(pipe.clip)
    judge, _ = load_judge(default_judge_dir())
    scenes, index = [], 80_000_000  # far beyond the training runs' reach
    while len(scenes) < args.n:
        scene = sample("train", index, lang="en").scene
        index += 1
        if scene.kind == "pair":
            scenes.append(scene)
    counts = Counter()
    for at in range(0, args.n, 32):
        chunk = scenes[at:at + 32]
        seeds = list(range(at, at + len(chunk)))
        with torch.no_grad():
            text = pipe.encode_text([canonical_caption(s, lang=args.lang) for s in chunk])
            pipe.config = plain
            drawn_z = pipe.prior_sample(text, seed=seeds)
            sources = {"true z_i": render(chunk, args.lang)}
            for amount in args.steer:
                pipe.config = replace(plain, prior=replace(plain.prior, rank_steer=amount))
                sources[f"prior's z_i, steered {amount:g}" if amount else "prior's z_i"] = pipe.steer(drawn_z, text)
            for name, z_i in sources.items():
                images = pipe.decode(z_i, text, steps=args.steps, sampler="ddpm", guidance_scale=1.0, seed=seeds)
                for scene, reading in zip(chunk, judge.read(images)[0]):
                    drawn = [[o for o in reading["objects"] if (o["colour"], o["shape"]) == (x.colour, x.shape)
                              and "cx" in o] for x in scene.objects]
                    if len(reading["objects"]) == 2 and all(len(d) == 1 for d in drawn):
                        counts[name, "both"] += 1
                        counts[name, "right"] += relation_of(drawn[0][0], drawn[1][0]) == scene.relation
        print(f"{min(at + 32, args.n)}/{args.n} scenes", flush=True)
    print(f"{args.n} two-object scenes ({args.lang}), decoder DDPM {args.steps} steps, one image each:")
    print("| z_i | both drawn | right way round, of those |")
    print("|---|---|---|")
    for name in sources:
        both, right = counts[name, "both"], counts[name, "right"]
        print(f"| {name} | {both / args.n:.3f} ({both}) | {right / max(both, 1):.3f} ({right}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
