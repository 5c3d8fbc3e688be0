"""Batches for the priors: CLIP text states, z_t and z_i, from images on the fly or from shards.

A prior batch is a dict of text_states [B, L, W] and text_mask [B, L] (the frozen CLIP text
tower's last hidden states), z_t [B, D] and z_i [B, D] (normalised CLIP embeddings). On the fly,
each image–caption batch is encoded by the frozen CLIP; from an embedding folder written by
`unclip embed`, z_i and z_t are read and only the text states are computed (the text tower is
far cheaper than the image tower).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch

from unclip.clip.model import ClipModel


@torch.no_grad()
def encode_batch(clip: ClipModel, captions: list[str], images: torch.Tensor | None = None,
                 z_i: torch.Tensor | None = None, z_t: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Text states, mask and z_t of `captions`; z_i from `images` or as given (absent if neither)."""
    text = clip.encode_text(clip.tokenize(list(captions)))
    batch = {"text_states": text.token_states.float(), "text_mask": text.mask,
             "z_t": text.embeds if z_t is None else z_t.float()}
    if z_i is not None:
        batch["z_i"] = z_i.float()
    elif images is not None:
        batch["z_i"] = clip.encode_image(images)
    return batch


def on_the_fly_feed(clip: ClipModel, image_feed: Callable[[int], Iterator[dict]]) -> Callable[[int], Iterator[dict]]:
    """Wrap an image–caption feed (see `unclip.train.data`) into a prior feed."""
    clip.eval().requires_grad_(False)

    def make(start: int) -> Iterator[dict]:
        for batch in image_feed(start):
            yield encode_batch(clip, batch["caption"], images=batch["image"])

    return make


def training_rows(embeddings: dict, holdout: float) -> dict:
    """The rows of an embedding folder (`load_embeddings`) that are not held out (`data.holdout`):
    `unclip embed` embeds every pair of the shards it is aligned with, the priors train on these."""
    if holdout <= 0:
        return embeddings
    from unclip.train.data import held_out

    keep = np.array([not held_out(str(key), holdout) for key in embeddings["keys"]], dtype=bool)
    return {k: v[keep] for k, v in embeddings.items()}


class _Embeddings(torch.utils.data.Dataset):
    def __init__(self, embeddings: dict):
        self.z_i = torch.from_numpy(embeddings["image_embeds"]).float()
        self.z_t = torch.from_numpy(embeddings["text_embeds"]).float()
        self.captions = [str(c) for c in embeddings["captions"]]

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> dict:
        return {"caption": self.captions[i], "z_i": self.z_i[i], "z_t": self.z_t[i]}


def embedding_feed(clip: ClipModel, embeddings: dict, *, batch_size: int, seed: int) -> Callable[[int], Iterator[dict]]:
    """Endless shuffled epochs over precomputed embeddings (`unclip.clip.embed.load_embeddings`)."""
    from unclip.train.data import epoch_feed

    clip.eval().requires_grad_(False)
    feed = epoch_feed(_Embeddings(embeddings), batch_size=batch_size, seed=seed)

    def make(start: int) -> Iterator[dict]:
        for batch in feed(start):
            yield encode_batch(clip, batch["caption"], z_i=batch["z_i"], z_t=batch["z_t"])

    return make


@torch.no_grad()
def sample_pairs(clip: ClipModel, *, split: str, n: int, lang: str, seed: int = 0,
                 scenes: tuple[float, ...] | None = None) -> dict[str, torch.Tensor]:
    """Encoded pairs from a fixed shapes-world split, for fitting PCA and for evaluation; scenes:
    the odds of single, pair and count scenes (default: the world's)."""
    from unclip.data.render import render
    from unclip.data.shapes import to_tensor
    from unclip.data.world import KIND_WEIGHTS, sample

    parts = []
    for start in range(0, n, 250):
        items = [sample(split, i, seed=seed, lang=lang, scenes=scenes or KIND_WEIGHTS)
                 for i in range(start, min(n, start + 250))]
        images = torch.stack([to_tensor(render(s.scene, clip.config.image_size)) for s in items])
        parts.append(encode_batch(clip, [s.caption for s in items], images=images))
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


@torch.no_grad()
def fit_pairs(clip: ClipModel, data, *, n: int, embeddings: dict | None = None) -> dict[str, torch.Tensor]:
    """z_i and z_t [n, D] of the pairs a prior trains on, for fitting its statistics (the diffusion
    prior's z_i normalisation, the AR prior's PCA basis and dot-product buckets).

    data: the config's `data` section. Shapes world: the first `n` of its train split (as before, so
    the shapes recipes are unchanged). Other sources: the first `n` rows of `embeddings` when given
    (an `unclip embed` folder's training rows, `training_rows`, as `train_prior` passes them), else
    the source's first `n` training pairs (`unclip.train.data.source_batches`), encoded. A folder of
    fewer pairs gives all.
    """
    if data.source == "shapes":
        # the scene mix the prior trains on (`data.scenes`), so its statistics are that mix's
        pairs = sample_pairs(clip, split="train", n=n, lang=data.lang, seed=data.seed, scenes=data.scenes)
        return {"z_i": pairs["z_i"], "z_t": pairs["z_t"]}
    if embeddings is not None:
        return {"z_i": torch.from_numpy(embeddings["image_embeds"][:n]).float(),
                "z_t": torch.from_numpy(embeddings["text_embeds"][:n]).float()}
    from unclip.train.data import source_batches

    clip.eval()
    encoded = [encode_batch(clip, captions, images=images)
               for images, captions in source_batches(data, n, size=clip.config.image_size)]
    return {"z_i": torch.cat([e["z_i"] for e in encoded]), "z_t": torch.cat([e["z_t"] for e in encoded])}
