"""Putting colour back: the fused Y channel with the chroma of the colour source(s)."""

from __future__ import annotations

import numpy as np

from tdfusion.data.io import ycrcb_to_rgb

__all__ = ["blend_chroma", "merge_chroma", "to_uint8"]

#: Neutral chroma on the 0..255 scale (Cr = Cb = 128 means no colour).
NEUTRAL_CHROMA = 128.0


def blend_chroma(chroma_a: np.ndarray, chroma_b: np.ndarray) -> np.ndarray:
    """Blend two chroma planes, each pixel weighted by its distance from neutral.

    ``C = (C_a |C_a - 128| + C_b |C_b - 128|) / (|C_a - 128| + |C_b - 128|)``, and neutral
    where both are neutral; the more saturated source dominates, grey does not wash colour out.

    Parameters
    ----------
    chroma_a, chroma_b : numpy.ndarray
        (H, W, 2) Cr, Cb planes on the 0..255 scale.

    Returns
    -------
    numpy.ndarray
        (H, W, 2) float64.

    Example
    -------
    >>> import numpy as np
    >>> blend_chroma(np.full((1, 1, 2), 128.0), np.full((1, 1, 2), 200.0))[0, 0].tolist()
    [200.0, 200.0]
    """
    distance_a = np.abs(chroma_a - NEUTRAL_CHROMA)
    distance_b = np.abs(chroma_b - NEUTRAL_CHROMA)
    total = distance_a + distance_b
    blended = np.where(
        total > 0,
        (chroma_a * distance_a + chroma_b * distance_b) / np.where(total > 0, total, 1.0),
        NEUTRAL_CHROMA,
    )
    return blended


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Round and clip to 0..255 (never ``astype``'s wrap-around truncation).

    Parameters
    ----------
    image : numpy.ndarray
        Values on the 0..255 scale.

    Returns
    -------
    numpy.ndarray
        ``uint8`` array of the same shape.
    """
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def merge_chroma(
    fused_y: np.ndarray, chroma_a: np.ndarray | None, chroma_b: np.ndarray | None
) -> np.ndarray:
    """The fused image in colour: Y from the fusion, Cr/Cb from the colour source(s).

    Parameters
    ----------
    fused_y : numpy.ndarray
        (H, W) fused luma on the 0..255 scale.
    chroma_a, chroma_b : numpy.ndarray or None
        (H, W, 2) chroma of each source, ``None`` for a grey source.

    Returns
    -------
    numpy.ndarray
        ``uint8`` (H, W, 3) RGB when a source has colour, else ``uint8`` (H, W) grey.
    """
    if chroma_a is None and chroma_b is None:
        return to_uint8(fused_y)
    if chroma_a is None:
        chroma = chroma_b
    elif chroma_b is None:
        chroma = chroma_a
    else:
        chroma = blend_chroma(chroma_a, chroma_b)
    ycrcb = np.concatenate([fused_y[..., None], chroma], axis=-1)
    return to_uint8(ycrcb_to_rgb(ycrcb))
