"""Training batches: checked at the door, moved to the trainer's device, cropped and resized.

Everything here happens before any differentiation: the random crop on which the fusion loss
is computed is drawn once, here, so that the meta step and its hypergradient methods never
touch a random generator.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from tdfusion.errors import DataError

__all__ = [
    "Batch",
    "BatchPreparer",
    "check_batch",
    "crop_size",
    "independent_generator",
    "map_tensors",
    "module_dtype",
    "move_target",
    "random_crop",
    "resize_for_task",
    "value_range",
]

#: A training batch: ``(a, b, target)`` with ``a``, ``b`` of shape (N, C, H, W) in [0, 1] and
#: ``target`` whatever the task loss takes.
Batch = Sequence[Any]


def check_batch(
    batch: Batch, where: str, in_channels: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Check that ``batch`` is ``(a, b, target)`` with two sources of one 4-D shape.

    Parameters
    ----------
    batch : tuple
        The batch.
    where : str
        Named in messages (``"meta_train"``, ``"batch"``, ...).
    in_channels : int, optional
        Channels the fusion model takes.

    Returns
    -------
    tuple
        ``(a, b, target)`` as given.

    Raises
    ------
    TypeError, ValueError
        Saying what was expected and what came.
    DataError
        If the sources hold no pixels.

    Example
    -------
    >>> check_batch((torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4), None), "batch")[2] is None
    True
    """
    if not isinstance(batch, (tuple, list)) or len(batch) != 3:
        found = f"a {type(batch).__name__}"
        if isinstance(batch, (tuple, list)):
            found += f" of length {len(batch)}"
        raise ValueError(f"{where}: a batch must be a tuple (a, b, target), got {found}")
    a, b, target = batch
    for name, image in (("a", a), ("b", b)):
        if not isinstance(image, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a tensor, got {type(image).__name__}")
        if image.dim() != 4:
            raise ValueError(
                f"{where}: {name} must have shape (N, C, H, W), got {tuple(image.shape)}"
            )
    if a.shape != b.shape:
        raise ValueError(
            f"{where}: a and b must have the same shape, got a {tuple(a.shape)} and "
            f"b {tuple(b.shape)}"
        )
    if a.numel() == 0:
        raise DataError(
            f"{where}: a and b hold no pixels (shape {tuple(a.shape)}); every image of a "
            "batch needs a height and width of at least 1"
        )
    if in_channels is not None and a.shape[1] != in_channels:
        raise ValueError(
            f"{where}: the fusion model takes {in_channels}-channel sources, got a and b "
            f"of shape {tuple(a.shape)} (use the Y channel of colour images)"
        )
    return a, b, target


def module_dtype(module: torch.nn.Module) -> torch.dtype:
    """The floating-point type of a module's parameters (torch's default without any).

    Parameters
    ----------
    module : torch.nn.Module
        The fusion model.

    Returns
    -------
    torch.dtype
        The type batches are converted to.
    """
    for tensor in module.parameters():
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.get_default_dtype()


def value_range(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """The smallest and largest value of two sources (to warn about 8-bit images)."""
    return float(torch.minimum(a.min(), b.min())), float(torch.maximum(a.max(), b.max()))


def move_target(target: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Move every tensor in ``target`` to ``device``; floating tensors also take ``dtype``.

    Parameters
    ----------
    target : Any
        A tensor, or mappings, (named) tuples and lists of them; anything else is kept.
    device : torch.device
        Destination.
    dtype : torch.dtype
        Floating-point type of floating tensors.

    Returns
    -------
    Any
        The same structure.

    Example
    -------
    >>> move_target({"masks": torch.zeros(2, dtype=torch.long)}, torch.device("cpu"),
    ...             torch.float64)["masks"].dtype
    torch.int64
    """

    def move(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.is_floating_point():
            return tensor.to(device=device, dtype=dtype)
        return tensor.to(device=device)

    return map_tensors(move, target)


def map_tensors(function: Callable[[torch.Tensor], torch.Tensor], structure: Any) -> Any:
    """``structure`` with ``function`` applied to each of its tensors.

    Parameters
    ----------
    function : callable
        Maps one tensor to another.
    structure : Any
        A tensor, or mappings, (named) tuples and lists of them; anything else is kept.

    Returns
    -------
    Any
        The same structure, of the same container types.

    Example
    -------
    >>> map_tensors(torch.neg, {"x": (torch.ones(1), "kept")})
    {'x': (tensor([-1.]), 'kept')}
    """
    if isinstance(structure, torch.Tensor):
        return function(structure)
    if isinstance(structure, Mapping):
        return type(structure)({k: map_tensors(function, v) for k, v in structure.items()})
    if isinstance(structure, tuple) and hasattr(structure, "_fields"):  # named tuple
        return type(structure)(*(map_tensors(function, v) for v in structure))
    if isinstance(structure, (list, tuple)):
        return type(structure)(map_tensors(function, v) for v in structure)
    return structure


def crop_size(size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    """``fusion_crop`` as ``(height, width)``, checked.

    Parameters
    ----------
    size : int or (int, int), optional
        A square side or ``(height, width)``.

    Returns
    -------
    (int, int) or None
        The size, ``None`` for no crop.

    Example
    -------
    >>> crop_size(256)
    (256, 256)
    """
    if size is None:
        return None
    if isinstance(size, int):
        size = (size, size)
    height, width = (int(s) for s in size)
    if height <= 0 or width <= 0:
        raise ValueError(f"fusion_crop must be positive, got {size}")
    return height, width


def random_crop(
    a: torch.Tensor,
    b: torch.Tensor,
    size: tuple[int, int] | None,
    generator: torch.Generator,
    where: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random crop of both sources (both whole without a size).

    Parameters
    ----------
    a, b : torch.Tensor
        Sources, (N, C, H, W).
    size : (int, int), optional
        ``(height, width)`` of the crop.
    generator : torch.Generator
        Draws the offsets (top, then left).
    where : str
        Named in messages.

    Returns
    -------
    (torch.Tensor, torch.Tensor)
        Views of shape (N, C, height, width).

    Example
    -------
    >>> a = torch.rand(1, 1, 8, 8)
    >>> random_crop(a, a, (4, 6), torch.Generator().manual_seed(0), "batch")[0].shape
    torch.Size([1, 1, 4, 6])
    """
    if size is None:
        return a, b
    crop_h, crop_w = size
    height, width = a.shape[-2:]
    if crop_h > height or crop_w > width:
        raise ValueError(
            f"{where}: fusion_crop {crop_h}x{crop_w} is larger than the images ({height}x{width})"
        )
    top = int(torch.randint(height - crop_h + 1, (1,), generator=generator))
    left = int(torch.randint(width - crop_w + 1, (1,), generator=generator))
    return (
        a[..., top : top + crop_h, left : left + crop_w],
        b[..., top : top + crop_h, left : left + crop_w],
    )


def independent_generator(generator: torch.Generator) -> torch.Generator:
    """A new CPU generator seeded by a draw from (a copy of) ``generator``.

    ``generator`` itself does not advance, so the two streams are reproducible from one seed
    and independent of each other.

    Parameters
    ----------
    generator : torch.Generator
        A CPU generator.

    Returns
    -------
    torch.Generator
        The new generator.

    Example
    -------
    >>> source = torch.Generator().manual_seed(0)
    >>> first, second = independent_generator(source), independent_generator(source)
    >>> torch.equal(torch.rand(3, generator=first), torch.rand(3, generator=second))
    True
    """
    copy = torch.Generator()
    copy.set_state(generator.get_state())
    seed = int(torch.randint(2**62, (1,), generator=copy))
    return torch.Generator().manual_seed(seed)


def resize_for_task(
    a: torch.Tensor, b: torch.Tensor, size: tuple[int, int] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sources as the task sees them: resized (bilinear) to ``size`` when set.

    Parameters
    ----------
    a, b : torch.Tensor
        Sources, (N, C, H, W).
    size : (int, int), optional
        ``(height, width)``; ``None`` or the current size returns ``a`` and ``b`` as given.

    Returns
    -------
    (torch.Tensor, torch.Tensor)
        Sources of shape (N, C, height, width).

    Example
    -------
    >>> a = torch.rand(1, 1, 8, 8)
    >>> resize_for_task(a, a, (4, 6))[0].shape
    torch.Size([1, 1, 4, 6])
    """
    if size is None or tuple(a.shape[-2:]) == size:
        return a, b
    return (
        F.interpolate(a, size=size, mode="bilinear", align_corners=False),
        F.interpolate(b, size=size, mode="bilinear", align_corners=False),
    )


class BatchPreparer:
    """Check batches and move them to a device and dtype, warning once about 8-bit values.

    Parameters
    ----------
    device : torch.device
        Where the batches go.
    dtype : torch.dtype
        Floating-point type of the sources (and of floating targets).
    in_channels : int, optional
        Channels the fusion model takes.
    channels_last : bool
        Give the sources :data:`torch.channels_last` memory order.

    Example
    -------
    >>> prepare = BatchPreparer(torch.device("cpu"), torch.float64)
    >>> prepare((torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4), None), "batch")[0].dtype
    torch.float64
    """

    def __init__(
        self,
        device: torch.device,
        dtype: torch.dtype,
        in_channels: int | None = None,
        channels_last: bool = False,
    ) -> None:
        self.device = device
        self.dtype = dtype
        self.in_channels = in_channels
        self.memory_format = torch.channels_last if channels_last else torch.preserve_format
        self.range_warned = False
        self.fused_range_warned = False

    def __call__(self, batch: Batch, where: str) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """``(a, b, target)`` checked and moved; see :func:`check_batch`."""
        a, b, target = check_batch(batch, where, self.in_channels)
        a = a.to(device=self.device, dtype=self.dtype, memory_format=self.memory_format)
        b = b.to(device=self.device, dtype=self.dtype, memory_format=self.memory_format)
        if not self.range_warned:
            low, high = value_range(a, b)
            if low < 0.0 or high > 1.0:
                self.range_warned = True
                warnings.warn(
                    f"{where}: source images have values in [{low:.3g}, {high:.3g}]; tdfusion "
                    "expects images scaled to [0, 1] (divide 8-bit images by 255)",
                    stacklevel=3,
                )
        return a, b, move_target(target, self.device, self.dtype)

    def check_fused_range(self, fused: torch.Tensor, what: str) -> None:
        """Warn once when a fused image leaves [0, 1], where the losses and tasks expect it.

        Parameters
        ----------
        fused : torch.Tensor
            An output of the fusion model.
        what : str
            Who made it, for the message (``"the fusion model"``).
        """
        if self.fused_range_warned or fused.numel() == 0:
            return
        low, high = (float(v) for v in torch.aminmax(fused.detach()))
        if low < 0.0 or high > 1.0:
            self.fused_range_warned = True
            warnings.warn(
                f"{what} returned values in [{low:.3g}, {high:.3g}]; fused images should lie "
                "in [0, 1] like the sources (end the network with a sigmoid or a clamp)",
                stacklevel=4,
            )


def prepare_meta_batches(trainer: Any, meta_train: Batch, meta_test: Batch) -> tuple[tuple, tuple]:
    """``(a, b, target, crop_a, crop_b)`` and ``(a, b, target)``: the crop on which the
    fusion loss is computed is drawn here, once, before anything is differentiated.

    This is the method ``MetaFusionTrainer._prepare_meta``: the batches are checked and moved
    by the trainer's :class:`BatchPreparer`, the crop drawn from its ``meta_generator``.
    """
    a, b, target = trainer._prepare(meta_train, "meta_train")
    test = trainer._prepare(meta_test, "meta_test")
    crop = random_crop(a, b, trainer.fusion_crop, trainer.meta_generator, "meta_train")
    return (a, b, target, *crop), test
