"""Real MSRS pairs for the benchmarks, and segmentation masks made from their boxes.

MSRS's 9-class segmentation labels are not in the shared data; the masks here are the shared
detection boxes (``label/fusion``) painted with MSRS class numbers (car 1, person 2, bike 3) where
the infrared image is warmer than the box's median, 0 elsewhere, at the full 480 x 640.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

#: Detection class (MSRS/classes_detection.txt: person, bicycle, car) -> segmentation class.
SEGMENTATION_CLASS = {0: 2, 1: 3, 2: 1}


def sample_names(data: Path, count: int) -> list[str]:
    folder = data / "MSRS" / "example" / "ir"
    return sorted(p.stem for p in folder.glob("*.png"))[:count] if folder.is_dir() else []


def load_pairs(data: Path, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Y channels in [0, 1], (1, 1, 480, 640), of real MSRS pairs (random when absent)."""
    folder = data / "MSRS" / "example"
    pairs = []
    for name in sample_names(data, count):
        ir = np.asarray(Image.open(folder / "ir" / f"{name}.png").convert("L"), np.float32) / 255
        rgb = np.asarray(Image.open(folder / "vi" / f"{name}.png").convert("RGB"), np.float32)
        luma = (rgb / 255) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        pairs.append((torch.from_numpy(ir)[None, None], torch.from_numpy(luma)[None, None]))
    generator = torch.Generator().manual_seed(0)
    while len(pairs) < count:
        pairs.append(tuple(torch.rand(1, 1, 480, 640, generator=generator) for _ in range(2)))
    return pairs


def box_masks(data: Path, count: int) -> list[torch.Tensor]:
    """(1, 480, 640) int64 masks from the boxes (random 9-class masks when absent)."""
    folder = data / "MSRS" / "example"
    names = sample_names(data, count)
    masks = []
    for (ir, _), name in zip(load_pairs(data, count), names):
        mask = torch.zeros(480, 640, dtype=torch.int64)
        labels = folder / "label" / "fusion" / f"{name}.txt"
        for line in labels.read_text().split("\n") if labels.is_file() else []:
            if not line.strip():
                continue
            label, xc, yc, w, h = (float(v) for v in line.split())
            x0, x1 = int((xc - w / 2) * 640), int((xc + w / 2) * 640)
            y0, y1 = int((yc - h / 2) * 480), int((yc + h / 2) * 480)
            region = ir[0, 0, y0:y1, x0:x1]
            if region.numel():
                warm = region > region.median()
                mask[y0:y1, x0:x1][warm] = SEGMENTATION_CLASS.get(int(label), 0)
        masks.append(mask[None])
    generator = torch.Generator().manual_seed(1)
    while len(masks) < count:
        masks.append(torch.randint(0, 9, (1, 480, 640), generator=generator))
    return masks


def resize_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resizing, as the datasets' ``mask_size`` does."""
    return F.interpolate(masks[:, None].float(), size=size, mode="nearest")[:, 0].long()
