"""``python -m hpcflow``: the ``hpcflow`` command line (where the console script is missing)."""

import sys

from hpcflow.run.cli import main

sys.exit(main())
