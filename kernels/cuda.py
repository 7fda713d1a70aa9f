"""CUDA backend: the kernels of this folder compiled by CuPy (NVRTC) and launched on torch
CUDA tensors.

Each ``(kernel, N, real type, Nd)`` is compiled once per process as a ``cupy.RawModule``
with the template instance named in ``name_expressions`` (CuPy also keeps its own on-disk
cache). Tensors are handed over through DLPack (``cupy.from_dlpack``: a view, no copy) and
kernels run on torch's current stream of the tensor's device, so they are ordered with
surrounding torch work. cupy is imported lazily, only here.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
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
    "BLOCK",
    "NVRTC_OPTIONS",
    "cupy_available",
    "device_peak_bandwidth_gbs",
    "get_kernel",
    "kernel_source",
    "name_expression",
    "peak_bandwidth_gbs",
    "plaquette_re_tr",
    "staple_sum",
]

#: Threads per block; one thread per site.
BLOCK = 128

_KERNELS = {
    "plaquette": ("plaquette.cu", "hpcflow::plaquette_re_tr_kernel"),
    "staple": ("staple.cu", "hpcflow::staple_sum_kernel"),
}


def cupy_available() -> bool:
    """True when cupy can be imported (checked without importing it)."""
    return importlib.util.find_spec("cupy") is not None


def _cupy() -> Any:
    try:
        import cupy
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise RuntimeError(
            "backend 'cuda' needs cupy (pip install cupy-cuda12x) and a CUDA GPU; "
            "use backend 'torch' or 'host' on machines without them"
        ) from exc
    return cupy


def kernel_source(kind: str) -> str:
    """File name of the source holding ``kind`` in {'plaquette', 'staple'}."""
    if kind not in _KERNELS:
        raise ValueError(f"kind must be one of {sorted(_KERNELS)}, got {kind!r}")
    return _KERNELS[kind][0]


def name_expression(kind: str, n: int, real: str, nd: int) -> str:
    """The template instance CuPy asks NVRTC for, e.g. ``hpcflow::staple_sum_kernel<double, 3, 4>``."""
    if kind not in _KERNELS:
        raise ValueError(f"kind must be one of {sorted(_KERNELS)}, got {kind!r}")
    return f"{_KERNELS[kind][1]}<{real}, {n}, {nd}>"


#: NVRTC options of the loader (the include path finds su_n.cuh).
NVRTC_OPTIONS = ("-std=c++17", f"-I{KERNEL_DIR}")


@functools.cache
def get_kernel(kind: str, n: int, real: str, nd: int, device: int = 0) -> Any:
    """Compiled ``cupy.RawKernel`` for ``kind`` in {'plaquette', 'staple'}, cached per
    (kernel, N, real type, Nd, device); call it with ``device`` current in cupy."""
    expr = name_expression(kind, n, real, nd)
    cp = _cupy()
    mod = cp.RawModule(
        code=(KERNEL_DIR / kernel_source(kind)).read_text(),
        options=NVRTC_OPTIONS,
        name_expressions=(expr,),
    )
    return mod.get_function(expr)


# cudaDeviceAttr values of the CUDA runtime API (cudaDeviceProp.memoryClockRate is gone
# from CUDA 13; the attributes stay).
_ATTR_MEMORY_CLOCK_RATE = 36  # kHz
_ATTR_GLOBAL_MEMORY_BUS_WIDTH = 37  # bits


def peak_bandwidth_gbs(memory_clock_khz: int, bus_width_bits: int) -> float:
    """Nominal peak memory bandwidth in GB/s: two transfers per memory clock (GDDR/HBM, the
    convention of NVIDIA's device queries) across the bus."""
    if memory_clock_khz <= 0 or bus_width_bits <= 0:
        raise ValueError(f"memory clock ({memory_clock_khz} kHz) and bus width "
                         f"({bus_width_bits} bits) must be positive")
    return 2.0 * memory_clock_khz * 1e3 * (bus_width_bits / 8) / 1e9


def device_peak_bandwidth_gbs(device: int = 0) -> float:
    """Nominal peak memory bandwidth of CUDA device ``device`` (GB/s), from its attributes."""
    rt = _cupy().cuda.runtime
    clock = rt.deviceGetAttribute(getattr(rt, "cudaDevAttrMemoryClockRate", _ATTR_MEMORY_CLOCK_RATE), device)
    bus = rt.deviceGetAttribute(getattr(rt, "cudaDevAttrGlobalMemoryBusWidth", _ATTR_GLOBAL_MEMORY_BUS_WIDTH), device)
    return peak_bandwidth_gbs(int(clock), int(bus))


def _cuda_info(U: torch.Tensor, lat: Lattice) -> FieldInfo:
    info = field_info(U, lat)
    if U.device.type != "cuda":
        raise ValueError(f"backend 'cuda' needs a CUDA tensor, got U on {U.device}")
    return info


def _geom_args(info: FieldInfo) -> list[Any]:
    ext = list(info.ext) + [1] * (4 - info.nd)
    halo = list(info.halo) + [0] * (4 - info.nd)
    return [np.int32(e) for e in ext] + [np.int32(h) for h in halo]


@contextlib.contextmanager
def _on_torch_stream(U: torch.Tensor) -> Iterator[Any]:
    """cupy's device and current stream set to torch's current stream for ``U``: DLPack
    hand-over and launches are then ordered with the surrounding torch work."""
    cp = _cupy()
    if not torch.cuda.is_available():  # pragma: no cover - depends on the machine
        raise RuntimeError("backend 'cuda' needs a CUDA GPU, and torch sees none")
    stream = torch.cuda.current_stream(U.device)
    with cp.cuda.Device(U.device.index), cp.cuda.ExternalStream(stream.cuda_stream):
        yield cp


def _grid(total: int) -> tuple[int]:
    return ((total + BLOCK - 1) // BLOCK,)


def plaquette_re_tr(U: torch.Tensor, lat: Lattice) -> torch.Tensor:
    """``Re tr P_{mu nu}(x)``, shape ``(*B, n_planes, *lat.shape)``; 0 on halo sites."""
    info = _cuda_info(U, lat)
    u = as_kernel_input(U)
    out = torch.empty(
        (*info.batch_shape, info.n_planes, *info.ext), dtype=real_dtype(U.dtype), device=U.device
    )
    if info.nbatch == 0:
        return out
    with _on_torch_stream(U) as cp:
        k = get_kernel("plaquette", info.n, info.real, info.nd, U.device.index)
        args = (cp.from_dlpack(u), cp.from_dlpack(out), np.int64(info.nbatch), *_geom_args(info))
        k(_grid(info.nbatch * info.nsites), (BLOCK,), args)
    return out


def staple_sum(
    U: torch.Tensor,
    lat: Lattice,
    weights: torch.Tensor | None = None,
    all_sites: bool = False,
    dagger: bool = False,
) -> torch.Tensor:
    """Staple sum ``A_mu(x)`` (shape of U); arguments as in :func:`hpcflow.kernels.host.staple_sum`."""
    info = _cuda_info(U, lat)
    u = as_kernel_input(U)
    w = check_weights(weights, U, info) if weights is not None else None
    out = torch.empty_like(u)
    if info.nbatch == 0:
        return out
    with _on_torch_stream(U) as cp:
        k = get_kernel("staple", info.n, info.real, info.nd, U.device.index)
        # A null weight pointer selects unit weights (plain staple sum).
        w_arg = cp.from_dlpack(w) if w is not None else np.uint64(0)
        args = (cp.from_dlpack(u), w_arg, cp.from_dlpack(out), np.int64(info.nbatch),
                np.int32(int(all_sites)), np.int32(int(dagger)), *_geom_args(info))
        k(_grid(info.nbatch * info.nsites), (BLOCK,), args)
    return out
