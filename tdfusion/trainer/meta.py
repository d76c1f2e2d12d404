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

The one exception is :class:`TaskOptimizerStep`, the research code's ``T'``: a step of ``T``'s
own optimiser, taken on the real parameters and undone at once (parameters, gradients and, unless
asked to keep it, the optimiser's state).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torchopt
from torch import nn
from torch.func import functional_call

__all__ = [
    "InnerOptimizer",
    "InnerOptimizerName",
    "OptimizerStep",
    "TaskInnerOptimizer",
    "TaskOptimizerStep",
    "call_functionally",
    "constant_output",
    "differentiable_step",
    "gradients",
    "make_inner_optimizer",
    "optimizer_state",
    "restore_optimizer_state",
    "trainable_parameters",
    "vector_jacobian_product",
]

InnerOptimizerName = Literal["sgd", "adam"]
#: An inner optimiser: a name, or any torchopt ``GradientTransformation`` (its own step size).
InnerOptimizer = InnerOptimizerName | torchopt.base.GradientTransformation
#: The task network's inner step: an inner optimiser, or one step of ``T``'s own optimiser
#: (``"task_optimizer"``; ``"task_optimizer_persistent"`` keeps that step's state, as the
#: research code does).
TaskInnerOptimizer = InnerOptimizer | Literal["task_optimizer", "task_optimizer_persistent"]


def make_inner_optimizer(
    name: InnerOptimizer, lr: float, *, eps_root: float = 1e-8
) -> torchopt.base.GradientTransformation:
    """torchopt's functional optimiser for the differentiable inner step.

    Parameters
    ----------
    name : {"sgd", "adam"} or torchopt.base.GradientTransformation
        Plain SGD (the research code's inner step) or Adam. Adam starts from zero moments at
        every meta step, so its step is the bias-corrected first step of Adam. A
        ``GradientTransformation`` (``torchopt.sgd(1e-2, momentum=0.9)``, a ``torchopt.chain``)
        is returned as it is, and ``lr`` is not used.
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
    if isinstance(name, torchopt.base.GradientTransformation):
        return name
    if name == "sgd":
        return torchopt.sgd(lr)
    if name == "adam":
        if eps_root <= 0:
            raise ValueError(f"the inner Adam step needs eps_root > 0, got {eps_root}")
        return torchopt.adam(lr, eps_root=eps_root)
    raise ValueError(
        f"inner_optimizer must be 'sgd', 'adam' or a torchopt GradientTransformation, got {name!r}"
    )


@dataclass(frozen=True)
class OptimizerStep:
    """One differentiable optimiser step: the inner step of ``F`` (Eq. 4) or of ``T`` (Eq. 5).

    A value the trainer calls, so that the kind of step is an argument rather than a branch:
    ``step(parameters, gradients, lr_scale)`` returns the stepped parameters as new tensors,
    differentiable through ``gradients``.

    Parameters
    ----------
    optimizer : {"sgd", "adam"} or torchopt.base.GradientTransformation
        See :func:`make_inner_optimizer`.
    lr : float
        Step size of a named optimiser (not used with a ``GradientTransformation``).

    Examples
    --------
    >>> import torch, torchopt
    >>> step = OptimizerStep("sgd", 0.5)
    >>> step((torch.ones(2),), (torch.ones(2),))[0]
    tensor([0.5000, 0.5000])
    >>> OptimizerStep(torchopt.sgd(0.5), lr=1.0)((torch.ones(2),), (torch.ones(2),))[0]
    tensor([0.5000, 0.5000])
    """

    optimizer: InnerOptimizer
    lr: float

    def __post_init__(self) -> None:
        make_inner_optimizer(self.optimizer, self.lr)  # refuses unknown names at once

    def transformation(self, lr_scale: float = 1.0) -> torchopt.base.GradientTransformation:
        """The torchopt transformation of one step, its step size scaled by ``lr_scale``.

        Parameters
        ----------
        lr_scale : float
            Learning-rate schedule factor; the updates of a given ``GradientTransformation``
            are scaled by it (a named optimiser gets ``lr * lr_scale``).

        Returns
        -------
        torchopt.base.GradientTransformation
            Pure ``init``/``update`` functions.
        """
        if isinstance(self.optimizer, torchopt.base.GradientTransformation):
            if lr_scale == 1.0:
                return self.optimizer
            return torchopt.chain(self.optimizer, torchopt.transform.scale(lr_scale))
        return make_inner_optimizer(self.optimizer, self.lr * lr_scale)

    def __call__(
        self,
        params: Sequence[torch.Tensor],
        grads: Sequence[torch.Tensor],
        lr_scale: float = 1.0,
    ) -> tuple[torch.Tensor, ...]:
        """``params`` after one step along ``grads`` (see :func:`differentiable_step`)."""
        return differentiable_step(self.transformation(lr_scale), params, grads)


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict[Any, dict[str, Any]]:
    """A copy of an optimiser's per-parameter state (moments, step counts).

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        Any optimiser.

    Returns
    -------
    dict
        Parameter -> its state, tensors cloned, for :func:`restore_optimizer_state`.
    """
    return {
        param: {
            key: value.clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value)
            for key, value in state.items()
        }
        for param, state in optimizer.state.items()
    }


def restore_optimizer_state(
    optimizer: torch.optim.Optimizer, state: Mapping[Any, dict[str, Any]]
) -> None:
    """Put back a state from :func:`optimizer_state` (the learning rates are not touched).

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        The optimiser the state was taken from.
    state : mapping
        Parameter -> state.
    """
    optimizer.state.clear()
    optimizer.state.update(state)


class TaskOptimizerStep:
    """One step of the task network's own optimiser, as the inner step ``T'`` (Eq. 5).

    The research code adapts ``T`` with one ``step()`` of ``T``'s own optimiser (Adam), whose
    moments and step count persist across meta steps and into the ordinary F/T phase; only
    ``T``'s weights are reloaded afterwards. This step does the same on the real parameters and
    puts them (and their ``.grad``) back at once, so that ``T'`` is returned as new tensors.

    ``T'`` is not differentiated: it depends on ``F``'s output on the meta-train batch, which is
    detached (``theta_T`` is a constant of ``theta_G``), so the optimiser's state enters
    ``T'(F'(x_mts))`` as constants and any optimiser works, stepped by its own code.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        ``T``'s optimiser (``MetaFusionTrainer.task_optimizer``). Its current learning rate is
        used (its schedule, not ``lr_scale``).
    persistent : bool
        ``False``: the optimiser's state is as before after every call. ``True`` (the research
        code): the state after the step is kept in ``pending`` and becomes the optimiser's
        state when :meth:`commit` is called (``MetaFusionTrainer.meta_step`` does so once the
        generator's update is taken, so that ``hypergradient`` changes nothing).

    Attributes
    ----------
    pending : dict or None
        The optimiser state after the last call (``persistent`` only), until :meth:`commit`.

    Examples
    --------
    >>> import torch
    >>> weight = torch.nn.Parameter(torch.ones(2))
    >>> adam = torch.optim.Adam([weight], lr=0.1)
    >>> step = TaskOptimizerStep(adam, persistent=True)
    >>> step((weight,), (torch.tensor([1.0, -2.0]),))[0]  # Adam's first step: lr * sign(g)
    tensor([0.9000, 1.1000])
    >>> weight.data, len(adam.state)  # T and its optimiser are as before ...
    (tensor([1., 1.]), 0)
    >>> step.commit(); int(adam.state[weight]["step"])  # ... until the state is committed
    1
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, persistent: bool = False) -> None:
        self.optimizer = optimizer
        self.persistent = bool(persistent)
        self.pending: dict[Any, dict[str, Any]] | None = None

    def __repr__(self) -> str:
        kind = type(self.optimizer).__name__
        return f"TaskOptimizerStep({kind}, persistent={self.persistent})"

    def __call__(
        self,
        params: Sequence[torch.Tensor],
        grads: Sequence[torch.Tensor],
        lr_scale: float = 1.0,
    ) -> tuple[torch.Tensor, ...]:
        """``params`` after one step of the optimiser along ``grads``; ``params`` are unchanged.

        Parameters
        ----------
        params : sequence of torch.Tensor
            ``T``'s trainable parameters, all handled by the optimiser.
        grads : sequence of torch.Tensor
            Their gradients.
        lr_scale : float
            Not used: the optimiser's learning rate follows its own schedule.

        Returns
        -------
        tuple of torch.Tensor
            ``theta_T'``, detached.
        """
        params = tuple(params)
        handled = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        if any(id(p) not in handled for p in params):
            raise ValueError(
                "task_inner_optimizer='task_optimizer' needs the task network's parameters in "
                "its optimiser; some trainable parameters are not"
            )
        state = optimizer_state(self.optimizer)
        saved = [(p.detach().clone(), p.grad) for p in params]
        try:
            with torch.no_grad():
                for param, grad in zip(params, grads):
                    param.grad = grad.detach().clone()
                self.optimizer.step()
                adapted = tuple(p.detach().clone() for p in params)
            # The optimiser changed its state in place; keep that one and put a copy back.
            self.pending = dict(self.optimizer.state) if self.persistent else None
        finally:
            with torch.no_grad():
                for param, (value, grad) in zip(params, saved):
                    param.copy_(value)
                    param.grad = grad
            restore_optimizer_state(self.optimizer, state)
        return adapted

    def commit(self) -> None:
        """Make the state after the last step the optimiser's (nothing when not persistent)."""
        if self.pending is not None:
            restore_optimizer_state(self.optimizer, self.pending)
            self.pending = None


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


def constant_output(module: nn.Module, args: tuple[Any, ...]) -> torch.Tensor:
    """``module(*args)`` as a constant: no graph, no side effects, a tensor usable by autograd.

    The call runs under :func:`torch.inference_mode`, where a network may take a faster
    forward-only path (:class:`~tdfusion.nets.ReFusionNet` goes band by band on the CPU: the
    same output up to float rounding, in about half the time), and through
    :func:`call_functionally`, so that buffers are left as they were. The result is copied out
    of inference mode, so that it can be the input of a differentiated computation.

    Parameters
    ----------
    module : torch.nn.Module
        The module to call; it is not modified.
    args : tuple
        Positional arguments of ``forward``.

    Returns
    -------
    torch.Tensor
        What ``forward`` returns (a tensor), without a graph.
    """
    with torch.inference_mode():
        output = call_functionally(module, args)
    return output.clone()


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
