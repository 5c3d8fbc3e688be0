"""Stage metrics of a model directory, per sampler: the numbers in docs/model_card.md.

    python bench/stage_metrics.py [MODEL] [--n 16] [--prior-n 500] [--out out/stage_metrics]

Decoder: CLIP similarity of decode(z_i of a real image) to that image (and to another image, the
floor), for samplers, step counts and guidance scales. Upsampler: PSNR / SSIM against the real
128² render beside bicubic upscaling. Priors: cosine of the predicted z_i with the true one beside
the caption baseline. Prints markdown tables and writes them with the sample sheets into --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="model directory (default: the shipped model)")
    parser.add_argument("--n", type=int, default=16, help="images per decoder / upsampler setting (default: 16)")
    parser.add_argument("--prior-n", type=int, default=500, help="pairs per prior split and language (default: 500)")
    parser.add_argument("--out", default="out/stage_metrics")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip", nargs="*", default=[], choices=["decoder", "upsampler", "prior"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from unclip.clip.stage import load_clip
    from unclip.decoder.metrics import decode_clip_similarity, upsampler_quality
    from unclip.decoder.stage import load_decoder, load_upsampler
    from unclip.pipeline import default_model_dir

    model = Path(args.model) if args.model else default_model_dir()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"model": str(model)}
    clip = load_clip(model)
    if "decoder" not in args.skip:
        decoder = load_decoder(model)
        rows = []
        for sampler, steps, scale in [("ddim", 50, 1.0), ("ddpm", 100, 1.0), ("ddpm", 50, 1.0), ("ddpm", 25, 1.0),
                                      ("dpmsolver++", 25, 1.0),
                                      ("ddpm", 100, 3.0)]:
            began = time.perf_counter()
            r = decode_clip_similarity(decoder, clip, n=args.n, steps=steps, guidance_scale=scale, sampler=sampler,
                                       sheet=out / f"decoder_{sampler}_{steps}_g{scale}.png")
            rows.append({**r, "seconds": round(time.perf_counter() - began, 1)})
            print(rows[-1], flush=True)
        results["decoder"] = rows
    if "upsampler" not in args.skip:
        upsampler = load_upsampler(model, 1)
        rows = []
        # (sampler, steps, start): from pure noise (start 1), and from the noised bicubic upsampling
        for sampler, steps, start in [("ddim", 50, 1.0), ("dpmsolver++", 20, 1.0), ("dpmsolver++", 10, 1.0),
                                      ("ddpm", 50, 1.0), ("ddpm", 10, 0.1), ("ddpm", 5, 0.1), ("ddim", 5, 0.1)]:
            began = time.perf_counter()
            r = upsampler_quality(upsampler, n=args.n, steps=steps, sampler=sampler, start=start,
                                  sheet=out / f"upsampler_{sampler}_{steps}_from{start}.png")
            rows.append({**r, "seconds": round(time.perf_counter() - began, 1)})
            print(rows[-1], flush=True)
        results["upsampler"] = rows
    if "prior" not in args.skip:
        from unclip.prior.metrics import evaluate_prior, markdown_table
        from unclip.prior.stage import ar_predictor, diffusion_predictor, load_ar_prior, load_diffusion_prior

        results["prior"] = {}
        for name, predict in (("diffusion", diffusion_predictor(load_diffusion_prior(model))),
                              ("ar", ar_predictor(load_ar_prior(model), guidance_scale=1.0))):
            r = evaluate_prior(clip, predict, n=args.prior_n, attribute_n=100, splits=("val", "unseen"),
                               progress=False)
            results["prior"][name] = r
            print(f"{name} prior\n{markdown_table(r)}", flush=True)
    (out / "stage_metrics.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    print(f"all numbers: {out / 'stage_metrics.json'}")


if __name__ == "__main__":
    main()
