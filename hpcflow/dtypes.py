"""The precision maps between link (complex) and real dtypes: one definition for hpcflow.

Single precision is ``complex64`` links with ``float32`` reals (angles, momenta, log-dets),
double precision ``complex128`` with ``float64`` (the default: exactness of the chain).
"""

from __future__ import annotations

import torch

__all__ = ["complex_dtype", "precision_dtypes", "real_dtype"]

_SINGLE = (torch.float32, torch.complex64)


def real_dtype(dtype: torch.dtype) -> torch.dtype:
    """``float32`` for single precision (``float32``, ``complex64``), else ``float64``."""
    return torch.float32 if dtype in _SINGLE else torch.float64


def complex_dtype(dtype: torch.dtype) -> torch.dtype:
    """``complex64`` for single precision (``float32``, ``complex64``), else ``complex128``."""
    return torch.complex64 if dtype in _SINGLE else torch.complex128


def precision_dtypes(precision: str) -> tuple[torch.dtype, torch.dtype]:
    """``(link dtype, real dtype)`` of the config's ``precision`` ("float32" or "float64")."""
    if precision == "float32":
        return torch.complex64, torch.float32
    return torch.complex128, torch.float64
