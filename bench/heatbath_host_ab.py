"""A/B timing of the host heat bath / overrelaxation (``kernels/heatbath_host.cpp``) in one
process, against a float64 GEMM measured in the same loop.

The machine is shared and noisy (2-3x swings within minutes), so the old build (the kernel
sources of a git revision, default HEAD) and the working tree are loaded side by side and
their calls alternate on the same field, with a 1024^2 float64 ``torch.mm`` in between; the
ratios of best and median times are what to read. Timed, per version (4D SU(3) float64,
beta = 6 on a thermalised-ish field):

* ``hb``: one heat-bath sweep in the kernel (old: the 8 sub-step calls in place; new:
  ``hpcflow_hb_sweeps_vn`` in place, i.e. with its transposes in and out);
* ``or``: one overrelaxation sweep, likewise;
* ``compound``: ``heatbath_or_sweep(n_or=1)`` through the wrapper (old: the old wrapper's
  work: copy, 16 sub-step calls, two unitarity checks; new: ``heatbath_or_sweep_host``);
* new only, ``or3`` / ``hb+2or``: 3 sweeps in one call, from which the cost of one sweep
  without the transposes in and out is derived (medians).

Rates: ~3480 (HB) and ~3400 (OR) flops per link (see heatbath_host.cpp), as % of the GEMM
rate of the same run.

Usage::

    python bench/heatbath_host_ab.py [--rev HEAD] [--L 8 16] [--calls 10]
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from hpcflow.kernels import heatbath_host as hh
from hpcflow.kernels import host
from hpcflow.lattice.geometry import Lattice
from hpcflow.rng import CounterRNG

__all__ = ["main"]

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("su_n.cuh", "host_harness.h", "philox.h", "heatbath_host.cpp")
FLOPS_HB, FLOPS_OR = 3480 * 4, 3400 * 4  # per site


def build_rev(rev: str, tmp: Path) -> ctypes.CDLL:
    d = tmp / "old"
    d.mkdir()
    for f in SOURCES:
        res = subprocess.run(["git", "show", f"{rev}:kernels/{f}"], cwd=ROOT, capture_output=True)
        if res.returncode != 0:
            raise SystemExit(f"no kernels/{f} at {rev}")
        (d / f).write_bytes(res.stdout)
    lib = d / "lib.so"
    cmd = ["g++", *host.HOST_FLAGS, "-DHPCFLOW_N=3", "-DHPCFLOW_REAL=double", "-DHPCFLOW_ND=4",
           "-I", str(d), str(d / "heatbath_host.cpp"), "-o", str(lib)]
    subprocess.run(cmd, check=True)
    return ctypes.CDLL(str(lib))


def warm_field(L: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(L)
    H = torch.randn(4, L, L, L, L, 3, 3, dtype=torch.complex128, generator=gen)
    H = (H - H.mH) / 2
    H = H - torch.eye(3) * H.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None]
    U = torch.linalg.matrix_exp(0.3 * H).contiguous()
    lat = Lattice((L,) * 4)
    for s in range(3):
        U = hh.heatbath_or_sweep_host(U, lat, 6.0, CounterRNG(1, 0), 100 + s, n_or=1)
    return U


def old_callers(lib, U, L, beta, rng):  # type: ignore[no-untyped-def]
    from hpcflow.sampling import heatbath as hb

    vp, i64, ci, cu, cd = (ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int, ctypes.c_uint,
                           ctypes.c_double)
    ip, lp = ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_longlong)
    lib.hpcflow_heatbath_substep.argtypes = [vp, i64, ip, ip, lp, lp, ci, ci, cd, cu, cu, cu,
                                             i64, ci, cd]
    lib.hpcflow_heatbath_substep.restype = i64
    lib.hpcflow_overrelax_substep.argtypes = [vp, i64, ip, ip, lp, lp, ci, ci]
    lib.hpcflow_hb_unitarity_violation.argtypes = [vp, i64, ip, ip]
    lib.hpcflow_hb_unitarity_violation.restype = cd
    ext = (ctypes.c_int * 4)(L, L, L, L)
    halo = (ctypes.c_int * 4)(0, 0, 0, 0)
    org = (ctypes.c_longlong * 4)(0, 0, 0, 0)
    gs = (ctypes.c_longlong * 4)(L, L, L, L)
    k0, k1 = rng.key_site
    buf = U.clone()

    def hb_sweep(X=buf):  # type: ignore[no-untyped-def]
        for mu in range(4):
            for p in (0, 1):
                lib.hpcflow_heatbath_substep(X.data_ptr(), 1, ext, halo, org, gs, mu, p, beta, k0,
                                             k1, 7, hb._BLOCKS_PER_CONFIG, hb._MAX_ROUNDS,
                                             hb._KP_ALPHA_MIN)

    def or_sweep(X=buf):  # type: ignore[no-untyped-def]
        for mu in range(4):
            for p in (0, 1):
                lib.hpcflow_overrelax_substep(X.data_ptr(), 1, ext, halo, org, gs, mu, p)

    def compound():  # type: ignore[no-untyped-def]
        X = U.detach().resolve_conj().resolve_neg().clone(memory_format=torch.contiguous_format)
        hb_sweep(X)
        lib.hpcflow_hb_unitarity_violation(X.data_ptr(), 1, ext, halo)
        or_sweep(X)
        lib.hpcflow_hb_unitarity_violation(X.data_ptr(), 1, ext, halo)
        return X

    return {"hb": hb_sweep, "or": or_sweep, "compound": compound}


def new_callers(U, L, beta, rng):  # type: ignore[no-untyped-def]
    from hpcflow.sampling import heatbath as hb

    lib = hh.load_heatbath_library(3, "double", 4)
    lat = Lattice((L,) * 4)
    ext = (ctypes.c_int * 4)(L, L, L, L)
    k0, k1 = rng.key_site
    buf = U.clone()
    done, viol = ctypes.c_int(), ctypes.c_double()

    def sweeps(first_hb, n=1):  # type: ignore[no-untyped-def]
        return lambda: lib.hpcflow_hb_sweeps_vn(
            buf.data_ptr(), buf.data_ptr(), 1, ext, n, first_hb, beta, k0, k1, 7,
            hb._BLOCKS_PER_CONFIG, hb._MAX_ROUNDS, hb._KP_ALPHA_MIN, 1.0, ctypes.byref(done),
            ctypes.byref(viol))

    return {"hb": sweeps(1), "or": sweeps(0),
            "compound": lambda: hh.heatbath_or_sweep_host(U, lat, beta, rng, 7, n_or=1),
            "or3": sweeps(0, 3), "hb+2or": sweeps(1, 3)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", default="HEAD")
    ap.add_argument("--L", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--calls", type=int, default=10)
    args = ap.parse_args(argv)
    a = torch.randn(1024, 1024, dtype=torch.float64)
    b = torch.randn(1024, 1024, dtype=torch.float64)
    res: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        old = build_rev(args.rev, Path(tmp))
        for L in args.L:
            U = warm_field(L)
            rng = CounterRNG(5, 1)
            fns = {"old": old_callers(old, U, L, 6.0, rng), "new": new_callers(U, L, 6.0, rng)}
            times = {(v, k): [] for v in fns for k in fns[v]}
            gemm = []
            for v in fns:  # warm-up
                for f in fns[v].values():
                    f()
            for _ in range(args.calls):
                t0 = time.perf_counter()
                torch.mm(a, b)
                gemm.append(2 * 1024**3 / (time.perf_counter() - t0) / 1e9)
                for k in ("hb", "or", "compound", "or3", "hb+2or"):
                    for v in fns:
                        if k not in fns[v]:
                            continue
                        t0 = time.perf_counter()
                        fns[v][k]()
                        times[(v, k)].append((time.perf_counter() - t0) / L**4 * 1e9)
            gbest, gmed = max(gemm), statistics.median(gemm)
            print(f"{L}^4 SU(3) float64, {torch.get_num_threads()} threads, {args.calls} calls; "
                  f"GEMM 1024^2 float64 best {gbest:.1f} median {gmed:.1f} GFLOP/s")
            for k, fl in (("hb", FLOPS_HB), ("or", FLOPS_OR), ("compound", FLOPS_HB + FLOPS_OR)):
                for v in fns:
                    t = sorted(times[(v, k)])
                    best, med = t[0], statistics.median(t)
                    res[(L, v, k)] = (best, med)
                    print(f"  {k:>8} {v}: ns/site best {best:7.1f} median {med:7.1f}   "
                          f"% GEMM best {100 * fl / best / gbest:5.1f} "
                          f"median {100 * fl / med / gmed:5.1f}")
            # new: one sweep inside a multi-sweep call, without the transposes in and out
            med = {k: statistics.median(times[("new", k)]) for k in ("or", "or3", "hb+2or")}
            s_or = (med["or3"] - med["or"]) / 2
            s_hb = med["hb+2or"] - med["or3"] + s_or
            for k, t, fl in (("hb", s_hb, FLOPS_HB), ("or", s_or, FLOPS_OR)):
                res[(L, "new", k + " kernel")] = t
                print(f"  {k:>8} new, kernel only (median, from 1- and 3-sweep calls): ns/site "
                      f"{t:7.1f}   % GEMM {100 * fl / t / gmed:5.1f}")
            print(f"  transposes in + out ~ {med['or'] - s_or:.1f} ns/site")
    return res


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
