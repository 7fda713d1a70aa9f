"""HMC molecular dynamics and Wilson flow on the host kernels (kernels/md_host.cpp) equal the
torch path of hpcflow.sampling.hmc / observables.wilson_flow to rounding: the exponential
(vs groups.*.exp / torch.linalg.matrix_exp), the fused momentum update, the link update,
the kinetic energy, whole leapfrog and Omelyan trajectories (U, P, dH, accept, counters)
for U(1), SU(2), SU(3) in 2D and 4D, float64 and complex64, batched and not, with and
without halos; the Wilson flow (field and clover energy density); dH ~ eps^2."""

from __future__ import annotations

import math

import pytest
import torch

from hpcflow.comm import local_from_global
from hpcflow.kernels import host, md_host
from hpcflow.lattice import action, observables
from hpcflow.lattice.geometry import Lattice, SerialComm
from hpcflow.lattice.groups import get_group, random_field
from hpcflow.rng import CounterRNG
from hpcflow.sampling import hmc as hmc_mod
from hpcflow.sampling.hmc import HMC

TOL = {torch.complex128: 1e-12, torch.complex64: 1e-5}
BETA = {"u1": 1.5, "su2": 2.3, "su3": 5.7}


class PeriodicHaloComm(SerialComm):
    """One rank owning the whole periodic lattice on a halo-padded array: exchange refills
    the halos from the interior (what LatticeComm does on a 1-rank grid)."""

    decomposed = True  # halos to fill, like a LatticeComm

    def exchange(self, f: torch.Tensor, lat: Lattice, inner: int = 2, width: int | None = None) -> torch.Tensor:
        return local_from_global(f[lat.interior_slices(inner)], lat, inner)


def _setup(gname, gs, halo, dtype, batch=(), seed=5):  # type: ignore[no-untyped-def]
    group = get_group(gname)
    lat = Lattice(gs, halo=halo)
    U = random_field(lat, group, CounterRNG(seed, stream=1), 0, batch=batch, dtype=dtype)
    P = hmc_mod.sample_momenta(lat, group, CounterRNG(seed, stream=2), 1, dtype, batch=batch)
    comm = PeriodicHaloComm() if halo else None
    return group, lat, U, P, comm


def _close(a, b, tol, what=""):  # type: ignore[no-untyped-def]
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    err = float((a - b).abs().max()) if a.numel() else 0.0
    assert err <= tol, f"{what}: max |host - torch| = {err:.3g} > {tol:.3g}"


def _interior(t, lat):  # type: ignore[no-untyped-def]
    return t[lat.interior_slices(2)]


# ---- pieces ---------------------------------------------------------------------------------
@pytest.mark.parametrize("gname", ["u1", "su2", "su3"])
@pytest.mark.parametrize("dtype", [torch.complex128, torch.complex64])
def test_exp_matches_group_exp(gname, dtype):
    """exp of algebra elements of norm 1e-9 .. 30 equals groups.*.exp (matrix_exp for SU(3))."""
    g = get_group(gname)
    gen = torch.Generator().manual_seed(3)
    scale = torch.logspace(-9, 1, 3000, dtype=torch.float64)[:, None]
    X = g.algebra_from_coords(torch.randn(3000, g.n_algebra, generator=gen, dtype=torch.float64)
                              * scale).to(dtype)
    E, R = md_host.group_exp(X), g.exp(X)
    nrm = X.abs().pow(2).sum((-1, -2)).sqrt().double()
    err = (E - R).abs().amax((-1, -2)).double()
    # rounding of exp(X) by scaling and squaring grows ~ |X|: relative 1e-14 / 2e-6
    rel = 1e-14 if dtype == torch.complex128 else 2e-6
    assert bool((err <= rel * torch.clamp(nrm, min=1.0)).all()), float((err / nrm.clamp(min=1)).max())
    # the host exponential is in the group
    eye = torch.eye(g.N, dtype=dtype)
    _close(E.mH @ E, eye.expand_as(E), 10 * rel, "unitarity")
    # exp(eps X) with the scale passed to the kernel
    _close(md_host.group_exp(X[:50], 0.3), g.exp(0.3 * X[:50]), 10 * rel, "eps")
    # the link update's exponential (SIMD lanes for SU(3)): exp(eps X) 1 on a 4^4 lattice
    lat = Lattice((4, 4, 4, 4))
    Xl = X[::2][:1024].reshape(4, 4, 4, 4, 4, g.N, g.N)
    one = torch.eye(g.N, dtype=dtype).expand_as(Xl)
    E = md_host.update_links(one, Xl, lat, 0.7)
    err = (E - g.exp(0.7 * Xl)).abs().amax((-1, -2)).double().flatten()
    nrm = 0.7 * Xl.abs().pow(2).sum((-1, -2)).sqrt().double().flatten()
    assert bool((err <= rel * torch.clamp(nrm, min=1.0)).all()), float((err / nrm.clamp(min=1)).max())


CASES = [("u1", (8, 8)), ("su2", (4, 4, 4, 4)), ("su3", (4, 4, 4, 4)), ("su3", (8, 8)),
         ("u1", (4, 4, 4, 4)), ("su2", (8, 8))]


@pytest.mark.parametrize("gname, gs", CASES)
@pytest.mark.parametrize("dtype", [torch.complex128, torch.complex64])
@pytest.mark.parametrize("halo, batch", [(0, ()), (1, (2,))])
def test_force_momentum_link_kinetic(gname, gs, dtype, halo, batch):
    """Fused P -= eps (beta/N) TA(U A), U <- exp(eps P) U on interior links, and the
    kinetic energy equal hmc.force/_update_momenta/_update_links/kinetic_energy."""
    group, lat, U, P, _ = _setup(gname, gs, halo, dtype, batch)
    tol, beta, eps = TOL[dtype], BETA[gname], 0.137
    mask = hmc_mod._link_mask(lat, U.device)
    F_ref = hmc_mod.force(U, lat, group, beta)
    P_ref = hmc_mod._update_momenta(P, F_ref, eps, mask)
    P_host = md_host.update_momenta(U, host.staple_sum(U, lat), P, lat, beta / group.N, eps)
    _close(_interior(md_host.force_host(U, lat, beta), lat), _interior(F_ref, lat), tol, "force")
    _close(P_host, P_ref, tol, "momenta")  # halo links untouched in both
    U_ref = hmc_mod._update_links(U, P, eps, group, mask)
    _close(md_host.update_links(U, P, lat, eps), U_ref, tol, "links")
    ke_ref = hmc_mod.kinetic_energy(P, lat)
    ke = md_host.kinetic_energy_host(P, lat)
    assert ke.shape == ke_ref.shape == batch and ke.dtype == torch.float64
    _close(ke, ke_ref, tol * float(ke_ref.abs().max()), "kinetic")


@pytest.mark.parametrize("gname", ["u1", "su2", "su3"])
@pytest.mark.parametrize("gs, local, origin", [((8, 8), None, None), ((4, 4, 4, 4), None, None),
                                               ((8, 6, 4, 8), (4, 6, 2, 4), (4, 0, 2, 4))])
@pytest.mark.parametrize("dtype", [torch.complex128, torch.complex64])
@pytest.mark.parametrize("halo, batch", [(0, ()), (1, (2,)), (1, (2, 3))])
def test_host_momenta_equal_sample_momenta(gname, gs, local, origin, dtype, halo, batch):
    """C++ momenta (philox.h) == hmc.sample_momenta on interior links (1e-14 in float64),
    halo links 0, for whole and decomposed (origin != 0) lattices, batched; the kinetic
    energy drawn with them == hmc.kinetic_energy."""
    group = get_group(gname)
    lat = Lattice(gs, local_shape=local, origin=origin, halo=halo)
    rng = CounterRNG(21, stream=5)
    for step in (0, 7, 2**32 - 1):
        ref = hmc_mod.sample_momenta(lat, group, rng, step, dtype, batch=batch)
        P = md_host.sample_momenta_host(lat, group, rng, step, dtype, batch)
        assert P.shape == ref.shape and P.dtype == dtype
        inner = lat.interior_slices(2)
        _close(P[inner], ref[inner], 1e-14 if dtype == torch.complex128 else 2e-6, "momenta")
        assert bool((P.abs().sum((-1, -2))[..., ~lat.interior()] == 0).all())
    P, ke = md_host.momenta_host(lat, group, rng.key_site, 3, dtype, batch, True)
    ke_ref = hmc_mod.kinetic_energy(P, lat)
    _close(ke, ke_ref, 1e-13 * float(ke_ref.abs().max()), "kinetic")


# ---- whole trajectories ---------------------------------------------------------------------
TRAJ = [("su3", (4, 4, 4, 4)), ("su3", (8, 8)), ("su2", (4, 4, 4, 4)), ("u1", (8, 8))]


def _hmc(lat, group, gname, integrator, comm, n_steps=4, tau=0.4):  # type: ignore[no-untyped-def]
    return HMC(lat, group, beta=BETA[gname], n_steps=n_steps, tau=tau, integrator=integrator,
               rng=CounterRNG(11, stream=4), comm=comm)


@pytest.mark.parametrize("gname, gs", TRAJ)
@pytest.mark.parametrize("dtype", [torch.complex128, torch.complex64])
@pytest.mark.parametrize("integrator", ["leapfrog", "omelyan"])
@pytest.mark.parametrize("halo, batch", [(0, ()), (1, (2,))])
def test_trajectory_equals_torch(gname, gs, dtype, integrator, halo, batch):
    """U and P after leapfrog/Omelyan, and HMC.trajectory's (U', acc, dH) and counters."""
    group, lat, U, P, comm = _setup(gname, gs, halo, dtype, batch)
    tol = TOL[dtype]
    n_steps, tau = 4, 0.4
    integ_ref = hmc_mod.leapfrog if integrator == "leapfrog" else hmc_mod.omelyan
    integ = md_host.leapfrog_host if integrator == "leapfrog" else md_host.omelyan_host
    args = (lat, group, BETA[gname], n_steps, tau, comm)
    U1r, P1r = integ_ref(U, P, *args)
    U1, P1 = integ(U, P, *args)
    _close(_interior(U1, lat), _interior(U1r, lat), tol, "U after MD")
    _close(_interior(P1, lat), _interior(P1r, lat), tol, "P after MD")
    # the whole trajectory: two chains from the same seed
    h_ref = _hmc(lat, group, gname, integrator, comm, n_steps, tau)
    h = _hmc(lat, group, gname, integrator, comm, n_steps, tau)
    Ur, accr, dHr = h_ref.trajectory(U, 3)
    Uh, acc, dH = hmc_mod.hmc_trajectory_host(h, U, 3)
    H0 = float(hmc_mod.hamiltonian(U, P, lat, BETA[gname], comm).abs().max())
    _close(dH, dHr, tol * H0, "dH")  # dH is a difference of two O(H) sums
    if batch:
        assert acc.shape == accr.shape == batch and bool((acc == accr).all())
        assert dH.shape == batch and dH.dtype == torch.float64
    else:
        assert isinstance(acc, bool) and isinstance(dH, float) and acc == accr
    assert (h.n_trajectories, h.n_accepted) == (h_ref.n_trajectories, h_ref.n_accepted)
    _close(_interior(Uh, lat), _interior(Ur, lat), tol, "U_next")


def test_trajectory_does_not_modify_inputs_and_accepts_sometimes():
    """Inputs stay unchanged; a short SU(2) chain on 4^4 accepts (dH small)."""
    group, lat, U, P, _ = _setup("su2", (4, 4, 4, 4), 0, torch.complex128)
    U0, P0 = U.clone(), P.clone()
    md_host.omelyan_host(U, P, lat, group, 2.3, 5, 0.5)
    assert torch.equal(U, U0) and torch.equal(P, P0)
    h = _hmc(lat, group, "su2", "omelyan", None, n_steps=8, tau=0.5)
    for s in range(1, 4):
        U, acc, dH = hmc_mod.hmc_trajectory_host(h, U, s)
        assert math.isfinite(dH)
    assert h.n_trajectories == 3 and h.n_accepted >= 1
    assert float(hmc_mod.unitarity_violation(U, lat)) < 1e-12


@pytest.mark.parametrize("integrator, order", [("leapfrog", 2), ("omelyan", 2)])
def test_energy_violation_scales_as_eps_squared(integrator, order):
    """|dH| over tau = 0.5 falls by ~2^order when eps halves (SU(3) 4^4, smooth field)."""
    group = get_group("su3")
    lat = Lattice((4, 4, 4, 4))
    w = CounterRNG(8, stream=1).normal(lat.global_link_index(), 0, 8)
    U = group.exp(group.algebra_from_coords(0.2 * w))  # near-cold: asymptotic regime
    P = hmc_mod.sample_momenta(lat, group, CounterRNG(8, stream=2), 1)
    integ = md_host.leapfrog_host if integrator == "leapfrog" else md_host.omelyan_host
    H0 = md_host.hamiltonian_host(U, P, lat, 6.0)
    dh = []
    for n in (16, 32, 64):
        U1, P1 = integ(U, P, lat, group, 6.0, n, 0.5)
        dh.append(abs(float(md_host.hamiltonian_host(U1, P1, lat, 6.0) - H0)))
    r1, r2 = dh[0] / dh[1], dh[1] / dh[2]
    assert 2 ** order * 0.85 < r1 < 2 ** order * 1.15 and 2 ** order * 0.9 < r2 < 2 ** order * 1.1, dh


# ---- Wilson flow ------------------------------------------------------------------------------
@pytest.mark.parametrize("halo, batch, dtype", [(0, (), torch.complex128), (1, (2,), torch.complex128),
                                                (0, (), torch.complex64)])
def test_wilson_flow_equals_torch(halo, batch, dtype):
    """Flowed field and clover energy density on 4^4 SU(3) equal observables.wilson_flow."""
    _, lat, U, _, comm = _setup("su3", (4, 4, 4, 4), halo, dtype, batch, seed=9)
    tol = TOL[dtype]
    eps, n = 0.02, 5
    Wr = observables.wilson_flow(U, lat, eps, n, comm)
    W = md_host.wilson_flow_host(U, lat, eps, n, comm)
    _close(_interior(W, lat), _interior(Wr, lat), tol, "flowed field")
    if comm is not None:
        W, Wr = comm.exchange(W, lat), comm.exchange(Wr, lat)
    e, er = observables.energy_density_clover(W, lat), observables.energy_density_clover(Wr, lat)
    _close(e, er, tol * float(er.abs().max()), "energy density")
    # the flow lowers the Wilson action (the clover E of a hot field may first grow)
    assert bool((action.average_plaquette(W, lat) > action.average_plaquette(U, lat)).all())
    assert torch.equal(md_host.wilson_flow_host(U, lat, eps, 0, comm), U)


def test_supports_and_errors():
    group, lat, U, P, _ = _setup("su2", (4, 4, 4, 4), 0, torch.complex128)
    assert md_host.supports_md_host(U, lat)
    assert not md_host.supports_md_host(U.real, lat)
    assert not md_host.supports_md_host(U[..., :1, :1].expand(*U.shape[:-2], 4, 4), lat)
    assert not md_host.supports_md_host(U, Lattice((4, 4, 4)))
    with pytest.raises(ValueError):
        md_host.update_links(U, P[..., :1, :, :, :, :], lat, 0.1)
    with pytest.raises(ValueError):
        md_host.leapfrog_host(U, P, lat, get_group("su3"), 2.0, 2, 0.1)


@pytest.mark.parametrize("gname, gs", [("u1", (8, 8)), ("su2", (4, 4, 4, 4)), ("su3", (4, 4, 4, 4))])
@pytest.mark.parametrize("dtype", [torch.complex128, torch.complex64])
def test_unitarity_check_and_reprojection(gname, gs, dtype):
    """Host unitarity violation == hmc.unitarity_violation (interior, whole batch); the
    host re-projection projects exactly when the torch one does."""
    group, lat, U, _, _ = _setup(gname, gs, 1, dtype, (2,))
    noise = 1e-7 if dtype == torch.complex128 else 1e-3
    gen = torch.Generator().manual_seed(4)
    Ud = U + noise * torch.randn(U.shape, dtype=U.dtype, generator=gen)
    for field in (U, Ud):
        ref = hmc_mod.unitarity_violation(field, lat)
        got = md_host.unitarity_violation_host(field, lat)
        assert abs(got - ref) <= 1e-6 * ref + 10 * torch.finfo(field.real.dtype).eps, (got, ref)
    _close(md_host.reproject_if_drifted_host(Ud, lat, group), hmc_mod.reproject_if_drifted(Ud, lat, group),
           TOL[dtype], "reprojected")
    assert torch.equal(md_host.reproject_if_drifted_host(U, lat, group, tol=1.0), U)


def test_omelyan_lambda_is_the_samplers() -> None:
    """md_host keeps its own copy of the Omelyan parameter (kernels import nothing of
    hpcflow.sampling): it must be the sampler's."""
    assert md_host.OMELYAN_LAMBDA == hmc_mod.OMELYAN_LAMBDA
