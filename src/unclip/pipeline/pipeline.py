"""The text → image cascade and the latent-space manipulations, over one decode path.

`UnclipPipeline` holds the frozen CLIP, the priors, the decoder and the upsamplers of one model
directory. `decode(z_i, ...)` is the only way to pixels: decoder (from x_T or fresh noise, with
classifier-free guidance), then every ×4 upsampler. The tasks are thin: they choose z_i, x_T or
a mask and call it.

- `generate`: caption → prior → z_i → decode (paper §2).
- `variations`: image → (z_i, x_T by DDIM inversion) → decode with DDIM η > 0 (§3.1).
- `interpolate`: slerp between two images' z_i with x_T fixed, or slerp of both latents (§3.2).
- `text_diff`: rotate z_i toward norm(z_t − z_t0) by θ, x_T fixed (§3.3).
- `inpaint`: RePaint resampling keeps the known pixels, the caption's z_i fills the rest.
- `pca_probe`: decode z_i truncated to its first k principal components, x_T fixed (§4).

Images go in as PIL images, paths or tensors [B, 3, S, S] in [-1, 1] and come out as PIL images.
Every call takes `seed` (an int: image i draws from seed + i; a list of ints, one per image; a
`torch.Generator`; or None for fresh randomness) and an
optional `callback(stage, step)` that sees every sampling step ("prior", "decoder",
"invert", "upsampler1", ...).

This module holds the stages and the decode path; the tasks are in `tasks.py`, prompt reading in
`prompts.py`, argument checks and seeds in `checks.py`, image reading in `images.py`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from unclip.clip.model import ClipModel, TextEncoding
from unclip.config import (UnclipConfig, check_eta, check_guidance_scale, check_noise_level,
                           upsampler_steps_limit)
from unclip.diffusion import SAMPLERS
from unclip.errors import ConfigError, DataError
from unclip.tokenizer import has_thai
from unclip.pipeline import PRECISIONS
from unclip.pipeline.checks import (GENERATE_BATCH, Callback, InputChecks, Seed, batch_pieces, generators, image_count,
                                    one_image, per_stage, prompt_list, stage_callback, true_or_false, whole_number)
from unclip.pipeline.images import check_finite, open_rgb, to_pil
from unclip.pipeline.prompts import PromptReading
from unclip.pipeline.tasks import Tasks
from unclip.precision import native_bf16

log = logging.getLogger(__name__)
ImageInput = "Image.Image | str | Path | torch.Tensor | Sequence"
PRIORS = ("diffusion", "ar")
# the paper's ablations (§5.1, figure 9), for `unclip eval --prior`: "caption" passes the caption's
# z_t as z_i; "none" passes the decoder's learned null z_i, so it draws from the caption alone
ABLATIONS = ("caption", "none")


def auto_precision(device: torch.device) -> str:
    """bfloat16 where the device computes it natively (`unclip.precision.native_bf16`), else float32
    (where bf16 would be emulated, and many times slower)."""
    return "bfloat16" if native_bf16(device) else "float32"


class UnclipPipeline(PromptReading, InputChecks, Tasks):
    """The stages of one model; build it with `unclip.load(path)`."""

    def __init__(self, *, config: UnclipConfig, clip: ClipModel, decoder, upsamplers: Sequence = (),
                 prior=None, ar_prior=None, directory: Path | None = None, pca=None, precision: str = "float32",
                 ranker=None):
        """pca: the basis `pca_probe` uses (an object with mean [D] and basis [K, D], e.g. a
        `PCAQuantizer`); default: the AR prior's. precision: what the decoder and upsampler UNets
        compute in while sampling (`PRECISIONS`; the diffusion arithmetic stays float32). ranker: a
        second text tower of the CLIP's network, trained against the same image tower, whose z_t
        ranks the diffusion prior's best-of samples and the decoder's candidates (`TextEncoding.
        ranking`); the prior and decoder still read the CLIP's own text tower. Set it to None to
        rank by the caption's own z_t."""
        self.config, self.clip, self.decoder = config, clip.eval(), decoder.eval()
        self.ranker = None if ranker is None else ranker.eval()
        self.set_precision(precision)
        self.upsamplers = [u.eval() for u in upsamplers]
        self.prior = None if prior is None else prior.eval()
        self.ar_prior = None if ar_prior is None else ar_prior.eval()
        self.pca = pca if pca is not None else (None if ar_prior is None else ar_prior.quantizer)
        self.directory = directory
        self._warned: set[str] = set()  # prompts whose word warnings were logged (once per prompt)
        self._small_warned: set[int] = set()  # sides of input images warned about as upscaled

    def __repr__(self) -> str:
        return (f"UnclipPipeline({self.config.name!r} from {self.directory}: sizes {list(self.sizes)}, priors "
                f"{self.priors or 'none'}, {self.config.decoder.candidates} candidate(s) per image"
                f"{' ranked by its ranking tower' if self.ranker is not None else ''}, {self.precision} "
                f"on {self.device})")

    # --- properties ---------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.decoder.device

    @property
    def resolution(self) -> int:
        """Side of the images the cascade produces (the last upsampler's output)."""
        return self.upsamplers[-1].config.out_resolution if self.upsamplers else self.config.decoder.resolution

    @property
    def unit_z_i(self) -> bool:
        """Whether this model's z_i are unit length: unclip's CLIP and unclip exports normalise image
        embeddings; an imported model's CLIP (Karlo) gives them at its own raw scale."""
        return getattr(self.clip, "unit", True)

    @property
    def priors(self) -> list[str]:
        return [name for name, p in (("diffusion", self.prior), ("ar", self.ar_prior)) if p is not None]

    def to(self, device: torch.device | str) -> UnclipPipeline:
        from unclip.pipeline import check_device

        check_device(str(device))
        for module in (self.clip, self.ranker, self.decoder, *self.upsamplers, self.prior, self.ar_prior, self.pca):
            if isinstance(module, torch.nn.Module):
                module.to(device)
        return self

    def set_precision(self, precision: str) -> None:
        """What the UNets sample in: "float32", "bfloat16", or "auto" (`auto_precision` of the device)."""
        if precision not in PRECISIONS:
            raise ConfigError(f"precision={precision!r}; use one of {', '.join(PRECISIONS)}")
        self.precision = auto_precision(self.device) if precision == "auto" else precision

    def set_upsampler_sampling(self, *, sampler: str | None = None, steps: int | None = None,
                               start: float | None = None) -> None:
        """Sample the upsamplers with this sampler, number of steps and/or starting noise level
        (a fraction of the schedule, 1 = pure noise) from now on (unset: keep the model's). Each
        is one value for every stage or a list of one per stage (e.g. steps=[5, 25]: the first
        stage from the noised bicubic, the second longer). Upsampling is most of a CPU
        generation's time (docs/performance.md)."""
        from dataclasses import replace

        stages = len(self.upsamplers)
        steps, sampler, start = (per_stage(name, value, stages) for name, value in
                                 (("steps", steps), ("sampler", sampler), ("start", start)))
        for i in range(stages):
            if steps[i] is not None and whole_number("upsampler steps", steps[i]) < 1:
                raise ConfigError(f"upsampler steps={steps[i]}; use at least 1")
            if sampler[i] is not None and sampler[i] not in SAMPLERS:
                raise ConfigError(f"upsampler sampler={sampler[i]!r}; use one of {', '.join(SAMPLERS)}")
            if start[i] is not None:
                check_noise_level(start[i], "upsampler start=")
        configs = [replace(cfg, sampler=sampler[i] or cfg.sampler,
                           sample_steps=cfg.sample_steps if steps[i] is None else steps[i],
                           sample_start=cfg.sample_start if start[i] is None else start[i])
                   for i, cfg in enumerate(upsampler.config for upsampler in self.upsamplers)]
        for stage, cfg in enumerate(configs, start=1):  # all checked before any is changed
            if cfg.sample_steps > (most := upsampler_steps_limit(cfg)):
                raise ConfigError(f"upsampler {stage}: {cfg.sample_steps} steps from noise level {cfg.sample_start:g} "
                                  f"(of its {cfg.timesteps} timesteps) are too many; at most {most} from there, or "
                                  "start from a higher level (upsampler start)")
        for upsampler, cfg in zip(self.upsamplers, configs):
            upsampler.config = cfg

    def autocast(self):
        """The context the UNets sample in: bf16 autocast with precision="bfloat16", else nothing."""
        if self.precision == "float32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    # --- encoders -----------------------------------------------------------------------------

    @torch.no_grad()
    def encode_text(self, prompts: str | Sequence[str]) -> TextEncoding:
        """CLIP text encoding of prompts: z_t [B, D], token states [B, L, W], mask [B, L].

        Each prompt is read in `read_form`. Empty prompts are an error; prompts longer than the
        context are cut (a warning says what). Many prompts are encoded GENERATE_BATCH at a time
        (20,000 in one batch took 6 GB).
        """
        prompts = prompt_list(prompts)
        for p in dict.fromkeys(prompts):  # once per prompt, however many candidates, batches or calls repeat it
            if p in self._warned:
                continue
            if len(self._warned) > 10_000:  # a long-running server: forget, rather than grow
                self._warned.clear()
            self._warned.add(p)
            for warning in self._word_warnings(p):  # a prompt cut to the context the tokenizer logs itself
                log.warning("%r: %s%s", p, warning, self._known_words_hint(thai=has_thai(p)))
        forms = [self.read_form(p) for p in prompts]
        pieces = [self._encode(forms[at:at + GENERATE_BATCH]) for at in range(0, len(forms), GENERATE_BATCH)]
        if len(pieces) == 1:
            return pieces[0]
        return TextEncoding(embeds=torch.cat([piece.embeds for piece in pieces]),
                            token_states=torch.cat([piece.token_states for piece in pieces]),
                            mask=torch.cat([piece.mask for piece in pieces]),
                            rank_embeds=None if self.ranker is None else torch.cat([p.rank_embeds for p in pieces]))

    def _encode(self, forms: list[str]) -> TextEncoding:
        """One batch of read prompts through the CLIP's text tower (and the ranking tower, if any)."""
        tokens = self.clip.tokenize(forms)
        text = self.clip.encode_text(tokens)
        if self.ranker is None:
            return text
        out = self.ranker(input_ids=tokens.input_ids.to(text.mask.device), attention_mask=text.mask)
        return replace(text, rank_embeds=torch.nn.functional.normalize(out.text_embeds.float(), dim=-1))

    @torch.no_grad()
    def encode_image(self, images) -> torch.Tensor:
        """Normalised CLIP image embeddings z_i [B, D] of images (PIL, paths or a tensor)."""
        return self.clip.encode_image(self.pixels(images, self.clip.config.image_size))

    def pixels(self, images, size: int) -> torch.Tensor:
        """Images as a tensor [B, 3, size, size] in [-1, 1] on the pipeline's device.

        PIL images and paths must be square (any mode is converted to RGB); tensors must be
        [B, 3, S, S] or [3, S, S] with values in [-1, 1].
        """
        from unclip.decoder.data import resize

        if isinstance(images, torch.Tensor):
            x = images[None] if images.ndim == 3 else images
            if x.ndim != 4 or x.shape[1] != 3 or x.shape[-1] != x.shape[-2] or not x.numel():
                raise DataError(f"an image tensor must be [B, 3, S, S] or [3, S, S]; got {tuple(images.shape)}")
            if not x.is_floating_point():
                raise DataError(f"an image tensor holds floats in [-1, 1]; got {x.dtype} (bytes in 0 … 255: "
                                "x / 127.5 - 1)")
            if not torch.isfinite(x).all() or x.abs().max() > 1.0 + 1e-3:
                raise DataError("image tensor values must be finite and in [-1, 1]")
        else:
            from unclip.data.shapes import to_tensor

            items = images if isinstance(images, (list, tuple)) else [images]
            if not items:
                raise DataError("no image given")
            opened = [open_rgb(item) for item in items]  # each file read once
            x = torch.stack([to_tensor(image) for image in opened]) if len({i.size for i in opened}) == 1 \
                else torch.cat([self.pixels(image, size) for image in opened])
        given = not isinstance(images, torch.Tensor)  # a caller's image, not the pipeline's own candidates
        warning = self.small_image_warning(x.shape[-1], size) if given else None
        if warning and x.shape[-1] not in self._small_warned:
            self._small_warned.add(x.shape[-1])
            log.warning(warning)
        return resize(x.float(), size).to(self.device)

    def small_image_warning(self, side: int, size: int) -> str | None:
        """What to tell a caller whose image of `side` pixels is read at `size` (CLIP's side at most):
        smaller, it is upscaled, and its blur shows in the result. None when it is not."""
        if side >= min(size, self.clip.config.image_size):
            return None
        return (f"an input image is {side}×{side}, smaller than the {size}×{size} this model reads: it is upscaled, "
                "so expect its blur in the result")

    # --- the one decode path ------------------------------------------------------------------

    @torch.no_grad()
    def prior_sample(self, text: TextEncoding, *, prior: str | None = None, guidance_scale: float | None = None,
                     seed: Seed = None, callback: Callback | None = None) -> torch.Tensor:
        """z_i [B, D] for encoded captions from the diffusion prior (default) or the AR prior, or
        one of the ablations in `ABLATIONS`."""
        self.check_text(text)
        if prior == "caption":
            return text.embeds.float().to(self.device)
        if prior == "none":
            null = self.decoder.text_proj.learned_classifier_free_guidance_embeddings.detach().float()
            return null.expand(len(text.embeds), -1).clone()
        if not self.priors:
            raise ConfigError("this model has no prior, so it cannot turn captions into images; it can still make "
                              "variations, interpolations and text diffs of images (an image-variation model)")
        prior = self.priors[0] if prior is None else prior
        if prior not in PRIORS:
            raise ConfigError(f"unknown prior {prior!r}; use one of {', '.join(PRIORS + ABLATIONS)}")
        if prior not in self.priors:
            raise ConfigError(f"this model has no {prior} prior; it has: {', '.join(self.priors)}")
        n = len(text.embeds)
        gens = generators(seed, n)
        options = {} if guidance_scale is None else {"guidance_scale": guidance_scale}
        if prior == "diffusion" and not isinstance(gens, torch.Generator):
            # One batch; with per-caption generators, best-of-k row j·n + i draws from caption i's
            # generator, which then draws exactly what it draws for that caption alone.
            k = self.prior.config.best_of
            return self.steer(self.prior.sample(text.token_states.float(), text.mask, text.embeds,
                                                generator=None if gens is None else [g for _ in range(k) for g in gens],
                                                callback=stage_callback(callback, "prior"), rank_by=text.ranking,
                                                **options), text)
        rows = []
        for i in range(n):  # the AR prior, or a shared generator: one caption at a time
            g = gens[i] if isinstance(gens, list) else gens
            args = (text.token_states[i:i + 1].float(), text.mask[i:i + 1], text.embeds[i:i + 1])
            if prior == "diffusion":
                rows.append(self.prior.sample(*args, generator=g, callback=stage_callback(callback, "prior"),
                                              rank_by=text.ranking[i:i + 1], **options))
            else:
                scale = 1.0 if guidance_scale is None else guidance_scale
                rows.append(self.ar_prior.sample(*args, generator=g, guidance_scale=scale))
        return self.steer(torch.cat(rows), text)

    def steer(self, z_i: torch.Tensor, text: TextEncoding) -> torch.Tensor:
        """A prior's z_i [B, D] moved toward the captions' ranking z_t by `config.prior.rank_steer`,
        each keeping its norm; unchanged at 0 (docs/pipeline.md, "Steering")."""
        amount = self.config.prior.rank_steer
        if not amount:
            return z_i
        unit = torch.nn.functional.normalize
        toward = unit(text.ranking.float().to(z_i.device), dim=-1)
        return unit(unit(z_i.float(), dim=-1) + amount * toward, dim=-1) * z_i.float().norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def decode(self, z_i: torch.Tensor, text: TextEncoding | None = None, *, x_T: torch.Tensor | None = None,
               guidance_scale: float | None = None, steps: int | None = None, sampler: str | None = None,
               eta: float | None = None, seed: Seed = None, upsample: bool = True, size: int | None = None,
               callback: Callback | None = None, inverted: bool = False) -> torch.Tensor:
        """Images [B, 3, R, R] in [-1, 1] from z_i [B, D] (and captions): decoder, then the upsamplers.

        x_T [B, 3, r, r] fixes the decoder's starting noise (inversions, interpolations); unset
        options take the decoder config's values. `size` stops the cascade at that side (one of
        `sizes`); `upsample=False` stops at the decoder's side. inverted: x_T comes from `invert`, so
        the predicted images are not clipped on the way (the inversion did not clip them either;
        clipped, a black background came back grey), only the result. More than GENERATE_BATCH
        rows run in pieces (each row draws what it draws in one batch, given its own seed), so
        memory stays that of one piece.
        """
        stages = self._stages(size, upsample)
        inverted = true_or_false("inverted", inverted)
        eta = None if eta is None else check_eta(eta)
        guidance_scale = None if guidance_scale is None else check_guidance_scale(guidance_scale)
        steps = None if steps is None else whole_number("steps", steps)
        self.check_latents(z_i, x_T, text)
        gens = generators(seed, len(z_i))
        pieces = []
        for rows, _, piece_gens in batch_pieces(len(z_i), gens):
            with self.autocast():
                images = self.decoder.sample(
                    z_i[rows].to(self.device), None if text is None else text.token_states[rows],
                    None if text is None else text.mask[rows], text_embeds=None if text is None else text.embeds[rows],
                    x_T=None if x_T is None else x_T[rows], guidance_scale=guidance_scale, steps=steps, sampler=sampler,
                    eta=eta, generator=piece_gens, callback=stage_callback(callback, "decoder"),
                    clip_denoised=not inverted)
            check_finite(images, "decoder", sampler or self.config.decoder.sampler,
                         steps or self.config.decoder.sample_steps)
            pieces.append(self.upsample(images.clamp(-1, 1), stages, generator=piece_gens, callback=callback))
        return torch.cat(pieces)

    def upsample(self, images: torch.Tensor, stages: int, *, generator=None,
                 callback: Callback | None = None) -> torch.Tensor:
        """Run the first `stages` upsamplers on decoder images [B, 3, r, r] in [-1, 1]; generator: from
        `generators`. (`upscale` takes an image of any side.)"""
        if not 0 <= whole_number("stages", stages) <= len(self.upsamplers):
            raise ConfigError(f"stages={stages}: this model has {len(self.upsamplers)} upsampler(s)")
        side = self.sizes[0]
        if not (isinstance(images, torch.Tensor) and images.ndim == 4 and images.shape[1:] == (3, side, side)):
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise DataError(f"upsample takes decoder images, a tensor [B, 3, {side}, {side}] in [-1, 1]; got {got} "
                            "(`upscale` takes an image of any side)")
        with self.autocast():
            for stage, upsampler in enumerate(self.upsamplers[:stages], start=1):
                step = stage_callback(callback, f"upsampler{stage}")
                images = upsampler.sample(images, generator=generator, callback=step)
                check_finite(images, f"upsampler {stage}", upsampler.config.sampler, upsampler.config.sample_steps)
        return images

    def upscale(self, image, size: int | None = None, *, n: int = 1, seed: Seed = 0,
                callback: Callback | None = None) -> list:
        """An image enlarged by the upsamplers alone (no caption, no z_i): read at the input side of the
        stage it enters (the largest input side not above the image's own; a smaller image is enlarged
        to the decoder's side first), then through each stage up to `size` (one of `sizes`; default:
        the last). n: how many draws (the upsamplers sample, so each differs a little)."""
        if not self.upsamplers:
            raise ConfigError("this model has no upsamplers: it makes images at the decoder's side only")
        image = one_image(image, "upscale")
        n = image_count("n", n, 1, "upscale draws 1 or more images")
        own = image.shape[-1] if isinstance(image, torch.Tensor) else open_rgb(image).width
        sides = [u.config.in_resolution for u in self.upsamplers]
        first = max((i for i, side in enumerate(sides) if side <= own), default=0)
        last = self.stages_for(size)
        if last <= first:
            raise ConfigError(f"size={size}: a {own}×{own} image enters the cascade at {sides[first]}² and leaves "
                              f"at {self.sizes[first + 1]}² or more; give a larger size (one of "
                              f"{', '.join(map(str, self.sizes[first + 1:]))})")
        if own >= self.sizes[last]:
            log.warning("the image is %d×%d, already no smaller than the %d×%d upscale makes: it is read at %d×%d "
                        "and redrawn at %d×%d", own, own, self.sizes[last], self.sizes[last], sides[first],
                        sides[first], self.sizes[last], self.sizes[last])
        low = self.pixels(image, sides[first])  # [1, 3, s, s]
        gens = generators(seed, n)
        pieces = []
        for _, count, piece_gens in batch_pieces(n, gens):  # a large n in pieces: draw i from its own seed
            images = low.repeat(count, 1, 1, 1)
            with self.autocast():
                for stage in range(first + 1, last + 1):
                    upsampler = self.upsamplers[stage - 1]
                    images = upsampler.sample(images, generator=piece_gens,
                                              callback=stage_callback(callback, f"upsampler{stage}"))
                    check_finite(images, f"upsampler {stage}", upsampler.config.sampler,
                                 upsampler.config.sample_steps)
            pieces.append(images)
        return to_pil(torch.cat(pieces))

    @property
    def sizes(self) -> list[int]:
        """The image sides the cascade can stop at: the decoder's, then each upsampler's output."""
        return [self.config.decoder.resolution, *(u.config.out_resolution for u in self.upsamplers)]

    def stages_for(self, size: int | None) -> int:
        """How many upsamplers run to reach `size` (None: all)."""
        if size is None:
            return len(self.upsamplers)
        whole_number("size", size, f" (the side: one of {', '.join(map(str, self.sizes))})")
        if size not in self.sizes:
            raise ConfigError(f"this model makes images of {', '.join(f'{s}×{s}' for s in self.sizes)}; "
                              f"size {size} is not one of them")
        return self.sizes.index(size)

    def _stages(self, size: int | None, upsample: bool) -> int:
        """`stages_for(size)`, or 0 with upsample=False (an error if `size` asks for more)."""
        upsample = true_or_false("upsample", upsample)
        stages = self.stages_for(size)
        if not upsample and size is not None and stages:
            raise ConfigError(f"size={size} with upsample=False: upsample=False stops at the decoder's "
                              f"{self.sizes[0]}×{self.sizes[0]}; give one or the other")
        return stages if upsample else 0

    @torch.no_grad()
    def invert(self, images, z_i: torch.Tensor | None = None, text: TextEncoding | None = None, *,
               steps: int | None = None, guidance_scale: float | None = None,
               callback: Callback | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The bipartite latent (z_i [B, D], x_T [B, 3, r, r]) of images by DDIM inversion (paper §3)."""
        x = self.pixels(images, self.config.decoder.resolution)
        z_i = self.encode_image(images) if z_i is None else z_i
        self.check_latents(z_i, text=text)
        if len(z_i) != len(x):
            raise DataError(f"{len(z_i)} z_i for {len(x)} images: give one z_i per image, or none")
        steps = None if steps is None else whole_number("steps", steps)
        scale = self.decoder.config.guidance_scale if guidance_scale is None else guidance_scale
        with self.autocast():
            x_T = self.decoder.invert(x, z_i, None if text is None else text.token_states,
                                      None if text is None else text.mask,
                                      text_embeds=None if text is None else text.embeds, steps=steps,
                                      guidance_scale=scale, callback=stage_callback(callback, "invert"))
        return z_i, x_T

    def fixed_noise(self, seed: Seed, n: int) -> torch.Tensor:
        """One decoder starting noise x_T [1, 3, r, r] drawn from `seed`, repeated n times [n, 3, r, r]."""
        side = self.config.decoder.resolution
        g = generators(seed, 1)
        noise = torch.randn((1, 3, side, side), generator=g[0] if isinstance(g, list) else g)
        return noise.expand(n, -1, -1, -1).to(self.device)
