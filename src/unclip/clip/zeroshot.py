"""Zero-shot classification and the CLIP evaluation on shapes world.

Zero-shot classification is a nearest-caption decision in CLIP's shared space: the image's z_i
against the z_t of one caption per label, softmax over `logit_scale · cosine`.

Attribute accuracy (DESIGN §6): for a scene, the candidates are the scene's own canonical
caption with one attribute swept over all its values ("a small red star on the left" → "... blue
star ...", "... green star ..."); the answer is correct when the true value wins. Colour, shape,
size and position are read on one-object scenes, count on counting scenes, for the `test` split
(seen colour–shape pairs) and the `unseen` split (held-out pairs), per language.

Binding: on two-object scenes (two colours, two shapes), the scene's canonical caption against one
wrong reading of the same words, two ways to choose: the colours traded between the objects
(`colour_binding`: "a red circle left of a blue square" → "a blue circle left of a red square"),
the shapes traded (`shape_binding`) or the relation turned round (`relation`: "… right of …").
A bag of words scores 0.5; the decoder can only draw what z_i tells apart (docs/clip.md).

Retrieval: 1,000 `val` images, each queried by its canonical caption; a hit at k is an image in
the top k whose scene has the same canonical caption (identical descriptions are the same query).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from unclip.clip.model import MAX_LOGIT_SCALE, ClipModel

ATTRIBUTES = ("colour", "shape", "size", "position", "count")
BINDINGS = ("colour_binding", "shape_binding", "relation")
TRADED = {"colour_binding": "colour", "shape_binding": "shape", "relation": "place"}  # what each binding trades


@torch.inference_mode()
def classify(model: ClipModel, images: torch.Tensor, labels: Sequence[str]) -> torch.Tensor:
    """Probabilities [B, K] of each of K `labels` for images [B, 3, H, W] in [-1, 1]."""
    z_i = model.encode_image(images)
    z_t = model.encode_captions(list(labels))
    scale = model.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
    return (scale * z_i @ z_t.t()).softmax(dim=-1)


def _values(attribute: str) -> tuple:
    from unclip.data import world

    return {"colour": tuple(world.COLORS), "shape": tuple(world.SHAPES), "size": tuple(world.SIZES),
            "position": tuple(world.POSITIONS), "count": tuple(world.COUNTS)}[attribute]


def _swap(scene, attribute: str, value):
    """The scene with `attribute` of its (first) object, or its count, set to `value`."""
    if attribute == "count":
        return dataclasses.replace(scene, count=value)
    obj = dataclasses.replace(scene.objects[0], **{attribute: value})
    return dataclasses.replace(scene, objects=(obj, *scene.objects[1:]))


def candidates(scene, attribute: str) -> list:
    """The scenes whose captions compete for `scene`'s image: the true scene first, then the wrong ones.
    A binding's wrong scene is a real scene too (the relation's: the objects' places traded), so its
    render can stand in for the wrong image (`unclip.prior.metrics`)."""
    from unclip.data.twins import traded

    if attribute in BINDINGS:
        return [scene, traded(scene, TRADED[attribute])]
    truth = scene.count if attribute == "count" else getattr(scene.objects[0], attribute)
    return [scene, *(_swap(scene, attribute, v) for v in _values(attribute) if v != truth)]


def _answers(scene, attribute: str) -> bool:
    """Can `scene` answer `attribute`? Bindings need two objects of different colours and shapes."""
    if attribute in BINDINGS:
        return (scene.kind == "pair" and scene.objects[0].colour != scene.objects[1].colour
                and scene.objects[0].shape != scene.objects[1].shape)
    return scene.kind == ("count" if attribute == "count" else "single")


def scenes_for(split: str, attribute: str, n: int, seed: int) -> Iterator:
    """The first `n` scenes of `split` that can answer `attribute`."""
    from unclip.data.world import sample

    found, index = 0, 0
    while found < n:
        scene = sample(split, index, seed=seed, lang="en").scene
        index += 1
        if _answers(scene, attribute):
            found += 1
            yield scene


def render_and_encode(model: ClipModel) -> Callable[[list, str], torch.Tensor]:
    """The default scene → z_i: render each scene and encode it with CLIP's image tower."""
    from unclip.data.render import render
    from unclip.data.shapes import to_tensor

    def embed(scenes: list, lang: str) -> torch.Tensor:
        size = model.config.image_size
        return model.encode_image(torch.stack([to_tensor(render(s, size)) for s in scenes]))

    return embed


@torch.inference_mode()
def attribute_accuracy(model: ClipModel, *, split: str, lang: str, attribute: str, n: int = 300,
                       seed: int = 0, batch_size: int = 100,
                       embed: Callable[[list, str], torch.Tensor] | None = None) -> float:
    """Fraction of `n` scenes whose own caption wins among its `candidates` for `attribute` (one of
    ATTRIBUTES: every value of it; or of BINDINGS: the one wrong binding).

    `embed(scenes, lang) -> z [N, D]` gives the embedding judged for each scene: by default the
    CLIP image embedding of its render; a prior's evaluation passes the z_i it predicts from the
    scene's caption instead.
    """
    from unclip.data.world import canonical_caption

    scenes = list(scenes_for(split, attribute, n, seed))
    options = [[canonical_caption(c, lang=lang) for c in candidates(s, attribute)] for s in scenes]
    prompts = sorted({p for row in options for p in row})
    z_t = torch.cat([model.encode_captions(prompts[i:i + 512]) for i in range(0, len(prompts), 512)])
    row = {p: i for i, p in enumerate(prompts)}
    embed = embed or render_and_encode(model)
    correct = 0
    for start in range(0, len(scenes), batch_size):
        chunk = scenes[start:start + batch_size]
        for captions, z in zip(options[start:start + batch_size], embed(chunk, lang)):
            scores = z_t[[row[c] for c in captions]] @ z  # the true caption first
            # strictly first: argmax reads a tie (a constant embedding) or NaN as the true caption
            correct += bool(torch.isfinite(scores).all() and scores[0] > scores[1:].max())
    return correct / len(scenes)


@torch.inference_mode()
def retrieval(model: ClipModel, *, lang: str, n: int = 1000, split: str = "val", seed: int = 0) -> dict[str, float]:
    """Text→image recall@1 and @5 over `n` pairs of `split`."""
    from unclip.data.world import canonical_caption, sample

    scenes = [sample(split, i, seed=seed, lang=lang).scene for i in range(n)]
    captions = [canonical_caption(s, lang=lang) for s in scenes]
    embed = render_and_encode(model)
    z_i = torch.cat([embed(scenes[i:i + 250], lang) for i in range(0, n, 250)])
    z_t = torch.cat([model.encode_captions(captions[i:i + 250]) for i in range(0, n, 250)])
    return _recall(z_t @ z_i.t(), captions)


def _recall(scores: torch.Tensor, captions: list[str]) -> dict[str, float]:
    """Recall@1 and @5 of scores [n, n] (query q against candidate j); a candidate with the query's
    caption counts as a hit."""
    n = len(captions)
    top = scores.topk(min(5, n), dim=1).indices  # [n, ≤5] candidates per query
    hits = [[captions[j] == captions[q] for j in top[q].tolist()] for q in range(n)]
    return {"r1": sum(h[0] for h in hits) / n, "r5": sum(any(h) for h in hits) / n}


@torch.no_grad()
def pair_retrieval(model: ClipModel, images: torch.Tensor, captions: list[str]) -> dict[str, float]:
    """Recall@1 and @5 of caption → image and image → caption among `images` [n, 3, S, S] and their
    `captions` (e.g. the first pairs of a data set that is not shapes world), and chance at @1."""
    model.eval()
    z_i = torch.cat([model.encode_image(images[i:i + 250]) for i in range(0, len(captions), 250)])
    z_t = torch.cat([model.encode_captions(captions[i:i + 250]) for i in range(0, len(captions), 250)])
    text_to_image, image_to_text = _recall(z_t @ z_i.t(), captions), _recall(z_i @ z_t.t(), captions)
    return {"pairs": len(captions), "text_to_image_r1": round(text_to_image["r1"], 4),
            "text_to_image_r5": round(text_to_image["r5"], 4), "image_to_text_r1": round(image_to_text["r1"], 4),
            "image_to_text_r5": round(image_to_text["r5"], 4), "chance_r1": round(1 / len(captions), 4)}


def evaluate_clip(model: ClipModel, *, n: int = 300, retrieval_n: int = 1000, progress: bool = True,
                  langs: Sequence[str] = ("en", "th"), splits: Sequence[str] = ("test", "unseen")) -> dict:
    """Zero-shot attribute and binding accuracy per split and language, and retrieval per language."""
    model.eval()
    jobs = [(s, lang, a) for s in splits for lang in langs for a in ATTRIBUTES + BINDINGS]
    result: dict = {"zero_shot": {s: {lang: {} for lang in langs} for s in splits}, "retrieval": {}, "n": n}
    for split, lang, attribute in tqdm(jobs, desc="eval clip", disable=not progress):
        result["zero_shot"][split][lang][attribute] = attribute_accuracy(
            model, split=split, lang=lang, attribute=attribute, n=n)
    for lang in langs:
        result["retrieval"][lang] = retrieval(model, lang=lang, n=retrieval_n)
    return result


def markdown_table(result: dict) -> str:
    """The zero-shot and retrieval numbers as a markdown table ("–" where a result predates a column)."""
    columns = ATTRIBUTES + BINDINGS
    lines = ["| split | lang | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for split, by_lang in result["zero_shot"].items():
        for lang, accs in by_lang.items():
            lines.append(f"| {split} | {lang} | " + " | ".join(f"{accs[a]:.3f}" if a in accs else "–"
                                                                for a in columns) + " |")
    lines += ["", "| lang | R@1 | R@5 |", "|---|---|---|"]
    lines += [f"| {lang} | {r['r1']:.3f} | {r['r5']:.3f} |" for lang, r in result["retrieval"].items()]
    return "\n".join(lines)
