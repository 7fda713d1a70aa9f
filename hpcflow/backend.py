"""The concrete kernel backend of a run, chosen once from the config before the run starts.

``backend: auto`` (the default) means the C++ host kernels on CPUs where they build (a C++
compiler on PATH), the CUDA kernels on GPUs with cupy, and the torch path otherwise, with
one warning line saying why (``hpcflow.kernels.dispatch.choose_backend``). Every driver
(`run`, `train`, `sample`) builds its lattices with :func:`run_backend`, so the choice is
made in one place and ``hpcflow info`` reports the same one.
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["run_backend"]

_N = {"u1": 1, "su2": 2, "su3": 3}


def run_backend(cfg: Any, log: logging.Logger | None = None) -> str:
    """``cfg.backend`` resolved for ``cfg.device``, group, precision and dimension."""
    from hpcflow.kernels.dispatch import choose_backend

    real = "double" if cfg.precision == "float64" else "float"
    return choose_backend(cfg.backend, cfg.device, _N[cfg.group], real, len(cfg.lattice.shape), log)
