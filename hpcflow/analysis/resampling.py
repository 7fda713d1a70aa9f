"""Jackknife and bootstrap errors of (possibly non-linear) estimators, with binning.

Blocking into ``n_bins`` consecutive bins makes both methods valid for autocorrelated
Markov-chain data once the bin length exceeds a few ``tau_int`` (Efron 1982; the lattice
practice, e.g. DeGrand & DeTar, "Lattice Methods for QCD", ch. 9).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = ["ResamplingResult", "bootstrap", "jackknife"]

Estimator = Callable[[np.ndarray], float]


@dataclass(frozen=True)
class ResamplingResult:
    """``value = f(all data)``, its ``error``, the resampling ``bias`` estimate, samples used."""

    value: float
    error: float
    bias: float
    samples: np.ndarray


def _bins(x: np.ndarray, n_bins: int) -> list[np.ndarray]:
    x = np.asarray(x)
    if x.ndim < 1:
        raise ValueError(f"x must have a leading sample axis, got shape {x.shape}")
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 2:
        raise ValueError(f"n_bins must be an int >= 2, got {n_bins!r}")
    if n_bins > x.shape[0]:
        raise ValueError(f"n_bins must be <= number of samples {x.shape[0]}, got {n_bins}")
    b = x.shape[0] // n_bins
    # drop the remainder at the start (thermalisation end), keep equal bin lengths
    x = x[x.shape[0] - b * n_bins:]
    return [x[i * b:(i + 1) * b] for i in range(n_bins)]


def jackknife(x: np.ndarray, f: Estimator = np.mean, n_bins: int | None = None) -> ResamplingResult:
    """Binned jackknife: ``err^2 = (n-1)/n sum_i (f_{(i)} - mean f_{(.)})^2``.

    ``x`` has the samples on axis 0 (extra axes, e.g. several observables, go to ``f``);
    ``f`` maps an array of samples to a number. ``n_bins`` defaults to the number of samples.
    ``bias = (n-1)(mean f_{(.)} - f)``; the bias-corrected estimate is ``value - bias``.
    """
    x = np.asarray(x, dtype=np.float64)
    bins = _bins(x, x.shape[0] if n_bins is None else n_bins)
    n = len(bins)
    full = np.concatenate(bins)
    value = float(f(full))
    loo = np.array([float(f(np.concatenate(bins[:i] + bins[i + 1:]))) for i in range(n)])
    err = math.sqrt((n - 1) / n * float(np.sum((loo - loo.mean()) ** 2)))
    return ResamplingResult(value, err, (n - 1) * (float(loo.mean()) - value), loo)


def bootstrap(
    x: np.ndarray, f: Estimator = np.mean, n_boot: int = 1000, n_bins: int | None = None,
    seed: int = 0,
) -> ResamplingResult:
    """Binned bootstrap with ``n_boot`` resamples of the bins (numpy ``default_rng(seed)``).

    ``error`` is the standard deviation of the resampled estimates, ``bias`` their mean
    minus ``f(x)``.
    """
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 2:
        raise ValueError(f"n_boot must be an int >= 2, got {n_boot!r}")
    x = np.asarray(x, dtype=np.float64)
    bins = np.stack(_bins(x, x.shape[0] if n_bins is None else n_bins))
    rng = np.random.default_rng(seed)
    n = bins.shape[0]
    value = float(f(bins.reshape(-1, *x.shape[1:])))
    samples = np.empty(n_boot)
    for k in range(n_boot):
        pick = bins[rng.integers(0, n, size=n)]
        samples[k] = float(f(pick.reshape(-1, *x.shape[1:])))
    return ResamplingResult(value, float(samples.std(ddof=1)), float(samples.mean()) - value,
                            samples)
