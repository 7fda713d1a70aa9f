"""Unit tests of the HMC baseline (hpcflow.sampling.hmc): force, integrators, exactness."""

from __future__ import annotations

import math

import pytest
import torch

from hpcflow.lattice.action import wilson_action
from hpcflow.lattice.geometry import Lattice, SerialComm
from hpcflow.lattice.groups import get_group, random_field
from hpcflow.rng import CounterRNG
from hpcflow.sampling.hmc import (
    HMC,
    force,
    kinetic_energy,
    leapfrog,
    omelyan,
    sample_momenta,
    unitarity_violation,
)

CASES = [("u1", (4, 6)), ("su2", (4, 4)), ("su3", (2, 2, 2, 2))]


class SelfHaloComm(SerialComm):
    """One rank owning the whole lattice but stored with a halo: exchange fills the halo
    periodically from the interior, exactly what the MPI exchange does with neighbours."""

    decomposed = True  # halos to fill, like a LatticeComm

    def exchange(self, f: torch.Tensor, lat: Lattice, inner: int = 2, width: int | None = None) -> torch.Tensor:
        g = f[lat.interior_slices(inner)]
        for d in range(lat.nd):
            axis = g.dim() - inner - lat.nd + d
            idx = torch.remainder(
                torch.arange(lat.origin[d] - lat.halo, lat.origin[d] - lat.halo + lat.shape[d]),
                lat.global_shape[d],
            )
            g = g.index_select(axis, idx)
        return g


def _pad(f: torch.Tensor, lat_p: Lattice) -> torch.Tensor:
    """Halo-padded copy of a global field, halos filled with garbage first then exchanged."""
    shape = f.shape[:1] + lat_p.shape + f.shape[-2:]
    g = torch.full(shape, 7.0 + 3.0j, dtype=f.dtype)
    g[lat_p.interior_slices(2)] = f
    return SelfHaloComm().exchange(g, lat_p)


@pytest.mark.parametrize("name,shape", CASES)
def test_force_matches_autograd_derivative(name, shape):
    """F = (beta/N) TA(U A) satisfies d/de S(exp(e X) U)|_0 = sum Re tr(F^dag X) for a random
    algebra field X: this fixes the sign and factor of the force in H's normalisation."""
    g, lat, beta = get_group(name), Lattice(shape), 1.7
    U = random_field(lat, g, CounterRNG(3), 0)
    X = sample_momenta(lat, g, CounterRNG(4), 0)
    eps = torch.zeros((), dtype=torch.float64, requires_grad=True)
    S = wilson_action(g.exp(eps * X) @ U, lat, beta)
    (dS,) = torch.autograd.grad(S, eps)
    F = force(U, lat, g, beta)
    pred = (F.conj() * X).real.sum()
    assert abs(float(dS) - float(pred)) < 1e-10 * max(1.0, abs(float(dS)))
    assert abs(float(dS)) > 1e-3  # a non-degenerate check


@pytest.mark.parametrize("name,shape", CASES)
def test_momenta_normalisation(name, shape):
    """Momenta are Gaussian with <(1/2) tr P^dag P> = n_algebra/2 per link (equipartition
    for H = (1/2) sum tr P^dag P); mean over ~3000 links within 5 standard errors."""
    g = get_group(name)
    lat = Lattice(tuple(4 * s for s in shape) if len(shape) == 2 else (4, 4, 4, 4))
    P = sample_momenta(lat, g, CounterRNG(5), 11)
    k = 0.5 * (P.abs() ** 2).sum((-2, -1)).reshape(-1)
    # per link K is chi^2_n / 2: variance n / 2
    n = g.n_algebra
    err = math.sqrt(n / 2 / k.numel())
    assert abs(float(k.mean()) - n / 2) < 5 * err
    assert float(kinetic_energy(P, lat)) == pytest.approx(float(k.sum()), rel=1e-12)
    assert torch.allclose(P, -P.mH, atol=1e-15)
    if g.N > 1:
        assert float(torch.diagonal(P, dim1=-2, dim2=-1).sum(-1).abs().max()) < 1e-14


@pytest.mark.parametrize("integrator", ["leapfrog", "omelyan"])
@pytest.mark.parametrize("name,shape", CASES)
def test_reversibility(integrator, name, shape):
    """Integrate forward, flip P, integrate again: the start (U, -P) comes back to 1e-10."""
    g, lat = get_group(name), Lattice(shape)
    U = random_field(lat, g, CounterRNG(6), 0)
    P = sample_momenta(lat, g, CounterRNG(6), 1)
    integ = leapfrog if integrator == "leapfrog" else omelyan
    U1, P1 = integ(U, P, lat, g, 2.0, 7, 0.8)
    U2, P2 = integ(U1, -P1, lat, g, 2.0, 7, 0.8)
    assert float((U1 - U).abs().max()) > 1e-2  # it moved
    assert float((U2 - U).abs().max()) < 1e-10
    assert float((P2 + P).abs().max()) < 1e-10


def test_energy_violation_scales_as_dt_squared():
    """|dH| over a fixed trajectory length scales as dt^2 for both integrators (log-log slope
    2 +- 0.3, mean over 4 configurations), and Omelyan 2MN has the smaller error at equal dt."""
    g, lat, beta, tau = get_group("su2"), Lattice((6, 6)), 2.0, 1.0
    rng = CounterRNG(7)
    U = random_field(lat, g, rng, 0, batch=(4,))
    P = sample_momenta(lat, g, rng, 1, batch=(4,))
    H0 = kinetic_energy(P, lat) + wilson_action(U, lat, beta)
    ns = [10, 20, 40]
    err = {}
    for name, integ in (("leapfrog", leapfrog), ("omelyan", omelyan)):
        vals = []
        for n in ns:
            U1, P1 = integ(U, P, lat, g, beta, n, tau)
            dH = kinetic_energy(P1, lat) + wilson_action(U1, lat, beta) - H0
            vals.append(float(dH.abs().mean()))
        x = torch.log(torch.tensor([tau / n for n in ns], dtype=torch.float64))
        y = torch.log(torch.tensor(vals, dtype=torch.float64))
        slope = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
        assert abs(slope - 2.0) < 0.3, (name, slope, vals)
        err[name] = vals
    assert all(o < lf for o, lf in zip(err["omelyan"], err["leapfrog"]))


def test_creutz_equality_exp_minus_dh():
    """Area preservation + reversibility imply <exp(-dH)> = 1 exactly at equilibrium (Creutz
    1988). 64 chains equilibrated by 30 heat-bath sweeps, then 4 trajectories each of U(1) 8x8
    at beta=2 with sizeable dH; agreement within 4 standard errors."""
    from hpcflow.sampling.heatbath import heatbath_sweep

    g, lat = get_group("u1"), Lattice((8, 8))
    rng = CounterRNG(8)
    U = random_field(lat, g, rng, 0, batch=(64,))
    for step in range(1, 31):
        U = heatbath_sweep(U, lat, g, 2.0, rng, step)
    hmc = HMC(lat, g, 2.0, 4, 1.0, "leapfrog", rng)
    vals = []
    for step in range(100, 104):
        U, _acc, dH = hmc.trajectory(U, step)
        vals.append(torch.exp(-dH))
    x = torch.cat(vals)
    assert float(x.std()) > 0.05  # dH not trivially small: the check has teeth
    assert abs(float(x.mean()) - 1.0) < 4 * float(x.std()) / math.sqrt(x.numel())


@pytest.mark.parametrize("name,shape", CASES)
def test_links_stay_on_group(name, shape):
    """After several trajectories links are unitary with det 1 to 1e-12."""
    g, lat = get_group(name), Lattice(shape)
    rng = CounterRNG(9)
    U = random_field(lat, g, rng, 0)
    hmc = HMC(lat, g, 2.0, 5, 0.5, "omelyan", rng)
    n_acc = 0
    for step in range(1, 6):
        U, acc, dH = hmc.trajectory(U, step)
        n_acc += acc
        assert isinstance(acc, bool) and isinstance(dH, float)
    assert n_acc >= 3
    assert unitarity_violation(U, lat) < 1e-12


def test_halo_padded_rank_equals_serial():
    """A halo-padded local array (exchange before every force, interior-only updates, global
    link indices for momenta) gives the serial trajectory to 1e-12."""
    g = get_group("su2")
    lat = Lattice((4, 4))
    lat_p = Lattice((4, 4), halo=1)
    rng = CounterRNG(10)
    U = random_field(lat, g, rng, 0)
    Us, acc_s, dH_s = HMC(lat, g, 2.0, 3, 0.6, "omelyan", rng).trajectory(U, 1)
    hp = HMC(lat_p, g, 2.0, 3, 0.6, "omelyan", rng, comm=SelfHaloComm())
    Up, acc_p, dH_p = hp.trajectory(_pad(U, lat_p), 1)
    assert acc_s == acc_p
    assert abs(dH_s - dH_p) < 1e-12
    assert float((Up[lat_p.interior_slices(2)] - Us).abs().max()) < 1e-12


def test_batch_entry_zero_is_the_unbatched_chain():
    """Configuration 0 of a batch draws the same momenta and accept uniform as one chain."""
    g, lat = get_group("u1"), Lattice((4, 4))
    rng = CounterRNG(11)
    U = random_field(lat, g, rng, 0, batch=(3,))
    hmc = HMC(lat, g, 1.0, 3, 1.0, "omelyan", rng)
    Ub, accb, dHb = hmc.trajectory(U, 5)
    U0, acc0, dH0 = hmc.trajectory(U[0], 5)
    assert accb.shape == (3,) and bool(accb[0]) == acc0
    assert abs(float(dHb[0]) - dH0) < 1e-12
    assert float((Ub[0] - U0).abs().max()) < 1e-13
    assert float((Ub[1] - Ub[0]).abs().max()) > 1e-3


def test_complex64_trajectory():
    """FP32 (complex64) runs end to end: dtype kept, small dH, links on the group to 1e-5."""
    g, lat = get_group("su3"), Lattice((2, 2, 2, 2))
    rng = CounterRNG(12)
    U = random_field(lat, g, rng, 0, dtype=torch.complex64)
    hmc = HMC(lat, g, 5.0, 6, 0.5, "omelyan", rng)
    U1, _acc, dH = hmc.trajectory(U, 1)
    assert U1.dtype == torch.complex64
    assert abs(dH) < 0.5
    assert unitarity_violation(U1, lat) < 1e-5


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"integrator": "verlet"}, "integrator"),
        ({"n_steps": 0}, "n_steps"),
        ({"tau": -1.0}, "tau"),
        ({"beta": float("nan")}, "beta"),
        ({"lam": 0.7}, "lam"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = {"lat": Lattice((4, 4)), "group": "u1", "beta": 1.0, "n_steps": 2, "tau": 1.0,
            "integrator": "omelyan", "rng": CounterRNG(0)}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        HMC(**args)


def test_bad_rng_and_field():
    with pytest.raises(TypeError, match="rng"):
        HMC(Lattice((4, 4)), "u1", 1.0, 2, 1.0)
    hmc = HMC(Lattice((4, 4)), "u1", 1.0, 2, 1.0, rng=CounterRNG(0))
    with pytest.raises(ValueError, match="U has shape"):
        hmc.trajectory(torch.ones(2, 4, 5, 1, 1, dtype=torch.complex128), 0)
