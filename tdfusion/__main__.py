"""``python -m tdfusion`` runs the command line."""

import sys

from tdfusion.cli import main

sys.exit(main())
