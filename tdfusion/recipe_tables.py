"""The tables a recipe's names are looked up in: dataset readers and task builders.

:data:`DATASETS` maps ``Recipe.dataset`` to a reader ``(recipe, root, split, transform) ->
dataset`` (the layouts they read are in :data:`tdfusion.data.layouts.LAYOUTS`);
:data:`TASKS` maps ``Recipe.task`` to a builder ``recipe -> task network`` (or task loss);
:func:`read_transform` is the crop, flips, darkening, blur and noise applied to each pair as it
is read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from tdfusion.recipes import Recipe

__all__ = ["DATASETS", "TASKS", "no_task", "read_transform"]


def read_transform(recipe: Recipe) -> Any:
    """The transform applied to every pair when it is read (``data_crop``), or None.

    A random crop and flips, then, as the recipe asks, :class:`~tdfusion.data.RandomExposure`
    on both sources, :class:`~tdfusion.data.RandomBlur` on ``a`` and
    :class:`~tdfusion.data.RandomNoise` on ``b``, all drawn from one generator seeded by
    ``seed + 1``.
    """
    if recipe.data_crop is None:
        return None
    from tdfusion.data import (
        Compose,
        RandomBlur,
        RandomCrop,
        RandomExposure,
        RandomHorizontalFlip,
        RandomNoise,
        RandomVerticalFlip,
    )

    augment = torch.Generator().manual_seed(recipe.seed + 1)
    return Compose(
        [
            RandomCrop(recipe.data_crop, generator=augment),
            RandomHorizontalFlip(generator=augment),
            RandomVerticalFlip(generator=augment),
            *(
                [
                    RandomExposure(
                        low=recipe.exposure_low,
                        p=recipe.exposure_p,
                        max_gamma=recipe.exposure_gamma,
                        generator=augment,
                    )
                ]
                if recipe.exposure_augment
                else []
            ),
            # Blur and noise come after the darkening and only when asked for, so that the
            # random draws of recipes without them stay as they were.
            *([RandomBlur(recipe.blur_augment, generator=augment)] if recipe.blur_augment else []),
            *(
                [RandomNoise(recipe.noise_augment, generator=augment)]
                if recipe.noise_augment
                else []
            ),
        ]
    )


def _labels(recipe: Recipe) -> str:
    """The ``task`` argument of the dataset readers: ``"fusion"`` (pairs without labels) for a
    recipe without a task, the recipe's task otherwise."""
    return "fusion" if recipe.task == "none" else recipe.task


def _msrs(recipe: Recipe, root, split: str, transform):
    from tdfusion.data import MSRSDataset

    return MSRSDataset(
        root, split, _labels(recipe), mask_size=_mask_size(recipe), transform=transform
    )


def _fmb(recipe: Recipe, root, split: str, transform):
    from tdfusion.data import FMBDataset

    return FMBDataset(
        root, split, _labels(recipe), mask_size=_mask_size(recipe), transform=transform
    )


def _m3fd(recipe: Recipe, root, split: str, transform):
    from tdfusion.data import M3FDDataset

    return M3FDDataset(root, split, _labels(recipe), transform=transform)


def _llvip(recipe: Recipe, root, split: str, transform):
    from tdfusion.data import LLVIPDataset

    return LLVIPDataset(root, split, _labels(recipe), transform=transform)


def _roadscene(recipe: Recipe, root, split: str, transform):
    from tdfusion.data.datasets import layout_dataset
    from tdfusion.data.layouts import LAYOUTS

    return layout_dataset(LAYOUTS["roadscene"], root, None, transform=transform)


#: The dataset readers by ``Recipe.dataset``: ``(recipe, root, split, transform) ->
#: dataset``; the layouts they read are in :data:`tdfusion.data.layouts.LAYOUTS`. A recipe with
#: ``task="none"`` reads the pairs alone (no label folder needed; the target is the file stem).
DATASETS: dict[str, Callable[..., Any]] = {
    "msrs": _msrs,
    "fmb": _fmb,
    "m3fd": _m3fd,
    "llvip": _llvip,
    "roadscene": _roadscene,
}


def _mask_size(recipe: Recipe) -> tuple[int, int] | None:
    """Where segmentation masks are compared: the task size, or (``"full"``) as stored."""
    if recipe.label_resolution not in ("task", "full"):
        raise ValueError(
            f"label_resolution must be 'task' or 'full', got {recipe.label_resolution!r}"
        )
    return None if recipe.label_resolution == "full" else recipe.task_size


def no_task(fused: torch.Tensor, target: Any) -> torch.Tensor:
    """The task loss of a recipe without a task (fusion pre-training): always zero."""
    return fused.sum() * 0.0


def _segmentation_task(recipe: Recipe):
    from tdfusion.tasks import SegmentationTask

    # The research code's cross-entropy: at the full label size, unpadded, align_corners=True.
    research_loss = _mask_size(recipe) is None and recipe.task_size is not None
    return SegmentationTask(
        recipe.num_classes,
        encoder=recipe.encoder,
        pad=not research_loss,
        align_corners=research_loss,
    )


def _detection_task(recipe: Recipe):
    from tdfusion.tasks import DetectionTask

    return DetectionTask(recipe.num_classes, model=recipe.model)


#: The task builders by ``Recipe.task``: ``recipe -> task network`` (or task loss).
TASKS: dict[str, Callable[[Recipe], Any]] = {
    "segmentation": _segmentation_task,
    "detection": _detection_task,
    "none": lambda recipe: no_task,
}
