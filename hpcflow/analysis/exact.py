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
    "u1_2d_chi_q",
    "u1_2d_exact",
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
