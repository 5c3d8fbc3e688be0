"""The diffusion math against closed forms, diffusers, and the properties sampling relies on."""

import math
import subprocess
import sys

import pytest
import torch

from unclip.diffusion import (
    SAMPLERS,
    GaussianDiffusion,
    betas_for,
    cfg_mix,
    invert,
    invert_loop,
    sample,
    sample_loop,
    space_timesteps,
)
from unclip.errors import ConfigError


def test_cosine_schedule_endpoints_and_diffusers_equivalence():
    from diffusers import DDPMScheduler

    for T in (100, 1000):
        d = GaussianDiffusion.from_schedule("cosine", T)
        f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731  improved DDPM eq. 17
        assert d.alphas_cumprod[0].item() == pytest.approx(f(1 / T) / f(0), rel=1e-12)
        assert d.alphas_cumprod[T // 2].item() == pytest.approx(f(0.5 + 1 / T) / f(0), rel=1e-9)
        assert d.alphas_cumprod[-1].item() < 1e-6  # pure noise at the end
        assert d.betas.max().item() == pytest.approx(0.999)  # the cap
        assert torch.all(d.alphas_cumprod[1:] < d.alphas_cumprod[:-1])
        ours = DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2").alphas_cumprod.double()
        assert torch.allclose(ours, d.alphas_cumprod, atol=1e-6)
    linear = betas_for("linear", 1000)
    assert linear[0].item() == pytest.approx(1e-4) and linear[-1].item() == pytest.approx(0.02)
    assert betas_for("linear", 100)[-1].item() == pytest.approx(0.2)  # scaled by 1000/T


@pytest.mark.parametrize("shape", [(4, 8), (2, 3, 4, 4)])
def test_q_sample_matches_the_closed_form_mean_and_variance(shape):
    d = GaussianDiffusion.from_schedule("cosine", 1000)
    g = torch.Generator().manual_seed(0)
    x_start = torch.rand(shape, generator=g) * 2 - 1
    n, t_val = 20_000, 400
    t = torch.full((n * shape[0],), t_val)
    noise = torch.randn((n * shape[0], *shape[1:]), generator=g, dtype=torch.float64)
    x_t = d.q_sample(x_start.double().repeat(n, *([1] * (len(shape) - 1))), t, noise)
    x_t = x_t.reshape(n, *shape)
    abar = d.alphas_cumprod[t_val].item()
    assert torch.allclose(x_t.mean(0), math.sqrt(abar) * x_start.double(), atol=5 * math.sqrt((1 - abar) / n))
    assert torch.allclose(x_t.var(0), torch.full(shape, 1 - abar, dtype=torch.float64), rtol=0.06)
    mean, var = d.q_mean_variance(x_start, torch.full((shape[0],), t_val))
    assert torch.allclose(mean, math.sqrt(abar) * x_start, atol=1e-6) and torch.allclose(var, torch.full_like(var, 1 - abar))


def test_eps_x0_v_conversions_invert_each_other():
    d = GaussianDiffusion.from_schedule("cosine", 1000)
    g = torch.Generator().manual_seed(1)
    x_start, eps = torch.randn(6, 3, 4, 4, generator=g), torch.randn(6, 3, 4, 4, generator=g)
    t = torch.tensor([0, 10, 250, 500, 900, 998])
    x_t = d.q_sample(x_start, t, eps)
    assert torch.allclose(d.x0_from_eps(x_t, t, eps), x_start, atol=1e-3)
    assert torch.allclose(d.eps_from_x0(x_t, t, x_start), eps, atol=1e-3)
    assert torch.allclose(d.x0_from_v(x_t, t, d.v_from(x_start, eps, t)), x_start, atol=1e-4)
    for kind in ("epsilon", "sample", "v_prediction"):
        dk = GaussianDiffusion.from_schedule("cosine", 1000, prediction_type=kind)
        assert torch.allclose(dk.pred_x0(x_t, t, dk.target(x_start, eps, t)), x_start, atol=1e-3)


def test_learned_range_loss_is_finite_nonnegative_and_stops_the_mean_gradient():
    d = GaussianDiffusion.from_schedule("cosine", 100, variance="learned_range")
    g = torch.Generator().manual_seed(2)
    x_start = torch.rand(8, 3, 4, 4, generator=g) * 2 - 1
    t = torch.tensor([0, 1, 5, 20, 50, 80, 98, 99])
    output = torch.randn(8, 6, 4, 4, generator=g).requires_grad_()
    losses = d.training_losses(lambda x_t, t_model: output, x_start, t=t)
    assert torch.isfinite(losses["loss"]).all() and (losses["vb"] >= 0).all() and (losses["mse"] >= 0).all()
    losses["vb"].sum().backward()
    assert output.grad[:, :3].abs().max() == 0  # the VLB term does not train the mean (improved DDPM §3.1)
    assert output.grad[:, 3:].abs().max() > 0


def test_vb_term_vanishes_for_the_true_posterior():
    d = GaussianDiffusion.from_schedule("cosine", 100, variance="learned_range")
    g = torch.Generator().manual_seed(3)
    x_start, noise = torch.rand(4, 3, 4, 4, generator=g) * 2 - 1, torch.randn(4, 3, 4, 4, generator=g)
    t = torch.tensor([3, 30, 60, 90])
    # v = -1 selects log β̃ exactly, and the true noise gives the true posterior mean: KL = 0
    perfect = lambda x_t, t_model: torch.cat([noise, -torch.ones_like(noise)], dim=1)  # noqa: E731
    losses = d.training_losses(perfect, x_start, t=t, noise=noise)
    assert losses["vb"].abs().max() < 1e-4 and losses["mse"].abs().max() < 1e-12


def test_learned_variance_matches_diffusers_ddpm_step_on_the_respaced_chain():
    from diffusers import DDPMScheduler

    d = GaussianDiffusion.from_schedule("cosine", 1000, variance="learned_range").respace(10)
    g = torch.Generator().manual_seed(4)
    x_t, output = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 6, 4, 4, generator=g) * 0.5
    scheduler = DDPMScheduler(num_train_timesteps=10, trained_betas=d.betas.tolist(), variance_type="learned_range",
                              clip_sample=False)
    scheduler.set_timesteps(10)
    for t in (8, 5, 1):  # at 9 (ᾱ ≈ 2e-9) diffusers' float32 cumprod is too coarse to compare
        ours = d.p_mean_variance(lambda *_: output, x_t, torch.full((2,), t))
        zero = scheduler.step(output, t, x_t, generator=torch.Generator().manual_seed(0)).prev_sample
        noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
        assert torch.allclose(zero, ours["mean"] + ours["variance"].sqrt() * noise, atol=1e-4)


def test_cfg_mix_guides_the_prediction_and_keeps_the_conditional_variance():
    cond, uncond = torch.randn(2, 6, 4, 4), torch.randn(2, 6, 4, 4)
    assert torch.allclose(cfg_mix(cond, uncond, 1.0, variance="learned_range"), cond, atol=1e-6)
    mixed = cfg_mix(cond, uncond, 3.0, variance="learned_range")
    assert torch.allclose(mixed[:, :3], uncond[:, :3] + 3 * (cond[:, :3] - uncond[:, :3]))
    assert torch.equal(mixed[:, 3:], cond[:, 3:])
    assert torch.allclose(cfg_mix(cond, uncond, 0.0), uncond)


def test_spacing_and_respacing_keep_the_trained_noise_levels():
    assert space_timesteps(1000, 50)[0] == 0 and space_timesteps(1000, 50)[-1] == 999
    assert len(space_timesteps(1000, 50)) == 50 and len(space_timesteps(100, 100)) == 100
    assert space_timesteps(1000, 50, "leading") == list(range(0, 1000, 20))
    # a truncated chain lays the same grids over 0 … end; end = T-1 is the full chain
    for spacing in ("uniform", "leading", "trailing"):
        assert space_timesteps(1000, 50, spacing, end=999) == space_timesteps(1000, 50, spacing)
        kept = space_timesteps(1000, 10, spacing, end=99)
        assert len(kept) == 10 and 0 <= kept[0] and kept[-1] <= 99
    assert space_timesteps(1000, 10, "uniform", end=99) == [0, 11, 22, 33, 44, 55, 66, 77, 88, 99]
    assert space_timesteps(1000, 10, "trailing", end=99) == list(range(9, 100, 10))
    assert space_timesteps(1000, 10, "leading", end=99) == list(range(0, 100, 10))
    assert space_timesteps(1000, 1, end=99) == [99]
    with pytest.raises(ConfigError, match="between 1 and the 100"):
        space_timesteps(1000, 101, end=99)
    with pytest.raises(ConfigError, match="end=1000"):
        space_timesteps(1000, 10, end=1000)
    d = GaussianDiffusion.from_schedule("cosine", 1000)
    for spacing in ("uniform", "leading"):
        r = d.respace(7, spacing)
        kept = space_timesteps(1000, 7, spacing)
        assert torch.equal(r.timestep_map, torch.tensor(kept))
        assert torch.allclose(r.alphas_cumprod, d.alphas_cumprod[kept], rtol=1e-10)


def _toy_model(x_t, t):
    """A smooth, timestep-dependent stand-in for a network; works on any shape."""
    return torch.tanh(0.5 * x_t) + 1e-3 * t.view(-1, *([1] * (x_t.ndim - 1)))


@pytest.mark.parametrize("shape", [(3, 8), (2, 3, 4, 4)])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_yields_its_steps_and_repeats_for_a_seed(sampler, shape):
    d = GaussianDiffusion.from_schedule("cosine", 100, variance="learned_range")
    model = lambda x_t, t: torch.cat([_toy_model(x_t, t), torch.zeros_like(x_t)], dim=1)  # noqa: E731
    kw = {"shape": shape, "sampler": sampler, "steps": 6, "eta": 1.0, "clip_denoised": len(shape) == 4}
    steps = list(sample_loop(model, d, generator=torch.Generator().manual_seed(0), **kw))
    assert [s.index for s in steps] == list(range(6)) and all(s.total == 6 for s in steps)
    assert [s.t for s in steps] == sorted((s.t for s in steps), reverse=True)
    assert all(s.x_t.shape == shape and s.pred_x0.shape == shape for s in steps)
    seen = []
    a = sample(model, d, generator=torch.Generator().manual_seed(0), callback=seen.append, **kw)
    b = sample(model, d, generator=torch.Generator().manual_seed(0), **kw)
    c = sample(model, d, generator=torch.Generator().manual_seed(1), **kw)
    assert len(seen) == 6 and torch.equal(seen[-1].x_t, a)
    assert torch.equal(a, b) and torch.equal(a, steps[-1].x_t) and not torch.allclose(a, c)


def _gaussian_denoiser(d: GaussianDiffusion, mu: float, s: float):
    """The exact eps-prediction for data x_start ~ N(mu, s²) per coordinate."""
    def model(x_t, t):
        a = d.alphas_cumprod[t].sqrt().float().view(-1, *([1] * (x_t.ndim - 1)))
        b = (1 - d.alphas_cumprod[t]).sqrt().float().view(-1, *([1] * (x_t.ndim - 1)))
        mean_x0 = mu + a * s * s / (a * a * s * s + b * b) * (x_t - a * mu)
        return (x_t - a * mean_x0) / b
    return model


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_a_truncated_start_samples_the_data_near_its_init(sampler):
    """start=0.1 starts from init noised to t = round(0.1 · 999) and only visits timesteps up to it:
    with the exact denoiser of Gaussian data the samples keep the data's spread and stay close to
    the init they started from; from pure noise (start=1) they are independent of it."""
    d = GaussianDiffusion.from_schedule("cosine", 1000)
    mu, spread = 0.3, 0.5
    exact = _gaussian_denoiser(d, mu, spread)
    init = mu + spread * torch.randn(20000, 4, generator=torch.Generator().manual_seed(2))
    seen = []

    def model(x_t, t):
        seen.append(t)
        return exact(x_t, t)

    def correlation(a, b):
        return torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()

    kw = {"shape": tuple(init.shape), "sampler": sampler, "steps": 5, "clip_denoised": False, "init": init}
    out = sample(model, d, start=0.1, generator=torch.Generator().manual_seed(0), **kw)
    top = max(t.max().item() for t in seen)
    assert len(seen) == 5 and top <= round(0.1 * 999) and (sampler == "ddim" or top == round(0.1 * 999))
    assert abs(out.mean().item() - mu) < 0.02 and abs(out.std().item() - spread) < 0.05, (out.mean(), out.std())
    assert correlation(out, init) > 0.85
    full = sample(exact, d, start=1.0, generator=torch.Generator().manual_seed(0), **{**kw, "steps": 20})
    assert abs(correlation(full, init)) < 0.05
    assert torch.equal(full, sample(exact, d, generator=torch.Generator().manual_seed(0), **{**kw, "steps": 20}))
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match="start="):
            sample(exact, d, start=bad, **kw)


def _predicting(kind: str, d: GaussianDiffusion, eps_model):
    """The same exact denoiser as a network predicting `kind` (epsilon, v_prediction or sample)."""
    def model(x_t, t):
        eps = eps_model(x_t, t)
        a = d.alphas_cumprod[t].sqrt().float().view(-1, *([1] * (x_t.ndim - 1)))
        b = (1 - d.alphas_cumprod[t]).sqrt().float().view(-1, *([1] * (x_t.ndim - 1)))
        x0 = (x_t - b * eps) / a
        return {"epsilon": eps, "v_prediction": a * eps - b * x0, "sample": x0}[kind]
    return model


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("shape", [(4, 64), (2, 3, 8, 8)])
def test_ddim_inversion_then_sampling_reconstructs_and_converges(shape, kind):
    """Every prediction type inverts as well as ε does: the inversion read a v or x0 prediction at the
    lower level of each step, the network's at the upper (v: twice ε's error at 10 steps; x0: NaN)."""
    d = GaussianDiffusion.from_schedule("cosine", 1000, prediction_type=kind)
    model = _predicting(kind, d, _gaussian_denoiser(d, 0.3, 0.5))
    x_start = 0.3 + 0.5 * torch.randn(shape, generator=torch.Generator().manual_seed(5))
    errors = []
    for steps in (10, 50, 200):
        x_T = invert(model, d, x_start, steps=steps)
        again = sample(model, d, x_T=x_T, sampler="ddim", eta=0.0, steps=steps, clip_denoised=False)
        errors.append((again - x_start).pow(2).mean().item())
    assert errors[0] > errors[1] > errors[2] and errors[1] < 1e-3 and errors[2] < 1e-4
    assert errors[0] < 1e-2  # v read at the wrong level: 1.6e-2
    # x_T is noise-like: near unit variance, far from the image
    assert 0.7 < x_T.var().item() < 1.3
    assert len(list(invert_loop(model, d, x_start, steps=7))) == 7


def test_diffusion_imports_no_network_module():
    code = (
        "import sys, torch\n"
        "import unclip.diffusion as D\n"
        "d = D.GaussianDiffusion.from_schedule('cosine', 50)\n"
        "for s in D.SAMPLERS:\n"
        "    D.sample(lambda x, t: 0.1 * x, d, shape=(2, 4), sampler=s, steps=3)\n"
        "D.invert(lambda x, t: 0.1 * x, d, torch.zeros(2, 4), steps=3)\n"
        "bad = [m for m in sys.modules if m.startswith(('diffusers.models', 'unclip.decoder', 'unclip.prior',\n"
        "       'unclip.clip', 'transformers'))]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_repaint_keeps_the_known_region_and_samples_the_hole():
    from unclip.diffusion import repaint_loop, run

    d = GaussianDiffusion.from_schedule("cosine", 1000, variance="fixed_small")
    model = _gaussian_denoiser(d, 0.0, 0.5)
    known = 0.5 * torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    keep = torch.zeros(1, 1, 8, 8)
    keep[..., :4] = 1  # keep the left half
    steps = list(repaint_loop(model, d, known, keep, steps=10, resample=3, generator=torch.Generator().manual_seed(0)))
    out = steps[-1].x_t
    assert len(steps) == 10 and torch.equal(out[..., :4], known[..., :4])
    assert not torch.allclose(out[..., 4:], known[..., 4:], atol=0.1)
    assert 0.1 < out[..., 4:].std().item() < 1.0  # the hole is drawn from the data distribution (std 0.5)
    again = run(repaint_loop(model, d, known, keep, steps=10, resample=3, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(again, out)
    whole = run(repaint_loop(model, d, known, torch.ones(1, 1, 8, 8), steps=4, resample=2))
    assert torch.equal(whole, known)
    calls = []
    run(repaint_loop(lambda x, t, **c: calls.append(int(t[0])) or model(x, t, **c), d, known, keep, steps=3, resample=5))
    assert len(calls) == 5 + 5 + 1  # the last level's clean result was denoised four times more


@pytest.mark.parametrize("sampler,steps,tolerance", [("dpmsolver++", 20, 0.01), ("dpmsolver++", 10, 0.04),
                                                     ("ddim", 50, 0.03)])
def test_deterministic_samplers_reach_the_data_spread_with_an_exact_denoiser(sampler, steps, tolerance):
    """Gaussian data (std 0.5) and its exact x_start predictor on the cosine schedule: the samples'
    spread must match the data's. DPM-Solver++ on a grid ending at t = 0 gave std 0.64 at 10 steps."""
    from unclip.diffusion.gaussian import GaussianDiffusion
    from unclip.diffusion.sampling import sample_loop

    d = GaussianDiffusion.from_schedule("cosine", 1000, prediction_type="sample")
    spread = 0.5

    def exact(x, t):
        a = d.alphas_cumprod[t.cpu()].float().view(-1, 1)
        return (a.sqrt() * spread**2 / (a * spread**2 + 1 - a)) * x

    loop = sample_loop(exact, d, shape=(20000, 4), sampler=sampler, steps=steps, clip_denoised=False,
                       generator=torch.Generator().manual_seed(0))
    x = None
    for step in loop:
        x = step.x_t
    assert abs(float(x.std()) - spread) < tolerance, float(x.std())


@pytest.mark.parametrize("sampler", ["dpmsolver++", "ddim"])
def test_a_few_steps_sample_finite_values_whose_spread_grows_with_the_steps(sampler):
    """Respaced to a few steps, the cosine chain's last β is within 1e-8 of 1: in float32 ᾱ_T was 0
    and DPM-Solver++ returned NaN below 10 steps. With the exact denoiser of Gaussian data (std 0.5)
    few deterministic steps under-spread, less with each step added."""
    from unclip.diffusion.gaussian import GaussianDiffusion
    from unclip.diffusion.sampling import sample_loop

    d = GaussianDiffusion.from_schedule("cosine", 1000, prediction_type="sample")

    def exact(x, t):
        a = d.alphas_cumprod[t.cpu()].float().view(-1, 1)
        return (a.sqrt() * 0.25 / (a * 0.25 + 1 - a)) * x

    spreads = []
    for steps in (2, 3, 5):
        x = None
        for step in sample_loop(exact, d, shape=(4000, 4), sampler=sampler, steps=steps, clip_denoised=False,
                                generator=torch.Generator().manual_seed(0)):
            x = step.x_t
        assert torch.isfinite(x).all(), f"{steps} steps"
        spreads.append(float(x.std()))
    assert 0.15 < spreads[0] < spreads[1] < spreads[2] < 0.5, spreads
