"""`unclip eval MODEL | judge | prompts`: score a model, train the judge, write a prompt file."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

from unclip.argtypes import guidance, positive_int, seed_number, threads
from unclip.errors import ConfigError
from unclip.pipeline.cli import add_sampling_arguments, configure_sampling, model_digest

log = logging.getLogger(__name__)

DESCRIPTION = """\
unclip eval [MODEL]   GenEval-style scores of a model directory (the shipped model when none is
                      given): generate images for every prompt, let the frozen judge pass or fail
                      each one, and write eval.json, report.md and one image grid per task into
                      --out (default out/eval/<model folder name>, out/eval/default). Stopped,
                      it resumes: run again with the same settings, the images drawn so far (kept
                      in OUT/.drawn until the run ends) are read instead of drawn again.
unclip eval judge     train the judge network on real shapes-world renders, measure its accuracy on
                      held-out test and unseen renders, and save it to --out (default out/judge).
                      Stopped, it resumes: run the same command again, and training goes on from
                      its last checkpoint (.NAME.training.pt beside --out, written every 200 steps
                      and removed once the judge is saved). A SIGTERM stops training after the
                      step in hand with a checkpoint (exit status 75).
unclip eval prompts   write a GenEval-style prompt file (--per-group prompts per task, split and
                      language) to --out (default out/prompts.jsonl).

A model directory literally named `judge` or `prompts` is given as ./judge or ./prompts."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="GenEval-style evaluation; also trains the judge and writes prompt files",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", metavar="MODEL", nargs="?",
                   help="model directory (default: the shipped model), or `judge`, or `prompts`")
    p.add_argument("--out", help="output folder (prompts: a .jsonl file)")
    p.add_argument("--seed", type=seed_number, help="random seed (default: 0; training the judge: 1)")
    p.add_argument("--threads", type=threads, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    g = _Recorded(p.add_argument_group("evaluating a model"))
    g.add_argument("--prompts", help="prompt file (JSONL; default: the shipped set, eval/prompts.jsonl in the package)")
    g.add_argument("--images-per-prompt", type=positive_int, default=4, help="images per prompt (default: 4)")
    g.add_argument("--per-group", type=positive_int, help="use only the first N prompts of each (task, split, lang); "
                   "for `eval prompts`, how many to write (default: 4)")
    g.add_argument("--tasks", nargs="+", metavar="TASK", help="score only these tasks, e.g. two_object position "
                   "(default: all in the prompt file; overall is then their mean)")
    g.add_argument("--judge", help="judge directory (default: the shipped judge, eval/judge in the package)")
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
    p.set_defaults(func=run, eval_parser=p, model_options=g.actions)


class _Recorded:
    """An argument group that keeps the actions added to it: `eval judge` and `eval prompts` refuse
    the ones of "evaluating a model" they would ignore."""

    def __init__(self, group: argparse._ArgumentGroup):
        self.group, self.actions = group, []

    def add_argument(self, *names, **options) -> argparse.Action:
        self.actions.append(self.group.add_argument(*names, **options))
        return self.actions[-1]


JUDGE_TRAINING = {"train_steps": 4000, "batch_size": 64, "eval_n": 1000}  # `eval judge`'s own options
PROMPT_WRITING = ("per_group", "tasks")  # the options of "evaluating a model" `eval prompts` reads too


def run(args: argparse.Namespace) -> int:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    given = [f"--{k.replace('_', '-')}" for k in JUDGE_TRAINING if getattr(args, k) is not None]
    if args.target != "judge" and given:
        doing = "writing prompts" if args.target == "prompts" else "evaluating a model"
        raise ConfigError(f"{' '.join(given)}: options of `unclip eval judge`, which trains the judge; {doing} "
                          "does not use them")
    if args.target in ("judge", "prompts"):  # an option that would change nothing is said, not ignored
        parser = args.eval_parser
        unused = [a.option_strings[0] for a in args.model_options
                  if getattr(args, a.dest) != parser.get_default(a.dest)
                  and (args.target == "judge" or a.dest not in PROMPT_WRITING)]
        if unused:
            raise ConfigError(f"{' '.join(unused)}: options for evaluating a model; `unclip eval {args.target}` does "
                              "not use them")
    for key, default in JUDGE_TRAINING.items():
        setattr(args, key, default if getattr(args, key) is None else getattr(args, key))
    if args.target == "judge":
        return _judge(args)
    if args.target == "prompts":
        return _prompts(args)
    return _model(args)


def _judge(args: argparse.Namespace) -> int:
    from unclip.eval.judge import JudgeConfig, save_judge
    from unclip.eval.judge_train import (MIN_SUPPORT, JudgeTrainConfig, judge_accuracy, minimum, thin, train_judge,
                                         training_checkpoint)
    from unclip.io import check_output_dir

    from unclip.modeldir import check_replaceable

    out = Path(args.out or "out/judge")
    check_replaceable(out, judge=True)
    check_output_dir(out.parent)  # the checkpoint goes beside OUT: a file on that path is said before training
    seed = {} if args.seed is None else {"seed": args.seed}
    cfg = JudgeTrainConfig(steps=args.train_steps, batch_size=args.batch_size, **seed)
    checkpoint = training_checkpoint(out)  # a stopped run resumes from it; it goes once the judge is saved
    judge, provenance = train_judge(JudgeConfig(), cfg, progress=not args.quiet, checkpoint=checkpoint)
    accuracy = judge_accuracy(judge, n=args.eval_n, progress=not args.quiet)
    out = save_judge(judge, out, accuracy=accuracy, provenance=provenance)
    checkpoint.unlink(missing_ok=True)
    worst = minimum(accuracy)
    print(f"judge trained in {provenance['seconds']:.0f} s -> {out}")
    print("accuracy on held-out renders (worst of test, unseen): "
          + ", ".join(f"{a} {v:.4f}" for a, v in worst.items()))
    unsure = thin(accuracy)
    short = [a for a, v in worst.items() if v < 0.99 and a not in unsure]
    if short:
        print(f"below the 0.99 target: {', '.join(short)} (train longer with --train-steps)")
    if unsure:
        print(f"measured on fewer than {MIN_SUPPORT} held-out renders, so not shown to meet 0.99: {', '.join(unsure)} "
              f"(give --eval-n {JUDGE_TRAINING['eval_n']})")
    return 0


def _prompts(args: argparse.Namespace) -> int:
    from unclip.eval.prompts import DEFAULT_PER_GROUP, make_prompts, write_prompts

    if args.out and (Path(args.out).is_dir() or args.out.endswith(("/", "\\"))):
        raise ConfigError(f"--out {args.out} is a folder; give the .jsonl file to write, e.g. {args.out.rstrip('/')}"
                          "/prompts.jsonl")
    prompts = make_prompts(per_group=args.per_group or DEFAULT_PER_GROUP, seed=args.seed or 0,
                           **({"tasks": args.tasks} if args.tasks else {}))
    path = write_prompts(args.out or "out/prompts.jsonl", prompts)
    print(f"{len(prompts)} prompts -> {path}")
    return 0


def _settings(args: argparse.Namespace, pipe, model: Path, prompts_path: Path, judge_dir: Path, reading: str) -> dict:
    """What the run used, defaults filled in (eval.json's `meta`): the sampling as it ran, and which
    model (its manifest's sha256: a model replaced in place keeps its path)."""
    from unclip import __version__
    from unclip.modeldir import recorded_path

    decoder, prior = pipe.config.decoder, args.prior or pipe.priors[0]
    stages = pipe.stages_for(args.size)
    candidates = args.candidates or decoder.candidates
    return {"model": recorded_path(model), "model_manifest_sha256": model_digest(model),
            "unclip_version": __version__, "prompts": recorded_path(prompts_path), "tasks": args.tasks or "all",
            "judge": recorded_path(judge_dir), "judge_reading": reading, "prior": prior,
            "prior_guidance_scale": pipe.config.prior.guidance_scale if args.prior_guidance_scale is None
            else args.prior_guidance_scale,
            "sampler": args.sampler or decoder.sampler, "steps": args.steps or decoder.sample_steps,
            "guidance_scale": decoder.guidance_scale if args.guidance_scale is None else args.guidance_scale,
            "candidates": candidates,
            "upsampled_candidates": min(args.upsampled_candidates or decoder.upsampled_candidates, candidates)
            if stages else 1,
            "size": pipe.sizes[stages], "precision": pipe.precision, "trained_on": pipe.config.data.source,
            **{f"upsampler{i}": {"sampler": u.config.sampler, "steps": u.config.sample_steps,
                                 "start": u.config.sample_start}
               for i, u in enumerate(pipe.upsamplers[:stages], start=1)}}


DRAWN = ".drawn"  # OUT/.drawn: the images a run has drawn so far, and the settings that drew them (run.json)


def _drawn_folder(out: Path, run: dict) -> Path:
    """OUT/.drawn, emptied unless an earlier, stopped run of these same settings (`run`) left it:
    then `evaluate` reads the batches it finished instead of drawing them again."""
    from unclip.io import write_json_atomic

    folder, run = out / DRAWN, json.loads(json.dumps(run))
    try:
        same = json.loads((folder / "run.json").read_text(encoding="utf-8")) == run
    except (OSError, ValueError):
        same = False
    if same:
        log.info("resuming: the images an earlier run of these settings drew are read from %s", folder)
    else:
        shutil.rmtree(folder, ignore_errors=True)
        write_json_atomic(folder / "run.json", run)
    return folder


def _model(args: argparse.Namespace) -> int:
    import unclip
    from unclip.errors import ModelFormatError
    from unclip.eval.geneval import evaluate
    from unclip.eval.judge import READING, default_judge_dir, load_judge
    from unclip.eval.prompts import default_prompts_path, limit, read_prompts
    from unclip.eval.report import write_evaluation
    from unclip.io import check_output_dir

    from unclip.pipeline import default_model_dir

    model = Path(args.target) if args.target else default_model_dir()
    if (model / "unclip.json").is_file():
        from unclip.modeldir import read_manifest

        if read_manifest(model).extra.get("kind") == "judge":
            raise ConfigError(f"{model} is a judge, not a model to evaluate: give it as --judge {model}")
    out = Path(args.out or Path("out/eval") / (model.resolve().name if args.target else "default"))
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
    meta = _settings(args, pipe, model, prompts_path, judge_dir, READING)
    drawn = _drawn_folder(out, {**meta, "seed": args.seed or 0, "images_per_prompt": args.images_per_prompt,
                                "batch_prompts": args.batch_prompts, "device": str(pipe.device),
                                "prompt_list": [p["prompt"] for p in prompts]})
    evaluation = evaluate(pipe, judge, prompts, args.images_per_prompt, args.seed or 0, judge_accuracy=accuracy,
                          batch_prompts=args.batch_prompts, progress=not args.quiet, generate_options=options,
                          drawn=drawn)
    evaluation.result["meta"] = meta
    paths = write_evaluation(evaluation, out, title=f"unclip eval {model}", keep_images=args.keep_images)
    shutil.rmtree(drawn, ignore_errors=True)
    r = evaluation.result
    print(json.dumps({"overall": round(r["overall"], 4), **{t: round(v, 4) for t, v in r["tasks"].items()}}))
    print(f"report {paths['markdown']}, all numbers {paths['json']}, grids {out}/grid_*.png")
    return 0
