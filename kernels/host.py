"""Host (CPU) backend: the CUDA sources of this folder compiled with g++ and OpenMP.

The very same ``plaquette.cu``/``staple.cu`` are compiled as C++ through
``host_harness.h`` (CUDA qualifiers mapped to host ones, the grid looped over with one
OpenMP-parallel iteration per CUDA block): the *harness* build, which verifies the CUDA
sources. ``host_simd.cpp`` runs the same SU(N) algebra (``su_n.cuh``) with SIMD lanes
across sites (``variant="simd"``; see that file); both variants give the same values, and
the default ``auto`` picks ``simd`` for 4D local arrays of >= 1024 sites (where it is
faster: measured in bench/RESULTS.md) and ``harness`` otherwise (2D lattices and tiny 4D
ones, where the SIMD kernels' per-call transposition costs more than it saves). One shared library per (N, real type, Nd) [and lane width] is
built at first use into ``$HPCFLOW_CACHE/kernels/<hash>/`` (default
``~/.cache/hpcflow/kernels``); the hash covers the sources, the flags, the compiler
version and the CPU (``-march=native`` code must not run on another CPU model). Concurrent
builders (MPI ranks) are serialised by a file lock and publish by atomic rename, so a
reader never sees a half-written library. Threads: ``OMP_NUM_THREADS``.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # type hints only: hpcflow.lattice imports this package (dispatch)
    from hpcflow.lattice.geometry import Lattice

from ._common import (
    KERNEL_DIR,
    FieldInfo,
    as_kernel_input,
    check_weights,
    field_info,
    real_dtype,
)

__all__ = [
    "HOST_FLAGS",
    "VARIANTS",
    "build_host_library",
    "build_simd_library",
    "build_library",
    "cache_dir",
    "load_host_library",
    "load_simd_library",
    "simd_bytes",
    "simd_window_bytes",
    "simd_x1_block",
    "plaquette_re_tr",
    "staple_sum",
]

#: Optimisation flags: templates on N unroll the SU(3) products at -O3.
HOST_FLAGS = ("-O3", "-march=native", "-fopenmp", "-std=c++17", "-shared", "-fPIC")
_SOURCES = ("su_n.cuh", "host_harness.h", "plaquette.cu", "staple.cu", "host_lib.cpp")
_SIMD_SOURCES = ("su_n.cuh", "host_harness.h", "host_simd.cpp")
#: ``simd``: host_simd.cpp (SIMD lanes across sites); ``harness``: the .cu kernels compiled
#: through host_harness.h (one loop iteration per CUDA thread); ``auto`` (default): simd
#: for 4D local arrays of >= SIMD_MIN_SITES_4D sites, harness otherwise.
VARIANTS = ("auto", "simd", "harness")
#: ``auto`` uses ``simd`` for Nd = 4 and at least this many sites per local array.
SIMD_MIN_SITES_4D = 1024


def cache_dir() -> Path:
    """``$HPCFLOW_CACHE/kernels`` or ``~/.cache/hpcflow/kernels``."""
    root = os.environ.get("HPCFLOW_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "hpcflow"
    return base / "kernels"


def _cxx() -> str:
    cxx = os.environ.get("HPCFLOW_CXX", "g++")
    path = shutil.which(cxx)
    if path is None:
        raise RuntimeError(
            f"backend 'host' needs a C++ compiler: {cxx!r} not found on PATH "
            "(install g++ or set HPCFLOW_CXX)"
        )
    return path


@functools.cache
def _cpu_id() -> str:
    # -march=native code is specific to the CPU model; key the cache on it.
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return os.uname().machine


def _build_key(cxx: str, defines: tuple[str, ...], sources: tuple[str, ...] = _SOURCES) -> str:
    h = hashlib.sha256()
    for name in sources:
        h.update(name.encode())
        h.update((KERNEL_DIR / name).read_bytes())
    ver = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False)
    for part in (cxx, ver.stdout, " ".join(HOST_FLAGS), " ".join(defines), _cpu_id()):
        h.update(part.encode())
    return h.hexdigest()[:20]


def build_library(main: str, sources: tuple[str, ...], defines: tuple[str, ...], name: str,
                  root: Path | None = None) -> Path:
    """Compile ``main`` (a file of this folder) with :data:`HOST_FLAGS` and ``defines`` into
    ``<cache>/<hash>/name`` unless it is there; ``sources``: every file the hash covers."""
    cxx = _cxx()
    key = _build_key(cxx, defines, sources)
    folder = (root if root is not None else cache_dir()) / key
    lib = folder / name
    if lib.exists():
        return lib
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder per key; others wait, then reuse
        if lib.exists():
            return lib
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
        os.close(fd)
        cmd = [cxx, *HOST_FLAGS, *defines, "-I", str(KERNEL_DIR), str(KERNEL_DIR / main), "-o", tmp]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            os.unlink(tmp)
            raise RuntimeError(f"host kernel build failed: {' '.join(cmd)}\n{res.stderr}")
        os.replace(tmp, lib)  # atomic publish
    return lib


def _check_config(n: int, real: str, nd: int) -> None:
    if n not in (1, 2, 3):
        raise ValueError(f"n must be 1, 2 or 3, got {n}")
    if real not in ("double", "float"):
        raise ValueError(f"real must be 'double' or 'float', got {real!r}")
    if nd not in (2, 4):
        raise ValueError(f"nd must be 2 or 4, got {nd}")


def build_host_library(n: int, real: str, nd: int, root: Path | None = None) -> Path:
    """Compile (or find in the cache) the host library for ``(n, real, nd)``; its path."""
    _check_config(n, real, nd)
    defines = (f"-DHPCFLOW_N={n}", f"-DHPCFLOW_REAL={real}", f"-DHPCFLOW_ND={nd}")
    return build_library("host_lib.cpp", _SOURCES, defines,
                         f"libhpcflow_kernels_n{n}_{real}_{nd}d.so", root)


@functools.cache
def load_host_library(n: int, real: str, nd: int) -> ctypes.CDLL:
    """Build if needed and load the library for ``(n, real, nd)`` (once per process)."""
    lib = ctypes.CDLL(str(build_host_library(n, real, nd)))
    cfg = [ctypes.c_int(), ctypes.c_int(), ctypes.c_int()]
    lib.hpcflow_config(*(ctypes.byref(c) for c in cfg))
    got = (cfg[0].value, cfg[1].value, cfg[2].value)
    want = (n, nd, 8 if real == "double" else 4)
    if got != want:
        raise RuntimeError(f"host kernel library reports (N, Nd, bytes) = {got}, wanted {want}")
    vp, i64, ip, ci = ctypes.c_void_p, ctypes.c_longlong, ctypes.POINTER(ctypes.c_int), ctypes.c_int
    lib.hpcflow_plaquette_re_tr.argtypes = [vp, vp, i64, ip, ip]
    lib.hpcflow_plaquette_re_tr.restype = None
    lib.hpcflow_staple_sum.argtypes = [vp, vp, vp, i64, ci, ci, ip, ip]
    lib.hpcflow_staple_sum.restype = None
    return lib


def simd_bytes() -> int:
    """Vector width of the SIMD kernels on this CPU: ``$HPCFLOW_SIMD_BYTES`` if set, else
    64 with AVX-512, 32 with AVX/AVX2, 16 otherwise (SSE2, NEON)."""
    env = os.environ.get("HPCFLOW_SIMD_BYTES")
    if env is not None:
        if env not in ("8", "16", "32", "64"):
            raise ValueError(f"HPCFLOW_SIMD_BYTES={env!r}: allowed 8, 16, 32, 64")
        return int(env)
    return _cpu_simd_bytes()


@functools.cache
def _cpu_simd_bytes() -> int:
    flags = set(_cpu_id().split())
    if "avx512f" in flags:
        return 64
    if "avx" in flags:
        return 32
    return 16


#: Window budget of the SIMD kernels (bytes; ``HPCFLOW_SIMD_WINDOW_BYTES`` overrides): slabs
#: larger than this are processed in blocks of x_1 (see host_simd.cpp).
SIMD_WINDOW_BYTES = 8 << 20


def simd_window_bytes() -> int:
    """The SIMD kernels' window budget: ``HPCFLOW_SIMD_WINDOW_BYTES`` (a positive integer,
    bytes) or :data:`SIMD_WINDOW_BYTES`. host_simd.cpp reads the same variable."""
    raw = os.environ.get("HPCFLOW_SIMD_WINDOW_BYTES")
    if raw is None:
        return SIMD_WINDOW_BYTES
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise ValueError(f"HPCFLOW_SIMD_WINDOW_BYTES={raw!r}: allowed a positive integer (bytes)")
    return value


def simd_x1_block(lat_ext: tuple[int, ...], halo: tuple[int, ...], n: int, real: str,
                  staple: bool = False, all_sites: bool = False) -> int:
    """The x_1 block (computed x_1 values per block) host_simd.cpp uses for a 4D padded
    local array of extents ``lat_ext`` and halos ``halo`` under the current window budget;
    ``lat_ext[1]`` means whole slabs."""
    simd_window_bytes()  # validate
    lib = load_simd_library(n, real, len(lat_ext))
    arr = ctypes.c_int * len(lat_ext)
    return int(lib.hpcflow_simd_x1_block(arr(*lat_ext), arr(*halo), int(staple), int(all_sites)))


def build_simd_library(n: int, real: str, nd: int, nbytes: int | None = None,
                       root: Path | None = None) -> Path:
    """Compile (or find in the cache) ``host_simd.cpp`` for ``(n, real, nd)`` with vectors
    of ``nbytes`` (default :func:`simd_bytes`); its path."""
    _check_config(n, real, nd)
    nbytes = simd_bytes() if nbytes is None else nbytes
    size = 8 if real == "double" else 4
    if nbytes not in (8, 16, 32, 64) or nbytes < size:
        raise ValueError(f"SIMD width must be 8, 16, 32 or 64 bytes (>= one {real}), got {nbytes}")
    defines = (f"-DHPCFLOW_N={n}", f"-DHPCFLOW_REAL={real}", f"-DHPCFLOW_ND={nd}",
               f"-DHPCFLOW_SIMD_BYTES={nbytes}")
    return build_library("host_simd.cpp", _SIMD_SOURCES, defines,
                         f"libhpcflow_simd_n{n}_{real}_{nd}d_{nbytes}b.so", root)


def load_simd_library(n: int, real: str, nd: int, nbytes: int | None = None) -> ctypes.CDLL:
    """Build if needed and load ``host_simd.cpp`` for ``(n, real, nd, nbytes)`` (default
    width: :func:`simd_bytes`, read at every call); each library loads once per process."""
    return _load_simd_library(n, real, nd, simd_bytes() if nbytes is None else nbytes)


@functools.cache
def _load_simd_library(n: int, real: str, nd: int, nbytes: int) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(build_simd_library(n, real, nd, nbytes)))
    cfg = [ctypes.c_int() for _ in range(4)]
    lib.hpcflow_simd_config(*(ctypes.byref(c) for c in cfg))
    size = 8 if real == "double" else 4
    got = tuple(c.value for c in cfg)
    want = (n, nd, size, nbytes // size)
    if got != want:
        raise RuntimeError(f"SIMD kernel library reports (N, Nd, bytes, lanes) = {got}, wanted {want}")
    vp, i64, ip = ctypes.c_void_p, ctypes.c_longlong, ctypes.POINTER(ctypes.c_int)
    lib.hpcflow_plaquette_re_tr_simd.argtypes = [vp, vp, i64, ip, ip]
    lib.hpcflow_plaquette_re_tr_simd.restype = None
    lib.hpcflow_staple_sum_simd.argtypes = [vp, vp, vp, i64, ctypes.c_int, ctypes.c_int, ip, ip]
    lib.hpcflow_staple_sum_simd.restype = None
    lib.hpcflow_simd_x1_block.argtypes = [ip, ip, ctypes.c_int, ctypes.c_int]
    lib.hpcflow_simd_x1_block.restype = ctypes.c_int
    return lib


def _geom(info: FieldInfo) -> tuple[ctypes.Array, ctypes.Array]:
    arr = ctypes.c_int * info.nd
    return arr(*info.ext), arr(*info.halo)


def _host_info(U: torch.Tensor, lat: Lattice) -> FieldInfo:
    info = field_info(U, lat)
    if U.device.type != "cpu":
        raise ValueError(f"backend 'host' needs a CPU tensor, got U on {U.device}")
    return info


def _resolve_variant(variant: str, info: FieldInfo) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"host kernel variant {variant!r}: allowed {', '.join(VARIANTS)}")
    if variant == "auto":
        return "simd" if info.nd == 4 and info.nsites >= SIMD_MIN_SITES_4D else "harness"
    return variant


def plaquette_re_tr(U: torch.Tensor, lat: Lattice, variant: str = "auto") -> torch.Tensor:
    """``Re tr P_{mu nu}(x)``, shape ``(*B, n_planes, *lat.shape)``; 0 on halo sites.

    ``variant``: ``simd`` (``host_simd.cpp``), ``harness`` (``plaquette.cu`` through the
    host harness) or ``auto`` (see :data:`VARIANTS`); all give the same values.
    """
    info = _host_info(U, lat)
    variant = _resolve_variant(variant, info)
    u = as_kernel_input(U)
    out = torch.empty((*info.batch_shape, info.n_planes, *info.ext), dtype=real_dtype(U.dtype))
    ext, halo = _geom(info)
    if variant == "simd":
        simd_window_bytes()  # a clear error for a bad HPCFLOW_SIMD_WINDOW_BYTES
        lib = load_simd_library(info.n, info.real, info.nd)
        lib.hpcflow_plaquette_re_tr_simd(u.data_ptr(), out.data_ptr(), info.nbatch, ext, halo)
    else:
        lib = load_host_library(info.n, info.real, info.nd)
        lib.hpcflow_plaquette_re_tr(u.data_ptr(), out.data_ptr(), info.nbatch, ext, halo)
    return out


def staple_sum(
    U: torch.Tensor,
    lat: Lattice,
    weights: torch.Tensor | None = None,
    all_sites: bool = False,
    dagger: bool = False,
    variant: str = "auto",
) -> torch.Tensor:
    """Staple sum ``A_mu(x)`` (shape of U), see ``staple.cu``.

    ``weights[*B, plane, *shape]`` weights each plaquette's staple (the backward of the
    plaquette field); ``all_sites`` computes halo sites too (else they are 0); ``dagger``
    returns ``A^dag`` (torch's gradient convention). ``variant``: ``simd``
    (``host_simd.cpp``), ``harness`` (``staple.cu`` through the host harness) or ``auto``.
    """
    info = _host_info(U, lat)
    variant = _resolve_variant(variant, info)
    u = as_kernel_input(U)
    w = check_weights(weights, U, info) if weights is not None else None
    out = torch.empty_like(u)
    ext, halo = _geom(info)
    if variant == "simd":
        simd_window_bytes()
        fn = load_simd_library(info.n, info.real, info.nd).hpcflow_staple_sum_simd
    else:
        fn = load_host_library(info.n, info.real, info.nd).hpcflow_staple_sum
    fn(u.data_ptr(), None if w is None else w.data_ptr(), out.data_ptr(), info.nbatch,
       int(all_sites), int(dagger), ext, halo)
    return out
