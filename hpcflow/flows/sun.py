"""Gauge-equivariant SU(2)/SU(3) flows in 2D and 4D: spectral coupling layers (Boyda et al. 2021).

Reference: D. Boyda et al., "Sampling using SU(N) gauge equivariant flows", arXiv 2008.05456.

**Layer** ``(mu, nu, off)``: the links ``U_mu(x)`` with ``x_nu = off (mod 4)`` are updated. The
*active* loop of such a link is the untraced plaquette it opens,
``P(x) = P_{mu nu}(x) = U_mu(x) U_nu(x+mu) U_mu(x+nu)^dag U_nu(x)^dag`` (it holds exactly one
updated link, since ``x_nu + 1 != off``). A conjugation-equivariant map ``P -> P' = f(P | ctx)``
acts on the eigen-angles of ``P`` only, ``P = V diag(e^{i theta}) V^dag -> V diag(e^{i theta'})
V^dag``, and the link absorbs the change, ``U_mu(x) -> P' P^dag U_mu(x)``, so the active loop
takes the value ``P'``. Under ``U -> g.U`` the loop is conjugated, ``P -> g(x) P g(x)^dag``, hence
``f(g.U) = g.f(U)`` exactly.

Plaquettes (of every plane) that contain no updated link are *frozen*; the context ``ctx`` is
computed from them only (``Re``/``Im`` of ``tr P`` and ``tr P^2``) by a CNN over the lattice
(:class:`hpcflow.flows.conv4d.LatticeCNN`; Conv4d in 4D). Every other plaquette through an
updated link is *passive*. The new value of an updated link depends on itself and on
non-updated links only, so the Jacobian is triangular (block diagonal in the updated links),
and right multiplication by a fixed matrix preserves Haar measure: the layer's log-det with
respect to the product Haar measure is the sum over active loops of the log-det of ``P -> P'``.

**Eigen-angles, canonical cell.** Eigenvalues have no order; the map is made
permutation-equivariant by transforming the canonical representative of the conjugacy class,
the point of the Weyl alcove ``theta_1 >= ... >= theta_N``, ``sum theta = 0``,
``theta_1 - theta_N <= 2 pi``. With ``a_i = theta_i - theta_{i+1}`` and
``a_N = 2 pi - theta_1 + theta_N`` the alcove is the simplex ``a_i >= 0, sum a = 2 pi``; its
faces are exactly the degenerate spectra, and the maps below send every face to itself, so the
induced map on the group is a continuous bijection.

* SU(2): ``theta in [0, pi]`` (eigenvalues ``e^{+-i theta}``) from the closed forms
  ``cos theta = Re tr P / 2``, ``sin theta = |TA(P)|``; ``u = theta/pi -> u' = g(u)`` with an
  interval bijection ``g`` of [0, 1] fixing both ends; ``P' = cos theta' 1 + (sin theta' /
  sin theta) (P - P^dag)/2``.
* SU(3): stick-breaking coordinates of the simplex, ``u = a_1/2pi``, ``v = a_2/(2pi - a_1)``, both
  in [0, 1]; ``u' = g_1(u)``, ``v' = g_2(v | u)`` (parameters of ``g_2`` depend on ``u`` through
  fixed Fourier features), ``d(a_1', a_2')/d(a_1, a_2) = g_1' g_2' (1 - u')/(1 - u)``.
  Eigenvectors from ``torch.linalg.eigh`` of the Cayley transform ``H = i(1 - W)(1 + W)^{-1}``
  of ``W = e^{i alpha} P``, whose eigenvalues ``tan(phi/2)`` are a monotone function of the
  eigen-angles: degenerate only where ``P`` is, and with ``alpha`` putting ``-1`` in the widest gap
  of the spectrum, ``|tan(phi/2)| <= sqrt(3)`` (well conditioned).

**Haar factor** (Weyl integration formula): ``dU = Weyl(theta) d theta dV`` with
``Weyl = prod_{i<j} |e^{i theta_i} - e^{i theta_j}|^2``, hence
``log det = log|d theta'/d theta| + log Weyl(theta') - log Weyl(theta)``.

**Masks** (period 4 across ``nu``; 2 for extents that are even but not multiples of 4) cycle
over all ordered planes: layer ``i`` has ``mu = i % Nd``,
``off = (i // Nd) % 4`` and ``nu`` the ``((i // (4 Nd)) % (Nd-1))``-th direction other than ``mu``
(2D: ``nu = 1 - mu``, the U(1) order). ``4 Nd`` layers update every link once; ``4 Nd (Nd-1)``
(48 in 4D) use every plane orientation.

**Host kernels** (``backend: host``, 4D SU(3), NCP kernel, CPU): the forward of a flow runs as
one autograd node of ``kernels/flow_sun.cpp`` (:meth:`SUNSpectralCoupling.fused_walk`; the same
maps, equal to this module's torch code to rounding; docs/DESIGN.md "Host kernels of the 4D
SU(3) flow"). So does the inverse when no gradient is needed (``log q`` of given fields, e.g.
a mixed chain's states: :meth:`SUNSpectralCoupling.fused_inverse_walk`, the NCP maps inverted
by Newton in C++). The differentiated inverse, GPUs, 2D, SU(2) and spline kernels use the
torch code here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from hpcflow.dtypes import real_dtype
from hpcflow.flows.arch import check_flow_config, flow_architecture
from hpcflow.flows.base import Bijection, GaugeFlow, GaugeTheory
from hpcflow.flows.conv4d import LatticeCNN, PadFnNd, circular_pad_nd
from hpcflow.flows.kernels1d import (
    TWO_PI,
    IntervalKernel,
    IntervalNCPKernel,
    IntervalSplineKernel,
    make_interval_kernel,
)
from hpcflow.flows.prior import HaarPriorSUN
from hpcflow.lattice.action import average_plaquette, link, plaquette, wilson_action
from hpcflow.lattice.geometry import Comm, Lattice
from hpcflow.lattice.groups import Group, dagger, get_group

__all__ = [
    "MASK_PERIOD",
    "HaarPriorSUN",
    "IntervalKernel",
    "IntervalNCPKernel",
    "IntervalSplineKernel",
    "SUNGaugeFlow",
    "SUNSpectralCoupling",
    "SUNTheory",
    "build_sun_flow",
    "layer_plan",
    "make_interval_kernel",
    "mask_period",
    "su2_spectral",
    "su3_alcove",
    "su3_n_params",
    "su3_spectral",
    "sun_masks",
]

MASK_PERIOD = 4


def mask_period(extent: int) -> int:
    """Stripe period across ``nu``: 4 (frozen stripes in the active plane too) when the extent
    allows it, else 2 (even extents such as 6: the context then comes from the other planes
    only). 0 when the extent is odd (no valid pattern)."""
    return MASK_PERIOD if extent % MASK_PERIOD == 0 else (2 if extent % 2 == 0 else 0)
# Fourier features of u on which the parameters of the SU(3) second-angle map depend
N_U_FEATURES = 4


# ---- spectral maps of single SU(N) matrices ----------------------------------------------
def su2_spectral(
    P: torch.Tensor, kernel: IntervalKernel, p: torch.Tensor, inverse: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """SU(2) conjugation-equivariant map (module docstring) of ``P[..., 2, 2]``.

    Returns ``(P', log det)``, the log-det of the *forward* map with respect to Haar measure at
    the pre-image: ``log g'(u) + 2 log sin theta' - 2 log sin theta`` (Weyl factor
    ``4 sin^2 theta``). With ``inverse=True``, ``P`` is an output of the forward map and ``P'`` its
    pre-image.
    """
    c = 0.5 * (P[..., 0, 0] + P[..., 1, 1]).real
    A = 0.5 * (P - dagger(P))
    s = torch.sqrt(0.5 * (A.real**2 + A.imag**2).sum((-1, -2)))  # sin theta >= 0
    theta = torch.atan2(s, c)
    u = theta / math.pi
    if inverse:
        u2, logj = kernel.inverse(u, p)
    else:
        u2, logj = kernel(u, p)
    theta2 = math.pi * u2
    s2 = torch.sin(theta2)
    # A = i sin(theta) n.sigma: rescaling it keeps the axis n (the eigenvectors); at sin = 0
    # A vanishes exactly and any finite ratio gives P' = +-1
    ratio = s2 / s.clamp_min(torch.finfo(s.dtype).tiny)
    eye = torch.eye(2, dtype=P.dtype, device=P.device)
    P2 = torch.cos(theta2)[..., None, None] * eye + ratio[..., None, None] * A
    s_in, s_out = (s2, s) if inverse else (s, s2)
    return P2, logj + 2.0 * torch.log(s_out) - 2.0 * torch.log(s_in)


def _su3_eigh(P: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-angles ``phi[..., 3]`` (unwrapped) and unitary eigenvectors ``V`` of SU(3) ``P``.

    ``eigh`` of the Cayley transform of ``W = e^{i alpha} P`` (module docstring); ``alpha`` is a
    detached, piecewise-constant choice, so it carries no gradient and the result does not
    depend on it.
    """
    with torch.no_grad():
        ang = torch.sort(torch.angle(torch.linalg.eigvals(P)), -1).values
        gaps = torch.cat([ang[..., 1:] - ang[..., :-1], ang[..., :1] + TWO_PI - ang[..., -1:]], -1)
        j = torch.argmax(gaps, -1, keepdim=True)
        mid = torch.gather(ang, -1, j) + 0.5 * torch.gather(gaps, -1, j)
        alpha = (math.pi - mid).squeeze(-1)
    rot = torch.polar(torch.ones_like(alpha), alpha)[..., None, None]
    W = rot * P
    eye = torch.eye(3, dtype=P.dtype, device=P.device)
    H = 1j * torch.linalg.solve(eye + W, eye - W)
    H = 0.5 * (H + dagger(H))
    t, V = torch.linalg.eigh(H)
    return 2.0 * torch.atan(t) - alpha.unsqueeze(-1), V


def su3_alcove(phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Canonical cell of SU(3) eigen-angles ``phi[..., 3]`` (any lift, ``sum = 0 mod 2 pi``).

    Returns ``(a, b, perm)``: ``a = theta_1 - theta_2``, ``b = theta_2 - theta_3`` of the alcove
    point ``theta_1 >= theta_2 >= theta_3``, ``sum theta = 0``, ``theta_1 - theta_3 <= 2 pi``, and
    ``perm`` with ``theta_k = phi[perm[k]] (mod 2 pi)``.
    """
    phi = torch.remainder(phi + math.pi, TWO_PI) - math.pi  # [-pi, pi): the sum is 0, +-2 pi
    n = torch.round(phi.sum(-1) / TWO_PI)
    hi = F.one_hot(torch.argmax(phi, -1), 3).to(phi.dtype)
    lo = F.one_hot(torch.argmin(phi, -1), 3).to(phi.dtype)
    # sum 2 pi: the largest angle moves down a turn; sum -2 pi: the smallest moves up a turn
    phi = phi - TWO_PI * (n == 1).to(phi.dtype)[..., None] * hi \
        + TWO_PI * (n == -1).to(phi.dtype)[..., None] * lo
    theta, perm = torch.sort(phi, -1, descending=True)
    return theta[..., 0] - theta[..., 1], theta[..., 1] - theta[..., 2], perm


def _su3_log_weyl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``log prod_{i<j} |e^{i theta_i} - e^{i theta_j}|^2 = sum_{x=a,b,2pi-a-b} log 4 sin^2(x/2)``."""
    c = TWO_PI - a - b
    return sum(torch.log(4.0 * torch.sin(0.5 * x) ** 2) for x in (a, b, c))


def _u_features(u: torch.Tensor) -> torch.Tensor:
    x = math.pi * u
    return torch.stack([torch.cos(x), torch.sin(x), torch.cos(2 * x), torch.sin(2 * x)], -1)


def su3_n_params(kernel: IntervalKernel) -> int:
    """Network outputs per active loop: ``g_1`` params and an affine-in-features ``g_2``."""
    return kernel.n_params * (2 + N_U_FEATURES)


def su3_spectral(
    P: torch.Tensor, kernel: IntervalKernel, p: torch.Tensor, inverse: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """SU(3) conjugation-equivariant map of ``P[..., 3, 3]`` on the canonical cell.

    ``p[..., su3_n_params(kernel)]``. Returns ``(P', log det of the forward map at the
    pre-image)`` as :func:`su2_spectral` does.
    """
    k = kernel.n_params
    p1 = p[..., :k]
    coef = p[..., k:].unflatten(-1, (1 + N_U_FEATURES, k))

    def p2_of(u: torch.Tensor) -> torch.Tensor:
        f = torch.cat([torch.ones_like(u)[..., None], _u_features(u)], -1)
        return (f.unsqueeze(-1) * coef).sum(-2)

    phi, V = _su3_eigh(P)
    a, b, perm = su3_alcove(phi)
    u, v = a / TWO_PI, b / (TWO_PI - a)
    if inverse:
        u2, l1 = kernel.inverse(u, p1)
        v2, l2 = kernel.inverse(v, p2_of(u2))
        u_in, u_out = u2, u
    else:
        u2, l1 = kernel(u, p1)
        v2, l2 = kernel(v, p2_of(u))
        u_in, u_out = u, u2
    a2 = TWO_PI * u2
    b2 = (TWO_PI - a2) * v2
    theta2 = torch.stack([(2 * a2 + b2) / 3, (b2 - a2) / 3, -(a2 + 2 * b2) / 3], -1)
    cols = torch.zeros_like(theta2).scatter(-1, perm, theta2)
    P2 = (V * torch.polar(torch.ones_like(cols), cols).unsqueeze(-2)) @ dagger(V)
    if inverse:
        (ai, bi), (ao, bo) = (a2, b2), (a, b)
    else:
        (ai, bi), (ao, bo) = (a, b), (a2, b2)
    logdet = (l1 + l2 + torch.log1p(-u_out) - torch.log1p(-u_in)
              + _su3_log_weyl(ao, bo) - _su3_log_weyl(ai, bi))
    return P2, logdet


# ---- masks -------------------------------------------------------------------------------
def sun_masks(lat: Lattice, mu: int, nu: int, offset: int) -> dict[str, torch.Tensor]:
    """Bool masks of layer ``(mu, nu, offset)`` from **global** coordinates (every rank agrees):

    ``links`` (sites ``x`` whose ``U_mu(x)`` is updated, = sites of the active loops
    ``P_{mu nu}(x)``), ``frozen`` ``(n_planes, *shape)`` (plaquettes ``P_{ab}(x)``, ``a < b``,
    holding no updated link) and ``passive`` (the others through an updated link, not active).
    """
    nd = lat.nd
    if not (0 <= mu < nd and 0 <= nu < nd) or mu == nu:
        raise ValueError(f"(mu, nu) must be two distinct directions in [0, {nd}), got ({mu}, {nu})")
    xnu = lat.global_coords()[nu]
    period = mask_period(lat.global_shape[nu])
    if period == 0:
        raise ValueError(f"lattice extent {lat.global_shape[nu]} of direction nu={nu} must be even")

    def updated(shift_dir: int | None) -> torch.Tensor:
        step = 1 if shift_dir == nu else 0
        return torch.remainder(xnu + step - offset, period) == 0

    links = updated(None)
    frozen, passive = [], []
    for a, b in lat.planes():
        # P_ab(x) holds U_a(x), U_b(x+a), U_a(x+b), U_b(x)
        touched = torch.zeros_like(links)
        if a == mu:
            touched = touched | updated(None) | updated(b)
        if b == mu:
            touched = touched | updated(a) | updated(None)
        frozen.append(~touched)
        active = links if (a, b) in ((mu, nu), (nu, mu)) else torch.zeros_like(links)
        passive.append(touched & ~active)
    return {"links": links, "frozen": torch.stack(frozen), "passive": torch.stack(passive)}


def layer_plan(nd: int, n_layers: int) -> list[tuple[int, int, int]]:
    """``(mu, nu, offset)`` of layer ``i`` (module docstring)."""
    plan = []
    for i in range(int(n_layers)):
        mu = i % nd
        off = (i // nd) % MASK_PERIOD
        others = [d for d in range(nd) if d != mu]
        plan.append((mu, others[(i // (MASK_PERIOD * nd)) % (nd - 1)], off))
    return plan


# ---- coupling layer ----------------------------------------------------------------------
class SUNSpectralCoupling(Bijection):
    """One spectral coupling layer on a link field ``U[*B, nd, *lat.shape, N, N]``."""

    def __init__(
        self,
        lat: Lattice,
        group: Group | str,
        mu: int,
        nu: int,
        offset: int,
        kernel: IntervalKernel,
        hidden: Sequence[int],
        kernel_size: int,
        checkpoint_activations: bool = False,
        pad_fn: PadFnNd = circular_pad_nd,
    ) -> None:
        super().__init__()
        self.group = get_group(group) if isinstance(group, str) else group
        if self.group.name not in ("su2", "su3"):
            raise ValueError(f"group must be 'su2' or 'su3' for spectral layers, got {self.group.name!r}")
        if mask_period(lat.global_shape[nu]) == 0:
            raise ValueError(
                f"lattice.shape {list(lat.global_shape)}: extent {lat.global_shape[nu]} of direction "
                f"nu={nu} must be even (mask period 4, or 2)"
            )
        self.lat, self.mu, self.nu, self.offset = lat, int(mu), int(nu), int(offset)
        self.kernel = kernel
        self.n_feat = 2 if self.group.name == "su2" else 4
        n_out = kernel.n_params if self.group.name == "su2" else su3_n_params(kernel)
        self.net = LatticeCNN(lat.nd, self.n_feat * lat.n_planes, hidden, n_out, kernel_size, pad_fn)
        # zero output layer: kernel parameters 0 are the identity map, so the untrained flow is
        # the Haar prior (a random start is a strongly contracting map: KL of hundreds on 4^4)
        with torch.no_grad():
            for p in self.net.convs[-1].parameters():
                p.zero_()
        self.checkpoint_activations = bool(checkpoint_activations)
        m = sun_masks(lat, self.mu, self.nu, self.offset)
        # bool / int64 buffers: Module.to(float dtype) leaves them alone
        self.register_buffer("frozen", m["frozen"], persistent=False)
        self.register_buffer("active_idx", torch.nonzero(m["links"].flatten()).flatten(),
                             persistent=False)
        self.register_buffer("active_interior", lat.interior().flatten()[self.active_idx],
                             persistent=False)
        self._spectral = su2_spectral if self.group.name == "su2" else su3_spectral
        self._period = mask_period(lat.global_shape[nu])
        self._plan: Any = None  # kernels.flow_sun.LayerPlan, built at the first host call

    @property
    def halo(self) -> int:
        """Halo this layer needs: CNN reach plus one for the plaquettes' ``x + mu`` links."""
        return self.net.reach + 1

    def context_features(self, U: torch.Tensor) -> torch.Tensor:
        """``Re``/``Im`` of ``tr P`` and ``tr P^2`` of frozen plaquettes (SU(2): the real parts),
        zero elsewhere; shape ``(*B, n_feat * n_planes, *shape)``."""
        feats = []
        for k, (a, b) in enumerate(self.lat.planes()):
            P = plaquette(U, self.lat, a, b)
            tr1 = torch.diagonal(P, dim1=-2, dim2=-1).sum(-1)
            tr2 = (P * P.transpose(-1, -2)).sum((-1, -2))
            parts = (tr1.real, tr2.real) if self.n_feat == 2 else (tr1.real, tr1.imag, tr2.real, tr2.imag)
            feats.extend(f * self.frozen[k] for f in parts)
        return torch.stack(feats, -(self.lat.nd + 1))

    def _params(self, U: torch.Tensor) -> torch.Tensor:
        nd = self.lat.nd
        feats = self.context_features(U)
        batch = feats.shape[: feats.dim() - nd - 1]
        out = self.net(feats.reshape(-1, *feats.shape[-(nd + 1) :]))
        return out.movedim(1, -1).reshape(*batch, -1, out.shape[1])  # (*B, V_local, n_out)

    def _couple(self, U: torch.Tensor, inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        nd, lat = self.lat.nd, self.lat
        P = plaquette(U, lat, self.mu, self.nu).flatten(-(nd + 2), -3)
        idx = self.active_idx
        Pa = P.index_select(-3, idx)
        pa = self._params(U).index_select(-2, idx).to(Pa.real.dtype)
        P2, logj = self._spectral(Pa, self.kernel, pa, inverse)
        Umu = link(U, lat, self.mu)
        flat = Umu.flatten(-(nd + 2), -3)
        # U_mu(x) <- P' P^dag U_mu(x): the active loop (where U_mu(x) stands first) becomes P'
        new = P2 @ dagger(Pa) @ flat.index_select(-3, idx)
        Umu2 = flat.index_copy(-3, idx, new).reshape(Umu.shape)
        axis = U.dim() - (nd + 3)
        out = U.index_copy(axis, torch.tensor([self.mu], device=U.device), Umu2.unsqueeze(axis))
        logdet = (logj * self.active_interior.to(logj.dtype)).sum(-1)
        return out, (-logdet if inverse else logdet)

    def forward(self, U: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.host_ready(U):
            return self._forward_host(U)
        if self.checkpoint_activations and torch.is_grad_enabled():
            # keep only the layer's input for backward and recompute its insides (plaquettes,
            # context CNN, eigen-decompositions): memory per layer ~ one link field
            return checkpoint(self._couple, U, False, use_reentrant=False)
        return self._couple(U, False)

    # ---- host kernels (backend: host; 4D SU(3), NCP kernel; kernels/flow_sun.cpp) --------
    def host_ready(self, U: torch.Tensor) -> bool:
        """True when the forward runs as the fused C++ layer: ``backend: host``, a CPU field,
        4D SU(3), the NCP interval kernel, circular padding (one rank, or a decomposed local
        array whose halos the flow has filled), parameters of the field's precision."""
        if getattr(self.lat, "backend", "torch") != "host" or U.device.type != "cpu":
            return False
        if self.group.name != "su3" or self.lat.nd != 4 or self.net.pad_fn is not circular_pad_nd:
            return False
        if type(self.kernel) is not IntervalNCPKernel or self.kernel.n_components > 16:
            return False
        if U.dtype not in (torch.complex128, torch.complex64) or self.net.kernel_size > 15:
            return False
        return all(p.dtype == real_dtype(U.dtype) for p in self.net.parameters())

    def _host_plan(self) -> Any:
        if self._plan is None:
            from hpcflow.kernels.flow_sun import layer_plan_of

            self._plan = layer_plan_of(
                self.lat.shape, cast(torch.Tensor, self.frozen).cpu(),
                cast(torch.Tensor, self.active_idx).cpu(),
                cast(torch.Tensor, self.active_interior).cpu().to(torch.float64), self.mu, self.nu,
                len(self.net.convs), self.net.kernel_size, self._period)
        return self._plan

    def lanes_spec(self) -> Any:
        """This layer for :func:`hpcflow.kernels.flow_sun.sun_flow`."""
        from hpcflow.kernels.flow_sun import LayerSpec

        return LayerSpec(self._host_plan(), self.kernel.n_components, self.kernel.s_max)

    def conv_params(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Weights and biases of the context CNN's convolutions, in order."""
        ws = [cast(torch.Tensor, c.weight) for c in self.net.convs]
        bs = [cast(torch.Tensor, c.bias) for c in self.net.convs]
        return ws, bs

    def _lanes_apply(self, Ut: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from hpcflow.kernels.flow_sun import sun_flow

        ws, bs = self.conv_params()
        return sun_flow(Ut, [self.lanes_spec()], [ws], [bs])

    def forward_lanes(self, Ut: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward on the host kernels' lanes layout (:func:`hpcflow.kernels.flow_sun.to_lanes`):
        ``(Ut', logdet[nchunk, W])``."""
        if self.checkpoint_activations and torch.is_grad_enabled():
            return checkpoint(self._lanes_apply, Ut, use_reentrant=False)
        return self._lanes_apply(Ut)

    def _forward_host(self, U: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = SUNSpectralCoupling.fused_walk([self], U)
        assert out is not None
        return out

    @staticmethod
    def _on_lanes(layers: Sequence[SUNSpectralCoupling], U: torch.Tensor,
                  walk: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """``walk`` (lanes field -> ``(field', logdet[nchunk, W])``) on ``U[*B, 4, *shape, 3, 3]``,
        converting it once at each end: ``(U', logdet[*B])``."""
        from hpcflow.kernels.flow_sun import from_lanes, lanes, to_lanes

        lat = layers[0].lat
        event = U.shape[U.dim() - (lat.nd + 3):]
        batch = U.shape[: U.dim() - (lat.nd + 3)]
        Ub = U.reshape(-1, *event)
        n = Ub.shape[0]
        Ut, total = walk(to_lanes(Ub, lanes(real_dtype(U.dtype))))
        return from_lanes(Ut, n, lat.shape).reshape(U.shape), total.reshape(-1)[:n].reshape(batch)

    @staticmethod
    def fused_walk(layers: Sequence[Bijection], U: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Forward of ``layers`` in order on the lanes layout, converting ``U`` once at each
        end: ``(U', sum of log-dets)``; ``None`` unless every layer is :meth:`host_ready`.
        :meth:`hpcflow.flows.base.Flow.forward` calls it (when no hook runs between layers)."""
        if not layers or not all(isinstance(la, SUNSpectralCoupling) and la.host_ready(U)
                                 for la in layers):
            return None
        sl = [la for la in layers if isinstance(la, SUNSpectralCoupling)]

        def walk(Ut: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if any(la.checkpoint_activations for la in sl) and torch.is_grad_enabled():
                # activation checkpointing: one recomputed node per layer
                total: torch.Tensor | None = None
                for layer in sl:
                    Ut, ld = layer.forward_lanes(Ut)
                    total = ld if total is None else total + ld
                assert total is not None
                return Ut, total
            # one node for all layers, in place on one field
            from hpcflow.kernels.flow_sun import sun_flow

            params = [la.conv_params() for la in sl]
            # Ut is this walk's temporary and from_lanes the only consumer of the output
            return sun_flow(Ut, [la.lanes_spec() for la in sl], [w for w, _ in params],
                            [b for _, b in params], own=True)

        return SUNSpectralCoupling._on_lanes(sl, U, walk)

    def host_inverse_ready(self, U: torch.Tensor) -> bool:
        """True when the inverse runs on the host kernels: :meth:`host_ready` and no gradient
        to build (the host inverse has no backward; path gradients take the torch path)."""
        if not self.host_ready(U):
            return False
        return not (torch.is_grad_enabled()
                    and (U.requires_grad or any(p.requires_grad for p in self.parameters())))

    @staticmethod
    def fused_inverse_walk(layers: Sequence[Bijection], U: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Inverse of :meth:`fused_walk`: ``layers`` (in the flow's order) walked back on the
        lanes layout, ``(U_in, sum of the inverses' log-dets)``; ``None`` unless every layer is
        :meth:`host_inverse_ready`. :meth:`hpcflow.flows.base.Flow.inverse` calls it (when no
        hook runs between layers): ``log q`` of a given field for about a forward's cost."""
        if not layers or not all(isinstance(la, SUNSpectralCoupling) and la.host_inverse_ready(U)
                                 for la in layers):
            return None
        from hpcflow.kernels.flow_sun import sun_flow_inverse

        sl = [la for la in layers if isinstance(la, SUNSpectralCoupling)]
        params = [la.conv_params() for la in sl]
        with torch.no_grad():
            return SUNSpectralCoupling._on_lanes(
                sl, U, lambda Ut: sun_flow_inverse(Ut, [la.lanes_spec() for la in sl],
                                                   [w for w, _ in params], [b for _, b in params],
                                                   own=True))

    def inverse(self, U: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.host_inverse_ready(U):
            out = SUNSpectralCoupling.fused_inverse_walk([self], U)
            assert out is not None
            return out
        # frozen loops are unchanged by the layer, so the context is recomputed exactly
        return self._couple(U, True)


# ---- the theory and the flow ------------------------------------------------------------
class SUNTheory(GaugeTheory):
    """SU(N) on link matrices ``U[*B, nd, *lat.shape, N, N]``; product Haar prior; the state
    is the link field (``to_links`` / ``from_links`` are the identity up to the dtype)."""

    inner = 2

    def __init__(self, lat: Lattice, group: Group | str, comm: Comm | None = None) -> None:
        super().__init__(lat, get_group(group) if isinstance(group, str) else group, comm)

    def make_prior(self) -> HaarPriorSUN:
        return HaarPriorSUN(self.lat, self.group)

    def action(self, U: torch.Tensor, beta: float) -> torch.Tensor:
        """Wilson action ``-(beta/N) sum Re tr P``, shape ``(*B)`` (4D SU(3), ``backend: host``,
        local arrays below ``SIMD_MIN_SITES_4D`` sites: the plaquette sum on the flow's host
        kernels, one node with an analytic backward, ~2x the harness plaquette kernel there;
        larger arrays keep the SIMD plaquette/staple kernels, faster than a layout round trip)."""
        from hpcflow.kernels.host import SIMD_MIN_SITES_4D

        if self.host_observables(U) and math.prod(self.lat.shape) < SIMD_MIN_SITES_4D:
            from hpcflow.kernels.flow_sun import plaquette_sum

            return -(float(beta) / 3.0) * self.comm.sum(plaquette_sum(U, self.lat.interior()))
        return wilson_action(U, self.lat, beta, self.comm)

    def observables(self, U: torch.Tensor) -> dict[str, torch.Tensor]:
        """``plaquette`` ``(1/N) <Re tr P>`` and ``Q``: the unsmoothed clover charge in 4D; in 2D
        SU(N) has no topological sectors (pi_1(SU(N)) = 0), so ``Q = 0`` identically."""
        plaq = average_plaquette(U, self.lat, self.comm)
        if self.host_observables(U):
            from hpcflow.kernels.flow_sun import clover_charge

            # the same charge on the host kernels (equal to rounding; one C++ call)
            return {"plaquette": plaq,
                    "Q": self.comm.sum(clover_charge(U, self.lat.interior()))}
        if self.lat.nd == 4:
            from hpcflow.lattice.observables import topological_charge_clover

            return {"plaquette": plaq, "Q": topological_charge_clover(U, self.lat, self.comm)}
        return {"plaquette": plaq, "Q": torch.zeros_like(plaq)}

    def host_observables(self, U: torch.Tensor) -> bool:
        """4D SU(3) on the CPU with ``backend: host``: the clover charge by the host kernel."""
        return (self.lat.nd == 4 and self.group.name == "su3" and U.device.type == "cpu"
                and U.dtype in (torch.complex128, torch.complex64)
                and getattr(self.lat, "backend", "torch") == "host")

    def to_links(self, U: torch.Tensor) -> torch.Tensor:
        return U

    def from_links(self, U: torch.Tensor) -> torch.Tensor:
        return U


class SUNGaugeFlow(GaugeFlow):
    """The :class:`GaugeFlow` of :class:`SUNTheory` (``SUNGaugeFlow(lat, group, layers, arch)``)."""

    def __init__(self, lat: Lattice, group: Group | str, layers: Sequence[Bijection],
                 arch: dict[str, Any]) -> None:
        super().__init__(lat, SUNTheory(lat, group), layers, arch)


def build_sun_flow(
    flow_cfg: Any, lat: Lattice, group: Group | str, dtype: torch.dtype = torch.float64,
    pad_fn: PadFnNd = circular_pad_nd,
) -> SUNGaugeFlow:
    """The SU(2)/SU(3) flow of the config's ``flow:`` section (layer order: :func:`layer_plan`).

    ``dtype``: parameter precision, ``torch.float64`` (links complex128) or ``torch.float32``
    (complex64); the complex dtypes are accepted as synonyms.
    """
    n_layers = check_flow_config(flow_cfg, dtype,
                                 (torch.float64, torch.float32, torch.complex128, torch.complex64))
    g = get_group(group) if isinstance(group, str) else group
    if g.name not in ("su2", "su3"):
        raise ValueError(f"group must be 'su2' or 'su3' for SU(N) flows, got {g.name!r}")
    if lat.nd not in (2, 4):
        raise ValueError(f"lattice.shape {list(lat.global_shape)}: SU(N) flows need a 2D or 4D lattice")
    plan = layer_plan(lat.nd, n_layers)
    bad = sorted({nu for _, nu, _ in plan if mask_period(lat.global_shape[nu]) == 0})
    if bad:
        raise ValueError(
            f"lattice.shape {list(lat.global_shape)} does not fit the SU(N) coupling masks: the "
            f"extents of directions {bad} must be even (mask period 4, or 2)"
        )
    layers = [
        SUNSpectralCoupling(
            lat, g, mu, nu, off,
            make_interval_kernel(str(flow_cfg.kernel), int(flow_cfg.n_components), int(flow_cfg.n_knots)),
            tuple(flow_cfg.hidden), int(flow_cfg.kernel_size),
            bool(getattr(flow_cfg, "checkpoint_activations", False)), pad_fn,
        )
        for mu, nu, off in plan
    ]
    arch = flow_architecture(flow_cfg, lat, g.name, layer="spectral")
    return SUNGaugeFlow(lat, g, layers, arch).to(real_dtype(dtype))
