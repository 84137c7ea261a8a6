"""``python -m pygen``: the ``pygen`` command line (see :mod:`pygen.cli`)."""

import sys

from pygen.cli import main

if __name__ == "__main__":
    sys.exit(main())
