"""Data sharding: one rank's share of a :class:`~torch.utils.data.DataLoader`."""

from __future__ import annotations

from typing import Any

import torch

from tdfusion.errors import DistributedError

__all__ = ["loader_with_sampler", "shard_loader", "shuffles_plainly"]


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
    sampler = DistributedSampler(
        loader.dataset,
        num_replicas=num_replicas,
        rank=rank,
        shuffle=shuffles,
        seed=seed if shuffles else 0,
    )
    return loader_with_sampler(loader, sampler, loader.generator)


def loader_with_sampler(loader: Any, sampler: Any, generator: torch.Generator | None) -> Any:
    """A :class:`~torch.utils.data.DataLoader` like ``loader`` with another sampler and generator.

    Parameters
    ----------
    loader : torch.utils.data.DataLoader
        A plain ``DataLoader`` with a batch size; its dataset, batch size, workers, collate
        function and other settings are kept.
    sampler : torch.utils.data.Sampler
        The new sampler.
    generator : torch.Generator or None
        The new loader's generator (it seeds the workers).

    Returns
    -------
    torch.utils.data.DataLoader
        The new loader.

    Example
    -------
    >>> from torch.utils.data import DataLoader, SequentialSampler
    >>> loader = DataLoader(list(range(4)), batch_size=2, shuffle=True)
    >>> twin = loader_with_sampler(loader, SequentialSampler(range(4)), None)
    >>> [batch.tolist() for batch in twin]
    [[0, 1], [2, 3]]
    """
    from torch.utils.data import DataLoader

    options: dict[str, Any] = {
        "batch_size": loader.batch_size,
        "sampler": sampler,
        "num_workers": loader.num_workers,
        "collate_fn": loader.collate_fn,
        "pin_memory": loader.pin_memory,
        "drop_last": loader.drop_last,
        "timeout": loader.timeout,
        "worker_init_fn": loader.worker_init_fn,
        "generator": generator,
        "persistent_workers": loader.persistent_workers,
    }
    if loader.num_workers > 0:
        options["prefetch_factor"] = loader.prefetch_factor
        options["multiprocessing_context"] = loader.multiprocessing_context
    for setting in ("pin_memory_device", "in_order"):  # settings of newer PyTorch releases
        if hasattr(loader, setting):
            options[setting] = getattr(loader, setting)
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
