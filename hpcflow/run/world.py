"""The world of ranks of one hpcflow command: who decides, and how errors end a run.

* :func:`launched_size` / :func:`launched_rank`: what the launcher (``mpirun``, ``srun``)
  put into the environment, read without starting MPI.
* :func:`world_control`: the collective object of every rank of the command (a
  ``hpcflow.comm.LatticeComm`` over a one-dimensional process grid of all world ranks, or a
  ``SerialComm`` for one process): ``is_root``, ``rank``, ``size``, ``bcast_object``,
  ``allgather_object``, ``barrier``.
* :func:`agreed`: run a function on the root rank only (the rank that owns the run
  directory: lock, results check, ``--fresh``); its result, or the same exception, on every
  rank. :func:`agree_error`: like ``Comm.any_error``, but every rank raises an exception of
  the same class with the same message (so every rank exits with the same code).
* :func:`expected_error`: the exit code and one line of an expected error: an environment
  failure (exit 4, :func:`environment_failure`: no space, quota, read-only file system,
  permission denied on the run's output; :func:`environment_errors` converts them inside
  ``run``/``train``/``sample``, knowing which paths are the run's output) or bad input (2).
* :func:`settle_error`: how the CLI ends a command that failed under MPI: if every rank
  failed (the usual case: bad input is seen by all ranks, or agreed), rank 0 prints rank 0's
  message once and every rank returns rank 0's exit code; if some rank did not fail within
  ``timeout`` seconds (it waits in a collective for the failed one), the failed rank prints
  its own message with its rank and aborts the whole job with its exit code (no hang).

Only ``hpcflow.comm`` imports mpi4py; this module uses its objects.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

__all__ = ["agree_error", "agreed", "data_errors", "debug_requested", "environment_errors",
           "environment_failure", "error_line", "expected_error", "launched_rank", "launched_size",
           "prepare_errors", "run_guarded", "settle_error", "world_control"]

T = TypeVar("T")

# (launcher) environment variables giving the number of ranks / this rank, before MPI starts
_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS")
_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID")
SETTLE_TIMEOUT_S = 30.0  # HPCFLOW_SETTLE_S in the environment overrides it

_worlds: dict[str, Any] = {}


def _env_int(names: tuple[str, ...], default: int) -> int:
    for n in names:
        v = os.environ.get(n)
        if v is not None and v.strip().isdigit():
            return int(v)
    return default


def launched_size() -> int:
    """Number of ranks the launcher started (1 for a plain process), from the environment."""
    return max(1, _env_int(_SIZE_VARS, 1))


def launched_rank() -> int:
    """This process's rank as the launcher numbered it (0 for a plain process)."""
    return _env_int(_RANK_VARS, 0) if launched_size() > 1 else 0


def _world(name: str) -> Any:
    """A cached ``LatticeComm`` over all world ranks (a 1-D grid of ``size`` ranks); ``name``
    keeps separate communicators apart (run-directory decisions, error settling)."""
    if name not in _worlds:
        from hpcflow.comm import LatticeComm, ProcessGrid, world_size

        n = world_size()
        _worlds[name] = LatticeComm(ProcessGrid((n,), None)) if n > 1 else None
    return _worlds[name]


def world_control(use_mpi: bool | None = None) -> Any:
    """The collective object of all ranks of this command (see the module doc).

    ``use_mpi``: None = MPI when the launcher started several ranks; False = this process
    alone (``SerialComm``); True = MPI (one rank: ``SerialComm`` too). Collective under MPI:
    every rank calls it."""
    from hpcflow.lattice.geometry import SerialComm

    if use_mpi is None:
        use_mpi = launched_size() > 1
    if not use_mpi:
        return SerialComm()
    w = _world("control")
    return w if w is not None else SerialComm()


def _info(exc: BaseException) -> tuple[type, tuple, str]:
    args = tuple(exc.args)
    if isinstance(exc, OSError) and exc.errno is not None and exc.filename is not None:
        args = (exc.errno, exc.strerror, exc.filename)  # .args leaves the file name out
    return type(exc), args, str(exc)


def _rebuild(info: tuple[type, tuple, str]) -> BaseException:
    typ, args, msg = info
    try:
        exc = typ(*args)
        if str(exc) == msg:
            return exc
    except Exception:  # noqa: BLE001 - a class that cannot be rebuilt from its args
        pass
    return RuntimeError(msg)


def agreed(ctl: Any, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` on the root rank of ``ctl`` only; its result on every rank, or
    its exception (``Exception`` subclasses) raised on every rank."""
    res: Any = None
    exc: BaseException | None = None
    if ctl.is_root:
        try:
            res = fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - shared with every rank, then raised
            exc = e
    if ctl.size > 1:
        try:
            payload = ctl.bcast_object((res, None if exc is None else _info(exc)))
        except Exception:  # noqa: BLE001 - an unpicklable result or exception class
            payload = ctl.bcast_object((None, (RuntimeError, (str(exc),), str(exc))))
        if not ctl.is_root:
            res, info = payload
            if info is not None:
                exc = _rebuild(info)
    if exc is not None:
        raise exc
    return res


def agree_error(ctl: Any, exc: BaseException | None) -> None:
    """Collective: if a rank passes an exception, every rank raises one of the same class and
    message (the lowest failing rank's); a rank's own exception is raised as it is."""
    if ctl.size == 1:
        if exc is not None:
            raise exc
        return
    infos = ctl.allgather_object(None if exc is None else _info(exc))
    first = next((i for i in infos if i is not None), None)
    if first is None:
        return
    raise exc if exc is not None else _rebuild(first)


def settle_error(code: int, text: str, timeout: float | None = None) -> int:
    """End a failed command under MPI (see the module doc); returns the exit code every rank
    uses, or does not return (the job is aborted). ``text``: the message (may be several
    lines, e.g. a traceback) that rank 0 prints once. ``timeout``: how long to wait for the
    other ranks (default ``HPCFLOW_SETTLE_S`` or 30 s)."""
    if timeout is None:
        try:
            timeout = float(os.environ.get("HPCFLOW_SETTLE_S", SETTLE_TIMEOUT_S))
        except ValueError:
            timeout = SETTLE_TIMEOUT_S
    w = _worlds.get("errors")  # made by prepare_errors() on every rank, or absent
    if w is None:
        rank = launched_rank()
        print(text if rank == 0 else f"hpcflow: [rank {rank}] " + text.removeprefix("hpcflow: "),
              file=sys.stderr, flush=True)
        return code
    req = w.comm.Ibarrier()
    t0 = time.monotonic()
    while not req.Test():
        if time.monotonic() - t0 > timeout:
            # another rank did not fail: it waits in a collective for this one, forever
            print(f"hpcflow: [rank {w.rank}] " + text.removeprefix("hpcflow: "), file=sys.stderr,
                  flush=True)
            w.comm.Abort(code)
        time.sleep(0.005)
    infos = w.allgather_object((code, text))
    code0, text0 = infos[0]
    if w.is_root:
        print(text0, file=sys.stderr, flush=True)
    return int(code0)


def prepare_errors() -> None:
    """Create the error-settling communicator now (collective; every rank of the command,
    before anything can fail), so that :func:`settle_error` never needs a collective of the
    ranks that did not fail."""
    if launched_size() > 1:
        _world("errors")


def data_errors() -> tuple[type[BaseException], ...]:
    """Errors about bad files (ensembles, checkpoints, ILDG) and unusable run directories
    (locked, holding results): reported in one line, exit 2."""
    from hpcflow.io import CheckpointError, EnsembleError, ILDGError
    from hpcflow.io.lime import LimeError
    from hpcflow.io.lock import RunDirError

    return (CheckpointError, EnsembleError, ILDGError, LimeError, RunDirError)


def _under(path: str, dirs: tuple[str, ...]) -> bool:
    p = os.path.abspath(path)
    return any(p == d or p.startswith(d.rstrip(os.sep) + os.sep) for d in map(os.path.abspath, dirs))


_H5_NAME = re.compile(r"\b(?:file)?name = '([^']+)'")


def _error_path(e: BaseException) -> str | None:
    """The file an error (or what it was raised from or while handling) is about, if it says."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.filename is not None:
            return os.fsdecode(cur.filename)
        m = _H5_NAME.search(str(cur))  # h5py: "... (file write failed: ..., filename = '...', ...)"
        if m is not None:
            return m.group(1)
        cur = cur.__cause__ or cur.__context__
    return None


def environment_failure(e: BaseException, dirs: tuple[str, ...] = (), path: str | None = None) -> Any:
    """``e`` as a :class:`hpcflow.exit_codes.EnvironmentFailure` (exit 4) with a one-line
    message naming the path, or None when ``e`` is something else. ENOSPC, EDQUOT and EROFS
    count wherever they come from; permission denied (EACCES/EPERM) only on a path inside
    one of ``dirs`` (the run's output: ``output.dir``, the ensemble), since a file the user
    gave and cannot read is bad input (exit 2). ``path``: the file being written, named when
    the error itself names none (``write(2)`` errors), else the first of ``dirs``."""
    from hpcflow.exit_codes import EnvironmentFailure, environment_errno

    if isinstance(e, EnvironmentFailure):
        return e
    num = environment_errno(e)
    named = _error_path(e)
    path = named or path
    if num is None and dirs:
        num = environment_errno(e, access=True)
        if num is not None and not (path is not None and _under(path, dirs)):
            num = None
    if num is None:
        return None
    if type(e).__module__.split(".")[0] == "hpcflow":
        text = str(e)  # hpcflow's own errors (lock, ensemble, checkpoint) name the path
    else:  # a system call's error, or h5py's/MPI-IO's long message with the errno inside
        where = path or (dirs[0] if dirs else None)
        text = f"{where}: {os.strerror(num)}" if where else os.strerror(num)
    return EnvironmentFailure(num, text)


@contextlib.contextmanager
def environment_errors(*dirs: str) -> Iterator[None]:
    """Turn environment failures of the body into :class:`~hpcflow.exit_codes.EnvironmentFailure`
    (:func:`environment_failure`; ``dirs``: the run's output, where permission denied counts)."""
    try:
        yield
    except Exception as e:
        f = environment_failure(e, tuple(d for d in dirs if d))
        if f is None or f is e:
            raise
        raise f from e


def expected_error(e: BaseException) -> tuple[int, str] | None:
    """``(exit code, one line)`` of an expected error: an environment failure (exit 4,
    :func:`environment_failure`), bad input or an unusable file (exit 2); None for anything
    else (a bug: traceback, exit 1)."""
    from hpcflow.config import ConfigError
    from hpcflow.exit_codes import EXIT_BAD_INPUT, EXIT_ENVIRONMENT

    env = environment_failure(e)
    if env is not None:
        return EXIT_ENVIRONMENT, f"hpcflow: {env}"
    if isinstance(e, ConfigError):
        return EXIT_BAD_INPUT, f"hpcflow: config error: {e}"
    if isinstance(e, data_errors()):
        return EXIT_BAD_INPUT, f"hpcflow: {e}"
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        line = f"hpcflow: {e.filename}: {e.strerror}" if e.filename else f"hpcflow: {e}"
        return EXIT_BAD_INPUT, line
    return None


def error_line(e: BaseException) -> str | None:
    """The one-line message of an expected error (:func:`expected_error`), or None."""
    got = expected_error(e)
    return None if got is None else got[1]


def debug_requested() -> bool:
    """``HPCFLOW_DEBUG`` set to anything but empty/0/no/false/off."""
    return os.environ.get("HPCFLOW_DEBUG", "").strip().lower() not in ("", "0", "no", "false", "off")


def run_guarded(call: Callable[[], int], mpi: bool = False, debug: bool | None = None) -> int:
    """``call()`` with the error contract of the CLI: an expected error (:func:`expected_error`)
    is one line on stderr and exit 2 (bad input) or 4 (environment); anything else a traceback
    (exit 1 under MPI; raised otherwise). ``debug`` (default: ``HPCFLOW_DEBUG``): print the
    traceback of expected errors too, before their line. ``mpi``: the command may run on
    several ranks; when the launcher started several, errors are settled
    (:func:`settle_error`): printed once, same code everywhere."""
    import traceback

    from hpcflow.exit_codes import EXIT_INTERNAL, EXIT_OK

    if debug is None:
        debug = debug_requested()
    mpi = mpi and launched_size() > 1
    if mpi:
        prepare_errors()  # collective, before anything can fail on some ranks only
    try:
        return call()
    except BrokenPipeError:  # output piped into head & co.
        return EXIT_OK
    except KeyboardInterrupt:
        print("hpcflow: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - expected errors: one line; others: traceback
        got = expected_error(e)
        if not mpi:
            if got is None:
                _exit_if_hdf5_unclosed(EXIT_INTERNAL, traceback.format_exc())
                raise
            if debug:
                traceback.print_exc(file=sys.stderr)
            print(got[1], file=sys.stderr, flush=True)
            return _exit_if_hdf5_unclosed(got[0])
        if got is None:
            return _exit_if_hdf5_unclosed(settle_error(EXIT_INTERNAL, traceback.format_exc().rstrip()))
        code, line = got
        return _exit_if_hdf5_unclosed(settle_error(code, traceback.format_exc() + line if debug else line))


def _exit_if_hdf5_unclosed(code: int, text: str = "") -> int:
    """``code``, or the end of the process with ``code`` (``os._exit``, after printing
    ``text``) when HDF5 could not close a discarded segment: HDF5 1.10 would crash at
    interpreter exit (``hpcflow.io.ensemble.unclosed_segments``)."""
    ens = sys.modules.get("hpcflow.io.ensemble")
    if ens is None or not ens.unclosed_segments():
        return code
    if text:
        print(text, end="", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
