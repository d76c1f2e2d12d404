"""Benchmark: which fixed intensity target to pre-train the bundled fusion weights towards.

A network trained under the fusion loss with a fixed weighting approaches that weighting's
intensity target. This script scores candidate targets themselves, computed directly from the
sources, on the real MSRS and LLVIP example pairs of ``../shared/data`` with the paper's six
metrics, next to the output of the authors' ReFusion IVIF network on the same pairs:

- ``max``: ``max(a, b)``, the target of ``FixedLossWeights("max_intensity")``;
- ``mean``: ``(a + b) / 2``, the target of ``FixedLossWeights("equal")``;
- ``saliency``: ``s_a a + s_b b`` with ``s`` proportional to ``|blur(x) - mean(x)|``;
- ``soft-max``: a logistic blend ``sigma((a - b) / 0.1)``;
- ``loss optimum``: the image that minimises the fusion loss itself with the max-intensity
  weighting at the bundled weights' ``alpha`` (0.1), found by optimising the pixels directly
  (Adam, from ``max(a, b)``). No network trained under that loss can do better than this image
  on the loss, so its scores show what the loss asks for, apart from what training reaches.

Run from the repository root::

    python benchmarks/fusion_targets.py [--data ../shared/data] [--optimum-steps 150]

Each row ends with the six metrics as ratios of ReFusion's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from tdfusion.data import read_luma_pair
from tdfusion.losses import learnable_fusion_loss
from tdfusion.metrics import evaluate
from tdfusion.nets import FixedLossWeights, ReFusionNet

METRICS = ("EN", "SF", "SCD", "VIF", "Qabf", "SSIM")


def targets(a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
    """The candidate fixed targets of one pair (values in [0, 1])."""

    def saliency(x: np.ndarray) -> np.ndarray:
        return np.abs(gaussian_filter(x, 3) - x.mean())

    s_a, s_b = saliency(a), saliency(b)
    w_sal = s_a / (s_a + s_b + 1e-6)
    w_soft = 1.0 / (1.0 + np.exp(-(a - b) / 0.1))
    return {
        "max": np.maximum(a, b),
        "mean": (a + b) / 2,
        "saliency": w_sal * a + (1 - w_sal) * b,
        "soft-max": w_soft * a + (1 - w_soft) * b,
    }


def loss_optimum(a: np.ndarray, b: np.ndarray, alpha: float, steps: int) -> np.ndarray:
    """The image minimising the max-intensity fusion loss at ``alpha`` (pixels optimised)."""
    ta, tb = torch.from_numpy(a)[None, None].float(), torch.from_numpy(b)[None, None].float()
    weights = FixedLossWeights("max_intensity")(ta, tb)
    image = torch.maximum(ta, tb).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([image], lr=0.02)
    for _ in range(steps):
        optimizer.zero_grad()
        learnable_fusion_loss(image, ta, tb, weights, alpha=alpha).backward()
        optimizer.step()
        with torch.no_grad():
            image.clamp_(0.0, 1.0)
    return image.detach()[0, 0].double().numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--alpha", type=float, default=0.1, help="alpha of the loss optimum")
    parser.add_argument(
        "--optimum-steps", type=int, default=150, help="Adam steps of the loss optimum (0: skip)"
    )
    args = parser.parse_args()
    network = ReFusionNet.from_pretrained(args.data / "weights" / "ReFusion" / "ReFusion_IVIF.pth")
    for dataset in ("MSRS", "LLVIP"):
        folder = args.data / dataset / "example"
        rows: dict[str, list[list[float]]] = {}
        for ir in sorted((folder / "ir").iterdir()):
            a, b, _, _ = read_luma_pair(ir, folder / "vi" / ir.name)
            a64, b64 = a.astype(np.float64), b.astype(np.float64)
            with torch.inference_mode():
                fused = network(torch.from_numpy(a)[None, None], torch.from_numpy(b)[None, None])
            candidates = {"ReFusion IVIF": fused[0, 0].double().numpy(), **targets(a64, b64)}
            if args.optimum_steps > 0:
                optimum = loss_optimum(a, b, args.alpha, args.optimum_steps)
                candidates["loss optimum"] = optimum
            for name, image in candidates.items():
                scores = evaluate(image * 255, a64 * 255, b64 * 255)
                rows.setdefault(name, []).append([scores[m] for m in METRICS])
        reference = np.mean(rows["ReFusion IVIF"], axis=0)
        print(f"\n{dataset} ({len(rows['max'])} pairs): means, then ratios to ReFusion IVIF")
        print(f"{'target':14s}" + "".join(f"{m:>8s}" for m in METRICS) + "   ratios")
        for name, values in rows.items():
            mean = np.mean(values, axis=0)
            ratios = " ".join(f"{r:.2f}" for r in mean / reference)
            print(f"{name:14s}" + "".join(f"{v:8.3f}" for v in mean) + f"   {ratios}")


if __name__ == "__main__":
    main()
