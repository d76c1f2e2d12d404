"""Input checks and conversions shared by the fusion metrics."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["as_image", "as_image_triple", "as_same_shape_images", "to_uint8"]


def as_image(image: ArrayLike, name: str = "image") -> np.ndarray:
    """Return ``image`` as a finite 2-D float64 array, or raise ``ValueError`` naming ``name``."""
    array = np.asarray(image)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (H, W) array, got shape {array.shape}")
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"{name} must hold real numbers in 0..255, got dtype {array.dtype}")
    if np.iscomplexobj(array):
        raise ValueError(f"{name} must hold real numbers in 0..255, got dtype {array.dtype}")
    array = array.astype(np.float64, copy=False)
    # min and max propagate NaN and expose infinities without a full-size boolean mask.
    if array.size and not (np.isfinite(array.min()) and np.isfinite(array.max())):
        raise ValueError(f"{name} of shape {array.shape} contains NaN or infinite values")
    return array


def as_image_triple(
    fused: ArrayLike, a: ArrayLike, b: ArrayLike
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Check a fused image and its two sources: 2-D, finite and all of one shape."""
    fused_array, a_array, b_array = as_same_shape_images(
        {"fused image": fused, "source image a": a, "source image b": b}
    )
    return fused_array, a_array, b_array


def as_same_shape_images(images: dict[str, ArrayLike]) -> list[np.ndarray]:
    """Check named images (2-D, finite) and that they share one shape; return them as float64."""
    arrays = [as_image(image, name) for name, image in images.items()]
    if len({array.shape for array in arrays}) > 1:
        shapes = ", ".join(
            f"{name} {array.shape}" for name, array in zip(images, arrays, strict=True)
        )
        raise ValueError(f"images must have one shape, got {shapes}")
    return arrays


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Round (half to even) and clip to 0..255, then cast: a bare cast truncates and wraps."""
    levels = np.clip(image, 0, 255)
    np.rint(levels, out=levels)
    return levels.astype(np.uint8)
