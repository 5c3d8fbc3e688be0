"""Checks of the pipeline's arguments, and its seeds.

Whole numbers, flags, image counts, prompts and single images are refused with a ConfigError or
DataError that says what to give; `generators` and `candidate_seeds` turn a call's seed into one
stream per image, so image i is the same in a batch or alone. `InputChecks` holds the
`UnclipPipeline` methods that check latents and caption encodings a caller passes in.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Sequence

import torch

from unclip.clip.model import TextEncoding
from unclip.config import MAX_SEED
from unclip.diffusion import SampleStep
from unclip.errors import ConfigError, DataError
from unclip.pipeline import MAX_IMAGES
from unclip.tokenizer import clean_text

Seed = int | Sequence[int] | torch.Generator | None
Callback = Callable[[str, SampleStep], None]

# images `generate`, `decode`, `inpaint` and `upscale` draw at once: a larger n runs in pieces, drawing the same images
GENERATE_BATCH = 64
# Longest z_i `decode` and `invert` take from a model whose CLIP gives unit-length image embeddings:
# its decoder learnt from length 1 (a sum of two embeddings still passes); z_i scaled by 1e6 decoded
# to noise, or to NaN, and the error blamed the model's training.
MAX_Z_I_LENGTH = 2.0


def image_seeds(seed: int | Sequence, n: int) -> list:
    """One seed (or generator) per image: the listed ones, or seed, seed+1, …"""
    if isinstance(seed, Sequence) and not isinstance(seed, str):
        if len(seed) != n:
            raise ConfigError(f"{len(seed)} seeds for {n} images: give one seed per image, or one int")
        return [s if isinstance(s, torch.Generator) else _whole_seed(s) for s in seed]
    first = _whole_seed(seed)
    if first + n - 1 > MAX_SEED:
        raise ConfigError(f"seed {first}: image i uses seed + i, so with {n} images the seed can be at most "
                          f"{MAX_SEED - n + 1}")
    return [first + i for i in range(n)]


def text_diff_captions(caption: str, target: str) -> None:
    """A DataError naming the empty one, unless the text diff's two captions both say something."""
    for name, text in (("caption", caption), ("target", target)):
        if isinstance(text, str) and not clean_text(text):
            raise DataError(f"the text diff's {name} {text!r} is empty: give what the image shows now (caption) "
                            "and what it should show (target), e.g. \"a red circle\" \"a blue circle\"")


def prompt_list(prompts: str | Sequence[str]) -> list[str]:
    """One prompt or a list of them as a list, each a non-blank string, else a DataError saying why."""
    if isinstance(prompts, (bytes, bytearray)):
        raise DataError("prompts are text (str), not bytes: decode them first, e.g. prompt.decode('utf-8')")
    if not isinstance(prompts, (str, Sequence)):
        raise DataError(f"prompts are a string or a list of strings, not {type(prompts).__name__}")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise DataError("no prompt given")
    for p in prompts:
        if not isinstance(p, str):
            raise DataError(f"prompt {p!r} is a {type(p).__name__}, not a string")
        if not clean_text(p):
            raise DataError(f"prompt {p!r} is empty; describe the image, e.g. \"a red circle above a blue square\"")
    return prompts


def _whole_seed(seed) -> int:
    try:
        seed = whole_number("seed", seed)
    except ConfigError:
        raise ConfigError(f"seed {seed!r}: give a whole number (or None for a random draw)") from None
    if not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"seed {seed}: give a whole number from 0 to {MAX_SEED}")
    return seed


def image_count(name: str, value, least: int, why: str, *, prompts: int = 1) -> int:
    """`value` as a whole number of images from `least` to MAX_IMAGES (with `prompts` prompts, n
    images each), else a ConfigError: below `least` it says `why`; above, a huge n failed only
    when memory ran out, after every image drawn so far."""
    count = whole_number(name, value)
    if count < least:
        raise ConfigError(f"{name}={value}: {why}")
    if count * prompts > MAX_IMAGES:
        each = f" for each of {prompts} prompts" if prompts > 1 else ""
        raise ConfigError(f"{name}={value}{each}: one call returns at most {MAX_IMAGES:,} images, all held in "
                          "memory; call again for more (with seed + the images drawn so far, to draw new ones)")
    return count


def per_stage(name: str, value, stages: int) -> list:
    """An upsampler setting as one value per stage: a value for all, or a list of one per stage."""
    if not isinstance(value, (list, tuple)):
        return [value] * stages
    if len(value) == 1:
        return list(value) * stages
    if len(value) != stages:
        raise ConfigError(f"upsampler {name}={list(value)}: give one value for every stage or one per stage "
                          f"(this model has {stages})")
    return list(value)


def whole_number(name: str, value, hint: str = "") -> int:
    """`value` as an int (ints, numpy and 0-d torch integers), else a ConfigError (ending in `hint`):
    2.5, "2" or True would otherwise fail deep inside torch, or pass as 1."""
    if not isinstance(value, bool):
        with contextlib.suppress(TypeError):
            return operator.index(value)
    raise ConfigError(f"{name}={value!r}: give a whole number{hint}")


def true_or_false(name: str, value) -> bool:
    """`value` if it is True or False (a numpy bool too), else a ConfigError: upsample="no" is a
    non-empty string, so it was read as True."""
    import numpy as np

    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise ConfigError(f"{name}={value!r}: give True or False")


def shared_seed(seed: Seed, task: str) -> Seed:
    """The one seed of a task whose images share one starting noise x_T: an int, a generator, None
    or a list of one (so a caller that passes a list everywhere is understood)."""
    if isinstance(seed, Sequence) and not isinstance(seed, str):
        if len(seed) != 1:
            raise ConfigError(f"{task}: its images share one starting noise, so give one seed, not {len(seed)}")
        return seed[0]
    return seed


def frame_seeds(seed: Seed, n: int) -> list[int]:
    """One seed for each of n frames that share one x_T (interpolations, text diffs, the PCA probe):
    the same for every frame, so the upsamplers add the same noise to each and frames whose latents
    are equal are equal images (frame i drew from seed + i, so an interpolation flickered)."""
    if seed is None or isinstance(seed, torch.Generator):
        seed = int(torch.randint(0, MAX_SEED, (), generator=seed))
    return [seed] * n


def one_image(image, task: str):
    """`image` if it is one image (a PIL image, a path, or a tensor [3, S, S] / [1, 3, S, S]); the
    image of a list of one."""
    batch = isinstance(image, (list, tuple)) or isinstance(image, torch.Tensor) and image.ndim == 4
    count = len(image) if batch else 1
    if count != 1:
        raise DataError(f"{task} takes one image; got {count}: call it once per image")
    return image[0] if isinstance(image, (list, tuple)) else image


def batch_pieces(n: int, seeds):
    """A task of n images in pieces of GENERATE_BATCH rows: for each, its rows (a slice), how many,
    and its seeds — its share of per-image seeds or generators (a list), else the one shared by all
    (so image i draws from its own stream however n is split)."""
    for start in range(0, n, GENERATE_BATCH):
        rows = slice(start, min(start + GENERATE_BATCH, n))
        yield rows, rows.stop - start, seeds[rows] if isinstance(seeds, list) else seeds


def generators(seed: Seed, n: int) -> list[torch.Generator] | torch.Generator | None:
    """Per-image generators seed, seed+1, … (so image i is the same in a batch or alone), one per
    listed seed or generator (so requests with their own seeds can share a batch), the given
    generator shared by the batch, or None."""
    if seed is None or isinstance(seed, torch.Generator):
        return seed
    return [s if isinstance(s, torch.Generator) else torch.Generator().manual_seed(s) for s in image_seeds(seed, n)]


def candidate_seeds(seed: Seed, n: int, k: int) -> Seed:
    """Seeds of k candidates for each of n images, candidate-major within an image: candidate 0 of
    image i has image i's own seed (so k = 1 draws what a plain call draws), candidate j > 0 a seed
    mixed from (image seed, j), or for a listed generator a generator seeded from its next draw. A
    shared generator or None is shared by all candidates."""
    if seed is None or isinstance(seed, torch.Generator):
        return seed
    import numpy as np

    def mixed(s, j: int):
        if isinstance(s, torch.Generator):  # a caller's generator: its candidates' seeds drawn from it
            return torch.Generator().manual_seed(int(torch.randint(0, MAX_SEED, (), generator=s)))
        return int(np.random.SeedSequence([s % 2**63, j]).generate_state(1, np.uint64)[0] % 2**63)

    return [s if j == 0 else mixed(s, j) for s in image_seeds(seed, n) for j in range(k)]


def stage_callback(callback: Callback | None, stage: str) -> Callable[[SampleStep], None] | None:
    if callback is not None and not callable(callback):  # was a TypeError at the first step
        raise ConfigError(f"callback={callback!r}: give a function callback(stage, step), or None")
    return None if callback is None else (lambda step: callback(stage, step))


class InputChecks:
    """`UnclipPipeline.check_text` and `check_latents` (a mixin of `UnclipPipeline`)."""

    def check_text(self, text: TextEncoding) -> None:
        """A DataError unless `text` is an encoding of B captions by this model's CLIP: z_t [B, D],
        token states [B, L, W] and mask [B, L], all finite (NaN z_t sampled NaN z_i in silence; a
        z_t of one row beside states of two sampled one z_i from the AR prior)."""
        cfg = self.clip.config
        embeds, states, mask = (getattr(text, name, None) for name in ("embeds", "token_states", "mask"))
        if not all(isinstance(t, torch.Tensor) for t in (embeds, states, mask)):
            raise DataError(f"the captions must be a TextEncoding (from `encode_text`), not {type(text).__name__}")
        b = len(embeds)
        if (embeds.shape != (b, cfg.embed_dim) or states.ndim != 3 or states.shape[0] != b
                or states.shape[2] != cfg.text_width or mask.shape != states.shape[:2]):
            raise DataError(f"the caption encoding must hold z_t [B, {cfg.embed_dim}], token states "
                            f"[B, L, {cfg.text_width}] and a mask [B, L] for one B (this CLIP's widths); got "
                            f"{tuple(embeds.shape)}, {tuple(states.shape)}, {tuple(mask.shape)}")
        if not (torch.isfinite(embeds).all() and torch.isfinite(states).all()):
            raise DataError("the caption encoding holds NaN or infinite values")

    def check_latents(self, z_i, x_T=None, text: TextEncoding | None = None) -> None:
        """A DataError unless z_i is [B, D] for this decoder's D, x_T (if given) [B, 3, r, r] at its
        side r, both finite floats, and `text` (if given) an encoding of B captions (`check_text`):
        a [D] z_i would decode D images, a 64² x_T a 64² image, an integer x_T failed deep in the UNet."""
        null = self.decoder.text_proj.learned_classifier_free_guidance_embeddings
        width, side = null.shape[-1], self.config.decoder.resolution
        if not isinstance(z_i, torch.Tensor) or z_i.ndim != 2 or z_i.shape[-1] != width or not len(z_i):
            got = tuple(z_i.shape) if isinstance(z_i, torch.Tensor) else type(z_i).__name__
            raise DataError(f"z_i must be a tensor [B, {width}] (one CLIP image embedding per row); got {got}")
        for name, value in (("z_i", z_i), ("x_T", x_T)):
            if isinstance(value, torch.Tensor) and (not value.is_floating_point() or value.is_meta):
                raise DataError(f"{name} must hold real numbers (a float tensor with data); got a {value.dtype} "
                                f"tensor on {value.device}")
        if not torch.isfinite(z_i).all():
            raise DataError("z_i holds NaN or infinite values")
        length = z_i.detach().float().norm(dim=-1)  # [B]
        if self.unit_z_i and (length > MAX_Z_I_LENGTH).any():
            row = int(length.argmax())
            raise DataError(f"z_i row {row} has length {float(length[row]):.4g}: this model's decoder learnt from "
                            f"unit-length CLIP image embeddings (length 1; at most {MAX_Z_I_LENGTH:g} is taken), so "
                            "it would draw noise from it. Pass z_i from encode_image or prior_sample, or normalise "
                            "yours: z_i / z_i.norm(dim=-1, keepdim=True)")
        if text is not None:
            self.check_text(text)
            if len(text.embeds) != len(z_i):
                raise DataError(f"{len(text.embeds)} captions for {len(z_i)} z_i: give one caption per z_i, or none")
        if x_T is None:
            return
        if not isinstance(x_T, torch.Tensor) or tuple(x_T.shape) != (len(z_i), 3, side, side):
            got = tuple(x_T.shape) if isinstance(x_T, torch.Tensor) else type(x_T).__name__
            raise DataError(f"x_T must be a tensor [{len(z_i)}, 3, {side}, {side}] (one starting noise per z_i at "
                            f"the decoder's side); got {got}")
        if not torch.isfinite(x_T).all():
            raise DataError("x_T holds NaN or infinite values")
