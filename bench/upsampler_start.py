"""Upsampler quality and speed against its starting noise level and step count.

    .venv/bin/python bench/upsampler_start.py [MODEL] [--n 16] [--precision bfloat16] [--threads 2]

For each (sampler, steps, start) the first upsampler of MODEL (default: the shipped model) turns
--n val renders shrunk to 32² back into 128² images, starting either from pure noise (start 1) or
from the bicubic upsampling noised to `start` of its schedule (`Upsampler.sample(start=)`), and
the table gives PSNR / SSIM against the real 128² renders beside bicubic upscaling, and seconds
per image. The numbers in docs/decoder.md ("Starting from the noised bicubic upsampling").
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import torch

SETTINGS = [("ddpm", 50, 1.0), ("ddpm", 25, 1.0), ("ddim", 10, 1.0), ("ddpm", 15, 0.3), ("ddpm", 10, 0.3),
            ("ddpm", 10, 0.15), ("ddpm", 20, 0.15), ("ddpm", 10, 0.1), ("ddpm", 10, 0.06), ("ddpm", 5, 0.1),
            ("ddim", 5, 0.1), ("ddim", 10, 0.15), ("dpmsolver++", 10, 0.3)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="model directory (default: the shipped model)")
    parser.add_argument("--n", type=int, default=16, help="val renders per setting (default: 16)")
    parser.add_argument("--precision", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from unclip.decoder.metrics import upsampler_quality
    from unclip.decoder.stage import load_upsampler
    from unclip.pipeline import default_model_dir

    upsampler = load_upsampler(Path(args.model) if args.model else default_model_dir(), 1).eval()
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if args.precision == "bfloat16"
                else contextlib.nullcontext())
    print(f"{args.n} val renders, 32² → 128², {args.precision}, {args.threads} threads")
    print("| sampler | steps | start | PSNR (dB) | SSIM | bicubic PSNR / SSIM | s / image |\n|---|---|---|---|---|---|---|")
    for sampler, steps, start in SETTINGS:
        began = time.perf_counter()
        with autocast:
            r = upsampler_quality(upsampler, n=args.n, steps=steps, sampler=sampler, start=start)
        seconds = (time.perf_counter() - began) / args.n
        print(f"| {sampler} | {steps} | {start} | {r['psnr']:.2f} | {r['ssim']:.3f} | "
              f"{r['psnr_bicubic']:.2f} / {r['ssim_bicubic']:.3f} | {seconds:.3f} |", flush=True)


if __name__ == "__main__":
    main()
