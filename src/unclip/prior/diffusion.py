"""The diffusion prior (paper §2.2): P(z_i | caption) on a diffusers PriorTransformer.

A decoder-only transformer reads, one token per row,

    [caption token states (L) | z_t | timestep | noised z_i | learned query]

with a causal mask, and its output at the learned query is the predicted clean z_i (paper §2.2:
"we find it better to train our model to predict the unnoised z_i directly, and use a
mean-squared error loss on this prediction"). The diffusers PriorTransformer builds exactly this
sequence from `encoder_hidden_states` (the caption states), `proj_embedding` (z_t), the timestep,
`hidden_states` (the noised z_i) and its `prd_embedding` (the query).

Diffusion runs in a normalised space, x = (z_i - mean) / std, with mean and std computed from
training z_i and stored in the PriorTransformer's `clip_mean` / `clip_std` (saved with its
weights, never trained; diffusers' `post_process_latents` undoes the normalisation). The paper
instead multiplies its CLIP embeddings by a fixed 17.2 to reach unit variance.

Classifier-free guidance (paper §2.2): with probability `cond_drop` the caption states and z_t
of a row are replaced by learned nulls (`PriorConditioning`); the noised z_i and the timestep
never pass through there (DALLE2-pytorch #285 dropped the noised input too). Sampling runs the
conditional and null rows in one batch and mixes them with `unclip.diffusion.cfg_mix`, draws
`best_of` samples per caption and keeps the one with the higher dot product with z_t
(paper §2.2), and returns unit-length z_i like CLIP's image embeddings.

All diffusion math (q_sample, the loss, the samplers) is `unclip.diffusion`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Generator

import torch
import torch.nn.functional as F
from torch import nn

from unclip.attention import plain_attention_on_cpu
from unclip.config import PriorConfig, check_eta, check_guidance_scale
from unclip.diffusion import GaussianDiffusion, SampleStep, cfg_mix, run, sample_loop
from unclip.errors import ConfigError

# Prior tokens after the caption: z_t, timestep, noised z_i, learned query.
ADDITIONAL_TOKENS = 4


def transformer_config(config: PriorConfig, *, clip_dim: int, context_length: int) -> dict:
    """PriorTransformer arguments: width = heads × head dim, one position per caption token + 4."""
    return {
        "num_attention_heads": config.heads,
        "attention_head_dim": config.width // config.heads,
        "num_layers": config.layers,
        "embedding_dim": clip_dim,
        "num_embeddings": context_length,
        "additional_embeddings": ADDITIONAL_TOKENS,
        "dropout": 0.0,
        "encoder_hid_proj_type": "linear",
        "added_emb_type": "prd",  # the learned query token whose output is the prediction
    }


def pick_best(candidates: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
    """Paper §2.2 best-of-k: candidates [k, B, D] → [B, D], the one with the highest dot with z_t [B, D]."""
    dots = (candidates * z_t[None]).sum(dim=-1)  # [k, B]
    best = dots.argmax(dim=0)  # [B]
    return candidates[best, torch.arange(candidates.shape[1], device=candidates.device)]


class PriorConditioning(nn.Module):
    """Caption states [B, L, W], mask [B, L], z_t [B, D] → the PriorTransformer's conditioning inputs.

    The text tower's width W is mapped to the CLIP width D the PriorTransformer expects for its
    caption tokens (a Linear when W ≠ D; diffusers feeds text states of width D directly). Rows
    whose `keep` is False get the learned nulls: z_t becomes `null_z_t`, the caption becomes one
    `null_text` token with its other positions masked out.
    """

    def __init__(self, *, clip_dim: int, text_width: int, context_length: int):
        super().__init__()
        self.config = {"clip_dim": clip_dim, "text_width": text_width, "context_length": context_length}
        self.context_length = context_length
        self.text_in = nn.Linear(text_width, clip_dim) if text_width != clip_dim else nn.Identity()
        self.null_z_t = nn.Parameter(F.normalize(torch.randn(clip_dim), dim=0))  # unit length, like z_t
        self.null_text = nn.Parameter(torch.randn(text_width))  # unit scale, like layer-normed states

    def forward(self, z_t: torch.Tensor, text_states: torch.Tensor, text_mask: torch.Tensor,
                keep: torch.Tensor) -> dict[str, torch.Tensor]:
        """PriorTransformer keyword inputs: proj_embedding [B, D], encoder_hidden_states [B, C, D],
        attention_mask [B, C] bool (C = context_length; shorter captions are padded)."""
        batch, length, width = text_states.shape
        pad = self.context_length - length
        if pad < 0:
            raise ValueError(f"caption states have {length} tokens, more than the prior's context "
                             f"{self.context_length}")
        states = F.pad(text_states, (0, 0, 0, pad))  # [B, C, W]
        mask = F.pad(text_mask.bool(), (0, pad))  # [B, C]
        null_states = torch.zeros_like(states[0])
        null_states[0] = self.null_text.to(states.dtype)
        null_mask = torch.zeros_like(mask[0])
        null_mask[0] = True
        states = torch.where(keep[:, None, None], states, null_states)
        mask = torch.where(keep[:, None], mask, null_mask)
        z_t = torch.where(keep[:, None], z_t, self.null_z_t.to(z_t.dtype))
        return {"proj_embedding": z_t, "encoder_hidden_states": self.text_in(states), "attention_mask": mask}


class DiffusionPrior(nn.Module):
    """PriorTransformer (`transformer`) + PriorConditioning (`cond`) + the diffusion process of `config`.

    Batches (`training_losses`) hold text_states [B, L, W], text_mask [B, L], z_t [B, D] and
    z_i [B, D] (see `unclip.prior.data`).
    """

    def __init__(self, *, config: PriorConfig, clip_dim: int, text_width: int, context_length: int):
        super().__init__()
        from diffusers import PriorTransformer

        self.config = config
        self.transformer = plain_attention_on_cpu(PriorTransformer(**transformer_config(
            config, clip_dim=clip_dim, context_length=context_length)))
        with torch.no_grad():  # diffusers starts these at zero; a small random start breaks symmetry
            nn.init.normal_(self.transformer.positional_embedding, std=0.02)
            nn.init.normal_(self.transformer.prd_embedding, std=0.02)
            self.transformer.clip_std.fill_(1.0)
        self.transformer.clip_mean.requires_grad_(False)
        self.transformer.clip_std.requires_grad_(False)
        self.cond = PriorConditioning(clip_dim=clip_dim, text_width=text_width, context_length=context_length)
        self.diffusion = GaussianDiffusion.from_schedule(config.noise_schedule, config.timesteps,
                                                         prediction_type=config.prediction_type)

    @classmethod
    def from_config(cls, config: PriorConfig, *, clip_dim: int, text_width: int, context_length: int) -> DiffusionPrior:
        return cls(config=config, clip_dim=clip_dim, text_width=text_width, context_length=context_length)

    @classmethod
    def from_data(cls, config: PriorConfig, *, z_i: torch.Tensor, text_width: int,
                  context_length: int) -> DiffusionPrior:
        """Build and set the normalisation statistics from training embeddings z_i [N, D]."""
        prior = cls(config=config, clip_dim=z_i.shape[1], text_width=text_width, context_length=context_length)
        prior.set_statistics(z_i)
        return prior

    @property
    def device(self) -> torch.device:
        return self.cond.null_z_t.device

    # --- normalisation -------------------------------------------------------------------------

    @torch.no_grad()
    def set_statistics(self, z_i: torch.Tensor) -> None:
        """mean [D] and std (per config.normalization) of embeddings z_i [N, D], stored as clip_mean/clip_std [1, D]."""
        z = z_i.double()
        mean, std = z.mean(dim=0), z.std(dim=0)
        if self.config.normalization == "scalar":
            std = std.pow(2).mean().sqrt().expand_as(mean)  # unit variance on average over dimensions
        self.transformer.clip_mean.copy_(mean[None].float())
        self.transformer.clip_std.copy_(std[None].float())

    def normalise(self, z_i: torch.Tensor) -> torch.Tensor:
        """z_i [B, D] → the space diffusion runs in, (z_i - mean) / std."""
        return (z_i - self.transformer.clip_mean) / self.transformer.clip_std

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of `normalise` (diffusers' `post_process_latents`)."""
        return self.transformer.post_process_latents(x)

    # --- training --------------------------------------------------------------------------------

    def model_fn(self, x_t: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        """model_fn for the diffusion math: x_t [B, D], t [B] → predicted x_start [B, D] (normalised)."""
        return self.transformer(x_t, t, **cond).predicted_image_embedding

    def training_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """MSE on the clean normalised z_i; the caption and z_t of `cond_drop` of the rows are nulls."""
        device = self.device
        x_start = self.normalise(batch["z_i"].to(device).float())
        n = x_start.shape[0]
        t = torch.randint(0, self.diffusion.num_timesteps, (n,), device=device)
        noise = torch.randn_like(x_start)
        keep = torch.rand(n, device=device) >= self.config.cond_drop  # drawn whatever the rate
        cond = self.cond(batch["z_t"].to(device).float(), batch["text_states"].to(device).float(),
                         batch["text_mask"].to(device), keep)
        losses = self.diffusion.training_losses(self.model_fn, x_start, t=t, noise=noise, cond=cond)
        return {"loss": losses["loss"].mean(), "keep_rate": keep.float().mean()}

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        return self.training_losses(batch)

    # --- sampling --------------------------------------------------------------------------------

    def guided_fn(self, z_t: torch.Tensor, text_states: torch.Tensor, text_mask: torch.Tensor,
                  guidance_scale: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """model_fn(x_t, t) with CFG: the same x_t in conditional and null rows of one batch, then `cfg_mix`."""
        n = z_t.shape[0]
        ones = torch.ones(n, dtype=torch.bool, device=z_t.device)
        guidance_scale = check_guidance_scale(guidance_scale)  # a float: Fraction or numpy scales mix too
        if guidance_scale == 1.0:
            cond = self.cond(z_t, text_states, text_mask, ones)
            return lambda x_t, t: self.model_fn(x_t, t, **cond)
        both = lambda x: torch.cat([x, x])  # noqa: E731  [2B, ...]
        cond = self.cond(both(z_t), both(text_states), both(text_mask), torch.cat([ones, ~ones]))

        def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            out_cond, out_uncond = self.model_fn(both(x_t), both(t), **cond).chunk(2)  # [B, D] each
            return cfg_mix(out_cond, out_uncond, guidance_scale)

        return model_fn

    @torch.no_grad()
    def sample_loop(self, text_states: torch.Tensor, text_mask: torch.Tensor, z_t: torch.Tensor, *,
                    guidance_scale: float | None = None, best_of: int | None = None, steps: int | None = None,
                    sampler: str | None = None, eta: float | None = None, generator: torch.Generator | None = None,
                    rank_by: torch.Tensor | None = None) -> Generator[SampleStep, None, torch.Tensor]:
        """Unit-length z_i [B, D] for captions given as text states [B, L, W], mask [B, L], z_t [B, D].

        Runs `best_of` samples per caption as one batch of k·B rows (candidate j of caption b in
        row j·B + b, noise drawn from `generator`), yields every step of that batch (normalised
        space), and returns the candidate with the highest dot product with z_t, or with rank_by
        [B, D] where given (a model's ranking tower's z_t, `TextEncoding.ranking`). Unset options
        take the config's values.
        """
        cfg = self.config
        k = cfg.best_of if best_of is None else best_of
        if k < 1:
            raise ConfigError(f"best_of={k} must be at least 1")
        device = self.device
        z_t = z_t.to(device, torch.float32)
        repeat = lambda x: torch.cat([x.to(device)] * k)  # noqa: E731  [k·B, ...]
        model_fn = self.guided_fn(repeat(z_t), repeat(text_states.float()), repeat(text_mask),
                                  cfg.guidance_scale if guidance_scale is None else guidance_scale)
        x = yield from sample_loop(
            model_fn, self.diffusion, shape=(k * z_t.shape[0], z_t.shape[1]), sampler=sampler or cfg.sampler,
            steps=cfg.sample_steps if steps is None else steps, eta=check_eta(cfg.eta if eta is None else eta),
            generator=generator, clip_denoised=False, device=device)
        candidates = F.normalize(self.denormalise(x), dim=-1).reshape(k, *z_t.shape)  # [k, B, D]
        return pick_best(candidates, z_t if rank_by is None else rank_by.to(device, torch.float32))

    def sample(self, text_states: torch.Tensor, text_mask: torch.Tensor, z_t: torch.Tensor, *,
               callback: Callable[[SampleStep], None] | None = None, **kwargs) -> torch.Tensor:
        """`sample_loop` run to the end: unit-length z_i [B, D]."""
        return run(self.sample_loop(text_states, text_mask, z_t, **kwargs), callback)
