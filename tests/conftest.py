"""Settings of the whole test suite.

``HPCFLOW_PLOTS=off``: no end-of-run plots in the hundreds of short runs of the suite (matplotlib's
import and the drawing cost 2-6 s per run); the tests of those plots turn them back on
(``tests/unit/test_plots.py``). Set before any test runs, so subprocesses and MPI ranks inherit it.
"""

import os

os.environ.setdefault("HPCFLOW_PLOTS", "off")
