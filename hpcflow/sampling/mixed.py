"""Mixed chains: flow independence-Metropolis steps interleaved with heat-bath sweeps or HMC
trajectories in one exact Markov chain (the next step suggested by Kanwar et al. 2020).

Each update leaves ``p = exp(-S)/Z`` invariant, so any fixed cyclic pattern of them does too.
The flow step needs ``log q`` of the *current* state; after a local update that state did not
come from the flow, so ``log q`` is recomputed by running the flow backwards
(:meth:`U1GaugeFlow.log_prob`). Random numbers: flow proposals and their accept draws from
``CounterRNG(seed, FLOW_STREAM)`` keyed on the proposal number; heat bath / HMC from
``CounterRNG(seed, LOCAL_STREAM)`` keyed on the chain's update number, so no draw is reused.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from hpcflow.flows.u1 import (
    angles_from_links,
    links_from_angles,
    u1_action,
    u1_mean_cos_plaquette,
    u1_topological_charge,
)
from hpcflow.lattice.geometry import Lattice
from hpcflow.sampling.metropolis import ACCEPT_STEP, flow_proposals

__all__ = ["FLOW_STREAM", "LOCAL_STREAM", "MIXED_STEPS", "mixed_chain"]

FLOW_STREAM = 0
LOCAL_STREAM = 1
MIXED_STEPS = ("flow", "heatbath", "hmc")


def _check_pattern(pattern: Sequence[str]) -> tuple[str, ...]:
    pat = tuple(str(p) for p in pattern)
    if not pat:
        raise ValueError("mixed.pattern must name at least one step (flow | heatbath | hmc)")
    bad = [p for p in pat if p not in MIXED_STEPS]
    if bad:
        raise ValueError(f"mixed.pattern entries must be one of {list(MIXED_STEPS)}, got {bad[0]!r}")
    return pat


def mixed_chain(
    model: Any,
    lat: Lattice,
    beta: float,
    pattern: Sequence[str],
    n_cycles: int,
    seed: int,
    theta0: torch.Tensor | None = None,
    batch: int = 256,
    hmc_cfg: Any = None,
    n_overrelax: int = 0,
    first_update: int = 0,
    first_proposal: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Run ``n_cycles`` repetitions of ``pattern`` (e.g. ``["flow", "heatbath"]``).

    ``theta0``: starting link angles ``(2, L0, L1)`` (default: a Haar-random field). ``hmc_cfg``: object with ``n_steps``, ``tau``, ``integrator``.
    Returns per elementary update the arrays ``kind`` (index into ``pattern``), ``accepted``,
    ``S``, ``plaquette``, ``Q``; plus ``state`` (angles), ``next_update``, ``next_proposal``.
    """
    from hpcflow.lattice.groups import get_group
    from hpcflow.rng import CounterRNG
    from hpcflow.sampling.heatbath import heatbath_or_sweep
    from hpcflow.sampling.hmc import HMC

    pat = _check_pattern(pattern)
    n_cycles = int(n_cycles)
    if n_cycles < 1:
        raise ValueError(f"n_cycles must be >= 1, got {n_cycles}")
    flow_rng = CounterRNG(seed, FLOW_STREAM)
    local_rng = CounterRNG(seed, LOCAL_STREAM)
    group = get_group("u1")
    dtype = model.dtype
    hmc = None
    if "hmc" in pat:
        if hmc_cfg is None:
            raise ValueError("mixed.pattern contains 'hmc' but no hmc config was given")
        hmc = HMC(lat, group, float(beta), int(hmc_cfg.n_steps), float(hmc_cfg.tau),
                  str(hmc_cfg.integrator), rng=local_rng)

    def measure(th: torch.Tensor) -> tuple[float, float, float]:
        return (float(u1_action(th, lat, beta)), float(u1_mean_cos_plaquette(th, lat)),
                float(u1_topological_charge(th, lat)))

    buf: dict[str, torch.Tensor] | None = None
    buf_first = p = int(first_proposal)
    t = int(first_update)
    if theta0 is None:
        theta = model.prior.sample_counter(local_rng, 2**40, 1, dtype=dtype)[0]
    else:
        theta = theta0.to(dtype)
    logw_cur: float | None = None  # -S - log q of the current state, when known
    rows: dict[str, list] = {k: [] for k in ("kind", "accepted", "S", "plaquette", "Q")}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_cycles * len(pat), desc="mixed chain", dynamic_ncols=True)
    with torch.no_grad():
        for _ in range(n_cycles):
            for k, kind in enumerate(pat):
                if kind == "flow":
                    if buf is None or p - buf_first >= batch:
                        buf, buf_first = flow_proposals(model, lat, beta, flow_rng, p, batch), p
                    if logw_cur is None:
                        logw_cur = float(-u1_action(theta, lat, beta) - model.log_prob(theta[None])[0])
                    j = p - buf_first
                    lw = float(buf["logw"][j])
                    u = float(flow_rng.uniform(torch.tensor([p]), ACCEPT_STEP, 1)[0, 0])
                    acc = bool(np.log(u) < lw - logw_cur)
                    if acc:
                        theta, logw_cur = buf["theta"][j].clone(), lw
                    p += 1
                elif kind == "heatbath":
                    U = links_from_angles(theta)
                    U = heatbath_or_sweep(U, lat, group, float(beta), local_rng, t, int(n_overrelax))
                    theta, acc, logw_cur = angles_from_links(U).to(dtype), True, None
                else:
                    U, acc, _ = hmc.trajectory(links_from_angles(theta), t)
                    theta, logw_cur = angles_from_links(U).to(dtype), None
                t += 1
                s, plaq, q = measure(theta)
                for key, v in zip(rows, (k, bool(acc), s, plaq, q)):
                    rows[key].append(v)
                if bar is not None:
                    bar.update(1)
    if bar is not None:
        bar.close()
    res: dict[str, Any] = {k: np.asarray(v) for k, v in rows.items()}
    res.update(state=theta, next_update=t, next_proposal=p, pattern=list(pat))
    return res
