"""What the digit explainers share: the data split, seeded initialisation, batches, figure files.

The data are scikit-learn's bundled handwritten digits (`sklearn.datasets.load_digits`): 1,797
grayscale 8×8 images with pixel values 0–16, labels 0–9, shipped inside scikit-learn (offline).
Pixels are scaled to [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from unclip.errors import UnclipError
from unclip.io import atomic_write

if TYPE_CHECKING:
    import numpy as np
    import torch
    from matplotlib.figure import Figure

# matplotlib's tab10, one colour per digit, shared by the PNG figures and the HTML pages.
DIGIT_COLORS = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
)


def require_explain_deps() -> None:
    """Raise an actionable error when the `explain` extra (scikit-learn, matplotlib) is missing."""
    missing = []
    for module in ("sklearn", "matplotlib"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise UnclipError(
            f"the explainers need {', '.join(missing)}; install them with: pip install 'unclip[explain]'"
        )


@dataclass(frozen=True)
class DigitsSplit:
    """A fixed, stratified train/test split of the 1,797 digits.

    Attributes:
        x_train: [N_train, 64] float32 pixels in [0, 1] (an 8×8 image, row-major).
        y_train: [N_train] int64 labels 0–9.
        x_test: [N_test, 64] float32.
        y_test: [N_test] int64.
        seed: the seed that drew the split.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    seed: int

    @property
    def x_all(self) -> torch.Tensor:
        """[N, 64]: train then test."""
        import torch

        return torch.cat([self.x_train, self.x_test])

    @property
    def y_all(self) -> torch.Tensor:
        """[N]: train then test."""
        import torch

        return torch.cat([self.y_train, self.y_test])


def load_digits_split(*, seed: int = 0, test_fraction: float = 0.25) -> DigitsSplit:
    """Load scikit-learn's digits and split them, stratified by label, with `seed`.

    The same seed always gives the same split (scikit-learn's `train_test_split` with
    `random_state=seed`).
    """
    import numpy as np
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)  # [1797, 64], 0–16 -> [0, 1]
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return DigitsSplit(
        x_train=torch.from_numpy(x_tr), y_train=torch.from_numpy(y_tr),
        x_test=torch.from_numpy(x_te), y_test=torch.from_numpy(y_te), seed=seed,
    )


def init_weights_(module: torch.nn.Module, *, generator: torch.Generator) -> torch.nn.Module:
    """Re-initialise every `nn.Linear` and `nn.Conv2d` in `module` from `generator`.

    Same scheme as PyTorch's default (kaiming-uniform weights, uniform biases); PyTorch draws
    from the global RNG, this from an explicit generator, so a model depends only on its seed.
    """
    import torch

    for layer in module.modules():
        if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
            torch.nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
            if layer.bias is not None:
                fan_in = layer.weight[0].numel()
                bound = 1.0 / math.sqrt(fan_in)
                torch.nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
    return module


def minibatches(n: int, *, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Yield index tensors ([≤batch_size] int64) covering range(n) once, in a seeded random order."""
    import torch

    order = torch.randperm(n, generator=generator)
    yield from order.split(batch_size)


def progress_bar(iterable, *, desc: str, enabled: bool):
    """A tqdm bar over `iterable` on stderr when `enabled` and stderr is a terminal."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True, disable=None)  # None: off unless a TTY


def start_output(out_dir: str | Path) -> Path:
    """`out_dir`, made, without an earlier run's metrics.json: an explainer writes its figures first and
    metrics.json last, so a run stopped part-way leaves no numbers beside figures they do not describe."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").unlink(missing_ok=True)
    return out


def save_figure(fig: Figure, path: str | Path, *, dpi: int = 120) -> Path:
    """Write a matplotlib figure atomically; the format comes from the suffix (.png, .svg)."""
    import matplotlib

    path = Path(path)
    # No dates, no version strings, fixed SVG ids: one seed gives byte-identical files.
    metadata = {"Date": None} if path.suffix == ".svg" else {"Software": None}
    with matplotlib.rc_context({"svg.hashsalt": "unclip"}), atomic_write(path, "wb") as handle:
        fig.savefig(handle, format=path.suffix.lstrip("."), dpi=dpi, metadata=metadata)
    return path


def new_figure(*, width: float, height: float) -> Figure:
    """A matplotlib `Figure` drawn with the Agg canvas, independent of pyplot and its backend."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def tile_images(images: np.ndarray, *, rows: int, cols: int, gap: int = 1) -> np.ndarray:
    """Arrange [rows*cols, H, W] images into one [rows*(H+gap)-gap, cols*(W+gap)-gap] mosaic.

    Gaps are NaN so that a colormap can draw them in a separate colour ("bad" colour).
    """
    import numpy as np

    n, h, w = images.shape
    assert n == rows * cols, f"{n} images do not fill {rows}x{cols}"
    mosaic = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap), np.nan, dtype=np.float32)
    for k in range(n):
        r, c = divmod(k, cols)
        mosaic[r * (h + gap): r * (h + gap) + h, c * (w + gap): c * (w + gap) + w] = images[k]
    return mosaic
