"""Exception types: every error a user can act on derives from :class:`TDFusionError`."""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "DataError",
    "DistributedError",
    "NonFiniteLossError",
    "OptionalDependencyError",
    "OutputInUseError",
    "TDFusionError",
]


class TDFusionError(Exception):
    """Base class of the errors tdfusion raises on purpose, with a message saying what to fix."""


class DataError(TDFusionError, ValueError):
    """A data problem the user can fix: a missing folder, an unreadable image, an unpaired name.

    The message names the file (and line, for label files) and what was expected.
    """


class CheckpointError(TDFusionError, ValueError):
    """A checkpoint that cannot be used: unknown format, missing or unexpected keys, bad shapes."""


class DistributedError(TDFusionError, RuntimeError):
    """A multi-process run that cannot work as launched: a missing ``torchrun`` variable, more
    processes than GPUs, a backend that does not fit the device, ranks that disagree."""


class NonFiniteLossError(TDFusionError, FloatingPointError):
    """Training produced a NaN or infinite loss; the message gives the step and the losses."""


class OptionalDependencyError(TDFusionError, ImportError):
    """An optional dependency (an extra such as ``seg`` or ``det``) is needed but not installed."""


class OutputInUseError(TDFusionError, RuntimeError):
    """Another process is writing into the same output folder or checkpoint; the message names
    it and, when known, the other process."""
