"""How well a prior predicts z_i from a caption (issue 4's metrics, DESIGN §6).

- cosine(predicted z_i, true z_i), beside two references: the caption baseline
  cosine(z_t, z_i) — what using the text embedding directly as z_i would score (the paper's
  "z_t as z_i" ablation) — and the unrelated-caption floor, the prior's prediction for another
  sample's caption against this sample's z_i.
- zero-shot attribute and binding accuracy of the predicted z_i, judged with CLIP text prompts
  exactly as image embeddings are judged in `unclip.clip.zeroshot`.
- binding in image space: for a two-object scene's caption, is the predicted z_i nearer the z_i of
  the scene's render than of its rebinding's (colours, shapes or places traded)? This is what the
  decoder is handed; text prompts cannot ask it where CLIP's text tower does not tell the two
  captions apart (the relation, docs/clip.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from unclip.clip.model import ClipModel
from unclip.prior.data import encode_batch, sample_pairs

# predict(text_states, text_mask, z_t, generator) -> z_i [B, D]
Predict = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]


@torch.no_grad()
def cosine_metrics(predict: Predict, pairs: dict[str, torch.Tensor], *, seed: int = 0,
                   batch_size: int = 250) -> dict[str, float]:
    """Mean cosines of predictions against the truth, the caption baseline and the floor."""
    n = len(pairs["z_i"])
    generator = torch.Generator().manual_seed(seed)
    shuffled = torch.randperm(n, generator=generator)

    def run(index: torch.Tensor) -> torch.Tensor:
        return torch.cat([predict(pairs["text_states"][index[i:i + batch_size]],
                                  pairs["text_mask"][index[i:i + batch_size]],
                                  pairs["z_t"][index[i:i + batch_size]], generator)
                          for i in range(0, n, batch_size)])

    z_i = pairs["z_i"]
    pred = run(torch.arange(n))
    if not torch.isfinite(pred).all():  # else every mean below is NaN, and NaN ranks first in argmax
        from unclip.errors import SamplingError

        raise SamplingError("the prior's predicted z_i hold NaN or infinite values: its weights or its sampling "
                            "settings (eta, steps, guidance) are broken")
    unrelated = run(shuffled)
    return {
        "cosine": float((pred * z_i).sum(1).mean()),
        "caption_baseline": float((pairs["z_t"] * z_i).sum(1).mean()),
        "unrelated_floor": float((unrelated * z_i).sum(1).mean()),
        "n": n,
    }


def prior_embedder(clip: ClipModel, predict: Predict, *, seed: int = 0) -> Callable[[list, str], torch.Tensor]:
    """scene list → predicted z_i, from each scene's canonical caption (for attribute accuracy)."""
    from unclip.data.world import canonical_caption

    generator = torch.Generator().manual_seed(seed)

    def embed(scenes: list, lang: str) -> torch.Tensor:
        batch = encode_batch(clip, [canonical_caption(s, lang=lang) for s in scenes])
        return predict(batch["text_states"], batch["text_mask"], batch["z_t"], generator)

    return embed


@torch.no_grad()
def image_binding_accuracy(clip: ClipModel, predict: Predict, *, split: str, lang: str, binding: str, n: int = 200,
                           seed: int = 0) -> float:
    """Fraction of `n` two-object scenes whose predicted z_i lies nearer their render's z_i than the
    render of their `binding` rebinding (one of `unclip.clip.zeroshot.BINDINGS`)."""
    from unclip.clip.zeroshot import candidates, render_and_encode, scenes_for

    scenes = list(scenes_for(split, binding, n, seed))
    render = render_and_encode(clip)
    predicted = prior_embedder(clip, predict, seed=seed)(scenes, lang)
    right = render(scenes, lang)
    wrong = render([candidates(s, binding)[1] for s in scenes], lang)
    return float(((predicted * right).sum(1) > (predicted * wrong).sum(1)).float().mean())


def evaluate_prior(clip: ClipModel, predict: Predict, *, n: int = 1000, attribute_n: int = 200,
                   langs: Sequence[str] = ("en", "th"), splits: Sequence[str] = ("val", "unseen"),
                   attributes: Sequence[str] | None = None, progress: bool = True) -> dict:
    """Cosine metrics, attribute and binding accuracy of predicted z_i (`unclip.clip.zeroshot`: every
    attribute and binding unless `attributes` names some) and, for the bindings, binding in image
    space (`image_binding_accuracy`), per split and language."""
    from tqdm.auto import tqdm

    from unclip.clip.zeroshot import ATTRIBUTES, BINDINGS, attribute_accuracy

    attributes = ATTRIBUTES + BINDINGS if attributes is None else tuple(attributes)
    result: dict = {}
    for split, lang in tqdm([(s, lg) for s in splits for lg in langs], desc="eval prior", disable=not progress):
        pairs = sample_pairs(clip, split=split, n=n, lang=lang)
        entry = cosine_metrics(predict, pairs)
        embed = prior_embedder(clip, predict)
        entry["attributes"] = {a: attribute_accuracy(clip, split=split, lang=lang, attribute=a, n=attribute_n,
                                                     embed=embed) for a in attributes}
        entry["image_binding"] = {b: image_binding_accuracy(clip, predict, split=split, lang=lang, binding=b,
                                                            n=attribute_n) for b in attributes if b in BINDINGS}
        result.setdefault(split, {})[lang] = entry
    return result


def markdown_table(result: dict) -> str:
    """Cosines, attribute accuracies and image-space binding of a prior evaluation as a markdown table."""
    first = next(iter(next(iter(result.values())).values()))
    attributes, images = list(first["attributes"]), list(first.get("image_binding", {}))
    columns = attributes + [f"{b} (image)" for b in images]
    lines = ["| split | lang | cos(pred, z_i) | caption baseline cos(z_t, z_i) | unrelated floor | "
             + " | ".join(columns) + " |", "|---|---|---|---|---|" + "---|" * len(columns)]
    for split, by_lang in result.items():
        for lang, e in by_lang.items():
            values = [e["attributes"][a] for a in attributes] + [e["image_binding"][b] for b in images]
            lines.append(f"| {split} | {lang} | {e['cosine']:.3f} | {e['caption_baseline']:.3f} | "
                         f"{e['unrelated_floor']:.3f} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    return "\n".join(lines)
