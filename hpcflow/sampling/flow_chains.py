"""Independence-Metropolis and mixed chains for flows that carry their theory (SU(N) flows).

The U(1) drivers (:mod:`hpcflow.sampling.metropolis`, :mod:`hpcflow.sampling.mixed`) work on
angle fields and the U(1) action. A flow built by :func:`hpcflow.flows.sun.build_sun_flow`
carries the hooks these drivers need instead: ``model.action(U, beta)``,
``model.observables(U) -> {plaquette, Q}``, ``model.group``, ``model.to_links`` /
``model.from_links``. Random numbers follow the same layout as the U(1) drivers, so a chain is
decomposition- and batch-size independent and resumes bit for bit:

* proposal ``p``: prior draws keyed on (global link, ``p``) (``model.sample_counter``), accept
  uniform at index ``p``, step :data:`ACCEPT_STEP`, stream :data:`FLOW_STREAM`;
* heat bath / HMC: ``CounterRNG(seed, LOCAL_STREAM)`` keyed on the chain's update number.

Every update leaves ``p = exp(-S)/Z`` invariant (independence Metropolis for any ``q`` with full
support, heat bath, HMC), so any fixed cyclic pattern of them does too (Kanwar et al. 2020
suggest mixing). After a local update the state did not come from the flow: its ``log q``
is recomputed by running the flow backwards (``model.log_prob``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from hpcflow.sampling.metropolis import ACCEPT_STEP, metropolis_accept

__all__ = [
    "FLOW_STREAM",
    "LOCAL_STREAM",
    "MIXED_STEPS",
    "flow_chain",
    "flow_mixed_chain",
    "theory_proposals",
]

FLOW_STREAM = 0
LOCAL_STREAM = 1
MIXED_STEPS = ("flow", "heatbath", "hmc")
_KEYS = ("S", "logq", "logw", "plaquette", "Q")


def _check_model(model: Any) -> None:
    missing = [h for h in ("action", "observables", "sample_counter", "log_prob") if not hasattr(model, h)]
    if missing:
        raise TypeError(f"model must provide the theory hooks {missing} (an SU(N) flow from "
                        f"build_sun_flow), got {type(model).__name__}")


@torch.no_grad()
def theory_proposals(model: Any, beta: float, rng: Any, first: int, batch: int) -> dict[str, torch.Tensor]:
    """Proposals ``first..first+batch-1``: field ``U``, ``S``, ``log q``, ``log w = -S - log q``
    and the model's observables."""
    U, logq = model.sample_counter(rng, first, batch)
    s = model.action(U, beta)
    return {"U": U, "S": s, "logq": logq, "logw": -s - logq, **model.observables(U)}


def flow_chain(
    model: Any, beta: float, n_steps: int, batch: int, rng: Any, first: int = 0,
    state: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``n_steps`` independence-Metropolis steps with flow proposals (same output as
    :func:`hpcflow.sampling.metropolis.metropolis_chain`, state field under ``U``).

    Returns per chain step ``S, logq, logw, plaquette, Q`` and ``accepted``; per proposal
    ``proposal_logw, proposal_plaquette, proposal_Q``; ``state`` and ``next``.
    """
    _check_model(model)
    n_steps, batch = int(n_steps), int(batch)
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    out: dict[str, list] = {k: [] for k in _KEYS + ("accepted", "proposal_logw",
                                                    "proposal_plaquette", "proposal_Q")}
    cur = dict(state) if state is not None else None
    p, done = int(first), 0
    while done < n_steps:
        nb = min(batch, n_steps - done)
        prop = theory_proposals(model, beta, rng, p, nb)
        u = rng.uniform(torch.arange(p, p + nb), ACCEPT_STEP, 1)[:, 0]
        logw0 = -math.inf if cur is None else float(cur["logw"])
        idx, acc = metropolis_accept(prop["logw"], logw0, u)
        for k in _KEYS:
            v = prop[k].detach().to(torch.float64).cpu().numpy()
            prev = np.nan if cur is None else float(cur[k])
            out[k].append(np.where(idx >= 0, v[np.maximum(idx, 0)], prev))
        out["accepted"].append(acc)
        for k in ("logw", "plaquette", "Q"):
            out["proposal_" + k].append(prop[k].detach().to(torch.float64).cpu().numpy())
        if idx[-1] >= 0:
            j = int(idx[-1])
            cur = {k: prop[k][j].detach().clone() for k in ("U",) + _KEYS}
        p += nb
        done += nb
    res: dict[str, Any] = {k: np.concatenate(v) for k, v in out.items()}
    res["state"] = cur
    res["next"] = p
    return res


def flow_mixed_chain(
    model: Any,
    beta: float,
    pattern: Sequence[str],
    n_cycles: int,
    seed: int,
    U0: torch.Tensor | None = None,
    batch: int = 64,
    hmc_cfg: Any = None,
    n_overrelax: int = 0,
    first_update: int = 0,
    first_proposal: int = 0,
) -> dict[str, Any]:
    """``n_cycles`` repetitions of ``pattern`` (e.g. ``["flow", "heatbath"]``; entries from
    :data:`MIXED_STEPS`). ``U0``: starting field (default: a Haar-random one); ``hmc_cfg``: object
    with ``n_steps``, ``tau``, ``integrator``. Returns per elementary update ``kind`` (index into
    ``pattern``), ``accepted``, ``S``, ``plaquette``, ``Q``; plus ``state``, ``next_update``,
    ``next_proposal``.
    """
    from hpcflow.rng import CounterRNG
    from hpcflow.sampling.heatbath import heatbath_or_sweep
    from hpcflow.sampling.hmc import HMC

    _check_model(model)
    pat = tuple(str(x) for x in pattern)
    if not pat or any(x not in MIXED_STEPS for x in pat):
        raise ValueError(f"mixed.pattern must be a non-empty list of {list(MIXED_STEPS)}, got {list(pattern)}")
    if int(n_cycles) < 1:
        raise ValueError(f"n_cycles must be >= 1, got {n_cycles}")
    lat, group = model.lat, model.group
    flow_rng, local_rng = CounterRNG(seed, FLOW_STREAM), CounterRNG(seed, LOCAL_STREAM)
    hmc = None
    if "hmc" in pat:
        if hmc_cfg is None:
            raise ValueError("mixed.pattern contains 'hmc' but no hmc config was given")
        hmc = HMC(lat, group, float(beta), int(hmc_cfg.n_steps), float(hmc_cfg.tau),
                  str(hmc_cfg.integrator), rng=local_rng)
    # a proposal number no flow step reaches: the Haar start never collides with a proposal
    U = model.prior.sample_counter(local_rng, 2**40, 1, dtype=model.cdtype)[0] if U0 is None \
        else model.from_links(U0)
    buf: dict[str, torch.Tensor] | None = None
    buf_first = p = int(first_proposal)
    t = int(first_update)
    logw_cur: float | None = None
    rows: dict[str, list] = {k: [] for k in ("kind", "accepted", "S", "plaquette", "Q")}
    with torch.no_grad():
        for _ in range(int(n_cycles)):
            for k, kind in enumerate(pat):
                if kind == "flow":
                    if buf is None or p - buf_first >= batch:
                        buf, buf_first = theory_proposals(model, beta, flow_rng, p, batch), p
                    if logw_cur is None:
                        logw_cur = float(-model.action(U, beta) - model.log_prob(U[None])[0])
                    j = p - buf_first
                    lw = float(buf["logw"][j])
                    u = float(flow_rng.uniform(torch.tensor([p]), ACCEPT_STEP, 1)[0, 0])
                    acc = bool(math.log(u) < lw - logw_cur)
                    if acc:
                        U, logw_cur = buf["U"][j].clone(), lw
                    p += 1
                elif kind == "heatbath":
                    links = heatbath_or_sweep(model.to_links(U), lat, group, float(beta), local_rng, t,
                                              int(n_overrelax))
                    U, acc, logw_cur = model.from_links(links), True, None
                else:
                    links, acc, _ = hmc.trajectory(model.to_links(U), t)
                    U, logw_cur = model.from_links(links), None
                t += 1
                obs = model.observables(U)
                for key, v in zip(rows, (k, bool(acc), float(model.action(U, beta)),
                                         float(obs["plaquette"]), float(obs["Q"]))):
                    rows[key].append(v)
    res: dict[str, Any] = {k: np.asarray(v) for k, v in rows.items()}
    res.update(state=U, next_update=t, next_proposal=p, pattern=list(pat))
    return res
