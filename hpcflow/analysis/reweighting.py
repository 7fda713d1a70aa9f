"""Importance weights of flow proposals: reweighted means and effective sample size.

With ``log w = log p - log q = -S - log q`` (up to the unknown ``log Z``), the exact
reweighted estimator is ``<O> = sum w O / sum w`` and the effective sample size is
``ESS/N = (sum w)^2 / (N sum w^2) = exp(2 lse(log w) - lse(2 log w)) / N`` (PHYSICS.md).
Everything is computed in log space with the log-sum-exp trick, so weights spanning
hundreds of e-folds (large lattices) neither overflow nor underflow.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike

from hpcflow.analysis.gamma import GammaResult, gamma_method_ratio

__all__ = ["ess", "logsumexp", "normalized_weights", "reweighted_gamma", "reweighted_mean", "reweighted_mean_error"]


def _log_w(log_w: np.ndarray, name: str = "log_w") -> np.ndarray:
    a = np.asarray(log_w, dtype=np.float64).reshape(-1)
    if a.size == 0:
        raise ValueError(f"{name} must hold at least one value, got an empty array")
    if np.any(np.isnan(a)) or np.any(a == np.inf):
        raise ValueError(f"{name} must be finite or -inf, got nan or +inf")
    if np.all(a == -np.inf):
        raise ValueError(f"{name} must have at least one finite entry (all weights are zero)")
    return a


def logsumexp(a: np.ndarray) -> float:
    """``log sum exp(a)`` computed stably (shift by the maximum)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    m = float(np.max(a))
    if m == -np.inf:
        return -np.inf
    return m + math.log(float(np.sum(np.exp(a - m))))


def normalized_weights(log_w: np.ndarray) -> np.ndarray:
    """``w_i / sum_j w_j`` from log-weights."""
    a = _log_w(log_w)
    return np.exp(a - logsumexp(a))


def ess(log_w: ArrayLike, strict: bool = True) -> float:
    """Effective sample size fraction ``ESS/N = exp(2 lse(log w) - lse(2 log w)) / N`` in (0, 1].

    The one ESS of hpcflow (training metrics, chain summaries, analysis). ``log_w``: any
    array-like of log-weights (a detached CPU torch tensor too). Invalid weights (empty, NaN,
    +inf, all -inf) raise ``ValueError``, or give NaN with ``strict=False`` (training metrics
    of a diverging step, which the trainer then reports by its loss).
    """
    try:
        a = _log_w(np.asarray(log_w))
    except ValueError:
        if strict:
            raise
        return math.nan
    # ESS is shift invariant; shifting first avoids cancelling two large logsumexps
    a = a - a.max()
    return math.exp(2 * logsumexp(a) - logsumexp(2 * a)) / a.size


def reweighted_mean(obs: np.ndarray, log_w: np.ndarray) -> float:
    """``sum w O / sum w`` with weights given as logs."""
    o = np.asarray(obs, dtype=np.float64).reshape(-1)
    w = normalized_weights(log_w)
    if o.size != w.size:
        raise ValueError(f"obs and log_w must have the same length, got {o.size} and {w.size}")
    return float(np.sum(w * o))


def reweighted_mean_error(obs: np.ndarray, log_w: np.ndarray) -> tuple[float, float]:
    """Self-normalised importance-sampling mean ``sum w O / sum w`` and its delta-method error
    ``sqrt(sum w^2 (O - <O>)^2) / sum w``, for independent proposals (not chain states)."""
    o = np.asarray(obs, dtype=np.float64).reshape(-1)
    w = normalized_weights(log_w)
    if o.size != w.size:
        raise ValueError(f"obs and log_w must have the same length, got {o.size} and {w.size}")
    mean = float(np.sum(w * o))
    return mean, float(np.sqrt(np.sum(w**2 * (o - mean) ** 2)))


def reweighted_gamma(obs: np.ndarray, log_w: np.ndarray, S: float = 1.5) -> GammaResult:
    """Reweighted mean with a Gamma-method error: the ratio ``<w O>/<w>`` of two primaries.

    Weights are shifted by ``max log w`` before exponentiating (the ratio does not change).
    """
    o = np.asarray(obs, dtype=np.float64).reshape(-1)
    a = _log_w(log_w)
    if o.size != a.size:
        raise ValueError(f"obs and log_w must have the same length, got {o.size} and {a.size}")
    w = np.exp(a - a.max())
    return gamma_method_ratio(w * o, w, S=S)
