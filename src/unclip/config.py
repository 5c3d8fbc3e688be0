"""Configuration as data: one frozen dataclass per stage, presets, JSON round trip, overrides.

Every model directory and every checkpoint carries the full `UnclipConfig` as JSON, so loading
needs no flags. The CLI changes a preset with dotted overrides (`clip.train.steps=200`,
`upsamplers.0.base_channels=32`) whose values are parsed as JSON and type-checked against the
field they set; an unknown key is an error that lists the valid keys at that level.

Modes are strings checked against a `Literal` (never interacting booleans). Fields that later
stages read are documented where they are declared; paper defaults cite the section.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any, Literal

from unclip.errors import ConfigError

Precision = Literal["no", "bf16"]


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Optimisation settings of one stage; the one trainer reads these for every stage."""

    steps: int = 1000  # optimizer steps (a ceiling under `--minutes`)
    batch_size: int = 64  # samples per step, over all processes and grad_accum micro-batches
    lr: float = 3e-4  # AdamW's peak learning rate
    weight_decay: float = 0.01  # AdamW's decoupled weight decay
    warmup_steps: int = 100  # linear warmup from 0 to lr
    lr_schedule: Literal["cosine", "constant"] = "cosine"  # after the warmup: cosine decay to 0, or lr throughout
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    grad_accum: int = 1  # micro-batches each step's batch is split into (same update, less memory)
    ema_decay: float = 0.0  # 0 disables EMA
    # "bf16": autocast to bfloat16 on GPUs and CPUs that compute it natively (AVX-512-BF16, AMX);
    # elsewhere the run trains in float32 and says so (`unclip.precision`)
    mixed_precision: Precision = "no"
    log_every: int = 20  # steps between lines of metrics.jsonl
    ckpt_every: int = 500  # steps between checkpoints (a stopped run resumes from the last)
    # validation loss every this many steps (0: none) on eval_batches fixed batches of held-out pairs:
    # shapes world's val split, or a folder's or shards' `data.holdout`
    eval_every: int = 0
    eval_batches: int = 4
    num_workers: int = 0  # data-loading processes (0: in the training process)
    seed: int = 0  # of the stage's initial weights, noise, timesteps and condition drops
    # torch.compile the stage's networks (inductor; on the CPU it needs a C++ compiler, and the first
    # steps wait for it, ~20 s): on the CPU in bf16 the diffusion prior trains ~10% faster, the
    # decoder 6% (docs/performance.md). Not under FSDP.
    compile: bool = False


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where training pairs come from: the bundled shapes world, a folder, or webdataset shards."""

    source: Literal["shapes", "folder", "webdataset"] = "shapes"  # bundled world, images + .txt captions, or shards
    path: str = ""  # folder or shard pattern ("data/{000000..000009}.tar") when not shapes
    lang: Literal["en", "th", "mix"] = "mix"  # shapes world: captions in English, Thai, or either per scene
    seed: int = 0  # of the training stream: shapes world's scenes, the order pairs are read in, the BPE's corpus
    # folder or webdataset: the fraction of pairs kept out of training (chosen by a hash of each
    # pair's key, so the same pairs on any machine) and evaluated on; shapes world has its splits
    holdout: float = 0.0
    # shapes world: relative odds of single-object, pair and count scenes in the training split (the
    # world's own mix by default, docs/shapes_world.md). More pairs put a stage's training where the
    # shipped model fails most; val, test and unseen keep the world's mix.
    scenes: tuple[float, ...] = (0.4, 0.35, 0.25)


@dataclass(frozen=True, kw_only=True)
class TokenizerConfig:
    """Byte-level BPE trained on the caption corpus (Thai included)."""

    vocab_size: int = 1024  # at most this many tokens: the 256 bytes, the special tokens and merges
    context_length: int = 32  # tokens a caption is cut or padded to, start and end included
    corpus_size: int = 20_000  # captions sampled to train the BPE
    max_token_bytes: int = 15  # longest merged token: five Thai characters (docs/decisions.md)


@dataclass(frozen=True, kw_only=True)
class ClipConfig:
    """CLIP towers (`transformers` CLIPTextModelWithProjection / CLIPVisionModelWithProjection)."""

    embed_dim: int = 64  # the joint space's dimension: z_i and z_t
    # 64² with 8×8 patches: 64 tokens like 32²/4×4, but a small shape spans 16 pixels instead of 8,
    # which is what tells a small hexagon from a small circle (docs/clip.md).
    image_size: int = 64
    patch_size: int = 8  # side of the square patches the image tower reads as tokens
    vision_width: int = 128  # the image tower's hidden size
    vision_layers: int = 4  # the image tower's transformer layers
    vision_heads: int = 4  # the image tower's attention heads (vision_width must divide by it)
    text_width: int = 128  # the text tower's hidden size: the width of the token states W
    text_layers: int = 4  # the text tower's transformer layers
    text_heads: int = 4  # the text tower's attention heads (text_width must divide by it)
    # The towers' MLP activation: CLIP's quick-GELU, or exact GELU, one fused kernel that makes a bf16
    # step of the shapes preset 15% cheaper on the CPU (docs/clip.md).
    activation: Literal["quick_gelu", "gelu"] = "quick_gelu"
    init_temperature: float = 0.07  # the contrastive softmax's starting temperature (CLIP's)
    # Fraction of the shapes-world training stream that comes in twin groups: scenes one attribute
    # apart, side by side in a batch, as hard negatives (unclip.data.twins, docs/clip.md).
    hard_negatives: float = 0.0
    # Scenes per twin group: a scene and twin_group − 1 versions of it that each set the same
    # attribute to a different value, so every two of them are hard negatives (unclip.data.twins).
    twin_group: int = 2
    # Relative odds that a twin group changes the shape, the colour, the size, the place ("where") or,
    # in a two-object scene, what goes with what ("binding"); left-out trailing odds are 0. These
    # defaults are also unclip.data.twins' defaults.
    twin_weights: tuple[float, ...] = (0.7, 0.1, 0.1, 0.1, 0.0)
    # Which towers learn. "text" freezes the image tower, so every z_i stays what it was: fine-tuning a
    # trained model's CLIP this way (`--init`) keeps its decoder's inputs, and only the priors, which map
    # captions to z_i, need retraining (docs/clip.md, "Binding").
    train_towers: Literal["both", "text"] = "both"
    # This network's schedule in about 10 minutes on 2 CPU cores with bf16 autocast (0.21 s a step); the
    # shapes preset trains a cheaper variant of it for 3,000 steps (docs/clip.md).
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=2800, batch_size=128, lr=1e-3, warmup_steps=100, mixed_precision="bf16", ckpt_every=400))


@dataclass(frozen=True, kw_only=True)
class PriorConfig:
    """Diffusion prior (paper §2.2) on `diffusers` PriorTransformer.

    Sequence [text tokens, z_t, timestep, noised z_i, learned query]; predicts the clean z_i.
    """

    width: int = 128  # the transformer's hidden size
    layers: int = 4  # transformer layers
    heads: int = 4  # attention heads (width must divide by it)
    timesteps: int = 1000  # diffusion steps of the training noise schedule
    noise_schedule: Literal["cosine", "linear"] = "cosine"  # improved DDPM's cosine ᾱ, or DDPM's linear β
    # Paper §2.2: "we find it better to train our model to predict the unnoised z_i directly".
    prediction_type: Literal["sample", "epsilon", "v_prediction"] = "sample"
    # Diffusion runs on (z_i - mean) / std, both computed from training z_i and saved with the
    # model (the paper multiplies its CLIP embeddings by a fixed 17.2). "scalar": one std for every
    # dimension, like the paper's single scale; "per_dim": a std per dimension, like Karlo's prior.
    normalization: Literal["scalar", "per_dim"] = "scalar"
    cond_drop: float = 0.1  # paper §2.2: text conditioning dropped 10% for CFG
    best_of: int = 2  # paper §2.2: keep the sample with the higher dot product with z_t
    sampler: Literal["ddpm", "ddim", "dpmsolver++"] = "ddim"  # how z_i is sampled unless a call says otherwise
    # The paper samples its prior with 64 strided steps; on shapes world 8, 16 and 64 DDIM steps
    # give the same cosine (0.938 / 0.936 / 0.935, docs/priors.md), so 16 keeps evaluation short.
    sample_steps: int = 16
    eta: float = 0.0  # DDIM η: 0 deterministic
    guidance_scale: float = 1.0  # classifier-free guidance of the caption: 1 none, above 1 stronger
    # After sampling, each z_i is moved toward the caption's ranking z_t (the ranking tower's where
    # the model has one, else its own), z_i ← |z_i| · unit(unit(z_i) + rank_steer · unit(z_t)); 0 leaves
    # it. The shipped prior reads a text tower that does not tell "left of" from "right of", so its z_i
    # lay two objects out at random; steered by 1.0 toward the ranking tower, the decoder drew them the
    # right way round 0.93 of the time against 0.56 (bench/decoder_layout.py, docs/pipeline.md).
    rank_steer: float = 0.0
    # Sized like the AR prior (width 128, 4 layers, 1,500 steps × 128, bf16) to compare at equal
    # size and budget on 2 CPU cores from an embedding folder (docs/priors.md).
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=1500, batch_size=128, lr=1e-3, warmup_steps=100, mixed_precision="bf16", ckpt_every=250))


@dataclass(frozen=True, kw_only=True)
class ARPriorConfig:
    """Autoregressive prior (paper §2.2): PCA of z_i, quantized, causal transformer."""

    width: int = 128  # the causal transformer's hidden size
    layers: int = 4  # transformer layers
    heads: int = 4  # attention heads (width must divide by it)
    pca_variance: float = 0.99  # keep the components explaining at least this much variance
    # Paper §2.2: 1,024 buckets for its 319 PCA dimensions. For a 64-d CLIP (20 dimensions kept),
    # 128 buckets train far better in the same budget: cosine 0.86 vs 0.25 (docs/priors.md).
    buckets: int = 128
    cond_drop: float = 0.1  # fraction of training captions dropped, for classifier-free guidance
    # Sized for about 10 minutes on 2 CPU cores from an embedding folder (`unclip embed`).
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=1500, batch_size=128, lr=1e-3, warmup_steps=100, mixed_precision="bf16", ckpt_every=250))


@dataclass(frozen=True, kw_only=True)
class DecoderConfig:
    """Decoder (paper §2.1) on `diffusers` UNet2DConditionModel, conditioned on z_i and caption."""

    resolution: int = 32  # side of the images the decoder makes (the upsamplers' input)
    base_channels: int = 64  # the UNet's channels at full resolution
    # UNet levels, each half the side of the one before: each one's channels ÷ base_channels
    channel_mult: tuple[int, ...] = (1, 2, 2)
    layers_per_block: int = 1  # ResNet blocks per UNet level
    attention_resolutions: tuple[int, ...] = (16,)  # sides of the levels with cross-attention to the caption and z_i
    head_dim: int = 32  # channels per attention head
    cross_attention_dim: int = 128  # width of the context tokens (caption states and z_i tokens) attended to
    clip_tokens: int = 4  # paper §2.1: z_i projected into 4 extra context tokens
    # Conditioning modes of diffusers' UnCLIPTextProjModel (Karlo), for imported models
    # (docs/interop.md): "pooled" also adds a projection of the caption's z_t to the timestep
    # embedding; "empty_prompt" guides against the CLIP encoding of "" instead of a learned null.
    time_text: Literal["none", "pooled"] = "none"
    text_null: Literal["learned", "empty_prompt"] = "learned"  # what guidance guides against (see time_text)
    timesteps: int = 1000  # diffusion steps of the training noise schedule
    noise_schedule: Literal["cosine", "linear"] = "cosine"  # improved DDPM's cosine ᾱ, or DDPM's linear β
    variance: Literal["learned_range", "fixed_small"] = "learned_range"  # improved DDPM's learned Σ, or fixed β̃
    prediction_type: Literal["epsilon", "sample", "v_prediction"] = "epsilon"  # what the UNet predicts
    vlb_weight: float = 0.001  # improved DDPM §3.1: hybrid loss λ (used with variance="learned_range")
    z_drop: float = 0.1  # paper §2.1 says 10% (and 5% elsewhere); 10% here
    text_drop: float = 0.5  # paper §2.1: caption dropped 50%
    sampler: Literal["ddpm", "ddim", "dpmsolver++"] = "ddim"  # how images are sampled unless a call says otherwise
    sample_steps: int = 50  # sampling steps unless a call says otherwise
    eta: float = 0.0  # DDIM η: 0 deterministic
    guidance_scale: float = 3.0  # classifier-free guidance of z_i and the caption: 1 none, above 1 stronger
    # Images drawn per requested image (prior and decoder); the one whose CLIP image embedding is
    # closest to the caption's z_t is kept and upsampled (`UnclipPipeline.generate`, docs/pipeline.md).
    candidates: int = 1
    # Of those, how many (the closest at the decoder's size) are upsampled and compared again at the
    # final size, where CLIP reads them better; 1 upsamples only the kept one.
    upsampled_candidates: int = 1
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=20_000, batch_size=64, lr=2e-4, ema_decay=0.999)
    )


@dataclass(frozen=True, kw_only=True)
class UpsamplerConfig:
    """A ×4 upsampler (paper §2.1 / appendix): UNet2DModel, convolutions only, no caption."""

    in_resolution: int = 32  # side of the images it enlarges (the decoder's or the last upsampler's)
    out_resolution: int = 128  # side of the images it makes: 4 × in_resolution
    base_channels: int = 32  # the UNet's channels at full resolution
    # UNet levels, each half the side of the one before: each one's channels ÷ base_channels
    channel_mult: tuple[int, ...] = (1, 2, 2, 4)
    layers_per_block: int = 1  # ResNet blocks per UNet level
    degradation: Literal["blur", "bsr"] = "blur"  # stage 1: gaussian blur k=3 σ=0.6; stage 2: BSR
    blur_kernel: int = 3  # paper §2.1 / appendix: stage-1 conditioning blurred, kernel 3, σ 0.6
    blur_sigma: float = 0.6
    # BSR-style chain (stage 2), each drawn per image: blur σ, down-scale factor, noise std
    # (in [-1, 1] units), JPEG quality; ranges are [low, high].
    bsr_blur_sigma: tuple[float, ...] = (0.2, 1.5)
    bsr_scale: tuple[float, ...] = (0.5, 1.0)
    bsr_noise: tuple[float, ...] = (0.0, 0.08)
    bsr_jpeg_quality: tuple[int, ...] = (30, 95)
    crop_fraction: float = 0.25  # paper §2.1: trained on random crops of 1/4 of the target side
    timesteps: int = 1000  # diffusion steps of the training noise schedule
    noise_schedule: Literal["cosine", "linear"] = "cosine"  # improved DDPM's cosine ᾱ, or DDPM's linear β
    variance: Literal["learned_range", "fixed_small"] = "fixed_small"  # improved DDPM's learned Σ, or fixed β̃
    prediction_type: Literal["epsilon", "sample", "v_prediction"] = "epsilon"  # what the UNet predicts
    # "image": diffuse the high-res image; "residual": diffuse image − bicubic(low) (docs/decoder.md)
    target: Literal["image", "residual"] = "image"
    sampler: Literal["ddpm", "ddim", "dpmsolver++"] = "ddim"  # how images are sampled unless a call says otherwise
    eta: float = 0.0  # DDIM η: 0 deterministic
    sample_steps: int = 25  # sampling steps unless a call says otherwise
    # Noise level sampling starts from, as a fraction of the schedule: 1.0 is pure noise; below 1 the
    # chain starts from the upsampled conditioning noised to that level (SDEdit's start), so a few
    # steps suffice (docs/decoder.md: 10 DDPM steps from 0.1 beat 50 from pure noise).
    sample_start: float = 1.0
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=10_000, batch_size=32, lr=2e-4, ema_decay=0.999)
    )


@dataclass(frozen=True, kw_only=True)
class UnclipConfig:
    """The whole cascade. Saved into every model (`unclip.json`) and every checkpoint."""

    name: str = "custom"  # the preset's or your name for it; training runs go to runs/<name>/ by default
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    ar_prior: ARPriorConfig = field(default_factory=ARPriorConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    upsamplers: tuple[UpsamplerConfig, ...] = (UpsamplerConfig(),)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UnclipConfig:
        """Strict: unknown keys and mistyped values are errors; missing keys take defaults."""
        cfg = _build(cls, data, "")
        check(cfg)
        return cfg

    @classmethod
    def from_json(cls, text: str) -> UnclipConfig:
        try:
            data = json.loads(text, object_pairs_hook=_no_repeats)
        except json.JSONDecodeError as err:
            raise ConfigError(f"config is not valid JSON: {err}") from None
        return cls.from_dict(data)

    def override(self, assignments: list[str] | tuple[str, ...]) -> UnclipConfig:
        """Apply `key=value` assignments (dotted keys, JSON values) and return a new config."""
        cfg = self
        for assignment in assignments:
            key, sep, raw = assignment.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"override {assignment!r} is not of the form key=value (e.g. clip.train.steps=200)")
            cfg = _set(cfg, key.strip().split("."), raw.strip(), key.strip())
        check(cfg)
        check_new(cfg)
        return cfg


def _no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's dict; a key given twice is an error (json keeps the last one in silence)."""
    if repeated := sorted({key for key, _ in pairs if sum(k == key for k, _ in pairs) > 1}):
        raise ConfigError(f"key {repeated[0]!r} is given twice in one JSON object; give it once")
    return dict(pairs)


MAX_UPSAMPLERS = 2  # the paper's cascade: 64² → 256² → 1024² (the model format's super_res_first/_second)
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes up to 2^64 - 1; candidate seeds mix modulo 2^63
MAX_CANDIDATES = 64  # candidates per image: a batch of 64 images holds 64·k of them at once (the pipeline)
MIN_CONTEXT = 3  # a caption's start and end tokens and one token of it (unclip.tokenizer.Tokenizer)
MAX_GUIDANCE = 50.0  # far past any useful scale (3 is strong); larger ones overflow into NaN images


def is_real(value) -> bool:
    """A real number (int, float, numpy or 0-d tensor scalar), not a string or a bool."""
    import numbers

    if isinstance(value, bool) or isinstance(value, (str, bytes)):
        return False
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return isinstance(value, numbers.Real) or getattr(value, "ndim", None) == 0


def check_guidance_scale(scale: float) -> float:
    """`scale` if it is a usable classifier-free guidance scale (0 to MAX_GUIDANCE), else a ConfigError.

    1 is no guidance, 0 the null branch alone, above 1 pushes towards the condition. A NaN, an
    infinity or a huge scale would otherwise surface only as a broken image after the whole run.
    """
    if not is_real(scale) or not math.isfinite(scale) or not 0 <= scale <= MAX_GUIDANCE:
        raise ConfigError(f"guidance scale {scale!r}: give a number from 0 to {MAX_GUIDANCE:g} (1 is no guidance, "
                          "3 is strong)")
    return float(scale)


def check_eta(eta: float) -> float:
    """`eta` if it is a DDIM η in [0, 1] (0 deterministic, 1 as random as ancestral sampling), else a ConfigError."""
    if not is_real(eta) or not math.isfinite(eta) or not 0 <= eta <= 1:
        raise ConfigError(f"DDIM η {eta!r}: give a number from 0 (deterministic) to 1 (most varied)")
    return float(eta)


def check_noise_level(start: float, name: str = "") -> float:
    """`start` if it is a sampler's starting noise level, a fraction of its schedule in (0, 1] (1 =
    pure noise), else a ConfigError whose message begins with `name` (e.g. "upsampler start=")."""
    if not is_real(start) or not 0 < start <= 1:  # NaN too
        shown = f"{float(start):g}" if is_real(start) else repr(start)
        raise ConfigError(f"{name}{shown} is not a noise level in (0, 1] (1 = pure noise): give e.g. 0.1 to start "
                          "from the noised bicubic upsampling")
    return float(start)


# integer fields (by name, in any section) that size a network, a vocabulary or a sampler: 0 builds
# something that trains at chance or cannot run
AT_LEAST_ONE = frozenset({
    "vocab_size", "context_length", "corpus_size", "max_token_bytes", "embed_dim", "image_size", "patch_size",
    "vision_width", "vision_layers", "vision_heads", "text_width", "text_layers", "text_heads", "width", "layers",
    "heads", "timesteps", "best_of", "sample_steps", "buckets", "resolution", "base_channels", "layers_per_block",
    "head_dim", "cross_attention_dim", "candidates", "upsampled_candidates", "in_resolution", "out_resolution"})


def check_new(cfg: UnclipConfig) -> None:
    """Checks of a configuration about to be trained (what `override`, and so every verb's --preset,
    --config and --set, gives), not of one a saved model holds: a model trained before these rules,
    named "team/exp1" or with no decoder level among its attention_resolutions, sampled fine and
    still loads."""
    if not cfg.name.strip() or cfg.name in (".", "..") or any(c in cfg.name for c in "/\\\0"):
        # training runs go to runs/<name>/: "a/b" nested them, "../x" put them outside runs/
        raise ConfigError(f"name={cfg.name!r}: give a name a folder can have (no slashes, not . or ..), e.g. mine; "
                          "choose where runs go with --run-dir")
    if cfg.decoder.candidates > MAX_CANDIDATES:  # every generate of the trained model would refuse it
        raise ConfigError(f"decoder.candidates={cfg.decoder.candidates}: draw 1 to {MAX_CANDIDATES} candidates "
                          "per image")
    sides = [cfg.decoder.resolution // 2**i for i in range(len(cfg.decoder.channel_mult))]
    attention = cfg.decoder.attention_resolutions
    if attention and not set(attention) & set(sides):  # e.g. tiny's [8] at resolution 64: silently no attention
        raise ConfigError(f"decoder.attention_resolutions={list(attention)} names none of the decoder's levels "
                          f"({', '.join(f'{s}²' for s in sides)}), so no level would attend to the caption; list some "
                          "of those sides, or [] for attention in the middle block only")
    if unknown := [side for side in attention if side not in sides]:  # e.g. [8, 5]: 5 silently had no attention
        kept = [side for side in attention if side in sides]
        raise ConfigError(f"decoder.attention_resolutions={list(attention)}: {', '.join(map(str, unknown))} "
                          f"{'is' if len(unknown) == 1 else 'are'} not among the decoder's levels "
                          f"({', '.join(f'{s}²' for s in sides)}) and would be ignored; list only those sides, "
                          f"e.g. {kept}")


def check(cfg: UnclipConfig) -> None:
    """Cross-field checks that a type alone cannot express.

    Run after all overrides are applied (not per field), so related fields can change together.
    """
    # single fields first, so the checks of related ones below never divide by a 0 (vision_heads=0
    # was a ZeroDivisionError) and an error names the field at fault
    for path, value in _walk(cfg, ""):
        if isinstance(value, int) and not isinstance(value, bool) and value < 0:
            raise ConfigError(f"{path}={value} must not be negative")
        leaf = path.rsplit(".", 1)[-1]
        if leaf in AT_LEAST_ONE and value < 1:
            raise ConfigError(f"{path}={value} must be at least 1: a network or a sampler of that size does nothing")
        if leaf == "channel_mult" and (not value or min(value) < 1):
            raise ConfigError(f"{path}={list(value)} must list one multiplier of 1 or more per level, e.g. [1, 2, 4]")
        if leaf == "seed" and value > MAX_SEED:  # torch's generators take 64-bit seeds: a traceback at step 0
            raise ConfigError(f"{path}={value}: give a seed from 0 to {MAX_SEED}")
    if cfg.tokenizer.context_length < MIN_CONTEXT:
        raise ConfigError(f"tokenizer.context_length={cfg.tokenizer.context_length} leaves no room for a caption "
                          f"beside its start and end tokens; use at least {MIN_CONTEXT} (the presets' 32)")
    if cfg.clip.init_temperature <= 0:  # CLIP's logit scale starts at log(1 / temperature)
        raise ConfigError(f"clip.init_temperature={cfg.clip.init_temperature} must be above 0 (CLIP's 0.07)")
    if cfg.decoder.vlb_weight < 0:
        raise ConfigError(f"decoder.vlb_weight={cfg.decoder.vlb_weight} must not be negative (improved DDPM's 0.001)")
    for name, stage in (("prior", cfg.prior), ("decoder", cfg.decoder)):
        if stage.sample_steps > stage.timesteps:  # refused by the sampler only after training, model unwritten
            raise ConfigError(f"{name}.sample_steps={stage.sample_steps} is more than its {stage.timesteps} "
                              f"training timesteps ({name}.timesteps); give at most {stage.timesteps}")
    if not 0.0 <= cfg.data.holdout < 1.0:
        raise ConfigError(f"data.holdout={cfg.data.holdout} must be a fraction in [0, 1), e.g. 0.05")
    if len(cfg.data.scenes) != 3 or min(cfg.data.scenes) < 0 or sum(cfg.data.scenes) <= 0:
        raise ConfigError(f"data.scenes={list(cfg.data.scenes)} must be three non-negative odds, not all zero, "
                          "for single, pair and count scenes, e.g. [0.4, 0.35, 0.25]")
    if cfg.data.path and cfg.data.source == "shapes":  # else your data is silently not what trains
        raise ConfigError(f"data.path={cfg.data.path} is set but data.source is shapes (the bundled world); add "
                          "data.source=folder (a folder of images with .txt captions) or data.source=webdataset")
    if cfg.data.holdout and cfg.data.source == "shapes":
        raise ConfigError("data.holdout is for folder and webdataset data; shapes world has its own val and "
                          "test splits")
    if cfg.clip.image_size % cfg.clip.patch_size:
        raise ConfigError(
            f"clip.image_size={cfg.clip.image_size} is not a multiple of clip.patch_size={cfg.clip.patch_size}"
        )
    for name, width, heads in (
        ("clip.vision", cfg.clip.vision_width, cfg.clip.vision_heads),
        ("clip.text", cfg.clip.text_width, cfg.clip.text_heads),
        ("prior", cfg.prior.width, cfg.prior.heads),
        ("ar_prior", cfg.ar_prior.width, cfg.ar_prior.heads),
    ):
        if width % heads:
            raise ConfigError(f"{name}_width={width} is not divisible by {name}_heads={heads}")
    for name, p in (("clip.hard_negatives", cfg.clip.hard_negatives), ("prior.cond_drop", cfg.prior.cond_drop), ("decoder.z_drop", cfg.decoder.z_drop),
                    ("decoder.text_drop", cfg.decoder.text_drop), ("ar_prior.cond_drop", cfg.ar_prior.cond_drop)):
        if not 0.0 <= p <= 1.0:
            raise ConfigError(f"{name}={p} must be a probability in [0, 1]")
    for name, scale in (("prior.guidance_scale", cfg.prior.guidance_scale),
                        ("decoder.guidance_scale", cfg.decoder.guidance_scale)):
        try:
            check_guidance_scale(scale)
        except ConfigError as err:
            raise ConfigError(f"{name}: {err}") from None
    for name, eta in (("prior.eta", cfg.prior.eta), ("decoder.eta", cfg.decoder.eta),
                      *((f"upsamplers.{i}.eta", up.eta) for i, up in enumerate(cfg.upsamplers))):
        try:
            check_eta(eta)  # η = 2 sampled NaN z_i, which the prior's evaluation then scored perfect
        except ConfigError as err:
            raise ConfigError(f"{name}: {err}") from None
    if not (math.isfinite(cfg.prior.rank_steer) and cfg.prior.rank_steer >= 0):
        raise ConfigError(f"prior.rank_steer={cfg.prior.rank_steer} must be 0 (no steering) or more, e.g. 1.0")
    if not 0 < cfg.ar_prior.pca_variance <= 1:
        raise ConfigError(f"ar_prior.pca_variance={cfg.ar_prior.pca_variance} must be a fraction in (0, 1]: the "
                          "share of z_i's variance the kept components explain (the paper's 0.99)")
    if cfg.ar_prior.buckets < 2:
        raise ConfigError(f"ar_prior.buckets={cfg.ar_prior.buckets} must be at least 2: the values each PCA "
                          "dimension is quantized into (the paper's 1024)")
    from unclip.data.twins import check_group, check_weights

    for name, value, valid in (("clip.twin_group", cfg.clip.twin_group, check_group),
                               ("clip.twin_weights", cfg.clip.twin_weights, check_weights)):
        try:
            valid(value)
        except ValueError as err:
            raise ConfigError(f"{name}: {err}") from None
    if len(cfg.upsamplers) > MAX_UPSAMPLERS:
        raise ConfigError(f"{len(cfg.upsamplers)} upsamplers: a model holds at most {MAX_UPSAMPLERS} (the paper's "
                          "64² → 256² → 1024²; the model format's super_res_first and super_res_second)")
    previous = cfg.decoder.resolution
    for i, up in enumerate(cfg.upsamplers):
        if up.in_resolution != previous:
            raise ConfigError(
                f"upsamplers.{i}.in_resolution={up.in_resolution} must equal the resolution before it ({previous})"
            )
        if up.out_resolution != 4 * up.in_resolution:
            raise ConfigError(f"upsamplers.{i} must upsample ×4: out_resolution should be {4 * up.in_resolution}")
        previous = up.out_resolution
        _check_upsampler(f"upsamplers.{i}", up)
    for path, value in _walk(cfg, ""):  # after the checks above, whose messages say what range to give
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{path}={value} must be a finite number")
    for name, train in _train_configs(cfg):
        _check_train(name, train)


def next_upsampler(previous: UpsamplerConfig) -> UpsamplerConfig:
    """The stage after `previous`: its settings, ×4 from its output, with the paper's second-stage
    degradation of the conditioning (BSR) instead of the first stage's blur."""
    return replace(previous, in_resolution=previous.out_resolution, out_resolution=4 * previous.out_resolution,
                   degradation="bsr")


def upsampler_steps_limit(up: UpsamplerConfig, start: float | None = None) -> int:
    """The most sampling steps `up` can take from its starting noise level (`start`, default its own):
    one per training timestep from 0 up to that level."""
    return round((up.sample_start if start is None else start) * (up.timesteps - 1)) + 1


def _check_upsampler(name: str, up: UpsamplerConfig) -> None:
    """What an upsampler's training and sampling need, checked before any work (its crops must pass
    through every level of its UNet; its ranges must be ranges)."""
    if not 0 < up.crop_fraction <= 1:
        raise ConfigError(f"{name}.crop_fraction={up.crop_fraction} must be in (0, 1]: the side of the training "
                          "crops as a fraction of out_resolution (the paper's 0.25)")
    halvings = 2 ** (len(up.channel_mult) - 1)
    crop = round(up.out_resolution * up.crop_fraction)
    for what, side in (("out_resolution", up.out_resolution), ("its training crops", crop)):
        if side % halvings:
            raise ConfigError(f"{name}: {what} ({side}²) must be divisible by {halvings}, since its UNet halves "
                              f"the side {len(up.channel_mult) - 1} times (channel_mult={list(up.channel_mult)}); "
                              "change crop_fraction, the resolutions or channel_mult")
    if up.blur_kernel % 2 == 0 or up.blur_sigma <= 0:
        raise ConfigError(f"{name}: blur_kernel={up.blur_kernel} must be odd and blur_sigma={up.blur_sigma} above 0 "
                          "(the paper's stage-1 blur: kernel 3, σ 0.6)")
    ranges = {"bsr_blur_sigma": (lambda v: v > 0, "blur σ above 0"),
              "bsr_scale": (lambda v: 0 < v <= 1, "down-scale factors in (0, 1]"),
              "bsr_noise": (lambda v: 0 <= v <= 1, "noise std in [0, 1]"),
              "bsr_jpeg_quality": (lambda v: 1 <= v <= 100, "JPEG qualities from 1 to 100")}
    for key, (valid, what) in ranges.items():
        value = getattr(up, key)
        if len(value) != 2 or value[0] > value[1] or not all(map(valid, value)):
            raise ConfigError(f"{name}.{key}={list(value)} must be a range [low, high] (low ≤ high) of {what}")
    check_noise_level(up.sample_start, f"{name}.sample_start=")
    if up.sample_steps > (most := upsampler_steps_limit(up)):
        raise ConfigError(f"{name}.sample_steps={up.sample_steps}: starting from noise level {up.sample_start:g} "
                          f"of {up.timesteps} timesteps it can take at most {most} steps")


def _train_configs(cfg: UnclipConfig):
    yield from (("clip.train", cfg.clip.train), ("prior.train", cfg.prior.train),
                ("ar_prior.train", cfg.ar_prior.train), ("decoder.train", cfg.decoder.train))
    yield from ((f"upsamplers.{i}.train", up.train) for i, up in enumerate(cfg.upsamplers))


def _check_train(name: str, train: TrainConfig) -> None:
    """What a stage's training needs of its TrainConfig, checked before any work."""
    for key in ("steps", "batch_size", "grad_accum", "log_every", "ckpt_every", "eval_batches"):
        if getattr(train, key) < 1:
            raise ConfigError(f"{name}.{key}={getattr(train, key)} must be at least 1")
    if train.lr < 0:
        raise ConfigError(f"{name}.lr={train.lr} must be a learning rate of 0 or more, e.g. 3e-4")
    if not 0 <= train.ema_decay < 1:
        raise ConfigError(f"{name}.ema_decay={train.ema_decay} must be in [0, 1) (0 turns EMA off; 0.999 is usual)")
    for key in ("weight_decay", "grad_clip"):
        if getattr(train, key) < 0:
            raise ConfigError(f"{name}.{key}={getattr(train, key)} must not be negative (0 turns it off)")


def resolutions(cfg: UnclipConfig) -> tuple[int, ...]:
    """Image sides through the cascade, e.g. (32, 128)."""
    return (cfg.decoder.resolution, *(up.out_resolution for up in cfg.upsamplers))


# --- presets ---------------------------------------------------------------------------------


def _tiny() -> UnclipConfig:
    """Smallest config that exercises every code path; the fast tests train it in seconds."""
    step = TrainConfig(steps=4, batch_size=4, lr=1e-3, warmup_steps=1, log_every=1, ckpt_every=2)
    return UnclipConfig(
        name="tiny",
        tokenizer=TokenizerConfig(vocab_size=600, context_length=32, corpus_size=2000),
        clip=ClipConfig(embed_dim=16, image_size=16, patch_size=4, vision_width=32, vision_layers=1,
                        vision_heads=2, text_width=32, text_layers=1, text_heads=2, train=step),
        prior=PriorConfig(width=32, layers=1, heads=2, timesteps=100, sample_steps=4, train=step),
        ar_prior=ARPriorConfig(width=32, layers=1, heads=2, buckets=64, train=step),
        decoder=DecoderConfig(resolution=16, base_channels=16, channel_mult=(1, 2), attention_resolutions=(8,),
                              head_dim=8, cross_attention_dim=32, timesteps=100, sample_steps=4, train=step),
        upsamplers=(
            UpsamplerConfig(in_resolution=16, out_resolution=64, base_channels=8, channel_mult=(1, 2),
                            timesteps=100, sample_steps=4, train=step),
        ),
    )


def _shapes() -> UnclipConfig:
    """The bundled default model: 32² decoder, one ×4 upsampler to 128², trained on shapes world.

    The decoder is the anchor layout made CPU-sized: base 32 with multipliers (1, 2, 4) and
    attention at 16² and 8² trains at ~80 img/s with bf16 on 2 cores (~100 with plain CPU attention,
    docs/performance.md), against ~50 for the anchor's base 64 (docs/decoder.md). Decoder and
    upsampler predict v, not ε: after a CPU-sized budget an ε model's small bias at the top of the
    cosine schedule (1/√ᾱ ≈ 30 there) set every image's background colour wrong, and sampling never
    recovered it (docs/decoder.md).
    """
    return UnclipConfig(
        name="shapes",
        # The CLIP recipe that fits issue 3's targets into 10 CPU minutes (docs/clip.md): three quarters
        # of each batch in groups of four scenes, mostly shape sweeps (four shapes of one object), the
        # rest binding groups (a two-object scene with its colours, shapes or places traded), and a
        # cheaper step spent on more of them (exact GELU, a 2-layer text tower: 0.23 → 0.18 s a step).
        clip=ClipConfig(text_layers=2, activation="gelu", hard_negatives=0.75, twin_group=4,
                        twin_weights=(0.5, 0.0, 0.0, 0.0, 0.5),
                        train=TrainConfig(steps=3000, batch_size=128, lr=1e-3, warmup_steps=100,
                                          mixed_precision="bf16", ckpt_every=500)),
        decoder=DecoderConfig(
            base_channels=32, channel_mult=(1, 2, 4), attention_resolutions=(16, 8), prediction_type="v_prediction",
            train=TrainConfig(steps=3000, batch_size=32, lr=3e-4, warmup_steps=100, ema_decay=0.998,
                              mixed_precision="bf16", ckpt_every=250)),
        # Sampled with 10 ancestral steps from noise level 0.1 (the noised bicubic upsampling): on the
        # shipped upsampler PSNR 34.4 / SSIM 0.972 at 0.2 s per 128² image, against 31.3 / 0.936 and
        # 1.1 s for 50 steps from pure noise, and bicubic's 30.3 / 0.951 (docs/decoder.md).
        upsamplers=(UpsamplerConfig(prediction_type="v_prediction", target="residual", sampler="ddpm",
                                    sample_steps=10, sample_start=0.1,
                                    train=TrainConfig(steps=4000, batch_size=32, lr=3e-4, warmup_steps=100,
                                                      ema_decay=0.998, mixed_precision="bf16", ckpt_every=250)),),
    )


def _shapes_gpu() -> UnclipConfig:
    """The shapes cascade sized for one GPU: the shipped default model is trained with it.

    Same priors and upsampler networks as `shapes` and a CLIP of the same size (with 4 text layers,
    QuickGELU and no hard negatives, as the shipped model was trained before `shapes` changed them);
    the decoder is the anchor's width (base 64). Batches are 4× larger, data loading runs in worker processes, and the step counts are
    ceilings: `scripts/train_default_gpu.sh` gives each stage a `--minutes` budget and the trainer
    fits the warmup + cosine schedule into it (docs/model_card.md records what each stage reached).
    """
    base = _shapes()

    def gpu(steps: int, batch: int, lr: float, *, ema: float = 0.0) -> TrainConfig:
        return TrainConfig(steps=steps, batch_size=batch, lr=lr, warmup_steps=500, ema_decay=ema,
                           mixed_precision="bf16", ckpt_every=1000, log_every=50, num_workers=5)

    return replace(
        base, name="shapes-gpu",
        # The shipped model's CLIP: CLIP's own network (4-layer text tower, quick-GELU), no twins.
        clip=replace(base.clip, text_layers=4, activation="quick_gelu", hard_negatives=0.0,
                     train=gpu(40_000, 512, 1e-3)),
        prior=replace(base.prior, train=gpu(40_000, 512, 1e-3)),
        ar_prior=replace(base.ar_prior, train=gpu(40_000, 512, 1e-3)),
        # Sampling defaults from the sweeps in docs/model_card.md: ancestral DDPM and no decoder guidance
        # judged best (guidance 1.5 and 3 lowered every task; DDIM and DPM-Solver++ too); 25, 50, 100 and
        # 250 steps judge the same within noise (0.510–0.529). Candidates per image, the one CLIP
        # puts closest to the caption kept, lift the judged score more than any step count (three:
        # 0.510 → 0.654); since version 5, six candidates of 12 steps, which cost what three of 25 did,
        # ranked by the model's ranking tower (binding tasks 0.802 → 0.896, docs/model_card.md), and
        # 5 deterministic upsampler steps from the noised bicubic upsampling (PSNR 34.1 / SSIM 0.972)
        # keep 128² near 1 s on the CPU (docs/performance.md).
        decoder=replace(base.decoder, base_channels=64, sampler="ddpm", sample_steps=12, guidance_scale=1.0,
                        candidates=6,
                        train=gpu(100_000, 256, 3e-4, ema=0.999)),
        upsamplers=(replace(base.upsamplers[0], sampler="ddim", sample_steps=5,
                            train=gpu(100_000, 256, 3e-4, ema=0.999)),),
    )


PRESETS: dict[str, typing.Callable[[], UnclipConfig]] = {"tiny": _tiny, "shapes": _shapes, "shapes-gpu": _shapes_gpu}


def preset(name: str) -> UnclipConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    cfg = PRESETS[name]()
    check(cfg)
    return cfg


# --- typed construction ----------------------------------------------------------------------


def _parse_value(raw: str, hint: Any = None) -> Any:
    """JSON if it parses (numbers, true/false, lists), else the raw string. A text field (`hint`
    str) takes the raw text unless it is a JSON string: name=2024 and data.path=2024 are names."""
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        return raw
    return raw if hint is str and not isinstance(value, str) else value


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, hint: Any, path: str) -> Any:
    """Check `value` against the annotation `hint`, converting JSON forms (list → tuple, int → float)."""
    origin = typing.get_origin(hint)
    if is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path} is a section, not a value; set one of its keys, e.g. {path}.{fields(hint)[0].name}=...")
        return _build(hint, value, path)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{path}={value!r} is not one of {', '.join(repr(c) for c in choices)}")
        return value
    if origin is tuple:
        (item, _ellipsis) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path} must be a list, e.g. {path}=[1,2,2]; got {value!r}")
        return tuple(_coerce(v, item, f"{path}.{i}") for i, v in enumerate(value))
    if origin in (types.UnionType, typing.Union):
        raise ConfigError(f"{path}: union types are not supported in config")  # none are declared
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path} must be true or false; got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path} must be an integer; got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path} must be a number; got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path} must be a string; got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported config type {hint!r}")


def _build(cls: type, data: dict[str, Any], path: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'} must be a JSON object; got {type(data).__name__}")
    hints = _hints(cls)
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = path or "the top level"
        raise ConfigError(f"unknown config key(s) {', '.join(unknown)} in {where}; valid keys: {', '.join(names)}"
                          + _did_you_mean(cls(), path, unknown[0], []))
    kwargs = {k: _coerce(v, hints[k], f"{path}.{k}" if path else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"{path or 'config'}: {err}") from None


def _set(obj: Any, keys: list[str], raw: str, full_key: str) -> Any:
    """Return a copy of `obj` with the field at `keys` set to the text `raw` (parsed and type-checked)."""
    head, rest = keys[0], keys[1:]
    prefix = full_key[: len(full_key) - len(".".join(rest))].rstrip(".")
    if isinstance(obj, tuple):
        grows = bool(obj) and isinstance(obj[-1], UpsamplerConfig)  # `--set upsamplers.N.…` adds stage N
        if grows and head.isdigit() and int(head) == len(obj):
            obj = (*obj, next_upsampler(obj[-1]))
        elif not head.isdigit() or int(head) >= len(obj):
            if not obj:
                raise ConfigError(f"{prefix!r}: the list is empty; give it whole, e.g. "
                                  "--set 'upsamplers=[{\"in_resolution\": 32}]'")
            raise ConfigError(f"{prefix!r}: index must be 0..{len(obj) - 1}"
                              + (f", or {len(obj)} to add a stage after the last" if grows else ""))
        i = int(head)
        if not rest:
            raise ConfigError(f"{prefix} is a section, not a value; set one of its keys")
        items = list(obj)
        items[i] = _set(obj[i], rest, raw, full_key)
        return tuple(items)
    names = [f.name for f in fields(obj)]
    if head not in names:
        parent = prefix.rpartition(".")[0]
        raise ConfigError(f"unknown config key {prefix!r} in {parent or 'the top level'}; valid keys: "
                          f"{', '.join(names)}" + _did_you_mean(obj, parent, head, rest))
    current = getattr(obj, head)
    if rest:
        if not (is_dataclass(current) or isinstance(current, tuple)) or isinstance(current, (str,)):
            raise ConfigError(f"{prefix} is a value, not a section; use {prefix}=...")
        if isinstance(current, tuple) and not (current and is_dataclass(current[0])):
            raise ConfigError(f"{prefix} is a value, not a section; use {prefix}=[...]")
        return replace(obj, **{head: _set(current, rest, raw, full_key)})
    hint = _hints(type(obj))[head]
    return replace(obj, **{head: _coerce(_parse_value(raw, hint), hint, full_key)})


def _did_you_mean(section: Any, parent: str, head: str, rest: list[str]) -> str:
    """" (did you mean …?)" for an unknown key `head` in `section`: the keys below it that end in
    `head` (decoder.steps → decoder.train.steps), then a near spelling of one of its own keys."""
    import difflib

    join = lambda *parts: ".".join(p for p in parts if p)  # noqa: E731
    tail = ".".join([head, *rest])
    guesses = [join(parent, path) for path, _ in _walk(section, "") if f".{path}".endswith(f".{tail}")]
    close = difflib.get_close_matches(head, [f.name for f in fields(section)], n=1, cutoff=0.7)
    guesses += [join(parent, name, *rest) for name in close]
    return f" (did you mean {' or '.join(guesses[:6])}?)" if guesses else ""


def _walk(obj: Any, path: str):
    """Yield (dotted path, leaf value) for every leaf of a config."""
    if is_dataclass(obj):
        for f in fields(obj):
            yield from _walk(getattr(obj, f.name), f"{path}.{f.name}" if path else f.name)
    elif isinstance(obj, tuple) and obj and is_dataclass(obj[0]):
        for i, item in enumerate(obj):
            yield from _walk(item, f"{path}.{i}")
    else:
        yield path, obj
