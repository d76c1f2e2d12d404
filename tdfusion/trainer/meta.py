"""The meta step as functions of explicit parameters.

These functions never modify a module: parameters are passed around as tuples of tensors and
substituted with :func:`torch.func.functional_call`. They compute

- the differentiable inner step ``theta_F' = step(theta_F, dL_f/dtheta_F)`` (paper Eq. 4), whose
  result keeps its graph to the loss generator's parameters ``theta_G``;
- the one-step task clone ``theta_T' = step(theta_T, dL_t/dtheta_T)`` (Eq. 5), which does not
  depend on ``theta_G`` and therefore carries no graph;
- the exact hypergradient ``dL_t(T'(F'(x_mts)))/dtheta_G`` (Eq. 7) in two phases: first
  ``v = dL_t/dtheta_F'`` with ``theta_F'`` treated as leaves, then the vector-Jacobian product
  ``v^T dtheta_F'/dtheta_G`` through the inner step. By the chain rule this equals
  back-propagating the outer loss through the inner step in one go, but the outer graph is freed
  before the second-order backward starts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torchopt
from torch import nn
from torch.func import functional_call

__all__ = [
    "InnerOptimizerName",
    "call_functionally",
    "differentiable_step",
    "gradients",
    "make_inner_optimizer",
    "trainable_parameters",
    "vector_jacobian_product",
]

InnerOptimizerName = Literal["sgd", "adam"]


def make_inner_optimizer(
    name: InnerOptimizerName, lr: float, *, eps_root: float = 1e-8
) -> torchopt.base.GradientTransformation:
    """torchopt's functional optimiser for the differentiable inner step.

    Parameters
    ----------
    name : {"sgd", "adam"}
        Plain SGD (the research code's inner step) or Adam. Adam starts from zero moments at
        every meta step, so its step is the bias-corrected first step of Adam.
    lr : float
        Step size ``eta``.
    eps_root : float
        Adam only: added inside the square root. It must be positive: with 0 the derivative of
        ``sqrt(nu)`` at ``nu = 0`` is infinite and meta-gradients can become NaN.

    Returns
    -------
    torchopt.base.GradientTransformation
        Pure ``init``/``update`` functions (no state is kept in the object).
    """
    if name == "sgd":
        return torchopt.sgd(lr)
    if name == "adam":
        if eps_root <= 0:
            raise ValueError(f"the inner Adam step needs eps_root > 0, got {eps_root}")
        return torchopt.adam(lr, eps_root=eps_root)
    raise ValueError(f"inner_optimizer must be 'sgd' or 'adam', got {name!r}")


def trainable_parameters(module: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters of ``module`` that require gradients, by qualified name.

    Parameters
    ----------
    module : torch.nn.Module
        Any module.

    Returns
    -------
    dict of str to torch.Tensor
        Name -> parameter, in registration order, shared parameters listed once.
    """
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def gradients(
    loss: torch.Tensor, params: Sequence[torch.Tensor], *, create_graph: bool = False
) -> tuple[torch.Tensor, ...]:
    """``d loss / d params`` with zeros for parameters the loss does not depend on.

    Parameters
    ----------
    loss : torch.Tensor
        Scalar.
    params : sequence of torch.Tensor
        Tensors that require gradients.
    create_graph : bool
        Keep the graph of the gradient (for a differentiable step).

    Returns
    -------
    tuple of torch.Tensor
        One gradient per parameter, same shapes.
    """
    grads = torch.autograd.grad(loss, tuple(params), create_graph=create_graph, allow_unused=True)
    return tuple(torch.zeros_like(p) if g is None else g for p, g in zip(params, grads))


def differentiable_step(
    optimizer: torchopt.base.GradientTransformation,
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
) -> tuple[torch.Tensor, ...]:
    """One optimiser step that returns new tensors and keeps the graph through ``grads``.

    Parameters
    ----------
    optimizer : torchopt.base.GradientTransformation
        From :func:`make_inner_optimizer`; a fresh state is initialised for this step.
    params : sequence of torch.Tensor
        Current parameters (left untouched).
    grads : sequence of torch.Tensor
        Their gradients, possibly carrying a graph (``create_graph=True``).

    Returns
    -------
    tuple of torch.Tensor
        The updated parameters ``params + updates``; differentiable w.r.t. whatever ``grads``
        depends on.
    """
    params = tuple(params)
    state = optimizer.init(params)
    updates, _ = optimizer.update(tuple(grads), state, params=params, inplace=False)
    return tuple(torchopt.apply_updates(params, updates, inplace=False))


def call_functionally(
    module: nn.Module,
    args: tuple[Any, ...],
    params: Mapping[str, torch.Tensor] | None = None,
) -> Any:
    """Call ``module(*args)`` without side effects on the module, optionally with new parameters.

    The module's buffers are replaced by private copies for the call, so that training-mode
    layers (batch-norm running statistics) leave the module as it was; the parameters named in
    ``params`` are substituted, the others are the module's own.

    Parameters
    ----------
    module : torch.nn.Module
        The module to call; it is not modified.
    args : tuple
        Positional arguments of ``forward``.
    params : mapping of str to torch.Tensor, optional
        Qualified parameter name -> substitute tensor.

    Returns
    -------
    Any
        What ``forward`` returns.
    """
    substitutes: dict[str, torch.Tensor] = {
        name: buffer.clone() for name, buffer in module.named_buffers()
    }
    if params:
        substitutes.update(params)
    return functional_call(module, substitutes, args, strict=False)


def vector_jacobian_product(
    outputs: Sequence[torch.Tensor],
    inputs: Mapping[str, torch.Tensor],
    vectors: Sequence[torch.Tensor],
) -> dict[str, torch.Tensor]:
    """``sum_i vectors_i^T d outputs_i / d inputs``, zeros where there is no dependence.

    Parameters
    ----------
    outputs : sequence of torch.Tensor
        Tensors that may depend on ``inputs`` (those that carry no graph are skipped).
    inputs : mapping of str to torch.Tensor
        Leaf tensors that require gradients.
    vectors : sequence of torch.Tensor
        One cotangent per output, same shapes.

    Returns
    -------
    dict of str to torch.Tensor
        Name -> product, shaped like the input.
    """
    pairs = [(o, v) for o, v in zip(outputs, vectors) if o.requires_grad]
    names = list(inputs)
    if not pairs:
        return {name: torch.zeros_like(inputs[name]) for name in names}
    products = torch.autograd.grad(
        [o for o, _ in pairs],
        [inputs[name] for name in names],
        grad_outputs=[v for _, v in pairs],
        allow_unused=True,
    )
    return {
        name: torch.zeros_like(inputs[name]) if g is None else g for name, g in zip(names, products)
    }
