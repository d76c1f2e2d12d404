"""The paper's downstream protocol: fuse a labelled dataset with each model, retrain the task.

For every fusion model, the training and test pairs of a dataset in its standard layout are
fused (the Y channel, at full size), stored as 8-bit images at the task's input size, and a
*fresh* task network (SegFormer-b0 for MSRS/FMB segmentation, YOLOv8-n for M3FD/LLVIP
detection, from scratch) is trained on the fused training set with the same seed and schedule
for every model, then scored on the fused test set: per-class IoU, mAcc and mIoU, or mAP50,
mAP75 and mAP50-95 (the paper's Table 2 and its class-wise supplement). With several seeds
the table gives the mean and the standard deviation over seeds.

Models are given as specifications (:func:`load_fusion`): the bundled pretrained name, any
checkpoint :meth:`ReFusionNet.from_pretrained <tdfusion.nets.ReFusionNet.from_pretrained>`
reads (a training run's ``checkpoint.pt`` or ``fusion_model.pt``, the authors' ``.pth``
files), or the reference rules ``infrared``, ``visible``, ``mean`` and ``max``.

Example
-------
>>> settings = BenchmarkSettings("msrs", epochs=2)
>>> settings.task, settings.num_classes, settings.task_size
('segmentation', 9, (240, 320))
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tdfusion._progress import bar_options
from tdfusion.errors import CheckpointError, DataError

__all__ = [
    "DATASETS",
    "REFERENCE_RULES",
    "BenchmarkSettings",
    "FusedSet",
    "format_table",
    "fuse_dataset",
    "load_fusion",
    "model_label",
    "run_benchmark",
    "train_and_score",
]

#: Per dataset: task, class names and the task input size of the paper (H, W).
DATASETS: dict[str, dict[str, Any]] = {
    "msrs": {"task": "segmentation", "size": (240, 320)},
    "fmb": {"task": "segmentation", "size": (300, 400)},
    "m3fd": {"task": "detection", "size": (192, 256)},
    "llvip": {"task": "detection", "size": (256, 320)},
}

#: Fusion rules without a network, as reference rows: ``name -> rule(a, b)``.
REFERENCE_RULES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "infrared": lambda a, b: a,
    "visible": lambda a, b: b,
    "mean": lambda a, b: (a + b) / 2,
    "max": torch.maximum,
}


def _class_names(dataset: str) -> tuple[str, ...]:
    from tdfusion.data.layouts import LAYOUTS

    labels = LAYOUTS[dataset].labels
    # MSRS has both; the benchmark's MSRS task is segmentation, as in the paper.
    return (labels.get("segmentation") or labels["detection"]).classes


@dataclass(frozen=True)
class BenchmarkSettings:
    """The dataset and the task schedule, the same for every fusion model.

    Attributes
    ----------
    dataset : {"msrs", "fmb", "m3fd", "llvip"}
        Dataset layout (see :mod:`tdfusion.data`); fixes the task and the classes.
    epochs : int
        Training epochs of each task network (the paper retrains for 300).
    batch_size : int
        Task batch size.
    lr : float
        AdamW learning rate of the task network.
    weight_decay : float
        AdamW weight decay.
    seeds : tuple of int
        One task network per model and seed.
    task_size : (int, int), optional
        Task input size; the paper's for the dataset when omitted.
    train_split, test_split : str
        Split names (``"train"``/``"test"``; M3FD's is the deterministic 3150/1050 split).
    limit : int, optional
        Keep only the first ``limit`` pairs of each split (for quick checks).
    stride : int
        Keep every ``stride``-th pair (LLVIP's protocol in the paper uses 10).
    encoder, model : str
        SegFormer encoder and YOLOv8 model yaml.
    """

    dataset: str
    epochs: int = 300
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-2
    seeds: tuple[int, ...] = (0,)
    task_size: tuple[int, int] | None = None
    train_split: str = "train"
    test_split: str = "test"
    limit: int | None = None
    stride: int = 1
    encoder: str = "mit_b0"
    model: str = "yolov8n.yaml"

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {self.dataset!r}")
        if self.task_size is None:
            object.__setattr__(self, "task_size", DATASETS[self.dataset]["size"])
        object.__setattr__(self, "task_size", tuple(int(v) for v in self.task_size))
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        if self.epochs < 1 or self.batch_size < 1 or not self.seeds:
            raise ValueError("epochs and batch_size must be positive and seeds not empty")

    @property
    def task(self) -> str:
        """``"segmentation"`` or ``"detection"``."""
        return DATASETS[self.dataset]["task"]

    @property
    def classes(self) -> tuple[str, ...]:
        """The dataset's class names (segmentation: including the unlabelled class)."""
        return _class_names(self.dataset)

    @property
    def num_classes(self) -> int:
        """Number of classes of the task network."""
        return len(self.classes)

    def replace(self, **changes: Any) -> BenchmarkSettings:
        """A copy with some settings changed.

        Parameters
        ----------
        **changes
            New values.

        Returns
        -------
        BenchmarkSettings
            The copy.
        """
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------- models
def load_fusion(spec: str, device: str | torch.device = "cpu") -> Callable[..., torch.Tensor]:
    """A fusion model from its specification.

    Parameters
    ----------
    spec : str
        ``infrared``, ``visible``, ``mean`` or ``max`` (:data:`REFERENCE_RULES`), or anything
        :meth:`ReFusionNet.from_pretrained <tdfusion.nets.ReFusionNet.from_pretrained>`
        reads: the bundled name, a ``save_pretrained`` file, a trainer checkpoint (its
        fusion network) or one of the authors' ``.pth`` files.
    device : str or torch.device
        Where the network runs.

    Returns
    -------
    callable
        ``fuse(a, b) -> fused`` on (N, 1, H, W) tensors in [0, 1], in evaluation mode.

    Example
    -------
    >>> load_fusion("max")(torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)).mean().item()
    1.0
    """
    if spec in REFERENCE_RULES:
        return REFERENCE_RULES[spec]
    from tdfusion.nets import ReFusionNet

    return ReFusionNet.from_pretrained(spec).to(device).eval()


def model_label(entry: str) -> str:
    """The table label of a ``--models`` entry: ``LABEL`` of ``LABEL=SPEC``, else from SPEC.

    Parameters
    ----------
    entry : str
        ``LABEL=SPEC`` or ``SPEC``.

    Returns
    -------
    str
        The label (a bare file's stem, or its folder's name for a run's ``checkpoint.pt``).

    Example
    -------
    >>> model_label("runs/msrs/checkpoint.pt"), model_label("ours=w.pt"), model_label("max")
    ('msrs', 'ours', 'max')
    """
    return _parse_model(entry)[0]


def _parse_model(entry: str) -> tuple[str, str]:
    """``"label=spec"`` -> ``(label, spec)``; a bare spec is labelled by its file stem."""
    if "=" in entry:
        label, spec = entry.split("=", 1)
        return label, spec
    if entry in REFERENCE_RULES:
        return entry, entry
    path = Path(entry)
    label = path.parent.name if path.stem in ("checkpoint", "fusion_model") else path.stem
    return label or entry, entry


def _load_model(label: str, spec: str, device: torch.device) -> Callable[..., torch.Tensor]:
    try:
        return load_fusion(spec, device)
    except FileNotFoundError as error:
        raise CheckpointError(f"model {label!r}: {error}") from None


# ---------------------------------------------------------------------------- data
def _build_dataset(settings: BenchmarkSettings, root: str | Path, split: str) -> Any:
    from tdfusion.data import FMBDataset, LLVIPDataset, M3FDDataset, MSRSDataset

    size = settings.task_size
    if settings.dataset == "msrs":
        dataset = MSRSDataset(root, split, "segmentation", mask_size=size)
    elif settings.dataset == "fmb":
        dataset = FMBDataset(root, split, mask_size=size)
    elif settings.dataset == "m3fd":
        dataset = M3FDDataset(root, split)
    else:
        dataset = LLVIPDataset(root, split, stride=settings.stride)
    if settings.stride > 1 and settings.dataset != "llvip":
        dataset.names = sorted(dataset.names)[:: settings.stride]
    if settings.limit is not None:
        dataset.names = sorted(dataset.names)[: settings.limit]
    if not len(dataset):
        raise DataError(f"{root}: no {split} pairs found for {settings.dataset}")
    return dataset


@dataclass
class FusedSet:
    """One split fused by one model, at the task's input size.

    Attributes
    ----------
    images : torch.Tensor
        ``uint8`` (N, 1, H, W) fused images (as if saved to 8-bit files and read back).
    targets : list
        Per image: a (H, W) int64 mask, or (K, 5) normalised boxes.
    names : list of str
        Pair names.
    """

    images: torch.Tensor
    targets: list[Any]
    names: list[str]

    def batch(self, indices: Sequence[int], task: str) -> tuple[torch.Tensor, Any]:
        """Images in [0, 1] and the collated targets of some items."""
        images = self.images[list(indices)].float() / 255.0
        if task == "segmentation":
            return images, torch.stack([self.targets[i] for i in indices]).long()
        rows = [
            torch.cat([torch.full((len(self.targets[i]), 1), float(k)), self.targets[i]], dim=1)
            for k, i in enumerate(indices)
        ]
        return images, torch.cat(rows).reshape(-1, 6) if rows else torch.zeros(0, 6)


def fuse_dataset(
    fuse: Callable[..., torch.Tensor],
    dataset: Any,
    size: tuple[int, int],
    *,
    device: str | torch.device = "cpu",
    progress: bool = False,
    description: str = "fusing",
) -> FusedSet:
    """Fuse every pair of a dataset at full size and keep it, resized, as 8-bit images.

    Parameters
    ----------
    fuse : callable
        ``fuse(a, b)`` on (1, 1, H, W) tensors in [0, 1] (see :func:`load_fusion`).
    dataset : PairedImageDataset
        Pairs with targets (segmentation masks at ``size``, or detection boxes).
    size : (int, int)
        Task input size (H, W).
    device : str or torch.device
        Where the pairs are fused.
    progress : bool
        Show a progress bar.
    description : str
        The progress bar's label.

    Returns
    -------
    FusedSet
        The fused split.
    """
    from tqdm.auto import tqdm

    from tdfusion.inference import fuse_tensors

    images, targets = [], []
    for index in tqdm(range(len(dataset)), desc=description, leave=False, **bar_options(progress)):
        a, b = dataset.read_pair(index)
        a, b = a[None].to(device), b[None].to(device)
        if isinstance(fuse, nn.Module):
            fused = fuse_tensors(fuse, a, b)
        else:
            fused = fuse(a, b)
        resized = F.interpolate(fused.float(), size=size, mode="bilinear", align_corners=False)
        images.append(torch.clamp(torch.round(resized * 255.0), 0, 255).to(torch.uint8).cpu())
        targets.append(dataset.task_target(index, tuple(a.shape[-2:])))
    return FusedSet(torch.cat(images), targets, list(dataset.names))


# ---------------------------------------------------------------------------- task training
def _new_task(settings: BenchmarkSettings) -> nn.Module:
    from tdfusion.tasks import DetectionTask, SegmentationTask

    if settings.task == "segmentation":
        return SegmentationTask(settings.num_classes, encoder=settings.encoder)
    return DetectionTask(settings.num_classes, model=settings.model)


def train_and_score(
    train: FusedSet,
    test: FusedSet,
    settings: BenchmarkSettings,
    seed: int,
    *,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """Train a fresh task network on a fused training set and score it on the fused test set.

    The network's initial weights and the order of the batches depend on ``seed`` only, so
    every fusion model gets the same schedule.

    Parameters
    ----------
    train, test : FusedSet
        Fused splits.
    settings : BenchmarkSettings
        The schedule.
    seed : int
        Seed of the initialisation and the data order.
    device : str or torch.device
        Training device.
    progress : bool
        Show a progress bar.

    Returns
    -------
    dict
        What :class:`~tdfusion.tasks.SegmentationScore` (``mIoU``, ``mAcc``, per-class
        ``IoU``) or :class:`~tdfusion.tasks.DetectionScore` (``mAP50``, ``mAP75``,
        ``mAP50-95``, ``per_class``) computes, plus ``final_loss`` (mean of the last epoch).
    """
    from tqdm.auto import tqdm

    from tdfusion.tasks import DetectionScore, SegmentationScore

    torch.manual_seed(seed)
    task = _new_task(settings).to(device)
    optimizer = torch.optim.AdamW(
        [p for p in task.parameters() if p.requires_grad],
        lr=settings.lr,
        weight_decay=settings.weight_decay,
    )
    order = torch.Generator().manual_seed(seed)
    count = len(train.names)
    last = math.nan
    task.train()
    for _ in tqdm(range(settings.epochs), desc="task", leave=False, **bar_options(progress)):
        permutation = torch.randperm(count, generator=order).tolist()
        losses = []
        for start in range(0, count, settings.batch_size):
            images, targets = train.batch(
                permutation[start : start + settings.batch_size], settings.task
            )
            loss = task(images.to(device), targets.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        last = float(np.mean(losses))
    task.eval()
    if settings.task == "segmentation":
        score: Any = SegmentationScore(settings.num_classes)
    else:
        score = DetectionScore()
    for start in range(0, len(test.names), settings.batch_size):
        indices = list(range(start, min(start + settings.batch_size, len(test.names))))
        images, targets = test.batch(indices, settings.task)
        images = images.to(device)
        if settings.task == "segmentation":
            score.update(task.predict(images).cpu(), targets)
        else:
            score.update(task.predict(images, conf=0.001), targets, settings.task_size)
    result = score.compute()
    result["final_loss"] = last
    return result


# ---------------------------------------------------------------------------- the whole protocol
def run_benchmark(
    models: Sequence[str],
    data_root: str | Path,
    settings: BenchmarkSettings,
    *,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Fuse the dataset with every model, retrain the task per model and seed, tabulate.

    Parameters
    ----------
    models : sequence of str
        Model specifications, optionally labelled ``label=spec`` (see :func:`load_fusion`).
    data_root : str or pathlib.Path
        Dataset root in its standard layout.
    settings : BenchmarkSettings
        Dataset and schedule.
    device : str or torch.device, optional
        Device for fusion and training; CUDA when available by default.
    progress : bool
        Show progress bars.

    Returns
    -------
    dict
        ``"settings"``, ``"columns"`` (the table's metric names), ``"rows"``: per model label
        ``{"spec", "seeds": [per-seed scores], "mean": {column: value}, "std": {...}}``,
        ``"table"`` (the text of :func:`format_table`) and ``"seconds"``.
    """
    from tdfusion.devices import resolve_device

    started = time.perf_counter()
    device = resolve_device(device)
    labelled = [_parse_model(entry) for entry in models]
    labels = [label for label, _ in labelled]
    if len(set(labels)) != len(labels):
        raise ValueError(f"model labels must differ, got {labels}; name them with label=spec")
    if len(set(settings.seeds)) != len(settings.seeds):
        raise ValueError(f"seeds must differ, got {list(settings.seeds)}")
    train_data = _build_dataset(settings, data_root, settings.train_split)
    test_data = _build_dataset(settings, data_root, settings.test_split)
    # Every model is read before any is trained on: a wrong path fails at once, not hours in.
    fusions = [_load_model(label, spec, device) for label, spec in labelled]
    columns = _columns(settings)
    rows: dict[str, Any] = {}
    for (label, spec), fuse in zip(labelled, fusions):
        fused_train = fuse_dataset(
            fuse,
            train_data,
            settings.task_size,
            device=device,
            progress=progress,
            description=f"{label}: fusing {settings.train_split}",
        )
        fused_test = fuse_dataset(
            fuse,
            test_data,
            settings.task_size,
            device=device,
            progress=progress,
            description=f"{label}: fusing {settings.test_split}",
        )
        per_seed = []
        for seed in settings.seeds:
            scores = train_and_score(
                fused_train, fused_test, settings, seed, device=device, progress=progress
            )
            per_seed.append(_row_values(scores, settings))
        spread = {c: _mean_std([s[c] for s in per_seed]) for c in columns}
        rows[label] = {
            "spec": spec,
            "seeds": per_seed,
            "mean": {c: spread[c][0] for c in columns},
            "std": {c: spread[c][1] for c in columns},
        }
    result = {
        "settings": {**dataclasses.asdict(settings), "task": settings.task},
        "train_pairs": len(train_data),
        "test_pairs": len(test_data),
        "columns": columns,
        "rows": rows,
        "seconds": time.perf_counter() - started,
    }
    result["table"] = format_table(result)
    return result


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation over seeds, leaving out ``nan`` (a class absent from
    the test set); ``nan`` when every value is."""
    finite = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    if finite.size == 0:
        return math.nan, math.nan
    return float(finite.mean()), float(finite.std(ddof=1)) if finite.size > 1 else 0.0


def _columns(settings: BenchmarkSettings) -> list[str]:
    if settings.task == "segmentation":
        return [*settings.classes, "mAcc", "mIoU"]
    return ["mAP50", "mAP75", "mAP50-95"]


def _row_values(scores: Mapping[str, Any], settings: BenchmarkSettings) -> dict[str, float]:
    """Scores in percent, keyed by the table's columns."""
    if settings.task == "segmentation":
        values = {name: 100 * iou for name, iou in zip(settings.classes, scores["IoU"])}
        values.update(mAcc=100 * scores["mAcc"], mIoU=100 * scores["mIoU"])
        return values
    return {key: 100 * scores[key] for key in ("mAP50", "mAP75", "mAP50-95")}


def format_table(result: Mapping[str, Any]) -> str:
    """The benchmark's table as text: one row per model, mean (and ± std over seeds).

    Parameters
    ----------
    result : mapping
        What :func:`run_benchmark` returns.

    Returns
    -------
    str
        The table, with a header line naming the dataset, the task and the seeds.
    """
    settings = result["settings"]
    columns = result["columns"]
    seeds = settings["seeds"]
    several = len(seeds) > 1
    width = max(12 if several else 7, *(len(c) + 1 for c in columns))
    label_width = max(10, *(len(label) + 1 for label in result["rows"]))
    unit = "IoU %" if settings["task"] == "segmentation" else "%"
    lines = [
        f"{settings['dataset'].upper()} {settings['task']}: a fresh task network per fusion "
        f"model, {settings['epochs']} epochs, seeds {', '.join(map(str, seeds))}; {unit}"
        + (", mean ± std over seeds" if several else ""),
        f"{'model':<{label_width}}" + "".join(f"{c:>{width}}" for c in columns),
    ]
    for label, row in result["rows"].items():
        cells = []
        for column in columns:
            mean = row["mean"][column]
            text = "-" if math.isnan(mean) else f"{mean:.1f}"
            if several and not math.isnan(mean):
                text += f" ± {row['std'][column]:.1f}"
            cells.append(f"{text:>{width}}")
        lines.append(f"{label:<{label_width}}" + "".join(cells))
    return "\n".join(lines)
