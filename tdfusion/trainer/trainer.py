"""``MetaFusionTrainer``: the algorithm of TDFusion (paper Algorithm 1), one step at a time.

The meta step (inner step, hypergradient, generator update) and the fusion step live here; the
loop over epochs is :mod:`tdfusion.trainer.loop`, the hypergradient methods
:mod:`tdfusion.trainer.hypergradient`, the checkpoint schema :mod:`tdfusion.trainer.checkpoint`
and distribution a :class:`~tdfusion.distributed.Strategy`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from tdfusion.distributed import Strategy, select_strategy
from tdfusion.losses import LearnableFusionLoss
from tdfusion.trainer import checkpoint as checkpoints
from tdfusion.trainer import fusion_step as fusion_steps
from tdfusion.trainer import loop
from tdfusion.trainer.batches import (
    Batch,
    BatchPreparer,
    crop_size,
    independent_generator,
    module_dtype,
    prepare_meta_batches,
)
from tdfusion.trainer.compilation import channels_last_, compiled_calls
from tdfusion.trainer.hypergradient import (
    HYPERGRADIENT_METHODS,
    ForwardModeUnsupported,
    InnerStep,
    InnerStepResult,
    inner_step,
    outer_gradient,
)
from tdfusion.trainer.meta import (
    InnerOptimizer,
    OptimizerStep,
    TaskInnerOptimizer,
    TaskOptimizerStep,
    trainable_parameters,
)
from tdfusion.trainer.options import (
    FusionStepOrder,
    GeneratorUpdate,
    HypergradientMethodName,
    OnNonFinite,
    OptimizerFactory,
    SchedulerFactory,
    TaskLoss,
    check_arguments,
    join_replicas,
    make_optimizers,
    make_schedulers,
    trainer_config,
    trainer_from_preset,
)
from tdfusion.trainer.precision import Precision, mixed_precision
from tdfusion.trainer.statistics import snapshot_buffers, step_statistics

__all__ = ["Batch", "MetaFusionTrainer"]

Prepared = tuple[torch.Tensor, torch.Tensor, Any]


class MetaFusionTrainer:
    """Train a fusion network with a loss generator learned from a downstream task.

    Three modules take part: the fusion network ``F(a, b) -> fused``, the loss generator
    ``G(a, b) -> (w_a, w_b)`` that parameterises the fusion loss ``L_f``, and the task loss
    ``L_t(fused, target)``. Training alternates (paper Algorithm 1):

    1. ``meta_steps`` generator updates (:meth:`meta_step`): an inner, differentiable step moves
       ``F`` to ``F'`` under ``L_f`` on a meta-train batch (and a trainable task network ``T`` to
       ``T'`` under ``L_t``); the task loss of ``T'(F'(meta-test batch))`` is differentiated
       through the inner step into ``G`` (the hypergradient), and ``G`` takes a step. ``F`` and
       ``T`` are unchanged afterwards.
    2. One pass of :meth:`fusion_step` over the data: ``F`` learns under ``L_f`` with ``G``'s
       weights held fixed, and ``T`` learns under ``L_t`` on the detached fused images.

    Parameters
    ----------
    fusion_model : torch.nn.Module
        ``fusion_model(a, b)`` returns the fused image, e.g. :class:`~tdfusion.nets.ReFusionNet`.
    task_loss : callable or torch.nn.Module
        ``task_loss(fused, target)`` returns a scalar. An ``nn.Module`` with trainable parameters
        is the task network ``T`` and is trained too; a plain callable (or a module whose
        parameters are frozen) is a fixed task.
    loss_generator : torch.nn.Module, optional
        ``G(a, b)`` returning weights (N, 2, H, W); a default :class:`~tdfusion.LossGenerator`
        when omitted.
    fusion_loss : callable, optional
        ``fusion_loss(fused, a, b, weights)`` returning a scalar; default
        ``LearnableFusionLoss(alpha=1.0)``. A ``terms`` method returning
        :class:`~tdfusion.losses.FusionLossTerms` is used for logging when present.
    inner_lr : float
        Step size ``eta_F'`` of the inner step (Eq. 4).
    inner_optimizer : {"sgd", "adam"} or torchopt.base.GradientTransformation
        torchopt's differentiable SGD, or Adam (fresh moments each meta step, ``eps_root > 0``),
        or any torchopt ``GradientTransformation`` such as ``torchopt.sgd(1e-2, momentum=0.9)``
        (fresh state each meta step; its own step size, so ``inner_lr`` and ``task_inner_lr``
        are not used, and it is not saved in :meth:`config`: pass it again to :meth:`load`).
    generator_lr : float
        Step size of the generator update.
    generator_update : {"normalized", "optimizer"}
        ``"normalized"``: ``theta_G -= generator_lr * g / max|g|`` with the maximum over all of
        G's parameters (the research code's rule; the raw hypergradient through one step of
        size 1e-4 is tiny). ``"optimizer"``: Adam on the raw hypergradient.
    fusion_lr, task_lr : float
        Adam learning rates of ``F`` and ``T`` in the fusion phase.
    device : str or torch.device, optional
        Where to train; ``None`` picks CUDA when available, else the CPU. The models are moved
        there and keep their dtype (float64 works, e.g. for gradient checks).
    task_inner_lr : float, optional
        Step size ``eta_T'`` of the task clone (Eq. 5); defaults to ``task_lr``. Used by a named
        ``task_inner_optimizer`` (``"sgd"``, ``"adam"``).
    fusion_crop : int or (int, int), optional
        Random crop (same offsets for ``a`` and ``b``) on which the fusion loss is computed;
        the task always sees the whole image. The paper uses 256.
    task_size : (int, int), optional
        ``(H, W)`` to which ``a`` and ``b`` are resized (bilinear) before they are fused for the
        task loss, e.g. (240, 320) for MSRS; targets must match that size. ``None``: as given.
    lr_scheduler : callable, optional
        ``factory(optimizer) -> scheduler``, applied to the fusion, task and generator
        optimisers and stepped after every epoch (e.g.
        ``lambda opt: torch.optim.lr_scheduler.StepLR(opt, 10, 0.1)`` as in the research code).
        A schedule that needs a metric (``ReduceLROnPlateau``) is refused with a
        ``TypeError``: the three optimisers have no common metric to step it with.
        The inner step sizes follow the fusion schedule: they are scaled by the ratio of the
        fusion optimiser's current to initial learning rate.
    grad_clip : float, optional
        Clip the gradient norm of ``F`` and ``T`` in the fusion phase to this value.
    on_nonfinite : {"raise", "skip"}
        What a NaN or infinite loss, gradient or hypergradient does: raise
        :class:`~tdfusion.errors.NonFiniteLossError` naming the step and the losses, or skip
        that update with a warning. Either way the update changes nothing.
    seed : int or torch.Generator, optional
        Seed (or CPU generator) for the crop offsets; saved and restored with checkpoints.
        The fusion steps draw theirs from it (the ``generator`` attribute) and the meta steps
        from a second stream seeded from it (``meta_generator``), so a run with meta steps
        and one without crop their fusion steps alike.
    optimizer : {"adam", "sgd"} or callable
        Optimiser of ``F`` and ``T`` in the fusion phase: Adam (the paper's), plain SGD, or a
        factory ``optimizer(parameters, lr) -> torch.optim.Optimizer``.
    distributed : bool, optional
        Train as one rank of a ``torch.distributed`` group (see :doc:`/howto/distributed`).
        ``None`` (default) does so under ``torchrun`` with more than one process (joining the
        group from its environment) or in an initialised group of several; ``False`` trains
        this process alone. The choice is the ``strategy`` attribute: every rank's updates are
        those of the global batch, :meth:`fit` shards the data, and only rank 0 shows
        progress and writes checkpoints and logs.
    ddp_options : dict, optional
        Extra keyword arguments of :class:`~torch.nn.parallel.DistributedDataParallel`, e.g.
        ``{"find_unused_parameters": True}`` for a task network with parameters its loss does
        not use.
    hypergradient_method : {"auto", "forward", "backprop"}
        How the exact hypergradient is computed (:mod:`tdfusion.trainer.hypergradient`):
        ``"forward"`` by one forward-mode derivative of ``F`` and first-order backward passes
        (fast, little memory), ``"backprop"`` by second-order back-propagation (any ``F``);
        ``"auto"`` uses ``"forward"`` and falls back, with a warning, to ``"backprop"``.
    task_inner_optimizer : str or torchopt.base.GradientTransformation, optional
        The task network's inner step ``T'`` (Eq. 5), the ``task_inner_step`` attribute.
        ``None`` (default): the same kind of step as ``inner_optimizer`` with ``task_inner_lr``.
        ``"sgd"``, ``"adam"`` or a ``GradientTransformation``: as for ``inner_optimizer`` (fresh
        state each meta step). ``"task_optimizer"``: one ``step()`` of ``T``'s own optimiser
        (``task_optimizer``, Adam by default, with its moments as they stand and its current
        learning rate), its state put back afterwards. ``"task_optimizer_persistent"``: the
        same, but the state after the step is kept (each meta step moves ``T``'s moments and
        step count, which the fusion phase then uses), as the research code does. ``T'`` is never
        differentiated (it depends on ``F``'s detached output), so the optimiser's state enters
        the outer loss as constants.
    fusion_step_order : {"simultaneous", "sequential"}
        In :meth:`fusion_step`, whether ``T`` learns from ``F``'s output before this step's
        update of ``F`` (Eq. 8 and 9 side by side) or after it (the research code).
    precision : {"fp32", "bf16", "fp16"}
        ``"bf16"``/``"fp16"``: the forwards (and backwards) of ``F``, ``G`` and a task network
        (its loss inside its module) run under :func:`torch.autocast`; float32 are the
        parameters, gradients, optimiser states, the fusion loss and a task function (on
        float32 outputs), the inner step and the hypergradient's sums. ``"fp16"`` scales the
        fusion phase's losses (``GradScaler``; an overflow skips the step) and refuses meta
        steps: use ``"bf16"``. Table: :mod:`tdfusion.trainer.precision`.
    compile : bool
        :func:`torch.compile` the fusion phase's forwards of ``F``, ``G`` and ``T`` (the
        meta step runs uncompiled, so the hypergradient is exact); a network whose compiled
        first call fails warns once and runs uncompiled (:mod:`tdfusion.trainer.compilation`).
    channels_last : bool
        Networks and sources in :data:`torch.channels_last` memory order.

    Attributes
    ----------
    epoch : int
        Completed epochs.
    global_step : int
        Meta and fusion steps taken so far.
    history : list of dict
        One summary per completed epoch (mean losses of each phase), kept in checkpoints.
    fusion_optimizer, task_optimizer, generator_optimizer : torch.optim.Optimizer
        The optimisers of F, T (``None`` for a fixed task) and G (``None`` for a generator
        without trainable parameters, such as :class:`~tdfusion.nets.FixedLossWeights`).
    strategy : tdfusion.distributed.Strategy
        How training is spread over processes (:class:`~tdfusion.distributed.SingleProcess` or
        :class:`~tdfusion.distributed.DataParallel`).
    fusion_inner_step, task_inner_step : tdfusion.trainer.OptimizerStep
        The differentiable inner steps of ``F`` (Eq. 4) and ``T`` (Eq. 5): callables
        ``step(parameters, gradients, lr_scale) -> parameters``; ``task_inner_step`` is a
        :class:`~tdfusion.trainer.meta.TaskOptimizerStep` with ``task_inner_optimizer=
        "task_optimizer"`` (or ``"task_optimizer_persistent"``).
    autocast, loss_scaler : tdfusion.trainer.precision.Autocast, LossScaler
        How the networks are called, and the fusion phase's loss scaling (``"fp16"``).
    distributed : bool
        Whether this trainer is one rank of a multi-process run.
    rank, world_size : int
        This process's rank and the number of processes (0 and 1 in a single process).

    Examples
    --------
    >>> import torch
    >>> from tdfusion import MetaFusionTrainer
    >>> from tdfusion.nets import ReFusionNet
    >>> def task_loss(fused, target):  # a fixed task: keep the infrared targets bright
    ...     return torch.nn.functional.mse_loss(fused, target)
    >>> trainer = MetaFusionTrainer(ReFusionNet(), task_loss, device="cpu")
    >>> a, b = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32)
    >>> stats = trainer.meta_step((a, b, a), (b, a, b))
    >>> sorted(stats)[:3]
    ['fusion_gradient', 'fusion_intensity', 'fusion_loss']
    """

    def __init__(
        self,
        fusion_model: nn.Module,
        task_loss: TaskLoss,
        loss_generator: nn.Module | None = None,
        fusion_loss: Callable[..., torch.Tensor] | None = None,
        *,
        inner_lr: float = 1e-4,
        inner_optimizer: InnerOptimizer = "sgd",
        generator_lr: float = 1e-4,
        generator_update: GeneratorUpdate = "normalized",
        fusion_lr: float = 1e-4,
        task_lr: float = 1e-4,
        device: str | torch.device | None = None,
        task_inner_lr: float | None = None,
        fusion_crop: int | tuple[int, int] | None = None,
        task_size: tuple[int, int] | None = None,
        lr_scheduler: SchedulerFactory | None = None,
        grad_clip: float | None = None,
        on_nonfinite: OnNonFinite = "raise",
        seed: int | torch.Generator | None = None,
        hypergradient_method: HypergradientMethodName = "auto",
        optimizer: str | OptimizerFactory = "adam",
        distributed: bool | None = None,
        ddp_options: Mapping[str, Any] | None = None,
        task_inner_optimizer: TaskInnerOptimizer | None = None,
        fusion_step_order: FusionStepOrder = "simultaneous",
        precision: Precision = "fp32",
        compile: bool = False,
        channels_last: bool = False,
    ) -> None:
        check_arguments(
            fusion_model,
            task_loss,
            generator_update=generator_update,
            hypergradient_method=hypergradient_method,
            hypergradient_methods=HYPERGRADIENT_METHODS,
            on_nonfinite=on_nonfinite,
            learning_rates={
                "inner_lr": inner_lr,
                "generator_lr": generator_lr,
                "fusion_lr": fusion_lr,
                "task_lr": task_lr,
            },
            fusion_step_order=fusion_step_order,
            task_inner_optimizer=task_inner_optimizer,
        )
        self.task_inner_lr = float(task_lr if task_inner_lr is None else task_inner_lr)
        self.fusion_inner_step = OptimizerStep(inner_optimizer, float(inner_lr))
        self.task_inner_optimizer = task_inner_optimizer
        own_step = isinstance(task_inner_optimizer, str) and task_inner_optimizer.startswith(
            "task_optimizer"
        )
        self.task_inner_step: InnerStep = OptimizerStep(
            inner_optimizer if task_inner_optimizer is None or own_step else task_inner_optimizer,
            self.task_inner_lr,
        )
        self.fusion_step_order = fusion_step_order
        self.strategy: Strategy = select_strategy(distributed, device)
        self.device = self.strategy.device
        self.distributed = self.strategy.distributed
        self.rank, self.world_size = self.strategy.rank, self.strategy.world_size

        if loss_generator is None:
            from tdfusion.nets import LossGenerator

            loss_generator = LossGenerator()
        self.fusion_model = fusion_model.to(self.device)
        self.dtype = module_dtype(self.fusion_model)
        self.autocast, self.loss_scaler = mixed_precision(precision, self.device, self.dtype)
        self.precision, self.compile, self.channels_last = precision, compile, channels_last
        in_channels = getattr(self.fusion_model, "in_channels", None)
        self._prepare = BatchPreparer(self.device, self.dtype, in_channels, self.channels_last)
        self.loss_generator = loss_generator.to(self.device)
        self.task_loss = (
            task_loss.to(self.device) if isinstance(task_loss, nn.Module) else task_loss
        )
        channels_last_(
            self.fusion_model, self.loss_generator, self.task_loss, enabled=channels_last
        )
        self.fusion_loss = (
            fusion_loss if fusion_loss is not None else LearnableFusionLoss(alpha=1.0)
        )

        self.inner_lr = float(inner_lr)
        self.inner_optimizer = inner_optimizer
        self.generator_lr = float(generator_lr)
        self.generator_update = generator_update
        self.fusion_lr = float(fusion_lr)
        self.task_lr = float(task_lr)
        self.fusion_crop = crop_size(fusion_crop)
        self.task_size = None if task_size is None else (int(task_size[0]), int(task_size[1]))
        self.grad_clip = None if grad_clip is None else float(grad_clip)
        self.on_nonfinite = on_nonfinite
        self.hypergradient_method = hypergradient_method
        self._resolved_method = (
            "forward" if hypergradient_method == "auto" else hypergradient_method
        )
        self.optimizer = optimizer if isinstance(optimizer, str) else None

        if isinstance(seed, torch.Generator) and seed.device.type != "cpu":
            raise ValueError(
                f"seed: the crop offsets are drawn on the CPU, so a torch.Generator there is "
                f"needed, got one on {seed.device} (pass an int, or torch.Generator())"
            )
        self.generator = (  # draws the crop offsets
            seed
            if isinstance(seed, torch.Generator)
            else torch.Generator().manual_seed(torch.initial_seed() if seed is None else int(seed))
        )

        task = self.task_module
        optimizers = make_optimizers(
            optimizer,
            self.fusion_model,
            task,
            self.loss_generator,
            fusion_lr=self.fusion_lr,
            task_lr=self.task_lr,
            generator_lr=self.generator_lr,
            generator_update=generator_update,
        )
        self.fusion_optimizer = optimizers["fusion"]
        self.task_optimizer = optimizers.get("task")
        self.generator_optimizer = optimizers.get("generator")  # None: a fixed loss
        if own_step and self.task_optimizer is not None:
            self.task_inner_step = TaskOptimizerStep(
                self.task_optimizer, persistent=task_inner_optimizer == "task_optimizer_persistent"
            )
        self.schedulers: dict[str, Any] = make_schedulers(lr_scheduler, optimizers)

        # The loop position (see tdfusion.trainer.loop), kept in checkpoints.
        self.epoch = 0
        self.global_step = 0
        self.history: list[dict[str, Any]] = []
        #: Passes started over the training data by the fusion phase: a DistributedSampler's
        #: epoch (and by the meta phase too when fit cannot give it a loader of its own).
        self.data_passes = 0
        #: Passes started by the meta phase over its own loader (see :meth:`fit`).
        self.meta_passes = 0
        #: The generator of the meta phase's twin loader (made by the first ``fit``).
        self.meta_loader_generator: torch.Generator | None = None
        #: The meta phase's random state between meta phases (see tdfusion.trainer.streams).
        self.meta_random_state: dict[str, Any] | None = None
        #: Shuffling seed of the DistributedSampler that fit() reads the data through.
        self.data_seed: int | None = None

        join_replicas(self, ddp_options)
        #: Draws the meta steps' crop offsets: a stream of its own, so that the fusion steps'
        #: crops do not depend on how many meta steps were taken (seeded from ``generator``).
        self.meta_generator = independent_generator(self.generator)
        self._calls = compiled_calls(self, self.compile)  # the fusion phase's forwards

    @property
    def is_main_process(self) -> bool:
        """Whether this process is rank 0 (always ``True`` in a single-process run)."""
        return self.rank == 0

    @property
    def task_module(self) -> nn.Module | None:
        """The trainable task network ``T``, or ``None`` when the task loss is fixed."""
        task = self.task_loss
        if isinstance(task, nn.Module) and any(p.requires_grad for p in task.parameters()):
            return task
        return None

    @property
    def lr_scale(self) -> float:
        """Current fusion learning rate divided by the initial one (1 without a schedule).

        The initial rate is the optimiser's own ``initial_lr`` (set by a schedule, and kept in
        checkpoints), else ``fusion_lr``.
        """
        group = self.fusion_optimizer.param_groups[0]
        return group["lr"] / group.get("initial_lr", self.fusion_lr)

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """The optimisers that exist, by name: ``"fusion"``, ``"generator"``, ``"task"``."""
        optimizers = {"fusion": self.fusion_optimizer}
        if self.generator_optimizer is not None:
            optimizers["generator"] = self.generator_optimizer
        if self.task_optimizer is not None:
            optimizers["task"] = self.task_optimizer
        return optimizers

    config = trainer_config  # the hyper-parameters saved in checkpoints (options.py)

    _prepare_meta = prepare_meta_batches
    from_preset = classmethod(trainer_from_preset)

    # ------------------------------------------------------------------ meta step
    def _inner_step(
        self, meta_train: Prepared, meta_test: Prepared, differentiable: bool, synchronise: bool
    ) -> InnerStepResult:
        """The inner step and outer loss; ``synchronise``: of the global batch (all ranks)."""
        return inner_step(
            self.fusion_model,
            self.loss_generator,
            self.fusion_loss,
            self.task_loss,
            meta_train,
            meta_test,
            fusion_step=self.fusion_inner_step,
            task_step=self.task_inner_step,
            lr_scale=self.lr_scale,
            task_size=self.task_size,
            differentiable=differentiable,
            reduce=self.strategy.global_gradients if synchronise else None,
            precision=self.autocast.for_meta_step(),
        )

    def meta_loss(self, meta_train: Batch, meta_test: Batch) -> torch.Tensor:
        """The outer objective ``L_t(T'(F'(x_mts)))`` as a differentiable function of ``theta_G``.

        This builds the whole graph (outer forward on top of the inner step), so
        ``torch.autograd.grad(trainer.meta_loss(...), G.parameters())`` is the hypergradient.
        :meth:`hypergradient` computes the same value in two cheaper phases; this method is the
        straightforward form, for checks and for custom outer objectives. Nothing is modified,
        but the crop offsets (when ``fusion_crop`` is set) advance the trainer's
        ``meta_generator``.
        In a distributed run this is the objective of this rank's batches alone (no
        communication); :meth:`hypergradient` gives the one of the global batch.

        Parameters
        ----------
        meta_train, meta_test : tuple
            Batches ``(a, b, target)``.

        Returns
        -------
        torch.Tensor
            Scalar outer loss with a graph to the generator's parameters.
        """
        inner = self._inner_step(*self._prepare_meta(meta_train, meta_test), True, False)
        return inner.outer(inner.adapted_fusion)

    def _hypergradient(
        self, meta_train: Prepared, meta_test: Prepared
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor | None]]:
        """The global batch's hypergradient by the method in use, and the step's statistics."""
        rule = HYPERGRADIENT_METHODS[self._resolved_method]
        inner = self._inner_step(meta_train, meta_test, rule.differentiable_inner_step, True)
        outer_loss, cotangents = outer_gradient(inner)
        self.strategy.mean_(cotangents)  # v of the global meta-test batch
        try:
            hypergradient = rule.compute(inner, cotangents)
        except ForwardModeUnsupported as error:
            if self.hypergradient_method != "auto":
                raise error.__cause__ from None
            warnings.warn(
                "the fusion model does not support forward-mode differentiation "
                f"({error.__cause__}); computing hypergradients by second-order "
                "back-propagation instead",
                RuntimeWarning,
                stacklevel=3,
            )
            self._resolved_method = "backprop"
            return self._hypergradient(meta_train, meta_test)  # the same batches and crop
        # Each rank holds its term of the global hypergradient; their mean is the whole.
        self.strategy.mean_(list(hypergradient.values()))
        return hypergradient, inner.statistics(outer_loss)

    def hypergradient(self, meta_train: Batch, meta_test: Batch) -> dict[str, torch.Tensor]:
        """The exact gradient of the outer task loss w.r.t. the loss generator's parameters.

        Computes ``dL_t(T'(F'(x_mts)))/dtheta_G`` (paper Eq. 7), where ``F'`` is ``F`` after one
        differentiable inner step under the learnable fusion loss on ``meta_train`` and ``T'``
        is ``T`` after one step under the task loss on ``meta_train`` (when the task is
        trainable), by the method of ``hypergradient_method`` (see
        :mod:`tdfusion.trainer.hypergradient`). Changes nothing: parameters, buffers, ``.grad``
        fields, optimiser states and the trainer's random generators are as before.

        In a distributed run every rank calls it with its own batches and gets the
        hypergradient of the global batches (the concatenation of all ranks' batches).

        Parameters
        ----------
        meta_train, meta_test : tuple
            Batches ``(a, b, target)``; ``a``, ``b`` of shape (N, C, H, W) in [0, 1].

        Returns
        -------
        dict of str to torch.Tensor
            Generator parameter name -> hypergradient (detached, same shape).
        """
        generator_state = self.meta_generator.get_state()
        try:
            batches = self._prepare_meta(meta_train, meta_test)
        finally:
            self.meta_generator.set_state(generator_state)  # the crop offsets were drawn from it
        hypergradient, _ = self._hypergradient(*batches)
        return {name: g.detach() for name, g in hypergradient.items()}

    def meta_step(self, meta_train: Batch, meta_test: Batch) -> dict[str, float]:
        """One generator update (paper Eq. 6) from a meta-train and a meta-test batch.

        ``F`` and ``T`` are left as they were (parameters and buffers); only ``G``'s
        parameters and optimiser state change, and only when the losses and every coordinate
        of the hypergradient are finite.
        In a distributed run every rank calls it with its own batches; all ranks take the same
        step, that of the global batches, and return the same (averaged) statistics.

        Parameters
        ----------
        meta_train, meta_test : tuple
            Two different batches ``(a, b, target)``.

        Returns
        -------
        dict of str to float
            ``task_loss`` (outer loss on the meta-test batch), ``meta_train_task_loss`` (when
            ``T`` is trainable), ``fusion_loss`` / ``fusion_intensity`` / ``fusion_gradient``
            (inner loss on the meta-train batch), ``hypergradient_max`` (``max|g|``),
            ``weight_a_mean`` (mean ``w_a`` on the meta-train crop), ``generator_lr`` and
            ``skipped`` (1.0 when a non-finite value skipped the update).
        """
        if self.generator_optimizer is None:
            raise ValueError(
                "the loss generator has no trainable parameters (a fixed fusion loss): "
                "train with meta_steps=0"
            )
        self.fusion_model.train()
        self.loss_generator.train()
        if self.task_module is not None:
            self.task_module.train()
        # Every network runs on private copies of its buffers; a task module without trainable
        # parameters (a frozen network) keeps the mode its owner set. Whatever the step's
        # outcome, the buffers are as they were.
        task = self.task_loss if isinstance(self.task_loss, nn.Module) else None
        restore_buffers = snapshot_buffers(self.fusion_model, self.loss_generator, task)
        try:
            return self._meta_update(self.generator_optimizer, meta_train, meta_test)
        finally:
            restore_buffers()

    def _meta_update(
        self, optimizer: torch.optim.Optimizer, meta_train: Batch, meta_test: Batch
    ) -> dict[str, float]:
        """The meta step after its modes are set: hypergradient, the non-finite rule, G's step."""
        hypergradient, tensors = self._hypergradient(*self._prepare_meta(meta_train, meta_test))
        # torch's max, unlike Python's, is NaN when any value is: a NaN anywhere skips the step.
        magnitudes = [g.detach().abs().amax() for g in hypergradient.values() if g.numel()]
        largest = float(torch.stack(magnitudes).max()) if magnitudes else 0.0
        lr = optimizer.param_groups[0]["lr"]
        stats = self._summarise("meta step", tensors, hypergradient_max=largest, generator_lr=lr)
        if stats["skipped"]:
            return stats
        # The generator's update rule: "normalized" divides by max|g| over all of G.
        optimizer.zero_grad(set_to_none=True)
        for name, param in trainable_parameters(self.loss_generator).items():
            grad = hypergradient[name]
            if self.generator_update == "normalized":
                grad = grad / largest if largest > 0 else torch.zeros_like(grad)
            param.grad = grad.detach()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        commit = getattr(self.task_inner_step, "commit", None)
        if commit is not None:  # T's optimiser keeps its meta-step state (the research code)
            commit()
        return stats

    # ------------------------------------------------------------------ fusion step
    # The fusion phase's step (Eq. 8 and 9) is a function of a trainer in its own module.
    fusion_step = fusion_steps.fusion_step

    @property
    def _position(self) -> str:
        return f"epoch {self.epoch}, global step {self.global_step}"

    def _summarise(
        self, where: str, tensors: Mapping[str, torch.Tensor | None], **extra: float
    ) -> dict[str, float]:
        return step_statistics(
            self.strategy.mean_stats(tensors),
            where,
            on_nonfinite=self.on_nonfinite,
            position=self._position,
            warn=self.is_main_process,
            **extra,
        )

    # ------------------------------------------------------------------ loop and checkpoints
    # The loop and the checkpoint schema are functions of a trainer in their own modules; they
    # are this class's methods too, documented there.
    fit = loop.fit
    _shard_loader = loop.shard_for_training
    state_dict = checkpoints.trainer_state
    load_state_dict = checkpoints.load_trainer_state
    save = checkpoints.save_trainer
    load = classmethod(checkpoints.load_trainer)
