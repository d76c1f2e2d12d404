"""Benchmark: fusing a folder serially and with reading and writing overlapped (pairs/s).

``tdfusion fuse`` (:func:`tdfusion.inference.fuse_folders`) reads the next pairs in a reader
thread and writes the outputs from a writer thread while the network runs in the calling
thread (``prefetch=2``, the default). This script fuses the same folder both ways in one
process, alternating, with the same network:

- ``serial``: ``fuse_folders(..., prefetch=0)``: every pair read once to check it, then each
  pair read, fused and written, one after the other (the way ``tdfusion fuse`` worked before);
- ``overlapped``: ``fuse_folders(..., prefetch=2)``: the check and the reading run in the reader
  thread while the network fuses, the colour merge and PNG encoding in the writer thread.

Each run's wall time (checking, reading, fusing, writing) is the command's own measurement
(``FolderReport.wall_seconds``); medians are compared, and the PNG files of both ways must be
byte for byte equal. The folder is ``../shared/data/MSRS/example`` (six 480x640 pairs) when
present, else ``--data`` (a folder with ``ir/`` and ``vi/``), else six random 480x640 pairs.
Run from the repository root::

    python benchmarks/fuse_throughput.py [--repeats 2] [--threads N] [--skip-bad]

``--threads`` defaults to PyTorch's own count (one per core, or ``OMP_NUM_THREADS``); the
banded forward computes that many bands at once. The last line prints both throughputs and
their ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tdfusion.inference import fuse_files, fuse_folders, load_fusion_model  # noqa: E402


def random_folder(root: Path, pairs: int = 6) -> Path:
    """Six random 480x640 pairs (grey infrared, colour visible) under ``root/ir``, ``root/vi``."""
    rng = np.random.default_rng(0)
    for role in ("ir", "vi"):
        (root / role).mkdir(parents=True)
    for index in range(pairs):
        ir = rng.integers(0, 256, (480, 640), dtype=np.uint8)
        Image.fromarray(ir).save(root / "ir" / f"{index:05d}.png")
        vi = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
        Image.fromarray(vi).save(root / "vi" / f"{index:05d}.png")
    return root


def load_average() -> str:
    try:
        return "load average " + ", ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "load average unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared/data/MSRS/example")
    parser.add_argument("--weights", default=None, help="default: the bundled weights")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--skip-bad", action="store_true", help="skip_bad=True (no check pass)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="fuse_throughput_") as scratch:
        scratch_path = Path(scratch)
        folder = args.data
        if not (folder / "ir").is_dir():
            folder = random_folder(scratch_path / "random")
        names = sorted(path.name for path in (folder / "ir").iterdir())
        size = Image.open(folder / "ir" / names[0]).size
        model = load_fusion_model(args.weights, "cpu")
        fuse_files(model, folder / "ir" / names[0], folder / "vi" / names[0])  # warm-up
        print(
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} "
            f"cores, {load_average()}; {len(names)} pairs of {size[0]}x{size[1]} from {folder}; "
            f"batch {args.batch}, skip_bad {args.skip_bad}, {args.repeats} repeats"
        )
        ways = {"serial": 0, "overlapped": args.prefetch}
        rates: dict[str, list[float]] = {way: [] for way in ways}
        pixel_rates: dict[str, list[float]] = {way: [] for way in ways}
        for repeat in range(args.repeats):
            for way, prefetch in ways.items():
                out = scratch_path / f"{way}-{repeat}"
                report = fuse_folders(
                    model,
                    folder / "ir",
                    folder / "vi",
                    out,
                    batch=args.batch,
                    skip_bad=args.skip_bad,
                    progress=False,
                    prefetch=prefetch,
                )
                rates[way].append(report.pairs_per_second)
                pixel_rates[way].append(report.pixels_per_second / 1e6)
                print(
                    f"  {way:10s} {report.wall_seconds:6.2f} s: {report.pairs_per_second:.3f} "
                    f"pairs/s, {report.pixels_per_second / 1e6:.3f} megapixels/s (network "
                    f"{report.seconds_per_pair:.2f} s per pair)",
                    flush=True,
                )
        different = [
            name
            for name in names
            for repeat in range(args.repeats)
            if (scratch_path / f"serial-{repeat}" / Path(name).with_suffix(".png")).read_bytes()
            != (scratch_path / f"overlapped-{repeat}" / Path(name).with_suffix(".png")).read_bytes()
        ]
    if different:
        raise SystemExit(f"the serial and overlapped outputs differ: {sorted(set(different))}")
    serial, overlapped = (statistics.median(rates[way]) for way in ways)
    megapixels = {way: statistics.median(values) for way, values in pixel_rates.items()}
    print(f"after the runs: {load_average()}")
    print(
        f"fuse throughput, {len(names)} pairs {size[1]}x{size[0]}, {torch.get_num_threads()} "
        f"threads: serial {serial:.3f} pairs/s ({megapixels['serial']:.3f} Mpx/s), overlapped "
        f"{overlapped:.3f} pairs/s ({megapixels['overlapped']:.3f} Mpx/s), ratio "
        f"{overlapped / serial:.2f}x, outputs byte-equal"
    )


if __name__ == "__main__":
    main()
