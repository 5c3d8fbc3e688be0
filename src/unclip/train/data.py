"""Endless, resumable batch feeds: `make_batches(start)` → iterator of batches from sample `start`.

Shapes world is indexed, so a feed that starts at sample k is exactly the tail of one that
started at 0 (with `num_workers=0`, or any worker count for the stream's own split of indices).
Finite data sets (folders) are walked in epochs, each shuffled by `seed + epoch`, so sample k
of the feed is also always the same item.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader

from unclip.config import DataConfig
from unclip.errors import DataError


def shapes_feed(*, size: int, batch_size: int, lang: str, seed: int,
                num_workers: int = 0) -> Callable[[int], Iterator[dict]]:
    from unclip.data.shapes import ShapesStream

    def make(start: int) -> Iterator[dict]:
        stream = ShapesStream("train", size=size, lang=lang, seed=seed, start=start)
        return iter(DataLoader(stream, batch_size=batch_size, num_workers=num_workers))

    return make


def epoch_feed(dataset, *, batch_size: int, seed: int, num_workers: int = 0) -> Callable[[int], Iterator[dict]]:
    """Endless shuffled epochs over a map-style data set, resumable at any sample."""
    n = len(dataset)

    def indices(start: int) -> Iterator[int]:
        epoch, offset = divmod(start, n)
        while True:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
            yield from order[offset:]
            epoch, offset = epoch + 1, 0

    def make(start: int) -> Iterator[dict]:
        sampler = _IndexStream(indices(start))
        return iter(DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers))

    return make


class _IndexStream(torch.utils.data.Sampler):
    def __init__(self, it: Iterator[int]):
        self.it = it

    def __iter__(self) -> Iterator[int]:
        return self.it


def feed_for(data: DataConfig, *, size: int, batch_size: int, num_workers: int = 0) -> Callable[[int], Iterator[dict]]:
    """The batch feed a stage trains on, from the `data` section of the config."""
    if data.source == "shapes":
        return shapes_feed(size=size, batch_size=batch_size, lang=data.lang, seed=data.seed, num_workers=num_workers)
    if data.source == "folder":
        from unclip.data.folder import FolderDataset

        if not data.path:
            raise DataError("data.source=folder needs data.path=FOLDER (images with same-name .txt captions)")
        return epoch_feed(FolderDataset(data.path, size=size), batch_size=batch_size, seed=data.seed,
                          num_workers=num_workers)
    raise DataError(f"data.source={data.source!r} is not supported for training yet; use shapes or folder")
