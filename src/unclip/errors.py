"""Errors a user can act on. The CLI prints their message and exits with status 2; a run stopped
with a checkpoint (`TrainingStopped`, no failure) exits with `STOPPED`."""

STOPPED = 75  # the CLI's exit status for a run stopped with a checkpoint (EX_TEMPFAIL: run it again)


class UnclipError(Exception):
    """Base class: the message says what was wrong and how to fix it."""


class ConfigError(UnclipError, ValueError):
    """A configuration key or value is not valid."""


class ModelFormatError(UnclipError):
    """A model directory or checkpoint is missing, truncated, corrupt or mismatched."""


class DataError(UnclipError):
    """A data set, image or caption cannot be used."""


class SamplingError(UnclipError):
    """A network produced non-finite values while sampling (the model's fault, not the request's)."""


class TrainingError(UnclipError):
    """Training cannot go on (a non-finite loss, a checkpoint from another config)."""


class TrainingStopped(TrainingError):
    """A SIGTERM stopped the run after a step, with a checkpoint to resume from."""
