"""Benchmark: the whole ``tdfusion demo`` (both arms, every fold), its wall time and image quality.

Runs :func:`tdfusion.demo.run_demo` with its default settings into a temporary folder and
reports the wall time of everything (both arms, training, scoring, pictures) and, per arm, the
mean VIF and Qabf of the held-out fused sample pairs, against the demo's targets: under five
minutes on two CPU cores, VIF >= 0.40 and Qabf >= 0.45 in every arm. ``--init-weights`` starts
from another checkpoint than the bundled one (e.g. the authors' ``ReFusion_IVIF.pth``).
Run from the repository root::

    python benchmarks/demo.py [--init-weights PATH] [--threads 2] [--keep OUT]

The last line prints the wall time and the per-arm quality this benchmark claims.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tdfusion.demo import DemoSettings, run_demo  # noqa: E402

TARGETS = {"minutes": 5.0, "VIF": 0.40, "Qabf": 0.45}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init-weights", help="fusion weights (default: the bundled ones)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--keep", type=Path, help="write the demo's outputs here and keep them")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = DemoSettings()
    if args.init_weights:
        settings = settings.replace(init_weights=args.init_weights)
    with tempfile.TemporaryDirectory() as temporary:
        out = args.keep or Path(temporary)
        started = time.perf_counter()
        result = run_demo(out, settings, device="cpu", progress=False)
        minutes = (time.perf_counter() - started) / 60
    print(result["text"])
    arms = result["summary"]["arms"]
    quality = "; ".join(
        f"{arm}: VIF {arms[arm]['VIF']['mean']:.3f}, Qabf {arms[arm]['Qabf']['mean']:.3f}"
        for arm in arms
    )
    met = minutes < TARGETS["minutes"] and all(
        arms[arm][key]["mean"] >= TARGETS[key] for arm in arms for key in ("VIF", "Qabf")
    )
    print(
        f"demo: {minutes:.2f} min with {args.threads} thread(s); {quality}; "
        f"targets (< {TARGETS['minutes']:g} min, VIF >= {TARGETS['VIF']}, "
        f"Qabf >= {TARGETS['Qabf']}) {'met' if met else 'NOT met'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
