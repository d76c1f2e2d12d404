"""The bundled sample: four MSRS infrared/visible pairs with detection boxes (ATTRIBUTION.md)."""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from pathlib import Path

from tdfusion.data.datasets import DetectionPairDataset, PairedImageDataset

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
