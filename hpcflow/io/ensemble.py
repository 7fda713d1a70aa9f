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

Commit and streaming (design choice): HDF5 1.10's SWMR does not work with the ``mpio``
driver, and a file killed in the middle of a write may not open again. So a segment is
written under a temporary name, then flushed (``MPI_File_sync``), closed, fsynced and
renamed to ``segNNNNNN.h5``: the rename is the commit. Readers (``hpcflow.io.open_ensemble``)
list committed segments only, so an analysis job may read the ensemble at any time and
sees every committed configuration; every committed file opens, because it was complete
before it got its name. Temporary segments left by a crash are deleted on resume.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hpcflow.io.checkpoint import fsync_dir
from hpcflow.io.lime import scidac_checksum, xor_combine
from hpcflow.lattice.geometry import Comm

__all__ = [
    "ROW_FIELDS",
    "Ensemble",
    "EnsembleError",
    "SegmentWriter",
    "committed_segments",
    "ensemble_info",
    "export_ildg",
    "field_checksum",
    "open_ensemble",
    "remove_uncommitted",
    "segment_path",
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
_SEG_RE = re.compile(r"^seg(\d{6})\.h5$")


class EnsembleError(ValueError):
    """A missing, unreadable or inconsistent ensemble file (message names the file)."""


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
    """Delete temporary (uncommitted) segments of a chain left by a crash; returns them."""
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


def _h5py() -> Any:
    import h5py

    return h5py


class SegmentWriter:
    """One segment of one chain, written collectively by the ranks of a worker group.

    ``SegmentWriter(root, chain, index, lat, capacity, dtype, n_colors, attrs, comm)``:
    ``capacity`` rows are allocated (contiguous, for parallel I/O); ``append`` adds a row
    (collective: every rank passes its local field and the same record); ``commit`` makes
    it visible atomically; ``abort`` discards it. ``comm`` is a ``LatticeComm`` (its
    ``.comm`` mpi4py communicator goes to the ``mpio`` driver) or None for one rank.
    """

    def __init__(self, root: str, chain: int, index: int, lat: Any, capacity: int, dtype: torch.dtype,
                 n_colors: int, attrs: Mapping[str, Any], comm: Any = None) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if dtype not in (torch.complex128, torch.complex64):
            raise TypeError(f"dtype must be torch.complex128 or torch.complex64, got {dtype}")
        self.root, self.chain, self.index = root, chain, index
        self.lat, self.comm = lat, comm
        self.final = segment_path(root, chain, index)
        self.tmp = _tmp_path(self.final)
        self.capacity = capacity
        self.rows: dict[str, list] = {k: [] for k in ROW_FIELDS}
        self.parallel = comm is not None and comm.size > 1
        self.is_root = comm is None or comm.is_root
        h5py = _h5py()
        if self.is_root:
            os.makedirs(chain_dir(root, chain), exist_ok=True)
        self._barrier()
        if self.parallel:
            self.f = h5py.File(self.tmp, "w", driver="mpio", comm=comm.comm)
        else:
            self.f = h5py.File(self.tmp, "w")
        npdt = np.complex128 if dtype == torch.complex128 else np.complex64
        shape = (capacity, lat.nd) + tuple(lat.global_shape) + (n_colors, n_colors)
        self.U = self.f.create_dataset("U", shape=shape, dtype=npdt)
        for k, v in attrs.items():
            # str subclasses (torch's version string) would become numpy unicode: no HDF5 type
            self.f.attrs[k] = str(v).replace("\0", "") if isinstance(v, str) else v
        self.f.attrs["chain"] = chain
        self.f.attrs["segment"] = index
        self._ranks = _site_ranks_x0_fastest(lat)  # same sites for every row: computed once
        self._sel = (slice(None),) + tuple(
            slice(o, o + n) for o, n in zip(lat.origin, lat.local_shape)) + (slice(None), slice(None))

    def _barrier(self) -> None:
        if self.parallel:
            self.comm.barrier()

    def __len__(self) -> int:
        return len(self.rows["step"])

    def append(self, U_local: torch.Tensor, record: Mapping[str, Any]) -> int:
        """Write one configuration (this rank's hyperslab) and its row; returns its checksum."""
        row = len(self)
        if row >= self.capacity:
            raise ValueError(f"segment {self.final} is full ({self.capacity} rows)")
        data = U_local[self.lat.interior_slices(2)].detach().cpu().numpy()
        ck = field_checksum(U_local, self.lat, self.comm, self._ranks)
        if self.parallel:
            with self.U.collective:
                self.U[(row,) + self._sel] = data
        else:
            self.U[(row,) + self._sel] = data
        rec = dict(record)
        rec["checksum"] = ck
        for k, dt in ROW_FIELDS.items():
            self.rows[k].append(rec.get(k, np.nan if dt is np.float64 else 0))
        return ck

    def commit(self) -> str:
        """Flush, close, fsync and rename: after this the rows are committed (collective)."""
        self.prepare()
        return self.publish()

    def prepare(self) -> None:
        """Phase 1 (collective): write the row table, flush, close and fsync the temporary file."""
        n = len(self)
        for k, dt in ROW_FIELDS.items():
            ds = self.f.create_dataset(k, shape=(n,), dtype=dt)
            if self.is_root and n:
                ds[...] = np.asarray(self.rows[k], dtype=dt)
        self.f.attrs["n_rows"] = n
        self.f.flush()
        self.f.close()
        if self.is_root:
            fd = os.open(self.tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self._barrier()

    def publish(self) -> str:
        """Phase 2 (collective): the atomic rename that commits the segment."""
        if self.is_root:
            os.replace(self.tmp, self.final)
            fsync_dir(os.path.dirname(self.final))
        self._barrier()
        return self.final

    def abort(self) -> None:
        """Close and delete the uncommitted segment."""
        with contextlib.suppress(Exception):  # already closed or broken: deleting is what matters
            self.f.close()
        self._barrier()
        if self.is_root and os.path.exists(self.tmp):
            os.unlink(self.tmp)


@dataclass
class _Seg:
    path: str
    n: int


class Ensemble:
    """Read access to a (possibly growing) ensemble directory: committed segments only.

    ``records(chain)``: dict of per-row numpy arrays concatenated over segments;
    ``config(chain, i)``: configuration ``i`` as a torch tensor; ``attrs``: file attributes
    of the first segment; ``refresh()`` rescans for newly committed segments.
    """

    def __init__(self, root: str) -> None:
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise EnsembleError(f"{self.root}: no such ensemble directory")
        self.refresh()

    def refresh(self) -> None:
        self.chains: list[int] = sorted(
            int(n[5:]) for n in os.listdir(self.root) if re.fullmatch(r"chain\d{3}", n))
        self._segs: dict[int, list[_Seg]] = {}
        for c in self.chains:
            segs = []
            for p in committed_segments(self.root, c):
                with self._open(p) as f:
                    segs.append(_Seg(p, int(f.attrs["n_rows"])))
            self._segs[c] = segs

    @staticmethod
    def _open(path: str) -> Any:
        h5py = _h5py()
        try:
            return h5py.File(path, "r")
        except OSError as e:
            raise EnsembleError(f"{path}: cannot open ensemble segment ({e}); the file is corrupted") from None

    @property
    def attrs(self) -> dict[str, Any]:
        for c in self.chains:
            if self._segs[c]:
                with self._open(self._segs[c][0].path) as f:
                    return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
        return {}

    def n_committed(self, chain: int | None = None) -> int:
        cs = self.chains if chain is None else [chain]
        return sum(s.n for c in cs for s in self._segs.get(c, []))

    def segments(self, chain: int) -> list[str]:
        return [s.path for s in self._segs.get(chain, [])]

    def records(self, chain: int | None = None) -> dict[str, np.ndarray]:
        """Per-row fields of one chain (or all chains, concatenated in chain order)."""
        cs = self.chains if chain is None else [chain]
        out: dict[str, list] = {k: [] for k in ROW_FIELDS}
        for c in cs:
            for s in self._segs.get(c, []):
                with self._open(s.path) as f:
                    for k in ROW_FIELDS:
                        out[k].append(np.asarray(f[k][: s.n]))
        return {k: (np.concatenate(v) if v else np.zeros(0, dtype=ROW_FIELDS[k])) for k, v in out.items()}

    def iter_configs(self, chain: int) -> Iterator[tuple[int, torch.Tensor]]:
        """``(step, U)`` for every committed configuration of a chain, in order."""
        for s in self._segs.get(chain, []):
            with self._open(s.path) as f:
                steps = np.asarray(f["step"][: s.n])
                for i in range(s.n):
                    yield int(steps[i]), torch.from_numpy(np.asarray(f["U"][i]))

    def config(self, chain: int, index: int) -> torch.Tensor:
        """Configuration number ``index`` (0-based, negative from the end) of a chain."""
        n = self.n_committed(chain)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range: chain {chain} has {n} committed configurations")
        index %= n
        for s in self._segs[chain]:
            if index < s.n:
                with self._open(s.path) as f:
                    return torch.from_numpy(np.asarray(f["U"][index]))
            index -= s.n
        raise AssertionError("unreachable")  # pragma: no cover


def open_ensemble(root: str | os.PathLike) -> Ensemble:
    """Open an ensemble directory for reading (see :class:`Ensemble`)."""
    return Ensemble(os.fspath(root))


def ensemble_info(root: str | os.PathLike) -> str:
    """Human-readable summary (``hpcflow ensemble info``): provenance, chains, counts, acceptance."""
    ens = open_ensemble(root)
    a = ens.attrs
    lines = [f"ensemble {ens.root}"]
    for k in ("group", "lattice", "action", "beta", "algorithm", "precision", "seed", "n_chains",
              "hpcflow_version", "git_commit", "torch_version", "h5py_version", "hdf5_version",
              "mpi_version", "model_sha256"):
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
    return "\n".join(lines)


def export_ildg(root: str | os.PathLike, out: str | os.PathLike, index: int = -1, chain: int = 0,
                overwrite: bool = False) -> tuple[int, int]:
    """Write configuration ``index`` of ``chain`` (4D SU(3)) as an ILDG/LIME file (``hpcflow export``)."""
    from hpcflow.io.ildg import write_ildg

    ens = open_ensemble(root)
    if chain not in ens.chains:
        raise EnsembleError(f"{ens.root}: no chain {chain}; chains: {ens.chains}")
    U = ens.config(chain, index)
    r = ens.records(chain)
    a = ens.attrs
    i = index % len(r["step"])
    info = {"beta": a.get("beta"), "step": int(r["step"][i]), "chain": chain, "plaquette": float(r["plaquette"][i]),
            "seed": a.get("seed"), "algorithm": a.get("algorithm"), "hpcflow_version": a.get("hpcflow_version")}
    return write_ildg(out, U.to(torch.complex128), info=info, overwrite=overwrite)
