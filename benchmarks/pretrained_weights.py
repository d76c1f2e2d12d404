"""Benchmark: the bundled ``tdfusion-ivif`` weights against the authors' ReFusion IVIF weights.

Each model fuses the real MSRS (640x480) and LLVIP (1280x1024) example pairs of
``../shared/data`` (none of which the bundled weights were trained on) through ``tdfusion fuse``
with its default options, in a subprocess, exactly as a user runs it; the fused images are
scored with ``tdfusion.metrics`` on their Y channel against the two sources (the paper's six
metrics EN, SF, SCD, VIF, Qabf, SSIM). It also prints three visual checks per model: the mean
luminance of the fused image minus that of the darker source (negative: darker than both), and
the mean absolute step between the outermost 2-pixel ring and the ring inside it divided by the
same step one ring further in (about 1 without border artefacts). Run from the repository root::

    python benchmarks/pretrained_weights.py [--data ../shared/data]

The last lines print, per dataset, each metric of the bundled weights as a ratio of the
authors' (the model card's table).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from tdfusion.data import read_luma
from tdfusion.metrics import evaluate_files

METRICS = ("EN", "SF", "SCD", "VIF", "Qabf", "SSIM")
DATASETS = {"MSRS": "MSRS/example", "LLVIP": "LLVIP/example"}


def fuse_folder(ir: Path, vis: Path, out: Path, weights: str | None) -> None:
    """Run ``tdfusion fuse`` on one folder pair (default options)."""
    command = [sys.executable, "-m", "tdfusion", "fuse", "--ir", str(ir), "--vis", str(vis)]
    command += ["--out", str(out)]
    if weights is not None:
        command += ["--weights", weights]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def ring_step_ratio(image: np.ndarray) -> float:
    """Mean |outer ring - next ring| over mean |next ring - the ring after it| (2-px rings)."""

    def ring(depth: int) -> np.ndarray:
        inner = image[depth : image.shape[0] - depth, depth : image.shape[1] - depth]
        return np.concatenate(
            [
                inner[:2].ravel(),
                inner[-2:].ravel(),
                inner[2:-2, :2].ravel(),
                inner[2:-2, -2:].ravel(),
            ]
        )

    def step(outer: int) -> float:
        a, b = ring(outer), ring(outer + 2)
        return abs(float(a.mean()) - float(b.mean()))

    return step(0) / max(step(2), 1e-3)


def score(fused: Path, ir: Path, vis: Path) -> dict[str, float]:
    rows = []
    for fused_file in sorted(fused.iterdir()):
        stem = fused_file.stem
        ir_file = next(ir.glob(stem + ".*"))
        vis_file = next(vis.glob(stem + ".*"))
        metrics = evaluate_files(fused_file, ir_file, vis_file)
        luma_f = read_luma(fused_file)[0] * 255
        darker = min(float(read_luma(ir_file)[0].mean()), float(read_luma(vis_file)[0].mean()))
        metrics["brightness"] = float(luma_f.mean()) - darker * 255
        metrics["border"] = ring_step_ratio(luma_f)
        rows.append(metrics)
    return {key: float(np.mean([row[key] for row in rows])) for key in rows[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument(
        "--models",
        nargs="*",
        default=None,
        help="NAME=WEIGHTS pairs (default: bundled and the authors' ReFusion IVIF)",
    )
    args = parser.parse_args()
    models = {"tdfusion-ivif": "tdfusion-ivif"}
    authors = args.data / "weights" / "ReFusion" / "ReFusion_IVIF.pth"
    if authors.is_file():
        models["ReFusion IVIF"] = str(authors)
    for item in args.models or []:
        name, _, weights = item.partition("=")
        models[name] = weights
    results: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for dataset, folder in DATASETS.items():
            ir, vis = args.data / folder / "ir", args.data / folder / "vi"
            if not ir.is_dir():
                print(f"{dataset}: {ir} not found, skipped")
                continue
            for name, weights in models.items():
                out = Path(scratch) / dataset / name.replace(" ", "_")
                fuse_folder(ir, vis, out, weights)
                results.setdefault(dataset, {})[name] = score(out, ir, vis)
    columns = (*METRICS, "brightness", "border")
    for dataset, by_model in results.items():
        count = len(list((args.data / DATASETS[dataset] / "ir").iterdir()))
        print(f"\n{dataset} ({count} pairs), means")
        print(f"{'model':16s}" + "".join(f"{c:>11s}" for c in columns))
        for name, values in by_model.items():
            print(f"{name:16s}" + "".join(f"{values[c]:11.4f}" for c in columns))
    print()
    for dataset, by_model in results.items():
        if "ReFusion IVIF" not in by_model:
            continue
        ours, theirs = by_model["tdfusion-ivif"], by_model["ReFusion IVIF"]
        ratios = ", ".join(f"{m} {ours[m] / theirs[m]:.3f}" for m in METRICS)
        print(f"{dataset}: tdfusion-ivif / ReFusion IVIF = {ratios}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
