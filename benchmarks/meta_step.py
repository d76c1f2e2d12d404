"""Benchmark: one meta step and one fusion step of MetaFusionTrainer vs the research mechanics.

Setting (the paper's MSRS recipe): ReFusionNet F, LossGenerator G, SegFormer-b0 T (9 classes),
fusion loss on random 256x256 crops, task input resized to 240x320, one 480x640 pair per batch
fed in both orders (batch 2). The baseline is the research code's mechanics
(``_research_mechanics.py``) on the same networks and inputs. Timings are taken in this one
process, the three steps (research meta step, our meta step, our fusion step) alternating on
the same inputs, as medians after a warm-up round. Peak memory and its growth over the steps
are measured in a fresh child process per variant, so that each peak is its own. Run from the
repository root::

    python benchmarks/meta_step.py [--steps 3] [--memory-steps 20] [--threads 2]

The last line prints the ratios this benchmark claims.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _memory import rss_gib  # noqa: E402


def load_pairs(data: Path, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Y channels in [0, 1] of real MSRS pairs (random images when the data is absent)."""
    folder = data / "MSRS" / "example"
    names = sorted(p.name for p in (folder / "ir").glob("*.png"))[:count] if folder.is_dir() else []
    pairs = []
    for name in names:
        ir = np.asarray(Image.open(folder / "ir" / name).convert("L"), dtype=np.float32) / 255
        rgb = np.asarray(Image.open(folder / "vi" / name).convert("RGB"), dtype=np.float32) / 255
        luma = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        pairs.append((torch.from_numpy(ir)[None, None], torch.from_numpy(luma)[None, None]))
    generator = torch.Generator().manual_seed(0)
    while len(pairs) < count:
        pairs.append(tuple(torch.rand(1, 1, 480, 640, generator=generator) for _ in range(2)))
    return pairs


def make_batches(data: Path, count: int):
    """Batches of one pair fed in both orders, with random 9-class masks at the task size."""
    generator = torch.Generator().manual_seed(1)
    batches = []
    for ir, vis in load_pairs(data, count):
        masks = torch.randint(0, 9, (1, 240, 320), generator=generator)
        batches.append((torch.cat([ir, vis]), torch.cat([vis, ir]), torch.cat([masks, masks])))
    return batches


def build(mode: str, batches):
    """One variant, freshly initialised from the same seed: returns ``step(i)``."""
    torch.manual_seed(0)
    from tdfusion import MetaFusionTrainer
    from tdfusion.nets import LossGenerator, ReFusionNet
    from tdfusion.tasks import SegmentationTask

    fusion, generator, task = ReFusionNet(), LossGenerator(), SegmentationTask(9)
    if mode == "research-meta":
        from _research_mechanics import ResearchMechanics

        runner = ResearchMechanics(fusion, generator, task)
        return lambda i: runner.meta_step(batches[i % 4], batches[(i + 1) % 4])
    trainer = MetaFusionTrainer(
        fusion, task, generator, fusion_crop=256, task_size=(240, 320), device="cpu"
    )
    if mode == "ours-meta":
        return lambda i: trainer.meta_step(batches[i % 4], batches[(i + 1) % 4])
    return lambda i: trainer.fusion_step(batches[i % 4])


def child(mode: str, steps: int, data: Path, threads: int) -> dict:
    """Run one variant for ``steps`` steps (after a warm-up) and report its memory."""
    torch.set_num_threads(threads)
    step = build(mode, make_batches(data, 4))
    memory = []
    for i in range(steps + 1):
        step(i)
        memory.append(rss_gib()[0])
    return {"mode": mode, "rss": memory, "peak": rss_gib()[1]}


def time_side_by_side(steps: int, data: Path) -> dict[str, list[float]]:
    """Alternate the three variants in this process on the same inputs; seconds per step."""
    batches = make_batches(data, 4)
    variants = {
        mode: build(mode, batches) for mode in ("research-meta", "ours-meta", "ours-fusion")
    }
    times: dict[str, list[float]] = {mode: [] for mode in variants}
    for i in range(steps + 1):  # round 0 is the warm-up
        for mode, step in variants.items():
            start = time.perf_counter()
            step(i)
            if i:
                times[mode].append(time.perf_counter() - start)
    return times


def run_child(mode: str, steps: int, data: Path, threads: int) -> dict:
    command = [
        sys.executable,
        __file__,
        "--child",
        mode,
        "--steps",
        str(steps),
        "--data",
        str(data),
        "--threads",
        str(threads),
    ]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    parser.add_argument(
        "--memory-steps",
        type=int,
        default=20,
        help="meta steps of our trainer for the memory figure",
    )
    parser.add_argument(
        "--research-steps",
        type=int,
        default=5,
        help="meta steps of the research mechanics (each ~30 s on 2 cores)",
    )
    parser.add_argument("--threads", type=int, default=int(os.environ.get("THREADS", 2)))
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.data, args.threads)))
        return

    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, CPU: {os.cpu_count()} cores")
    times = time_side_by_side(args.steps, args.data)
    ours_meta = run_child("ours-meta", args.memory_steps, args.data, args.threads)
    research = run_child("research-meta", args.research_steps, args.data, args.threads)
    meta = statistics.median(times["ours-meta"])
    fusion = statistics.median(times["ours-fusion"])
    baseline = statistics.median(times["research-meta"])
    for mode, values in times.items():
        print(
            f"{mode:14s} median {statistics.median(values):7.2f} s over {len(values)} steps ("
            + ", ".join(f"{v:.2f}" for v in values)
            + ")"
        )
    for name, result in (("ours meta", ours_meta), ("research meta", research)):
        print(
            f"{name:14s} peak RSS {result['peak']:.2f} GiB; RSS after each step "
            + " ".join(f"{m:.2f}" for m in result["rss"])
        )
    growth = ours_meta["rss"][-1] - ours_meta["rss"][1]
    research_growth = research["rss"][-1] - research["rss"][1]
    print(
        f"memory growth over the run: ours {growth:+.2f} GiB ({len(ours_meta['rss']) - 1} meta "
        f"steps), research {research_growth:+.2f} GiB ({len(research['rss']) - 1} meta steps)"
    )
    print(
        f"meta step: ours {meta:.2f} s, research mechanics {baseline:.2f} s, speed-up "
        f"{baseline / meta:.2f}x; ours meta/fusion {meta / fusion:.2f}x "
        f"(fusion step {fusion:.2f} s); peak memory over {len(ours_meta['rss']) - 1} meta steps "
        f"ours {ours_meta['peak']:.2f} GiB vs research {research['peak']:.2f} GiB"
    )


if __name__ == "__main__":
    main()
