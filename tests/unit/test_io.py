"""Checkpoint files, segment-committed HDF5 ensembles and the signal flag (one rank)."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import torch

from hpcflow.io.checkpoint import (
    CheckpointError,
    atomic_write_bytes,
    load_checkpoint,
    save_checkpoint,
)
from hpcflow.io.ensemble import (
    EnsembleError,
    SegmentWriter,
    committed_segments,
    ensemble_info,
    field_checksum,
    open_ensemble,
)
from hpcflow.io.ildg import ildg_checksum
from hpcflow.lattice import Lattice, get_group, random_field
from hpcflow.rng import CounterRNG
from hpcflow.signals import StopFlag


def test_checkpoint_roundtrip_and_errors(tmp_path) -> None:
    p = tmp_path / "c.ckpt"
    U = torch.randn(2, 3, dtype=torch.complex128)
    save_checkpoint(p, {"U": U, "step": 7, "rng": {"seed": 1, "stream": 2}}, fingerprint="abc")
    st = load_checkpoint(p, "abc")
    assert torch.equal(st["U"], U) and st["step"] == 7 and st["rng"] == {"seed": 1, "stream": 2}
    with pytest.raises(CheckpointError, match="another configuration"):
        load_checkpoint(p, "xyz")
    raw = p.read_bytes()
    (tmp_path / "t.ckpt").write_bytes(raw[:-5])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(tmp_path / "t.ckpt")
    bad = bytearray(raw)
    bad[-3] ^= 0xFF
    (tmp_path / "b.ckpt").write_bytes(bytes(bad))
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(tmp_path / "b.ckpt")
    (tmp_path / "j.ckpt").write_bytes(b"hello")
    with pytest.raises(CheckpointError, match="not an hpcflow checkpoint"):
        load_checkpoint(tmp_path / "j.ckpt")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.ckpt")


def test_atomic_write_keeps_old_file_on_failure(tmp_path) -> None:
    p = tmp_path / "f.bin"
    atomic_write_bytes(p, b"old")

    def boom(fh) -> None:  # type: ignore[no-untyped-def]
        fh.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write_bytes(p, boom)
    assert p.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["f.bin"]  # no temporary left behind


def _fields(n: int, shape=(4, 3, 2, 5), group: str = "su3", dtype=torch.complex128) -> list[torch.Tensor]:
    lat = Lattice(shape)
    return [random_field(lat, get_group(group), CounterRNG(3, stream=1), step=s, dtype=dtype) for s in range(n)]


@pytest.mark.parametrize("dtype", [torch.complex128, torch.complex64])
def test_segments_roundtrip_stream_and_checksums(tmp_path, dtype) -> None:
    shape = (4, 3, 2, 5)
    lat = Lattice(shape)
    Us = _fields(5, shape, dtype=dtype)
    root = str(tmp_path / "ens")
    attrs = {"group": "su3", "lattice": list(shape), "beta": 6.0, "config_yaml": "a: 1\n"}
    w = SegmentWriter(root, 0, 0, lat, 3, dtype, 3, attrs)
    for s, U in enumerate(Us[:3]):
        w.append(U, {"chain": 0, "step": s + 1, "accepted": 1, "multiplicity": 1, "S": -float(s),
                     "plaquette": 0.5})
    w.commit()
    w2 = SegmentWriter(root, 0, 1, lat, 3, dtype, 3, attrs)
    w2.append(Us[3], {"chain": 0, "step": 4, "accepted": 0, "multiplicity": 1, "S": -3.0, "plaquette": 0.5})
    # a reader opened now sees exactly the committed segment, not the one being written
    ens = open_ensemble(root)
    assert ens.n_committed() == 3 and len(committed_segments(root, 0)) == 1
    w2.append(Us[4], {"chain": 0, "step": 5, "accepted": 1, "multiplicity": 1, "S": -4.0, "plaquette": 0.5})
    w2.commit()
    ens.refresh()
    r = ens.records(0)
    assert list(r["step"]) == [1, 2, 3, 4, 5] and list(r["accepted"]) == [1, 1, 1, 0, 1]
    assert np.isnan(r["log_q"]).all()
    for i, U in enumerate(Us):
        V = ens.config(0, i)
        assert V.dtype == dtype and torch.equal(V, U)
        # the stored checksum is the SciDAC checksum of the ILDG byte layout (4D SU(3))
        if dtype == torch.complex128:
            a, b = ildg_checksum(U)
            assert int(r["checksum"][i]) == (a << 32) | b
        assert int(r["checksum"][i]) == field_checksum(U, lat)
    assert ens.attrs["beta"] == 6.0 and ens.attrs["config_yaml"] == "a: 1\n"
    assert "5 configurations in 2 segments" in ensemble_info(root)


def test_abort_and_corrupted_segment(tmp_path) -> None:
    lat = Lattice((4, 4))
    U = _fields(1, (4, 4), "u1")[0]
    root = str(tmp_path / "ens")
    w = SegmentWriter(root, 0, 0, lat, 2, torch.complex128, 1, {})
    w.append(U, {"step": 1})
    w.abort()
    assert os.listdir(os.path.join(root, "chain000")) == []
    w = SegmentWriter(root, 0, 0, lat, 1, torch.complex128, 1, {})
    w.append(U, {"step": 1})
    path = w.commit()
    with open(path, "r+b") as fh:  # destroy the superblock
        fh.write(b"\0" * 64)
    with pytest.raises(EnsembleError, match="corrupted"):
        open_ensemble(root)
    with pytest.raises(EnsembleError, match="no such ensemble"):
        open_ensemble(tmp_path / "nothing")


def test_checksum_is_decomposition_independent() -> None:
    """Partial checksums of two halo-padded halves XOR to the whole-lattice checksum."""
    from hpcflow.comm.fields import local_from_global

    shape = (4, 6)
    U = _fields(1, shape, "su2")[0]
    whole = field_checksum(U, Lattice(shape))
    parts = []
    for origin in ((0, 0), (0, 3)):
        lat = Lattice(shape, (4, 3), origin, halo=1, padded_dims=(1,))
        parts.append(field_checksum(local_from_global(U, lat), lat))
    a = (parts[0] >> 32) ^ (parts[1] >> 32)
    b = (parts[0] & 0xFFFFFFFF) ^ (parts[1] & 0xFFFFFFFF)
    assert (a << 32) | b == whole


def test_stop_flag_catches_signals_and_restores_handlers() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    with StopFlag() as flag:
        assert not flag.stop_requested
        os.kill(os.getpid(), signal.SIGUSR1)
        assert flag.stop_requested and flag.signal_name == "SIGUSR1"
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal keeps the first name
        assert flag.signal_name == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before
    with pytest.raises(ValueError, match="unknown signal"):
        StopFlag(("SIGNOPE",))


def test_export_from_ensemble_and_measure(tmp_path) -> None:
    """ILDG export of a stored 4D SU(3) configuration reads back identical; measure matches numpy."""
    from hpcflow.analysis.ensemble import measure_ensemble
    from hpcflow.io import export_ildg, read_ildg

    shape = (2, 2, 2, 4)
    lat = Lattice(shape)
    Us = _fields(4, shape)
    root = str(tmp_path / "ens")
    w = SegmentWriter(root, 0, 0, lat, 4, torch.complex128, 3, {"beta": 6.0})
    plaqs = [0.1, 0.4, 0.2, 0.3]
    for s, U in enumerate(Us):
        w.append(U, {"chain": 0, "step": s + 1, "accepted": 1, "S": -float(s), "plaquette": plaqs[s]})
    w.commit()
    ck = export_ildg(root, tmp_path / "c.lime", index=2)
    V, meta = read_ildg(tmp_path / "c.lime")
    assert torch.equal(V, Us[2]) and meta["checksum"] == ck and meta["info"]["step"] == "3"
    m = measure_ensemble(root)["observables"]
    assert m["plaquette"]["mean"] == pytest.approx(np.mean(plaqs), abs=1e-15) and m["plaquette"]["n"] == 4
    assert "plaquette_reweighted" not in m  # baseline rows carry no log w
