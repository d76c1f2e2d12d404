"""Checkpoint files: atomic writes, safe reads, and the random-number-generator state they carry."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tdfusion.errors import CheckpointError
from tdfusion.files import atomic_save

__all__ = [
    "TRAINER_CHECKPOINT_FORMAT",
    "atomic_save",
    "capture_rng_state",
    "load_checkpoint",
    "restore_rng_state",
]

#: Value of the ``"format"`` key of every checkpoint :class:`MetaFusionTrainer` writes.
TRAINER_CHECKPOINT_FORMAT = "tdfusion.trainer"


def load_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
    """Read a trainer checkpoint with ``torch.load(weights_only=True)`` and check its format.

    Parameters
    ----------
    path : str or os.PathLike
        A file written by :meth:`MetaFusionTrainer.save`.
    map_location : Any
        Passed to :func:`torch.load` (default: everything on the CPU).

    Returns
    -------
    dict
        The checkpoint.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    CheckpointError
        If the file cannot be read or is not a tdfusion trainer checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # corrupt file, pickle with code in it, truncated write
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {error}") from error
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != TRAINER_CHECKPOINT_FORMAT:
        found = (
            checkpoint.get("format") if isinstance(checkpoint, dict) else type(checkpoint).__name__
        )
        raise CheckpointError(
            f"{str(path)!r} is not a tdfusion trainer checkpoint (format {found!r}, expected "
            f"{TRAINER_CHECKPOINT_FORMAT!r}); network weights load with ReFusionNet.from_pretrained"
        )
    return checkpoint


def capture_rng_state(*generators: torch.Generator | None) -> dict[str, Any]:
    """Snapshot every random-number generator that training draws from.

    Parameters
    ----------
    *generators : torch.Generator or None
        Extra generators (the trainer's own, a data loader's); ``None`` entries are kept as
        ``None`` so that positions line up on restore.

    Returns
    -------
    dict
        States of Python's ``random``, NumPy's global generator, torch's CPU generator, every
        CUDA device's generator, and the given generators; only tensors, numbers and strings,
        so it loads with ``weights_only=True``.
    """
    numpy_state = np.random.get_state()  # noqa: NPY002 (the legacy global stream is what we save)
    return {
        "python": random.getstate(),
        "numpy": {
            "name": numpy_state[0],
            "keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
            "pos": int(numpy_state[2]),
            "has_gauss": int(numpy_state[3]),
            "cached_gaussian": float(numpy_state[4]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": [None if g is None else g.get_state() for g in generators],
    }


def restore_rng_state(state: dict[str, Any], *generators: torch.Generator | None) -> None:
    """Restore what :func:`capture_rng_state` captured.

    Parameters
    ----------
    state : dict
        The captured state.
    *generators : torch.Generator or None
        The generators to restore, in the order they were captured.
    """
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        (
            numpy_state["name"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for generator, generator_state in zip(generators, state["generators"]):
        if generator is not None and generator_state is not None:
            generator.set_state(generator_state)
