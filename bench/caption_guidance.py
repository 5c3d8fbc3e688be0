"""`unclip eval` with decoder guidance whose null branch drops only part of the conditioning.

    .venv/bin/python bench/caption_guidance.py MODEL --drop caption --scale 2 [--tasks two_object position color_attr]

unclip's decoder guidance (`Decoder.guided_fn`) mixes the conditional prediction with a null
branch that drops z_i and the caption together, a branch trained only 5% of the time (10% × 50%).
`--drop caption` keeps z_i in the null branch and drops the caption alone (trained 45% of the
time), so the guidance pushes along what the caption adds to z_i; `--drop z` keeps the caption and
drops z_i. The run scores the shipped prompts of `--tasks` (default: the three that need
binding) with the model's default sampling otherwise, and writes eval.json, report.md and grids
into --out. The numbers in docs/model_card.md ("Sampling sweeps") came from this script.
"""

from __future__ import annotations

import argparse
import sys

import torch


def partial_guided_fn(drop: str):
    """A `Decoder.guided_fn` whose null rows drop only `drop` ("caption" or "z") at scales ≠ 1."""
    from unclip.decoder.model import Decoder
    from unclip.diffusion import cfg_mix

    plain = Decoder.guided_fn

    def guided_fn(self, z_i, text_states, text_mask, guidance_scale, *, text_embeds=None):
        if guidance_scale == 1.0:
            return plain(self, z_i, text_states, text_mask, guidance_scale, text_embeds=text_embeds)
        ones = torch.ones(z_i.shape[0], dtype=torch.bool, device=z_i.device)
        both = lambda x: None if x is None else torch.cat([x, x])  # noqa: E731  [2B, ...]
        dropped = torch.cat([ones, ~ones])  # conditional rows, then null rows
        cond = self.text_proj(both(z_i), both(text_states), both(text_mask),
                              keep_z=dropped if drop == "z" else both(ones),
                              keep_text=dropped if drop == "caption" else both(ones), text_embeds=both(text_embeds))

        def model_fn(x_t, t):
            out_cond, out_null = self.unet_fn(both(x_t), both(t), **cond).chunk(2)
            return cfg_mix(out_cond, out_null, guidance_scale, variance=self.config.variance)

        return model_fn

    return guided_fn


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="model directory")
    parser.add_argument("--drop", choices=["caption", "z"], default="caption", help="what the null branch drops")
    parser.add_argument("--scale", type=float, default=2.0, help="decoder guidance scale (1: none)")
    parser.add_argument("--tasks", nargs="+", default=["two_object", "position", "color_attr"])
    parser.add_argument("--out", default="out/bench/caption_guidance", help="output folder")
    args = parser.parse_args()

    from unclip.cli import main as unclip_main
    from unclip.decoder.model import Decoder

    Decoder.guided_fn = partial_guided_fn(args.drop)
    return unclip_main(["eval", args.model, "--tasks", *args.tasks, "--guidance-scale", str(args.scale),
                        "--out", args.out, "--threads", "2", "--quiet"])


if __name__ == "__main__":
    sys.exit(main())
