"""How training is spread over processes, as an object handed to the algorithm.

The trainer never asks whether it runs distributed: it calls its :class:`Strategy`, whose
single-process form does nothing (or returns its argument) and whose data-parallel form
wraps, averages and broadcasts. Only entry points start a process group; :func:`select_strategy`
joins one that ``torchrun`` describes when a trainer is built in a script it launched.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from tdfusion.distributed import collectives, process
from tdfusion.distributed.sharding import shard_loader
from tdfusion.errors import DistributedError

__all__ = [
    "DataParallel",
    "SingleProcess",
    "Strategy",
    "describe_replica",
    "select_strategy",
]


class Strategy:
    """The operations that differ between one process and several.

    This base class is the single-process behaviour: every collective is a no-op, modules are
    used as they are, and this process is the main one. :class:`DataParallel` overrides each
    operation for a ``torch.distributed`` group.

    Parameters
    ----------
    device : torch.device
        Where this process trains.

    Examples
    --------
    >>> import torch
    >>> strategy = SingleProcess(torch.device("cpu"))
    >>> strategy.is_main, strategy.world_size
    (True, 1)
    >>> gradients = [torch.ones(2)]
    >>> strategy.global_gradients(gradients, keep_graph=False)[0] is gradients[0]
    True
    """

    #: Whether this process is one of several.
    distributed: bool = False

    def __init__(self, device: torch.device) -> None:
        self.device = device

    @property
    def rank(self) -> int:
        """This process's rank (0 in a single process)."""
        return 0

    @property
    def world_size(self) -> int:
        """The number of processes (1 in a single process)."""
        return 1

    @property
    def is_main(self) -> bool:
        """Whether this process shows progress and writes checkpoints and logs (rank 0)."""
        return self.rank == 0

    def wrap(self, module: nn.Module, **options: Any) -> nn.Module:
        """The module to call for a training step whose gradients are averaged over ranks."""
        return module

    def start_from_main(self, module: nn.Module) -> None:
        """Give ``module`` rank 0's parameters and buffers on every rank."""

    def mean_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Average tensors in place over all ranks.

        Parameters
        ----------
        tensors : sequence of torch.Tensor
            Floating-point tensors of the same shapes on every rank.
        """

    def mean_stats(
        self, tensors: Mapping[str, torch.Tensor | None]
    ) -> dict[str, torch.Tensor | None]:
        """Scalar statistics averaged over ranks (``None`` entries are kept as ``None``).

        Parameters
        ----------
        tensors : mapping of str to torch.Tensor or None
            Scalars (shape ``()`` or one element).

        Returns
        -------
        dict of str to torch.Tensor or None
            The means, in the same order.
        """
        return dict(tensors)

    def global_gradients(
        self, local: Sequence[torch.Tensor], keep_graph: bool
    ) -> list[torch.Tensor]:
        """The whole (global) batch's gradient from this rank's: their mean over ranks.

        Parameters
        ----------
        local : sequence of torch.Tensor
            This rank's gradients, possibly with a graph.
        keep_graph : bool
            Keep a graph that back-propagates into this rank's own gradients only.

        Returns
        -------
        list of torch.Tensor
            The global gradients.
        """
        return list(local)

    def sync_buffers_(self, *modules: nn.Module | None) -> None:
        """Average the floating-point buffers (batch-norm statistics) of ``modules``."""

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's value of a picklable object, on every rank."""
        return value

    def gather_objects(self, value: Any) -> list[Any]:
        """Every rank's value of a picklable object, in rank order."""
        return [value]

    def barrier(self) -> None:
        """Wait for every rank."""

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()`` (through the wrappers of :meth:`wrap`)."""
        loss.backward()

    def check_same(self, description: Mapping[str, Any], what: str = "trainer") -> None:
        """Raise on every rank when another rank's ``description`` differs from this one's."""

    def shard(self, loader: Any, seed: int | None) -> Any:
        """This rank's share of a plain :class:`~torch.utils.data.DataLoader`.

        Parameters
        ----------
        loader : torch.utils.data.DataLoader
            A loader :func:`~tdfusion.distributed.shard_loader` can rebuild.
        seed : int, optional
            Shuffling seed shared by all ranks (required when the loader shuffles).

        Returns
        -------
        torch.utils.data.DataLoader
            A loader around a ``DistributedSampler``.
        """
        return shard_loader(loader, self.world_size, self.rank, seed)


class SingleProcess(Strategy):
    """Training in this process alone: every operation of :class:`Strategy` is a no-op."""


class DataParallel(Strategy):
    """One rank of a ``torch.distributed`` data-parallel group.

    ``F`` and ``T`` are wrapped in :class:`~torch.nn.parallel.DistributedDataParallel` for the
    fusion phase; the meta step averages its gradients, hypergradient and statistics with the
    collectives below.

    Parameters
    ----------
    device : torch.device
        This rank's device.
    """

    distributed = True

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        process.check_backend(device)
        if device.type == "cuda":
            # Object collectives (broadcast_object, gather_objects) use the current device.
            torch.cuda.set_device(device)

    @property
    def rank(self) -> int:
        return process.get_rank()

    @property
    def world_size(self) -> int:
        return process.get_world_size()

    def wrap(self, module: nn.Module, **options: Any) -> nn.Module:
        return collectives.replicate(module, self.device, **options)

    def start_from_main(self, module: nn.Module) -> None:
        collectives.broadcast_module_(module)

    def mean_(self, tensors: Sequence[torch.Tensor]) -> None:
        collectives.all_reduce_mean_(tensors)

    def mean_stats(
        self, tensors: Mapping[str, torch.Tensor | None]
    ) -> dict[str, torch.Tensor | None]:
        present = [k for k, v in tensors.items() if v is not None]
        packed = torch.stack(
            [tensors[k].detach().reshape(()).to(torch.float64) for k in present]  # type: ignore[union-attr]
        ).to(self.device)
        collectives.all_reduce_mean_([packed])  # one collective for all statistics
        means = dict(zip(present, packed.unbind()))
        return {k: means.get(k) for k in tensors}

    def global_gradients(
        self, local: Sequence[torch.Tensor], keep_graph: bool
    ) -> list[torch.Tensor]:
        # With keep_graph the result has the global value but back-propagates only into this
        # rank's own graph, t + (g - g.detach()). Each rank's vector-Jacobian product through
        # it is then its own term of the global one, and averaging those over ranks (as the
        # hypergradient is) gives the global hypergradient exactly.
        totals = [g.detach().clone() for g in local]
        collectives.all_reduce_mean_(totals)
        if not keep_graph:
            return totals
        return [total + (g - g.detach()) for total, g in zip(totals, local)]

    def sync_buffers_(self, *modules: nn.Module | None) -> None:
        for module in modules:
            if module is not None:
                collectives.average_buffers_(module)

    def broadcast_object(self, value: Any) -> Any:
        return collectives.broadcast_object(value)

    def gather_objects(self, value: Any) -> list[Any]:
        return collectives.gather_objects(value)

    def barrier(self) -> None:
        collectives.barrier()

    def backward(self, loss: torch.Tensor) -> None:
        # The depthwise convolutions of the Restormer blocks (and of SegFormer) get weight
        # gradients in a channels-last layout on the CPU; DistributedDataParallel copies them
        # into its buckets (negligible next to the convolution) and warns that it does.
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message="Grad strides do not match bucket view strides"
            )
            loss.backward()

    def check_same(self, description: Mapping[str, Any], what: str = "trainer") -> None:
        collectives.check_same_on_all_ranks(description, what)


def select_strategy(distributed: bool | None, device: str | torch.device | None = None) -> Strategy:
    """The strategy of a trainer built with ``distributed=`` and ``device=``.

    ``None`` trains data-parallel when a group of more than one process is initialised, or
    when the script runs under ``torchrun`` with more than one process (the group is then
    joined from its environment: a script that builds a trainer is an entry point);
    ``False`` trains this process on its own; ``True`` requires a group.

    Parameters
    ----------
    distributed : bool, optional
        The trainer's ``distributed`` argument.
    device : str or torch.device, optional
        The trainer's ``device`` argument (see :func:`~tdfusion.distributed.rank_device`).

    Returns
    -------
    Strategy
        :class:`SingleProcess` or :class:`DataParallel`.

    Raises
    ------
    DistributedError
        With ``distributed=True`` outside a group of several processes.

    Example
    -------
    >>> type(select_strategy(False, "cpu")).__name__
    'SingleProcess'
    """
    if distributed is not False:
        if not process.is_distributed() and process.launched_distributed():
            process.init_distributed(device=device)
        if process.is_distributed():
            return DataParallel(process.rank_device(device))
        if distributed:
            raise DistributedError(
                "distributed=True, but this process is not one of several: launch the script "
                "with torchrun --nproc_per_node=N (or initialise a torch.distributed process "
                "group of more than one process first)"
            )
    return SingleProcess(process.rank_device(device))


def describe_replica(**facts: Any) -> dict[str, Any]:
    """Facts that must agree on every rank, for :meth:`Strategy.check_same`.

    Parameters
    ----------
    **facts
        Settings and modules; a module is described by its state dict's names and shapes.

    Returns
    -------
    dict
        Picklable facts.

    Example
    -------
    >>> describe_replica(layer=nn.Linear(2, 1), lr=0.1)
    {'layer': [('weight', (1, 2)), ('bias', (1,))], 'lr': 0.1}
    """
    return {
        name: [(key, tuple(t.shape)) for key, t in value.state_dict().items()]
        if isinstance(value, nn.Module)
        else value
        for name, value in facts.items()
    }
