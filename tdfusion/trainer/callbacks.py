"""Training callbacks: per-step hooks for logging (CSV, TensorBoard) and for custom code."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tdfusion.errors import OptionalDependencyError

if TYPE_CHECKING:  # pragma: no cover
    from tdfusion.trainer.trainer import MetaFusionTrainer

__all__ = ["CSVLogger", "Callback", "LambdaCallback", "TensorBoardLogger"]


class Callback:
    """Base class of training hooks; override the methods you need.

    Every method receives the trainer. ``stats`` dicts hold plain floats plus ``"phase"``
    (``"meta"`` or ``"fusion"``), ``"epoch"`` (0-based), ``"step"`` (within the phase and
    epoch) and ``"global_step"`` (counting every meta and fusion step).
    """

    def on_fit_start(self, trainer: MetaFusionTrainer) -> None:
        """Called once before the first epoch (also after a resume)."""

    def on_step_end(self, trainer: MetaFusionTrainer, stats: dict[str, Any]) -> None:
        """Called after every meta step and every fusion step."""

    def on_epoch_end(self, trainer: MetaFusionTrainer, summary: dict[str, Any]) -> None:
        """Called after each epoch (and its checkpoint) with the epoch's mean losses."""

    def on_fit_end(self, trainer: MetaFusionTrainer) -> None:
        """Called once after the last epoch."""


class LambdaCallback(Callback):
    """Wrap plain functions as a callback.

    Parameters
    ----------
    on_step_end, on_epoch_end : callable, optional
        Functions ``(trainer, stats)`` called at those points.

    Example
    -------
    >>> from tdfusion.trainer import LambdaCallback
    >>> seen = []
    >>> callback = LambdaCallback(on_step_end=lambda trainer, stats: seen.append(stats["phase"]))
    """

    def __init__(self, on_step_end: Any = None, on_epoch_end: Any = None) -> None:
        self._on_step_end = on_step_end
        self._on_epoch_end = on_epoch_end

    def on_step_end(self, trainer: MetaFusionTrainer, stats: dict[str, Any]) -> None:
        if self._on_step_end is not None:
            self._on_step_end(trainer, stats)

    def on_epoch_end(self, trainer: MetaFusionTrainer, summary: dict[str, Any]) -> None:
        if self._on_epoch_end is not None:
            self._on_epoch_end(trainer, summary)


#: Columns of :class:`CSVLogger`, in order; a step leaves the columns it does not report empty.
CSV_FIELDS = (
    "phase",
    "epoch",
    "step",
    "global_step",
    "fusion_loss",
    "fusion_intensity",
    "fusion_gradient",
    "task_loss",
    "meta_train_task_loss",
    "hypergradient_max",
    "weight_a_mean",
    "fusion_lr",
    "generator_lr",
    "skipped",
)


class CSVLogger(Callback):
    """Append one row per training step to a CSV file.

    The file is opened in append mode, so a resumed run continues the same log. In a
    distributed run only rank 0 writes (the statistics are already means over ranks).

    Parameters
    ----------
    path : str or os.PathLike
        CSV file; the header (:data:`CSV_FIELDS`) is written when the file is new or empty.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def on_step_end(self, trainer: MetaFusionTrainer, stats: dict[str, Any]) -> None:
        if not trainer.is_main_process:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new_file = not self.path.exists() or self.path.stat().st_size == 0
        with self.path.open("a", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=CSV_FIELDS, extrasaction="ignore")
            if new_file:
                writer.writeheader()
            writer.writerow(stats)


class TensorBoardLogger(Callback):
    """Write every step's losses as TensorBoard scalars (``phase/name``, x = global step).

    In a distributed run only rank 0 writes (the event file is created on its first step).

    Parameters
    ----------
    log_dir : str or os.PathLike
        Event-file folder.

    Raises
    ------
    OptionalDependencyError
        If the ``tensorboard`` package is not installed.
    """

    def __init__(self, log_dir: str | os.PathLike[str]) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:  # tensorboard is not a dependency of tdfusion
            raise OptionalDependencyError(
                "TensorBoardLogger needs the tensorboard package: pip install tensorboard"
            ) from error
        self._summary_writer = SummaryWriter
        self.log_dir = Path(log_dir)
        self.writer: Any = None

    def on_step_end(self, trainer: MetaFusionTrainer, stats: dict[str, Any]) -> None:
        if not trainer.is_main_process:
            return
        if self.writer is None:
            self.writer = self._summary_writer(log_dir=str(self.log_dir))
        for key, value in stats.items():
            if key in ("phase", "epoch", "step", "global_step") or not isinstance(value, float):
                continue
            self.writer.add_scalar(f"{stats['phase']}/{key}", value, stats["global_step"])

    def on_fit_end(self, trainer: MetaFusionTrainer) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None
