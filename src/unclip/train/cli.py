"""`unclip train STAGE`: train one stage of the cascade with a preset and overrides."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from unclip.argtypes import minutes, positive_int, threads
from unclip.config_cli import add_config_arguments, config_from_args


def _threads(args: argparse.Namespace) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def _other_rank() -> bool:
    """True on the non-main processes of `accelerate launch`: the main one reports, they stay quiet."""
    from unclip.train.dist import rank_world

    return rank_world()[0] > 0


def _budget(args: argparse.Namespace) -> float | None:
    return None if args.minutes is None else args.minutes * 60.0


def _prepare(args: argparse.Namespace, stage: str):
    """Set the threads; the config from --preset/--set; the run directory (default runs/<config name>/<stage>,
    or runs/<config name> for stage "") and the model directory (default <run directory>/model)."""
    _threads(args)
    cfg = config_from_args(args)
    run_dir = Path(args.run_dir or f"runs/{cfg.name}/{stage}")
    return cfg, run_dir, Path(args.out or run_dir / "model")


def _train_clip(args: argparse.Namespace) -> int:
    from unclip.clip.stage import train_clip

    cfg, run_dir, out = _prepare(args, "clip")
    train_clip(cfg, run_dir=run_dir, out=out, resume=not args.no_resume, evaluate=not args.no_eval,
               time_budget=_budget(args), init=args.init, init_ranker=args.init_ranker)
    if _other_rank():
        return 0
    print(f"CLIP model: {out}")
    if not args.no_eval and cfg.data.source == "shapes":
        from unclip.clip.zeroshot import markdown_table
        from unclip.modeldir import read_manifest

        print(markdown_table(read_manifest(out).evaluation["clip"]))
        print(f"metrics: {run_dir / 'metrics.jsonl'}")
    else:
        _report(out, run_dir, "clip")
    return 0


def _train_prior(args: argparse.Namespace) -> int:
    from unclip.prior.stage import train_prior

    cfg, run_dir, out = _prepare(args, f"{args.kind}_prior")
    train_prior(cfg, kind=args.kind, clip_dir=args.clip, run_dir=run_dir, out=out, embeddings=args.embeddings,
                resume=not args.no_resume, evaluate=not args.no_eval, fit_samples=args.fit_samples,
                time_budget=_budget(args), init=args.init)
    if _other_rank():
        return 0
    print(f"{args.kind} prior model: {out}")
    if not args.no_eval and cfg.data.source == "shapes":
        from unclip.modeldir import read_manifest
        from unclip.prior.metrics import markdown_table

        print(markdown_table(read_manifest(out).evaluation[f"{args.kind}_prior"]))
    else:
        _report(out, run_dir, f"{args.kind}_prior")
    return 0


def _train_decoder(args: argparse.Namespace) -> int:
    from unclip.decoder.stage import train_decoder

    cfg, run_dir, out = _prepare(args, "decoder")
    train_decoder(cfg, clip_dir=args.clip, run_dir=run_dir, out=out, resume=not args.no_resume,
                  evaluate=not args.no_eval, eval_samples=args.eval_samples, time_budget=_budget(args),
                  init=args.init)
    if _other_rank():
        return 0
    print(f"decoder model: {out}")
    _report(out, run_dir, "decoder", sheet="real images and their decodings")
    return 0


def _train_upsampler(args: argparse.Namespace) -> int:
    from unclip.decoder.stage import train_upsampler

    cfg, run_dir, out = _prepare(args, f"upsampler{args.stage}")
    train_upsampler(cfg, stage=args.stage, run_dir=run_dir, out=out, resume=not args.no_resume,
                    evaluate=not args.no_eval, eval_samples=args.eval_samples, time_budget=_budget(args),
                    init=args.init)
    if _other_rank():
        return 0
    print(f"upsampler {args.stage} model: {out}")
    _report(out, run_dir, f"upsampler{args.stage}", sheet="bicubic, upsampled and real images")
    return 0


def _report(out: Path, run_dir: Path, name: str, *, sheet: str = "") -> None:
    """Print stage `name`'s evaluation from the model directory, the metrics file and the picture."""
    from unclip.modeldir import read_manifest

    evaluation = read_manifest(out).evaluation.get(name)
    if evaluation:
        print(" ".join(f"{k}={v}" for k, v in evaluation.items()))
    print(f"metrics: {run_dir / 'metrics.jsonl'}")
    if sheet and (run_dir / "samples.png").is_file():
        print(f"{sheet}: {run_dir / 'samples.png'}")


def _example_caption(out: Path) -> str:
    """A caption to try the new model on: one of its training captions, or the README's for shapes world."""
    from unclip.modeldir import read_manifest
    from unclip.pipeline.prompts import EXAMPLE_PROMPT

    return (read_manifest(out).stats.get("example_captions") or [EXAMPLE_PROMPT])[0]


def _train_all(args: argparse.Namespace) -> int:
    from unclip.train.all import STAGES, train_all

    cfg, root, out = _prepare(args, "")  # every stage's run directory sits under runs/<config name>/
    stages = args.stages or STAGES
    timings = train_all(cfg, root=root, out=out, stages=stages, resume=not args.no_resume,
                        embed_pairs=args.embed_pairs, evaluate=not args.no_eval)
    if _other_rank():
        return 0
    print(f"model: {out}")
    if timings:
        print("minutes per stage: " + ", ".join(f"{k} {v / 60:.1f}" for k, v in timings.items()))
    print(f"try: unclip generate {shlex.quote(_example_caption(out))} --model {out}")
    return 0


def _common(parser: argparse.ArgumentParser, stage: str, *, budget: bool = True) -> None:
    add_config_arguments(parser)
    parser.add_argument("--run-dir", help=f"checkpoints and metrics (default: runs/<name>/{stage}, the config's "
                        "name: the preset's unless --set name=... or --config gives another)")
    parser.add_argument("--out", help="model directory to write (default: <run dir>/model)")
    parser.add_argument("--no-resume", action="store_true", help="start over even if the run dir has a checkpoint")
    parser.add_argument("--threads", type=threads, default=0, help="torch CPU threads (default: torch's choice)")
    if budget:
        parser.add_argument("--minutes", type=minutes,
                            help="wall-clock budget for the training steps: the run measures its speed and ends "
                                 "its warmup + cosine schedule in time (at most the configured steps)")


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train a stage of the cascade",
                                   description="Train one stage. Runs resume from their last checkpoint.")
    stages = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    clip = stages.add_parser(
        "clip", help="contrastive text and image towers",
        description="Train CLIP (tokenizer, text and image towers) on cfg.data, then evaluate zero-shot "
                    "attribute accuracy and retrieval (shapes world) and write a model directory.")
    _common(clip, "clip")
    clip.add_argument("--init", help="start from the CLIP (and tokenizer) of this model directory: same network, "
                                     "fresh optimizer and schedule, e.g. to fine-tune the shipped CLIP with twins")
    clip.add_argument("--init-ranker", action="store_true",
                      help="with --init: start the text tower from the model's ranking tower (rank_text_encoder/) "
                           "instead of its own, to train that ranker further (with --set clip.train_towers=text; "
                           "`unclip assemble --ranker` carries the result)")
    clip.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    clip.set_defaults(func=_train_clip)

    prior = stages.add_parser(
        "prior", help="caption → CLIP image embedding (paper §2.2)",
        description="Train a prior against a frozen CLIP model directory (--clip), on the fly from cfg.data or "
                    "from an embedding folder made by `unclip embed` (--embeddings), then evaluate it and write "
                    "a model directory holding the CLIP components and the prior.")
    _common(prior, "diffusion_prior or ar_prior, by --kind")
    prior.add_argument("--kind", choices=["diffusion", "ar"], default="diffusion",
                       help="diffusion: PriorTransformer predicting the clean z_i, CFG, best-of-2 (config key prior); "
                            "ar: PCA + quantized autoregressive prior (config key ar_prior) (default: diffusion)")
    prior.add_argument("--clip", required=True, help="model directory holding the CLIP to train against")
    prior.add_argument("--embeddings", help="embedding folder from `unclip embed` (default: encode on the fly)")
    prior.add_argument("--init", help="start from this kind of prior in a model directory (same architecture, its "
                                      "statistics kept; fresh optimizer and schedule), e.g. to retrain the shipped "
                                      "priors against a CLIP whose text tower was fine-tuned")
    prior.add_argument("--fit-samples", type=positive_int, default=5000,
                       help="training pairs the prior's statistics are fitted on: the diffusion prior's z_i "
                            "mean and std, the AR prior's PCA and dot buckets (default: 5000)")
    prior.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    prior.set_defaults(func=_train_prior)

    decoder = stages.add_parser(
        "decoder", help="CLIP image embedding (+ caption) → 32² image (paper §2.1)",
        description="Train the diffusion decoder against a frozen CLIP model directory (--clip): images are "
                    "encoded on the fly to z_i and caption token states; z_i is dropped 10% and the caption "
                    "50% of the time for classifier-free guidance. Then measure the CLIP similarity of "
                    "decoded images to their originals and write a model directory.")
    _common(decoder, "decoder")
    decoder.add_argument("--clip", required=True, help="model directory holding the CLIP to train against")
    decoder.add_argument("--init", help="start from the decoder of this model directory (same architecture; "
                                        "fresh optimizer and schedule), e.g. to train the shipped model longer")
    decoder.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    decoder.add_argument("--eval-samples", type=positive_int, default=16,
                         help="images decoded for the evaluation (default: 16)")
    decoder.set_defaults(func=_train_decoder)

    upsampler = stages.add_parser(
        "upsampler", help="×4 diffusion upsampler (paper §2.1)",
        description="Train one ×4 upsampler of the cascade (--stage 1: blur-degraded conditioning, --stage 2: "
                    "BSR-degraded, when configured) on random crops of 1/4 of the output side, then measure "
                    "PSNR and SSIM against bicubic upscaling and write a model directory.")
    _common(upsampler, "upsamplerN, N its --stage")
    upsampler.add_argument("--stage", type=int, choices=[1, 2], default=1, help="which ×4 stage (default: 1)")
    upsampler.add_argument("--init", help="start from this stage's upsampler in a model directory (same architecture)")
    upsampler.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    upsampler.add_argument("--eval-samples", type=positive_int, default=16,
                           help="images upsampled for the evaluation (default: 16)")
    upsampler.set_defaults(func=_train_upsampler)

    everything = stages.add_parser(
        "all", help="the whole cascade: CLIP, priors, decoder, upsamplers, assembled",
        description="Train CLIP, embed the training pairs, train the diffusion and AR priors, the decoder and "
                    "the upsamplers, then assemble one model directory. Stages already complete under the run "
                    "directory are skipped and an interrupted stage resumes, so rerun the command after a crash. "
                    "Your own data: --set data.source=folder --set data.path=DIR (images with same-name .txt "
                    "captions) or --set data.source=webdataset --set data.path='DIR/{000000..000099}.tar', "
                    "with --set data.holdout=0.05 to keep pairs out for evaluation; check it first with "
                    "`unclip data check DIR`.")
    _common(everything, "", budget=False)
    everything.add_argument("--embed-pairs", type=positive_int, default=20_000,
                            help="training pairs embedded for the priors, at most (default: 20000; fewer when the "
                                 "priors draw fewer in their steps, or need fewer to fit their statistics)")
    everything.add_argument("--stages", nargs="+", choices=["clip", "embed", "prior", "ar_prior", "decoder", "upsamplers"],
                            help="run only these stages (the others must be complete already)")
    everything.add_argument("--no-eval", action="store_true",
                            help="skip each stage's evaluation after its training (with --preset tiny, most of the "
                                 "run's time: the priors' evaluation samples thousands of embeddings)")
    everything.set_defaults(func=_train_all)
