"""Import a diffusers-layout unCLIP model (kakaobrain/karlo-v1-alpha) as an unclip pipeline.

`load_diffusers(path)` builds an `UnclipPipeline` straight from a directory holding
`model_index.json` and the components of diffusers' UnCLIPPipeline (or UnCLIPImageVariationPipeline):

    tokenizer/ text_encoder/ prior/ prior_scheduler/ text_proj/ decoder/ decoder_scheduler/
    super_res_first/ super_res_last/ super_res_scheduler/ [image_encoder/ feature_extractor/]

Each network keeps its own diffusers / transformers config and weights; the adapters in
`unclip.pipeline.karlo` make it compute what diffusers computes, and every unclip task
(generate, variations, interpolate, text_diff, inpaint, pca_probe) runs on it. What maps
exactly and what is approximated: docs/interop.md.

`import_diffusers(src, out)` writes such a directory as an unclip model: the components (hard
links where possible), an optional image encoder taken from elsewhere (Karlo's text-to-image
repository has none), an optional PCA basis of z_i for `pca_probe` (`fit_pca`) in `pca/`, and
`unclip.json` with `extra.layout = "diffusers"`, so `unclip.load(out)` and every CLI verb use it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch

from unclip.config import (ClipConfig, DecoderConfig, PriorConfig, TokenizerConfig, UnclipConfig, UpsamplerConfig,
                           check, resolutions)
from unclip.errors import ConfigError, DataError, ModelFormatError, UnclipError
from unclip.modeldir import MANIFEST, Manifest, check_replaceable, load_into, read_manifest, save_model_dir, save_weights, verify_files

log = logging.getLogger(__name__)

LAYOUT = "diffusers"
REQUIRED = ("tokenizer", "text_encoder", "decoder", "text_proj", "decoder_scheduler")
PCA_DIR = "pca"
# What diffusers' UnCLIPPipeline uses by default (prior / decoder / super-res steps, guidance scales).
DEFAULTS = {"prior_steps": 25, "decoder_steps": 25, "super_res_steps": 7, "prior_guidance": 4.0,
            "decoder_guidance": 8.0}
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def is_diffusers_dir(path: str | Path) -> bool:
    """True for a directory in the diffusers layout (`model_index.json`) not written by unclip's own stages."""
    directory = Path(path)
    if not (directory / "model_index.json").is_file():
        return False
    return not (directory / MANIFEST).is_file() or read_manifest(directory).extra.get("layout") == LAYOUT


def _json(path: Path) -> dict:
    if not path.is_file():
        raise ModelFormatError(f"{path} is missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelFormatError(f"{path} is truncated or corrupt: {err}") from None


def diffusion_process(scheduler_dir: Path) -> dict:
    """A diffusers scheduler config → unclip's process: timesteps, noise_schedule, prediction_type,
    variance ("fixed_small" / "learned_range") and clip_range (None when x_start is not clipped)."""
    cfg = _json(scheduler_dir / "scheduler_config.json")
    steps = int(cfg.get("num_train_timesteps", 1000))
    default = "squaredcos_cap_v2" if cfg.get("_class_name") == "UnCLIPScheduler" else "linear"
    schedule = cfg.get("beta_schedule", default)
    if schedule == "squaredcos_cap_v2":
        noise_schedule = "cosine"
    elif schedule == "linear" and abs(cfg.get("beta_start", 1e-4) - 0.1 / steps) < 1e-9 \
            and abs(cfg.get("beta_end", 0.02) - 20 / steps) < 1e-9:
        noise_schedule = "linear"
    else:
        raise ModelFormatError(f"{scheduler_dir}: beta schedule {schedule!r} with these betas is not one unclip "
                               "implements (cosine, or DDPM's linear 1e-4…0.02 at 1000 steps)")
    variance = {"fixed_small_log": "fixed_small", "fixed_small": "fixed_small",
                "learned_range": "learned_range"}.get(cfg.get("variance_type", "fixed_small"))
    prediction = cfg.get("prediction_type", "epsilon")
    if variance is None or prediction not in ("epsilon", "sample", "v_prediction"):
        raise ModelFormatError(f"{scheduler_dir}: variance_type {cfg.get('variance_type')!r} / prediction_type "
                               f"{prediction!r} are not supported (fixed_small[_log] or learned_range; epsilon, "
                               "sample or v_prediction)")
    clip_range = float(cfg.get("clip_sample_range", 1.0)) if cfg.get("clip_sample", True) else None
    return {"timesteps": steps, "noise_schedule": noise_schedule, "prediction_type": prediction, "variance": variance,
            "clip_range": clip_range}


def _defaults(directory: Path) -> dict:
    """Sampling defaults of an imported model: Karlo's (`DEFAULTS`), or, for an unclip export, the
    exported model's own, which its `unclip_export.json` records (guidance that suits Karlo, 8, spoils
    a model trained to sample unguided)."""
    recorded = directory / "unclip_export.json"
    record = _json(recorded) if recorded.is_file() else None
    own = (record or {}).get("sampling", {})
    samplers = {"decoder_sampler": "ddpm", "prior_sampler": "ddpm", "super_res_sampler": "ddpm", "super_res_start": 1.0,
                "decoder_eta": 0.0, "prior_eta": 0.0, "super_res_eta": 0.0,
                "prior_best_of": 1, "candidates": 1, "upsampled_candidates": 1}  # diffusers draws one of each
    mirrored = record is not None and record.get("z_t") == "layernorm-mirror"
    return {**DEFAULTS, **samplers, **{k: v for k, v in own.items() if k in DEFAULTS or k in samplers},
            "unclip_export": record is not None,
            "z_t_mirror": int(record["embedding_dim"]) if mirrored else None}  # its text projection's D


SHIM_SETTINGS = {"prediction_type": "PREDICTION_TYPE", "timesteps": "TIMESTEPS", "target": "TARGET"}


def shim_settings(folder: Path) -> dict:
    """What an unclip export's shim says of the network in `folder`: {} for a plain diffusers network.

    unclip exports its v-predicting and residual networks under a shim class (`export.SHIM_CLASS`)
    whose module turns their outputs into the ε of the image that diffusers' schedulers expect, and
    the schedulers then say "epsilon". Loaded back without the shim, the network's raw outputs are
    what unclip samples, so its process must be the shim's: {"prediction_type", "timesteps", "target"}.
    """
    import re

    from unclip.pipeline.export import SHIM_CLASS, SHIM_UPSAMPLER

    if _json(folder / "config.json").get("_class_name") not in (SHIM_CLASS, SHIM_UPSAMPLER):
        return {}
    sources = sorted(folder.glob("unclip_unet_*.py"))
    if not sources:
        raise ModelFormatError(f"{folder}/config.json names unclip's shim class, but the folder holds no "
                               "unclip_unet_*.py to say what the network predicts; copy the export again")
    text = sources[0].read_text(encoding="utf-8")
    found = {key: re.search(rf'^{name} = "?([\w.]+)"?', text, re.MULTILINE) for key, name in SHIM_SETTINGS.items()}
    settings = {key: match.group(1) for key, match in found.items() if match}
    if "timesteps" in settings:
        settings["timesteps"] = int(settings["timesteps"])
    return settings


def _check_clip_range(process: dict, stage: str) -> None:
    if process["clip_range"] != 1.0:
        log.warning("%s: diffusers clips x_start to %s; unclip's sampler clips images to [-1, 1] "
                    "(approximated)", stage, process["clip_range"])


def _missing(directory: Path) -> None:
    missing = [name for name in REQUIRED if not (directory / name).is_dir()]
    if missing:
        raise ModelFormatError(
            f"{directory} lacks {', '.join(c + '/' for c in missing)}: a diffusers unCLIP directory (the layout of "
            "kakaobrain/karlo-v1-alpha) holds tokenizer/, text_encoder/, decoder/, text_proj/ and decoder_scheduler/ "
            "(plus prior/ for text-to-image and super_res_first/ for upsampling); copy the whole repository")


def _tokenizer(directory: Path, entry: list | None):
    import transformers

    from unclip.pipeline.karlo import HFTokenizer
    from unclip.words import CaptionWords

    cls = getattr(transformers, entry[1], None) if entry and entry[0] == "transformers" else None
    tokenizer = (cls or transformers.AutoTokenizer).from_pretrained(str(directory))
    if tokenizer.pad_token is None:
        raise ModelFormatError(f"{directory}: the tokenizer has no pad token; diffusers pads prompts to its context")
    return HFTokenizer(tokenizer, words=CaptionWords.load(directory))


def _preprocess(directory: Path, vision_cfg) -> dict:
    """The feature extractor's resize / crop / normalisation (OpenAI CLIP's when there is none)."""
    path = directory / "feature_extractor" / "preprocessor_config.json"
    cfg = _json(path) if path.is_file() else {}
    size, crop = cfg.get("size", vision_cfg.image_size), cfg.get("crop_size", vision_cfg.image_size)
    size = size.get("shortest_edge", size.get("height")) if isinstance(size, dict) else size
    crop = crop.get("height") if isinstance(crop, dict) else crop
    return {"size": size if cfg.get("do_resize", True) else vision_cfg.image_size,
            "crop": crop if cfg.get("do_center_crop", True) else size,
            "mean": tuple(cfg.get("image_mean", OPENAI_CLIP_MEAN)) if cfg.get("do_normalize", True) else (0.0,) * 3,
            "std": tuple(cfg.get("image_std", OPENAI_CLIP_STD)) if cfg.get("do_normalize", True) else (1.0,) * 3}


def _clip_config(text_cfg, vision_cfg) -> ClipConfig:
    vision = {} if vision_cfg is None else {
        "image_size": vision_cfg.image_size, "patch_size": vision_cfg.patch_size,
        "vision_width": vision_cfg.hidden_size, "vision_layers": vision_cfg.num_hidden_layers,
        "vision_heads": vision_cfg.num_attention_heads}
    return ClipConfig(embed_dim=text_cfg.projection_dim, text_width=text_cfg.hidden_size,
                      text_layers=text_cfg.num_hidden_layers, text_heads=text_cfg.num_attention_heads, **vision)


def _unet_shape(cfg) -> dict:
    """Descriptive config fields of a diffusers UNet: base channels, multipliers, blocks per level."""
    channels = list(cfg.block_out_channels)
    layers = cfg.layers_per_block
    return {"base_channels": channels[0], "channel_mult": tuple(max(1, c // channels[0]) for c in channels),
            "layers_per_block": layers if isinstance(layers, int) else layers[0]}


def _decoder(directory: Path, clip, defaults: dict):
    from diffusers import UNet2DConditionModel
    from diffusers.pipelines.deprecated.unclip import UnCLIPTextProjModel

    from unclip.decoder.model import Decoder

    unet = UNet2DConditionModel.from_pretrained(str(directory / "decoder"))
    tp_model = UnCLIPTextProjModel.from_pretrained(str(directory / "text_proj"))
    tp = tp_model.config
    width = clip.text.config.hidden_size
    if tp.clip_embeddings_dim != width:
        raise ModelFormatError(f"{directory / 'text_proj'}: clip_embeddings_dim {tp.clip_embeddings_dim} differs from "
                               f"the text encoder's width {width}; diffusers' text projection needs them equal")
    process = diffusion_process(directory / "decoder_scheduler")
    _check_clip_range(process, "decoder")
    shim = shim_settings(directory / "decoder")
    process.update({k: v for k, v in shim.items() if k in ("prediction_type", "timesteps")})
    if (unet.config.out_channels == 2 * unet.config.in_channels) != (process["variance"] == "learned_range"):
        raise ModelFormatError(f"{directory}: the decoder has {unet.config.out_channels} output channels but its "
                               f"scheduler's variance is {process['variance']}; they must agree")
    sides = [unet.config.sample_size // 2**i for i in range(len(unet.config.block_out_channels))]
    cfg = DecoderConfig(
        resolution=unet.config.sample_size, **_unet_shape(unet.config),
        attention_resolutions=tuple(s for s, b in zip(sides, unet.config.down_block_types) if "Attn" in b),
        **({"head_dim": unet.config.attention_head_dim} if isinstance(unet.config.attention_head_dim, int) else {}),
        cross_attention_dim=tp.cross_attention_dim, clip_tokens=tp.clip_extra_context_tokens,
        timesteps=process["timesteps"], noise_schedule=process["noise_schedule"], variance=process["variance"],
        prediction_type=process["prediction_type"], time_text="pooled", text_null="empty_prompt",
        sampler=defaults["decoder_sampler"], sample_steps=defaults["decoder_steps"], eta=defaults["decoder_eta"],
        guidance_scale=defaults["decoder_guidance"], candidates=defaults["candidates"],
        upsampled_candidates=defaults["upsampled_candidates"])
    decoder = Decoder(config=cfg, clip_dim=tp.clip_embeddings_dim, text_width=width, unet=unet)
    decoder.text_proj.load_state_dict(tp_model.state_dict(), strict=True)
    return decoder


def _upsampler(directory: Path, decoder_side: int, defaults: dict):
    from diffusers import UNet2DModel

    from unclip.pipeline.karlo import TwoNetUpsampler

    first = UNet2DModel.from_pretrained(str(directory / "super_res_first"))
    last = UNet2DModel.from_pretrained(str(directory / "super_res_last")) \
        if (directory / "super_res_last").is_dir() else None
    scheduler_dir = directory / "super_res_scheduler"
    process = diffusion_process(scheduler_dir if scheduler_dir.is_dir() else directory / "decoder_scheduler")
    _check_clip_range(process, "super-res")
    shim = shim_settings(directory / "super_res_first")
    process.update({k: v for k, v in shim.items() if k in ("prediction_type", "timesteps")})
    cfg = UpsamplerConfig(in_resolution=decoder_side, out_resolution=first.config.sample_size,
                          **_unet_shape(first.config), timesteps=process["timesteps"],
                          noise_schedule=process["noise_schedule"], variance=process["variance"],
                          prediction_type=process["prediction_type"], target=shim.get("target", "image"),
                          sampler=defaults["super_res_sampler"], sample_start=defaults["super_res_start"],
                          sample_steps=defaults["super_res_steps"], eta=defaults["super_res_eta"])
    if shim:  # one of unclip's own upsamplers, exported: sampled as unclip samples it (residual included)
        from unclip.decoder.upsampler import Upsampler

        upsampler = Upsampler(config=cfg)
        upsampler.unet = first
        return upsampler
    return TwoNetUpsampler(config=cfg, first=first, last=last)


def _prior(directory: Path, width: int, defaults: dict):
    from diffusers import PriorTransformer

    from unclip.pipeline.karlo import DiffusersPrior

    transformer = PriorTransformer.from_pretrained(str(directory / "prior"))
    pc = transformer.config
    if transformer.proj_in.in_features != transformer.proj_to_clip_embeddings.out_features:
        raise ModelFormatError(f"{directory / 'prior'}: its latent and output widths differ; diffusers' pipeline "
                               "needs them equal")
    states_proj = transformer.encoder_hidden_states_proj
    if states_proj is not None and states_proj.in_features != width:
        raise ModelFormatError(f"{directory / 'prior'} reads caption states of width {states_proj.in_features}, "
                               f"the text encoder gives {width}")
    process = diffusion_process(directory / "prior_scheduler")
    if process["clip_range"] is not None and process["prediction_type"] != "sample":
        log.warning("prior: x_start clipping of an %s-predicting prior is not reproduced (approximated)",
                    process["prediction_type"])
    cfg = PriorConfig(width=pc.num_attention_heads * pc.attention_head_dim, layers=pc.num_layers,
                      heads=pc.num_attention_heads, timesteps=process["timesteps"],
                      noise_schedule=process["noise_schedule"], prediction_type=process["prediction_type"],
                      normalization="per_dim", best_of=defaults["prior_best_of"], sampler=defaults["prior_sampler"],
                      sample_steps=defaults["prior_steps"], guidance_scale=defaults["prior_guidance"],
                      eta=defaults["prior_eta"])
    # an unclip export's decoder learnt from unit-length z_i, as its own prior hands them on
    return DiffusersPrior(transformer=transformer, config=cfg, clip_range=process["clip_range"],
                          unit=defaults["unclip_export"], mirror=defaults["z_t_mirror"])


def _vision_tower(path: Path):
    """CLIPVisionModelWithProjection from its own directory or from a whole CLIP (CLIPModel) directory."""
    from transformers import CLIPConfig, CLIPVisionModelWithProjection

    if _json(path / "config.json").get("model_type") == "clip":  # e.g. openai/clip-vit-large-patch14
        full = CLIPConfig.from_pretrained(str(path))
        vision_cfg = full.vision_config
        vision_cfg.projection_dim = full.projection_dim
        return CLIPVisionModelWithProjection.from_pretrained(str(path), config=vision_cfg)
    return CLIPVisionModelWithProjection.from_pretrained(str(path))


def load_diffusers(path: str | Path, *, image_encoder: str | Path | None = None, device: str | None = None):
    """The `UnclipPipeline` of a diffusers-layout unCLIP directory (or one written by `import_diffusers`).

    image_encoder: a CLIPVisionModelWithProjection directory to use when the model has no
    `image_encoder/` (needed by the image tasks only). A component transformers or diffusers cannot
    read (a file missing from a half-copied directory) is a ModelFormatError naming the directory.
    """
    try:
        return _load_diffusers(path, image_encoder=image_encoder, device=device)
    except UnclipError:
        raise
    except Exception as err:  # noqa: BLE001 - transformers and diffusers raise many kinds for a file missing
        raise ModelFormatError(f"{path} is not a complete diffusers unCLIP directory: {type(err).__name__}: {err} "
                               "(copy it again, with every component folder's files)") from None


def _load_diffusers(path: str | Path, *, image_encoder: str | Path | None, device: str | None):
    from transformers import CLIPTextModelWithProjection

    from unclip.pipeline.karlo import DiffusersClip
    from unclip.pipeline.pipeline import UnclipPipeline
    from unclip.pipeline.prompts import IMPORTED

    directory = Path(path)
    index = _json(directory / "model_index.json")
    _missing(directory)
    manifest = read_manifest(directory) if (directory / MANIFEST).is_file() else None
    if manifest is not None:
        verify_files(directory, manifest)
    text = CLIPTextModelWithProjection.from_pretrained(str(directory / "text_encoder"))
    vision_dir = directory / "image_encoder" if (directory / "image_encoder").is_dir() else image_encoder
    vision = None if vision_dir is None else _vision_tower(Path(vision_dir))
    if vision is not None and vision.config.projection_dim != text.config.projection_dim:
        raise ModelFormatError(f"the image encoder {vision_dir} projects to {vision.config.projection_dim} dimensions, "
                               f"the text encoder to {text.config.projection_dim}: they are not one CLIP")
    tokenizer = _tokenizer(directory / "tokenizer", index.get("tokenizer"))
    clip_cfg = _clip_config(text.config, None if vision is None else vision.config)
    defaults = _defaults(directory)
    clip = DiffusersClip(text=text, vision=vision, tokenizer=tokenizer, config=clip_cfg,
                         preprocess=None if vision is None else _preprocess(directory, vision.config),
                         unit=defaults["unclip_export"], mirror=defaults["z_t_mirror"]).eval()
    with torch.no_grad():
        empty = clip.encode_text(clip.tokenize([""]))
    decoder = _decoder(directory, clip, defaults)
    decoder.text_proj.set_empty_prompt(empty.token_states, empty.mask, empty.embeds)
    upsamplers = ([_upsampler(directory, decoder.config.resolution, defaults)]
                  if (directory / "super_res_first").is_dir() else [])
    prior = _prior(directory, text.config.hidden_size, defaults) if (directory / "prior").is_dir() else None
    if prior is not None:
        prior.set_empty_prompt(empty.token_states, empty.mask, empty.embeds)
    cfg = UnclipConfig(name=f"{IMPORTED}{directory.name}", tokenizer=TokenizerConfig(
        vocab_size=tokenizer.vocab_size, context_length=tokenizer.context_length), clip=clip_cfg,
        prior=prior.config if prior is not None else PriorConfig(), decoder=decoder.config,
        upsamplers=tuple(u.config for u in upsamplers))
    try:
        check(cfg)
    except ConfigError as err:
        raise ModelFormatError(f"{directory} does not fit unclip's cascade: {err}") from None
    pipe = UnclipPipeline(config=cfg, clip=clip, decoder=decoder, upsamplers=upsamplers, prior=prior,
                          directory=directory, pca=load_pca(directory))
    return pipe.to(device) if device else pipe


# --- PCA basis for pca_probe -------------------------------------------------------------------


def fit_pca(pipe, images, *, variance: float = 0.99):
    """Fit the PCA basis `pca_probe` uses on the z_i of `images` (PIL images, paths or a tensor
    [N, 3, S, S]; N ≥ 2) keeping the components that explain `variance`; sets `pipe.pca`."""
    from unclip.prior.pca import PCAQuantizer

    z_i = torch.cat([pipe.encode_image(image) for image in images]) if isinstance(images, (list, tuple)) \
        else pipe.encode_image(images)
    if len(z_i) < 2:
        raise DataError(f"a PCA basis needs at least 2 images; got {len(z_i)}")
    pipe.pca = PCAQuantizer.fit(z_i.cpu(), variance=variance, buckets=1).to(pipe.device)
    log.info("PCA of %d images: %d components explain %.3f of the variance", len(z_i), pipe.pca.components,
             float(pipe.pca.explained[-1]))
    return pipe.pca


def save_pca(pca, directory: Path) -> None:
    """Write a PCA basis into `directory/pca/` (config.json + model.safetensors)."""
    (directory / PCA_DIR).mkdir(parents=True, exist_ok=True)
    (directory / PCA_DIR / "config.json").write_text(json.dumps({"dim": int(pca.mean.shape[0]),
                                                                  "components": pca.components}), encoding="utf-8")
    save_weights(directory / PCA_DIR / "model.safetensors", pca.state_dict())


def load_pca(directory: Path):
    """The PCA basis in `directory/pca/`, or None when there is none."""
    from unclip.prior.pca import PCAQuantizer

    if not (directory / PCA_DIR / "config.json").is_file():
        return None
    shape = _json(directory / PCA_DIR / "config.json")
    pca = PCAQuantizer(dim=shape["dim"], components=shape["components"], buckets=1)
    return load_into(pca, directory / PCA_DIR / "model.safetensors")


# --- import -------------------------------------------------------------------------------------


def _link_or_copy(src: str, dst: str) -> None:
    """Hard-link a weight file (imports of multi-GB models take no space), copy across file systems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def import_diffusers(src: str | Path, out: str | Path, *, image_encoder: str | Path | None = None,
                     pca_images=None, pca_variance: float = 0.99) -> Path:
    """Write the diffusers-layout model `src` as the unclip model directory `out` (atomically).

    image_encoder: a CLIPVisionModelWithProjection directory (or a whole CLIP) saved as
    `image_encoder/` when `src` has none; pca_images: images whose z_i give the PCA basis of
    `pca_probe` (None: no basis, and the probe says how to add one).
    """
    check_replaceable(out)
    src = Path(src)
    pipe = load_diffusers(src, image_encoder=image_encoder)
    index = _json(src / "model_index.json")
    components = sorted(p.name for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    pca = fit_pca(pipe, pca_images, variance=pca_variance) if pca_images is not None else None

    def write(tmp: Path) -> None:
        for name in components:
            shutil.copytree(src / name, tmp / name, copy_function=_link_or_copy)
        shutil.copy2(src / "model_index.json", tmp / "model_index.json")
        if (src / "unclip_export.json").is_file():  # an unclip export's own sampling settings (`_defaults`)
            shutil.copy2(src / "unclip_export.json", tmp / "unclip_export.json")
        if image_encoder is not None and not (src / "image_encoder").is_dir():
            pipe.clip.vision.save_pretrained(tmp / "image_encoder")
            pre = Path(image_encoder) / "preprocessor_config.json"
            if pre.is_file():
                (tmp / "feature_extractor").mkdir(exist_ok=True)
                shutil.copy2(pre, tmp / "feature_extractor" / "preprocessor_config.json")
        if pca is not None:
            save_pca(pca, tmp)

    listed = sorted(set(components) | ({"image_encoder"} if pipe.clip.vision is not None else set())
                    | ({PCA_DIR} if pca is not None else set()))
    manifest = Manifest(
        config=pipe.config.to_dict(), resolutions=resolutions(pipe.config),
        stats={"pca_components": pca.components} if pca is not None else {},
        extra={"layout": LAYOUT, "components": listed, "pipeline_class": index.get("_class_name"),
               "priors": ["prior"] if pipe.prior is not None else [], "upsampler_stages": len(pipe.upsamplers)},
        provenance={"imported_from": str(src.resolve()),
                    "imported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    path = save_model_dir(out, manifest, write)
    log.info("imported %s into %s", src, path)
    return path
