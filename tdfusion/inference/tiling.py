"""Fusing large images in overlapping tiles blended with smooth weights, so that no seam shows."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = ["balanced_tile", "blend_window", "check_tile_options", "fuse_in_tiles", "tile_starts"]


def check_tile_options(
    tile: int | None, overlap: int, *, names: tuple[str, str] = ("tile", "overlap")
) -> None:
    """Check a tile size and overlap as ``tdfusion fuse`` and the inference API take them.

    A tile must be at least twice the overlap: with less, neighbouring tiles advance by
    ``tile - overlap`` pixels only (by one pixel for a tile of 32 and the default overlap of
    32), thousands of forward passes for one image.

    Parameters
    ----------
    tile : int, optional
        Tile size (at least 1), or ``None`` (no tiling asked for).
    overlap : int
        Overlap of neighbouring tiles (at least 0).
    names : (str, str)
        How the message calls the two (``("--tile", "--overlap")`` on the command line).

    Raises
    ------
    ValueError
        In one line, naming the values and what to change.

    Example
    -------
    >>> check_tile_options(512, 32)
    >>> check_tile_options(32, 32)
    Traceback (most recent call last):
    ...
    ValueError: tile 32 must be at least twice overlap 32 (tiles would advance by 0 pixel(s)); ...
    """
    tile_name, overlap_name = names
    if overlap < 0:
        raise ValueError(f"{overlap_name} must be at least 0, got {overlap}")
    if tile is None:
        return
    if tile < 1:
        raise ValueError(f"{tile_name} must be a positive integer, got {tile}")
    if tile < 2 * overlap:
        raise ValueError(
            f"{tile_name} {tile} must be at least twice {overlap_name} {overlap} (tiles would "
            f"advance by {max(tile - overlap, 0)} pixel(s)); use a larger {tile_name} or a "
            f"smaller {overlap_name}"
        )


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``length`` with at least ``overlap``.

    The last tile is aligned to the end, so every tile lies inside the image.

    Parameters
    ----------
    length : int
        Image size along one axis.
    tile : int
        Tile size along that axis.
    overlap : int
        Minimum overlap between neighbouring tiles, ``0 <= overlap < tile``.

    Returns
    -------
    list of int
        Sorted, distinct start offsets.

    Example
    -------
    >>> tile_starts(100, 40, 8)
    [0, 32, 60]
    """
    if tile >= length:
        return [0]
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile), got overlap {overlap} for tile {tile}")
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return sorted(set(starts))


def balanced_tile(length: int, tile: int, overlap: int) -> int:
    """The smallest tile size that covers ``length`` with as few tiles as tiles of ``tile`` do.

    Tiles of ``tile`` pixels overlapping by ``overlap`` need
    ``n = ceil((length - overlap) / (tile - overlap))`` tiles to cover ``length``; the result
    is the smallest size with which ``n`` tiles (keeping the overlap) still cover it, so that
    little more than the image is computed: a side of 2049 with tiles of at most 2048 takes
    two tiles of 1041, not two of 2048.

    Parameters
    ----------
    length : int
        Image size along one axis.
    tile : int
        Largest tile size allowed along that axis.
    overlap : int
        Overlap of neighbouring tiles (taken as at most ``tile - 1``).

    Returns
    -------
    int
        A tile size, at most ``tile`` (``length`` itself when one tile is enough).

    Example
    -------
    >>> balanced_tile(2049, 2048, 32), balanced_tile(1000, 2048, 32)
    (1041, 1000)
    """
    if tile <= 0:
        raise ValueError(f"tile must be positive, got {tile}")
    if length <= tile:
        return length
    overlap = max(0, min(overlap, tile - 1))
    count = math.ceil((length - overlap) / (tile - overlap))
    return math.ceil((length - overlap) / count) + overlap


def blend_window(
    height: int, width: int, overlap: int, *, dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """A separable weight that rises from near 0 to 1 over ``overlap`` pixels at each border.

    Overlapping tiles weighted this way and normalised by the summed weights cross-fade
    smoothly (a raised-cosine ramp), which hides the tiles' border effects.

    Parameters
    ----------
    height, width : int
        Tile size.
    overlap : int
        Ramp length in pixels (0: a constant window).
    dtype, device
        Of the result.

    Returns
    -------
    torch.Tensor
        Shape (1, 1, height, width), values in (0, 1].
    """

    def ramp(size: int) -> torch.Tensor:
        weights = torch.ones(size, dtype=torch.float64)
        length = min(overlap, size // 2)
        if length > 0:
            steps = (torch.arange(length, dtype=torch.float64) + 0.5) / length
            rise = 0.5 - 0.5 * torch.cos(torch.pi * steps)
            weights[:length] = rise
            weights[size - length :] = rise.flip(0)
        return weights

    window = ramp(height)[:, None] * ramp(width)[None, :]
    return window.to(dtype=dtype, device=device)[None, None]


def fuse_in_tiles(
    fuse: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    a: torch.Tensor,
    b: torch.Tensor,
    tile: int | tuple[int, int],
    overlap: int = 32,
) -> torch.Tensor:
    """Apply ``fuse`` to overlapping ``tile x tile`` windows and blend the results.

    Parameters
    ----------
    fuse : callable
        ``fuse(a_tile, b_tile) -> fused_tile`` with the tile's shape (N, 1, h, w).
    a, b : torch.Tensor
        Sources, (N, 1, H, W).
    tile : int or (int, int)
        Tile size, or (height, width) (a side larger than the image uses the whole side).
    overlap : int
        Overlap of neighbouring tiles; the blend ramps over it.

    Returns
    -------
    torch.Tensor
        The fused image (N, 1, H, W).

    Shapes
    ------
    - a, b: (N, 1, H, W)
    - Output: (N, 1, H, W)
    """
    tile_rows, tile_cols = (tile, tile) if isinstance(tile, int) else tile
    if tile_rows <= 0 or tile_cols <= 0:
        raise ValueError(f"tile must be positive, got {tile}")
    height, width = a.shape[-2:]
    tile_h, tile_w = min(tile_rows, height), min(tile_cols, width)
    overlap = max(0, min(overlap, tile_h - 1, tile_w - 1))
    window = blend_window(tile_h, tile_w, overlap, dtype=a.dtype, device=a.device)
    output = torch.zeros_like(a)
    weight = torch.zeros((1, 1, height, width), dtype=a.dtype, device=a.device)
    for top in tile_starts(height, tile_h, overlap):
        for left in tile_starts(width, tile_w, overlap):
            rows, cols = slice(top, top + tile_h), slice(left, left + tile_w)
            fused = fuse(a[..., rows, cols], b[..., rows, cols])
            output[..., rows, cols] += fused * window
            weight[..., rows, cols] += window
    return output / weight
