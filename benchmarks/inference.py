"""Benchmark: fusing one 480x640 pair, tdfusion vs the research code's way of running the network.

All variants use the same ReFusionNet parameters (the authors' IVIF weights when
``../shared/data`` is present, else a seeded random network) on the same real MSRS pair (random
images otherwise):

- ``research``: ``_research_network.research_forward`` under ``torch.no_grad``, the baseline;
- ``modules``: the network's modules one after the other under ``torch.inference_mode``
  (``ReFusionNet.banded = False``): channels-last blocks, the native layer norm, one product
  per attention, no autograd bookkeeping;
- ``tdfusion``: ``tdfusion.inference.fuse_tensors``, which on the CPU runs the banded forward
  (``tdfusion.nets.banded``);
- with ``--levers``, also: the modules under ``torch.no_grad`` (what inference mode saves),
  the banded forward with other band sizes, and bf16 autocast
  (``tdfusion.inference.accelerate(net, precision="bf16")``); with ``--compile``,
  ``accelerate(net, compile=True)`` (its first call, the compilation, is timed apart).

The variants run in this process, alternating, after a warm-up; medians are compared, and the
fp32 outputs must agree with the baseline to 2e-4. The peak memory of research and tdfusion is
measured in a fresh child process fusing the pair once. Run from the repository root::

    python benchmarks/inference.py [--repeats 5] [--threads 2] [--levers] [--compile]

The last line prints the speed-up this benchmark claims.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _memory import peak_rss_gib  # noqa: E402
from _research_network import research_forward  # noqa: E402

from tdfusion.inference import accelerate, fuse_tensors  # noqa: E402
from tdfusion.nets import ReFusionNet  # noqa: E402
from tdfusion.nets.banded import DEFAULT_BAND_PIXELS, banded_forward  # noqa: E402


def load_pair(data: Path) -> tuple[torch.Tensor, torch.Tensor, str]:
    folder = data / "MSRS" / "example"
    if (folder / "ir" / "00004N.png").is_file():
        ir = np.asarray(Image.open(folder / "ir" / "00004N.png").convert("L"), np.float32) / 255
        rgb = np.asarray(Image.open(folder / "vi" / "00004N.png").convert("RGB"), np.float32)
        luma = (rgb @ np.array([0.299, 0.587, 0.114], np.float32)) / 255
        return torch.from_numpy(ir)[None, None], torch.from_numpy(luma)[None, None], "MSRS 00004N"
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.rand(1, 1, 480, 640, generator=generator) for _ in range(2))
    return a, b, "random 480x640"


def load_network(data: Path) -> tuple[ReFusionNet, str]:
    """The authors' IVIF network when its weights are present, else a seeded random one."""
    weights = data / "weights" / "ReFusion" / "ReFusion_IVIF.pth"
    if weights.is_file():
        return ReFusionNet.from_pretrained(weights), "authors' IVIF weights"
    torch.manual_seed(0)
    return ReFusionNet().eval(), "random weights"


def child_peak(name: str, args: argparse.Namespace) -> float:
    """Peak resident memory (GiB) of a fresh process that fuses the pair once with ``name``."""
    command = [
        sys.executable,
        __file__,
        "--child",
        name,
        "--data",
        str(args.data),
        "--threads",
        str(args.threads),
    ]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return float(output.strip().splitlines()[-1])


def variants(
    net: ReFusionNet, a: torch.Tensor, b: torch.Tensor, args: argparse.Namespace
) -> dict[str, Callable[[], torch.Tensor]]:
    """The timed variants, by name; ``research`` first, ``tdfusion`` the claim."""

    def research() -> torch.Tensor:
        with torch.no_grad():
            return research_forward(net, a, b)

    def modules(context: Callable[[], Any] = torch.inference_mode) -> torch.Tensor:
        net.banded = False
        try:
            with context():
                return net(a, b)
        finally:
            net.banded = True

    def banded(band_pixels: int) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with torch.inference_mode():
                return banded_forward(net, a, b, band_pixels=band_pixels)

        return run

    chosen: dict[str, Callable[[], torch.Tensor]] = {
        "research": research,
        "modules": modules,
        "tdfusion": lambda: fuse_tensors(net, a, b),
    }
    if args.levers:
        chosen["modules, no_grad"] = lambda: modules(torch.no_grad)
        for band_pixels in (DEFAULT_BAND_PIXELS // 4, DEFAULT_BAND_PIXELS * 4):
            chosen[f"banded, {band_pixels} px/band"] = banded(band_pixels)
        bf16 = accelerate(net, precision="bf16")
        chosen["bf16 autocast"] = lambda: fuse_tensors(bf16, a, b)
    if args.compile:
        compiled = accelerate(net, compile=True)
        start = time.perf_counter()
        fuse_tensors(compiled, a, b)
        print(
            f"torch.compile: first call {time.perf_counter() - start:.1f} s, "
            f"compiled: {compiled.compiled}"
        )
        chosen["compiled"] = lambda: fuse_tensors(compiled, a, b)
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("THREADS", 2)))
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--levers", action="store_true", help="time each lever apart too")
    parser.add_argument("--compile", action="store_true", help="time torch.compile too")
    parser.add_argument("--child", choices=("research", "tdfusion"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    net, source = load_network(args.data)
    a, b, pair = load_pair(args.data)
    functions = variants(net, a, b, args)

    if args.child:  # one fusion, then this process's peak memory
        functions[args.child]()
        print(peak_rss_gib())
        return
    outputs = {name: function() for name, function in functions.items()}  # also the warm-up
    differences = {
        name: (output.float() - outputs["research"]).abs().max().item()
        for name, output in outputs.items()
    }
    del outputs
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(args.repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(
        f"torch {torch.__version__}, {args.threads} threads; {pair} ({a.shape[-2]}x{a.shape[-1]}), "
        f"{source}; {args.repeats} repeats"
    )
    for name, values in times.items():
        print(
            f"{name:24s} median {medians[name]:.3f} s  x{medians['research'] / medians[name]:.2f}"
            f"  max diff {differences[name]:.1e}  (" + ", ".join(f"{v:.3f}" for v in values) + ")"
        )
    peaks = {name: child_peak(name, args) for name in ("research", "tdfusion")}
    print(
        "peak resident memory of one fusion in a fresh process: "
        + ", ".join(f"{name} {peak:.2f} GiB" for name, peak in peaks.items())
    )
    difference = differences["tdfusion"]
    if difference > 2e-4:
        raise SystemExit(f"outputs differ by {difference:.1e}, more than 2e-4")
    research, tdfusion = medians["research"], medians["tdfusion"]
    print(
        f"inference 480x640: research {research:.3f} s, tdfusion {tdfusion:.3f} s, "
        f"speed-up {research / tdfusion:.2f}x, max diff {difference:.1e}"
    )


if __name__ == "__main__":
    main()
