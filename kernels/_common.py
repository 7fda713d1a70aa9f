"""Argument checks and geometry shared by the host and CUDA kernel wrappers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from hpcflow.dtypes import real_dtype

if TYPE_CHECKING:  # type hints only: hpcflow.lattice imports this package (dispatch)
    from hpcflow.lattice.geometry import Lattice

__all__ = ["KERNEL_DIR", "FieldInfo", "as_kernel_input", "check_weights", "field_info", "real_dtype"]

#: Folder holding the ``.cu``/``.cuh``/``.h``/``.cpp`` sources (installed as package data).
KERNEL_DIR = Path(__file__).resolve().parent

_SUPPORTED_N = (1, 2, 3)
_SUPPORTED_ND = (2, 4)
_SUPPORTED_DTYPES = (torch.complex128, torch.complex64)


@dataclass(frozen=True)
class FieldInfo:
    """What a kernel launch needs to know about a gauge field ``U[*B, mu, *shape, N, N]``."""

    n: int
    nd: int
    real: str  # C type of the real part: "double" or "float"
    batch_shape: tuple[int, ...]
    nbatch: int
    ext: tuple[int, ...]  # padded extents (lat.shape)
    halo: tuple[int, ...]  # halo width per dimension (0 where not padded)

    @property
    def n_planes(self) -> int:
        return self.nd * (self.nd - 1) // 2

    @property
    def nsites(self) -> int:
        """Sites of the padded local array."""
        v = 1
        for e in self.ext:
            v *= e
        return v


def field_info(U: torch.Tensor, lat: Lattice) -> FieldInfo:
    """Validate ``U`` against ``lat`` and the kernels' supported (N, dtype, Nd)."""
    if not isinstance(U, torch.Tensor):
        raise TypeError(f"U must be a torch.Tensor, got {type(U).__name__}")
    if U.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"U.dtype must be torch.complex128 or torch.complex64, got {U.dtype}")
    nd = lat.nd
    if nd not in _SUPPORTED_ND:
        raise ValueError(f"lat.nd must be one of {_SUPPORTED_ND} for the kernels, got {nd}")
    if U.dim() < nd + 3:
        raise ValueError(
            f"U must have shape (*B, {nd}, *{lat.shape}, N, N), got {tuple(U.shape)}"
        )
    n = U.shape[-1]
    expect = (nd, *lat.shape, n, n)
    if tuple(U.shape[-(nd + 3):]) != expect:
        raise ValueError(f"U must have trailing shape {expect} for lat, got {tuple(U.shape)}")
    if n not in _SUPPORTED_N:
        raise ValueError(f"matrix size N must be one of {_SUPPORTED_N}, got {n}")
    batch = tuple(U.shape[: U.dim() - (nd + 3)])
    nbatch = 1
    for b in batch:
        nbatch *= b
    halo = tuple(lat.halo if d in lat.padded_dims else 0 for d in range(nd))
    nsites = 1
    for e in lat.shape:
        nsites *= e
    if nsites >= 2**31:
        raise ValueError(f"local array must have < 2**31 sites for the kernels, got {nsites}")
    return FieldInfo(
        n=n,
        nd=nd,
        real="double" if U.dtype == torch.complex128 else "float",
        batch_shape=batch,
        nbatch=nbatch,
        ext=tuple(lat.shape),
        halo=halo,
    )


def check_weights(w: torch.Tensor, U: torch.Tensor, info: FieldInfo) -> torch.Tensor:
    """Weights ``w[*B, plane, *shape]`` as a contiguous real tensor on U's device."""
    shape = (*info.batch_shape, info.n_planes, *info.ext)
    if tuple(w.shape) != shape:
        raise ValueError(f"weights must have shape {shape}, got {tuple(w.shape)}")
    return w.to(device=U.device, dtype=real_dtype(U.dtype)).contiguous()


def as_kernel_input(U: torch.Tensor) -> torch.Tensor:
    """Plain C-contiguous storage (conj/neg bits resolved) without autograd history."""
    return U.detach().resolve_conj().resolve_neg().contiguous()
