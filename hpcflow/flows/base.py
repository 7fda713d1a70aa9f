"""The bijection contract of ARCHITECTURE.md, and the one gauge flow of every theory.

``layer(x) -> (y, logdet)`` and ``layer.inverse(y) -> (x, -logdet)``, with ``logdet`` the
log-abs-determinant of the forward Jacobian per batch entry (shape ``(*B)``). A :class:`Flow`
composes bijections and sums their log-dets (as ``zuko`` / ``nflows`` do); it knows the shape
of one event, so every leading axis of a field is a batch axis.

A :class:`GaugeFlow` is a flow on the fields of a :class:`GaugeTheory`: the theory fixes the
variables (U(1): link angles ``theta[*B, nd, *lat.shape]``; SU(N): link matrices
``U[*B, nd, *lat.shape, N, N]``), the Haar prior of those variables, the action and the
observables, and the conversions to and from the link storage of docs/DESIGN.md. The flow
holds the layers and the prior and draws, pushes and evaluates ``log q``; nothing in it
depends on the group or the dimension.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from hpcflow.dtypes import complex_dtype, real_dtype
from hpcflow.lattice.geometry import Comm, Lattice, SerialComm
from hpcflow.lattice.groups import Group

__all__ = ["Bijection", "Flow", "GaugeFlow", "GaugeTheory"]


class Bijection(torch.nn.Module):
    """Base class: ``forward(x) -> (y, log|det dy/dx|)``, ``inverse(y) -> (x, -log|det|)``."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class Flow(Bijection):
    """Composition ``f = f_n o ... o f_1`` on events of shape ``event_shape``; log-dets add up
    along the chain, one per batch entry ``x.shape[:-len(event_shape)]`` (real dtype).

    Subclasses may hook into the walk: :meth:`before_layer` (e.g. a halo exchange) and
    :meth:`after_layers` (e.g. a global sum of the log-det). ``checkpoint_layers``: recompute
    each layer's activations in the backward pass (memory for compute).
    """

    def __init__(self, layers: Sequence[Bijection], event_shape: Sequence[int]) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)
        self.event_shape = tuple(int(n) for n in event_shape)
        self.checkpoint_layers = False

    def batch_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        """The batch axes of ``x``: all but the trailing event axes."""
        return tuple(x.shape[: x.dim() - len(self.event_shape)])

    def before_layer(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """Called on the input of layer ``i`` (either direction); identity here."""
        return x

    def after_layers(self, x: torch.Tensor, logdet: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Called on the output and the summed log-det; identity here."""
        return x, logdet

    def _walk(self, x: torch.Tensor, inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        logdet = torch.zeros(self.batch_shape(x), dtype=real_dtype(x.dtype), device=x.device)
        order = range(len(self.layers) - 1, -1, -1) if inverse else range(len(self.layers))
        for i in order:
            x = self.before_layer(x, i)
            fn = self.layers[i].inverse if inverse else self.layers[i]
            if self.checkpoint_layers and torch.is_grad_enabled():
                x, ld = checkpoint(fn, x, use_reentrant=False)
            else:
                x, ld = fn(x)
            logdet = logdet + ld
        return self.after_layers(x, logdet)

    def layer_hooks_trivial(self) -> bool:
        """True when :meth:`before_layer` is the identity (no halo exchange between layers):
        then the layers may run the whole forward on a layout of their own."""
        return type(self).before_layer is Flow.before_layer

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # a fused walk (SU(3) host kernels: one conversion to their layout at each end)
        if self.layers and self.layer_hooks_trivial() and not (
                self.checkpoint_layers and torch.is_grad_enabled()):
            walk = getattr(self.layers[0], "fused_walk", None)
            out = walk(self.layers, x) if walk is not None else None
            if out is not None:
                return self.after_layers(*out)
        return self._walk(x, inverse=False)

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # the fused inverse walk (SU(3) host kernels, when no gradient is needed)
        if self.layers and self.layer_hooks_trivial():
            walk = getattr(self.layers[0], "fused_inverse_walk", None)
            out = walk(self.layers, y) if walk is not None else None
            if out is not None:
                return self.after_layers(*out)
        return self._walk(y, inverse=True)


class GaugeTheory:
    """The theory a gauge flow samples: lattice ``lat``, ``group``, the variables of a field,
    their Haar ``prior``, and the hooks of the generic samplers (``action``, ``observables``,
    ``to_links``, ``from_links``).

    Sums over the lattice go through ``comm`` (``SerialComm`` on one rank; a domain's
    ``LatticeComm`` when the flow is decomposed), so ``S``, the observables and the prior are
    global values. Subclasses set :attr:`inner` (trailing matrix axes of a field) and implement
    the hooks.
    """

    #: trailing matrix axes of a field: 0 for U(1) angles, 2 for ``N x N`` link matrices
    inner: int = 2

    def __init__(self, lat: Lattice, group: Group, comm: Comm | None = None) -> None:
        self.lat = lat
        self.group = group
        self.comm: Comm = SerialComm() if comm is None else comm
        self.prior = self.make_prior()

    @property
    def name(self) -> str:
        return self.group.name

    @property
    def event_shape(self) -> tuple[int, ...]:
        """``(nd, *lat.shape)`` plus ``(N, N)`` for matrix variables."""
        return (self.lat.nd, *self.lat.shape, *([self.group.N] * self.inner))

    def on(self, lat: Lattice, comm: Comm | None = None) -> GaugeTheory:
        """The same theory on another (e.g. halo-padded local) lattice with sums over ``comm``."""
        return type(self)(lat, self.group, comm)

    def field_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """Dtype of a field for parameters of dtype ``dtype``."""
        return complex_dtype(dtype) if self.inner else real_dtype(dtype)

    def make_prior(self) -> Any:
        raise NotImplementedError

    def action(self, x: torch.Tensor, beta: float) -> torch.Tensor:
        """Global Wilson action ``S(x)``, shape ``(*B)``."""
        raise NotImplementedError

    def observables(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Global ``plaquette`` and topological charge ``Q``, shape ``(*B)`` each."""
        raise NotImplementedError

    def to_links(self, x: torch.Tensor) -> torch.Tensor:
        """Link matrices ``U[*B, nd, *shape, N, N]`` of a field."""
        raise NotImplementedError

    def from_links(self, U: torch.Tensor) -> torch.Tensor:
        """The field of link matrices ``U`` (inverse of :meth:`to_links`)."""
        raise NotImplementedError


class GaugeFlow(Flow):
    """Haar prior followed by coupling layers; ``log q(x) = log prior(z) - sum log det``.

    ``GaugeFlow(lat, theory, layers, arch)``: ``theory`` a :class:`GaugeTheory` on ``lat``;
    ``arch`` what a checkpoint records to recognise the model. The ``state_dict`` holds the
    layers only (``layers.<i>.*``). Sampling interface: :meth:`sample` (torch generator,
    training), :meth:`sample_counter` (counter RNG, chains), :meth:`push`, :meth:`log_prob`;
    theory hooks for the generic samplers: :meth:`action`, :meth:`observables`,
    :meth:`to_links`, :meth:`from_links`, :attr:`group`, :attr:`inner`, :attr:`cdtype`.
    """

    def __init__(self, lat: Lattice, theory: GaugeTheory, layers: Sequence[Bijection],
                 arch: dict[str, Any]) -> None:
        super().__init__(layers, theory.event_shape)
        self.lat = lat
        self.theory = theory
        self.prior: Any = theory.prior
        self.arch = dict(arch)

    @property
    def group(self) -> Group:
        return self.theory.group

    @property
    def inner(self) -> int:
        """Trailing matrix axes of a field (0: U(1) angles; 2: SU(N) links)."""
        return self.theory.inner

    @property
    def halo(self) -> int:
        """Halo width for running all layers on one exchanged field (sum of per-layer halos)."""
        return sum(getattr(layer, "halo", 0) for layer in self.layers)

    @property
    def dtype(self) -> torch.dtype:
        """Real dtype of the parameters (float64 or float32)."""
        return next(self.parameters()).dtype

    @property
    def cdtype(self) -> torch.dtype:
        """Dtype of the fields: the real dtype for U(1) angles, complex for SU(N) links."""
        return self.theory.field_dtype(self.dtype)

    @property
    def link_dtype(self) -> torch.dtype:
        """Complex dtype of the link matrices (:meth:`to_links`), for every theory."""
        return complex_dtype(self.dtype)

    # ---- sampling ----------------------------------------------------------------------
    def sample(self, batch: int, generator: torch.Generator | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, log q)`` for ``batch`` proposals drawn with a torch generator."""
        return self.push(self.prior.sample(batch, generator, dtype=self.cdtype))

    def sample_counter(self, rng: Any, first: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Proposals ``first .. first+batch-1``: prior draws keyed on (proposal, global link),
        so every process grid gives the same fields; returns ``(x, log q)``."""
        return self.push(self.prior.sample_counter(rng, first, batch, dtype=self.cdtype))

    def push(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, log q(x))`` with ``log q = log prior(z) - log det``."""
        x, logdet = self(z)
        return x, self.prior.log_prob(z) - logdet

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log q(x)`` by running the layers backwards (needed for non-flow states)."""
        z, logdet_inv = self.inverse(x.to(self.cdtype))
        return self.prior.log_prob(z) + logdet_inv

    # ---- theory hooks (hpcflow.sampling) -----------------------------------------------
    def action(self, x: torch.Tensor, beta: float) -> torch.Tensor:
        """Wilson action of the theory, shape ``(*B)``."""
        return self.theory.action(x, beta)

    def observables(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"plaquette", "Q"}`` of the theory, shape ``(*B)`` each."""
        return self.theory.observables(x)

    def to_links(self, x: torch.Tensor) -> torch.Tensor:
        return self.theory.to_links(x)

    def from_links(self, U: torch.Tensor) -> torch.Tensor:
        return self.theory.from_links(U).to(self.cdtype)
