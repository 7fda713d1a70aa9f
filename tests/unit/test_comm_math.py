"""Decomposition maths of hpcflow.comm without MPI: grids, ranks, extents, neighbours,
and the global -> local map the parallel tests use as their reference."""

from __future__ import annotations

import itertools

import pytest
import torch

from hpcflow.comm.decomp import (
    auto_grid,
    check_grid,
    coords_to_rank,
    halo_surface,
    local_extents,
    local_origin,
    neighbour_rank,
    rank_to_coords,
)
from hpcflow.comm.fields import local_from_global, place_interior
from hpcflow.lattice.geometry import Lattice


@pytest.mark.parametrize("grid", [(1,), (3,), (2, 3), (2, 1, 2), (1, 1, 2, 2), (3, 1, 2, 4)])
def test_rank_coords_roundtrip_is_row_major(grid):
    """rank <-> coords is a bijection in MPI's row-major order (last coordinate fastest)."""
    size = 1
    for g in grid:
        size *= g
    expected = list(itertools.product(*[range(g) for g in grid]))
    assert [rank_to_coords(r, grid) for r in range(size)] == expected
    assert [coords_to_rank(c, grid) for c in expected] == list(range(size))


def test_neighbours_wrap_periodically():
    grid = (2, 3)
    # rank 5 = (1, 2): +1 along dim 1 wraps to (1, 0) = rank 3; -1 along dim 0 -> (0, 2) = 2
    assert neighbour_rank(5, grid, 1, +1) == 3
    assert neighbour_rank(5, grid, 0, -1) == 2
    assert neighbour_rank(0, grid, 1, -1) == 2
    for r in range(6):
        for d in range(2):
            assert neighbour_rank(neighbour_rank(r, grid, d, 1), grid, d, -1) == r


def test_local_extents_and_origins_tile_the_lattice():
    """The blocks of all ranks cover every global site exactly once."""
    gs, grid = (8, 4, 6), (2, 1, 3)
    loc = local_extents(gs, grid)
    assert loc == (4, 4, 2)
    seen = torch.zeros(gs, dtype=torch.long)
    for r in range(6):
        o = local_origin(gs, grid, rank_to_coords(r, grid))
        seen[tuple(slice(o[d], o[d] + loc[d]) for d in range(3))] += 1
    assert torch.all(seen == 1)


@pytest.mark.parametrize(
    "gs, grid, size, match",
    [
        ((8, 8), (3, 1), None, "does not divide"),
        ((8, 8), (2, 2), 2, "needs 4 ranks but the communicator has 2"),
        ((8, 8), (2, 2, 1), None, "has 3 dims"),
        ((8, 8), (0, 1), None, "ints >= 1"),
    ],
)
def test_check_grid_rejects_bad_grids(gs, grid, size, match):
    with pytest.raises(ValueError, match=match):
        check_grid(gs, grid, size)


def test_auto_grid_minimises_surface_and_rejects_impossible_sizes():
    assert auto_grid(1, (4, 4)) == (1, 1)
    assert auto_grid(2, (16, 16, 16, 16)) == (2, 1, 1, 1)
    # 8 ranks on 16^4: the chosen grid has the least surface of all 8-rank grids
    best = auto_grid(8, (16, 16, 16, 16))
    assert halo_surface((16,) * 4, best) == 6144 < halo_surface((16,) * 4, (8, 1, 1, 1))
    for g in itertools.product([1, 2, 4, 8], repeat=4):
        if g[0] * g[1] * g[2] * g[3] == 8:
            assert halo_surface((16,) * 4, g) >= 6144
    # ties go to the thickest local blocks, then to splitting the slowest dimensions first
    assert best == (2, 2, 2, 1)
    assert auto_grid(4, (16, 16, 16, 16)) == (2, 2, 1, 1)
    assert auto_grid(2, (4, 4, 4, 4)) == (2, 1, 1, 1)
    # only the second dimension can take a factor 3
    assert auto_grid(3, (4, 6)) == (1, 3)
    with pytest.raises(ValueError, match="more ranks than sites"):
        auto_grid(20, (4, 4))
    with pytest.raises(ValueError, match="no process grid of 5 ranks"):
        auto_grid(5, (4, 4))


@pytest.mark.parametrize("halo, pad", [(1, (0,)), (2, (0, 1)), (1, (1, 2))])
def test_local_from_global_reads_wrapped_global_sites(halo, pad):
    """The reference local array (halos included) is the global field at wrapped coords,
    and place_interior puts the interior back where it came from."""
    gs = (4, 6, 2)
    g = torch.randn(3, *gs, 2, 2, dtype=torch.complex128)
    lat = Lattice(gs, (2, 3, 2), (2, 3, 0), halo=halo, padded_dims=pad)
    loc = local_from_global(g, lat, inner=2)
    assert loc.shape == (3, *lat.shape, 2, 2)
    coords = lat.global_coords()
    for idx in itertools.product(*[range(n) for n in lat.shape]):
        x = tuple(int(coords[(d,) + idx]) for d in range(3))
        assert torch.equal(loc[(slice(None),) + idx], g[(slice(None),) + x])
    back = place_interior(torch.zeros_like(g), loc, lat, inner=2)
    block = (slice(None), slice(2, 4), slice(3, 6), slice(0, 2))
    assert torch.equal(back[block], g[block])
    back[block] = 0
    assert torch.all(back == 0)


def test_local_from_global_rejects_wrong_shape():
    lat = Lattice((4, 4), (2, 4), (0, 0), halo=1, padded_dims=(0,))
    with pytest.raises(ValueError, match="site extents"):
        local_from_global(torch.zeros(2, 4, 5), lat, inner=0)
