"""Mixed precision in training: which computation runs in which floating-point type.

``MetaFusionTrainer(precision=...)`` takes ``"fp32"`` (default), ``"bf16"`` or ``"fp16"``:

+---------------------------------------------+---------+-----------------------------+------------+
| Computation                                 | fp32    | bf16                        | fp16       |
+=============================================+=========+=============================+============+
| Parameters, ``.grad``, optimiser states,    | float32 | float32                     | float32    |
| checkpoints, G's update                     |         |                             |            |
+---------------------------------------------+---------+-----------------------------+------------+
| Forward of ``F``, ``G`` and a task network  | float32 | autocast bfloat16           | autocast   |
| ``T`` (convolutions, matrix products)       |         |                             | float16    |
+---------------------------------------------+---------+-----------------------------+------------+
| Their outputs, as the losses see them       | float32 | cast to float32             | same       |
+---------------------------------------------+---------+-----------------------------+------------+
| Fusion loss ``L_f`` (and its derivatives in | float32 | float32 (autocast off)      | float32    |
| the forward-mode hypergradient)             |         |                             |            |
+---------------------------------------------+---------+-----------------------------+------------+
| Task loss inside ``T``'s module             | float32 | autocast: cross-entropy,    | same       |
|                                             |         | MSE, log-softmax in float32 |            |
+---------------------------------------------+---------+-----------------------------+------------+
| A task that is a plain function             | float32 | float32 (autocast off)      | float32    |
+---------------------------------------------+---------+-----------------------------+------------+
| Backward passes through the forwards        | float32 | bfloat16 ops, parameter     | float16    |
|                                             |         | gradients summed in float32 |            |
+---------------------------------------------+---------+-----------------------------+------------+
| Forward-mode derivative of ``F``            | float32 | autocast bfloat16 (float32  | meta step  |
| (``hypergradient_method="forward"``)        |         | where PyTorch's forward     | refused    |
|                                             |         | mode fails under autocast)  |            |
+---------------------------------------------+---------+-----------------------------+------------+
| Inner step ``theta_F' = step(theta_F, g)``, | float32 | float32                     | meta step  |
| ``T'``, hypergradient ``v``, ``u``, result  |         |                             | refused    |
+---------------------------------------------+---------+-----------------------------+------------+
| Loss scaling (fusion phase)                 | none    | none                        | GradScaler |
+---------------------------------------------+---------+-----------------------------+------------+

``"fp16"`` is for the fusion phase only: its steps scale the losses with a
:class:`torch.amp.GradScaler` (its state is kept in checkpoints), and a NaN or infinite gradient
there is an overflow of the scale: the step is skipped (``skipped`` = 1 in the statistics) and
the scale halved, whatever ``on_nonfinite`` says; a NaN or infinite *loss* follows
``on_nonfinite`` as in float32. The meta step refuses float16: the hypergradient through one
inner step of size 1e-4 is of order 1e-8, below float16's smallest normal number (6.1e-5), and
its first- and second-order backward passes would need two different loss scales. bfloat16
has float32's exponent range and needs no scaling; use it for meta steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.autograd import forward_ad

from tdfusion.inference.acceleration import PRECISIONS, Precision
from tdfusion.trainer.batches import map_tensors

__all__ = [
    "FLOAT32",
    "PRECISIONS",
    "Autocast",
    "LossScaler",
    "Precision",
    "check_precision",
    "forward_derivative",
    "mixed_precision",
    "to_float32",
]

_LOW = (torch.bfloat16, torch.float16)


def check_precision(precision: str, dtype: torch.dtype) -> None:
    """Refuse an unknown precision, or mixed precision on parameters that are not float32.

    Parameters
    ----------
    precision : str
        ``"fp32"``, ``"bf16"`` or ``"fp16"``.
    dtype : torch.dtype
        The fusion model's parameter type.

    Raises
    ------
    ValueError
        Naming what was given and what is accepted.

    Example
    -------
    >>> check_precision("bf16", torch.float32)
    >>> check_precision("bf16", torch.float64)
    Traceback (most recent call last):
    ...
    ValueError: precision='bf16' needs float32 parameters ... pass precision='fp32'
    """
    if precision not in PRECISIONS:
        raise ValueError(
            f"precision must be one of {', '.join(map(repr, PRECISIONS))}; got {precision!r}"
        )
    if precision != "fp32" and dtype != torch.float32:
        raise ValueError(
            f"precision={precision!r} needs float32 parameters (autocast runs their forward in "
            f"a lower precision); the fusion model's are {dtype}: pass precision='fp32'"
        )


def to_float32(output: Any) -> Any:
    """``output`` with its bfloat16 and float16 tensors cast to float32 (others as they are).

    Parameters
    ----------
    output : Any
        A tensor, or tuples, lists and mappings of them.

    Returns
    -------
    Any
        The same structure.

    Example
    -------
    >>> to_float32((torch.ones(1, dtype=torch.bfloat16), torch.ones(1, dtype=torch.float64)))
    (tensor([1.]), tensor([1.], dtype=torch.float64))
    """
    return map_tensors(lambda tensor: tensor.float() if tensor.dtype in _LOW else tensor, output)


def forward_derivative(
    function: Callable[..., torch.Tensor],
    primals: tuple[torch.Tensor, ...],
    tangents: tuple[torch.Tensor, ...],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``function(*primals)`` and its derivative along ``tangents``, by forward-mode AD.

    The same values as :func:`torch.func.jvp` for a function of tensors that returns one
    tensor, computed with :mod:`torch.autograd.forward_ad`'s dual tensors directly: without
    ``torch.func``'s wrapping of every intermediate, the derivative of ReFusionNet on a
    2 x 256 x 256 crop took 8-15% less time on the CPU.

    Parameters
    ----------
    function : callable
        ``function(*primals) -> torch.Tensor``.
    primals, tangents : tuple of torch.Tensor
        Where, and along which direction, to differentiate (same shapes, pairwise).

    Returns
    -------
    (torch.Tensor, torch.Tensor)
        The output and its tangent (zeros where the output does not depend on the primals).

    Raises
    ------
    RuntimeError, NotImplementedError
        When an operation has no forward-mode rule (or inside another forward-mode level).

    Examples
    --------
    >>> x, direction = torch.tensor([1.0, 2.0]), torch.tensor([1.0, 0.0])
    >>> forward_derivative(lambda t: t**2, (x,), (direction,))
    (tensor([1., 4.]), tensor([2., 0.]))
    """
    with forward_ad.dual_level():
        duals = tuple(forward_ad.make_dual(p, t) for p, t in zip(primals, tangents))
        output, tangent = forward_ad.unpack_dual(function(*duals))
        if tangent is None:
            tangent = torch.zeros_like(output)
        return output.clone(), tangent.clone()


@dataclass(frozen=True)
class Autocast:
    """How the trainer calls a network: under :func:`torch.autocast`, its output in float32.

    Parameters
    ----------
    precision : {"fp32", "bf16", "fp16"}
        ``"fp32"``: the calls are plain.
    device_type : str
        ``"cpu"``, ``"cuda"``, ... (the trainer's device).

    Examples
    --------
    >>> conv = nn.Conv2d(1, 1, 1)
    >>> run = Autocast("bf16", "cpu")
    >>> run.forward(conv, torch.rand(1, 1, 2, 2)).dtype  # bfloat16 inside, float32 out
    torch.float32
    >>> run.task(lambda fused, target: (fused - target).square().mean(),
    ...          torch.rand(2), torch.rand(2)).dtype  # a plain function: no autocast
    torch.float32
    """

    precision: Precision = "fp32"
    device_type: str = "cpu"
    #: What was learned by use: ``"jvp_float32"`` once a forward-mode derivative failed under
    #: autocast.
    learned: dict[str, bool] = field(default_factory=dict, compare=False, repr=False)

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast type (``None`` for ``"fp32"``)."""
        return PRECISIONS[self.precision]

    @property
    def enabled(self) -> bool:
        """Whether the forwards run under autocast."""
        return self.dtype is not None

    def context(self) -> contextlib.AbstractContextManager[Any]:
        """:func:`torch.autocast` in the precision's type, or nothing for ``"fp32"``."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def forward(self, function: Callable[..., Any], *args: Any) -> Any:
        """``function(*args)`` under autocast, its low-precision outputs cast to float32.

        Parameters
        ----------
        function : callable
            A network (``F``, ``G``, ``T``) or a function that calls one.
        *args
            Its arguments.

        Returns
        -------
        Any
            What it returns, with bfloat16/float16 tensors as float32.
        """
        if not self.enabled:
            return function(*args)
        with self.context():
            output = function(*args)
        return to_float32(output)

    def jvp(
        self,
        function: Callable[..., Any],
        primals: tuple[torch.Tensor, ...],
        tangents: tuple[torch.Tensor, ...],
    ) -> tuple[Any, Any]:
        """:func:`forward_derivative` under autocast, in float32 where that fails.

        Where an operation's forward-mode rule fails under autocast (PyTorch's CPU layer norm
        did under ``torch.func.jvp``, giving a bfloat16 output a float32 tangent), the
        derivative is taken in float32 instead (the first failure is remembered, and nothing
        is said).

        Parameters
        ----------
        function : callable
            ``function(*primals)``.
        primals, tangents : tuple of torch.Tensor
            Where, and along which direction, to differentiate.

        Returns
        -------
        (Any, Any)
            The output and its tangent, in float32.

        Raises
        ------
        RuntimeError, NotImplementedError
            When forward-mode differentiation fails in float32 too.
        """
        if self.enabled and not self.learned.get("jvp_float32"):
            try:
                return self.forward(forward_derivative, function, primals, tangents)
            except (RuntimeError, NotImplementedError):
                self.learned["jvp_float32"] = True
        return forward_derivative(function, primals, tangents)

    def for_meta_step(self) -> Autocast:
        """This autocast, for a meta step; ``"fp16"`` is refused (see the module's notes).

        Returns
        -------
        Autocast
            ``self``.

        Raises
        ------
        ValueError
            For ``"fp16"``, recommending ``"bf16"``.
        """
        if self.precision == "fp16":
            raise ValueError(
                "precision='fp16' trains the fusion phase only (loss-scaled steps of F and T): "
                "the meta step's hypergradient (of order 1e-8) is below float16's range; use "
                "precision='bf16' (float32's range) for meta steps, or meta_steps=0"
            )
        return self

    def task(
        self, task: Callable[..., Any], *args: Any, call: Callable[..., Any] | None = None
    ) -> Any:
        """The task loss: a module under autocast (its loss included), a function in float32.

        Parameters
        ----------
        task : callable
            ``task_loss`` as the trainer holds it.
        *args
            ``(fused, target)``.
        call : callable, optional
            What to call instead of ``task`` itself (a functional call, a compiled module).

        Returns
        -------
        Any
            The loss, float32 when it was computed in a lower precision.
        """
        function = task if call is None else call
        if isinstance(task, nn.Module):
            return self.forward(function, *args)
        return function(*args)


#: Plain float32 calls (no autocast).
FLOAT32 = Autocast()


class LossScaler:
    """The fusion phase's loss scaling: a :class:`torch.amp.GradScaler` with ``"fp16"`` only.

    Without scaling every method is a plain pass-through (``scale`` returns the loss, ``step``
    steps the optimiser).

    Parameters
    ----------
    precision : {"fp32", "bf16", "fp16"}
        Scaling is on for ``"fp16"``.
    device_type : str
        The trainer's device type.

    Attributes
    ----------
    scaler : torch.amp.GradScaler
        Disabled unless ``precision="fp16"``.

    Example
    -------
    >>> weight = nn.Parameter(torch.ones(1))
    >>> optimizer = torch.optim.SGD([weight], lr=0.5)
    >>> scaler = LossScaler("fp16", "cpu")
    >>> scaler.scale(weight.sum()).backward()
    >>> float(weight.grad[0])  # scaled by 2**16
    65536.0
    >>> scaler.unscale_(optimizer); float(weight.grad[0])
    1.0
    >>> scaler.step(optimizer); scaler.update(); float(weight.detach()[0])
    0.5
    """

    def __init__(self, precision: str, device_type: str) -> None:
        self.enabled = precision == "fp16"
        self.scaler = torch.amp.GradScaler(device_type, enabled=self.enabled)
        self._unscaled = False

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` times the current scale (``loss`` itself without scaling)."""
        return self.scaler.scale(loss) if self.enabled else loss

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the gradients of ``optimizer``'s parameters by the scale, in place."""
        if self.enabled:
            self.scaler.unscale_(optimizer)
            self._unscaled = True

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Step ``optimizer`` (the scaler skips it when its gradients held NaN or infinity)."""
        if self.enabled:
            self.scaler.step(optimizer)
        else:
            optimizer.step()

    def update(self) -> None:
        """End of a step: grow the scale, or halve it after a NaN or infinite gradient."""
        if self._unscaled:
            self._unscaled = False
            self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        """The scaler's state (empty without scaling)."""
        return self.scaler.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state from :meth:`state_dict` (an empty one changes nothing)."""
        if self.enabled and state:
            self.scaler.load_state_dict(dict(state))


def mixed_precision(
    precision: str, device: torch.device, dtype: torch.dtype
) -> tuple[Autocast, LossScaler]:
    """The trainer's forward policy and loss scaler for ``precision``, checked.

    Parameters
    ----------
    precision : {"fp32", "bf16", "fp16"}
        The precision.
    device : torch.device
        Where training runs.
    dtype : torch.dtype
        The fusion model's parameter type (float32 for mixed precision).

    Returns
    -------
    (Autocast, LossScaler)
        How to call the networks, and the fusion phase's loss scaling.

    Raises
    ------
    ValueError
        See :func:`check_precision`.
    """
    check_precision(precision, dtype)
    return Autocast(precision, device.type), LossScaler(precision, device.type)  # type: ignore[arg-type]
