"""NERSC ("archive", QCD Gauge Connection) gauge configurations: 4D SU(3) export and import.

The format that MILC, Grid, CPS, Chroma (via its NERSC reader), SIMULATeQCD and PyQUDA read
and write: an ASCII header, then the binary links. The header::

    BEGIN_HEADER
    HDR_VERSION = 1.0
    DATATYPE = 4D_SU3_GAUGE_3x3         (full matrices; 4D_SU3_GAUGE: the first two rows)
    STORAGE_FORMAT = 1.0
    DIMENSION_1 = Lx  ...  DIMENSION_4 = Lt
    LINK_TRACE = <Re tr U / 3, averaged over the 4 V links>
    PLAQUETTE = <Re tr P / 3, averaged over the 6 V plaquettes (1 for the unit field)>
    BOUNDARY_1 = PERIODIC  ...  BOUNDARY_4 = PERIODIC
    CHECKSUM = <hex: sum of the data as 32-bit unsigned words, mod 2^32>
    ...                                  (ENSEMBLE_ID, SEQUENCE_NUMBER, CREATOR, dates ...)
    FLOATING_POINT = IEEE64BIG           (IEEE32BIG; *LITTLE for little-endian data)
    END_HEADER

followed at once by the data: for t, z, y, x (x fastest), for mu = x, y, z, t, the link
``U_mu(x)`` (x -> x + mu) as its rows (3, or 2 for ``4D_SU3_GAUGE``), each entry (re, im).
The full-matrix big-endian data are byte for byte the ILDG ``ildg-binary-data`` of the same
precision (:func:`hpcflow.io.ildg.ildg_site_array`), so the SciDAC checksums are written too
(``SCIDAC_CHECKSUMA/B``, as Grid does).

Conventions checked against the published readers/writers (Grid ``NerscIO.h``/``MetaData.h``,
PyQUDA ``pyquda_io/nersc.py``, MILC): the checksum is the sum of the 32-bit words of the data
*values* (a 64-bit number contributes its high and low words, so the sum does not depend on
the byte order of the file; 32-bit data contribute one word each); for 2-row data the sum runs
over the stored rows only; the third row is rebuilt as ``conj(row0 x row1)``. Bare
``IEEE32``/``IEEE64`` (no byte order) is ambiguous between codes (big-endian in the original
archive, little-endian in Grid): the reader takes the byte order whose checksum matches.

Import (:func:`read_nersc`, ``hpcflow import --format nersc``) checks, each failure one
:class:`NERSCError` line: the header, the data length, the checksum, finite SU(3) links
(:func:`hpcflow.io.ildg.check_links`), the plaquette (within 1e-5) and the link trace (within
1e-6), Grid's tolerances.
"""

from __future__ import annotations

import datetime
import getpass
import os
import platform
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from hpcflow.io.checkpoint import atomic_write_bytes
from hpcflow.io.ildg import ILDGError, check_links, ildg_site_array
from hpcflow.io.lime import scidac_checksum

__all__ = [
    "LINK_TRACE_TOL",
    "PLAQUETTE_TOL",
    "NERSCError",
    "link_trace",
    "nersc_checksum",
    "read_nersc",
    "write_nersc",
]

PLAQUETTE_TOL = 1e-5   # |plaquette(data) - PLAQUETTE| allowed on import (Grid's)
LINK_TRACE_TOL = 1e-6  # |link trace(data) - LINK_TRACE| allowed on import (Grid's)
_MAX_HEADER = 1 << 16  # a header longer than this is not a NERSC header


class NERSCError(ILDGError):
    """A file that is not a valid NERSC gauge configuration (one line naming file and problem)."""


def nersc_checksum(data: bytes | memoryview | np.ndarray, big_endian: bool = True) -> int:
    """NERSC ``CHECKSUM``: the sum of the data as 32-bit unsigned words (in the file's byte
    order), mod 2^32."""
    buf = np.frombuffer(data if not isinstance(data, np.ndarray) else np.ascontiguousarray(data).tobytes(),
                        dtype=">u4" if big_endian else "<u4")
    return int(buf.sum(dtype=np.uint64) & np.uint64(0xFFFFFFFF))


def link_trace(U: torch.Tensor) -> float:
    """NERSC ``LINK_TRACE``: Re tr U / 3 averaged over every link of ``U`` (4, Lx, Ly, Lz, Lt, 3, 3)."""
    n = U.shape[-1]
    return float(torch.diagonal(U, dim1=-2, dim2=-1).real.sum() / (n * U[..., 0, 0].numel()))


def _plaquette(U: torch.Tensor) -> float:
    from hpcflow.lattice.action import average_plaquette
    from hpcflow.lattice.geometry import Lattice

    return float(average_plaquette(U.to(torch.complex128), Lattice(tuple(U.shape[1:-2]))))


def write_nersc(path: str | os.PathLike, U: torch.Tensor, precision: int = 64, overwrite: bool = False,
                ensemble_id: str = "hpcflow", ensemble_label: str = "", sequence_number: int = 0,
                plaquette: float | None = None) -> dict[str, str]:
    """Write the global 4D SU(3) field ``U`` (4, Lx, Ly, Lz, Lt, 3, 3) as a NERSC file with full
    3x3 matrices, big-endian (``IEEE64BIG`` or ``IEEE32BIG``); returns the header fields.

    ``plaquette``: the value for the header (default: computed from ``U``). Atomic (temporary
    name, fsync, rename); an existing file is never replaced unless ``overwrite``."""
    path = os.fspath(path)
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"{path}: exists; refusing to overwrite (pass overwrite=True)")
    arr = ildg_site_array(U, precision)  # (Lt, Lz, Ly, Lx, 4, 3, 3) big-endian: the NERSC 3x3 layout
    lt, lz, ly, lx = arr.shape[:4]
    payload = arr.tobytes()
    n = lt * lz * ly * lx
    suma, sumb = scidac_checksum(np.frombuffer(payload, dtype=np.uint8).reshape(n, -1), np.arange(n))
    U64 = U.detach().cpu().to(torch.complex128)
    plaq = _plaquette(U64) if plaquette is None else float(plaquette)
    now = datetime.datetime.now().astimezone().strftime("%a %b %d %H:%M:%S %Y %Z")
    try:
        creator = getpass.getuser()
    except (KeyError, OSError):
        creator = "hpcflow"
    u = platform.uname()
    header = {
        "HDR_VERSION": "1.0",
        "DATATYPE": "4D_SU3_GAUGE_3x3",
        "STORAGE_FORMAT": "1.0",
        "DIMENSION_1": str(lx), "DIMENSION_2": str(ly), "DIMENSION_3": str(lz), "DIMENSION_4": str(lt),
        "LINK_TRACE": f"{link_trace(U64):.12g}",
        "PLAQUETTE": f"{plaq:.12g}",
        "BOUNDARY_1": "PERIODIC", "BOUNDARY_2": "PERIODIC", "BOUNDARY_3": "PERIODIC", "BOUNDARY_4": "PERIODIC",
        "CHECKSUM": f"{nersc_checksum(payload, big_endian=True):08x}",
        "SCIDAC_CHECKSUMA": f"{suma:08x}",
        "SCIDAC_CHECKSUMB": f"{sumb:08x}",
        "ENSEMBLE_ID": _one_line(ensemble_id) or "hpcflow",
        "ENSEMBLE_LABEL": _one_line(ensemble_label),
        "SEQUENCE_NUMBER": str(int(sequence_number)),
        "CREATOR": _one_line(creator),
        "CREATOR_HARDWARE": _one_line(f"{u.node}-{u.machine}-{u.system}-{u.release}"),
        "CREATION_DATE": now,
        "ARCHIVE_DATE": now,
        "FLOATING_POINT": "IEEE64BIG" if precision == 64 else "IEEE32BIG",
    }
    text = "BEGIN_HEADER\n" + "".join(f"{k} = {v}\n" for k, v in header.items()) + "END_HEADER\n"

    def fill(fh: Any) -> None:
        fh.write(text.encode("ascii", "replace"))
        fh.write(payload)

    atomic_write_bytes(path, fill, overwrite=overwrite)
    return header


def _one_line(s: str) -> str:
    return " ".join(str(s).split())


def _read_header(path: str) -> tuple[dict[str, str], int]:
    with open(path, "rb") as fh:
        head = fh.read(_MAX_HEADER)
    first = head.split(b"\n", 1)[0].strip()
    if first != b"BEGIN_HEADER":
        raise NERSCError(f"{path}: not a NERSC file (first line {first[:40]!r}, expected BEGIN_HEADER)")
    end = head.find(b"END_HEADER")
    nl = head.find(b"\n", end) if end >= 0 else -1
    if end < 0 or nl < 0:
        raise NERSCError(f"{path}: NERSC header without END_HEADER in its first {_MAX_HEADER} bytes "
                         "(truncated or not a NERSC file)")
    fields: dict[str, str] = {}
    for line in head[:end].split(b"\n")[1:]:
        if b"=" in line:
            k, v = line.split(b"=", 1)
            fields[k.decode("ascii", "replace").strip()] = v.decode("ascii", "replace").strip()
    return fields, nl + 1


def _need(path: str, h: Mapping[str, str], key: str) -> str:
    if key not in h:
        raise NERSCError(f"{path}: NERSC header has no {key}")
    return h[key]


def _float(path: str, h: Mapping[str, str], key: str) -> float:
    try:
        return float(_need(path, h, key))
    except ValueError:
        raise NERSCError(f"{path}: NERSC header {key} = {h[key]!r} is not a number") from None


def read_nersc(path: str | os.PathLike, verify: bool = True) -> tuple[torch.Tensor, dict[str, Any]]:
    """Read a NERSC 4D SU(3) configuration (``4D_SU3_GAUGE_3x3`` or two-row ``4D_SU3_GAUGE``,
    32 or 64 bit, either byte order).

    Returns ``(U, meta)`` with ``U`` complex128 (4, Lx, Ly, Lz, Lt, 3, 3) and ``meta``: ``dims``
    (Lx, Ly, Lz, Lt), ``precision``, ``datatype``, ``floating_point``, ``byte_order``,
    ``checksum`` (hex), ``plaquette`` and ``link_trace`` (header values) and ``header`` (all
    fields). The checksum is always checked; with ``verify`` also the links (finite, SU(3)),
    the plaquette and the link trace. Each failure is one :class:`NERSCError` line."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(2, "No such file", path)
    h, offset = _read_header(path)
    dtype_name = _need(path, h, "DATATYPE")
    rows = {"4D_SU3_GAUGE_3x3": 3, "4D_SU3_GAUGE": 2}.get(dtype_name)
    if rows is None:
        raise NERSCError(f"{path}: NERSC DATATYPE {dtype_name!r}; supported: 4D_SU3_GAUGE_3x3, 4D_SU3_GAUGE")
    try:
        dims = tuple(int(_need(path, h, f"DIMENSION_{d}")) for d in (1, 2, 3, 4))
    except ValueError:
        raise NERSCError(f"{path}: NERSC DIMENSION_1..4 are not integers: "
                         f"{[h.get(f'DIMENSION_{d}') for d in (1, 2, 3, 4)]}") from None
    if any(n < 1 for n in dims):
        raise NERSCError(f"{path}: NERSC extents {dims}; allowed: positive integers")
    fp = _need(path, h, "FLOATING_POINT").upper()
    kinds = {"IEEE32BIG": (32, [True]), "IEEE64BIG": (64, [True]), "IEEE32LITTLE": (32, [False]),
             "IEEE64LITTLE": (64, [False]), "IEEE32": (32, [True, False]), "IEEE64": (64, [True, False])}
    if fp not in kinds:
        raise NERSCError(f"{path}: NERSC FLOATING_POINT {fp!r}; supported: " + ", ".join(kinds))
    precision, orders = kinds[fp]
    try:
        want = int(_need(path, h, "CHECKSUM"), 16)
    except ValueError:
        raise NERSCError(f"{path}: NERSC CHECKSUM {h['CHECKSUM']!r} is not hexadecimal") from None
    lx, ly, lz, lt = dims
    item = precision // 4  # bytes per complex number
    expect = lx * ly * lz * lt * 4 * rows * 3 * item
    size = os.path.getsize(path) - offset
    if size != expect:
        raise NERSCError(f"{path}: {size} bytes of data after the header, expected {expect} for "
                         f"{lx}x{ly}x{lz}x{lt} {dtype_name} {fp} (truncated or wrong header)")
    with open(path, "rb") as fh:
        fh.seek(offset)
        raw = fh.read(expect)
    sums = {big: nersc_checksum(raw, big_endian=big) for big in orders}
    big = next((b for b, s in sums.items() if s == want), None)
    if big is None:
        got = " or ".join(f"{s:x}" for s in sums.values())
        raise NERSCError(f"{path}: NERSC checksum mismatch: header says {want:x}, the data give {got}")
    dt = ("c8" if precision == 32 else "c16")
    arr = np.frombuffer(raw, dtype=(">" if big else "<") + dt).reshape(lt, lz, ly, lx, 4, rows, 3)
    arr = arr.astype(np.complex128)
    if rows == 2:  # the third row of an SU(3) matrix: conj(row0 x row1)
        arr = np.concatenate([arr, np.conj(np.cross(arr[..., 0, :], arr[..., 1, :]))[..., None, :]], axis=-2)
    plaq_h = _float(path, h, "PLAQUETTE")
    ltr_h = _float(path, h, "LINK_TRACE")
    U = torch.from_numpy(arr).permute(4, 3, 2, 1, 0, 5, 6).contiguous()
    if verify:
        _check_links(path, arr, precision, rows)
        plaq, ltr = _plaquette(U), link_trace(U)
        if not abs(plaq - plaq_h) <= PLAQUETTE_TOL:
            raise NERSCError(f"{path}: NERSC plaquette mismatch: header says {plaq_h!r}, the links give "
                             f"{plaq!r} (allowed difference {PLAQUETTE_TOL:g})")
        if not abs(ltr - ltr_h) <= LINK_TRACE_TOL:
            raise NERSCError(f"{path}: NERSC link trace mismatch: header says {ltr_h!r}, the links give "
                             f"{ltr!r} (allowed difference {LINK_TRACE_TOL:g})")
    meta = {"dims": dims, "precision": precision, "datatype": dtype_name, "floating_point": fp,
            "byte_order": "big" if big else "little", "checksum": f"{want:08x}", "plaquette": plaq_h,
            "link_trace": ltr_h, "header": h}
    return U, meta


def _check_links(path: str, arr: np.ndarray, precision: int, rows: int) -> None:
    """:func:`hpcflow.io.ildg.check_links` with the message type of this format; a two-row file
    can only fail unitarity (its third row is built to complete the matrix)."""
    try:
        check_links(path, arr, precision)
    except ILDGError as e:
        raise NERSCError(str(e) + (" (two-row data: rows 0 and 1 are not orthonormal)" if rows == 2 else "")) \
            from None
