"""Halo-exchange benchmark: 4D SU(3) heat bath on a decomposed lattice.

    mpirun -n 2 python bench/halo.py                 # 16^4 SU(3), grid (2,1,1,1)
    mpirun -n 2 python bench/halo.py --shape 8 8 8 8 --sweeps 1

Measured in one run, on the same ranks:
  * halo-exchange time as a fraction of one heat-bath sweep (a sweep does one exchange per
    checkerboard sub-step, 2 * Nd of them; the exchanges are timed alone, the same number),
  * halo bytes per second (bytes each rank sends per exchange / time per exchange),
  * weak-scaling efficiency 1 -> P ranks at the same local volume per rank: first every
    rank runs the sweep alone on its own lattice of the local extent (COMM_SELF, all ranks
    concurrently, so the cores are as busy as in the decomposed run), then the P ranks run
    the decomposed global lattice; efficiency = t(1 rank) / t(P ranks).
Prints one JSON line on rank 0.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from mpi4py import MPI

from hpcflow.comm import LatticeComm, ProcessGrid
from hpcflow.lattice.groups import get_group, random_field
from hpcflow.rng import CounterRNG
from hpcflow.sampling.heatbath import heatbath_sweep


def _time_sweeps(lc: LatticeComm, lat, group, beta: float, n: int) -> float:  # type: ignore[no-untyped-def]
    rng = CounterRNG(1, stream=0)
    U = lc.exchange(random_field(lat, group, rng, 0), lat)
    U = heatbath_sweep(U, lat, group, beta, rng, 1, comm=lc)  # warm-up
    lc.grid.cart.Barrier()
    t0 = time.perf_counter()
    for s in range(n):
        U = heatbath_sweep(U, lat, group, beta, rng, 2 + s, comm=lc)
    lc.grid.cart.Barrier()
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=4, default=[16, 16, 16, 16])
    ap.add_argument("--grid", type=int, nargs=4, default=None, help="default: automatic")
    ap.add_argument("--sweeps", type=int, default=2)
    ap.add_argument("--exchanges", type=int, default=40)
    ap.add_argument("--beta", type=float, default=6.0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    world = MPI.COMM_WORLD
    group = get_group("su3")

    grid = ProcessGrid(args.shape, args.grid)
    lc = LatticeComm(grid)
    lat = lc.local_lattice(halo=1)

    # 1) one rank alone on a lattice of the local extent (weak-scaling reference)
    solo = LatticeComm(ProcessGrid(grid.local_shape, None, comm=MPI.COMM_SELF))
    t_solo = _time_sweeps(solo, solo.local_lattice(halo=1), group, args.beta, args.sweeps)
    t_solo = world.allreduce(t_solo, op=MPI.MAX)

    # 2) the decomposed sweep
    t_sweep = _time_sweeps(lc, lat, group, args.beta, args.sweeps)

    # 3) the exchanges alone: 2 * Nd per sweep
    U = random_field(lat, group, CounterRNG(2), 0)
    lc.exchange(U, lat)
    world.Barrier()
    t0 = time.perf_counter()
    for _ in range(args.exchanges):
        lc.exchange(U, lat)
    world.Barrier()
    t_ex = (time.perf_counter() - t0) / args.exchanges
    per_sweep = 2 * lat.nd

    # bytes this rank sends per exchange: two slabs per decomposed dimension, each spanning
    # the array in the other dimensions (halos of earlier dimensions included)
    item = U.element_size() * U.shape[0] * U.shape[-1] * U.shape[-2]
    sent = 0
    for d in lat.padded_dims:
        if grid.dims[d] > 1:
            cells = 1
            for e, n in enumerate(lat.shape):
                cells *= lat.halo if e == d else n
            sent += 2 * cells * item
    out = {
        "bench": "halo",
        "group": "su3",
        "global_shape": list(args.shape),
        "grid": list(grid.dims),
        "ranks": world.Get_size(),
        "local_shape": list(grid.local_shape),
        "sweep_s": round(t_sweep, 4),
        "exchange_s": round(t_ex, 6),
        "exchange_fraction_of_sweep": round(per_sweep * t_ex / t_sweep, 4),
        "halo_bytes_per_exchange_per_rank": sent,
        "halo_bytes_per_s_per_rank": round(sent / t_ex) if t_ex > 0 else None,
        "solo_sweep_s_same_local_volume": round(t_solo, 4),
        "weak_scaling_efficiency": round(t_solo / t_sweep, 4),
    }
    if world.Get_rank() == 0:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
