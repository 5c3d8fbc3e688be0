"""`unclip config`: show a preset or a model's config with overrides applied."""

from __future__ import annotations

import argparse
from pathlib import Path

from unclip.config import PRESETS, UnclipConfig, preset
from unclip.errors import ConfigError


def add_config_arguments(parser: argparse.ArgumentParser, *, default_preset: str = "shapes") -> None:
    """The `--preset` / `--config` / `--set` trio every training verb shares."""
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help=f"starting configuration (default: {default_preset})")
    parser.set_defaults(default_preset=default_preset)
    parser.add_argument("--config", metavar="FILE", help="start from a JSON config file instead of a preset "
                        "(what `unclip config --out FILE` writes)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one field with a dotted key and a JSON value, e.g. "
                             "--set clip.train.steps=200 --set decoder.channel_mult=[1,2,2]; repeatable")


def config_from_args(args: argparse.Namespace) -> UnclipConfig:
    if args.config and args.preset:
        raise ConfigError("give --preset or --config, not both: a config file is a whole configuration")
    if args.config:
        try:
            cfg = UnclipConfig.from_json(Path(args.config).read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise ConfigError(f"--config {args.config} is not a UTF-8 text file; give a JSON config "
                              "(`unclip config --out FILE` writes one)") from None
        except ConfigError as err:
            raise ConfigError(f"--config {args.config}: {err}") from None
    else:
        cfg = preset(args.preset or args.default_preset)
    return cfg.override(args.overrides)


def _show(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    text = cfg.to_json()
    if args.out:
        from unclip.io import write_json_atomic

        write_json_atomic(args.out, cfg.to_dict())
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "config", help="print a preset's configuration, with overrides applied",
        description="Print the full configuration as JSON. Every key shown can be overridden with "
                    "--set KEY=VALUE here and in every training verb.")
    add_config_arguments(parser)
    parser.add_argument("--out", metavar="FILE", help="write the JSON to FILE instead of printing it")
    parser.set_defaults(func=_show)
