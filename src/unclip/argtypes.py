"""argparse types shared by every verb: a bad number is refused before anything loads or runs."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path


def _parsed(value: str, kind: type = int) -> int | float:
    """`value` as a whole number (kind int) or a number (float); argparse's error otherwise."""
    try:
        return kind(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a {'whole ' if kind is int else ''}number") from None


def _whole(value: str) -> int:
    return _parsed(value, int)


def _number(value: str) -> float:
    return _parsed(value, float)


def positive_int(value: str) -> int:
    """A whole number ≥ 1: a count of images, steps, samples or candidates."""
    number = _whole(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{number} is too small: give 1 or more")
    return number


def int_range(low: int, high: int, why: str = ""):
    """An argparse type for a whole number from `low` to `high`; `why` says what the bound protects."""

    def parse(value: str) -> int:
        number = _whole(value)
        if not low <= number <= high:
            raise argparse.ArgumentTypeError(f"{number} is out of range: give {low} to {high}{why}")
        return number

    return parse


def threads(value: str) -> int:
    """torch CPU threads: a whole number ≥ 1, or 0 for torch's own choice."""
    number = _whole(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"{number} threads: give 1 or more, or 0 for torch's choice")
    return number


def port(value: str) -> int:
    """A TCP port, 1–65535."""
    number = _whole(value)
    if not 1 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"{number} is not a TCP port: give 1 to 65535")
    return number


def _checked(value, check):
    """`check(value)`, a check that raises ConfigError, with its message as argparse's error."""
    from unclip.errors import ConfigError

    try:
        return check(value)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def guidance(value: str) -> float:
    """A classifier-free guidance scale: a number from 0 to `config.MAX_GUIDANCE`."""
    from unclip.config import check_guidance_scale

    return _checked(_number(value), check_guidance_scale)


def holdout(value: str) -> float:
    """A data.holdout fraction in [0, 1), as training accepts it."""
    number = _number(value)
    if not 0 <= number < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a fraction in [0, 1): give e.g. 0.05")
    return number


def angle(value: str) -> float:
    """A text-diff rotation fraction θ in [0, 1]."""
    number = _number(value)
    if not 0 <= number <= 1:  # NaN too
        raise argparse.ArgumentTypeError(f"{value} is not in [0, 1]: give e.g. 0 0.25 0.5")
    return number


def minutes(value: str) -> float:
    """A --minutes budget: a positive, finite number of minutes."""
    number = _number(value)
    if not (math.isfinite(number) and number > 0):
        raise argparse.ArgumentTypeError(f"{value} minutes: give a positive number, e.g. 10, or leave --minutes out "
                                         "to train the configured steps")
    return number


def noise_level(value: str) -> float:
    """A sampler's starting noise level, a fraction of its schedule in (0, 1] (1 = pure noise)."""
    from unclip.config import check_noise_level

    return _checked(_number(value), check_noise_level)


def eta(value: str) -> float:
    """A DDIM η in [0, 1]."""
    from unclip.config import check_eta

    return _checked(_number(value), check_eta)


def seed_number(value: str) -> int:
    """A seed: a whole number from 0 to 2^63 − 1 (config.MAX_SEED)."""
    from unclip.config import MAX_SEED

    number = _whole(value)
    if not 0 <= number <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{number}: give a seed from 0 to {MAX_SEED}")
    return number


def output_folder(value: str) -> str:
    """An output folder, or a path that can become one: a file on its way is refused before any work
    (it was "File exists" from mkdir once the work was done)."""
    from unclip.io import check_output_dir

    _checked(value, check_output_dir)
    return value


def picture_path(name: str):
    """An argparse type for a picture to write: a folder (existing, ending in "/", or with no suffix)
    gets `name` inside; a suffix that is no image format is refused, and so is a path through a
    file, before any work (they were a ValueError traceback after it)."""
    def parse(value: str) -> str:
        from unclip.io import IMAGE_FORMATS, check_output_dir

        path = Path(value)
        if value.endswith(("/", os.sep)) or path.is_dir() or not path.suffix:
            path = path / name
        elif path.suffix.lower() not in IMAGE_FORMATS:
            raise argparse.ArgumentTypeError(f"{value!r}: give a .png (or .jpg, .webp) path, or a folder")
        _checked(path.parent, check_output_dir)
        return str(path)

    return parse
