"""Exact charge distribution and log Z of 2D U(1) (hpcflow.analysis.exact), and the sector
tools of hpcflow.analysis.topology.

Checks of ``P(Q)`` that do not share its derivation: ``sum Q^2 P(Q)`` against the
independent ``<Q^2>`` formula (J1/J2 integrals), the Irwin-Hall distribution at ``beta = 0``
(plaquette angles iid uniform up to ``sum arg P = 2 pi Q``), and a heat-bath ensemble.
``log Z`` in the measure of the flows' ``log q``: a gauge-fixed quadrature on 2x2, the
uniform prior at ``beta = 0`` (loss = -log Z exactly), and importance sampling on 4x4.
"""

from __future__ import annotations

import math
from fractions import Fraction
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hpcflow.analysis import (
    as_charges,
    charge_histogram,
    chi2_sf,
    coverage_report,
    gamma_method,
    logsumexp,
    sector_acceptance,
    u1_2d_charge_distribution,
    u1_2d_log_z,
    u1_2d_q2,
)
from hpcflow.flows import HaarPriorU1, build_u1_flow, u1_action, u1_topological_charge
from hpcflow.lattice.geometry import Lattice
from hpcflow.lattice.groups import get_group, random_field
from hpcflow.lattice.observables import topological_charge_u1_2d
from hpcflow.rng import CounterRNG
from hpcflow.sampling import heatbath_sweep

# ---- P(Q) -----------------------------------------------------------------------------


@pytest.mark.parametrize("L", [2, 4, 8, 16])
@pytest.mark.parametrize("beta", [0.0, 1.0, 3.0, 7.0])
def test_charge_distribution_normalised_symmetric(L: int, beta: float) -> None:
    q, p = u1_2d_charge_distribution(beta, L=L)
    assert q.dtype.kind == "i" and np.array_equal(q, np.arange(-q[-1], q[-1] + 1))
    assert np.all(p >= 0)
    assert abs(p.sum() - 1.0) < 1e-13
    np.testing.assert_array_equal(p, p[::-1])
    assert 2 * q[-1] < L * L  # |Q| < V/2


@pytest.mark.parametrize(
    ("L", "beta"),
    [(16, b) for b in range(1, 8)] + [(8, b) for b in (0.5, 1, 2, 4, 7)] + [(4, 1.5), (32, 3.0)],
)
def test_charge_distribution_second_moment(L: int, beta: float) -> None:
    """``sum Q^2 P(Q)`` equals the independent finite-volume ``<Q^2>`` to 1e-10 relative."""
    q, p = u1_2d_charge_distribution(float(beta), L=L)
    q2 = u1_2d_q2(float(beta), L=L)
    assert abs(float(np.sum(q.astype(float) ** 2 * p)) / q2 - 1) < 1e-10


def test_charge_distribution_non_square_volume() -> None:
    """Any torus of V plaquettes (8 x 12 here): only V enters."""
    q, p = u1_2d_charge_distribution(2.0, volume=96)
    assert abs(float(np.sum(q.astype(float) ** 2 * p)) / u1_2d_q2(2.0, volume=96) - 1) < 1e-10


def _irwin_hall(n: int, x: Fraction) -> Fraction:
    """Density of the sum of n uniforms on [0, 1] at x (exact)."""
    s = sum((-1) ** k * math.comb(n, k) * (x - k) ** (n - 1) for k in range(0, math.floor(x) + 1))
    return s / math.factorial(n - 1)


@pytest.mark.parametrize("V", [4, 5, 9, 16, 64])
def test_charge_distribution_beta0_is_irwin_hall(V: int) -> None:
    """At beta = 0 the plaquette angles are iid uniform on (-pi, pi] up to the one constraint
    ``sum arg P = 2 pi Q``: ``P(Q) = f_V(Q + V/2)`` with ``f_V`` the Irwin-Hall density
    (the integer translates of a B-spline sum to 1), so V = 4 gives 1/6, 2/3, 1/6."""
    q, p = u1_2d_charge_distribution(0.0, volume=V)
    if V <= 16:
        assert q[-1] == (V - 1) // 2  # the whole support |Q| < V/2
    for k, pk in zip(q, p):
        exact = float(_irwin_hall(V, Fraction(2 * int(k) + V, 2)))
        assert abs(pk - exact) < 1e-14, (V, int(k), pk, exact)


def test_charge_distribution_q_max_and_errors() -> None:
    q, p = u1_2d_charge_distribution(1.0, L=4, q_max=10)
    assert np.array_equal(q, np.arange(-10, 11))
    assert np.all(p[np.abs(q) >= 8] == 0)  # |Q| < V/2 = 8
    q_auto, p_auto = u1_2d_charge_distribution(1.0, L=4)
    np.testing.assert_array_equal(p[np.abs(q) <= q_auto[-1]], p_auto)
    q1, p1 = u1_2d_charge_distribution(1.0, L=4, q_max=1)
    np.testing.assert_array_equal(p1, p_auto[np.abs(q_auto) <= 1])  # truncated, not renormalised
    with pytest.raises(ValueError, match="finite L or volume"):
        u1_2d_charge_distribution(1.0)
    with pytest.raises(ValueError, match="q_max"):
        u1_2d_charge_distribution(1.0, L=4, q_max=-1)
    with pytest.raises(ValueError, match="not both"):
        u1_2d_charge_distribution(1.0, L=4, volume=16)
    with pytest.raises(ValueError, match="too slowly"):
        u1_2d_charge_distribution(0.0, volume=3)  # the n-sum tail ~ n^-3


def _host_or_torch() -> str:
    from hpcflow.kernels.dispatch import choose_backend

    return choose_backend("auto", "cpu", n=1, nd=2)


@pytest.mark.slow
def test_charge_distribution_heatbath_4x4() -> None:
    """Heat bath on 4x4 at beta = 1.5 (independent chains in one batch, fixed seed): the
    fraction of each sector with P(Q) > 1e-3, averaged over chains per sweep, matches P(Q)
    within 3 Gamma-method errors; thinned by 4 sweeps (tau_int(Q) < 1 here) the samples pass
    Pearson's chi^2 test of coverage_report."""
    beta, backend = 1.5, _host_or_torch()
    chains, sweeps = (512, 600) if backend == "host" else (128, 300)
    g, lat = get_group("u1"), Lattice((4, 4), backend=backend)
    rng = CounterRNG(2025, stream=5)
    U = random_field(lat, g, rng, 0, batch=(chains,))
    Qs = []
    for step in range(1, sweeps + 21):
        U = heatbath_sweep(U, lat, g, beta, rng, step)
        if step > 20:
            Qs.append(topological_charge_u1_2d(U, lat).numpy())
    Q = as_charges(np.array(Qs)).reshape(sweeps, chains)
    q, p = u1_2d_charge_distribution(beta, L=4)
    for k, pk in zip(q, p):
        if pk < 1e-3:
            continue
        res = gamma_method((Q == k).mean(1).astype(np.float64))
        assert abs(res.mean - pk) < 3 * res.error, (int(k), res, pk)
        assert res.error < 0.02 * pk + 1e-3  # the test resolves what it claims
    rep = coverage_report(Q[::4].reshape(-1), beta, 4)
    assert rep["p_value"] > 1e-3, rep
    assert rep["n_impossible"] == 0
    assert rep["tv"] < 0.02


# ---- log Z in the flows' measure -------------------------------------------------------


@pytest.mark.parametrize("beta", [0.5, 1.0])
def test_log_z_2x2_gauge_fixed_quadrature(beta: float) -> None:
    """``log int prod_l dtheta_l e^{-S}`` on 2x2 (8 links): with the maximal tree
    theta_0(0,0) = theta_0(0,1) = theta_1(0,0) = 0 fixed (a factor (2 pi)^3 from the gauge
    orbits) the 5 free angles go on a 14^5 trapezoid grid (spectral for periodic integrands)."""
    lat, m = Lattice((2, 2)), 14
    g1 = 2 * math.pi * torch.arange(m, dtype=torch.float64) / m
    grid = torch.stack(torch.meshgrid(*([g1] * 5), indexing="ij"), -1).reshape(-1, 5)
    theta = torch.zeros(grid.shape[0], 2, 2, 2, dtype=torch.float64)
    theta[:, 0, 1, 0] = grid[:, 0]
    theta[:, 0, 1, 1] = grid[:, 1]
    theta[:, 1, 0, 1] = grid[:, 2]
    theta[:, 1, 1, 0] = grid[:, 3]
    theta[:, 1, 1, 1] = grid[:, 4]
    s = u1_action(theta, lat, beta).numpy()
    log_z = 3 * math.log(2 * math.pi) + 5 * math.log(2 * math.pi) + logsumexp(-s) - math.log(s.size)
    assert abs(log_z - u1_2d_log_z(beta, L=2)) < 1e-11


@pytest.mark.parametrize("L", [2, 4, 8])
def test_log_z_beta0_uniform_prior_loss(L: int) -> None:
    """The flows' uniform prior is the identity flow: at beta = 0 its loss mean(log q + S)
    is -log Z exactly (log q = -2V log 2pi: a density w.r.t. d theta, not normalised Haar)."""
    lat = Lattice((L, L))
    prior = HaarPriorU1(lat)
    z = prior.sample(8, torch.Generator().manual_seed(0))
    loss = float((prior.log_prob(z) + u1_action(z, lat, 0.0)).mean())
    assert abs(loss + u1_2d_log_z(0.0, L=L)) < 1e-12 * abs(loss)
    assert u1_2d_log_z(0.0, L=L) == pytest.approx(2 * L * L * math.log(2 * math.pi), rel=1e-15)


def test_log_z_importance_sampling_4x4() -> None:
    """``Z = E_q[e^{-S} / q]``: 40000 uniform-prior proposals on 4x4 at beta = 0.5 estimate
    log Z within 3 standard errors (delta method) of 2e-2 or better."""
    lat, beta = Lattice((4, 4)), 0.5
    prior = HaarPriorU1(lat)
    z = prior.sample(40000, torch.Generator().manual_seed(1))
    logw = (-u1_action(z, lat, beta) - prior.log_prob(z)).numpy()
    est = logsumexp(logw) - math.log(logw.size)
    w = np.exp(logw - logw.max())
    se = float(w.std(ddof=1) / (w.mean() * math.sqrt(w.size)))
    assert se < 2e-2
    assert abs(est - u1_2d_log_z(beta, L=4)) < 3 * se


def test_log_z_bounds_an_untrained_flow() -> None:
    """An untrained 4-layer flow on 4x4 at beta = 1: the loss is above -log Z (KL >= 0) and
    its importance-sampling estimate of log Z agrees (the flow's log q is in the same measure)."""
    torch.manual_seed(3)
    lat, beta = Lattice((4, 4)), 1.0
    cfg = SimpleNamespace(n_layers=4, kernel="ncp", n_components=2, n_knots=4, hidden=(4,),
                          kernel_size=3, checkpoint_activations=False)
    m = build_u1_flow(cfg, lat)
    with torch.no_grad():
        x, logq = m.sample(8000, torch.Generator().manual_seed(4))
        s = u1_action(x, lat, beta)
    log_z = u1_2d_log_z(beta, L=4)
    d = (logq + s).numpy()
    assert d.mean() + log_z > -3 * d.std(ddof=1) / math.sqrt(d.size)
    logw = -d
    w = np.exp(logw - logw.max())
    se = float(w.std(ddof=1) / (w.mean() * math.sqrt(w.size)))
    assert abs(logsumexp(logw) - math.log(logw.size) - log_z) < 3 * se + 1e-12
    # the flow's charge is the geometric one of hpcflow.lattice.observables
    torch.testing.assert_close(u1_topological_charge(x[:8], lat),
                               topological_charge_u1_2d(m.to_links(x[:8]), lat), rtol=0, atol=1e-12)


# ---- hpcflow.analysis.topology --------------------------------------------------------


def test_charge_histogram_and_as_charges() -> None:
    q, c = charge_histogram([0, 1, -1, 1, 3.0 + 1e-9, -5], 2)
    assert np.array_equal(q, np.arange(-2, 3)) and np.array_equal(c, [0, 1, 1, 2, 0])
    q, c = charge_histogram([0, 1, 1], (0, 1), weights=[0.5, 0.25, 0.25])
    np.testing.assert_allclose(c, [0.5, 0.5])
    with pytest.raises(ValueError, match="integers"):
        as_charges([0.3])
    with pytest.raises(ValueError, match="q_min <= q_max"):
        charge_histogram([0], (1, 0))


def test_sector_acceptance() -> None:
    r = sector_acceptance([0, 0, 1, 1, 1, -1], [1, 0, 1, 1, 0, 0])
    assert np.array_equal(r["q"], [-1, 0, 1]) and np.array_equal(r["n"], [1, 2, 3])
    np.testing.assert_allclose(r["rate"], [0.0, 0.5, 2 / 3])
    np.testing.assert_allclose(r["error"], [0.0, 0.5 / math.sqrt(2), math.sqrt(2 / 9 / 3)])


def test_chi2_sf_matches_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    for k in (1, 2, 5, 17):
        for x in (0.01, 0.5, 3.0, 10.0, 40.0):
            assert chi2_sf(x, k) == pytest.approx(float(stats.chi2.sf(x, k)), rel=1e-10, abs=1e-300)


def test_coverage_report_exact_sampling() -> None:
    """Independent draws from the exact P(Q) pass; a sampler stuck in Q = 0 fails."""
    beta, L = 2.0, 8
    q, p = u1_2d_charge_distribution(beta, L=L)
    draws = np.random.default_rng(5).choice(q, size=20000, p=p / p.sum())
    rep = coverage_report(draws, beta, L)
    assert rep["p_value"] > 1e-3 and rep["dof"] >= 4
    assert np.all(np.abs(rep["pull"]) < 4.5)
    assert rep["tv"] < 0.02 and rep["n"] == 20000
    assert rep["observed"].sum() == pytest.approx(1.0)
    stuck = coverage_report(np.zeros(1000, dtype=int), beta, L)
    assert stuck["p_value"] < 1e-10
    assert stuck["tv"] == pytest.approx(1 - p[q == 0][0], abs=1e-12)
    assert stuck["missing_mass"] == pytest.approx(1 - p[q == 0][0], abs=1e-12)
