"""End-to-end text → image latency of a model (default: the shipped one) beside issue 11's target.

    .venv/bin/python bench/bench_generate.py [MODEL] [--precision float32 bfloat16] [--threads 2]

For each precision: load the model, warm up with one short generation, then time
`generate(PROMPTS, n=4)` (8 images of 128², the model's default sampling settings: prior,
decoder and upsampler steps and candidates as its config says) and report seconds per image and
the peak RSS while the row ran (it starts from what the rows before left the allocator holding:
give one --precision per run for a row's figure alone). Optional `--steps`/`--sampler`/`--candidates`/`--upsampled-candidates`
override the decoder's and
`--upsampler-steps`/`--upsampler-sampler`/`--upsampler-start` the upsampler's, to see what fewer
steps buy. The target is ≤ 1 s per image on the 2-core CPU (issue 11).
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch

TARGET = 1.0  # seconds per image, issue 11
PROMPTS = ["a red circle above a blue square", "สามเหลี่ยมสีเขียวสองรูป"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="model directory (default: the shipped model)")
    parser.add_argument("--precision", nargs="+", choices=["float32", "bfloat16"],
                        help="default: float32, and bfloat16 where the CPU has bf16 units (emulated elsewhere, 30× slower)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n", type=int, default=4, help="images per prompt (default: 4)")
    parser.add_argument("--steps", type=int, help="decoder steps (default: the model's)")
    parser.add_argument("--sampler", choices=["ddpm", "ddim", "dpmsolver++"], help="decoder sampler")
    parser.add_argument("--candidates", type=int, help="decoder candidates per image (default: the model's)")
    parser.add_argument("--upsampled-candidates", type=int, help="candidates upsampled and compared again at the "
                        "final size (default: the model's)")
    parser.add_argument("--upsampler-steps", type=int, help="upsampler steps (default: the model's)")
    parser.add_argument("--upsampler-sampler", choices=["ddpm", "ddim", "dpmsolver++"], help="upsampler sampler")
    parser.add_argument("--upsampler-start", type=float, help="upsampler starting noise level (default: the model's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import unclip
    from unclip.precision import native_bf16

    if args.precision is None:
        args.precision = ["float32", "bfloat16"] if native_bf16("cpu") else ["float32"]
        if not native_bf16("cpu"):
            print("this CPU has no bf16 units (AVX-512-BF16 or AMX): float32 only (--precision bfloat16 to time it anyway)")
    options = {k: v for k, v in (("steps", args.steps), ("sampler", args.sampler), ("candidates", args.candidates),
                                 ("upsampled_candidates", args.upsampled_candidates)) if v is not None}
    def said(value, what: str) -> str:
        return f"{what} {value}" if value is not None else f"the model's {what}"

    print(f"text → image, {len(PROMPTS)} prompts × {args.n}, {args.threads} threads, torch {torch.__version__}; "
          f"decoder: {said(args.sampler, 'sampler')}, {said(args.steps, 'steps')}, "
          f"{said(args.candidates, 'candidates')}; upsampler: {said(args.upsampler_sampler, 'sampler')}, "
          f"{said(args.upsampler_steps, 'steps')}, {said(args.upsampler_start, 'start')}")
    print(f"{'precision':<10} {'s / image':>10} {'target':>8} {'peak RSS':>10}")
    for precision in args.precision:
        reset_peak_rss()  # each row its own peak, not the process's so far
        pipe = unclip.load(args.model, precision=precision)
        pipe.set_upsampler_sampling(sampler=args.upsampler_sampler, steps=args.upsampler_steps,
                                    start=args.upsampler_start)
        pipe.generate(PROMPTS[0], n=1, seed=0, steps=4)  # warm-up: first calls pay for allocation
        began = time.perf_counter()
        pipe.generate(PROMPTS, n=args.n, seed=0, **options)
        per_image = (time.perf_counter() - began) / (len(PROMPTS) * args.n)
        rss = peak_rss_mib()
        print(f"{precision:<10} {per_image:>10.2f} {TARGET:>8.1f} {rss:>8.0f} MiB", flush=True)
        del pipe  # gone before the next row loads its own


def reset_peak_rss() -> None:
    """Start the peak resident size over (Linux: writing 5 to /proc/self/clear_refs resets VmHWM)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mib() -> float:
    """The peak resident size since `reset_peak_rss` (VmHWM; elsewhere the process's ru_maxrss)."""
    try:
        line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":
    main()
