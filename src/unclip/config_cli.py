"""`unclip config`: show a preset or a model's config with overrides applied."""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import re
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path

from unclip.config import PRESETS, UnclipConfig, preset
from unclip.errors import ConfigError


def add_config_arguments(parser: argparse.ArgumentParser, *, default_preset: str = "shapes") -> None:
    """The `--preset` / `--config` / `--set` trio every training verb shares."""
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help=f"starting configuration (default: {default_preset})")
    parser.set_defaults(default_preset=default_preset)
    parser.add_argument("--config", metavar="FILE", help="start from a JSON config file instead of a preset "
                        "(what `unclip config --out FILE` writes), or from a model directory's config (the "
                        "directory or its unclip.json)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one field with a dotted key and a JSON value, e.g. "
                             "--set clip.train.steps=200 --set decoder.channel_mult=[1,2,2] --set name=mine; "
                             "repeatable, applied in order after the preset or file (`unclip config --keys` "
                             "lists every key)")


def config_from_args(args: argparse.Namespace) -> UnclipConfig:
    if args.config and args.preset:
        raise ConfigError("give --preset or --config, not both: a config file is a whole configuration")
    if args.config:
        try:
            cfg = _read_config(Path(args.config))
        except UnicodeDecodeError:
            raise ConfigError(f"--config {args.config} is not a UTF-8 text file; give a JSON config "
                              "(`unclip config --out FILE` writes one)") from None
        except ConfigError as err:
            raise ConfigError(f"--config {args.config}: {err}") from None
    else:
        cfg = preset(args.preset or args.default_preset)
    return cfg.override(args.overrides)


def _read_config(path: Path) -> UnclipConfig:
    """A JSON config file (a UTF-8 byte-order mark allowed), or the config a model directory holds."""
    from unclip.modeldir import MANIFEST, read_manifest

    if path.is_dir() or path.name == MANIFEST:  # a model's: its manifest, migrated, holds the config
        return UnclipConfig.from_dict(read_manifest(path if path.is_dir() else path.parent).config)
    return UnclipConfig.from_json(path.read_text(encoding="utf-8-sig"))


def _kind(hint: typing.Any) -> str:
    """What a field of type `hint` takes, in words."""
    if typing.get_origin(hint) is typing.Literal:
        return "one of " + ", ".join(typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        return f"list of {_kind(typing.get_args(hint)[0])}s"
    return {int: "integer", float: "number", bool: "true or false", str: "text"}[hint]


@functools.cache
def _notes(cls: type) -> dict[str, str]:
    """Each field's meaning, as config.py says it: the comment lines above the field and the one after it.
    A field with neither shares the note of the field before it in its family (bsr_scale that of bsr_blur_sigma)."""
    notes, above, last = {}, [], ""
    for line in inspect.getsource(cls).splitlines():
        if line.strip().startswith("#"):
            above.append(line.strip()[1:].strip())
            continue
        if declared := re.match(r" {4}(\w+): .*=", line):
            name = declared[1]
            note = " ".join([*above, line.partition("  # ")[2].strip()]).strip()
            if not note and last.split("_")[0] == name.split("_")[0]:
                note = notes[last]
            notes[name], last = note, name
        above = []
    return notes


def _leaves(obj, path: str = ""):
    """(dotted key, owning dataclass, field name, value) of every leaf of a config."""
    for f in fields(obj):
        value, key = getattr(obj, f.name), f"{path}{f.name}"
        if is_dataclass(value):
            yield from _leaves(value, f"{key}.")
        elif isinstance(value, tuple) and value and is_dataclass(value[0]):
            for i, item in enumerate(value):
                yield from _leaves(item, f"{key}.{i}.")
        else:
            yield key, type(obj), f.name, value


def keys_text(cfg: UnclipConfig) -> str:
    """Every key of `cfg`: its value, what it takes, the default where the value differs, and its meaning."""
    defaults = {key: value for key, _, _, value in _leaves(UnclipConfig())}
    lines = []
    for key, owner, name, value in _leaves(cfg):
        default = defaults.get(re.sub(r"^upsamplers\.\d+\.", "upsamplers.0.", key), value)
        about = _kind(typing.get_type_hints(owner)[name])
        if default != value:
            about += f"; default {json.dumps(default, ensure_ascii=False)}"
        lines.append(f"{key}={json.dumps(value, ensure_ascii=False)}  ({about})")
        if note := _notes(owner).get(name):
            lines.append(f"    {note}")
    return "\n".join(lines)


def _show(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.keys:
        print(keys_text(cfg))
        return 0
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
                    "--set KEY=VALUE here and in every training verb; --keys lists them with what each takes "
                    "and means.")
    add_config_arguments(parser)
    shown = parser.add_mutually_exclusive_group()
    shown.add_argument("--out", metavar="FILE", help="write the JSON to FILE instead of printing it")
    shown.add_argument("--keys", action="store_true",
                       help="list every key as KEY=VALUE with its type, its default where the value differs, "
                            "and its meaning, instead of the JSON")
    parser.set_defaults(func=_show)
