"""Independence Metropolis with flow proposals, and reweighted estimates.

Proposals ``U' ~ q`` are drawn in large batches (one forward pass each); the accept/reject
walk over them is cheap and sequential (ALGORITHMS.md): with ``log w = -S - log q``, accept
``U'`` with probability ``min(1, exp(log w' - log w))``; on reject the chain repeats its state.
The chain is exact for any ``q`` with full support, whatever the model quality.

Random numbers come from a ``CounterRNG``: proposal ``p`` draws link ``l`` at Philox index
``p * n_links + l`` at step 0 (see :meth:`HaarPriorU1.sample_counter`), and the accept
uniform of proposal ``p`` is drawn at index ``p``, step ``ACCEPT_STEP = 1`` (a counter no
proposal uses), so the chain does not depend on the batch size either; it is the same on
any process grid and resumes bit for bit from ``(state, next proposal number)``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpcflow.flows.u1 import u1_action, u1_mean_cos_plaquette, u1_topological_charge
from hpcflow.lattice.geometry import Lattice

__all__ = [
    "ACCEPT_STEP",
    "chain_summary",
    "ess_fraction",
    "flow_proposals",
    "metropolis_accept",
    "metropolis_chain",
    "reweighted_mean",
    "reweighted_mean_error",
    "write_history",
]

ACCEPT_STEP = 1


def ess_fraction(logw: np.ndarray) -> float:
    """``ESS/N = exp(2 LSE(log w) - LSE(2 log w)) / N`` of importance weights (PHYSICS.md)."""
    logw = np.asarray(logw, dtype=np.float64)
    m = logw.max()
    a = np.log(np.exp(logw - m).sum()) + m
    b = np.log(np.exp(2 * (logw - m)).sum()) + 2 * m
    return float(np.exp(2 * a - b) / len(logw))


def reweighted_mean(obs: np.ndarray, logw: np.ndarray) -> float:
    """``<O> = sum w O / sum w`` with ``w = exp(log w)`` (self-normalised importance sampling)."""
    return reweighted_mean_error(obs, logw)[0]


def reweighted_mean_error(obs: np.ndarray, logw: np.ndarray) -> tuple[float, float]:
    """Self-normalised importance-sampling mean and its delta-method error
    ``sqrt(sum w^2 (O - <O>)^2) / sum w`` (independent proposals)."""
    logw = np.asarray(logw, dtype=np.float64)
    o = np.asarray(obs, dtype=np.float64)
    w = np.exp(logw - logw.max())
    mean = float((w * o).sum() / w.sum())
    return mean, float(np.sqrt((w**2 * (o - mean) ** 2).sum()) / w.sum())


def metropolis_accept(logw_prop: torch.Tensor, logw0: float, uniforms: torch.Tensor):
    """Walk an independence-Metropolis chain over proposals with ``log w`` = ``logw_prop``.

    Returns ``(index, accepted)``: ``index[i]`` is the proposal the chain sits on after step
    ``i`` (``-1`` = still the incoming state), ``accepted[i]`` whether step ``i`` accepted.
    Accept iff ``log u < log w' - log w``, i.e. with probability ``min(1, w'/w)``.
    """
    lw = logw_prop.detach().to(torch.float64).cpu().numpy()
    logu = np.log(uniforms.detach().to(torch.float64).cpu().numpy())
    n = len(lw)
    index = np.empty(n, dtype=np.int64)
    accepted = np.empty(n, dtype=bool)
    cur, cur_lw = -1, float(logw0)
    for i in range(n):
        acc = logu[i] < lw[i] - cur_lw
        if acc:
            cur, cur_lw = i, lw[i]
        index[i] = cur
        accepted[i] = acc
    return index, accepted


@torch.no_grad()
def flow_proposals(model: Any, lat: Lattice, beta: float, rng: Any, first: int, batch: int,
                   action=None) -> dict[str, torch.Tensor]:
    """Proposals ``first..first+batch-1``: angles, ``S``, ``log q``, ``log w`` and observables."""
    theta, logq = model.sample_counter(rng, first, batch)
    s = action(theta) if action is not None else u1_action(theta, lat, beta)
    return {
        "theta": theta,
        "S": s,
        "logq": logq,
        "logw": -s - logq,
        "plaquette": u1_mean_cos_plaquette(theta, lat),
        "Q": u1_topological_charge(theta, lat),
    }


def metropolis_chain(
    model: Any,
    lat: Lattice,
    beta: float,
    n_steps: int,
    batch: int,
    rng: Any,
    first: int = 0,
    state: dict[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Run ``n_steps`` independence-Metropolis steps with flow proposals.

    ``rng``: a ``CounterRNG``; ``first``: number of the first proposal (continuation);
    ``state``: the incoming chain state ``{theta, S, logq, plaquette, Q}`` (default: the
    first proposal is accepted unconditionally, which is exact after that step for an
    independence sampler). Returns numpy arrays per step of the chain state (``S``, ``logq``,
    ``logw``, ``plaquette``, ``Q``), the ``accepted`` flags, and the proposals' ``logw``,
    ``plaquette``, ``Q`` (``proposal_*``, for importance-sampling estimates), plus ``state``
    and ``next`` (the next proposal number).
    """
    n_steps, batch = int(n_steps), int(batch)
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    keys = ("S", "logq", "logw", "plaquette", "Q")
    extra = ("accepted", "proposal_logw", "proposal_plaquette", "proposal_Q")
    out: dict[str, list] = {k: [] for k in keys + extra}
    cur = dict(state) if state is not None else None
    p = int(first)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_steps, desc="flow chain", dynamic_ncols=True)
    done = 0
    while done < n_steps:
        nb = min(batch, n_steps - done)
        prop = flow_proposals(model, lat, beta, rng, p, nb)
        u = rng.uniform(torch.arange(p, p + nb), ACCEPT_STEP, 1)[:, 0]
        logw0 = -math.inf if cur is None else float(cur["logw"])
        idx, acc = metropolis_accept(prop["logw"], logw0, u)
        for k in keys:
            v = prop[k].detach().to(torch.float64).cpu().numpy()
            prev = np.nan if cur is None else float(cur[k])
            out[k].append(np.where(idx >= 0, v[np.maximum(idx, 0)], prev))
        out["accepted"].append(acc)
        for k in ("logw", "plaquette", "Q"):
            out["proposal_" + k].append(prop[k].detach().to(torch.float64).cpu().numpy())
        if idx[-1] >= 0:
            j = int(idx[-1])
            cur = {k: prop[k][j].detach().clone() for k in ("theta",) + keys}
        p += nb
        done += nb
        if bar is not None:
            bar.update(nb)
    if bar is not None:
        bar.close()
    res: dict[str, Any] = {k: np.concatenate(v) for k, v in out.items()}
    res["state"] = cur
    res["next"] = p
    return res


def chain_summary(res: dict[str, Any], n_therm: int = 0) -> dict[str, Any]:
    """Acceptance, ESS, and Gamma-method means/errors/tau_int of plaquette and Q^2."""
    from hpcflow.analysis import gamma_method

    out: dict[str, Any] = {
        "n_steps": len(res["accepted"]),
        "n_therm": int(n_therm),
        "acceptance": float(np.mean(res["accepted"][n_therm:])),
        "ess_per_proposal": ess_fraction(res["proposal_logw"]),
    }
    obs = {"plaquette": res["plaquette"][n_therm:], "Q": res["Q"][n_therm:],
           "Q2": res["Q"][n_therm:] ** 2}
    for name, x in obs.items():
        g = gamma_method(np.asarray(x, dtype=np.float64))
        out[name] = {"mean": float(g.mean), "error": float(g.error),
                     "tau_int": float(g.tau_int), "tau_int_error": float(g.tau_int_error)}
    return out


def write_history(res: dict[str, Any], path: str | Path, first_step: int = 0) -> None:
    """One JSON line per chain step: ``step, S, logq, logw, accepted, plaquette, Q``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fh.writelines(json.dumps({
                "step": first_step + i,
                "S": float(res["S"][i]),
                "logq": float(res["logq"][i]),
                "logw": float(res["logw"][i]),
                "accepted": bool(res["accepted"][i]),
                "plaquette": float(res["plaquette"][i]),
                "Q": float(res["Q"][i]),
            }) + "\n" for i in range(len(res["accepted"])))
