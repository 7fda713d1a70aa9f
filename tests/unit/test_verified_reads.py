"""Verified reads (issue 18, items 2, 6 and 8): every read of an ensemble checks the stored
per-configuration SciDAC checksum and the segment digest over the row columns; resume refuses
a foreign, truncated or corrupt tail; export, import and corrupt metadata give one line.

The corruptions are real: a byte flipped in the HDF5 file at the offset of ``U[row]`` (or of a
row column), a segment file cut in half, a segment copied in from a run at another beta.
"""

from __future__ import annotations

import os
import shutil
import warnings

import h5py
import numpy as np
import pytest
import torch

from hpcflow.io.ensemble import (
    EnsembleError,
    EnsembleIndexError,
    SegmentWriter,
    UnverifiedSegmentWarning,
    array_checksum,
    check_tail,
    committed_segments,
    ensemble_info,
    export_ildg,
    field_checksum,
    open_ensemble,
    segment_path,
    verify_ensemble,
)
from hpcflow.io.ildg import ILDGError, check_links, read_ildg, write_ildg
from hpcflow.lattice import Lattice, get_group, random_field
from hpcflow.rng import CounterRNG
from hpcflow.run.cli import EXIT_BAD_INPUT, main

SHAPE = (2, 2, 2, 4)


def _write(root: str, segs: tuple[int, ...] = (3, 3), shape=SHAPE, group: str = "su3", beta: float = 6.0,
           fp: str = "fpA", seed: int = 3, dtype=torch.complex128) -> list[torch.Tensor]:
    """An ensemble of one chain with segments of ``segs`` rows; returns the configurations."""
    lat = Lattice(shape)
    g = get_group(group)
    attrs = {"group": group, "lattice": list(shape), "beta": beta, "config_yaml": f"beta: {beta}\n"}
    out, step = [], 0
    for k, n in enumerate(segs):
        w = SegmentWriter(root, 0, k, lat, n, dtype, g.N, attrs, fingerprint=fp)
        for _ in range(n):
            step += 1
            U = random_field(lat, g, CounterRNG(seed, stream=1), step=step, dtype=dtype)
            w.append(U, {"chain": 0, "step": step, "accepted": 1, "multiplicity": 1, "S": -float(step),
                         "plaquette": 0.1 * step})
            out.append(U)
        w.commit()
    return out


def _flip(path: str, dataset: str, row: int, byte: int = 37) -> None:
    """Flip one bit of the file at the ``byte``-th byte of ``dataset[row]`` (a real bit flip)."""
    with h5py.File(path, "r") as f:
        ds = f[dataset]
        off = ds.id.get_offset()
        row_bytes = int(np.prod(ds.shape[1:], dtype=np.int64)) * ds.dtype.itemsize
    assert off is not None
    with open(path, "r+b") as fh:
        fh.seek(off + row * row_bytes + byte)
        b = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([b[0] ^ 0x10]))


def _one_line_exit_2(argv: list[str], capsys, *fragments: str) -> str:  # type: ignore[no-untyped-def]
    assert main(argv) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for fr in fragments:
        assert fr in err, (fr, err)
    return err


# ---- verified reads -----------------------------------------------------------------------
def test_clean_ensemble_reads_and_verifies(tmp_path) -> None:
    root = str(tmp_path / "ens")
    Us = _write(root)
    assert verify_ensemble(root) == []
    ens = open_ensemble(root)
    r = ens.records(0)
    assert list(r["step"]) == [1, 2, 3, 4, 5, 6]
    for i, U in enumerate(Us):
        assert torch.equal(ens.config(0, i), U)
        assert array_checksum(ens.config(0, i).numpy()) == field_checksum(U, Lattice(SHAPE)) == int(r["checksum"][i])
    with h5py.File(segment_path(root, 0, 1), "r") as f:
        assert f.attrs["digest"].startswith("sha256:") and f.attrs["config_fingerprint"] == "fpA"
        assert f.attrs["segment_format"] == 2 and f["row_digest"].shape == (3,)
    check_tail(root, 0, "fpA", n_segments=2, n_rows=6)
    assert "verified: 6 configurations" in ensemble_info(root)


def test_bit_flip_in_U_fails_every_reader_naming_segment_and_row(tmp_path, capsys) -> None:
    from hpcflow.analysis.ensemble import measure_ensemble

    root = str(tmp_path / "ens")
    Us = _write(root)
    seg = segment_path(root, 0, 1)
    _flip(seg, "U", 1)  # chain row 4, step 5
    where = f"{seg}: row 1 (step 5): configuration checksum mismatch"
    for read in (lambda: open_ensemble(root).records(0), lambda: measure_ensemble(root),
                 lambda: ensemble_info(root), lambda: open_ensemble(root).config(0, 4),
                 lambda: list(open_ensemble(root).iter_configs(0)),
                 lambda: export_ildg(root, tmp_path / "x.lime", index=4)):
        with pytest.raises(EnsembleError) as ei:
            read()
        assert str(ei.value).startswith(where) and "\n" not in str(ei.value)
    assert not os.path.exists(tmp_path / "x.lime")
    # the other configurations still read (verify="rows": only what is returned is checked)
    ens = open_ensemble(root, verify="rows")
    assert torch.equal(ens.config(0, 3), Us[3]) and len(ens.records(0)["step"]) == 6
    assert export_ildg(root, tmp_path / "ok.lime", index=3) == read_ildg(tmp_path / "ok.lime")[1]["checksum"]
    probs = verify_ensemble(root)
    assert len(probs) == 1 and probs[0].startswith(where) and probs[0].endswith("U is corrupted")
    for argv in (["measure", root], ["ensemble", "info", root],
                 ["export", root, str(tmp_path / "y.lime"), "--index", "4"]):
        _one_line_exit_2(argv, capsys, seg, "row 1 (step 5)")
    with pytest.raises(EnsembleError, match="row 1 \\(step 5\\).*refusing to resume chain 0.*aside"):
        check_tail(root, 0, "fpA", n_segments=2, n_rows=6)


def test_bit_flip_in_a_row_column_names_the_row(tmp_path, capsys) -> None:
    root = str(tmp_path / "ens")
    _write(root)
    seg = segment_path(root, 0, 0)
    _flip(seg, "S", 2, byte=6)
    probs = verify_ensemble(root)
    assert probs == [f"{seg}: row 2 (step 3): the row columns do not match their digest "
                     "(S, plaquette, step, checksum... were altered)"]
    with pytest.raises(EnsembleError, match="row 2 \\(step 3\\): the row columns"):
        open_ensemble(root, verify="rows").records(0)
    _one_line_exit_2(["measure", root], capsys, seg, "row 2")
    # an altered row count (attribute) is caught by the segment digest
    root2 = str(tmp_path / "ens2")
    _write(root2)
    with h5py.File(segment_path(root2, 0, 1), "r+") as f:
        f.attrs["n_rows"] = 2
    assert verify_ensemble(root2) == [f"{segment_path(root2, 0, 1)}: the segment digest does not match its rows "
                                      "and header (row count, chain, segment number or config fingerprint were "
                                      "altered)"]


def test_truncated_segment(tmp_path, capsys) -> None:
    root = str(tmp_path / "ens")
    _write(root)
    seg = segment_path(root, 0, 1)
    size = os.path.getsize(seg)
    with open(seg, "r+b") as fh:
        fh.truncate(size // 2)
    with pytest.raises(EnsembleError, match="truncated or corrupted"):
        open_ensemble(root)
    _one_line_exit_2(["ensemble", "info", root], capsys, seg, "truncated")
    assert len(verify_ensemble(root)) == 1 and verify_ensemble(root)[0].startswith(seg)
    with pytest.raises(EnsembleError, match=f"{seg}: cannot open.*refusing to resume chain 0.*move .* aside"):
        check_tail(root, 0, "fpA", n_segments=2, n_rows=6, checkpoint="/x/chain000.ckpt")


def test_segment_copied_from_another_run(tmp_path, capsys) -> None:
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _write(a, segs=(3, 3, 3), beta=6.0, fp="fpA")
    _write(b, segs=(3, 3, 3), beta=6.5, fp="fpB", seed=4)
    seg = segment_path(a, 0, 2)
    shutil.copyfile(segment_path(b, 0, 2), seg)  # same chain and number: its own digest is fine
    with pytest.raises(EnsembleError, match="written by another configuration.*beta 6.5 vs 6.0"):
        open_ensemble(a)
    _one_line_exit_2(["measure", a], capsys, seg, "another configuration")
    assert [p.split(":")[0] for p in verify_ensemble(a)] == [seg]
    with pytest.raises(EnsembleError, match=f"{seg}: written by another configuration.*this run fpA.*beta 6.5"):
        check_tail(a, 0, "fpA", n_segments=3, n_rows=9)
    # a one-segment chain has nothing to compare with: the resume's fingerprint catches it
    c = str(tmp_path / "c")
    _write(c, segs=(2,), fp="fpB", beta=6.5)
    with pytest.raises(EnsembleError, match="another configuration"):
        check_tail(c, 0, "fpA", n_segments=1)
    # a segment renamed within its chain
    d = str(tmp_path / "d")
    _write(d, segs=(2, 2, 2))
    os.replace(segment_path(d, 0, 2), segment_path(d, 0, 1))
    with pytest.raises(EnsembleError, match="chain 0 segment 2, but it sits at chain 0 segment 1"):
        open_ensemble(d)


def test_check_tail_counts_and_legacy_segments(tmp_path) -> None:
    root = str(tmp_path / "ens")
    _write(root)
    with pytest.raises(EnsembleError, match="expects 3 committed segments, found 2"):
        check_tail(root, 0, "fpA", n_segments=3)
    with pytest.raises(EnsembleError, match="expects 7 committed configurations, the segments hold 6"):
        check_tail(root, 0, "fpA", n_rows=7)
    # a segment written without a fingerprint: accepted on the checkpoint's fingerprint, with a warning
    nofp = str(tmp_path / "nofp")
    _write(nofp, segs=(2,), fp="")
    assert verify_ensemble(nofp) == []
    with pytest.warns(UnverifiedSegmentWarning, match="no config fingerprint recorded"):
        check_tail(nofp, 0, "fpA", n_segments=1, n_rows=2)
    # a format-1 segment (no digest, no fingerprint): read with one warning, configurations still checked
    for k in (0, 1):
        with h5py.File(segment_path(root, 0, k), "r+") as f:
            for a in ("digest", "config_fingerprint", "segment_format"):
                del f.attrs[a]
            del f["row_digest"]
    with pytest.warns(UnverifiedSegmentWarning, match="and 1 more segments: no segment digest"):
        ens = open_ensemble(root)
    assert len(ens.records(0)["step"]) == 6
    assert [p.split(": ", 1)[1] for p in verify_ensemble(root)] == [
        "no segment digest (written before segment format 2): its row columns cannot be verified"] * 2
    with pytest.warns(UnverifiedSegmentWarning, match="no config fingerprint recorded.*fingerprint alone"):
        check_tail(root, 0, "fpA", n_segments=2, n_rows=6)
    _flip(segment_path(root, 0, 1), "U", 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnverifiedSegmentWarning)
        with pytest.raises(EnsembleError, match="row 2 \\(step 6\\): configuration checksum mismatch"):
            open_ensemble(root).records(0)
        with pytest.raises(EnsembleError, match="row 2 \\(step 6\\)"):
            check_tail(root, 0, "fpA")


def test_float32_ensemble_checksums(tmp_path) -> None:
    root = str(tmp_path / "ens")
    Us = _write(root, segs=(2,), dtype=torch.complex64)
    assert verify_ensemble(root) == []
    assert torch.equal(open_ensemble(root).config(0, 1), Us[1])
    _flip(segment_path(root, 0, 0), "U", 0, byte=5)
    assert "row 0 (step 1): configuration checksum mismatch" in verify_ensemble(root)[0]


# ---- corrupt metadata: one line, never a traceback --------------------------------------------
def _drop_dataset(f) -> None:  # type: ignore[no-untyped-def]
    del f["step"]


def _bad_n_rows(f) -> None:  # type: ignore[no-untyped-def]
    f.attrs["n_rows"] = 10**6


def _text_n_rows(f) -> None:  # type: ignore[no-untyped-def]
    f.attrs["n_rows"] = "many"


def _no_n_rows(f) -> None:  # type: ignore[no-untyped-def]
    del f.attrs["n_rows"]


def _bad_lattice(f) -> None:  # type: ignore[no-untyped-def]
    f.attrs["lattice"] = [3, 3, 3, 3]


def _real_U(f) -> None:  # type: ignore[no-untyped-def]
    del f["U"]
    f.create_dataset("U", data=np.zeros((3, 4)))


def _bad_digest(f) -> None:  # type: ignore[no-untyped-def]
    f.attrs["digest"] = np.arange(3)


@pytest.mark.parametrize("damage,fragment", [
    (_drop_dataset, "no dataset 'step'"), (_bad_n_rows, "n_rows = 1000000 does not fit"),
    (_text_n_rows, "n_rows is not an integer"), (_no_n_rows, "no attribute 'n_rows'"),
    (_bad_lattice, "does not hold configurations of the lattice [3, 3, 3, 3]"),
    (_real_U, "dataset U has shape (3, 4)"), (_bad_digest, "digest is not a string")])
def test_corrupt_metadata_is_one_line(tmp_path, capsys, damage, fragment) -> None:  # type: ignore[no-untyped-def]
    root = str(tmp_path / "ens")
    _write(root)
    seg = segment_path(root, 0, 1)
    with h5py.File(seg, "r+") as f:
        damage(f)
    with pytest.raises(EnsembleError) as ei:
        open_ensemble(root)
    assert str(ei.value).startswith(seg) and fragment in str(ei.value)
    for argv in (["ensemble", "info", root], ["measure", root], ["export", root, str(tmp_path / "o.lime")]):
        _one_line_exit_2(argv, capsys, seg, fragment)
    assert any(fragment in p for p in verify_ensemble(root))


def test_verify_reports_layout_problems(tmp_path) -> None:
    root = str(tmp_path / "ens")
    _write(root, segs=(2, 2, 2))
    assert verify_ensemble(str(tmp_path / "none")) == [f"{tmp_path / 'none'}: no such ensemble directory"]
    os.replace(segment_path(root, 0, 1), str(tmp_path / "aside.h5"))
    os.symlink(str(tmp_path / "aside.h5"), segment_path(root, 0, 1))
    assert verify_ensemble(root) == [f"{segment_path(root, 0, 1)}: not a regular file (committed segments are "
                                     "regular files)"]
    os.unlink(segment_path(root, 0, 1))
    probs = verify_ensemble(root)
    assert len(probs) == 1 and "seg000002.h5: segment out of sequence (expected seg000001.h5" in probs[0]
    with pytest.raises(EnsembleError, match="out of sequence"):
        check_tail(root, 0, "fpA")


# ---- export errors ------------------------------------------------------------------------
def test_export_errors_are_one_line(tmp_path, capsys) -> None:
    root = str(tmp_path / "ens")
    Us = _write(root)
    out = tmp_path / "cfg.lime"
    out.write_bytes(b"precious")
    with pytest.raises(EnsembleError, match="exists; refusing to overwrite"):
        export_ildg(root, out)
    _one_line_exit_2(["export", root, str(out)], capsys, str(out), "refusing to overwrite")
    assert out.read_bytes() == b"precious"
    assert main(["export", root, str(out), "--overwrite", "--index", "2"]) == 0
    assert torch.equal(read_ildg(out)[0], Us[2])
    with pytest.raises(EnsembleIndexError, match="index 6 out of range: chain 0 has 6 committed") as ei:
        export_ildg(root, tmp_path / "n.lime", index=6)
    assert isinstance(ei.value, IndexError)
    _one_line_exit_2(["export", root, str(tmp_path / "n.lime"), "--index", "-7"], capsys, "index -7 out of range")
    _one_line_exit_2(["export", root, str(tmp_path / "n.lime"), "--chain", "4"], capsys, "no chain 4")
    _one_line_exit_2(["export", root, str(tmp_path / "nodir" / "n.lime")], capsys, "no such directory")
    u1 = str(tmp_path / "u1")
    _write(u1, segs=(2,), shape=(4, 4), group="u1")
    _one_line_exit_2(["export", u1, str(tmp_path / "u.lime")], capsys, "holds u1 configurations of shape (2, 4, 4, 1, 1)",
                     "4D SU(3) only")
    su2 = str(tmp_path / "su2")
    _write(su2, segs=(1,), shape=(2, 2, 2, 2), group="su2")
    _one_line_exit_2(["export", su2, str(tmp_path / "s.lime")], capsys, "holds su2", "4D SU(3) only")
    assert not any(os.path.exists(tmp_path / n) for n in ("n.lime", "u.lime", "s.lime"))


def test_write_ildg_never_replaces_a_file_created_meanwhile(tmp_path, monkeypatch) -> None:
    """overwrite=False publishes with link(): a file that appears at the target while the
    export is written is not replaced (no check-then-rename race)."""
    from hpcflow.io import checkpoint

    U = _write(str(tmp_path / "ens"), segs=(1,))[0]
    target = tmp_path / "c.lime"
    real = checkpoint._create_temp

    def racing(d: str, base: str):  # type: ignore[no-untyped-def]
        target.write_bytes(b"other")  # appears after the existence check
        return real(d, base)

    monkeypatch.setattr(checkpoint, "_create_temp", racing)
    with pytest.raises(FileExistsError):
        write_ildg(target, U)
    assert target.read_bytes() == b"other"
    assert sorted(os.listdir(tmp_path)) == ["c.lime", "ens"]


# ---- import: checked links (item 8) and bad extents (item 6) --------------------------------------
def _ildg_with(tmp_path, name: str, arr: np.ndarray | None = None, dims=None, precision: int = 64) -> str:  # type: ignore[no-untyped-def]
    """A LIME file with ildg-format extents ``dims`` and the given site array (no checksum record)."""
    from hpcflow.io.ildg import _format_xml
    from hpcflow.io.lime import write_lime

    if arr is None:
        arr = np.zeros(0, dtype=">c16")
    dims = dims if dims is not None else tuple(reversed(arr.shape[:4]))
    p = str(tmp_path / name)
    with open(p, "wb") as fh:
        write_lime(fh, [("ildg-format", _format_xml(dims, precision)),
                        ("ildg-binary-data", arr.astype(">c16" if precision == 64 else ">c8").tobytes())])
    return p


def _site_array(seed: int = 1) -> np.ndarray:
    U = random_field(Lattice((2, 2, 2, 2)), get_group("su3"), CounterRNG(seed))
    return U.permute(4, 3, 2, 1, 0, 5, 6).contiguous().numpy()


def test_import_refuses_bad_extents_values_and_links(tmp_path, capsys) -> None:
    good = _ildg_with(tmp_path, "good.lime", _site_array())
    assert main(["import", good]) == 0
    capsys.readouterr()
    for dims, what in (((0, 2, 2, 2), "lx=0"), ((-2, -2, 2, 2), "lx=-2 ly=-2"), ((2, 2, -1, 2), "lz=-1")):
        p = _ildg_with(tmp_path, f"d{abs(hash(dims))}.lime", dims=dims)
        with pytest.raises(ILDGError, match="allowed: positive integers"):
            read_ildg(p)
        _one_line_exit_2(["import", p], capsys, p, what, "positive integers")
    arr = _site_array()
    arr[1, 0, 1, 0, 2, 1, 0] = complex(np.nan, 0.0)
    p = _ildg_with(tmp_path, "nan.lime", arr)
    _one_line_exit_2(["import", p], capsys, "1 links hold non-finite values", "link (x=0, y=1, z=0, t=1; mu=2)")
    arr = _site_array()
    arr[0, 0, 0, 1, 3] *= 1.0 + 1e-6
    p = _ildg_with(tmp_path, "nonunitary.lime", arr)
    _one_line_exit_2(["import", p], capsys, "1 links are not unitary", "link (x=1, y=0, z=0, t=0; mu=3)",
                     "allowed <= 1e-09 at precision 64")
    arr = _site_array()
    arr[0, 1, 0, 0, 0] *= np.exp(2j * np.pi / 7)  # unitary, det != 1
    p = _ildg_with(tmp_path, "u3.lime", arr)
    _one_line_exit_2(["import", p], capsys, "not in SU(3)", "max |det U - 1|")
    # single precision: rounding passes, a real deviation does not
    p = _ildg_with(tmp_path, "f32.lime", _site_array(), precision=32)
    assert read_ildg(p)[1]["precision"] == 32
    arr = _site_array().astype(np.complex64)
    arr[0, 0, 0, 0, 0] *= np.float32(1.001)
    with pytest.raises(ILDGError, match="allowed <= 1e-05 at precision 32"):
        check_links("x", arr, 32)
    # verify=False reads what is there (the library's escape hatch), the CLI always verifies
    assert read_ildg(_ildg_with(tmp_path, "nan2.lime", np.full((1, 1, 1, 1, 4, 3, 3), np.nan)),
                     verify=False)[0].isnan().all()


def test_import_roundtrip_of_an_export_passes_the_checks(tmp_path) -> None:
    U = random_field(Lattice(SHAPE), get_group("su3"), CounterRNG(9))
    for prec in (64, 32):
        p = tmp_path / f"e{prec}.lime"
        write_ildg(p, U, precision=prec)
        V, meta = read_ildg(p)
        assert meta["precision"] == prec and V.shape == U.shape
    committed_segments(str(tmp_path), 0)  # no chain: empty, no error


# ---- resume refuses a foreign, truncated or corrupt tail (hpcflow sample) ---------------------------
def _sample_cfg(out, beta: float = 2.0):  # type: ignore[no-untyped-def]
    from hpcflow.config import config_from_dict

    return config_from_dict({
        "lattice": {"shape": [6, 6]}, "group": "u1", "algorithm": "heatbath", "seed": 11,
        "action": {"beta": beta}, "run": {"n_therm": 2, "n_steps": 9, "measure_every": 1},
        "sample": {"checkpoint_every": 4}, "output": {"dir": str(out)}})


def _stopped_run(out, beta: float = 2.0):  # type: ignore[no-untyped-def]
    """A sample run stopped after step 7: segments of 4 and 1 rows, exit 3."""
    from hpcflow.run.sample import EXIT_RESUMABLE, sample
    from hpcflow.signals import StopFlag

    class StopAfter(StopFlag):
        left = 6

        @property  # type: ignore[override]
        def stop_requested(self) -> bool:
            self.left -= 1
            return self.left < 0

        @stop_requested.setter
        def stop_requested(self, v: bool) -> None:
            pass

    cfg = _sample_cfg(out, beta)
    assert sample(cfg, use_mpi=False, stop=StopAfter()) == EXIT_RESUMABLE
    return cfg


def _tree(d) -> dict[str, bytes]:  # type: ignore[no-untyped-def]
    out = {}
    for dd, _, names in os.walk(d):
        for n in names:
            with open(os.path.join(dd, n), "rb") as fh:
                out[os.path.join(dd, n)] = fh.read()
    return out


@pytest.fixture(scope="module")
def sample_reference(tmp_path_factory):  # type: ignore[no-untyped-def]
    from hpcflow.run.sample import EXIT_OK, ensemble_dir, sample

    cfg = _sample_cfg(tmp_path_factory.mktemp("ref"))
    assert sample(cfg, use_mpi=False) == EXIT_OK
    ens = open_ensemble(ensemble_dir(cfg))
    return ens.records(0), [U for _, U in ens.iter_configs(0)]


@pytest.mark.parametrize("damage", ["bit flip", "truncated", "other beta"])
def test_resume_refuses_a_bad_tail_and_appends_nothing(tmp_path, capsys, sample_reference, damage: str) -> None:
    from hpcflow.run.sample import EXIT_OK, chain_checkpoint_path, ensemble_dir, sample

    cfg = _stopped_run(tmp_path / "a")
    root = ensemble_dir(cfg)
    seg = segment_path(root, 0, 1)  # the tail: one row, step 7
    original = open(seg, "rb").read()
    if damage == "bit flip":
        _flip(seg, "U", 0)
        expect = f"{seg}: row 0 (step 7): configuration checksum mismatch"
    elif damage == "truncated":
        with open(seg, "r+b") as fh:
            fh.truncate(len(original) - 100)
        expect = f"{seg}: cannot open ensemble segment"
    else:
        other = _stopped_run(tmp_path / "b", beta=2.5)
        shutil.copyfile(segment_path(ensemble_dir(other), 0, 1), seg)
        expect = f"{seg}: written by another configuration"
    before = _tree(tmp_path / "a")
    with pytest.raises(EnsembleError) as ei:
        sample(cfg, use_mpi=False)
    msg = str(ei.value)
    assert msg.startswith(expect) and "\n" not in msg, msg
    assert f"move {os.path.join(root, 'chain000')} and {chain_checkpoint_path(cfg, 0)} aside" in msg
    assert _tree(tmp_path / "a") == before  # nothing appended, nothing rewritten
    assert len(committed_segments(root, 0)) == 2
    # the same through the entry point: one line, exit 2
    from hpcflow.run.sample import main as sample_main

    cfg_file = tmp_path / "run.yaml"
    from hpcflow.config import to_yaml

    cfg_file.write_text(to_yaml(cfg))
    capsys.readouterr()
    assert sample_main([str(cfg_file)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"hpcflow: {expect}"), err
    assert _tree(tmp_path / "a") == before
    # the original file back: the resume continues to the uninterrupted ensemble
    with open(seg, "wb") as fh:
        fh.write(original)
    assert sample(cfg, use_mpi=False) == EXIT_OK
    ens = open_ensemble(root)
    ref_rows, ref_U = sample_reference
    for k in ref_rows:
        np.testing.assert_array_equal(ens.records(0)[k], ref_rows[k], err_msg=k)
    assert all(torch.equal(a, b) for (_, a), b in zip(ens.iter_configs(0), ref_U))
    assert verify_ensemble(root) == []
