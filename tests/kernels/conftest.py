"""Fixtures for the kernel tests: random link fields and the compiled host libraries."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import torch


@pytest.fixture(scope="session")
def host_libs() -> dict:
    """Build (or load from the cache) every host library the tests use, once per session."""
    from hpcflow.kernels.host import load_host_library

    return {
        (n, real, nd): load_host_library(n, real, nd)
        for n, real, nd in itertools.product((1, 2, 3), ("double", "float"), (2, 4))
    }


@pytest.fixture
def random_links() -> Callable[..., torch.Tensor]:
    """``f(shape, n, dtype, seed)``: Haar-like unitary N x N matrices (QR of a complex Gaussian,
    phases left as they come) of shape ``(*shape, n, n)``; unitarity keeps every product
    O(1), so absolute tolerances mean the same for every N."""

    def make(shape: tuple[int, ...], n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(*shape, n, n, dtype=torch.complex128, generator=g)
        q, _ = torch.linalg.qr(z)
        return q.to(dtype)

    return make
