"""hpcflow.comm: MPI process grid, halo exchange, reductions and rank-aware logging.

The only package of hpcflow that imports mpi4py (lazily: importing it does not start MPI).
"""

from hpcflow.comm.decomp import (
    auto_grid,
    check_grid,
    coords_to_rank,
    local_extents,
    local_origin,
    neighbour_rank,
    rank_to_coords,
)
from hpcflow.comm.fields import local_from_global, place_interior
from hpcflow.comm.logs import rank_logger
from hpcflow.comm.mpi import (
    LatticeComm,
    ProcessGrid,
    gpu_aware_mpi,
    halo_exchange,
    world_size,
)

__all__ = [
    "LatticeComm",
    "ProcessGrid",
    "auto_grid",
    "check_grid",
    "coords_to_rank",
    "gpu_aware_mpi",
    "halo_exchange",
    "local_extents",
    "local_from_global",
    "local_origin",
    "neighbour_rank",
    "place_interior",
    "rank_logger",
    "rank_to_coords",
    "world_size",
]
