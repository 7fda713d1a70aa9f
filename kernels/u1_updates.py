"""Host (CPU) 2D U(1) updates in one call each: HMC trajectories, heat-bath and
overrelaxation sweeps (``u1_updates.cpp``).

The C++ twin, for U(1) on one rank (periodic, unpadded 2D arrays), of

* :meth:`hpcflow.sampling.hmc.HMC.trajectory` (``leapfrog`` / ``omelyan``):
  momenta ``w = rng.normal(b nd V + link, step, 1)`` (the field's real precision, U(1)
  scale 1) as :func:`~hpcflow.sampling.hmc.sample_momenta`; ``H = sum w^2/2 + S``,
  ``S = -beta sum_x cos theta_P(x)``; force ``F = beta Im(U A)`` (the anti-Hermitian part of
  ``U A``) with the same merged half-steps as :func:`~hpcflow.sampling.hmc.leapfrog` /
  :func:`~hpcflow.sampling.hmc.omelyan`; accept iff ``isfinite(dH)`` and
  ``u_b < exp(-dH_b)``, ``u = rng.uniform_scalar(step, B)``; the
  :func:`~hpcflow.sampling.hmc.reproject_if_drifted` check when any entry is accepted;
  rejected entries keep the old links. The links are integrated as
  ``U(t) = exp(i delta(t)) U(0)``, so the plaquettes are ``p(0) exp(i Delta(t))``:
  no angles are taken of the input, one sincos per plaquette and force evaluation.
* :func:`hpcflow.sampling.heatbath.heatbath_sweep`: sub-steps ``(mu, parity)`` in
  ``checkerboard_masks`` order, the staple of ``staple_mu``, ``kappa = beta |A|``,
  Best-Fisher von Mises exactly as ``von_mises`` (``kappa < 1e-5`` series, ``kappa < 1e-8``
  uniform angle; round ``r`` of link ``l`` of configuration ``b`` reads the 3 float64
  uniforms at counter ``b _BLOCKS_PER_CONFIG nd V + l + r nd V``, same ``step``), new link
  ``exp(i (phi - arg A))``; then the ``reproject_if_drifted`` check.
* :func:`hpcflow.sampling.heatbath.overrelax_sweep`: ``U -> U^* (A^*/|A|)^2``
  (``theta -> -theta - 2 arg A``), same order and check.

Precision: HMC runs in float64 throughout (complex64 fields are read into double, momenta
drawn in float32 as the torch path draws them, the result rounded to complex64). The sweeps
compute the staples (and the overrelaxation reflection) in the field's precision, the von
Mises draw and the new heat-bath link in float64, and round every new link to the field's
precision at once, exactly as the torch path does; built with ``-ffp-contract=off`` (no FMA)
so these float32 products round like torch's vectorised ones. Results equal the torch path
to rounding: <= ~1e-13 in complex128 after a trajectory or sweep (tests: 1e-12; 1e-11 for
three sweeps); complex64 HMC to ~1e-6 (torch integrates in float32); complex64 sweeps bit
for bit where torch's loops have no scalar tail (e.g. 8x8), else to float32 rounding except
on links whose staple nearly cancels (arg A is ill-conditioned there, ~1e-7/|A|, in either
path). Accept decisions (Metropolis, von Mises) and ``dH`` agree to rounding; a decision
could differ only if a test value fell within rounding of its bound (the complex64 torch
path's ``dH`` carries float32 rounding of the action, ~1e-5).

Preconditions (:func:`supports_u1_host`): CPU, C-contiguous complex128/complex64 tensors of
shape ``(*B, 2, L0, L1, 1, 1)``; ``lat`` 2D with ``halo == 0`` and the local array equal to
the global lattice (one rank, ``SerialComm``); even extents for the sweeps. Links should lie
on U(1) to rounding (as the torch path keeps them): the HMC kernel carries the input moduli
along like the torch path but uses ``p(0) exp(i Delta)`` for the plaquettes, exact only for
``|U| = 1``. The decomposed (halo) case stays on the torch path. Inputs are never modified;
the functions are stateless (no ``HMC.n_accepted`` bookkeeping). Batch entries run in
parallel on ``torch.get_num_threads()`` OpenMP threads (each entry is sequential).

Cost (bench/u1_updates_quick.py, one core, complex128, 16x16, Python wrapper included):
~40 us per 10-step leapfrog trajectory, ~33 us per heat-bath sweep, ~13 us per
overrelaxation sweep (torch path: ~2.8 ms, ~9.5 ms, ~0.44 ms).
"""

from __future__ import annotations

import ctypes
import functools
import math
from typing import TYPE_CHECKING

import torch

from .host import build_library

if TYPE_CHECKING:  # hints only: hpcflow.lattice imports this package
    from hpcflow.lattice.geometry import Lattice

__all__ = [
    "heatbath_sweep_u1",
    "hmc_trajectory_u1",
    "load_u1_library",
    "overrelax_sweep_u1",
    "supports_u1_host",
]

_SOURCES = ("philox.h", "u1_updates.cpp")
# value-preserving flags that let GCC vectorise the sqrt / select loops
_DEFINES = ("-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off")
_SUFFIX = {torch.complex128: "d", torch.complex64: "f"}
#: reproject_if_drifted's default tolerance per dtype: 1e3 * eps of the real type
_TOL = {torch.complex128: 1e3 * torch.finfo(torch.float64).eps,
        torch.complex64: 1e3 * torch.finfo(torch.float32).eps}
_INTEGRATORS = {"leapfrog": 0, "omelyan": 1}


@functools.cache
def load_u1_library() -> ctypes.CDLL:
    """Build (or find in the cache) and load ``u1_updates.cpp`` (once per process)."""
    lib = ctypes.CDLL(str(build_library("u1_updates.cpp", _SOURCES, _DEFINES,
                                        "libhpcflow_u1_updates.so")))
    vp, ci, cd, u32, u64 = (ctypes.c_void_p, ctypes.c_int, ctypes.c_double, ctypes.c_uint32,
                            ctypes.c_uint64)
    for s in _SUFFIX.values():
        f = getattr(lib, f"hpcflow_u1_hmc_{s}")
        f.argtypes = [vp, vp, vp, vp, ci, ci, ci, cd, ci, cd, ci, cd, u32, u32, u32, u32, u32,
                      cd, ci]
        f.restype = None
        f = getattr(lib, f"hpcflow_u1_sweep_{s}")
        f.argtypes = [vp, vp, ci, ci, ci, cd, u32, u32, u32, u64, ci, cd, ci]
        f.restype = None
    lib.hpcflow_u1_sincos.argtypes = [vp, vp, vp, ci]
    lib.hpcflow_u1_sincos.restype = None
    return lib


@functools.cache
def _blocks_per_config() -> int:
    from hpcflow.lattice.draws import BLOCKS_PER_CONFIG

    return int(BLOCKS_PER_CONFIG)


def supports_u1_host(U: torch.Tensor, lat: Lattice, even: bool = True) -> bool:
    """True if the host kernels apply: a U(1) field ``(*B, 2, L0, L1, 1, 1)`` on the CPU,
    C-contiguous complex128/complex64, ``lat`` 2D without halo on one rank, and (``even``,
    needed by the sweeps' checkerboard) even extents."""
    if not isinstance(U, torch.Tensor) or U.device.type != "cpu" or U.dtype not in _SUFFIX:
        return False
    if lat.nd != 2 or lat.halo != 0 or tuple(lat.local_shape) != tuple(lat.global_shape):
        return False
    if any(lat.origin):
        return False
    if U.dim() < 5 or tuple(U.shape[-5:]) != (2, *lat.global_shape, 1, 1):
        return False
    if even and any(n % 2 for n in lat.global_shape):
        return False
    return U.is_contiguous() and not U.requires_grad


def _check(U: torch.Tensor, lat: Lattice, even: bool) -> None:
    if not supports_u1_host(U, lat, even):
        raise ValueError(
            "u1 host kernels need a contiguous CPU complex128/complex64 U(1) field "
            f"(*B, 2, L0, L1, 1, 1) on an unpadded single-rank 2D lattice"
            f"{' with even extents' if even else ''}; got U {tuple(U.shape)} {U.dtype} on "
            f"{U.device} (contiguous={U.is_contiguous()}), lat {lat!r}")


def hmc_trajectory_u1(
    U: torch.Tensor,
    lat: Lattice,
    beta: float,
    n_steps: int,
    tau: float,
    integrator: str,
    lam: float,
    rng,  # type: ignore[no-untyped-def]
    step: int,
    tol: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One HMC trajectory per configuration: ``(U_next, accepted, dH)`` with ``accepted``
    bool and ``dH`` float64 tensors of the batch shape (``()`` for one configuration).

    Equals ``HMC(lat, "u1", beta, n_steps, tau, integrator, rng, lam=lam,
    reproject_tol=tol).trajectory(U, step)`` to rounding; ``lam`` is used by ``"omelyan"``
    only. Stateless: the caller counts trajectories / acceptances (``HMC.n_accepted``).
    """
    _check(U, lat, even=False)
    if integrator not in _INTEGRATORS:
        raise ValueError(f"integrator must be one of {list(_INTEGRATORS)}, got {integrator!r}")
    if n_steps < 1 or not tau > 0:
        raise ValueError(f"need n_steps >= 1 and tau > 0, got n_steps={n_steps}, tau={tau}")
    if not 0 <= step <= 0xFFFFFFFF:
        raise ValueError(f"step must be in [0, 2**32), got {step}")
    batch = U.shape[:-5]
    B = U.numel() // (2 * lat.volume)
    out = torch.empty_like(U)
    acc = torch.empty(batch, dtype=torch.bool)
    dH = torch.empty(batch, dtype=torch.float64)
    ks, kc = rng.key_site, rng.key_chain
    getattr(load_u1_library(), "hpcflow_u1_hmc_" + _SUFFIX[U.dtype])(
        U.data_ptr(), out.data_ptr(), acc.data_ptr(), dH.data_ptr(), B,
        lat.global_shape[0], lat.global_shape[1], float(beta), int(n_steps), float(tau),
        _INTEGRATORS[integrator], float(lam), ks[0], ks[1], kc[0], kc[1], int(step),
        _TOL[U.dtype] if tol is None else float(tol), torch.get_num_threads())
    return out, acc, dH


def _sweep(U: torch.Tensor, lat: Lattice, beta: float, rng, step: int, mode: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    _check(U, lat, even=True)
    if not (beta >= 0 and math.isfinite(beta)):
        raise ValueError(f"beta must be a finite number >= 0 for the heat bath, got {beta!r}")
    if not 0 <= step <= 0xFFFFFFFF:
        raise ValueError(f"step must be in [0, 2**32), got {step}")
    B = U.numel() // (2 * lat.volume)
    out = torch.empty_like(U)
    ks = rng.key_site if rng is not None else (0, 0)
    getattr(load_u1_library(), "hpcflow_u1_sweep_" + _SUFFIX[U.dtype])(
        U.data_ptr(), out.data_ptr(), B, lat.global_shape[0], lat.global_shape[1], float(beta),
        ks[0], ks[1], int(step), _blocks_per_config(), mode, _TOL[U.dtype],
        torch.get_num_threads())
    return out


def heatbath_sweep_u1(U: torch.Tensor, lat: Lattice, beta: float, rng, step: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """One heat-bath sweep (new tensor); equals ``heatbath_sweep(U, lat, "u1", beta, rng, step)``
    to rounding (``beta >= 0``)."""
    return _sweep(U, lat, beta, rng, step, 0)


def overrelax_sweep_u1(U: torch.Tensor, lat: Lattice) -> torch.Tensor:
    """One overrelaxation sweep (new tensor); equals ``overrelax_sweep(U, lat, "u1", beta)``
    to rounding (the reflection does not depend on ``beta``)."""
    return _sweep(U, lat, 0.0, None, 0, 1)


def _sincos(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' vectorised sin/cos (tests): float64 ``x`` -> ``(sin x, cos x)``."""
    x = x.double().contiguous()
    s, c = torch.empty_like(x), torch.empty_like(x)
    load_u1_library().hpcflow_u1_sincos(x.data_ptr(), s.data_ptr(), c.data_ptr(), x.numel())
    return s, c

