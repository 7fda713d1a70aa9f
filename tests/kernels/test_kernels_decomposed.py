"""Domain decomposition without MPI: every rank's halo-padded block, with halos filled
from the global field, gives through the host kernels exactly the global result on its
interior (plaquette field, staple sum, and the gradient of the summed plaquettes once
halo-link gradients are sent back to their owners and added). This is the contract the
MPI code relies on: exchange halos, run the kernels, keep the interior."""

from __future__ import annotations

import itertools

import torch

from hpcflow.kernels import host
from hpcflow.kernels.autograd import PlaquetteSum
from hpcflow.lattice.geometry import Lattice


def _block_index(gs, origin, local, halo):
    """Global index arrays (with periodic wrap) of a padded block."""
    return [torch.arange(o - halo, o + n + halo) % g for g, o, n in zip(gs, origin, local)]


def test_blocks_reproduce_global(host_libs, random_links):
    """4D SU(3), global 4x4x2x6 split 2 x 1 x 1 x 2 into blocks with halo 1: block
    interiors equal the global plaquettes and staples, and summing block gradients
    (halo parts scattered back) equals the global gradient, all to 1e-13."""
    gs, grid, halo = (4, 4, 2, 6), (2, 1, 1, 2), 1
    glat = Lattice(gs)
    U = random_links((glat.nd, *gs), 3, torch.complex128, seed=21)
    p_glob, s_glob = host.plaquette_re_tr(U, glat), host.staple_sum(U, glat)
    Ug = U.clone().requires_grad_(True)
    PlaquetteSum.apply(Ug, glat, host).backward()
    grad_acc = torch.zeros_like(U)
    total = torch.zeros((), dtype=torch.float64)
    local = tuple(g // n for g, n in zip(gs, grid))
    for coords in itertools.product(*(range(n) for n in grid)):
        origin = tuple(c * n for c, n in zip(coords, local))
        lat = Lattice(gs, local_shape=local, origin=origin, halo=halo)
        idx = _block_index(gs, origin, local, halo)
        mesh = torch.meshgrid(*idx, indexing="ij")
        ub = U[(slice(None), *mesh)]  # (mu, *padded, N, N) with halos from the global field
        inner0, inner2 = lat.interior_slices(0), lat.interior_slices(2)
        own = tuple(slice(o, o + n) for o, n in zip(origin, local))
        torch.testing.assert_close(host.plaquette_re_tr(ub, lat)[inner0],
                                   p_glob[(slice(None), *own)], atol=1e-13, rtol=0)
        torch.testing.assert_close(host.staple_sum(ub, lat)[inner2],
                                   s_glob[(slice(None), *own)], atol=1e-13, rtol=0)
        ubg = ub.clone().requires_grad_(True)
        s = PlaquetteSum.apply(ubg, lat, host)
        s.backward()
        total = total + s.detach()
        grad_acc.index_put_((torch.arange(glat.nd).view(-1, *([1] * glat.nd)), *mesh),
                            ubg.grad, accumulate=True)
    torch.testing.assert_close(total, PlaquetteSum.apply(U, glat, host), atol=1e-12, rtol=0)
    torch.testing.assert_close(grad_acc, Ug.grad, atol=1e-13, rtol=0)
