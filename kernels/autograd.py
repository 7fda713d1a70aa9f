"""Autograd Functions whose forward is the plaquette kernel and whose backward is the
(weighted) staple kernel, so flow training and HMC forces run on the kernels.

Gradient convention: for a real loss L of complex links torch expects
``dL/dRe U + i dL/dIm U``. With ``sum_P Re tr P = Re tr(U_mu(x) A_mu(x)) + ...`` this is
``A_mu(x)^dag`` (DESIGN.md), which the staple kernel writes directly (``dagger=True``).
The backward of the per-site field with upstream gradient ``g(plane, x)`` is the staple
sum in which each plaquette's staple carries the weight ``g`` of its base site; halo
sites of the field are constants (0), so their weights are masked out, and links of the
halo (which enter interior plaquettes) receive their gradient too (``all_sites=True``),
exactly as torch autograd of the reference does. Both Functions take batch dimensions.
Second derivatives are not provided (``once_differentiable``): use backend 'torch'.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

import torch
from torch.autograd.function import once_differentiable

if TYPE_CHECKING:  # type hints only: hpcflow.lattice imports this package (dispatch)
    from hpcflow.lattice.geometry import Lattice

from ._common import real_dtype

__all__ = ["PlaquetteField", "PlaquetteSum"]


def _weighted_staple_dagger(
    impl: ModuleType, U: torch.Tensor, lat: Lattice, w: torch.Tensor
) -> torch.Tensor:
    mask = lat.interior(device=U.device).to(real_dtype(U.dtype))
    return impl.staple_sum(U, lat, weights=w * mask, all_sites=True, dagger=True)


class PlaquetteField(torch.autograd.Function):
    """``Re tr P`` per plane and site, ``(*B, n_planes, *lat.shape)`` (0 on halo sites).

    ``impl`` is :mod:`hpcflow.kernels.host` or :mod:`hpcflow.kernels.cuda`.
    """

    @staticmethod
    def forward(ctx, U: torch.Tensor, lat: Lattice, impl: ModuleType) -> torch.Tensor:
        ctx.save_for_backward(U)
        ctx.lat, ctx.impl = lat, impl
        return impl.plaquette_re_tr(U, lat)

    @staticmethod
    @once_differentiable
    def backward(ctx, g: torch.Tensor):
        (U,) = ctx.saved_tensors
        return _weighted_staple_dagger(ctx.impl, U, ctx.lat, g), None, None


class PlaquetteSum(torch.autograd.Function):
    """``sum_{x interior, mu<nu} Re tr P_{mu nu}(x)``, shape ``(*B)``.

    The Wilson action is ``-(beta/N)`` times this (times the global sum over ranks).
    """

    @staticmethod
    def forward(ctx, U: torch.Tensor, lat: Lattice, impl: ModuleType) -> torch.Tensor:
        ctx.save_for_backward(U)
        ctx.lat, ctx.impl = lat, impl
        field = impl.plaquette_re_tr(U, lat)  # halo sites hold 0: a full sum is the interior sum
        return field.sum(dim=tuple(range(-(lat.nd + 1), 0)))

    @staticmethod
    @once_differentiable
    def backward(ctx, g: torch.Tensor):
        (U,) = ctx.saved_tensors
        lat = ctx.lat
        w = g.reshape(g.shape + (1,) * (lat.nd + 1)).expand(
            *g.shape, lat.n_planes, *lat.shape
        )
        return _weighted_staple_dagger(ctx.impl, U, lat, w), None, None
