"""``tdfusion demo``: learned against fixed loss on the bundled sample (:mod:`tdfusion.demo`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from tdfusion.cli.options import (
    add_argument_check,
    add_device_option,
    add_malloc_option,
    apply_malloc_option,
    non_negative_int,
    output_folder,
    positive_float,
    positive_int,
    repeated_values,
)

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``demo`` sub-command.

    Parameters
    ----------
    subparsers : argparse._SubParsersAction
        The top-level parser's sub-command registry.

    Returns
    -------
    argparse.ArgumentParser
        The sub-command's parser, with ``handler`` set to :func:`run`.
    """
    from tdfusion.demo import PRETRAINED, DemoSettings

    defaults = DemoSettings()
    parser = subparsers.add_parser(
        "demo",
        help="does the learned loss help the task? learned vs fixed loss on the bundled sample",
        description=(
            f"Fine-tune the pretrained fusion network ({PRETRAINED}) twice with the same seed "
            "and budget, each time training a YOLOv8-n detector from scratch on the bundled "
            "MSRS pairs: under the learned loss (the loss generator trained by meta steps) and "
            "under the fixed loss w_a = w_b = 1/2. Both are scored on pairs they did not train "
            "on (cross-validation) with the detector's loss and mAP, and the fusion metrics. "
            "Writes summary.json, a comparison figure per pair, weight maps, a training curve, "
            "the fused images and every run's checkpoint to OUT. A few minutes on a 2-core "
            "CPU. Needs the 'all' extra (ultralytics, matplotlib)."
        ),
    )
    parser.add_argument("--out", type=output_folder, default=Path("demo_out"), help="output folder")
    add_device_option(parser)
    add_malloc_option(parser)
    parser.add_argument(
        "--epochs",
        type=positive_int,
        default=defaults.epochs,
        help=f"epochs per arm (default {defaults.epochs})",
    )
    parser.add_argument(
        "--meta-steps",
        type=non_negative_int,
        default=defaults.meta_steps,
        help=f"generator updates per epoch in the learned arm (default {defaults.meta_steps})",
    )
    parser.add_argument(
        "--generator-lr",
        type=positive_float,
        default=defaults.generator_lr,
        help=(
            f"step of the normalised generator update (default {defaults.generator_lr:g}; the "
            "paper's 1e-4 is for runs of 10000 meta steps)"
        ),
    )
    parser.add_argument(
        "--seeds",
        type=non_negative_int,
        nargs="+",
        default=list(defaults.seeds),
        help="seeds; each trains both arms on every fold (default 0 1)",
    )
    parser.add_argument(
        "--folds",
        type=positive_int,
        default=defaults.folds,
        help=f"cross-validation folds over the 4 pairs, 2 to 4 (default {defaults.folds})",
    )
    parser.add_argument(
        "--init-weights",
        default=defaults.init_weights,
        help=(
            f"fusion weights both arms start from (default: the bundled {PRETRAINED}); a "
            "checkpoint, a save_pretrained file or the authors' ReFusion_IVIF.pth"
        ),
    )
    parser.add_argument(
        "--workers",
        type=positive_int,
        help=(
            "runs trained at once, one process of one thread each (default: the CPU cores, "
            "up to 4; 1 on a GPU)"
        ),
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue every run from its checkpoint in OUT/runs (finished runs are kept)",
    )
    add_argument_check(parser, lambda args: repeated_values("--seeds", args.seeds))
    add_argument_check(parser, _folds_problem)
    parser.set_defaults(handler=run)
    return parser


def _folds_problem(args: argparse.Namespace) -> str | None:
    from tdfusion.data import sample_dataset

    pairs = len(sample_dataset().names)
    if not 2 <= args.folds <= pairs:
        return f"--folds must be between 2 and {pairs} (the sample's pairs), got {args.folds}"
    return None


def run(args: argparse.Namespace) -> int:
    """Run the demo with the parsed arguments; print the summary.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed arguments of the ``demo`` sub-command.

    Returns
    -------
    int
        0 on success.
    """
    from tdfusion.demo import DemoSettings, run_demo

    apply_malloc_option(args)

    settings = DemoSettings().replace(
        epochs=args.epochs,
        meta_steps=args.meta_steps,
        generator_lr=args.generator_lr,
        seeds=args.seeds,
        folds=args.folds,
        init_weights=args.init_weights,
    )
    result = run_demo(
        args.out, settings, device=args.device, resume=args.resume, workers=args.workers
    )
    print(result["text"])
    return 0
