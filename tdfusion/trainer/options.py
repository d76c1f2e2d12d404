"""The trainer's choices that are values: optimiser tables, update rules and argument checks."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import torch
from torch import nn

from tdfusion.distributed import describe_replica

__all__ = [
    "CONFIG_KEYS",
    "FUSION_STEP_ORDERS",
    "GENERATOR_OPTIMIZERS",
    "OPTIMIZERS",
    "PRESETS",
    "TASK_INNER_OPTIMIZERS",
    "check_arguments",
    "make_optimizers",
    "make_schedulers",
    "optimizer_factory",
    "trainer_config",
    "trainer_from_preset",
]

TaskLoss = Callable[[torch.Tensor, Any], torch.Tensor]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]
OptimizerFactory = Callable[[Iterable[torch.Tensor], float], torch.optim.Optimizer]
GeneratorUpdate = Literal["normalized", "optimizer"]
OnNonFinite = Literal["raise", "skip"]
HypergradientMethodName = Literal["auto", "forward", "backprop"]
FusionStepOrder = Literal["simultaneous", "sequential"]

#: ``fusion_step_order=``: ``"simultaneous"`` feeds ``T`` with ``F`` before this step's update
#: of ``F`` (Eq. 8 and 9 side by side); ``"sequential"`` with ``F`` after it (research code).
FUSION_STEP_ORDERS = ("simultaneous", "sequential")

#: The names ``task_inner_optimizer=`` takes (besides a torchopt ``GradientTransformation``).
TASK_INNER_OPTIMIZERS = ("sgd", "adam", "task_optimizer", "task_optimizer_persistent")

#: Keyword presets of :meth:`MetaFusionTrainer.from_preset`. ``"research"`` reproduces the
#: authors' research code: squared weights in ``L_int`` (``weighting``, for the default fusion
#: loss), plain SGD for ``F'`` with ``F``'s current learning rate, ``T'`` by one step of ``T``'s
#: own optimiser whose state is kept, the normalised generator update, and the fusion step
#: feeding ``T`` with ``F`` after its update. ``"default"`` is the constructor's defaults.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "research": {
        "weighting": "squared",
        "inner_optimizer": "sgd",
        "task_inner_optimizer": "task_optimizer_persistent",
        "generator_update": "normalized",
        "fusion_step_order": "sequential",
    },
}

#: The hyper-parameters ``MetaFusionTrainer.config()`` returns: constructor arguments saved in
#: checkpoints (and compared between ranks), read from the trainer's attributes of that name.
CONFIG_KEYS = (
    "inner_lr",
    "inner_optimizer",
    "task_inner_optimizer",
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
    "fusion_step_order",
    "precision",
    "compile",
    "channels_last",
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
    fusion_step_order: str = "simultaneous",
    task_inner_optimizer: Any = None,
) -> None:
    """Refuse constructor arguments of :class:`MetaFusionTrainer` that cannot work.

    Parameters
    ----------
    fusion_model, task_loss : Any
        Must be an ``nn.Module`` and a callable.
    generator_update, hypergradient_method, on_nonfinite, fusion_step_order : str
        Must be known names (``hypergradient_methods`` are the known methods besides "auto").
    hypergradient_methods : iterable of str
        The methods of :data:`~tdfusion.trainer.hypergradient.HYPERGRADIENT_METHODS`.
    learning_rates : dict of str to float
        Argument name -> value, each must be positive.
    fusion_step_order : str
        One of :data:`FUSION_STEP_ORDERS`.
    task_inner_optimizer : str, torchopt.base.GradientTransformation or None
        A name must be one of :data:`TASK_INNER_OPTIMIZERS`.

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
    if isinstance(task_inner_optimizer, str) and task_inner_optimizer not in TASK_INNER_OPTIMIZERS:
        raise ValueError(
            f"task_inner_optimizer must be one of {', '.join(map(repr, TASK_INNER_OPTIMIZERS))} "
            f"or a torchopt GradientTransformation, got {task_inner_optimizer!r}"
        )
    if fusion_step_order not in FUSION_STEP_ORDERS:
        raise ValueError(
            f"fusion_step_order must be 'simultaneous' or 'sequential', got {fusion_step_order!r}"
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


def make_schedulers(
    factory: SchedulerFactory | None, optimizers: Mapping[str, torch.optim.Optimizer]
) -> dict[str, Any]:
    """The learning-rate schedules of ``lr_scheduler=``, one per optimiser, stepped per epoch.

    Parameters
    ----------
    factory : callable, optional
        ``factory(optimizer) -> scheduler``; ``None``: no schedule.
    optimizers : mapping of str to torch.optim.Optimizer
        The trainer's optimisers by name.

    Returns
    -------
    dict of str to scheduler
        By optimiser name (empty without a factory).

    Raises
    ------
    TypeError
        If a schedule needs a metric to step (``ReduceLROnPlateau``): the loop steps every
        schedule with ``step()`` after an epoch, and the fusion, task and generator
        optimisers have no common metric.
    """
    if factory is None:
        return {}
    schedulers = {name: factory(optimizer) for name, optimizer in optimizers.items()}
    for scheduler in schedulers.values():
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            raise TypeError(
                "lr_scheduler: ReduceLROnPlateau needs a metric at every step, and the trainer "
                "steps its schedules after each epoch without one (the fusion, task and "
                "generator optimisers share no metric); use a schedule by epoch count "
                "(StepLR, CosineAnnealingLR, ...), or step a plateau schedule yourself from a "
                "Callback's on_epoch_end"
            )
    return schedulers


def trainer_config(trainer: Any) -> dict[str, Any]:
    """The trainer's hyper-parameters, as saved in checkpoints and used by ``load``.

    This is the method ``MetaFusionTrainer.config``: :data:`CONFIG_KEYS` read from the trainer.

    Returns
    -------
    dict
        Constructor arguments (without the modules, device and scheduler factory, and
        without an ``optimizer`` factory or an ``inner_optimizer`` or
        ``task_inner_optimizer`` transformation).
    """
    config: dict[str, Any] = {key: getattr(trainer, key) for key in CONFIG_KEYS}
    for key in ("fusion_crop", "task_size"):
        config[key] = None if config[key] is None else list(config[key])
    if trainer.optimizer is None:  # a factory cannot be saved
        del config["optimizer"]
    for key in ("inner_optimizer", "task_inner_optimizer"):
        if config[key] is not None and not isinstance(config[key], str):  # a transformation
            del config[key]
    return config


def join_replicas(trainer: Any, ddp_options: Mapping[str, Any] | None) -> None:
    """Check that every rank built the same trainer, wrap ``F`` and ``T`` with the strategy
    (``ddp_options`` for ``DistributedDataParallel``) and start from rank 0's ``G`` and crop
    generator; in one process only the wrapping's no-op remains.

    The last step of ``MetaFusionTrainer.__init__``.

    Raises
    ------
    DistributedError
        If the ranks' trainers differ (configuration, parameter shapes, device type, dtype).
    """
    # All ranks must have built the same trainer; they start from rank 0's state.
    trainer.strategy.check_same(
        describe_replica(
            config=trainer.config(),
            fusion_model=trainer.fusion_model,
            loss_generator=trainer.loss_generator,
            task=trainer.task_loss if isinstance(trainer.task_loss, torch.nn.Module) else None,
            device_type=trainer.device.type,
            dtype=str(trainer.dtype),
        )
    )
    ddp = dict(ddp_options or {})
    task = trainer.task_module
    trainer._fusion_replica = trainer.strategy.wrap(trainer.fusion_model, **ddp)
    trainer._task_replica = (
        trainer.task_loss if task is None else trainer.strategy.wrap(task, **ddp)
    )
    trainer.strategy.start_from_main(trainer.loss_generator)
    trainer.generator.set_state(trainer.strategy.broadcast_object(trainer.generator.get_state()))


def trainer_from_preset(
    cls: Any,
    preset: str,
    fusion_model: nn.Module,
    task_loss: TaskLoss,
    loss_generator: nn.Module | None = None,
    fusion_loss: Callable[..., torch.Tensor] | None = None,
    **keywords: Any,
) -> Any:
    """A trainer set up by a named preset of ``PRESETS``
    (``MetaFusionTrainer.from_preset``).

    ``"research"`` reproduces the meta and fusion steps of the authors' research code:
    ``LearnableFusionLoss(weighting="squared")``, SGD for ``F'``, ``T'`` by one step of
    ``T``'s own Adam whose state is kept (``task_inner_optimizer=
    "task_optimizer_persistent"``), the normalised generator update and
    ``fusion_step_order="sequential"``. The research code's cross-entropy is a setting of
    the task (``SegmentationTask(..., pad=False, align_corners=True)`` with masks at the
    label resolution); :data:`tdfusion.recipes.PRESETS` sets both. See
    :doc:`/howto/paper_settings` for every difference.

    Parameters
    ----------
    cls : type
        ``MetaFusionTrainer`` (or a subclass).
    preset : {"default", "research"}
        The preset.
    fusion_model, task_loss, loss_generator : see the class
        As for the constructor.
    fusion_loss : callable, optional
        Default: ``LearnableFusionLoss(alpha=1.0, weighting=...)`` with the preset's
        weighting (``"linear"`` unless the preset says otherwise).
    **keywords
        Further constructor arguments; they override the preset's.

    Notes
    -----
    Checkpoints keep the preset's constructor arguments but not the fusion loss: rebuild a
    ``"research"`` trainer with ``MetaFusionTrainer.load(path, F, T, G,
    fusion_loss=LearnableFusionLoss(weighting="squared"))``.

    Returns
    -------
    tdfusion.MetaFusionTrainer
        The trainer.

    Examples
    --------
    >>> import torch
    >>> from tdfusion import MetaFusionTrainer
    >>> from tdfusion.nets import ReFusionNet
    >>> trainer = MetaFusionTrainer.from_preset(
    ...     "research", ReFusionNet(), torch.nn.functional.mse_loss, device="cpu")
    >>> trainer.fusion_loss.weighting, trainer.fusion_step_order
    ('squared', 'sequential')
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    settings = {**PRESETS[preset], **keywords}
    weighting = settings.pop("weighting", "linear")
    if fusion_loss is None:
        from tdfusion.losses import LearnableFusionLoss

        fusion_loss = LearnableFusionLoss(alpha=1.0, weighting=weighting)
    return cls(fusion_model, task_loss, loss_generator, fusion_loss, **settings)
