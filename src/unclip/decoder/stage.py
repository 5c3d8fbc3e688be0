"""Train, save and load the decoder and the upsamplers as model directories (DESIGN §4).

Decoder directory: the frozen CLIP's `tokenizer/`, `text_encoder/`, `image_encoder/` (so the
directory decodes on its own), `decoder/` (UNet2DConditionModel.save_pretrained), `text_proj/`
(config.json + model.safetensors) and `decoder_scheduler/` (a diffusers DDPMScheduler config
with the training schedule), plus `unclip.json` whose config is the full UnclipConfig.

Upsampler directory: the first ×4 stage in `super_res_first/` + `super_res_scheduler/`; a
second ×4 stage, an extra stage of unclip's own (DESIGN §4), in `super_res_second/` +
`super_res_second_scheduler/`. In diffusers' unCLIP layout `super_res_last/` is the same
first stage's network for its final step, so unclip never writes its second stage there.

Loading builds the networks from the config in `unclip.json` and loads weights strictly.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch

from unclip.clip.model import ClipModel
from unclip.clip.stage import load_clip, provenance, stage_manifest, warn_if_other_data
from unclip.config import UnclipConfig
from unclip.decoder.model import Decoder
from unclip.decoder.upsampler import Upsampler
from unclip.diffusion import diffusers_beta_args
from unclip.errors import ConfigError, ModelFormatError
from unclip.io import write_json_atomic
from unclip.modeldir import (CLIP_COMPONENTS, Manifest, check_replaceable, continued, init_from, load_into,
                             read_manifest, save_model_dir, save_weights, verify_files)

log = logging.getLogger(__name__)

DECODER_DIR, TEXT_PROJ_DIR, DECODER_SCHEDULER_DIR = "decoder", "text_proj", "decoder_scheduler"
UPSAMPLER_DIRS = {1: ("super_res_first", "super_res_scheduler"),
                  2: ("super_res_second", "super_res_second_scheduler")}
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"


def diffusers_scheduler(*, schedule: str, timesteps: int, variance: str, prediction_type: str):
    """The training process as a diffusers DDPMScheduler (what `*_scheduler/` directories hold)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**diffusers_beta_args(schedule, timesteps), variance_type=variance,
                         prediction_type=prediction_type, clip_sample=True)


def _stage_index(cfg: UnclipConfig, stage: int) -> int:
    if stage not in range(1, len(cfg.upsamplers) + 1):
        raise ConfigError(f"upsampler stage {stage} is not configured; this config has "
                          f"{len(cfg.upsamplers)} upsampler stage(s) (config key upsamplers; "
                          "--set upsamplers.1.… adds a second)")
    return stage - 1


def _check_same_clip(init, clip_dir, clip: ClipModel) -> None:
    """A ConfigError unless the decoder at `init` learnt from the CLIP at `clip_dir` or from one it was
    fine-tuned from (`unclip train clip --init`, as scripts/rebase_default_gpu.sh continues the shipped
    decoder on a relation-aware CLIP): continued against an unrelated CLIP, its weights would read
    z_i and caption states of another space, silently. With a recorded history the CLIP's lineage
    decides; without one (CLIPs saved with no provenance), the same embeddings of a few renders and
    captions (its files may differ in precision)."""
    from unclip.clip.stage import clip_records

    if not all((Path(init) / part).is_dir() for part in CLIP_COMPONENTS):
        return  # no CLIP beside its decoder (an imported model's layout): nothing to compare
    learnt_from = clip_records(read_manifest(init))[0]
    if learnt_from:
        step = clip_records(read_manifest(clip_dir))[0]
        while step and step != learnt_from:  # back through the CLIP's own --init history
            step = (step.get("init") or {}).get("provenance") or {}
        same = bool(step)
    else:
        same = _same_embeddings(clip, load_clip(init).to(clip.device))
    if not same:
        raise ConfigError(f"--init {init}: its decoder learnt from another CLIP than --clip gives, and --clip was "
                          f"not fine-tuned from it; continue it with the CLIP it learnt from (--clip {init})")


def _same_embeddings(ours: ClipModel, theirs: ClipModel) -> bool:
    """Whether two CLIPs embed a few val renders and their captions alike (cosine > 0.99)."""
    from unclip.data.render import render
    from unclip.data.shapes import to_tensor
    from unclip.data.world import sample

    if (theirs.config.embed_dim, theirs.config.image_size) != (ours.config.embed_dim, ours.config.image_size):
        return False
    samples = [sample("val", i) for i in range(4)]
    images = torch.stack([to_tensor(render(s.scene, ours.config.image_size)) for s in samples])
    captions = [s.caption for s in samples]
    with torch.no_grad():
        pairs = ((ours.encode_image(images), theirs.encode_image(images)),
                 (ours.encode_captions(captions), theirs.encode_captions(captions)))
    return all(float((a * b).sum(1).min()) > 0.99 for a, b in pairs)


# --- decoder ---------------------------------------------------------------------------------


VALIDATION_PAIRS_SEED = 104729  # the upsampler's validation degradations and crops, the same at every pass


def with_clip_config(cfg: UnclipConfig, clip_dir: str | Path) -> UnclipConfig:
    """`cfg` with its clip and tokenizer sections taken from the CLIP model it trains against."""
    clip_cfg = UnclipConfig.from_dict(read_manifest(clip_dir).config)
    return replace(cfg, clip=clip_cfg.clip, tokenizer=clip_cfg.tokenizer)


def build_decoder(cfg: UnclipConfig) -> Decoder:
    return Decoder.from_config(cfg.decoder, clip_dim=cfg.clip.embed_dim, text_width=cfg.clip.text_width)


def train_decoder(cfg: UnclipConfig, *, clip_dir: str | Path, run_dir: str | Path, out: str | Path,
                  resume: bool = True, progress: bool = True, evaluate: bool = True, eval_samples: int = 16,
                  time_budget: float | None = None, init: str | Path | None = None) -> Path:
    """Train the decoder on `cfg.data`, encoded on the fly by the frozen CLIP at `clip_dir`; write `out`.

    init: a model directory whose decoder weights the run starts from (a checkpoint in `run_dir`
    still wins, so an interrupted run resumes where it was)."""
    check_replaceable(out)
    from unclip.decoder.data import decoder_feed
    from unclip.train.data import evaluation_pairs, feed_for, validation_feed
    from unclip.train.trainer import train, training_device

    cfg = with_clip_config(cfg, clip_dir)
    warn_if_other_data(cfg, clip_dir, "decoder")
    clip = load_clip(clip_dir).to(training_device())  # encodes each batch where the decoder trains
    tc = cfg.decoder.train
    torch.manual_seed(tc.seed)
    decoder = build_decoder(cfg)
    started_from, data = {}, cfg.data
    if init:
        _check_same_clip(init, clip_dir, clip)
        parts = {f"{DECODER_DIR}/{UNET_WEIGHTS}": decoder.unet, f"{TEXT_PROJ_DIR}/model.safetensors": decoder.text_proj}
        started_from = {"init": init_from(parts, init, "decoder", cfg.decoder)}
        data, tc = continued(init, (DECODER_DIR, TEXT_PROJ_DIR), data, tc, started_from["init"])
    side = max(cfg.clip.image_size, cfg.decoder.resolution)
    images = feed_for(data, size=side, batch_size=tc.batch_size, num_workers=tc.num_workers)
    val = validation_feed(cfg.data, tc, size=side)
    result = train(decoder, decoder_feed(clip, images, resolution=cfg.decoder.resolution), cfg=tc, run_dir=run_dir,
                   run_config=cfg.to_dict(), resume=resume, progress=progress, stage_name="decoder",
                   time_budget=time_budget,
                   val_batches=decoder_feed(clip, val, resolution=cfg.decoder.resolution) if val else None)
    if not result.main_process:
        return Path(out)
    clip.cpu()
    evaluation = {}
    if evaluate and eval_samples > 0:
        from unclip.decoder.metrics import decode_clip_similarity

        own = None if cfg.data.source == "shapes" else evaluation_pairs(cfg.data, eval_samples, size=side)
        evaluation = decode_clip_similarity(decoder, clip, n=eval_samples, sheet=Path(run_dir) / "samples.png",
                                            pairs=own[:2] if own else None)
        if own:
            evaluation["split"] = own[2]
        log.info("decoder CLIP similarity %s", evaluation)
    save_decoder(decoder, clip, out, cfg=cfg, clip_dir=clip_dir, evaluation=evaluation,
                 provenance=provenance(result, **started_from))
    log.info("decoder model written to %s", out)
    return Path(out)


def save_decoder(decoder: Decoder, clip: ClipModel, directory: str | Path, *, cfg: UnclipConfig,
                 clip_dir: str | Path | None = None, evaluation: dict | None = None,
                 provenance: dict | None = None) -> Path:
    """Write a decoder model directory (with the CLIP it was trained against) atomically."""
    clip_manifest = read_manifest(clip_dir) if clip_dir else None
    dc = cfg.decoder

    def components(tmp: Path) -> None:
        clip.save_components(tmp)
        decoder.unet.save_pretrained(tmp / DECODER_DIR)
        write_json_atomic(tmp / TEXT_PROJ_DIR / "config.json", decoder.text_proj.config)
        save_weights(tmp / TEXT_PROJ_DIR / "model.safetensors", decoder.text_proj.state_dict())
        diffusers_scheduler(schedule=dc.noise_schedule, timesteps=dc.timesteps, variance=dc.variance,
                            prediction_type=dc.prediction_type).save_pretrained(tmp / DECODER_SCHEDULER_DIR)

    if clip_manifest is None:  # a CLIP with no directory of its own (tests, conversions): its temperature only
        clip_manifest = Manifest(config=cfg.to_dict(), stats={"clip_logit_scale": float(clip.logit_scale.detach())})
    manifest = stage_manifest(cfg, clip_manifest, "decoder", components=[DECODER_DIR, TEXT_PROJ_DIR, DECODER_SCHEDULER_DIR],
                              provenance=provenance, evaluation=evaluation, resolutions=(dc.resolution,))
    return save_model_dir(directory, manifest, components)


def load_decoder(directory: str | Path) -> Decoder:
    """The decoder of a model directory, built from its config and loaded strictly (eval mode)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    verify_files(directory, manifest)
    cfg = UnclipConfig.from_dict(manifest.config)
    unet_weights, proj_weights = directory / DECODER_DIR / UNET_WEIGHTS, directory / TEXT_PROJ_DIR / "model.safetensors"
    for path in (unet_weights, proj_weights):
        if not path.is_file():
            raise ModelFormatError(f"{path} is missing: {directory} holds no decoder")
    decoder = build_decoder(cfg)
    load_into(decoder.unet, unet_weights)
    load_into(decoder.text_proj, proj_weights)
    return decoder.eval()


# --- upsamplers ------------------------------------------------------------------------------


def train_upsampler(cfg: UnclipConfig, *, stage: int, run_dir: str | Path, out: str | Path, resume: bool = True,
                    progress: bool = True, evaluate: bool = True, eval_samples: int = 16,
                    time_budget: float | None = None, init: str | Path | None = None) -> Path:
    """Train ×4 upsampler `stage` (1 or 2) of `cfg.upsamplers` on `cfg.data`; write the model directory `out`.

    init: a model directory holding this upsampler stage to start from (see `train_decoder`)."""
    check_replaceable(out)
    from unclip.decoder.data import upsampler_feed
    from unclip.train.data import evaluation_pairs, feed_for, validation_feed
    from unclip.train.trainer import train, training_device

    uc = cfg.upsamplers[_stage_index(cfg, stage)]
    if stage > 1 and uc.degradation == "blur":
        log.warning("upsampler stage %d degrades its conditioning by blur; the paper's later stages use BSR "
                    "(--set upsamplers.%d.degradation=bsr)", stage, stage - 1)
    tc = uc.train
    torch.manual_seed(tc.seed)
    upsampler = Upsampler.from_config(uc)
    started_from, data = {}, cfg.data
    if init:
        parts = {f"{UPSAMPLER_DIRS[stage][0]}/{UNET_WEIGHTS}": upsampler.unet}
        started_from = {"init": init_from(parts, init, f"upsampler{stage}", uc)}
        data, tc = continued(init, (UPSAMPLER_DIRS[stage][0],), data, tc, started_from["init"])
    images = feed_for(data, size=uc.out_resolution, batch_size=tc.batch_size, num_workers=tc.num_workers)
    feed = upsampler_feed(images, uc, batch_size=tc.batch_size, seed=data.seed + 1000 * stage,
                          device=training_device())
    val = validation_feed(cfg.data, tc, size=uc.out_resolution)
    result = train(upsampler, feed, cfg=tc, run_dir=run_dir, run_config=cfg.to_dict(), resume=resume,
                   progress=progress, stage_name=f"upsampler{stage}", time_budget=time_budget,
                   val_batches=upsampler_feed(val, uc, batch_size=tc.batch_size, seed=VALIDATION_PAIRS_SEED,
                                              device=training_device()) if val else None)
    if not result.main_process:
        return Path(out)
    evaluation = {}
    if evaluate and eval_samples > 0:
        from unclip.decoder.metrics import upsampler_quality

        own = None if cfg.data.source == "shapes" else evaluation_pairs(cfg.data, eval_samples, size=uc.out_resolution)
        evaluation = upsampler_quality(upsampler, n=eval_samples, sheet=Path(run_dir) / "samples.png",
                                       images=own[0] if own else None)
        if own:
            evaluation["split"] = own[2]
        log.info("upsampler %d quality %s", stage, evaluation)
    save_upsampler(upsampler, out, cfg=cfg, stage=stage, evaluation=evaluation,
                   provenance=provenance(result, **started_from))
    log.info("upsampler %d written to %s", stage, out)
    return Path(out)


def save_upsampler(upsampler: Upsampler, directory: str | Path, *, cfg: UnclipConfig, stage: int,
                   evaluation: dict | None = None, provenance: dict | None = None) -> Path:
    """Write an upsampler model directory holding stage `stage` atomically."""
    uc = cfg.upsamplers[_stage_index(cfg, stage)]
    unet_dir, scheduler_dir = UPSAMPLER_DIRS[stage]

    def components(tmp: Path) -> None:
        upsampler.unet.save_pretrained(tmp / unet_dir)
        diffusers_scheduler(schedule=uc.noise_schedule, timesteps=uc.timesteps, variance=uc.variance,
                            prediction_type=uc.prediction_type).save_pretrained(tmp / scheduler_dir)

    name = f"upsampler{stage}"
    manifest = Manifest(
        config=cfg.to_dict(),
        resolutions=(uc.in_resolution, uc.out_resolution),
        extra={"components": [unet_dir, scheduler_dir], "upsampler_stages": {str(stage): unet_dir}},
        provenance={name: provenance or {}},
        evaluation={name: evaluation} if evaluation else {},
    )
    return save_model_dir(directory, manifest, components)


def load_upsampler(directory: str | Path, stage: int) -> Upsampler:
    """Upsampler `stage` (1 or 2) of a model directory, built from its config, loaded strictly (eval mode)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    verify_files(directory, manifest)
    cfg = UnclipConfig.from_dict(manifest.config)
    uc = cfg.upsamplers[_stage_index(cfg, stage)]
    weights = directory / UPSAMPLER_DIRS[stage][0] / UNET_WEIGHTS
    if not weights.is_file():
        raise ModelFormatError(f"{weights} is missing: {directory} holds no upsampler stage {stage}")
    upsampler = Upsampler.from_config(uc)
    load_into(upsampler.unet, weights)
    return upsampler.eval()
