"""The standard folder layouts of the benchmark datasets, each described once.

A :class:`DatasetLayout` says where a dataset keeps its infrared and visible images and, per
task, its labels (folders, file format, class names). The readers of :mod:`tdfusion.data`
(:func:`~tdfusion.data.MSRSDataset` and the others) find their folders through it, and the
bundled sample is written in any of these layouts from it (for the recipes' smoke runs), so a
layout cannot be read one way and written another.

Folders are templates relative to the dataset root: ``{split}`` is the split (``train`` or
``test``; a ``{split}`` part is dropped when there is no split) and ``{label_set}`` the
annotation set (MSRS detection). Where a layout lists several candidates, the first that
exists is used, and the first is the one written.

Example
-------
>>> layout = LAYOUTS["fmb"]
>>> [path.as_posix() for path in layout.folders(layout.infrared, "FMB", "train")]
['FMB/train/Infrared']
>>> layout.labels["segmentation"].format, len(layout.labels["segmentation"].classes)
('mask', 15)
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tdfusion.errors import DataError

__all__ = ["LAYOUTS", "DatasetLayout", "LabelLayout", "find_folder"]


@dataclass(frozen=True)
class LabelLayout:
    """Where a dataset keeps the labels of one task, and how they are written.

    Attributes
    ----------
    folders : tuple of str
        Candidate folders (templates; see the module docstring).
    format : {"mask", "yolo", "voc"}
        ``<stem>.png`` class-index masks, ``<stem>.txt`` YOLO boxes or ``<stem>.xml`` VOC
        annotations.
    classes : tuple of str
        Class names (index = class id).
    """

    folders: tuple[str, ...]
    format: str
    classes: tuple[str, ...]


@dataclass(frozen=True)
class DatasetLayout:
    """The folders of one dataset: its two sources and, per task, its labels.

    Attributes
    ----------
    name : str
        The dataset's name, as errors show it (``"MSRS"``).
    infrared, visible : tuple of str
        Candidate folders of each source (templates).
    labels : mapping of str to LabelLayout
        Task (``"segmentation"``, ``"detection"``) -> where its labels are.
    description : str
        One line on what a root holds, for errors (``{split}`` is filled in).
    """

    name: str
    infrared: tuple[str, ...]
    visible: tuple[str, ...]
    labels: Mapping[str, LabelLayout] = field(default_factory=dict)
    description: str = ""

    def folders(
        self,
        templates: Sequence[str],
        root: str | os.PathLike[str],
        split: str | None = None,
        label_set: str = "fusion",
    ) -> list[Path]:
        """The candidate folders of ``templates`` under ``root``, without repeats.

        Parameters
        ----------
        templates : sequence of str
            Folder templates, such as ``infrared``.
        root : str or os.PathLike
            Dataset root.
        split : str, optional
            Split folder; ``None`` drops the ``{split}`` parts.
        label_set : str
            Annotation set (MSRS detection).

        Returns
        -------
        list of pathlib.Path
            The folders, in the order of ``templates``.
        """
        found: list[Path] = []
        for template in templates:
            parts = [
                part.format(split=split or "", label_set=label_set) for part in template.split("/")
            ]
            path = Path(root, *(part for part in parts if part))
            if path not in found:
                found.append(path)
        return found

    def sources(self, root: str | os.PathLike[str], split: str | None = None) -> tuple[Path, Path]:
        """The infrared and visible folders of a root in this layout.

        Parameters
        ----------
        root : str or os.PathLike
            Dataset root.
        split : str, optional
            Split folder (``None``: none).

        Returns
        -------
        (pathlib.Path, pathlib.Path)
            ``(ir_dir, vis_dir)``.

        Raises
        ------
        DataError
            If a source folder is missing (naming the folders looked for).
        """
        return (
            find_folder(self.folders(self.infrared, root, split), f"{self.name} infrared"),
            find_folder(self.folders(self.visible, root, split), f"{self.name} visible"),
        )

    def label_folder(
        self,
        task: str,
        root: str | os.PathLike[str],
        split: str | None = None,
        label_set: str = "fusion",
    ) -> Path:
        """The label folder of ``task`` (the first candidate that exists).

        A single candidate is returned whether it exists or not, for the dataset to report.

        Parameters
        ----------
        task : str
            A key of ``labels``.
        root : str or os.PathLike
            Dataset root.
        split : str, optional
            Split folder.
        label_set : str
            Annotation set (MSRS detection).

        Returns
        -------
        pathlib.Path
            The folder.

        Raises
        ------
        DataError
            If none of several candidates exists.
        """
        candidates = self.folders(self.labels[task].folders, root, split, label_set)
        if len(candidates) == 1:
            return candidates[0]
        return find_folder(candidates, f"{self.name} {task} label")


def find_folder(candidates: Sequence[Path], what: str) -> Path:
    """The first of ``candidates`` that is a folder.

    Parameters
    ----------
    candidates : sequence of pathlib.Path
        Folders to try, in order.
    what : str
        What the folder holds (``"MSRS infrared"``), for the error.

    Returns
    -------
    pathlib.Path
        The folder.

    Raises
    ------
    DataError
        If none is: "``what`` folder X does not exist" for one candidate, "no ``what`` folder
        found; looked for X, Y" for several.
    """
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    if len(candidates) == 1:
        raise DataError(f"{what} folder {candidates[0]} does not exist")
    raise DataError(f"no {what} folder found; looked for " + ", ".join(str(c) for c in candidates))


MSRS_SEGMENTATION_CLASSES = (
    "unlabelled",
    "car",
    "person",
    "bike",
    "curve",
    "car stop",
    "guardrail",
    "color cone",
    "bump",
)
FMB_CLASSES = (
    "unlabelled",
    "road",
    "sidewalk",
    "building",
    "traffic light",
    "traffic sign",
    "vegetation",
    "sky",
    "person",
    "car",
    "truck",
    "bus",
    "motorcycle",
    "bicycle",
    "pole",
)

#: The standard layouts by the name recipes use (``Recipe.dataset`` in :mod:`tdfusion.recipes`).
LAYOUTS: dict[str, DatasetLayout] = {
    "msrs": DatasetLayout(
        "MSRS",
        ("{split}/ir",),
        ("{split}/vi",),
        {
            "segmentation": LabelLayout(
                ("{split}/Segmentation_labels",), "mask", MSRS_SEGMENTATION_CLASSES
            ),
            # The public MSRS detection labels come in three sets (fusion, infrared, visible).
            "detection": LabelLayout(
                (
                    "{split}/labels",
                    "{split}/label/{label_set}",
                    "label/{label_set}/{split}",
                    "label/{label_set}",
                ),
                "yolo",
                ("person", "bicycle", "car"),
            ),
        },
        "{split}/ir/, {split}/vi/ and {split}/Segmentation_labels/ (or, for detection, "
        "{split}/labels/ or label/<label set>/) with files of the same names",
    ),
    "fmb": DatasetLayout(
        "FMB",
        ("{split}/Infrared",),
        ("{split}/Visible",),
        {"segmentation": LabelLayout(("{split}/Label",), "mask", FMB_CLASSES)},
        "{split}/Infrared/, {split}/Visible/ and {split}/Label/ with images of the same names",
    ),
    "m3fd": DatasetLayout(
        "M3FD",
        ("Ir",),
        ("Vis",),
        {
            "detection": LabelLayout(
                ("Annotation",), "voc", ("People", "Car", "Bus", "Motorcycle", "Lamp", "Truck")
            )
        },
        "Ir/, Vis/ and Annotation/ (VOC .xml) with files of the same names",
    ),
    "llvip": DatasetLayout(
        "LLVIP",
        # The short names are those of a folder of examples.
        ("infrared/{split}", "ir/{split}"),
        ("visible/{split}", "vi/{split}"),
        {"detection": LabelLayout(("Annotations",), "voc", ("person",))},
        "infrared/{split}/, visible/{split}/ and Annotations/ (VOC .xml)",
    ),
    # RoadScene as used for fusion pre-training: one folder per source, no split, no labels.
    "roadscene": DatasetLayout(
        "RoadScene", ("ir",), ("vi",), description="ir/ and vi/ with images of the same names"
    ),
}
