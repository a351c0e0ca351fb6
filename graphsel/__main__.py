"""``python -m graphsel``: the graphsel command line (see :mod:`graphsel.tools.cli`)."""
import sys

from graphsel.tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
