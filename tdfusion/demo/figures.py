"""The demo's pictures: per-pair comparisons, weight maps with a colour bar, training curves.

Every figure says what its colours mean: ``w_a`` is the weight of the infrared image in the
intensity term of the fusion loss (``w_b = 1 - w_a`` that of the visible image), drawn with
matplotlib's diverging ``RdBu_r`` centred on 1/2, so red means *infrared dominates*
(``w_a > 1/2``), blue *visible dominates* and white *equal weights*, whatever range the
colour bar spans. Needs matplotlib (the ``all`` extra).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tdfusion.errors import OptionalDependencyError

__all__ = [
    "WEIGHT_LEGEND",
    "comparison_figure",
    "training_curve_figure",
    "weight_map_figure",
    "weight_range",
]

#: The one-line legend of every ``w_a`` picture.
WEIGHT_LEGEND = (
    "w_a = weight of the infrared image in the intensity loss (w_b = 1 - w_a): "
    "red = infrared dominates, blue = visible dominates, white = equal"
)

_COLOURMAP = "RdBu_r"  # diverging: white at the centre, 1/2
_ARM_COLOURS = {"learned": "tab:red", "fixed": "tab:blue"}
_ARM_LABELS = {"learned": "learned loss", "fixed": "fixed loss (w = 1/2)"}


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - matplotlib is in the 'all' extra
        raise OptionalDependencyError(
            "the demo's figures need matplotlib: pip install 'tdfusion[all]'"
        ) from error
    return plt


def weight_range(weight_a: np.ndarray, min_span: float = 0.05) -> tuple[float, float]:
    """Colour-bar limits for a ``w_a`` map, centred on 1/2 (equal weights).

    The limits are ``1/2 -+ d`` with ``d`` the larger distance of the map's 1st and 99th
    percentiles from 1/2, at least ``min_span / 2``: with a diverging palette the centre
    colour then always means equal weights, and each side one source. A map that is nearly
    uniform at 1/2 is drawn over at least ``min_span``, so that noise of a few thousandths
    does not look like structure; the colour bar shows the values either way.

    Parameters
    ----------
    weight_a : numpy.ndarray
        The map, values in [0, 1].
    min_span : float
        Smallest range shown.

    Returns
    -------
    (float, float)
        ``(vmin, vmax)`` inside [0, 1], symmetric about 1/2.

    Example
    -------
    >>> weight_range(np.full((4, 4), 0.5))
    (0.475, 0.525)
    >>> weight_range(np.full((4, 4), 0.3))  # red and blue stay infrared and visible
    (0.3, 0.7)
    """
    low, high = (float(v) for v in np.percentile(weight_a, [1, 99]))
    half = min(0.5, max(abs(low - 0.5), abs(high - 0.5), min_span / 2))
    return round(0.5 - half, 6), round(0.5 + half, 6)


def _draw_boxes(
    axis: Any, boxes: torch.Tensor, size: tuple[int, int], classes: Sequence[str]
) -> None:
    """Object boxes in black: the weight maps' palette is white at equal weights."""
    from matplotlib.patches import Rectangle

    height, width = size
    for _, xc, yc, w, h in boxes.tolist():
        axis.add_patch(
            Rectangle(
                ((xc - w / 2) * width, (yc - h / 2) * height),
                w * width,
                h * height,
                fill=False,
                edgecolor="black",
                linewidth=0.9,
            )
        )
    del classes  # the class names are in the figure's caption, not on the tiny boxes


def comparison_figure(
    path: str | Path,
    name: str,
    sources: tuple[np.ndarray, np.ndarray],
    fused: Mapping[str, tuple[np.ndarray, Mapping[str, float]]],
    weight_a: np.ndarray | None,
    boxes: torch.Tensor,
    classes: Sequence[str],
) -> Path:
    """One pair: infrared | visible | fixed-loss fusion | learned-loss fusion | ``w_a``.

    Parameters
    ----------
    path : str or pathlib.Path
        PNG to write (folders are created).
    name : str
        The pair's name, for the title.
    sources : (numpy.ndarray, numpy.ndarray)
        Infrared and visible images, ``uint8`` (H, W, 3) or (H, W).
    fused : mapping
        Arm (``"fixed"``, ``"learned"``) -> (``uint8`` fused image, its scores with
        ``task_loss``, ``VIF`` and ``Qabf``).
    weight_a : numpy.ndarray or None
        The learned ``w_a`` map (H, W), or ``None`` (the panel is left out).
    boxes : torch.Tensor
        (K, 5) normalised ``[class, x_center, y_center, width, height]`` boxes.
    classes : sequence of str
        Class names, for the caption.

    Returns
    -------
    pathlib.Path
        The file written.
    """
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    panels: list[tuple[str, np.ndarray]] = [("infrared", sources[0]), ("visible", sources[1])]
    for arm in ("fixed", "learned"):
        if arm in fused:
            image, scores = fused[arm]
            panels.append(
                (
                    f"{_ARM_LABELS[arm]}\nVIF {scores['VIF']:.3f}  Qabf {scores['Qabf']:.3f}  "
                    f"task loss {scores['task_loss']:.2f}",
                    image,
                )
            )
    count = len(panels) + (weight_a is not None)
    figure, axes = plt.subplots(
        1,
        count,
        figsize=(3.6 * count + (0.6 if weight_a is not None else 0), 3.5),
        dpi=110,
        gridspec_kw={"width_ratios": [1] * len(panels) + ([1.12] if weight_a is not None else [])},
    )
    height, width = sources[0].shape[:2]
    for axis, (title, image) in zip(axes, panels):
        axis.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255)
        axis.set_title(title, fontsize=9)
        axis.set_axis_off()
    if weight_a is not None:
        axis = axes[-1]
        vmin, vmax = weight_range(weight_a)
        shown = axis.imshow(weight_a, cmap=_COLOURMAP, vmin=vmin, vmax=vmax)
        _draw_boxes(axis, boxes, (height, width), classes)
        axis.set_title(
            f"learned w_a (mean {weight_a.mean():.3f})\nblack boxes: objects", fontsize=9
        )
        axis.set_axis_off()
        bar = figure.colorbar(shown, ax=axis, fraction=0.046, pad=0.03)
        bar.ax.tick_params(labelsize=7)
        bar.set_label("w_a (red: infrared, blue: visible)", fontsize=8)
    figure.suptitle(
        f"{name}: each fusion by a model that did not train on this pair "
        f"({', '.join(classes)} boxes). {WEIGHT_LEGEND}",
        fontsize=8,
        y=0.02,
        va="bottom",
    )
    figure.subplots_adjust(left=0.005, right=0.97, top=0.86, bottom=0.08, wspace=0.04)
    figure.savefig(path)
    plt.close(figure)
    return path


def weight_map_figure(
    path: str | Path,
    name: str,
    weight_a: np.ndarray,
    visible: np.ndarray,
    boxes: torch.Tensor,
) -> Path:
    """``w_a`` of one pair, alone and over the visible image, with a colour bar and legend.

    Parameters
    ----------
    path : str or pathlib.Path
        PNG to write (folders are created).
    name : str
        The pair's name.
    weight_a : numpy.ndarray
        (H, W) map in [0, 1].
    visible : numpy.ndarray
        ``uint8`` visible image, (H, W, 3) or (H, W).
    boxes : torch.Tensor
        (K, 5) normalised boxes, drawn in black.

    Returns
    -------
    pathlib.Path
        The file written.
    """
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    vmin, vmax = weight_range(weight_a)
    grey = visible if visible.ndim == 2 else visible.mean(axis=-1)
    figure, (*axes, bar_axis) = plt.subplots(
        1, 3, figsize=(10.6, 4.0), dpi=110, gridspec_kw={"width_ratios": [1, 1, 0.035]}
    )
    shown = axes[0].imshow(weight_a, cmap=_COLOURMAP, vmin=vmin, vmax=vmax)
    axes[0].set_title(f"{name}: learned w_a (mean {weight_a.mean():.3f})", fontsize=9)
    axes[1].imshow(grey, cmap="gray", vmin=0, vmax=255)
    axes[1].imshow(weight_a, cmap=_COLOURMAP, vmin=vmin, vmax=vmax, alpha=0.55)
    axes[1].set_title("over the visible image", fontsize=9)
    for axis in axes:
        _draw_boxes(axis, boxes, weight_a.shape, ())
        axis.set_axis_off()
    bar = figure.colorbar(shown, cax=bar_axis)
    bar.set_label("w_a (red: infrared, blue: visible)", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    figure.text(0.01, 0.02, WEIGHT_LEGEND + "; black boxes: objects", fontsize=8)
    figure.subplots_adjust(left=0.01, right=0.93, top=0.92, bottom=0.1, wspace=0.04)
    figure.savefig(path)
    plt.close(figure)
    return path


def _mean_curve(series: Sequence[Sequence[float]]) -> np.ndarray:
    length = min(len(s) for s in series)
    return np.nanmean(np.array([list(s)[:length] for s in series], dtype=np.float64), axis=0)


def training_curve_figure(path: str | Path, runs: Sequence[Any], settings: Any) -> Path:
    """Per-epoch detector loss, fusion loss and ``w_a`` (inside and outside the objects).

    The loss curves are means over the folds and seeds of each arm; ``w_a`` is drawn for
    every run of the learned arm, inside the object boxes (solid) and outside (dashed), from
    before the first epoch (epoch 0) on.

    Parameters
    ----------
    path : str or pathlib.Path
        PNG to write.
    runs : sequence of ArmRun
        The demo's runs.
    settings : DemoSettings
        The protocol (for the title).

    Returns
    -------
    pathlib.Path
        The file written.
    """
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    path = Path(path)
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2), dpi=100)
    for arm in ("learned", "fixed"):
        mine = [run for run in runs if run.arm == arm and run.history]
        if not mine:
            continue
        epochs = np.arange(1, min(len(run.history) for run in mine) + 1)
        for axis, key in ((axes[0], "task_loss"), (axes[1], "fusion_loss")):
            values = _mean_curve(
                [[entry.get(key, np.nan) for entry in run.history] for run in mine]
            )
            axis.plot(epochs, values, marker="o", color=_ARM_COLOURS[arm], label=_ARM_LABELS[arm])
        if arm == "learned" and any("meta_task_loss" in e for e in mine[0].history):
            values = _mean_curve(
                [[entry.get("meta_task_loss", np.nan) for entry in run.history] for run in mine]
            )
            axes[0].plot(
                epochs,
                values,
                marker="s",
                linestyle=":",
                color=_ARM_COLOURS[arm],
                label="learned: meta-test loss (G's objective)",
            )
    axes[0].set_title("detector loss while training (mean over runs)")
    axes[1].set_title("fusion loss of F (each under its own weights)")
    from matplotlib.lines import Line2D

    learned = [run for run in runs if run.arm == "learned" and run.weight_curve]
    colours = ("tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:olive", "tab:cyan")
    styles = (("inside", "-", "o", "inside the objects"), ("outside", "--", ".", "outside"))
    styles += (("mean", ":", None, "whole image"),)
    handles = []
    for index, run in enumerate(learned):
        epochs = [record["epoch"] for record in run.weight_curve]
        colour = colours[index % len(colours)]
        for key, style, marker, _ in styles:
            axes[2].plot(
                epochs,
                [record[key] for record in run.weight_curve],
                linestyle=style,
                marker=marker,
                color=colour,
                linewidth=1.0 if key == "mean" else 1.5,
            )
        handles.append(Line2D([], [], color=colour, label=f"seed {run.seed}, fold {run.fold}"))
    handles += [
        Line2D([], [], color="grey", linestyle=style, marker=marker, label=where)
        for _, style, marker, where in styles
    ]
    if learned:
        axes[2].axhline(0.5, color=_ARM_COLOURS["fixed"])
        handles.append(Line2D([], [], color=_ARM_COLOURS["fixed"], label=_ARM_LABELS["fixed"]))
    axes[2].set_title("learned w_a (infrared weight), one colour per run")
    for axis in axes:
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    if handles:
        axes[2].legend(handles=handles, fontsize=7, ncol=2)
    axes[0].set_ylabel("loss")
    axes[1].set_ylabel("loss")
    axes[2].set_ylabel("w_a")
    figure.suptitle(
        f"TDFusion demo: {settings.epochs} epochs, {settings.meta_steps} meta step(s) per epoch "
        f"(learned arm), {settings.folds} folds, seed(s) {', '.join(map(str, settings.seeds))}",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
