"""Gauge transformations: ``U_mu(x) -> g(x) U_mu(x) g(x+mu)^dag``.

Gauge-invariant quantities (traces of closed loops, the action, the topological charge) must
not change under these; gauge-equivariant flows must commute with them. Both properties are
tested with :func:`random_gauge`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from hpcflow.lattice.geometry import Lattice
from hpcflow.lattice.groups import Group, batched_index, dagger, draw_normals

__all__ = ["gauge_transform", "gauge_transform_site", "random_gauge"]


def random_gauge(
    lat: Lattice,
    group: Group,
    rng: Any,
    step: int = 0,
    batch: Sequence[int] | int = (),
    dtype: torch.dtype = torch.complex128,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Haar-random gauge transformation ``g(x)``, shape ``(*batch, *lat.shape, N, N)``.

    ``rng``: a ``CounterRNG`` (site ``x`` of configuration ``b`` uses counter
    ``b * V + site(x)`` at ``step``; use a step or stream not shared with the link draws)
    or a ``torch.Generator``.
    """
    index = batched_index(lat.global_site_index(device), lat.volume, batch)
    normals = draw_normals(rng, index, step, group.n_haar_normals)
    return group.haar(normals).to(dtype)


def gauge_transform(u: torch.Tensor, g: torch.Tensor, lat: Lattice) -> torch.Tensor:
    """``U_mu(x) -> g(x) U_mu(x) g(x + mu)^dag`` for a link field ``(*B, nd, *shape, N, N)``.

    ``g`` is a site matrix field ``(*B, *shape, N, N)`` (its batch dims broadcast).
    """
    nd = lat.nd
    if g.dim() < nd + 2 or tuple(g.shape[-(nd + 2) : -2]) != tuple(lat.shape):
        raise ValueError(
            f"g must have shape (*B, {', '.join(map(str, lat.shape))}, N, N), "
            f"got {tuple(g.shape)}"
        )
    g_fwd = torch.stack([lat.shift(g, mu) for mu in range(nd)], dim=-(nd + 3))
    return g.unsqueeze(-(nd + 3)) @ u @ dagger(g_fwd)


def gauge_transform_site(m: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Site matrix field (e.g. an untraced loop based at ``x``): ``M(x) -> g(x) M(x) g(x)^dag``."""
    return g @ m @ dagger(g)
