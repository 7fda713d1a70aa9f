"""Parallel HDF5 ensembles: committed segment files, readable while they are written.

Layout of an ensemble directory (one per run, ``<output.dir>/ensemble``)::

    chain000/seg000000.h5        committed segment: rows in chain-step order
    chain000/seg000001.h5
    chain000/.seg000002.h5.tmp   segment being written (ignored by readers)
    chain001/...

Each worker group (one Markov chain) writes its own segments. A segment is an HDF5 file
opened with h5py's ``mpio`` driver on the group's communicator when the group has several
ranks: every rank writes the hyperslab of its interior sites of each configuration
(collective I/O) into the contiguous dataset ``U[row, mu, x_0.., x_{Nd-1}, i, j]``.
Per row: ``chain, step, accepted, multiplicity, S, log_q, log_w, plaquette, checksum``
(``checksum`` = SciDAC ``suma << 32 | sumb`` of the configuration's big-endian bytes, one
site = its Nd links, site rank x_0 fastest: decomposition-independent).
Extra row columns (``SegmentWriter(columns=...)``: ``hpcflow sample`` stores ``kind`` and the
per-configuration observables of :mod:`hpcflow.run.measurements`, vectors included) are
datasets of shape ``(rows, *shape)`` listed, in order, in the segment attribute
``row_columns``; the digests cover them. A segment without that attribute (written before
extra columns existed) has the :data:`ROW_FIELDS` only and verifies as it always did;
:meth:`Ensemble.records` fills its missing columns with NaN.

Commit and streaming (design choice): HDF5 1.10's SWMR does not work with the ``mpio``
driver, and a file killed in the middle of a write may not open again. So a segment is
written under a temporary name, then flushed (``MPI_File_sync``), closed, fsynced and
renamed to ``segNNNNNN.h5``: the rename is the commit. Readers (``hpcflow.io.open_ensemble``)
list committed segments only, so an analysis job may read the ensemble at any time and
sees every committed configuration; every committed file opens, because it was complete
before it got its name. Temporary segments left by a crash are deleted on resume. The
temporary file is created exclusively (``O_CREAT | O_EXCL``: an existing name, a symlink
included, is an error, never followed), and only a regular file is renamed into place.

Verified reads (segment format 2). At commit a segment gets three more things:

* ``config_fingerprint`` (attribute): the hash of the configuration that produced it (the
  chain checkpoint's fingerprint), so a segment copied in from another run is recognised;
* ``row_digest`` (dataset, one uint64 per row): a keyed 8-byte BLAKE2b of the row's columns
  (all of :data:`ROW_FIELDS`, the per-configuration checksum included, then the extra
  columns of ``row_columns``) and its row number;
* ``digest`` (attribute): ``sha256:`` over a header (chain, segment, row count, fingerprint,
  ``U`` shape and type) and every row column.

Every reader checks them: the segment digest (and the row digests, to name the row) before
it uses a row, and the SciDAC checksum of every configuration it returns. Summaries of
whole chains (:meth:`Ensemble.records`, hence ``hpcflow measure`` and ``ensemble info``)
check every configuration of the segments they summarise, once per :class:`Ensemble`
object (``verify="rows"`` skips the configurations that are not returned). A mismatch is
an :class:`EnsembleError` naming the segment and the row. :func:`verify_ensemble` checks a
whole ensemble and lists every problem; :func:`check_tail` is the check a resume makes
before it appends. Segments written before format 2 (no digest) are read with one
:class:`UnverifiedSegmentWarning` (their configurations are still checked against the
stored checksums); ``verify_ensemble`` lists them, and ``check_tail`` accepts them with
the same warning (the chain checkpoint's fingerprint is what ties them to the run).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import os
import re
import stat
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from hpcflow.exit_codes import EnvironmentFailure, environment_errno
from hpcflow.io.checkpoint import fsync_dir
from hpcflow.io.lime import scidac_checksum, xor_combine
from hpcflow.lattice.geometry import Comm

__all__ = [
    "ROW_FIELDS",
    "ExtraColumn",
    "SEGMENT_FORMAT",
    "Ensemble",
    "EnsembleError",
    "EnsembleIndexError",
    "SegmentWriter",
    "UnverifiedSegmentWarning",
    "array_checksum",
    "check_tail",
    "committed_segments",
    "ensemble_info",
    "export_ildg",
    "extra_columns",
    "field_checksum",
    "open_ensemble",
    "remove_uncommitted",
    "segment_path",
    "unclosed_segments",
    "verify_ensemble",
]

ROW_FIELDS: dict[str, Any] = {
    "chain": np.int32,
    "step": np.int64,
    "accepted": np.int8,
    "multiplicity": np.int32,
    "S": np.float64,
    "log_q": np.float64,
    "log_w": np.float64,
    "plaquette": np.float64,
    "checksum": np.uint64,
}
SEGMENT_FORMAT = 2  # 2: digest, row_digest and config_fingerprint; 1 (no attribute): none
_SEG_RE = re.compile(r"^seg(\d{6})\.h5$")
_ANY_SEG_RE = re.compile(r"^seg(\d+)\.h5$")
# the packed little-endian row record that the digests hash
_ROW_DTYPE = np.dtype([(k, np.dtype(dt).newbyteorder("<")) for k, dt in ROW_FIELDS.items()])
_DIGEST_TAG = b"hpcflow-segment-digest-v1\0"
_ROW_KEY = b"hpcflow-row-digest-v1"
# the attributes that say which physics a segment holds: equal in every segment of an ensemble
_IDENTITY_ATTRS = ("group", "lattice", "action", "beta", "algorithm", "precision", "seed")
_MSG_MAX = 240  # error messages quote foreign text (h5py errors) at most this long


class EnsembleError(ValueError):
    """A missing, unreadable or inconsistent ensemble file (message names the file)."""


class EnsembleIndexError(EnsembleError, IndexError):
    """A configuration index outside the committed range of a chain."""


class UnverifiedSegmentWarning(UserWarning):
    """Segments without a digest (written before segment format 2): rows cannot be verified."""


def _short(e: BaseException) -> str:
    """A foreign exception as one bounded line."""
    s = " ".join(str(e).split()) or type(e).__name__
    return s if len(s) <= _MSG_MAX else s[: _MSG_MAX - 3] + "..."


def chain_dir(root: str, chain: int) -> str:
    return os.path.join(root, f"chain{chain:03d}")


def segment_path(root: str, chain: int, index: int) -> str:
    return os.path.join(chain_dir(root, chain), f"seg{index:06d}.h5")


def _tmp_path(final: str) -> str:
    d, b = os.path.split(final)
    return os.path.join(d, f".{b}.tmp")


def committed_segments(root: str, chain: int) -> list[str]:
    """Committed segment files of one chain, in order (temporary files excluded)."""
    d = chain_dir(root, chain)
    if not os.path.isdir(d):
        return []
    names = sorted(n for n in os.listdir(d) if _SEG_RE.match(n))
    for k, n in enumerate(names):
        if int(_SEG_RE.match(n).group(1)) != k:  # type: ignore[union-attr]
            raise EnsembleError(f"{d}: segment {n} out of sequence (expected seg{k:06d}.h5); "
                                "the ensemble directory was edited or mixed with another run")
    return [os.path.join(d, n) for n in names]


def remove_uncommitted(root: str, chain: int) -> list[str]:
    """Delete temporary (uncommitted) segments of a chain left by a crash; returns them.

    A symlink planted at a temporary name is removed itself (``unlink`` never follows it)."""
    out = []
    for p in glob.glob(os.path.join(chain_dir(root, chain), ".seg*.h5.tmp")):
        os.unlink(p)
        out.append(p)
    return out


def _site_ranks_x0_fastest(lat: Any) -> np.ndarray:
    """SciDAC site rank (x_0 fastest) of every interior site, as laid out in the local array."""
    c = lat.global_coords()[(slice(None),) + lat.interior_slices(inner=0)[1:]]
    r = torch.zeros(c.shape[1:], dtype=torch.long)
    for d in reversed(range(lat.nd)):
        r = r * lat.global_shape[d] + c[d]
    return r.reshape(-1).numpy()


def field_checksum(U_local: torch.Tensor, lat: Any, comm: Comm | None = None, ranks: np.ndarray | None = None) -> int:
    """SciDAC checksum ``suma << 32 | sumb`` of a (decomposed) link field, in storage precision.

    Each rank checksums its interior sites (site = its Nd links, big-endian bytes); the
    partial sums are XOR-combined over the group, so the result is the same on any grid.
    ``ranks``: the site ranks of :func:`_site_ranks_x0_fastest` when the caller caches them.
    """
    inner = U_local[lat.interior_slices(2)].detach().cpu()
    nd = lat.nd
    perm = tuple(range(1, nd + 1)) + (0, nd + 1, nd + 2)
    sites = inner.permute(perm).numpy()
    # one copy: site-major order and big-endian bytes in a single astype
    be = sites.astype(sites.dtype.newbyteorder(">"), order="C")
    n = int(np.prod(sites.shape[:nd]))
    if ranks is None:
        ranks = _site_ranks_x0_fastest(lat)
    part = scidac_checksum(be.view(np.uint8).reshape(n, -1), ranks)
    if comm is not None and comm.size > 1:
        a, b = xor_combine(comm.allgather_object(part))
    else:
        a, b = part
    return (a << 32) | b


_ARANGE: dict[int, np.ndarray] = {}


def array_checksum(arr: np.ndarray) -> int:
    """The stored checksum (:func:`field_checksum`) of one global configuration as read from a
    segment, ``arr[mu, x_0, ..., x_{Nd-1}, i, j]`` in its storage precision."""
    nd = arr.ndim - 3
    if nd < 1:
        raise ValueError(f"a configuration has shape (Nd, *lattice, N, N), got {arr.shape}")
    # (x_{Nd-1}, ..., x_0, mu, i, j) in C order: site rank x_0 fastest = position
    perm = tuple(range(nd, 0, -1)) + (0, nd + 1, nd + 2)
    be = arr.transpose(perm).astype(arr.dtype.newbyteorder(">"), order="C")
    n = int(np.prod(arr.shape[1:nd + 1]))
    ranks = _ARANGE.get(n)
    if ranks is None:
        ranks = _ARANGE[n] = np.arange(n, dtype=np.int64)
    a, b = scidac_checksum(be.view(np.uint8).reshape(n, -1), ranks)
    return (a << 32) | b


# ---- extra row columns ----------------------------------------------------------------------
#: An extra row column: (name, dtype, per-row shape); listed in the segment attribute
#: ``row_columns`` (JSON ``[[name, dtype.str, shape], ...]``), in the order the digests hash them.
ExtraColumn = tuple[str, np.dtype, tuple[int, ...]]


def extra_columns(spec: Mapping[str, Any] | None) -> tuple[ExtraColumn, ...]:
    """Normalise ``{name: dtype}`` or ``{name: (dtype, shape)}`` into extra column specs."""
    out: list[ExtraColumn] = []
    for k, v in (spec or {}).items():
        dt, shape = (v if isinstance(v, tuple) else (v, ()))
        if k in ROW_FIELDS or k in ("U", "row_digest") or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
            raise ValueError(f"extra row column {k!r}: not a valid new column name")
        dt = np.dtype(dt)
        if dt.kind not in "fiubS":
            raise ValueError(f"extra row column {k!r}: dtype {dt} not supported (numbers or bytes)")
        out.append((k, dt, tuple(int(x) for x in shape)))
    return tuple(out)


def _fill(dt: np.dtype) -> Any:
    return np.nan if dt.kind == "f" else (b"" if dt.kind == "S" else 0)


def _columns_attr(extra: tuple[ExtraColumn, ...]) -> str:
    import json

    return json.dumps([[k, dt.str, list(sh)] for k, dt, sh in extra])


def _parse_columns_attr(path: str, v: Any) -> tuple[ExtraColumn, ...]:
    import json

    try:
        items = json.loads(_attr(v))
        return extra_columns({str(k): (np.dtype(d), tuple(sh)) for k, d, sh in items})
    except (TypeError, ValueError) as e:
        raise EnsembleError(f"{path}: attribute row_columns is not a list of row columns ({_short(e)}); "
                            "the file is corrupted") from None


# ---- digests ------------------------------------------------------------------------------
def _packed_rows(cols: Mapping[str, Any], n: int, extra: tuple[ExtraColumn, ...] = ()) -> np.ndarray:
    """The little-endian packed rows the digests hash: :data:`ROW_FIELDS`, then the extra
    columns in their stored order (no extra column: the record of segment format 2 as it was,
    so old segments verify unchanged)."""
    dtype = _ROW_DTYPE if not extra else np.dtype(
        list(_ROW_DTYPE.descr) + [(k, dt.newbyteorder("<"), sh) if sh else (k, dt.newbyteorder("<"))
                                  for k, dt, sh in extra])
    rec = np.zeros(n, dtype=dtype)
    for k in ROW_FIELDS:
        rec[k] = np.asarray(cols[k])[:n]
    for k, _, _ in extra:
        rec[k] = np.asarray(cols[k])[:n]
    return rec


def _row_digests(rec: np.ndarray) -> np.ndarray:
    raw = rec.view(np.uint8).reshape(len(rec), rec.dtype.itemsize) if len(rec) else np.zeros((0, 0), np.uint8)
    out = np.zeros(len(rec), dtype=np.uint64)
    for i in range(len(rec)):
        h = hashlib.blake2b(raw[i].tobytes(), digest_size=8, key=_ROW_KEY, salt=i.to_bytes(16, "little"))
        out[i] = int.from_bytes(h.digest(), "little")
    return out


def _segment_digest(chain: int, index: int, fingerprint: str, u_shape: tuple[int, ...], u_dtype: np.dtype,
                    rec: np.ndarray) -> str:
    head = (f"chain={int(chain)};segment={int(index)};n_rows={len(rec)};fingerprint={fingerprint};"
            f"U={tuple(int(s) for s in u_shape)};dtype={np.dtype(u_dtype).str}")
    h = hashlib.sha256(_DIGEST_TAG)
    h.update(head.encode())
    h.update(b"\0")
    h.update(rec.tobytes())
    return "sha256:" + h.hexdigest()


def _h5py() -> Any:
    import h5py

    return h5py


# Space reserved for a segment beyond its data: what ``prepare`` adds (row table, digests,
# object headers, attributes) with a wide margin; released after the close.
_RESERVE_SLACK = 64 << 10
_RESERVE_PER_ROW = 128
_FALLOC_FL_KEEP_SIZE = 1
_fallocate_fn: Any = None
_UNCLOSED: list[str] = []  # segments HDF5 could not close: see unclosed_segments()


def unclosed_segments() -> list[str]:
    """Segments whose HDF5 file could not be closed after a failed write (a metadata flush
    that failed on a file system without ``fallocate``, see :func:`_reserve`): HDF5 1.10
    would crash when the interpreter exits, so the CLI ends such a process with ``os._exit``
    after its error line (``hpcflow.run.world.run_guarded``)."""
    return list(_UNCLOSED)


def _reserve(path: str, length: int) -> None:
    """Allocate the blocks of ``path`` up to ``length`` bytes (Linux ``fallocate(2)`` with
    ``FALLOC_FL_KEEP_SIZE``: the size HDF5 sees does not change), so that HDF5's writes there
    cannot fail for lack of space: a full disk or a quota then fails here, cleanly, and not in
    the middle of an HDF5 metadata flush (after which HDF5 1.10 cannot close the file, and
    under ``mpio`` the other ranks wait for the failed one forever). Does nothing where the
    file system has no ``fallocate`` (no emulation: that would write the whole segment)."""
    global _fallocate_fn
    if _fallocate_fn is None:
        import ctypes

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fn = getattr(libc, "fallocate64", None) or libc.fallocate
            fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
            fn.restype = ctypes.c_int
            _fallocate_fn = (fn, ctypes.get_errno)
        except (OSError, AttributeError):
            _fallocate_fn = False
    if not _fallocate_fn:
        return
    fn, get_errno = _fallocate_fn
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
    try:
        if fn(fd, _FALLOC_FL_KEEP_SIZE, 0, int(length)) != 0:
            num = get_errno()
            if num in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EIO):
                raise OSError(num, os.strerror(num), path)
            # EOPNOTSUPP, ENOSYS, EINVAL...: not supported here; HDF5 finds out by itself
    finally:
        os.close(fd)


def _release_reserve(path: str) -> None:
    """Give back what :func:`_reserve` allocated beyond the end of the closed file."""
    with contextlib.suppress(OSError):
        os.truncate(path, os.lstat(path).st_size)


def _redirect_to_memory(path: str) -> bool:
    """Make every descriptor of this process open on ``path`` (HDF5's, or MPI-IO's under
    ``mpio``) write into an anonymous memory file instead, so that HDF5 can write what it must
    to close a segment that is being thrown away, whatever the disk says; True if any."""
    real = os.path.realpath(path)
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return False
    done = False
    for name in fds:
        try:
            if os.readlink(f"/proc/self/fd/{name}") != real:
                continue
            m = os.memfd_create("hpcflow-discarded-segment")
        except (OSError, AttributeError):
            continue
        try:
            os.dup2(m, int(name), inheritable=False)
            done = True
        except OSError:
            pass
        finally:
            os.close(m)
    return done


def _diagnose(e: BaseException, path: str) -> int | None:
    """The errno of a failed write of ``path``: from the error, or, when HDF5/MPI-IO said
    only "file write failed", from the file system (read-only; no space left)."""
    num = environment_errno(e, access=True)  # everything here is the run's output
    if num is not None or "write failed" not in str(e) and "flush" not in str(e).lower():
        return num
    try:
        st = os.statvfs(os.path.dirname(path) or ".")
    except OSError:
        return None
    if st.f_flag & os.ST_RDONLY:
        return errno.EROFS
    if st.f_bavail * st.f_frsize < _RESERVE_SLACK:
        return errno.ENOSPC
    return None


def _failure_info(e: BaseException, path: str) -> tuple[int | None, str, bool]:
    """(errno, message, is an environment failure) of a failed write of ``path``: shared with
    the other ranks of the group, which raise the same :class:`EnvironmentFailure`."""
    num = _diagnose(e, path)
    if num is None:
        return None, f"{path}: {_short(e)}", False
    if isinstance(e, EnvironmentFailure):
        return num, str(e.strerror), True
    return num, f"{path}: {os.strerror(num)}", True


class SegmentWriter:
    """One segment of one chain, written collectively by the ranks of a worker group.

    ``SegmentWriter(root, chain, index, lat, capacity, dtype, n_colors, attrs, comm,
    fingerprint="")``: ``capacity`` rows are allocated (contiguous, for parallel I/O);
    ``append`` adds a row (collective: every rank passes its local field and the same
    record); ``commit`` makes it visible atomically; ``abort`` discards it. ``comm`` is a
    ``LatticeComm`` (its ``.comm`` mpi4py communicator goes to the ``mpio`` driver) or None
    for one rank. ``fingerprint``: the configuration hash stored as ``config_fingerprint``
    (also taken from ``attrs["config_fingerprint"]``); :func:`check_tail` compares it.

    The temporary file is created exclusively: an existing ``.segNNNNNN.h5.tmp`` (a crash's
    leftover, which a resume deletes first, or a planted symlink) is an :class:`EnsembleError`,
    never opened or followed.

    A full disk (docs/DESIGN.md, "Exit status"): the root reserves the segment's space when
    it is created and before the commit's metadata flush (:func:`_reserve`), so that a full
    disk or quota fails there and not inside HDF5. A failed write (HDF5 reports it on some
    ranks only, perhaps only in its message) is agreed by the ranks of the group after each
    write, before the next collective HDF5 call; every rank then discards the segment (its
    descriptors pointed at memory, so that HDF5 can close it: a close that fails leaves
    objects that crash the interpreter at exit) and raises the same
    :class:`hpcflow.exit_codes.EnvironmentFailure` naming it (exit 4). The rows committed
    before stay; a resume continues after them.
    """

    def __init__(self, root: str, chain: int, index: int, lat: Any, capacity: int, dtype: torch.dtype,
                 n_colors: int, attrs: Mapping[str, Any], comm: Any = None, fingerprint: str = "",
                 columns: Mapping[str, Any] | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if dtype not in (torch.complex128, torch.complex64):
            raise TypeError(f"dtype must be torch.complex128 or torch.complex64, got {dtype}")
        self.root, self.chain, self.index = root, chain, index
        self.lat, self.comm = lat, comm
        self.final = segment_path(root, chain, index)
        self.tmp = _tmp_path(self.final)
        self.capacity = capacity
        self.fingerprint = str(fingerprint or attrs.get("config_fingerprint", "") or "")
        self.extra = extra_columns(columns)
        self.rows: dict[str, list] = {k: [] for k in ROW_FIELDS}
        self.rows.update({k: [] for k, _, _ in self.extra})
        self.parallel = comm is not None and comm.size > 1
        self.is_root = comm is None or comm.is_root
        self._open = False
        self._datasets: list[Any] = []
        h5py = _h5py()
        err: BaseException | None = None
        if self.is_root:
            try:
                os.makedirs(chain_dir(root, chain), exist_ok=True)
            except OSError as e:
                err = e
        self._settle(err, chain_dir(root, chain))  # collective: replaces a barrier
        # "x": H5F_ACC_EXCL = O_CREAT | O_EXCL (MPI_MODE_EXCL under mpio): an existing name,
        # a dangling or planted symlink included, fails instead of being truncated or followed
        try:
            if self.parallel:
                self.f = h5py.File(self.tmp, "x", driver="mpio", comm=comm.comm)
            else:
                self.f = h5py.File(self.tmp, "x")
        except (OSError, FileExistsError) as e:
            num = environment_errno(e, access=True)
            if num is not None:
                raise EnvironmentFailure(num, f"{self.tmp}: {os.strerror(num)} (creating the segment)") from None
            if os.path.lexists(self.tmp):
                raise EnsembleError(
                    f"{self.tmp}: temporary segment already exists (a symlink or another writer's file); "
                    "refusing to open it: stop any other run on this directory and remove it "
                    "(a resume deletes a crash's leftovers)") from None
            raise EnsembleError(f"{self.tmp}: cannot create the temporary segment ({_short(e)})") from None
        self._open = True
        err = None
        try:
            npdt = np.complex128 if dtype == torch.complex128 else np.complex64
            shape = (capacity, lat.nd) + tuple(lat.global_shape) + (n_colors, n_colors)
            self.U = self.f.create_dataset("U", shape=shape, dtype=npdt)
            self._u_shape, self._u_dtype = shape, np.dtype(npdt)
            for k, v in attrs.items():
                # str subclasses (torch's version string) would become numpy unicode: no HDF5 type
                self.f.attrs[k] = str(v).replace("\0", "") if isinstance(v, str) else v
            self.f.attrs["chain"] = chain
            self.f.attrs["segment"] = index
            self._meta_bytes = 4096 + sum(len(str(v)) for v in attrs.values())
            if self.is_root:
                _reserve(self.tmp, self._reserve_end(capacity))
        except Exception as e:  # noqa: BLE001 - agreed with the group, then raised
            err = e
        self._settle(err)
        self._ranks = _site_ranks_x0_fastest(lat)  # same sites for every row: computed once
        self._sel = (slice(None),) + tuple(
            slice(o, o + n) for o, n in zip(lat.origin, lat.local_shape)) + (slice(None), slice(None))

    def _barrier(self) -> None:
        if self.parallel:
            self.comm.barrier()

    def _reserve_end(self, rows: int) -> int:
        """Bytes to reserve (:func:`_reserve`): the file up to the end of the data (allocated
        at the first write; under mpio at once), and what ``prepare`` adds for ``rows`` rows."""
        off = self.U.id.get_offset()  # None before the data is allocated
        end = (self._meta_bytes if off is None else off) + self.U.nbytes
        return end + _RESERVE_SLACK + _RESERVE_PER_ROW * rows

    def _settle(self, err: BaseException | None, path: str | None = None) -> None:
        """Collective (every rank of the group, after each write): if a rank failed, every
        rank discards the segment and raises; ``err``: this rank's exception or None."""
        mine = None if err is None else _failure_info(err, path or self.tmp)
        infos = self.comm.allgather_object(mine) if self.parallel else [mine]
        first = next((i for i in infos if i is not None), None)
        if first is None:
            return
        self._discard()
        num, msg, env = first
        if env:
            if isinstance(err, EnvironmentFailure):
                raise err
            raise EnvironmentFailure(num, msg) from err
        if err is not None:
            raise err  # not the file system: the original error (a bug: traceback)
        raise RuntimeError(f"{msg} (on another rank of the group)")

    def _discard(self) -> None:
        """Collective: close the file and delete it (errors ignored: the file is being thrown
        away; a leftover is deleted by the resume). HDF5 writes its metadata to close a file,
        and a close that fails leaves objects that crash the interpreter at exit: so the
        file's descriptors are pointed at memory first (or, without /proc, its space is given
        back) and the close succeeds whatever the disk says."""
        if self._open:
            redirected = _redirect_to_memory(self.tmp)
            if not any(self.comm.allgather_object(redirected) if self.parallel else [redirected]) \
                    and self.is_root:
                with contextlib.suppress(OSError):
                    os.truncate(self.tmp, 0)
            self._barrier()
            with contextlib.suppress(Exception):
                self.f.close()
            if self.f.id.valid:  # HDF5 refused (a metadata flush had failed before)
                _UNCLOSED.append(self.tmp)
            self._open = False
            self._datasets = []
        self._barrier()
        if self.is_root:
            with contextlib.suppress(OSError):
                if os.path.lexists(self.tmp):
                    os.unlink(self.tmp)

    def __len__(self) -> int:
        return len(self.rows["step"])

    def append(self, U_local: torch.Tensor, record: Mapping[str, Any]) -> int:
        """Write one configuration (this rank's hyperslab) and its row; returns its checksum."""
        row = len(self)
        if row >= self.capacity:
            raise ValueError(f"segment {self.final} is full ({self.capacity} rows)")
        data = U_local[self.lat.interior_slices(2)].detach().cpu().numpy()
        ck = field_checksum(U_local, self.lat, self.comm, self._ranks)
        err: BaseException | None = None
        try:
            if self.parallel:
                with self.U.collective:
                    self.U[(row,) + self._sel] = data
            else:
                self.U[(row,) + self._sel] = data
        except Exception as e:  # noqa: BLE001 - agreed with the group, then raised
            err = e
        self._settle(err)
        rec = dict(record)
        rec["checksum"] = ck
        for k, dt in ROW_FIELDS.items():
            self.rows[k].append(rec.get(k, np.nan if dt is np.float64 else 0))
        for k, dt, sh in self.extra:
            v = rec.get(k)
            self.rows[k].append(np.full(sh, _fill(dt), dtype=dt) if v is None else np.asarray(v, dtype=dt))
        return ck

    def commit(self) -> str:
        """Flush, close, fsync and rename: after this the rows are committed (collective)."""
        self.prepare()
        return self.publish()

    def prepare(self) -> None:
        """Phase 1 (collective): write the row table and digests, flush, close and fsync the
        temporary file."""
        n = len(self)
        cols = {k: np.asarray(self.rows[k], dtype=dt) for k, dt in ROW_FIELDS.items()}
        for k, dt, sh in self.extra:
            cols[k] = np.asarray(self.rows[k], dtype=dt).reshape((n,) + sh)
        digest = rowd = None
        if self.is_root:  # the rows written are the root's: so are the digests
            rec = _packed_rows(cols, n, self.extra)
            rowd = _row_digests(rec)
            digest = _segment_digest(self.chain, self.index, self.fingerprint, self._u_shape, self._u_dtype, rec)
        if self.parallel:  # attributes are written collectively: identical values everywhere
            digest = self.comm.bcast_object(digest)
        # Each step is agreed before the next collective HDF5 call: a rank that failed alone
        # and skipped one would leave the others waiting in it forever.
        err: BaseException | None = None
        if self.is_root:  # the metadata flush below must not meet a full disk (_reserve)
            try:
                _reserve(self.tmp, self._reserve_end(n))
            except Exception as e:  # noqa: BLE001 - agreed with the group, then raised
                err = e
        self._settle(err)
        try:
            # every dataset stays referenced until the file is closed: an h5py object freed
            # earlier closes (and flushes) its HDF5 dataset alone, which fails on a full disk
            names = list(ROW_FIELDS) + [k for k, _, _ in self.extra]
            keep = self._datasets = [self.f.create_dataset(k, shape=(n,), dtype=dt)
                                     for k, dt in ROW_FIELDS.items()]
            keep += [self.f.create_dataset(k, shape=(n,) + sh, dtype=dt) for k, dt, sh in self.extra]
            keep.append(self.f.create_dataset("row_digest", shape=(n,), dtype=np.uint64))
            if self.is_root and n:  # independent writes: the root's rows
                for ds, k in zip(keep, names):
                    ds[...] = cols[k]
                keep[-1][...] = rowd
        except Exception as e:  # noqa: BLE001 - agreed with the group, then raised
            err = e
        self._settle(err)
        try:
            self.f.attrs["n_rows"] = n
            self.f.attrs["config_fingerprint"] = self.fingerprint
            self.f.attrs["segment_format"] = SEGMENT_FORMAT
            self.f.attrs["digest"] = digest
            if self.extra:
                self.f.attrs["row_columns"] = _columns_attr(self.extra)
            self.f.flush()  # what close would write: a full disk fails here, not in close
        except Exception as e:  # noqa: BLE001 - agreed with the group, then raised
            err = e
        self._settle(err)
        try:
            self.f.close()
        except Exception as e:  # noqa: BLE001
            err = e
        self._open = err is not None and self.f.id.valid
        self._settle(err)
        if self.is_root:
            _release_reserve(self.tmp)
            try:
                fd = os.open(self.tmp, os.O_RDONLY | os.O_NOFOLLOW)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as e:
                err = e
        self._settle(err)  # collective: replaces a barrier

    def publish(self) -> str:
        """Phase 2 (collective): the atomic rename that commits the segment."""
        err: str | None = None
        failed: tuple[int | None, str, bool] | None = None
        if self.is_root:
            try:
                st = os.lstat(self.tmp)
                if not stat.S_ISREG(st.st_mode):  # only what this writer created gets a final name
                    err = f"{self.tmp}: not a regular file (replaced while it was written); not committed"
                else:
                    os.replace(self.tmp, self.final)
                    fsync_dir(os.path.dirname(self.final))
            except OSError as e:
                failed = _failure_info(e, self.tmp)
        if self.parallel:
            err, failed = self.comm.bcast_object((err, failed))
        if failed is not None:
            self._discard()
            num, msg, env = failed
            raise EnvironmentFailure(num, msg) if env else EnsembleError(msg)
        if err is not None:
            raise EnsembleError(err)
        return self.final

    def abort(self) -> None:
        """Close and delete the uncommitted segment (collective)."""
        self._discard()


# ---- reading and checking one segment -------------------------------------------------------
@dataclass
class _Seg:
    path: str
    chain: int
    index: int
    n: int
    digest: str | None
    fingerprint: str | None  # None: not recorded (format 1 or a writer without one)
    identity: dict[str, Any]
    u_shape: tuple[int, ...]
    u_dtype: Any
    stamp: tuple[int, int, int]
    rows: dict[str, np.ndarray] | None = field(default=None, repr=False)  # verified row columns
    extra: tuple[ExtraColumn, ...] = ()  # extra row columns (attribute row_columns)


def _attr(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v


@contextlib.contextmanager
def _reading(path: str) -> Iterator[None]:
    """h5py/numpy errors inside a segment become one-line :class:`EnsembleError` s naming it."""
    try:
        yield
    except EnsembleError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError, IndexError, AttributeError) as e:
        raise EnsembleError(f"{path}: unreadable ensemble segment ({_short(e)}); the file is corrupted") from None


def _open(path: str) -> Any:
    h5py = _h5py()
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise EnsembleError(f"{path}: cannot open ensemble segment ({_short(e)}); the file is truncated "
                            "or corrupted") from None


def _load_meta(path: str, chain: int, index: int) -> _Seg:
    """Open a committed segment and check its structure (datasets, row count, place)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise EnsembleError(f"{path}: cannot read the segment ({_short(e)})") from None
    with _open(path) as f, _reading(path):
        for k in ("U",) + tuple(ROW_FIELDS):
            if k not in f:
                raise EnsembleError(f"{path}: no dataset {k!r}; the file is not a complete ensemble segment")
        a = f.attrs
        if "n_rows" not in a:
            raise EnsembleError(f"{path}: no attribute 'n_rows'; the file is not a complete ensemble segment")
        try:
            n = int(a["n_rows"])
        except (TypeError, ValueError):
            raise EnsembleError(f"{path}: attribute n_rows is not an integer: {_short(ValueError(repr(a['n_rows'])))}") \
                from None
        U = f["U"]
        if U.ndim < 4 or U.dtype.kind != "c":
            raise EnsembleError(f"{path}: dataset U has shape {U.shape} and type {U.dtype}; expected complex "
                                "(rows, Nd, *lattice, N, N)")
        extra = _parse_columns_attr(path, a["row_columns"]) if "row_columns" in a else ()
        for k, dt, sh in extra:
            if k not in f:
                raise EnsembleError(f"{path}: no dataset {k!r} (listed in row_columns); the file is not a "
                                    "complete ensemble segment")
            if tuple(f[k].shape[1:]) != sh or f[k].dtype.kind != dt.kind:
                raise EnsembleError(f"{path}: dataset {k!r} has shape {f[k].shape} and type {f[k].dtype}, not "
                                    f"(rows, {', '.join(map(str, sh))}) {dt} as row_columns says; the file is "
                                    "corrupted")
        lens = {k: f[k].shape[0] if f[k].ndim == 1 else -1 for k in ROW_FIELDS}
        lens.update({k: f[k].shape[0] for k, _, _ in extra})
        if not 0 <= n <= min([U.shape[0], *lens.values()]):
            raise EnsembleError(f"{path}: n_rows = {n} does not fit the datasets (U has {U.shape[0]} rows, "
                                f"the row columns {min(lens.values())}); the file is corrupted")
        digest = _attr(a["digest"]) if "digest" in a else None
        fp = _attr(a["config_fingerprint"]) if "config_fingerprint" in a else None
        if digest is not None and not isinstance(digest, str):
            raise EnsembleError(f"{path}: attribute digest is not a string; the file is corrupted")
        if digest is not None and "row_digest" not in f:
            raise EnsembleError(f"{path}: no dataset 'row_digest'; the file is not a complete ensemble segment")
        for k, want in (("chain", chain), ("segment", index)):
            if k in a and _attr(a[k]) != want:
                raise EnsembleError(f"{path}: its attributes say chain {_attr(a.get('chain'))} segment "
                                    f"{_attr(a.get('segment'))}, but it sits at chain {chain} segment {index}; "
                                    "the file was copied or renamed from elsewhere")
        ident = {k: _attr(a[k]) for k in _IDENTITY_ATTRS if k in a}
        lat = ident.get("lattice")
        if isinstance(lat, list) and tuple(U.shape[2:2 + len(lat)]) != tuple(lat):
            raise EnsembleError(f"{path}: dataset U has shape {U.shape}, which does not hold configurations of "
                                f"the lattice {lat} of its attributes; the file is corrupted")
        return _Seg(path, chain, index, n, digest, (str(fp) or None) if fp is not None else None, ident,
                    tuple(U.shape), U.dtype, (st.st_ino, st.st_size, st.st_mtime_ns), extra=extra)


def _row_label(seg: _Seg, i: int, steps: np.ndarray | None) -> str:
    s = f"{seg.path}: row {i}"
    if steps is not None and i < len(steps):
        s += f" (step {int(steps[i])})"
    return s


def _row_problems(f: Any, seg: _Seg) -> tuple[dict[str, np.ndarray], list[str]]:
    """Read the row columns of a segment and check them against its digests."""
    with _reading(seg.path):
        cols = {k: np.asarray(f[k][: seg.n]) for k in ROW_FIELDS}
        cols.update({k: np.asarray(f[k][: seg.n]) for k, _, _ in seg.extra})
        if seg.digest is None:
            return cols, []
        stored_rows = np.asarray(f["row_digest"][: seg.n])
        rec = _packed_rows(cols, seg.n, seg.extra)
    probs: list[str] = []
    want = _segment_digest(seg.chain, seg.index, seg.fingerprint or "", seg.u_shape, seg.u_dtype, rec)
    rowd = _row_digests(rec)
    bad = np.nonzero(rowd != stored_rows)[0] if len(stored_rows) == seg.n else np.arange(seg.n)
    steps = cols["step"]
    for i in bad:
        probs.append(f"{_row_label(seg, int(i), steps)}: the row columns do not match their digest "
                     "(S, plaquette, step, checksum... were altered)")
    if want != seg.digest and not probs:
        probs.append(f"{seg.path}: the segment digest does not match its rows and header (row count, chain, "
                     "segment number or config fingerprint were altered)")
    return cols, probs


def _config_problems(f: Any, seg: _Seg, cols: Mapping[str, np.ndarray], rows: range,
                     block_bytes: int = 1 << 26) -> list[str]:
    """Check the SciDAC checksum of the configurations ``rows`` of a segment."""
    probs = []
    per = max(1, block_bytes // max(1, int(np.prod(seg.u_shape[1:])) * np.dtype(seg.u_dtype).itemsize))
    with _reading(seg.path):
        U = f["U"]
        for i0 in range(rows.start, rows.stop, per):
            i1 = min(rows.stop, i0 + per)
            block = np.asarray(U[i0:i1])
            for i in range(i0, i1):
                got = array_checksum(block[i - i0])
                want = int(cols["checksum"][i])
                if got != want:
                    probs.append(f"{_row_label(seg, i, cols['step'])}: configuration checksum mismatch "
                                 f"(stored {want:016x}, data {got:016x}): U is corrupted")
    return probs


def _fingerprint_problems(segs: list[_Seg]) -> dict[str, str]:
    """Segments written by another configuration than most of the ensemble: path -> problem."""
    fps = Counter(s.fingerprint for s in segs if s.fingerprint is not None)
    out: dict[str, str] = {}
    if fps:
        ref, _ = fps.most_common(1)[0]
        ref_seg = next(s for s in segs if s.fingerprint == ref)
        for s in segs:
            if s.fingerprint is not None and s.fingerprint != ref:
                out[s.path] = (f"{s.path}: written by another configuration (config fingerprint "
                               f"{s.fingerprint[:12]}..., the rest of the ensemble {ref[:12]}...{_ident_diff(s, ref_seg)})")
    ident = Counter(tuple(sorted((k, repr(v)) for k, v in s.identity.items())) for s in segs)
    if len(ident) > 1:
        ref_i = dict(ident.most_common(1)[0][0])
        for s in segs:
            diff = [k for k, v in s.identity.items() if k in ref_i and repr(v) != ref_i[k]]
            if diff and s.path not in out:
                out[s.path] = (f"{s.path}: written by another run ("
                               + ", ".join(f"{k} {s.identity[k]!r} vs {ref_i[k]}" for k in diff) + ")")
    return out


def _ident_diff(s: _Seg, ref: _Seg) -> str:
    d = [f"{k} {s.identity[k]!r} vs {ref.identity[k]!r}" for k in s.identity
         if k in ref.identity and repr(s.identity[k]) != repr(ref.identity[k])]
    return ("; " + ", ".join(d)) if d else ""


# ---- the reader ---------------------------------------------------------------------------
class Ensemble:
    """Read access to a (possibly growing) ensemble directory: committed segments only.

    ``records(chain)``: dict of per-row numpy arrays concatenated over segments;
    ``config(chain, i)``: configuration ``i`` as a torch tensor; ``attrs``: file attributes
    of the first segment; ``refresh()`` rescans for newly committed segments.

    Every read is verified (module docstring): rows against the segment and row digests,
    returned configurations against their SciDAC checksums. ``verify="all"`` (default) also
    checks every configuration of the segments that :meth:`records` summarises (once per
    object); ``verify="rows"`` checks only what is returned. A failed check raises a one-line
    :class:`EnsembleError` naming the segment and the row.
    """

    def __init__(self, root: str, verify: str = "all") -> None:
        self.root = os.fspath(root)
        if verify not in ("all", "rows"):
            raise ValueError(f"verify must be 'all' or 'rows', got {verify!r}")
        self.verify = verify
        if not os.path.isdir(self.root):
            raise EnsembleError(f"{self.root}: no such ensemble directory")
        self._full_ok: set[tuple[str, tuple[int, int, int]]] = set()
        self._warned: set[str] = set()
        self.refresh()

    def refresh(self) -> None:
        try:
            names = os.listdir(self.root)
        except OSError as e:
            raise EnsembleError(f"{self.root}: cannot list the ensemble directory ({_short(e)})") from None
        self.chains: list[int] = sorted(int(n[5:]) for n in names if re.fullmatch(r"chain\d{3}", n))
        old = {s.path: s for segs in getattr(self, "_segs", {}).values() for s in segs}
        self._segs: dict[int, list[_Seg]] = {}
        for c in self.chains:
            segs = []
            for k, p in enumerate(committed_segments(self.root, c)):
                s = _load_meta(p, c, k)
                prev = old.get(p)
                if prev is not None and prev.stamp == s.stamp:
                    s.rows = prev.rows
                segs.append(s)
            self._segs[c] = segs
        every = [s for c in self.chains for s in self._segs[c]]
        foreign = _fingerprint_problems(every)
        if foreign:
            first = next(iter(foreign.values()))
            more = f" (+{len(foreign) - 1} more segments)" if len(foreign) > 1 else ""
            raise EnsembleError(f"{first}{more}; move it aside or run 'hpcflow ensemble verify {self.root}'")
        legacy = [s.path for s in every if s.digest is None and s.path not in self._warned]
        if legacy:
            self._warned.update(legacy)
            warnings.warn(f"{legacy[0]}" + (f" and {len(legacy) - 1} more segments" if len(legacy) > 1 else "")
                          + ": no segment digest (written before segment format 2): row columns cannot be "
                          "verified; configurations are checked against their stored checksums",
                          UnverifiedSegmentWarning, stacklevel=2)

    @staticmethod
    def _open(path: str) -> Any:
        return _open(path)

    @property
    def attrs(self) -> dict[str, Any]:
        for c in self.chains:
            if self._segs[c]:
                p = self._segs[c][0].path
                with self._open(p) as f, _reading(p):
                    return {k: (v.decode("utf-8", "replace") if isinstance(v, bytes) else v)
                            for k, v in f.attrs.items()}
        return {}

    def n_committed(self, chain: int | None = None) -> int:
        cs = self.chains if chain is None else [chain]
        return sum(s.n for c in cs for s in self._segs.get(c, []))

    def segments(self, chain: int) -> list[str]:
        return [s.path for s in self._segs.get(chain, [])]

    def _chain(self, chain: int) -> list[_Seg]:
        if chain not in self._segs:
            raise EnsembleError(f"{self.root}: no chain {chain}; chains: {self.chains}")
        return self._segs[chain]

    def _rows(self, f: Any, seg: _Seg) -> dict[str, np.ndarray]:
        if seg.rows is None:
            cols, probs = _row_problems(f, seg)
            _raise_first(probs, self.root)
            seg.rows = cols
        return seg.rows

    def _verify_all(self, f: Any, seg: _Seg) -> None:
        key = (seg.path, seg.stamp)
        if key not in self._full_ok:
            _raise_first(_config_problems(f, seg, self._rows(f, seg), range(seg.n)), self.root)
            self._full_ok.add(key)

    def records(self, chain: int | None = None) -> dict[str, np.ndarray]:
        """Per-row fields of one chain (or all chains, concatenated in chain order).

        :data:`ROW_FIELDS`, then every extra column any of the segments has (``row_columns``:
        ``kind``, ``Q``, Wilson loops, flowed observables...); rows of segments without one
        (written before it existed) hold NaN (bytes: ``b""``, integers: 0). A column whose
        per-row shape differs between segments (the flow-time grid changed on a resume) is
        left out with a :class:`UserWarning`."""
        cs = self.chains if chain is None else [chain]
        parts: list[tuple[_Seg, dict[str, np.ndarray]]] = []
        spec: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
        bad: set[str] = set()
        for c in cs:
            for s in self._chain(c):
                with self._open(s.path) as f:
                    rows = self._rows(f, s)
                    if self.verify == "all":
                        self._verify_all(f, s)
                parts.append((s, rows))
                for k, dt, sh in s.extra:
                    if k in spec and spec[k][1] != sh:
                        bad.add(k)
                    spec.setdefault(k, (dt, sh))
        if bad:
            warnings.warn(f"{self.root}: row column{'s' if len(bad) > 1 else ''} {', '.join(sorted(bad))} "
                          "changed shape between segments (measure settings changed on a resume): left out",
                          UserWarning, stacklevel=2)
        out: dict[str, np.ndarray] = {}
        for k, dt in ROW_FIELDS.items():
            out[k] = np.concatenate([r[k] for _, r in parts]) if parts else np.zeros(0, dtype=dt)
        for k, (dt, sh) in spec.items():
            if k in bad:
                continue
            vals = [r[k] if k in r else np.full((s.n,) + sh, _fill(dt), dtype=dt) for s, r in parts]
            out[k] = np.concatenate(vals) if vals else np.zeros((0,) + sh, dtype=dt)
        return out

    def _read_config(self, f: Any, seg: _Seg, i: int) -> torch.Tensor:
        rows = self._rows(f, seg)
        with _reading(seg.path):
            arr = np.asarray(f["U"][i])
        got, want = array_checksum(arr), int(rows["checksum"][i])
        if got != want:
            raise EnsembleError(f"{_row_label(seg, i, rows['step'])}: configuration checksum mismatch "
                                f"(stored {want:016x}, data {got:016x}): U is corrupted")
        return torch.from_numpy(arr)

    def iter_configs(self, chain: int) -> Iterator[tuple[int, torch.Tensor]]:
        """``(step, U)`` for every committed configuration of a chain, in order (each verified)."""
        for s in self._chain(chain):
            with self._open(s.path) as f:
                steps = self._rows(f, s)["step"]
                for i in range(s.n):
                    yield int(steps[i]), self._read_config(f, s, i)

    def locate(self, chain: int, index: int) -> tuple[str, int]:
        """``(segment path, row)`` of configuration ``index`` (negative from the end) of a chain."""
        segs = self._chain(chain)
        n = sum(s.n for s in segs)
        if not -n <= index < n:
            raise EnsembleIndexError(f"{self.root}: index {index} out of range: chain {chain} has {n} committed "
                                     f"configurations (allowed {-n}..{n - 1})" if n else
                                     f"{self.root}: index {index} out of range: chain {chain} has no committed "
                                     "configurations")
        index %= n
        for s in segs:
            if index < s.n:
                return s.path, index
            index -= s.n
        raise AssertionError("unreachable")  # pragma: no cover

    def config(self, chain: int, index: int) -> torch.Tensor:
        """Configuration number ``index`` (0-based, negative from the end) of a chain, verified."""
        path, i = self.locate(chain, index)
        s = next(s for s in self._segs[chain] if s.path == path)
        with self._open(path) as f:
            return self._read_config(f, s, i)

    def row(self, chain: int, index: int) -> dict[str, Any]:
        """The (verified) row of configuration ``index`` of a chain."""
        path, i = self.locate(chain, index)
        s = next(s for s in self._segs[chain] if s.path == path)
        with self._open(path) as f:
            rows = self._rows(f, s)
        out = {k: rows[k][i].item() for k in ROW_FIELDS}
        for k, _, sh in s.extra:
            out[k] = rows[k][i].item() if not sh else np.array(rows[k][i])
        return out


def _raise_first(probs: list[str], root: str) -> None:
    if probs:
        more = f" (+{len(probs) - 1} more problems; run 'hpcflow ensemble verify {root}')" if len(probs) > 1 else ""
        raise EnsembleError(probs[0] + more)


def open_ensemble(root: str | os.PathLike, verify: str = "all") -> Ensemble:
    """Open an ensemble directory for reading (see :class:`Ensemble`)."""
    return Ensemble(os.fspath(root), verify=verify)


# ---- whole-ensemble checks ----------------------------------------------------------------
def _chain_dirs(root: str) -> list[int]:
    return sorted(int(n[5:]) for n in os.listdir(root) if re.fullmatch(r"chain\d{3}", n))


def verify_ensemble(root: str | os.PathLike) -> list[str]:
    """Check everything in an ensemble directory; one line per problem (empty list: all good).

    Per chain: segment files in sequence, regular files, each opens and has the datasets of a
    segment, its chain/segment attributes match its place, its config fingerprint and physics
    attributes match the rest of the ensemble, its rows match the segment digest and the row
    digests (a mismatch names the row), every configuration matches its SciDAC checksum
    (names the row and step), the ``chain`` column is the chain and steps increase. Segments
    without a digest (format 1) are listed once each. Reads every configuration once.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        return [f"{root}: no such ensemble directory"]
    probs: list[str] = []
    metas: list[_Seg] = []
    try:
        chains = _chain_dirs(root)
    except OSError as e:
        return [f"{root}: cannot list the ensemble directory ({_short(e)})"]
    per_chain: dict[int, list[_Seg]] = {}
    for c in chains:
        d = chain_dir(root, c)
        try:
            names = sorted(n for n in os.listdir(d) if _ANY_SEG_RE.match(n))
        except OSError as e:
            probs.append(f"{d}: cannot list ({_short(e)})")
            continue
        per_chain[c] = []
        for k, n in enumerate(names):
            p = os.path.join(d, n)
            m = _SEG_RE.match(n)
            if m is None or int(m.group(1)) != k:
                probs.append(f"{p}: segment out of sequence (expected seg{k:06d}.h5 here); readers and resume "
                             "refuse the chain: move it aside")
                continue
            if os.path.islink(p) or not os.path.isfile(p):
                probs.append(f"{p}: not a regular file (committed segments are regular files)")
                continue
            try:
                s = _load_meta(p, c, k)
            except EnsembleError as e:
                probs.append(str(e))
                continue
            metas.append(s)
            per_chain[c].append(s)
    foreign = _fingerprint_problems(metas)
    for c in chains:
        last_step: int | None = None
        for s in per_chain.get(c, []):
            if s.path in foreign:
                probs.append(foreign[s.path])
            if s.digest is None:
                probs.append(f"{s.path}: no segment digest (written before segment format 2): its row columns "
                             "cannot be verified")
            try:
                with _open(s.path) as f:
                    cols, rp = _row_problems(f, s)
                    probs.extend(rp)
                    probs.extend(_config_problems(f, s, cols, range(s.n)))
            except EnsembleError as e:
                probs.append(str(e))
                continue
            bad_chain = np.nonzero(cols["chain"] != c)[0]
            for i in bad_chain[:1]:
                probs.append(f"{_row_label(s, int(i), cols['step'])}: chain column says {int(cols['chain'][i])}, "
                             f"the segment belongs to chain {c}")
            steps = cols["step"].astype(np.int64)
            for i in range(s.n):
                if last_step is not None and steps[i] <= last_step:
                    probs.append(f"{_row_label(s, i, steps)}: step does not increase (previous row: step {last_step})")
                last_step = int(steps[i])
    return probs


def check_tail(root: str | os.PathLike, chain: int, fingerprint: str, n_segments: int | None = None,
               n_rows: int | None = None, checkpoint: str | None = None) -> None:
    """Refuse to append to a chain whose committed segments a resume cannot continue.

    Checks every committed segment of ``chain`` (opens, structure, place, row and segment
    digests, ``config_fingerprint == fingerprint``) and every configuration of the last
    segment (SciDAC checksums); with ``n_segments``/``n_rows`` (from the chain checkpoint),
    the segment and row counts. Raises :class:`EnsembleError` with one line that names the
    segment (and row) and says what to move aside (``checkpoint``: the chain checkpoint's
    path, named in the advice). Read-only: a killed check changes nothing.
    """
    root = os.fspath(root)
    cdir = chain_dir(root, chain)
    aside = f"{cdir} and {checkpoint}" if checkpoint else f"{cdir} and the chain's checkpoint"

    def refuse(msg: str, restore: bool = True) -> EnsembleError:
        fix = "restore the file from a backup, or " if restore else ""
        return EnsembleError(f"{msg}; refusing to resume chain {chain} after it: {fix}move {aside} aside "
                             "to start the chain again")

    try:
        segs = committed_segments(root, chain)
    except EnsembleError as e:
        raise refuse(str(e), restore=False) from None
    if n_segments is not None and n_segments != len(segs):
        raise refuse(f"{cdir}: the checkpoint expects {n_segments} committed segments, found {len(segs)}",
                     restore=len(segs) < n_segments)
    total = 0
    legacy: list[str] = []
    for k, p in enumerate(segs):
        if os.path.islink(p) or not os.path.isfile(p):
            raise refuse(f"{p}: not a regular file (committed segments are regular files)")
        try:
            s = _load_meta(p, chain, k)
        except EnsembleError as e:
            raise refuse(str(e)) from None
        if s.fingerprint is None:  # format 1, or a writer that recorded none: cannot be attributed
            legacy.append(p)
        elif s.fingerprint != fingerprint:
            raise refuse(f"{p}: written by another configuration (config fingerprint {s.fingerprint[:12]}..., "
                         f"this run {fingerprint[:12]}...{_ident_str(s)})")
        try:
            with _open(p) as f:
                cols, probs = _row_problems(f, s)
                if not probs and k == len(segs) - 1:
                    probs = _config_problems(f, s, cols, range(s.n))
        except EnsembleError as e:
            raise refuse(str(e)) from None
        if probs:
            raise refuse(probs[0])
        total += s.n
    if n_rows is not None and n_rows != total:
        raise refuse(f"{cdir}: the checkpoint expects {n_rows} committed configurations, the segments hold {total}")
    if legacy:  # format 1: accepted (the chain checkpoint's fingerprint matched), with one warning
        warnings.warn(f"{legacy[0]}" + (f" and {len(legacy) - 1} more segments" if len(legacy) > 1 else "")
                      + ": no config fingerprint recorded (written before segment format 2, or without "
                      "one): resuming on the chain checkpoint's fingerprint alone", UnverifiedSegmentWarning,
                      stacklevel=2)


def _ident_str(s: _Seg) -> str:
    return "; its " + ", ".join(f"{k} {v!r}" for k, v in s.identity.items()) if s.identity else ""


# ---- summaries and export -----------------------------------------------------------------
def ensemble_info(root: str | os.PathLike) -> str:
    """Human-readable summary (``hpcflow ensemble info``): provenance, chains, counts, acceptance.

    Reads through the verified reader: every configuration is checked on the way."""
    ens = open_ensemble(root)
    a = ens.attrs
    lines = [f"ensemble {ens.root}"]
    for k in ("group", "lattice", "action", "beta", "algorithm", "precision", "seed", "n_chains",
              "hpcflow_version", "git_commit", "torch_version", "h5py_version", "hdf5_version",
              "mpi_version", "model_sha256", "config_fingerprint"):
        if k in a:
            v = a[k]
            lines.append(f"  {k:<16} {v.tolist() if isinstance(v, np.ndarray) else v}")
    for c in ens.chains:
        r = ens.records(c)
        n = len(r["step"])
        if n:
            lines.append(f"  chain {c:3d}: {n} configurations in {len(ens.segments(c))} segments, steps "
                         f"{int(r['step'][0])}..{int(r['step'][-1])}, acceptance {float(r['accepted'].mean()):.3f}, "
                         f"<plaquette> {float(r['plaquette'].mean()):.6f}")
        else:
            lines.append(f"  chain {c:3d}: no committed configurations")
    lines.append(f"  verified: {ens.n_committed()} configurations (SciDAC checksums, segment digests)")
    return "\n".join(lines)


def export_ildg(root: str | os.PathLike, out: str | os.PathLike, index: int = -1, chain: int = 0,
                overwrite: bool = False) -> tuple[int, int]:
    """Write configuration ``index`` of ``chain`` (4D SU(3)) as an ILDG/LIME file (``hpcflow export``).

    The configuration is verified (checksum, digests) before it is written; a non-SU(3) or
    non-4D ensemble, an index out of range or an existing ``out`` (without ``overwrite``) is a
    one-line :class:`EnsembleError`; ``out`` is never replaced unless ``overwrite``."""
    from hpcflow.io.ildg import write_ildg

    out = os.fspath(out)
    ens = open_ensemble(root, verify="rows")
    segs = ens._chain(chain)
    if segs:
        shape = segs[0].u_shape[1:]
        if len(shape) != 7 or shape[0] != 4 or shape[-2:] != (3, 3):
            a = segs[0].identity
            raise EnsembleError(f"{ens.root}: chain {chain} holds {a.get('group', '?')} configurations of shape "
                                f"{tuple(shape)}; ILDG export supports 4D SU(3) only (shape (4, Lx, Ly, Lz, Lt, 3, 3))")
    path, i = ens.locate(chain, index)
    if os.path.lexists(out) and not overwrite:
        raise EnsembleError(f"{out}: exists; refusing to overwrite (--overwrite / overwrite=True replaces it)")
    d = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(d):
        raise EnsembleError(f"{out}: no such directory {d}")
    U = ens.config(chain, index)
    r = ens.row(chain, index)
    a = ens.attrs
    info = {"beta": a.get("beta"), "step": int(r["step"]), "chain": chain, "plaquette": float(r["plaquette"]),
            "seed": a.get("seed"), "algorithm": a.get("algorithm"), "hpcflow_version": a.get("hpcflow_version")}
    try:
        return write_ildg(out, U.to(torch.complex128), info=info, overwrite=overwrite)
    except FileExistsError:
        raise EnsembleError(f"{out}: exists; refusing to overwrite (--overwrite / overwrite=True replaces it)") \
            from None
    except IsADirectoryError:
        raise EnsembleError(f"{out}: is a directory") from None
