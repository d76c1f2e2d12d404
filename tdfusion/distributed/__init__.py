"""Multi-process training with ``torch.distributed``: processes, collectives, sharding, strategy.

tdfusion uses PyTorch's own engine. ``torchrun`` (or SLURM's ``srun`` with the same environment
variables) starts one process per GPU; :func:`init_distributed` joins them into a process group
from that environment, and :class:`~tdfusion.MetaFusionTrainer` then trains through a
:class:`DataParallel` strategy: ``F`` and ``T`` in sync with
:class:`~torch.nn.parallel.DistributedDataParallel` and the generator's hypergradient
all-reduced. Without that environment every function here describes a world of one process and
the trainer uses :class:`SingleProcess`, so the same code runs unchanged in a single process.

Four modules: ``process`` (the group, ranks, devices), ``collectives``, ``sharding`` (data)
and ``strategy`` (what the trainer calls).
"""

from tdfusion.distributed.collectives import (
    all_reduce_mean_,
    average_buffers_,
    barrier,
    broadcast_module_,
    broadcast_object,
    check_same_on_all_ranks,
    gather_objects,
    replicate,
)
from tdfusion.distributed.process import (
    TORCHRUN_VARIABLES as TORCHRUN_VARIABLES,
)
from tdfusion.distributed.process import (
    check_backend,
    destroy_distributed,
    distributed_session,
    get_local_rank,
    get_rank,
    get_world_size,
    init_distributed,
    is_distributed,
    is_main_process,
    launched_distributed,
    rank_device,
)
from tdfusion.distributed.sharding import loader_with_sampler, shard_loader, shuffles_plainly
from tdfusion.distributed.strategy import (
    DataParallel,
    SingleProcess,
    Strategy,
    describe_replica,
    select_strategy,
)

__all__ = [
    "DataParallel",
    "SingleProcess",
    "Strategy",
    "all_reduce_mean_",
    "average_buffers_",
    "barrier",
    "broadcast_module_",
    "broadcast_object",
    "check_backend",
    "check_same_on_all_ranks",
    "describe_replica",
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
    "loader_with_sampler",
    "rank_device",
    "replicate",
    "select_strategy",
    "shard_loader",
    "shuffles_plainly",
]
