"""Haar priors of the flow variables, one per theory (:class:`hpcflow.flows.base.GaugeTheory`).

* U(1) link angles: uniform on [0, 2 pi) per link, ``log p = -n_links log 2 pi``.
* SU(N) links: product Haar measure; densities are w.r.t. the *normalised* Haar measure, so
  ``log p = 0`` exactly (the reference measure of ``p = e^{-S}/Z``).

Both draw proposals from a ``CounterRNG`` keyed on (proposal, global link): the draw of link
``l`` (global ``mu * V + site``) in proposal ``p`` uses Philox index ``p * n_links + l`` at
step 0, so every process grid produces the same fields.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from hpcflow.dtypes import complex_dtype, real_dtype
from hpcflow.lattice.geometry import Lattice
from hpcflow.lattice.groups import Group, batched_index, draw_normals, get_group, random_field

__all__ = ["HaarPriorSUN", "HaarPriorU1"]


def _counter_index(lat: Lattice, n_links: int, first: int, batch: int,
                   device: torch.device | str | None) -> torch.Tensor:
    """Philox indices ``p * n_links + l`` of proposals ``first..first+batch-1``."""
    links = lat.global_link_index(device)
    p = torch.arange(int(first), int(first) + int(batch), dtype=torch.int64, device=device)
    return p.view(-1, *([1] * links.dim())) * n_links + links


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
        """Proposals ``first..first+batch-1`` from a ``CounterRNG`` (module docstring)."""
        index = _counter_index(self.lat, self.n_links, first, batch, device)
        u = rng.uniform(index, 0, 1, dtype=dtype)[..., 0]
        return 2.0 * math.pi * u


class HaarPriorSUN:
    """Product Haar measure on SU(N) links ``U[*B, Nd, *lat.shape, N, N]``; ``log prior = 0``."""

    def __init__(self, lat: Lattice, group: Group | str) -> None:
        self.lat = lat
        self.group = get_group(group) if isinstance(group, str) else group
        self.n_links = lat.nd * lat.volume

    def log_prob(self, U: torch.Tensor) -> torch.Tensor:
        """Zeros of shape ``(*B)`` (real dtype of ``U``)."""
        batch = U.shape[: U.dim() - self.lat.nd - 3]
        return torch.zeros(batch, dtype=real_dtype(U.dtype), device=U.device)

    def _host_haar(self, device: torch.device | str | None) -> bool:
        """SU(3) on the CPU with ``backend: host``: Haar draws by the C++ Gram-Schmidt
        (``kernels.flow_sun.haar_su3``, equal to the QR of ``SUN.haar`` to rounding)."""
        return (self.group.name == "su3" and getattr(self.lat, "backend", "torch") == "host"
                and torch.device(device or "cpu").type == "cpu")

    def sample(
        self, batch: int, generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.complex128, device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """``batch`` Haar fields from a torch generator (training: a per-rank stream)."""
        gen = generator if generator is not None else torch.Generator().manual_seed(
            int(torch.randint(0, 2**62, ())))
        if self._host_haar(device) and gen.device.type == "cpu":
            from hpcflow.kernels.flow_sun import haar_su3

            # the draws of lattice.groups.random_field, the matrices by the host kernel
            index = batched_index(self.lat.global_link_index(device), self.n_links, (int(batch),))
            return haar_su3(draw_normals(gen, index, 0, self.group.n_haar_normals), complex_dtype(dtype))
        return random_field(self.lat, self.group, gen, batch=(int(batch),),
                            dtype=complex_dtype(dtype), device=device)

    def sample_counter(
        self, rng: Any, first: int, batch: int, dtype: torch.dtype = torch.complex128,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Proposals ``first..first+batch-1``: link ``l`` of proposal ``p`` from the normals at
        Philox index ``p * n_links + l``, step 0 (module docstring)."""
        index = _counter_index(self.lat, self.n_links, first, batch, device)
        if self._host_haar(device) and index.device.type == "cpu" and hasattr(rng, "key_site"):
            from hpcflow.kernels.flow_sun import haar_su3_counter

            # the Philox normals of rng.normal (philox.h) and the matrices in one host call
            return haar_su3_counter(rng.key_site, index, complex_dtype(dtype))
        normals = rng.normal(index, 0, self.group.n_haar_normals, dtype=torch.float64)
        return self.group.haar(normals).to(complex_dtype(dtype))
