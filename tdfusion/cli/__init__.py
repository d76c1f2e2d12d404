"""The ``tdfusion`` command line: one sub-command per module of this package.

Each sub-command module provides ``add_parser(subparsers)``, which registers its
:class:`argparse.ArgumentParser` and sets ``handler`` to a function taking the parsed
arguments and returning an exit status.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from tdfusion import __version__
from tdfusion.cli.options import OneLineParser, check_arguments
from tdfusion.errors import TDFusionError

__all__ = ["SUBCOMMANDS", "build_parser", "main"]

#: Sub-command name -> module that defines it (kept in the order ``--help`` lists them).
SUBCOMMANDS: dict[str, str] = {
    "demo": "tdfusion.cli.demo",
    "train": "tdfusion.cli.train",
    "fuse": "tdfusion.cli.fuse",
    "evaluate": "tdfusion.cli.evaluate",
    "weights": "tdfusion.cli.weights",
    "benchmark": "tdfusion.cli.benchmark",
}


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every sub-command registered.

    Returns
    -------
    argparse.ArgumentParser
        The parser for ``tdfusion [--version] COMMAND ...``.
    """
    parser = OneLineParser(
        prog="tdfusion",
        description="Task-driven multi-modal image fusion with a learnable fusion loss.",
    )
    parser.add_argument("--version", action="version", version=f"tdfusion {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for module_name in SUBCOMMANDS.values():
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name; ``sys.argv[1:]`` when omitted.

    Returns
    -------
    int
        The exit status: 0 on success, 2 for a usage or input error the message explains.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    check_arguments(args)
    try:
        status = args.handler(args)
    except TDFusionError as error:
        print(f"tdfusion {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tdfusion {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(status or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
