"""Haar prior for U(1) link angles: uniform on [0, 2 pi) per link, ``log p = -n_links log 2 pi``."""

from __future__ import annotations

import math
from typing import Any

import torch

from hpcflow.lattice.geometry import Lattice

__all__ = ["HaarPriorU1"]


class HaarPriorU1:
    """Uniform angles ``z[*B, Nd, *lat.shape]`` on the lattice ``lat``."""

    def __init__(self, lat: Lattice) -> None:
        self.lat = lat
        self.n_links = lat.nd * lat.volume

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """``-n_links log(2 pi)`` for every batch entry, shape ``z.shape[:-(nd+1)]``."""
        batch = z.shape[: z.dim() - self.lat.nd - 1]
        return torch.full(batch, -self.n_links * math.log(2.0 * math.pi), dtype=z.dtype,
                          device=z.device)

    def sample(
        self, batch: int, generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float64, device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """``batch`` draws from a torch generator (training: a per-rank stream)."""
        shape = (int(batch), self.lat.nd, *self.lat.shape)
        return 2.0 * math.pi * torch.rand(shape, generator=generator, dtype=dtype, device=device)

    def sample_counter(
        self, rng: Any, first: int, batch: int, dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Proposals ``first..first+batch-1`` from a ``CounterRNG``.

        The draw of link ``l`` (global ``mu * V + site``) in proposal ``p`` uses Philox index
        ``p * n_links + l`` at step 0: the same numbers on any process grid.
        """
        links = self.lat.global_link_index(device)
        p = torch.arange(int(first), int(first) + int(batch), dtype=torch.int64, device=device)
        index = p.view(-1, *([1] * links.dim())) * self.n_links + links
        u = rng.uniform(index, 0, 1, dtype=dtype)[..., 0]
        return 2.0 * math.pi * u
