"""One arm of the demo: fine-tune F and train T on some sample pairs, score the held-out ones."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tdfusion.demo.settings import ARMS, PRETRAINED, DemoSettings
from tdfusion.errors import CheckpointError, DataError
from tdfusion.files import atomic_path
from tdfusion.trainer.callbacks import Callback

__all__ = ["ArmRun", "WeightTracker", "fold_split", "run_arm"]


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

    Raises
    ------
    DataError
        If ``folds`` is out of range, or a fold would leave fewer than two pairs to train on.

    Example
    -------
    >>> fold_split(["a", "b", "c", "d"], 2)
    [(['b', 'd'], ['a', 'c']), (['a', 'c'], ['b', 'd'])]
    """
    names = list(names)
    if not 2 <= folds <= len(names):
        raise DataError(f"folds must be between 2 and {len(names)} (the pairs), got {folds}")
    splits = []
    for fold in range(folds):
        test = names[fold::folds]
        train = [name for name in names if name not in test]
        if len(train) < 2:
            raise DataError(
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
            raise CheckpointError(f"initial fusion weights: {error}") from None
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

    Writes ``run.json`` (the arm, seed, fold, training pairs and settings),
    ``checkpoint.pt`` (every epoch), ``training_log.csv``, ``fusion_model.pt`` and, for the
    learned arm, ``loss_generator.pt`` and ``weight_curve.json`` to ``folder``.

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

    Raises
    ------
    CheckpointError
        When resuming a run that ``run.json`` says was trained with other settings (all but
        ``epochs``, ``seeds`` and ``folds``) or on other pairs.
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
    _check_or_record_run(folder / "run.json", settings, arm, seed, fold, train_names, resuming)
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


#: Settings a resumed run may change: more epochs continue it, and the seeds and folds listed
#: pick runs (a run's own seed and training pairs are checked apart).
_RESUMABLE_SETTINGS = ("epochs", "seeds", "folds")


def _check_or_record_run(
    record: Path,
    settings: DemoSettings,
    arm: str,
    seed: int,
    fold: int,
    train_names: list[str],
    resuming: bool,
) -> None:
    """Write what a run is trained with to ``record``; when resuming, refuse a run trained
    with anything else (its models would be scored as if trained on this split)."""
    described = {
        "arm": arm,
        "seed": seed,
        "fold": fold,
        "train_names": list(train_names),
        "settings": {k: v for k, v in settings.to_dict().items() if k not in _RESUMABLE_SETTINGS},
    }
    if resuming and record.is_file():
        saved = json.loads(record.read_text())
        changed = [
            key
            for key in ("arm", "seed", "fold", "train_names")
            if saved.get(key) != described[key]
        ]
        changed += [
            name
            for name in sorted(set(saved.get("settings", {})) | set(described["settings"]))
            if saved.get("settings", {}).get(name) != described["settings"].get(name)
        ]
        if changed:
            raise CheckpointError(
                f"cannot resume {record.parent}: it was trained with other "
                f"{', '.join(changed)} (its record {record.name} says "
                + "; ".join(
                    f"{k}={saved.get(k, saved.get('settings', {}).get(k))!r}" for k in changed
                )
                + "); use another --out, or run without --resume to train it again"
            )
        return
    with atomic_path(record) as temporary:
        temporary.write_text(json.dumps(described, indent=1) + "\n")


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
