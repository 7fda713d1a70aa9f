"""Library entry points for flow chains: :func:`flow_chain` and :func:`mixed_chain`.

Both run the one chain engine (:class:`hpcflow.sampling.chain.Chain` over a
:class:`~hpcflow.sampling.updates.FlowUpdate` or :class:`~hpcflow.sampling.updates.MixedUpdate`,
rows kept in memory): the chain of ``hpcflow run`` / chain 0 of ``hpcflow sample`` with the
same seed, minus the files. Any flow works: one with the theory hooks (``action``,
``observables``, ``sample_counter``, ``log_prob``, ``to_links``, ``from_links``: SU(N) flows,
``DistributedFlow``) as it is, a plain U(1) flow through ``DistributedFlow(flow)``.

Random numbers (``hpcflow.rng``, counter based): proposal ``p`` is keyed on (global link,
``p``) and its accept uniform on index ``p``, step ``ACCEPT_STEP``, of ``rng`` (stream
``FLOW_STREAM`` of the seed for mixed chains); heat-bath/HMC steps of a mixed chain draw from
stream ``LOCAL_STREAM = LOCAL_STREAM_OFFSET`` keyed on the Markov step, as chain 0 of
``hpcflow sample`` does. So a chain is decomposition- and batch-size independent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from hpcflow.config import MIXED_STEPS
from hpcflow.dtypes import complex_dtype
from hpcflow.sampling.chain import Chain, MemorySink
from hpcflow.sampling.updates import (
    LOCAL_STREAM_OFFSET,
    FlowUpdate,
    HeatbathUpdate,
    HMCUpdate,
    MixedUpdate,
)

__all__ = [
    "FLOW_STREAM",
    "LOCAL_STREAM",
    "MIXED_STEPS",
    "flow_chain",
    "flow_mixed_chain",
    "metropolis_chain",
    "mixed_chain",
    "with_hooks",
]

FLOW_STREAM = 0
LOCAL_STREAM = LOCAL_STREAM_OFFSET


def with_hooks(model: Any) -> Any:
    """``model`` if it carries the theory hooks, else ``DistributedFlow(model)`` (one rank)."""
    if all(hasattr(model, h) for h in ("action", "observables", "sample_counter", "log_prob",
                                       "to_links", "from_links")):
        return model
    from hpcflow.flows.distributed import DistributedFlow

    return DistributedFlow(model)


def _serial() -> Any:
    from hpcflow.lattice.geometry import SerialComm

    return SerialComm()


def _cdtype(model: Any) -> torch.dtype:
    """The complex dtype of the model's links (U(1) flows work on real angles)."""
    dt = getattr(model, "cdtype", torch.complex128)
    if dt.is_complex:
        return dt
    return complex_dtype(dt)


def flow_chain(model: Any, beta: float, n_steps: int, batch: int, rng: Any,
               state: dict[str, Any] | None = None) -> dict[str, Any]:
    """``n_steps`` independence-Metropolis steps with flow proposals.

    Returns numpy arrays per step of the chain state (``S``, ``logq``, ``logw``, ``plaquette``,
    ``Q``), the ``accepted`` flags, and every proposal's ``logw``, ``plaquette``, ``Q``
    (``proposal_*``, for importance-sampling estimates); plus ``state`` (pass it back as
    ``state`` to continue the chain) and ``next`` (the next proposal number).
    """
    n_steps, batch = int(n_steps), int(batch)
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    m = with_hooks(model)
    upd = FlowUpdate(m, beta, rng, _serial(), batch, _cdtype(m))
    sink = MemorySink(None if state is None else {**state, "step": 0})
    with torch.no_grad():
        Chain(upd, sink, _serial(), 0, n_steps).run()
    res: dict[str, Any] = sink.arrays()
    res["state"] = upd.state()
    res["next"] = upd.p
    return res


def flow_mixed_chain(
    model: Any,
    beta: float,
    pattern: Sequence[str],
    n_cycles: int,
    seed: int,
    batch: int = 64,
    hmc_cfg: Any = None,
    n_overrelax: int = 0,
    start: str = "hot",
) -> dict[str, Any]:
    """``n_cycles`` repetitions of ``pattern`` (entries of :data:`MIXED_STEPS`, e.g.
    ``["flow", "heatbath"]``); ``hmc_cfg``: an object with ``n_steps``, ``tau``,
    ``integrator`` and optionally ``lam``. The start field (``"hot"``: Haar random from step 0
    of the local stream, ``"cold"``) is the state until the first accepted flow step or local
    update. Returns per Markov step ``kind`` (index into ``pattern``), ``accepted``, ``S``,
    ``logq``, ``logw``, ``plaquette``, ``Q``; the proposals' ``proposal_*``; ``state`` (the
    final link field), ``pattern``.
    """
    from hpcflow.lattice.groups import cold_field, random_field
    from hpcflow.rng import CounterRNG

    pat = tuple(str(k) for k in pattern)
    bad = [k for k in pat if k not in MIXED_STEPS]
    if not pat or bad:
        raise ValueError(f"mixed.pattern entries must be one of {list(MIXED_STEPS)} (at least one), "
                         f"got {bad[0] if bad else 'none'!r}")
    if "hmc" in pat and hmc_cfg is None:
        raise ValueError("mixed.pattern contains 'hmc' but no hmc config was given")
    if int(n_cycles) < 1:
        raise ValueError(f"n_cycles must be >= 1, got {n_cycles}")
    from hpcflow.lattice.groups import get_group

    m = with_hooks(model)
    # DistributedFlow of a U(1) flow carries group None (angles); its links are U(1) links
    group = get_group("u1") if m.group is None else m.group
    lat, cdtype, comm = m.lat, _cdtype(m), _serial()
    frng, lrng = CounterRNG(seed, FLOW_STREAM), CounterRNG(seed, LOCAL_STREAM)

    def start_field() -> torch.Tensor:
        if start == "hot":
            return random_field(lat, group, lrng, step=0, dtype=cdtype)
        return cold_field(lat, group, dtype=cdtype)

    flow = FlowUpdate(m, beta, frng, comm, batch, cdtype, start_field)
    local: dict[str, Any] = {}
    if "heatbath" in pat:
        local["heatbath"] = HeatbathUpdate(lat, group, beta, lrng, comm, cdtype,
                                           n_overrelax=int(n_overrelax))
    if "hmc" in pat:
        local["hmc"] = HMCUpdate(lat, group, beta, lrng, comm, cdtype, n_steps=int(hmc_cfg.n_steps),
                                 tau=float(hmc_cfg.tau), integrator=str(hmc_cfg.integrator),
                                 lam=getattr(hmc_cfg, "lam", None))
    upd = MixedUpdate(flow, pat, local)
    sink = MemorySink()
    with torch.no_grad():
        Chain(upd, sink, comm, 0, int(n_cycles) * len(pat)).run()
    res: dict[str, Any] = sink.arrays()
    res["kind"] = np.asarray([pat.index(k) for k in res["kind"]], dtype=np.int64)
    res["state"] = upd.links()
    res["pattern"] = list(pat)
    return res


def mixed_chain(model: Any, lat: Any, beta: float, pattern: Sequence[str], n_cycles: int, seed: int,
                batch: int = 64, hmc_cfg: Any = None, n_overrelax: int = 0) -> dict[str, Any]:
    """:func:`flow_mixed_chain` for a (U(1)) flow on ``lat`` (which must be the flow's lattice)."""
    if tuple(lat.shape) != tuple(model.lat.shape):
        raise ValueError(f"lat has shape {tuple(lat.shape)}, the flow {tuple(model.lat.shape)}")
    return flow_mixed_chain(model, beta, pattern, n_cycles, seed, batch, hmc_cfg, n_overrelax)


def metropolis_chain(
    model: Any,
    lat: Any,
    beta: float,
    n_steps: int,
    batch: int,
    rng: Any,
    state: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``n_steps`` independence-Metropolis steps with proposals of a U(1) flow on ``lat``:
    :func:`hpcflow.sampling.flow_chains.flow_chain` (the one chain engine) for a plain flow.

    Returns numpy arrays per step of the chain state (``S``, ``logq``, ``logw``,
    ``plaquette``, ``Q``), the ``accepted`` flags, and the proposals' ``logw``, ``plaquette``,
    ``Q`` (``proposal_*``, for importance-sampling estimates), plus ``state`` and ``next``.
    """
    if tuple(lat.shape) != tuple(model.lat.shape):
        raise ValueError(f"lat has shape {tuple(lat.shape)}, the flow {tuple(model.lat.shape)}")
    return flow_chain(model, beta, n_steps, batch, rng, state=state)
