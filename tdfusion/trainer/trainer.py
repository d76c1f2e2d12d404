"""``MetaFusionTrainer``: the alternating meta-learning schedule of TDFusion (paper Algorithm 1)."""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from tdfusion import distributed as dist_utils
from tdfusion.errors import CheckpointError, DistributedError, NonFiniteLossError
from tdfusion.losses import FusionLossTerms, LearnableFusionLoss
from tdfusion.nets.pretrained import load_checked_state_dict
from tdfusion.trainer.callbacks import Callback
from tdfusion.trainer.checkpoint import (
    TRAINER_CHECKPOINT_FORMAT,
    atomic_save,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
)
from tdfusion.trainer.meta import (
    InnerOptimizerName,
    call_functionally,
    differentiable_step,
    gradients,
    make_inner_optimizer,
    trainable_parameters,
    vector_jacobian_product,
)

__all__ = ["Batch", "MetaFusionTrainer"]

#: A training batch: ``(a, b, target)`` with ``a``, ``b`` of shape (N, C, H, W) in [0, 1] and
#: ``target`` whatever the task loss takes.
Batch = Sequence[Any]
TaskLoss = Callable[[torch.Tensor, Any], torch.Tensor]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]
OptimizerFactory = Callable[[Iterable[torch.Tensor], float], torch.optim.Optimizer]
GeneratorUpdate = Literal["normalized", "optimizer"]
OnNonFinite = Literal["raise", "skip"]
HypergradientMethod = Literal["auto", "forward", "backprop"]

CHECKPOINT_VERSION = 1

#: Optimisers of ``F`` and ``T`` by name (``optimizer=`` of :class:`MetaFusionTrainer`).
OPTIMIZERS: dict[str, OptimizerFactory] = {
    "adam": lambda parameters, lr: torch.optim.Adam(parameters, lr=lr),
    "sgd": lambda parameters, lr: torch.optim.SGD(parameters, lr=lr),
}


def _module_dtype(module: nn.Module) -> torch.dtype:
    for tensor in module.parameters():
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.get_default_dtype()


def _model_description(model: nn.Module) -> dict[str, Any] | None:
    """What rebuilds a network of ours from a checkpoint: its class and constructor config."""
    config = getattr(model, "config", None)
    if not isinstance(config, Mapping):
        return None
    return {
        "arch": getattr(model, "arch", None) or type(model).__name__,
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "config": dict(config),
    }


def _move_target(target: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Move every tensor in ``target`` to ``device``; floating tensors also take ``dtype``."""
    if isinstance(target, torch.Tensor):
        if target.is_floating_point():
            return target.to(device=device, dtype=dtype)
        return target.to(device=device)
    if isinstance(target, Mapping):
        return type(target)({k: _move_target(v, device, dtype) for k, v in target.items()})
    if isinstance(target, tuple) and hasattr(target, "_fields"):  # named tuple
        return type(target)(*(_move_target(v, device, dtype) for v in target))
    if isinstance(target, (list, tuple)):
        return type(target)(_move_target(v, device, dtype) for v in target)
    return target


def _backward(loss: torch.Tensor) -> None:
    """``loss.backward()``, without DistributedDataParallel's warning about gradient layouts.

    The depthwise convolutions of the Restormer blocks (and of SegFormer) get weight gradients
    in a channels-last layout on the CPU; DistributedDataParallel copies them into its buckets
    (one copy per such tensor, negligible next to the convolution) and warns that it does.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        loss.backward()


class _ForwardModeUnsupported(Exception):
    """Forward-mode differentiation of the fusion model failed (the cause says why)."""


def _finite(*values: torch.Tensor | None) -> bool:
    return all(v is None or bool(torch.isfinite(v).all()) for v in values)


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
    inner_optimizer : {"sgd", "adam"}
        torchopt's differentiable SGD, or Adam (fresh moments each meta step, ``eps_root > 0``).
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
        Step size ``eta_T'`` of the task clone (Eq. 5); defaults to ``task_lr``. The clone uses
        the same kind of step as ``inner_optimizer``.
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
        The inner step sizes follow the fusion schedule: they are scaled by the ratio of the
        fusion optimiser's current to initial learning rate.
    grad_clip : float, optional
        Clip the gradient norm of ``F`` and ``T`` in the fusion phase to this value.
    on_nonfinite : {"raise", "skip"}
        What a NaN or infinite loss or hypergradient does: raise
        :class:`~tdfusion.errors.NonFiniteLossError` naming the step and the losses, or skip
        that update with a warning.
    seed : int or torch.Generator, optional
        Seed (or generator) for the crop offsets; saved and restored with checkpoints.
    optimizer : {"adam", "sgd"} or callable
        Optimiser of ``F`` and ``T`` in the fusion phase: Adam (the paper's), plain SGD, or a
        factory ``optimizer(parameters, lr) -> torch.optim.Optimizer``.
    distributed : bool, optional
        Train as one process of a ``torch.distributed`` group (see :doc:`/howto/distributed`).
        ``None`` (default) does so when the script runs under ``torchrun`` with more than one
        process (the group is initialised from its environment when needed) or a group of more
        than one process is initialised; ``False`` trains this process on its own. In a
        distributed run ``F`` and ``T`` are wrapped in
        :class:`~torch.nn.parallel.DistributedDataParallel` for the fusion phase, the inner
        step and the hypergradient are all-reduced so that every rank's generator update is
        that of the whole (global) batch, :meth:`fit` shards the data with a
        :class:`~torch.utils.data.distributed.DistributedSampler`, and only rank 0 shows
        progress and writes checkpoints and logs.
    ddp_options : dict, optional
        Extra keyword arguments of :class:`~torch.nn.parallel.DistributedDataParallel`, e.g.
        ``{"find_unused_parameters": True}`` for a task network with parameters its loss does
        not use.
    hypergradient_method : {"auto", "forward", "backprop"}
        How the exact hypergradient is computed. ``"forward"``: one forward-mode derivative of
        ``F`` and first-order backward passes only (fast, little memory; see
        :meth:`hypergradient`). ``"backprop"``: second-order back-propagation through the inner
        step (works for any ``F``). ``"auto"`` uses ``"forward"`` and falls back to
        ``"backprop"``, with a warning, when ``F`` has an operation without forward-mode support.

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
        inner_optimizer: InnerOptimizerName = "sgd",
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
        hypergradient_method: HypergradientMethod = "auto",
        optimizer: str | OptimizerFactory = "adam",
        distributed: bool | None = None,
        ddp_options: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(fusion_model, nn.Module):
            raise TypeError(f"fusion_model must be an nn.Module, got {type(fusion_model).__name__}")
        if not callable(task_loss):
            raise TypeError(f"task_loss must be callable, got {type(task_loss).__name__}")
        if generator_update not in ("normalized", "optimizer"):
            raise ValueError(
                f"generator_update must be 'normalized' or 'optimizer', got {generator_update!r}"
            )
        if hypergradient_method not in ("auto", "forward", "backprop"):
            raise ValueError(
                "hypergradient_method must be 'auto', 'forward' or 'backprop', got "
                f"{hypergradient_method!r}"
            )
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
        for name, value in (
            ("inner_lr", inner_lr),
            ("generator_lr", generator_lr),
            ("fusion_lr", fusion_lr),
            ("task_lr", task_lr),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        make_inner_optimizer(inner_optimizer, inner_lr)  # validates the name early
        if isinstance(optimizer, str):
            if optimizer not in OPTIMIZERS:
                raise ValueError(
                    f"optimizer must be one of {sorted(OPTIMIZERS)} or a factory "
                    f"(parameters, lr) -> Optimizer, got {optimizer!r}"
                )
            optimizer_factory = OPTIMIZERS[optimizer]
        elif callable(optimizer):
            optimizer_factory = optimizer
        else:
            raise TypeError(
                f"optimizer must be a name or a callable, got {type(optimizer).__name__}"
            )
        self.distributed = self._join_process_group(distributed, device)
        self.rank = dist_utils.get_rank() if self.distributed else 0
        self.world_size = dist_utils.get_world_size() if self.distributed else 1

        if loss_generator is None:
            from tdfusion.nets import LossGenerator

            loss_generator = LossGenerator()
        self.device = dist_utils.rank_device(device)
        if self.distributed:
            dist_utils.check_backend(self.device)
            if self.device.type == "cuda":
                # Object collectives (broadcast_object, gather_objects) use the current device.
                torch.cuda.set_device(self.device)
        self.fusion_model = fusion_model.to(self.device)
        self.dtype = _module_dtype(self.fusion_model)
        self.loss_generator = loss_generator.to(self.device)
        self.task_loss = (
            task_loss.to(self.device) if isinstance(task_loss, nn.Module) else task_loss
        )
        self.fusion_loss = (
            fusion_loss if fusion_loss is not None else LearnableFusionLoss(alpha=1.0)
        )

        self.inner_lr = float(inner_lr)
        self.inner_optimizer = inner_optimizer
        self.task_inner_lr = float(task_lr if task_inner_lr is None else task_inner_lr)
        self.generator_lr = float(generator_lr)
        self.generator_update = generator_update
        self.fusion_lr = float(fusion_lr)
        self.task_lr = float(task_lr)
        self.fusion_crop = self._crop_size(fusion_crop)
        self.task_size = None if task_size is None else (int(task_size[0]), int(task_size[1]))
        self.grad_clip = None if grad_clip is None else float(grad_clip)
        self.on_nonfinite = on_nonfinite
        self.hypergradient_method = hypergradient_method
        self._resolved_method = "backprop" if hypergradient_method == "backprop" else "forward"
        self.optimizer = optimizer if isinstance(optimizer, str) else None

        if isinstance(seed, torch.Generator):
            self.generator = seed
        else:
            self.generator = torch.Generator()
            self.generator.manual_seed(int(seed) if seed is not None else torch.initial_seed())

        self.fusion_optimizer = optimizer_factory(
            trainable_parameters(self.fusion_model).values(), self.fusion_lr
        )
        self.task_optimizer = (
            optimizer_factory(trainable_parameters(self.task_module).values(), self.task_lr)
            if self.task_module is not None
            else None
        )
        generator_parameters = list(trainable_parameters(self.loss_generator).values())
        # A generator without trainable parameters (e.g. FixedLossWeights) is a fixed loss:
        # there is nothing to optimise, and meta steps are refused.
        self.generator_optimizer: torch.optim.Optimizer | None = None
        if not generator_parameters:
            pass
        elif generator_update == "normalized":
            self.generator_optimizer = torch.optim.SGD(generator_parameters, lr=self.generator_lr)
        else:
            self.generator_optimizer = torch.optim.Adam(generator_parameters, lr=self.generator_lr)
        self.schedulers: dict[str, Any] = {}
        if lr_scheduler is not None:
            for name, optimizer in self._optimizers().items():
                self.schedulers[name] = lr_scheduler(optimizer)

        self.epoch = 0
        self.global_step = 0
        self.history: list[dict[str, Any]] = []
        self._range_warned = False
        # RNG state of a loaded checkpoint, applied when fit() resumes from it.
        self._resume_rng: dict[str, Any] | None = None
        # Passes started over the training data; a DistributedSampler's epoch, so that every
        # pass is shuffled anew, identically on all ranks, and resumes where it stopped.
        self.data_passes = 0
        #: Shuffling seed of the DistributedSampler that fit() reads the data through (kept in
        #: checkpoints), set on the first fit with a shuffling DataLoader.
        self.data_seed: int | None = None
        self._fusion_replica: nn.Module = self.fusion_model
        self._task_replica: Callable[..., torch.Tensor] = self.task_loss
        if self.distributed:
            self._synchronise_replicas(dict(ddp_options or {}))

    # ------------------------------------------------------------------ distributed set-up
    @staticmethod
    def _join_process_group(distributed: bool | None, device: str | torch.device | None) -> bool:
        """Whether to train as one rank of a group; initialises the group from torchrun's
        environment when it is needed and not there yet."""
        if distributed is False:
            return False
        if not dist_utils.is_distributed() and dist_utils.launched_distributed():
            dist_utils.init_distributed(device=device)
        if dist_utils.is_distributed():
            return True
        if distributed:
            raise DistributedError(
                "distributed=True, but this process is not one of several: launch the script "
                "with torchrun --nproc_per_node=N (or initialise a torch.distributed process "
                "group of more than one process first)"
            )
        return False

    def _synchronise_replicas(self, ddp_options: dict[str, Any]) -> None:
        """Check that all ranks built the same trainer, then start them from rank 0's state.

        ``F`` and ``T`` are wrapped in DistributedDataParallel (which broadcasts rank 0's
        parameters and buffers); ``G`` and the crop generator are broadcast explicitly.
        """

        def shapes(module: Any) -> list[tuple[str, tuple[int, ...]]] | None:
            if not isinstance(module, nn.Module):
                return None
            return [(name, tuple(t.shape)) for name, t in module.state_dict().items()]

        dist_utils.check_same_on_all_ranks(
            {
                "config": self.config(),
                "fusion_model": shapes(self.fusion_model),
                "loss_generator": shapes(self.loss_generator),
                "task": shapes(self.task_loss),
                "device_type": self.device.type,
                "dtype": str(self.dtype),
            }
        )
        self._fusion_replica = dist_utils.replicate(self.fusion_model, self.device, **ddp_options)
        task = self.task_module
        if task is not None:
            self._task_replica = dist_utils.replicate(task, self.device, **ddp_options)
        dist_utils.broadcast_module_(self.loss_generator)
        state = self.generator.get_state()
        self.generator.set_state(dist_utils.broadcast_object(state))

    @property
    def is_main_process(self) -> bool:
        """Whether this process is rank 0 (always ``True`` in a single-process run)."""
        return self.rank == 0

    # ------------------------------------------------------------------ properties
    @property
    def task_module(self) -> nn.Module | None:
        """The trainable task network ``T``, or ``None`` when the task loss is fixed."""
        task = self.task_loss
        if isinstance(task, nn.Module) and any(p.requires_grad for p in task.parameters()):
            return task
        return None

    @property
    def lr_scale(self) -> float:
        """Current fusion learning rate divided by the initial one (1 without a schedule)."""
        return self.fusion_optimizer.param_groups[0]["lr"] / self.fusion_lr

    def _optimizers(self) -> dict[str, torch.optim.Optimizer]:
        optimizers = {"fusion": self.fusion_optimizer}
        if self.generator_optimizer is not None:
            optimizers["generator"] = self.generator_optimizer
        if self.task_optimizer is not None:
            optimizers["task"] = self.task_optimizer
        return optimizers

    def config(self) -> dict[str, Any]:
        """The trainer's hyper-parameters, as saved in checkpoints and used by :meth:`load`.

        Returns
        -------
        dict
            Constructor arguments (without the modules, device and scheduler factory).
        """
        return {
            "inner_lr": self.inner_lr,
            "inner_optimizer": self.inner_optimizer,
            "task_inner_lr": self.task_inner_lr,
            "generator_lr": self.generator_lr,
            "generator_update": self.generator_update,
            "fusion_lr": self.fusion_lr,
            "task_lr": self.task_lr,
            "fusion_crop": None if self.fusion_crop is None else list(self.fusion_crop),
            "task_size": None if self.task_size is None else list(self.task_size),
            "grad_clip": self.grad_clip,
            "on_nonfinite": self.on_nonfinite,
            "hypergradient_method": self.hypergradient_method,
            **({"optimizer": self.optimizer} if self.optimizer is not None else {}),
        }

    # ------------------------------------------------------------------ batches
    @staticmethod
    def _crop_size(size: int | tuple[int, int] | None) -> tuple[int, int] | None:
        if size is None:
            return None
        if isinstance(size, int):
            size = (size, size)
        height, width = (int(s) for s in size)
        if height <= 0 or width <= 0:
            raise ValueError(f"fusion_crop must be positive, got {size}")
        return height, width

    def _prepare(self, batch: Batch, where: str) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Check a batch and move it to the trainer's device and dtype."""
        if not isinstance(batch, (tuple, list)) or len(batch) != 3:
            found = f"a {type(batch).__name__}"
            if isinstance(batch, (tuple, list)):
                found += f" of length {len(batch)}"
            raise ValueError(f"{where}: a batch must be a tuple (a, b, target), got {found}")
        a, b, target = batch
        for name, image in (("a", a), ("b", b)):
            if not isinstance(image, torch.Tensor):
                raise TypeError(f"{where}: {name} must be a tensor, got {type(image).__name__}")
            if image.dim() != 4:
                raise ValueError(
                    f"{where}: {name} must have shape (N, C, H, W), got {tuple(image.shape)}"
                )
        if a.shape != b.shape:
            raise ValueError(
                f"{where}: a and b must have the same shape, got a {tuple(a.shape)} and "
                f"b {tuple(b.shape)}"
            )
        expected_channels = getattr(self.fusion_model, "in_channels", None)
        if expected_channels is not None and a.shape[1] != expected_channels:
            raise ValueError(
                f"{where}: the fusion model takes {expected_channels}-channel sources, got a and b "
                f"of shape {tuple(a.shape)} (use the Y channel of colour images)"
            )
        a = a.to(device=self.device, dtype=self.dtype)
        b = b.to(device=self.device, dtype=self.dtype)
        if not self._range_warned:
            low = float(torch.minimum(a.min(), b.min()))
            high = float(torch.maximum(a.max(), b.max()))
            if low < 0.0 or high > 1.0:
                self._range_warned = True
                warnings.warn(
                    f"{where}: source images have values in [{low:.3g}, {high:.3g}]; tdfusion "
                    "expects images scaled to [0, 1] (divide 8-bit images by 255)",
                    stacklevel=3,
                )
        return a, b, _move_target(target, self.device, self.dtype)

    def _fusion_input(
        self, a: torch.Tensor, b: torch.Tensor, where: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The random crop on which the fusion loss is computed (the whole image without one)."""
        if self.fusion_crop is None:
            return a, b
        crop_h, crop_w = self.fusion_crop
        height, width = a.shape[-2:]
        if crop_h > height or crop_w > width:
            raise ValueError(
                f"{where}: fusion_crop {crop_h}x{crop_w} is larger than the images "
                f"({height}x{width})"
            )
        top = int(torch.randint(height - crop_h + 1, (1,), generator=self.generator))
        left = int(torch.randint(width - crop_w + 1, (1,), generator=self.generator))
        return (
            a[..., top : top + crop_h, left : left + crop_w],
            b[..., top : top + crop_h, left : left + crop_w],
        )

    def _task_input(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The sources as the task sees them: resized to ``task_size`` when set."""
        if self.task_size is None or tuple(a.shape[-2:]) == self.task_size:
            return a, b
        return (
            F.interpolate(a, size=self.task_size, mode="bilinear", align_corners=False),
            F.interpolate(b, size=self.task_size, mode="bilinear", align_corners=False),
        )

    def _fusion_terms(
        self, fused: torch.Tensor, a: torch.Tensor, b: torch.Tensor, weights: torch.Tensor
    ) -> FusionLossTerms:
        terms = getattr(self.fusion_loss, "terms", None)
        if callable(terms):
            return terms(fused, a, b, weights)
        total = self.fusion_loss(fused, a, b, weights)
        nan = torch.full_like(total, float("nan"))
        return FusionLossTerms(total, nan, nan)

    # ------------------------------------------------------------------ meta step
    def _mean_over_ranks(self, tensors: Sequence[torch.Tensor]) -> None:
        """Average tensors in place over all ranks (nothing to do in a single process)."""
        if self.distributed:
            dist_utils.all_reduce_mean_(tensors)

    def _global_gradients(
        self, local: Sequence[torch.Tensor], keep_graph: bool
    ) -> list[torch.Tensor]:
        """The whole (global) batch's gradient from this rank's: their mean over ranks.

        With ``keep_graph`` the result has the global value but back-propagates only into this
        rank's own graph, ``t + (g - g.detach())``. Each rank's vector-Jacobian product through
        it is then its own term of the global one, and averaging those over ranks (as the
        hypergradient is) gives the global hypergradient exactly.
        """
        if not self.distributed:
            return list(local)
        totals = [g.detach().clone() for g in local]
        dist_utils.all_reduce_mean_(totals)
        if not keep_graph:
            return totals
        return [total + (g - g.detach()) for total, g in zip(totals, local)]

    def _meta_graph(
        self,
        meta_train: Batch,
        meta_test: Batch,
        differentiable: bool = True,
        synchronise: bool = True,
    ) -> tuple[dict[str, Any], Callable[[Sequence[torch.Tensor]], torch.Tensor]]:
        """Build the inner step and return its parts plus a function evaluating the outer loss.

        Every module is called through :func:`call_functionally`, so buffers (batch-norm
        statistics) of F, G and T are left as they were.

        With ``differentiable=True`` the adapted parameters ``theta_F'`` keep their graph to
        ``theta_G`` (second-order); otherwise they are plain tensors and the generator's weights
        are computed without a graph. The returned ``outer(theta_F')`` computes
        ``L_t(T'(F'(x_mts)))``.

        In a distributed run (and with ``synchronise``) the inner steps of ``F`` and ``T`` use
        the gradients averaged over all ranks, as DistributedDataParallel would: ``F'`` and
        ``T'`` are those of the global batch, the same on every rank.
        """
        synchronise = synchronise and self.distributed
        a_train, b_train, target_train = self._prepare(meta_train, "meta_train")
        a_test, b_test, target_test = self._prepare(meta_test, "meta_test")
        scale = self.lr_scale

        # Inner step (Eq. 4): theta_F' = step(theta_F, dL_f/dtheta_F); keeps the graph to G.
        fusion_params = trainable_parameters(self.fusion_model)
        fusion_names, fusion_values = list(fusion_params), list(fusion_params.values())
        crop_a, crop_b = self._fusion_input(a_train, b_train, "meta_train")
        with torch.set_grad_enabled(differentiable):
            weights = call_functionally(self.loss_generator, (crop_a, crop_b))
        fused_crop = call_functionally(self.fusion_model, (crop_a, crop_b))
        terms = self._fusion_terms(fused_crop, crop_a, crop_b, weights)
        inner_grads = gradients(terms.total, fusion_values, create_graph=differentiable)
        if synchronise:
            inner_grads = self._global_gradients(inner_grads, keep_graph=differentiable)
        inner_step = make_inner_optimizer(self.inner_optimizer, self.inner_lr * scale)
        if differentiable:
            adapted_fusion = differentiable_step(inner_step, fusion_values, inner_grads)
        else:
            with torch.no_grad():
                adapted_fusion = differentiable_step(
                    inner_step, [v.detach() for v in fusion_values], inner_grads
                )

        # Task clone (Eq. 5): theta_T' = step(theta_T, dL_t(F(x_mtr))/dtheta_T); no graph to G.
        task = self.task_module
        task_names: list[str] = []
        adapted_task: tuple[torch.Tensor, ...] = ()
        meta_train_task_loss = None
        if task is not None:
            task_a, task_b = self._task_input(a_train, b_train)
            with torch.no_grad():
                if task_a is crop_a and task_b is crop_b:  # no crop, no resize: reuse
                    fused_train = fused_crop.detach()
                else:
                    fused_train = call_functionally(self.fusion_model, (task_a, task_b))
            task_params = trainable_parameters(task)
            task_names, task_values = list(task_params), list(task_params.values())
            meta_train_task_loss = call_functionally(task, (fused_train, target_train))
            task_grads = gradients(meta_train_task_loss, task_values)
            if synchronise:
                task_grads = self._global_gradients(task_grads, keep_graph=False)
            task_step = make_inner_optimizer(self.inner_optimizer, self.task_inner_lr * scale)
            with torch.no_grad():
                adapted_task = differentiable_step(task_step, task_values, task_grads)
            meta_train_task_loss = meta_train_task_loss.detach()

        test_a, test_b = self._task_input(a_test, b_test)

        def outer(fusion_values_prime: Sequence[torch.Tensor]) -> torch.Tensor:
            fused_test = call_functionally(
                self.fusion_model, (test_a, test_b), dict(zip(fusion_names, fusion_values_prime))
            )
            if task is not None:
                return call_functionally(
                    task, (fused_test, target_test), dict(zip(task_names, adapted_task))
                )
            return self.task_loss(fused_test, target_test)

        parts = {
            "terms": terms,
            "weights": weights.detach(),
            "fused_crop": fused_crop.detach(),
            "crop": (crop_a, crop_b),
            "fusion_names": fusion_names,
            "fusion_values": [v.detach() for v in fusion_values],
            "inner_grads": inner_grads,
            "inner_step": inner_step,
            "adapted_fusion": adapted_fusion,
            "meta_train_task_loss": meta_train_task_loss,
        }
        return parts, outer

    def meta_loss(self, meta_train: Batch, meta_test: Batch) -> torch.Tensor:
        """The outer objective ``L_t(T'(F'(x_mts)))`` as a differentiable function of ``theta_G``.

        This builds the whole graph (outer forward on top of the inner step), so
        ``torch.autograd.grad(trainer.meta_loss(...), G.parameters())`` is the hypergradient.
        :meth:`hypergradient` computes the same value in two cheaper phases; this method is the
        straightforward form, for checks and for custom outer objectives. Nothing is modified,
        but the crop offsets (when ``fusion_crop`` is set) advance the trainer's generator.
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
        parts, outer = self._meta_graph(meta_train, meta_test, synchronise=False)
        return outer(parts["adapted_fusion"])

    def _hypergradient(
        self, meta_train: Batch, meta_test: Batch
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor | None]]:
        hypergradient, stats = self._local_hypergradient(meta_train, meta_test)
        # Each rank holds its term of the global hypergradient; their mean is the whole.
        self._mean_over_ranks(list(hypergradient.values()))
        return hypergradient, stats

    def _local_hypergradient(
        self, meta_train: Batch, meta_test: Batch
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor | None]]:
        method = self._resolved_method
        if method == "forward":
            generator_state = self.generator.get_state()
            try:
                return self._hypergradient_forward(meta_train, meta_test)
            except _ForwardModeUnsupported as error:
                if self.hypergradient_method == "forward":
                    raise error.__cause__ from None
                warnings.warn(
                    "the fusion model does not support forward-mode differentiation "
                    f"({error.__cause__}); computing hypergradients by second-order "
                    "back-propagation instead",
                    RuntimeWarning,
                    stacklevel=4,
                )
                self._resolved_method = "backprop"
                self.generator.set_state(generator_state)
        return self._hypergradient_backprop(meta_train, meta_test)

    def _hypergradient_backprop(
        self, meta_train: Batch, meta_test: Batch
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor | None]]:
        """Two phases: ``v = dL_t/dtheta_F'`` on leaves, then ``v^T dtheta_F'/dtheta_G``."""
        parts, outer = self._meta_graph(meta_train, meta_test, differentiable=True)
        adapted = parts["adapted_fusion"]
        adapted_leaves = [p.detach().requires_grad_(True) for p in adapted]
        outer_loss = outer(adapted_leaves)
        cotangents = gradients(outer_loss, adapted_leaves)
        self._mean_over_ranks(cotangents)  # v of the global meta-test batch
        generator_params = trainable_parameters(self.loss_generator)
        hypergradient = vector_jacobian_product(adapted, generator_params, cotangents)
        return hypergradient, self._meta_stats(parts, outer_loss)

    def _hypergradient_forward(
        self, meta_train: Batch, meta_test: Batch
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor | None]]:
        """The same hypergradient without a second-order graph through ``F``.

        With ``g = dL_f/dtheta_F`` and ``theta_F' = step(theta_F, g)``, the hypergradient is
        ``u^T dg/dtheta_G`` with ``u = (dstep/dg)^T v`` and ``v = dL_t/dtheta_F'``. Since ``L_f``
        depends on ``theta_F`` only through the fused image ``f`` and on ``theta_G`` only
        through the weights ``w``, ``u^T dg/dtheta_G = d/dtheta_G <dL_f/df (f, w), f_dot>``
        where ``f_dot = (df/dtheta_F) u`` is one forward-mode derivative of ``F``. What is left
        is a second derivative of the loss function alone (cheap, element-wise) and a
        first-order backward through ``G``.
        """
        parts, outer = self._meta_graph(meta_train, meta_test, differentiable=False)
        adapted_leaves = [p.detach().requires_grad_(True) for p in parts["adapted_fusion"]]
        outer_loss = outer(adapted_leaves)
        cotangents = gradients(outer_loss, adapted_leaves)
        self._mean_over_ranks(cotangents)  # v of the global meta-test batch
        del adapted_leaves

        # u = (d step / d g)^T v: the optimiser's own (element-wise) derivative, no network.
        grad_leaves = [g.detach().requires_grad_(True) for g in parts["inner_grads"]]
        with torch.enable_grad():
            stepped = differentiable_step(parts["inner_step"], parts["fusion_values"], grad_leaves)
        direction = vector_jacobian_product(
            stepped, dict(enumerate(grad_leaves)), cotangents
        ).values()

        # f_dot = (df/dtheta_F) u by forward-mode differentiation of F on the meta-train crop.
        crop_a, crop_b = parts["crop"]
        buffers = {n: b.clone() for n, b in self.fusion_model.named_buffers()}
        names = parts["fusion_names"]

        def fused_from(*values: torch.Tensor) -> torch.Tensor:
            substitutes = {**buffers, **dict(zip(names, values))}
            return functional_call(self.fusion_model, substitutes, (crop_a, crop_b), strict=False)

        try:
            with warnings.catch_warnings():
                # PyTorch's first forward-mode call scripts its decompositions with the
                # deprecated torch.jit.script; that is PyTorch's business, not the user's.
                warnings.filterwarnings(
                    "ignore", message=r".*torch\.jit\.script", category=FutureWarning
                )
                _, fused_tangent = torch.func.jvp(
                    fused_from, tuple(parts["fusion_values"]), tuple(direction)
                )
        except (RuntimeError, NotImplementedError) as error:
            raise _ForwardModeUnsupported from error

        # c = d/dw <dL_f/df (f, w), f_dot>: second derivative of the loss function only.
        fused_leaf = parts["fused_crop"].detach().requires_grad_(True)
        weights_leaf = parts["weights"].detach().requires_grad_(True)
        loss = self._fusion_terms(fused_leaf, crop_a, crop_b, weights_leaf).total
        (loss_gradient,) = torch.autograd.grad(loss, fused_leaf, create_graph=True)
        (weights_cotangent,) = torch.autograd.grad(
            (loss_gradient * fused_tangent).sum(), weights_leaf, allow_unused=True
        )
        if weights_cotangent is None:  # the loss does not couple the weights to the image
            weights_cotangent = torch.zeros_like(weights_leaf)

        # Back-propagate c through G.
        generator_params = trainable_parameters(self.loss_generator)
        weights = call_functionally(self.loss_generator, (crop_a, crop_b))
        hypergradient = vector_jacobian_product([weights], generator_params, [weights_cotangent])
        return hypergradient, self._meta_stats(parts, outer_loss)

    @staticmethod
    def _meta_stats(
        parts: Mapping[str, Any], outer_loss: torch.Tensor
    ) -> dict[str, torch.Tensor | None]:
        terms: FusionLossTerms = parts["terms"]
        return {
            "fusion_loss": terms.total.detach(),
            "fusion_intensity": terms.intensity.detach(),
            "fusion_gradient": terms.gradient.detach(),
            "task_loss": outer_loss.detach(),
            "meta_train_task_loss": parts["meta_train_task_loss"],
            "weight_a_mean": parts["weights"][:, 0].mean(),
        }

    def hypergradient(self, meta_train: Batch, meta_test: Batch) -> dict[str, torch.Tensor]:
        """The exact gradient of the outer task loss w.r.t. the loss generator's parameters.

        Computes ``dL_t(T'(F'(x_mts)))/dtheta_G`` (paper Eq. 7), where ``F'`` is ``F`` after one
        differentiable inner step under the learnable fusion loss on ``meta_train`` and ``T'``
        is ``T`` after one step under the task loss on ``meta_train`` (when the task is
        trainable). Changes nothing: parameters, buffers, ``.grad`` fields, optimiser states and
        the trainer's random generator are as before.

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
        generator_state = self.generator.get_state()
        try:
            hypergradient, _ = self._hypergradient(meta_train, meta_test)
        finally:
            self.generator.set_state(generator_state)
        return {name: g.detach() for name, g in hypergradient.items()}

    def meta_step(self, meta_train: Batch, meta_test: Batch) -> dict[str, float]:
        """One generator update (paper Eq. 6) from a meta-train and a meta-test batch.

        ``F`` and ``T`` are left as they were (parameters and buffers); only ``G`` changes.
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
        if isinstance(self.task_loss, nn.Module):
            self.task_loss.train()
        hypergradient, tensors = self._hypergradient(meta_train, meta_test)
        tensors = self._mean_stats(tensors)
        grads = list(hypergradient.values())
        largest = max((float(g.abs().max()) for g in grads if g.numel()), default=0.0)
        stats = {k: float(v.detach()) for k, v in tensors.items() if v is not None}
        stats["hypergradient_max"] = largest
        stats["generator_lr"] = self.generator_optimizer.param_groups[0]["lr"]
        finite = _finite(
            tensors["fusion_loss"], tensors["task_loss"], tensors["meta_train_task_loss"]
        ) and math.isfinite(largest)
        stats["skipped"] = 0.0 if finite else 1.0
        if not finite:
            self._non_finite("meta step", stats)
            return stats
        self.generator_optimizer.zero_grad(set_to_none=True)
        params = trainable_parameters(self.loss_generator)
        for name, param in params.items():
            grad = hypergradient[name]
            if self.generator_update == "normalized":
                grad = grad / largest if largest > 0 else torch.zeros_like(grad)
            param.grad = grad.detach()
        self.generator_optimizer.step()
        self.generator_optimizer.zero_grad(set_to_none=True)
        return stats

    # ------------------------------------------------------------------ fusion step
    def fusion_step(self, batch: Batch) -> dict[str, float]:
        """One update of ``F`` under the learnable fusion loss (Eq. 8) and of ``T`` (Eq. 9).

        ``G``'s weights are computed without gradient. ``T``, when trainable, learns from the
        task loss on ``F``'s output (before this step's update of ``F``, as Eq. 8 and 9 are
        simultaneous), detached so that the task does not shape ``F`` directly. In a
        distributed run every rank calls it with its own batch; the gradients are averaged over
        ranks (DistributedDataParallel), so all ranks take the same step, and the returned
        statistics are means over ranks.

        Parameters
        ----------
        batch : tuple
            ``(a, b, target)``.

        Returns
        -------
        dict of str to float
            ``fusion_loss``, ``fusion_intensity``, ``fusion_gradient``, ``weight_a_mean``,
            ``task_loss`` (when ``T`` is trainable), ``fusion_lr`` and ``skipped``.
        """
        self.fusion_model.train()
        self.loss_generator.eval()
        a, b, target = self._prepare(batch, "batch")
        crop_a, crop_b = self._fusion_input(a, b, "batch")
        with torch.no_grad():
            weights = self.loss_generator(crop_a, crop_b)
        fused = self._fusion_replica(crop_a, crop_b)
        terms = self._fusion_terms(fused, crop_a, crop_b, weights)

        task = self.task_module
        task_loss = None
        if task is not None:
            task.train()
            task_a, task_b = self._task_input(a, b)
            with torch.no_grad():
                if task_a is crop_a and task_b is crop_b:
                    fused_task = fused.detach()
                else:
                    fused_task = self.fusion_model(task_a, task_b)
            task_loss = self._task_replica(fused_task, target)

        # In a distributed run the logged values are means over ranks, and a non-finite value
        # on any rank makes every rank skip (one rank skipping alone would hang the others).
        tensors = self._mean_stats(
            {
                "fusion_loss": terms.total,
                "fusion_intensity": terms.intensity,
                "fusion_gradient": terms.gradient,
                "weight_a_mean": weights[:, 0].mean(),
                "task_loss": task_loss,
            }
        )
        stats = {k: float(v.detach()) for k, v in tensors.items() if v is not None}
        stats["fusion_lr"] = self.fusion_optimizer.param_groups[0]["lr"]
        finite = _finite(tensors["fusion_loss"], tensors["task_loss"])
        stats["skipped"] = 0.0 if finite else 1.0
        if not finite:
            self._non_finite("fusion step", stats)
            return stats

        self.fusion_optimizer.zero_grad(set_to_none=True)
        _backward(terms.total)
        if self.grad_clip is not None:
            nn.utils.clip_grad_norm_(
                trainable_parameters(self.fusion_model).values(), self.grad_clip
            )
        self.fusion_optimizer.step()
        if task is not None and self.task_optimizer is not None:
            self.task_optimizer.zero_grad(set_to_none=True)
            _backward(task_loss)
            if self.grad_clip is not None:
                nn.utils.clip_grad_norm_(trainable_parameters(task).values(), self.grad_clip)
            self.task_optimizer.step()
        if self.distributed:
            # Batch-norm statistics are updated by each rank's own batch: keep them equal.
            dist_utils.average_buffers_(self.fusion_model)
            if task is not None:
                dist_utils.average_buffers_(task)
        return stats

    def _mean_stats(
        self, tensors: Mapping[str, torch.Tensor | None]
    ) -> dict[str, torch.Tensor | None]:
        """Scalar statistics averaged over ranks with one collective (as they are otherwise)."""
        if not self.distributed:
            return dict(tensors)
        present = [k for k, v in tensors.items() if v is not None]
        packed = torch.stack(
            [tensors[k].detach().reshape(()).to(torch.float64) for k in present]  # type: ignore[union-attr]
        ).to(self.device)
        dist_utils.all_reduce_mean_([packed])
        means = dict(zip(present, packed.unbind()))
        return {k: means.get(k) for k in tensors}

    def _non_finite(self, where: str, stats: Mapping[str, float]) -> None:
        losses = ", ".join(
            f"{k}={v:.4g}"
            for k, v in stats.items()
            if k.endswith("loss") or k.startswith("fusion_")
        )
        message = (
            f"non-finite value in the {where} at epoch {self.epoch}, global step "
            f"{self.global_step}: {losses}"
        )
        if self.on_nonfinite == "raise":
            raise NonFiniteLossError(
                message + " (pass on_nonfinite='skip' to skip such updates with a warning)"
            )
        if self.is_main_process:  # every rank skips the same update; one warning says so
            warnings.warn(message + "; update skipped", RuntimeWarning, stacklevel=3)

    # ------------------------------------------------------------------ fit
    def fit(
        self,
        train_loader: Iterable[Batch],
        epochs: int,
        meta_steps: int = 200,
        *,
        fusion_steps: int | None = None,
        resume: str | os.PathLike[str] | None = None,
        checkpoint: str | os.PathLike[str] | None = None,
        callbacks: Sequence[Callback] = (),
        progress: bool = True,
    ) -> list[dict[str, Any]]:
        """Train with the alternating schedule of the paper (Algorithm 1).

        Per epoch: ``meta_steps`` generator updates, each drawing two consecutive (different)
        batches from a fresh pass over ``train_loader`` (meta-train, meta-test; the pass
        restarts when it runs out), then one pass of :meth:`fusion_step` over the loader. With
        ``meta_steps=0`` the generator stays frozen (a default generator then gives the
        ablation with ``w_a = w_b = 1/2`` only if it outputs 1/2; see the docs).

        Parameters
        ----------
        train_loader : iterable
            Yields batches ``(a, b, target)``, e.g. a :class:`torch.utils.data.DataLoader` with
            ``shuffle=True``; it must yield at least two batches when ``meta_steps > 0``.
        epochs : int
            Total number of epochs; a resumed run continues up to this number.
        meta_steps : int
            Generator updates per epoch (``M``; the paper uses 200).
        fusion_steps : int, optional
            Cap on the fusion steps per epoch (``N``); default one full pass.
        resume : str or os.PathLike, optional
            Checkpoint to continue from (written by :meth:`save` or by ``checkpoint``).
        checkpoint : str or os.PathLike, optional
            File rewritten atomically after every epoch with everything needed to resume.
        callbacks : sequence of Callback
            Hooks called after each step and epoch (e.g. :class:`~tdfusion.trainer.CSVLogger`).
        progress : bool
            Show tqdm progress bars with running losses.

        Returns
        -------
        list of dict
            ``history``: one summary per epoch (mean losses of each phase).

        Notes
        -----
        In a distributed run every rank calls ``fit`` with the same arguments. A plain
        :class:`~torch.utils.data.DataLoader` is rebuilt around a
        :class:`~torch.utils.data.distributed.DistributedSampler` (shuffled when the loader
        was), so each rank trains on its own share and the global batch is ``world_size``
        times the loader's; a loader that already has a ``DistributedSampler`` is used as it
        is. A shuffling ``DataLoader`` is rebuilt the same way in a single process (a
        ``DistributedSampler`` of one replica, seeded by the loader's generator and
        reshuffled every pass), so that ``N`` processes with batch ``n`` train on the same
        global batches as one process with batch ``N * n``. Callbacks run on every rank (the
        statistics they get are means over ranks); the built-in loggers write on rank 0 only,
        as do progress bars and ``checkpoint``. The ``resume`` file must be readable by every
        rank.
        """
        if epochs < 0 or meta_steps < 0:
            raise ValueError(f"epochs and meta_steps must be >= 0, got {epochs} and {meta_steps}")
        progress = progress and self.is_main_process
        if resume is not None:
            self.load_state_dict(load_checkpoint(resume, map_location=self.device))
        train_loader = self._shard_loader(train_loader, meta_steps)
        loader_generators = self._loader_generators(train_loader)
        if resume is not None and self._resume_rng is not None:
            restore_rng_state(self._resume_rng, self.generator, *loader_generators)
            self._resume_rng = None
        for callback in callbacks:
            callback.on_fit_start(self)
        while self.epoch < epochs:
            summary = {"epoch": self.epoch}
            summary.update(self._meta_phase(train_loader, meta_steps, epochs, callbacks, progress))
            summary.update(
                self._fusion_phase(train_loader, fusion_steps, epochs, callbacks, progress)
            )
            with warnings.catch_warnings():
                # A generator frozen with meta_steps=0 never steps its optimiser; its schedule
                # still advances with the epochs, which is what PyTorch warns about.
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                for scheduler in self.schedulers.values():
                    scheduler.step()
            self.epoch += 1
            self.history.append(summary)
            if progress:
                tqdm.write(self._epoch_line(summary, epochs))
            if checkpoint is not None:
                self.save(checkpoint, _loader_generators=loader_generators)
            for callback in callbacks:
                callback.on_epoch_end(self, summary)
        for callback in callbacks:
            callback.on_fit_end(self)
        return self.history

    def _epoch_line(self, summary: Mapping[str, Any], epochs: int) -> str:
        shown = {
            "meta_task_loss": "meta task",
            "fusion_loss": "fusion",
            "fusion_intensity": "int",
            "fusion_gradient": "grad",
            "task_loss": "task",
            "weight_a_mean": "mean w_a",
        }
        parts = [f"{label} {summary[key]:.4g}" for key, label in shown.items() if key in summary]
        return f"epoch {self.epoch}/{epochs}: " + ", ".join(parts)

    def _shard_loader(self, loader: Iterable[Batch], meta_steps: int) -> Iterable[Batch]:
        """The loader with this rank's share of the data (all of it in a single process).

        A plain shuffling DataLoader is rebuilt around a DistributedSampler in a single process
        too (with one replica it is a plain shuffle), so that ``N`` processes with batch ``n``
        see the same global batches as one process with batch ``N * n``.
        """
        from torch.utils.data import DataLoader

        if not self.distributed:
            if not dist_utils.shuffles_plainly(loader):
                return loader
            return dist_utils.shard_loader(loader, 1, 0, self._data_seed(loader))
        if not isinstance(loader, DataLoader):
            if self.is_main_process:
                warnings.warn(
                    f"train_loader is a {type(loader).__name__}, not a DataLoader, so tdfusion "
                    "cannot shard it: each rank must yield its own share of the data, and the "
                    "same number of batches",
                    stacklevel=3,
                )
            return loader
        seed = self._data_seed(loader) if dist_utils.shuffles_plainly(loader) else None
        loader = dist_utils.shard_loader(loader, self.world_size, self.rank, seed)
        if meta_steps > 0 and len(loader) < 2:
            raise DistributedError(
                f"with {self.world_size} ranks each rank gets {len(loader.sampler)} of the "  # type: ignore[arg-type]
                f"{len(loader.dataset)} training samples, {len(loader)} batch(es) of "  # type: ignore[arg-type]
                f"{loader.batch_size}; a meta step needs two (meta-train and meta-test). Use "
                "fewer processes or a smaller batch size"
            )
        return loader

    def _data_seed(self, loader: Any) -> int:
        """The shuffling seed of the DistributedSampler, the same on all ranks and kept in
        checkpoints: the loader generator's seed, else a draw from (a copy of) the trainer's."""
        if self.data_seed is None:
            generator = loader.generator
            if isinstance(generator, torch.Generator):
                seed = int(generator.initial_seed())
            else:
                copy_of_trainer_generator = torch.Generator()
                copy_of_trainer_generator.set_state(self.generator.get_state())
                seed = int(torch.randint(2**31 - 1, (1,), generator=copy_of_trainer_generator))
            self.data_seed = int(dist_utils.broadcast_object(seed))
        return self.data_seed

    def _start_pass(self, loader: Iterable[Batch]) -> Iterator[Batch]:
        """A new pass over the data; a DistributedSampler is told which pass, to reshuffle."""
        from torch.utils.data import DistributedSampler

        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(self.data_passes)
        self.data_passes += 1
        return iter(loader)

    @staticmethod
    def _loader_generators(loader: Any) -> list[torch.Generator | None]:
        """A data loader's own generators, whose states a checkpoint carries to resume exactly."""
        found: list[torch.Generator | None] = []
        for owner in (
            loader,
            getattr(loader, "sampler", None),
            getattr(loader, "batch_sampler", None),
        ):
            generator = getattr(owner, "generator", None)
            found.append(generator if isinstance(generator, torch.Generator) else None)
        return found

    def _run_phase(
        self,
        phase: str,
        steps: Iterable[Callable[[], dict[str, float]]],
        total: int | None,
        epochs: int,
        callbacks: Sequence[Callback],
        progress: bool,
    ) -> dict[str, float]:
        sums: dict[str, float] = {}
        count = 0
        label = "learn G" if phase == "meta" else "learn F+T"
        bar = tqdm(
            total=total,
            desc=f"epoch {self.epoch + 1}/{epochs} {label}",
            disable=not progress,
            leave=False,
            dynamic_ncols=True,
        )
        with bar:
            for step_index, step in enumerate(steps):
                stats = step()
                count += 1
                for key, value in stats.items():
                    sums[key] = sums.get(key, 0.0) + value
                record: dict[str, Any] = {
                    "phase": phase,
                    "epoch": self.epoch,
                    "step": step_index,
                    "global_step": self.global_step,
                    **stats,
                }
                self.global_step += 1
                for callback in callbacks:
                    callback.on_step_end(self, record)
                bar.update(1)
                shown = (
                    ("task_loss", "fusion_loss")
                    if phase == "meta"
                    else ("fusion_loss", "task_loss")
                )
                bar.set_postfix(
                    {k: f"{sums[k] / count:.4g}" for k in shown if k in sums}, refresh=False
                )
        prefix = "meta_" if phase == "meta" else ""
        summary = {f"{prefix}{k}": v / count for k, v in sums.items()} if count else {}
        summary[f"{phase}_steps"] = count
        return summary

    def _meta_phase(
        self,
        loader: Iterable[Batch],
        meta_steps: int,
        epochs: int,
        callbacks: Sequence[Callback],
        progress: bool,
    ) -> dict[str, float]:
        if meta_steps == 0:
            return {"meta_steps": 0}

        def batch_pairs() -> Iterator[Callable[[], dict[str, float]]]:
            iterator = self._start_pass(loader)
            in_this_pass = 0
            for _ in range(meta_steps):
                pair: list[Batch] = []
                while len(pair) < 2:
                    try:
                        pair.append(next(iterator))
                        in_this_pass += 1
                    except StopIteration:
                        if in_this_pass < 2:
                            raise ValueError(
                                "train_loader must yield at least two batches for a meta step "
                                "(meta-train and meta-test)"
                            ) from None
                        iterator, in_this_pass = self._start_pass(loader), 0
                        pair.clear()  # a pair never straddles two passes
                meta_train, meta_test = pair
                yield lambda meta_train=meta_train, meta_test=meta_test: self.meta_step(
                    meta_train, meta_test
                )

        return self._run_phase("meta", batch_pairs(), meta_steps, epochs, callbacks, progress)

    def _fusion_phase(
        self,
        loader: Iterable[Batch],
        fusion_steps: int | None,
        epochs: int,
        callbacks: Sequence[Callback],
        progress: bool,
    ) -> dict[str, float]:
        try:
            total = len(loader)  # type: ignore[arg-type]
        except TypeError:
            total = None
        if fusion_steps is not None:
            total = fusion_steps if total is None else min(total, fusion_steps)

        def steps() -> Iterator[Callable[[], dict[str, float]]]:
            for index, batch in enumerate(self._start_pass(loader)):
                if fusion_steps is not None and index >= fusion_steps:
                    break
                yield lambda batch=batch: self.fusion_step(batch)

        return self._run_phase("fusion", steps(), total, epochs, callbacks, progress)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: models, optimisers, schedulers, loop position, RNG.

        Returns
        -------
        dict
            A checkpoint (only tensors, numbers, strings and containers of them).
        """
        return self._state_dict(loader_generators=())

    def _state_dict(self, loader_generators: Sequence[torch.Generator | None]) -> dict[str, Any]:
        task = self.task_loss if isinstance(self.task_loss, nn.Module) else None
        return {
            "format": TRAINER_CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "epoch": self.epoch,
            "global_step": self.global_step,
            "config": self.config(),
            "models": {
                "fusion_model": self.fusion_model.state_dict(),
                "loss_generator": self.loss_generator.state_dict(),
                "task": None if task is None else task.state_dict(),
            },
            "model_configs": {
                "fusion_model": _model_description(self.fusion_model),
                "loss_generator": _model_description(self.loss_generator),
            },
            "optimizers": {name: opt.state_dict() for name, opt in self._optimizers().items()},
            "schedulers": {name: s.state_dict() for name, s in self.schedulers.items()},
            "history": copy.deepcopy(self.history),
            "data": {
                "passes": self.data_passes,
                "seed": self.data_seed,
                "world_size": self.world_size,
            },
            "rng": capture_rng_state(self.generator, *loader_generators),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (the RNG state is applied by :meth:`fit`).

        In a distributed run, load the same state on every rank.

        Parameters
        ----------
        state : dict
            A trainer checkpoint.

        Raises
        ------
        CheckpointError
            If the checkpoint does not fit these models (missing/unexpected keys, shapes).
        """
        if state.get("format") != TRAINER_CHECKPOINT_FORMAT:
            raise CheckpointError(
                f"not a tdfusion trainer checkpoint: format {state.get('format')!r}"
            )
        models = state["models"]
        self._load_module("fusion_model", self.fusion_model, models["fusion_model"])
        self._load_module("loss_generator", self.loss_generator, models["loss_generator"])
        if isinstance(self.task_loss, nn.Module) and models.get("task") is not None:
            self._load_module("task", self.task_loss, models["task"])
        elif self.task_module is not None:
            raise CheckpointError(
                "the checkpoint has no task network state, but task_loss is a trainable module"
            )
        saved_optimizers = state["optimizers"]
        for name, optimizer in self._optimizers().items():
            if name not in saved_optimizers:
                raise CheckpointError(f"the checkpoint has no state for the {name} optimizer")
            optimizer.load_state_dict(saved_optimizers[name])
        for name, scheduler in self.schedulers.items():
            if name in state.get("schedulers", {}):
                scheduler.load_state_dict(state["schedulers"][name])
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        self.history = list(copy.deepcopy(state.get("history", [])))
        data = state.get("data", {})
        self.data_passes = int(data.get("passes", 0))
        self.data_seed = data.get("seed")
        saved_world_size = int(data.get("world_size", 1))
        if saved_world_size != self.world_size and self.is_main_process:
            warnings.warn(
                f"the checkpoint was written by a run of {saved_world_size} process(es) and this "
                f"run has {self.world_size}: training continues from the saved models and "
                "optimisers, with a different global batch and data order",
                stacklevel=2,
            )
        self._resume_rng = state.get("rng")
        ranks_rng = state.get("rng_per_rank")
        if ranks_rng and saved_world_size == self.world_size:
            self._resume_rng = ranks_rng[self.rank]

    @staticmethod
    def _load_module(name: str, module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
        load_checked_state_dict(module, state, f"entry {name!r}", strict=True)

    def save(
        self,
        path: str | os.PathLike[str],
        *,
        _loader_generators: Sequence[torch.Generator | None] = (),
    ) -> Path:
        """Write a checkpoint atomically (temporary file + rename).

        In a distributed run every rank must call it: the ranks' random states are gathered,
        rank 0 writes the file, and all ranks wait until it is written.

        Parameters
        ----------
        path : str or os.PathLike
            Destination file; parent folders are created.

        Returns
        -------
        pathlib.Path
            The written file.
        """
        state = self._state_dict(_loader_generators)
        if self.distributed:
            state["rng_per_rank"] = dist_utils.gather_objects(state["rng"])
        written = Path(path)
        if self.is_main_process:
            written = atomic_save(state, path)
        if self.distributed:
            dist_utils.barrier()
        return written

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        fusion_model: nn.Module,
        task_loss: TaskLoss,
        loss_generator: nn.Module | None = None,
        fusion_loss: Callable[..., torch.Tensor] | None = None,
        **overrides: Any,
    ) -> MetaFusionTrainer:
        """Rebuild a trainer from a checkpoint.

        The hyper-parameters saved in the checkpoint are used unless given in ``overrides``.
        Without ``loss_generator``, a :class:`~tdfusion.LossGenerator` is built with the saved
        configuration. Model, optimiser and scheduler states and the loop position are
        restored; call :meth:`fit` with ``resume=path`` to also continue the random streams.

        Parameters
        ----------
        path : str or os.PathLike
            Checkpoint written by :meth:`save`.
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
        MetaFusionTrainer
            The restored trainer.
        """
        checkpoint = load_checkpoint(path)
        config = dict(checkpoint.get("config", {}))
        for key in ("fusion_crop", "task_size"):
            if config.get(key) is not None:
                config[key] = tuple(config[key])
        config.update(overrides)
        if loss_generator is None:
            from tdfusion.nets import LossGenerator

            description = checkpoint.get("model_configs", {}).get("loss_generator") or {}
            loss_generator = LossGenerator(**description.get("config", {}))
        trainer = cls(fusion_model, task_loss, loss_generator, fusion_loss, **config)
        trainer.load_state_dict(checkpoint)
        return trainer
