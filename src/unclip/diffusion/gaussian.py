"""Gaussian diffusion math, written once for every model (images [B, C, H, W] or embeddings [B, D]).

The math never holds the network: every function that needs a prediction takes
`model_fn(x_t, t, **cond)`, which returns the model output for a batch of noised inputs x_t at
(original, un-respaced) timesteps t [B]. The output holds the prediction (`prediction_type`:
"epsilon" the noise, "sample" x_start, "v_prediction" v = √ᾱ eps - √(1-ᾱ) x_start) and, with
`variance="learned_range"`, a second half of channels v that interpolates log β and log β̃
(improved DDPM, Nichol & Dhariwal 2021, §3.1 eq. 15). Names follow improved-diffusion:
`q_sample`, `p_mean_variance`, `training_losses`, `x_start`, `x_t`, `eps`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from unclip.diffusion.schedule import betas_for, respaced_betas, space_timesteps
from unclip.errors import ConfigError

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
VARIANCES = ("fixed_small", "learned_range")
VLB_WEIGHT = 0.001  # improved DDPM §3.1: L_hybrid = L_simple + λ L_vlb, λ = 0.001

ModelFn = Callable[..., torch.Tensor]


def split_variance(output: torch.Tensor, variance: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The learned-variance split: output [B, 2C, ...] → prediction [B, C, ...], v [B, C, ...].

    With a fixed variance the output is the prediction and v is None.
    """
    if variance == "learned_range":
        prediction, v = output.chunk(2, dim=1)
        return prediction, v
    if variance == "fixed_small":
        return output, None
    raise ConfigError(f"unknown variance {variance!r}; use one of {', '.join(VARIANCES)}")


def cfg_mix(cond: torch.Tensor, uncond: torch.Tensor, scale: float, *, variance: str = "fixed_small") -> torch.Tensor:
    """Classifier-free guidance: uncond + scale · (cond - uncond) on the prediction.

    cond, uncond: model outputs [B, C or 2C, ...] of the conditional and null branches. With a
    learned variance, the variance half is taken from the conditional branch (GLIDE §2.3).
    Guiding eps, x_start or v is the same guidance: each is affine in the others at fixed x_t.
    """
    pred_c, v_c = split_variance(cond, variance)
    pred_u, _ = split_variance(uncond, variance)
    mixed = pred_u + scale * (pred_c - pred_u)
    return mixed if v_c is None else torch.cat([mixed, v_c], dim=1)


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, *, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """log p(x) elementwise for data x in [-1, 1] quantised to 256 levels (DDPM §3.3), in nats."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = _std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))))


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch: [B, ...] → [B]."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


class GaussianDiffusion:
    """The forward process q, the reverse-process parameters p and the training loss of one schedule.

    betas: [T] float64. `t` arguments are indices into this schedule, [B] long; the network is
    called with `timestep_map[t]` (the original training timestep; the identity unless respaced).
    Derived tensors live here, never in a module's state: they are recomputed from the config.
    """

    def __init__(self, *, betas: torch.Tensor, prediction_type: str = "epsilon", variance: str = "fixed_small",
                 timestep_map: torch.Tensor | None = None):
        if prediction_type not in PREDICTION_TYPES:
            raise ConfigError(f"unknown prediction_type {prediction_type!r}; use one of {', '.join(PREDICTION_TYPES)}")
        if variance not in VARIANCES:
            raise ConfigError(f"unknown variance {variance!r}; use one of {', '.join(VARIANCES)}")
        self.prediction_type, self.variance = prediction_type, variance
        self.betas = betas = betas.to(torch.float64)
        self.num_timesteps = len(betas)
        self.timestep_map = torch.arange(len(betas)) if timestep_map is None else timestep_map.long()
        alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        # q(x_{t-1} | x_t, x_start) = N(coef1 x_start + coef2 x_t, β̃_t), β̃_t = β_t (1-ᾱ_{t-1}) / (1-ᾱ_t)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # β̃_0 = 0: its log is taken from β̃_1 (improved-diffusion's "clipped" log variance)
        clipped = torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]) if len(betas) > 1 \
            else betas.clone()
        self.posterior_log_variance_clipped = torch.log(clipped)
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * alphas.sqrt() / (1.0 - self.alphas_cumprod)
        self._device_tables: dict[tuple[int, str], torch.Tensor] = {}  # `_on`'s copies on other devices

    @classmethod
    def from_schedule(cls, schedule: str, timesteps: int, *, prediction_type: str = "epsilon",
                      variance: str = "fixed_small") -> GaussianDiffusion:
        return cls(betas=betas_for(schedule, timesteps), prediction_type=prediction_type, variance=variance)

    def respace(self, steps: int, spacing: str = "uniform", *, end: int | None = None) -> GaussianDiffusion:
        """The same process on `steps` of its timesteps 0 … end (see `schedule.space_timesteps`)."""
        kept = space_timesteps(self.num_timesteps, steps, spacing, end=end)
        return GaussianDiffusion(betas=respaced_betas(self.alphas_cumprod, kept), prediction_type=self.prediction_type,
                                 variance=self.variance, timestep_map=self.timestep_map[kept])

    # --- helpers -------------------------------------------------------------------------------

    def _on(self, values: torch.Tensor, device: torch.device) -> torch.Tensor:
        """`values` (one of this process's tables) on `device`, copied there once: indexing a CPU
        table with GPU timesteps would stall every training step on a copy back to the CPU."""
        if device.type == "cpu":
            return values
        key = (id(values), str(device))
        if key not in self._device_tables:
            self._device_tables[key] = values.to(device)
        return self._device_tables[key]

    def _at(self, values: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """values[t] [B] broadcast to x's shape [B, 1, ...] on x's device and dtype."""
        out = self._on(values, t.device)[t.long()].to(device=x.device, dtype=x.dtype)
        return out.reshape(-1, *([1] * (x.ndim - 1)))

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The original training timesteps [B] of respaced indices t [B] (what the network sees)."""
        return self._on(self.timestep_map, t.device)[t.long()]

    # --- forward process q ---------------------------------------------------------------------

    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of q(x_t | x_start) = N(√ᾱ_t x_start, (1-ᾱ_t) I)."""
        return self._at(self.sqrt_alphas_cumprod, t, x_start) * x_start, self._at(1.0 - self.alphas_cumprod, t, x_start)

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t x_start + √(1-ᾱ_t) eps, same shape as x_start."""
        return (self._at(self.sqrt_alphas_cumprod, t, x_start) * x_start
                + self._at(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise)

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and log variance (clipped at t = 0) of q(x_{t-1} | x_t, x_start)."""
        mean = self._at(self.posterior_mean_coef1, t, x_t) * x_start + self._at(self.posterior_mean_coef2, t, x_t) * x_t
        return (mean, self._at(self.posterior_variance, t, x_t), self._at(self.posterior_log_variance_clipped, t, x_t))

    # --- conversions between parameterisations (the one implementation) ------------------------

    def x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_start = (x_t - √(1-ᾱ_t) eps) / √ᾱ_t."""
        return (x_t - self._at(self.sqrt_one_minus_alphas_cumprod, t, x_t) * eps) / self._at(self.sqrt_alphas_cumprod, t, x_t)

    def eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x_start: torch.Tensor) -> torch.Tensor:
        """eps = (x_t - √ᾱ_t x_start) / √(1-ᾱ_t)."""
        return (x_t - self._at(self.sqrt_alphas_cumprod, t, x_t) * x_start) / self._at(self.sqrt_one_minus_alphas_cumprod, t, x_t)

    def v_from(self, x_start: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = √ᾱ_t eps - √(1-ᾱ_t) x_start (Salimans & Ho 2022)."""
        return self._at(self.sqrt_alphas_cumprod, t, eps) * eps - self._at(self.sqrt_one_minus_alphas_cumprod, t, eps) * x_start

    def x0_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """x_start = √ᾱ_t x_t - √(1-ᾱ_t) v."""
        return self._at(self.sqrt_alphas_cumprod, t, x_t) * x_t - self._at(self.sqrt_one_minus_alphas_cumprod, t, x_t) * v

    def pred_x0(self, x_t: torch.Tensor, t: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
        """x_start predicted by `prediction` [B, C, ...] (the prediction half of a model output)."""
        if self.prediction_type == "epsilon":
            return self.x0_from_eps(x_t, t, prediction)
        if self.prediction_type == "sample":
            return prediction
        return self.x0_from_v(x_t, t, prediction)

    def target(self, x_start: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network regresses onto for this `prediction_type`."""
        if self.prediction_type == "epsilon":
            return eps
        if self.prediction_type == "sample":
            return x_start
        return self.v_from(x_start, eps, t)

    # --- reverse process p ---------------------------------------------------------------------

    def p_mean_variance(self, model_fn: ModelFn, x_t: torch.Tensor, t: torch.Tensor, *, cond: dict | None = None,
                        clip_denoised: bool = False) -> dict[str, torch.Tensor]:
        """Parameters of p(x_{t-1} | x_t): mean, variance, log_variance [B, C, ...], pred_x0, output.

        fixed_small uses β̃_t; learned_range uses exp(v' log β_t + (1-v') log β̃_t), v' = (v+1)/2
        (improved DDPM eq. 15). With `clip_denoised` the predicted x_start is clamped to [-1, 1].
        """
        output = model_fn(x_t, self.model_timesteps(t), **(cond or {}))
        prediction, v = split_variance(output, self.variance)
        if v is None:
            log_variance = self._at(self.posterior_log_variance_clipped, t, x_t).expand_as(x_t)
        else:
            min_log = self._at(self.posterior_log_variance_clipped, t, x_t)
            max_log = self._at(torch.log(self.betas), t, x_t)
            frac = (v + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
        pred_x0 = self.pred_x0(x_t, t, prediction)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_x0, x_t, t)
        return {"mean": mean, "variance": log_variance.exp(), "log_variance": log_variance,
                "pred_x0": pred_x0, "output": output}

    def vb_terms(self, model_fn: ModelFn, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, *,
                 cond: dict | None = None) -> torch.Tensor:
        """One term of the variational bound [B], in bits per dimension.

        t > 0: KL(q(x_{t-1} | x_t, x_start) ‖ p(x_{t-1} | x_t)); t = 0: -log p(x_start | x_1) with
        the discretised gaussian decoder (data in [-1, 1], 256 levels). Both are ≥ 0.
        """
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        p = self.p_mean_variance(model_fn, x_t, t, cond=cond)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, p["mean"], p["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, means=p["mean"], log_scales=0.5 * p["log_variance"])
        nll = mean_flat(nll) / math.log(2.0)
        return torch.where(t.to(kl.device) == 0, nll, kl)

    def training_losses(self, model_fn: ModelFn, x_start: torch.Tensor, *, t: torch.Tensor,
                        noise: torch.Tensor | None = None, cond: dict | None = None,
                        vlb_weight: float = VLB_WEIGHT) -> dict[str, torch.Tensor]:
        """Per-example losses [B]: "mse" on the `prediction_type` target, "vb", and "loss".

        learned_range: loss = mse + vlb_weight · T · vb, where T · vb estimates L_vlb for uniform t
        and the vb term sees the prediction through a stop-gradient, so it trains only the
        variance (improved DDPM §3.1, λ = 0.001). fixed_small: loss = mse, vb = 0.
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise)
        output = model_fn(x_t, self.model_timesteps(t), **(cond or {}))
        prediction, v = split_variance(output, self.variance)
        mse = mean_flat((self.target(x_start, noise, t) - prediction) ** 2)
        if v is None:
            vb = torch.zeros_like(mse)
            return {"loss": mse, "mse": mse, "vb": vb}
        frozen = torch.cat([prediction.detach(), v], dim=1)
        vb = self.vb_terms(lambda *_args, **_kw: frozen, x_start, x_t, t)
        return {"loss": mse + vlb_weight * self.num_timesteps * vb, "mse": mse, "vb": vb}
