"""Reading and writing images: the Y channel (BT.601) for fusion, chroma kept for colour output."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from tdfusion.errors import DataError
from tdfusion.files import atomic_path

__all__ = [
    "read_image",
    "read_luma",
    "read_luma_pair",
    "read_size",
    "rgb_to_ycrcb",
    "size_mismatch_message",
    "write_image",
    "ycrcb_to_rgb",
]

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
# Formats whose mode "I" images hold 16-bit samples (they store no 32-bit integers); a mode "I"
# image of another format (a 32-bit integer TIFF) holds 32-bit integers.
_SIXTEEN_BIT_FORMATS = ("PNG", "PPM")
# What Pillow's decoders raise for damaged files (truncated data, broken chunks and headers).
_DECODE_ERRORS = (
    OSError,
    UnidentifiedImageError,
    ValueError,
    SyntaxError,
    EOFError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
)


def read_image(path: str | os.PathLike[str], dtype: np.dtype | type = np.float32) -> np.ndarray:
    """Read an image file as float32 on the 0..255 scale: (H, W) grey or (H, W, 3) RGB.

    8-bit images keep their values; 16-bit images are scaled by ``255 / 65535``; an alpha
    channel is dropped; palette images are expanded; a colour image whose three planes are
    equal is returned as grey. 32-bit integer and float files are not scaled: their values are
    taken on the 0..255 scale and those outside [0, 255] are clipped. An EXIF orientation (as
    phones and cameras write) is applied, so the array is the image as viewers display it.

    Parameters
    ----------
    path : str or os.PathLike
        PNG, JPEG, BMP or TIFF file.
    dtype : numpy dtype
        Floating type of the result (float64 keeps 16-bit scaling exact).

    Returns
    -------
    numpy.ndarray
        ``dtype`` (float32 by default), (H, W) or (H, W, 3), values in [0, 255].

    Raises
    ------
    DataError
        If the file is missing, unreadable, not an image, empty, or holds NaN or infinite
        values (float TIFFs), or is a floating-point image whose values are all at most 1 (a
        [0, 1] image, which would read as near black); the message names the file.

    Example
    -------
    >>> import numpy as np
    >>> from PIL import Image
    >>> Image.fromarray(np.full((2, 3, 4), 200, dtype=np.uint8)).save("rgba.png")
    >>> read_image("rgba.png").shape  # alpha dropped, equal planes read as grey
    (2, 3)
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            floating = image.mode.startswith("F")
            array = _to_array(image)
    except FileNotFoundError:
        raise DataError(f"image {path} does not exist") from None
    except _DECODE_ERRORS as error:
        raise DataError(f"cannot read image {path}: {error}") from None
    if array.size == 0:
        raise DataError(f"image {path} is empty ({array.shape[1]}x{array.shape[0]} pixels)")
    finite = np.isfinite(array)
    if not finite.all():
        raise DataError(
            f"image {path} has {int(finite.size - finite.sum())} NaN or infinite pixel value(s); "
            "expected finite values (a float TIFF must hold numbers only)"
        )
    if (
        array.ndim == 3
        and np.array_equal(array[..., 0], array[..., 1])
        and np.array_equal(array[..., 1], array[..., 2])
    ):
        array = array[..., 0]
    array = np.ascontiguousarray(np.clip(array, 0.0, 255.0), dtype=dtype)
    if floating and float(array.max()) <= 1.0:
        # Almost surely a [0, 1] image: read on the 0..255 scale it would be fused or scored as
        # black, silently; nor is it rescaled, since a float image on the 0..255 scale that is
        # that dark cannot be told apart.
        raise DataError(
            f"image {path} is a floating-point image with values in [{float(array.min()):g}, "
            f"{float(array.max()):g}]; tdfusion reads float images on the 0..255 scale, so "
            "multiply it by 255 (or save it as an 8- or 16-bit image)"
        )
    return array


def read_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """The size of an image as :func:`read_image` reads it, from the file's header alone.

    Nothing is decoded: Pillow reads the header (format, mode, size and, for JPEG and TIFF,
    the EXIF orientation). A file whose header is sound but whose pixel data are damaged (a
    truncated JPEG) passes; :func:`read_image` refuses it when it reads it.

    Parameters
    ----------
    path : str or os.PathLike
        Image file.

    Returns
    -------
    (int, int)
        ``(width, height)`` as displayed (a quarter-turn EXIF orientation swaps them).

    Raises
    ------
    DataError
        If the file is missing, its header cannot be read, or the image is empty; the message
        names the file.

    Example
    -------
    >>> import numpy as np
    >>> from PIL import Image
    >>> Image.fromarray(np.zeros((2, 3), dtype=np.uint8)).save("small.png")
    >>> read_size("small.png")
    (3, 2)
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = _header_orientation(image)
    except FileNotFoundError:
        raise DataError(f"image {path} does not exist") from None
    except _DECODE_ERRORS as error:
        raise DataError(f"cannot read image {path}: {error}") from None
    if width == 0 or height == 0:
        raise DataError(f"image {path} is empty ({width}x{height} pixels)")
    return (height, width) if orientation in _QUARTER_TURNS else (width, height)


# EXIF orientations that turn the image by a quarter (as ImageOps.exif_transpose applies them).
_QUARTER_TURNS = (5, 6, 7, 8)


def _header_orientation(image: Image.Image) -> int:
    """The EXIF orientation of an opened image, from what its header holds (1: none)."""
    if image.format == "PNG" and "exif" not in image.info:
        # Pillow's PNG reader decodes the whole image to look for an eXIf chunk after the
        # pixels; writers put it before them, where the header read has found it already.
        return 1
    orientation = image.getexif().get(0x0112, 1)
    return orientation if isinstance(orientation, int) else 1


def size_mismatch_message(
    path_a: str | os.PathLike[str],
    size_a: tuple[int, int],
    path_b: str | os.PathLike[str],
    size_b: tuple[int, int],
) -> str:
    """The message for the two sources of a pair whose sizes differ.

    Parameters
    ----------
    path_a, path_b : str or os.PathLike
        The two files.
    size_a, size_b : (int, int)
        Their ``(width, height)``, as displayed.

    Returns
    -------
    str
        One line naming both files and their sizes.
    """
    return (
        f"size mismatch within a pair: {path_a} is {size_a[0]}x{size_a[1]} but {path_b} is "
        f"{size_b[0]}x{size_b[1]} (width x height, as displayed: EXIF orientation applied)"
    )


def _holds_sixteen_bit(image: Image.Image) -> bool:
    """Whether ``image`` holds 16-bit integer samples (to be scaled to 0..255)."""
    return image.mode in _SIXTEEN_BIT_MODES or (
        image.mode == "I" and image.format in _SIXTEEN_BIT_FORMATS
    )


def _displayed(image: Image.Image) -> Image.Image:
    """``image`` turned as its EXIF orientation tag says (as viewers show it); itself if none."""
    transposed = ImageOps.exif_transpose(image)
    return image if transposed is None else transposed


def _to_array(image: Image.Image) -> np.ndarray:
    """The pixels of a loaded image as displayed (EXIF orientation applied), float64 0..255."""
    sixteen_bit = _holds_sixteen_bit(image)  # before turning it: a turned copy has no format
    image = _displayed(image)
    if sixteen_bit:
        return np.asarray(image, dtype=np.float64) * (255.0 / 65535.0)
    if image.mode in ("F", "I"):  # 32-bit float or integer: on the 0..255 scale, clipped later
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

    Example
    -------
    >>> import numpy as np
    >>> rgb = np.array([10.0, 200.0, 30.0])
    >>> np.allclose(ycrcb_to_rgb(rgb_to_ycrcb(rgb)), rgb)
    True
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
        If the file cannot be read, or it is a floating-point image whose values are all at
        most 1 (a [0, 1] image, read as near black: see :func:`read_image`).

    Example
    -------
    >>> import numpy as np
    >>> from PIL import Image
    >>> Image.fromarray(np.full((2, 3, 3), (255, 0, 0), dtype=np.uint8)).save("red.png")
    >>> luma, chroma = read_luma("red.png")
    >>> round(float(luma[0, 0]) * 255, 3), chroma.shape
    (76.245, (2, 3, 2))
    """
    image = read_image(path)
    if image.ndim == 2:
        return image / np.float32(255.0), None
    ycrcb = rgb_to_ycrcb(image)
    return (ycrcb[..., 0] / 255.0).astype(np.float32), ycrcb[..., 1:]


def read_luma_pair(
    path_a: str | os.PathLike[str], path_b: str | os.PathLike[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Read two aligned sources with :func:`read_luma` and check that their sizes agree.

    Parameters
    ----------
    path_a, path_b : str or os.PathLike
        The first (infrared) and second (visible) source files.

    Returns
    -------
    tuple
        ``(luma_a, luma_b, chroma_a, chroma_b)`` as returned by :func:`read_luma`.

    Raises
    ------
    DataError
        If a file cannot be read, or the sizes differ (both files and their displayed sizes,
        after any EXIF orientation, are named).
    """
    luma_a, chroma_a = read_luma(path_a)
    luma_b, chroma_b = read_luma(path_b)
    if luma_a.shape != luma_b.shape:
        size_a, size_b = (luma_a.shape[1], luma_a.shape[0]), (luma_b.shape[1], luma_b.shape[0])
        raise DataError(size_mismatch_message(path_a, size_a, path_b, size_b))
    return luma_a, luma_b, chroma_a, chroma_b


def write_image(path: str | os.PathLike[str], image: np.ndarray) -> Path:
    """Write a ``uint8`` image (grey (H, W) or RGB (H, W, 3)) atomically.

    Float arrays are taken on the 0..255 scale and rounded and clipped (never wrapped).

    Parameters
    ----------
    path : str or os.PathLike
        Destination; the format follows the suffix (PNG recommended). Folders are created.
    image : numpy.ndarray
        (H, W), (H, W, 1) or (H, W, 3).

    Returns
    -------
    pathlib.Path
        The written file.

    Raises
    ------
    DataError
        For another shape, an unknown file suffix or a folder that cannot be written.

    Example
    -------
    >>> import numpy as np
    >>> write_image("out/grey.png", np.array([[-4.0, 127.6, 300.0]])).name
    'grey.png'
    """
    path = Path(path)
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        raise DataError(
            f"cannot write {path}: expected an (H, W) or (H, W, 3) image, got shape "
            f"{tuple(array.shape)}"
        )
    if array.dtype != np.uint8:
        array = np.clip(np.rint(array.astype(np.float64)), 0, 255).astype(np.uint8)
    try:
        with atomic_path(path) as temporary:
            Image.fromarray(array).save(temporary)
    except (OSError, ValueError, KeyError) as error:
        raise DataError(f"cannot write image {path}: {error}") from None
    return path
