"""A step's statistics: plain floats, what a task loss must return, and what a NaN or
infinite loss or gradient does to the step (which then changes nothing)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from tdfusion.errors import NonFiniteLossError

__all__ = [
    "CHECKED",
    "check_gradients",
    "check_task_loss",
    "snapshot_buffers",
    "step_statistics",
]

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
    checked = [k for k in (*CHECKED, *extra) if k in stats]
    finite = all(math.isfinite(stats[k]) for k in checked)
    stats["skipped"] = 0.0 if finite else 1.0
    if finite:
        return stats
    message = f"non-finite value in the {where} at {position}: {_losses(stats, checked)}"
    _apply_rule(message, on_nonfinite, warn)
    return stats


def check_gradients(
    named_gradients: Mapping[str, torch.Tensor | None],
    where: str,
    stats: dict[str, float],
    *,
    on_nonfinite: str = "raise",
    position: str = "",
    warn: bool = True,
) -> bool:
    """Whether every gradient is finite; otherwise apply the non-finite rule before a step.

    A finite loss can have an infinite gradient (``sqrt``, a norm or a Charbonnier term at 0);
    an optimiser step along it would turn the parameters into NaN, and clipping would spread
    the NaN to every parameter of the module. So gradients are checked, after clipping, before
    every optimiser step.

    Parameters
    ----------
    named_gradients : mapping of str to torch.Tensor or None
        Parameter name (``"fusion_model.conv.weight"``) -> gradient; ``None`` entries are
        left out. In a distributed run these are already the global batch's gradients, the
        same on every rank, so that every rank decides alike.
    where : str
        The step, for the message.
    stats : dict of str to float
        The step's statistics: shown in the message, and ``skipped`` is set to 1.0 when a
        gradient is not finite.
    on_nonfinite : {"raise", "skip"}
        Raise :class:`~tdfusion.errors.NonFiniteLossError`, or warn and report ``skipped``.
    position : str
        Where training is, for the message.
    warn : bool
        Whether this process warns.

    Returns
    -------
    bool
        ``True`` when every gradient is finite.

    Raises
    ------
    NonFiniteLossError
        With ``on_nonfinite="raise"``, naming the first parameter with a non-finite gradient.

    Example
    -------
    >>> stats = {"fusion_loss": 0.0}
    >>> check_gradients({"w": torch.tensor([1.0, float("inf")])}, "fusion step", stats,
    ...                 on_nonfinite="skip", warn=False), stats["skipped"]
    (False, 1.0)
    """
    present = {name: g for name, g in named_gradients.items() if g is not None}
    if not present or bool(torch.stack([g.isfinite().all() for g in present.values()]).all()):
        return True
    bad = [name for name, g in present.items() if not bool(g.isfinite().all())]
    more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
    stats["skipped"] = 1.0
    message = (
        f"NaN or infinite gradient in the {where} at {position}: {bad[0]}{more} "
        f"({_losses(stats, ())})"
    )
    _apply_rule(message, on_nonfinite, warn)
    return False


def check_task_loss(value: Any, where: str) -> torch.Tensor:
    """The task loss if it is a scalar floating-point tensor with a graph, else a clear error.

    Parameters
    ----------
    value : Any
        What ``task_loss(fused, target)`` returned.
    where : str
        The step (``"meta step"``, ``"fusion step"``), for the message.

    Returns
    -------
    torch.Tensor
        ``value``.

    Raises
    ------
    TypeError
        Naming what came back: not a tensor, not a scalar, not floating point, or a tensor
        that does not depend on the fused image or the task network's parameters.

    Example
    -------
    >>> check_task_loss(0.5, "fusion step")
    Traceback (most recent call last):
    ...
    TypeError: fusion step: task_loss must return a scalar tensor with a graph, got float 0.5
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            found = f"a tensor of shape {tuple(value.shape)}"
        elif not value.is_floating_point():
            found = f"a {value.dtype} tensor"
        elif not value.requires_grad:
            found = "a tensor without a graph (it does not depend on the fused image or on T)"
        else:
            return value
    elif value is None:
        found = "None"
    else:
        found = f"{type(value).__name__} {value!r}"[:80]
    raise TypeError(f"{where}: task_loss must return a scalar tensor with a graph, got {found}")


def snapshot_buffers(*modules: nn.Module | None) -> Callable[[], None]:
    """Copy the modules' buffers now; the returned function puts the copies back.

    A step runs its modules in training mode before it knows whether its losses and
    gradients are finite, and a training-mode forward updates batch-norm statistics; a
    skipped (or failed) step restores them, so that it changes nothing.

    Parameters
    ----------
    *modules : torch.nn.Module or None
        ``None`` entries are ignored.

    Returns
    -------
    callable
        ``restore()``, writing the saved values back in place.

    Example
    -------
    >>> norm = nn.BatchNorm1d(1)
    >>> restore = snapshot_buffers(norm)
    >>> _ = norm(torch.tensor([[1.0], [3.0]]))
    >>> restore(); float(norm.running_mean)
    0.0
    """
    saved = [
        (module, name, buffer.detach().clone())
        for module in modules
        if module is not None
        for name, buffer in module.named_buffers()
    ]

    def restore() -> None:
        with torch.no_grad():
            for module, name, value in saved:
                module.get_buffer(name).copy_(value)

    return restore


def _losses(stats: Mapping[str, float], checked: tuple[str, ...] | list[str]) -> str:
    """The losses (and any non-finite checked value) as ``name=value`` pairs."""
    return ", ".join(
        f"{k}={v:.4g}"
        for k, v in stats.items()
        if k.endswith("loss") or k.startswith("fusion_") or (k in checked and not math.isfinite(v))
    )


def _apply_rule(message: str, on_nonfinite: str, warn: bool) -> None:
    """Raise, or warn that the update is skipped (``warn``: this process is rank 0)."""
    if on_nonfinite == "raise":
        raise NonFiniteLossError(
            message + " (pass on_nonfinite='skip' to skip such updates with a warning)"
        )
    if warn:
        # The caller of the step: step -> _summarise / step -> check_gradients -> here.
        warnings.warn(message + "; update skipped", RuntimeWarning, stacklevel=5)
