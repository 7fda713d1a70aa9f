"""Gauge-equivariant U(1) flows in 2D: plaquette coupling layers (Kanwar et al. 2020).

Internally a U(1) field is a tensor of link angles ``theta[*B, mu, x0, x1]`` in [0, 2 pi);
``U = exp(i theta)`` with the ``N = 1`` matrix axes is the storage of docs/DESIGN.md
(:func:`links_from_angles`, :func:`angles_from_links` convert at the boundary).

A coupling layer (arXiv 2003.06413, Sec. III; tutorial arXiv 2101.08176) with direction
``mu`` and offset ``off`` (``nu = 1 - mu``, period 4 across ``nu``):

* updated links ``theta_mu(x)`` with ``x_nu = off mod 4``;
* **active** plaquettes ``P(x)``, ``x_nu = off``: each holds exactly one updated link, with
  sign ``s = +1`` (mu = 0: ``+theta_0(x)``) or ``s = -1`` (mu = 1: ``-theta_1(x)``);
* **passive** plaquettes ``x_nu = off - 1``: they change as a consequence;
* **frozen** plaquettes ``x_nu = off + 1, off + 2``: they hold no updated link and are the
  only input (cos, sin) of the context CNN.

The active plaquette angle goes through a circle bijection ``h`` and the link absorbs the
change: ``theta_mu(x) += s (h(theta_P) - theta_P)``. Plaquettes are gauge invariant, so
``f(g.U) = g.f(U)`` exactly, and the Jacobian is triangular:
``log det = sum_active log h'(theta_P)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from hpcflow.flows.arch import check_flow_config, flow_architecture
from hpcflow.flows.base import Bijection, GaugeFlow, GaugeTheory
from hpcflow.flows.context import ContextCNN, circular_pad
from hpcflow.flows.kernels1d import TWO_PI, CircularKernel, make_kernel
from hpcflow.flows.prior import HaarPriorU1
from hpcflow.lattice.geometry import Comm, Lattice
from hpcflow.lattice.groups import Group, get_group

__all__ = [
    "MASK_PERIOD",
    "U1GaugeFlow",
    "U1PlaquetteCoupling",
    "U1Theory",
    "angles_from_links",
    "build_u1_flow",
    "links_from_angles",
    "plaquette_angles",
    "plaquette_masks",
    "u1_action",
    "u1_mean_cos_plaquette",
    "u1_topological_charge",
]

MASK_PERIOD = 4


# ---- angle-field physics (2D U(1)) -------------------------------------------------------
def plaquette_angles(theta: torch.Tensor, lat: Lattice) -> torch.Tensor:
    """``theta_P(x) = theta_0(x) + theta_1(x+0) - theta_0(x+1) - theta_1(x)`` (not wrapped)."""
    t0, t1 = theta[..., 0, :, :], theta[..., 1, :, :]
    return t0 + lat.shift(t1, 0, inner=0) - lat.shift(t0, 1, inner=0) - t1


def u1_action(theta: torch.Tensor, lat: Lattice, beta: float) -> torch.Tensor:
    """Wilson action ``S = -beta sum_x cos theta_P(x)`` over interior sites, shape ``(*B)``."""
    return -beta * lat.interior_sum(torch.cos(plaquette_angles(theta, lat)))


def u1_mean_cos_plaquette(theta: torch.Tensor, lat: Lattice) -> torch.Tensor:
    """``<cos theta_P>`` over interior sites, shape ``(*B)`` (single lattice sum / volume)."""
    return lat.interior_sum(torch.cos(plaquette_angles(theta, lat))) / lat.local_volume


def u1_topological_charge(theta: torch.Tensor, lat: Lattice) -> torch.Tensor:
    """Geometric charge ``Q = (1/2 pi) sum_x arg P(x)``, arg in (-pi, pi] (PHYSICS.md)."""
    p = plaquette_angles(theta, lat)
    arg = math.pi - torch.remainder(math.pi - p, TWO_PI)
    return lat.interior_sum(arg) / TWO_PI


def links_from_angles(theta: torch.Tensor) -> torch.Tensor:
    """``U = exp(i theta)`` with the ``N = 1`` matrix axes: ``(*B, Nd, *shape, 1, 1)``."""
    return torch.polar(torch.ones_like(theta), theta)[..., None, None]


def angles_from_links(u: torch.Tensor) -> torch.Tensor:
    """Link angles in [0, 2 pi) of a U(1) field stored as ``(*B, Nd, *shape, 1, 1)``."""
    if u.shape[-2:] != (1, 1):
        raise ValueError(f"U(1) links must have trailing matrix shape (1, 1), got {tuple(u.shape)}")
    return torch.remainder(torch.angle(u[..., 0, 0]), TWO_PI)


# ---- masks -------------------------------------------------------------------------------
def plaquette_masks(lat: Lattice, mu: int, offset: int) -> dict[str, torch.Tensor]:
    """Bool site masks ``active``, ``passive``, ``frozen`` (plaquettes) and ``links``
    (updated ``mu``-links) from **global** coordinates, so every rank agrees."""
    if mu not in (0, 1):
        raise ValueError(f"mu must be 0 or 1, got {mu}")
    nu = 1 - mu
    r = torch.remainder(lat.global_coords()[nu] - offset, MASK_PERIOD)
    active = r == 0
    return {
        "links": active,
        "active": active,
        "passive": r == MASK_PERIOD - 1,
        "frozen": (r == 1) | (r == 2),
    }


def check_lattice_fits(lat: Lattice, kernel_size: int) -> None:
    """Clear errors for architectures that cannot act on this lattice."""
    if lat.nd != 2:
        raise ValueError(f"lattice.shape {list(lat.global_shape)}: U(1) flows need a 2D lattice")
    bad = [n for n in lat.global_shape if n % MASK_PERIOD]
    if bad:
        raise ValueError(
            f"lattice.shape {list(lat.global_shape)} does not fit the U(1) coupling masks: "
            f"every extent must be a multiple of the mask period {MASK_PERIOD}"
        )
    if (kernel_size - 1) // 2 > min(lat.shape):
        raise ValueError(
            f"flow.kernel_size {kernel_size} is wider than the lattice {list(lat.shape)}"
        )


# ---- coupling layer ----------------------------------------------------------------------
class U1PlaquetteCoupling(Bijection):
    """One gauge-equivariant plaquette coupling layer; see the module docstring."""

    def __init__(
        self,
        lat: Lattice,
        mu: int,
        offset: int,
        kernel: CircularKernel,
        hidden: Sequence[int],
        kernel_size: int,
        checkpoint_activations: bool = False,
        pad_fn=circular_pad,
    ) -> None:
        super().__init__()
        self.lat = lat
        self.mu = int(mu)
        self.offset = int(offset)
        # sign of the updated link in its active plaquette (module docstring)
        self.sign = 1.0 if self.mu == 0 else -1.0
        self.kernel = kernel
        # backend 'host' (config ``backend: host``): the C++ convolutions on the batch-last
        # layout; otherwise torch's Conv2d (any device)
        cnn_backend = "host" if getattr(lat, "backend", "torch") == "host" else "torch"
        self.net = ContextCNN(2, hidden, kernel.n_params, kernel_size, pad_fn=pad_fn,
                              backend=cnn_backend)
        if hasattr(kernel, "backend"):
            kernel.backend = cnn_backend
        self.checkpoint_activations = bool(checkpoint_activations)
        m = plaquette_masks(lat, self.mu, self.offset)
        self.register_buffer("active", m["active"].to(torch.get_default_dtype()), persistent=False)
        self.register_buffer("frozen", m["frozen"].to(torch.get_default_dtype()), persistent=False)
        # The masks depend on x_nu only and have period 4 along the site axis of nu (also on
        # a halo-padded array: global extents are multiples of 4). Active plaquettes are the
        # rows ``start::4`` of that axis; the kernel and the last convolution run on them only.
        nu = 1 - self.mu
        line = m["active"].select(self.mu, 0)
        self._axis = nu
        self._start = int(torch.nonzero(line)[0, 0])
        self._rows = (nu, self._start, MASK_PERIOD)
        sel = [slice(None), slice(None)]
        sel[nu] = slice(self._start, None, MASK_PERIOD)
        self._sel = (Ellipsis, *sel)
        # interior weights of the active rows: all ones on one rank, zero on halo sites
        interior = lat.interior()[self._sel]
        self._all_interior = bool(interior.all())
        self.register_buffer("active_interior", interior.to(torch.get_default_dtype()),
                             persistent=False)

    @property
    def halo(self) -> int:
        """Halo width this layer needs: CNN reach plus one for the plaquette's ``x + mu`` links."""
        return self.net.reach + 1

    def _params(self, plaq: torch.Tensor) -> torch.Tensor:
        """Kernel parameters ``(*B, rows, n_params)`` on the active rows, from frozen
        plaquettes only."""
        batch = plaq.shape[:-2]
        feats = torch.stack((torch.cos(plaq), torch.sin(plaq)), -3) * self.frozen
        feats = feats.reshape(-1, *feats.shape[-3:])
        if self.checkpoint_activations and torch.is_grad_enabled():
            out = checkpoint(self.net, feats, self._rows, use_reentrant=False)
        else:
            out = self.net(feats, self._rows)
        return out.movedim(-3, -1).reshape(*batch, *out.shape[-2:], out.shape[-3])

    def _update(self, theta: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Add ``s * delta`` (given on the active rows) to the updated links, mod 2 pi."""
        link = theta.select(-3, self.mu)
        new = torch.remainder(link[self._sel] + self.sign * delta, TWO_PI)
        new_mu = torch.slice_scatter(link, new, dim=self._axis - 2, start=self._start,
                                     step=MASK_PERIOD)
        parts = [theta.select(-3, 0), theta.select(-3, 1)]
        parts[self.mu] = new_mu
        return torch.stack(parts, dim=-3)

    def _logdet(self, logj: torch.Tensor) -> torch.Tensor:
        if not self._all_interior:
            logj = logj * self.active_interior
        return logj.sum(dim=(-2, -1))

    def _forward_host(self, plaq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Kernel output and log-derivative on the active rows, ``(*B, rows)`` each, with the
        context CNN (and an NCP kernel) on the host kernels' channel-first, batch-last layout
        ``[C, L0, L1, N]``: no NCHW round trip, two C++ calls per CNN and per kernel."""
        batch, sites = plaq.shape[:-2], plaq.shape[-2:]
        p = plaq.reshape(-1, *sites).permute(1, 2, 0)  # [L0, L1, N] view
        feats = torch.stack((torch.cos(p), torch.sin(p))) * self.frozen[..., None]
        if self.checkpoint_activations and torch.is_grad_enabled():
            out = checkpoint(self.net.forward_cf, feats, self._rows, use_reentrant=False)
        else:
            out = self.net.forward_cf(feats, self._rows)  # [n_params, R0, R1, N]
        x = p[self._sel[1:]]  # active plaquettes [R0, R1, N]
        new, logj = self.kernel.forward_cf(x, out)
        rows = x.shape[:2]
        new = new.permute(2, 0, 1).reshape(*batch, *rows)
        logj = logj.permute(2, 0, 1).reshape(*batch, *rows)
        return new, logj

    def forward(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        plaq = torch.remainder(plaquette_angles(theta, self.lat), TWO_PI)
        pa = plaq[self._sel]
        if self.net.backend == "host" and theta.device.type == "cpu":
            new, logj = self._forward_host(plaq)
        else:
            new, logj = self.kernel(pa, self._params(plaq))
        return self._update(theta, new - pa), self._logdet(logj)

    def inverse(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # frozen plaquettes are unchanged by the layer, so the context is recomputed exactly
        plaq = torch.remainder(plaquette_angles(theta, self.lat), TWO_PI)
        pa = plaq[self._sel]
        old, logj = self.kernel.inverse(pa, self._params(plaq))
        return self._update(theta, old - pa), -self._logdet(logj)


# ---- the theory and the flow ------------------------------------------------------------
class U1Theory(GaugeTheory):
    """U(1) on link angles ``theta[*B, nd, *lat.shape]`` (no matrix axes); uniform prior."""

    inner = 0

    def __init__(self, lat: Lattice, group: Group | None = None, comm: Comm | None = None) -> None:
        super().__init__(lat, get_group("u1") if group is None else group, comm)

    def make_prior(self) -> HaarPriorU1:
        return HaarPriorU1(self.lat)

    def action(self, x: torch.Tensor, beta: float) -> torch.Tensor:
        """``-beta sum_x cos theta_P(x)`` over the whole lattice."""
        return self.comm.sum(u1_action(x, self.lat, beta))

    def observables(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``plaquette`` ``<cos theta_P>`` and the geometric charge ``Q`` (global)."""
        cos_sum = self.lat.interior_sum(torch.cos(plaquette_angles(x, self.lat)))
        return {"plaquette": self.comm.sum(cos_sum) / self.lat.volume,
                "Q": self.comm.sum(u1_topological_charge(x, self.lat))}

    def to_links(self, x: torch.Tensor) -> torch.Tensor:
        """``exp(i theta)`` with ``1 x 1`` matrix axes."""
        return links_from_angles(x)

    def from_links(self, U: torch.Tensor) -> torch.Tensor:
        return angles_from_links(U)


class U1GaugeFlow(GaugeFlow):
    """The :class:`GaugeFlow` of :class:`U1Theory` (``U1GaugeFlow(lat, layers, arch)``)."""

    def __init__(self, lat: Lattice, layers: Sequence[Bijection], arch: dict[str, Any]) -> None:
        super().__init__(lat, U1Theory(lat), layers, arch)


def build_u1_flow(flow_cfg: Any, lat: Lattice, dtype: torch.dtype = torch.float64) -> U1GaugeFlow:
    """The flow of the config's ``flow:`` section; layer ``i`` has ``mu = i % 2``,
    ``off = (i // 2) % 4`` (8 layers update every link once; tutorial arXiv 2101.08176)."""
    n_layers = check_flow_config(flow_cfg, dtype)
    check_lattice_fits(lat, int(flow_cfg.kernel_size))
    layers = []
    for i in range(n_layers):
        kernel = make_kernel(str(flow_cfg.kernel), int(flow_cfg.n_components), int(flow_cfg.n_knots))
        layers.append(
            U1PlaquetteCoupling(
                lat, i % 2, (i // 2) % MASK_PERIOD, kernel, tuple(flow_cfg.hidden),
                int(flow_cfg.kernel_size),
                bool(getattr(flow_cfg, "checkpoint_activations", False)),
            )
        )
    return U1GaugeFlow(lat, layers, flow_architecture(flow_cfg, lat, "u1")).to(dtype)
