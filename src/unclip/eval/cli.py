"""`unclip eval MODEL | judge | prompts`: score a model, train the judge, write a prompt file."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from unclip.argtypes import guidance, positive_int, seed_number, threads
from unclip.errors import ConfigError
from unclip.pipeline.cli import add_sampling_arguments, configure_sampling

log = logging.getLogger(__name__)

DESCRIPTION = """\
unclip eval MODEL     GenEval-style scores of a model directory: generate images for every prompt,
                      let the frozen judge pass or fail each one, and write eval.json, report.md and
                      one image grid per task into --out (default out/eval/<model name>).
unclip eval judge     train the judge network on real shapes-world renders, measure its accuracy on
                      held-out test and unseen renders, and save it to --out (default out/judge).
unclip eval prompts   write a GenEval-style prompt file (--per-group prompts per task, split and
                      language) to --out (default out/prompts.jsonl).

A model directory literally named `judge` or `prompts` is given as ./judge or ./prompts."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="GenEval-style evaluation; also trains the judge and writes prompt files",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", metavar="MODEL", help="model directory, or `judge`, or `prompts`")
    p.add_argument("--out", help="output folder (prompts: a .jsonl file)")
    p.add_argument("--seed", type=seed_number, help="random seed (default: 0; training the judge: 1)")
    p.add_argument("--threads", type=threads, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    g = p.add_argument_group("evaluating a model")
    g.add_argument("--prompts", help="prompt file (JSONL; default: the shipped set, src/unclip/eval/prompts.jsonl)")
    g.add_argument("--images-per-prompt", type=positive_int, default=4, help="images per prompt (default: 4)")
    g.add_argument("--per-group", type=positive_int, help="use only the first N prompts of each (task, split, lang); "
                   "for `eval prompts`, how many to write (default: 4)")
    g.add_argument("--tasks", nargs="+", metavar="TASK", help="score only these tasks, e.g. two_object position "
                   "(default: all in the prompt file; overall is then their mean)")
    g.add_argument("--judge", help="judge directory (default: the shipped judge, src/unclip/eval/judge)")
    g.add_argument("--keep-images", action="store_true", help="also write every judged image to OUT/images/NNN.png "
                   "(in prompt order), e.g. to read them again with bench/judge_reading.py --images")
    g.add_argument("--batch-prompts", type=positive_int, default=4, help="prompts generated per batch (default: 4)")
    g.add_argument("--prior", help="diffusion or ar (default: the model's first prior), or an ablation: caption "
                   "(the caption's z_t as z_i) or none (the decoder's null z_i: caption only)")
    g.add_argument("--steps", type=positive_int, help="decoder sampling steps (default: the model's config)")
    g.add_argument("--guidance-scale", type=guidance, help="decoder classifier-free guidance (default: the model's)")
    g.add_argument("--sampler", choices=["ddim", "ddpm", "dpmsolver++"], help="decoder sampler (default: the model's)")
    g.add_argument("--prior-guidance-scale", type=guidance,
                   help="prior classifier-free guidance (default: the model's)")
    g.add_argument("--candidates", type=positive_int, help="images drawn per judged image, the one closest to the caption "
                   "in CLIP kept (default: the model's)")
    g.add_argument("--upsampled-candidates", type=positive_int, help="how many candidates are upsampled and "
                   "compared again at the final size (default: the model's)")
    g.add_argument("--size", type=int, help="judge images at this side of the cascade, e.g. the decoder's 32 "
                   "for fast sweeps (default: the largest)")
    g.add_argument("--device", help="torch device, e.g. cuda (default: cpu)")
    add_sampling_arguments(g)
    j = p.add_argument_group("training the judge")
    j.add_argument("--train-steps", type=positive_int, help="optimizer steps (default: 4000, ~10 min on 1 CPU thread)")
    j.add_argument("--batch-size", type=positive_int, help="renders per step (default: 64)")
    j.add_argument("--eval-n", type=positive_int, help="held-out renders per split for its accuracy (default: 1000)")
    p.set_defaults(func=run)


JUDGE_TRAINING = {"train_steps": 4000, "batch_size": 64, "eval_n": 1000}  # `eval judge`'s own options


def run(args: argparse.Namespace) -> int:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    given = [f"--{k.replace('_', '-')}" for k in JUDGE_TRAINING if getattr(args, k) is not None]
    if args.target != "judge" and given:
        raise ConfigError(f"{' '.join(given)}: options of `unclip eval judge`, which trains the judge; evaluating "
                          "a model does not use them")
    for key, default in JUDGE_TRAINING.items():
        setattr(args, key, default if getattr(args, key) is None else getattr(args, key))
    if args.target == "judge":
        return _judge(args)
    if args.target == "prompts":
        return _prompts(args)
    return _model(args)


def _judge(args: argparse.Namespace) -> int:
    from unclip.eval.judge import JudgeConfig, save_judge
    from unclip.eval.judge_train import JudgeTrainConfig, judge_accuracy, minimum, train_judge

    from unclip.modeldir import check_replaceable

    check_replaceable(args.out or "out/judge")
    seed = {} if args.seed is None else {"seed": args.seed}
    cfg = JudgeTrainConfig(steps=args.train_steps, batch_size=args.batch_size, **seed)
    judge, provenance = train_judge(JudgeConfig(), cfg, progress=not args.quiet)
    accuracy = judge_accuracy(judge, n=args.eval_n, progress=not args.quiet)
    out = save_judge(judge, args.out or "out/judge", accuracy=accuracy, provenance=provenance)
    worst = minimum(accuracy)
    print(f"judge trained in {provenance['seconds']:.0f} s -> {out}")
    print("accuracy on held-out renders (worst of test, unseen): "
          + ", ".join(f"{a} {v:.4f}" for a, v in worst.items()))
    short = [a for a, v in worst.items() if v < 0.99]
    if short:
        print(f"below the 0.99 target: {', '.join(short)} (train longer with --train-steps)")
    return 0


def _prompts(args: argparse.Namespace) -> int:
    from unclip.eval.prompts import DEFAULT_PER_GROUP, make_prompts, write_prompts

    prompts = make_prompts(per_group=args.per_group or DEFAULT_PER_GROUP, seed=args.seed or 0)
    path = write_prompts(args.out or "out/prompts.jsonl", prompts)
    print(f"{len(prompts)} prompts -> {path}")
    return 0


def _model(args: argparse.Namespace) -> int:
    import unclip
    from unclip.errors import ModelFormatError
    from unclip.eval.geneval import evaluate
    from unclip.eval.judge import READING, default_judge_dir, load_judge
    from unclip.eval.prompts import default_prompts_path, limit, read_prompts
    from unclip.eval.report import write_evaluation
    from unclip.io import check_output_dir

    model = Path(args.target)
    out = Path(args.out or Path("out/eval") / model.resolve().name)
    check_output_dir(out)  # before ten minutes of drawing, not after
    judge_dir = Path(args.judge) if args.judge else default_judge_dir()
    if not (judge_dir / "unclip.json").is_file():
        raise ModelFormatError(f"no judge at {judge_dir}: train one with `unclip eval judge --out DIR` and pass "
                               "--judge DIR")
    judge, accuracy = load_judge(judge_dir)
    prompts_path = Path(args.prompts) if args.prompts else default_prompts_path()
    prompts = read_prompts(prompts_path)
    if args.tasks:
        present = sorted({p["tag"] for p in prompts})
        if unknown := sorted(set(args.tasks) - set(present)):
            raise ConfigError(f"--tasks {' '.join(unknown)}: {prompts_path} holds no such task; it holds "
                              f"{', '.join(present)}")
        prompts = [p for p in prompts if p["tag"] in args.tasks]
    if args.per_group:
        prompts = limit(prompts, args.per_group)
    pipe = configure_sampling(unclip.load(model, device=args.device, precision=args.precision), args)
    if pipe.config.data.source != "shapes":
        log.warning("%s was trained on data.source=%s; these prompts and the judge are shapes world's, so the "
                    "scores say how it draws shapes-world scenes, which only means something if its data held "
                    "them (e.g. `unclip data export` shards)", model, pipe.config.data.source)
    options = {k: v for k, v in (("prior", args.prior), ("steps", args.steps), ("guidance_scale", args.guidance_scale),
                                 ("sampler", args.sampler), ("prior_guidance_scale", args.prior_guidance_scale),
                                 ("size", args.size), ("candidates", args.candidates),
                                 ("upsampled_candidates", args.upsampled_candidates)) if v is not None}
    evaluation = evaluate(pipe, judge, prompts, args.images_per_prompt, args.seed or 0, judge_accuracy=accuracy,
                          batch_prompts=args.batch_prompts, progress=not args.quiet, generate_options=options)
    evaluation.result["meta"] = {"model": str(model), "prompts": str(prompts_path), "tasks": args.tasks or "all",
                                 "judge": str(judge_dir), "judge_reading": READING,
                                 "candidates": pipe.config.decoder.candidates,
                                 "upsampled_candidates": pipe.config.decoder.upsampled_candidates, **options,
                                 "precision": pipe.precision, "trained_on": pipe.config.data.source,
                                 **{f"upsampler{i}": {"sampler": u.config.sampler, "steps": u.config.sample_steps,
                                                   "start": u.config.sample_start}
                                    for i, u in enumerate(pipe.upsamplers, start=1)}}
    paths = write_evaluation(evaluation, out, title=f"unclip eval {model}")
    if args.keep_images:
        from unclip.io import save_image_atomic

        (out / "images").mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(evaluation.images):
            save_image_atomic(out / "images" / f"{i:03d}.png", image)
    r = evaluation.result
    print(json.dumps({"overall": round(r["overall"], 4), **{t: round(v, 4) for t, v in r["tasks"].items()}}))
    print(f"report {paths['markdown']}, all numbers {paths['json']}, grids {out}/grid_*.png")
    return 0
