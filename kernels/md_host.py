"""Host (CPU) kernels of the HMC molecular dynamics and of the Wilson flow (``md_host.cpp``).

The torch path of :mod:`hpcflow.sampling.hmc` and :func:`hpcflow.lattice.observables.wilson_flow`
reproduced to rounding with fused C++/OpenMP kernels on halo-padded local arrays; the staple
sum ``A_mu(x)`` comes from the existing host kernels (:func:`hpcflow.kernels.host.staple_sum`,
SIMD or harness), everything after it is done in place by ``md_host.cpp``:

* ``P <- P - eps (beta/N) TA(U A)`` (momentum update fused with the force),
* ``U <- exp(eps P) U`` (exponential of the group: U(1) polar, SU(2) closed form as
  ``SU2.exp``, SU(3) exact Cayley-Hamilton/Taylor form, equal to ``torch.linalg.matrix_exp``
  to ~1e-15),
* ``0.5 sum tr(P^dag P)`` per configuration (float64 accumulation),
* the Luscher RK3 stages of the Wilson flow (``X <- a eps Z(W) + c X; W <- exp(X) W``).

All kernels act on interior links only; halos are refreshed by ``comm.exchange`` exactly
where the torch code calls it (before every force / flow stage and every action), so the
decomposed run equals the single-rank run. Momenta are drawn in C++ (``philox.h``, the
exact port of CounterRNG; :func:`sample_momenta_host`) equal to
:func:`hpcflow.sampling.hmc.sample_momenta` on interior links (torch draws for other rngs),
and the Metropolis step is :func:`hpcflow.sampling.hmc.accept_dH`: the chain is the
torch chain. In ``hpcflow.sampling.hmc.hmc_trajectory_host`` the Wilson actions of H come from the first and last
force's staples (``sum Re tr(U A) = 4 sum Re tr P``), the kinetic energy of the new momenta
from the draw kernel, and one staple buffer serves every force.

Public API (all return new tensors; inputs are not modified):

* ``supports_md_host(U, lat) -> bool``
* ``update_momenta(U, A, P, lat, k, eps) -> P'``  (``P - eps * k * TA(U A)``, interior)
* ``update_links(U, P, lat, eps) -> U'``           (``exp(eps P) U``, interior)
* ``sample_momenta_host(lat, group, rng, step, dtype, batch) -> P`` (interior links, halos 0)
* ``group_exp(X, eps=1.0) -> exp(eps X)``          (any ``(..., N, N)``)
* ``kinetic_energy_host(P, lat, comm=None) -> float64 (*B)``
* ``force_host(U, lat, beta) -> F``                (``(beta/N) TA(U A)``; tests/diagnostics)
* ``unitarity_violation_host(U, lat, comm=None) -> float`` (as ``hmc.unitarity_violation``)
* ``reproject_if_drifted_host(U, lat, group, tol=None, comm=None)`` (as ``hmc.reproject_if_drifted``,
  with the host check: ``HMC.trajectory``'s re-projection)
* ``leapfrog_host(U, P, lat, group, beta, n_steps, tau, comm=None) -> (U, P)``
* ``omelyan_host(U, P, lat, group, beta, n_steps, tau, comm=None, lam=OMELYAN_LAMBDA)``
* ``hamiltonian_host(U, P, lat, beta, comm=None) -> float64 (*B)``
* ``MDState``, ``leapfrog_steps``, ``omelyan_steps``, ``momenta_host``, ``kinetic_local``,
  ``rng_key``, ``info_of``: the pieces ``hpcflow.sampling.hmc.hmc_trajectory_host`` (the
  trajectory on these kernels, as ``HMC.trajectory``) is made of
* ``wilson_flow_host(u, lat, eps, n_steps, comm=None) -> flowed field``

One shared library per (N, real type, Nd) is built at first use through
:func:`hpcflow.kernels.host.build_library` (cache keyed on sources, flags, compiler, CPU).
Threads: ``OMP_NUM_THREADS``.
"""

from __future__ import annotations

import ctypes
import functools
import math
from typing import TYPE_CHECKING

import torch

from . import host
from ._common import as_kernel_input, field_info, real_dtype

if TYPE_CHECKING:
    from hpcflow.lattice.geometry import Comm, Lattice

__all__ = [
    "build_md_library",
    "force_host",
    "group_exp",
    "hamiltonian_host",
    "kinetic_energy_host",
    "leapfrog_host",
    "load_md_library",
    "omelyan_host",
    "reproject_if_drifted_host",
    "sample_momenta_host",
    "supports_md_host",
    "unitarity_violation_host",
    "update_links",
    "update_momenta",
    "wilson_flow_host",
]

_SOURCES = ("su_n.cuh", "host_harness.h", "philox.h", "md_host.cpp")
#: Luscher RK3 stages as (a, c) of ``X <- a eps Z + c X``: exponents Z0/4,
#: 8/9 Z1 - 17/36 Z0, 3/4 Z2 - 8/9 Z1 + 17/36 Z0.
#: The Omelyan 2MN parameter (= hpcflow.sampling.hmc.OMELYAN_LAMBDA, tested equal).
OMELYAN_LAMBDA = 0.1932
_RK3 = ((0.25, 0.0), (8.0 / 9.0, -17.0 / 9.0), (0.75, -1.0))


def build_md_library(n: int, real: str, nd: int):  # type: ignore[no-untyped-def]
    """Compile (or find in the cache) ``md_host.cpp`` for ``(n, real, nd)``; its path."""
    host._check_config(n, real, nd)
    defines = (f"-DHPCFLOW_N={n}", f"-DHPCFLOW_REAL={real}", f"-DHPCFLOW_ND={nd}")
    return host.build_library("md_host.cpp", _SOURCES, defines,
                              f"libhpcflow_md_n{n}_{real}_{nd}d.so")


@functools.cache
def load_md_library(n: int, real: str, nd: int) -> ctypes.CDLL:
    """Build if needed and load the MD library for ``(n, real, nd)`` (once per process)."""
    lib = ctypes.CDLL(str(build_md_library(n, real, nd)))
    cfg = [ctypes.c_int(), ctypes.c_int(), ctypes.c_int()]
    lib.hpcflow_md_config(*(ctypes.byref(c) for c in cfg))
    got = tuple(c.value for c in cfg)
    want = (n, nd, 8 if real == "double" else 4)
    if got != want:
        raise RuntimeError(f"MD host library reports (N, Nd, bytes) = {got}, wanted {want}")
    vp, i64, ip, d = ctypes.c_void_p, ctypes.c_longlong, ctypes.POINTER(ctypes.c_int), ctypes.c_double
    lib.hpcflow_md_update_momenta.argtypes = [vp, vp, vp, i64, ip, ip, d, d, vp]
    lib.hpcflow_md_update_links.argtypes = [vp, vp, i64, ip, ip, d]
    lib.hpcflow_md_exp.argtypes = [vp, vp, i64, d]
    lib.hpcflow_md_kinetic_energy.argtypes = [vp, vp, i64, ip, ip]
    lib.hpcflow_md_flow_stage.argtypes = [vp, vp, vp, i64, ip, ip, d, d, d]
    lib.hpcflow_md_unitarity_violation.argtypes = [vp, vp, i64, ip, ip]
    u32 = ctypes.c_uint
    lib.hpcflow_md_sample_momenta.argtypes = [vp, i64, ip, ip, ip, ip, u32, u32, i64, d, vp,
                                              ctypes.c_int, vp]
    for f in ("update_momenta", "update_links", "exp", "kinetic_energy", "flow_stage",
              "unitarity_violation", "sample_momenta"):
        getattr(lib, f"hpcflow_md_{f}").restype = None
    return lib


def supports_md_host(U: torch.Tensor, lat: Lattice) -> bool:
    """True when the MD host kernels take ``U`` on ``lat``: a CPU complex128/complex64 field of
    N in (1, 2, 3) on a 2D or 4D lattice, and the host library builds and loads here."""
    try:
        info = field_info(U, lat)
    except (TypeError, ValueError):
        return False
    if U.device.type != "cpu":
        return False
    try:
        load_md_library(info.n, info.real, info.nd)
        host.load_host_library(info.n, info.real, info.nd)
    except (OSError, RuntimeError):
        return False
    return True


# ---- thin wrappers (in place on private buffers) -------------------------------------------
def info_of(U: torch.Tensor, lat: Lattice):  # type: ignore[no-untyped-def]
    info = field_info(U, lat)
    if U.device.type != "cpu":
        raise ValueError(f"MD host kernels need CPU tensors, got U on {U.device}")
    return info


def _geom(info):  # type: ignore[no-untyped-def]
    arr = ctypes.c_int * info.nd
    return arr(*info.ext), arr(*info.halo)


def _lib(info) -> ctypes.CDLL:  # type: ignore[no-untyped-def]
    return load_md_library(info.n, info.real, info.nd)


def _owned(t: torch.Tensor) -> torch.Tensor:
    """A private contiguous copy that the kernels may overwrite."""
    return as_kernel_input(t).clone()


def _check_same(t: torch.Tensor, U: torch.Tensor, name: str) -> None:
    if t.shape != U.shape or t.dtype != U.dtype:
        raise ValueError(f"{name} must have the shape and dtype of U {tuple(U.shape)} {U.dtype}, "
                         f"got {tuple(t.shape)} {t.dtype}")


def _momenta_(U, A, P, info, k: float, eps: float) -> None:  # type: ignore[no-untyped-def]
    ext, halo = _geom(info)
    _lib(info).hpcflow_md_update_momenta(U.data_ptr(), A.data_ptr(), P.data_ptr(), info.nbatch,
                                         ext, halo, float(k), float(eps), None)


def _links_(U, P, info, eps: float) -> None:  # type: ignore[no-untyped-def]
    ext, halo = _geom(info)
    _lib(info).hpcflow_md_update_links(U.data_ptr(), P.data_ptr(), info.nbatch, ext, halo,
                                       float(eps))


def update_momenta(U: torch.Tensor, A: torch.Tensor, P: torch.Tensor, lat: Lattice, k: float,
                   eps: float) -> torch.Tensor:
    """``P - eps * k * TA(U A)`` on interior links (halo links of P unchanged)."""
    info = info_of(U, lat)
    _check_same(A, U, "A")
    _check_same(P, U, "P")
    P = _owned(P)
    _momenta_(as_kernel_input(U), as_kernel_input(A), P, info, k, eps)
    return P


def update_links(U: torch.Tensor, P: torch.Tensor, lat: Lattice, eps: float) -> torch.Tensor:
    """``exp(eps P) U`` on interior links (halo links of U unchanged)."""
    info = info_of(U, lat)
    _check_same(P, U, "P")
    U = _owned(U)
    _links_(U, as_kernel_input(P), info, eps)
    return U


def group_exp(X: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """``exp(eps X)`` of the group of N = X.shape[-1] (as ``groups.*.exp``) for any ``(..., N, N)``."""
    n = X.shape[-1]
    if X.dim() < 2 or X.shape[-2] != n or n not in (1, 2, 3):
        raise ValueError(f"X must be (..., N, N) with N in (1, 2, 3), got {tuple(X.shape)}")
    if X.dtype not in (torch.complex128, torch.complex64) or X.device.type != "cpu":
        raise TypeError(f"X must be a CPU complex128/complex64 tensor, got {X.dtype} on {X.device}")
    x = as_kernel_input(X)
    out = torch.empty_like(x)
    lib = load_md_library(n, "double" if X.dtype == torch.complex128 else "float", 4)
    lib.hpcflow_md_exp(x.data_ptr(), out.data_ptr(), x.numel() // (n * n), float(eps))
    return out


def kinetic_local(P: torch.Tensor, info) -> torch.Tensor:  # type: ignore[no-untyped-def]
    out = torch.empty(info.batch_shape, dtype=torch.float64)
    ext, halo = _geom(info)
    _lib(info).hpcflow_md_kinetic_energy(as_kernel_input(P).data_ptr(), out.data_ptr(),
                                         info.nbatch, ext, halo)
    return out


def kinetic_energy_host(P: torch.Tensor, lat: Lattice, comm: Comm | None = None) -> torch.Tensor:
    """``(1/2) sum_{interior x, mu} tr(P^dag P)`` over all ranks, float64 ``(*B)`` (as
    ``hmc.kinetic_energy``)."""
    from hpcflow.lattice.geometry import as_comm

    return as_comm(comm).sum(kinetic_local(P, info_of(P, lat)))


def unitarity_violation_host(U: torch.Tensor, lat: Lattice, comm: Comm | None = None) -> float:
    """``hmc.unitarity_violation`` on the host: max over interior links (whole batch, all
    ranks) of ``|U^dag U - 1|`` and, for SU(N), ``|det U - 1|``."""
    from hpcflow.lattice.geometry import as_comm

    info = info_of(U, lat)
    out = torch.zeros(1, dtype=torch.float64)
    ext, halo = _geom(info)
    _lib(info).hpcflow_md_unitarity_violation(as_kernel_input(U).data_ptr(), out.data_ptr(),
                                              info.nbatch, ext, halo)
    c = as_comm(comm)
    dev = out[0]
    return float(c.max(dev))


def reproject_if_drifted_host(U: torch.Tensor, lat: Lattice, group, tol: float | None = None,  # type: ignore[no-untyped-def]
                              comm=None) -> torch.Tensor:
    """``hmc.reproject_if_drifted`` with the host unitarity check (same default tolerance
    ``1e3 * eps`` of the dtype, same global decision, same ``group.project``)."""
    from hpcflow.lattice.groups import as_group

    if tol is None:
        tol = 1e3 * torch.finfo(real_dtype(U.dtype)).eps
    if unitarity_violation_host(U, lat, comm) > tol:
        U = as_group(group).project(U)
    return U


def force_host(U: torch.Tensor, lat: Lattice, beta: float) -> torch.Tensor:
    """``F = (beta/N) TA(U A)`` on interior links (0 on halo links), from the host staple and
    the fused momentum kernel (``0 - (-1) k TA(U A)``); ``U`` must have valid halos."""
    info = info_of(U, lat)
    u = as_kernel_input(U)
    F = torch.zeros_like(u)
    _momenta_(u, host.staple_sum(u, lat), F, info, beta / info.n, -1.0)
    return F


def _wilson_action_host(U: torch.Tensor, lat: Lattice, beta: float, comm: Comm | None) -> torch.Tensor:
    """``-(beta/N) sum Re tr P`` (action.wilson_action) with the host plaquette kernel."""
    re = host.plaquette_re_tr(U, lat)
    local = lat.interior_sum(re, inner=0).sum(-1)
    return -(beta / U.shape[-1]) * comm.sum(local)


def hamiltonian_host(U: torch.Tensor, P: torch.Tensor, lat: Lattice, beta: float,
                     comm=None) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """``H = (1/2) sum tr(P^dag P) + S_W(U)`` (global, float64 ``(*B)``), halos refreshed first
    (as ``hmc.hamiltonian``)."""
    from hpcflow.lattice.geometry import as_comm

    comm = as_comm(comm)
    U = comm.exchange(U, lat)
    return kinetic_energy_host(P, lat, comm) + _wilson_action_host(U, lat, beta, comm).double()


# ---- momenta --------------------------------------------------------------------------------
def rng_key(rng):  # type: ignore[no-untyped-def]
    """``rng.key_site`` of a counter-based generator (CounterRNG), else None (torch draws)."""
    key = getattr(rng, "key_site", None)
    if key is None or not hasattr(rng, "normal"):
        return None
    return int(key[0]), int(key[1])


def momenta_host(lat: Lattice, group, key, step: int, dtype: torch.dtype,  # type: ignore[no-untyped-def]
                  batch: tuple[int, ...], with_ke: bool):
    """``(P, ke)``: host momenta (interior links; halo links 0) and, if ``with_ke``, the local
    kinetic energy ``0.5 sum tr(P^dag P)`` float64 ``(*B)`` (else None)."""
    from hpcflow.lattice.groups import as_group

    group = as_group(group)
    if isinstance(step, bool) or not 0 <= int(step) < 2**32:
        raise ValueError(f"step must be an int in [0, 2**32), got {step!r}")
    n = group.N
    shape = (*batch, lat.nd, *lat.shape, n, n)
    padded = any(lat.halo > 0 and d in lat.padded_dims for d in range(lat.nd))
    P = (torch.zeros if padded else torch.empty)(shape, dtype=dtype)
    info = info_of(P, lat)
    gen = _generators(group)
    ext, halo = _geom(info)
    arr = ctypes.c_int * info.nd
    ke = torch.empty(info.batch_shape, dtype=torch.float64) if with_ke else None
    scale = 1.0 if n == 1 else math.sqrt(2.0)
    _lib(info).hpcflow_md_sample_momenta(
        P.data_ptr(), info.nbatch, ext, halo, arr(*lat.origin), arr(*lat.global_shape),
        key[0], key[1], int(step), scale, gen.data_ptr(), int(group.n_algebra),
        None if ke is None else ke.data_ptr())
    return P, ke


_GEN_CACHE: dict[tuple[str, int], torch.Tensor] = {}


def _generators(group) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """``group.generators`` (complex128) as (re, im) doubles, row-major ``(n_alg, N, N, 2)``."""
    key = (group.name, group.N)
    if key not in _GEN_CACHE:
        t = group.generators(torch.complex128, "cpu").resolve_conj().contiguous()
        _GEN_CACHE[key] = torch.view_as_real(t).contiguous()
    return _GEN_CACHE[key]


def sample_momenta_host(lat: Lattice, group, rng, step: int,  # type: ignore[no-untyped-def]
                        dtype: torch.dtype = torch.complex128,
                        batch: tuple[int, ...] = ()) -> torch.Tensor:
    """:func:`hpcflow.sampling.hmc.sample_momenta` drawn in C++ (philox.h): equal on interior
    links (to ~1e-16 in float64: Box-Muller's libm vs torch's log/cos/sin); halo links are 0
    (the kernels never read them). ``rng`` must be a counter-based generator with
    ``key_site`` (CounterRNG)."""
    from hpcflow.lattice.groups import _batch_tuple

    key = rng_key(rng)
    if key is None:
        raise TypeError(f"sample_momenta_host needs a counter-based rng with key_site, got {rng!r}")
    return momenta_host(lat, group, key, step, dtype, _batch_tuple(batch), False)[0]


# ---- integrators -----------------------------------------------------------------------------
def _staple_fn(info):  # type: ignore[no-untyped-def]
    """The staple kernel that ``host.staple_sum`` would call for this field (variant auto)."""
    if host._resolve_variant("auto", info) == "simd":
        host.simd_window_bytes()
        return host.load_simd_library(info.n, info.real, info.nd).hpcflow_staple_sum_simd
    return host.load_host_library(info.n, info.real, info.nd).hpcflow_staple_sum


def _private(t: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``t`` if it is a contiguous tensor sharing no memory with ``src``, else a private copy."""
    t = as_kernel_input(t)
    if t is src or t.untyped_storage().data_ptr() == src.untyped_storage().data_ptr():
        return t.clone()
    return t


class MDState:
    """Private state of one integration: owned contiguous U and P, updated in place, and one
    staple buffer reused by every force."""

    def __init__(self, U, P, lat, group, beta, comm, own_p=False, src=None):  # type: ignore[no-untyped-def]
        from hpcflow.lattice.geometry import as_comm
        from hpcflow.lattice.groups import as_group

        self.group = as_group(group)
        self.info = info_of(U, lat)
        if self.group.N != self.info.n:
            raise ValueError(f"group {self.group.name} does not match N = {self.info.n} of U")
        _check_same(P, U, "P")
        self.lat, self.comm, self.k = lat, as_comm(comm), float(beta) / self.group.N
        self.U = _owned(U) if src is None else _private(U, src)
        self.P = as_kernel_input(P) if own_p else _owned(P)
        self.fresh = src is not None  # U's halos are valid (exchanged by the caller)
        self.A = torch.empty_like(self.U)
        self._ext, self._halo = _geom(self.info)
        self._lib = _lib(self.info)
        self._staple = _staple_fn(self.info)

    def _force_field(self) -> None:
        # hmc._make_force: the staple reaches one site across the boundary: exchange first
        if not self.fresh:
            self.U = _exchanged(self.comm, self.U, self.lat)
        self.fresh = False
        self._staple(self.U.data_ptr(), None, self.A.data_ptr(), self.info.nbatch, 0, 0,
                     self._ext, self._halo)

    def momenta(self, eps: float, retr: torch.Tensor | None = None) -> None:
        """``P <- P - eps F(U)``; with ``retr`` (float64 ``(*B)``), also the local
        ``sum Re tr(U A)`` of this force's staples (4x the plaquette sum) into it."""
        self._force_field()
        self._lib.hpcflow_md_update_momenta(self.U.data_ptr(), self.A.data_ptr(),
                                            self.P.data_ptr(), self.info.nbatch, self._ext,
                                            self._halo, self.k, float(eps),
                                            None if retr is None else retr.data_ptr())

    def links(self, eps: float) -> None:
        self._lib.hpcflow_md_update_links(self.U.data_ptr(), self.P.data_ptr(), self.info.nbatch,
                                          self._ext, self._halo, float(eps))


def leapfrog_steps(md: MDState, n_steps: int, tau: float, r0=None, r1=None) -> None:  # type: ignore[no-untyped-def]
    """hmc.leapfrog on md; ``r0``/``r1``: ``sum Re tr(U A)`` of the first/last force (the
    Wilson actions of the initial and final fields)."""
    eps = tau / n_steps
    md.momenta(0.5 * eps, r0)
    for i in range(n_steps):
        md.links(eps)
        md.momenta(eps if i < n_steps - 1 else 0.5 * eps, r1 if i == n_steps - 1 else None)


def omelyan_steps(md: MDState, n_steps: int, tau: float, lam: float, r0=None, r1=None) -> None:  # type: ignore[no-untyped-def]
    """hmc.omelyan on md (``r0``, ``r1`` as in :func:`leapfrog_steps`)."""
    eps = tau / n_steps
    md.momenta(lam * eps, r0)
    for i in range(n_steps):
        md.links(0.5 * eps)
        md.momenta((1.0 - 2.0 * lam) * eps)
        md.links(0.5 * eps)
        last = i == n_steps - 1
        md.momenta((1.0 if last else 2.0) * lam * eps, r1 if last else None)


def leapfrog_host(U: torch.Tensor, P: torch.Tensor, lat: Lattice, group, beta: float,  # type: ignore[no-untyped-def]
                  n_steps: int, tau: float, comm=None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`hpcflow.sampling.hmc.leapfrog` with the host kernels (same arguments and result)."""
    md = MDState(U, P, lat, group, beta, comm)
    leapfrog_steps(md, n_steps, tau)
    return md.U, md.P


def omelyan_host(U: torch.Tensor, P: torch.Tensor, lat: Lattice, group, beta: float,  # type: ignore[no-untyped-def]
                 n_steps: int, tau: float, comm=None, lam: float | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`hpcflow.sampling.hmc.omelyan` with the host kernels (same arguments and result)."""
    lam = OMELYAN_LAMBDA if lam is None else lam
    md = MDState(U, P, lat, group, beta, comm)
    omelyan_steps(md, n_steps, tau, lam)
    return md.U, md.P


# ---- Wilson flow -------------------------------------------------------------------------------
def wilson_flow_host(u: torch.Tensor, lat: Lattice, eps: float, n_steps: int,
                     comm=None) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """:func:`hpcflow.lattice.observables.wilson_flow` with the host kernels (Luscher RK3,
    ``n_steps`` steps of size ``eps``; halos exchanged before each stage). Interior links
    equal the torch result to rounding; halo links are left as the last exchange made them
    (the torch path also moves them, with wrapped forces: exchange before using them)."""
    from hpcflow.lattice.geometry import as_comm
    from hpcflow.lattice.reference import check_link_field

    check_link_field(u, lat)
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 0:
        raise ValueError(f"n_steps must be a non-negative int, got {n_steps!r}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    info = info_of(u, lat)
    cm = as_comm(comm)
    ext, halo = _geom(info)
    lib = _lib(info)
    w = _owned(u)
    x = torch.zeros_like(w)
    for _ in range(n_steps):
        for a, c in _RK3:
            w = _exchanged(cm, w, lat)
            A = host.staple_sum(w, lat)
            lib.hpcflow_md_flow_stage(w.data_ptr(), A.data_ptr(), x.data_ptr(), info.nbatch,
                                      ext, halo, float(eps), a, c)
    return w


def _exchanged(comm: Comm, U: torch.Tensor, lat: Lattice) -> torch.Tensor:
    """``comm.exchange(U, lat)`` as a contiguous buffer the kernels may overwrite."""
    out = comm.exchange(U, lat)
    # a fresh tensor (halo_exchange), or U itself (SerialComm): either may be overwritten
    return out if out is U else as_kernel_input(out)
