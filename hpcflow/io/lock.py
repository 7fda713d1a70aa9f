"""One writer per run directory: an advisory lock on ``<output.dir>/.hpcflow.lock``.

``hpcflow run``, ``train`` and ``sample`` (and so every campaign stage) take
:class:`DirLock` on their ``output.dir`` before they read or write anything there, and hold
it until they end. The lock is a POSIX record lock (``fcntl``, ``F_SETLK`` on the whole file
through :func:`fcntl.lockf`): advisory, non-blocking, and dropped by the kernel (or the NFS
/ Lustre lock manager) when the holding process dies, so a SIGKILLed or crashed run never
blocks its own resume. The file holds one JSON line naming the holder (host, pid, start
time, command); a second process is refused with :class:`DirectoryLocked`, whose one-line
message names that holder. The file is never deleted (deleting a lock file races with the
next opener); its content is cleared when the holder releases the lock.

POSIX record locks belong to a *process*: a second lock on the same file from the same
process would succeed silently, and closing *any* descriptor of the file releases them. So
this module keeps a registry of the lock files this process holds (by device and inode),
refuses a second :class:`DirLock` on a held directory before opening the file, and never
opens a held lock file again.

File systems (docs/DESIGN.md, "One writer per run directory"): local file systems, NFSv3
(NLM) and NFSv4 (locks are part of the protocol; not with the ``nolock`` or
``local_lock=posix``/``all`` mount options, where locks are local to one client), Lustre
mounted with ``flock`` (cluster-wide; ``localflock`` is node-local only), GPFS/Spectrum
Scale and BeeGFS with global locks enabled. Where the file system refuses locks (``ENOLCK``,
``ENOSYS``, ``EOPNOTSUPP``: e.g. Lustre with ``noflock``) :class:`LockUnavailable` stops
the run with one line; ``HPCFLOW_LOCK=off`` in the environment runs without the lock (one
warning line) for file systems that cannot lock, and then one writer per directory is the
user's job.

:func:`move_aside` renames earlier results into ``<dir>/previous-<UTC time>/`` (``--fresh``).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import stat
import sys
import time
from collections.abc import Sequence
from typing import Any

__all__ = [
    "LOCK_ENV",
    "LOCK_NAME",
    "DirLock",
    "DirectoryLocked",
    "LockUnavailable",
    "RunDirError",
    "holder_of",
    "move_aside",
]

LOCK_NAME = ".hpcflow.lock"
LOCK_ENV = "HPCFLOW_LOCK"  # "off": run without the lock (file systems that cannot lock)
_MAX_FIELD = 160  # error messages never print unbounded values
_UNSUPPORTED = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}
_CONFLICT = {errno.EACCES, errno.EAGAIN}

# lock files held by this process: (st_dev, st_ino) -> the DirLock holding it
_HELD: dict[tuple[int, int], DirLock] = {}
# descriptors that must stay open (closing one would drop this process's lock; see _open)
_PINNED: list[int] = []


class RunDirError(Exception):
    """The run directory cannot be used as asked; ``str()`` is the one-line message (exit 2)."""


class DirectoryLocked(RunDirError):
    """Another process holds the directory's lock; ``holder`` is its record (or None)."""

    def __init__(self, message: str, holder: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.holder = holder


class LockUnavailable(RunDirError):
    """The file system refuses locks (or the lock file cannot be opened)."""


def _short(v: Any) -> str:
    s = str(v).replace("\n", " ").replace("\r", " ")
    return s if len(s) <= _MAX_FIELD else s[: _MAX_FIELD - 3] + "..."


def _record(command: str | None) -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": command if command is not None else " ".join(sys.argv)}


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        rec = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return rec if isinstance(rec, dict) and "pid" in rec else None


def holder_of(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The record in a directory's lock file (its holder while held), or None. A lock file
    that this process holds is answered from memory, never opened again (see the module doc)."""
    path = os.path.join(os.fspath(directory), LOCK_NAME)
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    if (st.st_dev, st.st_ino) in _HELD:
        return _HELD[(st.st_dev, st.st_ino)].record
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return _parse(os.pread(fd, 4096, 0))
    finally:
        os.close(fd)


def _describe(rec: dict[str, Any] | None) -> str:
    if rec is None:
        return "holder not known (lock file still being written, or written by an older hpcflow)"
    return (f"host {_short(rec.get('host'))}, pid {_short(rec.get('pid'))}, started "
            f"{_short(rec.get('started'))}: {_short(rec.get('command'))}")


class DirLock:
    """``with DirLock(directory, command):`` holds the directory's lock (see the module doc).

    ``acquire()`` creates the directory if needed, then takes the lock without waiting; it
    raises :class:`DirectoryLocked` (held by another process, or by this one) or
    :class:`LockUnavailable` (the file system cannot lock; the lock file is not a regular
    file or cannot be opened). ``release()`` clears the record and drops the lock.
    """

    def __init__(self, directory: str | os.PathLike, command: str | None = None) -> None:
        self.dir = os.fspath(directory)
        self.path = os.path.join(self.dir, LOCK_NAME)
        self.command = command
        self.record: dict[str, Any] | None = None
        self.disabled = False
        self._fd: int | None = None
        self._key: tuple[int, int] | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _refuse(self, rec: dict[str, Any] | None) -> DirectoryLocked:
        return DirectoryLocked(
            f"{self.dir}: in use by another hpcflow process ({_describe(rec)}); one writer per "
            f"output.dir: wait for it to end or stop it (its lock {LOCK_NAME} is released when it "
            "exits), or choose another output.dir", rec)

    def acquire(self) -> None:
        if self._fd is not None:
            raise RuntimeError(f"{self.path}: already acquired by this DirLock")
        if os.environ.get(LOCK_ENV, "").strip().lower() in ("off", "0", "no", "false"):
            self.disabled = True
            print(f"hpcflow: warning: {LOCK_ENV}=off: no lock on {self.dir}; make sure no other "
                  "hpcflow process writes there", file=sys.stderr)
            return
        try:
            os.makedirs(self.dir, exist_ok=True)
        except OSError as e:
            raise LockUnavailable(f"{self.dir}: cannot create the output directory "
                                  f"({e.strerror or type(e).__name__})") from None
        if not os.path.isdir(self.dir):
            raise LockUnavailable(f"{self.dir}: not a directory; output.dir must be a directory")
        try:  # held by this process already? (before opening: see the module doc)
            st = os.stat(self.path, follow_symlinks=False)
            if (st.st_dev, st.st_ino) in _HELD:
                raise self._refuse(_HELD[(st.st_dev, st.st_ino)].record)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise LockUnavailable(f"{self.path}: cannot read the lock file ({e.strerror})") from None
        fd = self._open()
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in _CONFLICT:
                rec = None
                for _ in range(40):  # the holder writes its record right after locking
                    rec = _parse(os.pread(fd, 4096, 0))
                    if rec is not None:
                        break
                    time.sleep(0.025)
                os.close(fd)
                raise self._refuse(rec) from None
            os.close(fd)
            if e.errno in _UNSUPPORTED:
                raise LockUnavailable(
                    f"{self.path}: the file system does not support locks ({e.strerror}); on Lustre "
                    f"mount with -o flock, on NFS without nolock; or set {LOCK_ENV}=off to run without "
                    "the lock (then make sure only one hpcflow process writes to this output.dir)"
                ) from None
            raise LockUnavailable(f"{self.path}: cannot lock ({e.strerror})") from None
        self.record = _record(self.command)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(self.record) + "\n").encode("utf-8"), 0)
        except OSError as e:
            fcntl.lockf(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise LockUnavailable(f"{self.path}: cannot write the lock file ({e.strerror})") from None
        self._fd = fd
        _HELD[self._key] = self  # type: ignore[index]

    def _open(self) -> int:
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise LockUnavailable(f"{self.path}: is a symbolic link; remove it (the lock file must "
                                      "be a regular file)") from None
            raise LockUnavailable(f"{self.path}: cannot open the lock file ({e.strerror})") from None
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        if key in _HELD:
            # replaced between the stat and the open by a file this process holds: closing this
            # descriptor would drop that lock, so keep it open
            _PINNED.append(fd)
            raise self._refuse(_HELD[key].record)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise LockUnavailable(f"{self.path}: not a regular file; remove it")
        self._key = key
        return fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        _HELD.pop(self._key, None)  # type: ignore[arg-type]
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        try:
            fcntl.lockf(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> DirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def move_aside(directory: str | os.PathLike, names: Sequence[str], prefix: str = "previous") -> tuple[str, list[str]]:
    """Rename the existing ``names`` (paths relative to ``directory``, in the given order) into
    a new ``<directory>/<prefix>-<UTC yyyymmddThhmmssZ>[-k]/`` with the same relative paths;
    returns ``(that folder, the names moved)`` (``("", [])`` when none exists).

    Each move is one ``rename`` in the same file system (atomic); the folder is created
    exclusively, so two moves never mix. A crash between two renames leaves the rest in
    place (and a rerun moves them); list dependants before what they depend on (ensembles
    before the model they were sampled with) so that what stays is always consistent.
    """
    d = os.fspath(directory)
    present = [n for n in names if os.path.lexists(os.path.join(d, n))]
    if not present:
        return "", []
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest = os.path.join(d, f"{prefix}-{stamp}")
    k = 0
    while True:
        try:
            os.mkdir(dest)
            break
        except FileExistsError:
            k += 1
            dest = os.path.join(d, f"{prefix}-{stamp}-{k}")
    touched = {d, dest}
    for n in present:
        src, dst = os.path.join(d, n), os.path.join(dest, n)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.rename(src, dst)
        touched.update((os.path.dirname(src), os.path.dirname(dst)))
    for p in sorted(touched):
        _fsync_dir(p)
    return dest, present
