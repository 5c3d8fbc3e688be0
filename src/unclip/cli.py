"""The `unclip` command line: parse, build config, call library functions.

Each area of the library registers its own verbs through a `register(subparsers)` function
in its `cli` module, so this file stays a table of contents.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

from unclip import __version__
from unclip.errors import UnclipError

# Modules with a `register(subparsers)` function, in the order their verbs appear in --help.
COMMAND_MODULES = (
    "unclip.pipeline.cli",
    "unclip.pipeline.interop_cli",
    "unclip.data.cli",
    "unclip.config_cli",
    "unclip.train.cli",
    "unclip.clip.cli",
    "unclip.explain.cli",
    "unclip.eval.cli",
)


def _demo(args: argparse.Namespace) -> int:
    from unclip.data.preview import write_preview

    out = Path(args.out)
    path = write_preview(out / "shapes_world.png", split="train", n=args.n, size=args.size, seed=args.seed)
    print(f"Shapes world: {args.n} scenes with their English and Thai captions -> {path}")
    print(
        "Next: no trained model ships yet. The stages that turn these captions into images "
        "(CLIP, priors, decoder, upsamplers) are being built; see README.md#roadmap."
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unclip",
        description="DALL-E 2 (unCLIP) you can train, run and study. Every verb has --help.",
    )
    parser.add_argument("--version", action="version", version=f"unclip {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    demo = sub.add_parser("demo", help="show the bundled default in seconds", description=(
        "Render a grid of shapes-world scenes with their English and Thai captions."))
    demo.add_argument("--out", default="out/demo", help="output folder (default: out/demo)")
    demo.add_argument("-n", type=int, default=16, help="number of scenes (default: 16)")
    demo.add_argument("--size", type=int, default=96, help="image side in pixels (default: 96)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.set_defaults(func=_demo)

    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except UnclipError as err:
        print(f"unclip: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("unclip: interrupted", file=sys.stderr)
        return 130
