"""Fusing image pairs with a trained network: tensors, files and whole folders."""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tdfusion.data.io import read_luma_pair, write_image
from tdfusion.devices import images_for, resolve_device
from tdfusion.errors import DataError
from tdfusion.files import NAME_MAX, list_images, output_lock, pair_folders, unpaired_stems
from tdfusion.inference.colour import merge_chroma
from tdfusion.inference.tiling import fuse_in_tiles

__all__ = [
    "FolderReport",
    "fuse_files",
    "fuse_folders",
    "fuse_tensors",
    "load_fusion_model",
    "min_max_stretch",
]

#: Images with more pixels than this are fused in tiles unless told otherwise (about the memory
#: of a 2048x2048 image through the default network on the CPU).
DEFAULT_MAX_PIXELS = 2048 * 2048
DEFAULT_TILE = 512


def load_fusion_model(
    weights: str | os.PathLike[str] | None = None, device: str | torch.device | None = None
) -> nn.Module:
    """Load a :class:`~tdfusion.nets.ReFusionNet` for inference (eval mode, on ``device``).

    Parameters
    ----------
    weights : str or os.PathLike, optional
        The name of bundled weights (:func:`~tdfusion.nets.list_pretrained`), our
        ``save_pretrained`` file, a trainer checkpoint, or the authors' ReFusion/TDFusion
        ``.pth`` file. Default: the bundled ``"tdfusion-ivif"`` infrared-visible weights.
    device : str or torch.device, optional
        Defaults to CUDA when available, else the CPU.

    Returns
    -------
    torch.nn.Module
        The network.
    """
    from tdfusion.nets import DEFAULT_FUSION_WEIGHTS, ReFusionNet

    if weights is None:
        weights = DEFAULT_FUSION_WEIGHTS
    return ReFusionNet.from_pretrained(weights).to(resolve_device(device)).eval()


def _is_out_of_memory(error: RuntimeError) -> bool:
    message = str(error).lower()
    return "out of memory" in message or "can't allocate memory" in message


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

    Parameters
    ----------
    model : callable
        ``model(a, b) -> fused``.
    a, b : torch.Tensor
        Sources (N, 1, H, W) in [0, 1] on the model's device.
    tile : int, optional
        Tile size; ``None`` fuses the whole image, unless it has more than ``max_pixels``
        pixels (then the largest square tiles within that budget are used) or memory runs out
        (then tiles of 512).
    overlap : int
        Overlap of neighbouring tiles (blended with a raised-cosine ramp).
    max_pixels : int, optional
        Pixel count above which tiling is automatic; ``None`` never tiles on size alone.

    Returns
    -------
    torch.Tensor
        Fused images (N, 1, H, W).
    """
    with torch.inference_mode():
        too_large = max_pixels is not None and a.shape[-2] * a.shape[-1] > max_pixels
        if tile is None and too_large:
            tile = max(64, math.isqrt(max_pixels))  # the largest square tile within budget
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
        return fuse_in_tiles(model, a, b, tile or DEFAULT_TILE, overlap)


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

    Returns
    -------
    numpy.ndarray
        ``uint8`` (H, W, 3) RGB, or (H, W) grey when both sources are grey.

    Raises
    ------
    DataError
        If a file cannot be read or the two sizes differ.
    """
    luma_a, luma_b, chroma_a, chroma_b = read_luma_pair(ir_path, vis_path)
    (fused_y,) = _fuse_lumas(model, [(luma_a, luma_b)], tile=tile, overlap=overlap)
    if stretch:
        fused_y = min_max_stretch(fused_y)
    return merge_chroma(fused_y * 255.0, chroma_a, chroma_b)


@dataclass
class FolderReport:
    """What :func:`fuse_folders` did.

    Attributes
    ----------
    written : list of pathlib.Path
        The fused images written.
    skipped : list of (str, str)
        ``(name, reason)`` of pairs that could not be fused (with ``skip_bad``).
    seconds : float
        Total time spent fusing.
    """

    written: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def seconds_per_pair(self) -> float:
        """Mean time per fused pair (0 when none was fused)."""
        return self.seconds / len(self.written) if self.written else 0.0


def fuse_folders(
    model: nn.Module,
    ir_dir: str | os.PathLike[str],
    vis_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    tile: int | None = None,
    overlap: int = 32,
    stretch: bool = False,
    skip_bad: bool = False,
    batch: int = 1,
    progress: bool = True,
) -> FolderReport:
    """Fuse every pair of two folders matched by file stem; write ``OUT/<stem>.png``.

    Parameters
    ----------
    model : torch.nn.Module
        The fusion network.
    ir_dir, vis_dir : str or os.PathLike
        Folders of the first and second sources.
    out_dir : str or os.PathLike
        Output folder (created); it must not be one of the input folders.
    tile, overlap, stretch
        See :func:`fuse_files`.
    skip_bad : bool
        Skip unpaired names, unreadable or non-finite images, size mismatches and pairs whose
        output is not finite (listed in the report). Without it every pair is read before
        anything is written and a bad one stops the run with nothing written.
    batch : int
        Pairs per forward pass (pairs of one size are stacked; on a GPU a larger batch is
        faster, on the CPU 1 is as fast).
    progress : bool
        Show a progress bar.

    Returns
    -------
    FolderReport
        Files written, pairs skipped and timing.

    Raises
    ------
    DataError
        If a pair is bad (unless ``skip_bad``; the message names it and, should a pair fail
        after others were written, how many were), or if ``out_dir`` is an input folder.
    OutputInUseError
        If another process is writing into ``out_dir`` (an :func:`~tdfusion.files.output_lock`
        is held while writing).
    """
    from tqdm.auto import tqdm

    out = Path(out_dir).resolve()
    for folder in (ir_dir, vis_dir):
        if Path(folder).resolve() == out:
            raise DataError(f"the output folder {out_dir} is an input folder; choose another")
    report = FolderReport()
    pairs = pair_folders({"infrared": ir_dir, "visible": vis_dir}, skip_unpaired=skip_bad)
    if skip_bad:
        listings = {
            "infrared": list_images(ir_dir, "infrared"),
            "visible": list_images(vis_dir, "visible"),
        }
        report.skipped.extend(("unpaired", line) for line in unpaired_stems(listings))
    else:
        _check_pairs(pairs, out_dir)
    with (
        output_lock(out, purpose="fusing"),
        tqdm(total=len(pairs), desc="fusing", unit="pair", disable=not progress) as bar,
    ):
        for first in range(0, len(pairs), max(1, batch)):
            chunk = pairs[first : first + max(1, batch)]
            try:
                _fuse_chunk(model, chunk, out, report, tile, overlap, stretch, skip_bad)
            except DataError as error:
                raise DataError(
                    f"{error}; stopped after writing {len(report.written)} of {len(pairs)} "
                    f"pair(s) into {out_dir} (skip_bad / --skip-bad skips bad pairs)"
                ) from None
            bar.update(len(chunk))
    return report


def _output_name(stem: str) -> str:
    return f"{stem}.png"


def _check_pairs(pairs: list[tuple[str, dict[str, Path]]], out_dir: str | os.PathLike[str]) -> None:
    """Read every pair before anything is written; one error listing the bad ones."""
    problems = []
    for stem, files in pairs:
        if len(_output_name(stem).encode()) > NAME_MAX:
            problems.append(f"{files['infrared']}: the output name would exceed {NAME_MAX} bytes")
            continue
        try:
            read_luma_pair(files["infrared"], files["visible"])
        except DataError as error:
            problems.append(str(error))
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DataError(
            f"{len(problems)} of {len(pairs)} pair(s) cannot be fused, nothing written to "
            f"{out_dir}: {problems[0]}{more}; fix them or skip them (skip_bad / --skip-bad)"
        )


def _fuse_chunk(
    model: nn.Module,
    chunk: list[tuple[str, dict[str, Path]]],
    out: Path,
    report: FolderReport,
    tile: int | None,
    overlap: int,
    stretch: bool,
    skip_bad: bool,
) -> None:
    """Fuse and write a few pairs (stacked by size); bad ones raise or go to the report."""
    loaded = []
    for stem, files in chunk:
        try:
            if len(_output_name(stem).encode()) > NAME_MAX:
                raise DataError(
                    f"{files['infrared']}: the output name would exceed {NAME_MAX} bytes"
                )
            loaded.append((stem, files, read_luma_pair(files["infrared"], files["visible"])))
        except DataError as error:
            if not skip_bad:
                raise
            report.skipped.append((stem, str(error)))
    by_shape: dict[tuple[int, ...], list] = {}
    for item in loaded:
        by_shape.setdefault(item[2][0].shape, []).append(item)
    for group in by_shape.values():
        start = time.perf_counter()
        fused = _fuse_lumas(model, [(s[0], s[1]) for _, _, s in group], tile=tile, overlap=overlap)
        report.seconds += time.perf_counter() - start
        for (stem, files, (_, _, chroma_a, chroma_b)), fused_y in zip(group, fused):
            if not np.isfinite(fused_y).all():
                problem = (
                    f"fusing {files['infrared']} and {files['visible']} gave NaN or infinite "
                    "values (check the weights); nothing written for it"
                )
                if not skip_bad:
                    raise DataError(problem)
                report.skipped.append((stem, problem))
                continue
            if stretch:
                fused_y = min_max_stretch(fused_y)
            destination = out / _output_name(stem)
            write_image(destination, merge_chroma(fused_y * 255.0, chroma_a, chroma_b))
            report.written.append(destination)
