"""The judge: a small CNN that reads what a shapes-world image shows (DESIGN §6).

It is trained only on real renders (`unclip.eval.judge_train`), then frozen; GenEval-style scoring
(`unclip.eval.geneval`) turns its reading of a generated image into pass/fail.

The head is one density map per (colour, shape) class, 9 × 8 = 72 maps over the last 8² feature
map, so a colour is always bound to its shape where it is drawn, and what the judge learns at one
place holds at every other. Per class k:

- count [B, 72]: the mass of map k, trained to the number of copies (0–4);
- centre [B, 72, 2]: the map's centre of mass, (cx, cy) in [0, 1], y down (trained where the
  class is present once);
- size logits [B, 72, 2]: small or large, a per-place prediction averaged under map k.

A reading (`read_objects`) takes objects by place first, then by class: the maps summed over
classes show where objects are, each region holds round(its mass) objects (at least one from
OBJECT_FLOOR on), and they go to the classes with most mass there, so a generated shape between
two classes is one object of the nearer class rather than two halves that round to nothing. The
number of objects is the sum of the counts; a single object's 3×3 cell is
`world.cell_of(centre)`; the relation of two objects compares their centres along the axis on
which they lie farther apart. The penultimate features [B, 2C] are the last feature map's mean
and max over places.

Inputs are images [B, 3, S, S] in [-1, 1] of any side; they are resized to `image_size` (64).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from unclip.data.world import COLORS, SHAPES, Scene, cell_of
from unclip.errors import DataError, ModelFormatError

CLASSES: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLORS for s in SHAPES)  # (colour, shape)
CLASS_INDEX = {pair: k for k, pair in enumerate(CLASSES)}
SIZE_NAMES = ("small", "large")
MAX_COUNT = 4
PLACE_THRESHOLD = 0.05  # summed density at a place of the last map above which it belongs to an object
CLASS_FLOOR = 0.03  # a class's mass in a region below which it is haze, not part of an object
# A region's mass from which it holds at least one object. On real renders every region holds 0.5
# or more; generated shapes the judge finds unfamiliar make regions of 0.16-0.5 that are plainly
# objects (each its own component of non-background pixels), which rounding read as nothing.
OBJECT_FLOOR = 0.15
# What `unclip eval` records of how its verdicts were read, so that scores read differently are
# not compared unawares (session 8 read class by class before it, session 9 added the floor).
READING = f"by place, then by class; a region of {OBJECT_FLOOR} mass or more holds an object (since session 9)"
WEIGHTS = "judge.safetensors"


@dataclass(frozen=True, kw_only=True)
class JudgeConfig:
    """The judge's shape; saved in its model directory, so loading needs no flags."""

    image_size: int = 64  # inputs are resized to this side
    channels: tuple[int, ...] = (32, 64, 128)  # one stride-2 stage per entry: 64² → 8²

    @property
    def feature_dim(self) -> int:
        """Width of the penultimate features (mean and max of the last map), the Fréchet distance's space."""
        return 2 * self.channels[-1]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JudgeConfig:
        return cls(**{**data, "channels": tuple(data["channels"])})


def _conv(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """[B, 3, S, S] → [B, 3, size, size]: box filter for whole-number shrinks, else bilinear (antialiased).

    Not `decoder.data.resize` (bicubic): the judge was trained with this filter, and the judge
    should not import the CLIP stage.
    """
    side = images.shape[-1]
    if side == size:
        return images
    if side > size and side % size == 0:
        return F.interpolate(images, size=(size, size), mode="area")
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=side > size)


def to_batch(images) -> torch.Tensor:
    """PIL images (or a tensor [B, 3, S, S] in [-1, 1]) as a float tensor [B, 3, S, S] in [-1, 1]."""
    if isinstance(images, torch.Tensor):
        return images.float()
    from unclip.data.shapes import to_tensor

    sides = {im.size for im in images}
    if len(sides) != 1 or next(iter(sides))[0] != next(iter(sides))[1]:
        raise DataError(f"the judge reads square images of one size per batch; got sizes {sorted(sides)}")
    return torch.stack([to_tensor(im) for im in images])


class Judge(nn.Module):
    """CNN: image [B, 3, S, S] in [-1, 1] → per-class density maps → count, size, centre (module docstring)."""

    def __init__(self, config: JudgeConfig):
        super().__init__()
        self.config = config
        layers, c_in = [], 3
        for c in config.channels:  # a 3×3 conv at this side, then a stride-2 conv halving it
            layers += _conv(c_in, c, 1) + _conv(c, c, 2)
            c_in = c
        layers += _conv(c_in, c_in, 1)
        self.trunk = nn.Sequential(*layers)
        self.head = nn.Conv2d(c_in, len(CLASSES) * (1 + len(SIZE_NAMES)), 1)  # per place: density, size logits
        with torch.no_grad():  # start nearly empty: softplus(-6) ≈ 0.0025 per place
            self.head.bias[:len(CLASSES)].fill_(-6.0)

    @classmethod
    def from_config(cls, config: JudgeConfig) -> Judge:
        return cls(config)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """count [B, 72], size logits [B, 72, 2], centre [B, 72, 2] in [0, 1], density [B, 72, h, w],
        features [B, 2C]."""
        x = resize(images, self.config.image_size).to(memory_format=torch.channels_last)
        h = self.trunk(x)  # [B, C, h, w]
        features = torch.cat([h.mean((2, 3)), h.amax((2, 3))], dim=1).float()  # [B, 2C]
        out = self.head(h).float()
        k, (b, _, rows, cols) = len(CLASSES), out.shape
        density = F.softplus(out[:, :k])  # [B, 72, h, w]
        count = density.sum((2, 3))  # [B, 72]
        weights = density / (count[..., None, None] + 1e-6)  # each class's map as a distribution over places
        size = (out[:, k:].view(b, k, len(SIZE_NAMES), rows, cols) * weights[:, :, None]).sum((3, 4))  # [B, 72, 2]
        xs = (torch.arange(cols, device=out.device) + 0.5) / cols  # place centres in [0, 1]
        ys = (torch.arange(rows, device=out.device) + 0.5) / rows
        centre = torch.stack([(weights.sum(2) * xs).sum(-1), (weights.sum(3) * ys).sum(-1)], dim=-1)  # [B, 72, 2]
        return {"count": count, "size": size, "centre": centre, "density": density, "features": features}

    @torch.no_grad()
    def read(self, images, *, batch_size: int = 64) -> tuple[list[dict], torch.Tensor]:
        """What each image shows, and the penultimate features [N, F].

        A reading is {"objects": [{"colour", "shape", "size", "cx", "cy", "cell"}, ...]}, one entry per
        object (a class counted n times gives n entries; copies carry no centre, since the judge
        reads one centre per class).
        """
        x = to_batch(images)
        was_training = self.training
        self.eval()
        readings, features = [], []
        device = next(self.parameters()).device
        for start in range(0, len(x), batch_size):
            out = self(x[start:start + batch_size].to(device))
            readings += decode(out)
            features.append(out["features"].cpu())
        self.train(was_training)
        return readings, torch.cat(features) if features else torch.zeros(0, self.config.feature_dim)


def read_objects(density: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's density maps [72, h, w] → (copies of each class [72], each class's centre [72, 2]).

    Objects are read by place first, then by class. The maps summed over the classes show where
    objects are: each 8-connected region of places whose summed density exceeds PLACE_THRESHOLD
    holds round(its mass) objects (at most MAX_COUNT, and at least one once its mass reaches
    OBJECT_FLOOR), shared out among the classes in proportion to their mass there, largest
    remainders first; a class with less than CLASS_FLOOR there counts for nothing unless no class
    reaches it. On a crisp render each object's mass sits in its own class and this is every
    class's mass rounded; on a generated shape that lies between two classes (a roundish hexagon:
    0.5 circle, 0.4 hexagon) rounding class by class would read no object at all, where this reads
    one, of the class it is most like (docs/eval.md).

    A class read once in a region of one object has that region's centre of mass as its centre;
    otherwise its own map's centre of mass within its region. Classes never read keep centre 0.
    """
    from scipy import ndimage

    k, rows, cols = density.shape
    counts = torch.zeros(k, dtype=torch.long)
    centres = torch.zeros(k, 2)
    d = density.detach().float().cpu()
    total = d.sum(0)
    labels, regions = ndimage.label((total > PLACE_THRESHOLD).numpy(), structure=np.ones((3, 3)))
    xs = (torch.arange(cols) + 0.5) / cols
    ys = (torch.arange(rows) + 0.5) / rows
    for r in range(1, regions + 1):
        inside = torch.from_numpy(labels == r)
        raw = (d * inside).sum((1, 2))  # [72]
        if float(raw.sum()) < OBJECT_FLOOR:
            continue
        mass = torch.where(raw >= CLASS_FLOOR, raw, torch.zeros(()))  # a class's faint haze is not an object
        if float(mass.sum()) == 0:
            mass = raw
        n = min(max(int(torch.round(mass.sum())), 1), MAX_COUNT)
        quota = mass * (n / float(mass.sum()))
        share = quota.floor().long()
        for j in torch.argsort(quota - share, descending=True)[:n - int(share.sum())].tolist():
            share[j] += 1
        for j in share.nonzero().flatten().tolist():
            weights = (total if n == 1 else d[j]) * inside
            weights = weights / weights.sum().clamp_min(1e-9)
            centres[j] = torch.stack([(weights.sum(0) * xs).sum(), (weights.sum(1) * ys).sum()])
        counts += share
    return counts.clamp(max=MAX_COUNT), centres


def decode(out: dict[str, torch.Tensor]) -> list[dict]:
    """Judge outputs → one reading per image (see `Judge.read` and `read_objects`)."""
    sizes = out["size"].argmax(-1).cpu()  # [B, 72]
    readings = []
    for b in range(len(sizes)):
        counts, centres = read_objects(out["density"][b])
        objects = []
        for k in counts.nonzero().flatten().tolist():
            n = int(counts[k])
            colour, shape = CLASSES[k]
            cx, cy = (float(v) for v in centres[k])
            for _ in range(n):
                obj = {"colour": colour, "shape": shape, "size": SIZE_NAMES[int(sizes[b, k])]}
                if n == 1:
                    obj |= {"cx": round(cx, 4), "cy": round(cy, 4), "cell": cell_of(cx, cy)}
                objects.append(obj)
        readings.append({"objects": objects})
    return readings


def relation_of(a: dict, b: dict) -> str:
    """Where object a lies relative to b ("left of", "right of", "above", "below"), from their centres."""
    dx, dy = a["cx"] - b["cx"], a["cy"] - b["cy"]
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def scene_targets(scene: Scene) -> dict[str, torch.Tensor]:
    """Training targets of one scene: count [72] long, size [72] long (-100 = absent), centre [72, 2],
    centre_mask [72] (1 where the class appears exactly once)."""
    count = torch.zeros(len(CLASSES), dtype=torch.long)
    size = torch.full((len(CLASSES),), -100, dtype=torch.long)
    centre = torch.zeros(len(CLASSES), 2)
    for obj in scene.objects:
        k = CLASS_INDEX[(obj.colour, obj.shape)]
        count[k] += 1
        size[k] = SIZE_NAMES.index(obj.size)
        centre[k] = torch.tensor([obj.cx, obj.cy])
    return {"count": count, "size": size, "centre": centre, "centre_mask": (count == 1).float()}


def losses(out: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Squared error of each class's mass against its count (summed over classes), cross-entropy on
    sizes, L1 on single objects' centres; "loss" is their sum."""
    count = (out["count"] - target["count"].float()).square().sum(1).mean()
    size = F.cross_entropy(out["size"].flatten(0, 1), target["size"].flatten(), ignore_index=-100)
    mask = target["centre_mask"]  # [B, 72]
    centre = ((out["centre"] - target["centre"]).abs().sum(-1) * mask).sum() / mask.sum().clamp(min=1)
    return {"loss": count + size + 10.0 * centre, "count": count, "size": size, "centre": centre}


# --- model directory ---------------------------------------------------------------------------


def save_judge(judge: Judge, directory: str | Path, *, accuracy: dict, provenance: dict) -> Path:
    """Write the judge as a model directory: `judge.safetensors` (fp16) + `unclip.json` holding its
    config, its measured accuracy per split and attribute (`evaluation`) and how it was trained."""
    from unclip.modeldir import Manifest, save_model_dir, save_weights

    state = {k: (v.half() if v.is_floating_point() else v) for k, v in judge.state_dict().items()}
    manifest = Manifest(config=asdict(judge.config), evaluation={"judge_accuracy": accuracy},
                        provenance=provenance, extra={"kind": "judge", "classes": [list(c) for c in CLASSES]})
    return save_model_dir(directory, manifest, lambda tmp: save_weights(tmp / WEIGHTS, state))


def load_judge(directory: str | Path) -> tuple[Judge, dict]:
    """The frozen judge of a directory written by `save_judge`, and its recorded accuracy."""
    from unclip.modeldir import load_weights, read_manifest, verify_files

    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest.extra.get("kind") != "judge":
        raise ModelFormatError(f"{directory} is not a judge directory (train one with `unclip eval judge --out DIR`)")
    verify_files(directory, manifest)
    judge = Judge(JudgeConfig.from_dict(manifest.config))
    state = load_weights(directory / WEIGHTS)
    expected = judge.state_dict()
    if set(state) != set(expected) or any(state[k].shape != v.shape for k, v in expected.items()):
        raise ModelFormatError(f"{directory / WEIGHTS} does not match the judge config in {directory / 'unclip.json'}")
    judge.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)
    judge.eval().requires_grad_(False)
    return judge, manifest.evaluation.get("judge_accuracy", {})


def default_judge_dir() -> Path:
    """Where the shipped judge lives: `unclip/eval/judge/` inside the package."""
    return Path(__file__).resolve().parent / "judge"
