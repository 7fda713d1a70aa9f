"""Quick timing of the host 2D U(1) updates (kernels/u1_updates.py) against the torch path.

``OMP_NUM_THREADS=1 python bench/u1_updates_quick.py``: microseconds per HMC trajectory
(leapfrog, 10 steps, tau = 1), per heat-bath sweep and per overrelaxation sweep at 16x16 and
32x32, beta = 2, one configuration, complex128, including the Python wrappers.
"""

from __future__ import annotations

import time

import torch

from hpcflow.kernels.u1_updates import heatbath_sweep_u1, hmc_trajectory_u1, overrelax_sweep_u1
from hpcflow.lattice.geometry import Lattice
from hpcflow.rng import CounterRNG
from hpcflow.sampling.heatbath import heatbath_sweep, overrelax_sweep
from hpcflow.sampling.hmc import HMC


def _time(f, min_time: float = 0.2, repeats: int = 5) -> float:
    """Microseconds per call: the best of ``repeats`` runs of >= ``min_time`` seconds each
    (the minimum is robust against other processes on a shared machine)."""
    f(0)
    best = float("inf")
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        while True:
            f(n)
            n += 1
            t = time.perf_counter() - t0
            if t > min_time:
                break
        best = min(best, 1e6 * t / n)
    return best


def _rows(L: int, beta: float, rng: CounterRNG) -> list[tuple[str, float, float]]:
    lat = Lattice((L, L))
    th = 2 * torch.pi * torch.rand(2, L, L, dtype=torch.float64,
                                   generator=torch.Generator().manual_seed(1))
    U = torch.polar(torch.ones_like(th), th)[..., None, None]
    hmc = HMC(lat, "u1", beta, 10, 1.0, "leapfrog", rng)
    cases = [
        ("HMC leapfrog n=10",
         lambda s: hmc_trajectory_u1(U, lat, beta, 10, 1.0, "leapfrog", hmc.lam, rng, s),
         lambda s: hmc.trajectory(U, s)),
        ("heat-bath sweep",
         lambda s: heatbath_sweep_u1(U, lat, beta, rng, s),
         lambda s: heatbath_sweep(U, lat, "u1", beta, rng, s)),
        ("overrelax sweep",
         lambda s: overrelax_sweep_u1(U, lat),
         lambda s: overrelax_sweep(U, lat, "u1", beta)),
    ]
    return [(name, _time(host), _time(ref)) for name, host, ref in cases]


def main() -> None:
    torch.set_num_threads(1)
    beta, rng = 2.0, CounterRNG(7, 0)
    print(f"threads: {torch.get_num_threads()}; us per update, best of 5 (host / torch)")
    for L in (16, 32):
        for name, t_host, t_torch in _rows(L, beta, rng):
            print(f"{L:3d}x{L:<3d} {name:20s} host {t_host:9.1f}  torch {t_torch:9.1f}  "
                  f"speed-up {t_torch / t_host:6.1f}")


if __name__ == "__main__":
    main()
