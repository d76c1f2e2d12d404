"""TDFusion on MSRS with SegFormer-b0 segmentation, the paper's protocol.

    python examples/msrs_segmentation.py --data-root /data/MSRS --out runs/msrs
    python examples/msrs_segmentation.py --smoke --out /tmp/msrs-smoke   # a tiny end-to-end run

Every setting of the recipe (epochs, meta steps, learning rates, sizes, ...) can be overridden
on the command line (``--help``); rerunning with the same ``--out`` resumes from its checkpoint.
The recipe itself lives in :mod:`tdfusion.recipes` (``RECIPES["msrs-segmentation"]``).
"""

import sys

from tdfusion.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "--recipe", "msrs-segmentation", *sys.argv[1:]]))
