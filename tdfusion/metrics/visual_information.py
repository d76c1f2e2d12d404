"""Pixel-domain visual information fidelity (VIF-p) of the fused image against each source."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage

from tdfusion.metrics._arrays import as_image_triple, as_same_shape_images

__all__ = ["vif", "vif_pair"]

_SCALES = (1, 2, 3, 4)
_NOISE_VARIANCE = 2.0
_EPS = 1e-10
_STRIP_ROWS = 64  # output rows filtered at a time


def vif(fused: ArrayLike, a: ArrayLike, b: ArrayLike) -> float:
    """Visual information fidelity (VIF), mean over the two sources.

    ``(VIF(A, F) + VIF(B, F)) / 2`` with pixel-domain VIF (VIF-p, Sheikh & Bovik) as the
    field's evaluation code computes it: 4 scales; at scale ``s`` a normalised Gaussian
    window of size ``N = 2^(5 - s) + 1`` and sigma ``N / 5``; 'valid' filtering (no padding);
    before scales 2..4 both images are filtered with that scale's window and subsampled by 2;
    visual noise variance 2; local statistics guarded as in the reference (variances clipped
    at 0, ``eps = 1e-10``). Each term is ``sum(log10(1 + g^2 s_ref^2 / (s_v^2 + 2)))`` over
    ``sum(log10(1 + s_ref^2 / 2))``, summed over scales, and is defined as 1 when that ratio is
    0/0 (a constant source). Some papers report the sum of the two terms; this is half of it.

    Parameters
    ----------
    fused, a, b : array_like, shape (H, W)
        Fused image and the two source images in 0..255, any real dtype, at least 41 x 41.

    Returns
    -------
    float
        Mean VIF; 1 (to about 1e-11) for a fused image equal to both sources.

    Example
    -------
    >>> f = np.random.default_rng(0).uniform(0, 255, (64, 64))
    >>> round(vif(f, f, f), 6)
    1.0
    """
    fused_array, a_array, b_array = as_image_triple(fused, a, b)
    return float(np.mean(_vif_per_source(np.stack([fused_array, a_array, b_array]))))


def vif_pair(reference: ArrayLike, distorted: ArrayLike) -> float:
    """VIF-p of one image (``distorted``, e.g. the fused image) against one ``reference``.

    Parameters
    ----------
    reference, distorted : array_like, shape (H, W)
        The two images in 0..255, any real dtype, at least 41 x 41.

    Returns
    -------
    float
        VIF-p as in :func:`vif` (not symmetric in its arguments).

    Example
    -------
    >>> x = np.random.default_rng(0).uniform(0, 255, (64, 64))
    >>> round(vif_pair(x, x), 6)
    1.0
    """
    reference_array, distorted_array = as_same_shape_images(
        {"reference": reference, "distorted": distorted}
    )
    return float(_vif_per_source(np.stack([distorted_array, reference_array]))[0])


def _gaussian_window_1d(scale: int) -> np.ndarray:
    """One axis of the normalised Gaussian window of VIF-p's scale ``scale`` (1..4).

    The 2-D window is the outer product of this one with itself, which equals the
    reference's normalised ``exp(-(x^2 + y^2) / (2 sigma^2))`` window.
    """
    size = 2 ** (5 - scale) + 1
    sigma = size / 5.0
    offsets = np.arange(size) - (size - 1) / 2
    window = np.exp(-(offsets**2) / (2 * sigma**2))
    return window / window.sum()


def _check_size(shape: tuple[int, ...]) -> None:
    height, width = shape
    for scale in _SCALES:
        margin = 2 ** (5 - scale)  # window size - 1
        if scale > 1:
            height, width = (height - margin + 1) // 2, (width - margin + 1) // 2
        if min(height, width) - margin < 1:
            raise ValueError(f"VIF needs images of at least 41 x 41 pixels, got shape {shape}")


def _filter_strip(strip: np.ndarray, window: np.ndarray, step: int = 1) -> np.ndarray:
    """Separable 'valid' filtering of the last two axes, keeping every ``step``-th row and column.

    Meant for strips of a few dozen rows, which stay in cache between the two passes.
    """
    radius = (window.size - 1) // 2
    filtered = ndimage.correlate1d(strip, window, axis=-1)[..., radius:-radius:step]
    return ndimage.correlate1d(filtered, window, axis=-2)[..., radius:-radius:step, :]


def _smooth_and_subsample(stack: np.ndarray, window: np.ndarray) -> np.ndarray:
    """'Valid' filtering of the last two axes followed by taking every other row and column."""
    margin = window.size - 1
    rows = stack.shape[-2] - margin
    columns = stack.shape[-1] - margin
    out = np.empty((*stack.shape[:-2], (rows + 1) // 2, (columns + 1) // 2))
    # Strips start on even output rows, so each keeps the rows the whole image would.
    for first_row in range(0, rows, _STRIP_ROWS):
        last_row = min(first_row + _STRIP_ROWS, rows)
        strip = stack[..., first_row : last_row + margin, :]
        out[..., first_row // 2 : (last_row + 1) // 2, :] = _filter_strip(strip, window, step=2)
    return out


def _vif_per_source(images: np.ndarray) -> np.ndarray:
    """VIF-p of ``images[0]`` (fused) against each of ``images[1:]`` (sources).

    ``images`` has shape (1 + S, H, W); the result has shape (S,).
    """
    _check_size(images.shape[1:])
    count = images.shape[0] - 1
    numerator = np.zeros(count)
    denominator = np.zeros(count)
    for scale in _SCALES:
        window = _gaussian_window_1d(scale)
        if scale > 1:
            images = _smooth_and_subsample(images, window)
        fused, sources = images[0], images[1:]
        for first_row in range(0, fused.shape[0] - window.size + 1, _STRIP_ROWS):
            rows = slice(first_row, first_row + _STRIP_ROWS + window.size - 1)
            strip_numerator, strip_denominator = _strip_information(
                fused[rows], sources[:, rows], window
            )
            numerator += strip_numerator
            denominator += strip_denominator
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = numerator / denominator
    return np.where(np.isnan(ratio), 1.0, ratio)


def _strip_information(
    fused: np.ndarray, sources: np.ndarray, window: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The information sums of one strip of rows (its 'valid' output rows only).

    Working strip by strip keeps the filtered maps in cache, which is faster than filtering
    whole images.
    """
    count = sources.shape[0]
    stack = np.empty((3 * count + 2, *fused.shape))
    stack[:count] = sources
    stack[count] = fused
    np.square(sources, out=stack[count + 1 : 2 * count + 1])
    np.square(fused, out=stack[2 * count + 1])
    np.multiply(sources, fused, out=stack[2 * count + 2 :])
    moments = _filter_strip(stack, window)
    mean_source = moments[:count]
    mean_fused = moments[count]
    variance_source = moments[count + 1 : 2 * count + 1]
    variance_source -= mean_source**2
    np.maximum(variance_source, 0.0, out=variance_source)
    variance_fused = moments[2 * count + 1]
    variance_fused -= mean_fused**2
    np.maximum(variance_fused, 0.0, out=variance_fused)
    covariance = moments[2 * count + 2 :]
    covariance -= mean_source * mean_fused
    return _information_terms(variance_source, variance_fused, covariance)


def _information_terms(
    variance_source: np.ndarray, variance_fused: np.ndarray, covariance: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per-source sums of the information the fused image keeps and the source carries.

    ``variance_source`` and ``covariance`` have shape (S, h, w), ``variance_fused`` (h, w),
    the variances already clipped at 0. The reference evaluator's guards (zero gain where
    either variance is below ``eps`` or the gain is negative, source variance zeroed where it
    is below ``eps``, noise variance at least ``eps``) reduce to: a pixel keeps information
    only where both variances are at least ``eps`` and the gain is positive, and there the
    noise variance is ``max(var_F - gain * cov, eps)``; the source carries information only
    where its variance is at least ``eps``.
    """
    gain = covariance / (variance_source + _EPS)
    noise_variance = variance_fused - gain * covariance
    np.maximum(noise_variance, _EPS, out=noise_variance)
    noise_variance += _NOISE_VARIANCE
    kept_map = np.square(gain)
    kept_map *= variance_source
    kept_map /= noise_variance
    kept_map += 1
    np.log10(kept_map, out=kept_map)
    informative_source = variance_source >= _EPS
    informative = informative_source & (variance_fused >= _EPS) & (gain > 0)
    axes = (-2, -1)
    kept = np.sum(kept_map, axis=axes, where=informative)
    carried_map = variance_source / _NOISE_VARIANCE
    carried_map += 1
    np.log10(carried_map, out=carried_map)
    carried = np.sum(carried_map, axis=axes, where=informative_source)
    return kept, carried
