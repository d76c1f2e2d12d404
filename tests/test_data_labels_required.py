"""Segmentation masks are checked when the dataset is built; fusion-only readers need no labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tdfusion.data import FMBDataset, M3FDDataset, SegmentationPairDataset
from tdfusion.errors import DataError


def write_pairs(folder: Path, names: list[str], ir: str = "ir", vis: str = "vi") -> None:
    for sub in (ir, vis):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        for name in names:
            Image.fromarray(np.full((24, 32), 100, dtype=np.uint8)).save(
                folder / sub / f"{name}.png"
            )


def write_masks(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.fromarray(np.full((24, 32), 1, dtype=np.uint8)).save(folder / f"{name}.png")


def test_a_missing_mask_is_found_when_the_dataset_is_built(tmp_path):
    names = [f"{i:03d}" for i in range(6)]
    write_pairs(tmp_path, names)
    write_masks(tmp_path / "masks", names[:1])
    (tmp_path / "masks" / "001.jpg").write_bytes(b"")  # a mask must be <stem>.png
    with pytest.raises(DataError) as caught:
        SegmentationPairDataset(tmp_path / "ir", tmp_path / "vi", tmp_path / "masks", 2)
    message = str(caught.value)
    assert (
        "lacks the mask of 5 of the 6 image pairs: 001.png, 002.png, 003.png and 2 more" in message
    )
    assert str(tmp_path / "masks") in message and "\n" not in message


def test_masks_are_needed_only_for_the_pairs_used(tmp_path):
    names = ["a", "b", "c"]
    write_pairs(tmp_path, names)
    write_masks(tmp_path / "masks", ["a", "c"])
    dataset = SegmentationPairDataset(
        tmp_path / "ir", tmp_path / "vi", tmp_path / "masks", 2, names=["c", "a"]
    )
    assert dataset.names == ["c", "a"] and int(dataset[0][2].max()) == 1
    with pytest.raises(DataError, match=r"lacks the mask of 1 of the 3 image pairs: b\.png \("):
        SegmentationPairDataset(tmp_path / "ir", tmp_path / "vi", tmp_path / "masks", 2)


def test_fmb_and_m3fd_read_pairs_without_labels_for_fusion(tmp_path):
    write_pairs(tmp_path / "fmb" / "train", ["x", "y"], ir="Infrared", vis="Visible")
    fmb = FMBDataset(tmp_path / "fmb", "train", "fusion")
    assert [fmb[i][2] for i in range(2)] == ["x", "y"]
    with pytest.raises(DataError, match="segmentation label folder .*Label does not exist"):
        FMBDataset(tmp_path / "fmb", "train")
    with pytest.raises(ValueError, match="task must be 'segmentation' or 'fusion'"):
        FMBDataset(tmp_path / "fmb", "train", "detection")

    names = [f"{i:02d}" for i in range(8)]
    write_pairs(tmp_path / "m3fd", names, ir="Ir", vis="Vis")
    train = M3FDDataset(tmp_path / "m3fd", "train", "fusion")
    test = M3FDDataset(tmp_path / "m3fd", "test", task="fusion")
    assert len(train) == 6 and len(test) == 2 and not set(train.names) & set(test.names)
    assert train[0][2] == train.names[0]
    with pytest.raises(DataError, match="label folder .*Annotation does not exist"):
        M3FDDataset(tmp_path / "m3fd", "train")
    with pytest.raises(ValueError, match="task must be 'detection' or 'fusion'"):
        M3FDDataset(tmp_path / "m3fd", "train", "segmentation")
