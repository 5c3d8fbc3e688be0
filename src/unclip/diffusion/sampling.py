"""Sampling and DDIM inversion: one loop over `diffusers` schedulers, yielding every step.

The loop runs on the respaced process (`GaussianDiffusion.respace(steps)`): the diffusers
scheduler is built on the respaced betas with one training timestep per sampling step, so every
step lands exactly on a noise level the model was trained on, for any step count (diffusers'
own spacing rounds and can skip levels), and the network is called with the original
timesteps `timestep_map[t]`. Samplers (strings):

- "ddpm": ancestral sampling (DDPMScheduler) on timesteps 0 … T-1; with
  `variance="learned_range"` it draws with the learned variance, so few steps suffice
  (improved DDPM §4).
- "ddim": DDIM (Song et al. 2021) with `eta` (0 deterministic), on the "leading" grid 0, T/N, …
  (the DDIM paper's and improved-diffusion's "ddimN" spacing).
- "dpmsolver++": DPM-Solver++ 2M (Lu et al. 2022), deterministic, on timesteps 0 … T-1.

`invert_loop` runs DDIM backwards (η = 0, DDIMInverseScheduler) from a clean x_start to x_T;
sampling that x_T with "ddim", η = 0, the same steps and the same model reconstructs x_start
(exactly in the limit of many steps).

Every loop is a generator of `SampleStep`s that returns the final tensor; `sample` and `invert`
run one to the end, calling `callback(step)` on each step (progress bars, servers, tests).
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass

import torch

from unclip.diffusion.gaussian import GaussianDiffusion, ModelFn, split_variance
from unclip.errors import ConfigError

SAMPLERS = ("ddpm", "ddim", "dpmsolver++")
# Which timesteps each sampler visits (schedule.space_timesteps): DDIM, forwards and inverted, on
# the "leading" grid so that inversion and reconstruction share steps that can be inverted.
SPACING = {"ddpm": "uniform", "ddim": "leading", "dpmsolver++": "uniform"}


@dataclass(frozen=True)
class SampleStep:
    """One step of a loop: its index (0-based), the original timestep t at which the model was
    called, x_t the sample after the step, and pred_x0 the clean sample predicted at t."""

    index: int
    total: int
    t: int
    x_t: torch.Tensor
    pred_x0: torch.Tensor


def make_scheduler(sampler: str, diffusion: GaussianDiffusion, *, clip_denoised: bool):
    """A diffusers scheduler for `sampler` on `diffusion`'s (respaced) betas, one step per timestep."""
    from diffusers.schedulers.scheduling_ddim import DDIMScheduler
    from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
    from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler

    common = {"num_train_timesteps": diffusion.num_timesteps, "trained_betas": diffusion.betas.tolist(),
              "prediction_type": diffusion.prediction_type}
    if sampler == "ddpm":
        return DDPMScheduler(**common, variance_type=diffusion.variance, clip_sample=clip_denoised)
    if sampler == "ddim":
        return DDIMScheduler(**common, clip_sample=clip_denoised, set_alpha_to_one=True)
    if sampler == "dpmsolver++":
        # DPM-Solver++ works on x_start predictions: it is given ours (clipped when asked), for any shape
        return DPMSolverMultistepScheduler(**{**common, "prediction_type": "sample"}, algorithm_type="dpmsolver++",
                                           solver_order=2, timestep_spacing="trailing")
    raise ConfigError(f"unknown sampler {sampler!r}; use one of {', '.join(SAMPLERS)}")


def _noise(shape: tuple[int, ...], generator: torch.Generator | None, device, dtype) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device (so a seed gives the same noise anywhere)."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


def sample_loop(model_fn: ModelFn, diffusion: GaussianDiffusion, *, shape: tuple[int, ...] | None = None,
                x_T: torch.Tensor | None = None, sampler: str = "ddim", steps: int = 50, eta: float = 0.0,
                generator: torch.Generator | None = None, clip_denoised: bool = True, cond: dict | None = None,
                device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                ) -> Generator[SampleStep, None, torch.Tensor]:
    """Draw samples [B, ...] by running `sampler` for `steps` steps from x_T (or fresh noise of `shape`).

    diffusion: the full training process (respaced here). model_fn(x_t, t [B], **cond) → output.
    Yields a `SampleStep` per step; returns the final sample (also the last step's x_t).
    """
    if sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler {sampler!r}; use one of {', '.join(SAMPLERS)}")
    spaced = diffusion.respace(steps, SPACING[sampler])
    scheduler = make_scheduler(sampler, spaced, clip_denoised=clip_denoised)
    scheduler.set_timesteps(spaced.num_timesteps)
    if x_T is None:
        if shape is None:
            raise ValueError("sample_loop needs x_T or shape")
        x_T = _noise(tuple(shape), generator, device, dtype)
    x = x_T
    timesteps = scheduler.timesteps.tolist()
    for index, t in enumerate(timesteps):
        t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        output = model_fn(x, spaced.model_timesteps(t_batch), **(cond or {}))
        prediction, _ = split_variance(output, spaced.variance)
        pred_x0 = spaced.pred_x0(x, t_batch, prediction)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1, 1)
        if sampler == "ddpm":
            x = scheduler.step(output, t, x, generator=generator).prev_sample
        elif sampler == "ddim":
            x = scheduler.step(prediction, t, x, eta=eta, generator=generator).prev_sample
        else:
            x = scheduler.step(pred_x0, t, x, generator=generator).prev_sample
        yield SampleStep(index=index, total=len(timesteps), t=int(spaced.timestep_map[t]), x_t=x, pred_x0=pred_x0)
    return x


def invert_loop(model_fn: ModelFn, diffusion: GaussianDiffusion, x_start: torch.Tensor, *, steps: int = 50,
                cond: dict | None = None) -> Generator[SampleStep, None, torch.Tensor]:
    """DDIM inversion: clean x_start [B, ...] → x_T [B, ...] through `steps` deterministic steps.

    Each step moves from one noise level up to the next using the prediction at the next level
    (diffusers DDIMInverseScheduler); the mirror of `sample_loop(sampler="ddim", eta=0,
    clip_denoised=False)` with the same steps.
    """
    from diffusers.schedulers.scheduling_ddim_inverse import DDIMInverseScheduler

    spaced = diffusion.respace(steps, SPACING["ddim"])
    scheduler = DDIMInverseScheduler(num_train_timesteps=spaced.num_timesteps, trained_betas=spaced.betas.tolist(),
                                     prediction_type=spaced.prediction_type, clip_sample=False, set_alpha_to_one=True)
    scheduler.set_timesteps(spaced.num_timesteps)
    x = x_start
    timesteps = scheduler.timesteps.tolist()
    for index, t in enumerate(timesteps):
        t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        output = model_fn(x, spaced.model_timesteps(t_batch), **(cond or {}))
        prediction, _ = split_variance(output, spaced.variance)
        step = scheduler.step(prediction, t, x)
        x = step.prev_sample
        yield SampleStep(index=index, total=len(timesteps), t=int(spaced.timestep_map[t]), x_t=x,
                         pred_x0=step.pred_original_sample)
    return x


def run(loop: Generator[SampleStep, None, torch.Tensor],
        callback: Callable[[SampleStep], None] | None = None) -> torch.Tensor:
    """Run a loop to the end, calling `callback` on each step; return its final tensor."""
    while True:
        try:
            step = next(loop)
        except StopIteration as stop:
            return stop.value
        if callback is not None:
            callback(step)


def sample(model_fn: ModelFn, diffusion: GaussianDiffusion, *, callback: Callable[[SampleStep], None] | None = None,
           **kwargs) -> torch.Tensor:
    """`sample_loop(model_fn, diffusion, **kwargs)` run to the end; returns the samples."""
    return run(sample_loop(model_fn, diffusion, **kwargs), callback)


def invert(model_fn: ModelFn, diffusion: GaussianDiffusion, x_start: torch.Tensor, *,
           callback: Callable[[SampleStep], None] | None = None, **kwargs) -> torch.Tensor:
    """`invert_loop(model_fn, diffusion, x_start, **kwargs)` run to the end; returns x_T."""
    return run(invert_loop(model_fn, diffusion, x_start, **kwargs), callback)
