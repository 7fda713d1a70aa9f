"""Wolff's Gamma method: errors of Monte Carlo means with autocorrelations.

U. Wolff, "Monte Carlo errors with less errors", Comput. Phys. Commun. 156 (2004) 143,
hep-lat/0306017, exactly as PHYSICS.md states it, with ``S = 1.5``:

* ``Gamma(t) = sum_r sum_i (x_i - m)(x_{i+t} - m) / sum_r (N_r - t)`` over replica ``r``
  (chains of the same ensemble), ``m`` the mean of all ``N = sum_r N_r`` values;
* ``rho(t) = Gamma(t)/Gamma(0)``, ``tau_int(W) = 1/2 + sum_{t=1..W} rho(t)``;
* ``tau(W) = S / ln[(2 tau_int + 1)/(2 tau_int - 1)]``, ``g(W) = exp(-W/tau) - tau/sqrt(W N)``;
  the window is the first ``W`` with ``g(W) < 0``;
* ``error = sqrt(C_F / N)``, ``C_F = Gamma(0) + 2 sum_{t<=W} Gamma(t) = 2 tau_int Gamma(0)``;
* ``d tau_int = 2 tau_int sqrt((W - tau_int + 1/2)/N)`` (Wolff eq. 42).

``bias_correction=True`` applies Wolff's eq. (49), ``C_F -> C_F (1 + (2W + 1)/N)``, as his
UWerr and pyerrors do. Derived quantities ``f(<a_1>, ..., <a_k>)`` are analysed through the
linearised fluctuation ``sum_a (df/da) (a_i - <a>)`` (Wolff section 3).

The variance never silently becomes zero and ``tau_int`` is never negative. What can go wrong
is reported in ``GammaResult.flags`` (codes in :data:`FLAGS`) and by a ``RuntimeWarning``:

* ``"window_limit"``: no ``W < W_max = max_r N_r // 2`` satisfies ``g(W) < 0`` (the series is
  too short for its autocorrelation time); the result at ``W = W_max - 1`` is returned, and
  ``tau_int`` and the error are then probably underestimates.
* ``"nonpositive_sum"``: ``tau_int(W) <= 0`` at the chosen window, i.e. the summed
  autocorrelation ``C_F = 2 tau_int Gamma(0)`` is not a variance (strongly anticorrelated
  data, e.g. a chain that alternates rejected flow steps with always-accepted local steps, or
  noise on a short series). Decision: the naive error ``sqrt(Gamma(0)/N)`` of uncorrelated
  data is returned instead (``tau_int = 1/2``, ``W = 0``, ``tau_int_error = 0``), an
  overestimate for anticorrelated data, never zero.
* ``"constant"``: ``Gamma(0)`` is zero to rounding: error 0, ``tau_int = 1/2`` (no warning).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["FLAGS", "GammaResult", "autocorrelation", "gamma_method", "gamma_method_derived",
           "gamma_method_ratio"]

ArrayLike = np.ndarray | Sequence[float]
Series = ArrayLike | Sequence[ArrayLike]


#: What ``GammaResult.flags`` can hold (module docstring).
FLAGS: dict[str, str] = {
    "window_limit": "no window found below W_max = N/2: the series is too short for its "
                    "autocorrelation time; tau_int and the error are probably underestimated",
    "nonpositive_sum": "the autocorrelation sum went negative (tau_int(W) <= 0): the naive "
                       "error of uncorrelated data is given instead (tau_int = 1/2)",
    "constant": "constant series: no fluctuation to estimate an error from",
}


@dataclass(frozen=True)
class GammaResult:
    """Mean, its error, ``tau_int`` with its error, the summation window, the number of values
    and the problems met (``flags``, codes of :data:`FLAGS`; empty when all went well)."""

    mean: float
    error: float
    tau_int: float
    tau_int_error: float
    window: int
    n: int
    flags: tuple[str, ...] = ()

    def __str__(self) -> str:
        extra = f", flags: {', '.join(self.flags)}" if self.flags else ""
        return (f"{self.mean:.8g} +/- {self.error:.3g} (tau_int = {self.tau_int:.3g} "
                f"+/- {self.tau_int_error:.2g}, W = {self.window}, N = {self.n}{extra})")


def _replicas(x: Series, name: str = "x") -> list[np.ndarray]:
    """A 1D series or a sequence of 1D replica series -> list of float64 arrays."""
    if isinstance(x, np.ndarray) and x.ndim == 1:
        reps = [x]
    elif isinstance(x, np.ndarray) and x.ndim == 2:
        reps = list(x)
    elif isinstance(x, (list, tuple)) and len(x) > 0 and np.ndim(x[0]) == 1:
        reps = [np.asarray(r) for r in x]
    else:
        arr = np.asarray(x)
        if arr.ndim != 1:
            raise ValueError(
                f"{name} must be a 1D series or a sequence of 1D replica series, "
                f"got shape {arr.shape}")
        reps = [arr]
    out = []
    for r in reps:
        a = np.asarray(r, dtype=np.float64)
        if a.ndim != 1 or a.size < 2:
            raise ValueError(f"each replica of {name} must be 1D with >= 2 values, got shape {a.shape}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name} contains non-finite values")
        out.append(a)
    return out


def _autocov(deltas: list[np.ndarray], w_max: int) -> np.ndarray:
    """``Gamma(t)``, t < w_max, summed over replicas by FFT, normalised by sum_r (N_r - t)."""
    num = np.zeros(w_max)
    den = np.zeros(w_max)
    for d in deltas:
        n = d.size
        size = 1 << math.ceil(math.log2(2 * n))  # zero padding: no circular wrap
        f = np.fft.rfft(d, size)
        c = np.fft.irfft(f * np.conj(f), size)[: min(n, w_max)]
        num[: c.size] += c
        den += np.clip(n - np.arange(w_max), 0, None)
    return num / np.maximum(den, 1)


def _gamma_from_deltas(
    mean: float, deltas: list[np.ndarray], S: float, bias_correction: bool
) -> GammaResult:
    n = int(sum(d.size for d in deltas))
    w_max = max(d.size for d in deltas) // 2
    gamma = _autocov(deltas, max(w_max, 1))
    g0 = gamma[0]
    scale = max(abs(mean), max(float(np.abs(d).max()) for d in deltas))
    if not g0 > (16 * np.finfo(float).eps * scale) ** 2:
        # constant series (fluctuations at rounding level): nothing to measure, no 0/0
        return GammaResult(mean, 0.0, 0.5, 0.0, 0, n, ("constant",))
    rho = gamma / g0
    tau_w = 0.5 + np.cumsum(rho[1:])  # tau_int(W) for W = 1 .. w_max-1
    window = None
    flags: list[str] = []
    if S == 0:
        window = 0
    else:
        for w in range(1, w_max):
            ti = tau_w[w - 1]
            # tau_int <= 1/2: the autocorrelation is already gone; tau -> 0 makes g < 0
            tau = S / math.log((2 * ti + 1) / (2 * ti - 1)) if ti > 0.5 else 1e-300
            g = math.exp(-w / tau) - tau / math.sqrt(w * n)
            if g < 0:
                window = w
                break
        if window is None:
            window = max(w_max - 1, 0)
            flags.append("window_limit")
            warnings.warn(
                f"Gamma method: no window found below W_max = {w_max} (N = {n}); the series "
                "is too short for its autocorrelation time", RuntimeWarning, stacklevel=3)
    tau_int = 0.5 if window == 0 else float(tau_w[window - 1])
    if tau_int <= 0.0:
        # C_F = 2 tau_int Gamma(0) <= 0 is no variance: the naive error, flagged (never zero)
        warnings.warn(
            f"Gamma method: the autocorrelation sum is negative (tau_int(W = {window}) = "
            f"{tau_int:.3g}, N = {n}); giving the naive error of uncorrelated data",
            RuntimeWarning, stacklevel=3)
        flags.append("nonpositive_sum")
        window, tau_int = 0, 0.5
    c_f = 2.0 * tau_int * g0
    if bias_correction:
        c_f *= 1.0 + (2 * window + 1) / n
        tau_int = c_f / (2.0 * g0)
    error = math.sqrt(c_f / n)
    d_tau = 2.0 * tau_int * math.sqrt(max(window - tau_int + 0.5, 0.0) / n)
    return GammaResult(float(mean), error, tau_int, d_tau, int(window), n, tuple(flags))


def _check_s(S: float) -> float:
    if not (isinstance(S, (int, float)) and math.isfinite(S) and S >= 0):
        raise ValueError(f"S must be a finite number >= 0, got {S!r}")
    return float(S)


def gamma_method(x: Series, S: float = 1.5, bias_correction: bool = False) -> GammaResult:
    """Gamma-method analysis of a 1D series, or of several replica series (a list / 2D array).

    ``S = 0`` treats the data as uncorrelated (``tau_int = 1/2``).
    """
    S = _check_s(S)
    reps = _replicas(x)
    mean = float(sum(r.sum() for r in reps) / sum(r.size for r in reps))
    return _gamma_from_deltas(mean, [r - mean for r in reps], S, bias_correction)


def autocorrelation(x: Series, w_max: int | None = None) -> np.ndarray:
    """Normalised autocorrelation ``rho(t) = Gamma(t)/Gamma(0)``, ``t = 0 .. w_max - 1``
    (default ``max_r N_r // 2``), of a series or of replica series (as :func:`gamma_method`);
    ``tau_int(W) = 1/2 + sum_{t=1..W} rho(t)``. A constant series gives ``rho = [1, 0, ...]``."""
    reps = _replicas(x)
    mean = float(sum(r.sum() for r in reps) / sum(r.size for r in reps))
    deltas = [r - mean for r in reps]
    w = max(d.size for d in deltas) // 2 if w_max is None else int(w_max)
    if w < 1:
        raise ValueError(f"w_max must be >= 1, got {w_max!r}")
    gamma = _autocov(deltas, w)
    scale = max(abs(mean), max(float(np.abs(d).max()) for d in deltas))
    if not gamma[0] > (16 * np.finfo(float).eps * scale) ** 2:
        out = np.zeros(w)
        out[0] = 1.0
        return out
    return gamma / gamma[0]


def gamma_method_derived(
    primaries: Sequence[Series],
    f: Callable[..., float],
    grad: Callable[..., Sequence[float]] | None = None,
    S: float = 1.5,
    bias_correction: bool = False,
) -> GammaResult:
    """Gamma method for ``f(<a_1>, ..., <a_k>)`` of several primary observables.

    ``primaries[k]`` are series of equal shape (same replicas, same lengths); ``grad`` returns
    ``df/da_k`` at the means (default: central differences with step ``1e-6 (|a| + err)``).
    The linearised series ``sum_k (df/da_k)(a_k - <a_k>)`` is analysed as one series.
    """
    S = _check_s(S)
    if len(primaries) == 0:
        raise ValueError("primaries must hold at least one series, got none")
    reps = [_replicas(p, f"primaries[{k}]") for k, p in enumerate(primaries)]
    shape = [r.size for r in reps[0]]
    for k, rk in enumerate(reps):
        if [r.size for r in rk] != shape:
            raise ValueError(
                f"primaries[{k}] replica lengths {[r.size for r in rk]} differ from {shape}")
    n = sum(shape)
    means = np.array([sum(r.sum() for r in rk) / n for rk in reps])
    value = float(f(*means))
    if grad is not None:
        g = np.asarray(grad(*means), dtype=np.float64)
        if g.shape != means.shape:
            raise ValueError(f"grad must return {means.size} derivatives, got shape {g.shape}")
    else:
        g = np.empty(means.size)
        for k in range(means.size):
            scale = np.std(np.concatenate(reps[k])) / math.sqrt(n)
            h = 1e-6 * (abs(means[k]) + scale) or 1e-12
            up, dn = means.copy(), means.copy()
            up[k] += h
            dn[k] -= h
            g[k] = (f(*up) - f(*dn)) / (2 * h)
    deltas = [sum(g[k] * (reps[k][r] - means[k]) for k in range(means.size))
              for r in range(len(shape))]
    return _gamma_from_deltas(value, deltas, S, bias_correction)


def gamma_method_ratio(
    num: Series, den: Series, S: float = 1.5, bias_correction: bool = False
) -> GammaResult:
    """Gamma method for ``<num>/<den>`` (e.g. a reweighted mean ``<w O>/<w>``)."""
    return gamma_method_derived(
        [num, den], lambda a, b: a / b, lambda a, b: (1.0 / b, -a / b**2), S, bias_correction)
