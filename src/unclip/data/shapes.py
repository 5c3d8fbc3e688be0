"""Shapes world as torch data sets, and the tensor ↔ image conversions every stage uses.

Items are dicts: image float32 [3, H, W] in [-1, 1], caption str, lang str, scene str (compact
JSON, so the default collate works), key str. Sample i is a pure function of (split, i, seed),
so per-worker seeding is correct by construction: workers never touch a random state.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from unclip.data.render import render
from unclip.data.world import KIND_WEIGHTS, SPLIT_LENGTHS, SPLITS, sample
from unclip.errors import DataError

DEFAULT_TRAIN_LENGTH = 100_000  # samples 0..99,999: a map-style view of the endless train split


INTEGER_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16- and 32-bit integer pixels


def has_alpha(image: Image.Image) -> bool:
    """Whether `image` has transparency: an alpha channel, or a transparent palette or colour key."""
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB, as it looks.

    16-bit images are scaled to 8 bits (Pillow's own conversion clips them, so a 16-bit PNG turned
    white), as are 32-bit integer ones with values above 255; 32-bit float ones (mode F) whose
    values lie in [0, 1] are scaled to 0 … 255 (Pillow's conversion read them as black), and NaN or
    infinite values in them are a DataError; transparent pixels are laid over white instead of
    showing whatever colour they hide.
    """
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float32)
        if not np.isfinite(array).all():
            raise DataError("a floating-point (mode F) image holds NaN or infinite values; fix or drop the image")
        scale = 255.0 if array.size and array.min() >= 0 and array.max() <= 1 else 1.0
        image = Image.fromarray(np.clip((array * scale).round(), 0, 255).astype(np.uint8), "L")
    if image.mode in INTEGER_MODES:
        array = np.asarray(image, dtype=np.float32)  # exact for 16-bit values; half float64's memory
        if image.mode != "I" or array.max() > 255:
            array = array / 257.0
        image = Image.fromarray(np.clip(array.round(), 0, 255).astype(np.uint8), "L")
    if has_alpha(image):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image (any mode, `to_rgb`) → float32 [3, H, W] in [-1, 1]."""
    array = np.asarray(to_rgb(image), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def to_pil(tensor: torch.Tensor) -> Image.Image:
    """float [3, H, W] in [-1, 1] → PIL RGB image (values outside are clipped)."""
    array = ((tensor.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte()
    return Image.fromarray(array.permute(1, 2, 0).numpy(), "RGB")


def _item(split: str, index: int, *, size: int, lang: str, seed: int, scenes: tuple[float, ...] = KIND_WEIGHTS) -> dict:
    s = sample(split, index, seed=seed, lang=lang, scenes=scenes)
    return {"image": to_tensor(render(s.scene, size)), "caption": s.caption, "lang": s.lang,
            "scene": json.dumps(s.scene.to_dict(), ensure_ascii=False, separators=(",", ":")), "key": s.key}


def _check(split: str, size: int, lang: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    if size < 8:
        raise DataError(f"image size {size} is too small; use at least 8 pixels")
    if lang not in ("en", "th", "mix"):
        raise DataError(f"unknown language {lang!r}; use en, th or mix")


class ShapesDataset(Dataset):
    """Map-style: item i of `split` is sample i (see the module docstring for the item's fields).

    `length` defaults to the split's fixed length (val, test, unseen: 5,000) or, for the endless
    train split, to DEFAULT_TRAIN_LENGTH; a finite split cannot be made longer than it is. `scenes`:
    the odds of single, pair and count scenes (`world.KIND_WEIGHTS`, the world's own mix, by default).
    """

    def __init__(self, split: str, *, size: int, lang: str = "mix", seed: int = 0, length: int | None = None,
                 scenes: tuple[float, ...] = KIND_WEIGHTS):
        _check(split, size, lang)
        self.scenes = tuple(scenes)
        limit = SPLIT_LENGTHS.get(split)
        if length is None:
            length = limit or DEFAULT_TRAIN_LENGTH
        if length < 1 or (limit is not None and length > limit):
            bound = f"1..{limit}" if limit else "at least 1"
            raise DataError(f"length {length} does not fit split {split!r}; use {bound}")
        self.split, self.size, self.lang, self.seed, self.length = split, size, lang, seed, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(index)
        return _item(self.split, index, size=self.size, lang=self.lang, seed=self.seed, scenes=self.scenes)


class ShapesStream(IterableDataset):
    """A split from sample `start` on, shared disjointly by ranks and data-loader workers.

    Worker w of W on rank r of R yields start + (r·W + w) + k·R·W for k = 0, 1, ...: the train
    split never ends; a finite split (val, test, unseen) stops at its last sample.
    """

    def __init__(self, split: str = "train", *, size: int, lang: str = "mix", seed: int = 0, start: int = 0):
        _check(split, size, lang)
        if start < 0:
            raise DataError(f"start {start} is negative; streams start at sample 0 or later")
        self.split, self.size, self.lang, self.seed, self.start = split, size, lang, seed, start

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rank, ranks = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, ranks = torch.distributed.get_rank(), torch.distributed.get_world_size()
        stride = ranks * workers
        index = self.start + rank * workers + worker
        end = SPLIT_LENGTHS.get(self.split)
        while end is None or index < end:
            yield _item(self.split, index, size=self.size, lang=self.lang, seed=self.seed)
            index += stride
