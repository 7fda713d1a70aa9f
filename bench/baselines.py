"""Benchmark of the HMC and heat-bath baselines (not a test): prints a small table.

* ns per site per heat-bath sweep (+ OR sweep) and per HMC trajectory, for 2D U(1) 16x16
  and 4D SU(3) 8^4;
* the torch plaquette's flop rate with QUDA's count (SU(3): 6 planes x (3 x 198 + 3) =
  3582 flops/site) as a fraction of a large float64 matmul measured in the same run.

Usage: ``python bench/baselines.py [--repeat N] [--threads T]``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from hpcflow.lattice.action import plaquette_re_tr
from hpcflow.lattice.geometry import Lattice
from hpcflow.lattice.groups import get_group, random_field
from hpcflow.rng import CounterRNG
from hpcflow.sampling import HMC, heatbath_sweep, overrelax_sweep

PLAQ_FLOPS_SU3 = 3582  # QUDA: 6 planes x (3 SU(3) products x 198 + 3 for Re tr)


def _time(f: Callable[[], object], repeat: int) -> float:
    f()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best


def _bench_case(
    name: str, shape: tuple[int, ...], beta: float, rng: CounterRNG, repeat: int
) -> tuple[str, float, float, float]:
    """ns per site for one heat-bath sweep, one OR sweep, one HMC trajectory (10 steps)."""
    g, lat = get_group(name), Lattice(shape)
    U = random_field(lat, g, rng, 0)
    hmc = HMC(lat, g, beta, 10, 1.0, "omelyan", rng)
    per_site = 1e9 / lat.volume
    t_hb = _time(lambda: heatbath_sweep(U, lat, g, beta, rng, 1), repeat)
    t_or = _time(lambda: overrelax_sweep(U, lat, g, beta), repeat)
    t_hmc = _time(lambda: hmc.trajectory(U, 1), repeat)
    label = f"{name} {'x'.join(map(str, shape))}"
    return label, t_hb * per_site, t_or * per_site, t_hmc * per_site


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = CounterRNG(1)
    rows = []
    for name, shape, beta in (("u1", (16, 16), 2.0), ("su3", (8, 8, 8, 8), 6.0)):
        rows.append(_bench_case(name, shape, beta, rng, args.repeat))
    print(f"threads={args.threads}  (ns per site; HMC: Omelyan 2MN, 10 steps, 21 forces)")
    print(f"{'lattice':<14}{'heat bath':>12}{'overrelax':>12}{'HMC traj':>14}")
    for r in rows:
        print(f"{r[0]:<14}{r[1]:>12.0f}{r[2]:>12.0f}{r[3]:>14.0f}")

    # plaquette flop rate vs a large float64 matmul, same process, same threads
    g, lat = get_group("su3"), Lattice((8, 8, 8, 8))
    U = random_field(lat, g, rng, 0)
    t_plaq = _time(lambda: plaquette_re_tr(U, lat), args.repeat)
    plaq_gflops = PLAQ_FLOPS_SU3 * lat.volume / t_plaq / 1e9
    n = 2048
    a = torch.randn(n, n, dtype=torch.float64)
    b = torch.randn(n, n, dtype=torch.float64)
    t_mm = _time(lambda: a @ b, args.repeat)
    mm_gflops = 2 * n**3 / t_mm / 1e9
    print(f"\nSU(3) 8^4 plaquette: {plaq_gflops:.2f} GFLOP/s (QUDA count {PLAQ_FLOPS_SU3}/site), "
          f"float64 matmul {n}^2: {mm_gflops:.2f} GFLOP/s, ratio {plaq_gflops / mm_gflops:.3f}")


if __name__ == "__main__":
    main()
