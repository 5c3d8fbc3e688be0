"""The pipeline's tasks: thin functions of its one decode path (`UnclipPipeline.decode`).

`generate` (paper §2), `variations` (§3.1), `interpolate` (§3.2), `text_diff` (§3.3), `inpaint`
(RePaint) and `pca_probe` (§4) choose z_i, x_T or a mask and call it. `Tasks` holds these
`UnclipPipeline` methods.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from unclip.config import MAX_CANDIDATES, check_eta, is_real
from unclip.errors import ConfigError, DataError
from unclip.pipeline import latent
from unclip.pipeline.checks import (Callback, Seed, batch_pieces, candidate_seeds, frame_seeds, generators, image_count,
                                    image_seeds, one_image, prompt_list, shared_seed, stage_callback,
                                    text_diff_captions, whole_number)
from unclip.pipeline.images import check_finite, mask_tensor, to_pil

INPAINT_RESAMPLE = 5  # RePaint resamplings per inpainting step unless asked otherwise


class Tasks:
    """The tasks of `UnclipPipeline` (a mixin of it)."""

    def generate(self, prompt: str | Sequence[str], n: int = 1, *, prior: str | None = None,
                 prior_guidance_scale: float | None = None, guidance_scale: float | None = None,
                 steps: int | None = None, sampler: str | None = None, seed: Seed = None,
                 callback: Callback | None = None, upsample: bool = True, size: int | None = None,
                 candidates: int | None = None, upsampled_candidates: int | None = None) -> list:
        """n images per prompt (paper §2): prior → z_i → decoder (guided by z_i and the caption) → upsamplers.

        size: stop the cascade at this side (one of `sizes`; default: the last upsampler's).
        candidates: draw this many z_i and decoder images per requested image and keep the one
        whose CLIP image embedding is closest to the caption's z_t (`TextEncoding.ranking`: the
        model's ranking tower's, if it has one; default: the decoder config's
        `candidates`). It costs that many priors and decoders per image.
        upsampled_candidates: how many of them, the closest at the decoder's size, are upsampled
        and compared again at the final size, where CLIP reads them better (default: the decoder
        config's; 1 picks at the decoder's size and upsamples only the kept one). Each costs an
        upsampling.
        """
        prompts = prompt_list(prompt)
        n = image_count("n", n, 1, "ask for at least one image", prompts=len(prompts))
        k = self.config.decoder.candidates if candidates is None else whole_number("candidates", candidates)
        if not 1 <= k <= MAX_CANDIDATES:
            raise ConfigError(f"candidates={k}: draw 1 to {MAX_CANDIDATES} candidates per image")
        m = self.config.decoder.upsampled_candidates if upsampled_candidates is None else \
            whole_number("upsampled_candidates", upsampled_candidates)
        if m < 1:
            raise ConfigError(f"upsampled_candidates={m}: upsample at least the kept candidate")
        stages = self._stages(size, upsample)  # an unknown size is an error before any work
        if steps is not None:
            whole_number("steps", steps)
        rows = [p for p in prompts for _ in range(n)]
        seeds = seed if seed is None or isinstance(seed, torch.Generator) else image_seeds(seed, len(rows))
        images = []
        for piece, _, piece_seeds in batch_pieces(len(rows), seeds):  # a huge n in pieces: image i, its own seed
            images += self._generate(rows[piece], piece_seeds, k=k,
                                     m=min(m, k) if stages else 1,  # nothing to compare again at the decoder's side
                                     stages=stages, prior=prior, prior_guidance_scale=prior_guidance_scale,
                                     guidance_scale=guidance_scale, steps=steps, sampler=sampler, callback=callback)
        return images

    def _generate(self, rows: list[str], seed: Seed, *, k: int, m: int, stages: int, prior, prior_guidance_scale,
                  guidance_scale, steps, sampler, callback) -> list:
        """`generate` for one image per row: k candidates each, the best m upsampled, one kept."""
        seeds = candidate_seeds(seed, len(rows), k)
        text = self.encode_text([p for p in rows for _ in range(k)])
        # The prior seeds its generators from the candidates' seeds, and the decoder (then the kept
        # candidates' upsamplers) seeds them afresh: the prior's starting noise is the first values of
        # the decoder's x_T. Drawn as one stream instead, the shipped model judged 0.06 lower on
        # two_object over seven seeds (docs/pipeline.md, "Seeds"), with no cause found; kept until one is.
        z_i = self.prior_sample(text, prior=prior, guidance_scale=prior_guidance_scale, seed=seeds, callback=callback)
        gens = generators(seeds, len(text.embeds))
        images = self.decode(z_i, text, guidance_scale=guidance_scale, steps=steps, sampler=sampler,
                             seed=gens, callback=callback, upsample=False)
        embeds = text.ranking
        if k > 1:
            kept = self.best_candidates(images, embeds, k, keep=m)
            images, embeds = images[kept], embeds[kept.to(embeds.device)]
            gens = [gens[i] for i in kept.tolist()] if isinstance(gens, list) else gens
        images = self.upsample(images, stages, generator=gens, callback=callback)
        if m > 1:
            images = images[self.best_candidates(images, embeds, m)]
        return to_pil(images)

    @torch.no_grad()
    def best_candidates(self, images: torch.Tensor, text_embeds: torch.Tensor, k: int, *, keep: int = 1) -> torch.Tensor:
        """Row indices [B / k · keep] of the best `keep` of each k consecutive candidate images
        [B, 3, r, r], best first within a group: the highest cosine between the image's CLIP
        embedding and `text_embeds` [B, D], the z_t its caption ranks by (`TextEncoding.ranking`:
        the ranking tower's, where the model has one)."""
        k, keep = whole_number("k", k), whole_number("keep", keep)
        if k < 1:
            raise ConfigError(f"k={k}: the candidates of one image come in groups of k, 1 or more (generate's "
                              "candidates)")
        if not 1 <= keep <= k:
            raise ConfigError(f"keep={keep}: keep 1 to k={k} of each group of candidates")
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or len(images) % k:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise DataError(f"best_candidates takes images [B, 3, r, r] with B a multiple of k={k} (k candidates "
                            f"per image, one after another); got {got}")
        if not isinstance(text_embeds, torch.Tensor) or text_embeds.ndim != 2 or len(text_embeds) != len(images):
            got = tuple(text_embeds.shape) if isinstance(text_embeds, torch.Tensor) else type(text_embeds).__name__
            raise DataError(f"best_candidates takes one caption z_t per image, [{len(images)}, D]; got {got}")
        z = self.encode_image(images.clamp(-1, 1))
        t = torch.nn.functional.normalize(text_embeds.float().to(z.device), dim=-1)
        scores = (torch.nn.functional.normalize(z.float(), dim=-1) * t).sum(-1).view(-1, k)
        best = scores.argmax(dim=1, keepdim=True) if keep == 1 else scores.topk(keep, dim=1).indices
        return (best.cpu() + torch.arange(len(scores))[:, None] * k).flatten()

    def variations(self, image, n: int = 4, *, eta: float = 0.8, steps: int | None = None,
                   guidance_scale: float | None = None, seed: Seed = None, callback: Callback | None = None,
                   upsample: bool = True, size: int | None = None,
                   inversion: tuple[torch.Tensor, torch.Tensor] | None = None) -> list:
        """n variations of one image (paper §3.1): its z_i and DDIM-inverted x_T, decoded with DDIM η.

        η = 0 reconstructs the image; larger η keeps z_i's content and varies the rest. size: stop
        the cascade at this side (one of `sizes`). inversion: the image's (z_i [1, D], x_T [1, 3, r, r])
        from `invert(image, steps=steps, guidance_scale=guidance_scale)`, to draw more variations of
        it without inverting it again (the inversion draws no noise, so the images are the same).
        """
        self._stages(size, upsample)  # an unknown size is an error before any work
        n = image_count("n", n, 1, "give 1 or more variations")
        check_eta(eta)
        image = one_image(image, "variations")
        if inversion is None:
            z_i, x_T = self.invert(image, steps=steps, guidance_scale=guidance_scale, callback=callback)
        else:
            z_i, x_T = _inversion(inversion)
            self.check_latents(z_i, x_T)
        z_i, x_T = z_i[:1].expand(n, -1), x_T[:1].expand(n, -1, -1, -1)
        images = self.decode(z_i, x_T=x_T, sampler="ddim", eta=eta, steps=steps, guidance_scale=guidance_scale,
                             seed=seed, callback=callback, upsample=upsample, size=size, inverted=True)
        return to_pil(images)

    def interpolate(self, image_a, image_b, n: int = 5, *, mode: str = "fixed", steps: int | None = None,
                    guidance_scale: float | None = None, seed: Seed = 0, callback: Callback | None = None,
                    upsample: bool = True, size: int | None = None) -> list:
        """n images from image_a to image_b (paper §3.2) by slerp of z_i.

        mode "fixed": one x_T (from `seed`) for every frame; "inverted": each image's DDIM-inverted
        x_T, slerped alongside z_i, so the endpoints reconstruct the two images. size: stop the
        cascade at this side (one of `sizes`); upsample=False stops at the decoder's.
        """
        n = image_count("n", n, 2, "an interpolation needs at least its two endpoints")
        self._stages(size, upsample)  # an unknown size is an error before any work
        seed = shared_seed(seed, "interpolate")
        if mode not in ("fixed", "inverted"):
            raise ConfigError(f"unknown interpolation mode {mode!r}; use fixed or inverted")
        thetas = torch.linspace(0, 1, n)
        side = max(self.clip.config.image_size, self.config.decoder.resolution)
        pair = torch.cat([self.pixels(one_image(image_a, "interpolate"), side),
                          self.pixels(one_image(image_b, "interpolate"), side)])  # [2, 3, S, S]
        if mode == "inverted":
            z, x_T = self.invert(pair, steps=steps, guidance_scale=guidance_scale, callback=callback)
            x_Ts = torch.cat([latent.slerp_rows(x_T[:1], x_T[1:2], float(t)) for t in thetas])
        else:
            z = self.encode_image(pair)
            x_Ts = self.fixed_noise(seed, n)
        z_i = latent.slerp(z[:1], z[1:2], thetas[:, None].to(z))  # [n, D]
        images = self.decode(z_i, x_T=x_Ts, sampler="ddim", eta=0.0, steps=steps, guidance_scale=guidance_scale,
                             seed=frame_seeds(seed, n), callback=callback, inverted=mode == "inverted",
                             upsample=upsample, size=size)
        return to_pil(images)

    def text_diff(self, image, caption: str, target: str, thetas: Sequence[float] = (0.0, 0.15, 0.3, 0.45, 0.6, 0.75),
                  *, steps: int | None = None, guidance_scale: float | None = None, seed: Seed = 0,
                  callback: Callback | None = None, upsample: bool = True, size: int | None = None) -> list:
        """Edit an image toward a new caption (paper §3.3): z_θ = slerp(z_i, norm(z_t − z_t0), θ), x_T fixed.

        caption: what the image shows now (z_t0); target: what it should show (z_t). size: stop the
        cascade at this side (one of `sizes`); upsample=False stops at the decoder's.
        """
        self._stages(size, upsample)  # an unknown size is an error before any work
        if isinstance(thetas, (str, bytes)) or not isinstance(thetas, Iterable):
            raise ConfigError(f"text-diff angles: give a list of numbers in [0, 1], e.g. [0, 0.25, 0.5]; got {thetas!r}")
        thetas = list(thetas)
        seed = shared_seed(seed, "text_diff")
        if not thetas or any(not is_real(t) or not 0 <= t <= 1 for t in thetas):
            raise ConfigError(f"text-diff angles: give one or more, each in [0, 1] (the paper uses up to 0.25–0.5); "
                              f"got {thetas}")
        text_diff_captions(caption, target)
        text = self.encode_text([caption, target])  # captions that cannot give a direction fail before the inversion
        direction = latent.text_direction(text.embeds[1:2], text.embeds[:1])
        z_i, x_T = self.invert(one_image(image, "text_diff"), steps=steps, guidance_scale=guidance_scale,
                               callback=callback)
        # [1, D], as long as z_i: unit for unclip's CLIP, the raw CLIP scale for imported (Karlo) models
        direction = direction * z_i[:1].norm(dim=-1, keepdim=True)
        z = latent.slerp(z_i[:1], direction, torch.tensor(thetas)[:, None].to(z_i))
        images = self.decode(z, x_T=x_T[:1].expand(len(thetas), -1, -1, -1), sampler="ddim", eta=0.0, steps=steps,
                             guidance_scale=guidance_scale, seed=frame_seeds(seed, len(thetas)), callback=callback,
                             inverted=True,
                             upsample=upsample, size=size)
        return to_pil(images)

    @torch.no_grad()  # RePaint calls the UNet directly, not through decode: without this it kept every call's graph
    def inpaint(self, image, mask, prompt: str | None = None, n: int = 1, *, resample: int = INPAINT_RESAMPLE,
                steps: int | None = None, guidance_scale: float | None = None, seed: Seed = None,
                callback: Callback | None = None, size: int | None = None, upsample: bool = True) -> list:
        """Fill the white (1) region of `mask` and keep the rest of `image` (RePaint resampling).

        The fill follows `prompt` (through the prior) or, without one, the image's own z_i. mask:
        PIL image or tensor [H, W] in {0, 1}, square, any side: the decoder repaints every one of
        its pixels the mask touches, and the output keeps the image outside the mask. size: stop
        the cascade at this side (one of `sizes`); upsample=False stops at the decoder's.
        """
        n = image_count("n", n, 1, "inpainting draws 1 or more images")
        if whole_number("resample", resample) < 1:
            raise ConfigError(f"resample={resample}: inpainting takes 1 or more resamplings per step")
        from unclip.diffusion import repaint_loop, run

        stages = self._stages(size, upsample)
        steps = None if steps is None else whole_number("steps", steps)

        side = self.config.decoder.resolution
        image = one_image(image, "inpaint")
        known = self.pixels(image, side)  # [1, 3, r, r]
        hole = mask_tensor(mask, side).to(self.device)  # [1, 1, r, r], 1 = paint
        gens = generators(seed, n)  # one stream per image: its prior, its RePaint loop, its upsamplers in turn
        own_z = None if prompt is not None else self.encode_image(image)[:1]  # [1, D]
        scale = self.decoder.config.guidance_scale if guidance_scale is None else guidance_scale
        steps = self.decoder.config.sample_steps if steps is None else steps
        pieces = []
        for _, count, piece_gens in batch_pieces(n, gens):  # a large n in pieces: image i draws from its own stream
            if prompt is not None:
                text = self.encode_text([prompt] * count)
                z_i = self.prior_sample(text, seed=piece_gens, callback=callback)
            else:
                text, z_i = None, own_z.expand(count, -1)
            model_fn = self.decoder.guided_fn(z_i, None if text is None else text.token_states.float(),
                                              None if text is None else text.mask, scale,
                                              text_embeds=None if text is None else text.embeds)
            loop = repaint_loop(model_fn, self.decoder.diffusion, known.expand(count, -1, -1, -1), 1 - hole,
                                steps=steps, resample=resample, generator=piece_gens)
            with self.autocast():
                images = run(loop, stage_callback(callback, "decoder"))
            check_finite(images, "decoder", "RePaint", steps)
            pieces.append(self.upsample(images.clamp(-1, 1), stages, generator=piece_gens, callback=callback))
        images = torch.cat(pieces)
        out_side = images.shape[-1]
        if out_side > side:  # keep the original's known pixels at that size
            full = self.pixels(image, out_side)
            big_hole = mask_tensor(mask, out_side).to(images)  # the mask itself, not its decoder-sized cells
            images = big_hole * images + (1 - big_hole) * full
        return to_pil(images)

    def probe_dims(self, dims: Sequence[int] | None = None) -> list[int]:
        """The k values `pca_probe` decodes: `dims`, or 1, 2, 4, 8, half and all of the PCA's components."""
        if self.pca is None:
            raise ConfigError("pca_probe needs a PCA basis of z_i and this model has none: assemble it with "
                              "--ar-prior, or, for an imported model, fit one (`unclip import-diffusers ... "
                              "--pca-images DIR`)")
        total = self.pca.basis.shape[0]
        if dims is None:
            return sorted({k for k in (1, 2, 4, 8, total // 2, total) if 0 < k <= total})
        if isinstance(dims, (str, bytes)) or not isinstance(dims, Iterable):
            raise ConfigError(f"PCA probe dimensions: give a list of whole numbers from 1 to {total}; got {dims!r}")
        dims = [whole_number(f"dims[{i}]", k) for i, k in enumerate(dims)]
        if not dims or any(not 1 <= k <= total for k in dims):
            raise ConfigError(f"PCA probe dimensions: give one or more, each from 1 to {total}; got {dims}")
        return dims

    def pca_probe(self, image, dims: Sequence[int] | None = None, *, steps: int | None = None,
                  guidance_scale: float | None = None, seed: Seed = 0, callback: Callback | None = None,
                  upsample: bool = True, size: int | None = None) -> list:
        """Decode an image's z_i reduced to its first k principal components, for each k (paper §4).

        Uses `self.pca` (by default the AR prior's basis); x_T is fixed by `seed` so only z_i
        varies. Each truncation keeps z_i's length (unit for unclip's CLIP, raw for imported models).
        size: stop the cascade at this side (one of `sizes`); upsample=False stops at the decoder's.
        """
        dims = self.probe_dims(dims)
        self._stages(size, upsample)  # an unknown size is an error before any work
        seed = shared_seed(seed, "pca_probe")
        pca = self.pca
        z_i = self.encode_image(one_image(image, "pca_probe"))
        length = z_i.norm(dim=-1, keepdim=True)  # [1, 1]
        z = torch.cat([latent.pca_truncate(z_i, mean=pca.mean, basis=pca.basis, k=k) * length for k in dims])
        images = self.decode(z, x_T=self.fixed_noise(seed, len(dims)), sampler="ddim", eta=0.0, steps=steps,
                             guidance_scale=guidance_scale, seed=frame_seeds(seed, len(dims)), callback=callback,
                             upsample=upsample, size=size)
        return to_pil(images)


def _inversion(inversion) -> tuple[torch.Tensor, torch.Tensor]:
    """The (z_i, x_T) of one image, as `invert` returns it, else a DataError saying what it is."""
    pair = isinstance(inversion, (tuple, list)) and len(inversion) == 2
    if not pair or not all(isinstance(t, torch.Tensor) and t.ndim > 1 and len(t) == 1 for t in inversion):
        shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in inversion] if pair \
            else type(inversion).__name__
        raise DataError(f"inversion= is one image's (z_i [1, D], x_T [1, 3, r, r]), as invert(image) returns it; "
                        f"got {shapes}")
    return inversion[0], inversion[1]
