"""Scoring many fused images: image files, folders paired by name, parallel workers, summaries."""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tdfusion._progress import bar_options
from tdfusion.errors import DataError
from tdfusion.metrics._io import pair_by_stem, read_luma
from tdfusion.metrics.evaluation import METRIC_NAMES, evaluate

__all__ = ["evaluate_files", "evaluate_folders", "evaluate_many", "summarise"]

ImageTriple = tuple[Path, Path, Path]


def evaluate_files(
    fused_path: str | Path, ir_path: str | Path, vis_path: str | Path
) -> dict[str, float]:
    """Read a fused image and its two sources as luma and compute every metric.

    Parameters
    ----------
    fused_path, ir_path, vis_path : str or pathlib.Path
        Image files; colour images are read as their BT.601 Y channel (see
        the metrics' own reader: BT.601 luma, rounded).

    Returns
    -------
    dict of str to float
        As :func:`tdfusion.metrics.evaluate`, with the infrared image as source ``a``.

    Raises
    ------
    DataError
        If a file cannot be read or the three sizes differ (the message names the files).

    Example
    -------
    >>> evaluate_files("fused/00004N.png", "ir/00004N.png", "vi/00004N.png")  # doctest: +SKIP
    {'EN': 6.21..., 'SD': 30.3..., ...}
    """
    paths = (Path(fused_path), Path(ir_path), Path(vis_path))
    fused, infrared, visible = (read_luma(path) for path in paths)
    if not fused.shape == infrared.shape == visible.shape:
        sizes = ", ".join(
            f"{path} is {image.shape[1]}x{image.shape[0]}"
            for path, image in zip(paths, (fused, infrared, visible), strict=True)
        )
        raise DataError(f"image sizes differ: {sizes} (width x height)")
    try:
        return evaluate(fused, infrared, visible)
    except ValueError as error:
        raise DataError(f"cannot evaluate {paths[0]}: {error}") from None


def _evaluate_triple(triple: ImageTriple) -> dict[str, float]:
    return evaluate_files(*triple)


def evaluate_many(
    triples: Iterable[Sequence[str | Path]],
    *,
    jobs: int = 1,
    progress: bool = False,
) -> list[dict[str, float]]:
    """Evaluate ``(fused, infrared, visible)`` file triples, in worker processes when ``jobs > 1``.

    Parameters
    ----------
    triples : iterable of (path, path, path)
        Fused, infrared and visible image files.
    jobs : int
        Number of worker processes; 1 evaluates in this process.
    progress : bool
        Show a tqdm progress bar on standard error.

    Returns
    -------
    list of dict of str to float
        One :func:`evaluate_files` result per triple, in the input order.

    Raises
    ------
    DataError
        From the first triple that cannot be evaluated; the remaining work is cancelled.
    ValueError
        If ``jobs`` is smaller than 1.

    Example
    -------
    >>> triples = [("fused/a.png", "ir/a.png", "vi/a.png"), ("fused/b.png", "ir/b.png", "vi/b.png")]
    >>> [scores["Qabf"] for scores in evaluate_many(triples, jobs=2)]  # doctest: +SKIP
    [0.66..., 0.70...]
    """
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    work = [tuple(Path(path) for path in triple) for triple in triples]
    with tqdm(total=len(work), desc="evaluate", unit="image", **bar_options(progress)) as bar:
        if jobs == 1 or len(work) <= 1:
            return [_advance(bar, _evaluate_triple(triple)) for triple in work]
        # Fresh interpreters rather than fork(): the parent may hold threads (torch, BLAS).
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(jobs, len(work)), mp_context=context) as pool:
            results = pool.map(_evaluate_triple, work)
            try:
                return [_advance(bar, result) for result in results]
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise


def _advance(bar: tqdm, result: dict[str, float]) -> dict[str, float]:
    bar.update()
    return result


def evaluate_folders(
    fused_folder: str | Path,
    ir_folder: str | Path,
    vis_folder: str | Path,
    *,
    jobs: int = 1,
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """Evaluate every fused image of a folder against the sources of the same file stem.

    Parameters
    ----------
    fused_folder, ir_folder, vis_folder : str or pathlib.Path
        Folders of fused, infrared and visible images (PNG, JPEG, BMP, TIFF), paired by stem.
    jobs : int
        Number of worker processes.
    progress : bool
        Show a tqdm progress bar on standard error.

    Returns
    -------
    dict of str to dict of str to float
        Stem -> the metrics of :func:`tdfusion.metrics.evaluate`, sorted by stem.

    Raises
    ------
    DataError
        For missing or empty folders, unpaired names, unreadable images or size mismatches.

    Example
    -------
    >>> scores = evaluate_folders("fused/", "ir/", "vi/", jobs=2)  # doctest: +SKIP
    >>> summarise(scores.values())["EN"]  # doctest: +SKIP
    (6.74, 0.41)
    """
    triples = pair_by_stem(fused_folder, ir_folder, vis_folder)
    results = evaluate_many(triples, jobs=jobs, progress=progress)
    return {triple[0].stem: result for triple, result in zip(triples, results, strict=True)}


def summarise(results: Iterable[Mapping[str, float]]) -> dict[str, tuple[float, float]]:
    """Mean and population standard deviation of each metric over several images.

    Parameters
    ----------
    results : iterable of mapping of str to float
        Per-image metrics, as :func:`tdfusion.metrics.evaluate` returns them.

    Returns
    -------
    dict of str to (float, float)
        Metric -> ``(mean, std)`` in :data:`METRIC_NAMES` order; metrics that no row holds
        are left out.

    Example
    -------
    >>> summarise([{"EN": 6.0}, {"EN": 7.0}])["EN"]
    (6.5, 0.5)
    """
    rows = list(results)
    summary = {}
    for name in METRIC_NAMES:
        values = np.array([row[name] for row in rows if name in row], dtype=np.float64)
        if values.size == 0:
            continue
        summary[name] = (float(np.mean(values)), float(np.std(values)))
    return summary
