"""Heat bath and overrelaxation sweeps for the Wilson action (U(1), SU(2), SU(3)).

The conditional weight of one link given its neighbours is
``exp((beta/N) Re tr(U_mu(x) A_mu(x)))`` with ``A`` the staple sum (docs/DESIGN.md).

* U(1): ``U = e^{i theta}``, ``A = |A| e^{i alpha}``: ``theta + alpha`` is von Mises with
  ``kappa = beta |A|``, drawn exactly by Best & Fisher's wrapped-Cauchy rejection
  (Appl. Stat. 28 (1979) 152), vectorised over the pending links.
* SU(2): ``A = k V`` with ``V`` in SU(2), ``k = sqrt(det A)``. ``X = U V`` has weight
  ``exp(alpha x_0)``, ``alpha = 2 beta k / N``, i.e. ``x_0`` has density
  ``sqrt(1 - x_0^2) exp(alpha x_0)`` and a uniform direction: Kennedy-Pendleton
  (Phys. Lett. B 156 (1985) 393) for ``alpha >= 2``, Creutz's method (Phys. Rev. D 21 (1980)
  2308) below, where KP's acceptance collapses. Both are exact.
* SU(3): Cabibbo-Marinari (Phys. Lett. B 119 (1982) 387): left-multiply by SU(2) matrices
  embedded in the (0,1), (1,2), (0,2) subgroups, each drawn by the SU(2) heat bath from the
  quaternion part of the corresponding 2x2 block of ``U A``.
* Overrelaxation: the reflection that keeps ``Re tr(U A)`` (micro-canonical, an
  involution): U(1) ``theta -> -theta - 2 alpha``; SU(2) subgroups ``w = (V^dag)^2``.

Sub-steps run over ``(mu, parity)``: the staple of ``U_mu(x)`` holds only links in other
directions and ``U_mu(x +- nu)``, which have the other parity, so links updated together
share no plaquette. This needs even global extents. Random numbers for a link depend only
on ``(seed, stream, global link index, step, draw block)``: rejection round ``r`` of
subgroup ``s`` of configuration ``b`` in a batch reads the counter index
``(b * R + r * n_sub + s) * nd * V + link`` with ``R = 3 * max_rounds`` blocks per
configuration, so the chain is identical on any process grid, and entry 0 of a batch is
the unbatched chain. Fields may carry leading batch axes ``(*B, nd, *shape, N, N)``
(independent chains updated together, which pays on small lattices).
"""

from __future__ import annotations

import math

import torch

from hpcflow.lattice import draws
from hpcflow.lattice.geometry import Comm, Lattice, as_comm
from hpcflow.sampling.hmc import _check_links, as_group, reproject_if_drifted

__all__ = [
    "checkerboard_masks",
    "heatbath_or_sweep",
    "heatbath_substep",
    "heatbath_sweep",
    "overrelax_substep",
    "overrelax_sweep",
    "staple_mu",
    "su2_subgroups",
    "von_mises",
]

# the counter layout the host kernels share (hpcflow.lattice.draws)
_MAX_ROUNDS = draws.MAX_ROUNDS
_BLOCKS_PER_CONFIG = draws.BLOCKS_PER_CONFIG
_KP_ALPHA_MIN = draws.KP_ALPHA_MIN
_check_beta = draws.check_heatbath_beta


def su2_subgroups(N: int) -> list[tuple[int, int]]:
    """Row/column pairs of the SU(2) subgroups used (Cabibbo-Marinari for SU(3))."""
    if N == 2:
        return [(0, 1)]
    if N == 3:
        return [(0, 1), (1, 2), (0, 2)]
    raise ValueError(f"N must be 2 or 3 for SU(N) subgroup updates, got {N}")


# ---- geometry ------------------------------------------------------------------------------
def _check_even(lat: Lattice) -> None:
    if any(n % 2 for n in lat.global_shape):
        raise ValueError(
            f"lat.global_shape must have even extents for checkerboard updates, "
            f"got {list(lat.global_shape)}"
        )


def checkerboard_masks(
    lat: Lattice, device: torch.device | str | None = None
) -> list[tuple[int, int, torch.Tensor]]:
    """``[(mu, parity, mask)]``: interior sites of that global parity, in update order."""
    _check_even(lat)
    par = lat.parity(device)
    inner = lat.interior(device)
    return [(mu, p, inner & (par == p)) for mu in range(lat.nd) for p in (0, 1)]


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # 1x1 "matrices" (U(1)): an elementwise product is much cheaper than a batched matmul
    return a * b if a.shape[-1] == 1 else a @ b


def staple_mu(U: torch.Tensor, lat: Lattice, mu: int) -> torch.Tensor:
    """Staple sum ``A_mu(x)`` of one direction (as ``hpcflow.lattice.action.staple_sum``):

    ``sum_{nu != mu} U_nu(x+mu) U_mu(x+nu)^dag U_nu(x)^dag
    + U_nu(x+mu-nu)^dag U_mu(x-nu)^dag U_nu(x-nu)``. Reach one site: halo >= 1 suffices.
    """
    ax = -(lat.nd + 3)
    Umu = U.select(ax, mu)
    A = torch.zeros_like(Umu)
    for nu in range(lat.nd):
        if nu == mu:
            continue
        Unu = U.select(ax, nu)
        Unu_xmu = lat.shift(Unu, mu)
        A = A + _mm(_mm(Unu_xmu, lat.shift(Umu, nu).mH), Unu.mH)
        A = A + lat.shift(_mm(_mm(Unu_xmu.mH, Umu.mH), Unu), nu, -1)
    return A


# ---- U(1): von Mises ----------------------------------------------------------------------
def von_mises(
    kappa: torch.Tensor, rng, index: torch.Tensor, step: int, stride: int  # type: ignore[no-untyped-def]
) -> torch.Tensor:
    """Exact von Mises angles in (-pi, pi] with density ``~ exp(kappa cos phi)``.

    Best-Fisher rejection from a wrapped Cauchy envelope (the numpy algorithm), vectorised:
    round ``r`` draws 3 uniforms at index ``index + r * stride``, so each sample depends
    only on (seed, stream, index, step). ``kappa`` is float64 with ``index``'s shape.
    """
    kappa = kappa.double()
    k = kappa.clamp_min(1e-300)
    r = 1.0 + torch.sqrt(1.0 + 4.0 * k * k)
    rho = (r - torch.sqrt(2.0 * r)) / (2.0 * k)
    # rho loses all digits below kappa ~ 1e-5: second-order expansion of s there
    s = torch.where(k < 1e-5, 1.0 / k + k, (1.0 + rho * rho) / (2.0 * rho))
    out = torch.empty_like(kappa)
    pending = torch.arange(kappa.numel(), device=kappa.device)
    kf, sf, idxf = k.reshape(-1), s.reshape(-1), index.reshape(-1)
    outf = out.view(-1)
    for rnd in range(_MAX_ROUNDS):
        if pending.numel() == 0:
            return out
        u = rng.uniform(idxf[pending] + rnd * stride, step, 3)
        kp, sp = kf[pending], sf[pending]
        z = torch.cos(math.pi * u[:, 0])
        w = (1.0 + sp * z) / (sp + z)
        y = kp * (sp - w)
        acc = (y * (2.0 - y) - u[:, 1] >= 0) | (torch.log(y / u[:, 1]) + 1.0 - y >= 0)
        phi = torch.acos(w.clamp(-1.0, 1.0))
        phi = torch.where(u[:, 2] < 0.5, -phi, phi)
        # kappa below 1e-8 is flat to double precision: a uniform angle
        phi = torch.where(kp < 1e-8, math.pi * (2.0 * u[:, 2] - 1.0), phi)
        acc = acc | (kp < 1e-8)
        outf[pending[acc]] = phi[acc]
        pending = pending[~acc]
    raise RuntimeError(f"von Mises rejection did not finish in {_MAX_ROUNDS} rounds")


# ---- SU(2) pieces -----------------------------------------------------------------------------
def _quaternion(R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, b)`` of the quaternion part ``[[a, b], [-b*, a*]]`` of 2x2 blocks ``R``.

    ``Re tr(w R) = Re tr(w R_q)`` for every ``w`` in SU(2), so the quaternion part carries
    the whole local weight; for SU(2) staples ``R_q = R``.
    """
    a = 0.5 * (R[..., 0, 0] + R[..., 1, 1].conj())
    b = 0.5 * (R[..., 0, 1] - R[..., 1, 0].conj())
    return a, b


def _su2_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    row0 = torch.stack((a, b), -1)
    row1 = torch.stack((-b.conj(), a.conj()), -1)
    return torch.stack((row0, row1), -2)


def _su2_x0(
    alpha: torch.Tensor, rng, index: torch.Tensor, step: int, stride: int, n_sub: int, sub: int  # type: ignore[no-untyped-def]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x_0`` with density ``~ sqrt(1 - x0^2) exp(alpha x0)`` and a uniform unit 3-vector.

    ``alpha >= 2``: Kennedy-Pendleton, ``lambda^2 = -(ln u0 + cos^2(2 pi u1) ln u2)/(2 alpha)``
    is Gamma(3/2)/(2 alpha), accepted with ``sqrt(1 - lambda^2)``, ``x0 = 1 - 2 lambda^2``.
    ``alpha < 2``: Creutz, ``x0`` from ``exp(alpha x0)`` on [-1, 1] by inversion, accepted
    with ``sqrt(1 - x0^2)``. Round ``r`` reads index ``index + (r n_sub + sub) stride``.
    """
    alpha = alpha.double().clamp_min(1e-300)
    n = alpha.numel()
    x0 = torch.empty(n, dtype=torch.float64, device=alpha.device)
    dirs = torch.empty(n, 2, dtype=torch.float64, device=alpha.device)
    pending = torch.arange(n, device=alpha.device)
    use_kp = alpha >= _KP_ALPHA_MIN
    span = -torch.expm1(-2.0 * alpha)  # 1 - exp(-2 alpha), accurate for small alpha
    for rnd in range(_MAX_ROUNDS):
        if pending.numel() == 0:
            return x0, dirs
        u = rng.uniform(index[pending] + (rnd * n_sub + sub) * stride, step, 6)
        al = alpha[pending]
        lam2 = -(torch.log(u[:, 0]) + torch.cos(2 * math.pi * u[:, 1]) ** 2 * torch.log(u[:, 2]))
        lam2 = lam2 / (2.0 * al)
        x_kp = 1.0 - 2.0 * lam2
        acc_kp = u[:, 3] ** 2 <= 1.0 - lam2
        x_cr = 1.0 + torch.log1p(-u[:, 0] * span[pending]) / al
        acc_cr = u[:, 1] ** 2 <= 1.0 - x_cr * x_cr
        kp = use_kp[pending]
        xs = torch.where(kp, x_kp, x_cr)
        acc = torch.where(kp, acc_kp, acc_cr)
        done = pending[acc]
        x0[done] = xs[acc].clamp(-1.0, 1.0)
        dirs[done] = u[acc, 4:6]
        pending = pending[~acc]
    raise RuntimeError(f"SU(2) heat bath rejection did not finish in {_MAX_ROUNDS} rounds")


def _su2_from_x0(x0: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, b)`` of ``x0 + i x.sigma`` with ``|x| = sqrt(1 - x0^2)`` along a uniform direction."""
    r = torch.sqrt((1.0 - x0 * x0).clamp_min(0.0))
    cos_t = 2.0 * d[:, 0] - 1.0
    sin_t = torch.sqrt((1.0 - cos_t * cos_t).clamp_min(0.0))
    ph = 2.0 * math.pi * d[:, 1]
    x1, x2, x3 = r * sin_t * torch.cos(ph), r * sin_t * torch.sin(ph), r * cos_t
    return torch.complex(x0, x3), torch.complex(x2, x1)


def _apply_rows(w: torch.Tensor, M: torch.Tensor, i: int, j: int) -> torch.Tensor:
    """``embed_{ij}(w) @ M``: mix rows ``i`` and ``j`` of ``M`` (..., N, N) by 2x2 ``w``."""
    Mi, Mj = M[..., i, :], M[..., j, :]
    out = M.clone()
    out[..., i, :] = w[..., 0, 0, None] * Mi + w[..., 0, 1, None] * Mj
    out[..., j, :] = w[..., 1, 0, None] * Mi + w[..., 1, 1, None] * Mj
    return out


def _normalised_quaternion(
    M: torch.Tensor, i: int, j: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(k, a, b)``: block ``(i, j)`` of ``M`` has quaternion part ``k [[a, b], [-b*, a*]]``."""
    R = M[..., [i, j], :][..., :, [i, j]]
    a, b = _quaternion(R.to(torch.complex128))
    k = torch.sqrt(a.real**2 + a.imag**2 + b.real**2 + b.imag**2)
    # k = 0 (measure zero) leaves the weight flat: any V will do, take V = 1
    safe = k > 1e-300
    ks = torch.where(safe, k, torch.ones_like(k))
    a = torch.where(safe, a / ks, torch.ones_like(a))
    b = torch.where(safe, b / ks, torch.zeros_like(b))
    return k, a, b


# ---- link updates -------------------------------------------------------------------------------
def _heatbath_links(
    Ul: torch.Tensor, Al: torch.Tensor, group, beta: float, rng, index: torch.Tensor,  # type: ignore[no-untyped-def]
    step: int, stride: int,
) -> torch.Tensor:
    """New links (n, N, N) drawn from ``exp((beta/N) Re tr(U A))`` (SU(3): one CM pass)."""
    N = group.N
    if N == 1:
        a = Al[:, 0, 0].to(torch.complex128)
        phi = von_mises(beta * a.abs(), rng, index, step, stride)
        theta = phi - torch.angle(a)
        return torch.polar(torch.ones_like(theta), theta).to(Ul.dtype)[:, None, None]
    subs = su2_subgroups(N)
    U = Ul.to(torch.complex128)
    M = U @ Al.to(torch.complex128)
    for s, (i, j) in enumerate(subs):
        k, va, vb = _normalised_quaternion(M, i, j)
        x0, d = _su2_x0(2.0 * beta * k / N, rng, index, step, stride, len(subs), s)
        xa, xb = _su2_from_x0(x0, d)
        # w = X V^dag: then w M has quaternion block X k, the heat-bath distributed one
        w = _su2_matrix(xa, xb) @ _su2_matrix(va, vb).mH
        U = _apply_rows(w, U, i, j)
        M = _apply_rows(w, M, i, j)
    return U.to(Ul.dtype)


def _overrelax_links(Ul: torch.Tensor, Al: torch.Tensor, group) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Reflected links with ``Re tr(U' A) = Re tr(U A)`` (an involution at fixed ``A``)."""
    if group.N == 1:
        a = Al[:, 0, 0]
        # theta' = -theta - 2 arg A (conj keeps |U|, so rounding drift does not grow)
        ph = a / a.abs().clamp_min(1e-300)
        return (Ul[:, 0, 0].conj() * ph.conj() ** 2)[:, None, None]
    U = Ul.to(torch.complex128)
    M = U @ Al.to(torch.complex128)
    for i, j in su2_subgroups(group.N):
        _, va, vb = _normalised_quaternion(M, i, j)
        vd = _su2_matrix(va, vb).mH
        w = vd @ vd
        U = _apply_rows(w, U, i, j)
        M = _apply_rows(w, M, i, j)
    return U.to(Ul.dtype)


def _substep_(U, lat, group, beta, rng, step, mu, mask, comm, overrelax):  # type: ignore[no-untyped-def]
    """Update ``U[:, mu]`` (``U``: ``(B, nd, ...)``) in place on ``mask`` sites; returns ``U``."""
    U = comm.exchange(U, lat)
    B = U.shape[0]
    A = staple_mu(U, lat, mu)[:, mask]  # (B, n_sel, N, N)
    Umu = U[:, mu]
    Ul = Umu[:, mask]
    n_sel, N = Ul.shape[1], Ul.shape[-1]
    Ul, A = Ul.reshape(B * n_sel, N, N), A.reshape(B * n_sel, N, N)
    if overrelax:
        new = _overrelax_links(Ul, A, group)
    else:
        nl = lat.nd * lat.volume
        link = lat.global_link_index(U.device)[mu][mask]
        b = torch.arange(B, device=U.device)[:, None] * (_BLOCKS_PER_CONFIG * nl)
        index = (b + link).reshape(-1)
        new = _heatbath_links(Ul, A, group, beta, rng, index, step, nl)
    Umu[:, mask] = new.reshape(B, n_sel, N, N)
    return U


def _prepare(U, lat, group, beta):  # type: ignore[no-untyped-def]
    group = as_group(group)
    batch = _check_links(U, lat, group)
    _check_even(lat)
    # one flat batch axis inside; callers get their own shape back
    return group, _check_beta(beta), batch, U.reshape((-1,) + tuple(U.shape[len(batch):]))


def heatbath_substep(
    U: torch.Tensor, lat: Lattice, group, beta: float, rng, step: int,  # type: ignore[no-untyped-def]
    mu: int, parity: int, comm: Comm | None = None,
) -> torch.Tensor:
    """Heat bath of the interior links ``U_mu(x)`` with global parity ``parity`` (new tensor)."""
    group, beta, _, Ub = _prepare(U, lat, group, beta)
    mask = (lat.parity(U.device) == parity) & lat.interior(U.device)
    with torch.no_grad():
        Ub = _substep_(Ub.clone(), lat, group, beta, rng, step, mu, mask, as_comm(comm), False)
    return Ub.reshape(U.shape)


def overrelax_substep(
    U: torch.Tensor, lat: Lattice, group, beta: float, mu: int, parity: int,  # type: ignore[no-untyped-def]
    comm: Comm | None = None,
) -> torch.Tensor:
    """Overrelaxation of the interior links ``U_mu(x)`` of parity ``parity`` (new tensor)."""
    group, beta, _, Ub = _prepare(U, lat, group, beta)
    mask = (lat.parity(U.device) == parity) & lat.interior(U.device)
    with torch.no_grad():
        Ub = _substep_(Ub.clone(), lat, group, beta, None, 0, mu, mask, as_comm(comm), True)
    return Ub.reshape(U.shape)


def _host_sweeps(U: torch.Tensor, lat: Lattice, group):  # type: ignore[no-untyped-def]
    """The host-kernel module for these sweeps when ``lat.backend`` resolves to ``host``:
    ``"u1"`` (a whole 2D U(1) lattice, one C++ call per sweep: kernels/u1_updates),
    ``"sun"`` (SU(2)/SU(3) on padded local arrays, one call per sub-step:
    kernels/heatbath_host), or None (the torch path). Both equal the torch path to rounding
    and consume the same counter-based draws."""
    from hpcflow.kernels import dispatch

    if not dispatch.host_path(U, lat):
        return None
    from hpcflow.kernels import u1_updates

    if group.N == 1 and u1_updates.supports_u1_host(U, lat, even=True):
        return "u1"
    try:
        from hpcflow.kernels import heatbath_host
    except ImportError:  # pragma: no cover - module not present
        return None
    if heatbath_host.supports_heatbath_host(U, lat):
        return "sun"
    return None


def heatbath_sweep(
    U: torch.Tensor, lat: Lattice, group, beta: float, rng, step: int,  # type: ignore[no-untyped-def]
    comm: Comm | None = None,
) -> torch.Tensor:
    """One heat-bath sweep over all links: sub-steps ``(mu, parity)``; returns a new field.

    Every link is updated once, with draws indexed by its global link index and ``step``;
    ``comm.exchange`` runs before each sub-step and only interior links change. With
    ``lat.backend`` resolving to ``host`` the sweep runs on the host kernels (same draws,
    same result to rounding).
    """
    group, beta, _, Ub = _prepare(U, lat, group, beta)
    comm = as_comm(comm)
    host = _host_sweeps(U, lat, group)
    if host == "u1":
        from hpcflow.kernels.u1_updates import heatbath_sweep_u1

        return heatbath_sweep_u1(U.contiguous(), lat, beta, rng, step)
    if host == "sun":
        from hpcflow.kernels.heatbath_host import heatbath_sweep_host

        return heatbath_sweep_host(U, lat, beta, rng, step, comm)
    with torch.no_grad():
        Ub = Ub.clone()
        for mu, _, mask in checkerboard_masks(lat, U.device):
            Ub = _substep_(Ub, lat, group, beta, rng, step, mu, mask, comm, False)
        return reproject_if_drifted(Ub, lat, group, comm=comm).reshape(U.shape)


def overrelax_sweep(
    U: torch.Tensor, lat: Lattice, group, beta: float,  # type: ignore[no-untyped-def]
    comm: Comm | None = None,
) -> torch.Tensor:
    """One overrelaxation sweep (keeps the action exactly; ``beta`` only for validation)."""
    group, beta, _, Ub = _prepare(U, lat, group, beta)
    comm = as_comm(comm)
    host = _host_sweeps(U, lat, group)
    if host == "u1":
        from hpcflow.kernels.u1_updates import overrelax_sweep_u1

        return overrelax_sweep_u1(U.contiguous(), lat)
    if host == "sun":
        from hpcflow.kernels.heatbath_host import overrelax_sweep_host

        return overrelax_sweep_host(U, lat, comm)
    with torch.no_grad():
        Ub = Ub.clone()
        for mu, _, mask in checkerboard_masks(lat, U.device):
            Ub = _substep_(Ub, lat, group, beta, None, 0, mu, mask, comm, True)
        return reproject_if_drifted(Ub, lat, group, comm=comm).reshape(U.shape)


def heatbath_or_sweep(
    U: torch.Tensor, lat: Lattice, group, beta: float, rng, step: int,  # type: ignore[no-untyped-def]
    n_or: int = 1, comm: Comm | None = None,
) -> torch.Tensor:
    """One heat-bath sweep followed by ``n_or`` overrelaxation sweeps (the usual compound)."""
    if isinstance(n_or, bool) or not isinstance(n_or, int) or n_or < 0:
        raise ValueError(f"n_or must be an int >= 0, got {n_or!r}")
    group, beta, _, _ = _prepare(U, lat, group, beta)
    if _host_sweeps(U, lat, group) == "sun":
        from hpcflow.kernels.heatbath_host import heatbath_or_sweep_host

        return heatbath_or_sweep_host(U, lat, beta, rng, step, n_or, as_comm(comm))
    U = heatbath_sweep(U, lat, group, beta, rng, step, comm)
    for _ in range(n_or):
        U = overrelax_sweep(U, lat, group, beta, comm)
    return U
