"""``python -m tdfusion``: the command-line interface (and ``torchrun -m tdfusion train ...``)."""

import sys

from tdfusion.cli import main

if __name__ == "__main__":
    sys.exit(main())
