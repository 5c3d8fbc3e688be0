"""unclip: DALL-E 2 (unCLIP, Ramesh et al. 2022) you can train, run and study.

`import unclip` stays light: heavy modules (torch, transformers, diffusers) are imported by
the functions that need them.
"""

__version__ = "0.1.0"

from unclip.errors import ConfigError, DataError, ModelFormatError, UnclipError  # noqa: E402


def load(path=None, *, device=None, precision=None):
    """The text → image pipeline of a model directory (see `unclip.pipeline.load`)."""
    from unclip.pipeline import load as _load

    return _load(path, device=device, precision=precision)


__all__ = ["__version__", "load", "UnclipError", "ConfigError", "DataError", "ModelFormatError"]
