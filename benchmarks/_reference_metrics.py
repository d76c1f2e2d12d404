"""Straightforward port of the field's reference fusion-metric evaluator: the benchmark baseline.

It follows the reference evaluator's computations step by step (direct 2-D convolutions with
``scipy.signal.convolve2d``, a fresh Gaussian window per VIF scale, boolean-mask updates,
mutual information from a contingency table of the distinct pixel values), with the
conventions of :func:`tdfusion.metrics.evaluate` (VIF and SSIM averaged over the sources,
PSNR with peak 255, rounding and clipping before any cast to 8 bits). It exists to time
:mod:`tdfusion.metrics` against and to cross-check it in the tests; use
:func:`tdfusion.metrics.evaluate` instead.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.signal import convolve2d
from skimage.metrics import structural_similarity

__all__ = ["reference_evaluate"]


def _entropy(image: np.ndarray) -> float:
    levels = np.clip(np.round(image), 0, 255).astype(np.uint8).flatten()
    histogram = np.bincount(levels) / levels.shape[0]
    return float(-np.sum(histogram * np.log2(histogram + (histogram == 0))))


def _standard_deviation(image: np.ndarray) -> float:
    return float(np.std(image))


def _spatial_frequency(image: np.ndarray) -> float:
    horizontal = np.mean((image[:, 1:] - image[:, :-1]) ** 2)
    vertical = np.mean((image[1:, :] - image[:-1, :]) ** 2)
    return float(np.sqrt(horizontal + vertical))


def _average_gradient(image: np.ndarray) -> float:
    gradient_x = np.zeros_like(image)
    gradient_y = np.zeros_like(image)
    gradient_x[:, 0] = image[:, 1] - image[:, 0]
    gradient_x[:, -1] = image[:, -1] - image[:, -2]
    gradient_x[:, 1:-1] = (image[:, 2:] - image[:, :-2]) / 2
    gradient_y[0, :] = image[1, :] - image[0, :]
    gradient_y[-1, :] = image[-1, :] - image[-2, :]
    gradient_y[1:-1, :] = (image[2:, :] - image[:-2, :]) / 2
    return float(np.mean(np.sqrt((gradient_x**2 + gradient_y**2) / 2)))


def _mutual_information_pair(x: np.ndarray, y: np.ndarray) -> float:
    """MI in nats from the contingency table of the distinct values (the reference's route)."""
    x_values, x_labels = np.unique(x.flatten(), return_inverse=True)
    y_values, y_labels = np.unique(y.flatten(), return_inverse=True)
    if x_values.size == 1 or y_values.size == 1:
        return 0.0
    table = np.zeros((x_values.size, y_values.size))
    np.add.at(table, (x_labels, y_labels), 1)
    total = table.sum()
    rows, columns = np.nonzero(table)
    counts = table[rows, columns]
    row_totals = table.sum(axis=1)
    column_totals = table.sum(axis=0)
    outer = row_totals[rows] * column_totals[columns]
    terms = counts / total * (np.log(counts) - math.log(total))
    terms += (
        counts
        / total
        * (-np.log(outer) + math.log(row_totals.sum()) + math.log(column_totals.sum()))
    )
    return max(float(terms.sum()), 0.0)


def _mutual_information(fused: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    def levels(image: np.ndarray) -> np.ndarray:
        return np.clip(np.round(image), 0, 255)

    return _mutual_information_pair(levels(fused), levels(a)) + _mutual_information_pair(
        levels(fused), levels(b)
    )


def _correlation(x: np.ndarray, y: np.ndarray) -> float:
    x_centred = x - np.mean(x)
    y_centred = y - np.mean(y)
    return float(
        np.sum(x_centred * y_centred) / np.sqrt(np.sum(x_centred**2) * np.sum(y_centred**2))
    )


def _scd(fused: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    return _correlation(a, fused - b) + _correlation(b, fused - a)


def _gaussian_window(size: int, sigma: float) -> np.ndarray:
    half = (size - 1) / 2
    y, x = np.ogrid[-half : half + 1, -half : half + 1]
    window = np.exp(-(x * x + y * y) / (2 * sigma * sigma))
    window[window < np.finfo(window.dtype).eps * window.max()] = 0
    return window / window.sum()


def _vif_pair(reference: np.ndarray, distorted: np.ndarray) -> float:
    noise_variance = 2.0
    eps = 1e-10
    numerator = 0.0
    denominator = 0.0
    for scale in range(1, 5):
        size = 2 ** (5 - scale) + 1
        window = np.rot90(_gaussian_window(size, size / 5.0), 2)
        if scale > 1:
            reference = convolve2d(reference, window, mode="valid")[::2, ::2]
            distorted = convolve2d(distorted, window, mode="valid")[::2, ::2]
        mean_reference = convolve2d(reference, window, mode="valid")
        mean_distorted = convolve2d(distorted, window, mode="valid")
        variance_reference = (
            convolve2d(reference * reference, window, mode="valid") - mean_reference**2
        )
        variance_distorted = (
            convolve2d(distorted * distorted, window, mode="valid") - mean_distorted**2
        )
        covariance = (
            convolve2d(reference * distorted, window, mode="valid")
            - mean_reference * mean_distorted
        )
        variance_reference[variance_reference < 0] = 0
        variance_distorted[variance_distorted < 0] = 0

        gain = covariance / (variance_reference + eps)
        residual = variance_distorted - gain * covariance
        flat = variance_reference < eps
        gain[flat] = 0
        residual[flat] = variance_distorted[flat]
        variance_reference[flat] = 0
        flat = variance_distorted < eps
        gain[flat] = 0
        residual[flat] = 0
        negative = gain < 0
        residual[negative] = variance_distorted[negative]
        gain[negative] = 0
        residual[residual <= eps] = eps

        numerator += np.sum(
            np.log10(1 + gain * gain * variance_reference / (residual + noise_variance))
        )
        denominator += np.sum(np.log10(1 + variance_reference / noise_variance))
    ratio = numerator / denominator
    return 1.0 if np.isnan(ratio) else float(ratio)


def _sobel(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    kernel_y = np.array([[1, 2, 1], [0, 0, 0], [-1, -2, -1]], dtype=np.float64)
    kernel_x = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float64)
    response_x = convolve2d(image, kernel_x, mode="same")
    response_y = convolve2d(image, kernel_y, mode="same")
    strength = np.sqrt(response_x * response_x + response_y * response_y)
    orientation = np.zeros_like(image)
    vertical = response_x == 0
    orientation[vertical] = math.pi / 2
    orientation[~vertical] = np.arctan(response_y[~vertical] / response_x[~vertical])
    return strength, orientation


def _edge_preservation(
    orientation_source: np.ndarray,
    strength_source: np.ndarray,
    orientation_fused: np.ndarray,
    strength_fused: np.ndarray,
) -> np.ndarray:
    relative_strength = np.zeros_like(orientation_source)
    larger = strength_source > strength_fused
    relative_strength[larger] = strength_fused[larger] / strength_source[larger]
    equal = strength_source == strength_fused
    relative_strength[equal] = strength_fused[equal]
    smaller = strength_source < strength_fused
    relative_strength[smaller] = strength_source[smaller] / strength_fused[smaller]
    relative_orientation = 1 - np.abs(orientation_source - orientation_fused) / (math.pi / 2)
    strength_term = 0.9994 / (1 + np.exp(-15 * (relative_strength - 0.5)))
    orientation_term = 0.9879 / (1 + np.exp(-22 * (relative_orientation - 0.8)))
    return strength_term * orientation_term


def _qabf(fused: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    strength_a, orientation_a = _sobel(a)
    strength_b, orientation_b = _sobel(b)
    strength_f, orientation_f = _sobel(fused)
    preservation_a = _edge_preservation(orientation_a, strength_a, orientation_f, strength_f)
    preservation_b = _edge_preservation(orientation_b, strength_b, orientation_f, strength_f)
    weighted = np.sum(preservation_a * strength_a + preservation_b * strength_b)
    return float(weighted / np.sum(strength_a + strength_b))


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def _ssim(fused: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    fused_uint8 = _to_uint8(fused)
    return float(
        (
            structural_similarity(fused_uint8, _to_uint8(a), data_range=255)
            + structural_similarity(fused_uint8, _to_uint8(b), data_range=255)
        )
        / 2
    )


def _psnr(fused: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    mean_squared_error = (np.mean((a - fused) ** 2) + np.mean((b - fused) ** 2)) / 2
    return float(10 * np.log10(255.0**2 / mean_squared_error))


def reference_evaluate(fused: np.ndarray, a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """All ten metrics, computed the reference evaluator's way (slow; for comparison only).

    Parameters
    ----------
    fused, a, b : numpy.ndarray, shape (H, W)
        Fused image and sources in 0..255.

    Returns
    -------
    dict of str to float
        The keys and conventions of :func:`tdfusion.metrics.evaluate`.
    """
    fused, a, b = (np.asarray(image, dtype=np.float64) for image in (fused, a, b))
    return {
        "EN": _entropy(fused),
        "SD": _standard_deviation(fused),
        "SF": _spatial_frequency(fused),
        "AG": _average_gradient(fused),
        "MI": _mutual_information(fused, a, b),
        "SCD": _scd(fused, a, b),
        "VIF": (_vif_pair(a, fused) + _vif_pair(b, fused)) / 2,
        "Qabf": _qabf(fused, a, b),
        "SSIM": _ssim(fused, a, b),
        "PSNR": _psnr(fused, a, b),
    }
