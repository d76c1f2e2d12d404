"""Where tensors live: the default device, and images moved to a module's device and dtype."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["images_for", "resolve_device"]


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The device to use: ``device`` itself, or CUDA when available, else the CPU.

    Parameters
    ----------
    device : str or torch.device, optional
        An explicit choice (``"cpu"``, ``"cuda:1"``, ...); ``None`` picks the default.

    Returns
    -------
    torch.device
        The device.

    Example
    -------
    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def images_for(module: nn.Module, images: Sequence[np.ndarray]) -> torch.Tensor:
    """Stack same-sized 2-D images into an (N, 1, H, W) batch on ``module``'s device and dtype.

    Parameters
    ----------
    module : torch.nn.Module
        A module with parameters (their device and floating dtype are used).
    images : sequence of numpy.ndarray
        (H, W) arrays of one size.

    Returns
    -------
    torch.Tensor
        (N, 1, H, W).

    Example
    -------
    >>> images_for(nn.Conv2d(1, 1, 3).double(), [np.zeros((4, 5))] * 2).shape
    torch.Size([2, 1, 4, 5])
    """
    parameter = next(module.parameters())
    batch = np.stack([np.ascontiguousarray(image) for image in images])[:, None]
    return torch.from_numpy(batch).to(device=parameter.device, dtype=parameter.dtype)
