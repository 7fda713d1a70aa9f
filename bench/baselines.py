"""Benchmark of the HMC and heat-bath baselines, torch path vs host kernels (not a test).

Prints, in one run and on the same threads: ns per site of one heat-bath sweep + one
overrelaxation sweep and of one HMC trajectory (Omelyan 2MN, 10 steps, tau = 1, 21 force
evaluations; 2D U(1) also leapfrog, 10 steps), for 2D U(1) 16x16 and 32x32 and 4D SU(3) 8^4
and 16^4, for the torch path (``Lattice.backend = "torch"``) and the host kernels
(``"host"``, the default of ``backend: auto`` on CPUs), each through the public functions
(``hpcflow.sampling.heatbath_or_sweep``, ``HMC.trajectory``) a run calls. Each rate is also
given as a fraction of the float64 GEMM rate (``torch.matmul`` of two 1024^2 matrices)
measured in the same run on the same threads.

Flop counts (nominal, per site; real flops, complex multiply 6, add 2; the counts of the
kernels' source headers, so the benchmark and the kernels agree):

* SU(3) 4D heat bath + one overrelaxation sweep (``kernels/heatbath_host.cpp``): per link the
  staple 2484, M = U A 198, three Cabibbo-Marinari subgroups (quaternion, norm, draw, two rows
  of U and M mixed): heat bath ~3480, overrelaxation ~3400; per site 4 x (3480 + 3400).
* SU(3) 4D HMC, Omelyan 2MN with n = 10 steps (``kernels/md_host.cpp``): 2n + 1 = 21 forces
  (staple 2574 + momentum update 282 per link) and 2n = 20 link updates exp(eps P) U (~1070
  per link), the actions from the forces' staples: 333,000 flops per site (momenta draws,
  accept and unitarity check not counted).
* 2D U(1) (angles): per link a force of 2 plaquettes ~40, a link update 2; heat bath: staple
  ~20, a von Mises draw (~3 uniforms, cos, log, acos; ~150 counted as flops). The U(1)
  targets are absolute: HMC trajectory (10 leapfrog steps) <= 100 us and heat-bath sweep
  <= 50 us on 16x16, one core.

Usage: ``python bench/baselines.py [--threads 1 2] [--repeat 3] [--sizes-u1 16 32]
[--sizes-su3 8 16] [--skip-torch-above N] [--json FILE]``. The torch path at 16^4 takes
seconds per sweep and ~15 s per trajectory: ``--skip-torch-above 8`` omits it there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable

import torch

from hpcflow.lattice.geometry import Lattice
from hpcflow.lattice.groups import get_group, random_field
from hpcflow.rng import CounterRNG
from hpcflow.sampling import HMC, heatbath_or_sweep, heatbath_sweep

HB_OR_FLOPS_SU3 = 4 * (3480 + 3400)
HMC_FLOPS_SU3 = 333_000
HB_OR_FLOPS_U1 = 2 * (170 + 25)
HMC_FLOPS_U1 = 2 * (11 * 40 + 10 * 2) + 2 * 10
TARGET_GEMM_FRACTION = 0.25
TARGET_U1_HMC_US = 100.0
TARGET_U1_HB_US = 50.0


def _time(f: Callable[[], object], repeat: int, min_time: float = 0.2) -> float:
    """Best of ``repeat`` timings of the mean over enough calls to last ``min_time``."""
    t0 = time.perf_counter()
    f()  # warm-up (builds libraries, fills caches)
    once = max(time.perf_counter() - t0, 1e-7)
    inner = max(1, int(min_time / once))
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(inner):
            f()
        best = min(best, (time.perf_counter() - t) / inner)
    return best


def gemm_gflops(repeat: int) -> float:
    n = 1024
    a = torch.randn(n, n, dtype=torch.float64)
    b = torch.randn(n, n, dtype=torch.float64)
    return 2 * n**3 / _time(lambda: a @ b, repeat) / 1e9


def bench_case(group: str, shape: tuple[int, ...], beta: float, backend: str, repeat: int,
               integrator: str = "omelyan") -> dict[str, float]:
    """Seconds per HB+OR sweep and per HMC trajectory (10 steps, tau 1) on ``backend``."""
    g = get_group(group)
    lat = Lattice(shape, backend=backend)
    rng = CounterRNG(7)
    U = random_field(lat, g, rng, 0)
    # thermalise a little so the draws see a realistic staple (heat bath on the host path
    # where available: the configuration is the same to rounding on either path)
    with torch.no_grad():
        for s in range(3):
            U = heatbath_or_sweep(U, lat, g, beta, rng, 100 + s, 1)
    hmc = HMC(lat, g, beta, 10, 1.0, integrator, rng)
    return {"hb": _time(lambda: heatbath_sweep(U, lat, g, beta, rng, 1), repeat),
            "hb_or": _time(lambda: heatbath_or_sweep(U, lat, g, beta, rng, 1, 1), repeat),
            "hmc": _time(lambda: hmc.trajectory(U, 1), repeat)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--sizes-u1", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--sizes-su3", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--skip-torch-above", type=int, default=None,
                    help="skip the torch path for SU(3) lattices with L above this")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    out: list[dict] = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # host kernels read it at every call
        gemm = gemm_gflops(args.repeat)
        print(f"== {threads} thread(s): float64 GEMM {gemm:.1f} GFLOP/s ==")
        print(f"{'case':<22}{'path':<7}{'HB+OR ns/site':>15}{'HMC ns/site':>14}"
              f"{'HB+OR %GEMM':>13}{'HMC %GEMM':>11}{'HB+OR us':>10}{'HMC us':>10}")
        cases = [("u1", (L, L), 3.0, HB_OR_FLOPS_U1, HMC_FLOPS_U1) for L in args.sizes_u1]
        cases += [("su3", (L,) * 4, 6.0, HB_OR_FLOPS_SU3, HMC_FLOPS_SU3) for L in args.sizes_su3]
        for group, shape, beta, f_hb, f_hmc in cases:
            row = {}
            for backend in ("torch", "host"):
                if (backend == "torch" and group == "su3" and args.skip_torch_above is not None
                        and shape[0] > args.skip_torch_above):
                    continue
                integrators = ("omelyan", "leapfrog") if group == "u1" else ("omelyan",)
                for integ in integrators:
                    t = bench_case(group, shape, beta, backend, args.repeat, integ)
                    V = 1
                    for n in shape:
                        V *= n
                    rec = {"threads": threads, "group": group, "shape": list(shape), "path": backend,
                           "integrator": integ, "gemm_gflops": gemm,
                           "hb_or_ns_site": t["hb_or"] * 1e9 / V, "hmc_ns_site": t["hmc"] * 1e9 / V,
                           "hb_or_gemm_fraction": f_hb * V / t["hb_or"] / 1e9 / gemm,
                           "hmc_gemm_fraction": f_hmc * V / t["hmc"] / 1e9 / gemm,
                           "hb_us": t["hb"] * 1e6, "hb_or_us": t["hb_or"] * 1e6, "hmc_us": t["hmc"] * 1e6}
                    out.append(rec)
                    row[(backend, integ)] = rec
                    label = f"{group} {'x'.join(map(str, shape))} {integ[:4]}"
                    print(f"{label:<22}{backend:<7}{rec['hb_or_ns_site']:>15.1f}{rec['hmc_ns_site']:>14.1f}"
                          f"{100 * rec['hb_or_gemm_fraction']:>12.1f}%{100 * rec['hmc_gemm_fraction']:>10.1f}%"
                          f"{rec['hb_or_us']:>10.1f}{rec['hmc_us']:>10.1f}", flush=True)
            for integ in ("omelyan", "leapfrog"):
                a, b = row.get(("torch", integ)), row.get(("host", integ))
                if a and b:
                    print(f"{'':<22}{'ratio':<7}{a['hb_or_ns_site'] / b['hb_or_ns_site']:>14.1f}x"
                          f"{a['hmc_ns_site'] / b['hmc_ns_site']:>13.1f}x   (torch / host, {integ})")
        u1 = [r for r in out if r["threads"] == threads and r["group"] == "u1" and r["path"] == "host"
              and r["shape"] == [16, 16]]
        for r in u1:
            if r["integrator"] == "leapfrog":
                ok = r["hmc_us"] <= TARGET_U1_HMC_US
                print(f"target U(1) 16x16 HMC (10 leapfrog steps) <= {TARGET_U1_HMC_US:.0f} us: "
                      f"{r['hmc_us']:.1f} us {'met' if ok else 'NOT met'}")
            else:
                ok = r["hb_us"] <= TARGET_U1_HB_US
                print(f"target U(1) 16x16 heat-bath sweep <= {TARGET_U1_HB_US:.0f} us: "
                      f"{r['hb_us']:.1f} us {'met' if ok else 'NOT met'} (HB + OR {r['hb_or_us']:.1f} us)")
        for r in out:
            if r["threads"] == threads and r["group"] == "su3" and r["path"] == "host":
                for k in ("hb_or", "hmc"):
                    frac = r[f"{k}_gemm_fraction"]
                    print(f"target SU(3) {r['shape'][0]}^4 {k} >= {TARGET_GEMM_FRACTION:.0%} of GEMM: "
                          f"{frac:.1%} {'met' if frac >= TARGET_GEMM_FRACTION else 'NOT met'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
