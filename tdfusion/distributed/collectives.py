"""Collectives: averaging, broadcasting and gathering over the ranks of a process group.

Every function is a no-op (or returns its argument) in a single process, so callers need not
ask whether they run distributed.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tdfusion.distributed.process import get_rank, is_distributed
from tdfusion.errors import DistributedError

__all__ = [
    "all_reduce_mean_",
    "average_buffers_",
    "barrier",
    "broadcast_module_",
    "broadcast_object",
    "check_same_on_all_ranks",
    "gather_objects",
    "replicate",
]


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        if str(dist.get_backend()).lower() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def all_reduce_mean_(tensors: Sequence[torch.Tensor]) -> None:
    """Average tensors over all ranks in place, with one collective per dtype.

    Parameters
    ----------
    tensors : sequence of torch.Tensor
        Tensors of the same shapes on every rank (floating point). They are flattened into one
        buffer per dtype, all-reduced and copied back.
    """
    if not is_distributed() or not tensors:
        return
    world_size = dist.get_world_size()
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for tensor in tensors:
        by_dtype.setdefault(tensor.dtype, []).append(tensor)
    for group in by_dtype.values():
        flat = torch.cat([t.detach().reshape(-1) for t in group])
        dist.all_reduce(flat)
        flat /= world_size
        offset = 0
        for tensor in group:
            count = tensor.numel()
            with torch.no_grad():
                tensor.copy_(flat[offset : offset + count].view_as(tensor))
            offset += count


def average_buffers_(module: nn.Module) -> None:
    """Average a module's floating-point buffers (e.g. batch-norm statistics) over all ranks.

    Integer buffers (``num_batches_tracked``) advance in step on every rank and are left alone.

    Parameters
    ----------
    module : torch.nn.Module
        A module replicated on every rank.
    """
    all_reduce_mean_([b for b in module.buffers() if b.is_floating_point()])


def broadcast_module_(module: nn.Module, source: int = 0) -> None:
    """Copy a module's parameters and buffers from rank ``source`` to every rank.

    Parameters
    ----------
    module : torch.nn.Module
        A module of the same architecture on every rank.
    source : int
        The rank whose values are kept.
    """
    if not is_distributed():
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=source)


def broadcast_object(value: Any, source: int = 0) -> Any:
    """Rank ``source``'s value of a picklable object, on every rank.

    Parameters
    ----------
    value : Any
        The object (only the source rank's matters).
    source : int
        The rank that decides.

    Returns
    -------
    Any
        The source rank's object.

    Example
    -------
    >>> broadcast_object({"resume": True})
    {'resume': True}
    """
    if not is_distributed():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=source)
    return holder[0]


def gather_objects(value: Any) -> list[Any]:
    """Every rank's value of a picklable object, in rank order, on every rank.

    Parameters
    ----------
    value : Any
        This rank's object.

    Returns
    -------
    list
        One object per rank (``[value]`` in a single process).

    Example
    -------
    >>> gather_objects(3)
    [3]
    """
    if not is_distributed():
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def check_same_on_all_ranks(description: Mapping[str, Any], what: str = "trainer") -> None:
    """Raise on every rank if any rank's ``description`` differs from this one's.

    Parameters
    ----------
    description : mapping
        Picklable facts that must agree (settings, parameter shapes, ...); a value that is
        itself a mapping is compared key by key, so the message can name the setting.
    what : str
        What was built, for the message.

    Raises
    ------
    DistributedError
        Naming the first difference and the rank that has it.
    """
    this_rank = get_rank()
    for rank, other in enumerate(gather_objects(dict(description))):
        for key, value in other.items():
            mine = description[key]
            if value == mine:
                continue
            if isinstance(value, Mapping) and isinstance(mine, Mapping):
                name = next(k for k in {**value, **mine} if value.get(k) != mine.get(k))
                difference = f"{name}={value.get(name)!r} on rank {rank}, {mine.get(name)!r} here"
            else:
                difference = f"{key} differs (rank {rank}: {value!r:.200}; here: {mine!r:.200})"
            raise DistributedError(
                f"rank {this_rank} built a different {what} than rank {rank}: {difference}; "
                "every rank must run the same script with the same settings"
            )


def replicate(module: nn.Module, device: torch.device, **options: Any) -> nn.Module:
    """Wrap a module in :class:`~torch.nn.parallel.DistributedDataParallel`.

    The wrapper starts every rank from rank 0's parameters and buffers and averages gradients
    during the backward pass. Buffers are not overwritten with rank 0's before every forward
    (average them with :func:`average_buffers_` after each step instead).

    Parameters
    ----------
    module : torch.nn.Module
        The module, already on ``device``; it keeps being the one that holds the parameters.
    device : torch.device
        This rank's device (its CUDA index becomes ``device_ids``).
    **options
        Further DistributedDataParallel arguments (``find_unused_parameters``, ...).

    Returns
    -------
    torch.nn.Module
        The wrapper; call it in place of ``module`` for training steps.
    """
    from torch.nn.parallel import DistributedDataParallel

    arguments = inspect.signature(DistributedDataParallel).parameters
    # PyTorch 2.14 renamed broadcast_buffers; both mean "no sync before every forward".
    no_forward_sync = (
        "forward_sync_buffers" if "forward_sync_buffers" in arguments else "broadcast_buffers"
    )
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(
        module, device_ids=device_ids, **{no_forward_sync: False, **options}
    )
