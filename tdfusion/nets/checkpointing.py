"""Activation (gradient) checkpointing of a network's blocks, safe under parameter substitution.

A checkpointed block keeps only its inputs for the backward pass and runs its forward again
when the gradient reaches it: the memory of its intermediate activations is traded for one
more forward. :func:`torch.utils.checkpoint.checkpoint` re-runs the block *during* the
backward pass, after any :func:`torch.func.functional_call` that substituted the block's
parameters has returned; :func:`checkpointed_call` therefore hands the parameters in use at
the first call to the checkpoint as explicit inputs and re-runs the block with exactly those,
so that the meta step's ``F'`` (``F`` called with the inner step's parameters) gets the
gradient of ``F'``, not of ``F``.

A network of your own that checkpoints its blocks for the trainer should call
:func:`checkpointed_call` too: :func:`torch.utils.checkpoint.checkpoint` around a block of ``F``
would recompute it with ``F``'s parameters in the meta step and give a wrong hypergradient
without any error.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

__all__ = ["checkpointed_call", "checkpointing_applies"]


def checkpointing_applies() -> bool:
    """Whether a checkpoint would save anything here: a graph is being recorded.

    Returns
    -------
    bool
        ``True`` when gradients are enabled, inference mode is off and no :mod:`torch.func`
        transform is running. Under :func:`torch.no_grad` (where forward-mode AD still
        computes tangents) or :func:`torch.inference_mode` no activations are kept, so blocks
        run plainly; ``torch.func.grad``, ``vjp``, ``vmap`` and the others do not support the
        hooks a checkpoint relies on, so blocks run plainly there too (the output and its
        derivatives are the same). :func:`torch.func.functional_call` is no transform: it
        checkpoints.
    """
    if torch.compiler.is_compiling():
        # Dynamo cannot trace the inference-mode and transform checks (each would break the
        # graph); a compiled network runs under neither.
        return torch.is_grad_enabled()
    if not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
        return False
    return torch._C._functorch.peek_interpreter_stack() is None


def checkpointed_call(module: nn.Module, *inputs: torch.Tensor) -> Any:
    """``module(*inputs)`` under activation checkpointing (non-reentrant).

    The module's parameters as they are at this call (the module's own, or the substitutes of
    an enclosing :func:`torch.func.functional_call`) are inputs of the checkpoint, so the
    recomputation in the backward pass uses the same tensors and gradients reach them.
    Buffers are read from the module at both calls: a module that updates buffers in its
    forward (batch normalisation in training mode) must not be checkpointed.

    Parameters
    ----------
    module : torch.nn.Module
        A block without randomness and without buffer updates in its forward.
    *inputs : torch.Tensor
        Its positional arguments.

    Returns
    -------
    Any
        What ``module(*inputs)`` returns; the same values, with a graph that holds only the
        inputs.

    Example
    -------
    >>> block = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GELU(), nn.Conv2d(4, 2, 1))
    >>> x = torch.rand(1, 2, 5, 5, requires_grad=True)
    >>> checkpointed_call(block, x).sum().backward()
    >>> x.grad.shape
    torch.Size([1, 2, 5, 5])
    """
    named = dict(module.named_parameters())
    names, params = tuple(named), tuple(named.values())
    count = len(inputs)

    def run(*arguments: torch.Tensor) -> Any:
        substitutes = dict(zip(names, arguments[count:]))
        return functional_call(module, substitutes, tuple(arguments[:count]), strict=False)

    return checkpoint(run, *inputs, *params, use_reentrant=False)
