"""How the hypergradient ``dL_t(T'(F'(x_mts)))/dtheta_G`` (paper Eq. 7) is computed.

The trainer builds the inner step once (:class:`InnerStepResult`), takes the outer loss's
gradient ``v = dL_t/dtheta_F'`` with ``theta_F'`` as leaves, and hands both to a method of
:data:`HYPERGRADIENT_METHODS`, which returns ``v^T dtheta_F'/dtheta_G``. The methods are plain
functions: no trainer, no random numbers (the crop is drawn before the inner step) and no
communication between processes (the trainer averages ``v`` and the result over ranks). A new
method is one function and one entry of the table.

Under mixed precision (an :class:`~tdfusion.trainer.precision.Autocast` passed as
``precision``) the forwards of ``F``, ``G`` and a task network run under autocast and their
outputs come back in float32; the fusion loss, the inner step and every product of the
hypergradient are float32.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torchopt
from torch import nn
from torch.func import functional_call

from tdfusion.losses import FusionLossTerms
from tdfusion.trainer.batches import resize_for_task
from tdfusion.trainer.meta import (
    OptimizerStep,
    call_functionally,
    constant_output,
    differentiable_step,
    gradients,
    trainable_parameters,
    vector_jacobian_product,
)
from tdfusion.trainer.precision import FLOAT32, Autocast
from tdfusion.trainer.statistics import check_task_loss

__all__ = [
    "HYPERGRADIENT_METHODS",
    "ForwardModeUnsupported",
    "HypergradientRule",
    "InnerStep",
    "InnerStepResult",
    "RandomState",
    "backprop_hypergradient",
    "forward_mode_hypergradient",
    "fusion_loss_terms",
    "inner_step",
    "outer_gradient",
]

#: ``step(parameters, gradients, lr_scale) -> parameters``: an inner step (Eq. 4 or 5).
InnerStep = Callable[
    [Sequence[torch.Tensor], Sequence[torch.Tensor], float], Sequence[torch.Tensor]
]
#: ``reduce(gradients, keep_graph) -> gradients``: this rank's gradients to the global batch's.
GradientReduction = Callable[[Sequence[torch.Tensor], bool], Sequence[torch.Tensor]]


def fusion_loss_terms(
    fusion_loss: Callable[..., torch.Tensor],
    fused: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    weights: torch.Tensor,
) -> FusionLossTerms:
    """The fusion loss with its terms; NaN terms for a loss without a ``terms`` method.

    Parameters
    ----------
    fusion_loss : callable
        ``fusion_loss(fused, a, b, weights) -> scalar``, e.g. a
        :class:`~tdfusion.losses.LearnableFusionLoss`.
    fused, a, b : torch.Tensor
        (N, 1, H, W).
    weights : torch.Tensor
        (N, 2, H, W).

    Returns
    -------
    FusionLossTerms
        ``total``, ``intensity``, ``gradient`` (scalars).
    """
    terms = getattr(fusion_loss, "terms", None)
    if callable(terms):
        return terms(fused, a, b, weights)
    total = fusion_loss(fused, a, b, weights)
    nan = torch.full_like(total, float("nan"))
    return FusionLossTerms(total, nan, nan)


@dataclass(frozen=True)
class RandomState:
    """The global random state before a forward pass, to draw the same numbers again.

    Random layers (dropout) of ``F`` and ``G`` draw from PyTorch's global generators; a method
    that runs a forward of the inner step again replays them, so that it differentiates the
    function the inner step computed.

    Attributes
    ----------
    cpu : torch.Tensor
        :func:`torch.get_rng_state`.
    cuda : torch.Tensor or None
        The CUDA device's state when the forward ran there.
    device : torch.device
        Where the forward ran.
    """

    cpu: torch.Tensor
    cuda: torch.Tensor | None
    device: torch.device

    @classmethod
    def capture(cls, device: torch.device) -> RandomState:
        """The current state, for a forward on ``device``.

        Parameters
        ----------
        device : torch.device
            Where the forward runs.

        Returns
        -------
        RandomState
            The state.
        """
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(torch.get_rng_state(), cuda, device)

    @contextlib.contextmanager
    def replayed(self) -> Iterator[None]:
        """Run the block from this state; the global state afterwards is as before the block."""
        devices = [self.device] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


class ForwardModeUnsupported(Exception):
    """Forward-mode differentiation of the fusion model failed (``__cause__`` says why)."""


@dataclass(frozen=True)
class InnerStepResult:
    """What one inner step (Eq. 4, 5) computed, and the outer loss on top of it.

    Built by :class:`~tdfusion.trainer.MetaFusionTrainer` from a meta-train and a meta-test
    batch; read by the hypergradient methods.

    Attributes
    ----------
    fusion_model, loss_generator : torch.nn.Module
        ``F`` and ``G`` (never modified: they are called functionally).
    fusion_loss : callable
        ``fusion_loss(fused, a, b, weights)``, the fusion loss ``L_f``.
    crop : (torch.Tensor, torch.Tensor)
        The meta-train sources ``(a, b)`` as the fusion loss saw them, (N, C, h, w).
    weights : torch.Tensor
        ``G(crop)``, (N, 2, h, w), detached.
    fused_crop : torch.Tensor
        ``F(crop)``, (N, 1, h, w), detached.
    terms : FusionLossTerms
        ``L_f`` on the crop.
    fusion_names : tuple of str
        Names of ``F``'s trainable parameters.
    fusion_values : tuple of torch.Tensor
        Their values ``theta_F`` (detached).
    inner_gradients : tuple of torch.Tensor
        ``dL_f/dtheta_F`` (of the global batch in a distributed run); with a graph to
        ``theta_G`` when the step is differentiable.
    transformation : torchopt.base.GradientTransformation
        The inner optimiser's step, as used.
    adapted_fusion : tuple of torch.Tensor
        ``theta_F' = step(theta_F, dL_f/dtheta_F)``.
    meta_train_task_loss : torch.Tensor or None
        ``L_t(T(F(x_mtr)))`` (detached) when the task network is trainable.
    outer : callable
        ``outer(theta_F') -> L_t(T'(F'(x_mts)))``, a scalar.
    precision : Autocast
        How ``F`` and ``G`` were called (float32 by default).
    random_states : (RandomState, RandomState) or None
        The global random state before ``G(crop)`` and before ``F(crop)``, for a method that
        runs them again (dropout draws the same masks).
    """

    fusion_model: nn.Module
    loss_generator: nn.Module
    fusion_loss: Callable[..., torch.Tensor]
    crop: tuple[torch.Tensor, torch.Tensor]
    weights: torch.Tensor
    fused_crop: torch.Tensor
    terms: FusionLossTerms
    fusion_names: tuple[str, ...]
    fusion_values: tuple[torch.Tensor, ...]
    inner_gradients: tuple[torch.Tensor, ...]
    transformation: torchopt.base.GradientTransformation
    adapted_fusion: tuple[torch.Tensor, ...]
    meta_train_task_loss: torch.Tensor | None
    outer: Callable[[Sequence[torch.Tensor]], torch.Tensor]
    precision: Autocast = FLOAT32
    random_states: tuple[RandomState, RandomState] | None = None

    def statistics(self, outer_loss: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """The meta step's logged values: inner losses, outer loss, mean ``w_a`` (scalars).

        Parameters
        ----------
        outer_loss : torch.Tensor
            ``L_t(T'(F'(x_mts)))``.

        Returns
        -------
        dict of str to torch.Tensor or None
            ``fusion_loss``, ``fusion_intensity``, ``fusion_gradient``, ``task_loss``,
            ``meta_train_task_loss`` (``None`` for a fixed task) and ``weight_a_mean``.
        """
        return {
            "fusion_loss": self.terms.total.detach(),
            "fusion_intensity": self.terms.intensity.detach(),
            "fusion_gradient": self.terms.gradient.detach(),
            "task_loss": outer_loss.detach(),
            "meta_train_task_loss": self.meta_train_task_loss,
            "weight_a_mean": self.weights[:, 0].mean(),
        }


def inner_step(
    fusion_model: nn.Module,
    loss_generator: nn.Module,
    fusion_loss: Callable[..., torch.Tensor],
    task: Callable[..., torch.Tensor],
    meta_train: tuple[Any, ...],
    meta_test: tuple[torch.Tensor, torch.Tensor, Any],
    *,
    fusion_step: OptimizerStep,
    task_step: InnerStep,
    lr_scale: float = 1.0,
    task_size: tuple[int, int] | None = None,
    differentiable: bool = True,
    reduce: GradientReduction | None = None,
    precision: Autocast | None = None,
) -> InnerStepResult:
    """The inner step (Eq. 4, 5) on a meta-train batch, and the outer loss on a meta-test one.

    Every module is called through :func:`~tdfusion.trainer.meta.call_functionally`, so
    parameters and buffers (batch-norm statistics) are left as they were.

    Parameters
    ----------
    fusion_model, loss_generator : torch.nn.Module
        ``F`` and ``G``.
    fusion_loss : callable
        ``L_f(fused, a, b, weights)``.
    task : callable
        ``L_t(fused, target)``: a module with trainable parameters is the task network ``T``
        and takes a step too (``T'``); anything else is a fixed task.
    meta_train : tuple
        ``(a, b, target, crop_a, crop_b)`` on the trainer's device: the batch and the crop of
        its sources on which the fusion loss is computed (``a``, ``b`` themselves without one).
    meta_test : tuple
        ``(a, b, target)``.
    fusion_step : OptimizerStep
        The inner step of ``F``.
    task_step : callable
        The inner step of ``T``: ``task_step(parameters, gradients, lr_scale)``.
    lr_scale : float
        Learning-rate schedule factor of both steps.
    task_size : (int, int), optional
        Size to which the sources are resized for the task.
    differentiable : bool
        Keep the graph of ``theta_F'`` to ``theta_G`` (second order); otherwise ``theta_F'``
        and the generator's weights are plain tensors.
    reduce : callable, optional
        ``reduce(gradients, keep_graph)`` replaces this batch's gradients of ``L_f`` and
        ``L_t`` by those of the global batch (a distributed run); ``None`` keeps them.
    precision : Autocast, optional
        Mixed precision of the networks' forwards; ``None``: float32.

    Returns
    -------
    InnerStepResult
        The step, and ``outer(theta_F') = L_t(T'(F'(x_mts)))``.
    """
    a_train, b_train, target_train, crop_a, crop_b = meta_train
    a_test, b_test, target_test = meta_test
    precision = FLOAT32 if precision is None else precision
    run = precision.forward

    # Inner step (Eq. 4): theta_F' = step(theta_F, dL_f/dtheta_F); keeps the graph to G.
    fusion_params = trainable_parameters(fusion_model)
    fusion_names, fusion_values = tuple(fusion_params), tuple(fusion_params.values())
    random_states = (RandomState.capture(crop_a.device),)
    with torch.set_grad_enabled(differentiable):
        weights = run(call_functionally, loss_generator, (crop_a, crop_b))
    random_states += (RandomState.capture(crop_a.device),)
    fused_crop = run(call_functionally, fusion_model, (crop_a, crop_b))
    terms = fusion_loss_terms(fusion_loss, fused_crop, crop_a, crop_b, weights)
    inner_gradients = gradients(terms.total, fusion_values, create_graph=differentiable)
    if reduce is not None:
        inner_gradients = tuple(reduce(inner_gradients, differentiable))
    transformation = fusion_step.transformation(lr_scale)
    with torch.set_grad_enabled(differentiable):
        sources = fusion_values if differentiable else [v.detach() for v in fusion_values]
        adapted_fusion = differentiable_step(transformation, sources, inner_gradients)

    # Task clone (Eq. 5): theta_T' = step(theta_T, dL_t(F(x_mtr))/dtheta_T); no graph to G.
    task_params = trainable_parameters(task) if isinstance(task, nn.Module) else {}
    adapted_task: Sequence[torch.Tensor] = ()
    meta_train_task_loss = None
    if task_params:
        task_a, task_b = resize_for_task(a_train, b_train, task_size)
        if task_a is crop_a and task_b is crop_b:  # no crop, no resize: reuse
            fused_train = fused_crop.detach()
        else:  # a constant of theta_G: its fastest forward
            fused_train = run(constant_output, fusion_model, (task_a, task_b))
        task_values = list(task_params.values())
        meta_train_task_loss = check_task_loss(
            precision.task(task, task, (fused_train, target_train), call=call_functionally),
            "meta step",
        )
        task_gradients = gradients(meta_train_task_loss, task_values)
        if reduce is not None:
            task_gradients = tuple(reduce(task_gradients, False))
        with torch.no_grad():
            adapted_task = task_step(task_values, task_gradients, lr_scale)
        meta_train_task_loss = meta_train_task_loss.detach()

    test_a, test_b = resize_for_task(a_test, b_test, task_size)
    task_substitutes = dict(zip(task_params, adapted_task))

    def outer(fusion_values_prime: Sequence[torch.Tensor]) -> torch.Tensor:
        substitutes = dict(zip(fusion_names, fusion_values_prime))
        fused_test = run(call_functionally, fusion_model, (test_a, test_b), substitutes)
        if task_params:
            arguments = (task, (fused_test, target_test), task_substitutes)
            loss = precision.task(task, *arguments, call=call_functionally)
        elif isinstance(task, nn.Module):  # a frozen network: its buffers are left alone
            loss = precision.task(task, task, (fused_test, target_test), call=call_functionally)
        else:
            loss = precision.task(task, fused_test, target_test)
        return check_task_loss(loss, "meta step")

    return InnerStepResult(
        fusion_model=fusion_model,
        loss_generator=loss_generator,
        fusion_loss=fusion_loss,
        crop=(crop_a, crop_b),
        weights=weights.detach(),
        fused_crop=fused_crop.detach(),
        terms=terms,
        fusion_names=fusion_names,
        fusion_values=tuple(v.detach() for v in fusion_values),
        inner_gradients=tuple(inner_gradients),
        transformation=transformation,
        adapted_fusion=tuple(adapted_fusion),
        meta_train_task_loss=meta_train_task_loss,
        outer=outer,
        precision=precision,
        random_states=random_states,
    )


def outer_gradient(inner: InnerStepResult) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The outer loss and ``v = dL_t/dtheta_F'``, with ``theta_F'`` taken as leaves.

    Parameters
    ----------
    inner : InnerStepResult
        The inner step.

    Returns
    -------
    outer_loss : torch.Tensor
        ``L_t(T'(F'(x_mts)))``, scalar (its graph is freed).
    cotangents : tuple of torch.Tensor
        One tensor per parameter of ``F``, same shapes.
    """
    leaves = [p.detach().requires_grad_(True) for p in inner.adapted_fusion]
    outer_loss = inner.outer(leaves)
    return outer_loss, gradients(outer_loss, leaves)


def backprop_hypergradient(
    inner: InnerStepResult, cotangents: Sequence[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``v^T dtheta_F'/dtheta_G`` by second-order back-propagation through the inner step.

    Works for any ``F``; needs the inner step built with a graph (``create_graph``).

    Parameters
    ----------
    inner : InnerStepResult
        A differentiable inner step.
    cotangents : sequence of torch.Tensor
        ``v = dL_t/dtheta_F'``.

    Returns
    -------
    dict of str to torch.Tensor
        Generator parameter name -> hypergradient.
    """
    generator_params = trainable_parameters(inner.loss_generator)
    return vector_jacobian_product(inner.adapted_fusion, generator_params, cotangents)


def forward_mode_hypergradient(
    inner: InnerStepResult, cotangents: Sequence[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The same hypergradient without a second-order graph through ``F``.

    With ``g = dL_f/dtheta_F`` and ``theta_F' = step(theta_F, g)``, the hypergradient is
    ``u^T dg/dtheta_G`` with ``u = (dstep/dg)^T v``. Since ``L_f`` depends on ``theta_F`` only
    through the fused image ``f`` and on ``theta_G`` only through the weights ``w``,
    ``u^T dg/dtheta_G = d/dtheta_G <dL_f/df (f, w), f_dot>`` where ``f_dot = (df/dtheta_F) u``
    is one forward-mode derivative of ``F``. What is left is a second derivative of the loss
    function alone (cheap, element-wise) and a first-order backward through ``G``.

    Parameters
    ----------
    inner : InnerStepResult
        An inner step built without a graph.
    cotangents : sequence of torch.Tensor
        ``v = dL_t/dtheta_F'``.

    Returns
    -------
    dict of str to torch.Tensor
        Generator parameter name -> hypergradient.

    Raises
    ------
    ForwardModeUnsupported
        When ``F`` has an operation without a forward-mode rule.
    """
    # u = (d step / d g)^T v: the optimiser's own (element-wise) derivative, no network.
    grad_leaves = [g.detach().requires_grad_(True) for g in inner.inner_gradients]
    with torch.enable_grad():
        stepped = differentiable_step(inner.transformation, inner.fusion_values, grad_leaves)
    direction = vector_jacobian_product(stepped, dict(enumerate(grad_leaves)), cotangents).values()

    # f_dot = (df/dtheta_F) u by forward-mode differentiation of F on the meta-train crop.
    crop_a, crop_b = inner.crop
    model = inner.fusion_model
    buffers = {n: b.clone() for n, b in model.named_buffers()}

    def fused_from(*values: torch.Tensor) -> torch.Tensor:
        substitutes = {**buffers, **dict(zip(inner.fusion_names, values))}
        return functional_call(model, substitutes, (crop_a, crop_b), strict=False)

    generator_state, fusion_state = _random_states(inner)
    try:
        # No graph is recorded: forward-mode tangents do not need one (dual tensors work
        # under no_grad), and networks that checkpoint their blocks then run them plainly.
        # Random layers draw what they drew in the inner step.
        with warnings.catch_warnings(), torch.no_grad(), fusion_state:
            # PyTorch's first forward-mode call scripts its decompositions with the deprecated
            # torch.jit.script; that is PyTorch's business, not the user's.
            warnings.filterwarnings(
                "ignore", message=r".*torch\.jit\.script", category=FutureWarning
            )
            _, fused_tangent = inner.precision.jvp(
                fused_from, tuple(inner.fusion_values), tuple(direction)
            )
    except (RuntimeError, NotImplementedError) as error:
        raise ForwardModeUnsupported from error

    # c = d/dw <dL_f/df (f, w), f_dot>: second derivative of the loss function only.
    fused_leaf = inner.fused_crop.detach().requires_grad_(True)
    weights_leaf = inner.weights.detach().requires_grad_(True)
    loss = fusion_loss_terms(inner.fusion_loss, fused_leaf, crop_a, crop_b, weights_leaf).total
    (loss_gradient,) = torch.autograd.grad(loss, fused_leaf, create_graph=True)
    (weights_cotangent,) = torch.autograd.grad(
        (loss_gradient * fused_tangent).sum(), weights_leaf, allow_unused=True
    )
    if weights_cotangent is None:  # the loss does not couple the weights to the image
        weights_cotangent = torch.zeros_like(weights_leaf)

    # Back-propagate c through G.
    generator_params = trainable_parameters(inner.loss_generator)
    with generator_state:
        weights = inner.precision.forward(call_functionally, inner.loss_generator, (crop_a, crop_b))
    return vector_jacobian_product([weights], generator_params, [weights_cotangent])


def _random_states(
    inner: InnerStepResult,
) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """Blocks that replay the random state of ``G(crop)`` and of ``F(crop)`` (or do nothing)."""
    if inner.random_states is None:
        return contextlib.nullcontext(), contextlib.nullcontext()
    generator_state, fusion_state = inner.random_states
    return generator_state.replayed(), fusion_state.replayed()


@dataclass(frozen=True)
class HypergradientRule:
    """A hypergradient method: how to build the inner step and what to compute on it.

    Attributes
    ----------
    differentiable_inner_step : bool
        Whether the method needs ``theta_F'`` with a graph to ``theta_G``.
    compute : callable
        ``compute(inner, cotangents) -> {name: hypergradient}``.
    """

    differentiable_inner_step: bool
    compute: Callable[[InnerStepResult, Sequence[torch.Tensor]], dict[str, torch.Tensor]]


#: The exact hypergradient methods, by the name ``hypergradient_method=`` takes.
HYPERGRADIENT_METHODS: dict[str, HypergradientRule] = {
    "backprop": HypergradientRule(True, backprop_hypergradient),
    "forward": HypergradientRule(False, forward_mode_hypergradient),
}
