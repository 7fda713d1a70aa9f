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

from typing import Any

import numpy as np
import torch

from hpcflow.analysis.reweighting import ess

__all__ = [
    "ACCEPT_STEP",
    "chain_summary",
    "independence_walk",
]

ACCEPT_STEP = 1


def independence_walk(logw_prop: torch.Tensor, logw0: float, uniforms: torch.Tensor):
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


def chain_summary(res: dict[str, Any], n_therm: int = 0) -> dict[str, Any]:
    """Acceptance, ESS, and Gamma-method means/errors/tau_int of plaquette and Q^2."""
    from hpcflow.analysis import gamma_method

    out: dict[str, Any] = {
        "n_steps": len(res["accepted"]),
        "n_therm": int(n_therm),
        "acceptance": float(np.mean(res["accepted"][n_therm:])),
        "ess_per_proposal": ess(res["proposal_logw"]),
    }
    obs = {"plaquette": res["plaquette"][n_therm:], "Q": res["Q"][n_therm:],
           "Q2": res["Q"][n_therm:] ** 2}
    for name, x in obs.items():
        g = gamma_method(np.asarray(x, dtype=np.float64))
        out[name] = {"mean": float(g.mean), "error": float(g.error),
                     "tau_int": float(g.tau_int), "tau_int_error": float(g.tau_int_error)}
    return out
