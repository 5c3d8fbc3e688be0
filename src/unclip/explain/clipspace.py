"""`unclip explain clip`: images and captions in one space, the bridge from the digits to DALL-E 2.

The digit explainers learn a space where distance compares two *images*. CLIP learns one space
for images *and* captions: the cosine between an image's z_i and a caption's z_t says how well the
caption describes the image. This explainer shows it on shapes world with a trained CLIP:

- a similarity matrix: 8 test images against their 8 captions, cosine in the shared space
  (the diagonal should stand out);
- zero-shot classification as nearest caption: colour and shape accuracy on test scenes
  (seen colour–shape pairs) and unseen scenes (held-out pairs), English and Thai;
- a t-SNE of image embeddings and caption embeddings together, coloured by shape, as a PNG and
  an interactive page: a caption lands among the images it describes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from unclip.explain.digits import new_figure, save_figure, start_output
from unclip.io import write_json_atomic


@dataclass(frozen=True)
class ClipSpaceReport:
    metrics: dict
    paths: dict[str, Path]
    seconds: float


def _single_scenes(split: str, n: int) -> list:
    from unclip.data.world import sample

    scenes, index = [], 0
    while len(scenes) < n:
        scene = sample(split, index).scene
        index += 1
        if scene.kind == "single":
            scenes.append(scene)
    return scenes


def _similarity_figure(images: list, captions: list[str], sims: np.ndarray, path: Path) -> Path:
    """Images down the left (one row each), captions along the bottom, cosines in the cells."""
    n = len(images)
    fig = new_figure(width=8.2, height=6.8)
    grid = fig.add_gridspec(n, 2, width_ratios=[1, 8.5])
    for i, image in enumerate(images):
        thumb = fig.add_subplot(grid[i, 0])
        thumb.imshow(np.asarray(image))
        thumb.set_axis_off()
    ax = fig.add_subplot(grid[:, 1])
    shown = ax.imshow(sims, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(captions)), captions, rotation=35, ha="right", fontsize=7.5)
    ax.set_yticks(range(n), [f"image {i + 1}" for i in range(n)], fontsize=8)
    for i in range(n):
        for j in range(len(captions)):
            ax.text(j, i, f"{sims[i, j]:.2f}", ha="center", va="center", fontsize=7.5,
                    color="black" if sims[i, j] > sims.mean() else "white")
    ax.set_title("cosine(image embedding, caption embedding) in CLIP's shared space\n"
                 "row i: the image on the left; column j: caption j (the diagonal is each image's own caption)",
                 fontsize=9.5)
    fig.colorbar(shown, ax=ax, shrink=0.8)
    return save_figure(fig, path)


def _tsne_figure(points: np.ndarray, shapes: list[str], kinds: list[str], path: Path, names: list[str]) -> Path:
    import matplotlib

    colours = matplotlib.colormaps["tab10"]
    fig = new_figure(width=7.0, height=5.6)
    ax = fig.add_subplot()
    for k, name in enumerate(names):
        for kind, marker, size in (("image", "o", 14), ("text", "x", 28)):
            mask = np.array([s == name and t == kind for s, t in zip(shapes, kinds)])
            if mask.any():
                ax.scatter(points[mask, 0], points[mask, 1], s=size, marker=marker, color=colours(k),
                           alpha=0.75, linewidths=1 if kind == "text" else 0,
                           label=f"{name} ({kind})" if kind == "image" else None)
    ax.scatter([], [], marker="x", color="gray", label="× = a caption")
    ax.set_title("t-SNE of image embeddings (●) and caption embeddings (×), coloured by shape", fontsize=10)
    ax.set_xlabel("t-SNE 1")
    ax.set_ylabel("t-SNE 2")
    ax.legend(fontsize=7.5, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return save_figure(fig, path)


@torch.inference_mode()
def run_clip_space(out_dir: str | Path, *, model_dir: str | Path, n: int = 150, seed: int = 0,
                   attribute_n: int = 200) -> ClipSpaceReport:
    """Write the figures and metrics.json of the CLIP explainer into `out_dir`."""
    from unclip.clip.stage import load_clip
    from unclip.clip.zeroshot import attribute_accuracy
    from unclip.data.render import render
    from unclip.data.shapes import to_tensor
    from unclip.data.world import SHAPES, canonical_caption
    from unclip.explain.distance import neighbour_agreement, tsne_map
    from unclip.explain.tsne_html import write_scatter_html

    began = time.perf_counter()
    model = load_clip(model_dir)
    out = start_output(out_dir)
    size = model.config.image_size

    # 1. the similarity matrix
    scenes = _single_scenes("test", 8)
    images = [render(s, size) for s in scenes]
    captions = [canonical_caption(s, lang="en") for s in scenes]
    z_i = model.encode_image(torch.stack([to_tensor(im) for im in images]))
    sims = (z_i @ model.encode_captions(captions).t()).numpy()
    paths = {"similarity": _similarity_figure(images, captions, sims, out / "similarity.png")}

    # 2. zero-shot classification as nearest caption
    zero_shot = {split: {lang: {a: attribute_accuracy(model, split=split, lang=lang, attribute=a, n=attribute_n)
                                for a in ("colour", "shape")} for lang in ("en", "th")}
                 for split in ("test", "unseen")}

    # 3. images and captions in one t-SNE
    scenes = _single_scenes("test", n)
    renders = [render(s, size) for s in scenes]
    z_img = model.encode_image(torch.stack([to_tensor(im) for im in renders]))
    texts = [canonical_caption(s, lang=("en", "th")[i % 2]) for i, s in enumerate(scenes)]
    z_txt = model.encode_captions(texts)
    points, _ = tsne_map(torch.cat([z_img, z_txt]).numpy(), seed=seed, perplexity=30, max_iter=1000)
    names = list(SHAPES)
    shapes = [s.objects[0].shape for s in scenes] * 2
    kinds = ["image"] * n + ["text"] * n
    labels = np.array([names.index(s) for s in shapes])
    paths["tsne"] = _tsne_figure(points, shapes, kinds, out / "tsne_image_text.png", names)
    pictures = np.stack([np.asarray(im, dtype=np.float32) / 255 for im in renders] * 2)
    paths["tsne_html"] = write_scatter_html(
        out / "tsne_image_text.html", points=points, labels=labels, images=pictures, class_names=names,
        title="CLIP's shared space: images and captions, t-SNE",
        subtitle="each scene twice: its image embedding (●) and its caption's embedding (○), coloured by shape; "
                 "hover or tap a point to see the scene and the caption",
        notes=[f"image: {t}" for t in texts] + [f"caption: {t}" for t in texts],
        rings=[kind == "text" for kind in kinds], point_names=("image", "caption"), label_name="shape",
        invert=False)  # the legend counts each shape's images and captions: its points are twice its scenes
    matched = float(np.mean((z_img * z_txt).sum(1).numpy()))
    shuffled = float(np.mean((z_img * z_txt.roll(1, dims=0)).sum(1).numpy()))
    nearest = (z_txt @ z_img.t()).argmax(dim=1).numpy()
    metrics = {
        "model": str(model_dir),
        "similarity_diagonal_wins": int((sims.argmax(axis=1) == np.arange(len(sims))).sum()),
        "zero_shot": zero_shot,
        "cosine_matched": matched,
        "cosine_unmatched": shuffled,
        "caption_nearest_image_same_shape": float(np.mean([scenes[j].objects[0].shape == scenes[i].objects[0].shape
                                                          for i, j in enumerate(nearest)])),
        "tsne_neighbour_agreement_by_shape": neighbour_agreement(points, labels, k=5),
        "n": n,
        "seed": seed,
    }
    seconds = time.perf_counter() - began
    metrics["seconds"] = round(seconds, 1)
    paths["metrics"] = write_json_atomic(out / "metrics.json", metrics)
    return ClipSpaceReport(metrics=metrics, paths=paths, seconds=seconds)
