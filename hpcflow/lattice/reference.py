"""The torch reference of the two kernel hot spots (plaquette field, staple sum) and the
helpers they need, in one module that both ``hpcflow.lattice.action`` and
``hpcflow.kernels`` import (the kernels compare against it and fall back to it), so neither
imports the other back. Conventions: :mod:`hpcflow.lattice.action`.
"""

from __future__ import annotations

import torch

from hpcflow.lattice.geometry import Lattice
from hpcflow.lattice.groups import dagger

__all__ = ["check_link_field", "link", "plaquette", "plaquette_re_tr_torch", "staple_sum_torch"]


def check_link_field(u: torch.Tensor, lat: Lattice, name: str = "U") -> None:
    """Raise a clear error unless ``u`` has shape ``(*B, nd, *lat.shape, N, N)``, complex."""
    if not torch.is_tensor(u):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(u).__name__}")
    if u.dtype not in (torch.complex64, torch.complex128):
        raise TypeError(f"{name} must be complex64 or complex128, got {u.dtype}")
    tail = (lat.nd, *lat.shape)
    nd = lat.nd
    if (
        u.dim() < nd + 3
        or tuple(u.shape[-(nd + 3) : -2]) != tail
        or u.shape[-1] != u.shape[-2]
    ):
        raise ValueError(
            f"{name} must have shape (*B, {nd}, {', '.join(map(str, lat.shape))}, N, N), "
            f"got {tuple(u.shape)}"
        )


def link(u: torch.Tensor, lat: Lattice, mu: int) -> torch.Tensor:
    """The site matrix field ``U_mu(x)``, shape ``(*B, *lat.shape, N, N)``."""
    return u.select(-(lat.nd + 3), mu)


def plaquette(u: torch.Tensor, lat: Lattice, mu: int, nu: int) -> torch.Tensor:
    """Untraced ``P_{mu nu}(x) = U_mu(x) U_nu(x+mu) U_mu(x+nu)^dag U_nu(x)^dag``."""
    if not (0 <= mu < lat.nd and 0 <= nu < lat.nd) or mu == nu:
        raise ValueError(f"plane (mu, nu) must be two distinct directions in [0, {lat.nd}), "
                         f"got ({mu}, {nu})")
    umu, unu = link(u, lat, mu), link(u, lat, nu)
    return (umu @ lat.shift(unu, mu)) @ dagger(unu @ lat.shift(umu, nu))


def plaquette_re_tr_torch(u: torch.Tensor, lat: Lattice) -> torch.Tensor:
    """``Re tr P_{mu nu}(x)`` per plane and site, ``(*B, n_planes, *lat.shape)`` (real).

    Uses ``Re tr(A B^dag) = Re sum_ij A_ij conj(B_ij)`` with ``A = U_mu(x) U_nu(x+mu)`` and
    ``B = U_nu(x) U_mu(x+nu)``: two matrix products per plaquette instead of three.
    """
    out = []
    for mu, nu in lat.planes():
        umu, unu = link(u, lat, mu), link(u, lat, nu)
        a = umu @ lat.shift(unu, mu)
        b = unu @ lat.shift(umu, nu)
        out.append((a * b.conj()).real.sum((-1, -2)))
    return torch.stack(out, dim=-(lat.nd + 1))


def staple_sum_torch(u: torch.Tensor, lat: Lattice) -> torch.Tensor:
    """Staple sum ``A_mu(x)`` (shape of ``U``), DESIGN.md:

    ``A_mu(x) = sum_{nu != mu} [U_nu(x+mu) U_mu(x+nu)^dag U_nu(x)^dag
                              + U_nu(x+mu-nu)^dag U_mu(x-nu)^dag U_nu(x-nu)]``.

    The lower staple at ``x`` is ``L(x - nu)`` with ``L(y) = U_nu(y+mu)^dag U_mu(y)^dag U_nu(y)``.
    """
    nd = lat.nd
    out = []
    for mu in range(nd):
        umu = link(u, lat, mu)
        acc = torch.zeros_like(umu)
        for nu in range(nd):
            if nu == mu:
                continue
            unu = link(u, lat, nu)
            unu_xmu = lat.shift(unu, mu)
            acc = acc + unu_xmu @ dagger(unu @ lat.shift(umu, nu))
            acc = acc + lat.shift(dagger(umu @ unu_xmu) @ unu, nu, -1)
        out.append(acc)
    return torch.stack(out, dim=-(nd + 3))
