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
from hpcflow.lattice.geometry import Comm, Lattice, as_comm
from hpcflow.lattice.reference import (
    check_link_field,
    link,
    plaquette,
    plaquette_re_tr_torch,
    staple_sum_torch,
)

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


def _interior_plaquette_sum(u: torch.Tensor, lat: Lattice, comm: Comm | None) -> torch.Tensor:
    re = plaquette_re_tr(u, lat)
    local = lat.interior_sum(re, inner=0).sum(-1)
    return as_comm(comm).sum(local)


def average_plaquette(u: torch.Tensor, lat: Lattice, comm: Comm | None = None) -> torch.Tensor:
    """``<P> = (1/N) Re tr P`` averaged over interior sites (all ranks) and planes, ``(*B)``."""
    check_link_field(u, lat)
    n = u.shape[-1]
    return _interior_plaquette_sum(u, lat, comm) / (n * lat.n_planes * lat.volume)


def wilson_action(u: torch.Tensor, lat: Lattice, beta: float, comm: Comm | None = None) -> torch.Tensor:
    """Wilson action ``S = -(beta/N) sum_{x, mu<nu} Re tr P_{mu nu}(x)``, shape ``(*B)``."""
    check_link_field(u, lat)
    n = u.shape[-1]
    return -(beta / n) * _interior_plaquette_sum(u, lat, comm)


def local_action_density(u: torch.Tensor, lat: Lattice, beta: float) -> torch.Tensor:
    """``s(x) = -(beta/N) sum_{mu<nu} Re tr P_{mu nu}(x)``, ``(*B, *lat.shape)`` (all sites)."""
    n = u.shape[-1]
    return -(beta / n) * plaquette_re_tr(u, lat).sum(-(lat.nd + 1))
