"""Markov-chain updates behind one protocol: heat bath, HMC, flow independence Metropolis, mixed.

Every chain of hpcflow (``hpcflow run``, ``hpcflow sample``, the library's ``flow_chain`` /
``mixed_chain``) is an :class:`Update` driven by :class:`hpcflow.sampling.chain.Chain`. An
update is built from explicit parameters (not from a config: ``hpcflow.run.chains`` does
that), holds the current configuration of one chain on the chain's (possibly
domain-decomposed) lattice, and knows nothing of files:

* ``start(state)``: begin from a checkpoint state (``None``: a fresh start);
* ``advance(step) -> StepInfo``: one Markov step; ``step`` (1-based) is the RNG counter of
  local updates and the position in a mixed pattern;
* ``links()``: the current link field (local, halos valid);
* ``row()``: per-configuration data of the current state (``S``, ``log_q``, ``log_w``,
  ``plaquette``; flow chains also ``Q``);
* ``state()``: what a checkpoint needs to continue bit for bit (the *global* field, so a
  resume does not depend on the decomposition).

Random numbers (counter based, ``hpcflow.rng``): a chain with stream ``c`` draws heat-bath
and HMC numbers from ``CounterRNG(seed, c)`` keyed on the step; in a *mixed* chain the flow
proposals and accept draws use stream ``c`` and the local updates stream
``LOCAL_STREAM_OFFSET + c`` (so they never reuse a proposal's numbers). ``hpcflow run`` is
chain 0 of ``hpcflow sample``: the same chain, configuration for configuration.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from hpcflow.config import MIXED_STEPS  # the kinds of step a mixed.pattern may hold
from hpcflow.lattice.geometry import Comm

__all__ = [
    "LOCAL_STREAM_OFFSET",
    "FlowUpdate",
    "HMCUpdate",
    "HeatbathUpdate",
    "MixedUpdate",
    "StepInfo",
    "Update",
]

#: Local updates of mixed chain ``c`` draw from stream ``LOCAL_STREAM_OFFSET + c``.
LOCAL_STREAM_OFFSET = 2**32


@dataclass
class StepInfo:
    """What one Markov step reports: its kind, whether it was accepted, extra per-step data
    (HMC: ``dH``), and for a flow step the proposal it evaluated (``log_w``, ``plaquette``,
    ``Q``: for importance-sampling estimates over the independent proposals)."""

    kind: str
    accepted: bool
    extra: dict[str, float] = field(default_factory=dict)
    proposal: dict[str, float] | None = None


class Update(Protocol):
    """One Markov chain's update (see the module docstring)."""

    kind: str

    def start(self, state: dict[str, Any] | None) -> None: ...

    def advance(self, step: int) -> StepInfo: ...

    def links(self) -> torch.Tensor: ...

    def row(self) -> dict[str, float]: ...

    def state(self) -> dict[str, Any]: ...


def _global(comm: Comm, f: torch.Tensor, lat: Any, inner: int = 2) -> torch.Tensor:
    """The global field of a (possibly) decomposed local one, on the CPU (checkpoints)."""
    g = comm.gather_field(f, lat, inner=inner) if comm.size > 1 else f
    return g.detach().cpu().clone()


def _local(comm: Comm, g: torch.Tensor, lat: Any, inner: int = 2) -> torch.Tensor:
    if comm.size > 1:
        from hpcflow.comm.fields import local_from_global

        return local_from_global(g, lat, inner=inner)
    return g


class _LinkUpdate:
    """Common part of the updates that act on the link field itself (heat bath, HMC)."""

    kind = "local"

    def __init__(self, lat: Any, group: Any, beta: float, rng: Any, comm: Comm,
                 dtype: torch.dtype, device: torch.device | str, start: str) -> None:
        from hpcflow.lattice.groups import get_group

        self.lat, self.beta, self.rng, self.comm = lat, float(beta), rng, comm
        self.group = get_group(group) if isinstance(group, str) else group
        self.dtype, self.device, self.start_kind = dtype, torch.device(device), start
        self.U: torch.Tensor | None = None

    def start(self, state: dict[str, Any] | None) -> None:
        from hpcflow.lattice.groups import cold_field, random_field

        if state is None:
            if self.start_kind == "hot":  # step 0 of the stream: no update uses it
                self.U = random_field(self.lat, self.group, self.rng, step=0, dtype=self.dtype,
                                      device=self.device)
            else:
                self.U = cold_field(self.lat, self.group, dtype=self.dtype, device=self.device)
            return
        self.U = _local(self.comm, state["U"].to(self.dtype), self.lat).to(self.device)

    def links(self) -> torch.Tensor:
        assert self.U is not None, "start() first"
        self.U = self.comm.exchange(self.U, self.lat)  # valid halos for the measurements
        return self.U

    def row(self) -> dict[str, float]:
        from hpcflow.lattice.action import average_plaquette, wilson_action

        U = self.links()
        S = float(wilson_action(U, self.lat, self.beta, comm=self.comm))
        plaq = float(average_plaquette(U, self.lat, comm=self.comm))
        return {"S": S, "log_q": math.nan, "log_w": math.nan, "plaquette": plaq}

    def state(self) -> dict[str, Any]:
        assert self.U is not None, "start() first"
        return {"U": _global(self.comm, self.U, self.lat)}


class HeatbathUpdate(_LinkUpdate):
    """One heat-bath sweep followed by ``n_overrelax`` overrelaxation sweeps per step."""

    kind = "heatbath"

    def __init__(self, lat: Any, group: Any, beta: float, rng: Any, comm: Comm, dtype: torch.dtype,
                 device: torch.device | str = "cpu", start: str = "hot", n_overrelax: int = 0) -> None:
        super().__init__(lat, group, beta, rng, comm, dtype, device, start)
        self.n_overrelax = int(n_overrelax)

    def step_links(self, U: torch.Tensor, step: int) -> tuple[torch.Tensor, bool, dict[str, float]]:
        from hpcflow.sampling.heatbath import heatbath_or_sweep

        return (heatbath_or_sweep(U, self.lat, self.group, self.beta, self.rng, step, self.n_overrelax,
                                  comm=self.comm), True, {})

    def advance(self, step: int) -> StepInfo:
        assert self.U is not None, "start() first"
        self.U, acc, extra = self.step_links(self.U, step)
        return StepInfo(self.kind, acc, extra)


class HMCUpdate(_LinkUpdate):
    """One HMC trajectory per step (``hpcflow.sampling.hmc.HMC``); reports ``dH``."""

    kind = "hmc"

    def __init__(self, lat: Any, group: Any, beta: float, rng: Any, comm: Comm, dtype: torch.dtype,
                 device: torch.device | str = "cpu", start: str = "hot", n_steps: int = 10,
                 tau: float = 1.0, integrator: str = "omelyan", lam: float | None = None) -> None:
        from hpcflow.sampling.hmc import HMC, OMELYAN_LAMBDA

        super().__init__(lat, group, beta, rng, comm, dtype, device, start)
        self.hmc = HMC(lat, self.group, beta, n_steps, tau, integrator, rng, comm=comm,
                       lam=OMELYAN_LAMBDA if lam is None else lam)

    def step_links(self, U: torch.Tensor, step: int) -> tuple[torch.Tensor, bool, dict[str, float]]:
        U, acc, dH = self.hmc.trajectory(U, step)
        # exp(-dH) overflows a float for dH < -709 (a hot start of a large lattice): inf then
        return U, bool(acc), {"dH": float(dH), "exp_mdH": math.exp(-float(dH)) if float(dH) > -709.0 else math.inf}

    def advance(self, step: int) -> StepInfo:
        assert self.U is not None, "start() first"
        self.U, acc, extra = self.step_links(self.U, step)
        return StepInfo(self.kind, acc, extra)


LocalStep = Callable[[torch.Tensor, int], "tuple[torch.Tensor, bool, dict[str, float]]"]


class FlowUpdate:
    """Independence Metropolis with flow proposals (Kanwar et al. 2020; ALGORITHMS.md).

    ``model`` provides the theory hooks (``sample_counter``, ``action``, ``observables``,
    ``log_prob``, ``to_links``, ``from_links``, ``lat``, ``inner``, ``cdtype``): a
    ``DistributedFlow`` (one rank or a worker group of several, each on its sub-lattice).
    Flow step number ``p`` (0-based over the chain) uses proposal ``p``: prior draws keyed on
    (global link, ``p``) and the accept uniform at index ``p``, step ``ACCEPT_STEP``, of
    ``rng``; accept with ``min(1, w'/w)``, ``log w = -S - log q``. Proposals are evaluated in
    batches aligned to multiples of ``batch`` (proposal ``p`` lies in batch ``p // batch``
    whatever the stop/resume history), so a resumed chain evaluates every proposal in the same
    forward pass as an uninterrupted one: bit-identical. ``S`` and ``log q`` are global sums,
    identical on every rank, so the ranks of a group take the same decision. The very first
    state of a chain is its first proposal (``log w0 = -inf``: exact from there on).

    :meth:`local_step` applies a link update (heat bath, HMC) to the current state for a
    :class:`MixedUpdate`; afterwards the state did not come from the flow and its ``log q`` is
    recomputed by the inverse flow (``model.log_prob``) when it is needed.
    """

    kind = "flow"

    def __init__(self, model: Any, beta: float, rng: Any, comm: Comm, batch: int,
                 cdtype: torch.dtype = torch.complex128,
                 start_field: Callable[[], torch.Tensor] | None = None) -> None:
        self.model, self.beta, self.rng, self.comm = model, float(beta), rng, comm
        self.cdtype = cdtype
        self.lat = model.lat
        self.batch = int(batch)
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        self._start_field = start_field
        self.x: torch.Tensor | None = None  # current state in the model's variables (local)
        self.cur: dict[str, float] = {}
        self.p = 0  # next proposal number
        self._buf: dict[str, torch.Tensor] = {}
        self._buf_first = -1

    def _inner(self) -> int:
        """Trailing non-lattice axes of the model's variables (decomposed models know it)."""
        return int(self.model.inner) if self.comm.size > 1 else 2

    @torch.no_grad()
    def _proposal(self, p: int) -> int:
        from hpcflow.sampling.metropolis import ACCEPT_STEP

        first = p - p % self.batch
        if self._buf_first != first:
            x, logq = self.model.sample_counter(self.rng, first, self.batch)
            S = self.model.action(x, self.beta)
            obs = self.model.observables(x)
            self._buf = {"x": x, "S": S.to(torch.float64), "log_q": logq.to(torch.float64),
                         "log_w": (-S - logq).to(torch.float64),
                         "plaquette": obs["plaquette"].to(torch.float64),
                         "Q": obs["Q"].to(torch.float64),
                         # accept uniforms of the batch's proposals in one counter-based draw
                         # (element p - first equals the draw for index p alone)
                         "u": self.rng.uniform(torch.arange(first, first + self.batch), ACCEPT_STEP, 1)[:, 0]}
            self._buf_first = first
        return p - first

    @torch.no_grad()
    def _current_logw(self) -> float:
        assert self.x is not None
        if math.isnan(self.cur["log_q"]):
            lq = float(self.model.log_prob(self.x[None])[0])
            self.cur["log_q"], self.cur["log_w"] = lq, -self.cur["S"] - lq
        return self.cur["log_w"]

    def start(self, state: dict[str, Any] | None) -> None:
        if state is None:
            return
        x = state["x"]
        if x is not None:
            x = _local(self.comm, x.to(self.model.cdtype), self.lat, inner=self._inner())
        self.x = x
        self.cur = {k: float(v) for k, v in state["cur"].items()}
        self.p = int(state["p"])

    @torch.no_grad()
    def advance(self, step: int) -> StepInfo:
        from hpcflow.sampling.metropolis import independence_walk

        j = self._proposal(self.p)
        u = self._buf["u"][j : j + 1]
        lw0 = -math.inf if self.x is None else self._current_logw()
        _, accepted = independence_walk(self._buf["log_w"][j : j + 1], lw0, u)
        acc = bool(accepted[0])
        prop = {k: float(self._buf[k][j]) for k in ("log_w", "plaquette", "Q")}
        if acc:
            self.x = self._buf["x"][j].clone()
            self.cur = {k: float(self._buf[k][j]) for k in ("S", "log_q", "log_w", "plaquette", "Q")}
        self.p += 1
        return StepInfo("flow", acc, {}, prop)

    @torch.no_grad()
    def local_step(self, kind: str, fn: LocalStep, step: int) -> StepInfo:
        if self.x is None:
            assert self._start_field is not None, "a mixed chain needs a start field"
            self.x = self.model.from_links(self._start_field())
        U, acc, extra = fn(self.links(), step)
        self.x = self.model.from_links(U)
        S = self.model.action(self.x, self.beta)
        obs = self.model.observables(self.x)
        self.cur = {"S": float(S), "log_q": math.nan, "log_w": math.nan,
                    "plaquette": float(obs["plaquette"]), "Q": float(obs["Q"])}
        return StepInfo(kind, acc, extra)

    def links(self) -> torch.Tensor:
        assert self.x is not None, "no state yet: advance() first"
        return self.model.to_links(self.x).to(self.cdtype)

    def row(self) -> dict[str, float]:
        assert self.x is not None, "no state yet: advance() first"
        self._current_logw()
        return dict(self.cur)

    def state(self) -> dict[str, Any]:
        x = None if self.x is None else _global(self.comm, self.x, self.lat, inner=self._inner())
        return {"x": x, "cur": dict(self.cur), "p": self.p}


class MixedUpdate:
    """A fixed cyclic ``pattern`` of flow steps and link updates (Kanwar et al. 2020 suggest
    mixing): Markov step ``s`` (1-based) is ``pattern[(s - 1) % len(pattern)]``. Every kind
    leaves ``exp(-S)/Z`` invariant, so the pattern does. ``local`` maps ``"heatbath"`` /
    ``"hmc"`` to a link update (:class:`HeatbathUpdate` / :class:`HMCUpdate` on the same
    lattice, with their own RNG stream); its ``step_links(U, s)`` runs on the flow's state."""

    kind = "mixed"

    def __init__(self, flow: FlowUpdate, pattern: Sequence[str], local: dict[str, Any]) -> None:
        pat = tuple(str(k) for k in pattern)
        if not pat or any(k not in MIXED_STEPS for k in pat):
            raise ValueError(f"mixed.pattern must be a non-empty list of {list(MIXED_STEPS)}, "
                             f"got {list(pattern)}")
        for k in set(pat) - {"flow"}:
            if k not in local:
                raise ValueError(f"mixed.pattern contains {k!r} but no {k} update was given")
        self.flow, self.pattern, self.local = flow, pat, local

    def start(self, state: dict[str, Any] | None) -> None:
        self.flow.start(state)

    def advance(self, step: int) -> StepInfo:
        kind = self.pattern[(step - 1) % len(self.pattern)]
        if kind == "flow":
            return self.flow.advance(step)
        return self.flow.local_step(kind, self.local[kind].step_links, step)

    def links(self) -> torch.Tensor:
        return self.flow.links()

    def row(self) -> dict[str, float]:
        return self.flow.row()

    def state(self) -> dict[str, Any]:
        st = self.flow.state()
        for upd in self.local.values():
            st["rng_local"] = upd.rng.state_dict()
        return st
