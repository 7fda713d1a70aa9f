"""Training diagnostics of 2D U(1) flows against the exact finite-volume results.

For a batch of proposals ``phi ~ q`` with ``log q`` (density w.r.t. ``d theta`` on
``[0, 2pi)^{2V}``, :class:`hpcflow.flows.prior.HaarPriorU1`) and ``S = -beta sum cos P``:

* ``kl_gap = mean(log q + S) + log Z = KL(q || p) >= 0`` (nats), with ``log Z`` exact
  (:func:`hpcflow.analysis.exact.u1_2d_log_z`, same measure); ``kl_gap_error`` is the
  standard error of that batch mean. Zero iff ``q = p``.
* the charge ``Q`` of every proposal (:func:`hpcflow.flows.u1.u1_topological_charge`) and
  its sector fractions ``q_hist`` against the exact ``P(Q)`` (``q_exact``,
  :func:`hpcflow.analysis.exact.u1_2d_charge_distribution`), with the total variation
  ``q_tv = (1/2) sum_Q |f_Q - P(Q)|`` (for a perfect sampler ``E q_tv ~ sum_Q sqrt(P(1-P)
  / 2 pi B)``, not zero);
* ``q_weighted``: the self-normalised importance weights ``W_i = w_i / sum w``,
  ``log w = -S - log q``, summed per sector; it estimates ``P(Q)`` whenever ``q`` covers
  ``p`` (``q_tv_weighted`` against the exact one);
* ``ess`` (:func:`hpcflow.analysis.reweighting.ess`) and the independence-Metropolis
  acceptance ``sum_i W_i mean_{j != i} min(1, w_j / w_i)`` (the estimate of
  :func:`hpcflow.flows.train.acceptance_estimate`), split by the sector of the chain's state
  ``x_i``: ``acceptance_by_q`` (acceptance while in sector ``Q``) and ``tunnel_rate`` (the
  probability per step of accepting a proposal of another sector).

The exact distribution and ``log Z`` are cached per ``(beta, volume)``, so a call on
``B = 64`` proposals of a ``16 x 16`` lattice costs a few ms after the first.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from hpcflow.analysis.exact import u1_2d_charge_distribution, u1_2d_log_z
from hpcflow.analysis.reweighting import ess
from hpcflow.analysis.topology import as_charges
from hpcflow.flows.u1 import u1_topological_charge
from hpcflow.lattice.geometry import Lattice

__all__ = ["exact_u1_reference", "u1_diagnostics"]

# sectors listed: at least those holding all but this much of the exact mass
_LIST_TAIL = 1e-4


@functools.lru_cache(maxsize=64)
def exact_u1_reference(beta: float, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, float]:
    """``(q, P(q), log Z)`` of 2D U(1) at ``beta`` on the periodic ``shape`` torus (cached)."""
    vol = int(shape[0]) * int(shape[1])
    q, p = u1_2d_charge_distribution(float(beta), volume=vol)
    q.setflags(write=False)
    p.setflags(write=False)
    return q, p, u1_2d_log_z(float(beta), volume=vol)


@functools.lru_cache(maxsize=16)
def _lattice(shape: tuple[int, int]) -> Lattice:
    return Lattice(shape)


def _num(x: float) -> float | None:
    """A JSON number (``None`` for NaN or infinities)."""
    x = float(x)
    return x if math.isfinite(x) else None


def _pairs(q: np.ndarray, v: np.ndarray) -> list[list[float]]:
    return [[int(a), float(b)] for a, b in zip(q, v)]


def _sum_min_ratio(lw: np.ndarray) -> np.ndarray:
    """``sum_{j != i} min(1, exp(lw_j - lw_i))`` for every ``i`` in ``O(B log B)``: sorted
    ascending, the ``j`` below ``i`` give ``exp(logsumexp(lw_<) - lw_i)`` (a running
    ``logaddexp``) and every ``j`` above (ties included) gives 1."""
    n = lw.size
    order = np.argsort(lw, kind="stable")
    ls = lw[order]
    below = np.empty(n)
    below[0] = 0.0
    if n > 1:
        below[1:] = np.exp(np.logaddexp.accumulate(ls)[:-1] - ls[1:])
    out = np.empty(n)
    out[order] = below + (n - 1 - np.arange(n))
    return out


def u1_diagnostics(
    phi: torch.Tensor | None, log_q: torch.Tensor, S: torch.Tensor, beta: float,
    shape: Sequence[int], *, q: torch.Tensor | np.ndarray | None = None,
) -> dict[str, Any]:
    """Diagnostics of a batch of U(1) flow proposals (module docstring), JSON-serialisable.

    ``phi``: link angles ``[B, 2, L0, L1]`` of the whole (global, halo-free) lattice, the
    layout of :class:`hpcflow.flows.u1.U1Theory`; ``log_q``, ``S``: ``[B]``; ``shape``:
    ``(L0, L1)``. ``q`` (``[B]``) replaces ``phi`` when the charges are known already (e.g.
    from ``theory.observables`` on a decomposed lattice). Keys: ``beta``, ``shape``,
    ``batch``, ``loss`` (``mean(log q + S)``), ``log_z``, ``kl_gap``, ``kl_gap_error``,
    ``ess``, ``acceptance``, ``tunnel_rate``, ``q2`` / ``q2_weighted`` / ``q2_exact``
    (``<Q^2>`` of the proposals, reweighted, exact), ``q_hist``, ``q_weighted``, ``q_exact``
    (lists of ``[Q, value]`` over the same sectors), ``q_tv``, ``q_tv_weighted``,
    ``acceptance_by_q`` (``[Q, acceptance]`` for the sectors present in the batch).
    Non-finite numbers become ``None``.
    """
    shp = tuple(int(x) for x in shape)
    if len(shp) != 2:
        raise ValueError(f"shape must be (L0, L1) of a 2D lattice, got {tuple(shape)}")
    lq = log_q.detach().to(torch.float64).reshape(-1).cpu().numpy()
    s = S.detach().to(torch.float64).reshape(-1).cpu().numpy()
    if lq.size != s.size or lq.size == 0:
        raise ValueError(f"log_q and S must hold one entry per proposal, got {lq.size} and {s.size}")
    if q is None:
        if phi is None:
            raise ValueError("give phi or q")
        if tuple(phi.shape[-3:]) != (2, *shp):
            raise ValueError(f"phi must have shape [B, 2, {shp[0]}, {shp[1]}], got {tuple(phi.shape)}")
        with torch.no_grad():
            # float64: a float32 charge sums 2V rounded angles and misses integers by ~1e-6
            q = u1_topological_charge(phi.detach().to(torch.float64), _lattice(shp))
    qv = q.detach().cpu().numpy() if isinstance(q, torch.Tensor) else np.asarray(q)
    qs = as_charges(qv)
    if qs.size != lq.size:
        raise ValueError(f"one charge per proposal needed, got {qs.size} for {lq.size} proposals")
    b = int(lq.size)

    q_ex, p_ex, log_z = exact_u1_reference(float(beta), shp)
    logw = -(s + lq)
    loss = float(np.mean(s + lq))
    finite = bool(np.all(np.isfinite(logw)))

    # sectors listed: the exact bulk (all but _LIST_TAIL of the mass) and every observed one
    order = np.argsort(-p_ex)
    bulk = q_ex[order[: int(np.searchsorted(np.cumsum(p_ex[order]), 1 - _LIST_TAIL)) + 1]]
    qm = int(max(np.abs(bulk).max(), np.abs(qs).max()))
    sect = np.arange(-qm, qm + 1)
    p = np.zeros(sect.size)
    inside = np.abs(q_ex) <= qm
    p[q_ex[inside] + qm] = p_ex[inside]
    p_out = max(0.0, 1.0 - float(p.sum()))
    frac = np.bincount(qs + qm, minlength=sect.size) / b

    out: dict[str, Any] = {
        "beta": float(beta), "shape": list(shp), "batch": b, "loss": _num(loss),
        "log_z": float(log_z), "kl_gap": _num(loss + log_z),
        "kl_gap_error": _num(np.std(s + lq, ddof=1) / math.sqrt(b)) if b > 1 else None,
        "q2": float(np.mean(qs.astype(np.float64) ** 2)),
        "q2_exact": float(np.sum(q_ex.astype(np.float64) ** 2 * p_ex)),
        "q_hist": _pairs(sect, frac), "q_exact": _pairs(sect, p),
        "q_tv": 0.5 * (float(np.abs(frac - p).sum()) + p_out),
    }
    if not finite:
        out.update(ess=None, acceptance=None, tunnel_rate=None, q2_weighted=None,
                   q_weighted=None, q_tv_weighted=None, acceptance_by_q=[])
        return out
    lw = logw - logw.max()
    W = np.exp(lw)
    W /= W.sum()
    wfrac = np.bincount(qs + qm, weights=W, minlength=sect.size)
    # acceptance of proposal j from state i: min(1, w_j / w_i); summed over j != i, all and
    # within the state's own sector (the rest is the tunnelling part)
    total = _sum_min_ratio(lw)
    same = np.empty(b)
    present = np.unique(qs)
    for k in present:
        m = qs == k
        same[m] = _sum_min_ratio(lw[m])
    per_state = total / max(b - 1, 1)
    tunnel = (total - same) / max(b - 1, 1)
    by_q = []
    for k in present:
        m = qs == k
        wk = W[m].sum()
        by_q.append([int(k), float((W[m] * per_state[m]).sum() / wk) if wk > 0 else None])
    out.update(
        ess=_num(ess(logw, strict=False)),
        acceptance=float(np.sum(W * per_state)) if b > 1 else None,
        tunnel_rate=float(np.sum(W * tunnel)) if b > 1 else None,
        q2_weighted=float(np.sum(W * qs.astype(np.float64) ** 2)),
        q_weighted=_pairs(sect, wfrac),
        q_tv_weighted=0.5 * (float(np.abs(wfrac - p).sum()) + p_out),
        acceptance_by_q=by_q,
    )
    return out
