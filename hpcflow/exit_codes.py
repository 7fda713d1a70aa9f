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
  continues. The job templates requeue on 3, and only on 3.
* ``EXIT_ENVIRONMENT = 4``: the machine, not the input, stopped the run: no space left on
  the file system (``ENOSPC``), disk quota exceeded (``EDQUOT``), a read-only file system
  (``EROFS``), or permission denied (``EACCES``/``EPERM``) on a file the run must write (in
  ``output.dir`` or the ensemble). One line on stderr names the path and what to do (free
  space, make it writable, then rerun with ``--resume``). What was committed is kept, the
  uncommitted temporary segment is removed (or removed by the resume), HDF5 files are
  closed. Not requeued by the job templates: a requeued job would meet the same full disk.

Under MPI every rank exits with the same code, and an error line is printed once (rank 0).
``--debug`` (or ``HPCFLOW_DEBUG=1``) adds the traceback of expected errors (2 and 4).

:class:`EnvironmentFailure` is the exception of exit 4 (an ``OSError``: code that handles
``OSError`` keeps working); :func:`environment_errno` recognises the others: an ``OSError``
with one of those errnos, h5py's and MPI-IO's wrappers of them (``RuntimeError``/``OSError``
whose message carries ``errno = 28`` or ``No space left on device`` and no errno attribute),
and an error raised while handling one (``raise ... from None`` keeps ``__context__``).
"""

from __future__ import annotations

import errno as _errno
import os
import re

__all__ = ["ENVIRONMENT_ERRNOS", "EXIT_BAD_INPUT", "EXIT_ENVIRONMENT", "EXIT_FAILED", "EXIT_INTERNAL",
           "EXIT_OK", "EXIT_RESUMABLE", "EnvironmentFailure", "environment_advice", "environment_errno"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INTERNAL = EXIT_FAILED  # an unexpected error (traceback)
EXIT_BAD_INPUT = 2
EXIT_RESUMABLE = 3
EXIT_ENVIRONMENT = 4

# errnos that only a write can raise: environment failures wherever they come from
ENVIRONMENT_ERRNOS = (_errno.ENOSPC, _errno.EDQUOT, _errno.EROFS)
# permission denied: an environment failure on the run's own output only (a config file the
# user cannot read is bad input)
_ACCESS_ERRNOS = (_errno.EACCES, _errno.EPERM)

# how MPI-IO implementations name them (MPI_ERR_* classes in ROMIO/OMPIO messages)
_MPI_NAMES = {"MPI_ERR_NO_SPACE": _errno.ENOSPC, "MPI_ERR_QUOTA": _errno.EDQUOT,
              "MPI_ERR_READ_ONLY": _errno.EROFS, "MPI_ERR_ACCESS": _errno.EACCES}
_ERRNO_IN_TEXT = re.compile(r"errno\s*=\s*(\d+)")

_ADVICE = {
    _errno.ENOSPC: "no space left on that file system: free space there (or move output.dir), then "
                   "rerun with --resume; what was committed is kept",
    _errno.EDQUOT: "disk quota exceeded: free space or raise the quota (or move output.dir), then rerun "
                   "with --resume; what was committed is kept",
    _errno.EROFS: "the file system is read-only: remount it writable or choose a writable output.dir, "
                  "then rerun (with --resume to keep what was committed)",
    _errno.EACCES: "permission denied: make it writable for this user or choose another output.dir, "
                   "then rerun (with --resume to keep what was committed)",
}
_ADVICE[_errno.EPERM] = _ADVICE[_errno.EACCES]


def environment_advice(num: int | None) -> str:
    """What to do about an environment failure of errno ``num`` (one clause)."""
    return _ADVICE.get(num or 0, "fix the file system, then rerun with --resume")


class EnvironmentFailure(OSError):
    """The file system refused a write of the run (exit 4): ``EnvironmentFailure(errno,
    "PATH: what happened")``. ``str()`` is the line to print: the message and what to do."""

    def __init__(self, num: int | None, message: str) -> None:
        super().__init__(num, message)

    def __str__(self) -> str:
        return f"{self.strerror}; {environment_advice(self.errno)}"


def _errno_of(e: BaseException, access: bool) -> int | None:
    nums = ENVIRONMENT_ERRNOS + (_ACCESS_ERRNOS if access else ())
    if isinstance(e, EnvironmentFailure):
        return e.errno
    if isinstance(e, OSError) and e.errno is not None:
        return e.errno if e.errno in nums else None
    if not isinstance(e, (OSError, RuntimeError)):  # h5py wraps HDF5 errors in these two only
        return None
    text = str(e)
    m = _ERRNO_IN_TEXT.search(text)  # HDF5: "... errno = 28, error message = '...'"
    if m is not None and int(m.group(1)) in nums:
        return int(m.group(1))
    for num in nums:
        if os.strerror(num) in text:
            return num
    for name, num in _MPI_NAMES.items():
        if name in text and num in nums:
            return num
    return None


def environment_errno(e: BaseException, access: bool = False) -> int | None:
    """The errno that makes ``e`` an environment failure (exit 4), or None.

    ``e`` itself, or an exception it was raised from or while handling (``__cause__``,
    ``__context__``): an :class:`EnvironmentFailure`; an ``OSError`` with errno ENOSPC, EDQUOT
    or EROFS; h5py's/MPI-IO's wrappers that carry one only in their message; with ``access``
    (the caller knows the path is the run's output) also EACCES/EPERM."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen and len(seen) < 16:
        seen.add(id(cur))
        num = _errno_of(cur, access)
        if num is not None:
            return num
        cur = cur.__cause__ or cur.__context__
    return None
