"""No-reference metrics of the fused image alone: EN, SD, SF and AG."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from tdfusion.metrics._arrays import as_image, to_uint8

__all__ = ["average_gradient", "entropy", "spatial_frequency", "standard_deviation"]


def entropy(fused: ArrayLike) -> float:
    """Shannon entropy (EN) of the fused image's grey-level histogram, in bits.

    The image is rounded to integers and clipped to 0..255, and the entropy of its
    256-bin normalised histogram ``p`` is ``-sum(p * log2(p))`` over the non-empty bins.

    Parameters
    ----------
    fused : array_like, shape (H, W)
        Fused image in 0..255, any real dtype.

    Returns
    -------
    float
        Entropy in bits, between 0 (constant image) and 8.

    Example
    -------
    >>> entropy(np.array([[0, 0], [255, 255]]))
    1.0
    """
    return _entropy(as_image(fused, "fused image"))


def standard_deviation(fused: ArrayLike) -> float:
    """Population standard deviation (SD) of the fused image's pixel values.

    Parameters
    ----------
    fused : array_like, shape (H, W)
        Fused image in 0..255, any real dtype.

    Returns
    -------
    float
        ``sqrt(mean((F - mean(F))^2))`` (divisor N, not N - 1).

    Example
    -------
    >>> standard_deviation(np.array([[0, 0], [10, 10]]))
    5.0
    """
    return float(np.std(as_image(fused, "fused image")))


def spatial_frequency(fused: ArrayLike) -> float:
    """Spatial frequency (SF) of the fused image.

    ``sqrt(mean(dx^2) + mean(dy^2))`` where ``dx`` and ``dy`` are the differences of
    horizontally and vertically neighbouring pixels (each mean over its own
    ``H x (W - 1)`` or ``(H - 1) x W`` differences).

    Parameters
    ----------
    fused : array_like, shape (H, W)
        Fused image in 0..255, any real dtype, at least 2 x 2.

    Returns
    -------
    float
        Spatial frequency in grey levels.

    Example
    -------
    >>> spatial_frequency(np.array([[0, 3], [0, 3]]))
    3.0
    """
    return _spatial_frequency(_at_least_2x2(as_image(fused, "fused image")))


def average_gradient(fused: ArrayLike) -> float:
    """Average gradient (AG) of the fused image.

    ``mean(sqrt((Gx^2 + Gy^2) / 2))`` where ``Gx`` and ``Gy`` are central differences
    (``(I[i + 1] - I[i - 1]) / 2``) inside the image and one-sided differences on its borders.

    Parameters
    ----------
    fused : array_like, shape (H, W)
        Fused image in 0..255, any real dtype, at least 2 x 2.

    Returns
    -------
    float
        Average gradient in grey levels per pixel.

    Example
    -------
    >>> average_gradient(np.array([[0, 2, 4], [0, 2, 4]]))  # Gx = 2, Gy = 0 everywhere
    1.4142135623730951
    """
    return _average_gradient(_at_least_2x2(as_image(fused, "fused image")))


def _at_least_2x2(image: np.ndarray) -> np.ndarray:
    if min(image.shape) < 2:
        raise ValueError(f"fused image must be at least 2 x 2 pixels, got shape {image.shape}")
    return image


def _entropy(image: np.ndarray) -> float:
    return _entropy_of_levels(to_uint8(image))


def _entropy_of_levels(levels: np.ndarray) -> float:
    """Entropy of an image already rounded and clipped to ``uint8``."""
    counts = np.bincount(levels.ravel(), minlength=256)
    probabilities = counts[counts > 0] / levels.size
    return float(-np.sum(probabilities * np.log2(probabilities)))


def _spatial_frequency(image: np.ndarray) -> float:
    row_frequency = np.mean(np.square(np.diff(image, axis=1)))
    column_frequency = np.mean(np.square(np.diff(image, axis=0)))
    return float(np.sqrt(row_frequency + column_frequency))


def _average_gradient(image: np.ndarray) -> float:
    squared_norm = np.square(_gradient(image, axis=1))
    squared_norm += np.square(_gradient(image, axis=0))
    squared_norm /= 2
    return float(np.mean(np.sqrt(squared_norm, out=squared_norm)))


def _gradient(image: np.ndarray, axis: int) -> np.ndarray:
    """Central differences inside, one-sided differences on the two borders, along ``axis``."""
    moved = np.moveaxis(image, axis, -1)
    gradient = np.empty_like(moved)
    np.subtract(moved[..., 2:], moved[..., :-2], out=gradient[..., 1:-1])
    gradient[..., 1:-1] /= 2
    gradient[..., 0] = moved[..., 1] - moved[..., 0]
    gradient[..., -1] = moved[..., -1] - moved[..., -2]
    return np.moveaxis(gradient, -1, axis)
