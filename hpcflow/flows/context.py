"""Context networks: CNNs over gauge-invariant features of frozen loops.

The padding step lives in one function (:func:`circular_pad`) so that the domain-decomposed
version can swap it for a halo exchange: on one rank the lattice is a torus and circular
padding *is* the halo exchange. :attr:`ContextCNN.reach` is the receptive-field radius in
sites, from which a layer derives its halo width.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = ["CNN_BACKENDS", "ContextCNN", "circular_pad"]

#: ``torch``: ``nn.Conv2d`` after :func:`circular_pad` (any device); ``host``: the C++
#: kernels of :mod:`hpcflow.kernels.flow` (CPU, float32/float64, batch-last layout).
CNN_BACKENDS = ("torch", "host")

PadFn = Callable[[torch.Tensor, int], torch.Tensor]


def circular_pad(x: torch.Tensor, width: int) -> torch.Tensor:
    """Pad the two trailing (site) axes of ``x[N, C, L0, L1]`` periodically by ``width``."""
    if width == 0:
        return x
    # two concatenations: fewer kernel launches (and backward nodes) than F.pad(circular)
    x = torch.cat([x[..., -width:, :], x, x[..., :width, :]], dim=-2)
    return torch.cat([x[..., -width:], x, x[..., :width]], dim=-1)


class ContextCNN(torch.nn.Module):
    """``Conv2d -> LeakyReLU -> ... -> Conv2d`` with periodic padding before every convolution.

    ``hidden``: channels of the hidden layers (may be empty: one convolution).
    """

    def __init__(
        self,
        in_channels: int,
        hidden: Sequence[int],
        out_channels: int,
        kernel_size: int,
        pad_fn: PadFn = circular_pad,
        backend: str = "torch",
    ) -> None:
        super().__init__()
        if backend not in CNN_BACKENDS:
            raise ValueError(f"context CNN backend must be one of {list(CNN_BACKENDS)}, got {backend!r}")
        if backend == "host" and pad_fn is not circular_pad:
            raise ValueError("context CNN backend 'host' implies circular padding; got a custom pad_fn")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"flow.kernel_size must be a positive odd int, got {kernel_size}")
        if any(int(h) < 1 for h in hidden):
            raise ValueError(f"flow.hidden channels must be >= 1, got {list(hidden)}")
        chans = [int(in_channels), *[int(h) for h in hidden], int(out_channels)]
        self.convs = torch.nn.ModuleList(
            torch.nn.Conv2d(a, b, kernel_size, padding=0) for a, b in itertools.pairwise(chans)
        )
        self.kernel_size = int(kernel_size)
        self.pad_fn = pad_fn
        self.backend = backend

    @property
    def reach(self) -> int:
        """Receptive-field radius in sites: each convolution sees ``(k-1)/2`` further."""
        return len(self.convs) * (self.kernel_size - 1) // 2

    def forward(self, x: torch.Tensor, rows: tuple[int, int, int] | None = None) -> torch.Tensor:
        """``x[N, C, L0, L1] -> [N, C_out, L0, L1]``.

        ``rows = (axis, start, step)`` evaluates the last convolution only at output indices
        ``start, start + step, ...`` along site ``axis`` (0 or 1): a strided convolution on the
        padded input shifted by ``start``. Coupling layers need kernel parameters on active
        plaquettes only (one row in four), so this saves most of the widest convolution.
        """
        w = (self.kernel_size - 1) // 2
        last = len(self.convs) - 1
        for i, conv in enumerate(self.convs):
            if i > 0:
                x = F.leaky_relu(x)
            x = self.pad_fn(x, w)
            if i == last and rows is not None:
                axis, start, step = rows
                stride = (step, 1) if axis == 0 else (1, step)
                x = F.conv2d(x.narrow(axis - 2, start, x.shape[axis - 2] - start), conv.weight,
                             conv.bias, stride=stride)
            else:
                x = conv(x)
        return x

    def forward_cf(self, x: torch.Tensor, rows: tuple[int, int, int] | None = None) -> torch.Tensor:
        """The same network on the channel-first, batch-last layout ``x[C, L0, L1, N]``
        (result ``[C_out, R0, R1, N]``): the native layout of the ``host`` backend, whose
        SIMD lanes run over the batch; the ``torch`` backend permutes to NCHW and back."""
        if self.backend == "host" and x.device.type == "cpu":
            from hpcflow.kernels.flow import circular_cnn

            return circular_cnn(x, [c.weight for c in self.convs], [c.bias for c in self.convs],
                                rows, slope=0.01)
        return self.forward(x.permute(3, 0, 1, 2), rows).permute(1, 2, 3, 0)
