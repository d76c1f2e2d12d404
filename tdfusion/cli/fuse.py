"""``tdfusion fuse``: fuse every pair of two folders with a trained network."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from tdfusion.cli.options import (
    add_device_option,
    add_source_folder_options,
    add_tile_options,
    output_folder,
    positive_int,
    weights_file,
)
from tdfusion.errors import CheckpointError
from tdfusion.nets.bundled import DEFAULT_FUSION_WEIGHTS

if TYPE_CHECKING:
    from torch import nn

__all__ = ["add_parser", "load_model", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``fuse`` sub-command.

    Parameters
    ----------
    subparsers : argparse._SubParsersAction
        The top-level parser's sub-command registry.

    Returns
    -------
    argparse.ArgumentParser
        The sub-command's parser, with ``handler`` set to :func:`run`.
    """
    parser = subparsers.add_parser(
        "fuse",
        help="fuse folders of infrared/visible pairs with a trained network",
        description=(
            "Fuse each infrared image with the visible image of the same file stem and write "
            "OUT/<stem>.png at the input size: RGB when a source has colour (the fused Y "
            "channel with the colour source's chroma, or both blended), grey otherwise. The "
            "network's output is written as it is (rounded and clipped); --stretch applies the "
            "per-image min-max stretching of the research code, which inflates EN/SD/SF/AG."
        ),
    )
    add_source_folder_options(parser)
    parser.add_argument("--out", required=True, type=output_folder, help="output folder (created)")
    parser.add_argument(
        "--weights",
        type=weights_file,
        default=None,
        help=(
            "ReFusionNet weights: a name of the bundled weights, our save_pretrained file, a "
            f"trainer checkpoint, or the authors' .pth files (default: the bundled "
            f"{DEFAULT_FUSION_WEIGHTS!r} weights, trained by tdfusion for infrared-visible "
            "fusion; see its model card)"
        ),
    )
    add_device_option(parser)
    parser.add_argument(
        "--batch",
        type=positive_int,
        default=1,
        help="pairs per forward pass (pairs are fused one by one "
        "when sizes differ; kept for symmetry with training, 1 is fastest on the CPU)",
    )
    add_tile_options(parser)
    parser.add_argument("--stretch", action="store_true", help="min-max stretch each output")
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip bad pairs (listed at the end) instead of stopping",
    )
    parser.set_defaults(handler=run)
    return parser


def load_model(args: argparse.Namespace) -> nn.Module:
    """The fusion network that ``--weights`` names (the bundled weights without it), on
    ``--device``, for inference.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed ``weights`` and ``device``.

    Returns
    -------
    torch.nn.Module
        The network in eval mode.

    Raises
    ------
    CheckpointError
        If the file is not found, unreadable, not a fusion network or holds non-finite values.
    """
    from tdfusion.inference import load_fusion_model

    weights = DEFAULT_FUSION_WEIGHTS if args.weights is None else args.weights
    try:
        return load_fusion_model(weights, args.device)
    except FileNotFoundError as error:
        raise CheckpointError(str(error)) from None


def run(args: argparse.Namespace) -> int:
    """Fuse the folders named in ``args``; print a summary.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed arguments of the ``fuse`` sub-command.

    Returns
    -------
    int
        0 when every pair was fused, 1 when some were skipped (``--skip-bad``).
    """
    from tdfusion.inference import fuse_folders

    if args.weights is None:
        print(
            f"using the bundled {DEFAULT_FUSION_WEIGHTS!r} weights (infrared-visible; pass "
            "--weights for others)",
            flush=True,
        )
    model = load_model(args)
    report = fuse_folders(
        model,
        args.ir,
        args.vis,
        args.out,
        tile=args.tile,
        overlap=args.overlap,
        stretch=args.stretch,
        skip_bad=args.skip_bad,
        batch=args.batch,
    )
    print(
        f"fused {len(report.written)} pair(s) into {args.out} "
        f"({report.seconds_per_pair:.2f} s per pair)"
    )
    for name, reason in report.skipped:
        print(f"skipped {name}: {reason}", file=sys.stderr)
    return 1 if report.skipped else 0
