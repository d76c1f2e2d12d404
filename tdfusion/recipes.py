"""The paper's training recipes (MSRS/FMB segmentation, M3FD/LLVIP detection) as reusable code.

A :class:`Recipe` holds every setting of one protocol; :func:`train` builds the dataset, the
task network, the trainer and the data loader from it and trains, resumably, into a folder.
The command line (``tdfusion train``) and the examples are thin layers over this module.

Example
-------
>>> from tdfusion.recipes import RECIPES
>>> recipe = RECIPES["msrs-segmentation"].replace(epochs=1, meta_steps=2)
>>> recipe.task_size, recipe.num_classes
((240, 320), 9)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tdfusion.errors import DataError
from tdfusion.files import LOCK_NAME, output_lock

__all__ = [
    "RECIPES",
    "Recipe",
    "build_dataset",
    "build_task",
    "build_trainer",
    "load_recipe",
    "make_smoke_dataset",
    "no_task",
    "train",
]


@dataclass(frozen=True)
class Recipe:
    """One training protocol.

    Attributes
    ----------
    name : str
        Recipe name.
    dataset : {"msrs", "fmb", "m3fd", "llvip", "roadscene"}
        Dataset layout (see the datasets of ``tdfusion.data``; ``"roadscene"`` is two folders
        ``ir/`` and ``vi/`` of pairs matched by file stem).
    task : {"segmentation", "detection", "none"}
        Task network: SegFormer (``encoder``) or YOLOv8 (``model``), from scratch; ``"none"``
        trains the fusion network alone (fusion pre-training).
    num_classes : int
        Classes of the task (segmentation: including the background/unlabelled class).
    task_size : (int, int) or None
        Size the sources are resized to before they are fused for the task.
    fusion_crop : int or None
        Random crop for the fusion loss (``None``: the whole batch).
    epochs, meta_steps : int
        Epochs (L) and generator updates per epoch (M).
    batch_size : int
        Pairs per batch before the source swap (which doubles it).
    swap : bool
        Feed every batch in both source orders.
    lr, inner_lr, generator_lr : float
        Learning rates of F and T (Adam), of the inner step, and of the generator.
    generator_update : {"normalized", "optimizer"}
        Generator update rule (see :class:`~tdfusion.MetaFusionTrainer`).
    step_size, gamma : int, float
        StepLR schedule of every optimiser (the research code's 10 and 0.1).
    encoder, model : str
        SegFormer encoder and YOLO model yaml.
    seed : int
        Seed of the data order and crops.
    num_workers : int
        Data-loading processes.
    fusion_steps : int or None
        Cap on fusion steps per epoch (None: one full pass).
    stride : int
        Keep every ``stride``-th training pair (the paper's LLVIP protocol uses 10).
    loss_weights : {"learned", "equal", "max_intensity"}
        ``"learned"``: a :class:`~tdfusion.LossGenerator` trained by the meta steps (the
        method). ``"equal"`` / ``"max_intensity"``: a fixed
        :class:`~tdfusion.nets.FixedLossWeights` rule (then ``meta_steps`` must be 0).
    alpha : float
        Weight of the gradient term of the fusion loss (the paper's 1).
    data_crop : int or None
        Random crop (with random flips) applied to every training pair when it is read, so
        that pairs of different sizes form batches; ``None``: whole images.
    exposure_augment : bool
        Also darken each source of a cropped pair at random
        (:class:`~tdfusion.data.RandomExposure`), so that night scenes keep their black level.
    init_weights : str or None
        Fusion weights to start from (a name of :func:`~tdfusion.nets.list_pretrained`, a
        ``save_pretrained`` file or a trainer checkpoint); ``None``: a fresh network.
    """

    name: str
    dataset: str
    task: str
    num_classes: int
    task_size: tuple[int, int] | None
    fusion_crop: int | None = 256
    epochs: int = 50
    meta_steps: int = 200
    batch_size: int = 1
    swap: bool = True
    lr: float = 1e-4
    inner_lr: float = 1e-4
    generator_lr: float = 1e-4
    generator_update: str = "normalized"
    step_size: int = 10
    gamma: float = 0.1
    encoder: str = "mit_b0"
    model: str = "yolov8n.yaml"
    seed: int = 0
    num_workers: int = 0
    fusion_steps: int | None = None
    stride: int = 1
    loss_weights: str = "learned"
    alpha: float = 1.0
    data_crop: int | None = None
    exposure_augment: bool = False
    init_weights: str | None = None

    def replace(self, **changes: Any) -> Recipe:
        """A copy with some settings changed (unknown names are an error)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown recipe settings: {sorted(unknown)}")
        if "task_size" in changes and changes["task_size"] is not None:
            changes["task_size"] = tuple(int(v) for v in changes["task_size"])
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-serialisable dict."""
        return dataclasses.asdict(self)


#: The paper's protocols (Sec. 4.1 and the research code: batch 2 via the source swap,
#: 256x256 fusion crops, task inputs resized to the sizes below, Adam at 1e-4, StepLR 10/0.1).
RECIPES: dict[str, Recipe] = {
    "msrs-segmentation": Recipe("msrs-segmentation", "msrs", "segmentation", 9, (240, 320)),
    "fmb-segmentation": Recipe("fmb-segmentation", "fmb", "segmentation", 15, (300, 400)),
    "m3fd-detection": Recipe("m3fd-detection", "m3fd", "detection", 6, (192, 256)),
    "llvip-detection": Recipe("llvip-detection", "llvip", "detection", 1, (256, 320), stride=10),
    # The bundled "tdfusion-ivif" fusion weights, first stage: ReFusionNet under the fusion
    # loss with the fixed max-intensity weighting, no task, on the 221 RoadScene pairs (see the
    # model card).
    "roadscene-pretrain": Recipe(
        "roadscene-pretrain",
        "roadscene",
        "none",
        0,
        None,
        fusion_crop=None,
        epochs=12,
        meta_steps=0,
        batch_size=8,
        swap=False,
        lr=1e-3,
        step_size=20,
        gamma=0.3,
        loss_weights="max_intensity",
        alpha=0.5,
        data_crop=128,
        exposure_augment=True,
    ),
    # Its second stage: the intensity term weighs more (alpha 0.1), so that the fused image
    # keeps the target's black and white levels, from the first stage's weights.
    "roadscene-finetune": Recipe(
        "roadscene-finetune",
        "roadscene",
        "none",
        0,
        None,
        fusion_crop=None,
        epochs=8,
        meta_steps=0,
        batch_size=8,
        swap=False,
        lr=3e-4,
        step_size=20,
        gamma=0.3,
        loss_weights="max_intensity",
        alpha=0.1,
        data_crop=128,
        exposure_augment=True,
        seed=1,
        init_weights="runs/roadscene-pretrain/fusion_model.pt",
    ),
}


def load_recipe(
    name: str | None = None, config: str | os.PathLike[str] | None = None, **overrides: Any
) -> Recipe:
    """A recipe by name, updated from a JSON file and keyword overrides (``None`` values ignored).

    Parameters
    ----------
    name : str, optional
        A key of :data:`RECIPES`; optional when the config file names one (``"name"``).
    config : str or os.PathLike, optional
        JSON file of settings.
    **overrides
        Settings that replace the recipe's.

    Returns
    -------
    Recipe
        The recipe.
    """
    settings: dict[str, Any] = {}
    if config is not None:
        try:
            settings = json.loads(Path(config).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise DataError(f"cannot read recipe config {config}: {error}") from None
        if not isinstance(settings, dict):
            raise DataError(f"recipe config {config} must hold a JSON object")
    name = name or settings.get("name")
    if name not in RECIPES:
        raise DataError(
            f'unknown recipe {name!r}; give --recipe or a "name" in the config, one of '
            f"{sorted(RECIPES)}"
        )
    settings.pop("name", None)
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return RECIPES[name].replace(**settings)


def build_dataset(recipe: Recipe, data_root: str | os.PathLike[str], split: str = "train"):
    """The recipe's dataset (full-size images; the trainer crops and resizes).

    Segmentation masks are resized to ``task_size`` (nearest), matching the task input.

    Parameters
    ----------
    recipe : Recipe
        The recipe.
    data_root : str or os.PathLike
        Dataset root in its standard layout.
    split : str
        ``"train"`` or ``"test"``.

    Returns
    -------
    torch.utils.data.Dataset
        Samples ``(a, b, target)``.

    Raises
    ------
    DataError
        If the root does not hold the dataset; the message names what is missing and the
        layout expected (``DATASET_LAYOUTS``).
    """
    try:
        return _build_dataset(recipe, data_root, split)
    except DataError as error:
        layout = DATASET_LAYOUTS.get(recipe.dataset, "").format(split=split)
        raise DataError(
            f"{error}; a {recipe.dataset} data root holds {layout}" if layout else str(error)
        ) from None


#: What each dataset's root folder holds (``{split}`` is ``train`` or ``test``), for errors.
DATASET_LAYOUTS = {
    "roadscene": "ir/ and vi/ with images of the same names",
    "msrs": "{split}/ir/, {split}/vi/ and {split}/Segmentation_labels/ (or, for detection, "
    "{split}/labels/ or label/<label set>/) with files of the same names",
    "fmb": "{split}/Infrared/, {split}/Visible/ and {split}/Label/ with images of the same names",
    "m3fd": "Ir/, Vis/ and Annotation/ (VOC .xml) with files of the same names",
    "llvip": "infrared/{split}/, visible/{split}/ and Annotations/ (VOC .xml)",
}


def _build_dataset(recipe: Recipe, data_root: str | os.PathLike[str], split: str):
    from tdfusion.data import (
        Compose,
        FMBDataset,
        LLVIPDataset,
        M3FDDataset,
        MSRSDataset,
        PairedImageDataset,
        RandomCrop,
        RandomExposure,
        RandomHorizontalFlip,
        RandomVerticalFlip,
    )

    transform = None
    if recipe.data_crop is not None:
        augment = torch.Generator().manual_seed(recipe.seed + 1)
        transform = Compose(
            [
                RandomCrop(recipe.data_crop, generator=augment),
                RandomHorizontalFlip(generator=augment),
                RandomVerticalFlip(generator=augment),
                *([RandomExposure(generator=augment)] if recipe.exposure_augment else []),
            ]
        )
    if recipe.dataset == "roadscene":
        root = Path(data_root)
        dataset = PairedImageDataset(root / "ir", root / "vi", transform=transform)
    elif recipe.dataset == "msrs":
        dataset = MSRSDataset(data_root, split, recipe.task, mask_size=recipe.task_size)
    elif recipe.dataset == "fmb":
        dataset = FMBDataset(data_root, split, mask_size=recipe.task_size)
    elif recipe.dataset == "m3fd":
        dataset = M3FDDataset(data_root, split)
    elif recipe.dataset == "llvip":
        dataset = LLVIPDataset(data_root, split)
    else:
        raise ValueError(f"unknown dataset {recipe.dataset!r}")
    if recipe.stride > 1:
        dataset.names = sorted(dataset.names)[:: recipe.stride]
    return dataset


def no_task(fused: torch.Tensor, target: Any) -> torch.Tensor:
    """The task loss of a recipe without a task (fusion pre-training): always zero."""
    return fused.sum() * 0.0


def build_task(recipe: Recipe) -> Any:
    """The recipe's task network, from scratch (nothing is downloaded).

    Parameters
    ----------
    recipe : Recipe
        The recipe.

    Returns
    -------
    torch.nn.Module
        A :class:`~tdfusion.tasks.SegmentationTask` or :class:`~tdfusion.tasks.DetectionTask`.
    """
    from tdfusion.tasks import DetectionTask, SegmentationTask

    if recipe.task == "none":
        return no_task
    if recipe.task == "segmentation":
        return SegmentationTask(recipe.num_classes, encoder=recipe.encoder)
    if recipe.task == "detection":
        return DetectionTask(recipe.num_classes, model=recipe.model)
    raise ValueError(f"unknown task {recipe.task!r}")


def build_trainer(recipe: Recipe, device: str | torch.device | None = None):
    """ReFusionNet F, LossGenerator G and the task network T, in a trainer set up as recipe says.

    Parameters
    ----------
    recipe : Recipe
        The recipe.
    device : str or torch.device, optional
        Training device.

    Returns
    -------
    tdfusion.MetaFusionTrainer
        The trainer.
    """
    from tdfusion import LearnableFusionLoss, LossGenerator, MetaFusionTrainer
    from tdfusion.nets import FixedLossWeights, ReFusionNet

    torch.manual_seed(recipe.seed)
    if recipe.loss_weights == "learned":
        generator: torch.nn.Module = LossGenerator()
    else:
        if recipe.meta_steps:
            raise ValueError(
                f"recipe {recipe.name}: fixed loss weights ({recipe.loss_weights!r}) cannot be "
                f"learned; set meta_steps to 0 (got {recipe.meta_steps})"
            )
        generator = FixedLossWeights(recipe.loss_weights)  # type: ignore[arg-type]
    return MetaFusionTrainer(
        ReFusionNet()
        if recipe.init_weights is None
        else ReFusionNet.from_pretrained(recipe.init_weights),
        build_task(recipe),
        generator,
        LearnableFusionLoss(alpha=recipe.alpha),
        inner_lr=recipe.inner_lr,
        generator_lr=recipe.generator_lr,
        generator_update=recipe.generator_update,  # type: ignore[arg-type]
        fusion_lr=recipe.lr,
        task_lr=recipe.lr,
        fusion_crop=recipe.fusion_crop,
        task_size=None if recipe.task_size is None else tuple(recipe.task_size),
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.StepLR(
            optimizer, recipe.step_size, recipe.gamma
        ),
        device=device,
        seed=recipe.seed,
    )


def train(
    recipe: Recipe,
    data_root: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    device: str | torch.device | None = None,
    resume: bool = True,
    progress: bool = True,
):
    """Train with a recipe into ``out`` (checkpoint every epoch; resumes from it by default).

    Writes ``out/recipe.json``, ``out/checkpoint.pt`` (every epoch), ``out/training_log.csv``
    and, at the end, ``out/fusion_model.pt`` and (with learned loss weights)
    ``out/loss_generator.pt`` (``save_pretrained`` files for ``tdfusion fuse`` and
    ``tdfusion weights``).

    Under ``torchrun`` with several processes this joins their process group and trains
    data-parallel (see :doc:`/howto/distributed`): ``batch_size`` is per process, and rank 0
    alone writes the files. ``out`` must be on a file system every rank sees for resuming.

    Parameters
    ----------
    recipe : Recipe
        The protocol.
    data_root : str or os.PathLike
        Dataset root.
    out : str or os.PathLike
        Output folder.
    device : str or torch.device, optional
        Training device.
    resume : bool
        Continue from ``out/checkpoint.pt`` when it exists.
    progress : bool
        Show progress bars.

    Returns
    -------
    tdfusion.MetaFusionTrainer
        The trained trainer.

    Raises
    ------
    OutputInUseError
        If another process trains into ``out`` (rank 0 holds an
        :func:`~tdfusion.files.output_lock` on it while training).
    DataError
        If the data root does not hold the dataset. A run that fails before training leaves
        no output folder it created.
    """
    # Building the trainer joins the process group under torchrun (this function starts none);
    # its strategy says whether this process writes the files.
    trainer = build_trainer(recipe, device)
    strategy = trainer.strategy
    out = Path(out)
    created = _missing_folders(out)
    with contextlib.ExitStack() as stack:
        if strategy.is_main:
            stack.enter_context(output_lock(out, purpose="training"))
        try:
            _train_into(recipe, trainer, data_root, out, resume, progress)
        except BaseException:
            stack.close()
            if strategy.is_main:
                _remove_if_unused(created, out)
            raise
    strategy.barrier()
    return trainer


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, innermost first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _remove_if_unused(created: list[Path], out: Path) -> None:
    """After a failed start, remove the output folders this run created if they hold nothing
    but what the run itself wrote before training (the lock and ``recipe.json``)."""
    if not created:
        return
    leftovers = {LOCK_NAME, "recipe.json"}
    if not {path.name for path in out.iterdir()} <= leftovers:
        return
    for name in leftovers:
        (out / name).unlink(missing_ok=True)
    for folder in created:
        try:
            folder.rmdir()
        except OSError:  # not empty: something else was put there meanwhile
            return


def _train_into(recipe: Recipe, trainer, data_root, out: Path, resume: bool, progress: bool):
    from torch.utils.data import DataLoader, default_collate

    from tdfusion.data import SwapSources, detection_collate
    from tdfusion.trainer import CSVLogger

    strategy = trainer.strategy
    main_process = strategy.is_main
    if main_process:
        out.mkdir(parents=True, exist_ok=True)
    dataset = build_dataset(recipe, data_root, "train")
    if len(dataset) < 2 * recipe.batch_size and recipe.meta_steps > 0:
        raise DataError(
            f"{data_root}: {len(dataset)} training pair(s) found; a meta step needs two batches "
            f"of {recipe.batch_size}"
        )
    collate = detection_collate if recipe.task == "detection" else default_collate
    loader = DataLoader(
        dataset,
        batch_size=recipe.batch_size,
        shuffle=True,
        drop_last=len(dataset) >= 2 * recipe.batch_size,
        collate_fn=SwapSources(collate) if recipe.swap else collate,
        num_workers=recipe.num_workers,
        generator=torch.Generator().manual_seed(recipe.seed),
    )
    if main_process:
        (out / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=2) + "\n")
    checkpoint = out / "checkpoint.pt"
    # Rank 0 decides whether to resume, so that all ranks agree even if only it sees the file.
    resume_from = strategy.broadcast_object(resume and checkpoint.is_file())
    if resume_from and not checkpoint.is_file():
        raise DataError(
            f"rank {strategy.rank} cannot read {checkpoint}, from which rank 0 resumes; "
            "put --out on a file system that every node sees"
        )
    trainer.fit(
        loader,
        epochs=recipe.epochs,
        meta_steps=recipe.meta_steps,
        fusion_steps=recipe.fusion_steps,
        checkpoint=checkpoint,
        resume=checkpoint if resume_from else None,
        callbacks=[CSVLogger(out / "training_log.csv")],
        progress=progress,
    )
    if main_process:
        trainer.fusion_model.save_pretrained(out / "fusion_model.pt")
        if recipe.loss_weights == "learned":
            trainer.loss_generator.save_pretrained(out / "loss_generator.pt")
    return trainer


def make_smoke_dataset(recipe: Recipe, folder: str | os.PathLike[str]) -> Path:
    """Lay out the bundled sample in the recipe's dataset format, for a quick end-to-end run.

    Segmentation masks are derived from the sample's boxes (class 2 "person" and 1 "car" in
    MSRS numbering inside boxes whose infrared is warm, 0 elsewhere); detection annotations are
    the sample's boxes (written as YOLO or VOC files as the layout needs).

    Parameters
    ----------
    recipe : Recipe
        The recipe whose layout to write.
    folder : str or os.PathLike
        Where to write it.

    Returns
    -------
    pathlib.Path
        The dataset root.
    """
    from PIL import Image

    from tdfusion.data import sample_dataset, sample_root

    root = Path(folder)
    sample = sample_dataset()
    source = sample_root()
    layouts = {
        "msrs": ("train/ir", "train/vi"),
        "fmb": ("train/Infrared", "train/Visible"),
        "m3fd": ("Ir", "Vis"),
        "llvip": ("infrared/train", "visible/train"),
        "roadscene": ("ir", "vi"),
    }
    ir_folder, vis_folder = (root / part for part in layouts[recipe.dataset])
    for folder_path in (ir_folder, vis_folder):
        folder_path.mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(sample.names):
        (ir_folder / f"{name}.png").write_bytes((source / "ir" / f"{name}.png").read_bytes())
        (vis_folder / f"{name}.png").write_bytes((source / "vi" / f"{name}.png").read_bytes())
        a, _, boxes = sample[index]
        height, width = a.shape[-2:]
        if recipe.task == "segmentation":
            mask = np.zeros((height, width), dtype=np.uint8)
            for label, xc, yc, w, h in boxes.tolist():
                x0, x1 = int((xc - w / 2) * width), int((xc + w / 2) * width)
                y0, y1 = int((yc - h / 2) * height), int((yc + h / 2) * height)
                region = a[0, y0:y1, x0:x1].numpy()
                warm = region > np.median(region)
                mask[y0:y1, x0:x1][warm] = 2 if label == 0 else 1
            mask = np.minimum(mask, recipe.num_classes - 1)
            labels = "Segmentation_labels" if recipe.dataset == "msrs" else "Label"
            label_folder = root / "train" / labels
            label_folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(label_folder / f"{name}.png")
        elif recipe.task == "none":
            continue  # fusion pre-training reads no labels
        elif recipe.dataset == "msrs":
            label_folder = root / "train" / "labels"
            label_folder.mkdir(parents=True, exist_ok=True)
            (label_folder / f"{name}.txt").write_text(
                (source / "labels" / f"{name}.txt").read_text()
            )
        else:
            _write_voc(root, recipe, name, boxes, height, width)
    return root


_SAMPLE_TO_VOC = {"m3fd": {0: "People", 1: "Motorcycle", 2: "Car"}, "llvip": {0: "person"}}


def _write_voc(root: Path, recipe: Recipe, name: str, boxes, height: int, width: int) -> None:
    folder = root / ("Annotation" if recipe.dataset == "m3fd" else "Annotations")
    folder.mkdir(parents=True, exist_ok=True)
    names: Mapping[int, str] = _SAMPLE_TO_VOC[recipe.dataset]
    objects = []
    for label, xc, yc, w, h in boxes.tolist():
        if int(label) not in names:
            continue
        x0, x1 = (xc - w / 2) * width, (xc + w / 2) * width
        y0, y1 = (yc - h / 2) * height, (yc + h / 2) * height
        objects.append(
            f"<object><name>{names[int(label)]}</name><bndbox><xmin>{x0:.1f}</xmin>"
            f"<ymin>{y0:.1f}</ymin><xmax>{x1:.1f}</xmax><ymax>{y1:.1f}</ymax></bndbox></object>"
        )
    (folder / f"{name}.xml").write_text(
        f"<annotation><size><width>{width}</width><height>{height}</height></size>"
        + "".join(objects)
        + "</annotation>\n"
    )
