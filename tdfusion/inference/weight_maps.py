"""Visualising a trained loss generator: heat maps of w_a and overlays (the paper's Fig. 5)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tdfusion._progress import bar_options
from tdfusion.data.io import read_luma_pair, write_image
from tdfusion.devices import images_for
from tdfusion.errors import DataError
from tdfusion.files import NAME_MAX, output_lock, pair_folders
from tdfusion.inference.colour import to_uint8

__all__ = ["colorize", "loss_weights", "overlay", "save_weight_maps"]

# Anchor colours of the heat-map palette (dark blue -> teal -> yellow), at 0, 0.25, ..., 1.
_PALETTE = np.array(
    [[48, 18, 59], [40, 110, 190], [30, 170, 150], [150, 205, 70], [250, 230, 40]],
    dtype=np.float64,
)


def colorize(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB with a perceptually ordered palette (dark = 0, yellow = 1).

    Parameters
    ----------
    values : numpy.ndarray
        (H, W) values; clipped to [0, 1].

    Returns
    -------
    numpy.ndarray
        ``uint8`` (H, W, 3).
    """
    positions = np.clip(values, 0.0, 1.0) * (len(_PALETTE) - 1)
    lower = np.minimum(np.floor(positions).astype(int), len(_PALETTE) - 2)
    fraction = (positions - lower)[..., None]
    rgb = _PALETTE[lower] * (1 - fraction) + _PALETTE[lower + 1] * fraction
    return to_uint8(rgb)


def overlay(heat: np.ndarray, image: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a heat map over an image (grey or RGB, ``uint8``).

    Parameters
    ----------
    heat : numpy.ndarray
        ``uint8`` (H, W, 3) heat map.
    image : numpy.ndarray
        ``uint8`` (H, W) or (H, W, 3).
    alpha : float
        Weight of the heat map.

    Returns
    -------
    numpy.ndarray
        ``uint8`` (H, W, 3).
    """
    base = image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=-1)
    return to_uint8(alpha * heat.astype(np.float64) + (1 - alpha) * base.astype(np.float64))


def loss_weights(generator: nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The loss weight ``w_a`` the generator assigns to the first source.

    Parameters
    ----------
    generator : torch.nn.Module
        A loss generator ``G(a, b) -> (N, 2, H, W)``.
    a, b : torch.Tensor
        Sources (N, 1, H, W) in [0, 1].

    Returns
    -------
    torch.Tensor
        ``w_a`` of shape (N, 1, H, W) in [0, 1] (``w_b = 1 - w_a``).
    """
    with torch.inference_mode():
        return generator(a, b)[:, :1]


def save_weight_maps(
    generator: nn.Module,
    ir_dir: str | os.PathLike[str],
    vis_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    alpha: float = 0.5,
    progress: bool = True,
) -> list[Path]:
    """Write ``<stem>_wa.png`` (heat map of w_a) and ``<stem>_wa_overlay.png`` for each pair.

    The overlay lays the heat map over the second (visible) source's luma.

    Parameters
    ----------
    generator : torch.nn.Module
        A trained loss generator (its device and dtype are used).
    ir_dir, vis_dir : str or os.PathLike
        Folders of the first and second sources, paired by file stem.
    out_dir : str or os.PathLike
        Output folder (created).
    alpha : float
        Heat-map weight in the overlay.
    progress : bool
        Show a progress bar.

    Returns
    -------
    list of pathlib.Path
        The files written.

    Raises
    ------
    DataError
        For a bad pair, or names too long for the output files.
    OutputInUseError
        If another process is writing into ``out_dir``.
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    written = []
    pairs = pair_folders({"infrared": ir_dir, "visible": vis_dir})
    too_long = [
        files["infrared"]
        for stem, files in pairs
        if len(f"{stem}_wa_overlay.png".encode()) > NAME_MAX
    ]
    if too_long:
        raise DataError(
            f"{too_long[0]}: the output name {{stem}}_wa_overlay.png would exceed {NAME_MAX} "
            f"bytes ({len(too_long)} pair(s)); shorten the file names"
        )
    with output_lock(out, purpose="writing weight maps"):
        for stem, files in tqdm(pairs, desc="weight maps", unit="pair", **bar_options(progress)):
            luma_a, luma_b, _, _ = read_luma_pair(files["infrared"], files["visible"])
            a, b = images_for(generator, [luma_a]), images_for(generator, [luma_b])
            weight_a = loss_weights(generator, a, b)[0, 0].float().cpu().numpy()
            heat = colorize(weight_a)
            visible = to_uint8(luma_b * 255.0)
            for suffix, image in (("wa", heat), ("wa_overlay", overlay(heat, visible, alpha))):
                path = out / f"{stem}_{suffix}.png"
                write_image(path, image)
                written.append(path)
    return written
