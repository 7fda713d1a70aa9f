"""Convolutions over the site axes of a 2D, 3D or 4D lattice, with pluggable padding.

torch has no ``Conv4d``. :class:`Conv4d` composes ``Conv3d`` along the first site axis: with
kernel ``W[o, c, dt, dx, dy, dz]`` and a (pre-padded) input ``x``,

    y[:, o, t] = sum_dt conv3d(x[:, :, t + dt], W[:, :, dt])          (valid convolution),

i.e. ``k`` Conv3d calls whose batch holds the output time slices (``N * T_out`` volumes).

Padding is never done inside a convolution: :class:`LatticeCNN` calls ``pad_fn(x, width, nd)``
before every convolution. On one rank the lattice is a torus and :func:`circular_pad_nd` *is*
the halo exchange; the domain-decomposed version passes a halo-exchanging ``pad_fn`` (or a
pre-exchanged field with an identity ``pad_fn``) and uses the same modules.
:attr:`LatticeCNN.reach` is the receptive-field radius in sites (the halo a layer needs).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = ["Conv4d", "LatticeCNN", "circular_pad_nd", "lattice_conv"]

PadFnNd = Callable[[torch.Tensor, int, int], torch.Tensor]


def circular_pad_nd(x: torch.Tensor, width: int, nd: int) -> torch.Tensor:
    """Pad the ``nd`` trailing (site) axes of ``x`` periodically by ``width`` on each side.

    Works for any ``nd`` (``F.pad(mode="circular")`` stops at 3 axes) and any ``width``, also
    wider than an extent (the torus is wrapped as often as needed); autograd-friendly.
    """
    if width < 0:
        raise ValueError(f"width must be >= 0, got {width}")
    if width == 0:
        return x
    for d in range(x.dim() - nd, x.dim()):
        n = x.shape[d]
        idx = torch.remainder(torch.arange(-width, n + width, device=x.device), n)
        x = x.index_select(d, idx)
    return x


class Conv4d(torch.nn.Module):
    """Valid (unpadded) 4D convolution ``(N, C, T, X, Y, Z) -> (N, O, T-k+1, ...)``.

    Built from ``k`` Conv3d calls (module docstring); the parameters have the shapes a
    ``torch.nn.ConvNd`` would have, ``weight (O, C, k, k, k, k)`` and ``bias (O,)``, and are
    initialised the same way (Kaiming-uniform with ``a = sqrt(5)``).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True) -> None:
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
        k = int(kernel_size)
        self.kernel_size = k
        self.weight = torch.nn.Parameter(torch.empty(out_channels, in_channels, k, k, k, k))
        self.bias = torch.nn.Parameter(torch.empty(out_channels)) if bias else None
        torch.nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(in_channels * k**4)
            torch.nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 6:
            raise ValueError(f"Conv4d input must be (N, C, T, X, Y, Z), got shape {tuple(x.shape)}")
        n, c, t = x.shape[:3]
        k = self.kernel_size
        t_out = t - k + 1
        if t_out < 1 or any(s < k for s in x.shape[3:]):
            raise ValueError(f"Conv4d input {tuple(x.shape)} is smaller than the kernel {k}")
        out = None
        for dt in range(k):
            xs = x[:, :, dt : dt + t_out].transpose(1, 2).reshape(n * t_out, c, *x.shape[3:])
            y = F.conv3d(xs, self.weight[:, :, dt])
            out = y if out is None else out + y
        out = out.reshape(n, t_out, *out.shape[1:]).transpose(1, 2)
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1, 1, 1)
        return out


def lattice_conv(nd: int, in_channels: int, out_channels: int, kernel_size: int) -> torch.nn.Module:
    """Valid convolution over ``nd`` site axes: Conv2d, Conv3d or :class:`Conv4d`."""
    if nd == 2:
        return torch.nn.Conv2d(in_channels, out_channels, kernel_size, padding=0)
    if nd == 3:
        return torch.nn.Conv3d(in_channels, out_channels, kernel_size, padding=0)
    if nd == 4:
        return Conv4d(in_channels, out_channels, kernel_size)
    raise ValueError(f"lattice dimension must be 2, 3 or 4, got nd={nd}")


class LatticeCNN(torch.nn.Module):
    """``conv -> LeakyReLU -> ... -> conv`` over ``nd`` site axes; ``pad_fn`` before every conv.

    Input ``(N, C_in, *sites)``, output ``(N, C_out, *sites)`` (same site extents). ``hidden``:
    channels of the hidden layers (may be empty: one convolution).
    """

    def __init__(
        self,
        nd: int,
        in_channels: int,
        hidden: Sequence[int],
        out_channels: int,
        kernel_size: int,
        pad_fn: PadFnNd = circular_pad_nd,
    ) -> None:
        super().__init__()
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 \
                or kernel_size % 2 == 0:
            raise ValueError(f"flow.kernel_size must be a positive odd int, got {kernel_size!r}")
        if any(int(h) < 1 for h in hidden):
            raise ValueError(f"flow.hidden channels must be >= 1, got {list(hidden)}")
        chans = [int(in_channels), *[int(h) for h in hidden], int(out_channels)]
        self.nd = int(nd)
        self.convs = torch.nn.ModuleList(
            lattice_conv(self.nd, a, b, kernel_size) for a, b in itertools.pairwise(chans)
        )
        self.kernel_size = int(kernel_size)
        self.pad_fn = pad_fn

    @property
    def reach(self) -> int:
        """Receptive-field radius in sites: each convolution sees ``(k-1)/2`` further."""
        return len(self.convs) * (self.kernel_size - 1) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = (self.kernel_size - 1) // 2
        for i, conv in enumerate(self.convs):
            if i > 0:
                x = F.leaky_relu(x)
            x = conv(self.pad_fn(x, w, self.nd))
        return x
