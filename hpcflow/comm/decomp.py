"""Pure domain-decomposition maths (no MPI): process grids, local extents, neighbours.

A global periodic lattice of extents ``L = (L_0, ..., L_{Nd-1})`` is split over a
Cartesian process grid ``g = (g_0, ..., g_{Nd-1})`` with ``prod(g) = P`` ranks. Rank
coordinates ``c`` follow MPI's row-major Cartesian order (``c_0`` slowest), the rank with
coordinates ``c`` owns the sites ``c_d * (L_d / g_d) <= x_d < (c_d + 1) * (L_d / g_d)``,
and neighbours wrap periodically. Every function here is deterministic in its arguments,
so all ranks reach the same verdict on a bad grid before any communication starts.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "auto_grid",
    "check_grid",
    "coords_to_rank",
    "halo_surface",
    "local_extents",
    "local_origin",
    "neighbour_rank",
    "rank_to_coords",
]


def _prod(xs: Sequence[int]) -> int:
    p = 1
    for x in xs:
        p *= int(x)
    return p


def _as_shape(name: str, shape: Sequence[int]) -> tuple[int, ...]:
    try:
        s = tuple(int(x) for x in shape)
    except TypeError as exc:
        raise TypeError(f"{name} must be a sequence of ints, got {shape!r}") from exc
    if len(s) == 0 or any(x < 1 for x in s):
        raise ValueError(f"{name} must be a non-empty sequence of ints >= 1, got {list(s)}")
    return s


def check_grid(
    global_shape: Sequence[int], grid: Sequence[int], size: int | None = None
) -> tuple[int, ...]:
    """Validate a process grid against the lattice (and the rank count) and return it.

    Raises ``ValueError`` naming the argument, the bad value and what is allowed when the
    grid has the wrong length, does not divide the lattice, or does not match ``size``.
    """
    gs = _as_shape("global_shape", global_shape)
    g = _as_shape("grid", grid)
    if len(g) != len(gs):
        raise ValueError(
            f"grid {list(g)} has {len(g)} dims but the lattice {list(gs)} has {len(gs)}; "
            f"give one process count per lattice dimension"
        )
    if size is not None and _prod(g) != size:
        raise ValueError(
            f"grid {list(g)} needs {_prod(g)} ranks but the communicator has {size}; "
            f"the product of the grid must equal the number of ranks"
        )
    bad = [d for d in range(len(g)) if gs[d] % g[d] != 0]
    if bad:
        d = bad[0]
        raise ValueError(
            f"grid {list(g)} does not divide the lattice {list(gs)}: dimension {d} has "
            f"{gs[d]} sites for {g[d]} ranks; each grid entry must divide its lattice extent"
        )
    return g


def _factorisations(n: int, k: int) -> list[tuple[int, ...]]:
    """All ordered k-tuples of positive ints whose product is n."""
    if k == 1:
        return [(n,)]
    out = []
    for f in range(1, n + 1):
        if n % f == 0:
            out.extend((f,) + rest for rest in _factorisations(n // f, k - 1))
    return out


def halo_surface(global_shape: Sequence[int], grid: Sequence[int]) -> int:
    """Sites per rank on the faces that need a halo (the communication volume per width)."""
    loc = local_extents(global_shape, grid)
    vol = _prod(loc)
    return sum(2 * vol // loc[d] for d in range(len(loc)) if grid[d] > 1)


def auto_grid(size: int, global_shape: Sequence[int]) -> tuple[int, ...]:
    """Grid of ``size`` ranks that divides the lattice with the smallest halo surface.

    Ties go to the grid with the thickest local blocks (room for wider halos), then to the
    one that splits the slowest dimensions first (contiguous slabs). Raises
    ``ValueError`` when no grid of ``size`` ranks divides the lattice (e.g. more ranks than
    sites).
    """
    gs = _as_shape("global_shape", global_shape)
    if int(size) < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if size > _prod(gs):
        raise ValueError(
            f"cannot split a lattice of {_prod(gs)} sites {list(gs)} over {size} ranks: "
            f"more ranks than sites"
        )
    best: tuple[int, ...] | None = None
    best_key: tuple | None = None
    for g in _factorisations(int(size), len(gs)):
        if any(gs[d] % g[d] for d in range(len(gs))):
            continue
        dec = [gs[d] // g[d] for d in range(len(gs)) if g[d] > 1]
        key = (halo_surface(gs, g), -min(dec, default=0), tuple(-x for x in g))
        if best_key is None or key < best_key:
            best, best_key = g, key
    if best is None:
        raise ValueError(
            f"no process grid of {size} ranks divides the lattice {list(gs)}; "
            f"choose a rank count whose factors divide the lattice extents"
        )
    return best


def rank_to_coords(rank: int, grid: Sequence[int]) -> tuple[int, ...]:
    """Cartesian coordinates of ``rank`` (row-major, first coordinate slowest, as MPI)."""
    g = tuple(int(x) for x in grid)
    if not 0 <= rank < _prod(g):
        raise ValueError(f"rank must be in [0, {_prod(g)}) for grid {list(g)}, got {rank}")
    coords = []
    for n in reversed(g):
        coords.append(rank % n)
        rank //= n
    return tuple(reversed(coords))


def coords_to_rank(coords: Sequence[int], grid: Sequence[int]) -> int:
    """Rank of the (periodically wrapped) coordinates ``coords``."""
    r = 0
    for c, n in zip(coords, grid):
        r = r * int(n) + int(c) % int(n)
    return r


def neighbour_rank(rank: int, grid: Sequence[int], dim: int, step: int) -> int:
    """Rank at ``step`` grid cells along ``dim`` from ``rank`` (periodic)."""
    c = list(rank_to_coords(rank, grid))
    c[dim] += step
    return coords_to_rank(c, grid)


def local_extents(global_shape: Sequence[int], grid: Sequence[int]) -> tuple[int, ...]:
    """Interior extents each rank owns (the grid must divide the lattice)."""
    g = check_grid(global_shape, grid)
    return tuple(int(global_shape[d]) // g[d] for d in range(len(g)))


def local_origin(
    global_shape: Sequence[int], grid: Sequence[int], coords: Sequence[int]
) -> tuple[int, ...]:
    """Global coordinate of the first interior site of the rank at ``coords``."""
    loc = local_extents(global_shape, grid)
    return tuple(int(c) * n for c, n in zip(coords, loc))
