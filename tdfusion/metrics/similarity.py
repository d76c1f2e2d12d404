"""Metrics comparing the fused image with each source: SCD, SSIM and PSNR."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from skimage.metrics import structural_similarity

from tdfusion.metrics._arrays import as_image_triple, to_uint8

__all__ = ["psnr", "scd", "ssim"]

_PEAK = 255.0
_SSIM_HALF_WINDOW = 3  # scikit-image's default 7 x 7 window
_SSIM_STRIP_ROWS = 32


def scd(fused: ArrayLike, a: ArrayLike, b: ArrayLike) -> float:
    """Sum of the correlations of differences (SCD): ``corr(A, F - B) + corr(B, F - A)``.

    ``corr`` is Pearson's correlation coefficient over all pixels. It is undefined (NaN)
    when one of its two images is constant.

    Parameters
    ----------
    fused, a, b : array_like, shape (H, W)
        Fused image and the two source images in 0..255, any real dtype.

    Returns
    -------
    float
        SCD, between -2 and 2.

    Example
    -------
    >>> a = np.array([[0.0, 1.0], [2.0, 4.0]])
    >>> b = np.array([[3.0, 1.0], [0.0, 1.0]])
    >>> round(scd(a + b, a, b), 12)  # F - B = A and F - A = B: both correlations are 1
    2.0
    """
    return _scd(*as_image_triple(fused, a, b))


def ssim(fused: ArrayLike, a: ArrayLike, b: ArrayLike) -> float:
    """Structural similarity (SSIM), mean over the two sources.

    ``(SSIM(F, A) + SSIM(F, B)) / 2`` with :func:`skimage.metrics.structural_similarity` at its
    defaults (7 x 7 uniform window, K1 = 0.01, K2 = 0.03, sample covariance) on the images
    rounded and clipped to ``uint8``, with ``data_range=255``. Some papers report the sum
    of the two terms instead; this is half of that.

    Parameters
    ----------
    fused, a, b : array_like, shape (H, W)
        Fused image and the two source images in 0..255, any real dtype, at least 7 x 7.

    Returns
    -------
    float
        Mean SSIM, at most 1.

    Example
    -------
    >>> f = np.arange(64.0).reshape(8, 8)
    >>> ssim(f, f, f)
    1.0
    """
    return _ssim(*as_image_triple(fused, a, b))


def psnr(fused: ArrayLike, a: ArrayLike, b: ArrayLike) -> float:
    """Peak signal-to-noise ratio (PSNR) of the fused image against both sources, in dB.

    ``10 log10(255^2 / ((MSE(F, A) + MSE(F, B)) / 2))``: the peak is the fixed 8-bit
    range 255 (not the maximum of F), and the two mean squared errors are averaged.

    Parameters
    ----------
    fused, a, b : array_like, shape (H, W)
        Fused image and the two source images in 0..255, any real dtype.

    Returns
    -------
    float
        PSNR in dB; ``inf`` when F equals both sources.

    Example
    -------
    >>> f = np.zeros((4, 4))
    >>> round(psnr(f, f + 255, f + 255), 9)  # MSE = 255^2
    0.0
    """
    return _psnr(*as_image_triple(fused, a, b))


def _correlation(x: np.ndarray, y: np.ndarray) -> float:
    x_centred = x - x.mean()
    y_centred = y - y.mean()
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(
            np.sum(x_centred * y_centred) / np.sqrt(np.sum(x_centred**2) * np.sum(y_centred**2))
        )


def _scd(fused: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    return _correlation(a, fused - b) + _correlation(b, fused - a)


def _check_ssim_size(shape: tuple[int, ...]) -> None:
    if min(shape) < 7:
        raise ValueError(f"SSIM needs images of at least 7 x 7 pixels, got shape {shape}")


def _ssim(fused: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    return _ssim_of_levels(to_uint8(fused), to_uint8(a), to_uint8(b))


def _ssim_of_levels(fused: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of images already rounded and clipped to ``uint8``."""
    _check_ssim_size(fused.shape)
    return float(np.mean([_ssim_in_strips(fused, source) for source in (a, b)]))


def _ssim_in_strips(fused: np.ndarray, source: np.ndarray) -> float:
    """scikit-image's SSIM of one pair, computed strip by strip (faster: the maps stay in cache).

    ``structural_similarity`` averages its SSIM map without the outer ``_SSIM_HALF_WINDOW``
    pixels on each side. Called on a strip of rows with that many rows of context above and
    below, it averages exactly the strip's share of the whole-image map, so the row-weighted
    mean of the strips' results is the whole-image result.
    """
    height = fused.shape[0]
    context = _SSIM_HALF_WINDOW
    weighted_sum = 0.0
    for first_row in range(context, height - context, _SSIM_STRIP_ROWS):
        last_row = min(first_row + _SSIM_STRIP_ROWS, height - context)
        rows = slice(first_row - context, last_row + context)
        similarity = structural_similarity(fused[rows], source[rows], data_range=_PEAK)
        weighted_sum += similarity * (last_row - first_row)
    return weighted_sum / (height - 2 * context)


def _psnr(fused: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    mean_squared_error = (np.mean((fused - a) ** 2) + np.mean((fused - b) ** 2)) / 2
    if mean_squared_error == 0:
        return float("inf")
    return float(10 * np.log10(_PEAK**2 / mean_squared_error))
