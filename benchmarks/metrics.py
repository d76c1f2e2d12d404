"""Time :func:`tdfusion.metrics.evaluate` against a straightforward port of the reference evaluator.

Both compute all ten metrics (EN, SD, SF, AG, MI, SCD, VIF, Qabf, SSIM, PSNR) on the real
640 x 480 MSRS pairs of the shared sample data. The sources are the infrared image and the
Y channel of the visible image; the "fused" image is their per-pixel maximum (``--fused``
also offers the mean), a simple stand-in with the statistics of a real fused image: the
metrics' cost does not depend on how the image was made. After one warm-up call of each
implementation, every pair is scored ``--repeats`` times by each, the two alternating so that
both see the same background load; the script reports the median time per pair, checks that
the two agree, and prints the medians over the pairs and the speed-up on its last line.

Run from the repository root::

    python benchmarks/metrics.py [--data ../shared/data] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from tdfusion.metrics import METRIC_NAMES, evaluate
from tdfusion.metrics._io import read_luma

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _reference_metrics import reference_evaluate

REPO_ROOT = Path(__file__).resolve().parents[1]


def default_data_folder() -> Path:
    """``$TDFUSION_SHARED_DATA`` if set, else ``../shared/data`` beside the repository."""
    override = os.environ.get("TDFUSION_SHARED_DATA")
    return Path(override) if override else REPO_ROOT.parent / "shared" / "data"


def load_pairs(data: Path, fusion: str) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """Read the MSRS example pairs as (name, fused, infrared, visible) luma arrays."""
    infrared_folder = data / "MSRS" / "example" / "ir"
    visible_folder = data / "MSRS" / "example" / "vi"
    if not infrared_folder.is_dir():
        raise SystemExit(f"no MSRS sample pairs in {infrared_folder}; pass --data")
    pairs = []
    for infrared_path in sorted(infrared_folder.glob("*.png")):
        infrared = read_luma(infrared_path)
        visible = read_luma(visible_folder / infrared_path.name)
        if fusion == "max":
            fused = np.maximum(infrared, visible)
        else:
            fused = np.round((infrared + visible) / 2)
        pairs.append((infrared_path.stem, fused, infrared, visible))
    return pairs


def seconds(function: Callable[..., object], arguments: Sequence[np.ndarray]) -> float:
    """Wall-clock time of one call of ``function(*arguments)``."""
    start = time.perf_counter()
    function(*arguments)
    return time.perf_counter() - start


def peak_mebibytes(function: Callable[..., object], arguments: Sequence[np.ndarray]) -> float:
    """Peak memory allocated (traced by tracemalloc, which sees numpy) during one call."""
    tracemalloc.start()
    try:
        function(*arguments)
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


#: The largest relative difference allowed between the two evaluators' values (both compute in
#: float64; they agree to about 1e-15).
AGREEMENT_TOLERANCE = 1e-9


def largest_relative_difference(first: dict[str, float], second: dict[str, float]) -> float:
    """The largest relative difference between two metric dictionaries."""
    return max(
        abs(first[name] - second[name]) / max(abs(second[name]), 1e-12) for name in METRIC_NAMES
    )


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print one line per pair, then the summary line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=default_data_folder())
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per pair and method")
    parser.add_argument("--fused", choices=("max", "mean"), default="max")
    args = parser.parse_args(argv)

    pairs = load_pairs(args.data, args.fused)
    _, fused, infrared, visible = pairs[0]
    reference_evaluate(fused, infrared, visible)  # warm-up: imports, caches, page faults
    evaluate(fused, infrared, visible)

    reference_times, tdfusion_times, differences = [], [], []
    for name, *images in pairs:
        # Alternate the two so that both see the same background load.
        timings = [
            (seconds(reference_evaluate, images), seconds(evaluate, images))
            for _ in range(args.repeats)
        ]
        reference_times.append(statistics.median(reference for reference, _ in timings))
        tdfusion_times.append(statistics.median(ours for _, ours in timings))
        difference = largest_relative_difference(evaluate(*images), reference_evaluate(*images))
        differences.append(difference)
        fused = images[0]
        print(
            f"{name} {fused.shape[1]}x{fused.shape[0]}: reference {reference_times[-1]:.3f} s, "
            f"tdfusion {tdfusion_times[-1]:.3f} s, largest relative difference {difference:.1e}",
            flush=True,
        )
    reference_median = statistics.median(reference_times)
    tdfusion_median = statistics.median(tdfusion_times)
    images = pairs[0][1:]
    print(
        f"peak memory of one evaluation (numpy allocations, tracemalloc): reference "
        f"{peak_mebibytes(reference_evaluate, images):.0f} MiB, tdfusion "
        f"{peak_mebibytes(evaluate, images):.0f} MiB"
    )
    print(
        f"metrics: reference {reference_median:.2f} s/pair, tdfusion {tdfusion_median:.3f} s/pair, "
        f"speed-up {reference_median / tdfusion_median:.1f}x (largest relative difference "
        f"{max(differences):.1e}, at most {AGREEMENT_TOLERANCE:.0e})"
    )
    if max(differences) > AGREEMENT_TOLERANCE:
        raise SystemExit(
            f"the two evaluators disagree (largest relative difference {max(differences):.1e}): "
            "their times do not compare"
        )


if __name__ == "__main__":
    main()
