"""One entry point for the two hot spots, plaquette and staple, on every backend.

``backend`` (from the config's ``backend:`` key, carried by ``Lattice.backend``):

* ``"torch"``: the reference in :mod:`hpcflow.lattice.action` (any device, full autograd);
* ``"host"``: the CUDA sources compiled for the CPU with g++/OpenMP (:mod:`.host`);
* ``"cuda"``: the CUDA kernels through CuPy on torch CUDA tensors (:mod:`.cuda`);
* ``"auto"``: ``"cuda"`` for CUDA tensors when cupy is importable, else ``"torch"``.

Kernel outputs are 0 on halo sites, where the reference holds wrapped values: every
consumer uses the interior only (DESIGN.md). Gradients of the plaquette field flow through
the staple kernel (:mod:`.autograd`); a staple sum that itself needs a gradient is computed
by the reference.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # type hints only: hpcflow.lattice imports this package (dispatch)
    from hpcflow.lattice.geometry import Lattice

from .autograd import PlaquetteField, PlaquetteSum

__all__ = ["BACKENDS", "plaquette_re_tr", "plaquette_sum", "resolve_backend", "staple_sum"]

BACKENDS = ("auto", "torch", "host", "cuda")


def resolve_backend(backend: str, U: torch.Tensor) -> str:
    """The concrete backend ('torch', 'host' or 'cuda') for ``U``; clear errors otherwise."""
    from . import cuda

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "cuda" if U.device.type == "cuda" and cuda.cupy_available() else "torch"
    if backend == "host" and U.device.type != "cpu":
        raise ValueError(f"backend 'host' needs a CPU tensor, got U on {U.device}")
    if backend == "cuda":
        if U.device.type != "cuda":
            raise ValueError(f"backend 'cuda' needs a CUDA tensor, got U on {U.device}")
        if not cuda.cupy_available():
            raise RuntimeError(
                "backend 'cuda' needs cupy (pip install cupy-cuda12x); "
                "set backend: torch or auto in the config"
            )
    return backend


def _impl(name: str) -> ModuleType:
    if name == "host":
        from . import host

        return host
    from . import cuda

    return cuda


def _needs_grad(U: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and U.requires_grad


def plaquette_re_tr(U: torch.Tensor, lat: Lattice, backend: str = "auto") -> torch.Tensor:
    """``Re tr P_{mu nu}(x)`` per plane and site, ``(*B, n_planes, *lat.shape)``."""
    name = resolve_backend(backend, U)
    if name == "torch":
        from hpcflow.lattice.action import plaquette_re_tr_torch

        return plaquette_re_tr_torch(U, lat)
    impl = _impl(name)
    if _needs_grad(U):
        return PlaquetteField.apply(U, lat, impl)
    return impl.plaquette_re_tr(U, lat)


def plaquette_sum(U: torch.Tensor, lat: Lattice, backend: str = "auto") -> torch.Tensor:
    """``sum_{x interior, mu<nu} Re tr P_{mu nu}(x)``, shape ``(*B)`` (local to this rank)."""
    name = resolve_backend(backend, U)
    if name == "torch":
        from hpcflow.lattice.action import plaquette_re_tr_torch

        return lat.interior_sum(plaquette_re_tr_torch(U, lat), inner=0).sum(-1)
    impl = _impl(name)
    if _needs_grad(U):
        return PlaquetteSum.apply(U, lat, impl)
    return impl.plaquette_re_tr(U, lat).sum(dim=tuple(range(-(lat.nd + 1), 0)))


def staple_sum(U: torch.Tensor, lat: Lattice, backend: str = "auto") -> torch.Tensor:
    """Staple sum ``A_mu(x)`` (shape of ``U``); exact on interior sites."""
    name = resolve_backend(backend, U)
    if name == "torch" or _needs_grad(U):
        from hpcflow.lattice.action import staple_sum_torch

        return staple_sum_torch(U, lat)
    return _impl(name).staple_sum(U, lat)
