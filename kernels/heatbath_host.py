"""Host (CPU) heat bath and overrelaxation for SU(2)/SU(3): ``heatbath_host.cpp``.

The C++ twin of :mod:`hpcflow.sampling.heatbath`: same checkerboard sub-steps
``(mu, parity)``, same staple, same Cabibbo-Marinari subgroup order, same Philox counters
(``kernels/philox.h``) and the same float64 arithmetic, so every function here reproduces
its torch counterpart to rounding (1e-12 in complex128; complex64 links are stored in
float32 like the torch path). Works on halo-padded local arrays: the sweeps call
``comm.exchange(U, lat)`` before every sub-step, exactly where the torch sweeps do, and only
interior links change. One shared library per (N, real type, Nd) is compiled at first use
and cached by :func:`hpcflow.kernels.host.build_library`. Threads: ``OMP_NUM_THREADS``.

Sub-steps (``heatbath_substep_host``, ``overrelax_substep_host``) work **in place** on a
C-contiguous CPU tensor and return it (should a rejection not finish in
``heatbath._MAX_ROUNDS`` rounds, a RuntimeError is raised and the tensor holds a partial
update); the sweeps return new tensors and leave the caller's field untouched. Each sweep
ends like the torch sweep with ``reproject_if_drifted``: same tolerance, same global
decision (``comm.max``), same ``group.project``, but the violation (max over interior links
of ``|U^dag U - 1|`` and ``|det U - 1|``) is computed by the host library.

Whole sweeps of a complex128 4D field on one process without halos (``comm`` None or a
plain ``SerialComm``, so the exchanges are no-ops; ``L0, L1, L2`` multiples of 4) run in one
library call (``hpcflow_hb_sweeps_vn``): the field is transposed once into a
structure-of-arrays scratch, the heat-bath and all overrelaxation sweeps of
:func:`heatbath_or_sweep_host` run there, the violation of each sweep is taken from the
updated links, and the result is written straight into the returned tensor (no copy). A
sweep whose violation exceeds the tolerance ends the call; the field is projected and the
remaining sweeps continue, as the torch compound does after every sweep. Other fields
(decomposed lattices, halos, 2D, complex64) take one call per sub-step.

Speed (SU(3) float64, 4D, one core of this project's AVX-512 Xeon, bench/heatbath_host_ab.py;
see heatbath_host.cpp for the flop count; the machine is shared, so figures swing): inside a
multi-sweep call a heat-bath sweep costs ~0.54 us/site at 8^4 and ~0.74 at 16^4, an
overrelaxation sweep ~0.35 / ~0.49 us/site; the transposes in and out add ~0.1 us/site per
call; a compound HB + 1 OR sweep through this module ~1.05 / ~1.5 us/site (the per-sub-step
path: ~1.7 / ~2.2). 16^4 is limited by traffic from L3: each sub-step streams the whole
field (38 MB) to update 1/8 of its links.
"""

from __future__ import annotations

import ctypes
import functools
import math
from typing import TYPE_CHECKING

import torch

from ._common import real_dtype
from .host import build_library

if TYPE_CHECKING:  # hints only: hpcflow.lattice imports this package
    from hpcflow.lattice.geometry import Comm, Lattice

__all__ = [
    "build_heatbath_library",
    "heatbath_or_sweep_host",
    "heatbath_substep_host",
    "heatbath_sweep_host",
    "load_heatbath_library",
    "overrelax_substep_host",
    "overrelax_sweep_host",
    "supports_heatbath_host",
]

_SOURCES = ("su_n.cuh", "host_harness.h", "philox.h", "heatbath_host.cpp")
_SUPPORTED_N = (2, 3)
_SUPPORTED_ND = (2, 4)
_DTYPES = {torch.complex128: "double", torch.complex64: "float"}


def build_heatbath_library(n: int, real: str, nd: int):  # type: ignore[no-untyped-def]
    """Compile (or find in the cache) ``heatbath_host.cpp`` for ``(n, real, nd)``; its path."""
    if n not in _SUPPORTED_N or nd not in _SUPPORTED_ND or real not in ("double", "float"):
        raise ValueError(f"heat-bath host kernels: unsupported (N, real, Nd) = {(n, real, nd)}")
    defines = (f"-DHPCFLOW_N={n}", f"-DHPCFLOW_REAL={real}", f"-DHPCFLOW_ND={nd}")
    return build_library("heatbath_host.cpp", _SOURCES, defines,
                         f"libhpcflow_heatbath_n{n}_{real}_{nd}d.so")


@functools.cache
def load_heatbath_library(n: int, real: str, nd: int) -> ctypes.CDLL:
    """Build if needed and load the heat-bath library for ``(n, real, nd)`` (once per process)."""
    lib = ctypes.CDLL(str(build_heatbath_library(n, real, nd)))
    cfg = [ctypes.c_int(), ctypes.c_int(), ctypes.c_int()]
    lib.hpcflow_hb_config(*(ctypes.byref(c) for c in cfg))
    got = tuple(c.value for c in cfg)
    want = (n, nd, 8 if real == "double" else 4)
    if got != want:
        raise RuntimeError(f"heat-bath library reports (N, Nd, bytes) = {got}, wanted {want}")
    vp, i64, ci, cu, cd = (ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int, ctypes.c_uint,
                           ctypes.c_double)
    ip, lp = ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_longlong)
    lib.hpcflow_heatbath_substep.argtypes = [vp, i64, ip, ip, lp, lp, ci, ci, cd, cu, cu, cu,
                                             i64, ci, cd]
    lib.hpcflow_heatbath_substep.restype = i64
    lib.hpcflow_overrelax_substep.argtypes = [vp, i64, ip, ip, lp, lp, ci, ci]
    lib.hpcflow_overrelax_substep.restype = None
    lib.hpcflow_hb_unitarity_violation.argtypes = [vp, i64, ip, ip]
    lib.hpcflow_hb_unitarity_violation.restype = cd
    lib.hpcflow_hb_sweeps_vn.argtypes = [vp, vp, i64, ip, ci, ci, cd, cu, cu, cu, i64, ci, cd, cd,
                                         ip, ctypes.POINTER(cd)]
    lib.hpcflow_hb_sweeps_vn.restype = i64
    return lib


def supports_heatbath_host(U: torch.Tensor, lat: Lattice) -> bool:
    """True when the host kernels handle ``U`` on ``lat``: a CPU SU(2)/SU(3) field,
    complex64/complex128, ``lat.nd`` in (2, 4), shape ``(*B, nd, *lat.shape, N, N)``."""
    if not isinstance(U, torch.Tensor) or U.device.type != "cpu" or U.dtype not in _DTYPES:
        return False
    nd = lat.nd
    if nd not in _SUPPORTED_ND or U.dim() < nd + 3:
        return False
    n = U.shape[-1]
    if n not in _SUPPORTED_N:
        return False
    return tuple(U.shape[-(nd + 3):]) == (nd, *lat.shape, n, n)


class _Geom:
    """ctypes arrays of one lattice: padded extents, halos, origin, global extents."""

    def __init__(self, lat: Lattice) -> None:
        nd = lat.nd
        if any(n % 2 for n in lat.global_shape):
            raise ValueError(
                f"lat.global_shape must have even extents for checkerboard updates, "
                f"got {list(lat.global_shape)}"
            )
        halo = [lat.halo if d in lat.padded_dims else 0 for d in range(nd)]
        nsites = math.prod(lat.shape)
        if nsites >= 2**31:
            raise ValueError(f"local array must have < 2**31 sites, got {nsites}")
        self.ext = (ctypes.c_int * nd)(*lat.shape)
        self.halo = (ctypes.c_int * nd)(*halo)
        self.origin = (ctypes.c_longlong * nd)(*lat.origin)
        self.gshape = (ctypes.c_longlong * nd)(*lat.global_shape)


def _check(U: torch.Tensor, lat: Lattice) -> tuple[int, int, str]:
    if not supports_heatbath_host(U, lat):
        raise ValueError(
            "heat-bath host kernels need a CPU SU(2)/SU(3) field (complex64/complex128) of "
            f"shape (*B, {lat.nd}, *{lat.shape}, N, N) with nd in (2, 4); got "
            f"{tuple(U.shape)} {U.dtype} on {U.device}"
        )
    nd = lat.nd
    nbatch = math.prod(U.shape[: U.dim() - (nd + 3)])
    return U.shape[-1], nbatch, _DTYPES[U.dtype]


def _check_inplace(U: torch.Tensor) -> None:
    if not U.is_contiguous() or U.is_conj() or U.is_neg() or U.requires_grad:
        raise ValueError("in-place host sub-steps need a C-contiguous tensor without "
                         "conj/neg bits or autograd (clone().contiguous() it first)")


def _check_dir(mu: int, parity: int, nd: int) -> None:
    if not 0 <= int(mu) < nd:
        raise ValueError(f"mu must be in [0, {nd}), got {mu}")
    if parity not in (0, 1):
        raise ValueError(f"parity must be 0 or 1, got {parity}")


def _constants():  # type: ignore[no-untyped-def]
    from hpcflow.lattice import draws

    return draws.BLOCKS_PER_CONFIG, draws.MAX_ROUNDS, draws.KP_ALPHA_MIN


def _run_heatbath(lib, U, nbatch, geo, mu, parity, beta, rng, step) -> None:  # type: ignore[no-untyped-def]
    from hpcflow.lattice.draws import check_heatbath_beta as _check_beta

    beta = _check_beta(beta)
    step = rng._check_step(step)
    blocks, max_rounds, kp_min = _constants()
    k0, k1 = rng.key_site
    failed = lib.hpcflow_heatbath_substep(U.data_ptr(), nbatch, geo.ext, geo.halo, geo.origin,
                                          geo.gshape, int(mu), int(parity), beta, k0, k1, step,
                                          blocks, max_rounds, kp_min)
    if failed:
        raise RuntimeError(
            f"SU(2) heat bath rejection did not finish in {max_rounds} rounds ({failed} links)")


def heatbath_substep_host(U: torch.Tensor, lat: Lattice, beta: float, rng, step: int,  # type: ignore[no-untyped-def]
                          mu: int, parity: int) -> torch.Tensor:
    """Heat bath of the interior links ``U_mu(x)`` of global parity ``parity``, **in place**.

    ``U``: C-contiguous CPU tensor ``(*B, nd, *lat.shape, N, N)`` whose halos are current
    (no exchange here); ``rng``: a :class:`hpcflow.rng.CounterRNG`. Equals
    ``hpcflow.sampling.heatbath.heatbath_substep`` to rounding. Returns ``U``.
    """
    n, nbatch, real = _check(U, lat)
    _check_inplace(U)
    _check_dir(mu, parity, lat.nd)
    lib = load_heatbath_library(n, real, lat.nd)
    _run_heatbath(lib, U, nbatch, _Geom(lat), mu, parity, beta, rng, step)
    return U


def overrelax_substep_host(U: torch.Tensor, lat: Lattice, mu: int, parity: int) -> torch.Tensor:
    """Overrelaxation of the interior links ``U_mu(x)`` of parity ``parity``, **in place**
    (same contract as :func:`heatbath_substep_host`). Returns ``U``."""
    n, nbatch, real = _check(U, lat)
    _check_inplace(U)
    _check_dir(mu, parity, lat.nd)
    lib = load_heatbath_library(n, real, lat.nd)
    geo = _Geom(lat)
    lib.hpcflow_overrelax_substep(U.data_ptr(), nbatch, geo.ext, geo.halo, geo.origin,
                                  geo.gshape, int(mu), int(parity))
    return U


def _own(U: torch.Tensor) -> torch.Tensor:
    """A private C-contiguous copy (never aliasing the caller's storage)."""
    return U.detach().resolve_conj().resolve_neg().clone(memory_format=torch.contiguous_format)


def _contig(U: torch.Tensor) -> torch.Tensor:
    U = U.detach()
    if U.is_contiguous() and not U.is_conj() and not U.is_neg():
        return U
    return _own(U)


def _vn_ok(U: torch.Tensor, lat: Lattice, comm: Comm | None) -> bool:
    """Whole sweeps in one call on the structure-of-arrays copy (heatbath_host.cpp,
    hpcflow_hb_sweeps_vn): a float64 4D field on the whole periodic lattice of one process
    (no halos, so no exchanges between sub-steps), x_0..x_2 extents multiples of 4."""
    if comm is not None and comm.decomposed:
        return False
    if not supports_heatbath_host(U, lat) or lat.nd != 4 or U.dtype != torch.complex128:
        return False
    if lat.halo and any(d in lat.padded_dims for d in range(4)):
        return False
    if tuple(lat.shape) != tuple(lat.global_shape) or any(lat.origin or ()):
        return False
    return all(n % 4 == 0 for n in lat.shape[:3])


def _sweeps_vn(U, lat, beta, rng, step, n_sweeps, first_hb):  # type: ignore[no-untyped-def]
    """``n_sweeps`` sweeps (the first a heat-bath sweep when ``first_hb``, the others
    overrelaxation), each followed by ``reproject_if_drifted`` (same tolerance and projection;
    the violation of every link is computed inside the kernel while it updates the link)."""
    from hpcflow.lattice.groups import as_group

    n, nbatch, real = _check(U, lat)
    _Geom(lat)  # even extents
    lib = load_heatbath_library(n, real, lat.nd)
    ext = (ctypes.c_int * 4)(*lat.shape)
    blocks, max_rounds, kp_min = _constants()
    k0, k1 = rng.key_site if first_hb else (0, 0)
    tol = 1e3 * torch.finfo(torch.float64).eps
    src = _contig(U)
    out = torch.empty_like(src, memory_format=torch.contiguous_format)
    done, viol = ctypes.c_int(), ctypes.c_double()
    while n_sweeps > 0:
        failed = lib.hpcflow_hb_sweeps_vn(src.data_ptr(), out.data_ptr(), nbatch, ext, n_sweeps,
                                          int(first_hb), beta, k0, k1, step, blocks, max_rounds,
                                          kp_min, tol, ctypes.byref(done), ctypes.byref(viol))
        if failed < 0:  # pragma: no cover - shape guarded by _vn_ok
            raise MemoryError("hpcflow_hb_sweeps_vn: no scratch for the field")
        if failed:
            raise RuntimeError(f"SU(2) heat bath rejection did not finish in {max_rounds} "
                               f"rounds ({failed} links)")
        n_sweeps -= done.value
        first_hb = False
        if viol.value > tol:
            out = as_group({2: "su2", 3: "su3"}[n]).project(out).contiguous()
            src = out
    return out


def _sweep(U, lat, beta, rng, step, comm, overrelax, copy=True):  # type: ignore[no-untyped-def]
    from hpcflow.lattice.geometry import SerialComm

    n, nbatch, real = _check(U, lat)
    if _vn_ok(U, lat, comm):
        with torch.no_grad():
            if overrelax:
                return _sweeps_vn(U, lat, 0.0, None, 0, 1, False)
            return _sweeps_vn(U, lat, beta, rng, _step(rng, step), 1, True)
    comm = SerialComm() if comm is None else comm
    geo = _Geom(lat)
    lib = load_heatbath_library(n, real, lat.nd)
    with torch.no_grad():
        Ub = _own(U) if copy else _contig(U)
        for mu in range(lat.nd):
            for p in (0, 1):
                Ub = _contig(comm.exchange(Ub, lat))
                if overrelax:
                    lib.hpcflow_overrelax_substep(Ub.data_ptr(), nbatch, geo.ext, geo.halo,
                                                  geo.origin, geo.gshape, mu, p)
                else:
                    _run_heatbath(lib, Ub, nbatch, geo, mu, p, beta, rng, step)
        return _reproject_if_drifted(lib, Ub, lat, n, nbatch, geo, comm)


def _step(rng, step):  # type: ignore[no-untyped-def]
    return rng._check_step(step)


def _reproject_if_drifted(lib, U, lat, n, nbatch, geo, comm):  # type: ignore[no-untyped-def]
    """``hpcflow.sampling.hmc.reproject_if_drifted(U, lat, group, comm=comm)`` with the
    violation (max over interior links of ``|U^dag U - 1|`` and ``|det U - 1|``) computed by
    the host library: the same global decision (``comm.max``) and the same projection
    (``group.project``), without torch's batched det (most of a sweep's time otherwise)."""
    from hpcflow.lattice.groups import as_group

    tol = 1e3 * torch.finfo(real_dtype(U.dtype)).eps
    dev = torch.tensor(lib.hpcflow_hb_unitarity_violation(U.data_ptr(), nbatch, geo.ext, geo.halo),
                       dtype=torch.float64)
    viol = float(comm.max(dev))
    if viol > tol:
        U = as_group({2: "su2", 3: "su3"}[n]).project(U)
    return U


def heatbath_sweep_host(U: torch.Tensor, lat: Lattice, beta: float, rng, step: int,  # type: ignore[no-untyped-def]
                        comm=None) -> torch.Tensor:
    """One heat-bath sweep (sub-steps ``(mu, parity)``, ``comm.exchange`` before each, then
    ``reproject_if_drifted``): ``hpcflow.sampling.heatbath.heatbath_sweep`` on the host.
    Returns a new tensor."""
    from hpcflow.lattice.draws import check_heatbath_beta as _check_beta

    _check_beta(beta)
    return _sweep(U, lat, beta, rng, step, comm, False)


def overrelax_sweep_host(U: torch.Tensor, lat: Lattice, comm: Comm | None = None) -> torch.Tensor:
    """One overrelaxation sweep (``hpcflow.sampling.heatbath.overrelax_sweep`` on the host).
    Returns a new tensor."""
    return _sweep(U, lat, 0.0, None, 0, comm, True)


def heatbath_or_sweep_host(U: torch.Tensor, lat: Lattice, beta: float, rng, step: int,  # type: ignore[no-untyped-def]
                           n_or: int = 1, comm=None) -> torch.Tensor:
    """A heat-bath sweep followed by ``n_or`` overrelaxation sweeps
    (``hpcflow.sampling.heatbath.heatbath_or_sweep`` on the host). Returns a new tensor."""
    if isinstance(n_or, bool) or not isinstance(n_or, int) or n_or < 0:
        raise ValueError(f"n_or must be an int >= 0, got {n_or!r}")
    if _vn_ok(U, lat, comm):
        from hpcflow.lattice.draws import check_heatbath_beta as _check_beta

        beta = _check_beta(beta)
        with torch.no_grad():
            return _sweeps_vn(U, lat, beta, rng, _step(rng, step), 1 + n_or, True)
    U = heatbath_sweep_host(U, lat, beta, rng, step, comm)
    for _ in range(n_or):  # U is our own tensor now: no further copies
        U = _sweep(U, lat, 0.0, None, 0, comm, True, copy=False)
    return U
