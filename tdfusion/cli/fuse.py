"""``tdfusion fuse``: fuse every pair of two folders with a trained network."""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import TYPE_CHECKING

from tdfusion.cli.options import (
    add_argument_check,
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
    parser.add_argument(
        "--out",
        required=True,
        type=output_folder,
        help="output folder (created); a file of the same name already there is replaced",
    )
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
    _add_speed_options(parser)
    parser.set_defaults(handler=run)
    return parser


def _add_speed_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--precision``, ``--channels-last`` and ``--compile``, each with its cost in
    accuracy in the help; ``--precision fp16`` is refused on the CPU.

    Parameters
    ----------
    parser : argparse.ArgumentParser
        A sub-command's parser.
    """
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16", "fp16"),
        default="fp32",
        help="arithmetic of the network (default fp32, as trained). bf16: bfloat16 autocast, "
        "for GPUs; fused images move by up to 1e-2 of the 0-1 range (measured: 7.5e-3 to "
        "9.9e-3 over the MSRS example pairs with the bundled weights, 2-3 grey levels of 255) "
        "and on the CPU it is no faster than fp32. fp16: float16 autocast, moves images by "
        "about 7e-4; GPU only (on the CPU it is about 20x slower, and refused)",
    )
    parser.add_argument(
        "--channels-last",
        action="store_true",
        help="convolution weights in channels-last order, as cuDNN prefers (GPU); the same "
        "output to float rounding (1e-5), no gain on the CPU",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the network at the first pair (it takes minutes); the same output "
        "to float rounding (3e-7 measured on the CPU). If compiling fails, one warning and the "
        "network runs uncompiled. On the CPU the compiled network is not faster than the "
        "default",
    )
    add_argument_check(parser, _half_precision_needs_a_gpu)


def _half_precision_needs_a_gpu(args: argparse.Namespace) -> str | None:
    if args.precision != "fp16":
        return None
    from tdfusion.devices import resolve_device

    if resolve_device(args.device).type == "cpu":
        return (
            "--precision fp16 needs a GPU (on the CPU float16 runs about 20x slower than fp32); "
            "use --precision bf16 or fp32 on the CPU"
        )
    return None


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
    from tdfusion.inference import accelerate, fuse_folders

    if args.weights is None:
        print(
            f"using the bundled {DEFAULT_FUSION_WEIGHTS!r} weights (infrared-visible; pass "
            "--weights for others)",
            flush=True,
        )
    model = accelerate(
        load_model(args),
        precision=args.precision,
        channels_last=args.channels_last,
        compile=args.compile,
    )
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning
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
        f"fused {len(report.written)} pair(s) into {args.out} in {report.wall_seconds:.1f} s: "
        f"{report.pairs_per_second:.2f} pairs/s, {report.pixels_per_second / 1e6:.2f} "
        f"megapixels/s (network {report.seconds_per_pair:.2f} s per pair)"
    )
    for name, reason in report.skipped:
        print(f"skipped {name}: {reason}", file=sys.stderr)
    return 1 if report.skipped else 0


def _one_line_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: object = None,
    line: str | None = None,
) -> None:
    print(f"tdfusion fuse: warning: {message}", file=sys.stderr, flush=True)
