"""What a stage's weights depend on in a run config, and where two run configs differ there.

Resuming a checkpoint (`trainer.train`) and skipping a complete stage (`train all`) ask the same
question: did anything that changes this stage's weights change? Only the data and the stage's
own section count; keys that change how a run executes but not what it computes
(`EXECUTION_ONLY`) never do, so a resumed run may log, checkpoint, compile or load data
differently, and another stage's settings may change while this one trains.
"""

from __future__ import annotations

import json
from typing import Any

# how the finished stage samples (`assemble(sampling=)` carries them into a model)
SAMPLING = ("sampler", "sample_steps", "sample_start", "eta", "guidance_scale", "best_of", "rank_steer", "candidates",
            "upsampled_candidates")
# how a run executes, logs, validates (drawing nothing from the training random state) and checkpoints,
# and how it samples: none changes a weight
EXECUTION_ONLY = ("compile", "num_workers", "log_every", "ckpt_every", "eval_every", "eval_batches", *SAMPLING)
# the priors and the decoder learn from the CLIP's embeddings, so its sections count for them too
SECTIONS = {"clip": ("data", "tokenizer", "clip"), "diffusion_prior": ("data", "tokenizer", "clip", "prior"),
            "ar_prior": ("data", "tokenizer", "clip", "ar_prior"),
            "decoder": ("data", "tokenizer", "clip", "decoder")}  # upsamplerN: data + upsamplers[N-1]


def what_trains(config: Any) -> Any:
    """`config` (a run config dict, nested) without its EXECUTION_ONLY keys."""
    if isinstance(config, dict):
        return {k: what_trains(v) for k, v in config.items() if k not in EXECUTION_ONLY}
    return config


def changes(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys where two config dicts differ, as "key: old → new" (a removed or added key counts)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [c for k in sorted(set(old) | set(new), key=str)
                for c in changes(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new) and any(
            isinstance(v, dict) for v in old):
        return [c for i, (a, b) in enumerate(zip(old, new, strict=True)) for c in changes(a, b, f"{prefix}.{i}")]
    return [] if old == new else [f"{prefix}: {old!r} → {new!r}"]


def stage_changes(stage: str, old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Where run config `new` differs from `old` in what `stage` ("clip", "diffusion_prior",
    "ar_prior", "decoder", "upsamplerN") trains; any other stage name compares everything."""
    old, new = (what_trains(json.loads(json.dumps(c))) for c in (old, new))  # tuples read as lists
    if stage.startswith("upsampler") and stage.removeprefix("upsampler").isdigit():
        i = int(stage.removeprefix("upsampler")) - 1

        def own(config: dict) -> Any:
            ups = config.get("upsamplers") or []
            return ups[i] if i < len(ups) else None

        return changes(old.get("data"), new.get("data"), "data") + changes(own(old), own(new), f"upsamplers.{i}")
    if stage not in SECTIONS:
        return changes(old, new)
    return [c for section in SECTIONS[stage] for c in changes(old.get(section), new.get(section), section)]
