"""Process state: the process group started by ``torchrun``, this process's rank and device.

``torchrun`` (or SLURM's ``srun`` with the same environment variables) starts one process per
GPU; :func:`init_distributed` joins them into a process group from that environment. Without
that environment every function here describes a world of one process.
"""

from __future__ import annotations

import datetime
import inspect
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from tdfusion.devices import resolve_device
from tdfusion.errors import DistributedError

__all__ = [
    "TORCHRUN_VARIABLES",
    "check_backend",
    "destroy_distributed",
    "distributed_session",
    "get_local_rank",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "launched_distributed",
    "rank_device",
]

#: Environment variables that ``torchrun`` sets for every process it starts.
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _environment_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r} is not an integer") from None


def launched_distributed() -> bool:
    """Whether this process was started as one of several by ``torchrun`` (``WORLD_SIZE > 1``).

    Returns
    -------
    bool
        ``True`` when the environment names a world of more than one process.

    Example
    -------
    >>> import os
    >>> launched_distributed() == (int(os.environ.get("WORLD_SIZE", "1")) > 1)
    True
    """
    world_size = _environment_int("WORLD_SIZE")
    return world_size is not None and world_size > 1


def is_distributed() -> bool:
    """Whether a process group of more than one process is initialised.

    Returns
    -------
    bool
        ``True`` inside a multi-process run after :func:`init_distributed`.
    """
    return get_world_size() > 1


def get_rank() -> int:
    """This process's rank in the process group (0 without one).

    Returns
    -------
    int
        The global rank.
    """
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """The number of processes in the process group (1 without one).

    Returns
    -------
    int
        The world size.
    """
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def get_local_rank() -> int:
    """This process's rank on its node: ``LOCAL_RANK`` from ``torchrun`` (0 without it).

    Returns
    -------
    int
        The local rank, which picks the GPU of this process.
    """
    return _environment_int("LOCAL_RANK") or 0


def is_main_process() -> bool:
    """Whether this is rank 0, the process that shows progress and writes logs and checkpoints.

    Returns
    -------
    bool
        ``True`` on rank 0 and in a single-process run.

    Example
    -------
    >>> is_main_process()
    True
    """
    return get_rank() == 0


def rank_device(device: str | torch.device | None = None) -> torch.device:
    """The device this rank trains on.

    Parameters
    ----------
    device : str or torch.device, optional
        ``None`` picks CUDA when available, else the CPU. In a distributed run a CUDA device
        without an index (``"cuda"``) becomes ``cuda:LOCAL_RANK``, so each process on a node
        gets its own GPU (``cuda:RANK % device_count()`` in a group formed without
        ``torchrun``, which sets no ``LOCAL_RANK``); an explicit index is kept, with a warning
        when it differs from ``LOCAL_RANK`` on a node of several processes.

    Returns
    -------
    torch.device
        The device.

    Raises
    ------
    DistributedError
        If more processes were started on this node than it has GPUs.

    Example
    -------
    >>> rank_device("cpu")
    device(type='cpu')
    """
    device = resolve_device(device)
    if device.type != "cuda" or not (is_distributed() or launched_distributed()):
        return device
    local_rank = _environment_int("LOCAL_RANK")
    local_world = _environment_int("LOCAL_WORLD_SIZE")
    available = torch.cuda.device_count()
    if device.index is not None:
        if local_rank is not None and (local_world or 1) > 1 and device.index != local_rank:
            warnings.warn(
                f"the process with LOCAL_RANK={local_rank} of {local_world} on this node trains "
                f"on {device}: if every process was given that device they share one GPU, which "
                "NCCL refuses ('Duplicate GPU'); pass device='cuda' to give each process "
                "cuda:LOCAL_RANK",
                stacklevel=2,
            )
        return device
    if local_rank is None:
        # A group formed without torchrun (torch.multiprocessing.spawn, a hand-made group):
        # the ranks are taken to be numbered node by node, as many per node as it has GPUs.
        return torch.device("cuda", get_rank() % max(available, 1))
    if local_rank >= available:
        local_world = local_world or local_rank + 1
        raise DistributedError(
            f"{local_world} processes were started on this node but it has {available} "
            f"GPU(s) (process with LOCAL_RANK={local_rank} has none); launch with "
            f"torchrun --nproc_per_node={available} or fewer"
        )
    return torch.device("cuda", local_rank)


def _check_environment() -> tuple[int, int]:
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise DistributedError(
            "a distributed run needs the environment torchrun sets; missing "
            + ", ".join(missing)
            + " (launch with: torchrun --nproc_per_node=N your_script.py ...)"
        )
    rank, world_size = _environment_int("RANK"), _environment_int("WORLD_SIZE")
    assert rank is not None and world_size is not None
    if world_size < 1:
        raise DistributedError(f"WORLD_SIZE must be at least 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise DistributedError(f"RANK={rank} is outside the world of WORLD_SIZE={world_size}")
    return rank, world_size


def init_distributed(
    backend: str | None = None,
    device: str | torch.device | None = None,
    timeout: datetime.timedelta | None = None,
) -> bool:
    """Join the process group described by ``torchrun``'s environment (idempotent).

    Parameters
    ----------
    backend : str, optional
        ``"nccl"`` (CUDA) or ``"gloo"`` (CPU, also works with CUDA tensors but slowly).
        ``None`` picks ``"nccl"`` when this rank trains on CUDA and ``"gloo"`` otherwise.
    device : str or torch.device, optional
        The training device, as given to the trainer (see :func:`rank_device`); its CUDA
        device becomes this process's current device.
    timeout : datetime.timedelta, optional
        How long collectives wait for the other ranks (PyTorch's default otherwise).

    Returns
    -------
    bool
        ``True`` when this call initialised the group; ``False`` when one already existed or
        the environment describes a single process (nothing to do).

    Raises
    ------
    DistributedError
        If the environment is incomplete or inconsistent, the backend does not fit the device,
        or the group cannot be formed.
    """
    if dist.is_available() and dist.is_initialized():
        check_backend(rank_device(device))
        return False
    if not launched_distributed():
        return False
    if not dist.is_available():
        raise DistributedError("this PyTorch build has no torch.distributed support")
    _check_environment()
    target = rank_device(device)
    if backend is None:
        backend = "nccl" if target.type == "cuda" else "gloo"
    _check_backend_name(backend, target)
    if target.type == "cuda":
        torch.cuda.set_device(target)
    options: dict[str, Any] = {"backend": backend}
    if timeout is not None:
        options["timeout"] = timeout
    if backend == "nccl" and "device_id" in inspect.signature(dist.init_process_group).parameters:
        options["device_id"] = target  # binds NCCL to this rank's GPU (PyTorch >= 2.3)
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart not in (None, "", "0"):
        # After torchrun restarts its workers, the store may still hold the previous
        # attempt's addresses; a prefix per attempt keeps the new processes from reading them.
        from torch.distributed.rendezvous import rendezvous

        store, rank, world_size = next(rendezvous("env://"))
        options["store"] = dist.PrefixStore(f"tdfusion/attempt-{restart}", store)
        options["rank"], options["world_size"] = rank, world_size
    try:
        dist.init_process_group(**options)
    except (RuntimeError, ValueError) as error:
        raise DistributedError(
            f"cannot form the process group with backend {backend!r} (RANK="
            f"{os.environ.get('RANK')}, WORLD_SIZE={os.environ.get('WORLD_SIZE')}, MASTER_ADDR="
            f"{os.environ.get('MASTER_ADDR')}, MASTER_PORT={os.environ.get('MASTER_PORT')}): "
            f"{error}"
        ) from error
    return True


def _check_backend_name(backend: str, device: torch.device) -> None:
    if backend not in ("nccl", "gloo", "mpi", "ucc") and ":" not in backend:
        raise DistributedError(
            f"unknown torch.distributed backend {backend!r}; use 'nccl' for CUDA or 'gloo' for CPU"
        )
    if backend == "nccl" and device.type != "cuda":
        raise DistributedError(
            f"the nccl backend all-reduces CUDA tensors only, but this rank trains on {device}; "
            "use backend 'gloo' for CPU training (the default when no GPU is used)"
        )


def check_backend(device: torch.device) -> None:
    """Check that the initialised process group can communicate tensors on ``device``.

    Parameters
    ----------
    device : torch.device
        Where this rank's tensors live.

    Raises
    ------
    DistributedError
        If the group's backend is NCCL and ``device`` is not a CUDA device.
    """
    if is_distributed():
        _check_backend_name(str(dist.get_backend()).lower(), device)


def destroy_distributed() -> None:
    """Leave the process group, if there is one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def distributed_session(
    backend: str | None = None, device: str | torch.device | None = None
) -> Iterator[bool]:
    """Initialise the process group from the environment for a block and tear it down after.

    A group that existed before the block is left alone.

    Parameters
    ----------
    backend : str, optional
        See :func:`init_distributed`.
    device : str or torch.device, optional
        See :func:`init_distributed`.

    Yields
    ------
    bool
        Whether the block runs in a multi-process group.
    """
    created = init_distributed(backend, device)
    try:
        yield is_distributed()
    finally:
        if created:
            destroy_distributed()
