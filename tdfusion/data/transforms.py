"""Paired transforms on ``(a, b, target)`` samples, the source-swap augmentation and collation.

A sample is ``(a, b, target)`` with ``a`` and ``b`` float tensors (1, H, W) and ``target``
either a segmentation mask (int64 (H, W)), detection boxes (float (M, 5)
``[class, x_center, y_center, width, height]``, normalised), or anything else (a file stem),
which geometric transforms pass through. Every geometric transform moves the images, the mask
and the boxes together.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

__all__ = [
    "Compose",
    "RandomCrop",
    "RandomFlip",
    "RandomHorizontalFlip",
    "RandomVerticalFlip",
    "Resize",
    "SwapSources",
    "detection_collate",
    "segmentation_collate",
    "swap_sources",
]

Sample = tuple[torch.Tensor, torch.Tensor, Any]


def _is_mask(target: Any) -> bool:
    return isinstance(target, torch.Tensor) and target.dim() == 2 and not target.is_floating_point()


def _is_boxes(target: Any) -> bool:
    return (
        isinstance(target, torch.Tensor)
        and target.is_floating_point()
        and target.dim() == 2
        and target.shape[1] == 5
    )


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


class Compose:
    """Apply transforms in order.

    Parameters
    ----------
    transforms : sequence of callable
        Each maps a sample ``(a, b, target)`` to a sample.

    Example
    -------
    >>> import torch
    >>> transform = Compose([RandomCrop(8), Resize((4, 4))])
    >>> sample = (torch.rand(1, 10, 12), torch.rand(1, 10, 12), torch.zeros(10, 12).long())
    >>> a, b, mask = transform(sample)
    >>> tuple(a.shape), tuple(mask.shape)
    ((1, 4, 4), (4, 4))
    """

    def __init__(self, transforms: Sequence[Callable[[Sample], Sample]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, sample: Sample) -> Sample:
        for transform in self.transforms:
            sample = transform(sample)
        return sample


class RandomCrop:
    """Crop the same random window from both sources (and the mask or boxes).

    Boxes are clipped to the window; a box keeping less than ``min_visible`` of its area, or
    narrower or lower than 2 pixels, is dropped.

    Parameters
    ----------
    size : int or (int, int)
        Window ``(height, width)``; images smaller than it are an error.
    min_visible : float
        Fraction of a box's area that must stay inside the window.
    generator : torch.Generator, optional
        Source of the random offsets (for reproducibility).
    """

    def __init__(
        self,
        size: int | Sequence[int],
        min_visible: float = 0.3,
        generator: torch.Generator | None = None,
    ) -> None:
        self.size = _pair(size)
        self.min_visible = float(min_visible)
        self.generator = generator

    def __call__(self, sample: Sample) -> Sample:
        a, b, target = sample
        height, width = a.shape[-2:]
        crop_h, crop_w = self.size
        if crop_h > height or crop_w > width:
            raise ValueError(
                f"RandomCrop {crop_h}x{crop_w} is larger than the image {height}x{width}"
            )
        top = int(torch.randint(height - crop_h + 1, (1,), generator=self.generator))
        left = int(torch.randint(width - crop_w + 1, (1,), generator=self.generator))
        rows, cols = slice(top, top + crop_h), slice(left, left + crop_w)
        if _is_mask(target):
            target = target[rows, cols]
        elif _is_boxes(target):
            target = _crop_boxes(
                target, (height, width), (top, left, crop_h, crop_w), self.min_visible
            )
        return a[..., rows, cols], b[..., rows, cols], target


def _crop_boxes(
    boxes: torch.Tensor,
    size: tuple[int, int],
    window: tuple[int, int, int, int],
    min_visible: float,
) -> torch.Tensor:
    height, width = size
    top, left, crop_h, crop_w = window
    centre_x, centre_y = boxes[:, 1] * width, boxes[:, 2] * height
    half_w, half_h = boxes[:, 3] * width / 2, boxes[:, 4] * height / 2
    x0, x1 = centre_x - half_w - left, centre_x + half_w - left
    y0, y1 = centre_y - half_h - top, centre_y + half_h - top
    area = (x1 - x0) * (y1 - y0)
    x0c, x1c = x0.clamp(0, crop_w), x1.clamp(0, crop_w)
    y0c, y1c = y0.clamp(0, crop_h), y1.clamp(0, crop_h)
    kept_area = (x1c - x0c).clamp_min(0) * (y1c - y0c).clamp_min(0)
    keep = (
        (kept_area >= min_visible * area.clamp_min(1e-12)) & ((x1c - x0c) >= 2) & ((y1c - y0c) >= 2)
    )
    result = torch.stack(
        [
            boxes[:, 0],
            (x0c + x1c) / 2 / crop_w,
            (y0c + y1c) / 2 / crop_h,
            (x1c - x0c) / crop_w,
            (y1c - y0c) / crop_h,
        ],
        dim=1,
    )
    return result[keep]


class Resize:
    """Resize both sources (bilinear) and the mask (nearest); normalised boxes are unchanged.

    Parameters
    ----------
    size : int or (int, int)
        Output ``(height, width)``.
    """

    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = _pair(size)

    def __call__(self, sample: Sample) -> Sample:
        a, b, target = sample
        a, b = (
            F.interpolate(x[None], size=self.size, mode="bilinear", align_corners=False)[0]
            for x in (a, b)
        )
        if _is_mask(target):
            target = F.interpolate(target[None, None].float(), size=self.size, mode="nearest")
            target = target[0, 0].long()
        return a, b, target


class RandomFlip:
    """Mirror along one axis with probability ``p``; masks and boxes' centres follow.

    Parameters
    ----------
    axis : {"horizontal", "vertical"}
        ``"horizontal"`` mirrors left-right (x centres), ``"vertical"`` top-bottom (y centres).
    p : float
        Probability of flipping.
    generator : torch.Generator, optional
        Source of the coin flips.
    """

    _AXES: ClassVar[dict[str, tuple[int, int]]] = {"horizontal": (-1, 1), "vertical": (-2, 2)}

    def __init__(
        self, axis: str = "horizontal", p: float = 0.5, generator: torch.Generator | None = None
    ) -> None:
        if axis not in self._AXES:
            raise ValueError(f"axis must be 'horizontal' or 'vertical', got {axis!r}")
        self.image_dim, self.box_column = self._AXES[axis]
        self.p = float(p)
        self.generator = generator

    def __call__(self, sample: Sample) -> Sample:
        if float(torch.rand((), generator=self.generator)) >= self.p:
            return sample
        a, b, target = sample
        if _is_mask(target):
            target = target.flip(self.image_dim)
        elif _is_boxes(target):
            target = target.clone()
            target[:, self.box_column] = 1.0 - target[:, self.box_column]
        return a.flip(self.image_dim), b.flip(self.image_dim), target


class RandomHorizontalFlip(RandomFlip):
    """Mirror left-right with probability ``p`` (boxes' x centres follow).

    Parameters
    ----------
    p : float
        Probability of flipping.
    generator : torch.Generator, optional
        Source of the coin flips.
    """

    def __init__(self, p: float = 0.5, generator: torch.Generator | None = None) -> None:
        super().__init__("horizontal", p, generator)


class RandomVerticalFlip(RandomFlip):
    """Mirror top-bottom with probability ``p`` (boxes' y centres follow).

    Parameters
    ----------
    p : float
        Probability of flipping.
    generator : torch.Generator, optional
        Source of the coin flips.
    """

    def __init__(self, p: float = 0.5, generator: torch.Generator | None = None) -> None:
        super().__init__("vertical", p, generator)


class RandomExposure:
    """Darken each source by its own random factor, to train on dim scenes too.

    With probability ``p`` a source is multiplied by a factor drawn uniformly from
    ``[low, high]`` (independently for ``a`` and ``b``); the target is unchanged. A fusion
    network trained on mostly daylight pairs otherwise lifts the black level of night scenes.

    Parameters
    ----------
    low, high : float
        Range of the factor, ``0 < low <= high <= 1``.
    p : float
        Probability of darkening each source.
    generator : torch.Generator, optional
        Source of the random numbers.

    Example
    -------
    >>> a, b = torch.ones(1, 2, 2), torch.ones(1, 2, 2)
    >>> a, b, _ = RandomExposure(0.5, 0.5, p=1.0)((a, b, None))
    >>> float(a.max()), float(b.max())
    (0.5, 0.5)
    """

    def __init__(
        self,
        low: float = 0.25,
        high: float = 1.0,
        p: float = 0.5,
        generator: torch.Generator | None = None,
    ) -> None:
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"RandomExposure needs 0 < low <= high <= 1, got {low} and {high}")
        self.low, self.high, self.p = float(low), float(high), float(p)
        self.generator = generator

    def _darken(self, image: torch.Tensor) -> torch.Tensor:
        coin, draw = torch.rand(2, generator=self.generator).tolist()
        if coin >= self.p:
            return image
        return image * (self.low + (self.high - self.low) * draw)

    def __call__(self, sample: Sample) -> Sample:
        a, b, target = sample
        return self._darken(a), self._darken(b), target


def detection_collate(samples: Sequence[Sample]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack images and concatenate boxes with their image index.

    Parameters
    ----------
    samples : sequence of (a, b, boxes)
        Boxes (M_i, 5) ``[class, x_center, y_center, width, height]``.

    Returns
    -------
    tuple
        ``(a, b, targets)``: (N, 1, H, W) twice and (M, 6)
        ``[batch_index, class, x_center, y_center, width, height]``, the format of
        :class:`~tdfusion.tasks.DetectionTask`.

    Example
    -------
    >>> import torch
    >>> one = (torch.zeros(1, 4, 4), torch.zeros(1, 4, 4), torch.tensor([[2.0, .5, .5, .2, .2]]))
    >>> detection_collate([one, one])[2][:, 0].tolist()
    [0.0, 1.0]
    """
    a = torch.stack([s[0] for s in samples])
    b = torch.stack([s[1] for s in samples])
    rows = [
        torch.cat([torch.full((len(boxes), 1), float(index)), boxes.float()], dim=1)
        for index, (_, _, boxes) in enumerate(samples)
    ]
    targets = torch.cat(rows) if rows else torch.zeros((0, 6))
    return a, b, targets.reshape(-1, 6)


def segmentation_collate(
    samples: Sequence[Sample],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack images and masks: ``(a, b, masks)`` of shapes (N, 1, H, W) twice and (N, H, W).

    Parameters
    ----------
    samples : sequence of (a, b, mask)
        Samples of equal size.

    Returns
    -------
    tuple
        The batch.
    """
    return default_collate(list(samples))


def swap_sources(batch: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Feed a batch in both source orders: ``(a; b)``, ``(b; a)``, targets duplicated.

    The research code's "swap" augmentation: the fusion network must not depend on which
    input is which. Segmentation masks (N, H, W) are repeated; detection targets (M, 6) are
    repeated with the second copy's image index shifted by N; a list (of names) is repeated.

    Parameters
    ----------
    batch : tuple
        ``(a, b, target)`` with ``a``, ``b`` of shape (N, C, H, W).

    Returns
    -------
    tuple
        ``(cat(a, b), cat(b, a), doubled target)`` with 2N images.

    Example
    -------
    >>> import torch
    >>> a, b = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)
    >>> boxes = torch.tensor([[0.0, 1.0, .5, .5, .2, .2]])
    >>> swapped = swap_sources((a, b, boxes))
    >>> swapped[0][:, 0, 0, 0].tolist(), swapped[2][:, 0].tolist()
    ([0.0, 1.0], [0.0, 1.0])
    """
    a, b, target = batch
    count = a.shape[0]
    if (
        isinstance(target, torch.Tensor)
        and target.is_floating_point()
        and target.dim() == 2
        and target.shape[1] == 6
    ):
        shifted = target.clone()
        shifted[:, 0] += count
        doubled: Any = torch.cat([target, shifted])
    elif isinstance(target, torch.Tensor) and target.dim() >= 1 and target.shape[0] == count:
        doubled = torch.cat([target, target])
    elif isinstance(target, (list, tuple)) and len(target) == count:
        doubled = type(target)(list(target) * 2)
    else:
        raise ValueError(
            "swap_sources: cannot duplicate the target: expected detection targets (M, 6), "
            f"per-image tensors (N, ...) or a list of length N = {count}, got "
            f"{type(target).__name__} {tuple(getattr(target, 'shape', ()))}"
        )
    return torch.cat([a, b]), torch.cat([b, a]), doubled


class SwapSources:
    """A collate function that also applies :func:`swap_sources` to every batch.

    Parameters
    ----------
    collate_fn : callable
        The underlying collate function (default: PyTorch's).

    Example
    -------
    >>> from torch.utils.data import DataLoader
    >>> loader = DataLoader([], collate_fn=SwapSources(detection_collate))
    """

    def __init__(self, collate_fn: Callable[[list[Any]], Any] = default_collate) -> None:
        self.collate_fn = collate_fn

    def __call__(self, samples: list[Any]) -> tuple[torch.Tensor, torch.Tensor, Any]:
        return swap_sources(self.collate_fn(samples))
