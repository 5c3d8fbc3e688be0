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
"""

from __future__ import annotations

import contextlib
import logging
import math
import operator
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

from unclip.clip.model import ClipModel, TextEncoding
from unclip.config import (MAX_CANDIDATES, MAX_SEED, UnclipConfig, check_eta, check_guidance_scale,
                           check_noise_level, is_real, upsampler_steps_limit)
from unclip.diffusion import SAMPLERS, SampleStep
from unclip.errors import ConfigError, DataError, SamplingError
from unclip.tokenizer import clean_text, has_thai
from unclip.pipeline import MAX_IMAGES, PRECISIONS, latent
from unclip.precision import native_bf16

log = logging.getLogger(__name__)
IMPORTED = "imported:"  # the config name's prefix for models read from diffusers' layout (interop.py)
EXAMPLE_PROMPT = "a red circle above a blue square"  # what a shapes-world model is shown off with

Seed = int | Sequence[int] | torch.Generator | None
Callback = Callable[[str, SampleStep], None]
ImageInput = "Image.Image | str | Path | torch.Tensor | Sequence"
PRIORS = ("diffusion", "ar")
# the paper's ablations (§5.1, figure 9), for `unclip eval --prior`: "caption" passes the caption's
# z_t as z_i; "none" passes the decoder's learned null z_i, so it draws from the caption alone
ABLATIONS = ("caption", "none")


def auto_precision(device: torch.device) -> str:
    """bfloat16 where the device computes it natively (`unclip.precision.native_bf16`), else float32
    (where bf16 would be emulated, and many times slower)."""
    return "bfloat16" if native_bf16(device) else "float32"


INPAINT_RESAMPLE = 5  # RePaint resamplings per inpainting step unless asked otherwise
# images `generate`, `decode`, `inpaint` and `upscale` draw at once: a larger n runs in pieces, drawing the same images
GENERATE_BATCH = 64
# Longest z_i `decode` and `invert` take from a model whose CLIP gives unit-length image embeddings:
# its decoder learnt from length 1 (a sum of two embeddings still passes); z_i scaled by 1e6 decoded
# to noise, or to NaN, and the error blamed the model's training.
MAX_Z_I_LENGTH = 2.0


def _image_seeds(seed: int | Sequence, n: int) -> list:
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
        seed = _whole("seed", seed)
    except ConfigError:
        raise ConfigError(f"seed {seed!r}: give a whole number (or None for a random draw)") from None
    if not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"seed {seed}: give a whole number from 0 to {MAX_SEED}")
    return seed


def reads_world_captions(config: UnclipConfig) -> bool:
    """Whether a model reads prompts in the form of shapes world's captions (`world.caption_form`):
    one trained on shapes world, not one imported from diffusers' layout."""
    return config.data.source == "shapes" and not config.name.startswith(IMPORTED)


def _count(name: str, value, least: int, why: str, *, prompts: int = 1) -> int:
    """`value` as a whole number of images from `least` to MAX_IMAGES (with `prompts` prompts, n
    images each), else a ConfigError: below `least` it says `why`; above, a huge n failed only
    when memory ran out, after every image drawn so far."""
    count = _whole(name, value)
    if count < least:
        raise ConfigError(f"{name}={value}: {why}")
    if count * prompts > MAX_IMAGES:
        each = f" for each of {prompts} prompts" if prompts > 1 else ""
        raise ConfigError(f"{name}={value}{each}: one call returns at most {MAX_IMAGES:,} images, all held in "
                          "memory; call again for more (with seed + the images drawn so far, to draw new ones)")
    return count


def _per_stage(name: str, value, stages: int) -> list:
    """An upsampler setting as one value per stage: a value for all, or a list of one per stage."""
    if not isinstance(value, (list, tuple)):
        return [value] * stages
    if len(value) == 1:
        return list(value) * stages
    if len(value) != stages:
        raise ConfigError(f"upsampler {name}={list(value)}: give one value for every stage or one per stage "
                          f"(this model has {stages})")
    return list(value)


def _whole(name: str, value, hint: str = "") -> int:
    """`value` as an int (ints, numpy and 0-d torch integers), else a ConfigError (ending in `hint`):
    2.5, "2" or True would otherwise fail deep inside torch, or pass as 1."""
    if not isinstance(value, bool):
        with contextlib.suppress(TypeError):
            return operator.index(value)
    raise ConfigError(f"{name}={value!r}: give a whole number{hint}")


def _flag(name: str, value) -> bool:
    """`value` if it is True or False (a numpy bool too), else a ConfigError: upsample="no" is a
    non-empty string, so it was read as True."""
    import numpy as np

    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise ConfigError(f"{name}={value!r}: give True or False")


def _shared_seed(seed: Seed, task: str) -> Seed:
    """The one seed of a task whose images share one starting noise x_T: an int, a generator, None
    or a list of one (so a caller that passes a list everywhere is understood)."""
    if isinstance(seed, Sequence) and not isinstance(seed, str):
        if len(seed) != 1:
            raise ConfigError(f"{task}: its images share one starting noise, so give one seed, not {len(seed)}")
        return seed[0]
    return seed


def _frame_seeds(seed: Seed, n: int) -> list[int]:
    """One seed for each of n frames that share one x_T (interpolations, text diffs, the PCA probe):
    the same for every frame, so the upsamplers add the same noise to each and frames whose latents
    are equal are equal images (frame i drew from seed + i, so an interpolation flickered)."""
    if seed is None or isinstance(seed, torch.Generator):
        seed = int(torch.randint(0, MAX_SEED, (), generator=seed))
    return [seed] * n


def _one_image(image, task: str):
    """`image` if it is one image (a PIL image, a path, or a tensor [3, S, S] / [1, 3, S, S]); the
    image of a list of one."""
    batch = isinstance(image, (list, tuple)) or isinstance(image, torch.Tensor) and image.ndim == 4
    count = len(image) if batch else 1
    if count != 1:
        raise DataError(f"{task} takes one image; got {count}: call it once per image")
    return image[0] if isinstance(image, (list, tuple)) else image


def _pieces(n: int, seeds):
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
    return [s if isinstance(s, torch.Generator) else torch.Generator().manual_seed(s) for s in _image_seeds(seed, n)]


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

    return [s if j == 0 else mixed(s, j) for s in _image_seeds(seed, n) for j in range(k)]


def _stage_callback(callback: Callback | None, stage: str) -> Callable[[SampleStep], None] | None:
    if callback is not None and not callable(callback):  # was a TypeError at the first step
        raise ConfigError(f"callback={callback!r}: give a function callback(stage, step), or None")
    return None if callback is None else (lambda step: callback(stage, step))


class UnclipPipeline:
    """The stages of one model; build it with `unclip.load(path)`."""

    def __init__(self, *, config: UnclipConfig, clip: ClipModel, decoder, upsamplers: Sequence = (),
                 prior=None, ar_prior=None, directory: Path | None = None, pca=None, precision: str = "float32"):
        """pca: the basis `pca_probe` uses (an object with mean [D] and basis [K, D], e.g. a
        `PCAQuantizer`); default: the AR prior's. precision: what the decoder and upsampler UNets
        compute in while sampling (`PRECISIONS`; the diffusion arithmetic stays float32)."""
        self.config, self.clip, self.decoder = config, clip.eval(), decoder.eval()
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
                f"{self.priors or 'none'}, {self.config.decoder.candidates} candidate(s) per image, {self.precision} "
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
        for module in (self.clip, self.decoder, *self.upsamplers, self.prior, self.ar_prior, self.pca):
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
        steps, sampler, start = (_per_stage(name, value, stages) for name, value in
                                 (("steps", steps), ("sampler", sampler), ("start", start)))
        for i in range(stages):
            if steps[i] is not None and _whole("upsampler steps", steps[i]) < 1:
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
        pieces = [self.clip.encode_text(self.clip.tokenize(forms[at:at + GENERATE_BATCH]))
                  for at in range(0, len(forms), GENERATE_BATCH)]
        if len(pieces) == 1:
            return pieces[0]
        return TextEncoding(embeds=torch.cat([piece.embeds for piece in pieces]),
                            token_states=torch.cat([piece.token_states for piece in pieces]),
                            mask=torch.cat([piece.mask for piece in pieces]))

    def read_form(self, prompt: str) -> str:
        """`prompt` as this model reads it: `clean_text` (invisible characters, whitespace runs, Thai
        typing variants), and for a shapes-world model the form of the world's captions
        (`world.caption_form`: lower case, Thai words without spaces between them)."""
        if not reads_world_captions(self.config):
            return clean_text(prompt)
        from unclip.data.world import caption_form

        return caption_form(prompt)

    @property
    def example_prompt(self) -> str:
        """A prompt like the model's training captions, for the tools to suggest: the README's for
        shapes world, else the first caption its CLIP was trained on ("" when its manifest has none)."""
        if self.config.data.source == "shapes":
            return EXAMPLE_PROMPT
        if self.directory is None:
            return ""
        from unclip.modeldir import read_manifest

        return (read_manifest(self.directory).stats.get("example_captions") or [""])[0]

    def prompt_warnings(self, prompt: str) -> list[str]:
        """What a caller should know about `prompt` before trusting the images: words the model never
        saw, and whether it is longer than the model reads. Said in Thai for a prompt in Thai."""
        warnings = self._word_warnings(prompt)
        if self.clip.tokenize([self.read_form(prompt)]).truncated[0]:
            reads = self.clip.tokenizer.context_length - 2
            warnings.append(f"ข้อความนี้ยาวเกิน {reads} โทเคนที่โมเดลนี้อ่านได้ ส่วนที่เกินถูกตัดทิ้ง" if has_thai(prompt) else
                            f"it is longer than the {reads} tokens this model reads; the rest was left out")
        return warnings

    def _word_warnings(self, prompt: str) -> list[str]:
        """Words the model never learnt: for a shapes-world model, words of no caption of the world
        (docs/shapes_world.md) and known words put together as no caption puts them between two shapes
        (`_relation_warnings`); for one trained on other data, words of none of the captions its
        tokenizer learnt from (`unclip.words`; none for a model saved without them). In Thai for a
        prompt in Thai."""
        world = reads_world_captions(self.config)
        if world and not any(ch.isalnum() for ch in prompt):
            return ["it has no words, only symbols or emoji, so it tells the model nothing it learnt: expect "
                    "whatever the model draws for an empty caption"]
        relations = self._relation_warnings(prompt) if world else []
        unknown = self.unknown_words(prompt)
        if not unknown:
            return relations
        from unclip.words import did_you_mean

        words, one, thai = ", ".join(map(repr, unknown)), len(unknown) == 1, has_thai(prompt)
        if world:
            from unclip.data.world import vocabulary

            known = vocabulary()
            said = (f"โมเดลนี้ไม่เคยเห็นคำว่า {words} ตอนฝึก {'คำนี้' if one else 'คำเหล่านี้'}จึงไม่มีความหมายสำหรับโมเดล"
                    if thai else f"this model never saw {words} in training; "
                                 f"{'that word means' if one else 'those words mean'} nothing to it")
        else:
            known, read = self.clip.tokenizer.words.words, self.clip.tokenizer.words.captions
            said = (f"คำว่า {words} ไม่อยู่ในคำบรรยาย {read:,} รายการที่โมเดลนี้เรียนคำศัพท์มา "
                    f"{'คำนี้' if one else 'คำเหล่านี้'}จึงแทบไม่มีความหมายสำหรับโมเดล"
                    if thai else f"none of the {read:,} training captions this model read its words from uses "
                                 f"{words}; {'that word means' if one else 'those words mean'} little or nothing to it")
        return [said + did_you_mean(unknown, known, thai=thai)] + relations

    def _relation_warnings(self, prompt: str) -> list[str]:
        """For a shapes-world model: a phrase placing one shape by another that no caption of the world
        uses, though each of its words is one ("อยู่บน", is on; "on top of"), with the world's phrases
        for the relation it seems to mean (`world.unknown_relations`). In Thai for a prompt in Thai."""
        from unclip.data.world import RELATION_EN, RELATION_TH, unknown_relations

        thai, warnings = has_thai(prompt), []
        for phrase, relations in unknown_relations(self.read_form(prompt)):
            said = [repr(p) for r in relations for p in (RELATION_TH if thai else RELATION_EN)[r]]
            ours = f"{', '.join(said[:-1])}{' หรือ ' if thai else ' or '}{said[-1]}" if len(said) > 1 else said[0]
            warnings.append(f"คำบรรยายของ shapes world ไม่ใช้ {phrase!r} บอกตำแหน่งของรูปทรงหนึ่งเทียบกับอีกรูปทรง "
                            f"แต่ใช้ {ours} โมเดลจึงอาจวางรูปทรงไม่ตรงกับที่สั่ง" if thai else
                            f"{phrase!r} is not how shapes world's captions say where one shape is from another; "
                            f"they say {ours}, so this model may not place the shapes as asked")
        return warnings

    def _known_words_hint(self, *, thai: bool) -> str:
        """Where the words this model knows are listed, for the log's word warnings: docs/shapes_world.md
        for a shapes-world model, the words.json beside its tokenizer for one trained on other data."""
        if reads_world_captions(self.config):
            where = "docs/shapes_world.md"
        elif self.directory is not None and self.clip.tokenizer.words is not None:
            from unclip.words import WORDS_FILE

            where = str(Path(self.directory) / "tokenizer" / WORDS_FILE)
        else:
            return ""
        return f" (คำที่โมเดลรู้จัก: {where})" if thai else f" (the words it knows: {where})"

    def unknown_words(self, prompt: str) -> list[str]:
        """Words of `prompt` that the model never read in training (each once, in order): for a
        shapes-world model, words of no caption of the world; for one trained on other data, words
        of none of the captions its tokenizer learnt from (not those in scripts written without
        spaces, `unclip.words`); [] for a model saved without its captions' words."""
        if reads_world_captions(self.config):
            from unclip.data.world import unknown_words

            return unknown_words(self.read_form(prompt))
        words = self.clip.tokenizer.words
        return words.unknown(self.read_form(prompt)) if words is not None else []

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
            opened = [_open_rgb(item) for item in items]  # each file read once
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
            return self.prior.sample(text.token_states.float(), text.mask, text.embeds,
                                     generator=None if gens is None else [g for _ in range(k) for g in gens],
                                     callback=_stage_callback(callback, "prior"), **options)
        rows = []
        for i in range(n):  # the AR prior, or a shared generator: one caption at a time
            g = gens[i] if isinstance(gens, list) else gens
            args = (text.token_states[i:i + 1].float(), text.mask[i:i + 1], text.embeds[i:i + 1])
            if prior == "diffusion":
                rows.append(self.prior.sample(*args, generator=g, callback=_stage_callback(callback, "prior"),
                                              **options))
            else:
                scale = 1.0 if guidance_scale is None else guidance_scale
                rows.append(self.ar_prior.sample(*args, generator=g, guidance_scale=scale))
        return torch.cat(rows)

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
        inverted = _flag("inverted", inverted)
        eta = None if eta is None else check_eta(eta)
        guidance_scale = None if guidance_scale is None else check_guidance_scale(guidance_scale)
        steps = None if steps is None else _whole("steps", steps)
        self.check_latents(z_i, x_T, text)
        gens = generators(seed, len(z_i))
        pieces = []
        for rows, _, piece_gens in _pieces(len(z_i), gens):
            with self.autocast():
                images = self.decoder.sample(
                    z_i[rows].to(self.device), None if text is None else text.token_states[rows],
                    None if text is None else text.mask[rows], text_embeds=None if text is None else text.embeds[rows],
                    x_T=None if x_T is None else x_T[rows], guidance_scale=guidance_scale, steps=steps, sampler=sampler,
                    eta=eta, generator=piece_gens, callback=_stage_callback(callback, "decoder"),
                    clip_denoised=not inverted)
            _check_finite(images, "decoder", sampler or self.config.decoder.sampler,
                          steps or self.config.decoder.sample_steps)
            pieces.append(self.upsample(images.clamp(-1, 1), stages, generator=piece_gens, callback=callback))
        return torch.cat(pieces)

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

    def upsample(self, images: torch.Tensor, stages: int, *, generator=None,
                 callback: Callback | None = None) -> torch.Tensor:
        """Run the first `stages` upsamplers on decoder images [B, 3, r, r] in [-1, 1]; generator: from
        `generators`. (`upscale` takes an image of any side.)"""
        if not 0 <= _whole("stages", stages) <= len(self.upsamplers):
            raise ConfigError(f"stages={stages}: this model has {len(self.upsamplers)} upsampler(s)")
        side = self.sizes[0]
        if not (isinstance(images, torch.Tensor) and images.ndim == 4 and images.shape[1:] == (3, side, side)):
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise DataError(f"upsample takes decoder images, a tensor [B, 3, {side}, {side}] in [-1, 1]; got {got} "
                            "(`upscale` takes an image of any side)")
        with self.autocast():
            for stage, upsampler in enumerate(self.upsamplers[:stages], start=1):
                images = upsampler.sample(images, generator=generator, callback=_stage_callback(callback, f"upsampler{stage}"))
                _check_finite(images, f"upsampler {stage}", upsampler.config.sampler, upsampler.config.sample_steps)
        return images

    def upscale(self, image, size: int | None = None, *, n: int = 1, seed: Seed = 0,
                callback: Callback | None = None) -> list:
        """An image enlarged by the upsamplers alone (no caption, no z_i): read at the input side of the
        stage it enters (the largest input side not above the image's own; a smaller image is enlarged
        to the decoder's side first), then through each stage up to `size` (one of `sizes`; default:
        the last). n: how many draws (the upsamplers sample, so each differs a little)."""
        if not self.upsamplers:
            raise ConfigError("this model has no upsamplers: it makes images at the decoder's side only")
        image = _one_image(image, "upscale")
        n = _count("n", n, 1, "upscale draws 1 or more images")
        own = image.shape[-1] if isinstance(image, torch.Tensor) else _open_rgb(image).width
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
        for _, count, piece_gens in _pieces(n, gens):  # a large n in pieces: draw i from its own seed
            images = low.repeat(count, 1, 1, 1)
            with self.autocast():
                for stage in range(first + 1, last + 1):
                    upsampler = self.upsamplers[stage - 1]
                    images = upsampler.sample(images, generator=piece_gens,
                                              callback=_stage_callback(callback, f"upsampler{stage}"))
                    _check_finite(images, f"upsampler {stage}", upsampler.config.sampler,
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
        _whole("size", size, f" (the side: one of {', '.join(map(str, self.sizes))})")
        if size not in self.sizes:
            raise ConfigError(f"this model makes images of {', '.join(f'{s}×{s}' for s in self.sizes)}; "
                              f"size {size} is not one of them")
        return self.sizes.index(size)

    def _stages(self, size: int | None, upsample: bool) -> int:
        """`stages_for(size)`, or 0 with upsample=False (an error if `size` asks for more)."""
        upsample = _flag("upsample", upsample)
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
        steps = None if steps is None else _whole("steps", steps)
        scale = self.decoder.config.guidance_scale if guidance_scale is None else guidance_scale
        with self.autocast():
            x_T = self.decoder.invert(x, z_i, None if text is None else text.token_states,
                                      None if text is None else text.mask,
                                      text_embeds=None if text is None else text.embeds, steps=steps,
                                      guidance_scale=scale, callback=_stage_callback(callback, "invert"))
        return z_i, x_T

    def fixed_noise(self, seed: Seed, n: int) -> torch.Tensor:
        """One decoder starting noise x_T [1, 3, r, r] drawn from `seed`, repeated n times [n, 3, r, r]."""
        side = self.config.decoder.resolution
        g = generators(seed, 1)
        noise = torch.randn((1, 3, side, side), generator=g[0] if isinstance(g, list) else g)
        return noise.expand(n, -1, -1, -1).to(self.device)

    # --- tasks --------------------------------------------------------------------------------

    def generate(self, prompt: str | Sequence[str], n: int = 1, *, prior: str | None = None,
                 prior_guidance_scale: float | None = None, guidance_scale: float | None = None,
                 steps: int | None = None, sampler: str | None = None, seed: Seed = None,
                 callback: Callback | None = None, upsample: bool = True, size: int | None = None,
                 candidates: int | None = None, upsampled_candidates: int | None = None) -> list:
        """n images per prompt (paper §2): prior → z_i → decoder (guided by z_i and the caption) → upsamplers.

        size: stop the cascade at this side (one of `sizes`; default: the last upsampler's).
        candidates: draw this many z_i and decoder images per requested image and keep the one
        whose CLIP image embedding is closest to the caption's z_t (default: the decoder config's
        `candidates`). It costs that many priors and decoders per image.
        upsampled_candidates: how many of them, the closest at the decoder's size, are upsampled
        and compared again at the final size, where CLIP reads them better (default: the decoder
        config's; 1 picks at the decoder's size and upsamples only the kept one). Each costs an
        upsampling.
        """
        prompts = prompt_list(prompt)
        n = _count("n", n, 1, "ask for at least one image", prompts=len(prompts))
        k = self.config.decoder.candidates if candidates is None else _whole("candidates", candidates)
        if not 1 <= k <= MAX_CANDIDATES:
            raise ConfigError(f"candidates={k}: draw 1 to {MAX_CANDIDATES} candidates per image")
        m = self.config.decoder.upsampled_candidates if upsampled_candidates is None else \
            _whole("upsampled_candidates", upsampled_candidates)
        if m < 1:
            raise ConfigError(f"upsampled_candidates={m}: upsample at least the kept candidate")
        stages = self._stages(size, upsample)  # an unknown size is an error before any work
        if steps is not None:
            _whole("steps", steps)
        rows = [p for p in prompts for _ in range(n)]
        seeds = seed if seed is None or isinstance(seed, torch.Generator) else _image_seeds(seed, len(rows))
        images = []
        for piece, _, piece_seeds in _pieces(len(rows), seeds):  # a huge n in pieces: image i draws from its own seed
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
        embeds = text.embeds
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
        embedding and its caption's z_t [B, D]."""
        k, keep = _whole("k", k), _whole("keep", keep)
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
        n = _count("n", n, 1, "give 1 or more variations")
        check_eta(eta)
        image = _one_image(image, "variations")
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
        n = _count("n", n, 2, "an interpolation needs at least its two endpoints")
        self._stages(size, upsample)  # an unknown size is an error before any work
        seed = _shared_seed(seed, "interpolate")
        if mode not in ("fixed", "inverted"):
            raise ConfigError(f"unknown interpolation mode {mode!r}; use fixed or inverted")
        thetas = torch.linspace(0, 1, n)
        side = max(self.clip.config.image_size, self.config.decoder.resolution)
        pair = torch.cat([self.pixels(_one_image(image_a, "interpolate"), side),
                          self.pixels(_one_image(image_b, "interpolate"), side)])  # [2, 3, S, S]
        if mode == "inverted":
            z, x_T = self.invert(pair, steps=steps, guidance_scale=guidance_scale, callback=callback)
            x_Ts = torch.cat([latent.slerp_rows(x_T[:1], x_T[1:2], float(t)) for t in thetas])
        else:
            z = self.encode_image(pair)
            x_Ts = self.fixed_noise(seed, n)
        z_i = latent.slerp(z[:1], z[1:2], thetas[:, None].to(z))  # [n, D]
        images = self.decode(z_i, x_T=x_Ts, sampler="ddim", eta=0.0, steps=steps, guidance_scale=guidance_scale,
                             seed=_frame_seeds(seed, n), callback=callback, inverted=mode == "inverted",
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
        seed = _shared_seed(seed, "text_diff")
        if not thetas or any(not is_real(t) or not 0 <= t <= 1 for t in thetas):
            raise ConfigError(f"text-diff angles: give one or more, each in [0, 1] (the paper uses up to 0.25–0.5); "
                              f"got {thetas}")
        text_diff_captions(caption, target)
        text = self.encode_text([caption, target])  # captions that cannot give a direction fail before the inversion
        direction = latent.text_direction(text.embeds[1:2], text.embeds[:1])
        z_i, x_T = self.invert(_one_image(image, "text_diff"), steps=steps, guidance_scale=guidance_scale,
                               callback=callback)
        # [1, D], as long as z_i: unit for unclip's CLIP, the raw CLIP scale for imported (Karlo) models
        direction = direction * z_i[:1].norm(dim=-1, keepdim=True)
        z = latent.slerp(z_i[:1], direction, torch.tensor(thetas)[:, None].to(z_i))
        images = self.decode(z, x_T=x_T[:1].expand(len(thetas), -1, -1, -1), sampler="ddim", eta=0.0, steps=steps,
                             guidance_scale=guidance_scale, seed=_frame_seeds(seed, len(thetas)), callback=callback,
                             inverted=True,
                             upsample=upsample, size=size)
        return to_pil(images)

    def inpaint(self, image, mask, prompt: str | None = None, n: int = 1, *, resample: int = INPAINT_RESAMPLE,
                steps: int | None = None, guidance_scale: float | None = None, seed: Seed = None,
                callback: Callback | None = None, size: int | None = None, upsample: bool = True) -> list:
        """Fill the white (1) region of `mask` and keep the rest of `image` (RePaint resampling).

        The fill follows `prompt` (through the prior) or, without one, the image's own z_i. mask:
        PIL image or tensor [H, W] in {0, 1}, square, any side: the decoder repaints every one of
        its pixels the mask touches, and the output keeps the image outside the mask. size: stop
        the cascade at this side (one of `sizes`); upsample=False stops at the decoder's.
        """
        n = _count("n", n, 1, "inpainting draws 1 or more images")
        if _whole("resample", resample) < 1:
            raise ConfigError(f"resample={resample}: inpainting takes 1 or more resamplings per step")
        from unclip.diffusion import repaint_loop, run

        stages = self._stages(size, upsample)
        steps = None if steps is None else _whole("steps", steps)

        side = self.config.decoder.resolution
        image = _one_image(image, "inpaint")
        known = self.pixels(image, side)  # [1, 3, r, r]
        hole = _mask_tensor(mask, side).to(self.device)  # [1, 1, r, r], 1 = paint
        gens = generators(seed, n)  # one stream per image: its prior, its RePaint loop, its upsamplers in turn
        own_z = None if prompt is not None else self.encode_image(image)[:1]  # [1, D]
        scale = self.decoder.config.guidance_scale if guidance_scale is None else guidance_scale
        steps = self.decoder.config.sample_steps if steps is None else steps
        pieces = []
        for _, count, piece_gens in _pieces(n, gens):  # a large n in pieces: image i draws from its own stream
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
                images = run(loop, _stage_callback(callback, "decoder"))
            _check_finite(images, "decoder", "RePaint", steps)
            pieces.append(self.upsample(images.clamp(-1, 1), stages, generator=piece_gens, callback=callback))
        images = torch.cat(pieces)
        out_side = images.shape[-1]
        if out_side > side:  # keep the original's known pixels at that size
            full = self.pixels(image, out_side)
            big_hole = _mask_tensor(mask, out_side).to(images)  # the mask itself, not its decoder-sized cells
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
        dims = [_whole(f"dims[{i}]", k) for i, k in enumerate(dims)]
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
        seed = _shared_seed(seed, "pca_probe")
        pca = self.pca
        z_i = self.encode_image(_one_image(image, "pca_probe"))
        length = z_i.norm(dim=-1, keepdim=True)  # [1, 1]
        z = torch.cat([latent.pca_truncate(z_i, mean=pca.mean, basis=pca.basis, k=k) * length for k in dims])
        images = self.decode(z, x_T=self.fixed_noise(seed, len(dims)), sampler="ddim", eta=0.0, steps=steps,
                             guidance_scale=guidance_scale, seed=_frame_seeds(seed, len(dims)), callback=callback,
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


def _open_rgb(item):
    """A square RGB PIL image from a PIL image or a path; other modes are converted, other shapes refused."""
    from PIL import Image, ImageOps

    from unclip.data.png import open_bytes, read_checked
    from unclip.data.shapes import to_rgb

    if isinstance(item, Image.Image):
        image = item
    elif not isinstance(item, (str, os.PathLike)):
        raise DataError(f"an image is a PIL image, a path or a tensor, not {type(item).__name__}")
    else:
        try:
            with open_bytes(read_checked(item)) as opened:
                opened.load()
                image = ImageOps.exif_transpose(opened)  # upright, as the training data was read
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise DataError(f"cannot read the image {item}: {err}") from None
    named = "the image" if isinstance(item, Image.Image) else f"the image {item}"  # which of two (interpolate)
    if not image.width:  # a 0×0 image failed deep in torch's resize
        raise DataError(f"{named} is {image.width}×{image.height}: it has no pixels")
    if image.width != image.height:
        raise DataError(f"{named} is {image.width}×{image.height}; unclip works on square images, so crop it "
                        f"to a square first (e.g. the centre {min(image.size)}×{min(image.size)})")
    return to_rgb(image)


def _mask_tensor(mask, side: int) -> torch.Tensor:
    """A mask (PIL image, path, or tensor or array [H, W] / [1, 1, H, W] in [0, 1] or 0 … 255) as
    [1, 1, side, side] in {0, 1}: values of ½ and above (128 and above in bytes) repaint, or, for an
    image with transparency, its fully transparent pixels."""
    import numpy as np
    import torch.nn.functional as F
    from PIL import Image, ImageOps

    transparent = False  # whether the mask's transparency marks the region
    if isinstance(mask, np.ndarray):
        if mask.dtype.kind not in "biuf":  # torch.from_numpy raised a TypeError listing its dtypes
            raise DataError(f"a mask array holds numbers in [0, 1] (1 = repaint) or bytes; got dtype {mask.dtype}")
        mask = torch.from_numpy(mask)
    if isinstance(mask, torch.Tensor):
        if mask.ndim not in (2, 3, 4) or math.prod(mask.shape[:-2]) != 1 or not mask.numel():
            raise DataError(f"a mask tensor must be [H, W] (or [1, H, W], [1, 1, H, W]); got {tuple(mask.shape)}")
        m = mask.float().view(1, 1, *mask.shape[-2:])
        if not torch.isfinite(m).all() or m.min() < 0 or m.max() > 255:
            raise DataError("a mask tensor holds values in [0, 1] (1 = repaint), or bytes in 0 … 255; this one has "
                            "values outside them")
        m = m / 255 if m.max() > 1 else m  # bytes, as read from an image
    elif not isinstance(mask, (Image.Image, str, os.PathLike)):
        raise DataError(f"a mask is a PIL image, a path, or a tensor or array [H, W] in [0, 1] (1 = repaint); "
                        f"got {type(mask).__name__}")
    else:
        from unclip.data.png import open_bytes, read_checked
        from unclip.data.shapes import has_alpha

        try:
            pil = mask if isinstance(mask, Image.Image) else open_bytes(read_checked(mask))
            pil.load()
            if not isinstance(mask, Image.Image):
                pil = ImageOps.exif_transpose(pil)  # upright, as `_open_rgb` reads the image
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise DataError(f"cannot read the mask {mask}: {err}") from None
        transparent = has_alpha(pil)  # an alpha channel, a transparent palette entry or a colour key
        if transparent:  # fully transparent = paint (the OpenAI convention, as the server reads edits)
            alpha = np.asarray(pil.convert("RGBA").getchannel("A"))
            m = torch.from_numpy((alpha == 0).astype(np.float32))[None, None]
        else:
            m = torch.from_numpy(np.asarray(pil.convert("L"), dtype=np.float32) / 255.0)[None, None]
    if m.shape[-1] != m.shape[-2]:
        raise DataError(f"the mask must be square like the image; got {m.shape[-1]}×{m.shape[-2]}")
    m = (m >= 0.5).float()  # white (≥ ½) repaints: a JPEG mask's ringing or a faint grey is not white
    if m.sum() == 0 and transparent:
        raise DataError("the mask has an alpha channel, so its fully transparent pixels mark the region to repaint, "
                        "and it has none: erase the region, or save the mask without transparency, region white")
    if m.sum() == 0:
        raise DataError("the mask is empty: mark the region to repaint in white (or transparent)")
    # any coverage paints the whole pixel: a region smaller than half a decoder pixel would vanish
    return (F.interpolate(m, size=(side, side), mode="area") > 0).float()


def _check_finite(images: torch.Tensor, stage: str, sampler: str, steps: int) -> None:
    """Refuse to hand on images with NaN or infinite values (they would save as black)."""
    if not torch.isfinite(images).all():
        raise SamplingError(
            f"the {stage} produced non-finite values ({sampler}, {steps} steps): try another sampler, more steps "
            "or a guidance scale nearer 1; if every setting fails, the model's training diverged")


def to_pil(images: torch.Tensor) -> list:
    """Images [B, 3, R, R] in [-1, 1] → PIL RGB images."""
    from unclip.data.shapes import to_pil as one

    return [one(image) for image in images]
