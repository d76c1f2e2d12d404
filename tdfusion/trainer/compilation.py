"""``torch.compile`` and channels-last memory for the trainer's networks.

``MetaFusionTrainer(compile=True)`` compiles the forwards of the **fusion phase**
(:meth:`~tdfusion.trainer.MetaFusionTrainer.fusion_step`): ``F``, ``G`` (its weights, without
gradient) and a trainable task network ``T``. The meta step runs the networks uncompiled: it
calls them with substituted parameters (:func:`torch.func.functional_call`), differentiates
``F`` twice (``create_graph``) or in forward mode (dual tensors), and torch.compile's
autograd supports neither, so the hypergradient is exactly the uncompiled one.

Each network is compiled at its first call; when :func:`torch.compile` is missing, or that call
(its forward, or a backward through it, tried at once except in a distributed run) raises, one
warning names the network and the reason, and the network runs uncompiled from then on. The
trainer keeps the uncompiled modules as its attributes, so state dicts and checkpoints have no
``_orig_mod.`` prefix.

``channels_last=True`` converts the networks' 4-D parameters and buffers, and the batches'
sources, to :data:`torch.channels_last` order (names, shapes and values are unchanged).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from tdfusion.trainer.statistics import snapshot_buffers

__all__ = ["CompiledCall", "channels_last_", "compiled_calls"]


class CompiledCall:
    """Call a module through :func:`torch.compile`, falling back to the module with a warning.

    Parameters
    ----------
    module : torch.nn.Module
        The module (kept as it is: compiling wraps it, it does not change it).
    name : str
        What the warning calls it (``"the fusion network (ReFusionNet)"``).
    enabled : bool
        ``False``: every call is the module's own.
    options : mapping, optional
        Keyword arguments of :func:`torch.compile`.

    Attributes
    ----------
    compiled : bool or None
        ``None`` until the first call with ``enabled``; then whether compiling worked.

    Example
    -------
    >>> conv = nn.Conv2d(1, 1, 1)
    >>> call = CompiledCall(conv, "a convolution", enabled=False)
    >>> call(torch.rand(1, 1, 2, 2)).shape, call.compiled
    (torch.Size([1, 1, 2, 2]), False)
    """

    def __init__(
        self,
        module: nn.Module,
        name: str,
        *,
        enabled: bool,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        self.module = module
        self.name = name
        self.options = dict(options or {})
        self.compiled: bool | None = None if enabled else False
        self._compiled_module: Any = None

    def __call__(self, *args: Any) -> Any:
        """The module's output for ``args``, compiled when that works."""
        if self.compiled is None:
            return self._first_call(*args)
        if self.compiled:
            return self._compiled_module(*args)
        return self.module(*args)

    def _first_call(self, *args: Any) -> Any:
        restore_buffers = snapshot_buffers(self.module)  # the failed try's batch-norm update
        try:
            compile_ = getattr(torch, "compile", None)
            if compile_ is None:
                raise RuntimeError("torch.compile is not available in this PyTorch")
            self._compiled_module = compile_(self.module, **self.options)
            output = self._compiled_module(*args)
            _try_backward(self.module, output)
        except Exception as error:  # any compiler failure: run uncompiled from now on
            self.compiled = False
            self._compiled_module = None
            restore_buffers()
            reason = " ".join(f"{type(error).__name__}: {error}".split())[:200]
            warnings.warn(
                f"torch.compile of {self.name} failed ({reason}); it runs uncompiled",
                RuntimeWarning,
                stacklevel=4,
            )
            return self.module(*args)
        self.compiled = True
        return output


def _try_backward(module: nn.Module, output: Any) -> None:
    """Compile the backward now too (it may be compiled at its first use): the gradients of
    the output's sum are computed and dropped, ``.grad`` fields are not touched. Not through
    DistributedDataParallel, whose backward hooks would synchronise the ranks' gradients."""
    if not isinstance(output, torch.Tensor) or not output.requires_grad:
        return
    if isinstance(module, nn.parallel.DistributedDataParallel):
        return
    parameters = [p for p in module.parameters() if p.requires_grad]
    if not parameters:
        return
    device_type = output.device.type
    autocast_on = torch.is_autocast_enabled(device_type)
    guard = torch.autocast(device_type, enabled=False) if autocast_on else contextlib.nullcontext()
    with guard:  # a backward pass runs outside autocast
        torch.autograd.grad(output.sum(), parameters, retain_graph=True, allow_unused=True)


def compiled_calls(
    trainer: Any, enabled: bool, options: Mapping[str, Any] | None = None
) -> dict[str, CompiledCall]:
    """The fusion phase's calls of ``F``, ``G`` and ``T``, compiled or not.

    Parameters
    ----------
    trainer : tdfusion.trainer.MetaFusionTrainer
        Its ``_fusion_replica`` (``F`` as the fusion step trains it), ``fusion_model`` (``F``
        without gradient), ``loss_generator`` and ``_task_replica``.
    enabled : bool
        Compile them.
    options : mapping, optional
        Keyword arguments of :func:`torch.compile`.

    Returns
    -------
    dict of str to CompiledCall
        ``"fusion"``, ``"fusion_no_grad"`` (the same call when ``F`` is not wrapped for
        distribution), ``"generator"`` and, with a trainable task network, ``"task"``.
    """

    def call(module: nn.Module, role: str) -> CompiledCall:
        wrapped = isinstance(module, nn.parallel.DistributedDataParallel)
        inner = module.module if wrapped else module
        name = f"the {role} ({type(inner).__name__})"
        return CompiledCall(module, name, enabled=enabled, options=options)

    fusion = call(trainer._fusion_replica, "fusion network")
    calls = {
        "fusion": fusion,
        "fusion_no_grad": (
            fusion
            if trainer._fusion_replica is trainer.fusion_model
            else call(trainer.fusion_model, "fusion network")
        ),
        "generator": call(trainer.loss_generator, "loss generator"),
    }
    if trainer.task_module is not None:
        calls["task"] = call(trainer._task_replica, "task network")
    return calls


def channels_last_(*modules: Any, enabled: bool = True) -> None:
    """Convert the 4-D parameters and buffers of the modules to channels-last order, in place.

    Parameters
    ----------
    *modules : torch.nn.Module or Any
        Anything that is not a module (a task function, ``None``) is skipped.
    enabled : bool
        ``False``: do nothing.

    Example
    -------
    >>> conv = nn.Conv2d(2, 3, 3)
    >>> channels_last_(conv, None)
    >>> conv.weight.is_contiguous(memory_format=torch.channels_last)
    True
    """
    for module in modules:
        if enabled and isinstance(module, nn.Module):
            module.to(memory_format=torch.channels_last)
