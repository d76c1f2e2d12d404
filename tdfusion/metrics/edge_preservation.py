"""Xydeas-Petrovic edge-preservation metric Q^AB/F (Qabf)."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from tdfusion.metrics._arrays import as_image_triple

__all__ = ["qabf", "sobel_strength_orientation"]

_STRENGTH_GAIN = 0.9994  # Tg
_STRENGTH_SLOPE = -15.0  # kg
_STRENGTH_MIDPOINT = 0.5  # Dg
_ORIENTATION_GAIN = 0.9879  # Ta
_ORIENTATION_SLOPE = -22.0  # ka
_ORIENTATION_MIDPOINT = 0.8  # Da
_STRIP_ROWS = 32  # rows processed at a time


def qabf(fused: ArrayLike, a: ArrayLike, b: ArrayLike) -> float:
    """Edge information transferred from the sources to the fused image, Q^AB/F (Qabf).

    The Xydeas-Petrovic metric as the field's evaluation code computes it: Sobel responses
    ``Sx``, ``Sy`` by 'same' zero-padded convolution, edge strength ``g = sqrt(Sx^2 + Sy^2)``,
    orientation ``alpha = arctan(Sy / Sx)`` (``pi / 2`` where ``Sx = 0``). For each source S the
    relative strength is ``gF / gS`` or ``gS / gF`` (the smaller over the larger) and ``gF`` itself
    where the two are equal (the reference's rule), the relative orientation is
    ``1 - |alpha_S - alpha_F| / (pi / 2)``, and the preservation ``Q^SF`` is the product of the
    sigmoids ``Tg / (1 + exp(kg (G - Dg)))`` and ``Ta / (1 + exp(ka (A - Da)))`` with
    Tg = 0.9994, kg = -15, Dg = 0.5, Ta = 0.9879, ka = -22, Da = 0.8. The result is
    ``sum(Q^AF gA + Q^BF gB) / sum(gA + gB)``.

    Parameters
    ----------
    fused, a, b : array_like, shape (H, W)
        Fused image and the two source images in 0..255, any real dtype.

    Returns
    -------
    float
        Qabf, between 0 and about 0.975; NaN when both sources are constant (no edges).

    Example
    -------
    >>> a = np.zeros((8, 8)); a[:, 4:] = 100
    >>> round(qabf(a, a, a), 4)  # every edge kept: the sigmoids cap Qabf at 0.9753
    0.9753
    """
    return _qabf(*as_image_triple(fused, a, b))


def _qabf(fused: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    height, width = fused.shape
    padded = np.zeros((3, height + 2, width + 2))
    padded[0, 1:-1, 1:-1] = fused
    padded[1, 1:-1, 1:-1] = a
    padded[2, 1:-1, 1:-1] = b
    weighted_sum = 0.0
    weight_total = 0.0
    # Strips of rows keep the dozen per-pixel maps in cache.
    for first_row in range(0, height, _STRIP_ROWS):
        strip = padded[:, first_row : first_row + _STRIP_ROWS + 2]
        strength, orientation = _sobel_of_padded(strip)
        preservation = _edge_preservation(
            strength[1:], orientation[1:], strength[0], orientation[0]
        )
        preservation *= strength[1:]
        weighted_sum += float(np.sum(preservation))
        weight_total += float(np.sum(strength[1:]))
    if weight_total == 0:
        return float("nan")
    return weighted_sum / weight_total


def sobel_strength_orientation(image: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Sobel edge strength and orientation of an image, as Qabf uses them.

    Parameters
    ----------
    image : array_like, shape (H, W)
        Image in 0..255.

    Returns
    -------
    strength : numpy.ndarray, shape (H, W)
        ``sqrt(Sx^2 + Sy^2)`` of the Sobel responses (zero padding outside the image).
    orientation : numpy.ndarray, shape (H, W)
        ``arctan(Sy / Sx)`` in ``[-pi/2, pi/2]``, and ``pi / 2`` where ``Sx = 0``.

    Example
    -------
    >>> strength, orientation = sobel_strength_orientation(np.ones((3, 3)))
    >>> float(strength[1, 1]), float(orientation[1, 1])
    (0.0, 1.5707963267948966)
    """
    return _sobel_of_padded(np.pad(np.asarray(image, dtype=np.float64), 1))


def _sobel_of_padded(padded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sobel strength and orientation inside a zero-padded array of shape (..., h + 2, w + 2)."""
    # Convolution (not correlation) with [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]] is the left
    # column minus the right one of the vertically smoothed image, and with
    # [[1, 2, 1], [0, 0, 0], [-1, -2, -1]] the bottom row minus the top one.
    vertical_smooth = padded[..., :-2, :] + padded[..., 2:, :]
    vertical_smooth += padded[..., 1:-1, :]
    vertical_smooth += padded[..., 1:-1, :]
    horizontal_smooth = padded[..., :-2] + padded[..., 2:]
    horizontal_smooth += padded[..., 1:-1]
    horizontal_smooth += padded[..., 1:-1]
    response_x = vertical_smooth[..., :-2] - vertical_smooth[..., 2:]
    response_y = horizontal_smooth[..., 2:, :] - horizontal_smooth[..., :-2, :]
    strength = np.square(response_x)
    strength += np.square(response_y)
    np.sqrt(strength, out=strength)
    with np.errstate(divide="ignore", invalid="ignore"):
        response_y /= response_x
        orientation = np.arctan(response_y, out=response_y)
    orientation[response_x == 0] = np.pi / 2
    return strength, orientation


def _edge_preservation(
    strength_source: np.ndarray,
    orientation_source: np.ndarray,
    strength_fused: np.ndarray,
    orientation_fused: np.ndarray,
) -> np.ndarray:
    """Per-pixel preservation Q^SF of the source's edges in the fused image."""
    # The smaller strength over the larger; where they are equal the reference keeps gF itself.
    equal = strength_source == strength_fused
    relative_strength = np.minimum(strength_source, strength_fused)
    with np.errstate(divide="ignore", invalid="ignore"):  # 0 / 0 where both are 0: equal
        relative_strength /= np.maximum(strength_source, strength_fused)
    relative_strength[equal] = np.broadcast_to(strength_fused, equal.shape)[equal]
    # exp(kg (G - Dg)), then Tg / (1 + that)
    relative_strength -= _STRENGTH_MIDPOINT
    relative_strength *= _STRENGTH_SLOPE
    strength_preservation = np.exp(relative_strength, out=relative_strength)
    strength_preservation += 1
    np.divide(_STRENGTH_GAIN, strength_preservation, out=strength_preservation)
    # relative orientation 1 - |aS - aF| / (pi / 2), then Ta / (1 + exp(ka (A - Da)))
    orientation_term = np.subtract(orientation_source, orientation_fused)
    np.abs(orientation_term, out=orientation_term)
    orientation_term /= np.pi / 2
    np.subtract(1 - _ORIENTATION_MIDPOINT, orientation_term, out=orientation_term)
    orientation_term *= _ORIENTATION_SLOPE
    np.exp(orientation_term, out=orientation_term)
    orientation_term += 1
    np.divide(_ORIENTATION_GAIN, orientation_term, out=orientation_term)
    strength_preservation *= orientation_term
    return strength_preservation
