"""Verified reads and safe temporary files with segments written by P ranks (pytest-mpi, P = 1, 2, 4).

What is proven:
* a segment written collectively by P ranks (``mpio``, each rank its hyperslab) carries the
  same digest, row digests and config fingerprint as the same rows written by one rank, so
  the digest is decomposition independent, and it verifies clean (``verify_ensemble``,
  ``check_tail``);
* a symlink planted at the next temporary segment name is refused by the collective
  exclusive create on every rank at once (one ``EnsembleError``, no hang), its target is
  untouched, and the segment is committed after the link is removed;
* a bit flip in ``U`` of the P-rank segment is named (segment and row) by every reader.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import h5py
import numpy as np
import pytest
import torch
from mpi4py import MPI

from hpcflow.io.ensemble import (
    EnsembleError,
    SegmentWriter,
    check_tail,
    open_ensemble,
    segment_path,
    verify_ensemble,
)
from hpcflow.lattice.geometry import Lattice

WORLD = MPI.COMM_WORLD
SIZE, RANK = WORLD.Get_size(), WORLD.Get_rank()


@pytest.mark.mpi
def test_parallel_segment_digest_symlink_and_bit_flip(collective) -> None:
    from hpcflow.comm import LatticeComm, ProcessGrid
    from hpcflow.comm.fields import local_from_global
    from hpcflow.lattice.groups import get_group, random_field
    from hpcflow.rng import CounterRNG

    base = WORLD.bcast(tempfile.mkdtemp(prefix="hpcflow-vr-") if RANK == 0 else None)
    try:
        shape = (8, 4)
        g = get_group("su2")
        one = Lattice(shape)
        fields = [random_field(one, g, CounterRNG(7), step=s) for s in range(3)]
        attrs = {"group": "su2", "lattice": list(shape), "beta": 2.0}
        recs = [{"chain": 0, "step": s + 1, "accepted": s % 2, "S": -1.5 * s, "plaquette": 0.25 * s}
                for s in range(3)]
        lc = LatticeComm(ProcessGrid(shape, [SIZE, 1]))
        lat = lc.local_lattice(halo=1)
        par, ser = f"{base}/par", f"{base}/ser"
        w = SegmentWriter(par, 0, 0, lat, 3, torch.complex128, 2, attrs, lc, fingerprint="fp-mpi")
        for U, r in zip(fields, recs):
            w.append(local_from_global(U, lat), r)
        w.commit()
        ok, why = True, ""
        if RANK == 0:
            w1 = SegmentWriter(ser, 0, 0, one, 3, torch.complex128, 2, attrs, fingerprint="fp-mpi")
            for U, r in zip(fields, recs):
                w1.append(U, r)
            w1.commit()
            with h5py.File(segment_path(par, 0, 0), "r") as a, h5py.File(segment_path(ser, 0, 0), "r") as b:
                ok = (a.attrs["digest"] == b.attrs["digest"] and np.array_equal(a["row_digest"][:], b["row_digest"][:])
                      and a.attrs["config_fingerprint"] == "fp-mpi")
                why = f"digests {a.attrs['digest']} vs {b.attrs['digest']}"
            probs = verify_ensemble(par)
            ok = ok and probs == []
            why += f"; verify: {probs}"
            check_tail(par, 0, "fp-mpi", n_segments=1, n_rows=3)
            ens = open_ensemble(par)
            ok = ok and all(torch.equal(ens.config(0, i), fields[i]) for i in range(3))
        collective(ok, f"P-rank segment equals the one-rank segment: {why}")
        # a planted symlink at the next temporary name: refused on every rank, target untouched
        tmp = os.path.join(par, "chain000", ".seg000001.h5.tmp")
        victim = f"{base}/victim"
        if RANK == 0:
            with open(victim, "wb") as fh:
                fh.write(b"precious")
            os.symlink(victim, tmp)
        WORLD.Barrier()
        msg = ""
        try:
            SegmentWriter(par, 0, 1, lat, 1, torch.complex128, 2, attrs, lc, fingerprint="fp-mpi")
        except EnsembleError as e:
            msg = str(e)
        collective("temporary segment already exists" in msg, f"rank {RANK}: expected a refusal, got {msg!r}")
        WORLD.Barrier()
        ok = open(victim, "rb").read() == b"precious"
        collective(ok, "the symlink's target was written")
        if RANK == 0:
            os.unlink(tmp)
        WORLD.Barrier()
        w = SegmentWriter(par, 0, 1, lat, 1, torch.complex128, 2, attrs, lc, fingerprint="fp-mpi")
        w.append(local_from_global(fields[0], lat), {"chain": 0, "step": 4})
        w.commit()
        ok, why = True, ""
        if RANK == 0:
            seg = segment_path(par, 0, 0)
            with h5py.File(seg, "r") as f:
                off = f["U"].id.get_offset() + 2 * f["U"][0].nbytes + 11  # row 2
            with open(seg, "r+b") as fh:
                fh.seek(off)
                b = fh.read(1)
                fh.seek(off)
                fh.write(bytes([b[0] ^ 0x04]))
            probs = verify_ensemble(par)
            ok = len(probs) == 1 and probs[0].startswith(f"{seg}: row 2 (step 3): configuration checksum mismatch")
            try:
                open_ensemble(par).records(0)
                ok = False
            except EnsembleError as e:
                ok = ok and str(e).startswith(f"{seg}: row 2 (step 3)")
            why = f"{probs}"
        collective(ok, f"bit flip in the P-rank segment: {why}")
    finally:
        WORLD.Barrier()
        if RANK == 0:
            shutil.rmtree(base, ignore_errors=True)
