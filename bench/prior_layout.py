"""Which way round the diffusion prior lays out two objects, and whether ranking its samples helps.

    .venv/bin/python bench/prior_layout.py [--model DIR] [--ranker CLIP_DIR] [--lang en|th] [--n 100] [--k 8]

For N two-object val scenes (a relation in the caption) the prior draws K z_i per caption (best-of
1). A sample lies "on the right side" when it is nearer the scene's render than its
places-traded render (CLIP image embeddings). Prints how the samples of one caption split (all
right, all wrong, mixed), how often the sample the caption's own z_t ranks first is on the right
side (what best-of does), the same for a ranking tower's z_t — the model's `rank_text_encoder/`
by default, or the text tower of --ranker (a `clip.train_towers=text` fine-tune) — and how far the
samples spread along the layout axis against their spread overall (docs/pipeline.md, "Ranking tower").
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory (default: the shipped model)")
    parser.add_argument("--ranker", default=None, help="a CLIP directory whose text tower ranks (default: the model's)")
    parser.add_argument("--lang", default="en", choices=["en", "th"])
    parser.add_argument("--n", type=int, default=100, help="two-object val scenes (default: 100)")
    parser.add_argument("--k", type=int, default=8, help="prior samples per caption (default: 8)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import unclip
    from unclip.clip.zeroshot import candidates, render_and_encode, scenes_for
    from unclip.data.world import canonical_caption
    from unclip.prior.data import encode_batch

    pipe = unclip.load(args.model, precision="float32")
    clip, n, k = pipe.clip, args.n, args.k
    scenes = list(scenes_for("val", "relation", n, 0))
    render = render_and_encode(clip)
    with torch.no_grad():
        right = render(scenes, args.lang)
        wrong = render([candidates(s, "relation")[1] for s in scenes], args.lang)
        captions = [canonical_caption(s, lang=args.lang) for s in scenes]
        batch = encode_batch(clip, captions)
        z = pipe.prior.sample(batch["text_states"].repeat(k, 1, 1), batch["text_mask"].repeat(k, 1),
                              batch["z_t"].repeat(k, 1), best_of=1,
                              generator=torch.Generator().manual_seed(0)).view(k, n, -1)  # [k, n, D]
        good = ((z * right).sum(-1) > (z * wrong).sum(-1)).float()  # [k, n]
        share = good.mean(0)
        if args.ranker:
            from unclip.clip.stage import load_clip

            rank_z_t = load_clip(args.ranker).eval().encode_captions(captions)
        elif pipe.ranker is not None:
            rank_z_t = pipe.encode_text(captions).rank_embeds
        else:
            rank_z_t = None

    def first(z_t: torch.Tensor) -> float:
        """How often the sample ranked first by z_t lies on the right side."""
        best = (z * torch.nn.functional.normalize(z_t, dim=-1)).sum(-1).argmax(0, keepdim=True)  # [1, n]
        return float(good.gather(0, best).mean())

    axis = torch.nn.functional.normalize(right - wrong, dim=-1)
    print(f"{n} captions ({args.lang}) × {k} samples: on the right side {float(good.mean()):.3f}; captions with "
          f"every sample right {int((share == 1).sum())}, every one wrong {int((share == 0).sum())}, mixed "
          f"{int(((share > 0) & (share < 1)).sum())}")
    print(f"ranked first by the caption's own z_t: right side {first(batch['z_t']):.3f}")
    if rank_z_t is not None:
        print(f"ranked first by the ranking tower's z_t: right side {first(rank_z_t):.3f}; that tower reads the "
              f"relation of the true renders {float((((right - wrong) * rank_z_t).sum(-1) > 0).float().mean()):.3f}")
    print(f"spread of the samples along the layout axis (std over k) {float((z * axis).sum(-1).std(0).mean()):.3f}, "
          f"overall {float(z.std(0).norm(dim=-1).mean()):.3f}")


if __name__ == "__main__":
    main()
