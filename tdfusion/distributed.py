"""Multi-process training with ``torch.distributed``: the process group, ranks and collectives.

tdfusion uses PyTorch's own engine. ``torchrun`` (or SLURM's ``srun`` with the same environment
variables) starts one process per GPU; :func:`init_distributed` joins them into a process group
from that environment, and :class:`~tdfusion.MetaFusionTrainer` then keeps ``F`` and ``T`` in sync
with :class:`~torch.nn.parallel.DistributedDataParallel` and all-reduces the generator's
hypergradient. Without that environment every function here describes a world of one process, so
the same code runs unchanged in a single process.
"""

from __future__ import annotations

import datetime
import inspect
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tdfusion.devices import resolve_device
from tdfusion.errors import DistributedError

__all__ = [
    "all_reduce_mean_",
    "average_buffers_",
    "barrier",
    "broadcast_module_",
    "broadcast_object",
    "check_backend",
    "check_same_on_all_ranks",
    "destroy_distributed",
    "distributed_session",
    "gather_objects",
    "get_local_rank",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "launched_distributed",
    "rank_device",
    "replicate",
    "shard_loader",
    "shuffles_plainly",
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
        gets its own GPU; an explicit index is kept.

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
    if device.type != "cuda":
        return device
    distributed = is_distributed() or launched_distributed()
    if device.index is None and distributed:
        local_rank = get_local_rank()
        available = torch.cuda.device_count()
        if local_rank >= available:
            local_world = _environment_int("LOCAL_WORLD_SIZE") or local_rank + 1
            raise DistributedError(
                f"{local_world} processes were started on this node but it has {available} "
                f"GPU(s) (process with LOCAL_RANK={local_rank} has none); launch with "
                f"torchrun --nproc_per_node={available} or fewer"
            )
        device = torch.device("cuda", local_rank)
    return device


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


def shard_loader(loader: Any, num_replicas: int, rank: int, seed: int | None = None) -> Any:
    """A :class:`~torch.utils.data.DataLoader` like ``loader`` that reads one rank's share.

    A plain ``DataLoader`` whose sampler shuffles (without replacement) or reads in order is
    rebuilt around a :class:`~torch.utils.data.distributed.DistributedSampler` with the same
    batch size, workers, collate function and other settings. Call the sampler's
    ``set_epoch`` before every pass over the data to reshuffle it.

    Parameters
    ----------
    loader : torch.utils.data.DataLoader
        The loader; one that already has a ``DistributedSampler`` is returned as it is.
    num_replicas, rank : int
        How many shares, and which one.
    seed : int, optional
        Shuffling seed, the same on every rank; required when ``loader`` shuffles.

    Returns
    -------
    torch.utils.data.DataLoader
        The sharded loader.

    Raises
    ------
    DistributedError
        If the loader cannot be rebuilt (a subclass, a custom sampler or batch sampler, or
        sampling with replacement): give it a ``DistributedSampler`` yourself.

    Example
    -------
    >>> from torch.utils.data import DataLoader
    >>> loader = DataLoader(list(range(8)), batch_size=2, shuffle=False)
    >>> [batch.tolist() for batch in shard_loader(loader, num_replicas=2, rank=1)]
    [[1, 3], [5, 7]]
    """
    from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler

    sampler = loader.sampler
    if isinstance(sampler, DistributedSampler):
        return loader
    shuffles = shuffles_plainly(loader)
    if (
        type(loader) is not DataLoader
        or loader.batch_size is None
        or not (shuffles or type(sampler) is SequentialSampler)
    ):
        kind = "sampler with replacement" if isinstance(sampler, RandomSampler) else "sampler"
        raise DistributedError(
            f"cannot shard a {type(loader).__name__} with a {type(sampler).__name__} {kind} "
            f"(batch_size={loader.batch_size}) over {num_replicas} ranks; give it a "
            "torch.utils.data.distributed.DistributedSampler yourself"
        )
    if shuffles and seed is None:
        raise ValueError("a shuffling loader needs a seed shared by all ranks")
    options: dict[str, Any] = {
        "batch_size": loader.batch_size,
        "sampler": DistributedSampler(
            loader.dataset,
            num_replicas=num_replicas,
            rank=rank,
            shuffle=shuffles,
            seed=seed if shuffles else 0,
        ),
        "num_workers": loader.num_workers,
        "collate_fn": loader.collate_fn,
        "pin_memory": loader.pin_memory,
        "drop_last": loader.drop_last,
        "timeout": loader.timeout,
        "worker_init_fn": loader.worker_init_fn,
        "generator": loader.generator,
        "persistent_workers": loader.persistent_workers,
    }
    if loader.num_workers > 0:
        options["prefetch_factor"] = loader.prefetch_factor
        options["multiprocessing_context"] = loader.multiprocessing_context
    return DataLoader(loader.dataset, **options)


def shuffles_plainly(loader: Any) -> bool:
    """Whether ``loader`` is a plain DataLoader drawing every sample once per pass, shuffled.

    Parameters
    ----------
    loader : Any
        A data loader or any iterable.

    Returns
    -------
    bool
        ``True`` for ``DataLoader(..., shuffle=True)`` (without a custom sampler).
    """
    from torch.utils.data import DataLoader, RandomSampler

    sampler = getattr(loader, "sampler", None)
    return (
        type(loader) is DataLoader
        and loader.batch_size is not None
        and type(sampler) is RandomSampler
        and not sampler.replacement
        and sampler.num_samples == len(sampler.data_source)  # type: ignore[arg-type]
    )
