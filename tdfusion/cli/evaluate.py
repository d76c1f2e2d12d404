"""``tdfusion evaluate``: score folders of fused images against their sources and print a table."""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TextIO

from tdfusion.cli.options import add_source_folder_options, positive_int
from tdfusion.errors import DataError
from tdfusion.metrics import CONVENTIONS, METRIC_NAMES, evaluate_folders, summarise

__all__ = ["add_parser", "format_table", "run", "write_csv"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``evaluate`` sub-command.

    Parameters
    ----------
    subparsers : argparse._SubParsersAction
        The top-level parser's sub-command registry.

    Returns
    -------
    argparse.ArgumentParser
        The sub-command's parser, with ``handler`` set to :func:`run`.

    Example
    -------
    >>> parser = argparse.ArgumentParser(prog="tdfusion")
    >>> evaluate_parser = add_parser(parser.add_subparsers())
    >>> parser.parse_args(["evaluate", "--fused", "f", "--ir", "i", "--vis", "v"]).jobs
    1
    """
    parser = subparsers.add_parser(
        "evaluate",
        help="score fused images with the field's metrics (EN, SD, SF, AG, MI, SCD, VIF, ...)",
        description=(
            "Score every fused image against the infrared and visible images of the same file "
            "stem (PNG, JPEG, BMP, TIFF; colour images are scored on their BT.601 Y channel) "
            "and print the mean and standard deviation of each metric. Images are scored on "
            "the 0..255 scale: 16-bit images are scaled to it, float TIFFs are taken on it as "
            "they are, and a float image with no value above 1 (a [0, 1] image) is refused; "
            "multiply it by 255 or save it as 8-bit. " + CONVENTIONS + "."
        ),
    )
    parser.add_argument("--fused", required=True, type=Path, help="folder of fused images")
    add_source_folder_options(parser)
    parser.add_argument("--csv", type=Path, help="write one row of metrics per image to this file")
    parser.add_argument(
        "--jobs", type=positive_int, default=1, help="worker processes (default: 1)"
    )
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace, stream: TextIO | None = None) -> int:
    """Evaluate the folders named in ``args``, print the summary table, write the CSV if asked.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed ``fused``, ``ir``, ``vis``, ``csv`` and ``jobs``.
    stream : text stream, optional
        Where the table goes; standard output when omitted.

    Returns
    -------
    int
        0 on success.

    Raises
    ------
    DataError
        For missing folders, unpaired names, unreadable images, float images in [0, 1],
        size mismatches or an unwritable CSV file.

    Example
    -------
    >>> from tdfusion.cli import main
    >>> main(["evaluate", "--fused", "out/", "--ir", "ir/", "--vis", "vi/"])  # doctest: +SKIP
    0
    """
    scores = evaluate_folders(args.fused, args.ir, args.vis, jobs=args.jobs, progress=True)
    if args.csv is not None:
        write_csv(args.csv, scores)
    print(format_table(scores), file=stream or sys.stdout)
    return 0


def format_table(scores: Mapping[str, Mapping[str, float]]) -> str:
    """The summary table: mean and standard deviation of each metric, conventions below.

    Parameters
    ----------
    scores : mapping of str to mapping of str to float
        Image name -> its metrics.

    Returns
    -------
    str
        A plain-text table, one metric per line, with a footnote.

    Example
    -------
    >>> print(format_table({"a": {"EN": 6.0}, "b": {"EN": 7.0}}).splitlines()[2])
    EN        6.5000    0.5000
    """
    lines = [f"{'metric':<6} {'mean':>9} {'std':>9}", "-" * 26]
    for name, (mean, std) in summarise(scores.values()).items():
        lines.append(f"{name:<6} {mean:>9.4f} {std:>9.4f}")
    lines.append(f"{len(scores)} image(s); std: population standard deviation over the images.")
    lines.append(CONVENTIONS + ".")
    return "\n".join(lines)


def write_csv(path: Path, scores: Mapping[str, Mapping[str, float]]) -> None:
    """Write one row per image: ``name`` then the metrics in :data:`METRIC_NAMES` order.

    Parameters
    ----------
    path : pathlib.Path
        CSV file to write (its folder is created if needed).
    scores : mapping of str to mapping of str to float
        Image name -> its metrics.

    Raises
    ------
    DataError
        If the file cannot be written.

    Example
    -------
    >>> write_csv(Path("scores.csv"), {"00004N": {"EN": 6.2, ...}})  # doctest: +SKIP
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["name", *METRIC_NAMES])
            for name, metrics in scores.items():
                writer.writerow([name, *(repr(float(metrics[key])) for key in METRIC_NAMES)])
    except OSError as error:
        raise DataError(f"cannot write CSV file {path}: {error.strerror or error}") from None
