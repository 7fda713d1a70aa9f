"""Tests of hpcflow.analysis: exact 2D results, Gamma method, resampling, reweighting."""

from __future__ import annotations

import math
import warnings
from decimal import Decimal

import numpy as np
import pytest

from hpcflow.analysis import (
    bessel_i_scaled,
    bootstrap,
    ess,
    gamma_method,
    gamma_method_derived,
    gamma_method_ratio,
    jackknife,
    logsumexp,
    reweighted_gamma,
    reweighted_mean,
    su2_2d_plaquette,
    su3_2d_plaquette,
    sun_2d_plaquette,
    u1_2d_chi_q,
    u1_2d_exact,
    u1_2d_plaquette,
    u1_2d_q2,
    u1_2d_wilson_loop,
)

# ---------------------------------------------------------------------------------------
# exact 2D results
# ---------------------------------------------------------------------------------------

# PHYSICS.md, L = 16: beta, <cos P>, <Q^2>, chi_Q, W(2x2)
L16_TABLE = [
    ("1", "0.446390", "10.403", "4.0636e-2", "0.039706"),
    ("2", "0.697775", "4.9572", "1.9364e-2", "0.237061"),
    ("3", "0.809985", "2.8316", "1.1061e-2", "0.430436"),
    ("4", "0.863523", "1.9339", "7.5542e-3", "0.556026"),
    ("5", "0.893383", "1.4735", "5.7558e-3", "0.637017"),
    ("6", "0.912359", "1.1947", "4.6668e-3", "0.692889"),
    ("7", "0.925532", "1.0064", "3.9313e-3", "0.733780"),
]


def _agrees_to_digits(value: float, printed: str) -> bool:
    """``value`` rounds to the printed number: |value - printed| <= half a unit of its last digit."""
    d = Decimal(printed)
    half_ulp = 0.5 * 10.0 ** d.as_tuple().exponent
    return abs(value - float(d)) <= half_ulp * (1 + 1e-9)


@pytest.mark.parametrize("row", L16_TABLE)
def test_u1_l16_table(row):
    """The finite-volume formulas reproduce every column of PHYSICS.md's L = 16 table."""
    beta, plaq, q2, chi, w22 = row
    r = u1_2d_exact(float(beta), L=16)
    assert _agrees_to_digits(r.plaquette, plaq)
    assert _agrees_to_digits(r.q2, q2)
    assert _agrees_to_digits(r.chi_q, chi)
    assert _agrees_to_digits(r.wilson_loop(4), w22)
    assert r.wilson_loop(4) == pytest.approx(u1_2d_wilson_loop(float(beta), 4, L=16), rel=1e-14)


def test_u1_tutorial_value_and_finite_volume_effect():
    """L = 8, beta = 2: <Q^2> = 1.2393 (arXiv 2101.08176); at L = 8, beta = 7 chi_Q differs
    from infinite volume by 14% (PHYSICS.md)."""
    assert _agrees_to_digits(u1_2d_q2(2.0, L=8), "1.2393")
    assert u1_2d_q2(2.0, volume=64) == u1_2d_q2(2.0, L=8)
    rel = 1 - u1_2d_chi_q(7.0, L=8) / u1_2d_chi_q(7.0)
    assert 0.135 < rel < 0.145


def test_u1_infinite_volume_limit():
    """Finite-volume formulas approach the infinite-volume ones (w_n -> delta_n0)."""
    for beta in (0.5, 2.0, 6.0):
        big = u1_2d_exact(beta, L=64)
        inf = u1_2d_exact(beta)
        assert big.plaquette == pytest.approx(inf.plaquette, rel=1e-12)
        assert big.chi_q == pytest.approx(inf.chi_q, rel=1e-10)
        assert big.wilson_loop(9) == pytest.approx(inf.wilson_loop(9), rel=1e-10)
        i0, i1 = bessel_i_scaled([0, 1], beta)
        assert inf.plaquette == pytest.approx(i1 / i0, rel=1e-14)
        assert inf.wilson_loop(3) == pytest.approx((i1 / i0) ** 3, rel=1e-13)
    # large V * beta: log-space weights, no overflow
    r = u1_2d_exact(50.0, L=128)
    assert math.isfinite(r.q2)
    assert r.plaquette == pytest.approx(u1_2d_plaquette(50.0), rel=1e-12)


def test_u1_strong_coupling_limits():
    """beta -> 0: <cos P> ~ beta/2, W_A ~ (beta/2)^A, chi_Q ~ 1/12 - beta/(2 pi^2) (uniform
    plaquette angles at beta = 0),
    <Q^2> = V/12 at beta = 0 on a finite torus."""
    beta = 1e-4
    r = u1_2d_exact(beta, L=6)
    assert r.plaquette == pytest.approx(beta / 2, rel=1e-7)
    assert r.wilson_loop(3) == pytest.approx((beta / 2) ** 3, rel=1e-7)
    # <phi^2> = pi^2/3 + beta (1/2pi) int phi^2 cos phi + O(beta^2) = pi^2/3 - 2 beta
    assert r.chi_q == pytest.approx(1 / 12 - beta / (2 * math.pi**2), rel=1e-7)
    r0 = u1_2d_exact(0.0, L=4)
    assert r0.q2 == pytest.approx(16 / 12, rel=1e-12)
    assert abs(r0.plaquette) < 1e-15
    assert u1_2d_chi_q(0.0) == pytest.approx(1 / 12, rel=1e-12)


def _bessel_series(n: int, beta: float) -> float:
    """e^{-beta} I_n(beta) from the power series (independent of the quadrature)."""
    term = (beta / 2) ** n / math.factorial(n)
    terms = [term]
    for k in range(300):  # all terms positive: no cancellation
        term *= (beta / 2) ** 2 / ((k + 1) * (k + 1 + n))
        terms.append(term)
    return math.fsum(terms) * math.exp(-beta)


def test_bessel_quadrature_against_series():
    """Trapezoid-rule e^{-beta} I_n agrees with the power series to 1e-15 absolute (the
    rule's rounding floor, a few ulp of the integrand's maximum 1), which is what the
    weighted sums need; large I_n are thereby accurate to ~1e-15 relative."""
    for beta in (0.3, 2.0, 10.0, 30.0):
        ns = np.arange(0, 12)
        quad = bessel_i_scaled(ns, beta)
        ser = np.array([_bessel_series(int(n), beta) for n in ns])
        np.testing.assert_allclose(quad, ser, rtol=0, atol=1e-15)
        np.testing.assert_allclose(bessel_i_scaled(-ns, beta), quad, rtol=0, atol=1e-16)


def test_su2_plaquette_bessel_ratio_and_weyl_integral():
    """2D SU(2): the Weyl-density integral and the Bessel ratio I_2/I_1 (series) agree."""
    for beta in (0.1, 1.0, 2.5, 8.0):
        exact = _bessel_series(2, beta) / _bessel_series(1, beta)
        assert su2_2d_plaquette(beta) == pytest.approx(exact, rel=1e-12)
        assert sun_2d_plaquette(beta, 2) == pytest.approx(exact, rel=1e-12)
    assert su2_2d_plaquette(0.0) == 0.0


def test_su3_plaquette_limits_and_convergence():
    """2D SU(3): strong coupling <P> ~ beta/18 (<(Re tr U)^2> = 1/2 under Haar), weak coupling
    1 - <P> ~ (N^2 - 1)/(2 beta) = 4/beta, and the grid is converged."""
    b = 1e-3
    assert su3_2d_plaquette(b) == pytest.approx(b / 18, rel=1e-3)
    big = 400.0
    # next order is O(1/beta^2): allow 5/beta relative
    assert (1 - su3_2d_plaquette(big)) * big / 4 == pytest.approx(1.0, abs=5 / big)
    for beta in (1.0, 5.0, 20.0):
        assert su3_2d_plaquette(beta) == pytest.approx(
            sun_2d_plaquette(beta, 3, n_grid=400), rel=1e-12)
    # SU(2) weak coupling for comparison: 1 - I_2/I_1 ~ 3/(2 beta)
    assert (1 - su2_2d_plaquette(big)) * big / 1.5 == pytest.approx(1.0, abs=5 / big)


def test_exact_bad_input():
    """Bad arguments give clear errors naming the argument."""
    with pytest.raises(ValueError, match="beta"):
        u1_2d_exact(-1.0, L=4)
    with pytest.raises(ValueError, match="volume"):
        u1_2d_exact(1.0, volume=2)
    with pytest.raises(ValueError, match="L or volume"):
        u1_2d_exact(1.0, L=4, volume=16)
    with pytest.raises(ValueError, match="area"):
        u1_2d_exact(1.0, L=4).wilson_loop(17)
    with pytest.raises(ValueError, match="N must"):
        sun_2d_plaquette(1.0, 5)
    with pytest.raises(ValueError, match="finite L or volume"):
        u1_2d_q2(1.0)


# ---------------------------------------------------------------------------------------
# Gamma method
# ---------------------------------------------------------------------------------------


def _ar1(a: float, n: int, seed: int) -> np.ndarray:
    """Stationary AR(1), x_t = a x_{t-1} + e_t, e ~ N(0,1): tau_int = (1+a)/(2(1-a)),
    variance 1/(1-a^2)."""
    rng = np.random.default_rng(seed)
    e = rng.standard_normal(n)
    x = np.empty(n)
    x[0] = e[0] / math.sqrt(1 - a * a)
    for i in range(1, n):
        x[i] = a * x[i - 1] + e[i]
    return x


def test_gamma_ar1_known_tau():
    """AR(1) with a = 0.8 (tau_int = 4.5), N = 2e5: the Gamma method's tau_int lies within
    3 of its stated errors (Wolff eq. 42) of the exact value; its error of the mean agrees
    with the exact sqrt(2 tau var / N) within 3 stated relative errors (d err/err = d tau/2tau);
    the mean is within 4 errors of 0. The small truncation bias (window W ~ 30, rho(W) ~
    e^{-W/tau}) is far below these tolerances."""
    a, n = 0.8, 200_000
    tau = (1 + a) / (2 * (1 - a))
    r = gamma_method(_ar1(a, n, seed=11))
    assert r.n == n
    assert abs(r.tau_int - tau) < 3 * r.tau_int_error
    exact_err = math.sqrt(2 * tau / (1 - a * a) / n)
    assert abs(r.error - exact_err) < 3 * exact_err * r.tau_int_error / (2 * r.tau_int)
    assert abs(r.mean) < 4 * r.error


def test_gamma_against_pyerrors():
    """Cross-check with pyerrors (S = 1.5): with Wolff's bias correction eq. (49) the two
    implementations agree up to pyerrors' extra (1 + 1/N) factors (relative 1e-5 here:
    compared at 1e-4); without it, within our stated error; both contain
    the exact tau_int of the AR(1) process within 3 stated errors."""
    import pyerrors as pe  # installed by scripts/bootstrap.sh --test; missing = failure
    a = 0.9
    tau = (1 + a) / (2 * (1 - a))
    x = _ar1(a, 100_000, seed=3)
    obs = pe.Obs([x], ["ens"])
    obs.gamma_method(S=1.5)
    ours_bc = gamma_method(x, bias_correction=True)
    assert ours_bc.window == obs.e_windowsize["ens"]
    assert ours_bc.tau_int == pytest.approx(obs.e_tauint["ens"], rel=1e-4)
    assert ours_bc.error == pytest.approx(obs.dvalue, rel=1e-4)
    ours = gamma_method(x)
    assert abs(ours.tau_int - obs.e_tauint["ens"]) < ours.tau_int_error
    assert abs(ours.tau_int - tau) < 3 * ours.tau_int_error
    assert abs(obs.e_tauint["ens"] - tau) < 3 * obs.e_dtauint["ens"]


def test_gamma_replicas_iid_and_constant():
    """Replicas pool into one estimate; iid data give tau_int = 1/2 within 3 errors and the
    naive standard error; a constant series gives error 0 without dividing by zero."""
    x = _ar1(0.8, 200_000, seed=5)
    reps = gamma_method([x[:50_000], x[50_000:120_000], x[120_000:]])
    one = gamma_method(x)
    assert reps.n == one.n and reps.mean == pytest.approx(one.mean, rel=1e-12)
    assert abs(reps.tau_int - one.tau_int) < reps.tau_int_error
    y = np.random.default_rng(1).standard_normal(50_000)
    r = gamma_method(y)
    assert abs(r.tau_int - 0.5) < 3 * max(r.tau_int_error, 0.5 * math.sqrt(2 / y.size))
    assert r.error == pytest.approx(y.std() / math.sqrt(y.size), rel=0.1)
    r0 = gamma_method(y, S=0)
    assert r0.tau_int == 0.5 and r0.error == pytest.approx(y.std() / math.sqrt(y.size))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c = gamma_method(np.full(1000, 0.1))
    assert (c.error, c.tau_int, c.tau_int_error, c.window) == (0.0, 0.5, 0.0, 0)
    assert c.mean == pytest.approx(0.1, rel=1e-15)


def test_gamma_short_series_warns_and_bad_input():
    """A series too short to search a window (W_max = N//2 = 1) warns; bad input raises."""
    with pytest.warns(RuntimeWarning, match="no window"):
        r = gamma_method(np.array([1.0, 2.0, 4.0]))
    assert r.window == 0 and r.tau_int == 0.5
    with pytest.raises(ValueError, match="x must"):
        gamma_method(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="S must"):
        gamma_method(np.arange(10.0), S=-1)
    with pytest.raises(ValueError, match="replica lengths"):
        gamma_method_ratio(np.ones(10), np.ones(11))


def test_gamma_ratio_delta_method():
    """The linearised ratio error equals the delta-method formula with sample moments for
    iid data (exact identity up to the 1/N vs 1/(N-1) convention), and agrees with a binned
    jackknife of the same ratio within 15% (jackknife error with 200 bins: ~5% relative);
    the numerical gradient reproduces the analytic one."""
    rng = np.random.default_rng(7)
    n = 40_000
    b = 2.0 + rng.standard_normal(n) * 0.3
    a = 1.0 + 0.5 * b + rng.standard_normal(n) * 0.2
    r = gamma_method_ratio(a, b, S=0)
    ma, mb = a.mean(), b.mean()
    cov = np.cov(a, b, ddof=0)
    var = (cov[0, 0] / mb**2 + ma**2 * cov[1, 1] / mb**4 - 2 * ma * cov[0, 1] / mb**3) / n
    assert r.mean == pytest.approx(ma / mb, rel=1e-14)
    assert r.error == pytest.approx(math.sqrt(var), rel=1e-10)
    jk = jackknife(np.stack([a, b], axis=1), lambda d: d[:, 0].mean() / d[:, 1].mean(), 200)
    assert jk.error == pytest.approx(r.error, rel=0.15)
    num = gamma_method_derived([a, b], lambda u, v: u / v, S=0)
    assert num.error == pytest.approx(r.error, rel=1e-6)


# ---------------------------------------------------------------------------------------
# resampling
# ---------------------------------------------------------------------------------------


def test_jackknife_mean_identity_and_bias():
    """Unbinned jackknife of the mean is exactly the standard error s/sqrt(N); the
    jackknife bias of mean^2 is exactly s^2/N (the known bias of the square of a mean)."""
    x = np.random.default_rng(2).standard_normal(1000) + 3.0
    jk = jackknife(x)
    assert jk.value == pytest.approx(x.mean(), rel=1e-15)
    assert jk.error == pytest.approx(x.std(ddof=1) / math.sqrt(x.size), rel=1e-10)
    jb = jackknife(x, lambda d: d.mean() ** 2)
    assert jb.bias == pytest.approx(x.var(ddof=1) / x.size, rel=1e-6)


def test_binned_jackknife_and_bootstrap_on_ar1():
    """With bins much longer than tau_int, binned jackknife and bootstrap reproduce the exact
    error of the mean of AR(1) (a = 0.8): within 3 x sqrt(2/(n_bins - 1)) relative for the
    jackknife (50 bins) and the same plus the bootstrap's own 3/sqrt(2 n_boot)."""
    a, n = 0.8, 200_000
    x = _ar1(a, n, seed=21)
    exact_err = math.sqrt(2 * (1 + a) / (2 * (1 - a)) / (1 - a * a) / n)
    jk = jackknife(x, n_bins=50)
    tol = 3 * math.sqrt(2 / 49)
    assert abs(jk.error / exact_err - 1) < tol
    bs = bootstrap(x, n_boot=1000, n_bins=50, seed=1)
    assert abs(bs.error / exact_err - 1) < tol + 3 / math.sqrt(2000)
    with pytest.raises(ValueError, match="n_bins"):
        jackknife(x[:10], n_bins=11)


# ---------------------------------------------------------------------------------------
# reweighting
# ---------------------------------------------------------------------------------------


def test_ess_limits():
    """ESS/N = 1 for equal weights (even at log w = 1e4), 1/N for one dominating weight,
    (sum w)^2 / (N sum w^2) in general."""
    assert ess(np.full(100, 1e4)) == pytest.approx(1.0, rel=1e-14)
    lw = np.full(50, -1000.0)
    lw[7] = 0.0
    assert ess(lw) == pytest.approx(1 / 50, rel=1e-12)
    w = np.array([1.0, 2.0, 3.0, 4.0])
    assert ess(np.log(w)) == pytest.approx(100 / 120, rel=1e-14)
    assert logsumexp(np.array([1000.0, 1000.0])) == pytest.approx(1000 + math.log(2))
    with pytest.raises(ValueError, match="log_w"):
        ess(np.array([]))


def test_reweighting_gaussian_shift():
    """Importance sampling N(mu, 1) from q = N(0, 1) (log w = mu x - mu^2/2): the reweighted
    mean of x is mu within 4 Gamma-method errors, and ESS/N approaches exp(-mu^2) within 4
    times its delta-method statistical error."""
    mu, n = 0.5, 100_000
    x = np.random.default_rng(4).standard_normal(n)
    lw = mu * x - mu**2 / 2 + 1234.5  # arbitrary constant: log Z is unknown in practice
    r = reweighted_gamma(x, lw)
    assert r.mean == pytest.approx(reweighted_mean(x, lw), rel=1e-12)
    assert abs(r.mean - mu) < 4 * r.error
    w = np.exp(lw - lw.max())
    direct = float(np.sum(w * x) / np.sum(w))
    assert reweighted_mean(x, lw) == pytest.approx(direct, rel=1e-12)
    # ESS/N = (E w)^2 / E w^2; E w^2 = e^{mu^2}, Var w^2 = e^{6 mu^2} - e^{2 mu^2}
    target = math.exp(-(mu**2))
    se = target * math.sqrt((math.exp(6 * mu**2) - math.exp(2 * mu**2)) / n) / math.exp(mu**2)
    assert abs(ess(lw) - target) < 4 * se + 4 * target * math.sqrt((math.exp(mu**2) - 1) / n)
