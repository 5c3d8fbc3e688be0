"""Copy a trained model directory into the package as the shipped default, float16.

    python scripts/ship_default.py MODEL [--recipe TEXT] [--eval EVAL_JSON] [--stage-metrics JSON]
                                         [--clip-eval JSON]
    python scripts/ship_default.py --evaluation-only [--eval …] [--stage-metrics …] [--clip-eval …]

The sampling defaults (`unclip.train.runconfig.SAMPLING`: sampler, steps, starting noise level,
guidance, η, best-of, steering, candidates) of every stage are taken from the current shapes-gpu
preset (`unclip.pipeline.assemble.with_sampling`, as `unclip train all` assembles), so a sweep's
verdict (docs/model_card.md) reaches `unclip generate` without retraining; training settings stay
as the run recorded them. The recipe text goes into the manifest's provenance. Its evaluation (DESIGN §4:
the manifest holds the model's evaluation summary) takes the summary of `unclip eval`'s eval.json,
the decoder, upsampler and prior rows of bench/stage_metrics.py and `unclip clip eval --out`'s
JSON; stages measured by none of them keep what their training recorded. `--evaluation-only`
writes only those into the shipped model's manifest, its weights untouched. Writes
src/unclip/assets/model atomically.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from unclip.config import UnclipConfig, preset
from unclip.io import write_json_atomic
from unclip.modeldir import MANIFEST, half_model_dir, read_manifest, remove_abandoned, swap_in, temp_dir_beside
from unclip.pipeline.assemble import with_sampling

SUMMARY = ("tasks", "overall", "by_split", "by_lang", "failures", "judge_support_overall", "frechet_judge_features",
           "diversity", "images_per_prompt", "prompts", "seed", "meta")
TARGET = Path(__file__).resolve().parents[1] / "src" / "unclip" / "assets" / "model"


def evaluation_of(args: argparse.Namespace) -> dict:
    """The manifest's evaluation entries the given result files measure, by the manifest's names."""
    def read(path):
        return json.loads(Path(path).read_text(encoding="utf-8"))

    entries = {}
    if args.eval:
        result = read(args.eval)
        entries["geneval"] = {k: result[k] for k in SUMMARY if k in result}
    if args.stage_metrics:
        stages = read(args.stage_metrics)
        entries.update({k: stages[k] for k in ("decoder", "upsampler") if k in stages})
        priors = stages.get("prior", {})
        entries.update({name: priors[key] for key, name in (("diffusion", "diffusion_prior"), ("ar", "ar_prior"))
                        if key in priors})
    if args.clip_eval:
        entries["clip"] = read(args.clip_eval)
    return entries


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="the model directory to ship (not with --evaluation-only)")
    parser.add_argument("--recipe", default="", help="how the model was trained, for the provenance")
    parser.add_argument("--eval", help="eval.json written by `unclip eval MODEL`: its summary goes into the manifest")
    parser.add_argument("--stage-metrics", help="stage_metrics.json written by bench/stage_metrics.py")
    parser.add_argument("--clip-eval", help="the JSON `unclip clip eval MODEL --out` wrote")
    parser.add_argument("--evaluation-only", action="store_true",
                        help="write the given evaluations into the shipped model's manifest, nothing else")
    args = parser.parse_args(argv)
    if bool(args.model) == args.evaluation_only:
        parser.error("give MODEL to ship it, or --evaluation-only to update the shipped model's evaluation")
    for name, path in (("--eval", args.eval), ("--stage-metrics", args.stage_metrics), ("--clip-eval", args.clip_eval)):
        if path and not Path(path).is_file():
            parser.error(f"{name} {path}: no such file (nothing was shipped)")
    remove_abandoned(TARGET)  # what a killed ship left: the previous model put back, the new copy deleted
    if args.evaluation_only:
        manifest = read_manifest(TARGET).to_dict()
        manifest["evaluation"].update(evaluation_of(args))
        write_json_atomic(TARGET / MANIFEST, manifest)
        print(f"updated the evaluation in {TARGET / MANIFEST}")
        return
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(TARGET)  # a ship killed between swap_in's renames is undone, its copy removed
    try:
        half = half_model_dir(args.model, tmp / "model")
        manifest = read_manifest(half).to_dict()
        cfg = with_sampling(UnclipConfig.from_dict(manifest["config"]), preset("shapes-gpu"))
        manifest["config"] = cfg.to_dict()
        if args.recipe:
            manifest["provenance"]["recipe"] = args.recipe
        manifest["evaluation"].update(evaluation_of(args))
        write_json_atomic(half / MANIFEST, manifest)
        swap_in(half, TARGET)  # two renames: an interruption never leaves the repository without a model
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"shipped {TARGET}")


if __name__ == "__main__":
    main()
