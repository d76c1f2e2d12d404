"""TDFusion on M3FD with YOLOv8-n detection, the paper's protocol.

    python examples/m3fd_detection.py --data-root /data/M3FD --out runs/m3fd
    python examples/m3fd_detection.py --smoke --out /tmp/m3fd-smoke   # a tiny end-to-end run

Every setting of the recipe can be overridden on the command line (``--help``); rerunning with
the same ``--out`` resumes from its checkpoint. The recipe itself lives in
:mod:`tdfusion.recipes` (``RECIPES["m3fd-detection"]``).
"""

import sys

from tdfusion.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "--recipe", "m3fd-detection", *sys.argv[1:]]))
