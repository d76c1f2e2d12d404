"""What a task network looks like to tdfusion, and the small helpers the task adapters share."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TaskAdapter", "check_fused_image", "evaluation_mode", "pad_to_multiple"]


@runtime_checkable
class TaskAdapter(Protocol):
    """A differentiable downstream task: the task network ``T`` of the paper with its loss.

    Any :class:`torch.nn.Module` with these two methods can be trained by the meta-fusion trainer.
    ``forward`` must compute the loss only from the module's own parameters and buffers (the
    trainer substitutes them with :func:`torch.func.functional_call`) and must be differentiable
    w.r.t. ``fused``.

    Example
    -------
    >>> from tdfusion.tasks import SegmentationTask
    >>> isinstance(SegmentationTask(num_classes=9), TaskAdapter)  # doctest: +SKIP
    True
    """

    def forward(self, fused: torch.Tensor, target: Any) -> torch.Tensor:
        """Task loss of the fused images ``(N, C, H, W)`` against ``target``: a scalar tensor."""
        ...

    def predict(self, fused: torch.Tensor) -> Any:
        """Task prediction for the fused images, in evaluation mode and without gradients."""
        ...


def check_fused_image(fused: Any, in_channels: int, *, name: str = "fused") -> torch.Tensor:
    """Check that ``fused`` is a floating-point ``(N, in_channels, H, W)`` tensor.

    Parameters
    ----------
    fused : Any
        The value to check.
    in_channels : int
        Expected number of channels.
    name : str
        Name used in the error message.

    Returns
    -------
    torch.Tensor
        ``fused`` itself.

    Raises
    ------
    ValueError
        When it is not a tensor of that shape and a floating-point dtype.

    Example
    -------
    >>> check_fused_image(torch.zeros(2, 1, 8, 8), 1).shape
    torch.Size([2, 1, 8, 8])
    """
    if not isinstance(fused, torch.Tensor):
        raise ValueError(
            f"{name} must be a torch.Tensor (N, {in_channels}, H, W), got {type(fused)}"
        )
    if fused.ndim != 4 or fused.shape[1] != in_channels:
        raise ValueError(
            f"{name} must have shape (N, {in_channels}, H, W), got {tuple(fused.shape)}"
        )
    if not fused.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {fused.dtype}")
    if fused.shape[0] == 0 or fused.shape[2] == 0 or fused.shape[3] == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(fused.shape)}")
    return fused


def pad_to_multiple(
    image: torch.Tensor, multiple: int, *, mode: str = "replicate", value: float = 0.0
) -> torch.Tensor:
    """Pad the bottom and right of ``image`` so that H and W become multiples of ``multiple``.

    Padding only at the bottom/right keeps pixel coordinates unchanged, so predictions can be
    cropped back with ``[..., :H, :W]``.

    Parameters
    ----------
    image : torch.Tensor
        Shape ``(N, C, H, W)``.
    multiple : int
        The network's total stride (32 for SegFormer and YOLOv8).
    mode : str
        ``"replicate"``, ``"reflect"`` or ``"constant"`` (see :func:`torch.nn.functional.pad`).
    value : float
        Fill value for ``mode="constant"``.

    Returns
    -------
    torch.Tensor
        Shape ``(N, C, ceil(H / multiple) * multiple, ceil(W / multiple) * multiple)``; ``image``
        itself when no padding is needed.

    Example
    -------
    >>> pad_to_multiple(torch.zeros(1, 1, 240, 320), 32).shape
    torch.Size([1, 1, 256, 320])
    """
    height, width = image.shape[-2:]
    pad_bottom = -height % multiple
    pad_right = -width % multiple
    if pad_bottom == 0 and pad_right == 0:
        return image
    padding = (0, pad_right, 0, pad_bottom)
    if mode == "constant":
        return F.pad(image, padding, mode="constant", value=value)
    return F.pad(image, padding, mode=mode)


@contextlib.contextmanager
def evaluation_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` in evaluation mode and restore every submodule's own mode afterwards.

    Parameters
    ----------
    module : torch.nn.Module
        The module; its submodules may be in mixed modes, each is restored as it was.

    Yields
    ------
    torch.nn.Module
        ``module``, in evaluation mode.

    Example
    -------
    >>> net = nn.Sequential(nn.BatchNorm1d(2))
    >>> with evaluation_mode(net):
    ...     net.training
    False
    >>> net.training
    True
    """
    modes = [(submodule, submodule.training) for submodule in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for submodule, training in modes:
            submodule.training = training
