"""Command-line options that several sub-commands share, defined once."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_device_option", "add_source_folder_options"]


def add_source_folder_options(parser: argparse.ArgumentParser) -> None:
    """Add the required ``--ir`` and ``--vis`` folders, whose pairs match by file stem.

    Parameters
    ----------
    parser : argparse.ArgumentParser
        A sub-command's parser.

    Example
    -------
    >>> parser = argparse.ArgumentParser()
    >>> add_source_folder_options(parser)
    >>> parser.parse_args(["--ir", "ir", "--vis", "vi"]).vis
    PosixPath('vi')
    """
    parser.add_argument("--ir", required=True, type=Path, help="folder of infrared images")
    parser.add_argument("--vis", required=True, type=Path, help="folder of visible images")


def add_device_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--device`` (default ``None``: CUDA when available, else the CPU).

    Parameters
    ----------
    parser : argparse.ArgumentParser
        A sub-command's parser.

    Example
    -------
    >>> parser = argparse.ArgumentParser()
    >>> add_device_option(parser)
    >>> parser.parse_args([]).device is None
    True
    """
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)"
    )
