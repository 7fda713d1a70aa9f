"""Exit codes of every hpcflow command (one place: the CLI, the drivers and the job scripts
agree on them; docs/DESIGN.md, "Exit status").

* ``EXIT_OK = 0``: done (``ensemble verify``: no problem found).
* ``EXIT_FAILED = 1``: ``hpcflow ensemble verify`` found problems (one line each on stdout),
  or an internal error (a bug; the traceback is printed, under MPI once by rank 0).
* ``EXIT_BAD_INPUT = 2``: bad input (config, argument, file), or an ``output.dir`` that cannot
  be used as asked (locked by another hpcflow process, holding results without
  ``--resume``/``--fresh``, nothing to resume); one line on stderr says which.
* ``EXIT_RESUMABLE = 3``: stopped by a signal (SIGTERM, SIGUSR1, SIGINT; or a time limit)
  with a checkpoint written; rerunning the same command (``--resume`` for ``run``/``train``)
  continues.

Under MPI every rank exits with the same code, and an error line is printed once (rank 0).
"""

from __future__ import annotations

__all__ = ["EXIT_BAD_INPUT", "EXIT_FAILED", "EXIT_INTERNAL", "EXIT_OK", "EXIT_RESUMABLE"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INTERNAL = EXIT_FAILED  # an unexpected error (traceback)
EXIT_BAD_INPUT = 2
EXIT_RESUMABLE = 3
