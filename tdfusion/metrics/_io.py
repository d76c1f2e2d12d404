"""Reading images as 0..255 luma arrays and pairing fused and source folders by file stem."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tdfusion.data.io import read_image
from tdfusion.files import IMAGE_SUFFIXES, list_images, pair_folders

__all__ = ["IMAGE_SUFFIXES", "list_images", "pair_by_stem", "read_luma"]

# ITU-R BT.601 luma weights for R, G, B (those of the YCrCb conversion the field uses).
_LUMA_WEIGHTS = (0.299, 0.587, 0.114)
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def read_luma(path: str | Path) -> np.ndarray:
    """Read an image file as its BT.601 luma (Y) channel on the 0..255 scale.

    Grey images stay grey, colour images give ``0.299 R + 0.587 G + 0.114 B`` (alpha is
    ignored), 16-bit images are scaled by ``255 / 65535``. Floating-point images (32-bit float
    TIFFs) are taken on the 0..255 scale as they are; one whose values are all at most 1 (a
    [0, 1] image, which would score as near black) is refused rather than guessed at. The
    result is rounded to integer levels, as the field's evaluation code reads images (OpenCV
    grey conversion, rounded).

    Parameters
    ----------
    path : str or pathlib.Path
        Image file (PNG, JPEG, BMP, TIFF).

    Returns
    -------
    numpy.ndarray, shape (H, W), dtype float64
        Integer-valued luma in 0..255.

    Raises
    ------
    DataError
        If the file cannot be opened or decoded as an image, or it is a floating-point image
        whose values are all at most 1 (the message says to multiply it by 255).
    """
    image = read_image(path, dtype=np.float64)
    if image.ndim == 3:
        red, green, blue = _LUMA_WEIGHTS
        image = red * image[..., 0] + green * image[..., 1] + blue * image[..., 2]
    return np.clip(np.rint(image), 0, 255)


def pair_by_stem(
    fused_folder: str | Path, ir_folder: str | Path, vis_folder: str | Path
) -> list[tuple[Path, Path, Path]]:
    """Pair each fused image with the infrared and visible images of the same file stem.

    Parameters
    ----------
    fused_folder, ir_folder, vis_folder : str or pathlib.Path
        Folders of fused, infrared and visible images.

    Returns
    -------
    list of (pathlib.Path, pathlib.Path, pathlib.Path)
        ``(fused, infrared, visible)`` files, sorted by stem.

    Raises
    ------
    DataError
        If a folder is missing or empty, or a name is not in all three folders (the message
        names the unpaired files).
    """
    pairs = pair_folders({"fused": fused_folder, "infrared": ir_folder, "visible": vis_folder})
    return [(files["fused"], files["infrared"], files["visible"]) for _, files in pairs]
