"""Plaquettes, Wilson action and staple sum (torch reference)."""

from __future__ import annotations

import pytest
import torch

from hpcflow.lattice.action import (
    average_plaquette,
    local_action_density,
    plaquette,
    plaquette_re_tr,
    staple_sum,
    wilson_action,
)
from hpcflow.lattice.geometry import Lattice
from hpcflow.lattice.groups import cold_field, dagger, get_group
from tests.helpers import GROUPS, SMALL_SHAPES, make_field


def _re_tr_naive(u, lat, mu, nu):
    """Re tr P_{mu nu}(x) from explicit site loops with periodic index arithmetic."""
    shape = lat.shape
    out = torch.zeros(shape, dtype=torch.float64)
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in shape]).tolist():
        x = tuple(idx) if isinstance(idx, list) else (idx,)

        def step(y, d):
            y = list(y)
            y[d] = (y[d] + 1) % shape[d]
            return tuple(y)

        p = (
            u[(mu, *x)]
            @ u[(nu, *step(x, mu))]
            @ dagger(u[(mu, *step(x, nu))])
            @ dagger(u[(nu, *x)])
        )
        out[x] = torch.trace(p).real
    return out


@pytest.mark.parametrize("name", GROUPS)
@pytest.mark.parametrize("shape", SMALL_SHAPES)
def test_cold_field_values(name, shape):
    g, lat = get_group(name), Lattice(shape)
    u = cold_field(lat, g, batch=2)
    beta = 2.5
    assert torch.allclose(average_plaquette(u, lat), torch.ones(2, dtype=torch.float64))
    expected = -beta * lat.n_planes * lat.volume
    s = wilson_action(u, lat, beta)
    assert torch.allclose(s, torch.full((2,), expected, dtype=torch.float64))
    a = staple_sum(u, lat)
    # every staple of a cold field is 1: A = 2 (nd - 1) 1
    assert torch.allclose(a, 2 * (lat.nd - 1) * u)


@pytest.mark.parametrize("name", GROUPS)
def test_plaquette_matches_site_loop(name):
    g, lat = get_group(name), Lattice((3, 4, 2, 3))
    u = make_field(lat, g, seed=3)
    re = plaquette_re_tr(u, lat)
    assert re.shape == (lat.n_planes, *lat.shape)
    for k, (mu, nu) in enumerate(lat.planes()):
        naive = _re_tr_naive(u, lat, mu, nu)
        assert torch.allclose(re[k], naive, atol=1e-13)
        p = plaquette(u, lat, mu, nu)
        assert torch.allclose(torch.diagonal(p, dim1=-2, dim2=-1).sum(-1).real, naive, atol=1e-13)


@pytest.mark.parametrize("name", GROUPS)
@pytest.mark.parametrize("shape", SMALL_SHAPES)
def test_action_and_average_plaquette_consistent(name, shape):
    g, lat = get_group(name), Lattice(shape)
    u = make_field(lat, g, seed=4, batch=(2,))
    beta = 1.7
    s = wilson_action(u, lat, beta)
    p = average_plaquette(u, lat)
    assert s.shape == (2,) and p.shape == (2,)
    # S = -beta * n_planes * V * <P>
    assert torch.allclose(s, -beta * lat.n_planes * lat.volume * p, atol=1e-12)
    dens = local_action_density(u, lat, beta)
    assert dens.shape == (2, *lat.shape)
    assert torch.allclose(dens.flatten(1).sum(-1), s, atol=1e-12)
    # batch entries are computed independently
    assert torch.allclose(s[1], wilson_action(u[1], lat, beta), atol=1e-12)


@pytest.mark.parametrize("name", GROUPS)
@pytest.mark.parametrize("shape", SMALL_SHAPES)
def test_staple_sum_holds_every_plaquette(name, shape):
    """Each plaquette has four links and appears in the staple of each, so
    sum_{x, mu} Re tr(U_mu(x) A_mu(x)) = 4 sum_P Re tr P."""
    g, lat = get_group(name), Lattice(shape)
    u = make_field(lat, g, seed=5)
    a = staple_sum(u, lat)
    total = torch.diagonal(u @ a, dim1=-2, dim2=-1).sum(-1).real.sum()
    assert torch.allclose(total, 4 * plaquette_re_tr(u, lat).sum(), atol=1e-11)


@pytest.mark.parametrize("name", GROUPS)
@pytest.mark.parametrize("shape", SMALL_SHAPES)
def test_staple_sum_is_autograd_gradient(name, shape):
    """d/dU (sum_P Re tr P) by autograd equals A^dag for every link (DESIGN.md)."""
    g, lat = get_group(name), Lattice(shape)
    u = make_field(lat, g, seed=6, batch=(2,)).requires_grad_(True)
    plaquette_re_tr(u, lat).sum().backward()
    a = staple_sum(u.detach(), lat)
    assert torch.allclose(u.grad, dagger(a), atol=1e-12)


@pytest.mark.parametrize("name", GROUPS)
def test_complex64_agrees(name):
    g, lat = get_group(name), Lattice((3, 4, 2, 3))
    u = make_field(lat, g, seed=8)
    u32 = u.to(torch.complex64)
    assert plaquette_re_tr(u32, lat).dtype == torch.float32
    assert torch.allclose(
        plaquette_re_tr(u32, lat).double(), plaquette_re_tr(u, lat), atol=1e-5
    )
    assert torch.allclose(staple_sum(u32, lat).to(u.dtype), staple_sum(u, lat), atol=1e-5)
    assert abs(average_plaquette(u32, lat).item() - average_plaquette(u, lat).item()) < 1e-5


def test_interior_sum_on_halo_padded_array():
    """A halo-padded copy of a full field gives the same action (reach of a plaquette is 1)."""
    g = get_group("su3")
    full = Lattice((4, 4))
    u = make_field(full, g, seed=9)
    # one rank owning the whole 4x4 lattice with a halo of 1 filled periodically
    pad = Lattice((4, 4), halo=1)
    idx = torch.arange(-1, 5) % 4
    up = u[:, idx][:, :, idx]
    assert torch.allclose(wilson_action(up, pad, 2.0), wilson_action(u, full, 2.0), atol=1e-12)
    assert torch.allclose(average_plaquette(up, pad), average_plaquette(u, full), atol=1e-14)


def test_bad_input():
    g, lat = get_group("su2"), Lattice((4, 4))
    u = cold_field(lat, g)
    with pytest.raises(ValueError, match="shape"):
        wilson_action(u[:, :3], lat, 1.0)
    with pytest.raises(TypeError, match="complex"):
        average_plaquette(u.real, lat)
    with pytest.raises(ValueError, match="distinct"):
        plaquette(u, lat, 1, 1)
