"""The run folder of :func:`tdfusion.recipes.train`: what a resumed run may change, the check
of ``recipe.json`` against the recipe resuming it, and the messages of a run that stops.

A run folder holds ``recipe.json`` (the settings), ``checkpoint.pt`` (where training stands),
the weights files and the training log. A rerun into it resumes the checkpoint when its recipe
matches ``recipe.json`` (:data:`RESUMABLE_CHANGES` and :data:`NOT_COMPARED_ON_RESUME` aside).
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tdfusion.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    from tdfusion.recipes import Recipe

__all__ = ["NOT_COMPARED_ON_RESUME", "RESUMABLE_CHANGES", "NothingToTrainWarning"]

#: Recipe settings a resumed run may change: how long it trains and how it computes, not what
#: it computes (precision, compile and channels_last are the trainer's speed options, which a
#: resumed ``fit`` accepts with a warning; gradient checkpointing leaves outputs and gradients
#: unchanged). Every other setting of ``out/recipe.json`` must match the recipe resuming it,
#: but for ``init_weights`` (see :data:`NOT_COMPARED_ON_RESUME`).
RESUMABLE_CHANGES = (
    "epochs",
    "num_workers",
    "precision",
    "compile",
    "channels_last",
    "grad_checkpointing",
)

#: Recipe settings a resumed run neither compares nor changes in ``out/recipe.json``: the
#: weights a run started from are not read again (the checkpoint replaces them), so a
#: resuming run may name other ones, or none, and the file keeps those the run started from.
NOT_COMPARED_ON_RESUME = ("init_weights",)

#: Files of an earlier run that ``train(resume=False)`` deletes before it trains.
_EARLIER_RUN_FILES = ("checkpoint.pt", "fusion_model.pt", "loss_generator.pt")


class NothingToTrainWarning(UserWarning):
    """:func:`~tdfusion.recipes.train` resumed a run already at (or past) the recipe's
    ``epochs``: nothing was trained and nothing in the output folder was written.

    Parameters
    ----------
    out : pathlib.Path
        The output folder.
    epoch : int
        Epochs its checkpoint has trained.
    epochs : int
        The recipe's ``epochs``.
    """

    def __init__(self, out: Path, epoch: int, epochs: int) -> None:
        super().__init__(
            f"nothing to train: {out} is at epoch {epoch}, epochs={epochs}; pass a larger "
            "epochs to train further"
        )
        self.out = out
        self.epoch = epoch
        self.epochs = epochs


def _saved_recipe(saved: Path, checkpoint: Path) -> dict[str, Any] | str:
    """The settings ``saved`` holds, or why ``checkpoint`` may not be resumed without them."""
    advice = "pass --no-resume (resume=False) to start over in that folder or choose a new --out"
    if not saved.is_file():
        return (
            f"{checkpoint} has no {saved.name} beside it, so this run's settings cannot be "
            f"checked against those it was trained with; put that run's {saved.name} back to "
            f"resume, or {advice}"
        )
    try:
        old = json.loads(saved.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"{saved} cannot be read ({error}), so resuming {checkpoint} is unsafe; {advice}"
    if not isinstance(old, dict):
        return f"{saved} holds no recipe, so resuming {checkpoint} is unsafe; {advice}"
    return old


def _recipe_changes(saved: Path, recipe: Recipe, checkpoint: Path) -> str | None:
    """Why ``recipe`` may not resume ``checkpoint``, whose run ``saved`` describes; ``None``
    when it may."""
    old = _saved_recipe(saved, checkpoint)
    if isinstance(old, str):
        return old
    new = json.loads(json.dumps(recipe.to_dict()))  # tuples as the saved file has them: lists
    changes = []
    for field in dataclasses.fields(recipe):
        if field.name in RESUMABLE_CHANGES or field.name in NOT_COMPARED_ON_RESUME:
            continue
        if field.name in old:
            before = old[field.name]
        elif field.default is not dataclasses.MISSING:  # a file of an older tdfusion
            before = json.loads(json.dumps(field.default))
        else:
            changes.append(f"{field.name} (not set) -> {new[field.name]!r}")
            continue
        if before != new[field.name]:
            changes.append(f"{field.name} {before!r} -> {new[field.name]!r}")
    if not changes:
        return None
    return (
        f"{checkpoint} was trained with the recipe of {saved}, and this run's differs: "
        f"{', '.join(changes)}. A resumed run may change only epochs, num_workers and the "
        "execution settings precision, compile, channels_last and grad_checkpointing; rerun "
        "with the saved settings to resume, or pass --no-resume (resume=False) to start over "
        "in that folder or choose a new --out"
    )


def _recipe_file(recipe: Recipe, saved: Path, resuming: bool) -> str:
    """The ``recipe.json`` text of a run; a resumed one keeps the saved ``init_weights`` (the
    weights the run started from), which it does not compare."""
    settings = recipe.to_dict()
    if resuming:
        old = _saved_recipe(saved, saved.parent / "checkpoint.pt")
        if isinstance(old, dict):
            for name in NOT_COMPARED_ON_RESUME:
                settings[name] = old.get(name, settings[name])
    return json.dumps(settings, indent=2) + "\n"


def _checkpoint_epoch(checkpoint: Path) -> int | None:
    """The epoch ``checkpoint`` has reached, read without loading its tensors (memory-mapped);
    ``None`` when it cannot be read so (``fit`` then reads it and says what is wrong)."""
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError):
        return None
    epoch = state.get("epoch") if isinstance(state, dict) else None
    return epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else None


#: The last line of the message a ``DataLoader`` gives an error raised in a worker process
#: (the worker's traceback comes first): ``tdfusion.errors.DataError: cannot read image ...``.
_WORKER_ERROR_LINE = re.compile(r"^[\w.]+: (?P<message>.+)$")


def _stopped_message(error: DataError, checkpoint: Path, epoch: int) -> str:
    """One line for a data error that stopped training: the original message (a worker's
    traceback dropped) and, when there is one, the checkpoint a rerun resumes from."""
    lines = str(error).strip().splitlines() or [""]
    message = lines[0]
    if len(lines) > 1 and "Original Traceback" in str(error):  # raised in a loader worker
        match = _WORKER_ERROR_LINE.match(lines[-1])
        message = match["message"] if match else lines[-1]
    if checkpoint.is_file():
        message += (
            f"; training stopped, {checkpoint} (epoch {epoch}) is kept: fix the data and rerun "
            "the same command to resume from it"
        )
    return message


def _remove_earlier_run(out: Path) -> None:
    """Delete an earlier run's checkpoint and weights in ``out`` (a run that starts over)."""
    for name in _EARLIER_RUN_FILES:
        (out / name).unlink(missing_ok=True)
