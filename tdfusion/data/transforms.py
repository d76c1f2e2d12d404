"""Paired transforms on ``(a, b, target)`` samples, the source-swap augmentation and collation.

A sample is ``(a, b, target)`` with ``a`` and ``b`` float tensors (1, H, W) and ``target``
either a segmentation mask (int64 (H, W)), detection boxes (float (M, 5)
``[class, x_center, y_center, width, height]``, normalised), or anything else (a file stem),
which geometric transforms pass through. Every geometric transform moves the images, the mask
and the boxes together.

A transform given a ``generator`` draws from it in the main process. In a
:class:`~torch.utils.data.DataLoader` worker, which holds a copy of the generator, the copy is
first reseeded from the generator's seed and the worker's seed (different for every worker and,
unless the workers persist, every epoch; reproducible for a seeded loader): otherwise every
worker would draw the same crops and flips, and every epoch would repeat them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate, get_worker_info

__all__ = [
    "Compose",
    "RandomBlur",
    "RandomCrop",
    "RandomExposure",
    "RandomFlip",
    "RandomHorizontalFlip",
    "RandomNoise",
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


# id(generator) -> the worker seed it was reseeded with, in a DataLoader worker process.
_WORKER_SEEDS: dict[int, int] = {}


def _seed_for_worker(generator: torch.Generator | None) -> None:
    """Reseed ``generator`` once per DataLoader worker (see the module docstring)."""
    info = get_worker_info()
    if generator is None or info is None or _WORKER_SEEDS.get(id(generator)) == info.seed:
        return
    entropy = [generator.initial_seed(), info.seed]
    generator.manual_seed(int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]))
    _WORKER_SEEDS[id(generator)] = info.seed


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
        _seed_for_worker(self.generator)
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
        _seed_for_worker(self.generator)
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
    """Darken each source by its own random exposure, to train on dim scenes too.

    With probability ``p`` a source ``x`` becomes ``k * x ** g``, with the factor ``k`` drawn
    uniformly from ``[low, high]`` and the gamma ``g`` from ``[1, max_gamma]``, independently
    for ``a`` and ``b``; the target is unchanged. The gamma turns mid-tones black while
    highlights stay, as in night scenes. A fusion network trained on bright daylight pairs
    otherwise never sees black and lifts the black level of night scenes.

    Parameters
    ----------
    low, high : float
        Range of the factor, ``0 < low <= high <= 1``.
    p : float
        Probability of darkening each source.
    max_gamma : float
        Largest gamma (at least 1; 1: the factor only).
    generator : torch.Generator, optional
        Source of the random numbers.

    Example
    -------
    >>> a, b = torch.full((1, 2, 2), 0.5), torch.ones(1, 2, 2)
    >>> a, b, _ = RandomExposure(0.5, 0.5, p=1.0)((a, b, None))
    >>> float(a.max()), float(b.max())
    (0.25, 0.5)
    """

    def __init__(
        self,
        low: float = 0.25,
        high: float = 1.0,
        p: float = 0.5,
        max_gamma: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> None:
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"RandomExposure needs 0 < low <= high <= 1, got {low} and {high}")
        if not max_gamma >= 1.0:
            raise ValueError(f"RandomExposure needs max_gamma >= 1, got {max_gamma}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"RandomExposure needs 0 <= p <= 1, got {p}")
        self.low, self.high, self.p = float(low), float(high), float(p)
        self.max_gamma = float(max_gamma)
        self.generator = generator

    def _darken(self, image: torch.Tensor) -> torch.Tensor:
        coin, draw = torch.rand(2, generator=self.generator).tolist()
        if coin >= self.p:
            return image
        if self.max_gamma > 1.0:
            gamma = 1.0 + (self.max_gamma - 1.0) * float(torch.rand((), generator=self.generator))
            image = image.clamp(min=0.0) ** gamma
        return image * (self.low + (self.high - self.low) * draw)

    def __call__(self, sample: Sample) -> Sample:
        a, b, target = sample
        _seed_for_worker(self.generator)
        return self._darken(a), self._darken(b), target


class _OneSourceTransform:
    """A random change of one source: with probability ``p``, ``_change(image, draw)``.

    ``draw`` is uniform in [0, 1); the coin and the draw come first from ``generator``, then
    whatever ``_change`` draws. The other source and the target pass through.
    """

    def __init__(self, p: float, source: str, generator: torch.Generator | None) -> None:
        if source not in ("a", "b"):
            raise ValueError(f"{type(self).__name__} needs source 'a' or 'b', got {source!r}")
        self.index = ("a", "b").index(source)
        self.p = float(p)
        self.generator = generator

    def _change(self, image: torch.Tensor, draw: float) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, sample: Sample) -> Sample:
        _seed_for_worker(self.generator)
        coin, draw = torch.rand(2, generator=self.generator).tolist()
        if coin >= self.p:
            return sample
        images = list(sample[:2])
        images[self.index] = self._change(images[self.index], draw)
        return images[0], images[1], sample[2]


class RandomBlur(_OneSourceTransform):
    """Blur one source by a Gaussian of random width, as the soft images of thermal cameras.

    With probability ``p`` the chosen source is blurred by a Gaussian whose standard deviation
    is drawn uniformly from ``[min_sigma, max_sigma]`` pixels
    (:func:`scipy.ndimage.gaussian_filter`, reflected borders); the other source and the target
    are unchanged. Infrared images resampled to a large visible camera's grid (LLVIP's
    1280x1024) carry far less fine detail than the crops a network is trained on; this
    teaches it to take the detail from the other source instead of expecting it from both.

    Parameters
    ----------
    max_sigma : float
        Largest standard deviation, in pixels (positive).
    min_sigma : float
        Smallest standard deviation (``0 <= min_sigma <= max_sigma``).
    p : float
        Probability of blurring.
    source : {"a", "b"}
        The source blurred (``"a"``: the first, in tdfusion's convention the infrared).
    generator : torch.Generator, optional
        Source of the random numbers.

    Example
    -------
    >>> a = torch.zeros(1, 5, 5); a[0, 2, 2] = 1.0
    >>> a2, b2, _ = RandomBlur(1.0, min_sigma=1.0, p=1.0)((a, torch.ones(1, 5, 5), None))
    >>> round(float(a2[0, 2, 2]), 3), float(b2.min())
    (0.159, 1.0)
    """

    def __init__(
        self,
        max_sigma: float,
        min_sigma: float = 0.0,
        p: float = 0.5,
        source: str = "a",
        generator: torch.Generator | None = None,
    ) -> None:
        if not 0.0 <= min_sigma <= max_sigma or max_sigma <= 0.0:
            raise ValueError(
                f"RandomBlur needs 0 <= min_sigma <= max_sigma and max_sigma > 0, got "
                f"{min_sigma} and {max_sigma}"
            )
        super().__init__(p, source, generator)
        self.min_sigma, self.max_sigma = float(min_sigma), float(max_sigma)

    def _change(self, image: torch.Tensor, draw: float) -> torch.Tensor:
        from scipy.ndimage import gaussian_filter

        sigma = self.min_sigma + (self.max_sigma - self.min_sigma) * draw
        # Channels are blurred separately: sigma 0 along the channel axis.
        blurred = gaussian_filter(image.numpy(), sigma=(0.0, sigma, sigma), mode="reflect")
        return torch.from_numpy(blurred).to(image.dtype)


class RandomNoise(_OneSourceTransform):
    """Add Gaussian noise of random strength to one source, as the noise of dim visible images.

    With probability ``p`` the chosen source gets independent Gaussian noise per pixel, its
    standard deviation drawn uniformly from ``[0, max_sigma]`` (in the images' 0-1 range),
    and is clipped back to ``[0, 1]``; the other source and the target are unchanged. Place it
    after :class:`RandomExposure`: a camera's noise does not darken with the scene. Night
    visible images (LLVIP's, MSRS's) are grainy where daylight training pairs are clean; a
    network that never saw grain smooths it away with the texture under it.

    Parameters
    ----------
    max_sigma : float
        Largest standard deviation (positive).
    p : float
        Probability of adding noise.
    source : {"a", "b"}
        The source made noisy (``"b"``: the second, in tdfusion's convention the visible).
    generator : torch.Generator, optional
        Source of the random numbers (the noise too, so a seeded pipeline repeats exactly).

    Example
    -------
    >>> g = torch.Generator().manual_seed(0)
    >>> a, b = torch.full((1, 64, 64), 0.5), torch.full((1, 64, 64), 0.5)
    >>> a2, b2, _ = RandomNoise(0.1, p=1.0, generator=g)((a, b, None))
    >>> bool(torch.equal(a2, a)), 0.0 < float(b2.std()) < 0.1
    (True, True)
    """

    def __init__(
        self,
        max_sigma: float,
        p: float = 0.5,
        source: str = "b",
        generator: torch.Generator | None = None,
    ) -> None:
        if not max_sigma > 0.0:
            raise ValueError(f"RandomNoise needs max_sigma > 0, got {max_sigma}")
        super().__init__(p, source, generator)
        self.max_sigma = float(max_sigma)

    def _change(self, image: torch.Tensor, draw: float) -> torch.Tensor:
        noise = torch.randn(image.shape, generator=self.generator, dtype=image.dtype)
        return (image + noise * (self.max_sigma * draw)).clamp(0.0, 1.0)


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
