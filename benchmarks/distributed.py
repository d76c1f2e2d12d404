"""Benchmark: data-parallel scaling of MetaFusionTrainer over torchrun processes (gloo, CPU).

Setting: the MSRS networks (ReFusionNet F, LossGenerator G, SegFormer-b0 T with 9 classes) at
reduced sizes so that the run takes minutes on a small machine: fusion crop 128x128, task input
120x160, one 240x320 pair per rank fed in both orders (a batch of 2 per rank). Each rank uses
one CPU thread. The parent launches ``torchrun --nproc_per_node=1`` and ``=2`` alternately
(``--rounds`` times each) and reports, per world size, the median time of a meta step and of a
fusion step, the throughput in training pairs per second of the global batch, the scaling
efficiency (throughput ratio divided by the number of processes), the data each rank
all-reduces per step, and the peak resident memory per rank. Run from the repository root::

    python benchmarks/distributed.py [--rounds 2] [--steps 3]

The last line prints the figures this benchmark claims.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _memory import peak_rss_gib  # noqa: E402


def worker(out: Path, steps: int) -> None:
    """One rank: time meta and fusion steps, count what it all-reduces."""
    torch.set_num_threads(1)
    import tdfusion.distributed as distributed
    from tdfusion import LossGenerator, MetaFusionTrainer
    from tdfusion.distributed import collectives
    from tdfusion.nets import ReFusionNet
    from tdfusion.tasks import SegmentationTask

    reduced_bytes = [0]
    all_reduce = collectives.all_reduce_mean_

    def counting_all_reduce(tensors):
        if distributed.is_distributed():
            reduced_bytes[0] += sum(t.numel() * t.element_size() for t in tensors)
        all_reduce(tensors)

    # The trainer's strategy calls it through the collectives module: count it there.
    collectives.all_reduce_mean_ = counting_all_reduce

    torch.manual_seed(0)
    trainer = MetaFusionTrainer(
        ReFusionNet(),
        SegmentationTask(9),
        LossGenerator(),
        fusion_crop=128,
        task_size=(120, 160),
        device="cpu",
        seed=0,
    )
    rank = trainer.rank
    generator = torch.Generator().manual_seed(100 + rank)

    def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a, b = torch.rand(1, 1, 240, 320, generator=generator), torch.rand(1, 1, 240, 320)
        labels = torch.randint(0, 9, (1, 120, 160), generator=generator)
        return torch.cat([a, b]), torch.cat([b, a]), torch.cat([labels, labels])

    timings: dict[str, list[float]] = {"meta": [], "fusion": []}
    traffic: dict[str, int] = {}
    for step in range(steps + 1):  # the first round warms up
        for phase in ("meta", "fusion"):
            reduced_bytes[0] = 0
            distributed.barrier()
            start = time.perf_counter()
            if phase == "meta":
                trainer.meta_step(batch(), batch())
            else:
                trainer.fusion_step(batch())
            distributed.barrier()
            elapsed = time.perf_counter() - start
            if step > 0:
                timings[phase].append(elapsed)
            traffic[phase] = reduced_bytes[0]
    task_bytes = sum(p.numel() * p.element_size() for p in trainer.task_module.parameters())
    fusion_bytes = sum(p.numel() * p.element_size() for p in trainer.fusion_model.parameters())
    if trainer.distributed:  # DistributedDataParallel all-reduces the gradients of F and T
        traffic["fusion"] += task_bytes + fusion_bytes
    result = {
        "world_size": trainer.world_size,
        "meta_s": statistics.median(timings["meta"]),
        "fusion_s": statistics.median(timings["fusion"]),
        "meta_bytes": traffic["meta"],
        "fusion_bytes": traffic["fusion"],
        "peak_gib": peak_rss_gib(),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    distributed.destroy_distributed()


def launch(processes: int, steps: int) -> dict[str, float]:
    """One torchrun launch; the slowest rank's times and the largest peak."""
    with tempfile.TemporaryDirectory() as scratch:
        environment = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
        environment["PYTHONPATH"] = os.pathsep.join([str(REPO), environment.get("PYTHONPATH", "")])
        subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={processes}",
                __file__,
                "--worker",
                scratch,
                "--steps",
                str(steps),
            ],
            check=True,
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        ranks = [json.loads(p.read_text()) for p in sorted(Path(scratch).glob("rank*.json"))]
    return {
        "meta_s": max(r["meta_s"] for r in ranks),
        "fusion_s": max(r["fusion_s"] for r in ranks),
        "meta_bytes": ranks[0]["meta_bytes"],
        "fusion_bytes": ranks[0]["fusion_bytes"],
        "peak_gib": max(r["peak_gib"] for r in ranks),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="launches per world size")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per phase and launch")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker, args.steps)
        return

    runs: dict[int, list[dict[str, float]]] = {1: [], 2: []}
    for round_index in range(args.rounds):
        for processes in (1, 2):
            runs[processes].append(launch(processes, args.steps))
            print(f"round {round_index + 1}, {processes} process(es): {runs[processes][-1]}")
    summary = {}
    for processes, results in runs.items():
        meta = statistics.median(r["meta_s"] for r in results)
        fusion = statistics.median(r["fusion_s"] for r in results)
        summary[processes] = {
            "meta_s": meta,
            "fusion_s": fusion,
            # A meta step consumes two batches of 2 per rank, a fusion step one.
            "meta_pairs_per_s": 4 * processes / meta,
            "fusion_pairs_per_s": 2 * processes / fusion,
            "meta_kib": results[0]["meta_bytes"] / 1024,
            "fusion_kib": results[0]["fusion_bytes"] / 1024,
            "peak_gib": max(r["peak_gib"] for r in results),
        }
    one, two = summary[1], summary[2]
    meta_efficiency = two["meta_pairs_per_s"] / one["meta_pairs_per_s"] / 2
    fusion_efficiency = two["fusion_pairs_per_s"] / one["fusion_pairs_per_s"] / 2
    print(
        f"1 process: meta step {one['meta_s']:.2f} s, fusion step {one['fusion_s']:.2f} s, "
        f"peak {one['peak_gib']:.2f} GiB; 2 processes: meta step {two['meta_s']:.2f} s, fusion "
        f"step {two['fusion_s']:.2f} s, peak {two['peak_gib']:.2f} GiB per rank; all-reduced per "
        f"rank: meta step {two['meta_kib']:.0f} KiB, fusion step {two['fusion_kib']:.0f} KiB"
    )
    print(
        f"distributed scaling 1 -> 2 processes: meta-step throughput x"
        f"{2 * meta_efficiency:.2f} (efficiency {meta_efficiency:.0%}), fusion-step throughput "
        f"x{2 * fusion_efficiency:.2f} (efficiency {fusion_efficiency:.0%})"
    )


if __name__ == "__main__":
    main()
