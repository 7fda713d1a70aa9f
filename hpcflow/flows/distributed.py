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

import torch

from hpcflow.flows.base import GaugeFlow
from hpcflow.lattice.geometry import Comm, Lattice, SerialComm

__all__ = ["DistributedFlow", "local_flow", "sum_gradients"]


def local_flow(flow: GaugeFlow, lat: Lattice) -> GaugeFlow:
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


class DistributedFlow(GaugeFlow):
    """``DistributedFlow(flow, comm=None, checkpoint_layers=False, pad_all=False)``: ``flow`` on
    sub-lattices.

    ``flow``: a :class:`GaugeFlow` (``U1GaugeFlow``, ``SUNGaugeFlow``; its parameters are
    copied; build it on any lattice of the same global shape, e.g. ``Lattice(global_shape)``).
    ``comm``: the domain's :class:`hpcflow.comm.LatticeComm` (``None``: one rank,
    ``SerialComm``). The local lattice :attr:`lat` has ``max(widths)`` halo layers on the
    decomposed dimensions. ``checkpoint_layers``: recompute each layer's activations in the
    backward pass (the halo exchange itself is not recomputed), trading compute for activation
    memory. ``pad_all``: halos on every dimension, also undecomposed ones (exchange = periodic
    copy there); one rank then runs the full halo machinery, which tests use.

    It is the same :class:`GaugeFlow` (same composition, prior, sampling and theory hooks) on
    the local lattice, with the flow's theory rebound to that lattice and ``comm``
    (``theory.on(lat, comm)``), plus two hooks of the composition: a halo exchange of width
    ``widths[i]`` before layer ``i``, and after the last layer a full exchange and one
    ``comm.sum`` of the log-det. Fields are local padded arrays of the theory's variables
    (U(1) angles ``(B, 2, *lat.shape)``, SU(N) links ``(B, nd, *lat.shape, N, N)``). Every
    field this class returns has valid halos, which :meth:`action` and :meth:`observables`
    rely on (reach 1). ``log q``, ``log det``, ``S`` and the observables are global values, the
    same on every rank of the domain. The ``state_dict`` keys are those of ``flow``
    (checkpoints are interchangeable).
    """

    def __init__(
        self, flow: GaugeFlow, comm: Comm | None = None, checkpoint_layers: bool = False,
        pad_all: bool = False,
    ) -> None:
        if not isinstance(flow, GaugeFlow) or isinstance(flow, DistributedFlow):
            raise TypeError(f"flow must be a U1GaugeFlow or SUNGaugeFlow, got {type(flow).__name__}")
        comm = SerialComm() if comm is None else comm
        global_shape = tuple(flow.lat.global_shape)
        # the halo width each layer needs, from its receptive field (module docstring)
        widths = [int(layer.halo) for layer in flow.layers]
        halo = max(widths, default=0)
        # SerialComm: the whole lattice without halos (and a ValueError for pad_all)
        lat = comm.local_lattice(global_shape, halo=max(halo, 1), pad_all=pad_all)
        lat = dataclasses.replace(lat, backend=flow.lat.backend)
        local = local_flow(flow, lat)
        # the local layers (and their state_dict keys) replace the single-rank ones
        super().__init__(lat, flow.theory.on(lat, comm), local.layers, flow.arch)
        self.comm = comm
        self.global_shape = global_shape
        self.widths: list[int] = widths
        self.checkpoint_layers = bool(checkpoint_layers)

    @property
    def halo(self) -> int:
        """Halo layers of the local array (``max(widths)`` when decomposed, else 0)."""
        return self.lat.halo

    # ---- the composition hooks ---------------------------------------------------------
    def _exchange(self, x: torch.Tensor, width: int | None = None) -> torch.Tensor:
        if self.lat.halo == 0 or not self.lat.padded_dims or width == 0:
            return x
        return self.comm.exchange(x, self.lat, inner=self.inner, width=width)

    def before_layer(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return self._exchange(x, self.widths[i])

    def layer_hooks_trivial(self) -> bool:
        # _exchange is the identity without halos (one rank, or no decomposed dimension)
        return self.lat.halo == 0 or not self.lat.padded_dims

    def after_layers(self, x: torch.Tensor, logdet: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # one collective for all layers' log-dets; a full exchange leaves valid halos
        return self._exchange(x), self.comm.sum(logdet)

    def __repr__(self) -> str:
        return (f"DistributedFlow({self.group.name}, global {list(self.global_shape)}, "
                f"local {list(self.lat.local_shape)}, halo {self.lat.halo}, widths {self.widths})")
