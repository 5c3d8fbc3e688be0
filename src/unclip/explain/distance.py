"""Distance learning on handwritten digits: what a network's hidden layer knows, and how to compare.

The source text's first digression, as two experiments on scikit-learn's 8×8 digits:

1. A small MLP classifier. Its last hidden layer, drawn in 2-D with t-SNE, puts images of the same
   digit together: the network has learned a space where distance means "looks alike".
2. "Learning to compare" (`unclip.explain.siamese`): a siamese network trained on pairs of digits
   0–4 decides "same digit?" for digits 5–9 it never saw, by a similarity threshold. CLIP does the
   same with an image and a caption.

`run_distance` runs both and writes the figures, two interactive HTML pages and `metrics.json`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from unclip.explain.digits import (
    DIGIT_COLORS, DigitsSplit, init_weights_, load_digits_split, minibatches, new_figure,
    progress_bar, require_explain_deps, save_figure, start_output,
)
from unclip.explain.siamese import SiameseConfig, Verification, siamese_experiment
from unclip.explain.tsne_html import write_scatter_html
from unclip.io import write_json_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistanceConfig:
    """Settings of the distance explainer. `DistanceConfig.preset("quick")` is the fast variant."""

    seed: int = 0
    test_fraction: float = 0.25
    # Classifier: 64 -> hidden -> feature_dim (the "last hidden layer", drawn by t-SNE) -> 10.
    hidden: int = 128
    feature_dim: int = 32
    epochs: int = 40
    batch_size: int = 64
    lr: float = 2e-3
    # t-SNE; tsne_max_points subsamples each map (None: every image).
    tsne_perplexity: float = 30.0
    tsne_max_iter: int = 1000
    tsne_max_points: int | None = None
    siamese: SiameseConfig = field(default_factory=SiameseConfig)

    @classmethod
    def preset(cls, name: str, *, seed: int = 0) -> DistanceConfig:
        """'full' (the defaults) or 'quick' (fewer epochs, smaller and shorter t-SNE maps)."""
        if name == "full":
            return cls(seed=seed)
        if name == "quick":
            # t-SNE's first 250 iterations are its early exaggeration: a map needs more than that to settle
            return cls(seed=seed, epochs=15, tsne_max_iter=500, tsne_max_points=400,
                       siamese=replace(SiameseConfig(), epochs=2, n_eval_pairs=1000))
        raise ValueError(f"unknown preset {name!r}; choose 'full' or 'quick'")


class DigitClassifier(nn.Module):
    """x [B, 64] -> `features` [B, feature_dim] (last hidden layer, after ReLU) -> logits [B, 10]."""

    def __init__(self, *, hidden: int, feature_dim: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def train_classifier(
    split: DigitsSplit, *, config: DistanceConfig, progress: bool = False
) -> tuple[DigitClassifier, float]:
    """Train the digit MLP on `split`'s train part (Adam, cross-entropy); return it in eval mode
    with its accuracy on the test part."""
    gen = torch.Generator().manual_seed(config.seed)
    model = init_weights_(DigitClassifier(hidden=config.hidden, feature_dim=config.feature_dim), generator=gen)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    for _ in progress_bar(range(config.epochs), desc="classifier", enabled=progress):
        for idx in minibatches(len(split.x_train), batch_size=config.batch_size, generator=gen):
            loss = nn.functional.cross_entropy(model(split.x_train[idx]), split.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return model, classifier_accuracy(model, split.x_test, split.y_test)


def classifier_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of images x [N, 64] whose argmax logit equals the label y [N]."""
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).double().mean())


def tsne_map(features: np.ndarray, *, seed: int, perplexity: float, max_iter: int) -> tuple[np.ndarray, float]:
    """t-SNE of features [N, F] to points [N, 2] (PCA init, seeded); also the final KL divergence."""
    from sklearn.manifold import TSNE

    if max_iter <= 250:  # scikit-learn would stop inside early exaggeration and report the float maximum as the KL
        raise ValueError(f"t-SNE max_iter {max_iter}: give more than 250 (its early-exaggeration phase)")
    tsne = TSNE(n_components=2, perplexity=min(perplexity, (len(features) - 1) / 3), max_iter=max_iter,
                init="pca", learning_rate="auto", random_state=seed, n_jobs=1)
    return tsne.fit_transform(features), float(tsne.kl_divergence_)


def neighbour_agreement(points: np.ndarray, labels: np.ndarray, *, k: int = 5) -> float:
    """Mean fraction of each point's `k` nearest neighbours in points [N, D] that share its label."""
    from sklearn.neighbors import NearestNeighbors

    _, idx = NearestNeighbors(n_neighbors=k + 1).fit(points).kneighbors(points)
    return float((labels[idx[:, 1:]] == labels[:, None]).mean())  # idx[:, 0] is the point itself


def plot_tsne(points: np.ndarray, labels: np.ndarray, path: Path, *, title: str, subtitle: str) -> Path:
    """Scatter a t-SNE map [N, 2] coloured by digit, with a legend and each digit at its class median."""
    from matplotlib import patheffects

    fig = new_figure(width=6.6, height=5.6)
    ax = fig.add_subplot()
    for digit in np.unique(labels):
        pts = points[labels == digit]
        ax.scatter(pts[:, 0], pts[:, 1], s=9, color=DIGIT_COLORS[digit], alpha=0.8, linewidths=0,
                   label=f"{digit} ({len(pts)})")
        cx, cy = np.median(pts, axis=0)
        ax.text(cx, cy, str(digit), fontsize=15, weight="bold", ha="center", va="center", color=DIGIT_COLORS[digit],
                path_effects=[patheffects.withStroke(linewidth=3, foreground="white")])
    ax.set_title(f"{title}\n{subtitle}", fontsize=9.5)
    ax.set_xlabel("t-SNE 1")
    ax.set_ylabel("t-SNE 2")
    ax.legend(title="digit (images)", fontsize=8, title_fontsize=8, loc="center left",
              bbox_to_anchor=(1.0, 0.5), markerscale=2)
    return save_figure(fig, path)


SPACE_NAMES = {"pixels": "raw pixels", "untrained": "untrained network",
               "learned_head": "trained: head output", "learned": "trained: representation"}


def plot_pairs(results: dict[str, dict[str, Verification]], path: Path, *, config: SiameseConfig) -> Path:
    """Left, middle: cosine similarity / euclidean distance of unseen same vs different pairs in the
    learned representation, with the threshold chosen on the train digits. Right: unseen-pair
    accuracy of every space."""
    fig = new_figure(width=13.0, height=3.9)
    axes = fig.subplots(1, 3, width_ratios=[1, 1, 1.1])
    for ax, name, xlabel in ((axes[0], "cosine", "cosine similarity (higher = more alike)"),
                             (axes[1], "euclidean", "euclidean distance (lower = more alike)")):
        r = results["learned"][name]
        bins = np.linspace(r.scores.min(), r.scores.max(), 40)
        ax.hist(r.scores[r.same], bins=bins, alpha=0.6, color="#2ca02c", label="same digit")
        ax.hist(r.scores[~r.same], bins=bins, alpha=0.6, color="#d62728", label="different digits")
        ax.axvline(r.threshold, color="black", linestyle="--", label=f"threshold from digits 0–4: {r.threshold:.3g}")
        ax.set_title(f"{name}: {r.unseen_accuracy:.1%} of unseen pairs right", fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("pairs")
        ax.set_ylim(top=ax.get_ylim()[1] * 1.4)  # headroom for the legend
        ax.legend(fontsize=8, loc="upper left")
    ax = axes[2]
    spaces = list(SPACE_NAMES)
    ypos = np.arange(len(spaces))
    for k, (name, color) in enumerate((("cosine", "#1f77b4"), ("euclidean", "#ff7f0e"))):
        acc = [results[s][name].unseen_accuracy for s in spaces]
        bars = ax.barh(ypos + (k - 0.5) * 0.38, acc, height=0.38, color=color, label=name)
        ax.bar_label(bars, labels=[f"{a:.3f}" for a in acc], fontsize=7, padding=2)
    ax.axvline(0.5, color="gray", linestyle=":", label="chance")
    ax.set_yticks(ypos, [SPACE_NAMES[s] for s in spaces], fontsize=8)
    ax.set_xlim(0.4, 1.0)
    ax.set_xlabel("accuracy on unseen pairs (digits 5–9)")
    ax.set_title("which space tells unseen digits apart?", fontsize=10)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=3)
    digits = lambda ds: f"{ds[0]}–{ds[-1]}"  # noqa: E731
    fig.suptitle(f"Siamese network trained on pairs of digits {digits(config.train_digits)}, judging "
                 f"{config.n_eval_pairs} balanced pairs of digits {digits(config.unseen_digits)} it never saw",
                 fontsize=10)
    return save_figure(fig, path)


@dataclass(frozen=True)
class ExplainerReport:
    """What an explainer measured (`metrics`, as written to metrics.json) and the files it wrote."""

    metrics: dict
    paths: dict[str, Path]
    seconds: float


def run_distance(out_dir: str | Path, *, config: DistanceConfig = DistanceConfig(),
                 progress: bool = False) -> ExplainerReport:
    """Run both experiments; write tsne_01.{png,html}, tsne_all.{png,html}, pairs_unseen.png and
    metrics.json under `out_dir`. The same config (seed included) gives the same metrics."""
    require_explain_deps()
    start = time.perf_counter()
    out = start_output(out_dir)
    split = load_digits_split(seed=config.seed, test_fraction=config.test_fraction)
    paths: dict[str, Path] = {}

    classifier, accuracy = train_classifier(split, config=config, progress=progress)
    log.info("digit classifier: test accuracy %.4f", accuracy)
    with torch.no_grad():
        feats = classifier.features(split.x_all).numpy()  # [N, feature_dim]
    labels, images = split.y_all.numpy(), split.x_all.numpy().reshape(-1, 8, 8)
    n_train = len(split.x_train)
    rng = np.random.default_rng(config.seed)
    tsne = {}
    for name, digits in (("01", (0, 1)), ("all", tuple(range(10)))):
        idx = np.flatnonzero(np.isin(labels, digits))
        if config.tsne_max_points is not None and len(idx) > config.tsne_max_points:
            idx = np.sort(rng.choice(idx, config.tsne_max_points, replace=False))
        points, kl = tsne_map(feats[idx], seed=config.seed, perplexity=config.tsne_perplexity,
                              max_iter=config.tsne_max_iter)
        agree = neighbour_agreement(points, labels[idx])
        tsne[name] = {"n_points": len(idx), "kl_divergence": round(kl, 4), "knn5_label_agreement": round(agree, 4)}
        which = "digits 0 and 1" if name == "01" else "all ten digits"
        title = f"t-SNE of the digit classifier's last hidden layer ({config.feature_dim}-d): {which}"
        subtitle = f"{len(idx)} images; a point's 5 nearest neighbours share its digit {agree:.1%} of the time"
        paths[f"tsne_{name}_png"] = plot_tsne(points, labels[idx], out / f"tsne_{name}.png",
                                              title=title, subtitle=subtitle)
        paths[f"tsne_{name}_html"] = write_scatter_html(
            out / f"tsne_{name}.html", points=points, labels=labels[idx], images=images[idx],
            class_names=[str(d) for d in range(10)], title=title,
            subtitle=subtitle + ". Hover or tap a point to see its image; click a legend entry to hide that digit.",
            notes=["train image" if k < n_train else "test image" for k in idx])

    results, counts = siamese_experiment(split, config=config.siamese, seed=config.seed, progress=progress)
    paths["pairs_unseen_png"] = plot_pairs(results, out / "pairs_unseen.png", config=config.siamese)
    metrics = {
        "explainer": "distance",
        "config": asdict(config),
        "classifier": {"test_accuracy": round(accuracy, 4), "n_train": n_train, "n_test": len(split.x_test)},
        "tsne": tsne,
        "siamese": {"train_digits": list(config.siamese.train_digits),
                    "unseen_digits": list(config.siamese.unseen_digits), **counts,
                    **{space: {score: v.summary() for score, v in r.items()} for space, r in results.items()}},
    }
    paths["metrics"] = write_json_atomic(out / "metrics.json", metrics)
    seconds = time.perf_counter() - start
    log.info("distance explainer: %.1f s -> %s", seconds, out)
    return ExplainerReport(metrics=metrics, paths=paths, seconds=seconds)
