"""The trainer's choices that are values: optimiser tables, update rules and argument checks."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch

__all__ = [
    "CONFIG_KEYS",
    "GENERATOR_OPTIMIZERS",
    "OPTIMIZERS",
    "check_arguments",
    "make_optimizers",
    "optimizer_factory",
    "trainer_config",
]

TaskLoss = Callable[[torch.Tensor, Any], torch.Tensor]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]
OptimizerFactory = Callable[[Iterable[torch.Tensor], float], torch.optim.Optimizer]
GeneratorUpdate = Literal["normalized", "optimizer"]
OnNonFinite = Literal["raise", "skip"]
HypergradientMethodName = Literal["auto", "forward", "backprop"]

#: The hyper-parameters ``MetaFusionTrainer.config()`` returns: constructor arguments saved in
#: checkpoints (and compared between ranks), read from the trainer's attributes of that name.
CONFIG_KEYS = (
    "inner_lr",
    "inner_optimizer",
    "task_inner_lr",
    "generator_lr",
    "generator_update",
    "fusion_lr",
    "task_lr",
    "fusion_crop",
    "task_size",
    "grad_clip",
    "on_nonfinite",
    "hypergradient_method",
    "optimizer",
)

#: Optimisers of ``F`` and ``T`` by name (``optimizer=`` of :class:`MetaFusionTrainer`).
OPTIMIZERS: dict[str, OptimizerFactory] = {
    "adam": lambda parameters, lr: torch.optim.Adam(parameters, lr=lr),
    "sgd": lambda parameters, lr: torch.optim.SGD(parameters, lr=lr),
}

#: The generator's optimiser by ``generator_update=``. ``"normalized"`` is SGD on the
#: hypergradient divided by its largest absolute value over all of G (the research code's
#: rule; the division is done by ``meta_step``), ``"optimizer"`` Adam on the raw hypergradient.
GENERATOR_OPTIMIZERS: dict[str, OptimizerFactory] = {
    "normalized": OPTIMIZERS["sgd"],
    "optimizer": OPTIMIZERS["adam"],
}


def optimizer_factory(optimizer: str | OptimizerFactory) -> OptimizerFactory:
    """The factory ``(parameters, lr) -> Optimizer`` of a name of :data:`OPTIMIZERS` or a callable.

    Parameters
    ----------
    optimizer : str or callable
        ``"adam"``, ``"sgd"`` or a factory.

    Returns
    -------
    callable
        The factory.

    Example
    -------
    >>> factory = optimizer_factory("sgd")
    >>> type(factory([torch.zeros(1, requires_grad=True)], 0.1)).__name__
    'SGD'
    """
    if isinstance(optimizer, str):
        if optimizer not in OPTIMIZERS:
            raise ValueError(
                f"optimizer must be one of {sorted(OPTIMIZERS)} or a factory "
                f"(parameters, lr) -> Optimizer, got {optimizer!r}"
            )
        return OPTIMIZERS[optimizer]
    if callable(optimizer):
        return optimizer
    raise TypeError(f"optimizer must be a name or a callable, got {type(optimizer).__name__}")


def check_arguments(
    fusion_model: Any,
    task_loss: Any,
    *,
    generator_update: str,
    hypergradient_method: str,
    hypergradient_methods: Iterable[str],
    on_nonfinite: str,
    learning_rates: dict[str, float],
) -> None:
    """Refuse constructor arguments of :class:`MetaFusionTrainer` that cannot work.

    Parameters
    ----------
    fusion_model, task_loss : Any
        Must be an ``nn.Module`` and a callable.
    generator_update, hypergradient_method, on_nonfinite : str
        Must be known names (``hypergradient_methods`` are the known methods besides "auto").
    hypergradient_methods : iterable of str
        The methods of :data:`~tdfusion.trainer.hypergradient.HYPERGRADIENT_METHODS`.
    learning_rates : dict of str to float
        Argument name -> value, each must be positive.

    Raises
    ------
    TypeError, ValueError
        Naming the argument, what it must be and what it is.
    """
    if not isinstance(fusion_model, torch.nn.Module):
        raise TypeError(f"fusion_model must be an nn.Module, got {type(fusion_model).__name__}")
    if not callable(task_loss):
        raise TypeError(f"task_loss must be callable, got {type(task_loss).__name__}")
    if generator_update not in GENERATOR_OPTIMIZERS:
        raise ValueError(
            f"generator_update must be 'normalized' or 'optimizer', got {generator_update!r}"
        )
    methods = ["auto", *hypergradient_methods]
    if hypergradient_method not in methods:
        raise ValueError(
            f"hypergradient_method must be one of {', '.join(map(repr, methods))}, got "
            f"{hypergradient_method!r}"
        )
    if on_nonfinite not in ("raise", "skip"):
        raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
    for name, value in learning_rates.items():
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value}")


def make_optimizers(
    optimizer: str | OptimizerFactory,
    fusion_model: torch.nn.Module,
    task: torch.nn.Module | None,
    loss_generator: torch.nn.Module,
    *,
    fusion_lr: float,
    task_lr: float,
    generator_lr: float,
    generator_update: str,
) -> dict[str, torch.optim.Optimizer]:
    """The optimisers of ``F``, ``T`` and ``G`` that have something to optimise.

    A fixed task (``task=None``) has no optimiser, nor has a generator without trainable
    parameters (e.g. :class:`~tdfusion.nets.FixedLossWeights`: a fixed loss).

    Parameters
    ----------
    optimizer : str or callable
        Of ``F`` and ``T``: a name of :data:`OPTIMIZERS` or a factory.
    fusion_model, loss_generator : torch.nn.Module
        ``F`` and ``G``.
    task : torch.nn.Module, optional
        The trainable task network ``T``.
    fusion_lr, task_lr, generator_lr : float
        Their learning rates.
    generator_update : str
        A key of :data:`GENERATOR_OPTIMIZERS`.

    Returns
    -------
    dict of str to torch.optim.Optimizer
        ``"fusion"``, and ``"task"`` and ``"generator"`` when they exist.
    """
    make = optimizer_factory(optimizer)

    def trainable(module: torch.nn.Module) -> list[torch.Tensor]:
        return [p for p in module.parameters() if p.requires_grad]

    optimizers = {"fusion": make(trainable(fusion_model), fusion_lr)}
    if task is not None:
        optimizers["task"] = make(trainable(task), task_lr)
    if trainable(loss_generator):
        make_generator_optimizer = GENERATOR_OPTIMIZERS[generator_update]
        optimizers["generator"] = make_generator_optimizer(trainable(loss_generator), generator_lr)
    return optimizers


def trainer_config(trainer: Any) -> dict[str, Any]:
    """The trainer's hyper-parameters, as saved in checkpoints and used by ``load``.

    This is the method ``MetaFusionTrainer.config``: :data:`CONFIG_KEYS` read from the trainer.

    Returns
    -------
    dict
        Constructor arguments (without the modules, device and scheduler factory, and
        without an ``optimizer`` factory or an ``inner_optimizer`` transformation).
    """
    config: dict[str, Any] = {key: getattr(trainer, key) for key in CONFIG_KEYS}
    for key in ("fusion_crop", "task_size"):
        config[key] = None if config[key] is None else list(config[key])
    if trainer.optimizer is None:  # a factory cannot be saved
        del config["optimizer"]
    if not isinstance(trainer.inner_optimizer, str):  # nor can a transformation
        del config["inner_optimizer"]
    return config
