"""The manifold of digits: a VAE with a 2-D latent, whose decoder draws every digit from a point.

The source text's second digression, on scikit-learn's 8×8 digits. A variational autoencoder
(Kingma & Welling 2014) squeezes each image into two numbers (the mean and spread of a 2-D
gaussian), and its decoder learns to turn any point of that plane back into an image. Sweeping
the decoder over a grid of the plane (at the standard normal's quantiles, as in the paper's
Figure 4) draws the manifold: neighbouring points give similar images, and whole regions belong
to one digit. unCLIP's decoder does the same from CLIP image embeddings (DALL-E 2, §2.1).

A classifier (the distance explainer's, trained afresh with the same seed) judges the grid:
how many different digits does the plane hold?

`run_manifold` writes the figures and `metrics.json`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from unclip.explain.digits import (
    DIGIT_COLORS, DigitsSplit, init_weights_, load_digits_split, minibatches, new_figure, progress_bar,
    require_explain_deps, save_figure, start_output, tile_images,
)
from unclip.explain.distance import DistanceConfig, ExplainerReport, classifier_accuracy, train_classifier
from unclip.io import write_json_atomic

log = logging.getLogger(__name__)

LATENT_DIM = 2  # a plane, so that the decoder can be swept and drawn


@dataclass(frozen=True)
class ManifoldConfig:
    """Settings of the manifold explainer. `ManifoldConfig.preset("quick")` is the fast variant."""

    seed: int = 0
    test_fraction: float = 0.25
    hidden: int = 256
    epochs: int = 200
    batch_size: int = 64
    lr: float = 2e-3
    likelihood: str = "bernoulli"  # "bernoulli" (pixels as probabilities) or "gaussian"
    gaussian_sigma: float = 0.1  # the fixed pixel std of the gaussian likelihood
    grid: int = 20  # the manifold figure is grid × grid decoded images
    quantile_low: float = 0.05  # the grid spans the standard normal's quantiles [low, 1 - low]
    classifier_epochs: int = 40  # the judge: the distance explainer's classifier

    @classmethod
    def preset(cls, name: str, *, seed: int = 0) -> ManifoldConfig:
        """'full' (the defaults) or 'quick' (fewer epochs)."""
        if name == "full":
            return cls(seed=seed)
        if name == "quick":
            return cls(seed=seed, epochs=60, classifier_epochs=15)
        raise ValueError(f"unknown preset {name!r}; choose 'full' or 'quick'")

    def __post_init__(self) -> None:
        if self.likelihood not in ("bernoulli", "gaussian"):
            raise ValueError(f"likelihood must be 'bernoulli' or 'gaussian', not {self.likelihood!r}")


class DigitVAE(nn.Module):
    """Encoder x [B, 64] -> (mu, logvar) [B, 2] each; decoder z [B, 2] -> pixel logits [B, 64]."""

    def __init__(self, *, hidden: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden // 2), nn.ReLU(),
                                     nn.Linear(hidden // 2, 2 * LATENT_DIM))
        self.decoder = nn.Sequential(nn.Linear(LATENT_DIM, hidden // 2), nn.ReLU(), nn.Linear(hidden // 2, hidden),
                                     nn.ReLU(), nn.Linear(hidden, 64))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The decoder's mean image [B, 64] in [0, 1]."""
        return torch.sigmoid(self.decoder(z))

    def training_losses(self, x: torch.Tensor, *, config: ManifoldConfig, generator: torch.Generator) -> dict:
        """Negative ELBO per image (nats) = recon + kl, each averaged over the batch x [B, 64]."""
        mu, logvar = self.encode(x)
        z = mu + torch.randn(mu.shape, generator=generator) * (0.5 * logvar).exp()  # reparameterisation
        logits = self.decoder(z)
        if config.likelihood == "bernoulli":
            recon = F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(dim=1)
        else:  # gaussian with fixed sigma, mean squashed into [0, 1]
            s = config.gaussian_sigma
            recon = ((torch.sigmoid(logits) - x).pow(2) / (2 * s * s) + np.log(s * np.sqrt(2 * np.pi))).sum(dim=1)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(dim=1)  # KL(q(z|x) || N(0, I))
        return {"loss": (recon + kl).mean(), "recon": recon.mean(), "kl": kl.mean()}


def train_vae(split: DigitsSplit, *, config: ManifoldConfig, progress: bool = False) -> tuple[DigitVAE, dict]:
    """Train the VAE on `split`'s train images (Adam); return it in eval mode and its test losses."""
    gen = torch.Generator().manual_seed(config.seed + 3)
    vae = init_weights_(DigitVAE(hidden=config.hidden), generator=gen)
    opt = torch.optim.Adam(vae.parameters(), lr=config.lr)
    for _ in progress_bar(range(config.epochs), desc="vae", enabled=progress):
        for idx in minibatches(len(split.x_train), batch_size=config.batch_size, generator=gen):
            loss = vae.training_losses(split.x_train[idx], config=config, generator=gen)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
    vae.eval()
    with torch.no_grad():
        test = vae.training_losses(split.x_test, config=config, generator=torch.Generator().manual_seed(config.seed))
    return vae, {f"test_{k}": round(float(v), 4) for k, v in test.items()}


def latent_grid(*, n: int, quantile_low: float) -> torch.Tensor:
    """The n × n grid of the latent plane at the standard normal's quantiles, [n, n, 2].

    Row r, column c holds (z1, z2) = (q[c], q[n-1-r]): z1 grows to the right, z2 upwards, as
    the figure is drawn. q are the quantiles at n evenly spaced levels in [low, 1 − low].
    """
    levels = torch.linspace(quantile_low, 1 - quantile_low, n, dtype=torch.float64)
    q = torch.distributions.Normal(0.0, 1.0).icdf(levels).float()
    z1, z2 = torch.meshgrid(q, q.flip(0), indexing="xy")  # [n, n] each
    return torch.stack([z1, z2], dim=-1)


def judge_grid(images: torch.Tensor, classifier: nn.Module) -> dict:
    """Classify decoded images [M, 64]; count the digits they show.

    'distinct_classes' counts the argmax classes; 'distinct_confident' only those predicted with
    probability ≥ 0.9 somewhere in the grid.
    """
    with torch.no_grad():
        probs = classifier(images).softmax(dim=1)  # [M, 10]
    conf, pred = probs.max(dim=1)
    return {"pred": pred.numpy(), "confidence": conf.numpy(),
            "distinct_classes": int(len(torch.unique(pred))),
            "distinct_confident": int(len(torch.unique(pred[conf >= 0.9]))),
            "cells_per_class": torch.bincount(pred, minlength=10).tolist(),
            "mean_confidence": round(float(conf.mean()), 4)}


def _grid_ticks(ax, q: np.ndarray, *, tile: int, gap: int = 0) -> None:
    """Label a mosaic's axes with z1 (x) and z2 (y) at every fourth grid column/row, each tick at the
    centre of its tile (`tile` pixels wide, `gap` pixels between tiles, as `tile_images` lays them)."""
    n = len(q)
    idx = np.arange(0, n, 4 if n > 10 else 1)
    centres = idx * (tile + gap) + (tile - 1) / 2
    ax.set_xticks(centres, [f"{q[k]:.2f}" for k in idx], fontsize=7)
    ax.set_yticks(centres, [f"{q[n - 1 - k]:.2f}" for k in idx], fontsize=7)
    ax.set_xlabel("latent z1 (standard-normal quantiles)")
    ax.set_ylabel("latent z2")


def _gray_with_gaps():
    """Ink-on-paper grayscale; NaN (the gaps of `tile_images`) drawn light gray."""
    from matplotlib import colormaps

    return colormaps["gray_r"].with_extremes(bad="#d8d8d8")  # bad: the NaN gaps between tiles


def plot_manifold(images: np.ndarray, q: np.ndarray, path: Path, *, title: str) -> Path:
    """Draw decoded images [n*n, 8, 8] (row-major, top row = largest z2) as one mosaic."""
    n = len(q)
    fig = new_figure(width=7.0, height=7.3)
    ax = fig.add_subplot()
    ax.imshow(tile_images(images, rows=n, cols=n), cmap=_gray_with_gaps(), vmin=0, vmax=1, interpolation="nearest")
    _grid_ticks(ax, q, tile=8, gap=1)
    ax.set_title(title, fontsize=10)
    return save_figure(fig, path, dpi=110)


def plot_grid_classes(judged: dict, q: np.ndarray, path: Path) -> Path:
    """The grid's cells coloured by the digit the classifier sees, the digit written in each."""
    from matplotlib.colors import ListedColormap

    n = len(q)
    pred = judged["pred"].reshape(n, n)
    conf = judged["confidence"].reshape(n, n)
    fig = new_figure(width=7.0, height=7.3)
    ax = fig.add_subplot()
    ax.imshow(pred, cmap=ListedColormap(DIGIT_COLORS), vmin=-0.5, vmax=9.5, alpha=0.85)
    for r in range(n):
        for c in range(n):
            ax.text(c, r, str(pred[r, c]), ha="center", va="center", fontsize=7,
                    color="white" if conf[r, c] >= 0.9 else "black", weight="bold" if conf[r, c] >= 0.9 else None)
    _grid_ticks(ax, q, tile=1)
    ax.set_title(f"What the digit classifier sees in each cell of the manifold: "
                 f"{judged['distinct_classes']} distinct digits\n(white: probability ≥ 0.9, "
                 f"{judged['distinct_confident']} digits; black: less sure)", fontsize=10)
    return save_figure(fig, path, dpi=110)


def plot_reconstructions(originals: np.ndarray, recons: np.ndarray, path: Path, *, labels: np.ndarray) -> Path:
    """Originals [k, 8, 8] in the top row, their reconstructions (decoded latent means) below."""
    k = len(originals)
    fig = new_figure(width=1.0 * k, height=2.6)
    axes = fig.subplots(2, k)
    for c in range(k):
        for r, (img, name) in enumerate(((originals[c], "original"), (recons[c], "reconstruction"))):
            ax = axes[r, c]
            ax.imshow(img, cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
        axes[0, c].set_title(f"digit {labels[c]}", fontsize=8)
    fig.suptitle("Test images (top) and the VAE's reconstructions from their 2-D latent means (bottom)",
                 fontsize=10)
    return save_figure(fig, path)


def plot_latents(mu: np.ndarray, labels: np.ndarray, q: np.ndarray, path: Path) -> Path:
    """Scatter the test images' latent means [N, 2] coloured by digit; dashed: the swept grid."""
    from matplotlib.patches import Rectangle

    fig = new_figure(width=6.6, height=5.6)
    ax = fig.add_subplot()
    for digit in range(10):
        pts = mu[labels == digit]
        ax.scatter(pts[:, 0], pts[:, 1], s=10, color=DIGIT_COLORS[digit], label=str(digit), alpha=0.85, linewidths=0)
    ax.add_patch(Rectangle((q[0], q[0]), q[-1] - q[0], q[-1] - q[0], fill=False, linestyle="--",
                           edgecolor="black", label="manifold grid"))
    ax.set_xlabel("latent z1 (mean of q(z|x))")
    ax.set_ylabel("latent z2")
    ax.set_title(f"Where the VAE puts the {len(mu)} test images in its 2-D latent plane", fontsize=10)
    ax.legend(title="digit", fontsize=8, title_fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5),
              markerscale=2)
    ax.set_aspect("equal", adjustable="datalim")
    return save_figure(fig, path)


def run_manifold(out_dir: str | Path, *, config: ManifoldConfig = ManifoldConfig(),
                 progress: bool = False) -> ExplainerReport:
    """Train the VAE and the judge; write manifold.{png,svg}, manifold_classes.png,
    reconstructions.png, latents.png and metrics.json under `out_dir`."""
    require_explain_deps()
    start = time.perf_counter()
    out = start_output(out_dir)
    split = load_digits_split(seed=config.seed, test_fraction=config.test_fraction)

    vae, losses = train_vae(split, config=config, progress=progress)
    log.info("VAE: test negative ELBO %.2f nats per image", losses["test_loss"])
    judge_config = DistanceConfig(seed=config.seed, test_fraction=config.test_fraction, epochs=config.classifier_epochs)
    classifier, judge_accuracy = train_classifier(split, config=judge_config, progress=progress)

    grid = latent_grid(n=config.grid, quantile_low=config.quantile_low)  # [n, n, 2]
    q = grid[0, :, 0].numpy()
    with torch.no_grad():
        decoded = vae.decode(grid.reshape(-1, LATENT_DIM))  # [n*n, 64], row-major from the top
        mu, _ = vae.encode(split.x_test)  # [N_test, 2]
        recon = vae.decode(mu)
    judged = judge_grid(decoded, classifier)
    recon_accuracy = classifier_accuracy(classifier, recon, split.y_test)  # do reconstructions keep the digit?
    paths: dict[str, Path] = {}
    title = (f"The decoder of a VAE with a 2-D latent, swept over a {config.grid}×{config.grid} grid\n"
             f"of the latent plane (standard-normal quantiles {config.quantile_low:.0%}–{1 - config.quantile_low:.0%})")
    images = decoded.numpy().reshape(-1, 8, 8)
    for suffix in ("png", "svg"):
        paths[f"manifold_{suffix}"] = plot_manifold(images, q, out / f"manifold.{suffix}", title=title)
    paths["manifold_classes_png"] = plot_grid_classes(judged, q, out / "manifold_classes.png")
    labels = split.y_test.numpy()
    first = np.array([np.flatnonzero(labels == d)[0] for d in range(10)])  # the first test image of each digit
    paths["reconstructions_png"] = plot_reconstructions(
        split.x_test.numpy()[first].reshape(-1, 8, 8), recon.numpy()[first].reshape(-1, 8, 8),
        out / "reconstructions.png", labels=labels[first])
    paths["latents_png"] = plot_latents(mu.numpy(), labels, q, out / "latents.png")

    metrics = {
        "explainer": "manifold",
        "config": asdict(config),
        "vae": {**losses, "n_train": len(split.x_train), "n_test": len(split.x_test),
                "test_recon_mse": round(float((recon - split.x_test).pow(2).mean()), 5),
                "test_recon_classified_as_original": round(recon_accuracy, 4)},
        "judge": {"test_accuracy": round(judge_accuracy, 4)},
        "grid": {key: judged[key] for key in ("distinct_classes", "distinct_confident", "cells_per_class",
                                              "mean_confidence")} | {"cells": config.grid ** 2},
    }
    paths["metrics"] = write_json_atomic(out / "metrics.json", metrics)
    seconds = time.perf_counter() - start
    log.info("manifold explainer: %.1f s -> %s", seconds, out)
    return ExplainerReport(metrics=metrics, paths=paths, seconds=seconds)
