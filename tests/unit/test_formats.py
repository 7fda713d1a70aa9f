"""Export/import of gauge configurations (issue 20, item 4): ILDG ranges with LFN patterns and
QCDml metadata, NERSC and openQCD, each checked by a reader that is not hpcflow's.

Independent readers: lyncs-io 0.2.3 for ILDG and openQCD (its own venv, see test_ildg.py; its
openQCD reordering is lyncs' C++ header ``lyncs_io/include/openqcd.h``, compiled here with g++
because lyncs loads it through cppyy, which the venv lacks); for NERSC, which no installable
package reads without MPI/GPU stacks, a reader written below from the published format (header
keys, big-endian x-fastest site order, 32-bit word checksum, plaquette and link trace / 3);
for QCDml's crcCheckSum the coreutils ``cksum`` program. The lattice 4x6x8x10 has four
different, even extents (openQCD needs even ones), none of them 2, so any axis or direction
mix-up changes the bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import textwrap
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from test_ildg import _READ, _lyncs_python  # the independent ILDG reader and its venv

from hpcflow.io import ensemble as ensemble_mod
from hpcflow.io.ensemble import EnsembleError, EnsembleIndexError, SegmentWriter
from hpcflow.io.export import ExportError, export_configs, read_gauge_file, select_indices, sniff_format
from hpcflow.io.ildg import ildg_site_array, posix_cksum, read_ildg
from hpcflow.io.lime import read_lime_payload, read_lime_records
from hpcflow.io.nersc import NERSCError, read_nersc, write_nersc
from hpcflow.io.openqcd import OpenQCDError, from_openqcd_links, read_openqcd, to_openqcd_links, write_openqcd
from hpcflow.io.qcdml import CONFIG_NS, ENSEMBLE_NS
from hpcflow.lattice import Lattice, average_plaquette, get_group, random_field
from hpcflow.rng import CounterRNG
from hpcflow.run.cli import EXIT_BAD_INPUT, main

SHAPE = (4, 6, 8, 10)  # (x, y, z, t): all different, all even, none 2


def su3(shape: tuple[int, ...] = SHAPE, seed: int = 5, step: int = 1) -> torch.Tensor:
    return random_field(Lattice(shape), get_group("su3"), CounterRNG(seed, stream=2), step=step)


def make_ensemble(root: str, n: int = 5, shape: tuple[int, ...] = SHAPE, group: str = "su3") -> list[torch.Tensor]:
    """One chain of ``n`` configurations (steps 10, 20, ...) in two segments."""
    lat, g = Lattice(shape), get_group(group)
    attrs = {"group": group, "lattice": list(shape), "beta": 5.7, "algorithm": "hmc", "seed": 11,
             "hpcflow_version": "0.1.0"}
    out: list[torch.Tensor] = []
    sizes = [n - n // 2, n // 2] if n > 1 else [1]
    for k, m in enumerate(sizes):
        w = SegmentWriter(root, 0, k, lat, m, torch.complex128, g.N, attrs, fingerprint="fp")
        for _ in range(m):
            U = random_field(lat, g, CounterRNG(11, stream=1), step=len(out) + 1)
            w.append(U, {"chain": 0, "step": 10 * (len(out) + 1), "accepted": 1, "multiplicity": 1,
                         "plaquette": float(average_plaquette(U, lat))})
            out.append(U)
        w.commit()
    return out


def one_line_exit_2(argv: list[str], capsys, *fragments: str) -> str:  # type: ignore[no-untyped-def]
    assert main(argv) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for fr in fragments:
        assert fr in err, (fr, err)
    return err


# ---- independent pieces (numpy only, from the published descriptions) ---------------------------
def np_plaquette(a: np.ndarray) -> float:
    """Re tr P / 3 averaged over sites and the 6 planes; ``a`` (t, z, y, x, mu, 3, 3), mu = x, y, z, t."""
    axis = {0: 3, 1: 2, 2: 1, 3: 0}  # direction -> array axis of (t, z, y, x)

    def dag(m: np.ndarray) -> np.ndarray:
        return np.conj(np.swapaxes(m, -1, -2))

    tot = 0.0
    for mu in range(4):
        for nu in range(mu + 1, 4):
            umu, unu = a[..., mu, :, :], a[..., nu, :, :]
            p = umu @ np.roll(unu, -1, axis=axis[mu]) @ dag(np.roll(umu, -1, axis=axis[nu])) @ dag(unu)
            tot += float(np.trace(p, axis1=-2, axis2=-1).real.mean())
    return tot / 6 / 3


def np_link_trace(a: np.ndarray) -> float:
    return float(np.trace(a, axis1=-2, axis2=-1).real.mean() / 3)


def nersc_reference_read(path: str) -> tuple[dict[str, str], np.ndarray]:
    """A NERSC reader from the format description: ``(header, links (t, z, y, x, mu, 3, 3))``;
    asserts the checksum (32-bit words of the data, mod 2^32), plaquette and link trace."""
    raw = open(path, "rb").read()
    end = raw.index(b"END_HEADER\n") + len(b"END_HEADER\n")
    lines = raw[:end].decode("ascii").splitlines()
    assert lines[0] == "BEGIN_HEADER" and lines[-1] == "END_HEADER"
    h = {k.strip(): v.strip() for k, v in (ln.split("=", 1) for ln in lines[1:-1])}
    lx, ly, lz, lt = (int(h[f"DIMENSION_{i}"]) for i in (1, 2, 3, 4))
    fp = h["FLOATING_POINT"]
    order = ">" if fp.endswith("BIG") else "<"
    bits = int(fp[4:6])
    rows = 3 if h["DATATYPE"] == "4D_SU3_GAUGE_3x3" else 2
    data = raw[end:]
    assert len(data) == lx * ly * lz * lt * 4 * rows * 3 * bits // 4
    assert int(np.frombuffer(data, order + "u4").astype(np.uint64).sum()) % 2**32 == int(h["CHECKSUM"], 16)
    a = np.frombuffer(data, order + ("c8" if bits == 32 else "c16")).reshape(lt, lz, ly, lx, 4, rows, 3)
    a = a.astype(np.complex128)
    if rows == 2:
        a = np.concatenate([a, np.conj(np.cross(a[..., 0, :], a[..., 1, :]))[..., None, :]], axis=-2)
    assert abs(np_plaquette(a) - float(h["PLAQUETTE"])) < 1e-6
    assert abs(np_link_trace(a) - float(h["LINK_TRACE"])) < 1e-6
    for k in ("HDR_VERSION", "STORAGE_FORMAT", "BOUNDARY_1", "BOUNDARY_4", "SEQUENCE_NUMBER", "ENSEMBLE_ID",
              "CREATOR", "CREATION_DATE", "ARCHIVE_DATE"):  # keys Grid's reader insists on
        assert k in h, k
    return h, a


def nersc_reference_write(path: str, U: torch.Tensor, rows: int = 3, bits: int = 64, order: str = ">",
                          fp: str | None = None) -> None:
    """Another code's NERSC file (two-row or full, 32/64 bit, either byte order)."""
    a = U.permute(4, 3, 2, 1, 0, 5, 6).numpy()  # (t, z, y, x, mu, 3, 3)
    data = np.ascontiguousarray(a[..., :rows, :]).astype(order + ("c8" if bits == 32 else "c16")).tobytes()
    ck = int(np.frombuffer(data, order + "u4").astype(np.uint64).sum()) % 2**32
    lx, ly, lz, lt = U.shape[1:5]
    fp = fp or f"IEEE{bits}{'BIG' if order == '>' else 'LITTLE'}"
    head = (f"BEGIN_HEADER\nHDR_VERSION = 1.0\nDATATYPE = {'4D_SU3_GAUGE_3x3' if rows == 3 else '4D_SU3_GAUGE'}\n"
            f"STORAGE_FORMAT = 1.0\nDIMENSION_1 = {lx}\nDIMENSION_2 = {ly}\nDIMENSION_3 = {lz}\nDIMENSION_4 = {lt}\n"
            f"CHECKSUM = {ck:x}\nLINK_TRACE = {np_link_trace(a):.10f}\nPLAQUETTE  = {np_plaquette(a):.10f}\n"
            "BOUNDARY_1 = PERIODIC\nBOUNDARY_2 = PERIODIC\nBOUNDARY_3 = PERIODIC\nBOUNDARY_4 = PERIODIC\n"
            f"ENSEMBLE_ID = other\nSEQUENCE_NUMBER = 7\nFLOATING_POINT = {fp}\nEND_HEADER\n")
    with open(path, "wb") as fh:
        fh.write(head.encode() + data)


def cksum_program(data: bytes, tmp_path) -> int:  # type: ignore[no-untyped-def]
    exe = shutil.which("cksum")
    if exe is None:
        pytest.fail("no cksum program (coreutils): only GPU tests may skip in this project")
    p = tmp_path / "payload.bin"
    p.write_bytes(data)
    return int(subprocess.run([exe, str(p)], check=True, capture_output=True, text=True).stdout.split()[0])


# ---- POSIX cksum (QCDml crcCheckSum) --------------------------------------------------------------
def _cksum_bitwise(data: bytes) -> int:
    crc = 0

    def feed(b: int) -> None:
        nonlocal crc
        crc ^= b << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) & 0xFFFFFFFF if crc & 0x80000000 else (crc << 1) & 0xFFFFFFFF

    for b in data:
        feed(b)
    n = len(data)
    while n:
        feed(n & 0xFF)
        n >>= 8
    return crc ^ 0xFFFFFFFF


@pytest.mark.parametrize("n", [0, 1, 3, 255, 256, 4097])
def test_posix_cksum_equals_coreutils_and_bitwise(tmp_path, monkeypatch, n: int) -> None:
    import hpcflow.io.ildg as ildg

    d = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes()
    assert posix_cksum(d) == _cksum_bitwise(d) == cksum_program(d, tmp_path)
    monkeypatch.setattr(ildg, "_CKSUM_CHUNK", 7)  # chunk boundaries inside the data
    assert posix_cksum(d) == _cksum_bitwise(d)


# ---- selection syntax -------------------------------------------------------------------------------
def test_select_indices() -> None:
    assert select_indices("all", 5) == [0, 1, 2, 3, 4]
    assert select_indices("-1", 5) == [4] and select_indices(2, 5) == [2]
    assert select_indices("0:10", 12) == list(range(10)) and select_indices("0:100:5", 100) == list(range(0, 100, 5))
    assert select_indices("-2:", 5) == [3, 4] and select_indices("::-2", 5) == [4, 2, 0]
    assert select_indices("3, 0:2, 1", 5) == [3, 0, 1]  # order kept, duplicates dropped
    with pytest.raises(EnsembleIndexError, match="index 5 out of range: chain 0 has 5 committed configurations "
                                                 "\\(allowed -5..4\\)"):
        select_indices("5", 5)
    with pytest.raises(EnsembleIndexError, match="index range 0:9 out of range"):
        select_indices("0:9", 5)
    with pytest.raises(ExportError, match="selects no configuration"):
        select_indices("2:2", 5)
    with pytest.raises(ExportError, match="step of a range must not be 0"):
        select_indices("0:4:0", 5)
    for bad in ("x", "1:2:3:4", "", "1.5"):
        with pytest.raises(ExportError, match="is not an index"):
            select_indices(bad, 5)
    with pytest.raises(EnsembleIndexError, match="no committed configurations"):
        select_indices("all", 0)


# ---- ILDG: ranges, LFN pattern, QCDml ------------------------------------------------------------------
def test_ildg_range_export_lfn_and_qcdml(tmp_path, monkeypatch) -> None:
    root = str(tmp_path / "ens")
    Us = make_ensemble(root)
    opened = []
    real_open = ensemble_mod.open_ensemble

    def counting_open(*a, **k):  # type: ignore[no-untyped-def]
        opened.append(a)
        return real_open(*a, **k)

    monkeypatch.setattr("hpcflow.io.export.open_ensemble", counting_open)
    (tmp_path / "md").mkdir()
    done = export_configs(root, str(tmp_path / "cfg_{index:03d}_s{step}.lime"), index="0:5:2",
                          lfn="lfn://ildg/COLLAB/ens1/cfg_{index}", markov_chain_uri="mc://ildg/COLLAB/ens1",
                          qcdml_dir=tmp_path / "md")
    assert len(opened) == 1  # one verified ensemble object serves every configuration
    assert [(d.index, d.step, os.path.basename(d.path)) for d in done] == [
        (0, 10, "cfg_000_s10.lime"), (2, 30, "cfg_002_s30.lime"), (4, 50, "cfg_004_s50.lime")]
    lat = Lattice(SHAPE)
    for d in done:
        V, meta = read_ildg(d.path)  # verifies the SciDAC checksum and the QCDml crcCheckSum
        assert torch.equal(V, Us[d.index])
        assert meta["lfn"] == f"lfn://ildg/COLLAB/ens1/cfg_{d.index}"
        q = meta["qcdml"]
        payload = read_lime_payload(d.path, next(r for r in read_lime_records(d.path)
                                                 if r.type == "ildg-binary-data"))
        assert int(q["crcCheckSum"]) == cksum_program(payload, tmp_path)  # coreutils cksum of the payload
        assert q["dataLFN"] == meta["lfn"] and q["markovChainURI"] == "mc://ildg/COLLAB/ens1"
        assert (q["series"], q["update"], q["field"], q["precision"]) == ("0", str(d.step), "su3gauge", "double")
        assert float(q["avePlaquette"]) == pytest.approx(float(average_plaquette(Us[d.index], lat)), abs=1e-14)
        # the catalogue copy is the embedded document; both are QCDml 2.0 configuration XML
        rec = next(r for r in read_lime_records(d.path) if r.type == "scidac-record-xml")
        doc = (tmp_path / "md" / (os.path.basename(d.path) + ".xml")).read_bytes()
        assert doc == read_lime_payload(d.path, rec)
        root_el = ET.fromstring(doc)
        assert root_el.tag == f"{{{CONFIG_NS}}}gaugeConfiguration"
        assert [c.tag.split("}")[1] for c in root_el] == ["dataLFN", "management", "implementation", "algorithm",
                                                          "precision", "markovSequence"]
    ens = ET.fromstring((tmp_path / "md" / "ensemble.xml").read_bytes())
    ns = {"q": ENSEMBLE_NS}
    assert ens.tag == f"{{{ENSEMBLE_NS}}}markovChain"
    assert [c.tag.split("}")[1] for c in ens] == ["markovChainURI", "management", "license", "physics", "algorithm"]
    size = ens.find("q:physics/q:size", ns)
    assert size is not None and [(c.tag.split("}")[1], c.text) for c in size] == [
        ("x", "4"), ("y", "6"), ("z", "8"), ("t", "10")]
    act = ens.find("q:physics/q:action/q:gluon/q:plaquetteGluonAction", ns)
    assert act is not None and act.findtext("q:beta", namespaces=ns) == "5.7"
    assert act.findtext("q:gluonField/q:gaugeGroup", namespaces=ns) == "SU(3)"
    assert ens.findtext("q:algorithm/q:name", namespaces=ns) == "HMC"
    assert ens.findtext("q:algorithm/q:exact", namespaces=ns) == "true"


def test_ildg_export_read_by_lyncs_io(tmp_path, capsys) -> None:
    """lyncs-io reads every file of a CLI range export (with the QCDml record) bit for bit."""
    py = _lyncs_python()
    root = str(tmp_path / "ens")
    Us = make_ensemble(root, n=3)
    assert main(["export", root, str(tmp_path / "c{index}.lime"), "--index", "all",
                 "--lfn", "lfn://x/{chain}/{index}"]) == 0
    assert capsys.readouterr().out.count("wrote ") == 3
    for i, U in enumerate(Us):
        out = tmp_path / f"l{i}.npy"
        r = subprocess.run([py, "-c", _READ, str(tmp_path / f"c{i}.lime"), str(out)], check=False,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        info = json.loads(r.stdout)
        lx, ly, lz, lt = SHAPE
        assert info["shape"] == [lt, lz, ly, lx, 4, 3, 3] and info["field"] == "su3gauge"
        assert torch.equal(torch.from_numpy(np.load(out)).permute(4, 3, 2, 1, 0, 5, 6), U)
        assert read_ildg(tmp_path / f"c{i}.lime")[1]["lfn"] == f"lfn://x/0/{i}"


def test_ildg_qcdml_crc_mismatch_is_one_line(tmp_path, capsys) -> None:
    root = str(tmp_path / "ens")
    make_ensemble(root, n=1)
    p = tmp_path / "c.lime"
    assert main(["export", root, str(p)]) == 0
    raw = bytearray(p.read_bytes())
    rec = next(r for r in read_lime_records(p) if r.type == "scidac-record-xml")
    doc = bytes(raw[rec.offset:rec.offset + rec.nbytes])
    crc = ET.fromstring(doc).findtext(f".//{{{CONFIG_NS}}}crcCheckSum")
    assert crc is not None
    bad = doc.replace(f">{crc}<".encode(), f">{(int(crc) + 1) % 2**32:0{len(crc)}d}<".encode())
    assert len(bad) == len(doc)
    raw[rec.offset:rec.offset + rec.nbytes] = bad
    p.write_bytes(bytes(raw))
    one_line_exit_2(["import", str(p)], capsys, "QCDml crcCheckSum mismatch")


# ---- NERSC ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", [64, 32])
def test_nersc_export_read_by_independent_reader(tmp_path, capsys, precision: int) -> None:
    root = str(tmp_path / "ens")
    Us = make_ensemble(root, n=3)
    assert main(["export", root, str(tmp_path / "c{index}.nersc"), "--format", "nersc", "--index", "0,2",
                 "--precision", str(precision)]) == 0
    assert "NERSC checksum" in capsys.readouterr().out
    assert not (tmp_path / "c1.nersc").exists()
    for i in (0, 2):
        p = str(tmp_path / f"c{i}.nersc")
        h, a = nersc_reference_read(p)
        V = torch.from_numpy(a).permute(4, 3, 2, 1, 0, 5, 6)
        expect = Us[i] if precision == 64 else Us[i].to(torch.complex64).to(torch.complex128)
        assert torch.equal(V, expect)
        assert h["FLOATING_POINT"] == f"IEEE{precision}BIG" and h["DATATYPE"] == "4D_SU3_GAUGE_3x3"
        assert [h[f"DIMENSION_{k}"] for k in (1, 2, 3, 4)] == ["4", "6", "8", "10"]
        assert h["SEQUENCE_NUMBER"] == str(10 * (i + 1))
        # the 3x3 big-endian data are the ILDG binary data: the same SciDAC checksums
        from hpcflow.io.ildg import ildg_checksum

        assert (int(h["SCIDAC_CHECKSUMA"], 16), int(h["SCIDAC_CHECKSUMB"], 16)) == ildg_checksum(Us[i], precision)
        U2, meta = read_nersc(p)  # hpcflow's own import: same links
        assert torch.equal(U2, expect) and meta["checksum"] == h["CHECKSUM"]


@pytest.mark.parametrize("rows,bits,order,fp", [(2, 32, ">", None), (3, 64, "<", None), (2, 64, ">", None),
                                                (3, 64, "<", "IEEE64"), (3, 32, ">", "IEEE32")])
def test_nersc_import_of_other_codes_files(tmp_path, capsys, rows: int, bits: int, order: str,
                                           fp: str | None) -> None:
    """Files written by the independent writer: two-row (third row rebuilt), 32/64 bit, both byte
    orders, and bare IEEE32/IEEE64 (byte order found from the checksum)."""
    U = su3(seed=9)
    p = str(tmp_path / "other.nersc")
    nersc_reference_write(p, U, rows=rows, bits=bits, order=order, fp=fp)
    V, meta = read_nersc(p)
    assert meta["byte_order"] == ("big" if order == ">" else "little") and meta["precision"] == bits
    tol = 1e-6 if bits == 32 else 1e-13
    assert float((V - U).abs().max()) < tol
    assert main(["import", p, "--format", "nersc"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["plaquette"] == pytest.approx(float(average_plaquette(U, Lattice(SHAPE))), abs=1e-6)
    assert out["dims"] == list(SHAPE)


def test_nersc_import_errors_are_one_line(tmp_path, capsys) -> None:
    U = su3()
    good = str(tmp_path / "good.nersc")
    write_nersc(good, U)
    raw = open(good, "rb").read()
    off = raw.index(b"END_HEADER\n") + 11

    def variant(name: str, data: bytes) -> str:
        p = str(tmp_path / name)
        open(p, "wb").write(data)
        return p

    h = dict(ln.split(" = ", 1) for ln in raw[:off].decode().splitlines()[1:-1])

    def header_value(key: str, value: str) -> bytes:
        return raw.replace(f"{key} = {h[key]}\n".encode(), f"{key} = {value}\n".encode())

    flipped = bytearray(raw)
    flipped[off + 1000] ^= 0x40
    cases = [
        (variant("flip", bytes(flipped)), "NERSC checksum mismatch"),
        (variant("trunc", raw[:-100]), "bytes of data after the header, expected"),
        (variant("plaq", header_value("PLAQUETTE", "0.5")), "NERSC plaquette mismatch"),
        (variant("ltr", header_value("LINK_TRACE", "0.25")), "NERSC link trace mismatch"),
        (variant("ck", header_value("CHECKSUM", "zz")), "not hexadecimal"),
        (variant("dim", header_value("DIMENSION_2", "7")), "expected"),
        (variant("dtype", raw.replace(b"4D_SU3_GAUGE_3x3", b"4D_SU2_GAUGE_2x2")), "supported: 4D_SU3_GAUGE_3x3"),
        (variant("fp", raw.replace(b"IEEE64BIG", b"IEEE16BIG")), "FLOATING_POINT 'IEEE16BIG'"),
        (variant("noend", raw[:off - 11]), "without END_HEADER"),
        (variant("junk", b"\0" * 64), "not a NERSC file"),
    ]
    for p, what in cases:
        with pytest.raises(NERSCError, match="^" + p):
            read_nersc(p)
        one_line_exit_2(["import", p, "--format", "nersc"], capsys, p, what)
    # a plaquette changed by 1e-7 is within Grid's tolerance (1e-5)
    near = header_value("PLAQUETTE", f"{float(h['PLAQUETTE']) + 1e-7:.12g}")
    assert torch.equal(read_nersc(variant("near", near))[0], U)
    one_line_exit_2(["import", good], capsys, "not a LIME file", "looks like NERSC: --format nersc")


# ---- openQCD -----------------------------------------------------------------------------------------
_OQ_LYNCS = textwrap.dedent("""
    import ctypes, json, os, subprocess, sys
    import numpy as np
    import lyncs_io
    from lyncs_io import openqcd
    so = sys.argv[3]
    if not os.path.exists(so):  # lyncs' own reordering code, compiled as it is
        inc = os.path.join(os.path.dirname(lyncs_io.__file__), "include")
        src = so + ".cpp"
        with open(src, "w") as f:
            f.write('#include <cstring>\\n#include "openqcd.h"\\n'
                    'extern "C" void from_openqcd_c(void* o, void* i, int n, int* d) '
                    '{ lyncs_io::from_openqcd(o, i, n, d); }\\n')
        subprocess.run(["g++", "-O1", "-shared", "-fPIC", "-I", inc, src, "-o", so + ".tmp"], check=True)
        os.replace(so + ".tmp", so)
    clib = ctypes.CDLL(so)
    class Lib:  # what lyncs' cppyy binding would call
        def from_openqcd(self, out, arr, ndims, dims):
            d = (ctypes.c_int * ndims)(*dims)
            clib.from_openqcd_c(out.ctypes.data_as(ctypes.c_void_p), arr.ctypes.data_as(ctypes.c_void_p), ndims, d)
    openqcd.lib = Lib()
    head = openqcd.head(sys.argv[1])
    arr = np.asarray(openqcd.load(sys.argv[1]))
    np.save(sys.argv[2], arr.astype("<c16"))
    print(json.dumps({"shape": list(head["shape"]), "plaq": head["plaq"]}))
""")


def _lyncs_openqcd(py: str, path: str, out: str) -> dict:
    if shutil.which("g++") is None:
        # only GPU tests may skip here; g++ is needed by the host kernels anyway
        pytest.fail("no g++ to compile lyncs-io's openqcd.h (lyncs loads it through cppyy)")
    cache = os.path.dirname(os.path.dirname(os.path.dirname(py)))  # the lyncs venv's cache folder
    so = os.path.join(cache, "lyncs-openqcd-reorder.so")
    r = subprocess.run([py, "-c", _OQ_LYNCS, path, out, so], check=False, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _openqcd_order(U: torch.Tensor) -> np.ndarray:
    """``U`` in lyncs' output layout (x0, x1, x2, x3, mu, 3, 3) with openQCD's axes: x0 = t,
    x1..x3 = x, y, z; direction 0 = t, 1..3 = x, y, z."""
    a = U.numpy()  # (mu, x, y, z, t, 3, 3)
    return np.stack([a[3], a[0], a[1], a[2]]).transpose(4, 1, 2, 3, 0, 5, 6)


def test_openqcd_export_read_by_lyncs_io(tmp_path, capsys) -> None:
    py = _lyncs_python()
    root = str(tmp_path / "ens")
    Us = make_ensemble(root, n=2)
    assert main(["export", root, str(tmp_path / "c{index}.oqcd"), "--format", "openqcd", "--index", "all"]) == 0
    assert capsys.readouterr().out.count("wrote ") == 2
    lx, ly, lz, lt = SHAPE
    for i, U in enumerate(Us):
        p = str(tmp_path / f"c{i}.oqcd")
        info = _lyncs_openqcd(py, p, str(tmp_path / f"l{i}.npy"))
        assert info["shape"] == [lt, lx, ly, lz, 4, 3, 3]  # N0 = time first
        # openQCD's plaquette: average Re tr P, not divided by 3
        assert info["plaq"] == pytest.approx(3 * float(average_plaquette(U, Lattice(SHAPE))), abs=1e-13)
        assert np.array_equal(np.load(tmp_path / f"l{i}.npy"), _openqcd_order(U))
        V, meta = read_openqcd(p)
        assert torch.equal(V, U) and meta["sizes"] == (lt, lx, ly, lz) and meta["dims"] == SHAPE


def test_openqcd_bytes_follow_readme_io(tmp_path) -> None:
    """Spec check without lyncs: header, and the 8 links of odd points at the offsets of
    openQCD's main/README.io (ix = x3 + N3 (x2 + N2 (x1 + N1 x0)), links +0, -0, ..., +3, -3)."""
    U = su3()
    p = str(tmp_path / "c.oqcd")
    plaq = write_openqcd(p, U)
    raw = open(p, "rb").read()
    lx, ly, lz, lt = SHAPE
    n0, n1, n2, n3 = lt, lx, ly, lz
    assert struct.unpack("<iiiid", raw[:24]) == (n0, n1, n2, n3, plaq)
    assert len(raw) == 24 + n0 * n1 * n2 * n3 // 2 * 8 * 144
    a = U.numpy()
    hp = (3, 0, 1, 2)  # openQCD direction -> hpcflow direction
    for x0, x1, x2, x3 in [(0, 0, 0, 1), (3, 2, 5, 5), (9, 3, 0, 1), (1, 1, 1, 0), (8, 3, 5, 7)]:
        assert (x0 + x1 + x2 + x3) % 2 == 1
        ix = x3 + n3 * (x2 + n2 * (x1 + n1 * x0))
        base = 24 + (ix // 2) * 8 * 144  # the odd points are every other point of an x3 line
        for k in range(4):
            c = [x0, x1, x2, x3]
            cm = list(c)
            cm[k] = (cm[k] - 1) % (n0, n1, n2, n3)[k]
            for j, (y0, y1, y2, y3) in enumerate((c, cm)):  # U(x, k) then U(x - k, k)
                m = np.frombuffer(raw, "<c16", 9, base + (2 * k + j) * 144).reshape(3, 3)
                assert np.array_equal(m, a[hp[k], y1, y2, y3, y0]), (c, k, j)


def test_openqcd_import_errors_are_one_line(tmp_path, capsys) -> None:
    U = su3()
    good = str(tmp_path / "good.oqcd")
    write_openqcd(good, U)
    raw = open(good, "rb").read()

    def variant(name: str, data: bytes) -> str:
        p = str(tmp_path / name)
        open(p, "wb").write(data)
        return p

    links = to_openqcd_links(U)
    lx, ly, lz, lt = SHAPE
    sizes = (lt, lx, ly, lz)
    # open boundary conditions: openQCD stores zero time links at x0 = N0 - 1
    obc = from_openqcd_links(links, sizes).clone()
    obc[3, :, :, :, lt - 1] = 0
    cases = [
        (variant("plaq", raw[:16] + struct.pack("<d", 1.5) + raw[24:]), "openQCD plaquette mismatch"),
        (variant("trunc", raw[:-144]), "expected"),
        (variant("odd", struct.pack("<iiii", 9, lx, ly, lz) + raw[16:]), "positive even"),
        (variant("big", struct.pack(">iiiid", *sizes, 1.0) + raw[24:]), "big-endian"),
        (variant("short", raw[:10]), "24-byte header"),
        (variant("obc", raw[:24] + to_openqcd_links(obc).astype("<c16").tobytes()), "open (or SF) boundary"),
    ]
    flipped = bytearray(raw)
    flipped[24 + 5 * 144 + 14] ^= 0x08  # the top mantissa bit of one link entry
    cases.append((variant("flip", bytes(flipped)), "not unitary"))
    for p, what in cases:
        with pytest.raises(OpenQCDError, match="^" + p):
            read_openqcd(p)
        one_line_exit_2(["import", p, "--format", "openqcd"], capsys, p, what)
    assert sniff_format(good) == "openqcd"
    one_line_exit_2(["import", good, "--format", "nersc"], capsys, "not a NERSC file", "looks like openQCD")


def test_openqcd_link_maps_are_inverse() -> None:
    U = su3(shape=(2, 4, 6, 4), seed=3)
    back = from_openqcd_links(to_openqcd_links(U), (4, 2, 4, 6))
    assert torch.equal(back, U)
    with pytest.raises(OpenQCDError, match="even lattice extents"):
        to_openqcd_links(su3(shape=(3, 4, 4, 4)))


# ---- the export command's refusals: one line, exit 2 ----------------------------------------------------
@pytest.mark.parametrize("fmt", ["ildg", "nersc", "openqcd"])
def test_non_su3_ensembles_are_refused_naming_the_formats(tmp_path, capsys, fmt: str) -> None:
    u1 = str(tmp_path / "u1")
    make_ensemble(u1, n=1, shape=(4, 4), group="u1")
    su2 = str(tmp_path / "su2")
    make_ensemble(su2, n=1, shape=(2, 2, 2, 2), group="su2")
    for root, group in ((u1, "u1"), (su2, "su2")):
        err = one_line_exit_2(["export", root, str(tmp_path / "o"), "--format", fmt], capsys, f"holds {group}",
                              "4D SU(3) only", "HDF5")
        assert "ILDG" in err and "NERSC" in err and "openQCD" in err
    assert not (tmp_path / "o").exists()
    with pytest.raises(ExportError):
        export_configs(su2, tmp_path / "o", fmt=fmt)


def test_export_refusals_are_one_line(tmp_path, capsys) -> None:
    root = str(tmp_path / "ens")
    make_ensemble(root, n=3)
    (tmp_path / "c1.nersc").write_bytes(b"precious")
    pat = str(tmp_path / "c{index}.nersc")
    one_line_exit_2(["export", root, pat, "--format", "nersc", "--index", "all"], capsys, "c1.nersc",
                    "refusing to overwrite")
    assert not (tmp_path / "c0.nersc").exists()  # checked before anything is written
    assert (tmp_path / "c1.nersc").read_bytes() == b"precious"
    assert main(["export", root, pat, "--format", "nersc", "--index", "all", "--overwrite"]) == 0
    assert nersc_reference_read(str(tmp_path / "c1.nersc"))[0]["SEQUENCE_NUMBER"] == "20"
    capsys.readouterr()
    one_line_exit_2(["export", root, str(tmp_path / "x.lime"), "--index", "0:2"], capsys, "names one file",
                    "{index}")
    one_line_exit_2(["export", root, str(tmp_path / "x{index}.lime"), "--index", "0:7"], capsys,
                    "index range 0:7 out of range", "has 3 committed")
    one_line_exit_2(["export", root, str(tmp_path / "x.lime"), "--index", "3"], capsys, "index 3 out of range")
    one_line_exit_2(["export", root, str(tmp_path / "x{i}.lime")], capsys, "unknown field {i}")
    one_line_exit_2(["export", root, str(tmp_path / "x{index"), "--index", "0"], capsys, "output name")
    one_line_exit_2(["export", root, str(tmp_path / "x.nersc"), "--format", "nersc", "--lfn", "a"], capsys,
                    "--lfn applies to ILDG export only")
    one_line_exit_2(["export", root, str(tmp_path / "x.oqcd"), "--format", "openqcd", "--precision", "32"],
                    capsys, "openQCD takes 64 only")
    one_line_exit_2(["export", root, str(tmp_path / "x.lime"), "--qcdml", str(tmp_path / "none")], capsys,
                    "no such directory")
    one_line_exit_2(["export", root, str(tmp_path / "nodir" / "x.lime")], capsys, "no such directory")
    one_line_exit_2(["export", root, str(tmp_path / "x.lime"), "--chain", "3"], capsys, "no chain 3")
    odd = str(tmp_path / "odd")
    make_ensemble(odd, n=1, shape=(3, 4, 4, 4))
    one_line_exit_2(["export", odd, str(tmp_path / "x.oqcd"), "--format", "openqcd"], capsys, "odd extent",
                    "even extents")
    assert main(["export", odd, str(tmp_path / "x.nersc"), "--format", "nersc"]) == 0  # NERSC takes any extents
    assert not any(p.name.startswith("x") and p.suffix in (".lime", ".oqcd") for p in tmp_path.iterdir())


def test_import_output_and_other_format_hint(tmp_path, capsys) -> None:
    U = su3()
    p = str(tmp_path / "c.oqcd")
    write_openqcd(p, U)
    assert main(["import", p, "--format", "openqcd"]) == 0
    out = json.loads(capsys.readouterr().out)
    plaq = float(average_plaquette(U, Lattice(SHAPE)))
    assert out["plaquette"] == pytest.approx(plaq, abs=1e-14)
    assert out["header_plaquette"] == pytest.approx(3 * plaq, abs=1e-13) and out["format"] == "openqcd"
    V, meta = read_gauge_file(p, "openqcd")
    assert torch.equal(V, U)
    with pytest.raises(EnsembleError):  # not a format at all
        read_gauge_file(p, "hdf5")
    assert ildg_site_array(U).shape == (10, 8, 6, 4, 4, 3, 3)


def test_ildg_single_precision_qcdml(tmp_path, capsys) -> None:
    root = str(tmp_path / "ens")
    Us = make_ensemble(root, n=2)
    assert main(["export", root, str(tmp_path / "s{step}.lime"), "--index", "-1", "--precision", "32"]) == 0
    V, meta = read_ildg(tmp_path / "s20.lime")  # verifies the CRC of the 32-bit payload
    assert torch.equal(V, Us[1].to(torch.complex64).to(torch.complex128))
    assert meta["precision"] == 32 and meta["qcdml"]["precision"] == "single"
    assert main(["import", str(tmp_path / "s20.lime")]) == 0
    out = json.loads(capsys.readouterr().out.split("\n", 1)[1])  # after the "wrote" line
    assert out["qcdml"]["update"] == "20" and out["format"] == "ildg"
