"""unclip: DALL-E 2 (unCLIP, Ramesh et al. 2022) you can train, run and study.

`import unclip` stays light: heavy modules (torch, transformers, diffusers) are imported by
the functions that need them.
"""

__version__ = "0.1.0"

from unclip.errors import ConfigError, DataError, ModelFormatError, UnclipError  # noqa: E402

__all__ = ["__version__", "UnclipError", "ConfigError", "DataError", "ModelFormatError"]
