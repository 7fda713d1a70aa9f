"""Wilson plaquette action, plaquettes and staples (torch reference implementation).

Conventions (ARCHITECTURE.md, docs/DESIGN.md): ``U[*B, mu, *x, i, j]`` is the link from
``x`` to ``x + mu_hat``;

    P_{mu nu}(x) = U_mu(x) U_nu(x+mu) U_mu(x+nu)^dag U_nu(x)^dag,
    S(U) = -(beta/N) sum_{x, mu<nu} Re tr P_{mu nu}(x)       (U(1): -beta sum cos theta_P),

the constant ``beta * V * n_planes`` is dropped. The staple sum ``A_mu(x)`` collects the
rest of every plaquette through ``U_mu(x)``, so ``sum_P Re tr P = Re tr(U_mu(x) A_mu(x)) +
(terms without U_mu(x))`` and torch autograd of the plaquette sum gives ``A^dag``.

Every neighbour access goes through ``lat.shift`` so the same code runs on halo-padded
local arrays (reach 1 for plaquettes and staples). ``plaquette_re_tr`` and ``staple_sum``
are the kernel hot spots; they are thin wrappers that a backend dispatch can reroute.
"""

from __future__ import annotations

import torch

from hpcflow.kernels import dispatch as kernel_dispatch
from hpcflow.lattice.geometry import Lattice, as_comm
from hpcflow.lattice.groups import dagger

__all__ = [
    "average_plaquette",
    "check_link_field",
    "link",
    "local_action_density",
    "plaquette",
    "plaquette_re_tr",
    "plaquette_re_tr_torch",
    "staple_sum",
    "staple_sum_torch",
    "wilson_action",
]


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


def plaquette_re_tr(u: torch.Tensor, lat: Lattice) -> torch.Tensor:
    """``Re tr P`` per plane and site, ``(*B, n_planes, *lat.shape)``; planes (0,1), (0,2), ...

    Runs on ``lat.backend`` (``hpcflow.kernels.dispatch``); exact on interior sites (the
    kernels write 0 on halo sites, the reference wrapped values).
    """
    return kernel_dispatch.plaquette_re_tr(u, lat, lat.backend)


def staple_sum(u: torch.Tensor, lat: Lattice) -> torch.Tensor:
    """Staple sum ``A_mu(x)``, shape of ``U``: ``Re tr(U_mu(x) A_mu(x))`` holds every plaquette.

    Runs on ``lat.backend``; exact on interior sites.
    """
    return kernel_dispatch.staple_sum(u, lat, lat.backend)


def _interior_plaquette_sum(u: torch.Tensor, lat: Lattice, comm) -> torch.Tensor:
    re = plaquette_re_tr(u, lat)
    local = lat.interior_sum(re, inner=0).sum(-1)
    return as_comm(comm).sum(local)


def average_plaquette(u: torch.Tensor, lat: Lattice, comm=None) -> torch.Tensor:
    """``<P> = (1/N) Re tr P`` averaged over interior sites (all ranks) and planes, ``(*B)``."""
    check_link_field(u, lat)
    n = u.shape[-1]
    return _interior_plaquette_sum(u, lat, comm) / (n * lat.n_planes * lat.volume)


def wilson_action(u: torch.Tensor, lat: Lattice, beta: float, comm=None) -> torch.Tensor:
    """Wilson action ``S = -(beta/N) sum_{x, mu<nu} Re tr P_{mu nu}(x)``, shape ``(*B)``."""
    check_link_field(u, lat)
    n = u.shape[-1]
    return -(beta / n) * _interior_plaquette_sum(u, lat, comm)


def local_action_density(u: torch.Tensor, lat: Lattice, beta: float) -> torch.Tensor:
    """``s(x) = -(beta/N) sum_{mu<nu} Re tr P_{mu nu}(x)``, ``(*B, *lat.shape)`` (all sites)."""
    n = u.shape[-1]
    return -(beta / n) * plaquette_re_tr(u, lat).sum(-(lat.nd + 1))
