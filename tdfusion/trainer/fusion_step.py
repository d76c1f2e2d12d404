"""The fusion phase's step (paper Eq. 8 and 9): ``F`` under the fusion loss, ``T`` under the task.

``MetaFusionTrainer.fusion_step`` is :func:`fusion_step`: the losses and the (clipped)
gradients are checked under the trainer's ``on_nonfinite`` rule before any optimiser steps,
and a step that is skipped or fails leaves every parameter, buffer and optimiser state as it
was. The networks are called through the trainer's ``autocast`` and its compiled calls
(``precision``, ``compile``); with ``precision="fp16"`` the losses are scaled by its
``loss_scaler``, and a NaN or infinite gradient is an overflow of the scale: the step is
skipped (``skipped`` = 1) and the scale halved, without the ``on_nonfinite`` rule.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tdfusion.trainer.batches import random_crop, resize_for_task
from tdfusion.trainer.hypergradient import fusion_loss_terms
from tdfusion.trainer.meta import trainable_parameters
from tdfusion.trainer.statistics import check_gradients, check_task_loss, snapshot_buffers

__all__ = ["fusion_step"]

Batch = Any
Prepared = tuple[torch.Tensor, torch.Tensor, Any]


def fusion_step(trainer: Any, batch: Batch) -> dict[str, float]:
    """One update of ``F`` under the learnable fusion loss (Eq. 8) and of ``T`` (Eq. 9).

    ``G``'s weights are computed without gradient. ``T``, when trainable, learns from the
    task loss on ``F``'s output (before this step's update of ``F``, as Eq. 8 and 9 are
    simultaneous; after it with ``fusion_step_order="sequential"``, as the research code
    does), detached so that the task does not shape ``F`` directly. In a
    distributed run every rank calls it with its own batch; the gradients are averaged over
    ranks (DistributedDataParallel), so all ranks take the same step, and the returned
    statistics are means over ranks.

    The losses and then the (clipped) gradients of ``F`` and ``T`` are checked before
    either optimiser steps. A step that is skipped or raises for a non-finite value (or
    fails otherwise) leaves every parameter, buffer (batch-norm statistics) and optimiser
    state of ``F``, ``G`` and ``T`` as it was.

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
    trainer.fusion_model.train()
    # G computes the weights in the mode the meta steps learned it in (batch statistics for
    # a batch-norm layer; its running statistics follow the fusion steps' batches).
    trainer.loss_generator.train()
    task = trainer.task_module
    # The forward passes run in training mode before the losses and gradients are known to
    # be finite; a skipped or failed step puts the batch-norm statistics back.
    # "sequential" (the research code): T learns from F after this step's update of F, so
    # T's losses and gradients are checked after F's step; a non-finite value there puts F's
    # parameters and optimiser state back too, and the whole step is skipped.
    sequential = trainer.fusion_step_order == "sequential"
    restore_buffers = snapshot_buffers(trainer.fusion_model, trainer.loss_generator, task)
    try:
        try:
            stats, prepared = _fusion_gradients(trainer, batch, None if sequential else task)
        except BaseException:
            restore_buffers()
            _clear_gradients(trainer, task)
            raise
        if stats["skipped"]:
            restore_buffers()
            _clear_gradients(trainer, task)
            return stats
        trains_task = task is not None and trainer.task_optimizer is not None
        undo_fusion_update = _undo_fusion_update(trainer) if sequential and trains_task else None
        trainer.loss_scaler.step(trainer.fusion_optimizer)
        if trains_task:
            if undo_fusion_update is not None:
                try:
                    task_stats = _sequential_task_update(trainer, task, prepared)
                except BaseException:
                    undo_fusion_update()
                    restore_buffers()
                    raise
                if task_stats["skipped"]:
                    undo_fusion_update()
                    restore_buffers()
                stats.update(task_stats)
            else:
                trainer.loss_scaler.step(trainer.task_optimizer)
    finally:
        trainer.loss_scaler.update()  # fp16: the next scale, after this step's gradients
    # Batch-norm statistics are updated by each rank's own batch: keep them equal.
    trainer.strategy.sync_buffers_(trainer.fusion_model, task)
    return stats


def _undo_fusion_update(trainer: Any) -> Callable[[], None]:
    """A function that puts ``F``'s parameters and optimiser state back as they are now.

    The sequential order steps ``F`` before ``T``'s loss is known; when ``T``'s update is then
    skipped or fails, the whole step is undone. The copy is of ``F``'s parameters and its
    optimiser's state (for Adam, three times ``F``'s size).
    """
    parameters = [p for p in trainer.fusion_model.parameters() if p.requires_grad]
    values = [p.detach().clone() for p in parameters]
    optimizer_state = copy.deepcopy(trainer.fusion_optimizer.state_dict())

    def undo() -> None:
        with torch.no_grad():
            for parameter, value in zip(parameters, values):
                parameter.copy_(value)
        trainer.fusion_optimizer.load_state_dict(optimizer_state)

    return undo


def _sequential_task_update(trainer: Any, task: nn.Module, prepared: Prepared) -> dict[str, float]:
    """T's update from the fused images of the just-updated F, under the non-finite rule."""
    restore_buffers = snapshot_buffers(task)
    try:
        task_loss = _fusion_phase_task_loss(trainer, task, prepared, None, None)
        stats = trainer._summarise("fusion step", {"task_loss": task_loss})
        if not stats["skipped"]:
            gradients = _backward(trainer, "task", trainer.task_optimizer, task, task_loss)
            _check_gradients(trainer, gradients, stats)
    except BaseException:
        restore_buffers()
        trainer.task_optimizer.zero_grad(set_to_none=True)
        raise
    if stats["skipped"]:
        restore_buffers()
        trainer.task_optimizer.zero_grad(set_to_none=True)
    else:
        trainer.loss_scaler.step(trainer.task_optimizer)
    return stats


def _fusion_gradients(
    trainer: Any, batch: Batch, task: nn.Module | None
) -> tuple[dict[str, float], Prepared]:
    """The fusion step up to its optimiser steps: losses, gradients, the non-finite rule;
    also the prepared batch."""
    a, b, target = trainer._prepare(batch, "batch")
    crop_a, crop_b = random_crop(a, b, trainer.fusion_crop, trainer.generator, "batch")
    forward = trainer.autocast.forward  # under autocast, the outputs in float32
    with torch.no_grad():
        weights = forward(trainer._calls["generator"], crop_a, crop_b)
    fused = forward(trainer._calls["fusion"], crop_a, crop_b)
    trainer._prepare.check_fused_range(fused, "the fusion model")
    terms = fusion_loss_terms(trainer.fusion_loss, fused, crop_a, crop_b, weights)

    task_loss = None
    if task is not None:
        task_loss = _fusion_phase_task_loss(trainer, task, (a, b, target), (crop_a, crop_b), fused)

    # The logged values are means over ranks, and a non-finite value on any rank makes
    # every rank skip (one rank skipping alone would hang the others).
    tensors = {
        "fusion_loss": terms.total,
        "fusion_intensity": terms.intensity,
        "fusion_gradient": terms.gradient,
        "weight_a_mean": weights[:, 0].mean(),
        "task_loss": task_loss,
    }
    lr = trainer.fusion_optimizer.param_groups[0]["lr"]
    stats = trainer._summarise("fusion step", tensors, fusion_lr=lr)
    if stats["skipped"]:
        return stats, (a, b, target)

    # Both backward passes, then both gradient checks, then (in fusion_step) both
    # optimiser steps: a non-finite gradient of either network skips the whole step.
    gradients = _backward(
        trainer, "fusion_model", trainer.fusion_optimizer, trainer.fusion_model, terms.total
    )
    if task is not None and task_loss is not None and trainer.task_optimizer is not None:
        gradients.update(_backward(trainer, "task", trainer.task_optimizer, task, task_loss))
    _check_gradients(trainer, gradients, stats)
    return stats, (a, b, target)


def _check_gradients(
    trainer: Any, gradients: dict[str, torch.Tensor | None], stats: dict[str, float]
) -> None:
    """The trainer's non-finite rule on the gradients about to be stepped along (with loss
    scaling, a non-finite gradient is an overflow of the scale: the step is skipped quietly)."""
    scaled = trainer.loss_scaler.enabled
    check_gradients(
        gradients,
        "fusion step",
        stats,
        on_nonfinite="skip" if scaled else trainer.on_nonfinite,
        position=trainer._position,
        warn=trainer.is_main_process and not scaled,
    )


def _fusion_phase_task_loss(
    trainer: Any,
    task: nn.Module,
    batch: Prepared,
    crop: tuple[torch.Tensor, torch.Tensor] | None,
    fused_crop: torch.Tensor | None,
) -> torch.Tensor:
    """``L_t(T(F(a, b)))`` with ``F``'s output detached; ``fused_crop`` (``F(crop)``) is
    reused when the task sees the sources uncropped and unresized."""
    a, b, target = batch
    task.train()
    task_a, task_b = resize_for_task(a, b, trainer.task_size)
    reuse = crop is not None and task_a is crop[0] and task_b is crop[1]
    if reuse and fused_crop is not None:
        fused_task = fused_crop.detach()
    else:  # a constant for T's step: F's fastest forward (banded on the CPU)
        with torch.inference_mode():
            fused_task = trainer.autocast.forward(trainer._calls["fusion_no_grad"], task_a, task_b)
        fused_task = fused_task.clone()  # out of inference mode, an input T's graph can save
    loss = trainer.autocast.task(task, fused_task, target, call=trainer._calls["task"])
    return check_task_loss(loss, "fusion step")


def _backward(
    trainer: Any, role: str, optimizer: torch.optim.Optimizer, module: nn.Module, loss: torch.Tensor
) -> dict[str, torch.Tensor | None]:
    """Fresh gradients of ``loss`` (unscaled), clipped: ``role.name`` -> the gradient to step
    along."""
    optimizer.zero_grad(set_to_none=True)
    trainer.strategy.backward(trainer.loss_scaler.scale(loss))
    trainer.loss_scaler.unscale_(optimizer)
    parameters = trainable_parameters(module)
    if trainer.grad_clip is not None:
        nn.utils.clip_grad_norm_(parameters.values(), trainer.grad_clip)
    return {f"{role}.{name}": p.grad for name, p in parameters.items()}


def _clear_gradients(trainer: Any, task: nn.Module | None) -> None:
    """Drop the gradients of a step that was not taken (they may hold NaN)."""
    trainer.fusion_optimizer.zero_grad(set_to_none=True)
    if task is not None and trainer.task_optimizer is not None:
        trainer.task_optimizer.zero_grad(set_to_none=True)
