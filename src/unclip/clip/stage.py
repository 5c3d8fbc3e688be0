"""Train, save and load the CLIP stage as a model directory (DESIGN §4).

`train_clip` trains the tokenizer (once per run, kept in the run directory so a resumed run
tokenizes identically), then the towers, then writes a model directory holding `tokenizer/`,
`text_encoder/`, `image_encoder/` and `unclip.json` with the temperature, the provenance of the
run and its evaluation.
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from unclip.clip.model import ClipModel
from unclip.config import ClipConfig, DataConfig, UnclipConfig
from unclip.modeldir import (
    CLIP_COMPONENTS, RANKER, Manifest, check_replaceable, continued, load_into, read_manifest, recorded_path,
    save_model_dir, verify_files,
)
from unclip.tokenizer import Tokenizer, train_shapes_tokenizer
from unclip.words import CaptionWords

if TYPE_CHECKING:
    from unclip.train.trainer import TrainResult

log = logging.getLogger(__name__)


def run_tokenizer(cfg: UnclipConfig, run_dir: Path) -> Tokenizer:
    """The run's tokenizer: loaded from `run_dir/tokenizer` if an earlier attempt made one."""
    path = run_dir / "tokenizer"
    if (path / "tokenizer.json").is_file():
        return Tokenizer.load(path)
    if cfg.data.source != "shapes":
        captions = own_captions(cfg.data, cfg.tokenizer.corpus_size)
        tokenizer = Tokenizer.train(captions, vocab_size=cfg.tokenizer.vocab_size,
                                    context_length=cfg.tokenizer.context_length,
                                    max_token_bytes=cfg.tokenizer.max_token_bytes)
        tokenizer.words = CaptionWords.of(captions)  # for warnings about prompt words it never read
    else:
        tokenizer = train_shapes_tokenizer(vocab_size=cfg.tokenizer.vocab_size,
                                           context_length=cfg.tokenizer.context_length,
                                           corpus_size=cfg.tokenizer.corpus_size, seed=cfg.data.seed,
                                           max_token_bytes=cfg.tokenizer.max_token_bytes)
    tokenizer.save(path)
    return tokenizer


def own_captions(data: DataConfig, n: int) -> list[str]:
    """The captions of the first `n` training pairs of a folder or webdataset source that training
    can use (`unclip.data.check.usable_pairs`: file or shard order, without the `data.holdout` pairs):
    what the run's tokenizer learns and keeps the words of. Decodes about n images, no more."""
    from itertools import islice

    from unclip.data.check import usable_pairs
    from unclip.errors import DataError
    from unclip.train.data import check_path, held_out

    check_path(data)
    pairs = usable_pairs(data.path, source=data.source, keep=lambda key: not held_out(key, data.holdout))
    captions = [caption for _, caption, _ in islice(pairs, n)]
    if not captions:
        raise DataError(f"{data.path} holds no usable training pairs; `unclip data check {data.path}` lists what "
                        "is wrong")
    return captions


def clip_records(manifest: Manifest) -> tuple[dict[str, Any], dict[str, Any]]:
    """The CLIP's own provenance and evaluation entries, from any directory holding a CLIP (a CLIP
    run's, or a stage or whole model trained against it), without the other stages' records."""
    provenance = manifest.provenance
    provenance = provenance["clip"] if "clip" in provenance else provenance
    evaluation = {"clip": manifest.evaluation["clip"]} if "clip" in manifest.evaluation else {}
    return provenance, evaluation


def stage_manifest(cfg: UnclipConfig, clip_manifest: Manifest, name: str, *, components: list[str],
                   stats: dict | None = None, provenance: dict | None = None, evaluation: dict | None = None,
                   resolutions: tuple[int, ...] = ()) -> Manifest:
    """The manifest of stage `name` trained against the CLIP of `clip_manifest`: the directory also
    holds that CLIP, so it carries the CLIP's stats and own records beside the stage's."""
    clip_provenance, clip_evaluation = clip_records(clip_manifest)
    return Manifest(
        config=cfg.to_dict(), resolutions=resolutions, stats={**clip_manifest.stats, **(stats or {})},
        extra={"components": [*CLIP_COMPONENTS, *components]},
        provenance={"clip": clip_provenance, name: provenance or {}},
        evaluation={**clip_evaluation, **({name: evaluation} if evaluation else {})})


def provenance(result: TrainResult, **extra: Any) -> dict[str, Any]:
    """A stage's training record: when, how long, how many steps, on what, in which autocast (the
    config's bf16 trains in float32 on a CPU that would emulate it), and its last logged losses."""
    return {
        "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(result.seconds, 1),
        "steps": result.step,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()})",
        "threads": torch.get_num_threads(),
        "autocast": result.autocast,
        "final_metrics": result.metrics,
        **extra,
    }


# What a CLIP run may change when it starts from trained weights (`--init`): how it trains, not the network.
TRAINING_FIELDS = ("train", "hard_negatives", "twin_group", "twin_weights", "init_temperature", "train_towers")


def same_network(a: ClipConfig, b: ClipConfig) -> bool:
    """Do two CLIP configs describe the same network (they may differ in how it trains)?"""
    from dataclasses import replace

    return replace(a, **{k: getattr(b, k) for k in TRAINING_FIELDS}) == b


def train_clip(cfg: UnclipConfig, *, run_dir: str | Path, out: str | Path, resume: bool = True,
               progress: bool = True, evaluate: bool = True, time_budget: float | None = None,
               init: str | Path | None = None, init_ranker: bool = False) -> Path:
    """Train CLIP with `cfg.clip` on `cfg.data` and write the model directory `out`.

    init: a model directory whose CLIP (towers, tokenizer, temperature) the run starts from, e.g.
    to fine-tune the shipped CLIP with hard negatives; its network settings must be `cfg.clip`'s
    (a checkpoint in `run_dir` still wins, so an interrupted run resumes where it was).
    init_ranker: start the text tower from `init`'s ranking tower (`rank_text_encoder/`) instead."""
    check_replaceable(out)
    if init_ranker and not init:
        from unclip.errors import ConfigError

        raise ConfigError("--init-ranker starts from a model's ranking tower: give that model with --init")
    from unclip.train.data import feed_for, validation_feed
    from unclip.train.trainer import train

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.clip.train.seed)
    started_from = {}
    if init:
        model, started_from = _init_clip(init, cfg, ranker=init_ranker)
        if not (run_dir / "tokenizer" / "tokenizer.json").is_file():
            model.tokenizer.save(run_dir / "tokenizer")
    else:
        model = ClipModel.from_config(cfg.clip, tokenizer=run_tokenizer(cfg, run_dir))
    tc, data = cfg.clip.train, cfg.data
    if init:
        data, tc = continued(init, (RANKER if init_ranker else "text_encoder", "image_encoder"), data, tc,
                             started_from["init"])
    feed = feed_for(data, size=cfg.clip.image_size, batch_size=tc.batch_size, num_workers=tc.num_workers,
                    hard_negatives=cfg.clip.hard_negatives, twin_group=cfg.clip.twin_group,
                    twin_weights=cfg.clip.twin_weights)
    result = train(model, feed, cfg=tc, run_dir=run_dir, run_config=cfg.to_dict(), resume=resume,
                   progress=progress, stage_name="clip", time_budget=time_budget,
                   val_batches=validation_feed(cfg.data, tc, size=cfg.clip.image_size))
    if not result.main_process:
        return Path(out)  # under accelerate launch the main process evaluates and writes the model
    evaluation = {}
    if evaluate and cfg.data.source == "shapes":
        from unclip.clip.zeroshot import evaluate_clip

        evaluation = evaluate_clip(model, progress=progress)
    elif evaluate:
        from unclip.clip.zeroshot import pair_retrieval
        from unclip.train.data import EVALUATION_PAIRS, evaluation_pairs

        images, captions, label = evaluation_pairs(cfg.data, EVALUATION_PAIRS, size=cfg.clip.image_size)
        evaluation = {"data": label, **pair_retrieval(model, images, captions)}
        log.info("CLIP retrieval %s", evaluation)
    if cfg.data.source != "shapes":
        examples = own_captions(cfg.data, 3)
    else:
        examples = []
    save_clip(model, out, cfg=cfg, provenance=provenance(result, **started_from),
              evaluation=evaluation, example_captions=examples)
    log.info("CLIP model written to %s", out)
    return Path(out)


def _init_clip(directory: str | Path, cfg: UnclipConfig, *, ranker: bool = False) -> tuple[ClipModel, dict]:
    """The CLIP of a trained model directory, if its network is the one `cfg` trains, and what the run
    records as its `init` (the directory and the provenance of the weights it starts from); with
    `ranker`, its text tower holds the model's ranking tower instead."""
    from unclip.errors import ConfigError

    directory = Path(directory)
    manifest = read_manifest(directory)
    if not same_network(UnclipConfig.from_dict(manifest.config).clip, cfg.clip):
        raise ConfigError(f"--init {directory}: its CLIP network differs from the one being trained; use the preset "
                          "it was trained with (its unclip.json records it), changing only how it trains")
    if UnclipConfig.from_dict(manifest.config).tokenizer != cfg.tokenizer:
        raise ConfigError(f"--init {directory}: its tokenizer settings differ from the config's")
    log.info("CLIP initialised from %s", directory)
    record = manifest.provenance.get("clip", manifest.provenance)
    model = load_clip(directory)
    model.use_config(cfg.clip)
    if not ranker:
        return model, {"init": {"from": recorded_path(directory), "provenance": record}}
    if not (directory / RANKER / "model.safetensors").is_file():
        raise ConfigError(f"--init-ranker: {directory} has no ranking tower ({RANKER}/ is missing); give a model that "
                          f"has one (`unclip assemble --ranker`), or leave --init-ranker out to start from its own tower")
    load_into(model.text, directory / RANKER / "model.safetensors")
    log.info("text tower initialised from the ranking tower of %s", directory)
    return model, {"init": {"from": recorded_path(directory), "tower": RANKER,
                            "provenance": manifest.provenance.get("ranker", {})}}


def save_clip(model: ClipModel, directory: str | Path, *, cfg: UnclipConfig, provenance: dict | None = None,
              evaluation: dict | None = None, example_captions: Sequence[str] = ()) -> Path:
    """Write a CLIP model directory; `example_captions` (a few training captions of data other than
    shapes world) go into its stats, for the prompts the tools suggest (`UnclipPipeline.example_prompt`)."""
    manifest = Manifest(
        config=cfg.to_dict(),
        stats={"clip_logit_scale": float(model.logit_scale.detach()),
               **({"example_captions": list(example_captions)} if example_captions else {})},
        extra={"components": list(CLIP_COMPONENTS)},
        provenance=provenance or {},
        evaluation={"clip": evaluation} if evaluation else {},
    )
    return save_model_dir(directory, manifest, model.save_components)


def warn_if_other_data(cfg: UnclipConfig, clip_dir: str | Path, stage: str) -> None:
    """Say so when a stage is about to train on other data than its CLIP was trained on: the usual
    cause is a stage run on its own without the --set data.* its CLIP's run had."""
    theirs = UnclipConfig.from_dict(read_manifest(clip_dir).config).data
    ours = cfg.data
    if (theirs.source, theirs.path) != (ours.source, ours.path):
        def where(data) -> str:
            return data.source + (f" ({data.path})" if data.path else "")

        log.warning("the CLIP at %s was trained on %s and this %s run trains on %s; if that is not meant, give "
                    "this run the same --set data.source=... data.path=... (unclip train all does)",
                    clip_dir, where(theirs), stage, where(ours))


def load_clip(directory: str | Path) -> ClipModel:
    """Load the CLIP stage of a model directory, strictly."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    verify_files(directory, manifest)
    cfg = UnclipConfig.from_dict(manifest.config)
    # an imported model's CLIP (Karlo's) records no temperature: it keeps the initial one
    return ClipModel.load_components(directory, cfg.clip, logit_scale=manifest.stats.get("clip_logit_scale"))
