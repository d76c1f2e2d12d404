"""Fusing every pair of two folders: the checks, the report, the serial and overlapped runs.

A folder is fused in three stages: read a chunk of pairs (``batch`` of them), fuse them (pairs
of one size in one forward pass), finish each output (refuse it if it is not finite, stretch,
put the colour back, write it). :func:`fuse_folders` runs them one after the other
(``prefetch=0``) or overlapped (:func:`~tdfusion.inference.pipeline.run_overlapped`: reading
and writing in threads of their own); both write the same files in the same order.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from tdfusion._progress import bar_options
from tdfusion.data.io import read_luma_pair, write_image
from tdfusion.errors import DataError
from tdfusion.files import (
    LOCK_NAME,
    NAME_MAX,
    missing_folders,
    output_lock,
    pair_folders_reporting,
    remove_unused_folders,
)
from tdfusion.inference.acceleration import Precision
from tdfusion.inference.colour import merge_chroma
from tdfusion.inference.fuse import _fuse_lumas, _with_options, min_max_stretch
from tdfusion.inference.pipeline import run_overlapped
from tdfusion.inference.tiling import check_tile_options

__all__ = ["DEFAULT_PREFETCH", "FolderReport", "fuse_folders"]

#: Chunks read ahead of the network, and fused chunks waiting to be written, by default.
DEFAULT_PREFETCH = 2

_Pair = tuple[str, dict[str, Path]]  # (stem, {"infrared": path, "visible": path})
_Lumas = tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]
_Loaded = tuple[str, dict[str, Path], _Lumas]
_Read = tuple[list[_Loaded], list[tuple[str, str]]]  # (pairs read, (stem, reason) skipped)
_FusedChunk = tuple[list[tuple[str, str]], list["_Fused"], int]  # (skipped, fused, pairs)


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
        Time spent in the network.
    wall_seconds : float
        Time of the whole folder: checking, reading, fusing and writing.
    pixels : int
        Pixels of the fused images written (height times width, summed).
    """

    written: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    wall_seconds: float = 0.0
    pixels: int = 0

    @property
    def seconds_per_pair(self) -> float:
        """Mean time in the network per fused pair (0 when none was fused)."""
        return self.seconds / len(self.written) if self.written else 0.0

    @property
    def pairs_per_second(self) -> float:
        """Pairs written per second of ``wall_seconds`` (0 when none was written)."""
        return len(self.written) / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def pixels_per_second(self) -> float:
        """Fused pixels written per second of ``wall_seconds``."""
        return self.pixels / self.wall_seconds if self.wall_seconds > 0 else 0.0


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
    prefetch: int = DEFAULT_PREFETCH,
    precision: Precision = "fp32",
    channels_last: bool = False,
    compile: bool = False,
) -> FolderReport:
    """Fuse every pair of two folders matched by file stem; write ``OUT/<stem>.png``.

    Parameters
    ----------
    model : torch.nn.Module
        The fusion network (or an :class:`~tdfusion.inference.AcceleratedFusion`).
    ir_dir, vis_dir : str or os.PathLike
        Folders of the first and second sources, or two image files (one pair, named by the
        first file's stem).
    out_dir : str or os.PathLike
        Output folder (created); it must not be one of the input folders, nor the folder of an
        input file.
    tile, overlap, stretch
        See :func:`~tdfusion.inference.fuse_files`.
    skip_bad : bool
        Skip unpaired names, names held by two images of one folder, unreadable or non-finite
        images, size mismatches and pairs whose output is not finite (listed in the report).
        Without it every pair is read before anything is written and a bad one stops the run
        with nothing written.
    batch : int
        Pairs per forward pass (pairs of one size are stacked; on a GPU a larger batch is
        faster, on the CPU 1 is as fast).
    progress : bool
        Show a progress bar.
    prefetch : int
        Chunks of ``batch`` pairs that a reader thread decodes ahead of the network, while a
        writer thread encodes and writes the outputs (the network runs in the calling thread).
        ``0`` reads, fuses and writes one after the other in the calling thread. The files
        written are the same either way.
    precision, channels_last, compile
        Inference options, applied with :func:`~tdfusion.inference.accelerate` when not the
        defaults (``"fp32"``, ``False``, ``False``).

    Returns
    -------
    FolderReport
        Files written, pairs skipped, timing and throughput.

    Raises
    ------
    DataError
        If a pair is bad (unless ``skip_bad``; the message names it and, should a pair fail
        after others were written, how many were), or if ``out_dir`` is an input folder or
        holds an input file (or a file an output would overwrite is an input); these are
        refused before anything is read or written.
    OutputInUseError
        If another process is writing into ``out_dir`` (an :func:`~tdfusion.files.output_lock`
        is held while writing).
    ValueError
        If ``prefetch`` is negative, ``batch`` below 1, ``tile`` below 1 or below twice
        ``overlap``, ``overlap`` negative (as ``tdfusion fuse`` refuses them), or an option is
        unknown.
    """
    from tqdm.auto import tqdm

    if prefetch < 0:
        raise ValueError(f"prefetch must be at least 0; got {prefetch}")
    if batch < 1:
        raise ValueError(f"batch must be at least 1; got {batch}")
    check_tile_options(tile, overlap)
    start = time.perf_counter()
    model = _with_options(model, precision, channels_last, compile)
    out = Path(out_dir).resolve()
    for source in (ir_dir, vis_dir):
        source = Path(source).resolve()
        if source.is_file() and source.parent == out:
            raise DataError(
                f"the output folder {out_dir} holds the input file {source}; choose another "
                "output folder, so that no input is overwritten"
            )
        if source == out:
            raise DataError(f"the output folder {out_dir} is an input folder; choose another")
    report = FolderReport()
    pairs, skipped = pair_folders_reporting(
        {"infrared": ir_dir, "visible": vis_dir}, skip_unpaired=skip_bad
    )
    _refuse_overwriting_inputs(pairs, out, out_dir)
    report.skipped.extend(skipped)
    if not skip_bad and prefetch == 0:
        _check_pairs(pairs, out_dir)
    chunks = [pairs[first : first + batch] for first in range(0, len(pairs), batch)]

    def fuse(read: _Read) -> _FusedChunk:
        loaded, skipped = read
        fused = _fuse_loaded(model, loaded, report, tile=tile, overlap=overlap)
        return skipped, fused, len(loaded) + len(skipped)

    bars: list[Any] = []  # shown once writing starts, so that a refused folder shows none

    def finish(fused_chunk: _FusedChunk) -> None:
        skipped, fused, size = fused_chunk
        if not bars:
            bar = tqdm(total=len(pairs), desc="fusing", unit="pair", **bar_options(progress))
            # tqdm's clock is time.time: count its elapsed time and rate from the folder's start
            bar.start_t = bar.last_print_t = time.time() - (time.perf_counter() - start)
            bars.append(bar)
        report.skipped.extend(skipped)
        for item in fused:
            _finish(item, out, report, stretch=stretch, skip_bad=skip_bad)
        bars[0].update(size)

    checked = threading.Event()
    created = missing_folders(out)
    try:
        with output_lock(out, purpose="fusing"):
            _run(chunks, fuse, finish, checked, out_dir, skip_bad, prefetch)
    except DataError as error:
        remove_unused_folders(created, out, {LOCK_NAME})  # a refused folder leaves none
        if not checked.is_set():  # the check's own message: nothing was written
            raise
        raise DataError(
            f"{error}; stopped after writing {len(report.written)} of {len(pairs)} "
            f"pair(s) into {out_dir} (skip_bad / --skip-bad skips bad pairs)"
        ) from None
    except BaseException:
        remove_unused_folders(created, out, {LOCK_NAME})
        raise
    finally:
        for bar in bars:
            bar.close()
    report.wall_seconds = time.perf_counter() - start
    return report


def _run(
    chunks: list[list[_Pair]],
    fuse: Callable[[_Read], _FusedChunk],
    finish: Callable[[_FusedChunk], None],
    checked: threading.Event,
    out_dir: str | os.PathLike[str],
    skip_bad: bool,
    prefetch: int,
) -> None:
    """Read, fuse and finish every chunk, serially or overlapped; ``checked`` is set once every
    pair has been read (and writing may start)."""
    if prefetch == 0:
        checked.set()  # the serial way checked the pairs before
        for chunk in chunks:
            finish(fuse(_read_chunk(chunk, skip_bad)))
        return
    reads = _checked_reads(chunks, out_dir, skip_bad, checked, prefetch)
    run_overlapped(reads, fuse, finish, prefetch=prefetch, writes_allowed=checked)


def _output_name(stem: str) -> str:
    return f"{stem}.png"


def _refuse_overwriting_inputs(
    pairs: list[_Pair], out: Path, out_dir: str | os.PathLike[str]
) -> None:
    """Raise a :class:`DataError` (before any work) if a pair's output would replace one of
    its inputs (the same file, or a link to it, already in the output folder)."""
    for stem, files in pairs:
        destination = out / _output_name(stem)
        for role, source in files.items():
            if destination.resolve() == source.resolve() or (
                destination.exists() and os.path.samefile(destination, source)
            ):
                raise DataError(
                    f"the output of {stem!r} in {out_dir} would overwrite the {role} input "
                    f"{source}; choose another output folder"
                )


def _read_pair(stem: str, files: dict[str, Path]) -> _Lumas:
    """Read one pair, or raise a :class:`DataError` naming what is wrong with it."""
    if len(_output_name(stem).encode()) > NAME_MAX:
        raise DataError(f"{files['infrared']}: the output name would exceed {NAME_MAX} bytes")
    return read_luma_pair(files["infrared"], files["visible"])


def _problems(problems: list[str], total: int, out_dir: str | os.PathLike[str]) -> DataError:
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return DataError(
        f"{len(problems)} of {total} pair(s) cannot be fused, nothing written to "
        f"{out_dir}: {problems[0]}{more}; fix them or skip them (skip_bad / --skip-bad)"
    )


def _check_pairs(pairs: list[_Pair], out_dir: str | os.PathLike[str]) -> None:
    """Read every pair before anything is written; one error listing the bad ones."""
    problems = []
    for stem, files in pairs:
        try:
            _read_pair(stem, files)
        except DataError as error:
            problems.append(str(error))
    if problems:
        raise _problems(problems, len(pairs), out_dir)


def _read_chunk(chunk: list[_Pair], skip_bad: bool) -> _Read:
    """Read a few pairs; a bad one raises, or is listed as skipped with ``skip_bad``."""
    loaded, skipped = [], []
    for stem, files in chunk:
        try:
            loaded.append((stem, files, _read_pair(stem, files)))
        except DataError as error:
            if not skip_bad:
                raise
            skipped.append((stem, str(error)))
    return loaded, skipped


def _checked_reads(
    chunks: Sequence[list[_Pair]],
    out_dir: str | os.PathLike[str],
    skip_bad: bool,
    checked: threading.Event,
    keep: int,
) -> Iterator[_Read]:
    """The chunks, read; without ``skip_bad`` every pair is read once before ``checked`` is set.

    That first pass keeps the first ``keep`` chunks (the network starts on them at once) and
    drops the others, which are read again after it; a bad pair ends it with one error listing
    every bad pair, and ``checked`` is never set.
    """
    if skip_bad:
        checked.set()
        for chunk in chunks:
            yield _read_chunk(chunk, skip_bad=True)
        return
    problems: list[str] = []
    for index, chunk in enumerate(chunks):
        loaded = []
        for stem, files in chunk:
            try:
                loaded.append((stem, files, _read_pair(stem, files)))
            except DataError as error:
                problems.append(str(error))
        if index < keep and not problems:
            yield loaded, []
    if problems:
        raise _problems(problems, sum(map(len, chunks)), out_dir)
    checked.set()
    for chunk in chunks[keep:]:
        yield _read_chunk(chunk, skip_bad=False)


@dataclass
class _Fused:
    """A fused pair waiting to be finished: the fused Y in [0, 1] and the sources' chroma."""

    stem: str
    files: dict[str, Path]
    luma: np.ndarray
    chroma_a: np.ndarray | None
    chroma_b: np.ndarray | None


def _fuse_loaded(
    model: nn.Module,
    loaded: list[_Loaded],
    report: FolderReport,
    *,
    tile: int | None,
    overlap: int,
) -> list[_Fused]:
    """Fuse pairs of one size in one forward pass each; adds the network's time to ``report``."""
    by_shape: dict[tuple[int, ...], list[_Loaded]] = {}
    for item in loaded:
        by_shape.setdefault(item[2][0].shape, []).append(item)
    fused_pairs = []
    for group in by_shape.values():
        start = time.perf_counter()
        fused = _fuse_lumas(model, [(s[0], s[1]) for _, _, s in group], tile=tile, overlap=overlap)
        report.seconds += time.perf_counter() - start
        for (stem, files, (_, _, chroma_a, chroma_b)), luma in zip(group, fused):
            fused_pairs.append(_Fused(stem, files, luma, chroma_a, chroma_b))
    return fused_pairs


def _finish(
    fused: _Fused, out: Path, report: FolderReport, *, stretch: bool, skip_bad: bool
) -> None:
    """Write one fused pair, or refuse it (raise, or skip with ``skip_bad``) if not finite."""
    luma = fused.luma
    if not np.isfinite(luma).all():
        problem = (
            f"fusing {fused.files['infrared']} and {fused.files['visible']} gave NaN or infinite "
            "values (check the weights); nothing written for it"
        )
        if not skip_bad:
            raise DataError(problem)
        report.skipped.append((fused.stem, problem))
        return
    if stretch:
        luma = min_max_stretch(luma)
    destination = out / _output_name(fused.stem)
    write_image(destination, merge_chroma(luma * 255.0, fused.chroma_a, fused.chroma_b))
    report.written.append(destination)
    report.pixels += int(luma.size)
