"""Train, save and load the priors.

`train_prior(cfg, kind=..., clip_dir=...)` trains a prior against a frozen CLIP model directory,
on the fly from `cfg.data` or from an embedding folder written by `unclip embed`, evaluates it
on shapes world, and writes a model directory holding the CLIP components and the prior:

- diffusion prior, in the diffusers unCLIP layout: `prior/` (PriorTransformer.save_pretrained,
  its clip_mean / clip_std holding the normalisation statistics), `prior_scheduler/` (the
  training process as a diffusers scheduler config) and `prior_cond/` (unclip's own: the text
  width adapter and the learned nulls for guidance, config.json + model.safetensors);
- autoregressive prior: `ar_prior/`, an extra stage in unclip.json.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from unclip.clip.model import ClipModel
from unclip.clip.stage import load_clip, provenance, stage_manifest, warn_if_other_data
from unclip.config import UnclipConfig
from unclip.errors import ConfigError, DataError, ModelFormatError, UnclipError
from unclip.io import write_json_atomic
from unclip.modeldir import check_replaceable, continued, init_record, load_into, read_manifest, save_model_dir, save_weights, verify_files
from unclip.prior.ar import ARPrior
from unclip.prior.diffusion import DiffusionPrior
from unclip.prior.pca import PCAQuantizer

log = logging.getLogger(__name__)

AR_DIR = "ar_prior"
PRIOR_DIR, PRIOR_SCHEDULER_DIR, PRIOR_COND_DIR = "prior", "prior_scheduler", "prior_cond"
PRIOR_WEIGHTS = "diffusion_pytorch_model.safetensors"
KINDS = ("diffusion", "ar")
FIT_SAMPLES = 5000  # train pairs the PCA and the dot-product buckets are fitted on


def build_ar_prior(cfg: UnclipConfig, clip: ClipModel, *, fit_samples: int = FIT_SAMPLES,
                   embeddings: dict | None = None) -> ARPrior:
    """A fresh AR prior whose PCA basis and dot-product buckets are fitted on `fit_samples` training
    pairs (`unclip.prior.data.fit_pairs`: from `cfg.data`, or `embeddings` of them)."""
    from unclip.prior.data import fit_pairs

    pairs = fit_pairs(clip, cfg.data, n=fit_samples, embeddings=embeddings)
    torch.manual_seed(cfg.ar_prior.train.seed)
    return ARPrior.from_data(cfg.ar_prior, z_i=pairs["z_i"], z_t=pairs["z_t"], text_width=cfg.clip.text_width,
                             context_length=clip.tokenizer.context_length)


def build_diffusion_prior(cfg: UnclipConfig, clip: ClipModel, *, fit_samples: int = FIT_SAMPLES,
                          embeddings: dict | None = None) -> DiffusionPrior:
    """A fresh diffusion prior whose normalisation statistics come from `fit_samples` training z_i
    (`unclip.prior.data.fit_pairs`: from `cfg.data`, or `embeddings` of them)."""
    from unclip.prior.data import fit_pairs

    pairs = fit_pairs(clip, cfg.data, n=fit_samples, embeddings=embeddings)
    torch.manual_seed(cfg.prior.train.seed)
    return DiffusionPrior.from_data(cfg.prior, z_i=pairs["z_i"], text_width=clip.config.text_width,
                                    context_length=clip.tokenizer.context_length)


def train_prior(cfg: UnclipConfig, *, kind: str, clip_dir: str | Path, run_dir: str | Path, out: str | Path,
                embeddings: str | Path | None = None, resume: bool = True, progress: bool = True,
                evaluate: bool = True, fit_samples: int = FIT_SAMPLES, time_budget: float | None = None,
                init: str | Path | None = None) -> Path:
    """Train the `kind` ("diffusion" or "ar") prior and write a model directory at `out`.

    init: a model directory whose `kind` prior the run starts from, normalisation statistics (diffusion)
    or PCA and dot buckets (AR) included, e.g. to retrain the shipped priors against a CLIP whose text
    tower was fine-tuned (a checkpoint in `run_dir` still wins)."""
    check_replaceable(out)
    from unclip.prior.data import embedding_feed, on_the_fly_feed
    from unclip.train.data import feed_for, validation_feed
    from unclip.train.trainer import train, training_device

    if kind not in KINDS:
        raise UnclipError(f"unknown prior kind {kind!r}; use one of {', '.join(KINDS)}")
    warn_if_other_data(cfg, clip_dir, f"{kind} prior")
    clip = load_clip(clip_dir)
    if embeddings:
        from unclip.clip.embed import embedded_by, load_embeddings
        from unclip.prior.data import training_rows

        if (Path(embeddings) / "meta.json").is_file() and not embedded_by(embeddings, clip_dir):
            raise DataError(f"the embeddings at {embeddings} were made by another CLIP than --clip {clip_dir}; a "
                            f"prior learns z_t → z_i of one CLIP: embed again with `unclip embed {clip_dir} --out DIR`")
        embeddings = training_rows(load_embeddings(embeddings), cfg.data.holdout)
    build = build_diffusion_prior if kind == "diffusion" else build_ar_prior
    tc = cfg.prior.train if kind == "diffusion" else cfg.ar_prior.train
    started_from = {}
    if init:  # the trained prior as it is, statistics and all (the AR prior's PCA fixes its shape)
        section = "prior" if kind == "diffusion" else "ar_prior"
        started_from = {"init": init_record(init, section, getattr(cfg, section), record=f"{kind}_prior")}
        theirs = UnclipConfig.from_dict(read_manifest(init).config)
        if (theirs.clip.embed_dim, theirs.clip.text_width, theirs.tokenizer.context_length) != (
                clip.config.embed_dim, clip.config.text_width, clip.tokenizer.context_length):
            raise ConfigError(f"--init {init}: its prior reads another CLIP's shapes (embedding, text width, context) "
                              f"than {clip_dir}'s; start from a prior trained against this CLIP or one it was tuned from")
        prior = (load_diffusion_prior if kind == "diffusion" else load_ar_prior)(init)
        prior.config = getattr(cfg, section)  # this run's training and sampling settings, same network
    else:
        prior = build(cfg, clip, fit_samples=fit_samples, embeddings=embeddings or None)
    data = cfg.data
    if init:
        data, tc = continued(init, (section,), data, tc, started_from["init"])
    if embeddings:
        feed = embedding_feed(clip, embeddings, batch_size=tc.batch_size, seed=data.seed)
    else:
        feed = on_the_fly_feed(clip, feed_for(data, size=cfg.clip.image_size, batch_size=tc.batch_size,
                                              num_workers=tc.num_workers))
    clip.to(training_device())  # encodes each batch's captions where the prior trains
    val = validation_feed(cfg.data, tc, size=cfg.clip.image_size)
    result = train(prior, feed, cfg=tc, run_dir=run_dir, run_config=cfg.to_dict(), resume=resume,
                   progress=progress, stage_name=f"{kind}_prior", time_budget=time_budget,
                   val_batches=on_the_fly_feed(clip, val) if val else None)
    clip.cpu()
    if not result.main_process:
        return Path(out)  # under accelerate launch the main process evaluates and writes the model
    evaluation = {}
    predict = diffusion_predictor(prior) if kind == "diffusion" else ar_predictor(prior, guidance_scale=1.0)
    if evaluate and cfg.data.source == "shapes":
        from unclip.prior.metrics import evaluate_prior

        evaluation = evaluate_prior(clip, predict, progress=progress)
    elif evaluate:
        from unclip.prior.data import encode_batch
        from unclip.prior.metrics import cosine_metrics
        from unclip.train.data import EVALUATION_PAIRS, evaluation_pairs

        images, captions, label = evaluation_pairs(cfg.data, EVALUATION_PAIRS, size=clip.config.image_size)
        metrics = cosine_metrics(predict, encode_batch(clip, captions, images=images))
        evaluation = {"data": label,
                      **{k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}}
        log.info("%s prior: %s", kind, evaluation)
    save = save_diffusion_prior if kind == "diffusion" else save_prior
    save(clip, prior, out, cfg=cfg, clip_dir=clip_dir, evaluation=evaluation,
         provenance=provenance(result, **started_from))
    return Path(out)


def diffusion_predictor(prior: DiffusionPrior, **options):
    """predict(text_states, text_mask, z_t, generator) → z_i [B, D]; `options` go to `DiffusionPrior.sample`
    (guidance_scale, best_of, steps, sampler, eta; unset: the config's)."""
    def predict(text_states, text_mask, z_t, generator):
        return prior.sample(text_states, text_mask, z_t, generator=generator, **options)

    return predict


def ar_predictor(prior: ARPrior, *, guidance_scale: float):
    def predict(text_states, text_mask, z_t, generator):
        return prior.sample(text_states, text_mask, z_t, guidance_scale=guidance_scale, generator=generator)

    return predict


def save_prior(clip: ClipModel, prior: ARPrior, directory: str | Path, *, cfg: UnclipConfig, clip_dir: str | Path,
               evaluation: dict, provenance: dict) -> Path:
    clip_manifest = read_manifest(clip_dir)

    def components(tmp: Path) -> None:
        clip.save_components(tmp)
        write_json_atomic(tmp / AR_DIR / "config.json", {
            "components": prior.quantizer.components, "dim": int(prior.quantizer.mean.shape[0]),
            "buckets": prior.quantizer.buckets, "text_width": cfg.clip.text_width,
            "context_length": clip.tokenizer.context_length})
        save_weights(tmp / AR_DIR / "model.safetensors", prior.state_dict())

    manifest = stage_manifest(cfg, clip_manifest, "ar_prior", components=[AR_DIR], provenance=provenance,
                              evaluation=evaluation,
                              stats={"ar_prior_components": prior.quantizer.components,
                                     "ar_prior_explained_variance": float(prior.quantizer.explained[-1])})
    return save_model_dir(directory, manifest, components)


def _read_prior(directory: Path, shape_file: Path, *, needs: tuple[Path, ...] = (), keys: tuple[str, ...],
                what: str) -> tuple[UnclipConfig, dict]:
    """(config, the JSON at `shape_file`, whole numbers under `keys`) of a model directory that reads
    back and holds `shape_file` and `needs`; ModelFormatError, saying it holds no `what`, otherwise."""
    manifest = read_manifest(directory)
    verify_files(directory, manifest)
    for path in (*needs, shape_file):
        if not path.is_file():
            raise ModelFormatError(f"{path} is missing: {directory} holds no {what}")
    try:
        shape = json.loads(shape_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ModelFormatError(f"{shape_file} is corrupt: {err}") from None
    missing = [key for key in keys if not isinstance(shape, dict) or type(shape.get(key)) is not int]
    if missing:  # was a KeyError
        raise ModelFormatError(f"{shape_file} lacks the whole number(s) {', '.join(missing)} of the {what}'s shape; "
                               "the file was edited or damaged (copy the model again, or re-run the command that "
                               "wrote it)")
    return UnclipConfig.from_dict(manifest.config), shape


def load_ar_prior(directory: str | Path) -> ARPrior:
    """The autoregressive prior of a model directory, built from its config and loaded strictly (eval mode)."""
    directory = Path(directory)
    cfg, shape = _read_prior(directory, directory / AR_DIR / "config.json", what="autoregressive prior",
                             keys=("dim", "components", "buckets", "text_width", "context_length"))
    quantizer = PCAQuantizer(dim=shape["dim"], components=shape["components"], buckets=shape["buckets"])
    from unclip.prior.ar import DOT_BUCKETS

    prior = ARPrior(config=cfg.ar_prior, text_width=shape["text_width"], context_length=shape["context_length"],
                    quantizer=quantizer, dot_edges=torch.zeros(DOT_BUCKETS - 1))
    return load_into(prior, directory / AR_DIR / "model.safetensors").eval()


# --- diffusion prior (diffusers unCLIP layout) -------------------------------------------------


def prior_scheduler(cfg: UnclipConfig):
    """The training process as the diffusers scheduler an UnCLIPPipeline's `prior_scheduler` expects."""
    from diffusers import DDPMScheduler, UnCLIPScheduler

    from unclip.diffusion import diffusers_beta_args

    pc = cfg.prior
    if pc.noise_schedule == "cosine":
        return UnCLIPScheduler(num_train_timesteps=pc.timesteps, variance_type="fixed_small_log", clip_sample=False,
                               prediction_type=pc.prediction_type)
    return DDPMScheduler(**diffusers_beta_args(pc.noise_schedule, pc.timesteps), prediction_type=pc.prediction_type,
                         clip_sample=False)


def save_diffusion_prior(clip: ClipModel, prior: DiffusionPrior, directory: str | Path, *, cfg: UnclipConfig,
                         clip_dir: str | Path, evaluation: dict, provenance: dict) -> Path:
    """Write a model directory holding the CLIP components and the diffusion prior, atomically."""
    clip_manifest = read_manifest(clip_dir)

    def components(tmp: Path) -> None:
        clip.save_components(tmp)
        prior.transformer.save_pretrained(tmp / PRIOR_DIR)
        prior_scheduler(cfg).save_pretrained(tmp / PRIOR_SCHEDULER_DIR)
        write_json_atomic(tmp / PRIOR_COND_DIR / "config.json", prior.cond.config)
        save_weights(tmp / PRIOR_COND_DIR / "model.safetensors", prior.cond.state_dict())

    std = prior.transformer.clip_std.detach()
    manifest = stage_manifest(cfg, clip_manifest, "diffusion_prior",
                              components=[PRIOR_DIR, PRIOR_SCHEDULER_DIR, PRIOR_COND_DIR], provenance=provenance,
                              evaluation=evaluation,
                              stats={"prior_normalization": cfg.prior.normalization,
                                     "prior_z_i_mean_norm": float(prior.transformer.clip_mean.detach().norm()),
                                     "prior_z_i_std_mean": float(std.mean())})
    return save_model_dir(directory, manifest, components)


def load_diffusion_prior(directory: str | Path) -> DiffusionPrior:
    """The diffusion prior of a model directory, built from its config and loaded strictly (eval mode)."""
    directory = Path(directory)
    weights = directory / PRIOR_DIR / PRIOR_WEIGHTS
    cfg, shape = _read_prior(directory, directory / PRIOR_COND_DIR / "config.json", needs=(weights,),
                             keys=("clip_dim", "text_width", "context_length"), what="diffusion prior")
    prior = DiffusionPrior(config=cfg.prior, clip_dim=shape["clip_dim"], text_width=shape["text_width"],
                           context_length=shape["context_length"])
    load_into(prior.transformer, weights)
    load_into(prior.cond, directory / PRIOR_COND_DIR / "model.safetensors")
    return prior.eval()
