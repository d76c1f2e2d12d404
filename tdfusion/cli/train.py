"""``tdfusion train``: train with one of the paper's recipes (or a JSON config), resumably."""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tdfusion.cli.options import (
    add_device_option,
    add_malloc_option,
    apply_malloc_option,
    non_negative_int,
    output_folder,
    positive_float,
    positive_int,
)

if TYPE_CHECKING:
    from tdfusion.recipes import Recipe

__all__ = ["SMOKE_SETTINGS", "add_parser", "run"]

#: The tiny configuration of ``--smoke``: one short epoch on the bundled sample.
SMOKE_SETTINGS = {
    "epochs": 1,
    "meta_steps": 1,
    "fusion_steps": 2,
    "fusion_crop": 64,
    "task_size": (96, 128),
    "batch_size": 1,
    "stride": 1,
}


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``train`` sub-command.

    Parameters
    ----------
    subparsers : argparse._SubParsersAction
        The top-level parser's sub-command registry.

    Returns
    -------
    argparse.ArgumentParser
        The sub-command's parser, with ``handler`` set to :func:`run`.
    """
    from tdfusion.inference.acceleration import PRECISIONS
    from tdfusion.recipes import PRESETS, RECIPES

    parser = subparsers.add_parser(
        "train",
        help=(
            "train TDFusion with a paper recipe (MSRS/FMB segmentation, M3FD/LLVIP detection) "
            "or pre-train fusion weights (roadscene-pretrain)"
        ),
        description=(
            "Train ReFusionNet, the loss generator and the task network (SegFormer-b0 or "
            "YOLOv8-n, from scratch) with the paper's protocol on a dataset in its standard "
            "layout, or, with --recipe roadscene-pretrain, ReFusionNet alone under a fixed "
            "fusion loss on a folder holding ir/ and vi/ (the bundled tdfusion-ivif weights). "
            "OUT receives recipe.json, checkpoint.pt (every epoch; a rerun resumes from "
            "it), training_log.csv, fusion_model.pt and loss_generator.pt. A rerun that "
            "resumes must keep the settings of OUT/recipe.json except --epochs, --num-workers, "
            "--precision, --compile, --channels-last and --grad-checkpointing (it is refused "
            "otherwise, and so is a checkpoint without OUT/recipe.json), and does not read "
            "or compare --init-weights again; a rerun at or past --epochs trains and writes "
            "nothing. Training images whose headers cannot be read or whose pair differs in "
            "size are refused before anything is written. Settings given on "
            "the command line override the recipe and the --config file. Under torchrun "
            "(torchrun --nproc_per_node=N -m tdfusion train ...) it trains data-parallel over the "
            "N processes with no extra flag; --batch-size is then per process."
        ),
    )
    parser.add_argument("--recipe", choices=sorted(RECIPES), help="paper recipe")
    parser.add_argument(
        "--config",
        type=Path,
        help=(
            'JSON object of recipe settings (the fields of tdfusion.recipes.Recipe, and "name" '
            "for the recipe to start from); each value is checked against its type and range"
        ),
    )
    parser.add_argument("--data-root", type=Path, help="dataset root in its standard layout")
    parser.add_argument(
        "--out", type=output_folder, default=Path("runs/tdfusion"), help="output folder"
    )
    add_device_option(parser)
    add_malloc_option(parser)
    parser.add_argument("--epochs", type=positive_int, help="epochs (paper: 50)")
    parser.add_argument(
        "--meta-steps", type=non_negative_int, help="generator updates per epoch (paper: 200)"
    )
    parser.add_argument("--fusion-steps", type=positive_int, help="cap on fusion steps per epoch")
    parser.add_argument(
        "--batch-size", type=positive_int, help="pairs per batch before the swap (paper: 1)"
    )
    parser.add_argument(
        "--lr", type=positive_float, help="Adam learning rate of F and T (paper: 1e-4)"
    )
    parser.add_argument("--inner-lr", type=positive_float, help="inner step size (paper: 1e-4)")
    parser.add_argument(
        "--generator-lr", type=positive_float, help="generator step size (paper: 1e-4)"
    )
    parser.add_argument("--fusion-crop", type=positive_int, help="fusion-loss crop (paper: 256)")
    parser.add_argument(
        "--task-size", type=positive_int, nargs=2, metavar=("H", "W"), help="task input size"
    )
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help=(
            "'research' reproduces the authors' research code's meta and fusion steps (squared "
            "weights, T adapted by its own Adam, cross-entropy at the label resolution, T fed "
            "with F after its update); 'default' is tdfusion's (the paper's equations)"
        ),
    )
    parser.add_argument(
        "--precision",
        choices=list(PRECISIONS),
        help=(
            "autocast type of the networks' forwards (parameters, losses, the inner step and "
            "the hypergradient stay float32); fp16 needs --meta-steps 0, bf16 does not "
            "(default: fp32)"
        ),
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        default=None,
        help="torch.compile the fusion phase's networks (uncompiled, with a warning, on failure)",
    )
    parser.add_argument(
        "--channels-last",
        action="store_true",
        default=None,
        help="networks and images in channels-last memory order (faster convolutions on GPUs)",
    )
    parser.add_argument(
        "--grad-checkpointing",
        action="store_true",
        default=None,
        help=(
            "checkpoint the blocks of the fusion network and the loss generator: the meta "
            "step's memory peak falls by about 42%% for 1.12 times the time"
        ),
    )
    parser.add_argument("--seed", type=int, help="random seed")
    parser.add_argument(
        "--init-weights",
        help="fusion weights to start from (a bundled name, a weights file or a checkpoint)",
    )
    parser.add_argument("--num-workers", type=non_negative_int, help="data-loading processes")
    parser.add_argument(
        "--no-resume",
        action="store_true",
        help=(
            "start over even if OUT has a checkpoint: the earlier run's checkpoint.pt, "
            "fusion_model.pt and loss_generator.pt in OUT are deleted (and its rows of "
            "training_log.csv dropped) when training starts"
        ),
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help=(
            "a tiny run on the bundled sample laid out in the recipe's format (for testing); a "
            "later training stage whose --init-weights file is absent starts from the bundled "
            "weights instead, and says so"
        ),
    )
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Train as the parsed arguments say.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed arguments of the ``train`` sub-command.

    Returns
    -------
    int
        0 on success.
    """
    from tdfusion.distributed import distributed_session, is_main_process
    from tdfusion.errors import DataError
    from tdfusion.recipes import NothingToTrainWarning, load_recipe, make_smoke_dataset, train

    apply_malloc_option(args)

    overrides = {
        "epochs": args.epochs,
        "meta_steps": args.meta_steps,
        "fusion_steps": args.fusion_steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "inner_lr": args.inner_lr,
        "generator_lr": args.generator_lr,
        "fusion_crop": args.fusion_crop,
        "task_size": args.task_size,
        "seed": args.seed,
        "init_weights": args.init_weights,
        "num_workers": args.num_workers,
        "preset": args.preset,
        "precision": args.precision,
        "compile": args.compile,
        "channels_last": args.channels_last,
        "grad_checkpointing": args.grad_checkpointing,
    }
    if args.smoke:
        # No meta step at first: fixed loss weights have no generator to update. Learned ones
        # get the smoke run's meta steps below, once the loss weights are known.
        smoke = {**SMOKE_SETTINGS, "meta_steps": 0}
        overrides = {**smoke, **{k: v for k, v in overrides.items() if v is not None}}
    if args.recipe is None and args.config is None:
        raise DataError("give a --recipe or a --config file")
    recipe = load_recipe(args.recipe, args.config, **overrides)
    if args.smoke and args.meta_steps is None and recipe.loss_weights == "learned":
        recipe = recipe.replace(meta_steps=SMOKE_SETTINGS["meta_steps"])
    resuming = not args.no_resume and (args.out / "checkpoint.pt").is_file()
    if args.smoke and args.init_weights is None and not resuming:
        recipe = smoke_init_weights(recipe)
    with (
        distributed_session(device=args.device),
        tempfile.TemporaryDirectory(prefix="tdfusion-smoke-") as scratch,
    ):
        data_root = args.data_root
        if args.smoke and data_root is None:
            data_root = make_smoke_dataset(recipe, scratch)
        if data_root is None:
            raise DataError("--data-root is required (or --smoke for the bundled sample)")
        with warnings.catch_warnings():
            warnings.simplefilter("always", NothingToTrainWarning)
            warnings.showwarning = _NothingToTrainLine(warnings.showwarning)
            trainer = train(
                recipe, data_root, args.out, device=args.device, resume=not args.no_resume
            )
            said = warnings.showwarning.said  # type: ignore[attr-defined]
        if said is not None:
            # Nothing was trained and nothing written (recipe.json included): not an error.
            print(
                f"nothing to train: {args.out} is at epoch {said.epoch}, --epochs {said.epochs}; "
                "pass a larger --epochs to train further"
            )
        elif is_main_process():
            processes = f" x {trainer.world_size} processes" if trainer.distributed else ""
            print(
                f"trained {recipe.name} for {trainer.epoch} epoch(s) on {trainer.device}"
                f"{processes}; results in {args.out} (fusion_model.pt for 'tdfusion fuse "
                "--weights')"
            )
    return 0


def smoke_init_weights(recipe: Recipe) -> Recipe:
    """The recipe a ``--smoke`` run trains: with the bundled weights for ``init_weights`` when
    the recipe's are not found, saying so in one line.

    A later training stage starts from the file an earlier stage writes
    (``runs/<stage>/fusion_model.pt``), which a smoke run does not have. The bundled
    ``tdfusion-ivif`` weights are the last stage's ReFusionNet, the network every stage trains,
    so the smoke run still fine-tunes trained weights, as the stage does.

    Parameters
    ----------
    recipe : Recipe
        The recipe, with the smoke settings applied.

    Returns
    -------
    Recipe
        ``recipe``, or a copy whose ``init_weights`` are the bundled weights.
    """
    from tdfusion.distributed import is_main_process
    from tdfusion.nets.bundled import DEFAULT_FUSION_WEIGHTS
    from tdfusion.nets.pretrained import resolve_checkpoint_path

    if recipe.init_weights is None:
        return recipe
    try:
        resolve_checkpoint_path(recipe.init_weights)
    except FileNotFoundError:
        if is_main_process():
            print(
                f"smoke run: init_weights {recipe.init_weights!r} not found (an earlier stage "
                f"writes it); starting from the bundled {DEFAULT_FUSION_WEIGHTS!r} weights",
                flush=True,
            )
        return recipe.replace(init_weights=DEFAULT_FUSION_WEIGHTS)
    return recipe


class _NothingToTrainLine:
    """A ``warnings.showwarning`` that keeps a :class:`~tdfusion.recipes.NothingToTrainWarning`
    (``said``) for the command to report in its own words and shows every other warning as
    ``show`` does."""

    def __init__(self, show: Any) -> None:
        self.show = show
        self.said: Any = None

    def __call__(
        self,
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: Any = None,
        line: str | None = None,
    ) -> None:
        from tdfusion.recipes import NothingToTrainWarning

        if isinstance(message, NothingToTrainWarning):
            self.said = message
        else:
            self.show(message, category, filename, lineno, file, line)
