"""Embed a data set with CLIP into shards aligned by key, for the priors and the decoder.

Output folder:
    meta.json       model, embed_dim, source, shards [{"name": "000000.npz", "count": N}], total
    000000.npz      keys [N] str, image_embeds [N, D] float16, text_embeds [N, D] float16,
                    captions [N] str, skipped [M] str (keys whose image or caption could not be
                    read), clip str (the fingerprint of the CLIP that embedded it)

For webdataset input, shard `000123.npz` holds exactly the samples of `000123.tar`, in order.
For shapes world and folders, shards hold `shard_size` consecutive samples. Every shard is
written atomically; `load_embeddings` refuses a folder whose shards are missing, truncated or
out of line with `meta.json` or with the image shards (`check_aligned`), naming the shard.
Under `accelerate launch` the processes share the shards (shard i on rank i mod R). Run again
into the same folder, a shard the same CLIP wrote whole is kept, so an interrupted run resumes.
meta.json goes first and is written last: a folder holding one holds one run's shards.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from unclip.clip.model import ClipModel
from unclip.errors import DataError
from unclip.io import atomic_write, write_json_atomic

log = logging.getLogger(__name__)


def _index_groups(n: int, shard_size: int, item) -> Iterator[tuple[str, Iterator]]:
    """Shards of `shard_size` consecutive items `item(i)`, i < n; items are made only when read."""
    for index, begin in enumerate(range(0, n, shard_size)):
        yield f"{index:06d}.npz", (item(i) for i in range(begin, min(n, begin + shard_size)))


def _shapes_item(i: int, *, split: str, lang: str, seed: int, size: int) -> tuple[str, object, str]:
    from unclip.data.render import render
    from unclip.data.world import sample

    s = sample(split, i, seed=seed, lang=lang)
    return s.key, render(s.scene, size), s.caption


def _folder_item(dataset, i: int) -> tuple[str, object, str]:
    from unclip.data.shapes import to_pil

    item = dataset[i]
    return item["key"], to_pil(item["image"]), item["caption"]


def _write_shard(path: Path, keys: list[str], z_i: torch.Tensor, z_t: torch.Tensor, captions: list[str], *,
                 skipped: list[str] = (), clip: str = "", data: str = "") -> None:
    """skipped: keys of the image shard whose image could not be decoded (not embedded); clip: the
    fingerprint of the CLIP that embedded it (`clip_fingerprint`) and data: the data it embedded
    (JSON of `DATA_KEYS`), so a rerun can keep the shard."""
    buffer = io.BytesIO()
    np.savez(buffer, keys=np.array(keys), image_embeds=z_i.half().numpy(), text_embeds=z_t.half().numpy(),
             captions=np.array(captions), skipped=np.array(list(skipped), dtype=str), clip=np.array(clip),
             data=np.array(data))
    with atomic_write(path, "wb") as handle:
        handle.write(buffer.getvalue())


def embedded_by(embeddings: str | Path, clip_dir: str | Path) -> bool:
    """Whether every shard of the embedding folder `embeddings` was made by the CLIP at `clip_dir`."""
    want = clip_fingerprint(clip_dir)
    meta = json.loads((Path(embeddings) / "meta.json").read_text(encoding="utf-8"))
    for shard in meta.get("shards", []):
        try:
            with np.load(Path(embeddings) / shard["name"]) as data:
                if not _made_by(data, want):
                    return False
        except SHARD_ERRORS:
            return False
    return True


def embeds_data(embeddings: str | Path, data) -> bool:
    """Whether the embedding folder `embeddings` holds pairs of the data `data` (a DataConfig) names:
    the same source, path, caption language and seed."""
    meta = json.loads((Path(embeddings) / "meta.json").read_text(encoding="utf-8"))
    return [meta.get(k) for k in ("source", "path", "lang", "seed")] == [data.source, data.path, data.lang, data.seed]


DATA_KEYS = ("source", "split", "path", "lang", "seed")  # what a shard records of the data it embeds
SHARD_ERRORS = (OSError, ValueError, KeyError, EOFError)  # what a missing, cut or foreign .npz raises


def _made_by(shard, clip: str) -> bool:
    """Whether an opened embedding shard records `clip` (a `clip_fingerprint`) as the CLIP that wrote it."""
    return "clip" in shard.files and str(shard["clip"]) == clip


def clip_fingerprint(model_path: str | Path) -> str:
    """The sha256s of a CLIP model directory's tower weights and tokenizer, joined ("" without a manifest)."""
    from unclip.errors import ModelFormatError
    from unclip.modeldir import read_manifest

    if not model_path:
        return ""
    try:
        files = read_manifest(model_path).files
    except ModelFormatError:
        return ""
    parts = sorted((name, entry["sha256"]) for name, entry in files.items()
                   if name.split("/")[0] in ("text_encoder", "image_encoder", "tokenizer") and entry.get("sha256"))
    return ";".join(f"{name}={sha}" for name, sha in parts)


def _kept_shard(path: Path, clip: str, expected: Callable[[], list[str]], described: str) -> dict | None:
    """The entry of an embedding shard an earlier (perhaps interrupted) run wrote, if the same CLIP
    wrote it from the same data (`described`: source, split, path, language, seed; shapes-world keys
    do not change with the language or seed) and it holds exactly the keys it should; None to embed
    it again."""
    if not clip or not path.is_file():
        return None
    try:
        with np.load(path) as data:
            if not _made_by(data, clip) or "data" not in data.files or str(data["data"]) != described:
                return None
            keys = [str(k) for k in data["keys"]]
            skipped = [str(k) for k in data["skipped"]] if "skipped" in data.files else []
    except SHARD_ERRORS:
        return None
    left_out = set(skipped)
    if [k for k in expected() if k not in left_out] != keys:
        return None
    return {"name": path.name, "count": len(keys), "kept": True, **({"skipped": len(skipped)} if skipped else {})}


@torch.inference_mode()
def _embed_chunk(model: ClipModel, images: list, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    from unclip.data.shapes import to_tensor

    z_i = model.encode_image(torch.stack([to_tensor(im) for im in images])).cpu()
    z_t = model.encode_captions(captions).cpu()
    return z_i, z_t


def _embed_group(model: ClipModel, out: Path, name: str, items: Iterator, batch_size: int, bar,
                 clip: str = "", described: str = "") -> dict | None:
    """Embed one shard's items in chunks of `batch_size` and write it; None when it held no items."""
    keys, captions, z_is, z_ts, images, chunk_caps, skipped = [], [], [], [], [], [], []

    def flush() -> None:
        z_i, z_t = _embed_chunk(model, images, chunk_caps)
        z_is.append(z_i), z_ts.append(z_t)
        bar.update(len(images))
        images.clear(), chunk_caps.clear()

    for key, image, caption in items:
        if image is None:  # an image that cannot be decoded: recorded, so the shard still lines up
            skipped.append(key)
            continue
        keys.append(key)
        captions.append(caption)
        images.append(image)
        chunk_caps.append(caption)
        if len(images) == batch_size:
            flush()
    if images:
        flush()
    if not keys:
        return None
    _write_shard(out / name, keys, torch.cat(z_is), torch.cat(z_ts), captions, skipped=skipped, clip=clip,
                 data=described)
    return {"name": name, "count": len(keys), **({"skipped": len(skipped)} if skipped else {})}


def embed_items(model: ClipModel, groups: Iterator[tuple[str, Iterator]], out: str | Path, *,
                meta: dict, batch_size: int = 256, total: int | None = None, progress: bool = True,
                clip: str = "", expected: Callable[[str], list[str]] | None = None) -> Path:
    """Embed `(shard_name, items)` groups; items are (key, PIL image, caption).

    Under several processes (`accelerate launch`) rank r embeds groups r, r + R, r + 2R, ...;
    the ranks then exchange what they wrote (or why they failed: every rank raises then, naming
    the shard, instead of leaving the others waiting), and the main process writes meta.json.
    With `clip` (a `clip_fingerprint`) and `expected` (shard name → the keys it should hold), a
    shard an earlier run of the same CLIP wrote whole is kept, so an interrupted run resumes.
    """
    from unclip.train import dist

    out = Path(out)
    rank, world = dist.rank_world()
    described = json.dumps({k: meta.get(k) for k in DATA_KEYS}, sort_keys=True)
    if rank == 0:  # an earlier run's would vouch for its shards while this run replaces them, if interrupted
        (out / "meta.json").unlink(missing_ok=True)
    model.eval()
    shards, failure, error = [], None, None
    bar = tqdm(total=total if world == 1 else None, desc="embed", unit="img", disable=not progress or rank > 0)
    try:
        for index, (name, items) in enumerate(groups):
            if index % world != rank:
                continue
            kept = _kept_shard(out / name, clip, partial(expected, name), described) if expected else None
            if kept is not None:
                shards.append(kept)
                bar.update(kept["count"])
                continue
            try:
                shard = _embed_group(model, out, name, items, batch_size, bar, clip=clip, described=described)
            except Exception as err:
                failure, error = f"shard {name} failed on rank {rank}: {err}", err
                break
            if shard is not None:
                shards.append(shard)
    finally:
        bar.close()
    reports = dist.gather((shards, failure))
    failures = [f for _, f in reports if f]
    if failures:
        message = "embedding stopped: " + "; ".join(failures)
        raise DataError(message) from error
    shards = sorted((s for part, _ in reports for s in part), key=lambda s: s["name"])
    if rank == 0 and (kept := sum(1 for s in shards if s.pop("kept", False))):
        log.info("kept %d of %d shard(s), embedded whole by this CLIP before", kept, len(shards))
    if rank == 0:
        write_json_atomic(out / "meta.json", {**meta, "embed_dim": model.config.embed_dim, "shards": shards,
                                              "total": sum(s["count"] for s in shards)})
    dist.barrier()  # meta.json exists on return, on every rank
    return out


def embed_dataset(model: ClipModel, out: str | Path, *, source: str = "shapes", split: str = "train",
                  n: int = 10_000, path: str = "", lang: str = "mix", seed: int = 0, shard_size: int = 10_000,
                  batch_size: int = 256, progress: bool = True, model_path: str = "") -> Path:
    """Embed shapes world, a caption folder, or webdataset shards; see the module docstring.

    Launched on several processes (`accelerate launch -m unclip embed ...`), the processes
    share the shards: shard i is embedded by rank i mod R.
    """
    from unclip.train import dist

    if dist.launched_world_size() > 1:
        dist.start()
    size = model.config.image_size
    meta = {"model": model_path, "source": source, "split": split, "path": path, "lang": lang, "seed": seed}
    clip = clip_fingerprint(model_path)
    if source == "webdataset":
        from unclip.train.data import shard_urls

        tars = {Path(url).name.replace(".tar", ".npz"): url for url in shard_urls(path)}
        return embed_items(model, _webdataset_groups(path, size), out, meta=meta, batch_size=batch_size,
                           progress=progress, clip=clip, expected=lambda name: tar_keys(tars[name]))
    if source == "shapes":
        from unclip.data.world import sample

        groups = _index_groups(n, shard_size, partial(_shapes_item, split=split, lang=lang, seed=seed, size=size))

        def key(i: int) -> str:
            return sample(split, i, seed=seed, lang=lang).key
    elif source == "folder":
        from unclip.data.folder import FolderDataset, pair_key

        dataset = FolderDataset(path, size=size)
        n = len(dataset)
        groups = _index_groups(n, shard_size, partial(_folder_item, dataset))

        def key(i: int) -> str:
            return pair_key(dataset.root, dataset.pairs[i][0])
    else:
        raise DataError(f"unknown source {source!r}; use shapes, folder or webdataset")

    def expected(name: str) -> list[str]:
        begin = int(name.split(".")[0]) * shard_size
        return [key(i) for i in range(begin, min(n, begin + shard_size))]

    return embed_items(model, groups, out, meta=meta, batch_size=batch_size, total=n, progress=progress, clip=clip,
                       expected=expected)


def _webdataset_groups(pattern: str, size: int) -> Iterator[tuple[str, Iterator]]:
    """One group per tar shard, named like the shard, samples in shard order (all shards checked first)."""
    from unclip.train.data import shard_urls

    urls = shard_urls(pattern)  # a missing shard is an error on every rank, before any work

    def items(url: str) -> Iterator[tuple[str, object, str]]:
        import webdataset as wds

        from unclip.data.shapes import to_pil
        from unclip.train.data import IMAGE_EXTENSIONS, shard_item, skip_unreadable

        # nodesplitter=None: the ranks already share out whole shards, each reads all of its own
        for sample in wds.WebDataset(url, shardshuffle=False, empty_check=False, nodesplitter=None):
            if "txt" not in sample or not any(ext in sample for ext in IMAGE_EXTENSIONS):
                skip_unreadable(sample["__key__"], url, "no image or caption")
                continue
            # decoded and centre-cropped as the training feeds do it; unreadable: kept as a skipped key
            item = shard_item(sample, size=size)
            if item is None:
                yield sample["__key__"], None, ""
                continue
            yield item["key"], to_pil(item["image"]), item["caption"]

    return ((Path(url).name.replace(".tar", ".npz"), items(url)) for url in urls)


def tar_keys(path: str | Path) -> list[str]:
    """The keys of a tar shard that hold an image and a caption, in shard order (what `unclip embed` keeps)."""
    import tarfile

    extensions: dict[str, set[str]] = {}
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if member.isfile():
                    key, _, ext = member.name.partition(".")
                    extensions.setdefault(key, set()).add(ext.lower())
    except (OSError, tarfile.TarError) as err:
        raise DataError(f"image shard {path} cannot be read: {err}") from None
    return [key for key, exts in extensions.items() if "txt" in exts and exts & {"jpg", "jpeg", "png", "webp"}]


def check_aligned(directory: str | Path, images: str) -> None:
    """Every image shard of the pattern `images` has its embedding shard with the same keys in order.

    Raises DataError naming the first shard that is missing or out of line; nothing is waited on,
    so a bad folder is an error at once, on every rank that checks it.
    """
    from unclip.train.data import shard_urls

    directory = Path(directory)
    for url in shard_urls(images):
        tar = Path(url)
        npz = directory / tar.name.replace(".tar", ".npz")
        if not npz.is_file():
            raise DataError(f"embedding shard {npz} is missing (image shard {tar} has no embeddings); run "
                            f"`unclip embed` on {images!r} again (it keeps the shards that are whole)")
        try:
            with np.load(npz) as data:
                keys = [str(k) for k in data["keys"]]
                skipped = {str(k) for k in data["skipped"]} if "skipped" in data.files else set()
        except (OSError, ValueError, KeyError, EOFError) as err:
            raise DataError(f"embedding shard {npz} is truncated or corrupt: {err}") from None
        expected = [k for k in tar_keys(tar) if k not in skipped]  # less the images embed could not decode
        if keys != expected:
            at = next((i for i, (a, b) in enumerate(zip(keys, expected)) if a != b), min(len(keys), len(expected)))
            found = keys[at] if at < len(keys) else "<end>"
            wanted = expected[at] if at < len(expected) else "<end>"
            raise DataError(f"embedding shard {npz} does not line up with image shard {tar}: {len(keys)} keys "
                            f"vs {len(expected)}, first difference at position {at} ({found!r} where the image shard "
                            f"has {wanted!r}); embed the shards again with the same pattern")


def load_embeddings(directory: str | Path, *, images: str | None = None) -> dict[str, np.ndarray]:
    """All shards of an embedding folder, concatenated: keys, image_embeds, text_embeds, captions.

    With `images` (a shard pattern) the folder is first checked against those image shards
    (`check_aligned`). Without it, a folder embedded from webdataset shards is checked against
    the shards it names when they are all still there.
    """
    directory = Path(directory)
    meta_path = directory / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"{meta_path} is missing; make the folder with `unclip embed`")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if images is None and meta.get("source") == "webdataset" and meta.get("path"):
        try:
            from unclip.train.data import shard_urls

            shard_urls(meta["path"])
            images = meta["path"]
        except DataError:
            log.warning("the image shards %s that %s was embedded from are not all there; alignment not checked",
                        meta["path"], directory)
    parts: dict[str, list[np.ndarray]] = {"keys": [], "image_embeds": [], "text_embeds": [], "captions": []}
    for shard in meta["shards"]:
        path = directory / shard["name"]
        if not path.is_file():
            raise DataError(f"embedding shard {path} is missing (listed in {meta_path})")
        try:
            with np.load(path) as data:
                arrays = {k: data[k] for k in parts}
        except (OSError, ValueError, KeyError, EOFError) as err:
            raise DataError(f"embedding shard {path} is truncated or corrupt: {err}") from None
        counts = {k: len(v) for k, v in arrays.items()}
        if set(counts.values()) != {shard["count"]}:
            raise DataError(f"embedding shard {path} is misaligned: {counts}, meta.json says {shard['count']}")
        for k, v in arrays.items():
            parts[k].append(v)
    if images is not None:
        check_aligned(directory, images)
    return {k: np.concatenate(v) for k, v in parts.items()}
