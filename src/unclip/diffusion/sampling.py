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
- "dpmsolver++": DPM-Solver++ 2M (Lu et al. 2022), deterministic, on the "trailing" grid T-1 …
  T/N-1, then a first-order step to the clean image (diffusers' own grid for it).

A truncated start (`start` < 1) runs the chain from noise level round(start · (T-1)) instead of
pure noise, from `init` (a guess of the clean sample, zeros by default) noised to that level:
SDEdit's start (Meng et al. 2022). The upsamplers use it: their conditioning already fixes
everything but fine detail, so a short chain from a low noise level is enough (docs/decoder.md).

`repaint_loop` inpaints (RePaint, ancestral steps on our own `p_mean_variance`, with resampling).

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
Generators = torch.Generator | list[torch.Generator] | None  # one for the batch, or one per row
# Which timesteps each sampler visits (schedule.space_timesteps): DDIM, forwards and inverted, on
# the "leading" grid so that inversion and reconstruction share steps that can be inverted.
SPACING = {"ddpm": "uniform", "ddim": "leading", "dpmsolver++": "trailing"}


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
        scheduler = DDPMScheduler(**common, variance_type=diffusion.variance, clip_sample=clip_denoised)
    elif sampler == "ddim":
        scheduler = DDIMScheduler(**common, clip_sample=clip_denoised, set_alpha_to_one=True)
    elif sampler == "dpmsolver++":
        # DPM-Solver++ works on x_start predictions: it is given ours (clipped when asked), for any shape
        scheduler = DPMSolverMultistepScheduler(**{**common, "prediction_type": "sample"},
                                                algorithm_type="dpmsolver++", solver_order=2,
                                                timestep_spacing="trailing")
    else:
        raise ConfigError(f"unknown sampler {sampler!r}; use one of {', '.join(SAMPLERS)}")
    return _exact_noise_levels(scheduler, diffusion)


def _exact_noise_levels(scheduler, diffusion: GaussianDiffusion):
    """Give `scheduler` the process's ᾱ_t, computed in float64.

    diffusers multiplies float32 copies of the betas, and a chain respaced to few steps has a last
    β within 1e-8 of 1, which rounds to 1: ᾱ_T becomes 0, an infinite noise level, and
    DPM-Solver++ (whose log-SNR is then −∞) returns NaN below 10 steps.
    """
    alphas_cumprod = diffusion.alphas_cumprod.to(torch.float32)
    scheduler.alphas_cumprod = alphas_cumprod
    if hasattr(scheduler, "lambda_t"):  # DPM-Solver's derived tables, as its __init__ builds them
        scheduler.alpha_t = alphas_cumprod.sqrt()
        scheduler.sigma_t = (1 - alphas_cumprod).sqrt()
        scheduler.lambda_t = scheduler.alpha_t.log() - scheduler.sigma_t.log()
        scheduler.sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
    return scheduler


def _noise(shape: tuple[int, ...], generator: Generators, device, dtype) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device (so a seed gives the same noise anywhere).

    A list of generators draws row i from generator i, so a row's noise does not depend on the
    batch it is in (diffusers' convention; its schedulers accept the same list).
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        return torch.cat([_noise((1, *shape[1:]), g, device, dtype) for g in generator])
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


def sample_loop(model_fn: ModelFn, diffusion: GaussianDiffusion, *, shape: tuple[int, ...] | None = None,
                x_T: torch.Tensor | None = None, sampler: str = "ddim", steps: int = 50, eta: float = 0.0,
                generator: Generators = None, clip_denoised: bool = True, cond: dict | None = None,
                device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                start: float = 1.0, init: torch.Tensor | None = None,
                ) -> Generator[SampleStep, None, torch.Tensor]:
    """Draw samples [B, ...] by running `sampler` for `steps` steps from x_T (or fresh noise of `shape`).

    diffusion: the full training process (respaced here). model_fn(x_t, t [B], **cond) → output.
    start in (0, 1]: the noise level to start from as a fraction of the schedule; below 1 the
    steps are laid over timesteps 0 … round(start · (T-1)) and, without x_T, the chain starts from
    `init` [B, ...] (zeros when None) noised to that level. Yields a `SampleStep` per step;
    returns the final sample (also the last step's x_t).
    """
    if sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler {sampler!r}; use one of {', '.join(SAMPLERS)}")
    if not 0 < start <= 1:
        raise ConfigError(f"start={start}: the starting noise level is a fraction in (0, 1]")
    end = round(start * (diffusion.num_timesteps - 1))
    spaced = diffusion.respace(steps, SPACING[sampler], end=end)
    scheduler = make_scheduler(sampler, spaced, clip_denoised=clip_denoised)
    scheduler.set_timesteps(spaced.num_timesteps)
    if x_T is None:
        if shape is None:
            raise ValueError("sample_loop needs x_T or shape")
        x_T = _noise(tuple(shape), generator, device, dtype)
        if start < 1:  # q(x | init) at the chain's top level: `end`, or just below it on DDIM's grid
            last = torch.full((x_T.shape[0],), spaced.num_timesteps - 1, dtype=torch.long, device=x_T.device)
            x_T = spaced.q_sample(torch.zeros_like(x_T) if init is None else init.to(x_T), last, x_T)
    x = x_T
    timesteps = scheduler.timesteps.tolist()
    for index, t in enumerate(timesteps):
        t_batch, output, prediction = _predict(model_fn, spaced, x, t, cond)
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


def _predict(model_fn: ModelFn, spaced: GaussianDiffusion, x: torch.Tensor, t: int,
             cond: dict | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(t as a [B] batch, the model's output at step t of the respaced process, its prediction half)."""
    t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
    output = model_fn(x, spaced.model_timesteps(t_batch), **(cond or {}))
    return t_batch, output, split_variance(output, spaced.variance)[0]


def invert_loop(model_fn: ModelFn, diffusion: GaussianDiffusion, x_start: torch.Tensor, *, steps: int = 50,
                cond: dict | None = None) -> Generator[SampleStep, None, torch.Tensor]:
    """DDIM inversion: clean x_start [B, ...] → x_T [B, ...] through `steps` deterministic steps.

    Each step moves from one noise level up to the next using the prediction at the next level
    (diffusers DDIMInverseScheduler); the mirror of `sample_loop(sampler="ddim", eta=0,
    clip_denoised=False)` with the same steps.
    """
    from diffusers.schedulers.scheduling_ddim_inverse import DDIMInverseScheduler

    spaced = diffusion.respace(steps, SPACING["ddim"])
    # The scheduler reads a prediction at the level x is at, the lower one; the network was asked at
    # the upper, t. ε is the same at both (DDIM inversion's approximation), v and x0 are not: read at
    # the lower level a v model's ε came out wrong (reconstruction MSE 2× an ε model's at 10 steps) and
    # an x0 model's NaN. So the prediction becomes ε at t first, and the scheduler inverts ε.
    scheduler = DDIMInverseScheduler(num_train_timesteps=spaced.num_timesteps, trained_betas=spaced.betas.tolist(),
                                     prediction_type="epsilon", clip_sample=False, set_alpha_to_one=True)
    scheduler.set_timesteps(spaced.num_timesteps)
    x = x_start
    timesteps = scheduler.timesteps.tolist()
    for index, t in enumerate(timesteps):
        t_batch, _, prediction = _predict(model_fn, spaced, x, t, cond)
        eps = spaced.eps_from_x0(x, t_batch, spaced.pred_x0(x, t_batch, prediction))
        step = scheduler.step(eps, t, x)
        x = step.prev_sample
        yield SampleStep(index=index, total=len(timesteps), t=int(spaced.timestep_map[t]), x_t=x,
                         pred_x0=step.pred_original_sample)
    return x


def repaint_loop(model_fn: ModelFn, diffusion: GaussianDiffusion, known: torch.Tensor, mask: torch.Tensor, *,
                 steps: int = 50, resample: int = 5, generator: Generators = None,
                 clip_denoised: bool = True, cond: dict | None = None) -> Generator[SampleStep, None, torch.Tensor]:
    """Inpainting by RePaint (Lugmayr et al. 2022) on ancestral sampling: known [B, ...] is kept
    where mask [B or 1, 1 or C, ...] is 1 and generated where it is 0.

    At each of `steps` levels the known region is the forward-noised original at that level and
    the rest comes from the reverse step (with the learned variance when the model has one);
    each level is redone `resample` times, re-noising one step in between, so the generated
    region agrees with the known one (RePaint §4.2, jump length 1). Yields one step per level.
    """
    spaced = diffusion.respace(steps, SPACING["ddpm"])
    mask = mask.to(known)
    x = _noise(tuple(known.shape), generator, known.device, known.dtype)
    n = spaced.num_timesteps
    for index, i in enumerate(range(n - 1, -1, -1)):
        t = torch.full((known.shape[0],), i, dtype=torch.long, device=known.device)
        for u in range(resample if i > 0 else 1):  # the last level's result is clean: nothing to redo
            p = spaced.p_mean_variance(model_fn, x, t, cond=cond, clip_denoised=clip_denoised)
            unknown = p["mean"]
            if i > 0:
                unknown = unknown + (0.5 * p["log_variance"]).exp() * _noise(tuple(x.shape), generator, x.device, x.dtype)
                seen = spaced.q_sample(known, t - 1, _noise(tuple(x.shape), generator, x.device, x.dtype))
            else:
                seen = known
            x_prev = mask * seen + (1 - mask) * unknown
            if u + 1 < resample and i > 0:  # back up one level: q(x_i | x_{i-1})
                beta = spaced.betas[i].item()
                x = (1 - beta) ** 0.5 * x_prev + beta**0.5 * _noise(tuple(x.shape), generator, x.device, x.dtype)
            else:
                x = x_prev
        yield SampleStep(index=index, total=n, t=int(spaced.timestep_map[i]), x_t=x, pred_x0=p["pred_x0"])
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
