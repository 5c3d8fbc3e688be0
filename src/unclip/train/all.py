"""`unclip train all`: the whole cascade in one resumable command.

CLIP → embeddings of the training pairs → diffusion prior and AR prior → decoder → upsamplers →
one assembled model directory. Each stage writes its model under `<root>/<stage>/model`; a stage
whose model directory is already complete is skipped, and a stage that was interrupted resumes
from its last checkpoint, so running the command again after a crash finishes the job.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from unclip.config import UnclipConfig
from unclip.errors import ConfigError, ModelFormatError
from unclip.modeldir import check_replaceable
from unclip.train import dist

log = logging.getLogger(__name__)

STAGES = ("clip", "embed", "prior", "ar_prior", "decoder", "upsamplers")
EMBED_PAIRS = 20_000  # training pairs embedded for the priors (docs/priors.md)


def _done(model_dir: Path) -> bool:
    """A model directory that reads back (manifest present, every listed file the right size)."""
    from unclip.modeldir import read_manifest, verify_files

    try:
        verify_files(model_dir, read_manifest(model_dir))
    except ModelFormatError:
        return False
    return True


def _stale(name: str, target: Path, cfg: UnclipConfig) -> list[str]:
    """What in `cfg` differs from the config the complete stage at `target` was trained with."""
    from unclip.modeldir import read_manifest
    from unclip.train.runconfig import stage_changes

    stage = {"prior": "diffusion_prior", "upsamplers": target.parent.name}.get(name, name)  # upsamplerN
    # through UnclipConfig: fields added since the stage was trained read as their defaults
    return stage_changes(stage, UnclipConfig.from_dict(read_manifest(target).config).to_dict(), cfg.to_dict())


def train_all(cfg: UnclipConfig, *, root: str | Path, out: str | Path, stages: Sequence[str] = STAGES,
              resume: bool = True, progress: bool = True, evaluate: bool = True, embed_pairs: int = EMBED_PAIRS,
              fit_samples: int = 5000) -> dict[str, float]:
    """Train every stage of `cfg` under `root` and assemble the model directory `out`.

    stages: the subset to run (the others must already be complete under `root`). embed_pairs:
    training pairs embedded for the priors; fit_samples: pairs the priors' PCA and statistics
    are fitted on. Returns the seconds each stage took this time (skipped stages are absent).
    """
    from unclip.train.trainer import run_lock

    check_replaceable(out)
    if unknown := set(stages) - set(STAGES):
        raise ConfigError(f"unknown stage(s) {', '.join(sorted(unknown))}; stages are {', '.join(STAGES)}")
    root = Path(root)
    with run_lock(root):  # two runs in one root would embed into, and assemble from, each other's stages
        return _train_all(cfg, root=root, out=out, stages=stages, resume=resume, progress=progress,
                          evaluate=evaluate, embed_pairs=embed_pairs, fit_samples=fit_samples)


def _prior_folder(root: Path) -> str:
    """The diffusion prior's folder under `root`: diffusion_prior, where `unclip train prior --kind
    diffusion` puts it too, so the standalone verb continues it; prior in a root begun before
    (train all named it so), which keeps its checkpoint and finished model."""
    if (root / "prior").is_dir() and not (root / "diffusion_prior").exists():
        return "prior"
    return "diffusion_prior"


def _train_all(cfg: UnclipConfig, *, root: Path, out: str | Path, stages: Sequence[str], resume: bool,
               progress: bool, evaluate: bool, embed_pairs: int, fit_samples: int) -> dict[str, float]:
    from unclip.clip.stage import train_clip
    from unclip.decoder.stage import train_decoder, train_upsampler
    from unclip.pipeline.assemble import assemble
    from unclip.prior.stage import train_prior

    if dist.launched_world_size() > 1:
        dist.start()  # every rank joins now: stages already complete are skipped by all of them alike
    folders = {"clip": "clip", "prior": _prior_folder(root), "ar_prior": "ar_prior", "decoder": "decoder"}
    model = {name: root / folder / "model" for name, folder in folders.items()}
    embeddings = root / "emb"
    upsampler_dirs = [root / f"upsampler{i}" / "model" for i in range(1, len(cfg.upsamplers) + 1)]
    timings: dict[str, float] = {}
    targets = [*((name, model[name]) for name in ("clip", "prior", "ar_prior", "decoder")),
               *(("upsamplers", target) for target in upsampler_dirs)]
    if missing := sorted({name for name, target in targets if name not in stages and not _done(target)}):
        raise ModelFormatError(f"stage(s) {', '.join(missing)} not complete under {root} and not asked for: the "
                               "model needs every stage; add them to --stages (checked before any training)")

    def learnt_from_another_clip(target: Path) -> bool:
        """A complete prior or decoder whose frozen CLIP is not the run's (CLIP was trained again since)."""
        from unclip.modeldir import read_manifest
        from unclip.pipeline.assemble import clip_fingerprint

        if target == model["clip"] or target in upsampler_dirs or not _done(model["clip"]):
            return False
        return clip_fingerprint(read_manifest(target)) != clip_fingerprint(read_manifest(model["clip"]))

    new_clip = not _done(model["clip"])  # trained in this call ("clip" is in stages, or the check above failed)
    if stale := [name for name in ("prior", "ar_prior", "decoder") if name not in stages and _done(model[name])
                 and (new_clip or learnt_from_another_clip(model[name]))]:
        which = "the one this call trains" if new_clip else f"the one at {model['clip']}"
        raise ModelFormatError(f"stage(s) {', '.join(stale)} learnt from another CLIP than {which}, so they must "
                               "train again: add them to --stages (checked before any training)")

    # a complete stage is kept whatever else changed (said below), but not across data: the model
    # assembled from stages trained on other pairs was the earlier data's, under this run's name
    kept = [(name, target) for name, target in targets if _done(target) and not (
        name in ("prior", "ar_prior", "decoder") and (new_clip or learnt_from_another_clip(target)))]
    if other_data := [(name, target, changed) for name, target in kept
                      if (changed := [c for c in _stale(name, target, cfg) if c.startswith("data.")])]:
        said = "; ".join(f"{name} at {target} ({', '.join(changed[:2])})" for name, target, changed in other_data)
        raise ConfigError(f"{root} holds stages trained on other data: {said}. Train this data in a root of its own "
                          f"(--run-dir, or --set name=NAME for runs/NAME), or delete those stages' folders to train "
                          "them again here (checked before any training)")

    def run(name: str, target: Path, fn) -> None:
        # a CLIP trained in this call is newer than any checkpoint of a stage that learns from it
        fresh = "clip" in timings and name in ("prior", "ar_prior", "decoder")
        if _done(target) and learnt_from_another_clip(target):
            log.warning("%s at %s learnt from another CLIP than %s (trained again since), so it is trained again "
                        "from the start", name, target, model["clip"])
            fresh = True
        elif _done(target):
            log.info("%s: %s is complete, skipped", name, target)
            if changed := _stale(name, target, cfg):
                log.warning("%s at %s was trained with another config (%s%s) and is kept as it is; to train it "
                            "again with this one, delete %s (its model and checkpoint) or give another --run-dir",
                            name, target, "; ".join(changed[:3]),
                            f"; {len(changed) - 3} more" if len(changed) > 3 else "", target.parent)
            return
        if name not in stages:
            raise ModelFormatError(f"stage {name} is not complete at {target} and was not asked for; "
                                   f"add it to --stages")
        start = time.monotonic()
        log.info("%s: training into %s", name, target)
        fn(resume and not fresh)  # a checkpoint of another CLIP's stage is not resumed
        dist.barrier()  # under accelerate launch: the main process has written the model the next stage reads
        timings[name] = round(time.monotonic() - start, 1)

    run("clip", model["clip"], lambda resume: train_clip(cfg, run_dir=root / "clip", out=model["clip"],
                                                         resume=resume, progress=progress, evaluate=evaluate))

    def embed() -> None:
        from unclip.clip.embed import embed_dataset
        from unclip.clip.stage import load_clip

        d = cfg.data
        from unclip.train.trainer import training_device

        if pairs < embed_pairs:
            log.info("embed: up to %d pairs (fewer if the data holds fewer), as many as the priors draw or fit on "
                     "(--embed-pairs %d)", pairs, embed_pairs)
        embed_dataset(load_clip(model["clip"]).to(training_device()), embeddings, source=d.source, path=d.path, lang=d.lang, seed=d.seed,
                      n=pairs, shard_size=5000, progress=progress, model_path=str(model["clip"]))

    # no more pairs than the priors will draw (their steps × batch) or fit their statistics on
    draws = max(c.train.steps * c.train.batch_size * c.train.grad_accum for c in (cfg.prior, cfg.ar_prior))
    pairs = min(embed_pairs, max(draws, fit_samples))

    from unclip.clip.embed import embedded_by, embeds_data

    if (embeddings / "meta.json").is_file() and not embeds_data(embeddings, cfg.data):
        # not resumable shard by shard: the same CLIP's shards of other data would be kept
        log.warning("embed: %s holds embeddings of other data than data.source=%s%s; embedding again", embeddings,
                    cfg.data.source, f" ({cfg.data.path})" if cfg.data.path else "")
        if dist.rank_world()[0] == 0:
            shutil.rmtree(embeddings, ignore_errors=True)
        dist.barrier()  # every rank sees the folder gone before it asks what to embed
    made = (embeddings / "meta.json").is_file()
    if made and embedded_by(embeddings, model["clip"]):
        log.info("embed: %s is complete, skipped", embeddings)
    elif made or {"embed", "prior", "ar_prior"} & set(stages):
        if made:  # shards of the same CLIP are kept, the others embedded again
            log.warning("embed: %s holds embeddings of another CLIP than %s; embedding again", embeddings,
                        model["clip"])
        start = time.monotonic()
        embed()
        timings["embed"] = round(time.monotonic() - start, 1)
    for kind, name in (("diffusion", "prior"), ("ar", "ar_prior")):
        run(name, model[name], lambda resume, kind=kind, name=name: train_prior(
            cfg, kind=kind, clip_dir=model["clip"], run_dir=root / folders[name], out=model[name], embeddings=embeddings,
            resume=resume, progress=progress, evaluate=evaluate, fit_samples=fit_samples))
    run("decoder", model["decoder"], lambda resume: train_decoder(
        cfg, clip_dir=model["clip"], run_dir=root / "decoder", out=model["decoder"], resume=resume,
        progress=progress, evaluate=evaluate))
    for stage, target in enumerate(upsampler_dirs, start=1):
        run("upsamplers", target, lambda resume, stage=stage, target=target: train_upsampler(
            cfg, stage=stage, run_dir=target.parent, out=target, resume=resume, progress=progress, evaluate=evaluate))
    path = Path(out)
    if dist.rank_world()[0] == 0:
        path = assemble(out, decoder=model["decoder"], prior=model["prior"], ar_prior=model["ar_prior"],
                        upsamplers=tuple(upsampler_dirs), sampling=cfg)  # sampling as asked now
    dist.barrier()
    log.info("trained %s; seconds per stage: %s", path, timings)
    return timings
