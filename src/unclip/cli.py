"""The `unclip` command line: parse, build config, call library functions.

Each area of the library registers its own verbs through a `register(subparsers)` function
in its `cli` module, so this file stays a table of contents.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
from pathlib import Path

from unclip import __version__
from unclip.argtypes import output_folder, positive_int, seed_number
from unclip.errors import STOPPED, TrainingStopped, UnclipError

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
    "unclip.serve.cli",
)


DEMO_PROMPTS = ("a red circle above a blue square", "วงกลมสีแดงอยู่เหนือสี่เหลี่ยมจัตุรัสสีน้ำเงิน")


def _demo(args: argparse.Namespace) -> int:
    import time

    import unclip
    from unclip.data.preview import write_preview
    from unclip.pipeline.cli import write_outputs
    from unclip.pipeline.checks import prompt_list

    prompts = list(args.prompts or DEMO_PROMPTS)
    prompt_list(prompts)  # an empty prompt is refused before the preview is drawn and the model loads
    out = Path(args.out)
    path = write_preview(out / "shapes_world.png", split="train", n=8, size=96, seed=args.seed)
    print(f"shapes world, the data the default model learned from: {path}")
    started = time.perf_counter()
    pipe = unclip.load()
    images = pipe.generate(prompts, n=args.n, seed=args.seed)
    seconds = time.perf_counter() - started
    grid = out / "generate.png"
    write_outputs(images, grid, labels=[p for p in prompts for _ in range(args.n)],
                  params={"verb": "demo", "model": str(pipe.directory), "seed": args.seed})
    # on a CPU without bf16 units the demo takes ~3x as long: say why (README, docs/performance.md)
    slower = " (in float32: this CPU has no bfloat16 units, so it takes longer; README)" \
        if pipe.device.type == "cpu" and pipe.precision == "float32" else ""
    print(f"{len(images)} images from the shipped model in {seconds:.0f} s{slower}: {grid} (each image beside it as "
          f"generate-*.png)")
    print("two objects in one scene are this model's weak spot: which side each is on (its prior lays them out at "
          "random; a second text tower that reads 'left of' picks among six candidates, most often right), now and "
          "then which shape takes which colour (docs/model_card.md); one shape, a colour or a count it draws right")
    print('next: unclip generate "three green triangles" -n 4   (every verb has --help; docs/model_card.md)')
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unclip",
        description="DALL-E 2 (unCLIP) you can train, run and study. Every verb has --help.",
    )
    parser.add_argument("--version", action="version", version=f"unclip {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    demo = sub.add_parser("demo", help="generate images with the shipped model in seconds", description=(
        "Draw a few shapes-world scenes (the training data), then generate images from an English and a Thai "
        "caption with the shipped default model, and print where both pictures are."))
    demo.add_argument("prompts", nargs="*", metavar="PROMPT", help="captions to draw (default: a red circle above "
                      "a blue square, in English and Thai)")
    demo.add_argument("--out", default="out/demo", type=output_folder, help="output folder (default: out/demo)")
    demo.add_argument("-n", type=positive_int, default=2, help="images per caption (default: 2)")
    demo.add_argument("--seed", type=seed_number, default=0, help="random seed (default: 0)")
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
    if not args.verbose:  # torch's own INFO lines (compile caches, FakeTensor statistics at exit) are noise here
        logging.getLogger("torch").setLevel(logging.WARNING)
    try:
        code = int(args.func(args) or 0)
        if "torch.distributed" in sys.modules:  # under torchrun / accelerate launch
            from unclip.train.dist import finish

            finish()
        return code
    except TrainingStopped as err:  # not an error: the run checkpointed and resumes
        print(f"unclip: {err}", file=sys.stderr)
        return STOPPED
    except UnclipError as err:
        print(f"unclip: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `unclip config | head`: the reader has what it wanted; nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error flushing at exit
        return 128 + signal.SIGPIPE  # what a command killed by the pipe's signal returns
    except OSError as err:  # a path that is a file, a folder, missing or not ours: the message names it
        logging.getLogger("unclip").debug("the error's traceback", exc_info=True)
        where = f": {err.filename}" if err.filename else ""
        print(f"unclip: error: {err.strerror or err}{where} (run with --verbose for the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("unclip: interrupted", file=sys.stderr)
        return 130
