"""Noise schedules and respacing: which noise level each timestep has.

A schedule is a vector of betas [T] (float64). `alphas_cumprod` ᾱ_t = Π_{s≤t} (1 - β_s) is the
signal fraction left at step t: x_t = √ᾱ_t x_start + √(1-ᾱ_t) eps.

Respacing (improved DDPM, Nichol & Dhariwal 2021, §4 / `respace.py`) keeps a subset of the
timesteps and recomputes the betas between them, β'_i = 1 - ᾱ_{t_i} / ᾱ_{t_{i-1}}, so the
shortened chain visits exactly the noise levels the model was trained on.
"""

from __future__ import annotations

import math

import torch

from unclip.errors import ConfigError

SCHEDULES = ("cosine", "linear")


def cosine_alpha_bar(s: torch.Tensor | float) -> torch.Tensor:
    """ᾱ at continuous time s ∈ [0, 1]: cos²((s + 0.008) / 1.008 · π/2) (improved DDPM eq. 17, offset 0.008)."""
    s = torch.as_tensor(s, dtype=torch.float64)
    return torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2


def betas_for(schedule: str, timesteps: int) -> torch.Tensor:
    """Betas [timesteps] (float64) of a named schedule.

    cosine: β_t = min(1 - ᾱ((t+1)/T) / ᾱ(t/T), 0.999) (improved DDPM §3.2; the cap avoids a
        singularity at t = T). Equal to diffusers' `squaredcos_cap_v2`.
    linear: DDPM's 1e-4 … 0.02 at T = 1000, scaled by 1000/T so any T spans the same noise range.
    """
    if timesteps < 1:
        raise ConfigError(f"timesteps={timesteps} must be at least 1")
    if schedule == "cosine":
        steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        alpha_bar = cosine_alpha_bar(steps)  # [T+1]
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    if schedule == "linear":
        scale = 1000 / timesteps
        return torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64)
    raise ConfigError(f"unknown noise schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")


def diffusers_beta_args(schedule: str, timesteps: int) -> dict:
    """The `beta_schedule` arguments of a diffusers scheduler that reproduce `betas_for(schedule, T)`."""
    if schedule == "cosine":
        return {"num_train_timesteps": timesteps, "beta_schedule": "squaredcos_cap_v2"}
    if schedule == "linear":
        scale = 1000 / timesteps
        return {"num_train_timesteps": timesteps, "beta_schedule": "linear",
                "beta_start": scale * 1e-4, "beta_end": scale * 0.02}
    raise ConfigError(f"unknown noise schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")


def space_timesteps(timesteps: int, steps: int, spacing: str = "uniform", *, end: int | None = None) -> list[int]:
    """`steps` of the `timesteps` training timesteps, ascending, from 0 up to `end` (default T-1).

    A lower `end` is a truncated chain: sampling starts from noise level `end` instead of pure
    noise (`sampling.sample_loop(start=)`); the grids below are then laid over 0 … end.

    uniform: evenly spaced from 0 to T-1 inclusive (improved DDPM's respacing), so sampling starts
        from pure noise; for ancestral DDPM.
    trailing: T-1, T-1-T/N, …, T/N-1: from pure noise, and never 0; for DPM-Solver++, which then
        jumps from T/N-1 to the clean image in a first-order step. A grid ending at 0 makes its
        second-to-last step a second-order step whose log-SNR stride is ~5× the one before,
        and that extrapolation over-disperses samples (docs/decoder.md).
    leading: 0, T/N, 2T/N, … (the DDIM paper's and improved-diffusion's "ddimN" spacing); stops
        short of T-1, whose cosine level (β capped at 0.999, ᾱ ≈ 1e-3 · ᾱ_{T-2}) no deterministic
        step can invert, so DDIM sampling and DDIM inversion use it (docs/decoder.md).
    """
    end = timesteps - 1 if end is None else end
    if not 0 <= end < timesteps:
        raise ConfigError(f"end={end} must be one of the {timesteps} training timesteps (0 … {timesteps - 1})")
    span = end + 1  # the timesteps 0 … end the grid is laid over
    if not 1 <= steps <= span:
        raise ConfigError(f"sampling steps={steps} must be between 1 and the {span} training timesteps "
                          f"it starts from")
    if spacing == "leading":
        return sorted({(i * span) // steps for i in range(steps)})
    if spacing == "trailing":
        return sorted({round(end - i * span / steps) for i in range(steps)})
    if spacing != "uniform":
        raise ConfigError(f"unknown timestep spacing {spacing!r}; use uniform, leading or trailing")
    if steps == 1:
        return [end]
    stride = end / (steps - 1)
    return sorted({round(i * stride) for i in range(steps)})


def respaced_betas(alphas_cumprod: torch.Tensor, kept: list[int]) -> torch.Tensor:
    """Betas [len(kept)] of the chain that visits only the timesteps `kept` (ascending)."""
    betas, last = [], 1.0
    for t in kept:
        betas.append(1 - alphas_cumprod[t].item() / last)
        last = alphas_cumprod[t].item()
    return torch.tensor(betas, dtype=torch.float64)
