"""``tdfusion weights``: heat maps of the learned loss weight w_a from a trained generator."""

from __future__ import annotations

import argparse

from tdfusion.cli.options import (
    add_device_option,
    add_source_folder_options,
    output_folder,
    weights_file,
)
from tdfusion.errors import CheckpointError

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``weights`` sub-command.

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
        "weights",
        help="write heat maps of the learned loss weights (w_a) of a trained generator",
        description=(
            "For each infrared/visible pair (matched by file stem) write OUT/<stem>_wa.png, "
            "a heat map of the weight w_a the loss generator gives the infrared image (dark: "
            "the visible image dominates the loss, yellow: the infrared), and "
            "OUT/<stem>_wa_overlay.png over the visible image."
        ),
    )
    add_source_folder_options(parser)
    parser.add_argument(
        "--checkpoint",
        required=True,
        type=weights_file,
        help="a trainer checkpoint, or LossGenerator weights written by save_pretrained",
    )
    parser.add_argument("--out", required=True, type=output_folder, help="output folder (created)")
    add_device_option(parser)
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Write the weight maps for the folders named in ``args``.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed arguments of the ``weights`` sub-command.

    Returns
    -------
    int
        0 on success.
    """
    from tdfusion.devices import resolve_device
    from tdfusion.inference import save_weight_maps
    from tdfusion.nets import LossGenerator

    device = resolve_device(args.device)
    try:
        generator = LossGenerator.from_pretrained(args.checkpoint).to(device).eval()
    except FileNotFoundError as error:
        raise CheckpointError(str(error)) from None
    written = save_weight_maps(generator, args.ir, args.vis, args.out)
    print(f"wrote {len(written)} file(s) to {args.out}")
    return 0
