"""One entry point for the two hot spots, plaquette and staple, on every backend.

``backend`` (from the config's ``backend:`` key, carried by ``Lattice.backend``):

* ``"torch"``: the reference in :mod:`hpcflow.lattice.action` (any device, full autograd);
* ``"host"``: the CUDA sources compiled for the CPU with g++/OpenMP (:mod:`.host`);
* ``"cuda"``: the CUDA kernels through CuPy on torch CUDA tensors (:mod:`.cuda`);
* ``"auto"``: ``"cuda"`` for CUDA tensors when cupy is importable; on CPU tensors
  ``"host"`` when a C++ compiler is on PATH, else ``"torch"``. A run resolves its
  backend once, before it starts, with :func:`choose_backend`, which also builds the host
  library for the run's group and falls back to ``"torch"`` with one warning line if that
  fails; ``hpcflow info`` prints the choice.

Kernel outputs are 0 on halo sites, where the reference holds wrapped values: every
consumer uses the interior only (DESIGN.md). Gradients of the plaquette field flow through
the staple kernel (:mod:`.autograd`); a staple sum that itself needs a gradient is computed
by the reference.
"""

from __future__ import annotations

import functools
import logging
from types import ModuleType
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # type hints only: hpcflow.lattice imports this package (dispatch)
    from hpcflow.lattice.geometry import Lattice

from .autograd import PlaquetteField, PlaquetteSum
from .backends import BACKENDS

__all__ = ["BACKENDS", "choose_backend", "host_compiler", "host_path", "plaquette_re_tr", "plaquette_sum",
           "resolve_backend", "staple_sum"]


def host_compiler() -> str | None:
    """Path of the host kernels' C++ compiler (``HPCFLOW_CXX``, default g++), or None."""
    import os
    import shutil

    return shutil.which(os.environ.get("HPCFLOW_CXX", "g++"))


@functools.cache
def _host_build_error(n: int, real: str, nd: int) -> str | None:
    """None when the host libraries for ``(n, real, nd)`` build and load here, else why not."""
    if host_compiler() is None:
        import os

        return f"no C++ compiler ({os.environ.get('HPCFLOW_CXX', 'g++')!r} not on PATH)"
    from . import host

    try:
        host.load_host_library(n, real, nd)
    except (OSError, RuntimeError) as e:
        return str(e).splitlines()[0]
    return None


def choose_backend(requested: str, device: str | torch.device = "cpu", n: int = 1,
                   real: str = "double", nd: int = 4,
                   log: logging.Logger | None = None) -> str:
    """The concrete backend of a run (chosen once, before it starts).

    ``auto``: on a CUDA device ``cuda`` with cupy, else ``torch``; on the CPU ``host``
    when the host library for ``(n, real, nd)`` (U(1): n = 1) builds here, else ``torch``
    with one warning line on ``log`` (default: the ``hpcflow`` logger) saying why. Other
    values are returned unchanged (their own checks run where they are used).
    """
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")
    if requested != "auto":
        return requested
    if torch.device(device).type == "cuda":
        from . import cuda

        return "cuda" if cuda.cupy_available() else "torch"
    why = _host_build_error(int(n), real, int(nd))
    if why is None:
        return "host"
    (log or logging.getLogger("hpcflow")).warning(
        "backend auto: the C++ host kernels are not available (%s); using the torch path, "
        "which is 10-100x slower for HMC and heat bath", why)
    return "torch"


def resolve_backend(backend: str, U: torch.Tensor) -> str:
    """The concrete backend ('torch', 'host' or 'cuda') for ``U``; clear errors otherwise.

    ``auto`` here: ``cuda`` for CUDA tensors with cupy, ``host`` for CPU tensors when a
    compiler is on PATH, else ``torch`` (runs resolve it once with :func:`choose_backend`).
    """
    from . import cuda

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if U.device.type == "cuda":
            return "cuda" if cuda.cupy_available() else "torch"
        return "host" if U.device.type == "cpu" and host_compiler() is not None else "torch"
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


def host_path(U: torch.Tensor, lat: Lattice) -> bool:
    """True when ``lat.backend`` resolves to ``host`` for ``U`` and ``U`` needs no gradient:
    then updates (HMC, heat bath) and the Wilson flow run their host kernels, where one
    exists for the field's group and dimension (each module's ``supports_*`` predicate)."""
    return resolve_backend(lat.backend, U) == "host" and not _needs_grad(U)


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
        from hpcflow.lattice.reference import plaquette_re_tr_torch

        return plaquette_re_tr_torch(U, lat)
    impl = _impl(name)
    if _needs_grad(U):
        return PlaquetteField.apply(U, lat, impl)
    return impl.plaquette_re_tr(U, lat)


def plaquette_sum(U: torch.Tensor, lat: Lattice, backend: str = "auto") -> torch.Tensor:
    """``sum_{x interior, mu<nu} Re tr P_{mu nu}(x)``, shape ``(*B)`` (local to this rank)."""
    name = resolve_backend(backend, U)
    if name == "torch":
        from hpcflow.lattice.reference import plaquette_re_tr_torch

        return lat.interior_sum(plaquette_re_tr_torch(U, lat), inner=0).sum(-1)
    impl = _impl(name)
    if _needs_grad(U):
        return PlaquetteSum.apply(U, lat, impl)
    return impl.plaquette_re_tr(U, lat).sum(dim=tuple(range(-(lat.nd + 1), 0)))


def staple_sum(U: torch.Tensor, lat: Lattice, backend: str = "auto") -> torch.Tensor:
    """Staple sum ``A_mu(x)`` (shape of ``U``); exact on interior sites."""
    name = resolve_backend(backend, U)
    if name == "torch" or _needs_grad(U):
        from hpcflow.lattice.reference import staple_sum_torch

        return staple_sum_torch(U, lat)
    return _impl(name).staple_sum(U, lat)
