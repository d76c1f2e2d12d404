"""Command-line options that several sub-commands share, defined and checked once.

Every value is checked by argparse as it is parsed (types below), and checks that involve two
options are registered with :func:`add_argument_check` and run by :func:`check_arguments`, so
that every bad argument ends in one line ``tdfusion COMMAND: error: ...`` and exit status 2.
"""

from __future__ import annotations

import argparse
import textwrap
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "HelpFormatter",
    "OneLineParser",
    "add_argument_check",
    "add_device_option",
    "add_malloc_option",
    "add_source_folder_options",
    "add_tile_options",
    "apply_malloc_option",
    "check_arguments",
    "device",
    "non_negative_int",
    "output_folder",
    "positive_float",
    "positive_int",
    "repeated_values",
    "weights_file",
]


class OneLineParser(argparse.ArgumentParser):
    """An :class:`argparse.ArgumentParser` whose usage errors take one line (and exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        """Print ``PROG: error: MESSAGE (see PROG --help)`` and exit with status 2.

        Parameters
        ----------
        message : str
            What was wrong.
        """
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def _integer(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1.

    Parameters
    ----------
    text : str
        The option's value.

    Returns
    -------
    int
        The number.

    Example
    -------
    >>> positive_int("3")
    3
    >>> positive_int("0")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: expected a positive integer, got 0
    """
    value = _integer(text, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An argparse type: an integer of at least 0.

    Parameters
    ----------
    text : str
        The option's value.

    Returns
    -------
    int
        The number.
    """
    value = _integer(text, "an integer of at least 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer of at least 0, got {value}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number above 0.

    Parameters
    ----------
    text : str
        The option's value.

    Returns
    -------
    float
        The number.
    """
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def device(text: str) -> str:
    """An argparse type: a device this machine has (see :func:`tdfusion.devices.check_device`).

    Parameters
    ----------
    text : str
        ``cpu``, ``cuda``, ``cuda:1``, ``mps``.

    Returns
    -------
    str
        ``text``, unchanged.
    """
    from tdfusion.devices import check_device

    try:
        check_device(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def weights_file(text: str) -> Path:
    """An argparse type: a weights file (a directory is refused, unless it has the name of bundled
    weights, which are meant; a missing file is looked up later in the weights folders, see
    :func:`tdfusion.nets.pretrained.resolve_checkpoint_path`).

    Parameters
    ----------
    text : str
        The option's value.

    Returns
    -------
    pathlib.Path
        The path.
    """
    path = Path(text)
    if path.is_dir():
        from tdfusion.nets.bundled import bundled_path

        if bundled_path(text) is not None:
            return path  # the bundled weights, as resolve_checkpoint_path finds them
        raise argparse.ArgumentTypeError(
            f"{text} is a directory; expected a weights file (.pt or .pth)"
        )
    return path


def output_folder(text: str) -> Path:
    """An argparse type: an output folder, existing or not, but not a file.

    Parameters
    ----------
    text : str
        The option's value.

    Returns
    -------
    pathlib.Path
        The path.
    """
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(
            f"{text} is a file; expected a folder (created if missing)"
        )
    return path


def add_argument_check(
    parser: argparse.ArgumentParser, check: Callable[[argparse.Namespace], str | None]
) -> None:
    """Register a check of several options together, run by :func:`check_arguments`.

    Parameters
    ----------
    parser : argparse.ArgumentParser
        A sub-command's parser.
    check : callable
        ``check(args)`` returns a one-line problem, or ``None`` when the arguments are fine.
    """
    checks = [*(parser.get_default("argument_checks") or ()), check]
    parser.set_defaults(argument_checks=checks, argument_parser=parser)


def repeated_values(option: str, values: Sequence[Any] | None) -> str | None:
    """A one-line problem when ``values`` (of ``option``) holds a value twice, else ``None``.

    Parameters
    ----------
    option : str
        The option's name, e.g. ``"--seeds"``.
    values : sequence, optional
        Its values.

    Returns
    -------
    str or None
        The problem, naming the repeated values.

    Example
    -------
    >>> repeated_values("--seeds", [0, 1, 0])
    '--seeds repeats 0: each value counts once'
    """
    counts = Counter(values or ())
    repeats = [str(value) for value, count in counts.items() if count > 1]
    if not repeats:
        return None
    return f"{option} repeats {', '.join(repeats)}: each value counts once"


def check_arguments(args: argparse.Namespace) -> None:
    """Run the checks registered for the parsed sub-command; exit 2 with one line on a problem.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed arguments.
    """
    for check in getattr(args, "argument_checks", None) or ():
        problem = check(args)
        if problem:
            args.argument_parser.error(problem)


def add_source_folder_options(parser: argparse.ArgumentParser) -> None:
    """Add the required ``--ir`` and ``--vis`` folders, whose pairs match by file stem (or two
    image files, one pair).

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
    parser.add_argument(
        "--ir", required=True, type=Path, help="folder of infrared images (or one image file)"
    )
    parser.add_argument(
        "--vis", required=True, type=Path, help="folder of visible images (or one image file)"
    )


def add_device_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--device`` (default ``None``: CUDA when available, else the CPU), checked at once.

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
        "--device",
        type=device,
        default=None,
        help="cpu, cuda, cuda:1, ... (default: cuda if available)",
    )


def add_malloc_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--system-malloc``: leave the C allocator as it is (see :func:`apply_malloc_option`).

    Parameters
    ----------
    parser : argparse.ArgumentParser
        A sub-command's parser.

    Example
    -------
    >>> parser = argparse.ArgumentParser()
    >>> add_malloc_option(parser)
    >>> parser.parse_args([]).system_malloc
    False
    """
    parser.add_argument(
        "--system-malloc",
        action="store_true",
        help=(
            "leave the C library's malloc as it is; by default freed CPU memory is kept for "
            "reuse (glibc), which made meta steps about 5%% faster on the CPU"
        ),
    )


def apply_malloc_option(args: argparse.Namespace) -> bool:
    """Keep freed CPU memory for reuse unless ``--system-malloc`` was given.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed arguments with ``system_malloc``.

    Returns
    -------
    bool
        Whether :func:`tdfusion.allocator.keep_freed_memory` was applied.
    """
    if args.system_malloc:
        return False
    from tdfusion.allocator import keep_freed_memory

    return keep_freed_memory()


def _tile_exceeds_overlap(args: argparse.Namespace) -> str | None:
    from tdfusion.inference.tiling import check_tile_options  # the API's check, the same words

    try:
        check_tile_options(args.tile, args.overlap, names=("--tile", "--overlap"))
    except ValueError as error:
        return str(error)
    return None


def add_tile_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--tile`` and ``--overlap``, with the tile at least twice the overlap.

    Parameters
    ----------
    parser : argparse.ArgumentParser
        A sub-command's parser.
    """
    parser.add_argument(
        "--tile",
        type=positive_int,
        default=None,
        help="fuse in overlapping tiles of this size, at least twice --overlap. Tiling changes "
        "the output, since each tile is fused with its own channel-attention statistics "
        "(measured: up to 16 grey levels of 255, 5.3 on average, on a 1280x1024 LLVIP pair "
        "with --tile 512 and the bundled weights). Without --tile, images of more than "
        "2048x2048 pixels are tiled automatically (with a warning naming the tile), and so is "
        "an image for which memory runs out (tiles of 512)",
    )
    parser.add_argument(
        "--overlap", type=non_negative_int, default=32, help="tile overlap in pixels (default 32)"
    )
    add_argument_check(parser, _tile_exceeds_overlap)


class HelpFormatter(argparse.HelpFormatter):
    """argparse's help formatter, but lines never break inside a hyphenated name, so that
    names such as ``tdfusion-ivif`` or ``--init-weights`` stay whole whatever the width."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        text = self._whitespace_matcher.sub(" ", text).strip()
        return textwrap.wrap(text, width, break_on_hyphens=False)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        text = self._whitespace_matcher.sub(" ", text).strip()
        return textwrap.fill(
            text, width, initial_indent=indent, subsequent_indent=indent, break_on_hyphens=False
        )
