"""openQCD gauge configurations (``export_cnfg``/``import_cnfg`` format): 4D SU(3) export and import.

The format of openQCD's global I/O (``modules/archive/archive.c``, ``main/README.io``), which
openQCD, openQxD, Grid (``OpenQcdIO.h``), lyncs-io and PyQUDA read. Little-endian, no padding:

* header: the lattice sizes ``N0, N1, N2, N3`` as four int32 (openQCD's direction 0 is
  *time*: N0 = Lt, N1 = Lx, N2 = Ly, N3 = Lz), then the average plaquette as one double:
  ``plaq_sum_dble / (6 N0 N1 N2 N3)``, the sum of Re tr P over all plaquettes, **not**
  divided by 3 (3 for the unit field; hpcflow's plaquette times 3);
* data: the odd points x (x0 + x1 + x2 + x3 odd) in lexicographic order
  ``ix = x3 + N3 (x2 + N2 (x1 + N1 x0))`` (x3 fastest), and for each the 8 links attached in
  directions +0, -0, +1, -1, +2, -2, +3, -3: ``U(x, mu)`` and ``U(x - mu, mu)`` (the link from
  x - mu to x), each a 3x3 ``su3_dble`` row by row, entries (re, im) as doubles.

Every link joins an odd and an even point, so this covers each link exactly once; it needs
even extents (openQCD's requirement too). Axis map: hpcflow ``U[mu, x, y, z, t]`` (time last)
-> openQCD ``(x0, x1, x2, x3) = (t, x, y, z)`` and directions ``0 = t, 1 = x, 2 = y, 3 = z``.

Import (:func:`read_openqcd`) checks the sizes (positive, even), the data length, finite SU(3)
links (:func:`hpcflow.io.ildg.check_links`; a configuration with open boundary conditions,
whose time links at x0 = N0 - 1 are zero, is named as such) and, as openQCD's ``import_cnfg``
does, the plaquette sum against the header within ``sqrt(64 n) eps + 64 (|p0| + |p1|) eps``
(n = 6 V plaquettes, eps = DBL_EPSILON). Each failure is one :class:`OpenQCDError` line.
"""

from __future__ import annotations

import math
import os
import struct
from typing import Any

import numpy as np
import torch

from hpcflow.io.checkpoint import atomic_write_bytes
from hpcflow.io.ildg import ILDGError, check_links

__all__ = ["OpenQCDError", "from_openqcd_links", "openqcd_plaquette", "read_openqcd", "to_openqcd_links",
           "write_openqcd"]

_HEADER = struct.Struct("<iiiid")  # N0 N1 N2 N3 plaquette: 24 bytes
# openQCD direction k is hpcflow direction _OQ_TO_HP[k] (time first there, last here)
_OQ_TO_HP = (3, 0, 1, 2)


class OpenQCDError(ILDGError):
    """A file that is not a valid openQCD configuration (one line naming file and problem)."""


def _check(U: torch.Tensor) -> None:
    if not isinstance(U, torch.Tensor) or not U.is_complex() or U.dim() != 7 or U.shape[0] != 4 \
            or tuple(U.shape[-2:]) != (3, 3):
        raise ValueError(f"U must be a complex 4D SU(3) link field of shape (4, Lx, Ly, Lz, Lt, 3, 3), got "
                         f"{tuple(U.shape) if isinstance(U, torch.Tensor) else type(U).__name__}; openQCD "
                         "export supports 4D SU(3) only")
    odd = [n for n in U.shape[1:5] if n % 2]
    if odd:
        raise OpenQCDError(f"openQCD needs even lattice extents, got {tuple(U.shape[1:5])} (x, y, z, t): the file "
                           "stores the links of the odd points, which covers every link only when all extents are even")


def _odd_mask(shape: tuple[int, ...]) -> np.ndarray:
    return (np.indices(shape).sum(axis=0) % 2).astype(bool)


def to_openqcd_links(U: torch.Tensor) -> np.ndarray:
    """``U`` (4, Lx, Ly, Lz, Lt, 3, 3) as openQCD's data block: (V/2, 8, 3, 3) complex128, odd
    points in openQCD order, links +0, -0, ..., +3, -3 (write it little-endian)."""
    _check(U)
    a = U.detach().cpu().to(torch.complex128).numpy().transpose(0, 4, 1, 2, 3, 5, 6)  # (mu, t, x, y, z)
    a = a[list(_OQ_TO_HP)]  # openQCD direction order
    fwd = a
    bwd = np.stack([np.roll(a[k], 1, axis=k) for k in range(4)])  # bwd[k][x] = U_k(x - k)
    both = np.stack([fwd, bwd], axis=1).transpose(2, 3, 4, 5, 0, 1, 6, 7)  # (t, x, y, z, k, +/-, 3, 3)
    return np.ascontiguousarray(both[_odd_mask(both.shape[:4])]).reshape(-1, 8, 3, 3)


def from_openqcd_links(data: np.ndarray, sizes: tuple[int, int, int, int]) -> torch.Tensor:
    """Inverse of :func:`to_openqcd_links`: openQCD's data block (V/2, 8, 3, 3) for the sizes
    ``(N0, N1, N2, N3)`` as hpcflow's ``U`` (4, Lx, Ly, Lz, Lt, 3, 3) complex128."""
    n0, n1, n2, n3 = sizes
    full = np.zeros((n0, n1, n2, n3, 4, 2, 3, 3), dtype=np.complex128)
    odd = _odd_mask((n0, n1, n2, n3))
    full[odd] = np.asarray(data, dtype=np.complex128).reshape(-1, 4, 2, 3, 3)
    oq = np.empty((4, n0, n1, n2, n3, 3, 3), dtype=np.complex128)
    for k in range(4):
        # odd x: U_k(x) is stored at x; even y: U_k(y) is the -k link of the odd point y + k
        oq[k] = np.where(odd[..., None, None], full[..., k, 0, :, :], np.roll(full[..., k, 1, :, :], -1, axis=k))
    hp = oq[[_OQ_TO_HP.index(m) for m in range(4)]]  # back to hpcflow's direction order
    return torch.from_numpy(np.ascontiguousarray(hp.transpose(0, 2, 3, 4, 1, 5, 6)))


def openqcd_plaquette(U: torch.Tensor) -> float:
    """openQCD's average plaquette: sum of Re tr P over the 6 V plaquettes / (6 V) (3 at U = 1)."""
    from hpcflow.lattice.action import average_plaquette
    from hpcflow.lattice.geometry import Lattice

    return 3.0 * float(average_plaquette(U.to(torch.complex128), Lattice(tuple(U.shape[1:-2]))))


def write_openqcd(path: str | os.PathLike, U: torch.Tensor, overwrite: bool = False) -> float:
    """Write the global 4D SU(3) field ``U`` as an openQCD configuration file (double precision);
    returns the plaquette written to the header. Atomic; never replaces an existing file unless
    ``overwrite``."""
    path = os.fspath(path)
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"{path}: exists; refusing to overwrite (pass overwrite=True)")
    links = to_openqcd_links(U)
    lx, ly, lz, lt = U.shape[1:5]
    plaq = openqcd_plaquette(U.detach().cpu())

    def fill(fh: Any) -> None:
        fh.write(_HEADER.pack(lt, lx, ly, lz, plaq))
        fh.write(links.astype("<c16").tobytes())

    atomic_write_bytes(path, fill, overwrite=overwrite)
    return plaq


def read_openqcd(path: str | os.PathLike, verify: bool = True) -> tuple[torch.Tensor, dict[str, Any]]:
    """Read an openQCD configuration file (``export_cnfg`` format).

    Returns ``(U, meta)``: ``U`` complex128 (4, Lx, Ly, Lz, Lt, 3, 3); ``meta``: ``dims``
    (Lx, Ly, Lz, Lt), ``sizes`` (N0, N1, N2, N3) as in the file, ``plaquette`` (the header's,
    openQCD normalisation). With ``verify`` the links must be finite and in SU(3) and the
    plaquette must match the header (openQCD's tolerance). One :class:`OpenQCDError` line per
    failure."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(2, "No such file", path)
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(_HEADER.size)
        if len(head) < _HEADER.size:
            raise OpenQCDError(f"{path}: {len(head)} bytes; an openQCD configuration starts with a "
                               f"{_HEADER.size}-byte header (4 int32 sizes and the plaquette)")
        *sizes, plaq0 = _HEADER.unpack(head)
        n0, n1, n2, n3 = sizes
        swapped = struct.unpack(">iiii", head[:16])
        if all(0 < n and n % 2 == 0 for n in swapped) and size == _HEADER.size + math.prod(swapped) * 4 * 9 * 16 \
                and swapped != tuple(sizes):
            raise OpenQCDError(f"{path}: big-endian openQCD header (sizes {swapped}); openQCD's export_cnfg writes "
                               "little-endian on every machine")
        if any(n < 1 or n % 2 for n in sizes):
            raise OpenQCDError(f"{path}: openQCD lattice sizes N0..N3 = {tuple(sizes)}; allowed: positive even "
                               "integers (not an openQCD configuration, or a big-endian one)")
        vol = n0 * n1 * n2 * n3
        expect = _HEADER.size + vol // 2 * 8 * 9 * 16
        if size != expect:
            raise OpenQCDError(f"{path}: {size} bytes, expected {expect} for an openQCD configuration of "
                               f"N0..N3 = {n0}x{n1}x{n2}x{n3} (truncated or not an openQCD configuration)")
        data = np.frombuffer(fh.read(expect - _HEADER.size), dtype="<c16").reshape(vol // 2, 8, 3, 3)
    U = from_openqcd_links(data, (n0, n1, n2, n3))
    if verify:
        arr = U.permute(4, 3, 2, 1, 0, 5, 6).numpy()  # (t, z, y, x, mu, 3, 3): check_links' layout
        tlinks = arr[-1, :, :, :, 3]
        if not np.any(tlinks):  # openQCD's open boundary conditions: U(x0 = N0-1, 0) = 0
            raise OpenQCDError(f"{path}: the time links at x0 = N0 - 1 are all zero: a configuration with "
                               "open (or SF) boundary conditions in time; hpcflow ensembles are periodic")
        try:
            check_links(path, arr, 64)
        except ILDGError as e:
            raise OpenQCDError(str(e)) from None
        plaq1 = openqcd_plaquette(U)
        nplaq = 6.0 * vol
        eps = math.sqrt(64.0 * nplaq) * np.finfo(float).eps + 64.0 * (abs(plaq0) + abs(plaq1)) * nplaq \
            * np.finfo(float).eps  # openQCD's import_cnfg bound on the sum, here per plaquette
        if not abs(plaq1 - plaq0) * nplaq <= eps:
            raise OpenQCDError(f"{path}: openQCD plaquette mismatch: header says {plaq0!r}, the links give "
                               f"{plaq1!r} (average Re tr P over 6 V plaquettes)")
    meta = {"dims": (n1, n2, n3, n0), "sizes": (n0, n1, n2, n3), "plaquette": plaq0, "precision": 64}
    return U, meta
