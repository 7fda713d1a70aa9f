"""Topological sectors of 2D U(1): charge histograms, per-sector acceptance, sector coverage.

The charges are those of the geometric definition ``Q = (1/2pi) sum_x arg P(x)``, ``arg`` in
``(-pi, pi]`` (integers on the torus), as computed by
:func:`hpcflow.flows.u1.u1_topological_charge` (link angles) or
:func:`hpcflow.lattice.observables.topological_charge_u1_2d` (links); this module takes
them as arrays and needs no torch. The exact sector weights are
:func:`hpcflow.analysis.exact.u1_2d_charge_distribution`.

* ``charge_histogram``: counts (or summed weights) per integer sector of a fixed range.
* ``sector_acceptance``: acceptance rate of a Markov chain split by the sector it was in.
* ``coverage_report``: observed sector fractions against the exact ``P(Q)``, with the
  total-variation distance ``TV = (1/2) sum_Q |f_Q - P(Q)|`` and Pearson's
  ``chi^2 = sum_bins (n_b - N P_b)^2 / (N P_b)`` (bins with ``N P_b >= 5``, the rest pooled),
  its degrees of freedom and p-value. Both assume independent samples: for a Markov chain
  thin it to about ``2 tau_int(Q)`` first (or read ``chi^2 / dof`` against ``2 tau_int``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from hpcflow.analysis.exact import _volume_from, u1_2d_charge_distribution

__all__ = ["as_charges", "charge_histogram", "chi2_sf", "coverage_report", "sector_acceptance"]

_INT_TOL = 1e-6  # the geometric charge is an integer up to rounding of a sum of V angles


def as_charges(q: ArrayLike) -> np.ndarray:
    """The charges as a 1D int64 array; values must be integers up to rounding (1e-6)."""
    a = np.asarray(q, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(a)):
        raise ValueError("charges must be finite")
    r = np.rint(a)
    bad = np.abs(a - r) > _INT_TOL
    if np.any(bad):
        raise ValueError(
            f"charges must be integers (the geometric charge), got e.g. {a[bad][0]!r}"
        )
    return r.astype(np.int64)


def _range(q_range: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(q_range, tuple):
        lo, hi = (int(x) for x in q_range)
        if lo > hi:
            raise ValueError(f"q_range must have q_min <= q_max, got ({lo}, {hi})")
        return lo, hi
    if isinstance(q_range, bool) or not isinstance(q_range, (int, np.integer)) or q_range < 0:
        raise ValueError(f"q_range must be an int >= 0 or a tuple (q_min, q_max), got {q_range!r}")
    return -int(q_range), int(q_range)


def charge_histogram(
    Q: ArrayLike, q_range: int | tuple[int, int], weights: ArrayLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Histogram of integer charges over ``q_range`` (``q_max``: ``-q_max..q_max``, or
    ``(q_min, q_max)``, both inclusive).

    Returns ``(q, counts)``: ``counts`` are int64 numbers of samples, or with ``weights``
    (one per sample, e.g. normalised importance weights) the float sums of the weights in
    each sector. Samples outside the range are not counted (``len(Q) - counts.sum()``).
    """
    qs = as_charges(Q)
    lo, hi = _range(q_range)
    q = np.arange(lo, hi + 1)
    inside = (qs >= lo) & (qs <= hi)
    if weights is None:
        return q, np.bincount(qs[inside] - lo, minlength=q.size).astype(np.int64)
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.size != qs.size:
        raise ValueError(f"weights must have one entry per charge, got {w.size} and {qs.size}")
    return q, np.bincount(qs[inside] - lo, weights=w[inside], minlength=q.size)


def sector_acceptance(q_current: ArrayLike, accepted: ArrayLike) -> dict[str, np.ndarray]:
    """Acceptance of a Markov chain split by topological sector.

    ``q_current[t]``: the charge of the chain's state when step ``t`` was proposed;
    ``accepted[t]``: whether step ``t`` was accepted. Returns ``q`` (the sectors seen, sorted),
    ``n`` (steps made from each), ``accepted`` (how many were accepted), ``rate``
    (``accepted / n``) and ``error`` (binomial ``sqrt(rate (1 - rate) / n)``, which ignores
    autocorrelation of the acceptance flags).
    """
    qs = as_charges(q_current)
    acc = np.asarray(accepted).reshape(-1)
    if acc.size != qs.size:
        raise ValueError(f"q_current and accepted must have the same length, got {qs.size} and {acc.size}")
    acc = acc.astype(bool)
    q, inv = np.unique(qs, return_inverse=True)
    n = np.bincount(inv, minlength=q.size).astype(np.int64)
    k = np.bincount(inv, weights=acc.astype(np.float64), minlength=q.size).astype(np.int64)
    rate = k / np.maximum(n, 1)
    return {"q": q, "n": n, "accepted": k, "rate": rate, "error": np.sqrt(rate * (1 - rate) / np.maximum(n, 1))}


def _gammaincc(a: float, x: float) -> float:
    """Regularised upper incomplete gamma ``Q(a, x)`` (series below ``a + 1``, Lentz's
    continued fraction above; Numerical Recipes 6.2)."""
    if x <= 0:
        return 1.0
    log_pre = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1:
        term = total = 1.0 / a
        ap = a
        for _ in range(10_000):
            ap += 1
            term *= x / ap
            total += term
            if abs(term) < abs(total) * 1e-16:
                break
        return max(0.0, 1.0 - total * math.exp(log_pre))
    tiny = 1e-300
    b = x + 1 - a
    c = 1 / tiny
    d = 1 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1 / d
        delta = d * c
        h *= delta
        if abs(delta - 1) < 1e-16:
            break
    return math.exp(log_pre) * h


def chi2_sf(chi2: float, dof: int) -> float:
    """``P(X >= chi2)`` for ``X ~ chi^2(dof)``."""
    if dof < 1:
        return math.nan
    return _gammaincc(0.5 * dof, 0.5 * float(chi2))


def _pearson(counts: np.ndarray, expected: np.ndarray, out_count: int, out_expected: float,
             min_expected: float = 5.0) -> tuple[float, int]:
    """Pearson's chi^2 over the sectors with ``expected >= min_expected``; all others (and
    the mass outside the range) pooled into one bin, which joins the smallest core bin
    when it is itself below ``min_expected``. The binning depends on ``expected`` only."""
    core = expected >= min_expected
    obs = list(counts[core].astype(np.float64))
    exp = list(expected[core])
    rest_o = float(counts[~core].sum()) + out_count
    rest_e = float(expected[~core].sum()) + out_expected
    if rest_e >= min_expected or (rest_e > 0 and not exp):
        obs.append(rest_o)
        exp.append(rest_e)
    elif exp:
        i = int(np.argmin(exp))
        obs[i] += rest_o
        exp[i] += rest_e
    o, e = np.array(obs), np.array(exp)
    if o.size < 2:
        return 0.0, 0
    return float(np.sum((o - e) ** 2 / e)), int(o.size - 1)


def coverage_report(
    q_samples: ArrayLike, beta: float, L: int | None = None, *, volume: int | None = None,
    q_max: int | None = None,
) -> dict[str, Any]:
    """Observed sector fractions of ``q_samples`` against the exact 2D U(1) ``P(Q)`` at
    ``beta`` on the ``L x L`` torus (or ``volume`` plaquettes).

    The sectors reported are ``-q_max..q_max``, by default the exact range with less than
    1e-13 of the mass outside, widened to every observed charge. Returns plain arrays and
    numbers: ``q``, ``count``, ``observed`` (fraction), ``exact`` (``P(Q)``), ``expected``
    (``N P(Q)``), ``error`` (binomial ``sqrt(P (1 - P) / N)``), ``pull``
    (``(observed - exact) / error``, 0 where ``P = 0``), ``n``, ``tv`` (total variation
    ``(1/2) sum_Q |f_Q - P(Q)|``, exact mass outside the range included), ``chi2``, ``dof``,
    ``p_value`` (module docstring), ``missing_mass`` (exact mass of sectors never observed)
    and ``n_impossible`` (samples with ``|Q| >= V/2``, which the geometric charge never has).
    """
    qs = as_charges(q_samples)
    if qs.size == 0:
        raise ValueError("q_samples must hold at least one charge")
    q_ex, p_ex = u1_2d_charge_distribution(beta, L=L, volume=volume)
    vol = _volume_from(L, volume)
    assert vol is not None  # u1_2d_charge_distribution raised otherwise
    qm = int(q_ex[-1]) if q_max is None else int(q_max)
    if q_max is None:
        qm = max(qm, int(np.abs(qs).max()))
    q, p = u1_2d_charge_distribution(beta, L=L, volume=volume, q_max=qm)
    _, counts = charge_histogram(qs, qm)
    n = int(qs.size)
    frac = counts / n
    out_count = int(n - counts.sum())
    out_mass = max(0.0, 1.0 - float(p.sum()))
    err = np.sqrt(p * (1 - p) / n)
    pull = np.divide(frac - p, err, out=np.zeros_like(p), where=err > 0)
    tv = 0.5 * (float(np.abs(frac - p).sum()) + out_count / n + out_mass)
    chi2, dof = _pearson(counts, n * p, out_count, n * out_mass)
    return {
        "q": q,
        "count": counts,
        "observed": frac,
        "exact": p,
        "expected": n * p,
        "error": err,
        "pull": pull,
        "n": n,
        "tv": tv,
        "chi2": chi2,
        "dof": dof,
        "p_value": chi2_sf(chi2, dof) if dof > 0 else math.nan,
        "missing_mass": float(p[counts == 0].sum()) + out_mass,
        "n_impossible": int(np.sum(2 * np.abs(qs) >= vol)),
    }
