"""Observables that need more than halos and sums on a decomposed lattice.

The Polyakov loop is an ordered product of links around the whole periodic time direction.
When time is split over ``g_t`` ranks, each rank forms the ordered product of its own
interior time slices, and :meth:`LatticeComm.ordered_product` multiplies the ``g_t``
segments in grid-coordinate order along the time line of ranks. Everything else (plaquette,
action, staples, Wilson loops, topological charge) is the ``hpcflow.lattice`` code itself
after ``comm.exchange``.
"""

from __future__ import annotations

import torch

from hpcflow.lattice.geometry import Lattice

__all__ = ["polyakov_loop"]


def polyakov_loop(u: torch.Tensor, lat: Lattice, comm) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """``(1/N) tr prod_t U_{nd-1}(xs, t)`` averaged over spatial sites, complex ``(*B)``.

    Same definition as :func:`hpcflow.lattice.observables.polyakov_loop`, valid on any
    process grid (time split or not). No halo is needed: only interior links enter.
    """
    nd = lat.nd
    t = nd - 1
    if u.dim() < nd + 3 or u.shape[-3 - nd] != nd:
        raise ValueError(
            f"u must be a link field (*B, {nd}, *{lat.shape}, N, N), got shape {tuple(u.shape)}"
        )
    ut = u.select(-3 - nd, t)[lat.interior_slices(inner=2)]
    seg = ut.select(-3, 0)
    for k in range(1, lat.local_shape[t]):
        seg = seg @ ut.select(-3, k)
    if hasattr(comm, "ordered_product"):
        full = comm.ordered_product(seg, t)
        # every rank of a time line now holds the whole loop: count it once (coordinate 0)
        first = comm.grid.coords[t] == 0
    else:  # SerialComm: the time direction is whole on this rank
        full, first = seg, True
    tr = torch.diagonal(full, dim1=-2, dim2=-1).sum(-1)
    local = tr.sum(dim=tuple(range(-(nd - 1), 0))) if nd > 1 else tr
    if not first:
        local = torch.zeros_like(local)
    n = u.shape[-1]
    return comm.sum(local) / (n * (lat.volume // lat.global_shape[t]))
