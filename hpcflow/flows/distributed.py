"""Domain-decomposed flows: every coupling layer runs on the halo-padded local sub-lattice.

:class:`DistributedFlow` wraps a flow built by :func:`hpcflow.flows.build.build_flow` (U(1) or
SU(N)) so that a lattice too large for one device is transformed by many ranks at once, each
holding its sub-lattice plus a halo. Before each layer the halos are filled by
``comm.exchange(x, lat, width=layer.halo)`` (autograd-aware: the backward sends halo gradients
to their owners), the *unchanged* layer runs on the padded local array, and only its interior
is trusted. This is exact because of the receptive field of a layer:

* a plaquette at ``x`` reads links at ``x``, ``x + mu``, ``x + nu`` (reach 1);
* the context CNN (``n`` convolutions of size ``k``) reads features within
  ``n (k - 1) / 2`` sites (:attr:`ContextCNN.reach` / :attr:`LatticeCNN.reach`);
* the updated link at ``x`` reads its active plaquette and the context at ``x``;

so the new interior links depend only on links within ``layer.halo = reach + 1`` sites. The
CNN's circular padding and ``Lattice.shift`` wrap garbage only into the outer halo layers of the
padded array, never into the interior (DESIGN.md, "Fields and geometry"). The width is
*derived* from each layer (:attr:`DistributedFlow.widths`), never guessed; the parallel tests
show that one layer less changes the result.

Masks and parities come from global coordinates (``lat.global_coords()``), so each layer's
local copy updates exactly the links the single-rank layer updates. Log-dets and actions are
local interior sums followed by one ``comm.sum`` (rank-ordered, bitwise identical on every
rank; backward = identity), so ``log q``, ``S`` and the loss are the same number on every rank
of a domain, and Metropolis decisions never diverge. Prior draws are ``CounterRNG`` draws keyed
by (proposal, global link), hence a domain of any shape produces the configurations a single
rank produces with the same seed. A single rank uses the same code with a trivial grid
(``SerialComm`` or a 1x...x1 :class:`hpcflow.comm.LatticeComm`: no halos, exchange = identity).

Parameter gradients after ``backward`` are each rank's *partial* gradients (its sub-lattice's
share); :func:`sum_gradients` adds them over the ranks with any ``sum`` (the domain's
``comm.sum``, or :meth:`hpcflow.comm.hybrid.HybridGrid.sum_all` over replicas x domains).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from types import SimpleNamespace
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from hpcflow.lattice.geometry import Lattice, SerialComm

__all__ = ["DistributedFlow", "local_flow", "sum_gradients"]


def local_flow(flow: torch.nn.Module, lat: Lattice) -> torch.nn.Module:
    """The same flow (architecture from ``flow.arch``, parameters from ``flow.state_dict()``)
    rebuilt on the local lattice ``lat``.

    The layer constructors derive every lattice-dependent quantity (masks, active rows,
    interior weights) from **global** coordinates of ``lat``, so each local layer updates
    exactly the links its single-rank twin updates. The caller's torch RNG is left untouched.
    """
    from hpcflow.flows.build import build_flow

    arch = dict(flow.arch)
    ck = any(bool(getattr(layer, "checkpoint_activations", False)) for layer in flow.layers)
    cfg = SimpleNamespace(**arch, checkpoint_activations=ck)
    with torch.random.fork_rng(devices=[]):
        new = build_flow(cfg, lat, arch["group"], dtype=flow.dtype)
    new.load_state_dict(flow.state_dict())
    return new.to(next(flow.parameters()).device)


def sum_gradients(params: Iterable[torch.nn.Parameter], sum_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Replace every ``p.grad`` by its sum over ranks: one flat buffer, one ``sum_fn`` call."""
    ps = [p for p in params if p.grad is not None]
    if not ps:
        return
    flat = sum_fn(torch.cat([p.grad.reshape(-1) for p in ps]))
    i = 0
    for p in ps:
        p.grad.copy_(flat[i : i + p.numel()].view_as(p))
        i += p.numel()


class DistributedFlow(torch.nn.Module):
    """``DistributedFlow(flow, comm=None, checkpoint_layers=False, pad_all=False)``: ``flow`` on
    sub-lattices.

    ``flow``: a ``U1GaugeFlow`` or ``SUNGaugeFlow`` (its parameters are copied; build it on any
    lattice of the same global shape, e.g. ``Lattice(global_shape)``). ``comm``: the domain's
    :class:`hpcflow.comm.LatticeComm` (``None``: one rank, ``SerialComm``). The local lattice
    :attr:`lat` has ``max(widths)`` halo layers on the decomposed dimensions.
    ``checkpoint_layers``: recompute each layer's activations in the backward pass (the halo
    exchange itself is not recomputed), trading compute for activation memory. ``pad_all``:
    halos on every dimension, also undecomposed ones (exchange = periodic copy there); one rank
    then runs the full halo machinery, which tests use.

    Fields are local padded arrays: U(1) angles ``(B, 2, *lat.shape)``, SU(N) links
    ``(B, nd, *lat.shape, N, N)``. Every field this class returns has valid halos, which
    :meth:`action` and :meth:`observables` rely on (reach 1). ``log q``, ``log det``, ``S``
    and the observables are global values, the same on every rank of the domain. The
    ``state_dict`` keys are those of ``flow`` (checkpoints are interchangeable).
    """

    def __init__(
        self, flow: torch.nn.Module, comm: Any = None, checkpoint_layers: bool = False,
        pad_all: bool = False,
    ) -> None:
        super().__init__()
        from hpcflow.flows.sun import SUNGaugeFlow
        from hpcflow.flows.u1 import U1GaugeFlow

        if not isinstance(flow, (U1GaugeFlow, SUNGaugeFlow)):
            raise TypeError(f"flow must be a U1GaugeFlow or SUNGaugeFlow, got {type(flow).__name__}")
        self.comm = SerialComm() if comm is None else comm
        self.is_u1 = isinstance(flow, U1GaugeFlow)
        self.arch = dict(flow.arch)
        self.global_shape = tuple(flow.lat.global_shape)
        # U(1) works on angles (no matrix axes), SU(N) on link matrices
        self.inner = 0 if self.is_u1 else 2
        # the halo width each layer needs, from its receptive field (module docstring)
        self.widths: list[int] = [int(layer.halo) for layer in flow.layers]
        halo = max(self.widths, default=0)
        if hasattr(self.comm, "local_lattice"):
            lat = self.comm.local_lattice(self.global_shape, halo=max(halo, 1), pad_all=pad_all)
            lat = dataclasses.replace(lat, backend=flow.lat.backend)
        elif pad_all:
            raise ValueError("pad_all needs a comm with local_lattice (hpcflow.comm.LatticeComm), "
                             f"got {type(self.comm).__name__}")
        else:
            lat = Lattice(self.global_shape, backend=flow.lat.backend)
        self.lat = lat
        local = local_flow(flow, lat)
        # the local layers (and their state_dict keys) replace the single-rank ones
        self.layers = local.layers
        self.prior: Any = local.prior
        self.group = None if self.is_u1 else local.group
        self.checkpoint_layers = bool(checkpoint_layers)

    # ---- dtypes ------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        """Real dtype of the parameters (float64 or float32)."""
        return next(self.parameters()).dtype

    @property
    def cdtype(self) -> torch.dtype:
        """Dtype of the fields: the real dtype for U(1) angles, complex for SU(N) links."""
        if self.is_u1:
            return self.dtype
        return torch.complex64 if self.dtype == torch.float32 else torch.complex128

    @property
    def halo(self) -> int:
        """Halo layers of the local array (``max(widths)`` when decomposed, else 0)."""
        return self.lat.halo

    # ---- the bijection -----------------------------------------------------------------
    def _batch(self, x: torch.Tensor) -> tuple[int, ...]:
        return tuple(x.shape[: x.dim() - self.lat.nd - 1 - self.inner])

    def _exchange(self, x: torch.Tensor, width: int | None = None) -> torch.Tensor:
        if self.lat.halo == 0 or not self.lat.padded_dims or width == 0:
            return x
        return self.comm.exchange(x, self.lat, inner=self.inner, width=width)

    def _run(self, x: torch.Tensor, inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        real = torch.float32 if x.dtype in (torch.float32, torch.complex64) else torch.float64
        logdet = torch.zeros(self._batch(x), dtype=real, device=x.device)
        order = range(len(self.layers) - 1, -1, -1) if inverse else range(len(self.layers))
        for i in order:
            layer, w = self.layers[i], self.widths[i]
            x = self._exchange(x, w)
            fn = layer.inverse if inverse else layer
            if self.checkpoint_layers and torch.is_grad_enabled():
                x, ld = checkpoint(fn, x, use_reentrant=False)
            else:
                x, ld = fn(x)
            logdet = logdet + ld
        # one collective for all layers' log-dets; a full exchange leaves valid halos
        return self._exchange(x), self.comm.sum(logdet)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, log|det dx/dz|)``; the log-det is the global sum over the domain."""
        return self._run(z, inverse=False)

    def inverse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z, -log|det dx/dz|)`` (global)."""
        return self._run(x, inverse=True)

    # ---- sampling ----------------------------------------------------------------------
    def sample_counter(self, rng: Any, first: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Proposals ``first .. first+batch-1``: prior draws keyed on (proposal, global link), so
        every grid gives the same fields; returns ``(x, log q)``."""
        z = self.prior.sample_counter(rng, first, batch, dtype=self.cdtype)
        return self.push(z)

    def push(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, log q(x))`` with ``log q = log prior(z) - log det`` (the prior's log-density is
        already global: it counts the links of the whole lattice)."""
        x, logdet = self(z)
        return x, self.prior.log_prob(z) - logdet

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log q(x)`` by running the layers backwards."""
        z, logdet_inv = self.inverse(x.to(self.cdtype))
        return self.prior.log_prob(z) + logdet_inv

    # ---- theory hooks (hpcflow.sampling.flow_chains) ---------------------------------------
    def action(self, x: torch.Tensor, beta: float) -> torch.Tensor:
        """Global Wilson action, shape ``(*B)`` (``x`` with valid halos)."""
        if self.is_u1:
            from hpcflow.flows.u1 import u1_action

            return self.comm.sum(u1_action(x, self.lat, beta))
        from hpcflow.lattice.action import wilson_action

        return wilson_action(x, self.lat, beta, self.comm)

    def observables(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Global ``plaquette`` and ``Q`` as the single-rank flows define them."""
        if self.is_u1:
            from hpcflow.flows.u1 import plaquette_angles, u1_topological_charge

            cos_sum = self.lat.interior_sum(torch.cos(plaquette_angles(x, self.lat)))
            plaq = self.comm.sum(cos_sum) / self.lat.volume
            return {"plaquette": plaq, "Q": self.comm.sum(u1_topological_charge(x, self.lat))}
        from hpcflow.lattice.action import average_plaquette

        plaq = average_plaquette(x, self.lat, self.comm)
        if self.lat.nd == 4:
            from hpcflow.lattice.observables import topological_charge_clover

            return {"plaquette": plaq, "Q": topological_charge_clover(x, self.lat, self.comm)}
        return {"plaquette": plaq, "Q": torch.zeros_like(plaq)}

    def to_links(self, x: torch.Tensor) -> torch.Tensor:
        """Link matrices of a state (U(1): ``exp(i theta)`` with ``1 x 1`` matrix axes)."""
        if self.is_u1:
            from hpcflow.flows.u1 import links_from_angles

            return links_from_angles(x)
        return x

    def from_links(self, U: torch.Tensor) -> torch.Tensor:
        if self.is_u1:
            from hpcflow.flows.u1 import angles_from_links

            return angles_from_links(U).to(self.dtype)
        return U.to(self.cdtype)

    def __repr__(self) -> str:
        return (f"DistributedFlow({'u1' if self.is_u1 else self.group.name}, global {list(self.global_shape)}, "
                f"local {list(self.lat.local_shape)}, halo {self.lat.halo}, widths {self.widths})")
