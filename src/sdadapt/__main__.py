"""``python -m sdadapt``: see :mod:`sdadapt.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
