"""Shared test helpers: small lattices, random fields and gauge transformations, checks.

Import as ``from tests.helpers import ...`` (pytest is run from the repository root).
All generators are seeded ``torch.Generator`` objects so every test is reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hpcflow.lattice.gauge import random_gauge
from hpcflow.lattice.geometry import Lattice, SerialComm
from hpcflow.lattice.groups import Group, dagger, get_group, random_field

__all__ = [
    "GROUPS",
    "SMALL_SHAPES",
    "PeriodicHaloComm",
    "assert_in_group",
    "group_and_lattice",
    "make_field",
    "make_gauge",
    "pad_periodic",
    "unitarity_error",
]

GROUPS = ("u1", "su2", "su3")
# 2D and 4D lattices small enough for every test to take milliseconds; extents differ
# per direction so that transposed-axis bugs cannot cancel.
SMALL_SHAPES = ((4, 6), (3, 4, 2, 5))


def group_and_lattice(name: str, shape: Sequence[int]) -> tuple[Group, Lattice]:
    return get_group(name), Lattice(tuple(shape))


def make_field(
    lat: Lattice,
    group: Group,
    seed: int = 0,
    batch: Sequence[int] | int = (),
    dtype: torch.dtype = torch.complex128,
) -> torch.Tensor:
    """Haar-random (hot) link field from a seeded ``torch.Generator``."""
    gen = torch.Generator().manual_seed(seed)
    return random_field(lat, group, gen, batch=batch, dtype=dtype)


def make_gauge(
    lat: Lattice,
    group: Group,
    seed: int = 1,
    batch: Sequence[int] | int = (),
    dtype: torch.dtype = torch.complex128,
) -> torch.Tensor:
    """Haar-random gauge transformation ``g(x)`` from a seeded ``torch.Generator``."""
    gen = torch.Generator().manual_seed(seed)
    return random_gauge(lat, group, gen, batch=batch, dtype=dtype)


def unitarity_error(u: torch.Tensor) -> float:
    """``max |U U^dag - 1|`` over all matrices."""
    eye = torch.eye(u.shape[-1], dtype=u.dtype, device=u.device)
    return (u @ dagger(u) - eye).abs().max().item()


def assert_in_group(u: torch.Tensor, group: Group, tol: float = 1e-12) -> None:
    """Unitary and (SU(N)) unit determinant to ``tol``."""
    err = unitarity_error(u)
    assert err < tol, f"unitarity violated by {err:.3e} (tol {tol})"
    if group.name != "u1":
        det_err = (torch.linalg.det(u) - 1).abs().max().item()
        assert det_err < tol, f"det - 1 = {det_err:.3e} (tol {tol})"


def pad_periodic(f: torch.Tensor, lat: Lattice, inner: int = 2) -> torch.Tensor:
    """Fill a halo-padded copy of ``f`` from its interior, periodically.

    ``lat`` describes one rank owning the whole lattice with ``lat.halo`` layers; ``f`` may be
    either the unpadded field (``lat.local_shape``) or the padded one (its halos are redone).
    """
    g = f
    if tuple(f.shape[f.dim() - inner - lat.nd : f.dim() - inner]) == tuple(lat.shape):
        g = f[lat.interior_slices(inner)]
    for d in lat.padded_dims:
        n = lat.local_shape[d]
        idx = torch.arange(-lat.halo, n + lat.halo, device=f.device) % n
        g = g.index_select(lat.site_dim(d, inner) % g.dim(), idx)
    return g


class PeriodicHaloComm(SerialComm):
    """Single-rank comm whose ``exchange`` refills the halos periodically (tests halo code paths).

    Only valid when ``lat.local_shape == lat.global_shape`` (one rank, halo-padded array).
    """

    decomposed = True  # halos to fill, like a LatticeComm

    def exchange(self, f: torch.Tensor, lat: Lattice, inner: int = 2, width: int | None = None) -> torch.Tensor:
        return pad_periodic(f, lat, inner)
