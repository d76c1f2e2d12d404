"""The learnable fusion loss (paper Eq. 1-3), as functions and as an ``nn.Module``."""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from tdfusion.losses.gradients import max_abs_gradient, sobel

__all__ = [
    "FusionLossTerms",
    "LearnableFusionLoss",
    "gradient_loss",
    "intensity_loss",
    "learnable_fusion_loss",
    "learnable_fusion_loss_terms",
]

Weighting = Literal["linear", "squared"]


class FusionLossTerms(NamedTuple):
    """The learnable fusion loss and its two terms, for logging.

    Attributes
    ----------
    total : torch.Tensor
        ``intensity + alpha * gradient`` (scalar).
    intensity : torch.Tensor
        The weighted intensity term ``L_int`` (scalar).
    gradient : torch.Tensor
        The gradient term ``L_grad`` (scalar, not multiplied by ``alpha``).
    """

    total: torch.Tensor
    intensity: torch.Tensor
    gradient: torch.Tensor


def _check_images(fused: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    for name, image in (("fused", fused), ("a", a), ("b", b)):
        if image.dim() != 4:
            raise ValueError(f"{name} must have shape (N, C, H, W), got {tuple(image.shape)}")
    if not fused.shape == a.shape == b.shape:
        raise ValueError(
            "fused, a and b must have one shape (N, C, H, W); got "
            f"fused {tuple(fused.shape)}, a {tuple(a.shape)}, b {tuple(b.shape)}"
        )


def _check_weights(weights: torch.Tensor, fused: torch.Tensor) -> None:
    n, _, h, w = fused.shape
    if (
        weights.dim() != 4
        or weights.shape[0] != n
        or weights.shape[1] != 2
        or weights.shape[2:] != (h, w)
    ):
        raise ValueError(
            f"weights must have shape (N, 2, H, W) = ({n}, 2, {h}, {w}) to match the images "
            f"(channel 0: w_a, channel 1: w_b), got {tuple(weights.shape)}"
        )


def intensity_loss(
    fused: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    weights: torch.Tensor,
    weighting: Weighting = "linear",
) -> torch.Tensor:
    """Weighted intensity term ``mean(w_a (f - a)^2 + w_b (f - b)^2)`` (paper Eq. 2).

    Parameters
    ----------
    fused, a, b : torch.Tensor
        Fused image and sources, (N, C, H, W).
    weights : torch.Tensor
        Per-pixel weights (N, 2, H, W): channel 0 is ``w_a``, channel 1 is ``w_b``; they are
        broadcast over the C channels of the images.
    weighting : {"linear", "squared"}
        ``"linear"`` is the paper's Eq. 2. ``"squared"`` is what the authors' research code
        computes, ``mean((w_a (f - a))^2 + (w_b (f - b))^2)``, i.e. squared weights.

    Returns
    -------
    torch.Tensor
        Scalar; the mean runs over N, C, H and W.

    Shapes
    ------
    - fused, a, b: (N, C, H, W)
    - weights: (N, 2, H, W)
    - Output: scalar
    """
    _check_images(fused, a, b)
    _check_weights(weights, fused)
    weight_a, weight_b = weights[:, 0:1], weights[:, 1:2]
    if weighting == "linear":
        return (weight_a * (fused - a).square() + weight_b * (fused - b).square()).mean()
    if weighting == "squared":
        return ((weight_a * (fused - a)).square() + (weight_b * (fused - b)).square()).mean()
    raise ValueError(f"weighting must be 'linear' or 'squared', got {weighting!r}")


def gradient_loss(fused: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Gradient term ``mean|Sx f - maxabs(Sx a, Sx b)| + mean|Sy f - maxabs(Sy a, Sy b)|`` (Eq. 3).

    Parameters
    ----------
    fused, a, b : torch.Tensor
        Fused image and sources, (N, C, H, W).

    Returns
    -------
    torch.Tensor
        Scalar: the sum of the mean absolute errors of the x and y Sobel responses.

    Shapes
    ------
    - fused, a, b: (N, C, H, W)
    - Output: scalar
    """
    _check_images(fused, a, b)
    fused_x, fused_y = sobel(fused)
    target_x, target_y = max_abs_gradient(a, b)
    return F.l1_loss(fused_x, target_x) + F.l1_loss(fused_y, target_y)


def learnable_fusion_loss_terms(
    fused: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    weights: torch.Tensor,
    alpha: float = 1.0,
    weighting: Weighting = "linear",
) -> FusionLossTerms:
    """The learnable fusion loss with its intensity and gradient terms.

    Parameters
    ----------
    fused, a, b, weights, weighting
        As in :func:`learnable_fusion_loss`.
    alpha : float
        Weight of the gradient term.

    Returns
    -------
    FusionLossTerms
        ``(total, intensity, gradient)``, three scalars; ``total = intensity + alpha * gradient``.
    """
    intensity = intensity_loss(fused, a, b, weights, weighting)
    gradient = gradient_loss(fused, a, b)
    return FusionLossTerms(intensity + alpha * gradient, intensity, gradient)


def learnable_fusion_loss(
    fused: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    weights: torch.Tensor,
    alpha: float = 1.0,
    weighting: Weighting = "linear",
) -> torch.Tensor:
    """Learnable fusion loss ``L_f = L_int + alpha * L_grad`` (paper Eq. 1-3).

    ``L_int = mean(w_a (f - a)^2 + w_b (f - b)^2)`` and
    ``L_grad = mean|Sx f - maxabs(Sx a, Sx b)| + mean|Sy f - maxabs(Sy a, Sy b)|`` with Sobel
    kernels ``Sx = [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]``, ``Sy = Sx^T``, zero padding 1, and
    ``maxabs`` keeping the signed value of larger magnitude (ties go to ``a``).

    Parameters
    ----------
    fused : torch.Tensor
        Fused images (N, C, H, W), usually C = 1 and values in [0, 1].
    a, b : torch.Tensor
        Source images, same shape as ``fused``.
    weights : torch.Tensor
        Loss weights (N, 2, H, W) from :class:`~tdfusion.LossGenerator`: ``w_a``, ``w_b``.
    alpha : float
        Weight of the gradient term (the paper uses 1).
    weighting : {"linear", "squared"}
        How the weights enter the intensity term, see :func:`intensity_loss`.

    Returns
    -------
    torch.Tensor
        Scalar loss.

    Shapes
    ------
    - fused, a, b: (N, C, H, W)
    - weights: (N, 2, H, W)
    - Output: scalar

    Example
    -------
    >>> import torch
    >>> from tdfusion.losses import learnable_fusion_loss
    >>> a, b = torch.zeros(1, 1, 8, 8), torch.ones(1, 1, 8, 8)
    >>> fused = torch.full((1, 1, 8, 8), 0.25)
    >>> weights = torch.full((1, 2, 8, 8), 0.5)
    >>> # Intensity term only (alpha=0): 0.5 * 0.25^2 + 0.5 * 0.75^2
    >>> round(learnable_fusion_loss(fused, a, b, weights, alpha=0.0).item(), 6)
    0.3125
    """
    return learnable_fusion_loss_terms(fused, a, b, weights, alpha, weighting).total


class LearnableFusionLoss(nn.Module):
    """Module form of :func:`learnable_fusion_loss`; it holds only the configuration.

    Parameters
    ----------
    alpha : float
        Weight of the gradient term (default 1, as in the paper).
    weighting : {"linear", "squared"}
        ``"linear"`` (paper Eq. 2, default) or ``"squared"`` (the authors' code).

    Shapes
    ------
    - fused, a, b: (N, C, H, W)
    - weights: (N, 2, H, W), channel 0 ``w_a`` and channel 1 ``w_b``
    - Output: scalar

    Example
    -------
    >>> import torch
    >>> from tdfusion import LearnableFusionLoss, LossGenerator
    >>> a, b = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32)
    >>> weights = LossGenerator()(a, b)
    >>> loss = LearnableFusionLoss(alpha=1.0)((a + b) / 2, a, b, weights)
    >>> loss.shape
    torch.Size([])
    """

    def __init__(self, alpha: float = 1.0, weighting: Weighting = "linear") -> None:
        super().__init__()
        if weighting not in ("linear", "squared"):
            raise ValueError(f"weighting must be 'linear' or 'squared', got {weighting!r}")
        self.alpha = float(alpha)
        self.weighting: Weighting = weighting

    def forward(
        self, fused: torch.Tensor, a: torch.Tensor, b: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """Compute the loss; see :func:`learnable_fusion_loss`."""
        return self.terms(fused, a, b, weights).total

    def terms(
        self, fused: torch.Tensor, a: torch.Tensor, b: torch.Tensor, weights: torch.Tensor
    ) -> FusionLossTerms:
        """Compute the loss with its intensity and gradient terms (for logging)."""
        return learnable_fusion_loss_terms(fused, a, b, weights, self.alpha, self.weighting)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, weighting={self.weighting!r}"
