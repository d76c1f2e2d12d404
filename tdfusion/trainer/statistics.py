"""A step's statistics: plain floats, and what a NaN or infinite loss does to the step."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

import torch

from tdfusion.errors import NonFiniteLossError

__all__ = ["CHECKED", "step_statistics"]

#: The statistics that must be finite for a step to update anything (the fusion terms are NaN
#: for a fusion loss without a ``terms`` method, and are only logged).
CHECKED = ("fusion_loss", "task_loss", "meta_train_task_loss")


def step_statistics(
    tensors: Mapping[str, torch.Tensor | None],
    where: str,
    *,
    on_nonfinite: str = "raise",
    position: str = "",
    warn: bool = True,
    **extra: float,
) -> dict[str, float]:
    """A step's statistics as floats, with ``skipped`` = 1.0 when one that matters is not finite.

    Parameters
    ----------
    tensors : mapping of str to torch.Tensor or None
        Scalar statistics (already averaged over ranks, so that every rank decides alike);
        ``None`` entries are left out.
    where : str
        The step (``"meta step"``, ``"fusion step"``), for the message.
    on_nonfinite : {"raise", "skip"}
        Raise :class:`~tdfusion.errors.NonFiniteLossError`, or warn and report ``skipped``.
    position : str
        Where training is (``"epoch 3, global step 120"``), for the message.
    warn : bool
        Whether this process warns (rank 0 only: every rank skips the same update).
    **extra : float
        Further values (learning rates, ``hypergradient_max``); they must be finite too.

    Returns
    -------
    dict of str to float
        The statistics, ``extra`` and ``skipped``.

    Raises
    ------
    NonFiniteLossError
        With ``on_nonfinite="raise"``, naming the step and the losses.

    Example
    -------
    >>> step_statistics({"fusion_loss": torch.tensor(0.5), "task_loss": None}, "fusion step")
    {'fusion_loss': 0.5, 'skipped': 0.0}
    """
    stats = {k: float(v.detach()) for k, v in tensors.items() if v is not None}
    stats.update(extra)
    finite = all(math.isfinite(stats[k]) for k in (*CHECKED, *extra) if k in stats)
    stats["skipped"] = 0.0 if finite else 1.0
    if finite:
        return stats
    losses = ", ".join(
        f"{k}={v:.4g}" for k, v in stats.items() if k.endswith("loss") or k.startswith("fusion_")
    )
    message = f"non-finite value in the {where} at {position}: {losses}"
    if on_nonfinite == "raise":
        raise NonFiniteLossError(
            message + " (pass on_nonfinite='skip' to skip such updates with a warning)"
        )
    if warn:
        warnings.warn(message + "; update skipped", RuntimeWarning, stacklevel=4)
    return stats
