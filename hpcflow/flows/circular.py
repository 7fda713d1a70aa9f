"""Bijections of the circle [0, 2 pi) with log-derivatives: the kernels of U(1) coupling layers.

Two families (config key ``flow.kernel``):

* ``ncp``: convex mixture of non-compact projections (Kanwar et al. 2020, arXiv 2003.06413;
  Rezende et al. 2020, arXiv 2002.02428) ``g_s(x) = 2 atan(e^s tan(x/2))`` on [0, 2 pi),
  ``h(x) = sum_k w_k g_{s_k}(x) + t  (mod 2 pi)``.
* ``spline``: circular rational-quadratic spline (Durkan et al. 2019, arXiv 1906.04032, with
  the circular boundary of Rezende et al. 2020): K bins on [0, 2 pi], equal first and last
  derivative so the map is C^1 on the circle, followed by a rotation ``+ t``.

Parameters arrive as a tensor ``params[..., n_params, *sites]``-style channel axis chosen by the
caller; here every function takes parameters with the parameter axis **last**.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "TWO_PI",
    "CircularKernel",
    "CircularSplineKernel",
    "NCPMixtureKernel",
    "make_kernel",
]

TWO_PI = 2.0 * math.pi


def _ncp(x: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NCP ``g_s(x) = 2 atan(e^s tan(x/2))`` mapped to [0, 2 pi) and ``log g'_s(x)``.

    ``g'_s(x) = 1 / (e^-s cos^2(x/2) + e^s sin^2(x/2))``.
    """
    y = torch.remainder(2.0 * torch.atan(torch.exp(s) * torch.tan(0.5 * x)), TWO_PI)
    c2 = torch.cos(0.5 * x) ** 2
    logj = -torch.log(torch.exp(-s) * c2 + torch.exp(s) * (1.0 - c2))
    return y, logj


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
    [0, 2 pi); the rotation ``t`` moves the fixed point. The inverse of the mixture has no
    closed form: bracketed bisection then safeguarded Newton, to machine precision.
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

    def _mixture(
        self, x: torch.Tensor, s: torch.Tensor, logw: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        y, logj = _ncp(x.unsqueeze(-1), s)
        return (logw.exp() * y).sum(-1), torch.logsumexp(logw + logj, dim=-1)

    def forward(self, x: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, logw, t = self._split(p)
        y, logj = self._mixture(x, s, logw)
        return torch.remainder(y + t, TWO_PI), logj

    def inverse(self, y: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, logw, t = self._split(p)
        target = torch.remainder(y - t, TWO_PI)
        lo = torch.zeros_like(target)
        hi = torch.full_like(target, TWO_PI)
        with torch.no_grad():
            # bracketing bisection to ~1e-3, then safeguarded Newton (quadratic convergence;
            # a step leaving the bracket falls back to its midpoint), so it always converges
            for _ in range(12):
                mid = 0.5 * (lo + hi)
                below = self._mixture(mid, s, logw)[0] < target
                lo = torch.where(below, mid, lo)
                hi = torch.where(below, hi, mid)
            x = 0.5 * (lo + hi)
            for _ in range(self.newton_steps):
                ym, logj = self._mixture(x, s, logw)
                below = ym < target
                lo = torch.where(below, x, lo)
                hi = torch.where(below, hi, x)
                xn = x - (ym - target) * torch.exp(-logj)
                inside = (xn > lo) & (xn < hi)
                x = torch.where(inside, xn, 0.5 * (lo + hi))
        # one last Newton step with autograd on: gives the implicit gradient dx/d(y, params)
        ym, logj = self._mixture(x.detach(), s, logw)
        x = torch.remainder(x - (ym - target) * torch.exp(-logj), TWO_PI)
        return x, self._mixture(x, s, logw)[1]


class CircularSplineKernel(CircularKernel):
    """Circular rational-quadratic spline with ``K`` bins and a rotation; params ``(W, H, D, t)``.

    Knots ``x_k``, ``y_k`` from softmax widths/heights scaled to 2 pi; derivatives at the
    ``K`` distinct knots from softplus, with ``d_K = d_0`` (circular). Per bin, with
    ``xi = (x - x_k)/w_k`` and ``s_k = h_k / w_k`` (Durkan et al. eq. 4):
    ``y = y_k + h_k [s_k xi^2 + d_k xi(1-xi)] / [s_k + (d_{k+1} + d_k - 2 s_k) xi(1-xi)]``.
    """

    min_bin = 1e-3
    min_deriv = 1e-3

    def __init__(self, n_knots: int) -> None:
        super().__init__()
        if n_knots < 2:
            raise ValueError(f"n_knots must be >= 2, got {n_knots}")
        self.n_knots = int(n_knots)
        self.n_params = 3 * self.n_knots + 1

    def _knots(self, p: torch.Tensor):
        k = self.n_knots
        w = F.softmax(p[..., :k], dim=-1)
        h = F.softmax(p[..., k : 2 * k], dim=-1)
        w = TWO_PI * (self.min_bin + (1.0 - self.min_bin * k) * w)
        h = TWO_PI * (self.min_bin + (1.0 - self.min_bin * k) * h)
        d = self.min_deriv + F.softplus(p[..., 2 * k : 3 * k])
        d = torch.cat([d, d[..., :1]], dim=-1)  # d_K = d_0: C^1 across 0 = 2 pi
        zero = torch.zeros_like(w[..., :1])
        xk = torch.cat([zero, torch.cumsum(w, -1)], -1)
        yk = torch.cat([zero, torch.cumsum(h, -1)], -1)
        # pin the last knot exactly at 2 pi so the map is a bijection of the closed interval
        xk = torch.cat([xk[..., :-1], torch.full_like(zero, TWO_PI)], -1)
        yk = torch.cat([yk[..., :-1], torch.full_like(zero, TWO_PI)], -1)
        return xk, yk, d, p[..., 3 * k]

    @staticmethod
    def _bin(knots: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # number of interior knots <= v: bin index in [0, K-1], no Python loop over sites
        return (v.unsqueeze(-1) >= knots[..., 1:-1]).sum(-1, keepdim=True)

    def _gather(self, xk, yk, d, idx):
        def g(a: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
            return torch.gather(a, -1, i).squeeze(-1)

        x0, x1 = g(xk, idx), g(xk, idx + 1)
        y0, y1 = g(yk, idx), g(yk, idx + 1)
        d0, d1 = g(d, idx), g(d, idx + 1)
        return x0, x1 - x0, y0, y1 - y0, d0, d1

    def _logderiv(self, xi, s, d0, d1):
        om = xi * (1.0 - xi)
        den = s + (d1 + d0 - 2.0 * s) * om
        num = s**2 * (d1 * xi**2 + 2.0 * s * om + d0 * (1.0 - xi) ** 2)
        return torch.log(num) - 2.0 * torch.log(den)

    def forward(self, x: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xk, yk, d, t = self._knots(p)
        x0, w, y0, h, d0, d1 = self._gather(xk, yk, d, self._bin(xk, x))
        s = h / w
        xi = ((x - x0) / w).clamp(0.0, 1.0)
        om = xi * (1.0 - xi)
        y = y0 + h * (s * xi**2 + d0 * om) / (s + (d1 + d0 - 2.0 * s) * om)
        return torch.remainder(y + t, TWO_PI), self._logderiv(xi, s, d0, d1)

    def inverse(self, y: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xk, yk, d, t = self._knots(p)
        yy = torch.remainder(y - t, TWO_PI)
        x0, w, y0, h, d0, d1 = self._gather(xk, yk, d, self._bin(yk, yy))
        s = h / w
        dy = yy - y0
        c2 = d1 + d0 - 2.0 * s
        a = h * (s - d0) + dy * c2
        b = h * d0 - dy * c2
        c = -s * dy
        # stable root of a xi^2 + b xi + c = 0 in [0, 1] (Durkan et al. eq. 6-8)
        disc = (b**2 - 4.0 * a * c).clamp_min(0.0)
        xi = ((2.0 * c) / (-b - torch.sqrt(disc))).clamp(0.0, 1.0)
        x = torch.remainder(x0 + xi * w, TWO_PI)
        return x, self._logderiv(xi, s, d0, d1)


def make_kernel(kind: str, n_components: int = 2, n_knots: int = 8) -> CircularKernel:
    """Kernel from the config's ``flow.kernel`` (``ncp`` | ``spline``)."""
    if kind == "ncp":
        return NCPMixtureKernel(n_components)
    if kind == "spline":
        return CircularSplineKernel(n_knots)
    raise ValueError(f"flow.kernel must be 'ncp' or 'spline', got {kind!r}")
