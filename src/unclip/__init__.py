"""unclip: DALL-E 2 (unCLIP, Ramesh et al. 2022) you can train, run and study.

`import unclip` stays light: heavy modules (torch, transformers, diffusers) are imported by
the functions that need them.
"""

__version__ = "0.1.0"

from unclip.errors import ConfigError, DataError, ModelFormatError, SamplingError, UnclipError  # noqa: E402


def load(path=None, *, device=None, precision=None):
    """The text → image pipeline of a model directory (see `unclip.pipeline.load`)."""
    from unclip.pipeline import load as _load

    return _load(path, device=device, precision=precision)


def __getattr__(name):
    if name == "UnclipPipeline":  # imported on first use: it brings torch
        from unclip.pipeline.pipeline import UnclipPipeline

        return UnclipPipeline
    raise AttributeError(f"module 'unclip' has no attribute {name!r}")


__all__ = ["__version__", "load", "UnclipPipeline", "UnclipError", "ConfigError", "DataError", "ModelFormatError",
           "SamplingError"]
