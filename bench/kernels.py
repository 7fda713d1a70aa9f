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

GPU: ``python bench/kernels.py --device cuda [--sizes 24 32 48]`` times the CUDA kernels
(``plaquette.cu``, ``staple.cu`` through CuPy, dispatch backend ``cuda``) and torch on the
GPU with CUDA events (best of ``--reps``). The issue's target there is >= 60% of peak memory
bandwidth: effective bandwidth (minimal bytes, as above) as a fraction of the device's
nominal peak (memory clock x bus width x 2, from its attributes) and of a device-to-device
copy measured in the same run. Sizes default to 24 32 48: a 16^4 SU(3) float64 field
(38 MB) would sit in the L2 of recent GPUs and overstate the bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable

import torch

from hpcflow.kernels import cuda as cuda_kernels
from hpcflow.kernels import dispatch, host
from hpcflow.lattice.action import plaquette_re_tr_torch, staple_sum_torch
from hpcflow.lattice.geometry import Lattice

__all__ = ["main"]

PLAQ_FLOPS = 3582
STAPLE_FLOPS_PER_LINK = 2574
TARGET_SPEEDUP = 20.0
TARGET_MATMUL_FRACTION = 0.20
TARGET_GPU_PEAK_FRACTION = 0.60


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


# ---------------------------------------------------------------------------------- GPU


def gpu_unavailable_reason() -> str | None:
    """Why ``--device cuda`` cannot run here, or None."""
    missing = []
    if not torch.cuda.is_available():
        missing.append("torch sees no CUDA GPU")
    if not cuda_kernels.cupy_available():
        missing.append("cupy is not installed (pip install cupy-cuda12x or cupy-cuda13x)")
    return "; ".join(missing) or None


def cuda_best_time(fn: Callable[[], object], reps: int) -> float:
    """Best time of ``reps`` calls (seconds) by CUDA events on the current stream, after one
    warm-up call (which also compiles the kernels)."""
    fn()
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return best


def gpu_copy_gbs(reps: int = 5) -> float:
    """Device-to-device copy ``b = a`` of float64 (bytes read + written), GB/s: the
    bandwidth a streaming kernel can reach on this GPU."""
    free, _ = torch.cuda.mem_get_info()
    n = min(1 << 28, free // (8 * 4))  # two tensors of at most 2 GiB, a quarter of free memory
    a = torch.rand(n, dtype=torch.float64, device="cuda")
    b = torch.empty_like(a)
    t = cuda_best_time(lambda: b.copy_(a), reps)
    return 16.0 * n / t / 1e9


def random_su3_on_device(lat: Lattice, seed: int, device: str) -> torch.Tensor:
    """SU(3) links made on ``device`` by Gram-Schmidt of two Gaussian rows, third row =
    conj(row 1 x row 2) (elementwise work: QR of 10^7 small matrices is slow on a host)."""
    g = torch.Generator(device=device).manual_seed(seed)
    z = torch.randn(lat.nd, *lat.shape, 2, 3, dtype=torch.complex128, generator=g, device=device)
    r1 = z[..., 0, :] / torch.linalg.vector_norm(z[..., 0, :], dim=-1, keepdim=True)
    r2 = z[..., 1, :] - (r1.conj() * z[..., 1, :]).sum(-1, keepdim=True) * r1
    r2 = r2 / torch.linalg.vector_norm(r2, dim=-1, keepdim=True)
    r3 = torch.linalg.cross(r1, r2).conj()
    return torch.stack([r1, r2, r3], dim=-2).contiguous()


def bench_size_gpu(L: int, reps: int, peak: float, copy: float) -> dict:
    lat = Lattice((L,) * 4)
    U = random_su3_on_device(lat, seed=L, device="cuda")
    V = lat.volume
    link_bytes = 9 * 16
    res: dict = {"L": L, "sites": V}
    ref = plaquette_re_tr_torch(U, lat)
    err = float((dispatch.plaquette_re_tr(U, lat, "cuda") - ref).abs().max())
    assert err < 1e-12, f"CUDA plaquette differs from the torch reference by {err}"
    s_ref = staple_sum_torch(U, lat)
    err = float((dispatch.staple_sum(U, lat, "cuda") - s_ref).abs().max())
    assert err < 1e-12, f"CUDA staple differs from the torch reference by {err}"
    del ref, s_ref
    rows = {
        "plaquette": (lambda: plaquette_re_tr_torch(U, lat), lambda: dispatch.plaquette_re_tr(U, lat, "cuda"),
                      PLAQ_FLOPS, V * (4 * link_bytes + 6 * 8)),
        "staple": (lambda: staple_sum_torch(U, lat), lambda: dispatch.staple_sum(U, lat, "cuda"),
                   4 * STAPLE_FLOPS_PER_LINK, V * (8 * link_bytes)),
    }
    for name, (f_ref, f_cuda, flops, nbytes) in rows.items():
        t_ref = cuda_best_time(f_ref, max(1, reps - 1))
        t = cuda_best_time(f_cuda, reps)
        gbs = nbytes / t / 1e9
        res[name] = {
            "torch_ns_per_site": t_ref / V * 1e9,
            "cuda_ns_per_site": t / V * 1e9,
            "speedup": t_ref / t,
            "cuda_gflops": flops * V / t / 1e9,
            "cuda_gbs": gbs,
            "fraction_of_peak": gbs / peak,
            "fraction_of_copy": gbs / copy,
        }
    return res


def main_gpu(args: argparse.Namespace) -> dict:
    why = gpu_unavailable_reason()
    if why is not None:
        print(f"bench/kernels.py: --device cuda cannot run here: {why}", file=sys.stderr)
        raise SystemExit(2)
    dev = torch.cuda.current_device()
    name = torch.cuda.get_device_name(dev)
    peak = cuda_kernels.device_peak_bandwidth_gbs(dev)
    copy = gpu_copy_gbs()
    sizes = args.sizes or [24, 32, 48]
    out = {"device": name, "peak_gbs": peak, "copy_gbs": copy, "sizes": []}
    print(f"GPU {name}   nominal peak {peak:.0f} GB/s   device copy {copy:.0f} GB/s ({copy / peak:.1%} of peak)")
    print(f"{'L':>3} {'kernel':<9} {'torch ns/site':>13} {'cuda ns/site':>12} {'speedup':>8} "
          f"{'GFLOP/s':>8} {'GB/s':>7} {'/peak':>6} {'/copy':>6}")
    for L in sizes:
        r = bench_size_gpu(L, args.reps, peak, copy)
        out["sizes"].append(r)
        for k in ("plaquette", "staple"):
            x = r[k]
            print(f"{L:>3} {k:<9} {x['torch_ns_per_site']:>13.2f} {x['cuda_ns_per_site']:>12.3f} "
                  f"{x['speedup']:>7.1f}x {x['cuda_gflops']:>8.0f} {x['cuda_gbs']:>7.0f} "
                  f"{x['fraction_of_peak']:>6.1%} {x['fraction_of_copy']:>6.1%}")
    ok = {k: all(r[k]["fraction_of_peak"] >= TARGET_GPU_PEAK_FRACTION for r in out["sizes"])
          for k in ("plaquette", "staple")}
    print(f"target: >= {TARGET_GPU_PEAK_FRACTION:.0%} of peak memory bandwidth: "
          + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in ok.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cpu: host kernels vs torch on the CPU; cuda: CUDA kernels vs torch on the GPU")
    ap.add_argument("--sizes", type=int, nargs="+", default=None,
                    help="lattice extents L of L^4 (default: 16 24 on cpu, 24 32 48 on cuda)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="wall time, or process CPU time (robust on a shared machine with"
                         " OMP_NUM_THREADS=1; CPU time over all threads otherwise)")
    args = ap.parse_args(argv)
    if args.sizes is not None and any(L < 2 for L in args.sizes):
        ap.error(f"--sizes: every extent must be >= 2, got {args.sizes}")
    if args.reps < 1:
        ap.error(f"--reps must be >= 1, got {args.reps}")
    if args.device == "cuda":
        return main_gpu(args)
    args.sizes = args.sizes or [16, 24]
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
