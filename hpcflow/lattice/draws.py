"""Counter layout and limits of the link updates' random draws, shared by the torch updates
(:mod:`hpcflow.sampling.heatbath`) and their host kernels (:mod:`hpcflow.kernels`), which
must consume exactly the same Philox counters (``hpcflow.rng``).

Heat bath: rejection round ``r`` of SU(2) subgroup ``s`` of configuration ``b`` reads the
counter index ``(b * BLOCKS_PER_CONFIG + r * n_sub + s) * nd * V + link`` (U(1): ``n_sub =
1``), so a chain is the same on any process grid and entry 0 of a batch is the unbatched
chain.
"""

from __future__ import annotations

import math

__all__ = ["BLOCKS_PER_CONFIG", "KP_ALPHA_MIN", "MAX_ROUNDS", "check_heatbath_beta"]

#: Rejection rounds; an acceptance >= ~0.3 makes 100 rounds already 1e-15.
MAX_ROUNDS = 10_000
#: Counter blocks (round, subgroup) per configuration of a batch.
BLOCKS_PER_CONFIG = 3 * MAX_ROUNDS
#: Below this ``alpha`` Creutz's method accepts better than Kennedy-Pendleton.
KP_ALPHA_MIN = 2.0


def check_heatbath_beta(beta: float) -> float:
    """``beta`` as a float; one-line ``ValueError`` unless it is finite and >= 0."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta):
        raise ValueError(f"beta must be a finite real number, got {beta!r}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0 for the heat bath, got {beta}")
    return float(beta)
