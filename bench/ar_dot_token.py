"""Does the AR prior follow its dot-product token? (paper §2.2: sample it from the top half)

    .venv/bin/python bench/ar_dot_token.py [MODEL] [-n 80] [--threads 2]

Samples the AR prior for the first n val captions (English) with the dot-product token drawn as
unclip draws it (uniform over the top 16 of 32 equal-mass buckets) and then fixed at buckets 0 …
31, and prints the mean z_i·z_t of the samples and the share of them whose own z_i·z_t falls in
the top half of the training pairs' buckets (a real pair does half of the time). A prior that
follows the token moves both with the bucket. The numbers in docs/priors.md.
"""

from __future__ import annotations

import argparse
from unittest import mock

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default=None, help="model directory (default: the shipped model)")
    parser.add_argument("-n", type=int, default=80, help="val captions (default: 80)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import unclip
    import unclip.prior.ar as ar
    from unclip.data.world import sample

    pipe = unclip.load(args.model)
    text = pipe.encode_text([sample("val", i, lang="en").caption for i in range(args.n)])
    prior = pipe.ar_prior

    def run(bucket: int | None) -> tuple[float, float]:
        draw = ar.top_half_dot_buckets if bucket is None else lambda n, generator=None: torch.full((n,), bucket)
        with mock.patch.object(ar, "top_half_dot_buckets", draw):
            z_i = prior.sample(text.token_states.float(), text.mask, text.embeds.float(),
                               generator=torch.Generator().manual_seed(0))
        dots = (z_i * text.embeds.float()).sum(1)
        top = torch.bucketize(dots.contiguous(), prior.dot_edges) >= ar.DOT_BUCKETS // 2
        return float(dots.mean()), float(top.float().mean())

    print(f"AR prior, {args.n} val captions (en), model {args.model or 'shipped'}\n")
    print("| dot-product token | mean z_i·z_t of the samples | samples in the top half |")
    print("|---|---|---|")
    for bucket in (None, 0, 8, 16, 24, 31):
        dot, top = run(bucket)
        print(f"| {'top half, drawn (the default)' if bucket is None else bucket} | {dot:.3f} | {top:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
