"""One-dimensional bijections with log-derivatives: the kernels of every coupling layer.

Two domains, one set of maths:

* **circle** ``[0, 2 pi)`` (U(1) plaquette angles, :class:`CircularKernel`): the map ends
  with a rotation ``+ t (mod 2 pi)`` that moves the fixed point;
* **interval** ``[0, 1]`` with both ends fixed (SU(N) eigen-angle coordinates on the Weyl
  alcove, :class:`IntervalKernel`): the ends are the faces of the alcove (degenerate spectra),
  so a map fixing them induces a continuous bijection on the group.

Two families (config key ``flow.kernel``):

* ``ncp``: convex mixture of non-compact projections (Kanwar et al. 2020, arXiv 2003.06413;
  Rezende et al. 2020, arXiv 2002.02428), ``g_s(x) = 2 atan(e^s tan(x/2))`` on [0, 2 pi]
  (on [0, 1]: the same map in units of pi), with
  ``g_s'(x) = 1 / (e^-s cos^2(x/2) + e^s sin^2(x/2))``. The mixture's inverse has no closed
  form: bracketed bisection, safeguarded Newton, and one last Newton step with autograd on
  (the implicit gradient), :func:`invert_monotone`.
* ``spline``: rational-quadratic spline (Durkan et al. 2019, arXiv 1906.04032; the circular
  boundary of Rezende et al. 2020): K bins; per bin, with ``xi = (x - x_k)/w_k`` and
  ``s_k = h_k / w_k`` (eq. 4),
  ``y = y_k + h_k [s_k xi^2 + d_k xi(1-xi)] / [s_k + (d_{k+1} + d_k - 2 s_k) xi(1-xi)]``.
  On the circle ``d_K = d_0`` (C^1 across 0 = 2 pi); on the interval the ``K + 1``
  derivatives are free and ``p = 0`` is the identity map.

Every kernel takes the parameters with the parameter axis **last**: ``forward(x, p)`` with
``x`` of any shape ``S`` and ``p`` of shape ``(*S, n_params)`` (raw network outputs).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "TWO_PI",
    "CircularKernel",
    "CircularSplineKernel",
    "IntervalKernel",
    "IntervalNCPKernel",
    "IntervalSplineKernel",
    "NCPMixtureKernel",
    "invert_monotone",
    "make_interval_kernel",
    "make_kernel",
    "ncp_half_angle",
    "ncp_half_angle_exp",
    "newton_step",
    "rq_forward",
    "rq_inverse",
    "rq_knots",
]

TWO_PI = 2.0 * math.pi

Eval = Callable[[torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


# ---- shared maths ------------------------------------------------------------------------
def ncp_half_angle(z: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(atan(e^s tan z), log g_s')`` at the half angle ``z = x/2`` of the NCP ``g_s``.

    ``log g_s' = -log(e^-s cos^2 z + e^s sin^2 z)``; the caller scales the first term to its
    domain (circle: ``2 atan``; interval: ``(2/pi) atan``).
    """
    return ncp_half_angle_exp(z, torch.exp(s), torch.exp(-s))


def ncp_half_angle_exp(z: torch.Tensor, es: torch.Tensor, ies: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`ncp_half_angle` from ``es = e^s`` and ``ies = e^-s`` (computed once by a caller
    that evaluates the same NCPs many times: an inverse)."""
    c2 = torch.cos(z) ** 2
    return torch.atan(es * torch.tan(z)), -torch.log(ies * c2 + es * (1.0 - c2))


def invert_monotone(f: Eval, y: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, n_newton: int) -> torch.Tensor:
    """Root ``x`` of ``f(x)[0] = y`` for increasing ``f`` on ``[lo, hi]`` (``f(x)[1] = log f'``).

    Bracketing bisection to ~1e-3, then safeguarded Newton (quadratic convergence; a step
    leaving the bracket falls back to its midpoint), so it always converges; no autograd. The
    caller adds one Newton step with autograd on (:func:`newton_step`) for the implicit gradient.
    Newton stops early once every step is a Newton step below the rounding level of the root,
    ``16 eps (|x| + |y| / f')`` (``f`` is known to a few eps of ``y``, which moves the root by
    ``|y| / f'`` per eps): further steps would only move ``x`` within that level.
    """
    with torch.no_grad():
        for _ in range(12):
            mid = 0.5 * (lo + hi)
            below = f(mid)[0] < y
            lo = torch.where(below, mid, lo)
            hi = torch.where(below, hi, mid)
        x = 0.5 * (lo + hi)
        tol = 16.0 * torch.finfo(y.dtype).eps
        for _ in range(n_newton):
            ym, logj = f(x)
            below = ym < y
            lo = torch.where(below, x, lo)
            hi = torch.where(below, hi, x)
            inv = torch.exp(-logj)
            step = (ym - y) * inv
            xn = x - step
            # closed bracket: at an exact root (ym == y, so hi == x) the step 0 is kept
            inside = (xn >= lo) & (xn <= hi)
            x_next = torch.where(inside, xn, 0.5 * (lo + hi))
            done = bool((inside & (step.abs() <= tol * (x.abs() + y.abs() * inv))).all())
            x = x_next
            if done:
                break
    return x


def newton_step(f: Eval, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One Newton step towards ``f(x)[0] = y`` with autograd on: at the root it carries the
    implicit gradient ``dx/d(y, params)``."""
    ym, logj = f(x.detach())
    return x - (ym - y) * torch.exp(-logj)


def rq_knots(p_w: torch.Tensor, p_h: torch.Tensor, scale: float, min_bin: float
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Knots ``x_k``, ``y_k`` (``K + 1`` each, from 0 to ``scale``) from softmax bin widths
    and heights, each bin at least ``min_bin * scale``; the last knot is ``scale`` exactly, so
    the spline is a bijection of the closed interval."""
    k = p_w.shape[-1]
    w = scale * (min_bin + (1.0 - min_bin * k) * F.softmax(p_w, dim=-1))
    h = scale * (min_bin + (1.0 - min_bin * k) * F.softmax(p_h, dim=-1))
    zero = torch.zeros_like(w[..., :1])
    end = torch.full_like(zero, scale)
    xk = torch.cat([zero, torch.cumsum(w, -1)[..., :-1], end], -1)
    yk = torch.cat([zero, torch.cumsum(h, -1)[..., :-1], end], -1)
    return xk, yk


def _rq_bin(knots: torch.Tensor, v: torch.Tensor, xk: torch.Tensor, yk: torch.Tensor, d: torch.Tensor):
    # number of interior knots <= v: bin index in [0, K-1], no Python loop over sites
    i0 = (v.unsqueeze(-1) >= knots[..., 1:-1]).sum(-1, keepdim=True)
    i1 = i0 + 1

    def g(a: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        return torch.gather(a, -1, i).squeeze(-1)

    x0, y0 = g(xk, i0), g(yk, i0)
    return x0, g(xk, i1) - x0, y0, g(yk, i1) - y0, g(d, i0), g(d, i1)


def _rq_logderiv(xi, s, d0, d1):  # type: ignore[no-untyped-def]
    om = xi * (1.0 - xi)
    den = s + (d1 + d0 - 2.0 * s) * om
    num = s**2 * (d1 * xi**2 + 2.0 * s * om + d0 * (1.0 - xi) ** 2)
    return torch.log(num) - 2.0 * torch.log(den)


def rq_forward(x: torch.Tensor, xk: torch.Tensor, yk: torch.Tensor, d: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rational-quadratic spline ``(y, log dy/dx)`` at ``x`` (knots and derivatives last)."""
    x0, w, y0, h, d0, d1 = _rq_bin(xk, x, xk, yk, d)
    s = h / w
    xi = ((x - x0) / w).clamp(0.0, 1.0)
    om = xi * (1.0 - xi)
    y = y0 + h * (s * xi**2 + d0 * om) / (s + (d1 + d0 - 2.0 * s) * om)
    return y, _rq_logderiv(xi, s, d0, d1)


def rq_inverse(y: torch.Tensor, xk: torch.Tensor, yk: torch.Tensor, d: torch.Tensor, polish: int = 0
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, log dy/dx at x)`` with ``rq_forward(x)[0] == y``: the stable root in [0, 1] of
    the bin's quadratic (Durkan et al. eq. 6-8), then ``polish`` differentiable Newton steps
    on the forward formula (the root loses digits where a bin is very steep or flat; at the
    root the steps give the implicit gradient)."""
    x0, w, y0, h, d0, d1 = _rq_bin(yk, y, xk, yk, d)
    s = h / w
    dy = y - y0
    c2 = d1 + d0 - 2.0 * s
    a = h * (s - d0) + dy * c2
    b = h * d0 - dy * c2
    c = -s * dy
    disc = (b**2 - 4.0 * a * c).clamp_min(0.0)
    xi = ((2.0 * c) / (-b - torch.sqrt(disc))).clamp(0.0, 1.0)
    for _ in range(polish):
        om = xi * (1.0 - xi)
        res = h * (s * xi**2 + d0 * om) / (s + c2 * om) - dy
        xi = (xi - res / (w * torch.exp(_rq_logderiv(xi, s, d0, d1)))).clamp(0.0, 1.0)
    return x0 + xi * w, _rq_logderiv(xi, s, d0, d1)


# ---- circle [0, 2 pi) --------------------------------------------------------------------
class CircularKernel(torch.nn.Module):
    """A parameterised bijection of [0, 2 pi): ``forward(x, p) -> (y, log|dy/dx|)``.

    ``x``: any shape ``S``; ``p``: shape ``(*S, n_params)`` (raw network outputs).
    """

    n_params: int

    def forward(self, x: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def inverse(self, y: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, log|dy/dx| at x)`` with ``forward(x, p)[0] == y``."""
        raise NotImplementedError

    def forward_cf(self, x: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` with the parameter axis **first**: ``p[n_params, *S]`` (the layout of
        the host context CNN's output)."""
        return self.forward(x, p.movedim(0, -1))


class NCPMixtureKernel(CircularKernel):
    """``h(x) = sum_k softmax(a)_k g_{s_k}(x) + t mod 2 pi``; params ``(s_1..K, a_1..K, t)``.

    Each ``g_s`` fixes 0 and 2 pi and is increasing, so the convex mixture is a bijection of
    [0, 2 pi); the rotation ``t`` moves the fixed point.
    """

    def __init__(self, n_components: int) -> None:
        super().__init__()
        if n_components < 1:
            raise ValueError(f"n_components must be >= 1, got {n_components}")
        self.n_components = int(n_components)
        self.n_params = 2 * self.n_components + 1
        self.newton_steps = 20
        #: ``torch`` or ``host`` (set by the coupling layer from the lattice's backend):
        #: ``host`` runs :meth:`forward_cf` as the C++ kernel of ``kernels/flow_ncp.cpp``
        self.backend = "torch"

    def forward_cf(self, x: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.backend == "host" and x.device.type == "cpu":
            from hpcflow.kernels.flow import ncp_mixture

            return ncp_mixture(x, p, self.n_components)
        return self.forward(x, p.movedim(0, -1))

    def _split(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        k = self.n_components
        return p[..., :k], torch.log_softmax(p[..., k : 2 * k], dim=-1), p[..., 2 * k]

    @staticmethod
    def _mixture(x: torch.Tensor, s: torch.Tensor, logw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, logj = ncp_half_angle(0.5 * x.unsqueeze(-1), s)
        y = torch.remainder(2.0 * a, TWO_PI)
        return (logw.exp() * y).sum(-1), torch.logsumexp(logw + logj, dim=-1)

    def forward(self, x: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, logw, t = self._split(p)
        y, logj = self._mixture(x, s, logw)
        return torch.remainder(y + t, TWO_PI), logj

    def inverse(self, y: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, logw, t = self._split(p)
        target = torch.remainder(y - t, TWO_PI)

        def f(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self._mixture(x, s, logw)

        x = invert_monotone(f, target, torch.zeros_like(target), torch.full_like(target, TWO_PI),
                            self.newton_steps)
        x = torch.remainder(newton_step(f, x, target), TWO_PI)
        return x, f(x)[1]


class CircularSplineKernel(CircularKernel):
    """Circular rational-quadratic spline with ``K`` bins and a rotation; params ``(W, H, D, t)``.

    Derivatives at the ``K`` distinct knots from softplus, with ``d_K = d_0`` (circular).
    """

    min_bin = 1e-3
    min_deriv = 1e-3

    def __init__(self, n_knots: int) -> None:
        super().__init__()
        if n_knots < 2:
            raise ValueError(f"n_knots must be >= 2, got {n_knots}")
        self.n_knots = int(n_knots)
        self.n_params = 3 * self.n_knots + 1

    def _knots(self, p: torch.Tensor):  # type: ignore[no-untyped-def]
        k = self.n_knots
        xk, yk = rq_knots(p[..., :k], p[..., k : 2 * k], TWO_PI, self.min_bin)
        d = self.min_deriv + F.softplus(p[..., 2 * k : 3 * k])
        d = torch.cat([d, d[..., :1]], dim=-1)  # d_K = d_0: C^1 across 0 = 2 pi
        return xk, yk, d, p[..., 3 * k]

    def forward(self, x: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xk, yk, d, t = self._knots(p)
        y, logj = rq_forward(x, xk, yk, d)
        return torch.remainder(y + t, TWO_PI), logj

    def inverse(self, y: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xk, yk, d, t = self._knots(p)
        x, logj = rq_inverse(torch.remainder(y - t, TWO_PI), xk, yk, d)
        return torch.remainder(x, TWO_PI), logj


def make_kernel(kind: str, n_components: int = 2, n_knots: int = 8) -> CircularKernel:
    """Circle kernel from the config's ``flow.kernel`` (``ncp`` | ``spline``)."""
    if kind == "ncp":
        return NCPMixtureKernel(n_components)
    if kind == "spline":
        return CircularSplineKernel(n_knots)
    raise ValueError(f"flow.kernel must be 'ncp' or 'spline', got {kind!r}")


# ---- interval [0, 1], both ends fixed ----------------------------------------------------
class IntervalKernel(torch.nn.Module):
    """Increasing bijection of [0, 1] with ``g(0) = 0``, ``g(1) = 1``; parameters last axis.

    ``forward(x, p) -> (g(x), log g'(x))``; ``inverse(y, p) -> (x, log g'(x))`` with ``g(x) = y``.
    ``p = 0`` is the identity map.
    """

    n_params: int

    def forward(self, x: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def inverse(self, y: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class IntervalNCPKernel(IntervalKernel):
    """NCP mixture on the half circle, ``g(x) = (1/pi) sum_k w_k g_{s_k}(pi x)``, params
    ``(s_1..K, a_1..K)``, ``w = softmax(a)``. Each term fixes 0 and 1, so does the mixture."""

    s_max = 5.0

    def __init__(self, n_components: int) -> None:
        super().__init__()
        if isinstance(n_components, bool) or int(n_components) < 1:
            raise ValueError(f"flow.n_components must be >= 1, got {n_components!r}")
        self.n_components = int(n_components)
        self.n_params = 2 * self.n_components

    def _consts(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(e^s, e^-s, w, log w)`` of the raw parameters ``p``."""
        k = self.n_components
        # soft bound |s| < s_max: g' stays in [e^-s_max, e^s_max], so no loop is squeezed onto
        # a face of the cell (log-det -inf) by an overshooting optimiser step
        s = self.s_max * torch.tanh(p[..., :k] / self.s_max)
        logw = torch.log_softmax(p[..., k:], dim=-1)
        return torch.exp(s), torch.exp(-s), logw.exp(), logw

    @staticmethod
    def _mixture(x: torch.Tensor, c: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        es, ies, w, logw = c
        a, logj = ncp_half_angle_exp(0.5 * math.pi * x.unsqueeze(-1), es, ies)
        y = (2.0 / math.pi) * a
        return (w * y).sum(-1), torch.logsumexp(logw + logj, -1)

    def forward(self, x: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._mixture(x, self._consts(p))

    def inverse(self, y: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self._consts(p)  # once for the ~40 evaluations of the root search

        def f(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self._mixture(x, c)

        x = invert_monotone(f, y, torch.zeros_like(y), torch.ones_like(y), 30)
        x = newton_step(f, x, y).clamp(0.0, 1.0)
        return x, f(x)[1]


class IntervalSplineKernel(IntervalKernel):
    """Rational-quadratic spline on [0, 1] with ``K`` bins and ``K + 1`` free knot
    derivatives; params ``(W_1..K, H_1..K, D_0..K)``."""

    min_bin = 1e-3
    min_deriv = 1e-3

    def __init__(self, n_knots: int) -> None:
        super().__init__()
        if isinstance(n_knots, bool) or int(n_knots) < 2:
            raise ValueError(f"flow.n_knots must be >= 2, got {n_knots!r}")
        self.n_knots = int(n_knots)
        self.n_params = 3 * self.n_knots + 1
        # softplus(0 + shift) + min_deriv = 1: p = 0 is the identity map
        self._dshift = math.log(math.expm1(1.0 - self.min_deriv))

    def _knots(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        k = self.n_knots
        xk, yk = rq_knots(p[..., :k], p[..., k : 2 * k], 1.0, self.min_bin)
        return xk, yk, self.min_deriv + F.softplus(p[..., 2 * k :] + self._dshift)

    def forward(self, x: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, logj = rq_forward(x, *self._knots(p))
        return y.clamp(0.0, 1.0), logj

    def inverse(self, y: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, logj = rq_inverse(y, *self._knots(p), polish=2)
        return x.clamp(0.0, 1.0), logj


def make_interval_kernel(kind: str, n_components: int = 2, n_knots: int = 8) -> IntervalKernel:
    """Interval kernel from the config's ``flow.kernel`` (``ncp`` | ``spline``)."""
    if kind == "ncp":
        return IntervalNCPKernel(n_components)
    if kind == "spline":
        return IntervalSplineKernel(n_knots)
    raise ValueError(f"flow.kernel must be 'ncp' or 'spline', got {kind!r}")
