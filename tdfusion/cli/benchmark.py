"""``tdfusion benchmark``: the paper's downstream table for several fusion models."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from tdfusion.cli.options import (
    add_argument_check,
    add_device_option,
    non_negative_int,
    positive_float,
    positive_int,
    repeated_values,
)

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``benchmark`` sub-command.

    Parameters
    ----------
    subparsers : argparse._SubParsersAction
        The top-level parser's sub-command registry.

    Returns
    -------
    argparse.ArgumentParser
        The sub-command's parser, with ``handler`` set to :func:`run`.
    """
    from tdfusion.benchmark import DATASETS, REFERENCE_RULES, BenchmarkSettings

    defaults = BenchmarkSettings("msrs")
    parser = subparsers.add_parser(
        "benchmark",
        help="retrain a task network on each model's fused images and print the paper's table",
        description=(
            "Fuse the training and test pairs of a labelled dataset (MSRS, FMB, M3FD, LLVIP in "
            "their standard layouts) with every MODEL, train a fresh task network from scratch "
            "on each fused training set with the same seeds and schedule (SegFormer-b0 for "
            "segmentation, YOLOv8-n for detection), score it on the fused test set and print "
            "the table: IoU per class and mIoU, or mAP50 and mAP50-95, mean and spread over "
            "the seeds. A MODEL is LABEL=SPEC or SPEC, where SPEC is a fusion checkpoint "
            "(a run's checkpoint.pt or fusion_model.pt, the authors' .pth, the bundled name) "
            f"or one of the rules {', '.join(REFERENCE_RULES)}."
        ),
    )
    parser.add_argument("--dataset", required=True, choices=sorted(DATASETS), help="layout")
    parser.add_argument("--data-root", required=True, type=Path, help="dataset root")
    parser.add_argument(
        "--models", required=True, nargs="+", metavar="MODEL", help="[LABEL=]SPEC, several"
    )
    add_device_option(parser)
    parser.add_argument(
        "--epochs",
        type=positive_int,
        default=defaults.epochs,
        help=f"task epochs (default {defaults.epochs}, the paper's)",
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=defaults.batch_size, help="task batch size"
    )
    parser.add_argument(
        "--lr", type=positive_float, default=defaults.lr, help="AdamW learning rate"
    )
    parser.add_argument(
        "--seeds", type=non_negative_int, nargs="+", default=list(defaults.seeds), help="seeds (0)"
    )
    parser.add_argument(
        "--task-size",
        type=positive_int,
        nargs=2,
        metavar=("H", "W"),
        help="task input size (default: the paper's for the dataset)",
    )
    parser.add_argument(
        "--stride", type=positive_int, default=1, help="keep every N-th pair (LLVIP: 10)"
    )
    parser.add_argument(
        "--limit", type=positive_int, help="keep only the first N pairs of each split"
    )
    parser.add_argument("--test-split", default="test", help="split to score (default test)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    add_argument_check(parser, _repeated_labels)
    add_argument_check(parser, lambda args: repeated_values("--seeds", args.seeds))
    parser.set_defaults(handler=run)
    return parser


def _repeated_labels(args: argparse.Namespace) -> str | None:
    from tdfusion.benchmark import model_label

    labels = Counter(model_label(entry) for entry in args.models)
    repeated = [label for label, count in labels.items() if count > 1]
    if not repeated:
        return None
    return (
        f"--models gives the label {', '.join(repeated)} to several models; labels must "
        "differ: name them with LABEL=SPEC"
    )


def run(args: argparse.Namespace) -> int:
    """Run the benchmark with the parsed arguments; print the table.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed arguments of the ``benchmark`` sub-command.

    Returns
    -------
    int
        0 on success.
    """
    from tdfusion.benchmark import BenchmarkSettings, run_benchmark
    from tdfusion.files import atomic_path

    settings = BenchmarkSettings(
        args.dataset,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seeds=tuple(args.seeds),
        task_size=tuple(args.task_size) if args.task_size else None,
        stride=args.stride,
        limit=args.limit,
        test_split=args.test_split,
    )
    result = run_benchmark(args.models, args.data_root, settings, device=args.device)
    print(result["table"])
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(args.json) as temporary:
            temporary.write_text(json.dumps(result, indent=1) + "\n")
    return 0
