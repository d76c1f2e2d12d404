"""Benchmark: one meta step and one fusion step of MetaFusionTrainer vs the research code.

Setting (the paper's MSRS recipe): ReFusionNet F, LossGenerator G, SegFormer-b0 T (9 classes),
fusion loss on random 256x256 crops, task input resized to 240x320, one 480x640 pair per batch
fed in both orders (batch 2).

Two baselines, both the research code's *mechanics* (``_research_mechanics.py``:
``.backward(create_graph=True)`` into every parameter, fast weights written into the module, the
task network saved to and reloaded from disk):

- ``research-code``: a rebuild of the research code's step, whose ``F`` and ``G`` also run the
  research code's way (``_research_network.py``: the same parameters and outputs, computed
  with channels-first tensors, a hand-written layer norm through copies, heads split by
  reshaping and parts taken with ``chunk``);
- ``research-meta``: the same mechanics on tdfusion's networks as tdfusion runs them, which
  isolates what the meta step's mechanics gain (tdfusion's network speed-ups help it too).

The task network is tdfusion's SegFormer task in both. Two kinds of work are compared
(``--work``):

- ``tdfusion``: tdfusion's default step (linear weights, ``T'`` an SGD step, masks at the task
  size 240x320, padded cross-entropy) against the mechanics doing the same work, except that
  its ``T'`` is a step of ``T``'s Adam as in the research code;
- ``research``: the research code's work on both sides: squared weights, ``T'`` by ``T``'s own
  Adam, masks at the full 480x640 and the unpadded cross-entropy upsampled with
  ``align_corners=True``; ours is ``MetaFusionTrainer.from_preset("research", ...)``.

Two timings. Side by side in one child process per kind of work: the steps (both baselines'
meta steps, our meta step, our fusion step) alternate on the same inputs, medians after a
warm-up round. And each variant in its own fresh process, one after the other, as a training
run has it (these processes also measure peak memory and its growth, so that each peak is its
own): one variant's allocations then do not fragment another's heap (in one process, after the
research code's step, ours took 4.7-5.5 s instead of the 4.2-4.4 s it takes alone), and each
side can have its own allocator setting. ``--bf16`` adds our meta and fusion steps under bf16
autocast (``precision="bf16"``) to the first timing, worth it on CPUs with AVX512-BF16 or AMX.
Another variant, ``ours-meta-lean``, is our meta step with the blocks of ``F`` and ``G``
checkpointed (``set_grad_checkpointing()``), which trades time for memory. Run from the
repository root::

    python benchmarks/meta_step.py [--work both] [--steps 3] [--memory-steps 20] [--threads 2]
                                   [--malloc system|keep|default] [--bf16]

``--malloc keep`` runs every child process after :func:`tdfusion.allocator.keep_freed_memory`
(what ``tdfusion train`` does by default), both sides alike; ``system`` leaves glibc's default
on both sides; ``default`` runs each side as it runs by default, the research code with
glibc's default and ours with freed memory kept (own-process timings only: one process cannot
hold both settings).

Before it times anything, each kind of work checks that the two sides compute the same thing:
our hypergradient and the research code's on the same batches, crop and weights must agree
(cosine at least 0.9999, relative difference at most 1e-2, in float32; stochastic depth off),
or the benchmark stops. The last lines (one per kind of work) print the ratios this benchmark
claims.
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

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _memory import rss_gib  # noqa: E402
from _msrs_sample import load_pairs  # noqa: E402

#: The mask size of each kind of work: the task size, or the full label map (research code).
MASK_SIZE = {"tdfusion": (240, 320), "research": (480, 640)}


def make_batches(data: Path, count: int, work: str = "tdfusion"):
    """Batches of one pair fed in both orders, with random 9-class masks at the work's size."""
    generator = torch.Generator().manual_seed(1)
    batches = []
    for ir, vis in load_pairs(data, count):
        masks = torch.randint(0, 9, (1, *MASK_SIZE[work]), generator=generator)
        batches.append((torch.cat([ir, vis]), torch.cat([vis, ir]), torch.cat([masks, masks])))
    return batches


def build(mode: str, batches, work: str = "tdfusion"):
    """One variant, freshly initialised from the same seed: returns ``step(i)``."""
    torch.manual_seed(0)
    from tdfusion.nets import LossGenerator, ReFusionNet
    from tdfusion.tasks import SegmentationTask

    research = work == "research"
    fusion, generator = ReFusionNet(), LossGenerator()
    if mode == "ours-meta-lean":
        fusion.set_grad_checkpointing()
        generator.set_grad_checkpointing()
    task = SegmentationTask(9, pad=not research, align_corners=research)
    if mode in ("research-meta", "research-code"):
        from _research_mechanics import ResearchMechanics

        weighting = "squared" if research else "linear"
        network = "research" if mode == "research-code" else "tdfusion"
        runner = ResearchMechanics(fusion, generator, task, weighting=weighting, network=network)
        return lambda i: runner.meta_step(batches[i % 4], batches[(i + 1) % 4])
    precision = "bf16" if mode.endswith("-bf16") else "fp32"
    trainer = our_trainer(fusion, task, generator, work, precision=precision)
    if mode in ("ours-meta", "ours-meta-lean", "ours-meta-bf16"):
        return lambda i: trainer.meta_step(batches[i % 4], batches[(i + 1) % 4])
    return lambda i: trainer.fusion_step(batches[i % 4])


def our_trainer(fusion, task, generator, work: str, **options):
    """Our trainer in the benchmark's setting, for one kind of work (its preset)."""
    from tdfusion import MetaFusionTrainer

    return MetaFusionTrainer.from_preset(
        "research" if work == "research" else "default",
        fusion,
        task,
        generator,
        fusion_crop=256,
        task_size=(240, 320),
        device="cpu",
        **options,
    )


#: The least cosine, and the largest relative difference, between our hypergradient and the
#: research code's on the same batches and crop, both in float32 (the float64 test of the
#: research preset agrees to 1e-14).
AGREEMENT_COSINE_MIN = 0.9999
AGREEMENT_RELATIVE_MAX = 1e-2


def without_drop_path(task: torch.nn.Module) -> torch.nn.Module:
    """``task`` with its stochastic depth off (SegFormer's ``DropPath``), so that two
    implementations that draw their random numbers in different orders compute the same."""
    for module in task.modules():
        if hasattr(module, "drop_prob"):
            module.drop_prob = 0.0
    return task


def agreement(data: Path, threads: int, work: str) -> dict:
    """Our hypergradient against the research code's on the same batches, crop and weights.

    The benchmark's two sides must compute the same thing for their times to compare. In
    ``tdfusion`` work the baseline's ``T'`` is a step of ``T``'s Adam while ours is an SGD
    step, so the check builds ours with ``task_inner_optimizer="task_optimizer_persistent"``
    (the research code's ``T'``) and otherwise its defaults. Stochastic depth is off in both.
    """
    from _research_mechanics import ResearchMechanics

    from tdfusion.nets import LossGenerator, ReFusionNet
    from tdfusion.tasks import SegmentationTask

    torch.set_num_threads(threads)
    research = work == "research"
    batches = make_batches(data, 2, work)
    gradients = []
    for side in ("ours", "research-code"):
        torch.manual_seed(0)
        fusion, generator = ReFusionNet(), LossGenerator()
        task = without_drop_path(SegmentationTask(9, pad=not research, align_corners=research))
        options = {} if research else {"task_inner_optimizer": "task_optimizer_persistent"}
        trainer = our_trainer(fusion, task, generator, work, **options)
        if side == "ours":
            gradient = trainer.hypergradient(batches[0], batches[1])
        else:
            weighting = "squared" if research else "linear"
            runner = ResearchMechanics(
                fusion, generator, task, weighting=weighting, network="research"
            )
            runner.crop_rng.set_state(trainer.meta_generator.get_state())  # the same crop
            gradient = runner.hypergradient(batches[0], batches[1])
        gradients.append(torch.cat([gradient[n].flatten().double() for n in sorted(gradient)]))
    ours, theirs = gradients
    cosine = float(torch.nn.functional.cosine_similarity(ours, theirs, dim=0))
    relative = float((ours - theirs).norm() / theirs.norm())
    return {"cosine": cosine, "relative": relative}


def child(mode: str, steps: int, data: Path, threads: int, work: str) -> dict:
    """Run one variant for ``steps`` steps after a warm-up step; its memory and step times."""
    torch.set_num_threads(threads)
    step = build(mode, make_batches(data, 4, work), work)
    memory, seconds = [], []
    for i in range(steps + 1):
        start = time.perf_counter()
        step(i)
        seconds.append(time.perf_counter() - start)
        memory.append(rss_gib()[0])
    return {"mode": mode, "rss": memory, "peak": rss_gib()[1], "seconds": seconds[1:]}


def malloc_of(mode: str, setting: str) -> str:
    """The allocator setting of one variant: ``setting``, or each side's own default."""
    if setting != "default":
        return setting
    return "system" if mode.startswith("research") else "keep"


#: How a summary line names the ``--malloc`` setting.
MALLOC_LABEL = {
    "system": "malloc system",
    "keep": "malloc keep",
    "default": "each side's default allocator (research code: system, ours: keep)",
}


def time_side_by_side(
    steps: int, data: Path, work: str, bf16: bool = False
) -> dict[str, list[float]]:
    """Alternate the variants in this process on the same inputs; seconds per step."""
    batches = make_batches(data, 4, work)
    modes = ["research-code", "research-meta", "ours-meta", "ours-meta-lean", "ours-fusion"]
    if bf16:
        modes += ["ours-meta-bf16", "ours-fusion-bf16"]
    variants = {mode: build(mode, batches, work) for mode in modes}
    times: dict[str, list[float]] = {mode: [] for mode in variants}
    for i in range(steps + 1):  # round 0 is the warm-up
        for mode, step in variants.items():
            start = time.perf_counter()
            step(i)
            if i:
                times[mode].append(time.perf_counter() - start)
    return times


def run_child(
    mode: str, steps: int, data: Path, threads: int, work: str, malloc: str, bf16: bool = False
) -> dict:
    command = [
        sys.executable,
        __file__,
        "--child",
        mode,
        "--work",
        work,
        "--steps",
        str(steps),
        "--data",
        str(data),
        "--threads",
        str(threads),
        "--malloc",
        malloc_of(mode, malloc),
        *(["--bf16"] if bf16 else []),
    ]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def report(work: str, args: argparse.Namespace) -> list[str]:
    """Measure one kind of work; print the details and return the summary lines."""
    print(f"--- work: {work}")
    # Every measurement runs in a child process, so that this one holds no memory meanwhile.
    common = (args.data, args.threads, work, args.malloc)
    ours_steps, research_steps = args.memory_steps, args.research_steps
    own = {
        mode: run_child(mode, steps, *common)
        for mode, steps in (
            ("ours-meta", ours_steps),
            ("ours-meta-lean", ours_steps),
            ("ours-fusion", ours_steps),
            ("research-meta", research_steps),
            ("research-code", research_steps),
        )
    }
    agreed = run_child("agreement", 0, *common)
    agrees = (
        agreed["cosine"] >= AGREEMENT_COSINE_MIN and agreed["relative"] <= AGREEMENT_RELATIVE_MAX
    )
    print(
        f"hypergradient agreement, {work} work, ours vs the research code (same batches, crop "
        f"and weights, float32): cosine {agreed['cosine']:.6f}, relative difference "
        f"{agreed['relative']:.1e} ({'agree' if agrees else 'DISAGREE'}: at least "
        f"{AGREEMENT_COSINE_MIN} and at most {AGREEMENT_RELATIVE_MAX:.0e})"
    )
    if not agrees:
        raise SystemExit(
            f"the two sides of the {work} work do not compute the same hypergradient: "
            "their times do not compare"
        )
    ours_meta, lean = own["ours-meta"], own["ours-meta-lean"]
    research, research_code = own["research-meta"], own["research-code"]
    for mode, result in own.items():
        print(
            f"{mode:14s} own process: peak RSS {result['peak']:.2f} GiB; RSS after each step "
            + " ".join(f"{m:.2f}" for m in result["rss"])
            + "; seconds per step after the warm-up "
            + ", ".join(f"{v:.2f}" for v in result["seconds"])
        )
    growth = ours_meta["rss"][-1] - ours_meta["rss"][1]
    research_growth = research["rss"][-1] - research["rss"][1]
    lean_growth = lean["rss"][-1] - lean["rss"][1]
    print(
        f"memory growth over the run: ours {growth:+.2f} GiB, lean {lean_growth:+.2f} GiB "
        f"({len(ours_meta['rss']) - 1} meta steps each), research {research_growth:+.2f} GiB "
        f"({len(research['rss']) - 1} meta steps)"
    )
    ours_name = "ours (research preset)" if work == "research" else "ours (default)"
    memory = (
        f"peak memory (ours over {len(ours_meta['rss']) - 1} meta steps, the baselines over "
        f"{len(research['rss']) - 1}) ours "
        f"{ours_meta['peak']:.2f} GiB vs research code {research_code['peak']:.2f} GiB "
        f"({ours_meta['peak'] / research_code['peak']:.2f}), research mechanics "
        f"{research['peak']:.2f} GiB ({ours_meta['peak'] / research['peak']:.2f}); lean "
        f"(grad checkpointing) peak {lean['peak']:.2f} GiB "
        f"({lean['peak'] / research_code['peak']:.2f} of the research code's, "
        f"{lean['peak'] / research['peak']:.2f} of the mechanics')"
    )
    summaries = []
    if args.malloc != "default":  # one process cannot hold two allocator settings
        times = run_child("timing", args.steps, *common, args.bf16)
        median = {mode: statistics.median(values) for mode, values in times.items()}
        for mode, values in times.items():
            print(
                f"{mode:14s} one process, alternating: median {median[mode]:7.2f} s over "
                f"{len(values)} steps (" + ", ".join(f"{v:.2f}" for v in values) + ")"
            )
        if args.bf16:
            bf16_meta, bf16_fusion = median["ours-meta-bf16"], median["ours-fusion-bf16"]
            meta, code = median["ours-meta"], median["research-code"]
            print(
                f"bf16 autocast: meta step {bf16_meta:.2f} s ({meta / bf16_meta:.2f}x "
                f"float32's, {code / bf16_meta:.2f}x faster than the research code), fusion "
                f"step {bf16_fusion:.2f} s ({median['ours-fusion'] / bf16_fusion:.2f}x "
                "float32's)"
            )
        summaries.append(
            f"meta step, {work} work, {MALLOC_LABEL[args.malloc]}, one process alternating: "
            + _speeds(ours_name, median)
        )
    own_median = {mode: statistics.median(result["seconds"]) for mode, result in own.items()}
    summaries.append(
        f"meta step, {work} work, {MALLOC_LABEL[args.malloc]}, each variant in its own "
        f"process (medians of {ours_steps} steps of ours, {research_steps} of the baselines, "
        "after a warm-up step): " + _speeds(ours_name, own_median) + "; " + memory
    )
    return summaries


def _speeds(ours_name: str, median: dict[str, float]) -> str:
    """The ratios a summary line claims, from the variants' median seconds per step."""
    meta, lean, fusion = median["ours-meta"], median["ours-meta-lean"], median["ours-fusion"]
    baseline, code = median["research-meta"], median["research-code"]
    return (
        f"{ours_name} {meta:.2f} s, research code {code:.2f} s, speed-up {code / meta:.2f}x; "
        f"research mechanics on tdfusion's networks {baseline:.2f} s, speed-up "
        f"{baseline / meta:.2f}x; ours meta/fusion {meta / fusion:.2f}x (fusion step "
        f"{fusion:.2f} s); lean (grad checkpointing) {lean:.2f} s, speed-up {code / lean:.2f}x "
        f"({baseline / lean:.2f}x over the mechanics), {lean / meta:.2f}x the default"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--work",
        choices=["tdfusion", "research", "both"],
        default="both",
        help="whose work both sides do: tdfusion's default, the research code's, or both",
    )
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
        help="meta steps of the research mechanics (each ~15-30 s on 2 cores)",
    )
    parser.add_argument("--threads", type=int, default=int(os.environ.get("THREADS", 2)))
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument(
        "--malloc",
        choices=["system", "keep", "default"],
        default="system",
        help="glibc's default allocator or freed memory kept (tdfusion.allocator), both "
        "sides alike; or each side as it runs by default: the research code with glibc's "
        "default, ours with freed memory kept (as tdfusion train runs); with 'default' only "
        "the own-process timings are taken",
    )
    parser.add_argument(
        "--bf16", action="store_true", help="also time our steps under bf16 autocast"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bf16 and args.malloc == "default":
        parser.error(
            "--bf16 times our steps in the one-process timing, which --malloc default does "
            "not take (one process cannot hold both allocator settings); use --malloc keep "
            "or system"
        )
    if args.malloc == "keep":
        from tdfusion.allocator import keep_freed_memory

        keep_freed_memory()
    if args.child == "timing":
        torch.set_num_threads(args.threads)
        print(json.dumps(time_side_by_side(args.steps, args.data, args.work, args.bf16)))
        return
    if args.child == "agreement":
        print(json.dumps(agreement(args.data, args.threads, args.work)))
        return
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.data, args.threads, args.work)))
        return

    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {args.threads} threads, CPU: {os.cpu_count()} cores, "
        f"malloc {args.malloc}"
    )
    works = ["tdfusion", "research"] if args.work == "both" else [args.work]
    summaries = [line for work in works for line in report(work, args)]
    print("\n".join(summaries))


if __name__ == "__main__":
    main()
