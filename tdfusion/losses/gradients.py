"""Image gradients for the fusion loss: the Sobel operator and the signed larger of two values."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["max_abs", "max_abs_gradient", "sobel"]

_SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))


def _check_image(image: torch.Tensor, name: str) -> None:
    if image.dim() != 4:
        raise ValueError(f"{name} must have shape (N, C, H, W), got {tuple(image.shape)}")
    if not image.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {image.dtype}")


def sobel(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sobel responses of every channel, with zero padding of one pixel.

    The kernels are ``Sx = [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]`` and ``Sy = Sx^T``, applied
    as a cross-correlation (what :func:`torch.nn.functional.conv2d` computes).

    Parameters
    ----------
    image : torch.Tensor
        Images of shape (N, C, H, W), floating point.

    Returns
    -------
    tuple of torch.Tensor
        ``(gx, gy)``, each of shape (N, C, H, W): the horizontal and vertical responses.

    Shapes
    ------
    - Input: (N, C, H, W)
    - Output: two tensors of shape (N, C, H, W)

    Example
    -------
    >>> import torch
    >>> from tdfusion.losses import sobel
    >>> ramp = torch.arange(5.0).repeat(5, 1)[None, None]  # intensity grows left to right
    >>> gx, gy = sobel(ramp)
    >>> gx[0, 0, 2, 2].item(), gy[0, 0, 2, 2].item()
    (8.0, 0.0)
    """
    _check_image(image, "image")
    channels = image.shape[1]
    kernel_x = torch.tensor(_SOBEL_X, dtype=image.dtype, device=image.device)
    kernels = torch.stack((kernel_x, kernel_x.t()))[:, None]  # (2, 1, 3, 3)
    kernels = kernels.repeat(channels, 1, 1, 1)  # channel c -> outputs 2c (x) and 2c + 1 (y)
    responses = F.conv2d(image, kernels, padding=1, groups=channels)
    return responses[:, 0::2], responses[:, 1::2]


def max_abs(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Element-wise the signed value of larger magnitude; ties go to ``first``.

    Parameters
    ----------
    first, second : torch.Tensor
        Tensors of the same shape.

    Returns
    -------
    torch.Tensor
        ``first`` where ``|first| >= |second|``, else ``second``.

    Example
    -------
    >>> import torch
    >>> from tdfusion.losses import max_abs
    >>> max_abs(torch.tensor([1.0, -3.0, 2.0]), torch.tensor([-2.0, 1.0, -2.0]))
    tensor([-2., -3.,  2.])
    """
    if first.shape != second.shape:
        raise ValueError(
            "max_abs needs tensors of one shape, got "
            f"{tuple(first.shape)} and {tuple(second.shape)}"
        )
    return torch.where(first.abs() >= second.abs(), first, second)


def max_abs_gradient(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Target gradient of the fusion loss: per direction, the stronger Sobel response of a or b.

    Parameters
    ----------
    a, b : torch.Tensor
        Source images of shape (N, C, H, W).

    Returns
    -------
    tuple of torch.Tensor
        ``(max_abs(Sx a, Sx b), max_abs(Sy a, Sy b))``, each (N, C, H, W).
    """
    ax, ay = sobel(a)
    bx, by = sobel(b)
    return max_abs(ax, bx), max_abs(ay, by)
