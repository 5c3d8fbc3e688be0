"""Learning to compare: a siamese network that judges "same digit?" for digits it never saw.

One encoder is applied to both images of a pair (a siamese network, Bromley et al. 1993) and
trained with the contrastive loss of Hadsell, Chopra & LeCun (2006) on pairs of digits 0–4 only.
It is then asked about pairs of digits 5–9: a pair is called "same" when the cosine similarity
of the two codes is above a threshold (or, separately, when their euclidean distance is below
one), with each threshold chosen on validation pairs of digits 0–4.

The encoder is a small CNN (upsampled 16×16 input) ending in a projection head, and the loss is
applied to the head's output. As in SimCLR (Chen et al. 2020, §4.2), the codes compared are the
representation *before* the head: the head learns to tell the five training digits apart and
little else, while the convolutional representation keeps what unseen digits need. Both are
measured, next to raw pixels and the same network untrained, so the gain is visible.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from unclip.explain.digits import DigitsSplit, init_weights_, minibatches, progress_bar


@dataclass(frozen=True)
class SiameseConfig:
    """Settings of the siamese experiment (the seed comes from the caller)."""

    train_digits: tuple[int, ...] = (0, 1, 2, 3, 4)
    unseen_digits: tuple[int, ...] = (5, 6, 7, 8, 9)
    upsample: int = 2  # 8×8 -> 16×16 (bilinear) before the convolutions
    channels: int = 16
    head_hidden: int = 128
    embed_dim: int = 32
    margin: float = 1.0
    epochs: int = 10
    batch_size: int = 64
    lr: float = 2e-3
    n_eval_pairs: int = 4000  # validation pairs (train digits) and unseen pairs, each balanced


class SiameseEncoder(nn.Module):
    """x [B, 64] -> `representation` [B, 2C·(2u)²] (conv features) -> `forward` [B, embed_dim] (head).

    C = channels, u = upsample; with the defaults the representation has 32·4·4 = 512 dims.
    """

    def __init__(self, *, config: SiameseConfig) -> None:
        super().__init__()
        c, u = config.channels, config.upsample
        self.upsample = u
        self.conv = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
            nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
        )
        side = 8 * u // 4
        self.head = nn.Sequential(
            nn.Linear(2 * c * side * side, config.head_hidden), nn.ReLU(),
            nn.Linear(config.head_hidden, config.embed_dim),
        )

    def representation(self, x: torch.Tensor) -> torch.Tensor:
        img = x.view(-1, 1, 8, 8)
        if self.upsample > 1:
            img = F.interpolate(img, scale_factor=self.upsample, mode="bilinear", align_corners=False)
        return self.conv(img).flatten(1)  # [B, 2C, 2u, 2u] -> [B, 2C·(2u)²]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.representation(x))


def sample_pairs(
    labels: torch.Tensor, *, n_pairs: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw `n_pairs` index pairs (i, j) into `labels` [N]: the first half same-label, the rest not.

    Returns i [P], j [P] (int64, i != j) and same [P] (bool). The anchor i is uniform over the
    samples (over those with a classmate, for same pairs); j is uniform over the anchor's other
    classmates (same) or over all samples of other classes (different).
    """
    order = torch.argsort(labels, stable=True)  # sample indices grouped by class
    counts = torch.bincount(labels)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))  # position of each sample inside `order`
    n_same = (n_pairs + 1) // 2
    paired = torch.nonzero(counts[labels] >= 2).squeeze(1)
    if (n_same and len(paired) == 0) or int((counts > 0).sum()) < 2:
        raise ValueError("pairs need two classes and a class with at least two samples")

    i_same = paired[torch.randint(len(paired), (n_same,), generator=generator)]
    start, count = starts[labels[i_same]], counts[labels[i_same]]
    # Same: move 1..count-1 places forward, cyclically, inside the anchor's class block.
    step = (torch.rand(n_same, generator=generator) * (count - 1)).long() + 1
    j_same = order[start + (rank[i_same] - start + step) % count]

    i_diff = torch.randint(len(labels), (n_pairs - n_same,), generator=generator)
    start, count = starts[labels[i_diff]], counts[labels[i_diff]]
    # Different: a uniform position among the samples outside the anchor's class block.
    r = (torch.rand(n_pairs - n_same, generator=generator) * (len(labels) - count)).long()
    j_diff = order[torch.where(r < start, r, r + count)]
    same = torch.arange(n_pairs) < n_same
    return torch.cat([i_same, i_diff]), torch.cat([j_same, j_diff]), same


def contrastive_loss(a: torch.Tensor, b: torch.Tensor, same: torch.Tensor, *, margin: float) -> torch.Tensor:
    """Hadsell et al. (2006): pull same pairs together, push different pairs `margin` apart.

    a, b: [B, D] codes of the two images; same: [B] bool. The mean over the batch of d² (same)
    or max(0, margin − d)² (different), d being the euclidean distance.
    """
    d = (a - b).pow(2).sum(dim=1).add(1e-9).sqrt()
    return torch.where(same, d.pow(2), F.relu(margin - d).pow(2)).mean()


def build_encoder(*, config: SiameseConfig, seed: int) -> SiameseEncoder:
    """The untrained encoder, its weights drawn from `seed` alone."""
    gen = torch.Generator().manual_seed(seed)
    return init_weights_(SiameseEncoder(config=config), generator=gen)


def train_siamese(
    x: torch.Tensor, y: torch.Tensor, *, config: SiameseConfig, seed: int, progress: bool = False
) -> SiameseEncoder:
    """Train the encoder on fresh balanced pairs of `x` [N, 64] / `y` [N] every epoch (2N pairs)."""
    gen = torch.Generator().manual_seed(seed + 1)
    encoder = build_encoder(config=config, seed=seed)
    opt = torch.optim.Adam(encoder.parameters(), lr=config.lr)
    for _ in progress_bar(range(config.epochs), desc="siamese", enabled=progress):
        i, j, same = sample_pairs(y, n_pairs=2 * len(y), generator=gen)
        for idx in minibatches(len(i), batch_size=config.batch_size, generator=gen):
            loss = contrastive_loss(encoder(x[i[idx]]), encoder(x[j[idx]]), same[idx], margin=config.margin)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return encoder.eval()


def best_threshold(scores: torch.Tensor, same: torch.Tensor) -> tuple[float, float]:
    """The t maximising the accuracy of "same iff score ≥ t" on scores [P], same [P] (bool).

    Returns (t, accuracy); t lies midway between two neighbouring sorted scores.
    """
    s, order = torch.sort(scores, descending=True)
    hit = same[order].double()
    zero = torch.zeros(1, dtype=torch.float64)
    # Calling the top k "same": correct = same pairs among them + different pairs below them.
    correct = torch.cat([zero, hit.cumsum(0)]) + (1 - hit).sum() - torch.cat([zero, (1 - hit).cumsum(0)])
    k = int(torch.argmax(correct))
    edges = torch.cat([s[:1] + 1, s, s[-1:] - 1])
    return float((edges[k] + edges[k + 1]) / 2), float(correct[k] / len(s))


@dataclass(frozen=True)
class Verification:
    """One space's "same digit?" results for one score ('cosine' or 'euclidean').

    `scores` [P] and `same` [P] are the unseen pairs' values, kept for the histogram figure.
    """

    score: str
    threshold: float
    val_accuracy: float
    unseen_accuracy: float
    scores: np.ndarray
    same: np.ndarray

    def summary(self) -> dict[str, float]:
        return {"threshold": round(self.threshold, 4), "val_accuracy": round(self.val_accuracy, 4),
                "unseen_accuracy": round(self.unseen_accuracy, 4)}


def verify(
    embed: Callable[[torch.Tensor], torch.Tensor],
    *,
    x_val: torch.Tensor, y_val: torch.Tensor, x_unseen: torch.Tensor, y_unseen: torch.Tensor,
    n_pairs: int, seed: int,
) -> dict[str, Verification]:
    """Decide "same digit?" by thresholding the similarity of `embed(x)` codes [N, D].

    Thresholds are chosen on `n_pairs` balanced pairs of (x_val, y_val) and applied unchanged
    to `n_pairs` balanced pairs of (x_unseen, y_unseen). The pairs depend only on `seed`, so
    every space is judged on the same pairs. Returns {'cosine': ..., 'euclidean': ...}.
    """
    gen = torch.Generator().manual_seed(seed + 2)
    pairs = {"val": sample_pairs(y_val, n_pairs=n_pairs, generator=gen),
             "unseen": sample_pairs(y_unseen, n_pairs=n_pairs, generator=gen)}
    with torch.no_grad():
        codes = {"val": embed(x_val), "unseen": embed(x_unseen)}
    scores = {}
    for part, (i, j, _) in pairs.items():
        a, b = codes[part][i], codes[part][j]
        scores[part] = {"cosine": F.cosine_similarity(a, b, dim=1), "euclidean": (a - b).norm(dim=1)}
    result = {}
    for name, sign in (("cosine", 1.0), ("euclidean", -1.0)):  # "same" = high cosine, low distance
        t, val_acc = best_threshold(sign * scores["val"][name], pairs["val"][2])
        same = pairs["unseen"][2]
        acc = float(((sign * scores["unseen"][name] >= t) == same).double().mean())
        result[name] = Verification(score=name, threshold=sign * t, val_accuracy=val_acc, unseen_accuracy=acc,
                                    scores=scores["unseen"][name].numpy(), same=same.numpy())
    return result


def siamese_experiment(
    split: DigitsSplit, *, config: SiameseConfig, seed: int, progress: bool = False
) -> tuple[dict[str, dict[str, Verification]], dict]:
    """Train on `split`'s train images of the train digits; judge unseen-digit pairs in four spaces.

    Validation pairs come from the test images of the train digits; unseen pairs from all
    images (train and test) of the unseen digits, which training never touches. Spaces:
    'learned' (representation before the head), 'learned_head', 'untrained' (same network,
    initial weights) and 'pixels'. Returns ({space: {score: Verification}}, counts).
    """
    seen = torch.tensor(config.train_digits)
    unseen = torch.tensor(config.unseen_digits)
    tr = torch.isin(split.y_train, seen)
    x_all, y_all = split.x_all, split.y_all
    data = dict(x_val=split.x_test[torch.isin(split.y_test, seen)], y_val=split.y_test[torch.isin(split.y_test, seen)],
                x_unseen=x_all[torch.isin(y_all, unseen)], y_unseen=y_all[torch.isin(y_all, unseen)])
    encoder = train_siamese(split.x_train[tr], split.y_train[tr], config=config, seed=seed, progress=progress)
    untrained = build_encoder(config=config, seed=seed).eval()
    spaces = {"learned": encoder.representation, "learned_head": encoder,
              "untrained": untrained.representation, "pixels": lambda x: x}
    results = {name: verify(f, **data, n_pairs=config.n_eval_pairs, seed=seed) for name, f in spaces.items()}
    counts = {"n_train_images": int(tr.sum()), "n_val_images": len(data["y_val"]),
              "n_unseen_images": len(data["y_unseen"]), "n_val_pairs": config.n_eval_pairs,
              "n_unseen_pairs": config.n_eval_pairs}
    return results, counts
