"""Endless, resumable batch feeds: `make_batches(start)` → this rank's batches from global sample `start`.

`batch_size` is the global batch. Every feed numbers the samples of one global stream; global
batch s is positions s·B … s·B + B - 1 of it, and rank r of R takes the contiguous slice
r·B/R … (r+1)·B/R - 1 of each. So R processes see exactly the global batches one process sees,
and a feed that starts at sample k is exactly the tail of one that started at 0.

- shapes: sample i of the endless train split is item i of the stream (rendered from its index);
  with hard negatives, some odd items are instead the twin of the item before (`unclip.data.twins`).
- folder: endless epochs, each shuffled by `seed + epoch`.
- webdataset: tar shards resampled with replacement (infinite epochs), split by rank and by
  data-loader worker, decoded and shuffled in a buffer. This stream is reproducible from its
  seed but not indexable: a resumed run draws a fresh stream seeded by its start, so its data
  position is approximate (see docs/training.md).

Indices are batched in the main process and the data loader's workers only turn indices into
items, so batches come out in the same order for any `num_workers`; items must be pure
functions of their index (shapes and folder items are). The data loaders use their own
`torch.Generator`, so starting a feed never draws from the global RNG a resumed run restores.
"""

from __future__ import annotations

import hashlib
import io
import logging
import signal
from collections.abc import Callable, Iterator
from functools import cache, partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from unclip.config import ClipConfig, DataConfig, TrainConfig
from unclip.data.folder import IMAGE_SUFFIXES
from unclip.errors import ConfigError, DataError
from unclip.train.dist import rank_world

log = logging.getLogger(__name__)

SHUFFLE_BUFFER = 1000  # webdataset samples held for shuffling, per data-loader worker
IMAGE_EXTENSIONS = tuple(suffix.lstrip(".") for suffix in IMAGE_SUFFIXES)  # a shard's image keys: a folder's kinds


def local_batch_size(batch_size: int, world: int) -> int:
    """This rank's share of the global batch."""
    if batch_size % world:
        raise ConfigError(f"train.batch_size={batch_size} is the global batch and must split evenly over the "
                          f"{world} processes; use a multiple of {world}")
    return batch_size // world


def rank_share(positions: Iterator[int], *, batch_size: int, rank: int, world: int) -> Iterator[int]:
    """Rank `rank`'s contiguous slice of every global batch of `batch_size` in a stream of indices."""
    local = local_batch_size(batch_size, world)
    low, high = rank * local, (rank + 1) * local
    for position, index in enumerate(positions):
        if low <= position % batch_size < high:
            yield index


class _IndexStream(torch.utils.data.Sampler):
    def __init__(self, it: Iterator[int]):
        self.it = it

    def __iter__(self) -> Iterator[int]:
        return self.it


def ignore_sigterm(worker_id: int) -> None:
    """A loader worker outlives a SIGTERM sent to the whole process group (`timeout`, a cluster's
    preemption): the trainer stops at the end of the step with a checkpoint and ends its workers then."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def index_feed(dataset, indices: Callable[[int], Iterator[int]], *, batch_size: int, num_workers: int = 0,
               seed: int = 0) -> Callable[[int], Iterator[dict]]:
    """Batches of `dataset[i]` for the global index stream `indices(start)`, this rank's share of each."""

    def make(start: int) -> Iterator[dict]:
        rank, world = rank_world()
        sampler = _IndexStream(rank_share(indices(start), batch_size=batch_size, rank=rank, world=world))
        return iter(DataLoader(dataset, batch_size=local_batch_size(batch_size, world), sampler=sampler,
                               num_workers=num_workers, generator=torch.Generator().manual_seed(seed),
                               worker_init_fn=ignore_sigterm))

    return make


def shapes_feed(*, size: int, batch_size: int, lang: str, seed: int, num_workers: int = 0,
                hard_negatives: float = 0.0, twin_group: int = 2,
                twin_weights: tuple[float, ...] = ClipConfig.twin_weights,
                scenes: tuple[float, ...] = DataConfig.scenes) -> Callable[[int], Iterator[dict]]:
    """Shapes world's endless train split: global sample i is scene i, of a kind drawn with the
    odds `scenes` (single, pair, count).

    hard_negatives > 0: that fraction of the consecutive groups of `twin_group` samples are twin groups,
    scenes one attribute apart, drawn with `twin_weights` (`unclip.data.twins`); a batch whose size is
    a multiple of `twin_group` keeps each group together.
    """
    from itertools import count

    from unclip.data.shapes import ShapesDataset
    from unclip.data.twins import TwinsDataset

    if hard_negatives > 0:
        dataset = TwinsDataset(size=size, lang=lang, seed=seed, fraction=hard_negatives, group=twin_group,
                               weights=twin_weights, scenes=scenes)
    else:
        dataset = ShapesDataset("train", size=size, lang=lang, seed=seed, length=2**62, scenes=scenes)  # endless
    return index_feed(dataset, count, batch_size=batch_size, num_workers=num_workers, seed=seed)


def epoch_feed(dataset, *, batch_size: int, seed: int, num_workers: int = 0) -> Callable[[int], Iterator[dict]]:
    """Endless shuffled epochs over a map-style data set, resumable at any sample."""
    n = len(dataset)

    def indices(start: int) -> Iterator[int]:
        epoch, offset = divmod(start, n)
        while True:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
            yield from order[offset:]
            epoch, offset = epoch + 1, 0

    return index_feed(dataset, indices, batch_size=batch_size, num_workers=num_workers, seed=seed)


def shard_urls(pattern: str) -> list[str]:
    """The tar shards a pattern names ("data/{000000..000009}.tar", several joined by "::"), all present."""
    import braceexpand

    urls = [u for part in pattern.split("::") if part for u in braceexpand.braceexpand(part)]
    if not urls:
        raise DataError(f"no shards match {pattern!r}; give a pattern like 'data/{{000000..000009}}.tar'")
    missing = [u for u in urls if "://" not in u and not Path(u).is_file()]
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise DataError(f"{len(missing)} shard(s) of {pattern!r} are missing: {shown}")
    return urls


def _same_seed() -> int:
    """Every rank and worker resamples the same shard sequence; split_by_node/worker then deal it out."""
    return 0


def _has_pair(sample: dict) -> bool:
    if "txt" in sample and any(ext in sample for ext in IMAGE_EXTENSIONS):
        return True
    skip_unreadable(sample.get("__key__"), sample.get("__url__", "the shards"), "no image or caption")
    return False


SKIP_LOGS = 5  # unreadable samples of shards that one process logs one by one
_skipped: set[str] = set()


def skip_unreadable(key: str, where: str, why: str) -> None:
    """Log a sample that is left out (the first SKIP_LOGS of a process, then once that more are;
    each once, however often the endless stream comes back to it)."""
    if f"{where}/{key}" in _skipped:
        return
    _skipped.add(f"{where}/{key}")
    if len(_skipped) <= SKIP_LOGS:
        log.warning("skipping %s in %s: %s", key, where, why)
    elif len(_skipped) == SKIP_LOGS + 1:
        log.warning("more unreadable samples are skipped (%d so far); no more are logged", len(_skipped))


def shard_item(sample: dict, *, size: int) -> dict | None:
    """A raw webdataset sample (bytes per extension) → dict(image, caption, key) like the folder
    source; None, logged, for an image that cannot be decoded or a caption that is empty or not UTF-8."""
    from unclip.data.folder import caption_text, open_square_rgb, unreadable_errors
    from unclip.data.shapes import to_tensor

    key, where = sample["__key__"], sample.get("__url__", "the shards")
    data = next(sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample)
    text = sample["txt"]
    caption = caption_text(text if isinstance(text, bytes) else text.encode("utf-8"))
    if caption is None:
        skip_unreadable(key, where, "empty or non-UTF-8 caption")
        return None
    try:
        image = open_square_rgb(io.BytesIO(data), size)
    except unreadable_errors() as err:
        skip_unreadable(key, where, f"unreadable image ({err})")
        return None
    return {"image": to_tensor(image), "caption": caption, "key": key}


def _is_item(item: dict | None) -> bool:
    return item is not None


def held_out(key: str, fraction: float) -> bool:
    """Whether the pair with this key is one of the `fraction` kept out of training (`data.holdout`):
    a hash of the key, so every machine, rank and run makes the same choice."""
    if fraction <= 0:
        return False
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big") < fraction * 2**64


def holdout_problem(held: int, usable: int, fraction: float) -> str | None:
    """What is wrong with a `data.holdout` of `fraction` that keeps `held` of `usable` pairs out of
    training: None when both the training and the held-out part have pairs (or nothing is held out)."""
    if fraction <= 0 or 0 < held < usable or not usable:
        return None
    fits = max(0.05, min(0.5, round(2 / usable + 0.005, 2)))  # about 2 pairs of a small data set, 5% of a large one
    if held == 0:
        return (f"data.holdout={fraction:g} keeps none of the {usable} pairs out of training (a hash of each pair's "
                f"name picks about {fraction:.0%} of them), so there is nothing to evaluate on; hold out more "
                f"(data.holdout={max(fits, min(0.5, 2 * fraction)):g}, say) or none (data.holdout=0: each stage "
                "is then measured on training pairs)")
    return (f"data.holdout={fraction:g} keeps all {usable} pairs out of training, so there is nothing to train on; "
            f"lower it (data.holdout={fits:g}, say)")


@cache  # once per process and data set: `train all` builds a feed for each of its stages
def _check_folder_holdout(data: DataConfig) -> None:
    """Refuse, before any training, a `data.holdout` that leaves a folder's training or held-out part
    without pairs (the run would otherwise fail when a stage is evaluated, after its training)."""
    from unclip.data.folder import pair_key, scan_folder

    if data.holdout <= 0:
        return
    pairs, _ = scan_folder(data.path, verify=False)  # names and captions only: cheap beside the feed's own scan
    held = sum(held_out(pair_key(Path(data.path), path), data.holdout) for path, _ in pairs)
    if problem := holdout_problem(held, len(pairs), data.holdout):
        raise DataError(f"{data.path}: {problem}")


def _kept(fraction: float, sample: dict) -> bool:
    return not held_out(sample["__key__"], fraction)


def _part(fraction: float, part: str) -> Callable[[str], bool]:
    """Key filter for `part` ("train" or "holdout") of data with `fraction` held out."""
    if part not in ("train", "holdout"):
        raise ValueError(f"part must be train or holdout, not {part!r}")
    return (lambda key: held_out(key, fraction)) if part == "holdout" else (lambda key: not held_out(key, fraction))


def webdataset_feed(pattern: str, *, size: int, batch_size: int, seed: int, num_workers: int = 0,
                    shuffle_buffer: int = SHUFFLE_BUFFER, holdout: float = 0.0) -> Callable[[int], Iterator[dict]]:
    """Endless batches streamed from img2dataset-layout shards (KEY.jpg + KEY.txt), see the module
    docstring; the `holdout` fraction of keys (`held_out`) is left out."""
    import webdataset as wds

    urls = shard_urls(pattern)
    _check_usable(urls, pattern, size=size, holdout=holdout)

    def make(start: int) -> Iterator[dict]:
        rank, world = rank_world()
        if start:
            log.warning("webdataset data resumes approximately: the stream restarts at a fresh, seeded draw of "
                        "shards and samples rather than at sample %d (shapes and folder data resume exactly)", start)
        stream_seed = seed * 1_000_003 + start
        pipeline = wds.DataPipeline(
            wds.ResampledShards(urls, seed=stream_seed, deterministic=True, worker_seed=_same_seed),
            wds.split_by_node, wds.split_by_worker,
            wds.tarfile_to_samples(),
            wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), seed=stream_seed + rank),
            wds.select(_has_pair),
            wds.select(partial(_kept, holdout)),
            wds.map(partial(shard_item, size=size)),
            wds.select(_is_item),
            wds.batched(local_batch_size(batch_size, world), partial=False),
        )
        return iter(DataLoader(pipeline, batch_size=None, num_workers=num_workers,
                               generator=torch.Generator().manual_seed(seed), worker_init_fn=ignore_sigterm))

    return make


def _check_usable(urls: list[str], pattern: str, *, size: int, holdout: float) -> None:
    """Read the shards in order up to the first sample training can use (and, with a `holdout`, the
    first held-out one, which the stages are evaluated on); none in a whole pass is a `DataError`
    (the endless resampled stream would wait for one forever, and evaluation fail after training)."""
    import webdataset as wds

    samples = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples())
    found = {"train": False, "holdout": holdout <= 0}
    usable = 0
    for sample in samples:
        if _has_pair(sample) and shard_item(sample, size=size) is not None:
            usable += 1
            found["train" if _kept(holdout, sample) else "holdout"] = True
            if all(found.values()):
                return
    held = 0 if found["train"] else usable  # a whole pass without the part that was not found
    if problem := holdout_problem(held, usable, holdout):
        raise DataError(f"{pattern}: {problem}")
    raise DataError(f"{pattern} holds no usable image-caption pair: every sample lacks a {'/'.join(IMAGE_SUFFIXES)} "
                    "image or a .txt caption, or fails to decode; `unclip data check` lists what is wrong")


def check_path(data: DataConfig) -> None:
    """A DataError unless a folder or webdataset source names its path."""
    if data.source == "folder" and not data.path:
        raise DataError("data.source=folder needs data.path=FOLDER (images with same-name .txt captions)")
    if data.source == "webdataset" and not data.path:
        raise DataError("data.source=webdataset needs data.path='DIR/{000000..000009}.tar' (img2dataset layout)")


def source_batches(data: DataConfig, n: int, *, size: int, part: str = "train",
                   batch_size: int = 250) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """The first m ≤ n image–caption pairs of `part` ("train", or "holdout": the `data.holdout`
    fraction kept out of training) of a folder (file order) or webdataset source (shard order,
    each shard read once) in batches of images [b, 3, size, size] in [-1, 1] and captions: what
    the stages fit statistics on and are evaluated on when they train on data other than shapes
    world. Data of fewer than n pairs gives all of them."""
    check_path(data)
    keep = _part(data.holdout, part)
    if data.source == "folder":
        from unclip.data.folder import FolderDataset

        folder = FolderDataset(data.path, size=size, keep=keep,
                               part={"train": "training pairs", "holdout": "held-out pairs"}[part] if data.holdout else "")
        for start in range(0, min(n, len(folder)), batch_size):
            items = [folder[i] for i in range(start, min(n, len(folder), start + batch_size))]
            yield torch.stack([item["image"] for item in items]), [item["caption"] for item in items]
    elif data.source == "webdataset":
        import webdataset as wds

        items = wds.DataPipeline(wds.SimpleShardList(shard_urls(data.path)), wds.tarfile_to_samples(),
                                 wds.select(_has_pair), wds.select(lambda sample: keep(sample["__key__"])),
                                 wds.map(partial(shard_item, size=size)), wds.select(_is_item))
        batch: list[dict] = []
        for given, item in enumerate(items, start=1):
            batch.append(item)
            if len(batch) == batch_size or given == n:
                yield torch.stack([it["image"] for it in batch]), [it["caption"] for it in batch]
                batch = []
            if given == n:
                return
        if batch:
            yield torch.stack([it["image"] for it in batch]), [it["caption"] for it in batch]
    else:
        raise DataError(f"data.source={data.source!r} has no pairs of its own to read; use folder or webdataset")


EVALUATION_PAIRS = 500  # pairs of a folder or webdataset source CLIP's retrieval and the priors' cosines use


def evaluation_pairs(data: DataConfig, n: int, *, size: int) -> tuple[torch.Tensor, list[str], str]:
    """Images, captions and a label of what a stage trained on folder or webdataset data is measured
    on: the first n of its held-out pairs when `data.holdout` keeps some out, else (the label says
    so) its first n training pairs."""
    part = "holdout" if data.holdout > 0 else "train"
    images, captions = first_pairs(data, n, size=size, part=part)
    label = (f"the first {len(captions)} held-out pairs" if part == "holdout"
             else f"the first {len(captions)} training pairs (none held out)")
    return images, captions, label


def first_pairs(data: DataConfig, n: int, *, size: int, part: str = "train") -> tuple[torch.Tensor, list[str]]:
    """`source_batches` in one batch: images [m, 3, size, size] and m captions."""
    batches = list(source_batches(data, n, size=size, part=part))
    if not batches:
        raise DataError(f"{data.path} holds no {'held-out' if part == 'holdout' else 'training'} pairs "
                        f"(data.holdout={data.holdout})")
    return torch.cat([images for images, _ in batches]), [c for _, captions in batches for c in captions]


def validation_feed(data: DataConfig, train: TrainConfig, *, size: int) -> Callable[[int], Iterator[dict]] | None:
    """A finite feed of the same `train.eval_batches` global batches of held-out pairs at every call,
    each rank taking its slice as in training: shapes world's val split, or the `data.holdout` pairs
    of a folder or shards (fewer batches if they hold fewer). None when `train.eval_every` is 0 or
    the data holds nothing out."""
    if not train.eval_every:
        return None
    batch_size, batches = train.batch_size, train.eval_batches
    if data.source == "shapes":
        from unclip.data.shapes import ShapesDataset

        val = ShapesDataset("val", size=size, lang=data.lang, seed=data.seed)
        items = [val[i] for i in range(batch_size * batches)]
        images, captions = torch.stack([it["image"] for it in items]), [it["caption"] for it in items]
    elif data.holdout > 0:
        images, captions = first_pairs(data, batch_size * batches, size=size, part="holdout")
    else:
        log.warning("train.eval_every is set but data.holdout keeps no pairs out of training; no validation is "
                    "run (set data.holdout=0.05, say)")
        return None
    whole = len(captions) // batch_size * batch_size
    if whole == 0:
        log.warning("validation needs a batch of %d held-out pairs and the data holds %d out; none is run",
                    batch_size, len(captions))
        return None

    def make(start: int) -> Iterator[dict]:
        rank, world = rank_world()
        local = local_batch_size(batch_size, world)
        for first in range(0, whole, batch_size):
            low = first + rank * local
            yield {"image": images[low:low + local], "caption": captions[low:low + local]}

    return make


def feed_for(data: DataConfig, *, size: int, batch_size: int, num_workers: int = 0,
             hard_negatives: float = 0.0, twin_group: int = 2,
             twin_weights: tuple[float, ...] = ClipConfig.twin_weights) -> Callable[[int], Iterator[dict]]:
    """The batch feed a stage trains on, from the `data` section of the config.

    hard_negatives: the fraction of shapes-world pairs that come as twins (see `shapes_feed`); other
    sources have no scenes to edit, so there it is ignored, with a warning.
    """
    if data.source == "shapes":
        return shapes_feed(size=size, batch_size=batch_size, lang=data.lang, seed=data.seed, num_workers=num_workers,
                           hard_negatives=hard_negatives, twin_group=twin_group, twin_weights=twin_weights,
                           scenes=data.scenes)
    if hard_negatives > 0:
        log.warning("hard-negative twins are built from shapes-world scenes; data.source=%s has none, so "
                    "training pairs come without them", data.source)
    check_path(data)
    if data.source == "folder":
        from unclip.data.folder import FolderDataset

        _check_folder_holdout(data)
        return epoch_feed(FolderDataset(data.path, size=size, keep=_part(data.holdout, "train"),
                                        part="training pairs" if data.holdout else ""),
                          batch_size=batch_size, seed=data.seed, num_workers=num_workers)
    if data.source == "webdataset":
        return webdataset_feed(data.path, size=size, batch_size=batch_size, seed=data.seed, num_workers=num_workers,
                               holdout=data.holdout)
    raise DataError(f"data.source={data.source!r} is not supported; use shapes, folder or webdataset")
