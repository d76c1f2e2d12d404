"""Benchmark: fusing one 480x640 pair, tdfusion vs the research code's way of running the network.

Both use the same ReFusionNet parameters (the authors' IVIF weights when ``../shared/data`` is
present, else a seeded random network) on the same real MSRS pair (random images otherwise):
the baseline is ``_research_network.research_forward`` under ``torch.no_grad``; tdfusion is
``tdfusion.inference.fuse_tensors`` (inference mode, channels-last blocks). Both run in this
process, alternating, after a warm-up; the medians are compared and the outputs must agree to
2e-4. The peak memory of each is measured in a fresh child process fusing the pair once.
Run from the repository root::

    python benchmarks/inference.py [--repeats 5] [--threads 2]

The last line prints the speed-up this benchmark claims.
"""

from __future__ import annotations

import argparse
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

from _memory import peak_rss_gib  # noqa: E402
from _research_network import research_forward  # noqa: E402

from tdfusion.inference import fuse_tensors  # noqa: E402
from tdfusion.nets import ReFusionNet  # noqa: E402


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("THREADS", 2)))
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--child", choices=("research", "tdfusion"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    weights = args.data / "weights" / "ReFusion" / "ReFusion_IVIF.pth"
    if weights.is_file():
        net, source = ReFusionNet.from_pretrained(weights), "authors' IVIF weights"
    else:
        torch.manual_seed(0)
        net, source = ReFusionNet().eval(), "random weights"
    a, b, pair = load_pair(args.data)

    def baseline() -> torch.Tensor:
        with torch.no_grad():
            return research_forward(net, a, b)

    def ours() -> torch.Tensor:
        return fuse_tensors(net, a, b)

    if args.child:  # one fusion, then this process's peak memory
        (baseline if args.child == "research" else ours)()
        print(peak_rss_gib())
        return
    difference = (baseline() - ours()).abs().max().item()  # also the warm-up
    times: dict[str, list[float]] = {"research": [], "tdfusion": []}
    for _ in range(args.repeats):
        for name, function in (("research", baseline), ("tdfusion", ours)):
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    research, tdfusion = (statistics.median(times[k]) for k in ("research", "tdfusion"))
    print(
        f"torch {torch.__version__}, {args.threads} threads; {pair} ({a.shape[-2]}x{a.shape[-1]}), "
        f"{source}; {args.repeats} repeats"
    )
    for name, values in times.items():
        print(
            f"{name:9s} median {statistics.median(values):.3f} s  ("
            + ", ".join(f"{v:.3f}" for v in values)
            + ")"
        )
    print(f"max |difference| {difference:.2e} (must be <= 2e-4)")
    peaks = {name: child_peak(name, args) for name in ("research", "tdfusion")}
    print(
        "peak resident memory of one fusion in a fresh process: "
        + ", ".join(f"{name} {peak:.2f} GiB" for name, peak in peaks.items())
    )
    if difference > 2e-4:
        raise SystemExit("outputs differ by more than 2e-4")
    print(
        f"inference 480x640: research {research:.3f} s, tdfusion {tdfusion:.3f} s, "
        f"speed-up {research / tdfusion:.2f}x, max diff {difference:.1e}"
    )


if __name__ == "__main__":
    main()
