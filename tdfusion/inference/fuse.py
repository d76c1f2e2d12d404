"""Fusing image pairs with a trained network: tensors and files (folders: :mod:`.folders`)."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from tdfusion.data.io import read_luma_pair
from tdfusion.devices import check_device, images_for, resolve_device
from tdfusion.inference.acceleration import Precision, accelerate
from tdfusion.inference.colour import merge_chroma
from tdfusion.inference.tiling import balanced_tile, check_tile_options, fuse_in_tiles

__all__ = [
    "fuse_files",
    "fuse_tensors",
    "load_fusion_model",
    "min_max_stretch",
]

#: Images with more pixels than this are fused in tiles unless told otherwise (about the memory
#: of a 2048x2048 image through the default network on the CPU).
DEFAULT_MAX_PIXELS = 2048 * 2048
DEFAULT_TILE = 512
#: How far above 1 a float input may reach (rounding) before it is taken for the 0..255 scale.
INPUT_TOLERANCE = 1e-3


def load_fusion_model(
    weights: str | os.PathLike[str] | None = None,
    device: str | torch.device | None = None,
    *,
    precision: Precision = "fp32",
    channels_last: bool = False,
    compile: bool = False,
) -> nn.Module:
    """Load a :class:`~tdfusion.nets.ReFusionNet` for inference (eval mode, on ``device``).

    Parameters
    ----------
    weights : str or os.PathLike, optional
        The name of bundled weights (:func:`~tdfusion.nets.list_pretrained`), our
        ``save_pretrained`` file, a trainer checkpoint, or the authors' ReFusion/TDFusion
        ``.pth`` file. Default: the bundled ``"tdfusion-ivif"`` infrared-visible weights.
    device : str or torch.device, optional
        Defaults to CUDA when available, else the CPU; a device this machine lacks is refused
        (see :func:`~tdfusion.devices.check_device`).
    precision, channels_last, compile
        Inference options (see :func:`~tdfusion.inference.accelerate`); with other values than
        the defaults (``"fp32"``, ``False``, ``False``) the network comes wrapped in an
        :class:`~tdfusion.inference.AcceleratedFusion`.

    Returns
    -------
    torch.nn.Module
        The network, or the network wrapped with the options.

    Raises
    ------
    ValueError
        For an unknown ``precision``, or an unknown device or one this machine does not have
        (``"gpu"``, ``"cuda"`` without CUDA), in one line.

    Example
    -------
    >>> load_fusion_model(device="cpu", precision="bf16").precision
    'bf16'
    """
    from tdfusion.nets import DEFAULT_FUSION_WEIGHTS, ReFusionNet

    target = resolve_device(None) if device is None else check_device(device)
    if weights is None:
        weights = DEFAULT_FUSION_WEIGHTS
    network = ReFusionNet.from_pretrained(weights).to(target).eval()
    return _with_options(network, precision, channels_last, compile)


def _with_options(
    model: nn.Module, precision: Precision, channels_last: bool, compile: bool
) -> nn.Module:
    """``model`` itself when the options are the defaults, else :func:`accelerate` of it."""
    if precision == "fp32" and not channels_last and not compile:
        return model
    return accelerate(model, precision=precision, channels_last=channels_last, compile=compile)


def _is_out_of_memory(error: RuntimeError) -> bool:
    message = str(error).lower()
    return "out of memory" in message or "can't allocate memory" in message


def _warn_automatic_tiles(size: tuple[int, ...], tile: tuple[int, ...], max_pixels: int) -> None:
    """Say that an image (``size``, height and width) is fused in tiles of ``tile`` because it
    has more than ``max_pixels`` pixels; Python's warning filter shows it once per message."""
    warnings.warn(
        f"fusing a {size[1]}x{size[0]} image (more than {max_pixels} pixels) in tiles of "
        f"{tile[1]}x{tile[0]}; each tile is fused with its own statistics, so the output "
        "differs from the whole image's (choose the tile size with tile= or --tile)",
        UserWarning,
        stacklevel=3,  # the caller of fuse_tensors
    )


def fuse_tensors(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    tile: int | None = None,
    overlap: int = 32,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> torch.Tensor:
    """Fuse under :func:`torch.inference_mode`, in overlapping tiles when asked or needed.

    Tiled outputs differ from the untiled forward pass: the network's channel attention takes
    its statistics over the image it is given, so each tile is fused with its own. With the
    bundled weights on a 1280x1024 LLVIP pair, tiles of 512 (overlap 32) moved the fused image
    by up to 16 grey levels of 255, 5.3 on average (measured). Images of more than
    ``max_pixels`` pixels are tiled automatically, with a warning naming the size and the tile
    (once per size and tile).

    Parameters
    ----------
    model : callable
        ``model(a, b) -> fused``.
    a, b : torch.Tensor
        Sources (N, 1, H, W) in [0, 1] on the model's device; floating-point sources above
        ``1 + 1e-3`` (images on the 0..255 scale) are refused.
    tile : int, optional
        Tile size (at least twice ``overlap``); ``None`` fuses the whole image, unless it has
        more than ``max_pixels`` pixels (then as few tiles as the largest square tiles within
        that budget need, each made just large enough to cover the image; see
        :func:`~tdfusion.inference.tiling.balanced_tile`) or memory runs out (then tiles of
        512).
    overlap : int
        Overlap of neighbouring tiles (at least 0; blended with a raised-cosine ramp).
    max_pixels : int, optional
        Pixel count above which tiling is automatic; ``None`` never tiles on size alone.

    Returns
    -------
    torch.Tensor
        Fused images (N, 1, H, W).

    Raises
    ------
    ValueError
        If ``tile`` is below 1 or below twice ``overlap``, ``overlap`` is negative (the checks
        of ``tdfusion fuse --tile/--overlap``), or a floating-point source exceeds 1 (its
        maximum is named).
    """
    check_tile_options(tile, overlap)
    for role, source in (("first", a), ("second", b)):
        if source.is_floating_point() and source.numel():
            highest = float(source.detach().amax())
            if highest > 1.0 + INPUT_TOLERANCE:
                raise ValueError(
                    f"the {role} source has values up to {highest:g}; inputs must be in [0, 1] "
                    "(divide images on the 0..255 scale by 255)"
                )
    with torch.inference_mode():
        too_large = max_pixels is not None and a.shape[-2] * a.shape[-1] > max_pixels
        if tile is None and too_large:
            side = max(64, math.isqrt(max_pixels))  # the largest square tile within budget
            # as few tiles as squares of that side need, each just large enough to cover the
            # image (keeping the overlap): not four 2048^2 tiles for a 2049x2049 image
            sizes = tuple(balanced_tile(length, side, overlap) for length in a.shape[-2:])
            if sizes != tuple(a.shape[-2:]):  # one tile of the whole image changes nothing
                _warn_automatic_tiles(a.shape[-2:], sizes, max_pixels)
            return fuse_in_tiles(model, a, b, sizes, overlap)
        if tile is None:
            try:
                return model(a, b)
            except (RuntimeError, torch.OutOfMemoryError) as error:
                if not _is_out_of_memory(error):
                    raise
                if a.is_cuda:
                    torch.cuda.empty_cache()
                warnings.warn(
                    f"not enough memory to fuse {a.shape[-2]}x{a.shape[-1]} at once; "
                    f"fusing in {DEFAULT_TILE}x{DEFAULT_TILE} tiles",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return fuse_in_tiles(model, a, b, DEFAULT_TILE if tile is None else tile, overlap)


def min_max_stretch(image: np.ndarray) -> np.ndarray:
    """Stretch to the full [0, 1] range: ``(x - min) / (max - min)`` (constant images stay).

    This is what the research code does to every output. It inflates contrast-driven metrics
    (EN, SD, SF, AG), which is why tdfusion only applies it when asked (``--stretch``).

    Parameters
    ----------
    image : numpy.ndarray
        Values in [0, 1].

    Returns
    -------
    numpy.ndarray
        The stretched image.
    """
    low, high = float(image.min()), float(image.max())
    if high <= low:
        return image
    return (image - low) / (high - low)


def _fuse_lumas(
    model: nn.Module,
    pairs: list[tuple[np.ndarray, np.ndarray]],
    *,
    tile: int | None,
    overlap: int,
) -> list[np.ndarray]:
    """Fuse same-sized luma pairs in one batch; returns fused lumas in [0, 1] (float64)."""
    a = images_for(model, [pair[0] for pair in pairs])
    b = images_for(model, [pair[1] for pair in pairs])
    fused = fuse_tensors(model, a, b, tile=tile, overlap=overlap)
    return [f.float().cpu().numpy().astype(np.float64) for f in fused[:, 0]]


def fuse_files(
    model: nn.Module,
    ir_path: str | os.PathLike[str],
    vis_path: str | os.PathLike[str],
    *,
    tile: int | None = None,
    overlap: int = 32,
    stretch: bool = False,
    precision: Precision = "fp32",
    channels_last: bool = False,
) -> np.ndarray:
    """Fuse one pair of image files into a displayable image.

    The network fuses the Y channels (BT.601); colour comes back from the colour source, or
    from both blended when both have colour (:func:`~tdfusion.inference.colour.merge_chroma`).

    Parameters
    ----------
    model : torch.nn.Module
        The fusion network (its device and dtype are used).
    ir_path, vis_path : str or os.PathLike
        The two sources (any size, 8/16-bit, grey/RGB/RGBA).
    tile, overlap
        See :func:`fuse_tensors`.
    stretch : bool
        Min-max stretch the fused Y channel (see :func:`min_max_stretch`).
    precision, channels_last
        Inference options (see :func:`~tdfusion.inference.accelerate`). To compile the network,
        wrap it once with ``accelerate(model, compile=True)`` and pass that: a compilation
        pays off over many pairs, not one.

    Returns
    -------
    numpy.ndarray
        ``uint8`` (H, W, 3) RGB, or (H, W) grey when both sources are grey.

    Raises
    ------
    DataError
        If a file cannot be read or the two sizes differ.
    ValueError
        For an unknown ``precision``.
    """
    model = _with_options(model, precision, channels_last, compile=False)
    luma_a, luma_b, chroma_a, chroma_b = read_luma_pair(ir_path, vis_path)
    (fused_y,) = _fuse_lumas(model, [(luma_a, luma_b)], tile=tile, overlap=overlap)
    if stretch:
        fused_y = min_max_stretch(fused_y)
    return merge_chroma(fused_y * 255.0, chroma_a, chroma_b)
