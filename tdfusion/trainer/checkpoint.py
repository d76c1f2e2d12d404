"""Trainer checkpoints: the one writer and reader of their schema, and the RNG state they carry.

A trainer checkpoint is a dict that loads with ``torch.load(weights_only=True)``::

    {"format": "tdfusion.trainer", "version": 1, "epoch", "global_step", "config",
     "models": {"fusion_model", "loss_generator", "task"},        # state dicts
     "model_configs": {"fusion_model", "loss_generator"},         # {"arch", "class", "config"}
     "optimizers", "schedulers", "history", "grad_scaler",
     "data": {"passes", "meta_passes", "seed", "world_size"},
     "rng": {..., "generators", "meta_generators", "meta_phase"}, ["rng_per_rank"]}

``config`` holds the constructor's options, ``precision``, ``compile`` and ``channels_last``
among them (:meth:`MetaFusionTrainer.load` builds the trainer with them; a trainer resumed by
``fit`` with other values warns). ``grad_scaler`` is the ``precision="fp16"`` loss scaler's
state (``{}`` otherwise; absent from older checkpoints).

:func:`trainer_state` writes it, :func:`load_trainer_state` reads it back into a trainer (they
are also the trainer's ``state_dict`` and ``load_state_dict`` methods, as :func:`save_trainer`
and :func:`load_trainer` are its ``save`` and ``load``), and
:func:`model_entry` is how :mod:`tdfusion.nets.pretrained` takes one network out of it. This
module imports nothing of tdfusion's above :mod:`tdfusion.files` at import time, so that the
networks can use it.
"""

from __future__ import annotations

import copy
import os
import random
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from tdfusion.errors import CheckpointError, NonFiniteLossError, describe_load_error
from tdfusion.files import atomic_save
from tdfusion.trainer.batches import map_tensors

if TYPE_CHECKING:  # pragma: no cover
    from tdfusion.trainer.trainer import MetaFusionTrainer

__all__ = [
    "CHECKPOINT_VERSION",
    "TRAINER_CHECKPOINT_FORMAT",
    "atomic_save",
    "capture_rng_state",
    "first_nonfinite",
    "load_checkpoint",
    "load_trainer",
    "load_trainer_state",
    "model_description",
    "model_entry",
    "read_weights_only",
    "restore_generators",
    "restore_rng_state",
    "save_trainer",
    "saved_rng_state",
    "trainer_state",
]

#: Value of the ``"format"`` key of every checkpoint :class:`MetaFusionTrainer` writes.
TRAINER_CHECKPOINT_FORMAT = "tdfusion.trainer"
#: Version of the trainer checkpoint schema.
CHECKPOINT_VERSION = 1


def read_weights_only(path: str | os.PathLike[str], map_location: Any = "cpu") -> Any:
    """Read a torch file with ``torch.load(weights_only=True)``: tensors and containers only.

    Parameters
    ----------
    path : str or os.PathLike
        An existing file.
    map_location : Any
        Passed to :func:`torch.load`.

    Returns
    -------
    Any
        What the file holds.

    Raises
    ------
    CheckpointError
        If the file is corrupt, truncated, not a torch file, or a pickle with code in it.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # corrupt file, pickle with code in it, truncated write
        raise CheckpointError(
            f"cannot read checkpoint {os.fspath(path)} as a weights-only torch file: "
            f"{describe_load_error(error)}"
        ) from error


def model_entry(
    payload: Mapping[str, Any], role: str, file: str | os.PathLike[str]
) -> tuple[Any, Any]:
    """One network's state dict and description in a trainer checkpoint.

    Parameters
    ----------
    payload : mapping
        A trainer checkpoint.
    role : str
        ``"fusion_model"``, ``"loss_generator"`` or ``"task"``.
    file : str or os.PathLike
        Named in messages.

    Returns
    -------
    state_dict : Any
        ``models[role]`` (checked by the caller).
    description : dict or None
        ``model_configs[role]``: ``{"arch", "class", "config"}``, or ``None``.

    Raises
    ------
    CheckpointError
        If the checkpoint holds no such network, or its loss weights were a fixed rule.
    """
    models = payload.get("models")
    if not isinstance(models, Mapping) or role not in models:
        present = sorted(models) if isinstance(models, Mapping) else []
        raise CheckpointError(
            f"trainer checkpoint {os.fspath(file)} has no models[{role!r}]; it holds {present}"
        )
    model_configs = payload.get("model_configs")
    description = model_configs.get(role) if isinstance(model_configs, Mapping) else None
    if isinstance(description, Mapping) and description.get("arch") == _FIXED_WEIGHTS_ARCH:
        rule = (description.get("config") or {}).get("rule")
        raise CheckpointError(
            f"trainer checkpoint {os.fspath(file)} was trained with fixed loss weights (rule "
            f"{rule!r}), not a learned loss generator: it has no {role!r} network to load "
            "(take the weight maps of a run with meta steps)"
        )
    return models[role], description


def model_description(model: nn.Module) -> dict[str, Any] | None:
    """What rebuilds a network of ours from a checkpoint: its class and constructor config.

    Parameters
    ----------
    model : torch.nn.Module
        A network; one without a ``config`` mapping has no description.

    Returns
    -------
    dict or None
        ``{"arch", "class", "config"}``.
    """
    config = getattr(model, "config", None)
    if not isinstance(config, Mapping):
        return None
    return {
        "arch": getattr(model, "arch", None) or type(model).__name__,
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "config": dict(config),
    }


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
    checkpoint = read_weights_only(path, map_location)
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
    state = map_tensors(torch.Tensor.cpu, state)  # a checkpoint read onto a GPU holds them there
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
        # A checkpoint of a machine with more GPUs restores the devices this one has (PyTorch's
        # set_rng_state_all would fail on the first device it lacks).
        for index in range(min(len(state["cuda"]), torch.cuda.device_count())):
            torch.cuda.set_rng_state(state["cuda"][index], index)
    restore_generators(state["generators"], *generators)


def restore_generators(
    states: Sequence[torch.Tensor | None], *generators: torch.Generator | None
) -> None:
    """Set each generator to its saved state; ``None`` on either side is skipped.

    Parameters
    ----------
    states : sequence of torch.Tensor or None
        Saved states (``Generator.get_state()``), in the order of ``generators``; a shorter
        list (a checkpoint written before a generator existed) leaves the rest as they are.
    *generators : torch.Generator or None
        The generators.
    """
    for generator, generator_state in zip(generators, states):
        if generator is not None and generator_state is not None:
            generator.set_state(generator_state.cpu())


# The functions below are also the methods ``state_dict``, ``load_state_dict``, ``save`` and
# ``load`` of MetaFusionTrainer: their first argument is the trainer (or its class).


def trainer_state(
    trainer: MetaFusionTrainer,
    loader_generators: Sequence[torch.Generator | None] = (),
    meta_generators: Sequence[torch.Generator | None] | None = None,
) -> dict[str, Any]:
    """Everything needed to resume: models, optimisers, schedulers, loop position, RNG.

    Parameters
    ----------
    loader_generators : sequence of torch.Generator or None
        A data loader's own generators, whose states are saved with the others.
    meta_generators : sequence of torch.Generator or None, optional
        The meta phase's generators (its crops', then its loader's); default: the trainer's
        ``meta_generator`` and ``meta_loader_generator``.

    Returns
    -------
    dict
        A checkpoint (only tensors, numbers, strings and containers of them; the schema is
        in :mod:`tdfusion.trainer.checkpoint`).
    """
    task = trainer.task_loss if isinstance(trainer.task_loss, nn.Module) else None
    if meta_generators is None:
        meta_generators = [trainer.meta_generator, trainer.meta_loader_generator]
    rng = capture_rng_state(trainer.generator, *loader_generators)
    rng["meta_generators"] = [None if g is None else g.get_state() for g in meta_generators]
    rng["meta_phase"] = trainer.meta_random_state
    return {
        "format": TRAINER_CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "epoch": trainer.epoch,
        "global_step": trainer.global_step,
        "config": trainer.config(),
        "models": {
            "fusion_model": trainer.fusion_model.state_dict(),
            "loss_generator": trainer.loss_generator.state_dict(),
            "task": None if task is None else task.state_dict(),
        },
        "model_configs": {
            "fusion_model": model_description(trainer.fusion_model),
            "loss_generator": _generator_description(trainer.loss_generator),
        },
        "optimizers": {name: opt.state_dict() for name, opt in trainer.optimizers.items()},
        "schedulers": {name: s.state_dict() for name, s in trainer.schedulers.items()},
        "grad_scaler": trainer.loss_scaler.state_dict(),
        "history": copy.deepcopy(trainer.history),
        "data": {
            "passes": trainer.data_passes,
            "meta_passes": trainer.meta_passes,
            "seed": trainer.data_seed,
            "world_size": trainer.world_size,
        },
        "rng": rng,
    }


def _generator_description(generator: nn.Module) -> dict[str, Any] | None:
    """:func:`model_description` of the loss generator; a :class:`~tdfusion.nets.FixedLossWeights`
    (which has no ``config``) is described by its rule, so that ``load`` can rebuild it."""
    from tdfusion.nets.fixed_weights import FixedLossWeights

    if isinstance(generator, FixedLossWeights):
        return {
            "arch": _FIXED_WEIGHTS_ARCH,
            "class": f"{type(generator).__module__}.{type(generator).__qualname__}",
            "config": {"rule": generator.rule},
        }
    return model_description(generator)


#: ``model_configs["loss_generator"]["arch"]`` of a trainer with fixed loss weights.
_FIXED_WEIGHTS_ARCH = "FixedLossWeights"

#: Learning-rate settings of the saved config, and the optimiser each one sets (if any).
_LEARNING_RATES = {
    "fusion_lr": "fusion",
    "task_lr": "task",
    "generator_lr": "generator",
    "inner_lr": None,
    "task_inner_lr": None,
}

#: Settings that decide what the optimisers' saved states hold: they cannot change on resume.
_OPTIMIZER_SETTINGS = ("optimizer", "generator_update")


def load_trainer_state(
    trainer: MetaFusionTrainer,
    state: Mapping[str, Any],
    *,
    source: str | os.PathLike[str] | None = None,
    new_rates: Collection[str] = (),
) -> None:
    """Restore what ``state_dict`` returned (the RNG state is applied by ``fit``).

    In a distributed run, load the same state on every rank.

    The trainer must have been built with the checkpoint's optimiser settings (``optimizer``,
    ``generator_update``) and learning rates (``fusion_lr``, ``task_lr``, ``generator_lr``,
    ``inner_lr``, ``task_inner_lr``), or the saved optimiser states and the trainer would
    disagree about the step size. :meth:`MetaFusionTrainer.load` changes learning rates on
    purpose (``new_rates``): the loaded optimisers then take the new rate, at the same point of
    their schedule.

    A saved learning-rate schedule is restored into the trainer's ``lr_scheduler``; a trainer
    built without one warns that the saved schedule is dropped (training goes on at the saved,
    current learning rates), and a trainer with one resuming a checkpoint without a schedule
    warns that its schedule starts from the beginning.

    Parameters
    ----------
    state : dict
        A trainer checkpoint.
    source : str or os.PathLike, optional
        The file it was read from, named in messages.
    new_rates : collection of str
        Learning-rate settings (``"fusion_lr"``, ...) whose value in this trainer replaces the
        saved one.

    Raises
    ------
    CheckpointError
        If the checkpoint does not fit these models (missing/unexpected keys, shapes), or was
        trained with other optimiser settings or learning rates.
    """
    # Imported here: the networks import this module to read trainer checkpoints.
    from tdfusion.nets.pretrained import load_checked_state_dict

    if state.get("format") != TRAINER_CHECKPOINT_FORMAT:
        raise CheckpointError(f"not a tdfusion trainer checkpoint: format {state.get('format')!r}")
    models = state["models"]
    for name, module in (
        ("fusion_model", trainer.fusion_model),
        ("loss_generator", trainer.loss_generator),
    ):
        load_checked_state_dict(module, models[name], f"entry {name!r}", strict=True)
    if isinstance(trainer.task_loss, nn.Module) and models.get("task") is not None:
        load_checked_state_dict(trainer.task_loss, models["task"], "entry 'task'", strict=True)
    elif trainer.task_module is not None:
        raise CheckpointError(
            "the checkpoint has no task network state, but task_loss is a trainable module"
        )
    where = "the checkpoint" if source is None else f"checkpoint {os.fspath(source)}"
    config = state.get("config", {})
    _check_optimizer_settings(trainer, config, where, new_rates)
    saved_optimizers = state["optimizers"]
    for name, optimizer in trainer.optimizers.items():
        if name not in saved_optimizers:
            raise CheckpointError(f"{where} has no state for the {name} optimizer")
        optimizer.load_state_dict(saved_optimizers[name])
        _check_param_groups(optimizer, name, where)
    _load_schedulers(trainer, state.get("schedulers") or {}, where)
    for key in new_rates:
        if _LEARNING_RATES.get(key) in trainer.optimizers and key in config:
            _set_learning_rate(trainer, _LEARNING_RATES[key], float(getattr(trainer, key)))
    _check_speed_options(trainer, config)
    trainer.loss_scaler.load_state_dict(state.get("grad_scaler") or {})
    trainer.epoch = int(state["epoch"])
    trainer.global_step = int(state["global_step"])
    trainer.history = list(copy.deepcopy(state.get("history", [])))
    data = state.get("data", {})
    trainer.data_passes = int(data.get("passes", 0))
    trainer.meta_passes = int(data.get("meta_passes", 0))
    trainer.data_seed = data.get("seed")
    saved_world_size = int(data.get("world_size", 1))
    if saved_world_size != trainer.world_size and trainer.is_main_process:
        warnings.warn(
            f"the checkpoint was written by a run of {saved_world_size} process(es) and this "
            f"run has {trainer.world_size}: training continues from the saved models and "
            "optimisers, with a different global batch and data order",
            stacklevel=2,
        )


def _check_optimizer_settings(
    trainer: MetaFusionTrainer, config: Mapping[str, Any], where: str, new_rates: Collection[str]
) -> None:
    """Refuse a checkpoint whose optimiser kind, generator update or learning rates differ
    from the trainer's (those in ``new_rates`` may differ: they are applied after loading)."""
    kinds = [
        f"{key}={config[key]!r} (this trainer: {getattr(trainer, key)!r})"
        for key in _OPTIMIZER_SETTINGS
        if key in config
        and getattr(trainer, key) is not None  # an optimizer factory is not saved
        and config[key] != getattr(trainer, key)
        and (key != "generator_update" or "generator" in trainer.optimizers)
    ]
    if kinds:
        raise CheckpointError(
            f"{where} was trained with {', '.join(kinds)}: its optimiser states do not fit "
            "this trainer's optimisers. Build the trainer with the saved values, or use "
            "MetaFusionTrainer.load(path, ...) which does"
        )
    rates = [
        f"{key} {float(config[key]):g} -> {float(getattr(trainer, key)):g}"
        for key in _LEARNING_RATES
        if key not in new_rates
        and config.get(key) is not None
        and float(config[key]) != float(getattr(trainer, key))
    ]
    if rates:
        raise CheckpointError(
            f"{where} was trained with other learning rates than this trainer's "
            f"({', '.join(rates)}; saved -> this trainer's): the saved optimiser states keep "
            "the saved rates. Build the trainer with the saved learning rates to resume, or "
            "change them with MetaFusionTrainer.load(path, ..., fusion_lr=...) and fit that "
            "trainer without resume="
        )


def _check_param_groups(optimizer: torch.optim.Optimizer, name: str, where: str) -> None:
    """Refuse a loaded optimiser state of another kind, which PyTorch loads and then fails on
    at the first step: every setting of the optimiser's defaults must be in its param groups
    (settings that newer PyTorch versions added are filled in by the loading itself)."""
    for group in optimizer.param_groups:
        missing = sorted(set(optimizer.defaults) - set(group))
        if missing:
            raise CheckpointError(
                f"{where} holds a {name} optimiser state of another kind than this trainer's "
                f"{type(optimizer).__name__} (it lacks {missing}): build the trainer with the "
                "checkpoint's optimizer"
            )


def _load_schedulers(trainer: MetaFusionTrainer, saved: Mapping[str, Any], where: str) -> None:
    """Restore the saved schedules into the trainer's; warn when either side has none."""
    for name, scheduler in trainer.schedulers.items():
        if name in saved:
            scheduler.load_state_dict(saved[name])
        else:
            # The loaded param groups lack the schedule's starting rate: it starts here.
            for group in scheduler.optimizer.param_groups:
                group.setdefault("initial_lr", group["lr"])
    dropped = sorted(set(saved) - set(trainer.schedulers))
    restarted = sorted(set(trainer.schedulers) - set(saved))
    if dropped and trainer.is_main_process:
        warnings.warn(
            f"{where} holds learning-rate schedules of the {', '.join(dropped)} optimiser(s), "
            "but this trainer has no lr_scheduler for them: they are dropped and training "
            "continues at the saved learning rates, unscheduled. Pass lr_scheduler= (the same "
            "factory as the saved run) to continue the schedule",
            UserWarning,
            stacklevel=4,
        )
    if restarted and trainer.is_main_process:
        warnings.warn(
            f"{where} holds no learning-rate schedule of the {', '.join(restarted)} "
            "optimiser(s): this trainer's lr_scheduler starts from its beginning at the saved "
            "learning rates",
            UserWarning,
            stacklevel=4,
        )


def _set_learning_rate(trainer: MetaFusionTrainer, name: str, rate: float) -> None:
    """Give a loaded optimiser (and its schedule) a new initial learning rate, at the point of
    the schedule it had reached: ``lr`` keeps its ratio to ``initial_lr``."""
    optimizer = trainer.optimizers[name]
    for group in optimizer.param_groups:
        start = group.get("initial_lr", group["lr"])
        progress = group["lr"] / start if start else 1.0
        group["lr"] = rate * progress
        if "initial_lr" in group:
            group["initial_lr"] = rate
    scheduler = trainer.schedulers.get(name)
    if scheduler is not None:
        if hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs = [rate for _ in optimizer.param_groups]
        if hasattr(scheduler, "_last_lr"):
            scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


#: The options that change how training computes, not what: a resumed run may change them.
_SPEED_OPTIONS = {"precision": "fp32", "compile": False, "channels_last": False}


def _check_speed_options(trainer: MetaFusionTrainer, config: Mapping[str, Any]) -> None:
    """Warn (on rank 0) when the checkpoint was trained with other precision, compile or
    channels-last options than the trainer resuming it."""
    changed = [
        f"{key}={config.get(key, default)!r} -> {getattr(trainer, key)!r}"
        for key, default in _SPEED_OPTIONS.items()
        if config.get(key, default) != getattr(trainer, key)
    ]
    if changed and trainer.is_main_process:
        warnings.warn(
            f"the checkpoint was trained with other options ({', '.join(changed)}); training "
            "continues with this trainer's",
            stacklevel=3,
        )


def saved_rng_state(state: Mapping[str, Any], world_size: int, rank: int) -> Any:
    """The random states a rank resumes with: its own when as many processes saved them.

    Parameters
    ----------
    state : mapping
        A trainer checkpoint.
    world_size, rank : int
        This run's number of processes and this process's rank.

    Returns
    -------
    dict or None
        What :func:`capture_rng_state` captured, or ``None``.
    """
    ranks_rng = state.get("rng_per_rank")
    saved_world_size = int(state.get("data", {}).get("world_size", 1))
    if ranks_rng and saved_world_size == world_size:
        return ranks_rng[rank]
    return state.get("rng")


def save_trainer(
    trainer: MetaFusionTrainer,
    path: str | os.PathLike[str],
    *,
    loader_generators: Sequence[torch.Generator | None] = (),
    meta_generators: Sequence[torch.Generator | None] | None = None,
) -> Path:
    """Write a checkpoint atomically (temporary file + rename).

    In a distributed run every rank must call it: the ranks' random states are gathered,
    rank 0 writes the file, and all ranks wait until it is written.

    Parameters
    ----------
    path : str or os.PathLike
        Destination file; parent folders are created.
    loader_generators : sequence of torch.Generator or None
        A data loader's own generators, whose states are saved with the others.
    meta_generators : sequence of torch.Generator or None, optional
        The meta phase's generators (see :func:`trainer_state`).

    Returns
    -------
    pathlib.Path
        The written file.

    Raises
    ------
    NonFiniteLossError
        If a network parameter or optimiser state holds NaN or infinite values, or a buffer
        NaN (a buffer may hold infinities, e.g. an attention mask): nothing is written and
        the file already at ``path`` (the last good checkpoint) is kept. Every rank raises.
    """
    strategy = trainer.strategy
    state = trainer_state(trainer, loader_generators, meta_generators)
    # Every rank holds the same models, so every rank refuses alike (no rank waits alone).
    poisoned = _first_poisoned(trainer) or first_nonfinite(state["optimizers"], "optimizers")
    if poisoned is not None:
        raise NonFiniteLossError(
            f"refusing to write checkpoint {os.fspath(path)}: {poisoned} holds NaN or infinite "
            "values; the file already there, if any, is kept"
        )
    if strategy.distributed:
        state["rng_per_rank"] = strategy.gather_objects(state["rng"])
    written = Path(path)
    if strategy.is_main:
        written = atomic_save(state, path)
    strategy.barrier()
    return written


def _first_poisoned(trainer: MetaFusionTrainer) -> str | None:
    """The first parameter holding NaN or infinity, or buffer holding NaN, of the networks.

    Buffers may hold infinities on purpose (an attention mask of ``-inf``), never NaN."""
    task = trainer.task_loss if isinstance(trainer.task_loss, nn.Module) else None
    roles = {
        "fusion_model": trainer.fusion_model,
        "loss_generator": trainer.loss_generator,
        "task": task,
    }
    for role, module in roles.items():
        if module is None:
            continue
        where = f"models[{role!r}]"
        found = first_nonfinite(dict(module.named_parameters()), where)
        if found is not None:
            return found
        for name, buffer in module.named_buffers():
            if buffer.is_floating_point() and bool(buffer.isnan().any()):
                return f"{where}[{name!r}]"
    return None


def first_nonfinite(state: Any, where: str = "") -> str | None:
    """The first floating-point tensor in nested dicts and lists that holds NaN or infinity.

    Parameters
    ----------
    state : Any
        State dicts, optimiser states, or containers of them.
    where : str
        Prefix of the returned key path.

    Returns
    -------
    str or None
        Its key path (``models['fusion_model']['conv.weight']``), or ``None`` when every
        tensor is finite.

    Example
    -------
    >>> first_nonfinite({"fusion": {"w": torch.tensor([0.0, float("nan")])}})
    "['fusion']['w']"
    """
    if isinstance(state, torch.Tensor):
        if state.is_floating_point() and not bool(state.isfinite().all()):
            return where
        return None
    if isinstance(state, Mapping):
        items: Any = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:
        return None
    for key, value in items:
        found = first_nonfinite(value, f"{where}[{key!r}]")
        if found is not None:
            return found
    return None


def load_trainer(
    cls: Any,
    path: str | os.PathLike[str],
    fusion_model: nn.Module,
    task_loss: Callable[..., torch.Tensor],
    loss_generator: nn.Module | None = None,
    fusion_loss: Callable[..., torch.Tensor] | None = None,
    **overrides: Any,
) -> MetaFusionTrainer:
    """Rebuild a trainer from a checkpoint.

    The hyper-parameters saved in the checkpoint are used unless given in ``overrides``.
    A learning rate given there (``fusion_lr``, ``task_lr``, ``generator_lr``, ``inner_lr``,
    ``task_inner_lr``) replaces the saved one in the loaded optimisers too, at the point of
    their schedule where the run stopped (a rate halved once by the schedule is half the new
    one). Without ``loss_generator``, the saved generator is rebuilt: a
    :class:`~tdfusion.LossGenerator` with the saved configuration, or the
    :class:`~tdfusion.nets.FixedLossWeights` of the saved rule. Model, optimiser and scheduler
    states and the loop position are restored; call ``fit`` with ``resume=path`` to also
    continue the random streams (that trainer must then have the same learning rates).

    The schedule factory is not saved: pass ``lr_scheduler=`` again to continue a saved
    schedule; without it a :class:`UserWarning` says that the saved schedules are dropped
    and training continues at the saved (current) learning rates.

    Parameters
    ----------
    path : str or os.PathLike
        Checkpoint written by ``save``.
    fusion_model : torch.nn.Module
        A module of the same architecture as the saved one.
    task_loss : callable or torch.nn.Module
        The task (a module of the saved architecture when the task was trainable).
    loss_generator : torch.nn.Module, optional
        The generator; rebuilt from the checkpoint when omitted.
    fusion_loss : callable, optional
        The fusion loss (default ``LearnableFusionLoss()``).
    **overrides
        Constructor arguments that replace the saved ones (``device``, ``lr_scheduler``, ...).

    Returns
    -------
    tdfusion.trainer.MetaFusionTrainer
        The restored trainer.

    Raises
    ------
    CheckpointError
        If the checkpoint does not fit the given networks, was trained with another
        ``optimizer`` or ``generator_update`` than ``overrides`` say, or its loss generator
        cannot be rebuilt (pass ``loss_generator``).
    """
    checkpoint = load_checkpoint(path)
    config = dict(checkpoint.get("config", {}))
    for key in ("fusion_crop", "task_size"):
        if config.get(key) is not None:
            config[key] = tuple(config[key])
    new_rates = [
        key
        for key in _LEARNING_RATES
        if key in overrides and config.get(key) is not None and overrides[key] is not None
    ]
    config.update(overrides)
    if loss_generator is None:
        loss_generator = _saved_generator(checkpoint, path)
    trainer = cls(fusion_model, task_loss, loss_generator, fusion_loss, **config)
    load_trainer_state(trainer, checkpoint, source=path, new_rates=new_rates)
    return trainer


def _saved_generator(checkpoint: Mapping[str, Any], path: str | os.PathLike[str]) -> nn.Module:
    """The loss generator a checkpoint describes: a LossGenerator or FixedLossWeights."""
    from tdfusion.nets import FixedLossWeights, LossGenerator

    description = (checkpoint.get("model_configs") or {}).get("loss_generator") or {}
    arch, config = description.get("arch"), dict(description.get("config") or {})
    if arch == _FIXED_WEIGHTS_ARCH:
        return FixedLossWeights(**config)
    saved_state = (checkpoint.get("models") or {}).get("loss_generator")
    if not description and isinstance(saved_state, Mapping) and not saved_state:
        raise CheckpointError(
            f"checkpoint {os.fspath(path)} was trained with fixed loss weights (a loss "
            "generator without parameters) and does not say which: pass "
            "loss_generator=FixedLossWeights(...) with the run's rule to MetaFusionTrainer.load"
        )
    if arch not in (None, LossGenerator.arch):
        raise CheckpointError(
            f"checkpoint {os.fspath(path)} was trained with a loss generator of class "
            f"{description.get('class')!r}, which load does not rebuild: pass "
            "loss_generator= (a module of that architecture) to MetaFusionTrainer.load"
        )
    return LossGenerator(**config)
