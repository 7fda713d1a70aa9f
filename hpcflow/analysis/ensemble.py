"""Statistics of a stored ensemble (``hpcflow measure``): the analysis side of
:mod:`hpcflow.io.ensemble`, which only reads."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from hpcflow.analysis.gamma import gamma_method
from hpcflow.io.ensemble import EnsembleError, open_ensemble

__all__ = ["measure_ensemble"]


def measure_ensemble(root: str | os.PathLike, chain: int | None = None) -> dict[str, dict[str, Any]]:
    """Gamma-method mean, error and tau_int of the stored per-row observables (``hpcflow measure``).

    Chains are treated as replicas. Every row is a state of an exact Markov chain, already
    distributed as ``p = exp(-S)/Z`` (a flow chain's independence-Metropolis steps included),
    so the states are averaged plainly. Importance reweighting by ``w = p/q`` is valid for
    independent proposals from ``q`` only: applied to chain states it is biased (issue 19:
    7.9 sigma on the demo's ensemble), so ``measure`` does not print it. The result is
    strict JSON: an error that cannot be computed is ``null`` with a ``"note"``.
    """
    ens = open_ensemble(root)
    chains = ens.chains if chain is None else [chain]
    out: dict[str, dict[str, Any]] = {}
    recs = [ens.records(c) for c in chains]
    recs = [r for r in recs if len(r["step"]) >= 2]
    if not recs:
        raise EnsembleError(f"{ens.root}: fewer than 2 committed configurations; nothing to measure")
    n = int(sum(len(r["step"]) for r in recs))
    for k in ("plaquette", "S", "accepted"):
        series = [np.asarray(r[k], dtype=np.float64) for r in recs]
        g = gamma_method(series if len(series) > 1 else series[0])
        entry: dict[str, Any] = {"mean": g.mean, "error": g.error, "tau_int": g.tau_int,
                                 "tau_int_error": g.tau_int_error, "n": n}
        if g.error == 0.0:
            entry.update(error=None, tau_int=None, tau_int_error=None,
                         note="constant over the chain: no fluctuation to estimate an error from")
        out["acceptance" if k == "accepted" else k] = entry
    return out
