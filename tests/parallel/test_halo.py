"""Halo exchange on 1, 2 and 4 ranks: halo contents equal the global field at the halo's
global coordinates (edges and corners included), for widths 1 and 2, 2D and 4D, link,
site-matrix and scalar fields, complex128/complex64/float64; and the gradient through the
exchange equals the single-rank gradient."""

from __future__ import annotations

import pytest
import torch
from mpi4py import MPI

from hpcflow.comm import LatticeComm, ProcessGrid, local_from_global
from hpcflow.lattice.geometry import Lattice

SIZE = MPI.COMM_WORLD.Get_size()

# (global shape, grid) cases for the current number of ranks (no skips in the MPI tier)
CASES = {
    1: [((6, 4), (1, 1)), ((4, 2, 2, 4), (1, 1, 1, 1))],
    2: [((6, 4), (2, 1)), ((4, 6), (1, 2)), ((2, 2, 4, 4), (1, 1, 1, 2)), ((4, 2, 2, 2), (2, 1, 1, 1))],
    4: [
        ((4, 4), (2, 2)),
        ((8, 4), (4, 1)),
        ((2, 2, 4, 4), (1, 1, 2, 2)),
        ((4, 2, 2, 4), (2, 1, 1, 2)),
        ((2, 4, 4, 2), (1, 2, 2, 1)),
    ],
}[SIZE]

KINDS = [  # (name, lead dims given nd, inner dims, dtype)
    ("link_su3", lambda nd: (nd,), (3, 3), torch.complex128),
    ("link_u1_batched_c64", lambda nd: (2, nd), (1, 1), torch.complex64),
    ("site_scalar_f64", lambda nd: (), (), torch.float64),
]


def _global_field(gs, lead, inner, dtype, seed=1234):
    gen = torch.Generator().manual_seed(seed)
    real = torch.float64 if dtype in (torch.complex128, torch.float64) else torch.float32
    shape = tuple(lead) + tuple(gs) + tuple(inner)
    f = torch.randn(shape, generator=gen, dtype=real)
    if dtype.is_complex:
        f = torch.complex(f, torch.randn(shape, generator=gen, dtype=real))
    return f


def _poison_halos(f: torch.Tensor, lat: Lattice, inner: int) -> torch.Tensor:
    out = torch.full_like(f, 1e6)
    out[lat.interior_slices(inner)] = f[lat.interior_slices(inner)]
    return out


@pytest.mark.mpi
@pytest.mark.parametrize("gs, grid", CASES)
@pytest.mark.parametrize("halo", [1, 2])
@pytest.mark.parametrize("pad_all", [False, True])
@pytest.mark.parametrize("kind", KINDS, ids=[k[0] for k in KINDS])
def test_halo_equals_global_slices(gs, grid, halo, pad_all, kind, collective):
    """After the exchange the whole local array (interior, faces, edges, corners) equals
    the global field at the wrapped global coordinates, bit for bit."""
    _, lead_of, inner_shape, dtype = kind
    lc = LatticeComm(ProcessGrid(gs, grid))
    lat = lc.local_lattice(halo=halo, pad_all=pad_all)
    inner = len(inner_shape)
    g = _global_field(gs, lead_of(len(gs)), inner_shape, dtype)
    ref = local_from_global(g, lat, inner)
    got = lc.exchange(_poison_halos(ref, lat, inner), lat, inner=inner)
    collective(got.dtype == dtype and torch.equal(got, ref), f"halo contents {gs} {grid}")


@pytest.mark.mpi
@pytest.mark.parametrize("gs, grid", CASES)
def test_partial_width_fills_inner_layers_only(gs, grid, collective):
    """width=1 on a halo-2 array fills the innermost halo layer and leaves the outer one."""
    lc = LatticeComm(ProcessGrid(gs, grid))
    lat = lc.local_lattice(halo=2, pad_all=True)
    g = _global_field(gs, (len(gs),), (2, 2), torch.complex128)
    ref = local_from_global(g, lat, 2)
    poisoned = _poison_halos(ref, lat, 2)
    got = lc.exchange(poisoned, lat, inner=2, width=1)
    inner1 = Lattice(lat.global_shape, lat.local_shape, lat.origin, halo=1)
    crop = (Ellipsis,) + tuple(slice(1, n - 1) for n in lat.shape) + (slice(None),) * 2
    ok = torch.equal(got[crop], local_from_global(g, inner1, 2))
    ok = ok and bool((got == 1e6).any()) and torch.equal(poisoned, _poison_halos(ref, lat, 2))
    collective(ok, "partial-width exchange")


def _corner_reaching_loss(f: torch.Tensor, w: torch.Tensor, lat: Lattice, reach: int) -> torch.Tensor:
    """Interior sum of Re(w f(x) f(x+r mu) conj f(x + r mu - r nu)) over all mu != nu:
    reaches faces, edges and corners like plaquettes and staples do."""
    tot = torch.zeros((), dtype=torch.float64)
    for mu in range(lat.nd):
        for nu in range(lat.nd):
            if mu == nu:
                continue
            a = lat.shift(f, mu, reach, inner=0)
            b = lat.shift(lat.shift(f, mu, reach, inner=0), nu, -reach, inner=0)
            tot = tot + lat.interior_sum((w * f * a * b.conj()).real, inner=0)
    return tot


@pytest.mark.mpi
@pytest.mark.parametrize("gs, grid", CASES)
@pytest.mark.parametrize("halo", [1, 2])
def test_gradient_through_exchange_equals_single_rank(gs, grid, halo, collective):
    """d loss / d field through exchange + local loss + global sum equals the gradient of
    the same loss on one rank (to 1e-12), and halo entries get exactly zero gradient."""
    gfield = _global_field(gs, (), (), torch.complex128, seed=7)
    w = _global_field(gs, (), (), torch.float64, seed=8)
    g_leaf = gfield.clone().requires_grad_(True)
    ref_loss = _corner_reaching_loss(g_leaf, w, Lattice(gs), halo)
    (ref_grad,) = torch.autograd.grad(ref_loss, g_leaf)

    lc = LatticeComm(ProcessGrid(gs, grid))
    lat = lc.local_lattice(halo=halo)
    leaf = _poison_halos(local_from_global(gfield, lat, 0), lat, 0).requires_grad_(True)
    f = lc.exchange(leaf, lat, inner=0)
    loss = lc.sum(_corner_reaching_loss(f, local_from_global(w, lat, 0), lat, halo))
    (grad,) = torch.autograd.grad(loss, leaf)
    want = local_from_global(ref_grad, lat, 0)
    mask = lat.interior()
    ok = abs(loss.item() - ref_loss.item()) < 1e-12 * max(1.0, abs(ref_loss.item()))
    ok = ok and torch.allclose(grad[mask], want[mask], rtol=0, atol=1e-12)
    ok = ok and bool((grad[~mask] == 0).all())
    collective(ok, f"gradient through halo exchange {gs} {grid} halo {halo}")


@pytest.mark.mpi
def test_double_backward_through_exchange(collective):
    """The exchange's backward is itself differentiable (adjoint of the adjoint)."""
    gs, grid = CASES[-1]
    lc = LatticeComm(ProcessGrid(gs, grid))
    lat = lc.local_lattice(halo=1)
    x = local_from_global(_global_field(gs, (), (), torch.float64, seed=3), lat, 0)
    x.requires_grad_(True)
    y = lc.exchange(x, lat, inner=0)
    loss = lc.sum(lat.interior_sum(y * lat.shift(y, 0, 1, inner=0) ** 2, inner=0))
    (gx,) = torch.autograd.grad(loss, x, create_graph=True)
    v = torch.ones_like(x)
    (hv,) = torch.autograd.grad((gx * v).sum(), x)
    # compare with a finite difference of the gradient along v (the loss is cubic)
    eps = 1e-4
    xp = (x.detach() + eps * v).requires_grad_(True)
    lp = lc.sum(lat.interior_sum(lc.exchange(xp, lat, 0) * lat.shift(lc.exchange(xp, lat, 0), 0, 1, 0) ** 2, 0))
    xm = (x.detach() - eps * v).requires_grad_(True)
    lm = lc.sum(lat.interior_sum(lc.exchange(xm, lat, 0) * lat.shift(lc.exchange(xm, lat, 0), 0, 1, 0) ** 2, 0))
    (gp,) = torch.autograd.grad(lp, xp)
    (gm,) = torch.autograd.grad(lm, xm)
    fd = (gp - gm) / (2 * eps)
    collective(torch.allclose(hv, fd, rtol=0, atol=1e-6), "Hessian-vector product through exchange")
