"""Embed a data set with CLIP into shards aligned by key, for the priors and the decoder.

Output folder:
    meta.json       model, embed_dim, source, shards [{"name": "000000.npz", "count": N}], total
    000000.npz      keys [N] str, image_embeds [N, D] float16, text_embeds [N, D] float16,
                    captions [N] str

For webdataset input, shard `000123.npz` holds exactly the samples of `000123.tar`, in order.
For shapes world and folders, shards hold `shard_size` consecutive samples. Every shard is
written atomically; `load_embeddings` refuses a folder whose shards are missing, truncated or
out of line with `meta.json`, naming the shard.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from unclip.clip.model import ClipModel
from unclip.errors import DataError
from unclip.io import atomic_write, write_json_atomic

log = logging.getLogger(__name__)


def _shapes_items(split: str, n: int, lang: str, seed: int, size: int) -> Iterator[tuple[str, object, str]]:
    from unclip.data.render import render
    from unclip.data.world import sample

    for i in range(n):
        s = sample(split, i, seed=seed, lang=lang)
        yield s.key, render(s.scene, size), s.caption


def _folder_items(path: str, size: int) -> Iterator[tuple[str, object, str]]:
    from unclip.data.folder import FolderDataset
    from unclip.data.shapes import to_pil

    dataset = FolderDataset(path, size=size)
    for i in range(len(dataset)):
        item = dataset[i]
        yield item["key"], to_pil(item["image"]), item["caption"]


def _write_shard(path: Path, keys: list[str], z_i: torch.Tensor, z_t: torch.Tensor, captions: list[str]) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, keys=np.array(keys), image_embeds=z_i.half().numpy(), text_embeds=z_t.half().numpy(),
             captions=np.array(captions))
    with atomic_write(path, "wb") as handle:
        handle.write(buffer.getvalue())


@torch.inference_mode()
def _embed_chunk(model: ClipModel, images: list, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    from unclip.data.shapes import to_tensor

    z_i = model.encode_image(torch.stack([to_tensor(im) for im in images])).cpu()
    z_t = model.encode_captions(captions).cpu()
    return z_i, z_t


def embed_items(model: ClipModel, groups: Iterator[tuple[str, Iterator]], out: str | Path, *,
                meta: dict, batch_size: int = 256, total: int | None = None, progress: bool = True) -> Path:
    """Embed `(shard_name, items)` groups; items are (key, PIL image, caption)."""
    out = Path(out)
    model.eval()
    shards = []
    bar = tqdm(total=total, desc="embed", unit="img", disable=not progress)
    for name, items in groups:
        keys, captions, z_is, z_ts, images, chunk_caps = [], [], [], [], [], []
        for key, image, caption in items:
            keys.append(key)
            captions.append(caption)
            images.append(image)
            chunk_caps.append(caption)
            if len(images) == batch_size:
                z_i, z_t = _embed_chunk(model, images, chunk_caps)
                z_is.append(z_i), z_ts.append(z_t)
                bar.update(len(images))
                images, chunk_caps = [], []
        if images:
            z_i, z_t = _embed_chunk(model, images, chunk_caps)
            z_is.append(z_i), z_ts.append(z_t)
            bar.update(len(images))
        if not keys:
            continue
        _write_shard(out / name, keys, torch.cat(z_is), torch.cat(z_ts), captions)
        shards.append({"name": name, "count": len(keys)})
    bar.close()
    write_json_atomic(out / "meta.json", {**meta, "embed_dim": model.config.embed_dim, "shards": shards,
                                          "total": sum(s["count"] for s in shards)})
    return out


def embed_dataset(model: ClipModel, out: str | Path, *, source: str = "shapes", split: str = "train",
                  n: int = 10_000, path: str = "", lang: str = "mix", seed: int = 0, shard_size: int = 10_000,
                  batch_size: int = 256, progress: bool = True, model_path: str = "") -> Path:
    """Embed shapes world, a caption folder, or webdataset shards; see the module docstring."""
    size = model.config.image_size
    meta = {"model": model_path, "source": source, "split": split, "path": path, "lang": lang, "seed": seed}
    if source == "webdataset":
        return embed_items(model, _webdataset_groups(path, size), out, meta=meta, batch_size=batch_size,
                           progress=progress)
    if source == "shapes":
        items = _shapes_items(split, n, lang, seed, size)
        total = n
    elif source == "folder":
        items = _folder_items(path, size)
        total = None
    else:
        raise DataError(f"unknown source {source!r}; use shapes, folder or webdataset")

    def groups():
        index = 0
        while True:
            chunk = [item for _, item in zip(range(shard_size), items)]
            if not chunk:
                return
            yield f"{index:06d}.npz", iter(chunk)
            index += 1

    return embed_items(model, groups(), out, meta=meta, batch_size=batch_size, total=total, progress=progress)


def _webdataset_groups(pattern: str, size: int) -> Iterator[tuple[str, Iterator]]:
    """One group per tar shard, named like the shard, samples in shard order."""
    import braceexpand
    import webdataset as wds
    from PIL import Image

    urls = [u for p in pattern.split("::") for u in braceexpand.braceexpand(p)]
    if not urls:
        raise DataError(f"no shards match {pattern!r}")
    for url in urls:
        if not Path(url).is_file():
            raise DataError(f"shard {url} is missing")

        def items(url=url):
            for sample in wds.WebDataset(url, shardshuffle=False, empty_check=False).decode("pil"):
                image = sample.get("jpg") or sample.get("png") or sample.get("webp")
                if image is None or "txt" not in sample:
                    log.warning("skipping %s in %s: no image or caption", sample["__key__"], url)
                    continue
                image = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
                yield sample["__key__"], image, sample["txt"]

        yield Path(url).name.replace(".tar", ".npz"), items()


def load_embeddings(directory: str | Path) -> dict[str, np.ndarray]:
    """All shards of an embedding folder, concatenated: keys, image_embeds, text_embeds, captions."""
    directory = Path(directory)
    meta_path = directory / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"{meta_path} is missing; make the folder with `unclip embed`")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
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
    return {k: np.concatenate(v) for k, v in parts.items()}
