"""The demo's protocol: learned against fixed loss, same seed and budget, held-out scoring.

Each *arm* fine-tunes the same pretrained fusion network ``F`` and trains a YOLOv8-n detector
``T`` from scratch on some sample pairs; the arms differ only in the fusion loss:

- ``"learned"``: the weights come from a :class:`~tdfusion.LossGenerator` that meta steps
  train from the detector's loss (the method);
- ``"fixed"``: ``w_a = w_b = 1/2`` (:class:`~tdfusion.nets.FixedLossWeights`, no meta steps),
  the hand-made loss of the paper's ablation.

Both arms see the same pairs in the same order, the same crops and the same initial ``T``
(one seed), and take the same number of ``F`` and ``T`` updates. The sample's pairs are split
into folds; each fold's pairs are scored, by each arm trained on the other folds, with the
detector's own loss and mAP, and the two arms are compared pair by pair.
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tdfusion.files import atomic_path
from tdfusion.trainer.callbacks import Callback

__all__ = [
    "ARMS",
    "PRETRAINED",
    "ArmRun",
    "DemoSettings",
    "WeightTracker",
    "compare_arms",
    "fold_split",
    "run_arm",
    "run_demo",
]

#: The bundled pretrained fusion weights every arm starts from.
PRETRAINED = "tdfusion-ivif"

#: The two arms, in the order they are trained and reported.
ARMS: tuple[str, ...] = ("learned", "fixed")

_ARM_TITLES = {"learned": "learned loss", "fixed": "fixed loss (w_a = w_b = 1/2)"}


@dataclass(frozen=True)
class DemoSettings:
    """Every setting of the demo; both arms use all of them.

    The defaults are chosen for a run of a few minutes on two CPU cores, starting from the
    pretrained fusion network. They differ from the trainer's defaults (the paper's values,
    meant for 50 epochs of 200 meta steps) where a short run needs it:

    - ``generator_lr`` 0.005 instead of 1e-4: with the normalised update the parameter with
      the largest hypergradient moves by exactly ``generator_lr`` per meta step. At 1e-4 a
      dozen steps move the mean of ``w_a`` by about 1e-4, too little to see; at 0.005 it moves
      by a few hundredths per step, and inside and outside the objects differently; at 0.05
      it saturates at 0 or 1 within two steps;
    - ``inner_lr`` 1e-3 instead of 1e-4: the hypergradient is proportional to the inner step;
    - ``fusion_lr`` 1e-4 (the paper's): the pretrained network is fine-tuned, not re-learned;
    - ``task_lr`` 1e-3 instead of 1e-4: the detector starts from scratch and has few steps;
    - ``fusion_crop`` 128 instead of 256 and no source swap: a fraction of the cost per step;
      ``task_size`` 192 x 256 is the paper's detection size for M3FD;
    - ``alpha`` 2 instead of 1: the pretrained weights were trained towards the brighter source
      at every pixel, and the intensity target of ``w_a = w_b = 1/2`` is the mean of the two
      sources, whose VIF is about 0.33 on the sample. Measured on the sample's held-out pairs,
      twelve fusion steps at ``alpha = 1`` pull the pretrained network's VIF from 0.405 to
      0.39 in both arms; at ``alpha = 2`` the heavier gradient term keeps it (0.403 fixed,
      0.402 learned), so both arms start from and keep the pretrained image quality. The
      learned weights act on the intensity term only; ``alpha`` sets how much that term
      counts against the edges, equally in both arms.

    Attributes
    ----------
    epochs : int
        Epochs of each arm.
    meta_steps : int
        Generator updates per epoch in the learned arm (the fixed arm takes none).
    seeds : tuple of int
        One training of every arm and fold per seed. Two seeds and two folds give four runs
        per arm, enough for :func:`compare_arms` to call a difference measurable or not.
    folds : int
        Cross-validation folds over the sample's pairs (2: train on two pairs, score the
        other two; 4: leave one out).
    init_weights : str or None
        Fusion weights both arms start from: the bundled name, a checkpoint path, or ``None``
        for a randomly initialised network (only useful for tests).
    fusion_lr, task_lr : float
        Adam learning rates of ``F`` and ``T``.
    inner_lr : float
        Step size of the inner (differentiable) step of ``F``.
    generator_lr : float
        Step size of the normalised generator update.
    fusion_crop : int
        Random crop on which the fusion loss is computed.
    task_size : (int, int)
        Size the sources are resized to before they are fused for the detector.
    swap : bool
        Also feed every batch with the sources swapped (the research code's augmentation).
    map_size : (int, int)
        Size at which ``w_a`` is followed during training (inside and outside the objects,
        on every sample pair); a quarter of the sample's height and width, to keep the
        measurement cheap.
    image_size : (int, int) or None
        Size the sample pairs are resized to when read (``None``: their own 480 x 640); a
        smaller size makes quick checks of the whole pipeline.
    alpha : float
        Weight of the gradient term of the fusion loss in both arms (the paper's is 1).
    """

    epochs: int = 6
    meta_steps: int = 2
    seeds: tuple[int, ...] = (0, 1)
    folds: int = 2
    init_weights: str | None = PRETRAINED
    fusion_lr: float = 1e-4
    task_lr: float = 1e-3
    inner_lr: float = 1e-3
    generator_lr: float = 5e-3
    fusion_crop: int = 128
    task_size: tuple[int, int] = (192, 256)
    swap: bool = False
    map_size: tuple[int, int] = (120, 160)
    image_size: tuple[int, int] | None = None
    alpha: float = 2.0

    def replace(self, **changes: Any) -> DemoSettings:
        """A copy with some settings changed (unknown names are an error).

        Parameters
        ----------
        **changes
            New values of settings.

        Returns
        -------
        DemoSettings
            The copy.
        """
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown demo settings: {sorted(unknown)}")
        for name in ("task_size", "map_size", "image_size"):
            if changes.get(name) is not None:
                changes[name] = tuple(int(v) for v in changes[name])
        if "seeds" in changes:
            changes["seeds"] = tuple(int(s) for s in changes["seeds"])
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-serialisable dict.

        Returns
        -------
        dict
            Setting name -> value (tuples become lists).
        """
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }


# ---------------------------------------------------------------------------- data
@dataclass
class _Pair:
    """One sample pair, held in memory: full-size sources, colour and boxes."""

    name: str
    a: torch.Tensor  # (1, H, W) infrared luma in [0, 1]
    b: torch.Tensor  # (1, H, W) visible luma in [0, 1]
    boxes: torch.Tensor  # (K, 5) [class, x_center, y_center, width, height], normalised
    chroma_a: np.ndarray | None
    chroma_b: np.ndarray | None

    @property
    def item(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.a, self.b, self.boxes


def _resize_chroma(chroma: np.ndarray | None, size: tuple[int, int]) -> np.ndarray | None:
    if chroma is None or chroma.shape[:2] == tuple(size):
        return chroma
    planes = torch.from_numpy(np.ascontiguousarray(chroma, dtype=np.float32)).permute(2, 0, 1)
    return _resize(planes[None], size)[0].permute(1, 2, 0).numpy()


def _load_sample(
    image_size: tuple[int, int] | None = None,
) -> tuple[list[_Pair], tuple[str, ...]]:
    from tdfusion.data import sample_dataset, sample_folders
    from tdfusion.data.io import read_luma_pair

    dataset = sample_dataset(task="detection")
    ir_dir, vis_dir = sample_folders()
    pairs = []
    for index, name in enumerate(dataset.names):
        a, b, boxes = dataset[index]
        luma_a, luma_b, chroma_a, chroma_b = read_luma_pair(
            ir_dir / f"{name}.png", vis_dir / f"{name}.png"
        )
        a, b = torch.from_numpy(luma_a)[None], torch.from_numpy(luma_b)[None]
        if image_size is not None:
            a, b = _resize(a[None], image_size)[0], _resize(b[None], image_size)[0]
            chroma_a = _resize_chroma(chroma_a, image_size)
            chroma_b = _resize_chroma(chroma_b, image_size)
        pairs.append(_Pair(name, a, b, boxes.float(), chroma_a, chroma_b))
    pairs.sort(key=lambda pair: pair.name)
    return pairs, tuple(dataset.classes)


def fold_split(names: Sequence[str], folds: int) -> list[tuple[list[str], list[str]]]:
    """Cross-validation folds: fold ``k`` scores every ``folds``-th name from the ``k``-th.

    Parameters
    ----------
    names : sequence of str
        Pair names, in a fixed order.
    folds : int
        Number of folds, 2 to ``len(names)``; every fold must leave two pairs to train on
        (a meta step needs a meta-train and a meta-test batch).

    Returns
    -------
    list of (list of str, list of str)
        ``(train_names, test_names)`` per fold; every name is tested exactly once.

    Example
    -------
    >>> fold_split(["a", "b", "c", "d"], 2)
    [(['b', 'd'], ['a', 'c']), (['a', 'c'], ['b', 'd'])]
    """
    names = list(names)
    if not 2 <= folds <= len(names):
        raise ValueError(f"folds must be between 2 and {len(names)} (the pairs), got {folds}")
    splits = []
    for fold in range(folds):
        test = names[fold::folds]
        train = [name for name in names if name not in test]
        if len(train) < 2:
            raise ValueError(
                f"with {folds} folds over {len(names)} pairs fold {fold} trains on "
                f"{len(train)} pair(s); a meta step needs two"
            )
        splits.append((train, test))
    return splits


def _box_mask(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A boolean (H, W) mask of the pixels inside any of the normalised boxes."""
    height, width = size
    mask = torch.zeros(height, width, dtype=torch.bool)
    for _, xc, yc, w, h in boxes.tolist():
        x0, x1 = max(0, math.floor((xc - w / 2) * width)), math.ceil((xc + w / 2) * width)
        y0, y1 = max(0, math.floor((yc - h / 2) * height)), math.ceil((yc + h / 2) * height)
        mask[y0:y1, x0:x1] = True
    return mask


def _resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize (N, 1, H, W) as the trainer resizes task inputs (bilinear, no corner alignment)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image, size=size, mode="bilinear", align_corners=False)


# ---------------------------------------------------------------------------- w_a during training
class WeightTracker(Callback):
    """Follow the loss generator's ``w_a`` inside and outside the objects, epoch by epoch.

    Before the first epoch and after every epoch, ``G`` weighs the given pairs (resized to
    ``size``); the mean of ``w_a`` over all pixels, over the pixels inside the object boxes and
    over those outside them is recorded and written to ``path`` (JSON), so a resumed run keeps
    the curve of the epochs before it.

    Parameters
    ----------
    pairs : sequence of (a, b, boxes)
        Sources (1, H, W) in [0, 1] and normalised boxes (K, 5).
    size : (int, int)
        Size at which ``G`` is evaluated.
    path : str or os.PathLike, optional
        JSON file of the records; nothing is written when omitted.

    Attributes
    ----------
    records : list of dict
        ``{"epoch", "mean", "inside", "outside"}`` per evaluation; ``epoch`` counts completed
        epochs (0: before training).
    """

    def __init__(
        self,
        pairs: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
        size: tuple[int, int],
        path: str | Path | None = None,
    ) -> None:
        self.a = _resize(torch.stack([pair[0] for pair in pairs]), size)
        self.b = _resize(torch.stack([pair[1] for pair in pairs]), size)
        self.inside = torch.stack([_box_mask(pair[2], size) for pair in pairs])[:, None]
        self.path = None if path is None else Path(path)
        self.records: list[dict[str, float]] = []

    def measure(self, generator: nn.Module) -> dict[str, float]:
        """Mean ``w_a`` overall, inside and outside the boxes, for a generator.

        Parameters
        ----------
        generator : torch.nn.Module
            ``G(a, b) -> (N, 2, H, W)``.

        Returns
        -------
        dict of str to float
            ``"mean"``, ``"inside"`` and ``"outside"`` (``nan`` without boxes).
        """
        parameter = next(iter(generator.parameters()), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        dtype = parameter.dtype if parameter is not None else torch.float32
        was_training = generator.training
        generator.eval()
        try:
            with torch.inference_mode():
                weight_a = generator(self.a.to(device, dtype), self.b.to(device, dtype))[:, :1]
        finally:
            generator.train(was_training)
        weight_a = weight_a.float().cpu()
        inside = weight_a[self.inside]
        outside = weight_a[~self.inside]
        return {
            "mean": float(weight_a.mean()),
            "inside": float(inside.mean()) if inside.numel() else math.nan,
            "outside": float(outside.mean()) if outside.numel() else math.nan,
        }

    def _record(self, trainer: Any) -> None:
        self.records = [r for r in self.records if r["epoch"] < trainer.epoch]
        self.records.append({"epoch": trainer.epoch, **self.measure(trainer.loss_generator)})
        if self.path is not None and trainer.is_main_process:
            with atomic_path(self.path) as temporary:
                temporary.write_text(json.dumps(self.records, indent=1) + "\n")

    def on_fit_start(self, trainer: Any) -> None:
        """Read the records of a resumed run; measure the current generator if not recorded."""
        if self.path is not None and self.path.is_file() and trainer.epoch > 0:
            self.records = [
                r for r in json.loads(self.path.read_text()) if r["epoch"] <= trainer.epoch
            ]
        if not any(r["epoch"] == trainer.epoch for r in self.records):
            self._record(trainer)

    def on_step_end(self, trainer: Any, stats: dict[str, Any]) -> None:
        """Nothing to do after a step: ``w_a`` is measured per epoch."""

    def on_epoch_end(self, trainer: Any, summary: dict[str, Any]) -> None:
        """Measure after every epoch."""
        self._record(trainer)

    def on_fit_end(self, trainer: Any) -> None:
        """Nothing to do: the last epoch was measured."""


# ---------------------------------------------------------------------------- one arm
def _initial_fusion_model(init_weights: str | None) -> nn.Module:
    from tdfusion.nets import ReFusionNet

    if init_weights is None:
        return ReFusionNet()
    try:
        return ReFusionNet.from_pretrained(init_weights).train()
    except FileNotFoundError as error:
        if init_weights != PRETRAINED:
            raise
        from tdfusion.errors import CheckpointError

        raise CheckpointError(
            f"the bundled fusion weights {PRETRAINED!r} are not installed ({error}); pass "
            "--init-weights PATH (a checkpoint or the authors' ReFusion_IVIF.pth)"
        ) from None


def _build_trainer(
    settings: DemoSettings, arm: str, seed: int, num_classes: int, device: str | None
) -> Any:
    from tdfusion import LearnableFusionLoss, LossGenerator, MetaFusionTrainer
    from tdfusion.nets import FixedLossWeights
    from tdfusion.tasks import DetectionTask

    if arm not in ARMS:
        raise ValueError(f"arm must be one of {ARMS}, got {arm!r}")
    torch.manual_seed(seed)
    fusion_model = _initial_fusion_model(settings.init_weights)
    task = DetectionTask(num_classes=num_classes)  # the same initial T in both arms
    generator = LossGenerator() if arm == "learned" else FixedLossWeights("equal")
    return MetaFusionTrainer(
        fusion_model,
        task,
        generator,
        LearnableFusionLoss(alpha=settings.alpha),
        inner_lr=settings.inner_lr,
        generator_lr=settings.generator_lr,
        fusion_lr=settings.fusion_lr,
        task_lr=settings.task_lr,
        fusion_crop=settings.fusion_crop,
        task_size=settings.task_size,
        device=device,
        seed=seed,
    )


@dataclass
class ArmRun:
    """One arm trained on one fold with one seed, and its scores on the held-out pairs.

    Attributes
    ----------
    arm : str
        ``"learned"`` or ``"fixed"``.
    seed, fold : int
        The seed and the fold.
    train_names, test_names : list of str
        Pairs trained on and pairs scored.
    folder : pathlib.Path
        Where the run's checkpoint, log and weights are.
    history : list of dict
        The trainer's per-epoch summaries.
    weight_curve : list of dict
        ``records`` of the run's :class:`WeightTracker` (learned arm only; empty otherwise).
    held_out : dict of str to dict
        Per test pair: ``task_loss`` and the fusion metrics of the full-size fused image.
    detection : dict
        :class:`~tdfusion.tasks.DetectionScore` of the test pairs (``mAP50``, ``mAP50-95``).
    fused : dict of str to numpy.ndarray
        Full-size fused luma in [0, 1] per test pair.
    weight_a : dict of str to numpy.ndarray
        Full-size ``w_a`` per test pair (learned arm only).
    seconds : float
        Wall time of training and scoring.
    """

    arm: str
    seed: int
    fold: int
    train_names: list[str]
    test_names: list[str]
    folder: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    weight_curve: list[dict[str, float]] = field(default_factory=list)
    held_out: dict[str, dict[str, float]] = field(default_factory=dict)
    detection: dict[str, Any] = field(default_factory=dict)
    fused: dict[str, np.ndarray] = field(default_factory=dict)
    weight_a: dict[str, np.ndarray] = field(default_factory=dict)
    seconds: float = 0.0


def run_arm(
    settings: DemoSettings,
    arm: str,
    seed: int,
    fold: int,
    folder: str | Path,
    *,
    device: str | None = None,
    resume: bool = False,
    progress: bool = True,
    sample: tuple[list[Any], tuple[str, ...]] | None = None,
) -> ArmRun:
    """Train one arm on one fold and score it on the fold's held-out pairs.

    Writes ``checkpoint.pt`` (every epoch), ``training_log.csv``, ``fusion_model.pt`` and,
    for the learned arm, ``loss_generator.pt`` and ``weight_curve.json`` to ``folder``.

    Parameters
    ----------
    settings : DemoSettings
        The protocol.
    arm : {"learned", "fixed"}
        Which loss.
    seed, fold : int
        Seed of every random stream, and the fold (see :func:`fold_split`).
    folder : str or pathlib.Path
        Output folder of this run (created).
    device : str, optional
        Training device.
    resume : bool
        Continue from ``folder/checkpoint.pt`` when it exists (a finished run is not
        retrained, only scored again).
    progress : bool
        Show progress bars.
    sample : tuple, optional
        The loaded sample (internal: saves reading it for every run).

    Returns
    -------
    ArmRun
        The run and its held-out scores.
    """
    from torch.utils.data import DataLoader

    from tdfusion.data import SwapSources, detection_collate
    from tdfusion.trainer import CSVLogger

    started = time.perf_counter()
    pairs, classes = sample if sample is not None else _load_sample(settings.image_size)
    by_name = {pair.name: pair for pair in pairs}
    train_names, test_names = fold_split([pair.name for pair in pairs], settings.folds)[fold]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    trainer = _build_trainer(settings, arm, seed, len(classes), device)
    loader = DataLoader(
        [by_name[name].item for name in train_names],
        batch_size=1,
        shuffle=True,
        collate_fn=SwapSources(detection_collate) if settings.swap else detection_collate,
        generator=torch.Generator().manual_seed(seed),
    )
    checkpoint = folder / "checkpoint.pt"
    log = folder / "training_log.csv"
    resuming = resume and checkpoint.is_file()
    if not resuming:
        log.unlink(missing_ok=True)
    callbacks: list[Callback] = [CSVLogger(log)]
    tracker = None
    if arm == "learned":
        tracker = WeightTracker(
            [pair.item for pair in pairs], settings.map_size, folder / "weight_curve.json"
        )
        callbacks.append(tracker)
    trainer.fit(
        loader,
        epochs=settings.epochs,
        meta_steps=settings.meta_steps if arm == "learned" else 0,
        checkpoint=checkpoint,
        resume=checkpoint if resuming else None,
        callbacks=callbacks,
        progress=progress,
    )
    trainer.fusion_model.save_pretrained(folder / "fusion_model.pt")
    if arm == "learned":
        trainer.loss_generator.save_pretrained(folder / "loss_generator.pt")
    run = ArmRun(
        arm,
        seed,
        fold,
        train_names,
        test_names,
        folder,
        history=[dict(entry) for entry in trainer.history],
        weight_curve=list(tracker.records) if tracker is not None else [],
    )
    _score_held_out(trainer, [by_name[name] for name in test_names], settings, run)
    run.seconds = time.perf_counter() - started
    return run


def _score_held_out(trainer: Any, pairs: list[_Pair], settings: DemoSettings, run: ArmRun) -> None:
    """Fill ``run`` with the detector's loss and mAP and the fusion metrics on ``pairs``."""
    from tdfusion.inference import fuse_tensors
    from tdfusion.metrics import evaluate
    from tdfusion.tasks import DetectionScore

    fusion_model, task = trainer.fusion_model.eval(), trainer.task_loss.eval()
    generator = trainer.loss_generator.eval()
    device, dtype = trainer.device, trainer.dtype
    score = DetectionScore()
    for pair in pairs:
        a, b = pair.a[None].to(device, dtype), pair.b[None].to(device, dtype)
        target = torch.cat([torch.zeros(len(pair.boxes), 1), pair.boxes], dim=1).to(device, dtype)
        with torch.inference_mode():
            fused_task = fusion_model(
                _resize(a, settings.task_size), _resize(b, settings.task_size)
            )
            task_loss = float(task(fused_task, target))
        score.update(task.predict(fused_task, conf=0.001), target.cpu(), settings.task_size)
        fused = fuse_tensors(fusion_model, a, b)[0, 0].float().cpu().numpy().astype(np.float64)
        metrics = evaluate(
            fused * 255.0, pair.a[0].double().numpy() * 255.0, pair.b[0].double().numpy() * 255.0
        )
        run.held_out[pair.name] = {"task_loss": task_loss, **metrics}
        run.fused[pair.name] = fused
        if run.arm == "learned":
            with torch.inference_mode():
                run.weight_a[pair.name] = generator(a, b)[0, 0].float().cpu().numpy()
    result = score.compute()
    run.detection = {"mAP50": result["mAP50"], "mAP50-95": result["mAP50-95"]}


# ---------------------------------------------------------------------------- comparison
def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        return math.nan, math.nan
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else 0.0


def compare_arms(runs: Sequence[ArmRun], min_runs: int = 3) -> dict[str, Any]:
    """Compare the arms on the held-out pairs, run by run (same seed and fold).

    For every seed and fold, the learned arm's held-out task loss minus the fixed arm's is
    taken pair by pair and averaged over the fold's pairs. The pairs of one fold are scored
    by the same two networks, so the independent evidence is the *run* (seed and fold), not
    the pair: the difference is called *measurable* only when there are at least
    ``min_runs`` runs per arm and the mean over runs is more than twice its standard error
    away from zero. mAP50 is compared in the same way.

    Parameters
    ----------
    runs : sequence of ArmRun
        Runs of both arms over the same folds and seeds.
    min_runs : int
        Fewest runs per arm from which a difference can be called measurable.

    Returns
    -------
    dict
        ``"arms"``: per arm the mean and standard deviation over held-out pairs of the task
        loss and the fusion metrics, and over runs of mAP50 and mAP50-95;
        ``"task_loss_difference"`` and ``"map50_difference"``: ``{"mean", "stderr", "runs",
        "per_run", "measurable"}`` plus, for the loss, ``"pair_std"`` and ``"pairs"`` (the
        spread over the held-out pairs); ``"verdict"``: one sentence saying what they show.
    """
    from tdfusion.metrics import METRIC_NAMES

    arms: dict[str, dict[str, Any]] = {}
    for arm in ARMS:
        mine = [run for run in runs if run.arm == arm]
        if not mine:
            continue
        per_pair = [scores for run in mine for scores in run.held_out.values()]
        entry: dict[str, Any] = {}
        for key in ("task_loss", *METRIC_NAMES):
            mean, std = _mean_std([scores[key] for scores in per_pair])
            entry[key] = {"mean": mean, "std": std}
        for key in ("mAP50", "mAP50-95"):
            mean, std = _mean_std([run.detection[key] for run in mine])
            entry[key] = {"mean": mean, "std": std}
        arms[arm] = entry

    learned = {(r.seed, r.fold): r for r in runs if r.arm == "learned"}
    fixed = {(r.seed, r.fold): r for r in runs if r.arm == "fixed"}
    matched = [(learned[key], fixed[key]) for key in sorted(set(learned) & set(fixed))]

    def paired(per_run: list[float]) -> dict[str, Any]:
        mean, std = _mean_std(per_run)
        count = len(per_run)
        stderr = std / math.sqrt(count) if count > 1 else math.nan
        measurable = bool(count >= min_runs and abs(mean) > 2 * stderr)
        return {
            "mean": mean,
            "stderr": stderr,
            "runs": count,
            "per_run": per_run,
            "measurable": measurable,
        }

    pair_differences = [
        a.held_out[name]["task_loss"] - b.held_out[name]["task_loss"]
        for a, b in matched
        for name in a.test_names
    ]
    loss_difference = paired(
        [
            float(
                np.mean(
                    [a.held_out[n]["task_loss"] - b.held_out[n]["task_loss"] for n in a.test_names]
                )
            )
            for a, b in matched
        ]
    )
    loss_difference["pair_std"] = _mean_std(pair_differences)[1]
    loss_difference["pairs"] = len(pair_differences)
    map_difference = paired([a.detection["mAP50"] - b.detection["mAP50"] for a, b in matched])
    return {
        "arms": arms,
        "task_loss_difference": loss_difference,
        "map50_difference": map_difference,
        "verdict": _verdict(loss_difference, map_difference, min_runs),
    }


def _verdict(loss: dict[str, Any], map50: dict[str, Any], min_runs: int) -> str:
    """One honest sentence about the held-out task loss difference (learned - fixed)."""
    spread = (
        f"learned - fixed held-out task loss {loss['mean']:+.3f} (std {loss['pair_std']:.3f} "
        f"over {loss['pairs']} held-out pairs"
    )
    if loss["runs"] > 1:
        spread += f", standard error {loss['stderr']:.3f} over {loss['runs']} runs"
    spread += f"), mAP50 {map50['mean']:+.3f}"
    if loss["runs"] < min_runs:
        return (
            f"No measurable difference at this budget: {spread}; {loss['runs']} training "
            f"run(s) per arm cannot separate the arms from training noise (a difference needs "
            f"at least {min_runs}: add seeds with --seeds)."
        )
    if not loss["measurable"]:
        return f"No measurable difference at this budget: {spread}."
    better = "lower" if loss["mean"] < 0 else "higher"
    return (
        f"The learned loss gave the detector a {better} held-out loss than the fixed loss, "
        f"beyond twice its standard error: {spread}."
    )


# ---------------------------------------------------------------------------- the whole demo
def run_demo(
    out: str | Path = "demo_out",
    settings: DemoSettings | None = None,
    *,
    device: str | None = None,
    resume: bool = False,
    progress: bool = True,
    workers: int | None = None,
) -> dict[str, Any]:
    """Run both arms on every fold and seed, compare them and draw the pictures into ``out``.

    Writes ``summary.json`` and ``summary.txt`` (the comparison), ``runs/seed<S>-fold<K>-<arm>/``
    (checkpoint, log and weights of every run), ``fused/<arm>/<pair>.png`` (the held-out fused
    colour images), ``compare_<pair>.png`` (infrared | visible | fixed-loss fusion |
    learned-loss fusion | ``w_a``), ``weight_maps/<pair>.png`` and ``training_curve.png``.

    Parameters
    ----------
    out : str or pathlib.Path
        Output folder (created).
    settings : DemoSettings, optional
        The protocol; :class:`DemoSettings` defaults when omitted.
    device : str, optional
        Training device; CUDA when available by default.
    resume : bool
        Continue every run from its checkpoint (finished runs are only scored again).
    progress : bool
        Show progress bars (one line per run with several workers).
    workers : int, optional
        Runs trained at once, each in its own process with one thread. Every run is seeded by
        itself, so the results do not depend on it (up to the rounding of multi-threaded
        kernels). Default: on the CPU, as many as there are cores, up to 4 and the number
        of runs (two processes of one thread use two cores better than one process of two
        threads on these small tensors); one on a GPU.

    Returns
    -------
    dict
        ``"text"`` (the printed summary), ``"summary"`` (what ``summary.json`` holds),
        ``"runs"`` (the :class:`ArmRun` objects) and the paths written: ``"summary_json"``,
        ``"comparisons"``, ``"weight_maps"``, ``"fused"``, ``"curve"``.
    """
    from tdfusion.data.io import write_image
    from tdfusion.demo import figures
    from tdfusion.inference.colour import merge_chroma

    started = time.perf_counter()
    settings = settings or DemoSettings()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sample = _load_sample(settings.image_size)
    pairs, classes = sample
    splits = fold_split([pair.name for pair in pairs], settings.folds)
    # The learned arm's runs take longest: start them first so that parallel workers finish
    # together.
    jobs = [
        (seed, fold, arm)
        for arm in ARMS
        for seed in settings.seeds
        for fold in range(settings.folds)
    ]
    workers = _default_workers(device, len(jobs)) if workers is None else max(1, int(workers))

    def describe(seed: int, fold: int, arm: str) -> str:
        train, test = splits[fold]
        return (
            f"{_ARM_TITLES[arm]}, seed {seed}, fold {fold}: training on {', '.join(train)}, "
            f"scoring {', '.join(test)}"
        )

    def folder(seed: int, fold: int, arm: str) -> Path:
        return out / "runs" / f"seed{seed}-fold{fold}-{arm}"

    finished: dict[tuple[int, int, str], ArmRun] = {}
    if workers == 1:
        for index, job in enumerate(jobs):
            if progress:
                print(f"[{index + 1}/{len(jobs)}] {describe(*job)}", flush=True)
            finished[job] = run_arm(
                settings,
                job[2],
                job[0],
                job[1],
                folder(*job),
                device=device,
                resume=resume,
                progress=progress,
                sample=sample,
            )
    else:
        if progress:
            print(f"{len(jobs)} runs in {workers} processes of one thread each", flush=True)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_one_thread) as pool:
            futures = {
                pool.submit(
                    run_arm,
                    settings,
                    job[2],
                    job[0],
                    job[1],
                    folder(*job),
                    device=device,
                    resume=resume,
                    progress=False,
                ): job
                for job in jobs
            }
            for future in as_completed(futures):
                job = futures[future]
                finished[job] = future.result()
                if progress:
                    print(
                        f"[{len(finished)}/{len(jobs)}] done in "
                        f"{finished[job].seconds:.0f} s: {describe(*job)}",
                        flush=True,
                    )
    # Reported in a fixed order, whatever order the runs finished in.
    runs = [
        finished[(seed, fold, arm)]
        for seed in settings.seeds
        for fold in range(settings.folds)
        for arm in ARMS
    ]
    comparison = compare_arms(runs)

    # Pictures: every pair as fused by each arm of the first seed that did not train on it.
    first_seed = settings.seeds[0]
    fused_written: list[Path] = []
    comparisons: list[Path] = []
    weight_maps: list[Path] = []
    for pair in pairs:
        held = {
            run.arm: run for run in runs if run.seed == first_seed and pair.name in run.test_names
        }
        colour = {}
        for arm, run in held.items():
            colour[arm] = merge_chroma(run.fused[pair.name] * 255.0, pair.chroma_a, pair.chroma_b)
            fused_written.append(write_image(out / "fused" / arm / f"{pair.name}.png", colour[arm]))
        sources = (
            merge_chroma(pair.a[0].numpy() * 255.0, pair.chroma_a, None),
            merge_chroma(pair.b[0].numpy() * 255.0, None, pair.chroma_b),
        )
        learned = held.get("learned")
        weight_a = learned.weight_a[pair.name] if learned is not None else None
        comparisons.append(
            figures.comparison_figure(
                out / f"compare_{pair.name}.png",
                pair.name,
                sources,
                {arm: (colour[arm], held[arm].held_out[pair.name]) for arm in held},
                weight_a,
                pair.boxes,
                classes,
            )
        )
        if weight_a is not None:
            weight_maps.append(
                figures.weight_map_figure(
                    out / "weight_maps" / f"{pair.name}.png",
                    pair.name,
                    weight_a,
                    sources[1],
                    pair.boxes,
                )
            )
    curve = figures.training_curve_figure(out / "training_curve.png", runs, settings)

    minutes = (time.perf_counter() - started) / 60
    summary = {
        "settings": settings.to_dict(),
        "pairs": [pair.name for pair in pairs],
        "classes": list(classes),
        "folds": [
            {"train": train, "test": test}
            for train, test in fold_split([pair.name for pair in pairs], settings.folds)
        ],
        **comparison,
        "runs": [
            {
                "arm": run.arm,
                "seed": run.seed,
                "fold": run.fold,
                "train": run.train_names,
                "test": run.test_names,
                "held_out": run.held_out,
                "detection": run.detection,
                "weight_curve": run.weight_curve,
                "final_epoch": run.history[-1] if run.history else {},
                "folder": str(run.folder),
                "seconds": run.seconds,
            }
            for run in runs
        ],
        "minutes": minutes,
    }
    text = _summary_text(summary, settings, out, minutes)
    summary["text"] = text
    summary_json = out / "summary.json"
    with atomic_path(summary_json) as temporary:
        temporary.write_text(json.dumps(summary, indent=1, default=_json_default) + "\n")
    with atomic_path(out / "summary.txt") as temporary:
        temporary.write_text(text + "\n")
    return {
        "text": text,
        "summary": summary,
        "runs": runs,
        "summary_json": summary_json,
        "comparisons": comparisons,
        "weight_maps": weight_maps,
        "fused": fused_written,
        "curve": curve,
    }


def _default_workers(device: str | None, jobs: int) -> int:
    from tdfusion.devices import resolve_device

    if resolve_device(device).type != "cpu":
        return 1
    return max(1, min(4, os.cpu_count() or 1, jobs))


def _one_thread() -> None:
    """Worker initialiser: one torch thread per process (the processes share the cores)."""
    torch.set_num_threads(1)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not serialisable: {type(value).__name__}")


def _summary_text(
    summary: dict[str, Any], settings: DemoSettings, out: Path, minutes: float
) -> str:
    arms = summary["arms"]
    start = settings.init_weights or "random initialisation"
    lines = [
        f"TDFusion demo finished in {minutes:.1f} min.",
        f"Two arms, fine-tuning the fusion network from {start} and training a YOLOv8-n "
        f"detector ({', '.join(summary['classes'])}) from scratch, {settings.epochs} epochs, "
        f"seed(s) {', '.join(str(s) for s in settings.seeds)}:",
        f"  learned loss: w_a from the loss generator, {settings.meta_steps} meta step(s) per "
        f"epoch (generator_lr {settings.generator_lr:g})",
        "  fixed loss:   w_a = w_b = 1/2 (the baseline; no meta steps)",
        f"Scored on held-out pairs: {settings.folds}-fold cross-validation over the "
        f"{len(summary['pairs'])} sample pairs (each pair scored by the runs that did not "
        "train on it). Mean (std):",
    ]
    rows = [
        ("held-out task loss", "task_loss", "{:.3f}"),
        ("held-out mAP50", "mAP50", "{:.3f}"),
        ("held-out mAP50-95", "mAP50-95", "{:.3f}"),
        ("VIF", "VIF", "{:.3f}"),
        ("Qabf", "Qabf", "{:.3f}"),
    ]
    header = f"  {'':20s}" + "".join(f"{_ARM_TITLES[arm].split(' (')[0]:>22s}" for arm in arms)
    lines.append(header)
    for label, key, template in rows:
        cells = ""
        for arm in arms:
            mean, std = arms[arm][key]["mean"], arms[arm][key]["std"]
            cells += f"{template.format(mean)} ({template.format(std)})".rjust(22)
        lines.append(f"  {label:20s}{cells}")
    learned_curves = [run["weight_curve"] for run in summary["runs"] if run["weight_curve"]]
    if learned_curves:
        first = np.mean([[c[0]["inside"], c[0]["outside"]] for c in learned_curves], axis=0)
        last = np.mean([[c[-1]["inside"], c[-1]["outside"]] for c in learned_curves], axis=0)
        lines.append(
            f"Learned w_a inside / outside the objects: {first[0]:.3f} / {first[1]:.3f} before "
            f"training, {last[0]:.3f} / {last[1]:.3f} after (fixed loss: 0.5 everywhere)."
        )
    lines.append(summary["verdict"])
    lines += [
        f"  summary         {out / 'summary.json'}",
        f"  comparisons     {out}/compare_<pair>.png (infrared | visible | fixed | learned | w_a)",
        f"  weight maps     {out / 'weight_maps'}",
        f"  training curve  {out / 'training_curve.png'}",
        f"  fused images    {out / 'fused'}/<arm>/",
        f"  runs            {out / 'runs'}/seed<S>-fold<K>-<arm>/ (checkpoint.pt: resume with "
        "--resume; fusion_model.pt: tdfusion fuse --weights ...)",
    ]
    return "\n".join(lines)
