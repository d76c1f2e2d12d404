"""The bundled sample (four MSRS infrared/visible pairs with detection boxes, ATTRIBUTION.md),
and the sample written in any standard dataset layout."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import cast

import numpy as np
from PIL import Image

from tdfusion.data.datasets import DetectionPairDataset, PairedImageDataset
from tdfusion.data.layouts import DatasetLayout

__all__ = ["sample_dataset", "sample_folders", "sample_root"]


def sample_root() -> Path:
    """The folder of the bundled sample (``ir/``, ``vi/``, ``labels/``, ``classes.txt``).

    Returns
    -------
    pathlib.Path
        A folder inside the installed package.
    """
    return Path(str(resources.files("tdfusion.data") / "sample"))


def sample_folders() -> tuple[Path, Path]:
    """The infrared and visible folders of the bundled sample.

    Returns
    -------
    (pathlib.Path, pathlib.Path)
        ``(ir_dir, vis_dir)``.

    Example
    -------
    >>> ir_dir, vis_dir = sample_folders()
    >>> sorted(p.name for p in ir_dir.glob("*.png"))[:2]
    ['00004N.png', '00036N.png']
    """
    root = sample_root()
    return root / "ir", root / "vi"


def sample_dataset(
    task: str = "detection", transform: Callable[[tuple], tuple] | None = None
) -> PairedImageDataset:
    """A dataset over the bundled sample.

    Parameters
    ----------
    task : {"detection", "fusion"}
        ``"detection"``: targets are the bundled boxes (classes person, bicycle, car);
        ``"fusion"``: targets are the file stems.
    transform : callable, optional
        Paired transform.

    Returns
    -------
    PairedImageDataset
        Four pairs of 480x640 images.

    Example
    -------
    >>> dataset = sample_dataset()
    >>> len(dataset), dataset.classes
    (4, ('person', 'bicycle', 'car'))
    """
    root = sample_root()
    if task == "fusion":
        return PairedImageDataset(root / "ir", root / "vi", transform=transform)
    if task != "detection":
        raise ValueError(
            "the sample has detection boxes only: task must be 'detection' or 'fusion', "
            f"got {task!r}"
        )
    classes = (root / "classes.txt").read_text(encoding="utf-8").split("\n")
    return DetectionPairDataset(
        root / "ir", root / "vi", root / "labels", [c for c in classes if c], transform=transform
    )


# The sample's classes (MSRS detection) under the names each layout gives them; the first
# name a layout has is used, and boxes of a class it lacks are left out.
_SAMPLE_CLASS_NAMES = {
    "person": ("person", "People"),
    "bicycle": ("bicycle", "bike", "Motorcycle"),
    "car": ("car", "Car"),
}


def _class_ids(sample_classes: Sequence[str], layout_classes: Sequence[str]) -> dict[int, int]:
    """Sample class id -> the layout's class id, for the classes the layout has."""
    ids = {}
    for sample_id, sample_class in enumerate(sample_classes):
        names = [name for name in _SAMPLE_CLASS_NAMES[sample_class] if name in layout_classes]
        if names:
            ids[sample_id] = list(layout_classes).index(names[0])
    return ids


def write_sample_layout(
    layout: DatasetLayout,
    folder: str | os.PathLike[str],
    task: str | None = None,
    *,
    split: str = "train",
    num_classes: int | None = None,
) -> Path:
    """Write the bundled sample as a dataset root in ``layout``, for quick end-to-end runs.

    The images are copied into the layout's first infrared and visible folders. For
    ``task="segmentation"`` masks are drawn from the sample's boxes (the warmer half of the
    infrared inside each box gets the box's class, everything else class 0); for
    ``task="detection"`` the boxes are written as the layout's YOLO or VOC files. Classes are
    mapped by name to the layout's (a class it lacks is left out).

    Parameters
    ----------
    layout : DatasetLayout
        A value of :data:`tdfusion.data.layouts.LAYOUTS`.
    folder : str or os.PathLike
        The dataset root to write.
    task : str, optional
        A task of ``layout.labels``; ``None``: images only.
    split : str
        The split folder to write.
    num_classes : int, optional
        Clip mask values below it (a recipe with fewer classes than the layout).

    Returns
    -------
    pathlib.Path
        The dataset root.

    Example
    -------
    >>> from tdfusion.data.layouts import LAYOUTS
    >>> from tdfusion.data import FMBDataset
    >>> root = write_sample_layout(LAYOUTS["fmb"], "fmb", "segmentation")
    >>> sorted(FMBDataset(root)[0][2].unique().tolist())  # unlabelled, person, car
    [0, 8, 9]
    """
    root = Path(folder)
    sample = cast(DetectionPairDataset, sample_dataset())
    ir_folder, vis_folder = (
        layout.folders(templates, root, split)[0] for templates in (layout.infrared, layout.visible)
    )
    labels = None if task is None else layout.labels[task]
    label_folder = None
    if labels is not None:
        label_folder = layout.folders(labels.folders, root, split)[0]
        label_folder.mkdir(parents=True, exist_ok=True)
        class_ids = _class_ids(sample.classes, labels.classes)
    for folder_path in (ir_folder, vis_folder):
        folder_path.mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(sample.names):
        files = sample.files[name]
        (ir_folder / files["infrared"].name).write_bytes(files["infrared"].read_bytes())
        (vis_folder / files["visible"].name).write_bytes(files["visible"].read_bytes())
        if labels is None or label_folder is None:
            continue
        a, _, boxes = sample[index]
        boxes = [
            (class_ids[int(label)], xc, yc, w, h)
            for label, xc, yc, w, h in boxes.tolist()
            if int(label) in class_ids
        ]
        height, width = a.shape[-2:]
        if labels.format == "mask":
            mask = _mask_from_boxes(a[0].numpy(), boxes)
            if num_classes is not None:
                mask = np.minimum(mask, num_classes - 1)
            Image.fromarray(mask).save(label_folder / f"{name}.png")
        elif labels.format == "yolo":
            lines = [" ".join([str(box[0]), *(f"{v:.6f}" for v in box[1:])]) for box in boxes]
            (label_folder / f"{name}.txt").write_text("".join(f"{line}\n" for line in lines))
        else:
            _write_voc(label_folder / f"{name}.xml", boxes, labels.classes, height, width)
    return root


def _mask_from_boxes(infrared: np.ndarray, boxes: Sequence[tuple]) -> np.ndarray:
    height, width = infrared.shape
    mask = np.zeros((height, width), dtype=np.uint8)
    for label, xc, yc, w, h in boxes:
        x0, x1 = int((xc - w / 2) * width), int((xc + w / 2) * width)
        y0, y1 = int((yc - h / 2) * height), int((yc + h / 2) * height)
        region = infrared[y0:y1, x0:x1]
        mask[y0:y1, x0:x1][region > np.median(region)] = label
    return mask


def _write_voc(
    path: Path, boxes: Sequence[tuple], classes: Sequence[str], height: int, width: int
) -> None:
    objects = []
    for label, xc, yc, w, h in boxes:
        x0, x1 = (xc - w / 2) * width, (xc + w / 2) * width
        y0, y1 = (yc - h / 2) * height, (yc + h / 2) * height
        objects.append(
            f"<object><name>{classes[label]}</name><bndbox><xmin>{x0:.1f}</xmin>"
            f"<ymin>{y0:.1f}</ymin><xmax>{x1:.1f}</xmax><ymax>{y1:.1f}</ymax></bndbox></object>"
        )
    path.write_text(
        f"<annotation><size><width>{width}</width><height>{height}</height></size>"
        + "".join(objects)
        + "</annotation>\n"
    )
