"""The bijection contract of ARCHITECTURE.md.

``layer(x) -> (y, logdet)`` and ``layer.inverse(y) -> (x, -logdet)``, with ``logdet`` the
log-abs-determinant of the forward Jacobian per batch entry (shape ``(*B)``). A :class:`Flow`
composes bijections and sums their log-dets (as ``zuko`` / ``nflows`` do).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["Bijection", "Flow"]


class Bijection(torch.nn.Module):
    """Base class: ``forward(x) -> (y, log|det dy/dx|)``, ``inverse(y) -> (x, -log|det|)``."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class Flow(Bijection):
    """Composition ``f = f_n o ... o f_1``; log-dets add up along the chain."""

    def __init__(self, layers: Sequence[Bijection]) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logdet = torch.zeros(x.shape[:-3], dtype=x.dtype, device=x.device)
        for layer in self.layers:
            x, ld = layer(x)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logdet = torch.zeros(y.shape[:-3], dtype=y.dtype, device=y.device)
        for layer in reversed(self.layers):
            y, ld = layer.inverse(y)
            logdet = logdet + ld
        return y, logdet
