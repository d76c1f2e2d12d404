"""Mutual information (MI) between the fused image and each source."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from tdfusion.metrics._arrays import as_image_triple, as_same_shape_images, to_uint8

__all__ = ["mutual_information", "mutual_information_pair"]

_LEVELS = 256


def mutual_information(fused: ArrayLike, a: ArrayLike, b: ArrayLike) -> float:
    """Mutual information (MI) of the fused image with both sources: ``MI(F, A) + MI(F, B)``.

    Each term is computed in nats from the joint histogram of the integer pixel values
    (the images are rounded and clipped to 0..255), the convention of the field's
    evaluation code (scikit-learn's ``mutual_info_score`` on integer images).

    Parameters
    ----------
    fused, a, b : array_like, shape (H, W)
        Fused image and the two source images in 0..255, any real dtype.

    Returns
    -------
    float
        The sum of the two mutual informations, in nats.

    Example
    -------
    >>> f = np.array([[0, 0], [9, 9]])
    >>> round(mutual_information(f, f, f), 6)  # 2 ln 2: each term is the entropy of F
    1.386294
    """
    fused_array, a_array, b_array = as_image_triple(fused, a, b)
    fused_levels = to_uint8(fused_array).ravel()
    return _mutual_information(fused_levels, to_uint8(a_array).ravel()) + _mutual_information(
        fused_levels, to_uint8(b_array).ravel()
    )


def mutual_information_pair(x: ArrayLike, y: ArrayLike) -> float:
    """Mutual information of two images of one shape, in nats.

    Parameters
    ----------
    x, y : array_like, shape (H, W)
        Images in 0..255, rounded and clipped to integers before counting.

    Returns
    -------
    float
        ``sum p(x, y) log(p(x, y) / (p(x) p(y)))`` over the non-empty bins of the
        256 x 256 joint histogram; 0 when either image is constant.

    Example
    -------
    >>> x = np.array([[0, 255]])
    >>> round(mutual_information_pair(x, x), 6) == round(float(np.log(2)), 6)
    True
    """
    x_array, y_array = as_same_shape_images({"x": x, "y": y})
    return _mutual_information(to_uint8(x_array).ravel(), to_uint8(y_array).ravel())


def _mutual_information(x_levels: np.ndarray, y_levels: np.ndarray) -> float:
    """MI in nats of two flat ``uint8`` level arrays, from the counts of their joint histogram.

    ``sum (n_xy / N) log(n_xy N / (n_x n_y))``: working with counts rather than probabilities
    keeps the marginals exact, so a constant image gives exactly 0 (each ratio is exactly 1).
    """
    codes = x_levels.astype(np.intp) * _LEVELS + y_levels
    joint = np.bincount(codes, minlength=_LEVELS * _LEVELS).reshape(_LEVELS, _LEVELS)
    x_counts = joint.sum(axis=1).astype(np.float64)
    y_counts = joint.sum(axis=0).astype(np.float64)
    rows, columns = np.nonzero(joint)
    counts = joint[rows, columns].astype(np.float64)
    total = float(codes.size)
    information = (
        np.sum(counts * np.log((counts * total) / (x_counts[rows] * y_counts[columns]))) / total
    )
    # Rounding can leave a tiny negative value for independent images; MI is never negative.
    return max(float(information), 0.0)
