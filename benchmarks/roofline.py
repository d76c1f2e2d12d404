"""Benchmark: how close ReFusionNet's 480x640 inference comes to this machine's roofline.

Counts, for each way of running the forward (``research``, ``modules`` and the banded
``tdfusion`` path, as in ``inference.py``):

- FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matrix products;
  the pointwise operations, a few percent, are not counted);
- bytes moved to and from main memory: every operand an operation reads or writes, counted
  when it lies in a tensor of at least 8 image planes (9.8 MB at 480x640 in float32, more than
  a core's share of the cache). The research and module paths make only such tensors; the
  banded path's bands (at most 4.6 MB, usually 1-2 MB) are taken to stay in the cache, and
  only its whole-image buffers count. Views and allocations move nothing.

It measures the machine's attainable compute (the median of a 2048 x 2048 x 2048 float32
matrix product) and bandwidth (the median of a 256 MiB tensor copy, counted as 512 MiB moved)
with the same threads, times the three paths alternately, and prints for each the roofline
floor ``max(FLOPs / peak, bytes / bandwidth)`` and the fraction of it reached (floor / time).
Run from the repository root::

    python benchmarks/roofline.py [--repeats 5] [--threads 2]

The last line prints the fractions.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

from inference import REPO, load_network, load_pair, variants

#: Operations that allocate without writing (first-touch costs are not modelled).
_ALLOCATIONS = {"empty", "empty_like", "new_empty", "empty_strided"}


class MemoryTrafficMode(TorchDispatchMode):
    """Bytes of the operands of every operation, split by the size of the tensor they lie in.

    Parameters
    ----------
    large_bytes : int
        Operands in tensors whose storage holds at least this many bytes are counted as
        main-memory traffic (``self.bytes``); the rest as cached (``self.cached_bytes``).
    """

    def __init__(self, large_bytes: int) -> None:
        super().__init__()
        self.large_bytes = large_bytes
        self.bytes = 0
        self.cached_bytes = 0

    def _count(self, tensors: list) -> None:
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor):
                size = tensor.numel() * tensor.element_size()
                if tensor.untyped_storage().nbytes() >= self.large_bytes:
                    self.bytes += size
                else:
                    self.cached_bytes += size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.is_view or func.__name__.split(".")[0] in _ALLOCATIONS:
            return out
        inputs = {key: value for key, value in kwargs.items() if key != "out"}
        self._count(tree_flatten((args, inputs))[0])
        self._count(tree_flatten(out)[0])
        return out


def median_time(function: Callable[[], object], repeats: int) -> float:
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine_peaks(repeats: int) -> tuple[float, float]:
    """Attainable float32 FLOP/s (a large matrix product) and copy bandwidth (bytes/s)."""
    size = 2048
    left, right = torch.rand(size, size), torch.rand(size, size)
    flops = 2 * size**3 / median_time(lambda: left @ right, repeats)
    source = torch.rand(64 * 2**20)  # 256 MiB
    target = torch.empty_like(source)
    bandwidth = 2 * source.nbytes / median_time(lambda: target.copy_(source), repeats)
    return flops, bandwidth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("THREADS", 2)))
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    args = parser.parse_args()
    args.levers = args.compile = False
    torch.set_num_threads(args.threads)
    net, source = load_network(args.data)
    a, b, pair = load_pair(args.data)
    functions = variants(net, a, b, args)
    large_bytes = 8 * a.shape[-2] * a.shape[-1] * a.element_size()

    counts = {}
    # The counting modes are thread-local: count on one thread (the banded forward then runs
    # its bands in this thread; the operations are the same).
    torch.set_num_threads(1)
    for name, function in functions.items():
        flop_counter, traffic = FlopCounterMode(display=False), MemoryTrafficMode(large_bytes)
        with flop_counter, traffic:
            function()
        counts[name] = (flop_counter.get_total_flops(), traffic.bytes)
    torch.set_num_threads(args.threads)
    peak_flops, bandwidth = machine_peaks(args.repeats)
    times: dict[str, list[float]] = {name: [] for name in functions}
    for function in functions.values():
        function()  # warm-up
    for _ in range(args.repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    print(
        f"torch {torch.__version__}, {args.threads} threads; {pair} ({a.shape[-2]}x{a.shape[-1]}), "
        f"{source}; {args.repeats} repeats"
    )
    print(
        f"machine: {peak_flops / 1e9:.1f} GFLOP/s (float32 matrix product), "
        f"{bandwidth / 1e9:.1f} GB/s (copy); ridge at {peak_flops / bandwidth:.1f} FLOP/byte"
    )
    fractions = {}
    for name, (flops, moved) in counts.items():
        measured = statistics.median(times[name])
        compute, memory = flops / peak_flops, moved / bandwidth
        floor = max(compute, memory)
        fractions[name] = floor / measured
        print(
            f"{name:9s} {flops / 1e9:6.1f} GFLOP, {moved / 1e9:6.2f} GB "
            f"({flops / moved:5.1f} FLOP/byte): floor {floor:.3f} s "
            f"({'compute' if compute >= memory else 'memory'}-bound; compute {compute:.3f} s, "
            f"memory {memory:.3f} s), measured {measured:.3f} s, "
            f"{100 * fractions[name]:.1f}% of the roofline"
        )
    print(
        "roofline fraction at 480x640: "
        + ", ".join(f"{name} {100 * fraction:.1f}%" for name, fraction in fractions.items())
    )


if __name__ == "__main__":
    main()
