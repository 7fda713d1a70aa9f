"""Hybrid Monte Carlo for Wilson gauge fields (Duane, Kennedy, Pendleton, Roweth 1987).

Conventions (fixed here, tested in ``tests/unit/test_hmc.py``):

* Momenta ``P_mu(x)`` live in the Lie algebra: ``P = i sum_a w_a t_a`` with Hermitian
  generators normalised as ``tr t_a t_b = delta_ab`` (``t_a = sqrt(2) T_a`` for SU(N), where
  ``tr T_a T_b = delta_ab / 2`` is the groups module's normalisation; ``t = 1`` for U(1)).
* ``H(U, P) = (1/2) sum_{x, mu} tr(P^dag P) + S(U) = (1/2) sum_{x, mu, a} w_a^2 + S(U)``,
  so the momentum heat bath draws ``w_a ~ N(0, 1)``.
* Equations of motion ``dU/dt = P U``, ``dP/dt = -F`` with the force
  ``F_mu(x) = (beta/N) TA(U_mu(x) A_mu(x))`` (TA: traceless anti-Hermitian part; plain
  anti-Hermitian part for U(1)), ``A`` the staple sum. Then
  ``d/de S(exp(e X) U)|_0 = sum Re tr(F^dag X)`` and ``dH/dt = 0``.

Domain decomposition: momenta are drawn by global link index, the fields are updated only
on interior links, halos are refreshed by ``comm.exchange`` before every force and action
evaluation, and all global sums go through ``comm.sum``. On one rank (``SerialComm``) every
hook is the identity, so there is one code path.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from hpcflow.dtypes import real_dtype
from hpcflow.lattice.geometry import Comm, Lattice, as_comm
from hpcflow.lattice.groups import as_group

__all__ = [
    "HMC",
    "as_group",
    "force",
    "hmc_trajectory_host",
    "hamiltonian",
    "kinetic_energy",
    "leapfrog",
    "accept_dH",
    "omelyan",
    "reproject_if_drifted",
    "sample_momenta",
    "unitarity_violation",
]

OMELYAN_LAMBDA = 0.1932  # Omelyan, Mryglod, Folk 2003: minimal-norm 2nd-order scheme (2MN)
_INTEGRATORS = ("omelyan", "leapfrog")


def _link_mask(lat: Lattice, device: torch.device) -> torch.Tensor:
    """Bool mask broadcastable to a link field ``(nd, *shape, N, N)``: interior links."""
    return lat.interior(device)[None, ..., None, None]


def _check_links(U: torch.Tensor, lat: Lattice, group, name: str = "U") -> tuple[int, ...]:  # type: ignore[no-untyped-def]
    """Validate ``U`` of shape ``(*B, nd, *lat.shape, N, N)``; return the batch shape ``B``."""
    tail = (lat.nd, *lat.shape, group.N, group.N)
    if not isinstance(U, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(U).__name__}")
    if U.dim() < len(tail) or tuple(U.shape[U.dim() - len(tail):]) != tail:
        raise ValueError(
            f"{name} has shape {tuple(U.shape)}, expected (*B, nd, *lat.shape, N, N) with "
            f"(nd, *lat.shape, N, N) = {tail}"
        )
    if U.dtype not in (torch.complex128, torch.complex64):
        raise TypeError(f"{name} must be complex128 or complex64, got {U.dtype}")
    return tuple(U.shape[: U.dim() - len(tail)])


# ---- pieces of the Hamiltonian ----------------------------------------------------------
def sample_momenta(
    lat: Lattice,
    group,  # type: ignore[no-untyped-def]
    rng,  # type: ignore[no-untyped-def]
    step: int,
    dtype: torch.dtype = torch.complex128,
    device: torch.device | str | None = None,
    batch: tuple[int, ...] = (),
) -> torch.Tensor:
    """Gaussian momenta ``P = i sum_a w_a t_a``, ``w_a ~ N(0, 1)``, ``tr t_a t_b = delta_ab``.

    Drawn with ``rng.normal(lat.global_link_index(), step, n_algebra)``: the momentum of a
    link depends only on (seed, stream, global link index, step), so the chain is the same
    on any process grid (halo copies get the owner's values). Configuration ``b`` of a
    ``batch`` uses index ``b * nd * V + link`` (``groups.batched_index``), so entry 0 of a
    batch is the unbatched chain. Shape ``(*batch, nd, *lat.shape, N, N)``.
    """
    from hpcflow.lattice.groups import batched_index

    group = as_group(group)
    idx = batched_index(lat.global_link_index(device), lat.nd * lat.volume, tuple(batch))
    w = rng.normal(idx, step, group.n_algebra, dtype=real_dtype(dtype))
    # algebra_from_coords uses T_a with tr T_a T_b = 1/2 for SU(N): t_a = sqrt(2) T_a
    scale = 1.0 if group.N == 1 else math.sqrt(2.0)
    return group.algebra_from_coords(scale * w).to(dtype)


def kinetic_energy(P: torch.Tensor, lat: Lattice, comm: Comm | None = None) -> torch.Tensor:
    """``(1/2) sum_{x in interior, mu} tr(P^dag P)`` summed over all ranks, float64 ``(*B)``."""
    pp = (P.real.double() ** 2 + P.imag.double() ** 2).sum(dim=(-2, -1)).sum(-(lat.nd + 1))
    return as_comm(comm).sum(0.5 * lat.interior_sum(pp, inner=0))


def hamiltonian(
    U: torch.Tensor,
    P: torch.Tensor,
    lat: Lattice,
    beta: float,
    comm: Comm | None = None,
) -> torch.Tensor:
    """``H = (1/2) sum tr(P^dag P) + S_W(U)`` (global, float64 ``(*B)``); halos refreshed first."""
    from hpcflow.lattice.action import wilson_action

    comm = as_comm(comm)
    U = comm.exchange(U, lat)
    return kinetic_energy(P, lat, comm) + wilson_action(U, lat, beta, comm=comm).double()


def force(U: torch.Tensor, lat: Lattice, group, beta: float) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """HMC force ``F_mu(x) = (beta/N) TA(U_mu(x) A_mu(x))`` from the staple sum ``A``.

    ``U`` must have valid halos (one layer) where it is decomposed. With this sign
    ``d/de S(exp(e X) U)|_{e=0} = sum Re tr(F^dag X)`` for every algebra field ``X``.
    """
    from hpcflow.lattice.action import staple_sum

    group = as_group(group)
    A = staple_sum(U, lat)
    return (beta / group.N) * group.traceless_antihermitian(U @ A)


# ---- integrators --------------------------------------------------------------------------
ForceFn = Callable[[torch.Tensor], torch.Tensor]


def _make_force(lat: Lattice, group, beta: float, comm: Comm) -> ForceFn:  # type: ignore[no-untyped-def]
    def f(U: torch.Tensor) -> torch.Tensor:
        # the staple reaches one site across the boundary: refresh the halos first
        return force(comm.exchange(U, lat), lat, group, beta)

    return f


def _update_links(U: torch.Tensor, P: torch.Tensor, eps: float, group, mask: torch.Tensor):  # type: ignore[no-untyped-def]
    """``U <- exp(eps P) U`` on interior links (halos stay until the next exchange)."""
    return torch.where(mask, group.exp(eps * P) @ U, U)


def _update_momenta(P: torch.Tensor, F: torch.Tensor, eps: float, mask: torch.Tensor):  # type: ignore[no-untyped-def]
    return torch.where(mask, P - eps * F, P)


def leapfrog(
    U: torch.Tensor,
    P: torch.Tensor,
    lat: Lattice,
    group,  # type: ignore[no-untyped-def]
    beta: float,
    n_steps: int,
    tau: float,
    comm: Comm | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Leapfrog (2nd order): ``P -= eps/2 F; U = exp(eps P) U; P -= eps/2 F``, ``eps = tau/n``.

    Consecutive half-steps in P are merged: ``n_steps + 1`` force evaluations. Error of H
    over a fixed trajectory length is O(eps^2).
    """
    group, comm = as_group(group), as_comm(comm)
    f = _make_force(lat, group, beta, comm)
    mask = _link_mask(lat, U.device)
    eps = tau / n_steps
    P = _update_momenta(P, f(U), 0.5 * eps, mask)
    for i in range(n_steps):
        U = _update_links(U, P, eps, group, mask)
        P = _update_momenta(P, f(U), eps if i < n_steps - 1 else 0.5 * eps, mask)
    return U, P


def omelyan(
    U: torch.Tensor,
    P: torch.Tensor,
    lat: Lattice,
    group,  # type: ignore[no-untyped-def]
    beta: float,
    n_steps: int,
    tau: float,
    comm: Comm | None = None,
    lam: float = OMELYAN_LAMBDA,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Omelyan 2MN (Omelyan, Mryglod, Folk, Comput. Phys. Commun. 151 (2003) 272).

    One step: ``P -= lam eps F; U = exp(eps/2 P) U; P -= (1 - 2 lam) eps F;
    U = exp(eps/2 P) U; P -= lam eps F``. Time-reversible and symplectic like leapfrog,
    with a smaller O(eps^2) error coefficient at ``lam ~ 0.1932``; 2 n + 1 forces.
    """
    group, comm = as_group(group), as_comm(comm)
    f = _make_force(lat, group, beta, comm)
    mask = _link_mask(lat, U.device)
    eps = tau / n_steps
    P = _update_momenta(P, f(U), lam * eps, mask)
    for i in range(n_steps):
        U = _update_links(U, P, 0.5 * eps, group, mask)
        P = _update_momenta(P, f(U), (1.0 - 2.0 * lam) * eps, mask)
        U = _update_links(U, P, 0.5 * eps, group, mask)
        # merge the closing lam-step with the next step's opening one
        P = _update_momenta(P, f(U), (2.0 if i < n_steps - 1 else 1.0) * lam * eps, mask)
    return U, P


# ---- accept / reject and hygiene ------------------------------------------------------------
def accept_dH(dH: torch.Tensor, rng, step: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Accept with probability ``min(1, exp(-dH))``; ``dH`` of shape ``(*B)``, bool result.

    The uniforms are chain-level draws (``rng.uniform_scalar(step, n)``: a reserved key,
    never a site index; entry ``b`` for configuration ``b``), so every rank of one chain
    takes the same decision from the same globally summed ``dH``. NaN/inf are rejected.
    """
    dH = torch.as_tensor(dH, dtype=torch.float64)
    u = rng.uniform_scalar(step, max(dH.numel(), 1)).reshape(dH.shape).to(dH.device)
    # u < exp(-dH) also accepts every dH <= 0 since u < 1
    return torch.isfinite(dH) & (u < torch.exp(-dH))


def unitarity_violation(U: torch.Tensor, lat: Lattice, comm: Comm | None = None) -> float:
    """Max over interior links (and ranks) of ``|U^dag U - 1|`` and ``|det U - 1|`` (SU(N))."""
    n = U.shape[-1]
    eye = torch.eye(n, dtype=U.dtype, device=U.device)
    dev = (U.mH @ U - eye).abs().amax(dim=(-2, -1))
    if n > 1:
        dev = torch.maximum(dev, (torch.linalg.det(U) - 1).abs())
    dev = dev[lat.interior_slices(inner=0)].amax().double()
    c = as_comm(comm)
    return float(c.max(dev))


def reproject_if_drifted(
    U: torch.Tensor,
    lat: Lattice,
    group,  # type: ignore[no-untyped-def]
    tol: float | None = None,
    comm: Comm | None = None,
) -> torch.Tensor:
    """Project all links back onto the group if the global unitarity violation exceeds ``tol``.

    Exponentials of algebra elements are group elements to rounding, so drift grows only
    like (number of products) x machine epsilon; re-projecting when it passes ``tol``
    (default ``1e3 * eps`` of the dtype: ~2e-13 in FP64, ~1e-4 in FP32) keeps links on the
    group at negligible cost and with a change far below any statistical resolution. The
    decision uses a global max, so all ranks project together.
    """
    if tol is None:
        tol = 1e3 * torch.finfo(real_dtype(U.dtype)).eps
    if unitarity_violation(U, lat, comm) > tol:
        U = as_group(group).project(U)
    return U


# ---- the sampler ------------------------------------------------------------------------------
def hmc_trajectory_host(hmc: HMC, U: torch.Tensor, step: int):  # type: ignore[no-untyped-def]
    """:meth:`HMC.trajectory` with the host kernels (``hpcflow.kernels.md_host``): same momenta
    (``sample_momenta``, drawn in C++ for a counter-based rng), same accept draw
    (``accept_dH``), same counters (``hmc.n_trajectories``, ``hmc.n_accepted``), same
    re-projection; returns ``(U_next, accepted, dH)`` (bool/float unbatched, tensors of shape
    ``B`` batched). A rejected unbatched trajectory returns ``U`` itself."""
    from hpcflow.kernels import md_host as mh
    from hpcflow.lattice.geometry import as_comm

    lat, group, comm = hmc.lat, hmc.group, as_comm(hmc.comm)
    batch = _check_links(U, lat, group)
    with torch.no_grad():
        key = mh.rng_key(hmc.rng)
        if key is not None and U.device.type == "cpu":
            P, ke0 = mh.momenta_host(lat, group, key, step, U.dtype, tuple(batch), True)
        else:
            P = sample_momenta(lat, group, hmc.rng, step, U.dtype, U.device, batch)
            ke0 = mh.kinetic_local(P, mh.info_of(P, lat))
        # H = KE + S_W: S_W(U) = -(beta/N) sum Re tr P = -(beta/N) sum Re tr(U A) / 4 from the
        # staples of the first and of the last force (both on freshly exchanged fields)
        Ux = comm.exchange(U, lat)
        md = mh.MDState(Ux, P, lat, group, hmc.beta, comm, own_p=True, src=U)
        r0 = torch.empty(tuple(batch), dtype=torch.float64)
        r1 = torch.empty(tuple(batch), dtype=torch.float64)
        if hmc.integrator == "leapfrog":
            mh.leapfrog_steps(md, hmc.n_steps, hmc.tau, r0, r1)
        else:
            mh.omelyan_steps(md, hmc.n_steps, hmc.tau, hmc.lam, r0, r1)
        U1, P1 = md.U, md.P
        del md
        kb = -float(hmc.beta) / U.shape[-1] / 4.0
        H0 = comm.sum(ke0) + kb * comm.sum(r0)
        H1 = comm.sum(mh.kinetic_local(P1, mh.info_of(P1, lat))) + kb * comm.sum(r1)
        dH = H1 - H0
        acc = accept_dH(dH, hmc.rng, step)
        hmc.n_trajectories += max(acc.numel(), 1)
        hmc.n_accepted += int(acc.sum())
        if bool(acc.any()):
            U1 = mh.reproject_if_drifted_host(U1, lat, group, hmc.reproject_tol, comm)
        if bool(acc.all()):
            U_next = U1
        elif not bool(acc.any()):
            U_next = U
        else:
            sel = acc.to(U.device).reshape(acc.shape + (1,) * (U.dim() - len(batch)))
            U_next = torch.where(sel, U1, U)
        if not batch:
            return U_next, bool(acc), float(dH)
        return U_next, acc, dH


def _u1_host_trajectory(hmc: HMC, U: torch.Tensor, step: int):  # type: ignore[no-untyped-def]
    """``HMC.trajectory`` of a whole 2D U(1) lattice in one C++ call (kernels/u1_updates)."""
    from hpcflow.kernels.u1_updates import hmc_trajectory_u1

    U1, acc, dH = hmc_trajectory_u1(U, hmc.lat, hmc.beta, hmc.n_steps, hmc.tau, hmc.integrator,
                                    hmc.lam, hmc.rng, step, tol=hmc.reproject_tol)
    hmc.n_trajectories += max(acc.numel(), 1)
    hmc.n_accepted += int(acc.sum())
    if acc.dim() == 0:
        return U1, bool(acc), float(dH)
    return U1, acc, dH


class HMC:
    """HMC Markov chain for the Wilson action of ``group`` on ``lat``.

    ``trajectory(U, step)`` draws momenta for ``step``, integrates over time ``tau`` with
    ``n_steps`` steps of ``integrator`` (``"omelyan"`` or ``"leapfrog"``) and accepts with
    ``min(1, exp(-dH))``. ``U`` is one configuration ``(nd, *lat.shape, N, N)`` or a batch
    of independent chains ``(*B, nd, ...)``; it is not modified in place. Use step numbers (or an ``rng`` stream) that no other update in the
    same chain uses, so draws are never reused.
    """

    def __init__(
        self,
        lat: Lattice,
        group,  # type: ignore[no-untyped-def]
        beta: float,
        n_steps: int,
        tau: float,
        integrator: str = "omelyan",
        rng=None,  # type: ignore[no-untyped-def]
        comm: Comm | None = None,
        lam: float = OMELYAN_LAMBDA,
        reproject_tol: float | None = None,
    ) -> None:
        if not isinstance(lat, Lattice):
            raise TypeError(f"lat must be a Lattice, got {type(lat).__name__}")
        self.lat = lat
        self.group = as_group(group)
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta):
            raise ValueError(f"beta must be a finite real number, got {beta!r}")
        if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
            raise ValueError(f"n_steps must be an int >= 1, got {n_steps!r}")
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau > 0:
            raise ValueError(f"tau must be a real number > 0, got {tau!r}")
        if integrator not in _INTEGRATORS:
            raise ValueError(f"integrator must be one of {list(_INTEGRATORS)}, got {integrator!r}")
        if not 0.0 < lam < 0.5:
            raise ValueError(f"lam must be in (0, 0.5), got {lam!r}")
        if rng is None or not hasattr(rng, "normal") or not hasattr(rng, "uniform_scalar"):
            raise TypeError(f"rng must be a CounterRNG, got {rng!r}")
        self.beta = float(beta)
        self.n_steps = n_steps
        self.tau = float(tau)
        self.integrator = integrator
        self.rng = rng
        self.comm = as_comm(comm)
        self.lam = float(lam)
        self.reproject_tol = reproject_tol
        self.n_trajectories = 0
        self.n_accepted = 0

    def _host_updates(self, U: torch.Tensor):  # type: ignore[no-untyped-def]
        """The host-kernel trajectory for ``U`` when ``lat.backend`` resolves to ``host``:
        2D U(1) on a whole (unpadded) lattice runs a whole trajectory in one C++ call
        (``kernels/u1_updates``), other fields the fused MD kernels (``kernels/md_host``);
        ``None`` (the torch path) where neither applies. Both equal the torch path to
        rounding: same momenta, same accept draws, same counters."""
        from hpcflow.kernels import dispatch

        if not dispatch.host_path(U, self.lat):
            return None
        from hpcflow.kernels import md_host, u1_updates

        if u1_updates.supports_u1_host(U, self.lat, even=False):
            return _u1_host_trajectory
        if md_host.supports_md_host(U, self.lat):
            return hmc_trajectory_host
        return None

    @property
    def acceptance(self) -> float:
        """Fraction of accepted trajectories so far (nan before the first)."""
        return self.n_accepted / self.n_trajectories if self.n_trajectories else float("nan")

    def integrate(self, U: torch.Tensor, P: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Molecular dynamics over ``tau``: ``(U, P) -> (U', P')`` (reversible, area preserving)."""
        args = (self.lat, self.group, self.beta, self.n_steps, self.tau, self.comm)
        if self.integrator == "leapfrog":
            return leapfrog(U, P, *args)
        return omelyan(U, P, *args, lam=self.lam)

    def trajectory(
        self, U: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, bool | torch.Tensor, float | torch.Tensor]:
        """One HMC trajectory: ``(U_next, accepted, dH)``.

        ``U`` of shape ``(nd, *lat.shape, N, N)`` gives ``(U', bool, float)``; a batch of
        independent chains ``(*B, nd, ...)`` gives bool and float64 tensors of shape ``B``
        (configuration ``b`` uses momenta index ``b nd V + link`` and accept draw ``b``).
        On rejection the old configuration is kept.
        """
        batch = _check_links(U, self.lat, self.group)
        host = self._host_updates(U)
        if host is not None:
            return host(self, U, step)
        with torch.no_grad():
            P = sample_momenta(self.lat, self.group, self.rng, step, U.dtype, U.device, batch)
            H0 = hamiltonian(U, P, self.lat, self.beta, self.comm)
            U1, P1 = self.integrate(U, P)
            H1 = hamiltonian(U1, P1, self.lat, self.beta, self.comm)
            dH = H1 - H0
            acc = accept_dH(dH, self.rng, step)
            self.n_trajectories += max(acc.numel(), 1)
            self.n_accepted += int(acc.sum())
            if bool(acc.any()):
                U1 = reproject_if_drifted(U1, self.lat, self.group, self.reproject_tol, self.comm)
            sel = acc.to(U.device).reshape(acc.shape + (1,) * (U.dim() - len(batch)))
            U_next = torch.where(sel, U1, U)
            if not batch:
                return U_next, bool(acc), float(dH)
            return U_next, acc, dH
