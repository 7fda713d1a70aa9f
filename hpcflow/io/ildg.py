"""ILDG gauge configurations in LIME files: export (4D SU(3)) and import.

Follows the ILDG file-format specification (ILDG Metadata Working Group, "ILDG binary
file format", lqcd.org/ildg) and USQCD QIO conventions:

* ``ildg-format``: XML ``<ildgFormat>`` with ``version`` 1.0, ``field`` su3gauge,
  ``precision`` 32 or 64 and the extents ``lx ly lz lt``;
* ``ildg-binary-data``: for t, z, y, x (x fastest), for mu = x, y, z, t the 3x3 link
  ``U_mu(x)`` row by row, each entry (re, im), big-endian IEEE float;
* ``ildg-data-lfn``: the logical file name (plain text);
* ``scidac-checksum``: XML with ``suma``/``sumb`` (:func:`hpcflow.io.lime.scidac_checksum`
  of the binary data, one site = its four links);
* ``scidac-record-xml`` (QIO's user record XML, in the configuration's message; written when
  :func:`write_ildg` gets ``qcdml``): the QCDml 2.0 configuration document of the file
  (:func:`hpcflow.io.qcdml.config_xml`), whose ``crcCheckSum`` is the POSIX ``cksum`` CRC
  (:func:`posix_cksum`) of the ``ildg-binary-data`` payload. ILDG readers ignore records
  they do not know; :func:`read_ildg` checks that CRC and returns the document's fields.

hpcflow's axes map as (x, y, z, t) = (0, 1, 2, 3) and ``U[mu, x0, x1, x2, x3, i, j]`` is the
link from x to x + mu_hat, the ILDG convention, so no conjugation or transposition is
needed: export is a permutation of axes and a byte-order change.
"""

from __future__ import annotations

import datetime
import os
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from hpcflow.io.checkpoint import atomic_write_bytes
from hpcflow.io.lime import (
    LimeError,
    read_lime_payload,
    read_lime_records,
    scidac_checksum,
    write_lime,
)

__all__ = ["UNITARITY_TOL", "ILDGError", "check_links", "ildg_checksum", "ildg_site_array", "posix_cksum",
           "read_ildg", "write_ildg"]

_NS = "http://www.lqcd.org/ildg"


class ILDGError(ValueError):
    """A file that is not a valid ILDG gauge configuration (message names file and problem).

    Also the base class of the other gauge-file formats' errors (:class:`hpcflow.io.nersc.NERSCError`,
    :class:`hpcflow.io.openqcd.OpenQCDError`): the CLI reports all of them in one line, exit 2."""


# ---- POSIX cksum (the QCDml crcCheckSum) ------------------------------------------------------
_REV8 = np.array([int(f"{b:08b}"[::-1], 2) for b in range(256)], dtype=np.uint8)
_CKSUM_CHUNK = 1 << 24


def posix_cksum(data: bytes | bytearray | memoryview | np.ndarray) -> int:
    """The CRC that POSIX ``cksum`` prints for ``data`` (QCDml's ``crcCheckSum``).

    CRC-32 with polynomial 0x04C11DB7, most significant bit first, register starting at 0,
    over the data followed by its length (least significant byte first, as few bytes as
    needed), complemented. Computed with zlib's reflected CRC-32 on bit-reversed bytes (the
    mirror image of the same shift register), in 16 MiB chunks: GB/s, not a byte loop."""
    buf = (np.ascontiguousarray(data).view(np.uint8).reshape(-1) if isinstance(data, np.ndarray)
           else np.frombuffer(data, dtype=np.uint8))
    n = int(buf.size)
    tail = bytearray()
    m = n
    while m:
        tail.append(m & 0xFF)
        m >>= 8
    v = 0xFFFFFFFF  # zlib.crc32(d, v) runs the register from ~v and returns ~register: start at 0
    for off in range(0, n, _CKSUM_CHUNK):
        v = zlib.crc32(_REV8[buf[off:off + _CKSUM_CHUNK]].tobytes(), v)
    v = zlib.crc32(_REV8[np.frombuffer(bytes(tail), dtype=np.uint8)].tobytes(), v)
    reflected = v ^ 0xFFFFFFFF
    return int(f"{reflected:032b}"[::-1], 2) ^ 0xFFFFFFFF


def _check_su3_4d(U: torch.Tensor) -> None:
    if not isinstance(U, torch.Tensor) or not U.is_complex():
        raise TypeError(f"U must be a complex torch.Tensor, got {type(U).__name__}"
                        + (f" of dtype {U.dtype}" if isinstance(U, torch.Tensor) else ""))
    if U.dim() != 7 or U.shape[0] != 4 or tuple(U.shape[-2:]) != (3, 3):
        raise ValueError(f"U must be a 4D SU(3) link field of shape (4, Lx, Ly, Lz, Lt, 3, 3), "
                         f"got {tuple(U.shape)}; ILDG export supports 4D SU(3) only")


def ildg_site_array(U: torch.Tensor, precision: int = 64) -> np.ndarray:
    """``U`` (4, Lx, Ly, Lz, Lt, 3, 3) as the ILDG binary array (Lt, Lz, Ly, Lx, 4, 3, 3), big-endian."""
    _check_su3_4d(U)
    if precision not in (32, 64):
        raise ValueError(f"precision must be 32 or 64, got {precision!r}")
    a = U.detach().cpu().permute(4, 3, 2, 1, 0, 5, 6).contiguous().numpy()
    return a.astype(">c16" if precision == 64 else ">c8")


def _checksum_of_sites(arr: np.ndarray) -> tuple[int, int]:
    lt, lz, ly, lx = arr.shape[:4]
    n = lt * lz * ly * lx
    # C order over (t, z, y, x) is exactly the SciDAC rank with x fastest
    return scidac_checksum(np.ascontiguousarray(arr).view(np.uint8).reshape(n, -1), np.arange(n))


def ildg_checksum(U: torch.Tensor, precision: int = 64) -> tuple[int, int]:
    """SciDAC ``(suma, sumb)`` of ``U`` as it is stored in an ILDG file of ``precision`` bits."""
    return _checksum_of_sites(ildg_site_array(U, precision))


def _format_xml(dims: tuple[int, int, int, int], precision: int) -> bytes:
    lx, ly, lz, lt = dims
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<ildgFormat xmlns="{_NS}" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
        f'xsi:schemaLocation="{_NS} http://www.lqcd.org/ildg/filefmt.xsd">'
        f"<version>1.0</version><field>su3gauge</field><precision>{precision}</precision>"
        f"<lx>{lx}</lx><ly>{ly}</ly><lz>{lz}</lz><lt>{lt}</lt></ildgFormat>"
    ).encode()


def write_ildg(
    path: str | os.PathLike,
    U: torch.Tensor,
    lfn: str | None = None,
    precision: int = 64,
    info: dict[str, Any] | None = None,
    overwrite: bool = False,
    qcdml: Mapping[str, Any] | None = None,
) -> tuple[int, int]:
    """Write the global 4D SU(3) field ``U`` as an ILDG/LIME file; returns ``(suma, sumb)``.

    ``lfn`` is the ILDG logical file name (default: the file's base name); ``info`` goes into
    the ``scidac-file-xml`` record as ``<hpcflow>`` key/value elements (plaquette, beta...).
    ``qcdml``: the keyword arguments of :func:`hpcflow.io.qcdml.config_xml` except ``lfn``,
    ``crc``, ``precision`` and ``field`` (filled in here from the payload): the QCDml
    configuration document then goes into the ``scidac-record-xml`` record.
    The file is written to a temporary name, fsynced and renamed; an existing file is never
    replaced unless ``overwrite``.
    """
    path = os.fspath(path)
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"{path}: exists; refusing to overwrite (pass overwrite=True)")
    arr = ildg_site_array(U, precision)
    lt, lz, ly, lx = arr.shape[:4]
    suma, sumb = _checksum_of_sites(arr)
    lfn = os.path.basename(path) if lfn is None else str(lfn)
    prec_letter = "D" if precision == 64 else "F"
    private_file = ('<?xml version="1.0" encoding="UTF-8"?><scidacFile><version>1.1</version>'
                    f"<spacetime>4</spacetime><dims>{lx} {ly} {lz} {lt} </dims><volfmt>0</volfmt>"
                    "</scidacFile>").encode()
    root = ET.Element("hpcflow")
    for k, v in (info or {}).items():
        ET.SubElement(root, str(k)).text = str(v)
    file_xml = b'<?xml version="1.0" encoding="UTF-8"?>' + ET.tostring(root)
    date = datetime.datetime.now(datetime.UTC).strftime("%a %b %d %H:%M:%S %Y UTC")
    private_record = ('<?xml version="1.0" encoding="UTF-8"?><scidacRecord><version>1.1</version>'
                      f"<date>{date}</date><recordtype>0</recordtype>"
                      f"<datatype>QDP_{prec_letter}3_ColorMatrix</datatype><precision>{prec_letter}</precision>"
                      f"<colors>3</colors><spins>4</spins><typesize>{18 * precision // 8}</typesize>"
                      "<datacount>4</datacount></scidacRecord>").encode()
    checksum_xml = ('<?xml version="1.0" encoding="UTF-8"?><scidacChecksum><version>1.0</version>'
                    f"<suma>{suma:x}</suma><sumb>{sumb:x}</sumb></scidacChecksum>").encode()
    payload = arr.tobytes()
    config_records = [("scidac-private-record-xml", private_record)]
    if qcdml is not None:
        from hpcflow.io.qcdml import config_xml

        config_records.append(("scidac-record-xml", config_xml(
            lfn=lfn, crc=posix_cksum(payload), precision=precision, field="su3gauge", **qcdml)))
    records = [
        ("scidac-private-file-xml", private_file),
        ("scidac-file-xml", file_xml),
        *config_records,
        ("ildg-format", _format_xml((lx, ly, lz, lt), precision)),
        ("ildg-data-lfn", lfn.encode()),
        ("ildg-binary-data", payload),
        ("scidac-checksum", checksum_xml),
    ]

    def fill(fh: Any) -> None:
        # message 1: file metadata; message 2: the configuration record (QIO layout)
        write_lime(fh, records, messages=[2, len(records) - 2])

    atomic_write_bytes(path, fill, overwrite=overwrite)  # never replaces a file created meanwhile
    return suma, sumb


def _xml_fields(path: str, payload: bytes, record: str) -> dict[str, str]:
    try:
        root = ET.fromstring(payload.rstrip(b"\0"))
    except ET.ParseError as e:
        raise ILDGError(f"{path}: record {record!r} is not valid XML ({e})") from None
    return {el.tag.split("}", 1)[-1]: (el.text or "").strip() for el in root}


# what "unitary" means on import: max |U U^dag - 1| and |det U - 1| over all links, per
# precision of the file (float64 rounding of a reunitarised link is ~1e-15; float32 ~1e-7)
UNITARITY_TOL = {64: 1e-9, 32: 1e-5}


def check_links(path: str, arr: np.ndarray, precision: int) -> None:
    """Refuse non-finite values and links that are not SU(3) within :data:`UNITARITY_TOL`.

    ``arr``: the ILDG site array ``(Lt, Lz, Ly, Lx, 4, 3, 3)``; one-line :class:`ILDGError`
    naming the first bad link as (x, y, z, t; mu)."""
    def where(flat: int) -> str:
        t, z, y, x, mu = np.unravel_index(flat, arr.shape[:5])
        return f"link (x={x}, y={y}, z={z}, t={t}; mu={mu})"

    links = arr.reshape(-1, 3, 3)
    finite = np.isfinite(links.real) & np.isfinite(links.imag)
    if not finite.all():
        bad = ~finite.all(axis=(1, 2))
        raise ILDGError(f"{path}: {int(bad.sum())} links hold non-finite values (NaN or inf), first at "
                        f"{where(int(np.argmax(bad)))}; not a gauge configuration")
    tol = UNITARITY_TOL[precision]
    m = links.astype(np.complex128)
    dev = np.abs(m @ np.conj(np.swapaxes(m, -1, -2)) - np.eye(3)).max(axis=(1, 2))
    i = int(np.argmax(dev))
    if dev[i] > tol:
        raise ILDGError(f"{path}: {int((dev > tol).sum())} links are not unitary: max |U U^dag - 1| = "
                        f"{dev[i]:.3g} at {where(i)}; allowed <= {tol:g} at precision {precision}")
    ddev = np.abs(np.linalg.det(m) - 1.0)
    i = int(np.argmax(ddev))
    if ddev[i] > tol:
        raise ILDGError(f"{path}: {int((ddev > tol).sum())} links are not in SU(3): max |det U - 1| = "
                        f"{ddev[i]:.3g} at {where(i)}; allowed <= {tol:g} at precision {precision}")


def read_ildg(path: str | os.PathLike, verify: bool = True) -> tuple[torch.Tensor, dict[str, Any]]:
    """Read an ILDG gauge configuration (any code that follows the spec).

    Returns ``(U, meta)`` with ``U`` complex128 of shape (4, Lx, Ly, Lz, Lt, 3, 3) and
    ``meta`` holding ``dims``, ``precision``, ``lfn``, ``checksum`` (``(suma, sumb)`` from the
    file, or None), ``info`` (hpcflow's ``scidac-file-xml`` fields, if present) and ``qcdml``
    (the leaf fields of a QCDml configuration document in ``scidac-record-xml``: dataLFN,
    crcCheckSum, avePlaquette, update...; with ``verify`` its crcCheckSum must match). Extents
    must be positive. With ``verify`` (what ``hpcflow import`` does), a stored SciDAC
    checksum must match the data and every link must be finite and in SU(3) within
    :data:`UNITARITY_TOL` (:func:`check_links`); each failure is a one-line :class:`ILDGError`.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(2, "No such file", path)
    try:
        recs = read_lime_records(path)
    except LimeError as e:
        raise ILDGError(str(e)) from None
    by_type: dict[str, Any] = {}
    for r in recs:
        by_type.setdefault(r.type, r)  # first occurrence: one configuration per file
    for need in ("ildg-format", "ildg-binary-data"):
        if need not in by_type:
            raise ILDGError(f"{path}: no {need!r} record (records: {[r.type for r in recs]}); not an ILDG file")
    fmt = _xml_fields(path, read_lime_payload(path, by_type["ildg-format"]), "ildg-format")
    try:
        dims = tuple(int(fmt[k]) for k in ("lx", "ly", "lz", "lt"))
        precision = int(fmt["precision"])
    except (KeyError, ValueError):
        raise ILDGError(f"{path}: ildg-format lacks integer lx/ly/lz/lt/precision: {fmt}") from None
    if fmt.get("field", "su3gauge") != "su3gauge":
        raise ILDGError(f"{path}: ildg-format field {fmt.get('field')!r}; only su3gauge is supported")
    if precision not in (32, 64):
        raise ILDGError(f"{path}: ildg-format precision {precision}; allowed: 32 or 64")
    if any(n < 1 for n in dims):
        raise ILDGError(f"{path}: ildg-format extents lx={dims[0]} ly={dims[1]} lz={dims[2]} lt={dims[3]}; "
                        "allowed: positive integers")
    lx, ly, lz, lt = dims
    item = 16 if precision == 64 else 8
    expect = lx * ly * lz * lt * 4 * 9 * item
    rec = by_type["ildg-binary-data"]
    if rec.nbytes != expect:
        raise ILDGError(f"{path}: ildg-binary-data has {rec.nbytes} bytes, expected {expect} for "
                        f"{lx}x{ly}x{lz}x{lt} su3gauge at precision {precision}")
    raw = read_lime_payload(path, rec)
    arr = np.frombuffer(raw, dtype=">c16" if precision == 64 else ">c8").reshape(lt, lz, ly, lx, 4, 3, 3)
    checksum = None
    if "scidac-checksum" in by_type:
        ck = _xml_fields(path, read_lime_payload(path, by_type["scidac-checksum"]), "scidac-checksum")
        try:
            checksum = (int(ck["suma"], 16), int(ck["sumb"], 16))
        except (KeyError, ValueError):
            raise ILDGError(f"{path}: scidac-checksum record without hex suma/sumb: {ck}") from None
        if verify:
            got = _checksum_of_sites(arr)
            if got != checksum:
                raise ILDGError(f"{path}: SciDAC checksum mismatch: file says suma={checksum[0]:x} "
                                f"sumb={checksum[1]:x}, data gives suma={got[0]:x} sumb={got[1]:x}")
    qcdml = _qcdml_fields(path, by_type)
    if verify and qcdml.get("crcCheckSum"):
        try:  # decimal as cksum prints it; some tools write hex
            crc_want = int(qcdml["crcCheckSum"], 10 if qcdml["crcCheckSum"].isdigit() else 16)
        except ValueError:
            raise ILDGError(f"{path}: QCDml crcCheckSum {qcdml['crcCheckSum']!r} is not an integer") from None
        crc_got = posix_cksum(raw)
        if crc_got != crc_want:
            raise ILDGError(f"{path}: QCDml crcCheckSum mismatch: the configuration XML says {crc_want}, the "
                            f"ildg-binary-data payload gives {crc_got} (POSIX cksum)")
    if verify:
        check_links(path, arr, precision)
    lfn = None
    if "ildg-data-lfn" in by_type:
        lfn = read_lime_payload(path, by_type["ildg-data-lfn"]).rstrip(b"\0").decode("utf-8", "replace").strip()
    info: dict[str, str] = {}
    if "scidac-file-xml" in by_type:
        try:
            info = _xml_fields(path, read_lime_payload(path, by_type["scidac-file-xml"]), "scidac-file-xml")
        except ILDGError:
            info = {}  # free-form in other codes: informative only
    U = torch.from_numpy(arr.astype(np.complex128)).permute(4, 3, 2, 1, 0, 5, 6).contiguous()
    meta = {"dims": dims, "precision": precision, "lfn": lfn, "checksum": checksum, "info": info,
            "qcdml": qcdml, "records": [r.type for r in recs]}
    return U, meta


def _qcdml_fields(path: str, by_type: Mapping[str, Any]) -> dict[str, str]:
    """The leaf fields of a QCDml configuration document in ``scidac-record-xml`` (hpcflow's
    place for it), by local tag name; {} when the record is absent or holds something else
    (QIO's user record XML is free-form in other codes)."""
    rec = by_type.get("scidac-record-xml")
    if rec is None:
        return {}
    try:
        root = ET.fromstring(read_lime_payload(path, rec).rstrip(b"\0"))
    except ET.ParseError:
        return {}
    if root.tag.split("}", 1)[-1] != "gaugeConfiguration":
        return {}
    out: dict[str, str] = {}
    for el in root.iter():
        tag = el.tag.split("}", 1)[-1]
        if tag in _QCDML_KEYS and len(el) == 0:
            out.setdefault(tag, (el.text or "").strip())
    return out


_QCDML_KEYS = ("dataLFN", "precision", "markovChainURI", "series", "update", "field", "crcCheckSum", "avePlaquette")
