"""Copy a trained model directory into the package as the shipped default, float16.

    python scripts/ship_default.py MODEL [--recipe TEXT] [--eval EVAL_JSON] [--stage-metrics JSON]

The sampling defaults (sampler, steps, starting noise level, guidance, η, candidates) of the
decoder, prior and upsamplers are taken from the current shapes-gpu preset, so a sweep's verdict
(docs/model_card.md) reaches `unclip generate` without retraining; training settings stay as the
run recorded them. The recipe text goes into the manifest's provenance; the summary of `unclip
eval`'s eval.json and the decoder and upsampler rows of bench/stage_metrics.py go into its
evaluation (DESIGN §4: the manifest holds the model's evaluation summary). Writes
src/unclip/assets/model atomically.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path

from unclip.config import UnclipConfig, preset
from unclip.io import write_json_atomic
from unclip.modeldir import MANIFEST, half_model_dir, read_manifest, swap_in

SAMPLING = ("sampler", "sample_steps", "sample_start", "eta", "guidance_scale", "candidates")
SUMMARY = ("tasks", "overall", "by_split", "by_lang", "failures", "judge_support_overall", "frechet_judge_features",
           "diversity", "images_per_prompt", "prompts", "seed", "meta")
TARGET = Path(__file__).resolve().parents[1] / "src" / "unclip" / "assets" / "model"


def with_sampling(cfg: UnclipConfig, source: UnclipConfig) -> UnclipConfig:
    """`cfg` with the sampling fields of `source`'s decoder, prior and upsamplers."""

    def take(section, other):
        return replace(section, **{k: getattr(other, k) for k in SAMPLING if hasattr(section, k)})

    return replace(cfg, decoder=take(cfg.decoder, source.decoder), prior=take(cfg.prior, source.prior),
                   upsamplers=tuple(take(u, o) for u, o in zip(cfg.upsamplers, source.upsamplers)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--recipe", default="", help="how the model was trained, for the provenance")
    parser.add_argument("--eval", help="eval.json written by `unclip eval MODEL`: its summary goes into the manifest")
    parser.add_argument("--stage-metrics", help="stage_metrics.json written by bench/stage_metrics.py")
    args = parser.parse_args()
    for name, path in (("--eval", args.eval), ("--stage-metrics", args.stage_metrics)):
        if path and not Path(path).is_file():
            parser.error(f"{name} {path}: no such file (nothing was shipped)")
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=TARGET.parent, prefix=".ship.") as tmp:
        half = half_model_dir(args.model, Path(tmp) / "model")
        manifest = read_manifest(half).to_dict()
        cfg = with_sampling(UnclipConfig.from_dict(manifest["config"]), preset("shapes-gpu"))
        manifest["config"] = cfg.to_dict()
        if args.recipe:
            manifest["provenance"]["recipe"] = args.recipe
        if args.eval:
            result = json.loads(Path(args.eval).read_text(encoding="utf-8"))
            manifest["evaluation"]["geneval"] = {k: result[k] for k in SUMMARY if k in result}
        if args.stage_metrics:
            stages = json.loads(Path(args.stage_metrics).read_text(encoding="utf-8"))
            manifest["evaluation"].update({k: stages[k] for k in ("decoder", "upsampler") if k in stages})
        write_json_atomic(half / MANIFEST, manifest)
        swap_in(half, TARGET)  # two renames: an interruption never leaves the repository without a model
    print(f"shipped {TARGET}")


if __name__ == "__main__":
    main()
