"""All fusion metrics of one fused image at once, in the order the field reports them."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from tdfusion.metrics._arrays import as_image_triple, to_uint8
from tdfusion.metrics.edge_preservation import _qabf
from tdfusion.metrics.information import _mutual_information
from tdfusion.metrics.similarity import _psnr, _scd, _ssim_of_levels
from tdfusion.metrics.statistics import (
    _average_gradient,
    _entropy_of_levels,
    _spatial_frequency,
)
from tdfusion.metrics.visual_information import _vif_per_source

__all__ = ["CONVENTIONS", "METRIC_NAMES", "evaluate"]

#: The metric names, in the order :func:`evaluate` returns and tables report them.
METRIC_NAMES: tuple[str, ...] = (
    "EN",
    "SD",
    "SF",
    "AG",
    "MI",
    "SCD",
    "VIF",
    "Qabf",
    "SSIM",
    "PSNR",
)

#: One line stating the conventions behind the numbers, for table footnotes.
CONVENTIONS = (
    "EN: bits, 256-bin histogram of round(F); SD: population; "
    "MI: MI(F,A) + MI(F,B), nats, integer levels; SCD: corr(A,F-B) + corr(B,F-A); "
    "VIF (VIF-p), SSIM (scikit-image, uint8, data_range 255): mean over the two sources; "
    "Qabf: Xydeas-Petrovic, Sobel, arctan; PSNR: peak 255, mean of the two MSEs"
)


def evaluate(fused: ArrayLike, a: ArrayLike, b: ArrayLike) -> dict[str, float]:
    """Every fusion metric of a fused image and its two sources.

    Parameters
    ----------
    fused, a, b : array_like, shape (H, W)
        Fused image and the two source images (e.g. infrared and the visible Y channel)
        in 0..255, any real dtype, at least 41 x 41 (VIF's four scales need it).

    Returns
    -------
    dict of str to float
        The keys of :data:`METRIC_NAMES`, in that order:

        - ``EN``: :func:`~tdfusion.metrics.entropy`, bits.
        - ``SD``: :func:`~tdfusion.metrics.standard_deviation`, population.
        - ``SF``: :func:`~tdfusion.metrics.spatial_frequency`.
        - ``AG``: :func:`~tdfusion.metrics.average_gradient`.
        - ``MI``: :func:`~tdfusion.metrics.mutual_information`, sum over the sources, nats.
        - ``SCD``: :func:`~tdfusion.metrics.scd`.
        - ``VIF``: :func:`~tdfusion.metrics.vif`, mean over the sources.
        - ``Qabf``: :func:`~tdfusion.metrics.qabf`.
        - ``SSIM``: :func:`~tdfusion.metrics.ssim`, mean over the sources.
        - ``PSNR``: :func:`~tdfusion.metrics.psnr`, dB.

    Raises
    ------
    ValueError
        If the arrays are not 2-D, not finite, not of one shape, or smaller than 41 x 41.

    Example
    -------
    >>> rng = np.random.default_rng(0)
    >>> a, b = rng.uniform(0, 255, (2, 64, 64))
    >>> scores = evaluate((a + b) / 2, a, b)
    >>> list(scores) == list(METRIC_NAMES)
    True
    """
    fused_array, a_array, b_array = as_image_triple(fused, a, b)
    vif_per_source = _vif_per_source(np.stack([fused_array, a_array, b_array]))
    fused_levels, a_levels, b_levels = (
        to_uint8(image) for image in (fused_array, a_array, b_array)
    )
    scores = {
        "EN": _entropy_of_levels(fused_levels),
        "SD": float(np.std(fused_array)),
        "SF": _spatial_frequency(fused_array),
        "AG": _average_gradient(fused_array),
        "MI": _mutual_information(fused_levels.ravel(), a_levels.ravel())
        + _mutual_information(fused_levels.ravel(), b_levels.ravel()),
        "SCD": _scd(fused_array, a_array, b_array),
        "VIF": float(np.mean(vif_per_source)),
        "Qabf": _qabf(fused_array, a_array, b_array),
        "SSIM": _ssim_of_levels(fused_levels, a_levels, b_levels),
        "PSNR": _psnr(fused_array, a_array, b_array),
    }
    return {name: scores[name] for name in METRIC_NAMES}
