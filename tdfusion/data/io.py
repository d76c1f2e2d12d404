"""Reading and writing images: the Y channel (BT.601) for fusion, chroma kept for colour output."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from tdfusion.errors import DataError

__all__ = ["read_image", "read_luma", "rgb_to_ycrcb", "write_image", "ycrcb_to_rgb"]

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image file as float32 on the 0..255 scale: (H, W) grey or (H, W, 3) RGB.

    8-bit images keep their values; 16-bit images are scaled by ``255 / 65535``; an alpha
    channel is dropped; palette images are expanded; a colour image whose three planes are
    equal is returned as grey.

    Parameters
    ----------
    path : str or os.PathLike
        PNG, JPEG, BMP or TIFF file.

    Returns
    -------
    numpy.ndarray
        float32, (H, W) or (H, W, 3), values in [0, 255].

    Raises
    ------
    DataError
        If the file is missing, unreadable or not an image (the message names it).
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            array = _to_array(image)
    except FileNotFoundError:
        raise DataError(f"image {path} does not exist") from None
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"cannot read image {path}: {error}") from None
    if (
        array.ndim == 3
        and np.array_equal(array[..., 0], array[..., 1])
        and np.array_equal(array[..., 1], array[..., 2])
    ):
        array = array[..., 0]
    return np.ascontiguousarray(array, dtype=np.float32)


def _to_array(image: Image.Image) -> np.ndarray:
    if image.mode in _SIXTEEN_BIT_MODES:
        return np.asarray(image, dtype=np.float64) * (255.0 / 65535.0)
    if image.mode == "F":
        return np.asarray(image, dtype=np.float64)
    if image.mode in ("L", "1", "LA", "La"):
        return np.asarray(image.convert("L"), dtype=np.float64)
    return np.asarray(image.convert("RGB"), dtype=np.float64)


def rgb_to_ycrcb(rgb: np.ndarray) -> np.ndarray:
    """Full-range BT.601 RGB -> YCrCb on the 0..255 scale (OpenCV's ``COLOR_RGB2YCrCb``).

    ``Y = 0.299 R + 0.587 G + 0.114 B``, ``Cr = 0.713 (R - Y) + 128``,
    ``Cb = 0.564 (B - Y) + 128``.

    Parameters
    ----------
    rgb : numpy.ndarray
        (..., 3) values in [0, 255].

    Returns
    -------
    numpy.ndarray
        (..., 3) float64: Y, Cr, Cb.

    Example
    -------
    >>> import numpy as np
    >>> rgb_to_ycrcb(np.array([255.0, 255.0, 255.0])).round(6).tolist()
    [255.0, 128.0, 128.0]
    """
    rgb = np.asarray(rgb, dtype=np.float64)
    luma = rgb @ np.array([0.299, 0.587, 0.114])
    red_difference = (rgb[..., 0] - luma) * 0.713 + 128.0
    blue_difference = (rgb[..., 2] - luma) * 0.564 + 128.0
    return np.stack([luma, red_difference, blue_difference], axis=-1)


def ycrcb_to_rgb(ycrcb: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_ycrcb` (float64, not clipped).

    Parameters
    ----------
    ycrcb : numpy.ndarray
        (..., 3) Y, Cr, Cb on the 0..255 scale.

    Returns
    -------
    numpy.ndarray
        (..., 3) float64 RGB.
    """
    ycrcb = np.asarray(ycrcb, dtype=np.float64)
    luma = ycrcb[..., 0]
    red = luma + (ycrcb[..., 1] - 128.0) / 0.713
    blue = luma + (ycrcb[..., 2] - 128.0) / 0.564
    green = (luma - 0.299 * red - 0.114 * blue) / 0.587
    return np.stack([red, green, blue], axis=-1)


def read_luma(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray | None]:
    """Read an image as its Y channel in [0, 1] and, for colour images, its chroma.

    Parameters
    ----------
    path : str or os.PathLike
        Image file (grey, grey stored as RGB, RGB, RGBA, palette; 8 or 16 bit).

    Returns
    -------
    luma : numpy.ndarray
        float32 (H, W) in [0, 1].
    chroma : numpy.ndarray or None
        float64 (H, W, 2) Cr, Cb on the 0..255 scale, or ``None`` for grey images.

    Raises
    ------
    DataError
        If the file cannot be read.
    """
    image = read_image(path)
    if image.ndim == 2:
        return image / np.float32(255.0), None
    ycrcb = rgb_to_ycrcb(image)
    return (ycrcb[..., 0] / 255.0).astype(np.float32), ycrcb[..., 1:]


def write_image(path: str | os.PathLike[str], image: np.ndarray) -> Path:
    """Write a ``uint8`` image (grey (H, W) or RGB (H, W, 3)) atomically.

    Float arrays are taken on the 0..255 scale and rounded and clipped (never wrapped).

    Parameters
    ----------
    path : str or os.PathLike
        Destination; the format follows the suffix (PNG recommended). Folders are created.
    image : numpy.ndarray
        (H, W) or (H, W, 3).

    Returns
    -------
    pathlib.Path
        The written file.
    """
    path = Path(path)
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = np.clip(np.rint(array.astype(np.float64)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(
        prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent
    )
    os.close(handle)
    try:
        Image.fromarray(array).save(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
