"""``python -m chronoedit``: the command line (so ``torchrun -m chronoedit ...`` works too)."""

import sys

from .cli import main

sys.exit(main())
