"""Diffusion math only: schedules, q_sample, parameterisations, losses, CFG mixing, samplers.

Imports no network module: every function takes `model_fn(x_t, t, **cond)`, so the decoder,
the upsamplers and the diffusion prior share one implementation of each operation. Works on
any tensor shape [B, ...]: images [B, C, H, W] as well as embeddings [B, D].
"""

from unclip.diffusion.gaussian import (
    PREDICTION_TYPES,
    VARIANCES,
    VLB_WEIGHT,
    GaussianDiffusion,
    cfg_mix,
    discretized_gaussian_log_likelihood,
    mean_flat,
    normal_kl,
    split_variance,
)
from unclip.diffusion.sampling import (
    SAMPLERS,
    SampleStep,
    invert,
    invert_loop,
    make_scheduler,
    repaint_loop,
    run,
    sample,
    sample_loop,
)
from unclip.diffusion.schedule import SCHEDULES, betas_for, diffusers_beta_args, respaced_betas, space_timesteps

__all__ = [
    "PREDICTION_TYPES", "SAMPLERS", "SCHEDULES", "VARIANCES", "VLB_WEIGHT", "GaussianDiffusion", "SampleStep",
    "betas_for", "cfg_mix", "diffusers_beta_args", "discretized_gaussian_log_likelihood", "invert", "invert_loop",
    "make_scheduler", "mean_flat", "repaint_loop", "normal_kl", "respaced_betas", "run", "sample", "sample_loop",
    "space_timesteps", "split_variance",
]
