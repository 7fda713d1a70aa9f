"""A/B timing of versions of the SIMD host kernels (``kernels/host_simd.cpp``) in one process.

On a shared machine the speed of a kernel can drift by 2x within minutes, so timing two
versions one after the other compares the neighbours' load, not the code. This script builds
each version (the kernel sources of a git revision, or of the working tree) into its own
shared library, loads them side by side, and alternates their calls on the same field, so
every version sees the same conditions. It prints, per version, the best, first-quartile and
median ns/site and their ratio to the first version, after checking that all versions give
the same values (1e-12).

Usage::

    python bench/kernels_ab.py [--rev HEAD] [--rev worktree] [--kernel plaquette|staple]
                               [--L 16] [--calls 20] [--clock cpu|wall]

``--rev`` (repeatable; default: HEAD and the working tree): a git revision or ``worktree``.
4D SU(3) float64, vector width of this CPU (``HPCFLOW_SIMD_BYTES`` to override), threads
from ``OMP_NUM_THREADS``. With ``--clock cpu`` use one thread (CPU time sums the threads).
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from hpcflow.kernels import host

__all__ = ["main"]

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("host_simd.cpp", "su_n.cuh", "host_harness.h")
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def sources_of(rev: str) -> dict[str, bytes]:
    """The kernel sources of git revision ``rev`` (or of the working tree)."""
    if rev == "worktree":
        return {f: (ROOT / "kernels" / f).read_bytes() for f in SOURCES}
    out = {}
    for f in SOURCES:
        res = subprocess.run(["git", "show", f"{rev}:kernels/{f}"], cwd=ROOT, capture_output=True)
        if res.returncode != 0:
            raise SystemExit(f"bench/kernels_ab.py: --rev {rev!r}: no kernels/{f} there "
                             f"({res.stderr.decode().strip() or 'git show failed'})")
        out[f] = res.stdout
    return out


def build(srcs: dict[str, bytes], workdir: Path) -> Path:
    """Compile one version with the flags of hpcflow.kernels.host; identical sources once."""
    key = hashlib.sha256(b"".join(srcs[f] for f in SOURCES)).hexdigest()[:16]
    d = workdir / key
    lib = d / "lib.so"
    if lib.exists():
        return lib
    d.mkdir(parents=True)
    for f, text in srcs.items():
        (d / f).write_bytes(text)
    defines = ["-DHPCFLOW_N=3", "-DHPCFLOW_REAL=double", "-DHPCFLOW_ND=4",
               f"-DHPCFLOW_SIMD_BYTES={host.simd_bytes()}"]
    cmd = ["g++", *host.HOST_FLAGS, *defines, "-I", str(d), str(d / "host_simd.cpp"), "-o", str(lib)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"bench/kernels_ab.py: build failed: {' '.join(cmd)}\n{res.stderr}")
    return lib


def caller(lib: ctypes.CDLL, kernel: str, U: torch.Tensor, out: torch.Tensor, L: int):
    ext = (ctypes.c_int * 4)(L, L, L, L)
    halo = (ctypes.c_int * 4)(0, 0, 0, 0)
    if kernel == "plaquette":
        fn = lib.hpcflow_plaquette_re_tr_simd
        return lambda: fn(ctypes.c_void_p(U.data_ptr()), ctypes.c_void_p(out.data_ptr()),
                          ctypes.c_longlong(1), ext, halo)
    fn = lib.hpcflow_staple_sum_simd
    return lambda: fn(ctypes.c_void_p(U.data_ptr()), None, ctypes.c_void_p(out.data_ptr()),
                      ctypes.c_longlong(1), ctypes.c_int(0), ctypes.c_int(1), ext, halo)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", action="append", default=None, help="git revision or 'worktree' (repeatable)")
    ap.add_argument("--kernel", choices=("plaquette", "staple"), default="plaquette")
    ap.add_argument("--L", type=int, default=16, help="lattice extent of L^4 (default 16)")
    ap.add_argument("--calls", type=int, default=20, help="timed calls per version (default 20)")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    args = ap.parse_args(argv)
    revs = args.rev or ["HEAD", "worktree"]
    if args.L < 2:
        ap.error(f"--L must be >= 2, got {args.L}")
    if args.calls < 1:
        ap.error(f"--calls must be >= 1, got {args.calls}")
    now = CLOCKS[args.clock]
    L = args.L
    g = torch.Generator().manual_seed(L)
    z = torch.randn(4, L, L, L, L, 3, 3, dtype=torch.complex128, generator=g)
    U = torch.linalg.qr(z)[0].contiguous()
    V = L**4
    with tempfile.TemporaryDirectory() as tmp:
        libs = [ctypes.CDLL(str(build(sources_of(r), Path(tmp)))) for r in revs]
        outs = [torch.empty(V * (6 if args.kernel == "plaquette" else 4 * 9 * 2), dtype=torch.float64)
                for _ in revs]
        fns = [caller(lib, args.kernel, U, o, L) for lib, o in zip(libs, outs)]
        for fn in fns:  # warm-up (scratch allocation), and the values must agree
            fn()
        for r, o in zip(revs[1:], outs[1:]):
            err = float((o - outs[0]).abs().max())
            if err > 1e-12:
                raise SystemExit(f"bench/kernels_ab.py: {r} differs from {revs[0]} by {err}")
        times: list[list[float]] = [[] for _ in revs]
        for _ in range(args.calls):
            for i, fn in enumerate(fns):
                t0 = now()
                fn()
                times[i].append((now() - t0) / V * 1e9)
    res = {}
    print(f"{args.kernel}, {L}^4 SU(3) float64, {torch.get_num_threads()} torch threads, clock {args.clock}, "
          f"{args.calls} alternating calls per version")
    base = None
    for r, t in zip(revs, times):
        t = sorted(t)
        q = {"best": t[0], "q25": t[len(t) // 4], "median": statistics.median(t)}
        base = base or q
        res[r] = q
        print(f"{r:>12}: ns/site best {q['best']:8.1f}  q25 {q['q25']:8.1f}  median {q['median']:8.1f}"
              f"   (/ {revs[0]}: {q['best'] / base['best']:.3f} {q['q25'] / base['q25']:.3f} "
              f"{q['median'] / base['median']:.3f})")
    return res


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
