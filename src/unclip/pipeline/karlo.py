"""Adapters that run a diffusers-layout unCLIP model (Karlo) behind unclip's stage interfaces.

An imported model keeps its own networks and computes what diffusers' UnCLIPPipeline computes:

- `HFTokenizer`: transformers' CLIPTokenizer with the surface of `unclip.tokenizer.Tokenizer`
  (`encode` → `TokenBatch`, cut captions reported);
- `DiffusersClip`: CLIPTextModelWithProjection (+ CLIPVisionModelWithProjection when the model
  has one) with the surface of `ClipModel`. Embeddings stay at the raw CLIP scale (diffusers and
  Karlo never normalise them; an unclip export's image and text embeddings are unit length, as its
  own CLIP gives them); the text tower runs without an attention mask, as in diffusers;
- `DiffusersPrior`: PriorTransformer with the `sample(text_states, text_mask, z_t, ...)` surface
  of `DiffusionPrior`; guidance against the empty prompt; x_start clipped to the scheduler's
  `clip_sample_range` (5 for Karlo); no best-of and no renormalisation (diffusers has neither),
  except for an unclip export, whose prior samples as unclip's does (best of its recorded k, unit length);
- `TwoNetUpsampler`: `super_res_first` for every step but the last (t = 0), `super_res_last` for
  that one; conditioning bicubic-upsampled as diffusers does it (antialiased kernel, no clamp).

The decoder needs no adapter: `unclip.decoder.model.Decoder` takes the imported UNet and a
`TextProj` in its "pooled" / "empty_prompt" modes. All sampling is `unclip.diffusion`'s: its
"ddpm" sampler on the respaced cosine schedule visits the timesteps of diffusers'
UnCLIPScheduler and draws the same noise from the same generator.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from unclip.clip.model import TextEncoding
from unclip.config import ClipConfig, PriorConfig, UpsamplerConfig, check_guidance_scale
from unclip.decoder.upsampler import Upsampler
from unclip.diffusion import GaussianDiffusion, SampleStep, cfg_mix, run, sample_loop
from unclip.errors import ModelFormatError
from unclip.tokenizer import TokenBatch
from unclip.words import CaptionWords

log = logging.getLogger(__name__)


class HFTokenizer:
    """A transformers tokenizer (CLIPTokenizer) behind `unclip.tokenizer.Tokenizer`'s surface."""

    def __init__(self, tokenizer, *, words: CaptionWords | None = None):
        self.hf = tokenizer
        self.words = words  # the words of its captions, when an unclip export of a model of other data kept them
        self.context_length = int(tokenizer.model_max_length)
        self.pad_id, self.bos_id, self.eos_id = tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, texts: str | Sequence[str], *, context_length: int | None = None) -> TokenBatch:
        """Captions → input_ids / attention_mask [B, L] padded to the context, as diffusers tokenizes them."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        length = context_length or self.context_length
        batch = self.hf(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        truncated = []
        for ids in self.hf(texts, verbose=False)["input_ids"]:
            cut = len(ids) > length
            if cut:
                log.warning("caption cut to %d tokens; dropped the end: %r", length,
                            self.hf.decode(ids[length - 1:-1], skip_special_tokens=True))
            truncated.append(cut)
        return TokenBatch(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].long(),
                          truncated=tuple(truncated))

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)


class DiffusersClip(nn.Module):
    """CLIP towers of a diffusers-layout model with `ClipModel`'s encode surface (raw embeddings).

    text: CLIPTextModelWithProjection; vision: CLIPVisionModelWithProjection or None (a
    text-to-image Karlo directory has none); preprocess: the feature extractor's settings
    (`size`, `crop`, `mean`, `std`), applied to tensors in [-1, 1]; unit: image embeddings scaled to
    unit length (an unclip export, whose decoder learnt from unit-length z_i, as its prior's are);
    mirror: the embedding dimension D of an unclip export whose text projection writes s·[x, −x, 0…]
    for its prior's LayerNorm (`unclip.pipeline.export`): z_t is then unclip's own, [x, 0…] at unit
    length, as text diffs and z_t-as-z_i need it (the mirrored vector read as z_t scaled them by 1/√2).
    """

    def __init__(self, *, text: nn.Module, tokenizer: HFTokenizer, config: ClipConfig, vision: nn.Module | None = None,
                 preprocess: dict | None = None, unit: bool = False, mirror: int | None = None):
        super().__init__()
        self.text, self.vision, self.tokenizer, self.config, self.unit = text, vision, tokenizer, config, unit
        self.mirror = mirror
        pre = preprocess or {}
        self.resize_to = int(pre.get("size", config.image_size))
        self.crop_to = int(pre.get("crop", config.image_size))
        self.register_buffer("pixel_mean", torch.tensor(pre.get("mean", (0.5, 0.5, 0.5))).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pre.get("std", (0.5, 0.5, 0.5))).view(1, 3, 1, 1),
                             persistent=False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def tokenize(self, captions: str | list[str]) -> TokenBatch:
        return self.tokenizer.encode(captions)

    def encode_text(self, tokens: TokenBatch) -> TextEncoding:
        """z_t [B, D] (raw text_embeds; unclip's unit z_t with `mirror`), token states [B, L, W] and mask
        [B, L], as diffusers encodes prompts."""
        out = self.text(input_ids=tokens.input_ids.to(self.device))  # no attention mask: diffusers passes none
        z_t = out.text_embeds.float()
        if self.mirror is not None:
            z_t = F.pad(F.normalize(z_t[:, :self.mirror], dim=-1), (0, z_t.shape[1] - self.mirror))
        return TextEncoding(embeds=z_t, token_states=out.last_hidden_state, mask=tokens.attention_mask.to(self.device))

    def encode_captions(self, captions: str | list[str]) -> torch.Tensor:
        return self.encode_text(self.tokenize(captions)).embeds

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """z_i [B, D] (raw, or unit length with `unit`) of square images [B, 3, S, S] in [-1, 1]: resize,
        centre crop, normalise like the feature extractor (bicubic on tensors instead of PIL's bicubic
        on 8-bit images)."""
        if self.vision is None:
            raise ModelFormatError(
                "this imported model has no image encoder, so image tasks (variations, interpolate, textdiff, "
                "probe, inpainting without a prompt) cannot encode images: import it with --image-encoder DIR, a "
                "CLIPVisionModelWithProjection matching its text encoder (for Karlo: openai/clip-vit-large-patch14, "
                "or the image_encoder/ of kakaobrain/karlo-v1-alpha-image-variations)")
        x = pixels.to(self.device, torch.float32)
        side = x.shape[-1]
        if side != self.resize_to:
            x = F.interpolate(x, size=(self.resize_to, self.resize_to), mode="bicubic", align_corners=False,
                              antialias=side > self.resize_to)
        top = (self.resize_to - self.crop_to) // 2
        x = x[..., top:top + self.crop_to, top:top + self.crop_to]  # [B, 3, crop, crop]
        x = ((x + 1) / 2 - self.pixel_mean) / self.pixel_std
        z_i = self.vision(pixel_values=x).image_embeds.float()
        return F.normalize(z_i, dim=-1) if self.unit else z_i


class DiffusersPrior(nn.Module):
    """A diffusers PriorTransformer with `DiffusionPrior`'s sampling surface.

    transformer: PriorTransformer (its clip_mean / clip_std undo the latent normalisation);
    config: PriorConfig (timesteps, schedule, prediction type, sampler, steps, guidance);
    clip_range: clamp of the predicted x_start (the scheduler's clip_sample_range), or None;
    unit: return unit-length z_i (an unclip export, whose decoder learnt from them) instead of the raw
    sample; mirror: an unclip export's D, whose z_t (`DiffusersClip` with `mirror`) the prior reads
    mirrored, s·[x, −x, 0…], as its exported text projection writes it. `config.best_of` > 1 keeps, of that many samples per caption, the one with the highest
    dot product with z_t, as `DiffusionPrior` does (diffusers draws one).
    Call `set_empty_prompt` before sampling with guidance: the null branch is the empty prompt.
    """

    def __init__(self, *, transformer: nn.Module, config: PriorConfig, clip_range: float | None = None,
                 unit: bool = False, mirror: int | None = None):
        super().__init__()
        self.transformer, self.config, self.clip_range, self.unit = transformer, config, clip_range, unit
        self.mirror = mirror
        self.diffusion = GaussianDiffusion.from_schedule(config.noise_schedule, config.timesteps,
                                                         prediction_type=config.prediction_type)
        self.register_buffer("empty_states", torch.zeros(0), persistent=False)
        self.register_buffer("empty_mask", torch.zeros(0), persistent=False)
        self.register_buffer("empty_embeds", torch.zeros(0), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.transformer.proj_in.weight.device

    def set_empty_prompt(self, states: torch.Tensor, mask: torch.Tensor, embeds: torch.Tensor) -> None:
        """The null branch: CLIP encoding of "" — states [1, L, W], mask [1, L], z_t [1, D]."""
        self.empty_states = states.detach().float().to(self.device)
        self.empty_mask = mask.detach().to(self.device)
        self.empty_embeds = embeds.detach().float().to(self.device)

    def model_fn(self, x_t: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        """x_t [B, E] (normalised latent), t [B] → the PriorTransformer's prediction [B, E]."""
        return self.transformer(x_t, t, **cond).predicted_image_embedding

    def guided_fn(self, z_t: torch.Tensor, text_states: torch.Tensor, text_mask: torch.Tensor,
                  guidance_scale: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """model_fn(x_t, t): conditional and empty-prompt rows in one batch, `cfg_mix`, then the clamp."""
        cond = {"proj_embedding": self._proj_embedding(z_t), "encoder_hidden_states": text_states,
                "attention_mask": text_mask.bool()}
        if check_guidance_scale(guidance_scale) != 1.0:
            if self.empty_states.numel() == 0:
                raise ModelFormatError("the prior's empty-prompt encoding is not set (call set_empty_prompt)")
            n = z_t.shape[0]
            null = {"proj_embedding": self._proj_embedding(self.empty_embeds).expand(n, -1),
                    "encoder_hidden_states": self.empty_states.expand(n, -1, -1),
                    "attention_mask": self.empty_mask.bool().expand(n, -1)}
            cond = {k: torch.cat([v, null[k].to(v.dtype)]) for k, v in cond.items()}  # [2B, ...]

        def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if guidance_scale == 1.0:
                out = self.model_fn(x_t, t, **cond)
            else:
                out_cond, out_null = self.model_fn(torch.cat([x_t, x_t]), torch.cat([t, t]), **cond).chunk(2)
                out = cfg_mix(out_cond, out_null, guidance_scale)
            if self.clip_range is not None and self.config.prediction_type == "sample":
                out = out.clamp(-self.clip_range, self.clip_range)  # diffusers clips x_start after guidance
            return out

        return model_fn

    def _proj_embedding(self, z_t: torch.Tensor) -> torch.Tensor:
        """What the transformer reads as z_t: s·[x, −x, 0…] of an unclip export's x, else z_t itself."""
        if self.mirror is None:
            return z_t
        from unclip.pipeline.export import Z_T_SCALE

        x = Z_T_SCALE * z_t[:, :self.mirror]
        return F.pad(torch.cat([x, -x], dim=1), (0, z_t.shape[1] - 2 * self.mirror))

    @torch.no_grad()
    def sample_loop(self, text_states: torch.Tensor, text_mask: torch.Tensor, z_t: torch.Tensor, *,
                    guidance_scale: float | None = None, steps: int | None = None, sampler: str | None = None,
                    eta: float | None = None, generator: torch.Generator | None = None,
                    x_T: torch.Tensor | None = None, rank_by: torch.Tensor | None = None,
                    ) -> Generator[SampleStep, None, torch.Tensor]:
        """z_i [B, D] (raw CLIP scale, or unit length with `unit`) for captions: text states [B, L, W],
        mask [B, L], z_t [B, D].

        x_T [B, E]: the starting latent (diffusers' `prior_latents`; one sample per caption); unset
        options take the config's. With best-of k the k·B rows run as one batch, candidate j of
        caption b in row j·B + b, as `DiffusionPrior.sample_loop` lays them out, and the one with
        the highest dot product with z_t (or rank_by [B, D], where given) is kept.
        """
        from unclip.prior.diffusion import pick_best

        cfg, device = self.config, self.device
        k = 1 if x_T is not None else cfg.best_of
        z_t = z_t.to(device, torch.float32)
        repeat = lambda x: torch.cat([x.to(device)] * k)  # noqa: E731  [k·B, ...]
        model_fn = self.guided_fn(repeat(z_t), repeat(text_states.float()), repeat(text_mask),
                                  cfg.guidance_scale if guidance_scale is None else guidance_scale)
        x = yield from sample_loop(
            model_fn, self.diffusion, shape=(k * z_t.shape[0], self.transformer.proj_in.in_features), x_T=x_T,
            sampler=sampler or cfg.sampler, steps=cfg.sample_steps if steps is None else steps,
            eta=cfg.eta if eta is None else eta, generator=generator, clip_denoised=False, device=device)
        z_i = self.transformer.post_process_latents(x)
        if self.unit:
            z_i = F.normalize(z_i, dim=-1)
        rank_by = z_t if rank_by is None else rank_by.to(device, torch.float32)
        return pick_best(z_i.reshape(k, *z_t.shape), rank_by) if k > 1 else z_i

    def sample(self, text_states: torch.Tensor, text_mask: torch.Tensor, z_t: torch.Tensor, *,
               callback: Callable[[SampleStep], None] | None = None, **kwargs) -> torch.Tensor:
        """`sample_loop` run to the end: z_i [B, D]."""
        return run(self.sample_loop(text_states, text_mask, z_t, **kwargs), callback)


class TwoNetUpsampler(Upsampler):
    """diffusers' super-resolution stage: `unet` (super_res_first) for every step but the last,
    `last` (super_res_last) at t = 0; conditioning upsampled as diffusers does it."""

    def __init__(self, *, config: UpsamplerConfig, first: nn.Module, last: nn.Module | None = None):
        nn.Module.__init__(self)
        self.config, self.unet = config, first
        self.last = None if last is None or last is first else last
        self.diffusion = GaussianDiffusion.from_schedule(config.noise_schedule, config.timesteps,
                                                         prediction_type=config.prediction_type,
                                                         variance=config.variance)

    def unet_fn(self, x_t: torch.Tensor, t: torch.Tensor, *, low: torch.Tensor) -> torch.Tensor:
        """x_t [B, 3, S, S], t [B], low [B, 3, S, S] → eps [B, 3, S, S]; super_res_last when every t is 0."""
        net = self.last if self.last is not None and bool((t == 0).all()) else self.unet
        return net(torch.cat([x_t, low], dim=1), t).sample

    @torch.no_grad()
    def sample_loop(self, low_res: torch.Tensor, *, steps: int | None = None, sampler: str | None = None,
                    eta: float | None = None, generator: torch.Generator | None = None,
                    x_T: torch.Tensor | None = None) -> Generator[SampleStep, None, torch.Tensor]:
        """×4 images [B, 3, 4r, 4r] in [-1, 1] from low-res images [B, 3, r, r]."""
        cfg = self.config
        side = cfg.out_resolution * low_res.shape[-1] // cfg.in_resolution
        # [B, 3, S, S] as diffusers makes it: unclamped, and antialias=True, which for upsampling
        # switches PyTorch's bicubic from a = -0.75 to PIL's a = -0.5
        low = F.interpolate(low_res.to(self.device, torch.float32), size=(side, side), mode="bicubic",
                            align_corners=False, antialias=True)
        return (yield from sample_loop(
            self.unet_fn, self.diffusion, shape=(low.shape[0], 3, side, side), x_T=x_T,
            sampler=sampler or cfg.sampler, steps=cfg.sample_steps if steps is None else steps,
            eta=cfg.eta if eta is None else eta, generator=generator, clip_denoised=True, cond={"low": low},
            device=self.device))
