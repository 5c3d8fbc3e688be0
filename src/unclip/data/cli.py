"""`unclip data preview|export|check`: look at shapes world, write it to disk, check your own data.

Values are checked by the library functions, which raise `DataError` naming the valid ones.
"""

from __future__ import annotations

import argparse

from unclip.argtypes import holdout, int_range, picture_path, positive_int, seed_number
from unclip.data.world import SPLIT_LENGTHS, SPLITS

_SPLITS_HELP = ", ".join(f"{s} ({SPLIT_LENGTHS[s]:,} samples)" if s in SPLIT_LENGTHS else f"{s} (endless)"
                         for s in SPLITS)


def _preview(args: argparse.Namespace) -> int:
    from unclip.data.preview import write_preview

    path = write_preview(args.out, split=args.split, n=args.n, size=args.size, seed=args.seed, lang=args.lang)
    print(f"wrote {path}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from unclip.data.export import export_folder, export_webdataset
    from unclip.io import check_output_dir

    check_output_dir(args.out)
    if args.format == "webdataset":
        shards = export_webdataset(args.out, split=args.split, n=args.n, size=args.size, seed=args.seed,
                                   lang=args.lang, shard_size=args.shard_size, quality=args.quality)
        from unclip.data.folder import shard_pattern

        pattern = shard_pattern(shards)
        print(f"wrote {args.n} samples of {args.split} in {len(shards)} shard(s): {shards[0]} ... {shards[-1].name}; "
              f"read them as '{pattern}' (unclip data check, --set data.source=webdataset --set data.path=...)")
    else:
        export_folder(args.out, split=args.split, n=args.n, size=args.size, seed=args.seed, lang=args.lang)
        print(f"wrote {args.n} samples of {args.split} as KEY.png + KEY.txt + KEY.json to {args.out}")
    return 0


def _check(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    from unclip.data.check import check_data

    report = check_data(args.path, size=args.size, holdout=args.holdout, progress=not args.json)
    if args.json:
        print(json.dumps(asdict(report), ensure_ascii=False, indent=2))
    else:
        print("\n".join(report.lines(args.holdout)))
    if args.sheet:
        from PIL import Image

        from unclip.data.check import first_usable
        from unclip.data.preview import captioned_grid
        from unclip.io import save_image_atomic
        from unclip.tokenizer import has_thai

        # read again without the feeds, which would log the skipped pairs the report has just listed
        images, captions = first_usable(args.path, 16, source=report.source, size=args.size)
        cell = max(96, args.size)
        tiles = [image.resize((cell, cell), Image.Resampling.NEAREST) for image in images]
        labels = [[("th" if has_thai(c) else "en", c)] for c in captions]
        save_image_atomic(args.sheet, captioned_grid(tiles, labels, columns=8))
        if not args.json:
            print(f"the first {len(captions)} pairs as training reads them: {args.sheet}")
    return 0


def register(subparsers) -> None:
    """Add the `data` verb and its sub-verbs `preview`, `export` and `check` to the main parser."""
    data = subparsers.add_parser(
        "data", help="preview and export the shapes-world data set; check a folder or shards of your own",
        description="Shapes world: procedural coloured shapes with English and Thai captions "
                    "(docs/shapes_world.md). Sample i of a split is the same on every machine for a seed.")
    verbs = data.add_subparsers(dest="data_verb", metavar="VERB", required=True)

    p = verbs.add_parser(
        "preview", help="a PNG grid of scenes with their English and Thai captions",
        description="Render scenes 0..n-1 of a split in a grid, each with its English and Thai captions "
                    "(--lang en or th: one of them).")
    p.add_argument("--split", default="train", help=f"{_SPLITS_HELP} (default: train)")
    p.add_argument("-n", type=int_range(1, 1024), default=16, help="number of scenes (default: 16)")
    p.add_argument("--size", type=int_range(8, 1024, " (each scene is drawn at 4× that first)"), default=96, help="image side in pixels, at least 8 (default: 96)")
    p.add_argument("--seed", type=seed_number, default=0, help="data seed (default: 0)")
    p.add_argument("--lang", default="both", help="caption languages: both, en or th (default: both)")
    p.add_argument("--out", default="out/preview.png", type=picture_path("preview.png"),
                   help="PNG to write, or a folder to put preview.png in (default: out/preview.png)")
    p.set_defaults(func=_preview)

    e = verbs.add_parser(
        "export", help="write webdataset shards (img2dataset layout) or a caption folder",
        description="webdataset: 000000.tar, 000001.tar, ... each holding KEY.jpg, KEY.txt (caption) and "
                    "KEY.json (scene and metadata), with 000000_stats.json beside it; KEY is the 9-digit "
                    "sample index. folder: KEY.png + KEY.txt + KEY.json. Every file is written atomically; run "
                    "again with the same settings, an interrupted export keeps what it finished and writes the "
                    "rest: a webdataset export the shards whose stats record the settings and sha256, a folder "
                    "export the samples whose KEY.json records these settings' sample.")
    e.add_argument("--out", required=True, help="output folder (created if missing)")
    e.add_argument("--format", default="webdataset", choices=["webdataset", "folder"],
                   help="webdataset or folder (default: webdataset)")
    e.add_argument("--split", default="train", help=f"{_SPLITS_HELP} (default: train)")
    e.add_argument("-n", type=positive_int, default=1000, help="number of samples, from index 0 (default: 1000)")
    e.add_argument("--size", type=int_range(8, 1024, " (each scene is drawn at 4× that first)"), default=64, help="image side in pixels, at least 8 (default: 64)")
    e.add_argument("--lang", default="mix", help="caption language: en, th or mix, 50/50 (default: mix)")
    e.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default: 1000)")
    e.add_argument("--quality", type=int, default=95, help="JPEG quality of webdataset images (default: 95)")
    e.add_argument("--seed", type=seed_number, default=0, help="data seed (default: 0)")
    e.set_defaults(func=_export)

    c = verbs.add_parser(
        "check", help="what your caption folder or webdataset shards hold, before training on them",
        description="Read every pair as training would: how many are usable, which are skipped and why, how "
                    "many images training will upscale, crop or turn upright, how long the captions are, and "
                    "how many pairs a data.holdout keeps out. Nothing is written but the --sheet picture.")
    c.add_argument("path", help="a folder of images with same-name .txt captions, or shards 'DIR/{000000..000099}.tar'")
    c.add_argument("--size", type=positive_int, default=128,
                   help="the largest resolution a stage will train at (default: 128, the shapes preset's upsampler)")
    c.add_argument("--holdout", type=holdout, default=0.0, help="count the pairs this data.holdout keeps out (e.g. 0.05; default: 0, none)")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.add_argument("--sheet", metavar="PNG", type=picture_path("sheet.png"),
                   help="also draw the first 16 pairs as training reads them (cropped, upright, at --size) with "
                        "their captions into this PNG (a folder gets sheet.png; default: no sheet)")
    c.set_defaults(func=_check)
