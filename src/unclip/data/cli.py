"""`unclip data preview|export`: look at shapes world and write it to disk."""

from __future__ import annotations

import argparse

from unclip.data.world import SPLITS


def _preview(args: argparse.Namespace) -> int:
    from unclip.data.preview import write_preview

    path = write_preview(args.out, split=args.split, n=args.n, size=args.size, seed=args.seed, lang=args.lang)
    print(f"wrote {path}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from unclip.data.export import export_folder, export_webdataset

    if args.format == "webdataset":
        shards = export_webdataset(args.out, split=args.split, n=args.n, size=args.size, seed=args.seed,
                                   lang=args.lang, shard_size=args.shard_size)
        print(f"wrote {args.n} samples in {len(shards)} shard(s): {shards[0]} ... {shards[-1].name}")
    else:
        export_folder(args.out, split=args.split, n=args.n, size=args.size, seed=args.seed, lang=args.lang)
        print(f"wrote {args.n} image + caption pairs to {args.out}")
    return 0


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="preview and export the shapes-world data set",
                                 description="Shapes world: procedural coloured shapes with English and Thai captions.")
    verbs = data.add_subparsers(dest="data_verb", metavar="VERB", required=True)

    p = verbs.add_parser("preview", help="a grid of scenes with English and Thai captions (PNG)")
    p.add_argument("--split", default="train", choices=sorted(SPLITS), help="which split (default: train)")
    p.add_argument("-n", type=int, default=16, help="number of scenes (default: 16)")
    p.add_argument("--size", type=int, default=96, help="image side in pixels (default: 96)")
    p.add_argument("--seed", type=int, default=0, help="data seed (default: 0)")
    p.add_argument("--lang", default="both", choices=["both", "en", "th"], help="caption languages (default: both)")
    p.add_argument("--out", default="out/preview.png", help="PNG to write (default: out/preview.png)")
    p.set_defaults(func=_preview)

    e = verbs.add_parser("export", help="write webdataset shards (img2dataset layout) or a caption folder",
                         description="webdataset: 000000.tar ... with KEY.jpg, KEY.txt, KEY.json; "
                                     "folder: KEY.png + KEY.txt + KEY.json.")
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument("--format", default="webdataset", choices=["webdataset", "folder"])
    e.add_argument("--split", default="train", choices=sorted(SPLITS))
    e.add_argument("-n", type=int, default=1000, help="number of samples (default: 1000)")
    e.add_argument("--size", type=int, default=64, help="image side in pixels (default: 64)")
    e.add_argument("--lang", default="mix", choices=["en", "th", "mix"], help="caption language (default: mix)")
    e.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default: 1000)")
    e.add_argument("--seed", type=int, default=0)
    e.set_defaults(func=_export)
