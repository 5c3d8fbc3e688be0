"""Export an unclip model to a directory that diffusers' own UnCLIPPipeline loads and runs.

    from diffusers.pipelines.deprecated.unclip import UnCLIPPipeline
    pipe = UnCLIPPipeline.from_pretrained(out, trust_remote_code=True)

diffusers' classes fix some shapes that unclip leaves free, so weights are rearranged, not
retrained; every network computes what it computes in unclip (docs/interop.md has the list):

- Width. UnCLIPTextProjModel and PriorTransformer read caption states of the CLIP embedding
  width, unclip's CLIP text tower is wider (W ≥ D). The export widens every embedding to W:
  z_i lives in the first D of W dimensions, the others are zero in and zero out (the prior
  predicts zeros there, its `clip_mean` / `clip_std` are 0 / 1); unclip's prior's `text_in`
  is folded into `encoder_hidden_states_proj`.
- z_t. unclip's prior reads the unit-length z_t; diffusers hands it the raw `text_embeds`. The
  exported text projection writes s·[x, −x, 0…] (x: unclip's projection, s = 1000) and the
  prior's `embedding_proj_norm` (a LayerNorm) turns that into √(W/2)·x/‖x‖ exactly (mean 0);
  `embedding_proj` is rescaled to match. Needs W ≥ 2D (both presets have W = 2D); with
  D ≤ W < 2D the raw z_t is used (a warning says so).
- Tokenizer: unclip's BPE as a PreTrainedTokenizerFast that adds the start and end tokens.
- Decoder: the UNet is saved as is; diffusers passes the caption mask as `attention_mask`,
  which only Karlo's SimpleCrossAttn blocks read as a cross-attention mask, so a decoder with
  CrossAttn blocks ships the 20-line subclass `unclip.pipeline.diffusers_unet` in `decoder/`
  (hence `trust_remote_code=True`). `text_proj.embedding_proj` is zero (unclip adds no z_t to
  the timestep embedding).
- v-prediction: UnCLIPScheduler knows ε and x_0 only, so a v-predicting decoder or upsampler
  (the shapes preset) ships the same shim file, whose output is converted to ε; a residual
  upsampler's shim also shifts diffusers' image-space x_t to the residual's.
- model_index.json names `text_proj` by the module that defines UnCLIPTextProjModel: diffusers'
  own `save_pretrained` writes ["diffusers", ...], which its `from_pretrained` rejects.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
from pathlib import Path

import torch

from unclip.errors import ModelFormatError
from unclip.modeldir import check_replaceable, remove_abandoned, swap_in, temp_dir_beside

log = logging.getLogger(__name__)

Z_T_SCALE = 1000.0  # s: keeps the LayerNorm's eps (1e-5) negligible against the mirrored z_t's variance
TEXT_PROJ_ENTRY = ["diffusers.pipelines.deprecated.unclip.text_proj", "UnCLIPTextProjModel"]
SHIM_CLASS, SHIM_UPSAMPLER = "UnclipUNet2DConditionModel", "UnclipUNet2DModel"


def shim_module(cfg) -> str:
    """The shim's module name for a stage config. diffusers (and Python) cache custom modules by
    name, so differently configured copies must be named apart: the name carries the settings."""
    return f"unclip_unet_{cfg.prediction_type}_{cfg.timesteps}_{getattr(cfg, 'target', 'image')}"
TRANSFORMER_BLOCKS = ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D", "UNetMidBlock2DCrossAttn")


def _pad(tensor: torch.Tensor, size: int, dim: int, value: float = 0.0) -> torch.Tensor:
    """`tensor` extended along `dim` to `size` with `value`."""
    shape = list(tensor.shape)
    shape[dim] = size - shape[dim]
    return torch.cat([tensor, torch.full(shape, value, dtype=tensor.dtype)], dim=dim)


def _check(pipe) -> None:
    """Refuse, with the reason and a way out, what diffusers' UnCLIPPipeline cannot represent."""
    from unclip.prior.diffusion import DiffusionPrior

    if (pipe.decoder.config.time_text, pipe.decoder.config.text_null) != ("none", "learned"):
        raise ModelFormatError("this model is in the diffusers layout already (imported); diffusers loads its "
                               "directory as it is")
    if not isinstance(pipe.prior, DiffusionPrior):
        raise ModelFormatError("diffusers' UnCLIPPipeline needs a diffusion prior (a PriorTransformer); this model has "
                               "none: train one with `unclip train prior --kind diffusion` and assemble it in")
    if not pipe.upsamplers:
        raise ModelFormatError("diffusers' UnCLIPPipeline always runs a super-resolution stage; this model has no "
                               "upsampler: assemble one with --upsampler")
    if len(pipe.upsamplers) > 1:
        log.warning("diffusers' UnCLIPPipeline has one ×4 stage; the export keeps only the first upsampler")
    stages = (("prior", pipe.prior.config), ("decoder", pipe.decoder.config), ("upsampler", pipe.upsamplers[0].config))
    for name, cfg in stages:
        # v-predicting UNets are exported with a shim that hands the scheduler ε (diffusers_unet.py)
        allowed = ("epsilon", "sample") if name == "prior" else ("epsilon", "sample", "v_prediction")
        if cfg.noise_schedule != "cosine" or cfg.prediction_type not in allowed:
            raise ModelFormatError(f"the {name} uses a {cfg.noise_schedule} schedule predicting {cfg.prediction_type}; "
                                   "diffusers' UnCLIPScheduler implements the cosine schedule with epsilon or sample "
                                   "prediction only")
    if pipe.clip.config.text_width < pipe.clip.config.embed_dim:
        raise ModelFormatError(f"the CLIP text tower is narrower ({pipe.clip.config.text_width}) than its embedding "
                               f"({pipe.clip.config.embed_dim}); diffusers' unCLIP reads caption states at least as "
                               "wide as the embedding")


def _scheduler(cfg, *, variance: str, clip: bool):
    from diffusers import UnCLIPScheduler

    prediction = "epsilon" if cfg.prediction_type == "v_prediction" else cfg.prediction_type  # the shim converts
    return UnCLIPScheduler(num_train_timesteps=cfg.timesteps, prediction_type=prediction, clip_sample=clip,
                           variance_type="learned_range" if variance == "learned_range" else "fixed_small_log")


def _tokenizer(tokenizer):
    """unclip's BPE as a PreTrainedTokenizerFast: `tok(prompt, padding="max_length", truncation=True)`
    gives the ids and mask of `tokenizer.encode`."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    from unclip.tokenizer import BOS, EOS, PAD

    backend = Tokenizer.from_str(tokenizer.backend.to_str())
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, tokenizer.bos_id), (EOS, tokenizer.eos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   model_max_length=tokenizer.context_length)


def _tower(model, name: str, rows: torch.Tensor, width: int):
    """A copy of a CLIP tower whose projection (`name`.weight, [D, H]) becomes `rows` [width, H]."""
    cfg = copy.deepcopy(model.config)
    cfg.projection_dim = width
    tower = type(model)(cfg)
    state = model.state_dict()
    state[f"{name}.weight"] = rows
    tower.load_state_dict(state, strict=True)
    return tower


def _prior(prior, width: int, mirror: bool):
    """PriorTransformer on W-wide embeddings computing unclip's prior on its first D dimensions."""
    from diffusers import PriorTransformer

    t = prior.transformer
    cfg = {k: v for k, v in t.config.items() if not k.startswith("_")}
    cfg.update(embedding_dim=width, embedding_proj_dim=width, clip_embed_dim=width,
               embedding_proj_norm_type="layer" if mirror else None)
    out = PriorTransformer(**cfg)
    state = {k: v.clone() for k, v in t.state_dict().items()}
    state["proj_in.weight"] = _pad(state["proj_in.weight"], width, 1)  # [inner, W]
    scale = math.sqrt(width / 2) if mirror else 1.0  # the LayerNorm hands x/‖x‖ · √(W/2) to embedding_proj
    state["embedding_proj.weight"] = _pad(state["embedding_proj.weight"] / scale, width, 1)
    if mirror:
        state["embedding_proj_norm.weight"], state["embedding_proj_norm.bias"] = torch.ones(width), torch.zeros(width)
    text_in = prior.cond.text_in
    w, b = state["encoder_hidden_states_proj.weight"], state["encoder_hidden_states_proj.bias"]  # [inner, D], [inner]
    if isinstance(text_in, torch.nn.Linear):  # fold unclip's W → D adapter into the projection
        state["encoder_hidden_states_proj.weight"] = w @ text_in.weight.detach()  # [inner, W]
        state["encoder_hidden_states_proj.bias"] = w @ text_in.bias.detach() + b
    state["proj_to_clip_embeddings.weight"] = _pad(state["proj_to_clip_embeddings.weight"], width, 0)  # [W, inner]
    state["proj_to_clip_embeddings.bias"] = _pad(state["proj_to_clip_embeddings.bias"], width, 0)
    state["clip_mean"] = _pad(state["clip_mean"], width, 1)
    state["clip_std"] = _pad(state["clip_std"], width, 1, value=1.0)
    out.load_state_dict(state, strict=True)
    return out


def _text_proj(text_proj, width: int):
    """UnCLIPTextProjModel computing unclip's TextProj (learned nulls aside) on W-wide embeddings."""
    from diffusers.pipelines.deprecated.unclip import UnCLIPTextProjModel

    c = text_proj.config
    out = UnCLIPTextProjModel(clip_extra_context_tokens=c["clip_tokens"], clip_embeddings_dim=width,
                              time_embed_dim=c["time_embed_dim"], cross_attention_dim=c["cross_attention_dim"])
    state = {k: v.clone() for k, v in text_proj.state_dict().items() if k != "learned_null_text_token"}
    state["learned_classifier_free_guidance_embeddings"] = _pad(state["learned_classifier_free_guidance_embeddings"],
                                                                width, 0)
    for name in ("clip_image_embeddings_project_to_time_embeddings", "clip_extra_context_tokens_proj"):
        state[f"{name}.weight"] = _pad(state[f"{name}.weight"], width, 1)
    state["embedding_proj.weight"] = torch.zeros(c["time_embed_dim"], width)  # no z_t in unclip's time embedding
    state["embedding_proj.bias"] = torch.zeros(c["time_embed_dim"])
    out.load_state_dict(state, strict=True)
    return out


def _feature_extractor(size: int) -> dict:
    """CLIPImageProcessor settings that hand unclip's CLIP what it was trained on: [-1, 1] pixels."""
    return {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
            "resample": 3, "do_center_crop": True, "crop_size": {"height": size, "width": size}, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5], "do_convert_rgb": True}


def _write(out: Path, write) -> Path:
    """Run `write(tmp)` in a temporary sibling of `out`, then swap it in (a crash leaves `out` as it was).
    The sibling is named like `save_model_dir`'s, so what a killed export left is cleaned up the same way."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(out)
    tmp = temp_dir_beside(out)
    try:
        write(tmp)
        swap_in(tmp, out, "model_index.json")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export_diffusers(model: str | Path, out: str | Path) -> Path:
    """Write the unclip model directory `model` as a diffusers UnCLIPPipeline directory at `out`."""
    check_replaceable(out, "model_index.json")
    import diffusers

    from unclip import __version__
    from unclip.pipeline import diffusers_unet, load

    pipe = load(model)
    _check(pipe)
    if pipe.ranker is not None:
        log.warning("the model's ranking text tower is left out: diffusers' UnCLIPPipeline draws one candidate per "
                    "image and ranks its prior's samples by the caption's own z_t")
    clip, dim, width = pipe.clip, pipe.clip.config.embed_dim, pipe.clip.config.text_width
    mirror = width >= 2 * dim
    if not mirror:
        log.warning("text width %d < 2 × embedding width %d: diffusers' prior will read the raw z_t, unclip's the "
                    "unit-length z_t (approximated)", width, dim)
    p_text = clip.text.text_projection.weight.detach()  # [D, W]
    rows = torch.cat([Z_T_SCALE * p_text, -Z_T_SCALE * p_text]) if mirror else p_text
    decoder_cfg, up = pipe.decoder.config, pipe.upsamplers[0]
    unet_cfg = pipe.decoder.unet.config
    shim = decoder_cfg.prediction_type == "v_prediction" or any(
        b in TRANSFORMER_BLOCKS for b in (*unet_cfg.down_block_types, *unet_cfg.up_block_types, unet_cfg.mid_block_type))
    up_shim = up.config.prediction_type == "v_prediction" or up.config.target == "residual"
    shim_source = Path(diffusers_unet.__file__).read_text(encoding="utf-8")

    def write_shim(folder: Path, module: str, class_name: str, cfg) -> None:
        """Point `folder`'s config at the shim class and write the shim with `cfg`'s prediction and steps."""
        config_path = folder / "config.json"
        unet_json = json.loads(config_path.read_text(encoding="utf-8"))
        config_path.write_text(json.dumps({**unet_json, "_class_name": class_name}, indent=2), encoding="utf-8")
        source = shim_source.replace('PREDICTION_TYPE = "epsilon"', f'PREDICTION_TYPE = "{cfg.prediction_type}"')
        source = source.replace("TIMESTEPS = 1000", f"TIMESTEPS = {cfg.timesteps}")
        source = source.replace('TARGET = "image"', f'TARGET = "{getattr(cfg, "target", "image")}"')
        (folder / f"{module}.py").write_text(source, encoding="utf-8")

    def write(tmp: Path) -> None:
        _tokenizer(clip.tokenizer).save_pretrained(tmp / "tokenizer")
        if clip.tokenizer.words is not None:  # read back, it warns about prompt words its captions never use
            clip.tokenizer.words.save(tmp / "tokenizer")
        _tower(clip.text, "text_projection", _pad(rows, width, 0), width).save_pretrained(tmp / "text_encoder")
        vision_rows = _pad(clip.vision.visual_projection.weight.detach(), width, 0)  # [W, vision width]
        _tower(clip.vision, "visual_projection", vision_rows, width).save_pretrained(tmp / "image_encoder")
        (tmp / "feature_extractor").mkdir()
        (tmp / "feature_extractor" / "preprocessor_config.json").write_text(
            json.dumps(_feature_extractor(clip.config.image_size), indent=2), encoding="utf-8")
        _prior(pipe.prior, width, mirror).save_pretrained(tmp / "prior")
        _scheduler(pipe.prior.config, variance="fixed_small", clip=False).save_pretrained(tmp / "prior_scheduler")
        _text_proj(pipe.decoder.text_proj, width).save_pretrained(tmp / "text_proj")
        pipe.decoder.unet.save_pretrained(tmp / "decoder")
        if shim:
            write_shim(tmp / "decoder", shim_module(decoder_cfg), SHIM_CLASS, decoder_cfg)
        _scheduler(decoder_cfg, variance=decoder_cfg.variance, clip=True).save_pretrained(tmp / "decoder_scheduler")
        up.unet.save_pretrained(tmp / "super_res_first")
        if up_shim:
            write_shim(tmp / "super_res_first", shim_module(up.config), SHIM_UPSAMPLER, up.config)
        shutil.copytree(tmp / "super_res_first", tmp / "super_res_last")  # diffusers' last step: the same network
        _scheduler(up.config, variance=up.config.variance, clip=True).save_pretrained(tmp / "super_res_scheduler")
        index = {"_class_name": "UnCLIPPipeline", "_diffusers_version": diffusers.__version__,
                 "decoder": [shim_module(decoder_cfg), SHIM_CLASS] if shim else ["diffusers", "UNet2DConditionModel"],
                 "decoder_scheduler": ["diffusers", "UnCLIPScheduler"], "prior": ["diffusers", "PriorTransformer"],
                 "prior_scheduler": ["diffusers", "UnCLIPScheduler"],
                 "super_res_first": [shim_module(up.config), SHIM_UPSAMPLER] if up_shim else ["diffusers", "UNet2DModel"],
                 "super_res_last": [shim_module(up.config), SHIM_UPSAMPLER] if up_shim else ["diffusers", "UNet2DModel"],
                 "super_res_scheduler": ["diffusers", "UnCLIPScheduler"],
                 "text_encoder": ["transformers", "CLIPTextModelWithProjection"], "text_proj": TEXT_PROJ_ENTRY,
                 "tokenizer": ["transformers", "PreTrainedTokenizerFast"]}
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
        (tmp / "unclip_export.json").write_text(json.dumps({
            "source": str(Path(model).resolve()), "unclip_version": __version__, "embedding_dim": dim,
            "exported_width": width, "z_t": "layernorm-mirror" if mirror else "raw",
            "sampling": {"decoder_steps": decoder_cfg.sample_steps, "decoder_guidance": decoder_cfg.guidance_scale,
                         "prior_steps": pipe.prior.config.sample_steps,
                         "prior_guidance": pipe.prior.config.guidance_scale, "super_res_steps": up.config.sample_steps,
                         "decoder_sampler": decoder_cfg.sampler, "prior_sampler": pipe.prior.config.sampler,
                         "super_res_sampler": up.config.sampler, "super_res_start": up.config.sample_start,
                         "decoder_eta": decoder_cfg.eta, "prior_eta": pipe.prior.config.eta,
                         "super_res_eta": up.config.eta,
                         "prior_best_of": pipe.prior.config.best_of, "candidates": decoder_cfg.candidates,
                         "upsampled_candidates": decoder_cfg.upsampled_candidates},
            "load": "UnCLIPPipeline.from_pretrained(path, trust_remote_code=True)" if shim or up_shim
            else "UnCLIPPipeline.from_pretrained(path)"}, indent=2), encoding="utf-8")

    path = _write(Path(out), write)
    log.info("exported %s to %s (diffusers UnCLIPPipeline%s)", model, path,
             ", trust_remote_code=True" if shim or up_shim else "")
    return path
