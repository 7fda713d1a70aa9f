"""Pure (MPI-free) maps between a global field and a rank's halo-padded local array.

``local_from_global`` is the reference the parallel tests compare against: the local array
of a rank, halos included, is the global field read at the (periodically wrapped) global
coordinates of every array site, which :meth:`Lattice.global_coords` already provides.
"""

from __future__ import annotations

import torch

from hpcflow.lattice.geometry import Lattice

__all__ = ["check_field", "local_from_global", "place_interior"]


def check_field(f: torch.Tensor, lat: Lattice, inner: int, name: str = "field") -> None:
    """Raise ``ValueError`` unless ``f`` has the site extents ``lat.shape`` before ``inner`` dims."""
    if not isinstance(f, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(f).__name__}")
    if inner < 0:
        raise ValueError(f"inner must be >= 0, got {inner}")
    nd = lat.nd
    if f.dim() < nd + inner:
        raise ValueError(
            f"{name} has shape {tuple(f.shape)}: need at least {nd + inner} dims "
            f"({nd} site dims of {lat.shape} then {inner} inner dims)"
        )
    sites = tuple(f.shape[f.dim() - inner - nd : f.dim() - inner])
    if sites != tuple(lat.shape):
        raise ValueError(
            f"{name} has site extents {sites} (shape {tuple(f.shape)}, inner={inner}) but "
            f"the local lattice needs {tuple(lat.shape)}"
        )


def _axis_coords(lat: Lattice, d: int, device: torch.device) -> torch.Tensor:
    start = lat.origin[d] - (lat.halo if d in lat.padded_dims else 0)
    return torch.remainder(
        torch.arange(start, start + lat.shape[d], device=device), lat.global_shape[d]
    )


def local_from_global(g: torch.Tensor, lat: Lattice, inner: int = 2) -> torch.Tensor:
    """The local array (halos included) of the rank described by ``lat``, read from the
    global field ``g`` of site extents ``lat.global_shape`` (``inner`` trailing dims)."""
    check_field(g, Lattice(lat.global_shape), inner, "global field")
    out = g
    for d in range(lat.nd):
        axis = g.dim() - inner - lat.nd + d
        out = out.index_select(axis, _axis_coords(lat, d, g.device))
    return out


def place_interior(
    g: torch.Tensor, local: torch.Tensor, lat: Lattice, inner: int = 2
) -> torch.Tensor:
    """Write the interior of ``local`` into the global field ``g`` in place (and return ``g``)."""
    check_field(local, lat, inner, "local field")
    sl = [slice(None)] * g.dim()
    for d in range(lat.nd):
        axis = g.dim() - inner - lat.nd + d
        sl[axis] = slice(lat.origin[d], lat.origin[d] + lat.local_shape[d])
    g[tuple(sl)] = local[lat.interior_slices(inner)]
    return g
