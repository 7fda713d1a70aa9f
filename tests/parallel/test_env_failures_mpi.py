"""A full disk in a parallel segment write, on P ranks (issue 18, item 6; pytest-mpi, P = 1, 2, 4).

Under ``mpio`` HDF5 reports a failed collective write on some ranks only (an MPI-IO
aggregator that met the full disk), and only in its message. What is proven: a write, a
space reservation or a metadata flush that fails on one rank of the worker group ends on
*every* rank with the same :class:`hpcflow.exit_codes.EnvironmentFailure` naming the
temporary segment (exit 4 in the CLI); nothing hangs (the failure is agreed before the next
collective HDF5 call); the temporary segment is closed and deleted; and the group goes on to
write and commit the same segment afterwards (HDF5 left in a usable state). The end-to-end
runs (``mpirun -n 2 hpcflow sample`` on a real full tmpfs, then ``--resume``) are in
tests/faults/test_env_failures.py.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable

import h5py
import pytest
import torch
from mpi4py import MPI

from hpcflow.exit_codes import EnvironmentFailure
from hpcflow.io import ensemble
from hpcflow.io.ensemble import SegmentWriter, open_ensemble

WORLD = MPI.COMM_WORLD
SIZE, RANK = WORLD.Get_size(), WORLD.Get_rank()
LAST = SIZE - 1  # the rank that meets the full disk
_H5_ENOSPC = ("Can't write data (file write failed: filename = '{}', errno = 28, "
              "error message = 'No space left on device')")


def _setup():  # type: ignore[no-untyped-def]
    from hpcflow.comm import LatticeComm, ProcessGrid
    from hpcflow.lattice.groups import get_group, random_field
    from hpcflow.rng import CounterRNG

    base = WORLD.bcast(tempfile.mkdtemp(prefix="hpcflow-env-") if RANK == 0 else None)
    lc = LatticeComm(ProcessGrid((8, 4), [SIZE, 1]))
    lat = lc.local_lattice(halo=1)
    fields = [random_field(lat, get_group("u1"), CounterRNG(3), step=s) for s in range(3)]
    return base, lc, lat, fields


def _outcome(fn: Callable[[], object]) -> tuple[str, str]:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - compared across ranks
        return type(e).__name__, str(e)
    return "ok", ""


def _writer(base: str, lc, lat, capacity: int = 2) -> SegmentWriter:  # type: ignore[no-untyped-def]
    return SegmentWriter(f"{base}/ens", 0, 0, lat, capacity, torch.complex128, 1, {"test": 1}, lc)


def _check_failed(got: tuple[str, str], w_tmp: str, collective) -> None:  # type: ignore[no-untyped-def]
    everyone = WORLD.allgather(got)
    collective(all(o == everyone[0] for o in everyone), f"outcomes differ across ranks: {everyone}")
    collective(got[0] == EnvironmentFailure.__name__ and w_tmp in got[1] and "No space left" in got[1]
               and "--resume" in got[1], f"got {got}")
    collective(not os.path.lexists(w_tmp), f"{w_tmp} left behind")


def _commit_after(base: str, lc, lat, fields, collective) -> None:  # type: ignore[no-untyped-def]
    """The group writes and commits the same segment afterwards."""
    w = _writer(base, lc, lat)
    for f in fields[:2]:
        w.append(f, {"step": 1})
    w.commit()
    n = open_ensemble(f"{base}/ens").n_committed() if RANK == 0 else 2
    collective(n == 2, f"committed {n} rows after the failure")


@pytest.mark.mpi
def test_a_write_failing_on_one_rank_is_the_same_error_on_every_rank(collective, monkeypatch) -> None:
    base, lc, lat, fields = _setup()
    try:
        if RANK == LAST:
            real = h5py.Dataset.__setitem__

            def setitem(self, key, value):  # type: ignore[no-untyped-def]
                real(self, key, value)  # the collective write went through on every rank
                if self.name == "/U" and key[0] == 1:
                    raise OSError(_H5_ENOSPC.format(self.file.filename))

            monkeypatch.setattr(h5py.Dataset, "__setitem__", setitem)
        w = _writer(base, lc, lat)
        w.append(fields[0], {"step": 1})
        got = _outcome(lambda: w.append(fields[1], {"step": 2}))
        monkeypatch.undo()
        _check_failed(got, w.tmp, collective)
        _commit_after(base, lc, lat, fields, collective)
    finally:
        WORLD.Barrier()
        if RANK == 0:
            shutil.rmtree(base, ignore_errors=True)


@pytest.mark.mpi
def test_a_metadata_flush_failing_on_one_rank_is_the_same_error_on_every_rank(collective, monkeypatch) -> None:
    base, lc, lat, fields = _setup()
    try:
        if RANK == LAST:
            real = h5py.File.flush

            def flush(self):  # type: ignore[no-untyped-def]
                real(self)
                raise RuntimeError("Can't flush cache (file write failed: errno = 28, error message = "
                                   "'No space left on device')")

            monkeypatch.setattr(h5py.File, "flush", flush)
        w = _writer(base, lc, lat)
        for f in fields[:2]:
            w.append(f, {"step": 1})
        got = _outcome(w.prepare)
        monkeypatch.undo()
        _check_failed(got, w.tmp, collective)
        _commit_after(base, lc, lat, fields, collective)
    finally:
        WORLD.Barrier()
        if RANK == 0:
            shutil.rmtree(base, ignore_errors=True)


@pytest.mark.mpi
def test_no_space_to_reserve_a_segment_is_the_same_error_on_every_rank(collective, monkeypatch) -> None:
    base, lc, lat, fields = _setup()
    try:
        if RANK == 0:  # the root reserves the segment's space

            def reserve(path: str, length: int) -> None:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

            monkeypatch.setattr(ensemble, "_reserve", reserve)
        tmp = ensemble._tmp_path(ensemble.segment_path(f"{base}/ens", 0, 0))
        got = _outcome(lambda: _writer(base, lc, lat))
        monkeypatch.undo()
        _check_failed(got, tmp, collective)
        _commit_after(base, lc, lat, fields, collective)
    finally:
        WORLD.Barrier()
        if RANK == 0:
            shutil.rmtree(base, ignore_errors=True)
