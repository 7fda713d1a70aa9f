"""Exact results of 2D lattice gauge theory with the Wilson action (PHYSICS.md).

2D U(1) on a periodic torus of ``V`` plaquettes (character expansion; the constraint that
the product of all plaquettes is 1 gives the sum over n)::

    Z = sum_n I_n(beta)^V,          w_n = I_n^V / Z
    <cos P>  = sum_n w_n I'_n / I_n,            I'_n = (I_{n-1} + I_{n+1}) / 2
    <W_A>    = sum_n w_n (I_{n+1} / I_n)^A
    <Q^2>    = (1/Z) sum_n [V J2_n I_n^{V-1} - V (V-1) J1_n^2 I_n^{V-2}]
    J1_n = -(1/4 pi^2) int phi sin(n phi) e^{beta cos phi},  J2_n = (1/8 pi^3) int phi^2 cos(n phi) e^{beta cos phi}

(the last line is PHYSICS.md's ``V sum w_n [J2_n/I_n - (V-1)(J1_n/I_n)^2]`` written so that it
stays finite at ``beta -> 0`` where ``I_{n != 0} -> 0``). Infinite volume: ``w_n -> delta_n0``.

Numerics: every integral carries the factor ``e^{-beta}`` (``e^{beta (cos phi - 1)} <= 1``), and
the weights are formed from ``V log I_n`` minus its maximum, so nothing overflows at large
``V beta``. ``I_n`` uses the trapezoid rule on a periodic grid (spectrally accurate for a
smooth periodic integrand); ``J1, J2`` (whose integrands are not periodic) use composite
Gauss-Legendre on ``[0, pi]``. Terms with ``e^{-beta} I_n < 1e-13`` are below the quadrature's absolute
accuracy and are dropped; their relative weight is below ``(1e-13 / e^{-beta} I_0)^{V-2}``.

Charge distribution and theta term. With ``Z(theta) = int dU exp(-S + i theta Q)`` and the
per-plaquette weight ``exp(beta cos phi + i theta phi / 2pi)`` on ``phi = arg P in (-pi, pi]``,
the same character expansion gives (``nu = n + theta/2pi``)::

    Z(theta) = sum_n h(n + theta/2pi)^V,     h(nu) = (1/pi) int_0^pi e^{beta cos phi} cos(nu phi) dphi
    P(Q)     = (1/2pi) int_{-pi}^{pi} dtheta e^{-i theta Q} Z(theta) / Z(0)

``h(n) = I_n`` (``Z(0)`` is the ``Z`` above); ``h`` is even and entire in ``nu`` and the n-sum
makes ``Z(theta)`` 2pi-periodic and even. ``Q`` is an integer with ``|Q| < V/2``, so ``Z(theta)``
is a trigonometric polynomial and the ``M``-point trapezoid rule in ``theta`` is exact for
``M > V`` (for smaller ``M`` it folds ``P(Q + kM)`` onto ``P(Q)``: the tails, < 1e-13 here).
The identity behind it: the plaquette angles of a Haar field are independent and uniform
up to the one constraint ``sum_x arg P(x) = 2 pi Q``.

Link measure of :func:`u1_2d_log_z`: the U(1) flows give ``log q`` as a density w.r.t.
``d theta`` on ``[0, 2pi)^{2V}`` (their uniform prior has ``log q = -2V log 2pi``,
:class:`hpcflow.flows.prior.HaarPriorU1`), so ``log Z = 2V log 2pi + log sum_n I_n^V`` is the
normaliser of ``exp(-S)`` w.r.t. that measure and the training loss obeys
``mean(log q + S) = KL(q || p) - log Z >= -log Z``.

2D SU(N), infinite volume: the plaquettes are independent, ``<(1/N) Re tr P> = d/dbeta log z``
with ``z = int dU exp((beta/N) Re tr U)`` over Haar measure, computed in eigen-angles with the
Weyl density ``prod_{i<j} |e^{i th_i} - e^{i th_j}|^2`` (SU(2): ``I_2(beta) / I_1(beta)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "U1Exact2D",
    "bessel_i_scaled",
    "su2_2d_plaquette",
    "su3_2d_plaquette",
    "sun_2d_plaquette",
    "u1_2d_charge_distribution",
    "u1_2d_chi_q",
    "u1_2d_exact",
    "u1_2d_log_z",
    "u1_2d_plaquette",
    "u1_2d_q2",
    "u1_2d_wilson_loop",
]

_TINY = 1e-13


def _check_beta(beta: float) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float, np.floating, np.integer)):
        raise TypeError(f"beta must be a real number >= 0, got {beta!r}")
    b = float(beta)
    if not (math.isfinite(b) and b >= 0):
        raise ValueError(f"beta must be a finite number >= 0, got {beta}")
    return b


def _n_points(n_max: int, beta: float) -> int:
    # bandwidth of cos(n phi) e^{beta cos phi}: n plus a few widths sqrt(beta) of the peak
    return 2 * n_max + int(20 * math.sqrt(beta)) + 128


def bessel_i_scaled(n: np.ndarray | int, beta: float) -> np.ndarray:
    """``e^{-beta} I_n(beta) = (1/2pi) int cos(n phi) e^{beta (cos phi - 1)} dphi`` (trapezoid).

    Accurate to ~1e-16 absolute (the integrand is at most 1), so values far below that lose
    relative accuracy; the character sums only need the absolute accuracy.
    """
    beta = _check_beta(beta)
    n = np.atleast_1d(np.asarray(n, dtype=np.int64))
    m = _n_points(int(np.abs(n).max()), beta)
    phi = 2 * math.pi * np.arange(m) / m
    f = np.exp(beta * (np.cos(phi) - 1.0))
    return (np.cos(np.outer(n, phi)) @ f) / m


def _j_scaled(n: np.ndarray, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """``e^{-beta} J1_n`` and ``e^{-beta} J2_n`` by Gauss-Legendre on [0, pi] (even integrands)."""
    # composite 32-point Gauss-Legendre: each panel holds about one oscillation of the
    # integrand, so every panel converges to machine precision at O(k) cost
    n_panels = max(8, _n_points(int(np.abs(n).max()), beta) // 16)
    x, wq = np.polynomial.legendre.leggauss(32)
    h = math.pi / n_panels
    phi = (h * (np.arange(n_panels)[:, None] + 0.5 * (x + 1.0))).reshape(-1)
    wq = np.tile(0.5 * h * wq, n_panels) * np.exp(beta * (np.cos(phi) - 1.0))
    np_ = np.outer(n, phi)
    j1 = -(2.0 / (4 * math.pi**2)) * (np.sin(np_) @ (phi * wq))
    j2 = (2.0 / (8 * math.pi**3)) * (np.cos(np_) @ (phi**2 * wq))
    return j1, j2


@dataclass(frozen=True)
class U1Exact2D:
    """Exact 2D U(1) expectation values at one ``(beta, volume)`` (``volume=None``: infinite).

    ``plaquette = <cos P>``, ``q2 = <Q^2>`` (``None`` in infinite volume), ``chi_q = <Q^2>/V``;
    :meth:`wilson_loop` gives ``<W>`` for a loop enclosing ``area`` plaquettes.
    """

    beta: float
    volume: int | None
    plaquette: float
    q2: float | None
    chi_q: float
    n: np.ndarray
    log_weights: np.ndarray  # log w_n, normalised (logsumexp = 0)
    i_scaled: np.ndarray  # e^{-beta} I_n for n and n + 1 (two rows)

    def wilson_loop(self, area: int) -> float:
        """``<W> = sum_n w_n (I_{n+1}/I_n)^A`` for a loop of ``area`` plaquettes."""
        if isinstance(area, bool) or not isinstance(area, (int, np.integer)) or area < 0:
            raise ValueError(f"area must be a non-negative int, got {area!r}")
        if self.volume is not None and area > self.volume:
            raise ValueError(f"area must be <= volume = {self.volume}, got {area}")
        i_n, i_n1 = self.i_scaled
        ratio = np.clip(i_n1, 0.0, None) / i_n
        return float(np.sum(np.exp(self.log_weights) * ratio ** int(area)))


def _volume_from(L: int | None, volume: int | None) -> int | None:
    if L is not None and volume is not None:
        raise ValueError(f"give L or volume, not both (got L={L}, volume={volume})")
    if L is not None:
        if isinstance(L, bool) or not isinstance(L, (int, np.integer)) or L < 2:
            raise ValueError(f"L must be an int >= 2, got {L!r}")
        return int(L) ** 2
    if volume is not None:
        if isinstance(volume, bool) or not isinstance(volume, (int, np.integer)) or volume < 3:
            # V = 1, 2: J2_n ~ 1/n^2 does not decay fast enough for a truncated n-sum
            raise ValueError(f"volume must be an int >= 3 (number of plaquettes), got {volume!r}")
        return int(volume)
    return None


def u1_2d_exact(
    beta: float, *, L: int | None = None, volume: int | None = None, n_max: int | None = None
) -> U1Exact2D:
    """Exact 2D U(1) results on an ``L x L`` torus (or ``volume`` plaquettes; neither: V = inf).

    ``n_max`` truncates the character sum ``|n| <= n_max``; the default ``40 + 10 sqrt(beta)``
    covers ``w_n ~ exp(-V n^2 / 2 beta)`` far beyond double precision.
    """
    beta = _check_beta(beta)
    vol = _volume_from(L, volume)
    if n_max is None:
        n_max = 40 + int(10 * math.sqrt(beta))
    if vol is None:
        n = np.array([0])
    else:
        n = np.arange(-n_max, n_max + 1)
    ii = bessel_i_scaled(np.concatenate([n - 1, n, n + 1]), beta).reshape(3, -1)
    i_m, i_n, i_p = ii
    ok = i_n > _TINY
    n, i_m, i_n, i_p = n[ok], i_m[ok], i_n[ok], i_p[ok]
    log_i = np.log(i_n)
    if vol is None:
        log_w = np.zeros(1)
    else:
        a = vol * log_i
        log_w = a - (a.max() + np.log(np.sum(np.exp(a - a.max()))))
    w = np.exp(log_w)
    plaq = float(np.sum(w * 0.5 * (i_m + i_p) / i_n))
    j1, j2 = _j_scaled(n, beta)
    if vol is None:
        q2 = None
        chi = float(j2[0] / i_n[0])
    else:
        r1, r2 = j1 / i_n, j2 / i_n
        q2 = float(vol * np.sum(w * (r2 - (vol - 1) * r1**2)))
        chi = q2 / vol
    return U1Exact2D(beta, vol, plaq, q2, chi, n, log_w, np.stack([i_n, i_p]))


def u1_2d_plaquette(beta: float, *, L: int | None = None, volume: int | None = None) -> float:
    """``<cos P>`` in 2D U(1) (infinite volume ``I_1/I_0`` when neither L nor volume)."""
    return u1_2d_exact(beta, L=L, volume=volume).plaquette


def u1_2d_wilson_loop(
    beta: float, area: int, *, L: int | None = None, volume: int | None = None
) -> float:
    """``<W>`` of a loop with ``area`` plaquettes (infinite volume ``(I_1/I_0)^A``)."""
    return u1_2d_exact(beta, L=L, volume=volume).wilson_loop(area)


def u1_2d_q2(beta: float, *, L: int | None = None, volume: int | None = None) -> float:
    """``<Q^2>`` of the geometric charge on a finite torus."""
    if L is None and volume is None:
        raise ValueError("u1_2d_q2 needs a finite L or volume (<Q^2> grows with V)")
    res = u1_2d_exact(beta, L=L, volume=volume)
    assert res.q2 is not None
    return res.q2


def u1_2d_chi_q(beta: float, *, L: int | None = None, volume: int | None = None) -> float:
    """Topological susceptibility ``<Q^2>/V`` (infinite volume ``J2_0/I_0``)."""
    return u1_2d_exact(beta, L=L, volume=volume).chi_q


# ---- theta term, charge distribution and log Z (2D U(1)) ------------------------------------

_LAGUERRE_NODES = 60
_TAIL_TOL = 1e-17  # bound on the dropped part of the n-sum, relative to Z(0) / (e^{-beta} I_0)^V
_MASS_TOL = 1e-13  # probability mass allowed outside the returned charge range (auto range)
_MAX_TAIL_TERMS = 20_000_000


def _gl_nodes(nu_max: float, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """Composite 32-point Gauss-Legendre nodes on [0, pi] and weights ``w e^{beta (cos phi - 1)}``."""
    n_panels = max(8, _n_points(int(math.ceil(nu_max)), beta) // 16)
    x, wq = np.polynomial.legendre.leggauss(32)
    h = math.pi / n_panels
    phi = (h * (np.arange(n_panels)[:, None] + 0.5 * (x + 1.0))).reshape(-1)
    w = np.tile(0.5 * h * wq, n_panels) * np.exp(beta * (np.cos(phi) - 1.0))
    return phi, w


def _direct_n_max(beta: float) -> int:
    """``n`` beyond which ``e^{-beta} I_nu(beta) <= (beta/2)^nu / Gamma(nu + 1)`` is below
    ``1e-10 e^{-2 beta} / (pi nu)`` (the bound of the other part of ``h``) for ``nu >= n + 1/2``."""
    n = 40 + int(10 * math.sqrt(beta))
    if beta == 0.0:
        return n

    def log_ratio(nu: float) -> float:
        return (nu * math.log(beta / 2) - math.lgamma(nu + 1)) - (
            math.log(1e-10) - 2 * beta - math.log(math.pi * nu))

    while log_ratio(n + 0.5) > 0 or beta / 2 > n:
        n += 8
    return n


def _power_ratio(x: np.ndarray, volume: int) -> np.ndarray:
    """``(1 - x)^V`` with ``x = 1 - r`` given accurately: ``exp(V log1p(-x))`` for ``r > 0``,
    so a ratio ``r`` close to 1 does not lose its relative accuracy ``V``-fold."""
    out = np.empty_like(x)
    pos = x < 1.0
    out[pos] = np.exp(volume * np.log1p(-x[pos]))
    out[~pos] = np.power(1.0 - x[~pos], volume)
    return out


def _u1_2d_z_theta(beta: float, volume: int, t: np.ndarray) -> np.ndarray:
    """``z(t) = sum_n r(n + t)^V`` with ``r(nu) = h(nu) / I_0`` at ``theta = 2 pi t``, so
    ``Z(theta) / Z(0) = z(t) / z(0)`` (module docstring).

    ``|n| <= N``: ``1 - r(nu) = (2/pi) int_0^pi e^{beta cos phi} sin^2(nu phi / 2) dphi / I_0``
    (positive integrand: accurate relative to itself, composite Gauss-Legendre) and
    :func:`_power_ratio`. ``|n| > N``: ``h(nu) = I_nu(beta) + (sin(pi nu)/pi) K(nu)`` with
    ``K(nu) = int_0^inf e^{-beta cosh s - nu s} ds`` (Gauss-Laguerre after ``s -> s/nu``);
    ``I_nu`` is negligible there (:func:`_direct_n_max`). The n-sum stops where the bound
    ``|h(nu)| <= e^{beta} (e^{-2 beta} / (pi nu)) (1 + 1e-10)`` makes the rest of both sides
    ``<= 2 a^V (N - 1/2)^{1-V} / (V - 1) < 1e-17`` (``a = e^{-2 beta} / (pi e^{-beta} I_0)``).
    """
    t = np.asarray(t, dtype=np.float64)
    h0 = float(bessel_i_scaled(0, beta)[0])
    nd = _direct_n_max(beta)
    n = np.arange(-nd, nd + 1, dtype=np.float64)
    phi, w = _gl_nodes(nd + 1.0, beta)
    w = w * (2.0 / (math.pi * h0))
    z = np.empty(t.size)
    for j, tj in enumerate(t):  # M/2 + 1 rows of (2 nd + 1) x n_nodes: a few MB each
        nu = n + tj
        x = (np.sin(np.outer(0.5 * nu, phi)) ** 2) @ w
        z[j] = np.sum(_power_ratio(x, volume))
    # the tail |n| > nd
    log_a = -2 * beta - math.log(math.pi * h0) + 1e-10
    log_c = math.log(2.0 / (volume - 1)) + volume * log_a - math.log(_TAIL_TOL)
    n_end = nd if log_c <= (volume - 1) * math.log(nd - 0.5) else int(
        math.ceil(0.5 + math.exp(log_c / (volume - 1))))
    if n_end > nd:
        n_terms = 2 * (n_end - nd) * t.size
        if n_terms > _MAX_TAIL_TERMS:
            raise ValueError(
                f"the character sum converges too slowly for volume={volume} at beta={beta} "
                f"({n_terms} tail terms); use a larger volume"
            )
        s, ws = np.polynomial.laguerre.laggauss(_LAGUERRE_NODES)
        scale = math.exp(-2 * beta) / (math.pi * h0)
        chunk = max(1, 2_000_000 // _LAGUERRE_NODES)
        for lo in range(nd + 1, n_end + 1, chunk):
            nn = np.arange(lo, min(n_end, lo + chunk - 1) + 1, dtype=np.float64)
            sign = np.where(nn % 2 == 0, 1.0, -1.0)
            for j, tj in enumerate(t):
                for st in (tj, -tj):  # nu = n + t and |-n + t| = n - t
                    nu = nn + st
                    k = np.exp(-beta * (np.cosh(np.outer(1.0 / nu, s)) - 1.0)) @ ws
                    r = sign * (math.sin(math.pi * st) * scale) * k / nu
                    z[j] += np.sum(np.power(r, volume))
    return z


def u1_2d_charge_distribution(
    beta: float, *, L: int | None = None, volume: int | None = None, q_max: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact ``P(Q)`` of the geometric charge ``Q = (1/2pi) sum_x arg P(x)`` (arg in (-pi, pi])
    of 2D U(1) with the Wilson action on an ``L x L`` torus (or any torus of ``volume``
    plaquettes): ``P(Q) = (1/2pi) int dtheta e^{-i theta Q} Z(theta) / Z(0)`` with
    ``Z(theta) = sum_n h(n + theta/2pi)^V`` (module docstring).

    Returns ``(q, p)``: the integers ``-q_max..q_max`` and their probabilities. ``q_max=None``
    chooses the range so that less than 1e-13 of the mass lies outside it (checked on the
    computed distribution); a given ``q_max`` returns exactly that range (zeros beyond
    ``V/2``, and a truncated range simply omits the rest of the mass). The trapezoid rule in
    ``theta`` uses ``M = 4 q + 1`` points (exact, ``M > V``, once that reaches ``V``); values
    are accurate to about 1e-16 absolute (rounding below that is clipped at 0).
    ``sum_Q Q^2 P(Q)`` equals :func:`u1_2d_q2`.
    """
    beta = _check_beta(beta)
    vol = _volume_from(L, volume)
    if vol is None:
        raise ValueError("u1_2d_charge_distribution needs a finite L or volume")
    if q_max is not None and (isinstance(q_max, bool) or not isinstance(q_max, (int, np.integer))
                              or q_max < 0):
        raise ValueError(f"q_max must be an int >= 0, got {q_max!r}")
    q_abs = (vol - 1) // 2  # |Q| < V/2 almost surely
    q_out = min(q_abs, int(math.ceil(8 * math.sqrt(max(u1_2d_q2(beta, volume=vol), 0.0)) + 6)))
    while True:
        m = 4 * q_out + 1
        if m > vol:
            m = vol + 1 if vol % 2 == 0 else vol + 2  # odd and > V: exact
        half = (m - 1) // 2
        z = _u1_2d_z_theta(beta, vol, np.arange(half + 1) / m)
        q = np.arange(-half, half + 1)
        # P(Q) = (1/M) sum_{j=0}^{M-1} cos(2 pi j Q / M) z_j / z_0 with z_{M-j} = z_j
        c = np.cos(2 * math.pi * np.outer(q, np.arange(1, half + 1)) / m)
        p = (z[0] + 2.0 * (c @ z[1:])) / (m * z[0])
        p = np.clip(p, 0.0, None)
        outside = float(p[np.abs(q) > q_out].sum())
        if outside < _MASS_TOL or q_out >= q_abs:
            break
        q_out = min(q_abs, 2 * q_out)
    p[np.abs(q) > q_abs] = 0.0  # Q = +-V/2 has measure zero (rounding of the rule there)
    q_ret = q_out if q_max is None else int(q_max)
    q_res = np.arange(-q_ret, q_ret + 1)
    p_res = np.zeros(q_res.size)
    keep = np.abs(q) <= q_ret
    p_res[q[keep] + q_ret] = p[keep]
    return q_res, p_res


def u1_2d_log_z(beta: float, *, L: int | None = None, volume: int | None = None) -> float:
    """``log Z = log int prod_links dtheta_l exp(-S)`` of 2D U(1) with the Wilson action on a
    torus of ``V`` plaquettes and ``2V`` links, each angle on ``[0, 2pi)`` with measure
    ``dtheta`` (not normalised) -- the measure of the U(1) flows' ``log q``::

        log Z = 2 V log(2 pi) + V beta + log sum_n (e^{-beta} I_n(beta))^V

    so that ``mean(log q + S) + log Z = KL(q || p) >= 0`` for proposals from ``q``.
    """
    beta = _check_beta(beta)
    vol = _volume_from(L, volume)
    if vol is None:
        raise ValueError("u1_2d_log_z needs a finite L or volume")
    n = np.arange(-(40 + int(10 * math.sqrt(beta))), 41 + int(10 * math.sqrt(beta)))
    i_n = bessel_i_scaled(n, beta)
    i_n = i_n[i_n > _TINY]
    a = vol * np.log(i_n)
    top = float(a.max())
    return 2 * vol * math.log(2 * math.pi) + vol * beta + top + math.log(float(np.sum(np.exp(a - top))))


def sun_2d_plaquette(beta: float, N: int, n_grid: int | None = None) -> float:
    """``<(1/N) Re tr P>`` of 2D SU(N) in infinite volume, ``d/dbeta log z(beta)``.

    ``z = int prod dth_i delta_{2pi}(sum th) Weyl(th) exp((beta/N) sum cos th_i)``; the
    integrand is smooth and periodic in the N-1 free angles, so the trapezoid rule on an
    ``n_grid^(N-1)`` grid converges exponentially. ``d/dbeta log z`` is the weighted mean of
    ``(1/N) sum cos th_i``.
    """
    beta = _check_beta(beta)
    if isinstance(N, bool) or not isinstance(N, (int, np.integer)) or not 2 <= N <= 4:
        raise ValueError(f"N must be 2, 3 or 4, got {N!r}")
    if n_grid is None:
        n_grid = 2 * (int(beta / N + 8 * math.sqrt(beta / N + 1)) + 3 * N) + 32
    th1 = 2 * math.pi * np.arange(n_grid) / n_grid
    free = list(np.meshgrid(*([th1] * (N - 1)), indexing="ij"))
    th = free + [-sum(free)]
    z = [np.exp(1j * t) for t in th]
    weyl = np.ones_like(th[0])
    for i in range(N):
        for j in range(i + 1, N):
            weyl = weyl * np.abs(z[i] - z[j]) ** 2
    c = sum(np.cos(t) for t in th) / N
    f = weyl * np.exp(beta * (c - 1.0))
    return float(np.sum(f * c) / np.sum(f))


def su2_2d_plaquette(beta: float) -> float:
    """2D SU(2): ``<(1/2) Re tr P> = I_2(beta)/I_1(beta)`` (Bessel functions by quadrature)."""
    beta = _check_beta(beta)
    if beta == 0.0:
        return 0.0
    i1, i2 = bessel_i_scaled([1, 2], beta)
    return float(i2 / i1)


def su3_2d_plaquette(beta: float) -> float:
    """2D SU(3): ``<(1/3) Re tr P>`` by the Weyl-density integral."""
    return sun_2d_plaquette(beta, 3)
