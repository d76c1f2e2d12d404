"""Exception types: every error a user can act on derives from :class:`TDFusionError`.

Also :func:`describe_load_error`, which turns what :func:`torch.load` raises into a reason fit to
show (no terminal escapes, no advice to trust the file).
"""

from __future__ import annotations

import re

__all__ = [
    "CheckpointError",
    "DataError",
    "DistributedError",
    "NonFiniteLossError",
    "OptionalDependencyError",
    "OutputInUseError",
    "TDFusionError",
    "describe_load_error",
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


_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# Sentences of torch's messages that advise loading the file with code execution enabled.
_UNSAFE_ADVICE = re.compile(
    r"weights_only|safe_globals|allowlist|trust|file an issue", re.IGNORECASE
)


def describe_load_error(error: BaseException) -> str:
    """Why ``torch.load(..., weights_only=True)`` failed, in one line fit for an untrusted file.

    torch's own message advises loading with ``weights_only=False`` or allow-listing the
    global the file refers to (``exec``, for a file that runs code): wrong advice for a file of
    unknown origin. It also carries terminal escape sequences. What is kept is the reason alone.

    Parameters
    ----------
    error : BaseException
        What :func:`torch.load` raised.

    Returns
    -------
    str
        One line without escape sequences or advice to weaken the load.

    Example
    -------
    >>> describe_load_error(KeyError("101"))
    'it is not a file written by torch.save (KeyError: 101)'
    """
    text = _ANSI_ESCAPE.sub("", str(error))
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if refused:
        return (
            f"it refers to {refused.group(1)}, which is neither a tensor nor a plain value; "
            "tdfusion reads weights only and never runs code from a file"
        )
    unpickler = re.search(r"WeightsUnpickler error:(.*?)(Check the documentation|$)", text, re.S)
    if unpickler:
        detail = " ".join(unpickler.group(1).split()).rstrip(".") or "no detail"
        return f"it is not a file of weights written by torch.save ({detail})"
    if isinstance(error, (KeyError, IndexError, AttributeError, TypeError)):
        reason = text.strip("'\" ") or "no detail"
        return f"it is not a file written by torch.save ({type(error).__name__}: {reason})"
    sentences = re.split(r"(?<=[.!?])\s+", " ".join(text.split()))
    kept = [sentence for sentence in sentences if sentence and not _UNSAFE_ADVICE.search(sentence)]
    return " ".join(kept) or type(error).__name__
