"""``python -m hpcflow``: the ``hpcflow`` command line (where the console script is missing)."""

import sys

from hpcflow.run.cli import main

if __name__ == "__main__":
    sys.exit(main())
