"""Benchmark: plaquette and staple kernels, torch reference vs host (g++/OpenMP) build.

Host kernels: the plaquette as ``host_simd.cpp`` (SIMD lanes across sites, the default
host plaquette; row ``plaquette``) and as ``plaquette.cu`` through the host harness (one
loop iteration per CUDA thread; row ``plaq-harn``); the staple through the harness.

Everything is measured in one run on the same threads, so the ratios are meaningful even
on a busy machine: ns per site of each implementation, the speed-up of the host kernels,
their flop rate as a fraction of a large float64 matrix product (the compute limit) and
their effective bandwidth (minimal bytes: every link read once, the output written once)
as a fraction of a STREAM-style triad ``a = b + s c``.

Two torch versions of the plaquette are timed: the project's reference (two products and a
Frobenius dot per plane, ``plaquette_re_tr_torch``) and the plain one the issue's target is
stated against (three batched 3x3 products and a trace per plane). The speed-up target
(>= 20x) is over the plain version, the flop-rate target (>= 20% of GEMM) is absolute.

Flop counts (PHYSICS.md, QUDA's): plaquette 3582 flops/site (4D SU(3)), staple sum about
2574 flops per link, i.e. 4 x 2574 per site. The kernels do fewer real flops for the
plaquette (2592: the last product is a trace), so its rate here is the nominal one.

Usage: ``python bench/kernels.py [--sizes 16 24] [--reps 3] [--clock wall|cpu] [--json f]``.
Threads: ``OMP_NUM_THREADS`` (host kernels) and torch's intra-op threads are set equal.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable

import torch

from hpcflow.kernels import host
from hpcflow.lattice.action import plaquette_re_tr_torch, staple_sum_torch
from hpcflow.lattice.geometry import Lattice

__all__ = ["main"]

PLAQ_FLOPS = 3582
STAPLE_FLOPS_PER_LINK = 2574
TARGET_SPEEDUP = 20.0
TARGET_MATMUL_FRACTION = 0.20


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = {"now": time.perf_counter}  # set once in main() from --clock


def best_time(fn: Callable[[], object], reps: int) -> float:
    """Best time of ``reps`` calls after one warm-up call (seconds, the chosen clock)."""
    now = _clock["now"]
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = now()
        fn()
        best = min(best, now() - t0)
    return best


def matmul_gflops(n: int = 2048, reps: int = 3) -> float:
    """float64 GEMM rate of torch (BLAS) on the current threads, GFLOP/s."""
    a = torch.randn(n, n, dtype=torch.float64)
    b = torch.randn(n, n, dtype=torch.float64)
    t = best_time(lambda: a @ b, reps)
    return 2.0 * n**3 / t / 1e9


def triad_gbs(n: int = 1 << 25, reps: int = 5) -> float:
    """STREAM triad ``a = b + s c`` on float64 (24 bytes per element counted), GB/s."""
    a = torch.empty(n, dtype=torch.float64)
    b = torch.rand(n, dtype=torch.float64)
    c = torch.rand(n, dtype=torch.float64)
    t = best_time(lambda: torch.add(b, c, alpha=3.0, out=a), reps)
    return 24.0 * n / t / 1e9


def plaquette_plain_torch(U: torch.Tensor) -> torch.Tensor:
    """The plain torch plaquette the issue's speed target is stated against: per plane the
    full product ``U_mu(x) U_nu(x+mu) U_mu(x+nu)^dag U_nu(x)^dag`` by three batched 3x3
    matrix products (``torch.roll`` for the shifts), then the real trace. Checked against
    the reference in main() before it is timed."""
    nd = U.shape[0]
    out = []
    for mu in range(nd):
        for nu in range(mu + 1, nd):
            p = (U[mu] @ torch.roll(U[nu], -1, mu) @ torch.roll(U[mu], -1, nu).mH @ U[nu].mH)
            out.append(p.diagonal(dim1=-2, dim2=-1).sum(-1).real)
    return torch.stack(out)


def random_su3_like(lat: Lattice, seed: int) -> torch.Tensor:
    """Unitary 3x3 links (QR of Gaussians); the kernels' cost does not depend on values."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(lat.nd, *lat.shape, 3, 3, dtype=torch.complex128, generator=g)
    return torch.linalg.qr(z)[0].contiguous()


def bench_size(L: int, reps: int, gemm: float, triad: float) -> dict:
    lat = Lattice((L,) * 4)
    U = random_su3_like(lat, seed=L)
    V = lat.volume
    link_bytes = 9 * 16
    res: dict = {"L": L, "sites": V}
    # plaquette: read 4 links per site, write 6 reals per site
    ref = plaquette_re_tr_torch(U, lat)
    err = float((plaquette_plain_torch(U) - ref).abs().max())
    assert err < 1e-12, f"plain torch plaquette differs from the reference by {err}"
    t_plain = best_time(lambda: plaquette_plain_torch(U), max(1, reps - 1))
    t_ref = best_time(lambda: plaquette_re_tr_torch(U, lat), max(1, reps - 1))
    for variant in host.VARIANTS:
        err = float((host.plaquette_re_tr(U, lat, variant=variant) - ref).abs().max())
        assert err < 1e-12, f"host plaquette ({variant}) differs from the reference by {err}"
    t_host = best_time(lambda: host.plaquette_re_tr(U, lat), reps)
    t_harn = best_time(lambda: host.plaquette_re_tr(U, lat, variant="harness"), reps)
    bytes_min = V * (4 * link_bytes + 6 * 8)
    res["plaquette"] = _row(t_ref, t_host, V, PLAQ_FLOPS, bytes_min, gemm, triad)
    res["plaquette"]["plain_ns_per_site"] = t_plain / V * 1e9
    res["plaquette"]["speedup_vs_plain"] = t_plain / t_host
    res["plaq-harn"] = _row(t_ref, t_harn, V, PLAQ_FLOPS, bytes_min, gemm, triad)
    # staple: read 4 links per site, write 4 matrices per site
    t_ref = best_time(lambda: staple_sum_torch(U, lat), max(1, reps - 1))
    t_host = best_time(lambda: host.staple_sum(U, lat), reps)
    bytes_min = V * (4 * link_bytes + 4 * link_bytes)
    res["staple"] = _row(t_ref, t_host, V, 4 * STAPLE_FLOPS_PER_LINK, bytes_min, gemm, triad)
    return res


def _row(t_ref: float, t_host: float, V: int, flops_site: int, bytes_min: int,
         gemm: float, triad: float) -> dict:
    gflops = flops_site * V / t_host / 1e9
    gbs = bytes_min / t_host / 1e9
    return {
        "torch_ns_per_site": t_ref / V * 1e9,
        "host_ns_per_site": t_host / V * 1e9,
        "speedup": t_ref / t_host,
        "host_gflops": gflops,
        "fraction_of_matmul": gflops / gemm,
        "host_gbs": gbs,
        "fraction_of_triad": gbs / triad,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[16, 24])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="wall time, or process CPU time (robust on a shared machine with"
                         " OMP_NUM_THREADS=1; CPU time over all threads otherwise)")
    args = ap.parse_args(argv)
    _clock["now"] = CLOCKS[args.clock]
    threads = int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))
    torch.set_num_threads(threads)
    host.load_host_library(3, "double", 4)  # build outside the timings
    host.load_simd_library(3, "double", 4)
    gemm = matmul_gflops()
    triad = triad_gbs()
    out = {"threads": threads, "clock": args.clock, "simd_bytes": host.simd_bytes(), "matmul_gflops": gemm, "triad_gbs": triad, "sizes": []}
    print(f"threads {threads}   clock {args.clock}   SIMD {host.simd_bytes()} B   float64 GEMM {gemm:.1f} GFLOP/s   triad {triad:.1f} GB/s")
    hdr = (f"{'L':>3} {'kernel':<9} {'torch ns/site':>13} {'host ns/site':>12} {'speedup':>8} "
           f"{'GFLOP/s':>8} {'/GEMM':>6} {'GB/s':>6} {'/triad':>7}")
    print(hdr)
    for L in args.sizes:
        r = bench_size(L, args.reps, gemm, triad)
        out["sizes"].append(r)
        for k in ("plaquette", "plaq-harn", "staple"):
            x = r[k]
            print(f"{L:>3} {k:<9} {x['torch_ns_per_site']:>13.0f} {x['host_ns_per_site']:>12.1f} "
                  f"{x['speedup']:>7.1f}x {x['host_gflops']:>8.2f} {x['fraction_of_matmul']:>6.1%} "
                  f"{x['host_gbs']:>6.2f} {x['fraction_of_triad']:>7.1%}")
    p = [r["plaquette"] for r in out["sizes"]]
    for L, x in zip(args.sizes, p):
        print(f"{L:>3} plaquette, plain torch (3 products + trace): {x['plain_ns_per_site']:.0f} ns/site;"
              f" host kernel {x['speedup_vs_plain']:.1f}x faster")
    ok_speed = all(x["speedup_vs_plain"] >= TARGET_SPEEDUP for x in p)
    ok_flops = all(x["fraction_of_matmul"] >= TARGET_MATMUL_FRACTION for x in p)
    print(f"targets (plaquette): speed-up over the plain torch version >= {TARGET_SPEEDUP:.0f}x: {'met' if ok_speed else 'MISSED'};"
          f" >= {TARGET_MATMUL_FRACTION:.0%} of GEMM: {'met' if ok_flops else 'MISSED'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
