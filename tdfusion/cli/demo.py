"""``tdfusion demo``: the whole method on the bundled sample, from training to fused images."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from tdfusion.cli.options import (
    add_device_option,
    non_negative_int,
    output_folder,
    positive_int,
)

__all__ = ["add_parser", "run", "run_demo"]


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
    parser = subparsers.add_parser(
        "demo",
        help="train TDFusion with a detection task on the bundled sample and show the results",
        description=(
            "Train the fusion network (ReFusionNet), the loss generator and a YOLOv8-n detector "
            "from scratch on the four bundled MSRS infrared/visible pairs (person, bicycle, car "
            "boxes), with the meta-learned fusion loss; then write the checkpoint, the fused "
            "colour images, heat maps of the learned loss weight w_a, a training curve and "
            "the fusion metrics to OUT. A few minutes on a 2-core CPU. Needs the 'det' extra."
        ),
    )
    parser.add_argument("--out", type=output_folder, default=Path("demo_out"), help="output folder")
    add_device_option(parser)
    parser.add_argument(
        "--epochs", type=positive_int, default=4, help="training epochs (default 4)"
    )
    parser.add_argument(
        "--meta-steps",
        type=non_negative_int,
        default=2,
        help="generator updates per epoch (default 2)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--resume", action="store_true", help="continue from OUT/checkpoint.pt if it exists"
    )
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the demo with the parsed arguments; print a summary.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed arguments of the ``demo`` sub-command.

    Returns
    -------
    int
        0 on success.
    """
    summary = run_demo(
        args.out,
        device=args.device,
        epochs=args.epochs,
        meta_steps=args.meta_steps,
        seed=args.seed,
        resume=args.resume,
    )
    print(summary["text"])
    return 0


def run_demo(
    out: str | Path = "demo_out",
    *,
    device: str | None = None,
    epochs: int = 4,
    meta_steps: int = 2,
    seed: int = 0,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train on the bundled sample with a detection task and write every result to ``out``.

    Parameters
    ----------
    out : str or pathlib.Path
        Output folder (created).
    device : str, optional
        Training device; CUDA when available by default.
    epochs, meta_steps : int
        Training length: epochs, and generator updates per epoch.
    seed : int
        Seed of every random stream.
    resume : bool
        Continue from ``out/checkpoint.pt`` when it exists.
    progress : bool
        Show progress bars.

    Returns
    -------
    dict
        ``"text"`` (the printed summary) and the paths written (``"checkpoint"``,
        ``"fusion_weights"``, ``"fused"``, ``"weight_maps"``, ``"curve"``, ``"metrics"``).
    """
    import torch
    from torch.utils.data import DataLoader

    from tdfusion import LossGenerator, MetaFusionTrainer
    from tdfusion.cli.evaluate import write_csv
    from tdfusion.data import SwapSources, detection_collate, sample_dataset, sample_folders
    from tdfusion.inference import fuse_folders, save_weight_maps
    from tdfusion.metrics import evaluate_folders, summarise
    from tdfusion.nets import ReFusionNet
    from tdfusion.tasks import DetectionTask
    from tdfusion.trainer import CSVLogger

    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    dataset = sample_dataset(task="detection")
    loader = DataLoader(
        dataset,
        batch_size=1,
        shuffle=True,
        collate_fn=SwapSources(detection_collate),
        generator=torch.Generator().manual_seed(seed),
    )
    task = DetectionTask(num_classes=len(dataset.classes))
    trainer = MetaFusionTrainer(
        ReFusionNet(),
        task,
        LossGenerator(),
        inner_lr=1e-3,
        generator_lr=1e-2,
        fusion_lr=1e-3,
        task_lr=1e-3,
        fusion_crop=128,
        task_size=(192, 256),
        device=device,
        seed=seed,
    )
    checkpoint = out / "checkpoint.pt"
    log = out / "training_log.csv"
    if not resume:
        log.unlink(missing_ok=True)
    trainer.fit(
        loader,
        epochs=epochs,
        meta_steps=meta_steps,
        checkpoint=checkpoint,
        resume=checkpoint if resume and checkpoint.is_file() else None,
        callbacks=[CSVLogger(log)],
        progress=progress,
    )
    fusion_weights = trainer.fusion_model.save_pretrained(out / "fusion_model.pt")

    ir_dir, vis_dir = sample_folders()
    trainer.fusion_model.eval()
    report = fuse_folders(trainer.fusion_model, ir_dir, vis_dir, out / "fused", progress=progress)
    trainer.loss_generator.eval()
    maps = save_weight_maps(
        trainer.loss_generator, ir_dir, vis_dir, out / "weights", progress=progress
    )
    curve = _plot_curve(trainer.history, out / "training_curve.png")
    scores = evaluate_folders(out / "fused", ir_dir, vis_dir)
    metrics_path = out / "metrics.csv"
    write_csv(metrics_path, scores)
    means = summarise(scores.values())

    minutes = (time.perf_counter() - started) / 60
    lines = [
        f"TDFusion demo finished in {minutes:.1f} min on {trainer.device}.",
        f"Trained ReFusionNet (fusion), LossGenerator (learned loss) and YOLOv8-n "
        f"({len(dataset.classes)} classes: {', '.join(dataset.classes)}) for {trainer.epoch} "
        f"epochs ({meta_steps} meta steps each) on {len(dataset)} bundled MSRS pairs.",
        "Fusion metrics (mean over the sample): "
        + ", ".join(f"{name} {mean:.3f}" for name, (mean, _) in means.items()),
        f"  checkpoint      {checkpoint}  (resume with --resume)",
        f"  fusion weights  {fusion_weights}  (tdfusion fuse --weights ...)",
        f"  fused images    {out / 'fused'}  ({len(report.written)} colour PNGs)",
        f"  loss weights    {out / 'weights'}  (w_a heat maps and overlays)",
        f"  training curve  {curve if curve else 'not drawn: pip install matplotlib'}",
        f"  metrics         {metrics_path}",
        f"  training log    {log}",
    ]
    return {
        "text": "\n".join(lines),
        "checkpoint": checkpoint,
        "fusion_weights": Path(fusion_weights),
        "fused": report.written,
        "weight_maps": maps,
        "curve": curve,
        "metrics": metrics_path,
    }


def _plot_curve(history: list[dict[str, Any]], path: Path) -> Path | None:
    """Plot the per-epoch losses; ``None`` when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    epochs = [entry["epoch"] + 1 for entry in history]
    panels = {
        "fusion network F (its loss moves as G learns)": {"learnable fusion loss": "fusion_loss"},
        "task and loss generator": {
            "task loss (T, fusion phase)": "task_loss",
            "meta-test task loss (G's objective)": "meta_task_loss",
        },
    }
    figure, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for axis, (title, series) in zip(axes, panels.items()):
        for label, key in series.items():
            values = [entry.get(key, float("nan")) for entry in history]
            axis.plot(epochs, values, marker="o", label=label)
        axis.set_title(title)
        axis.set_xlabel("epoch")
        axis.set_ylabel("mean loss")
        axis.legend()
    figure.suptitle("TDFusion demo: training curves")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
