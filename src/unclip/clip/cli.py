"""`unclip clip classify|eval` and `unclip embed`."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from unclip.argtypes import positive_int, seed_number
from unclip.errors import DataError


def _load_images(paths: list[str], size: int):
    import torch

    from unclip.data.folder import open_square_rgb, unreadable_errors
    from unclip.data.shapes import to_tensor

    tensors = []
    for p in paths:
        try:
            tensors.append(to_tensor(open_square_rgb(p, size)))
        except unreadable_errors() as err:
            raise DataError(f"cannot read image {p}: {err}") from None
    return torch.stack(tensors)


def _label_reader(model_dir):
    """Labels as `generate` reads prompts (`UnclipPipeline.read_form`): a CLIP trained on shapes world
    reads them in its captions' form ("An Orange Triangle" as "an orange triangle", which it had read
    as a red circle); words its captions never use are warned about (for a CLIP trained on other data,
    words of none of the captions its tokenizer learnt from, `unclip.words`)."""
    from unclip.config import UnclipConfig
    from unclip.modeldir import read_manifest
    from unclip.pipeline.prompts import reads_world_captions
    from unclip.tokenizer import clean_text

    from unclip.words import CaptionWords, did_you_mean

    if reads_world_captions(UnclipConfig.from_dict(read_manifest(model_dir).config)):
        from unclip.data.vocabulary import caption_form, unknown_words, vocabulary

        form, unknown_in, known, never = caption_form, unknown_words, vocabulary(), "never saw %s in training"
    elif words := CaptionWords.load(Path(model_dir) / "tokenizer"):
        form, unknown_in, known = clean_text, words.unknown, words.words
        never = f"read none of %s in the {words.captions:,} training captions it learnt its words from"
    else:
        return clean_text

    def read(label: str) -> str:
        text = form(label)
        if unknown := unknown_in(text):
            logging.getLogger(__name__).warning(f"label %r: this CLIP {never}%s", label,
                                                ", ".join(map(repr, unknown)), did_you_mean(unknown, known))
        return text

    return read


def _classify(args: argparse.Namespace) -> int:
    from unclip.clip.stage import load_clip
    from unclip.clip.zeroshot import classify

    from unclip.pipeline import default_model_dir

    labels = [label.strip() for label in args.labels]
    if len(labels) < 2 or not all(labels):
        raise DataError("give at least two non-empty --labels, e.g. --labels \"a red circle\" \"a blue square\"")
    model_dir = args.model or default_model_dir()
    read = _label_reader(model_dir)
    forms = [read(label) for label in labels]
    if repeated := sorted({label for label, form in zip(labels, forms) if forms.count(form) > 1}):
        raise DataError(f"--labels {', '.join(map(repr, repeated))} read as the same words; give each label once")
    model = load_clip(model_dir)
    probs = classify(model, _load_images(args.images, model.config.image_size), forms)
    results = []
    for path, row in zip(args.images, probs.tolist()):
        ranked = sorted(zip(labels, row), key=lambda x: -x[1])
        results.append({"image": path, "label": ranked[0][0], "probs": dict(ranked)})
        if not args.json:
            print(f"{path}: {ranked[0][0]}  ({ranked[0][1]:.3f})")
            for label, p in ranked[1:]:
                print(f"    {label}: {p:.3f}")
    if args.json:
        print(json.dumps(results, ensure_ascii=False, indent=2))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from unclip.clip.stage import load_clip
    from unclip.clip.zeroshot import evaluate_clip, markdown_table
    from unclip.errors import ConfigError
    from unclip.io import check_output_dir
    from unclip.modeldir import read_manifest

    if args.out:  # a JSON file: checked before the evaluation, not after
        if Path(args.out).is_dir():
            raise ConfigError(f"--out {args.out} is a folder; give the JSON file to write, e.g. {args.out}/clip.json")
        check_output_dir(Path(args.out).parent)
    trained_on = read_manifest(args.model).config.get("data", {}).get("source", "shapes")
    if trained_on != "shapes":
        logging.getLogger(__name__).warning(
            "%s was trained on data.source=%s; these zero-shot and retrieval tests are shapes world's, so they say "
            "how it reads shapes-world renders, which means something only if its data held them", args.model,
            trained_on)
    result = evaluate_clip(load_clip(args.model), n=args.n, retrieval_n=args.retrieval_n)
    result["trained_on"] = trained_on
    print(markdown_table(result))
    if args.out:
        from unclip.io import write_json_atomic

        write_json_atomic(args.out, result)
        print(f"wrote {args.out}")
    return 0


def _embed(args: argparse.Namespace) -> int:
    from unclip.clip.embed import embed_dataset
    from unclip.clip.stage import load_clip
    from unclip.train.trainer import training_device

    from unclip.data.world import SPLIT_LENGTHS, SPLITS
    from unclip.errors import ConfigError
    from unclip.io import check_output_dir

    if args.source != "shapes" and not args.path:
        raise ConfigError(f"--source {args.source} needs --path: the folder or the shard pattern to embed")
    if args.source == "shapes" and args.split not in SPLITS:
        raise ConfigError(f"--split {args.split}: shapes world's splits are {', '.join(SPLITS)}")
    if args.source == "shapes" and args.n > SPLIT_LENGTHS.get(args.split, args.n):
        raise ConfigError(f"-n {args.n}: shapes world's {args.split} split holds {SPLIT_LENGTHS[args.split]} pairs")
    check_output_dir(args.out)
    strangers = [p.name for p in Path(args.out).glob("*") if p.suffix != ".npz" and p.name != "meta.json"
                 and not p.name.startswith(".")] if Path(args.out).is_dir() else []
    if strangers:  # shards of an interrupted run (no meta.json yet) are this command's own: it resumes them
        raise ConfigError(f"{args.out} holds files that are not embeddings ({', '.join(sorted(strangers)[:3])}): give "
                          "an empty or new folder, or one this command wrote before")
    model = load_clip(args.model).to(training_device())
    out = embed_dataset(model, args.out, source=args.source, split=args.split, n=args.n, path=args.path,
                        lang=args.lang, seed=args.seed, shard_size=args.shard_size, model_path=str(args.model))
    from unclip.train import dist

    if dist.rank_world()[0] > 0:  # under torchrun / accelerate launch the main process says it once
        return 0
    meta = json.loads((Path(out) / "meta.json").read_text())
    print(f"embedded {meta['total']} pairs into {len(meta['shards'])} shard(s) in {out}")
    return 0


def register(subparsers) -> None:
    clip = subparsers.add_parser("clip", help="zero-shot classification and evaluation with a CLIP model")
    verbs = clip.add_subparsers(dest="clip_verb", metavar="VERB", required=True)

    c = verbs.add_parser("classify", help="which caption fits each image best",
                         description="Zero-shot classification: each image is compared with each label "
                                     "caption in CLIP's shared embedding space (cosine similarity).")
    c.add_argument("images", nargs="+", metavar="IMAGE", help="image files (centre-cropped to a square)")
    c.add_argument("--labels", nargs="+", required=True, help="candidate captions, e.g. \"a red circle\" \"วงกลมสีแดง\"")
    c.add_argument("--model", help="model directory holding a CLIP (e.g. runs/shapes/clip/model; default: the "
                                   "shipped model's)")
    c.add_argument("--json", action="store_true", help="print JSON instead of text")
    c.set_defaults(func=_classify)

    e = verbs.add_parser("eval", help="zero-shot attribute accuracy and retrieval on shapes world")
    e.add_argument("model", help="model directory holding a CLIP")
    e.add_argument("-n", type=positive_int, default=300, help="scenes per attribute, split and language (default: 300)")
    e.add_argument("--retrieval-n", type=positive_int, default=1000, help="val pairs for retrieval (default: 1000)")
    e.add_argument("--out", help="write the results as JSON here")
    e.set_defaults(func=_eval)

    m = subparsers.add_parser("embed", help="CLIP image and text embeddings of a data set, in shards aligned by key",
                              description="Write z_i and z_t of every pair into .npz shards (keys, image_embeds, "
                                          "text_embeds, captions) with a meta.json; webdataset shard 000123.tar "
                                          "becomes 000123.npz with the same keys in the same order. Run again "
                                          "into the same folder, it keeps the shards the same CLIP wrote whole "
                                          "and writes the rest; meta.json is written last.")
    m.add_argument("model", help="model directory holding a CLIP")
    m.add_argument("--out", required=True, help="output folder")
    m.add_argument("--source", choices=["shapes", "folder", "webdataset"], default="shapes",
                   help="shapes (the shapes world, rendered), folder (images with same-name .txt captions) or "
                        "webdataset (shards); folder and webdataset need --path (default: shapes)")
    m.add_argument("--path", default="", help="folder, or shard pattern like 'data/{000000..000009}.tar' "
                                              "(default: none; needed for folder and webdataset)")
    m.add_argument("--split", default="train", help="shapes-world split (default: train)")
    m.add_argument("-n", type=positive_int, default=10_000, help="shapes-world pairs (default: 10000)")
    m.add_argument("--lang", default="mix", choices=["en", "th", "mix"],
                   help="shapes-world caption language: en, th or mix, 50/50 (default: mix)")
    m.add_argument("--seed", type=seed_number, default=0, help="shapes-world data seed (default: 0)")
    m.add_argument("--shard-size", type=positive_int, default=10_000,
                   help="pairs per .npz shard for shapes and folder; webdataset keeps its tars' (default: 10000)")
    m.set_defaults(func=_embed)
