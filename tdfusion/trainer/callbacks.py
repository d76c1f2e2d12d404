"""Training callbacks: per-step hooks for logging (CSV, TensorBoard) and for custom code."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tdfusion.errors import OptionalDependencyError
from tdfusion.files import atomic_path

if TYPE_CHECKING:  # pragma: no cover
    from tdfusion.trainer.trainer import MetaFusionTrainer

__all__ = ["CSVLogger", "Callback", "LambdaCallback", "TensorBoardLogger", "drop_logged_steps"]


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

    The file is opened in append mode, so a resumed run continues the same log. When
    training starts, rows of the steps the trainer has not taken yet are removed (a run
    resumed from its last checkpoint repeats the steps logged after it), so the log holds
    every step once. In a distributed run only rank 0 writes (the statistics are already
    means over ranks).

    Parameters
    ----------
    path : str or os.PathLike
        CSV file; the header (:data:`CSV_FIELDS`) is written when the file is new or empty.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def on_fit_start(self, trainer: MetaFusionTrainer) -> None:
        if trainer.is_main_process:
            drop_logged_steps(self.path, trainer.global_step)

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


def drop_logged_steps(path: str | os.PathLike[str], first_step: int) -> int:
    """Remove the rows of a CSV log whose ``global_step`` is ``first_step`` or later.

    The rows are those a run wrote after the checkpoint it is resumed from; the resumed run
    writes them again. A row torn by a killed writer goes too. The file is rewritten
    atomically, and left alone when there is nothing to remove.

    Parameters
    ----------
    path : str or os.PathLike
        A log written by :class:`CSVLogger`; nothing happens if it does not exist.
    first_step : int
        The trainer's ``global_step`` when training starts.

    Returns
    -------
    int
        The number of rows removed.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    with path.open(newline="") as stream:
        rows = list(csv.reader(stream))
    if not rows or "global_step" not in rows[0]:
        return 0
    header, body = rows[0], rows[1:]
    column = header.index("global_step")

    def kept(row: list[str]) -> bool:
        if len(row) != len(header):
            return False
        try:
            return int(row[column]) < first_step
        except ValueError:
            return False

    keep = [row for row in body if kept(row)]
    if len(keep) == len(body):
        return 0
    with atomic_path(path) as temporary, open(temporary, "w", newline="") as stream:
        csv.writer(stream).writerows([header, *keep])
    return len(body) - len(keep)
