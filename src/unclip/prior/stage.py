"""Train, save and load the priors.

`train_prior(cfg, kind=..., clip_dir=...)` trains a prior against a frozen CLIP model directory,
on the fly from `cfg.data` or from an embedding folder written by `unclip embed`, evaluates it
on shapes world, and writes a model directory holding the CLIP components and the prior:
`prior/` (diffusion prior) or `ar_prior/` (autoregressive prior, an extra stage in unclip.json).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from unclip.clip.model import ClipModel
from unclip.clip.stage import load_clip, provenance
from unclip.config import UnclipConfig
from unclip.errors import ModelFormatError, UnclipError
from unclip.io import write_json_atomic
from unclip.modeldir import Manifest, load_into, read_manifest, save_model_dir, save_weights, verify_files
from unclip.prior.ar import ARPrior
from unclip.prior.pca import PCAQuantizer

log = logging.getLogger(__name__)

AR_DIR = "ar_prior"
FIT_SAMPLES = 5000  # train pairs the PCA and the dot-product buckets are fitted on


def build_ar_prior(cfg: UnclipConfig, clip: ClipModel, *, fit_samples: int = FIT_SAMPLES) -> ARPrior:
    from unclip.prior.data import sample_pairs

    pairs = sample_pairs(clip, split="train", n=fit_samples, lang=cfg.data.lang, seed=cfg.data.seed)
    torch.manual_seed(cfg.ar_prior.train.seed)
    return ARPrior.from_data(cfg.ar_prior, z_i=pairs["z_i"], z_t=pairs["z_t"], text_width=cfg.clip.text_width,
                             context_length=clip.tokenizer.context_length)


def train_prior(cfg: UnclipConfig, *, kind: str, clip_dir: str | Path, run_dir: str | Path, out: str | Path,
                embeddings: str | Path | None = None, resume: bool = True, progress: bool = True,
                evaluate: bool = True, fit_samples: int = FIT_SAMPLES) -> Path:
    """Train the `kind` ("ar" or "diffusion") prior and write a model directory at `out`."""
    from unclip.prior.data import embedding_feed, on_the_fly_feed
    from unclip.train.data import feed_for
    from unclip.train.trainer import train

    if kind != "ar":
        raise UnclipError(f"prior kind {kind!r} is not available yet; use --kind ar")
    clip = load_clip(clip_dir)
    tc = cfg.ar_prior.train
    prior = build_ar_prior(cfg, clip, fit_samples=fit_samples)
    if embeddings:
        from unclip.clip.embed import load_embeddings

        feed = embedding_feed(clip, load_embeddings(embeddings), batch_size=tc.batch_size, seed=cfg.data.seed)
    else:
        feed = on_the_fly_feed(clip, feed_for(cfg.data, size=cfg.clip.image_size, batch_size=tc.batch_size,
                                              num_workers=tc.num_workers))
    result = train(prior, feed, cfg=tc, run_dir=run_dir, run_config=cfg.to_dict(), resume=resume,
                   progress=progress, stage_name="ar_prior")
    evaluation = {}
    if evaluate and cfg.data.source == "shapes":
        from unclip.prior.metrics import evaluate_prior

        evaluation = evaluate_prior(clip, ar_predictor(prior, guidance_scale=1.0), progress=progress)
    save_prior(clip, prior, out, cfg=cfg, clip_dir=clip_dir, evaluation=evaluation,
               provenance=provenance(seconds=result.seconds, steps=result.step, final_metrics=result.metrics))
    return Path(out)


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

    manifest = Manifest(
        config=cfg.to_dict(),
        stats={**clip_manifest.stats, "ar_prior_components": prior.quantizer.components,
               "ar_prior_explained_variance": float(prior.quantizer.explained[-1])},
        extra={"components": ["tokenizer", "text_encoder", "image_encoder", AR_DIR]},
        provenance={"clip": clip_manifest.provenance, "ar_prior": provenance},
        evaluation={**clip_manifest.evaluation, "ar_prior": evaluation},
    )
    return save_model_dir(directory, manifest, components)


def load_ar_prior(directory: str | Path) -> ARPrior:
    directory = Path(directory)
    manifest = read_manifest(directory)
    verify_files(directory, manifest)
    config_path = directory / AR_DIR / "config.json"
    if not config_path.is_file():
        raise ModelFormatError(f"{config_path} is missing: {directory} holds no autoregressive prior")
    try:
        shape = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ModelFormatError(f"{config_path} is corrupt: {err}") from None
    cfg = UnclipConfig.from_dict(manifest.config)
    quantizer = PCAQuantizer(dim=shape["dim"], components=shape["components"], buckets=shape["buckets"])
    from unclip.prior.ar import DOT_BUCKETS

    prior = ARPrior(config=cfg.ar_prior, text_width=shape["text_width"], context_length=shape["context_length"],
                    quantizer=quantizer, dot_edges=torch.zeros(DOT_BUCKETS - 1))
    return load_into(prior, directory / AR_DIR / "model.safetensors").eval()
