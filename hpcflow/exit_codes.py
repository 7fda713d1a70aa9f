"""Exit codes of every hpcflow command (one place: the CLI, the drivers and the job scripts
agree on them).

* ``EXIT_OK = 0``: done.
* ``EXIT_BAD_INPUT = 2``: bad input (config, argument, file); one line on stderr says which.
* ``EXIT_RESUMABLE = 3``: stopped by a signal (or a time limit) with a checkpoint written;
  rerunning the same command (``--resume`` for ``run``/``train``) continues.
"""

from __future__ import annotations

__all__ = ["EXIT_BAD_INPUT", "EXIT_OK", "EXIT_RESUMABLE"]

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_RESUMABLE = 3
