"""Where tensors live: the default device, and images moved to a module's device and dtype."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["check_device", "images_for", "resolve_device"]

#: Device types tdfusion runs on.
DEVICE_TYPES = ("cpu", "cuda", "mps")


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


def check_device(device: str | torch.device) -> torch.device:
    """Parse a device and check that this machine has it.

    Parameters
    ----------
    device : str or torch.device
        ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``, ...

    Returns
    -------
    torch.device
        The device.

    Raises
    ------
    ValueError
        In one line: an unknown device string, CUDA (or MPS) asked for where it is not
        available, or a GPU index beyond the GPUs present.

    Example
    -------
    >>> check_device("cpu")
    device(type='cpu')
    >>> check_device("gpu")
    Traceback (most recent call last):
    ...
    ValueError: unknown device 'gpu'; expected cpu, cuda, cuda:N or mps
    """
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in DEVICE_TYPES:
        raise ValueError(f"unknown device {str(device)!r}; expected cpu, cuda, cuda:N or mps")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            build = "with" if torch.backends.cuda.is_built() else "without"
            raise ValueError(
                f"device {str(device)!r}: CUDA is not available on this machine (torch "
                f"{torch.__version__}, built {build} CUDA); use cpu"
            )
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(
                f"device {str(device)!r}: this machine has {count} GPU(s), cuda:0 to "
                f"cuda:{count - 1}"
            )
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(device)!r}: MPS is not available on this machine; use cpu")
    return parsed


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
