"""Datasets of aligned image pairs: any folder pair, and the MSRS, FMB, M3FD and LLVIP layouts.

Every dataset yields ``(a, b, target)``: ``a`` (infrared) and ``b`` (visible) are float32
tensors (1, H, W) in [0, 1] (the BT.601 Y channel), and ``target`` is an int64 mask (H, W)
for segmentation, float boxes (M, 5) ``[class, x_center, y_center, width, height]``
(normalised) for detection, or the file stem for unlabelled pairs. Batch detection samples with
:func:`~tdfusion.data.detection_collate`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from tdfusion.data.io import read_luma_pair, read_size, size_mismatch_message
from tdfusion.data.labels import read_mask, read_voc_boxes, read_yolo_boxes
from tdfusion.data.layouts import LAYOUTS, DatasetLayout, find_folder
from tdfusion.errors import DataError
from tdfusion.files import pair_folders

__all__ = [
    "DetectionPairDataset",
    "FMBDataset",
    "LLVIPDataset",
    "M3FDDataset",
    "MSRSDataset",
    "PairedImageDataset",
    "SegmentationPairDataset",
]


def _require_folder(path: Path, what: str) -> Path:
    return find_folder([path], what)


class PairedImageDataset(Dataset):
    """Aligned image pairs from two folders, matched by file stem.

    Parameters
    ----------
    ir_dir, vis_dir : str or os.PathLike
        Folders of the first (infrared) and second (visible) sources.
    transform : callable, optional
        Paired transform applied to ``(a, b, target)`` (such as :class:`~tdfusion.data.Compose`).
    names : sequence of str, optional
        Restrict to these stems (in this order).
    extensions : sequence of str, optional
        Only read files with these suffixes (e.g. ``[".png"]``); default: every image suffix of
        :data:`tdfusion.files.IMAGE_SUFFIXES`.

    Raises
    ------
    DataError
        For a missing or empty folder, or names present in one folder only (the first few of
        each side are listed); an unreadable image or a size mismatch is reported, with the
        file names, when that item is read (or, for every pair at once, by
        :meth:`check_files`).

    Example
    -------
    >>> dataset = PairedImageDataset("MSRS/test/ir", "MSRS/test/vi")  # doctest: +SKIP
    >>> a, b, name = dataset[0]  # doctest: +SKIP
    """

    def __init__(
        self,
        ir_dir: str | os.PathLike[str],
        vis_dir: str | os.PathLike[str],
        *,
        transform: Callable[[tuple], tuple] | None = None,
        names: Sequence[str] | None = None,
        extensions: Sequence[str] | None = None,
    ) -> None:
        pairs = dict(pair_folders({"infrared": ir_dir, "visible": vis_dir}, extensions=extensions))
        if names is not None:
            unknown = [n for n in names if n not in pairs]
            if unknown:
                raise DataError(f"no image pair named {unknown[:3]} in {ir_dir} and {vis_dir}")
            pairs = {n: pairs[n] for n in names}
        self.names = list(pairs)
        self.files = pairs
        self.transform = transform

    def __len__(self) -> int:
        return len(self.names)

    def check_files(self) -> None:
        """Read the header of both images of every pair and refuse the pairs that cannot train.

        Only headers are read, no pixel is decoded: 0.12-0.14 s per 1000 pairs of the MSRS,
        LLVIP and RoadScene samples from the page cache, 0.4-1.7 s from a local disk (a full
        read takes 8-95 s), so that a long run finds an unreadable file or a pair of two sizes
        before it starts rather than when an epoch reaches it. Pixel data that fail only when
        decoded (a truncated JPEG) are still reported when the item is read.

        Raises
        ------
        DataError
            Naming the first three problems (an unreadable, missing or empty file; two sizes
            within a pair, as displayed) and how many pairs have one.
        """
        problems = []
        for name in self.names:
            files = self.files[name]
            try:
                size_a = read_size(files["infrared"])
                size_b = read_size(files["visible"])
            except DataError as error:
                problems.append(str(error))
                continue
            if size_a != size_b:
                problems.append(
                    size_mismatch_message(files["infrared"], size_a, files["visible"], size_b)
                )
        if problems:
            more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
            raise DataError(
                f"{len(problems)} of {len(self.names)} image pairs cannot be used: "
                f"{'; '.join(problems[:3])}{more}"
            )

    def read_pair(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The two sources of item ``index`` as (1, H, W) tensors in [0, 1]."""
        files = self.files[self.names[index]]
        luma_a, luma_b, _, _ = read_luma_pair(files["infrared"], files["visible"])
        return torch.from_numpy(luma_a)[None], torch.from_numpy(luma_b)[None]

    def target(self, index: int, size: tuple[int, int]) -> Any:
        """The target of item ``index`` for images of ``size`` (here: the file stem)."""
        return self.names[index]

    def task_target(self, index: int, size: tuple[int, int]) -> Any:
        """The target of item ``index`` as ``dataset[index]`` delivers it without a transform.

        :meth:`target` reads it for images of ``size``; a dataset that resizes its targets for
        the task (a segmentation mask to ``mask_size``) does that here too.

        Parameters
        ----------
        index : int
            Item.
        size : (int, int)
            (H, W) of the item's images.

        Returns
        -------
        Any
            The target.
        """
        return self.target(index, size)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, Any]:
        a, b = self.read_pair(index)
        sample = (a, b, self.target(index, tuple(a.shape[-2:])))
        return self.transform(sample) if self.transform is not None else sample


class DetectionPairDataset(PairedImageDataset):
    """Image pairs with detection boxes (YOLO ``.txt`` files or VOC ``.xml`` annotations).

    Parameters
    ----------
    ir_dir, vis_dir : str or os.PathLike
        Source folders.
    label_dir : str or os.PathLike
        Folder of ``<stem>.txt`` (YOLO) or ``<stem>.xml`` (VOC) files; a missing file means no
        object (but a folder with no file for any of the images is an error).
    classes : sequence of str
        Class names (index = class id).
    label_format : {"yolo", "voc"}
        File format of the labels.
    transform, names, extensions
        As in :class:`PairedImageDataset`.

    Example
    -------
    >>> dataset = DetectionPairDataset(  # doctest: +SKIP
    ...     "data/ir", "data/vi", "data/labels", ["person", "bicycle", "car"]
    ... )
    >>> a, b, boxes = dataset[0]  # doctest: +SKIP
    """

    def __init__(
        self,
        ir_dir: str | os.PathLike[str],
        vis_dir: str | os.PathLike[str],
        label_dir: str | os.PathLike[str],
        classes: Sequence[str],
        *,
        label_format: str = "yolo",
        transform: Callable[[tuple], tuple] | None = None,
        names: Sequence[str] | None = None,
        extensions: Sequence[str] | None = None,
    ) -> None:
        if label_format not in ("yolo", "voc"):
            raise ValueError(f"label_format must be 'yolo' or 'voc', got {label_format!r}")
        super().__init__(ir_dir, vis_dir, transform=transform, names=names, extensions=extensions)
        self.label_dir = _require_folder(Path(label_dir), "label")
        self.classes = tuple(classes)
        self.label_format = label_format
        suffix = ".txt" if label_format == "yolo" else ".xml"
        if not any((self.label_dir / f"{name}{suffix}").is_file() for name in self.names):
            # A wrong label folder would otherwise read as "no object anywhere".
            raise DataError(
                f"label folder {self.label_dir} holds no {suffix} file for any of the "
                f"{len(self.names)} image pairs (expected e.g. {self.names[0]}{suffix})"
            )

    def target(self, index: int, size: tuple[int, int]) -> torch.Tensor:
        stem = self.names[index]
        if self.label_format == "yolo":
            return read_yolo_boxes(self.label_dir / f"{stem}.txt", len(self.classes))
        path = self.label_dir / f"{stem}.xml"
        if not path.is_file():
            return torch.zeros((0, 5))
        return read_voc_boxes(path, self.classes, image_size=size)


class SegmentationPairDataset(PairedImageDataset):
    """Image pairs with segmentation masks (``<stem>.png`` of class indices).

    Parameters
    ----------
    ir_dir, vis_dir : str or os.PathLike
        Source folders.
    mask_dir : str or os.PathLike
        Folder of label images.
    num_classes : int
        Number of classes (values must be below it; 255 is allowed as "ignore").
    mask_size : (int, int), optional
        Resize masks (nearest) to this ``(height, width)``, e.g. the trainer's ``task_size``;
        applied after ``transform``, so geometric transforms see full-size masks.
    transform, names, extensions
        As in :class:`PairedImageDataset`.

    Raises
    ------
    DataError
        As :class:`PairedImageDataset`, or for a missing label folder or a pair without its
        ``<stem>.png`` mask (the first few are named); a mask of the wrong size or with
        values out of range is reported when that item is read.

    Example
    -------
    >>> dataset = SegmentationPairDataset(  # doctest: +SKIP
    ...     "MSRS/train/ir", "MSRS/train/vi", "MSRS/train/Segmentation_labels", 9
    ... )
    >>> a, b, mask = dataset[0]  # doctest: +SKIP
    """

    def __init__(
        self,
        ir_dir: str | os.PathLike[str],
        vis_dir: str | os.PathLike[str],
        mask_dir: str | os.PathLike[str],
        num_classes: int,
        *,
        mask_size: tuple[int, int] | None = None,
        transform: Callable[[tuple], tuple] | None = None,
        names: Sequence[str] | None = None,
        extensions: Sequence[str] | None = None,
    ) -> None:
        super().__init__(ir_dir, vis_dir, transform=transform, names=names, extensions=extensions)
        self.mask_dir = _require_folder(Path(mask_dir), "segmentation label")
        masks = {path.name for path in self.mask_dir.iterdir()}
        missing = [name for name in self.names if f"{name}.png" not in masks]
        if missing:
            listed = ", ".join(f"{name}.png" for name in missing[:3])
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise DataError(
                f"segmentation label folder {self.mask_dir} lacks the mask of {len(missing)} of "
                f"the {len(self.names)} image pairs: {listed}{more} (every pair needs "
                "<stem>.png)"
            )
        self.num_classes = int(num_classes)
        self.mask_size = None if mask_size is None else (int(mask_size[0]), int(mask_size[1]))

    def target(self, index: int, size: tuple[int, int]) -> torch.Tensor:
        path = self.mask_dir / f"{self.names[index]}.png"
        mask = read_mask(path, self.num_classes)
        if tuple(mask.shape) != size:
            raise DataError(
                f"segmentation label {path} is {mask.shape[1]}x{mask.shape[0]} but its images are "
                f"{size[1]}x{size[0]} (width x height)"
            )
        return mask

    def task_target(self, index: int, size: tuple[int, int]) -> torch.Tensor:
        return self._to_mask_size(self.target(index, size))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, Any]:
        a, b = self.read_pair(index)
        sample = (a, b, self.target(index, tuple(a.shape[-2:])))
        if self.transform is not None:
            sample = self.transform(sample)
        a, b, mask = sample
        return a, b, self._to_mask_size(mask)

    def _to_mask_size(self, mask: torch.Tensor) -> torch.Tensor:
        if self.mask_size is None or tuple(mask.shape) == self.mask_size:
            return mask
        resized = F.interpolate(mask[None, None].float(), size=self.mask_size, mode="nearest")
        return resized[0, 0].long()


def keep_every(dataset: PairedImageDataset, stride: int) -> PairedImageDataset:
    """Keep every ``stride``-th pair of ``dataset`` (sorted by name); changes it in place.

    Parameters
    ----------
    dataset : PairedImageDataset
        The dataset.
    stride : int
        1 keeps every pair (the paper's LLVIP protocol uses 10).

    Returns
    -------
    PairedImageDataset
        ``dataset``.

    Raises
    ------
    ValueError
        If ``stride`` is below 1.
    """
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    dataset.names = sorted(dataset.names)[::stride]
    return dataset


def layout_dataset(
    layout: DatasetLayout,
    root: str | os.PathLike[str],
    split: str | None,
    task: str = "fusion",
    *,
    label_set: str = "fusion",
    mask_size: tuple[int, int] | None = None,
    transform: Callable[[tuple], tuple] | None = None,
) -> PairedImageDataset:
    """The dataset of a root in one of the standard layouts, for one task.

    Parameters
    ----------
    layout : DatasetLayout
        The layout (a value of :data:`tdfusion.data.layouts.LAYOUTS`).
    root : str or os.PathLike
        Dataset root.
    split : str or None
        Split folder (``None``: none).
    task : str
        A task of ``layout.labels``, or ``"fusion"`` (no labels; the target is the stem).
    label_set : str
        Annotation set, where the layout has several.
    mask_size : (int, int), optional
        Resize segmentation masks to this size.
    transform : callable, optional
        Paired transform.

    Returns
    -------
    PairedImageDataset
        A :class:`PairedImageDataset`, :class:`SegmentationPairDataset` or
        :class:`DetectionPairDataset`.
    """
    ir_dir, vis_dir = layout.sources(root, split)
    if task == "fusion":
        return PairedImageDataset(ir_dir, vis_dir, transform=transform)
    labels = layout.labels[task]
    label_dir = layout.label_folder(task, root, split, label_set)
    if labels.format == "mask":
        return SegmentationPairDataset(
            ir_dir,
            vis_dir,
            label_dir,
            len(labels.classes),
            mask_size=mask_size,
            transform=transform,
        )
    return DetectionPairDataset(
        ir_dir, vis_dir, label_dir, labels.classes, label_format=labels.format, transform=transform
    )


def MSRSDataset(
    root: str | os.PathLike[str],
    split: str | None = "train",
    task: str = "segmentation",
    *,
    label_set: str = "fusion",
    mask_size: tuple[int, int] | None = None,
    transform: Callable[[tuple], tuple] | None = None,
) -> PairedImageDataset:
    """MSRS (1083 train / 361 test pairs, 480x640) for segmentation or detection.

    Layout: ``root/{split}/{ir,vi}/NAME.png``; segmentation labels
    ``root/{split}/Segmentation_labels/NAME.png`` (9 classes: unlabelled, car, person, bike,
    curve, car stop, guardrail, color cone, bump); detection labels in YOLO format (person,
    bicycle, car) from the first of ``root/{split}/labels``,
    ``root/{split}/label/{label_set}``, ``root/label/{label_set}/{split}``,
    ``root/label/{label_set}`` (the layout of the public MSRS detection labels). With
    ``split=None`` the images are ``root/{ir,vi}`` (as in a folder of examples, or the bundled
    sample).

    Parameters
    ----------
    root : str or os.PathLike
        Dataset root.
    split : {"train", "test"} or None
        Sub-folder of the split.
    task : {"segmentation", "detection", "fusion"}
        Which labels to return (``"fusion"``: none, the target is the file stem).
    label_set : {"fusion", "infrared", "visible"}
        Which detection annotation set (the MSRS detection labels come in three).
    mask_size : (int, int), optional
        Resize masks to this size (e.g. 240x320, the paper's task input).
    transform : callable, optional
        Paired transform.

    Returns
    -------
    PairedImageDataset
        A :class:`SegmentationPairDataset`, a :class:`DetectionPairDataset` or, for
        ``task="fusion"``, a :class:`PairedImageDataset`.

    Example
    -------
    >>> from tdfusion.data import sample_root
    >>> dataset = MSRSDataset(sample_root(), split=None, task="detection")
    >>> a, b, boxes = dataset[0]
    >>> tuple(a.shape), boxes.shape[1]
    ((1, 480, 640), 5)
    """
    if task not in ("segmentation", "detection", "fusion"):
        raise ValueError(f"task must be 'segmentation', 'detection' or 'fusion', got {task!r}")
    return layout_dataset(
        LAYOUTS["msrs"],
        root,
        split,
        task,
        label_set=label_set,
        mask_size=mask_size,
        transform=transform,
    )


def FMBDataset(
    root: str | os.PathLike[str],
    split: str = "train",
    task: str = "segmentation",
    *,
    mask_size: tuple[int, int] | None = None,
    transform: Callable[[tuple], tuple] | None = None,
) -> PairedImageDataset:
    """FMB (1220 train / 280 test pairs, 600x800, 15 classes) for segmentation.

    Layout: ``root/{split}/{Infrared,Visible,Label}/NAME.png`` (``Label`` is not needed for
    ``task="fusion"``).

    Parameters
    ----------
    root : str or os.PathLike
        Dataset root.
    split : {"train", "test"}
        Split folder.
    task : {"segmentation", "fusion"}
        ``"fusion"``: no labels needed, the target is the file stem.
    mask_size : (int, int), optional
        Resize masks to this size (the paper's task input is 300x400).
    transform : callable, optional
        Paired transform.

    Returns
    -------
    PairedImageDataset
        A :class:`SegmentationPairDataset`, or a :class:`PairedImageDataset` for
        ``task="fusion"``.
    """
    if task not in ("segmentation", "fusion"):
        raise ValueError(f"task must be 'segmentation' or 'fusion', got {task!r}")
    return layout_dataset(
        LAYOUTS["fmb"], root, split, task, mask_size=mask_size, transform=transform
    )


def M3FDDataset(
    root: str | os.PathLike[str],
    split: str = "train",
    task: str = "detection",
    *,
    train_size: int = 3150,
    seed: int = 0,
    transform: Callable[[tuple], tuple] | None = None,
) -> PairedImageDataset:
    """M3FD (4200 pairs, 768x1024, 6 classes) for detection, with the paper's 3150/1050 split.

    Layout: ``root/{Ir,Vis}/NAME.png`` and ``root/Annotation/NAME.xml`` (VOC; People, Car,
    Bus, Motorcycle, Lamp, Truck; not needed for ``task="fusion"``). The paper's split was not
    published; this one is deterministic: the sorted names are permuted with
    ``torch.Generator().manual_seed(seed)`` and the first ``train_size`` are the training split
    (for smaller folders, the first 75%).

    Parameters
    ----------
    root : str or os.PathLike
        Dataset root.
    split : {"train", "test", "all"}
        Which part.
    task : {"detection", "fusion"}
        ``"fusion"``: no annotations needed, the target is the file stem.
    train_size : int
        Training pairs (3150 in the paper).
    seed : int
        Seed of the permutation.
    transform : callable, optional
        Paired transform.

    Returns
    -------
    PairedImageDataset
        A :class:`DetectionPairDataset`, or a :class:`PairedImageDataset` for
        ``task="fusion"``.
    """
    if task not in ("detection", "fusion"):
        raise ValueError(f"task must be 'detection' or 'fusion', got {task!r}")
    full = layout_dataset(LAYOUTS["m3fd"], root, None, task, transform=transform)
    if split == "all":
        return full
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    names = sorted(full.names)
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed)).tolist()
    cut = train_size if len(names) > train_size else int(0.75 * len(names))
    chosen = order[:cut] if split == "train" else order[cut:]
    full.names = [names[i] for i in sorted(chosen)]
    return full


def LLVIPDataset(
    root: str | os.PathLike[str],
    split: str | None = "train",
    task: str = "detection",
    *,
    stride: int = 1,
    transform: Callable[[tuple], tuple] | None = None,
) -> PairedImageDataset:
    """LLVIP (1024x1280, pedestrians) for detection.

    Layout: ``root/infrared/{split}/``, ``root/visible/{split}/`` and
    ``root/Annotations/NAME.xml`` (VOC, class ``person``). With ``split=None`` the images are
    ``root/infrared/`` and ``root/visible/``. The short folder names ``ir`` and ``vi`` are
    accepted too (as in a folder of examples). The paper keeps every 10th pair (``stride=10``:
    1203 train / 347 test). For any other layout use :class:`DetectionPairDataset`.

    Parameters
    ----------
    root : str or os.PathLike
        Dataset root.
    split : {"train", "test"} or None
        Split sub-folder, or None for flat folders.
    task : {"detection", "fusion"}
        ``"fusion"``: no annotations needed, the target is the file stem.
    stride : int
        Keep every ``stride``-th pair (sorted by name).
    transform : callable, optional
        Paired transform.

    Returns
    -------
    PairedImageDataset
        A :class:`DetectionPairDataset`, or a :class:`PairedImageDataset` for
        ``task="fusion"``.

    Example
    -------
    >>> dataset = LLVIPDataset("LLVIP", "train", stride=10)  # doctest: +SKIP
    >>> a, b, boxes = dataset[0]  # doctest: +SKIP
    """
    if task not in ("detection", "fusion"):
        raise ValueError(f"task must be 'detection' or 'fusion', got {task!r}")
    return keep_every(
        layout_dataset(LAYOUTS["llvip"], root, split, task, transform=transform), stride
    )
