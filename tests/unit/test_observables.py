"""Observables against independent computations and known configurations."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from hpcflow.lattice.action import average_plaquette, wilson_action
from hpcflow.lattice.geometry import Lattice
from hpcflow.lattice.groups import cold_field, dagger, get_group
from hpcflow.lattice.observables import (
    energy_density_clover,
    polyakov_loop,
    topological_charge_clover,
    topological_charge_u1_2d,
    wilson_flow,
    wilson_loop,
)
from tests.helpers import (
    GROUPS,
    PeriodicHaloComm,
    assert_in_group,
    make_field,
    pad_periodic,
)

# ---- helpers ------------------------------------------------------------------------------


def _path_loop_re_tr(u, lat, x, steps):
    """(1/N) Re tr of the ordered link product along a closed path of +-direction steps."""
    shape = lat.shape
    x = list(x)
    m = torch.eye(u.shape[-1], dtype=u.dtype)
    for d, sgn in steps:
        if sgn > 0:
            m = m @ u[(d, *x)]
            x[d] = (x[d] + 1) % shape[d]
        else:
            x[d] = (x[d] - 1) % shape[d]
            m = m @ dagger(u[(d, *x)])
    return torch.trace(m).real.item() / u.shape[-1]


def _naive_wilson_loop(u, lat, r, t):
    vals = []
    sites = torch.cartesian_prod(*[torch.arange(n) for n in lat.shape]).tolist()
    for mu, nu in lat.planes():
        for a, b in ((mu, nu), (nu, mu)):
            path = [(a, 1)] * r + [(b, 1)] * t + [(a, -1)] * r + [(b, -1)] * t
            vals += [_path_loop_re_tr(u, lat, x, path) for x in sites]
    return sum(vals) / len(vals)


def _embed(theta, name):
    """Abelian link field from angles theta (..): U(1) e^{i theta}, SU(N) diag(e^{it}, e^{-it}, 1)."""
    e = torch.polar(torch.ones_like(theta), theta)
    if name == "u1":
        return e[..., None, None]
    diag = [e, e.conj()] + ([torch.ones_like(e)] if name == "su3" else [])
    return torch.diag_embed(torch.stack(diag, -1))


def _constant_flux_angles(shape, fluxes):
    """Link angles theta[mu, x] with constant plaquette angle 2 pi n / (L_a L_b) in plane (a, b).

    U_b(x) = exp(i phi x_a); U_a(x) = exp(-i phi L_a x_b) on the last slice x_a = L_a - 1,
    else 1. Every plaquette of the plane is then exp(i phi) (the wrap links absorb the
    twist), and the other planes are flat.
    """
    nd = len(shape)
    theta = torch.zeros(nd, *shape, dtype=torch.float64)
    coords = torch.stack(torch.meshgrid(*[torch.arange(n) for n in shape], indexing="ij"))
    for (a, b), n in fluxes.items():
        phi = 2 * math.pi * n / (shape[a] * shape[b])
        theta[b] += phi * coords[a]
        theta[a] += torch.where(coords[a] == shape[a] - 1, -phi * shape[a] * coords[b], 0.0)
    return theta


# ---- Wilson and Polyakov loops ------------------------------------------------------------


@pytest.mark.parametrize("name", GROUPS)
@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 2, 3)])
@pytest.mark.parametrize("rt", [(1, 1), (2, 1), (1, 3)])
def test_wilson_loop_matches_path_walk(name, shape, rt):
    g, lat = get_group(name), Lattice(shape)
    u = make_field(lat, g, seed=1)
    assert abs(wilson_loop(u, lat, *rt).item() - _naive_wilson_loop(u, lat, *rt)) < 1e-13


@pytest.mark.parametrize("name", GROUPS)
def test_wilson_loop_1x1_is_plaquette_and_cold_is_one(name):
    g, lat = get_group(name), Lattice((3, 2, 4, 2))
    u = make_field(lat, g, seed=2, batch=(3,))
    assert torch.allclose(wilson_loop(u, lat, 1, 1), average_plaquette(u, lat), atol=1e-14)
    c = cold_field(lat, g)
    assert abs(wilson_loop(c, lat, 2, 3).item() - 1) < 1e-14
    assert abs(polyakov_loop(c, lat).item() - 1) < 1e-14


def test_u1_2d_wilson_loop_constant_flux():
    """Constant flux phi per plaquette: an R x T loop encloses R*T plaquettes, W = cos(RT phi)."""
    lat = Lattice((6, 6))
    u = _embed(_constant_flux_angles(lat.shape, {(0, 1): 1}), "u1")
    phi = 2 * math.pi / 36
    for r, t in ((1, 1), (2, 3), (3, 3)):
        assert abs(wilson_loop(u, lat, r, t).item() - math.cos(r * t * phi)) < 1e-13


@pytest.mark.parametrize("name", GROUPS)
def test_polyakov_loop_matches_product(name):
    g, lat = get_group(name), Lattice((3, 2, 4))
    u = make_field(lat, g, seed=3)
    acc = 0j
    for x0 in range(3):
        for x1 in range(2):
            m = torch.eye(g.N, dtype=u.dtype)
            for t in range(4):
                m = m @ u[2, x0, x1, t]
            acc += torch.trace(m).item()
    assert abs(polyakov_loop(u, lat).item() - acc / (6 * g.N)) < 1e-14


def test_polyakov_loop_constant_links():
    lat = Lattice((2, 5))
    alpha = 0.37
    u = cold_field(lat, get_group("u1"))
    u[1] = complex(math.cos(alpha), math.sin(alpha))
    expected = complex(math.cos(5 * alpha), math.sin(5 * alpha))
    assert abs(polyakov_loop(u, lat).item() - expected) < 1e-14


def test_polyakov_loop_split_time_not_supported():
    lat = Lattice((4, 4), local_shape=(4, 2), origin=(0, 0), halo=1, padded_dims=(1,))
    u = cold_field(lat, get_group("su2"))
    with pytest.raises(NotImplementedError, match="last direction"):
        polyakov_loop(u, lat)


# ---- 2D U(1) topological charge -----------------------------------------------------------


def test_u1_2d_charge_integer_and_known_flux():
    lat = Lattice((8, 8))
    u = make_field(lat, get_group("u1"), seed=4, batch=(16,))
    q = topological_charge_u1_2d(u, lat)
    assert (q - torch.round(q)).abs().max() < 1e-10
    assert (q.abs() > 0.5).any()  # hot fields carry charge, so integrality is not trivial
    for n in (-3, 1, 2):
        un = _embed(_constant_flux_angles(lat.shape, {(0, 1): n}), "u1")
        assert abs(topological_charge_u1_2d(un, lat).item() - n) < 1e-10
        # cos of the constant plaquette angle
        assert abs(average_plaquette(un, lat).item() - math.cos(2 * math.pi * n / 64)) < 1e-13


# ---- 4D clover charge -----------------------------------------------------------------------


@pytest.mark.parametrize("name", GROUPS)
@pytest.mark.parametrize("fluxes", [(1, 1), (1, -2)])
def test_clover_charge_constant_abelian_flux(name, fluxes):
    """Constant abelian fluxes n01, n23 on a 4^4 torus.

    Every clover leaf equals the plaquette exp(i phi), so F_ab = diag(i sin phi_ab, ...) and
    Q = c V sin(phi01) sin(phi23) / (4 pi^2) exactly (c = 1 for U(1), 2 for the SU(N)
    embedding diag(e^{i t}, e^{-i t}, 1)), which tends to the continuum c n01 n23. This fixes
    the normalisation and the sign of the clover charge; the energy density is checked too.
    """
    lat = Lattice((4, 4, 4, 4))
    n01, n23 = fluxes
    u = _embed(_constant_flux_angles(lat.shape, {(0, 1): n01, (2, 3): n23}), name)
    c = 1 if name == "u1" else 2
    s01, s23 = (math.sin(2 * math.pi * n / 16) for n in fluxes)
    q = topological_charge_clover(u, lat).item()
    assert abs(q - c * lat.volume * s01 * s23 / (4 * math.pi**2)) < 1e-12
    # near the continuum integer: sin(x)/x >= 1 - x^2/6 bounds the lattice artefact
    p01, p23 = (2 * math.pi * n / 16 for n in fluxes)
    assert abs(q / (c * n01 * n23) - 1) <= (p01**2 + p23**2) / 6
    e = energy_density_clover(u, lat).item()
    # -tr(F_ab F_ab) = c sin^2(phi_ab) per site in the two flux planes, 0 elsewhere
    assert abs(e - c * (s01**2 + s23**2)) < 1e-12


def _reflect0(u, lat):
    """Reflection x0 -> -x0: U'_0(x) = U_0(Rx - e0)^dag, U'_k(x) = U_k(Rx)."""
    d0 = -(lat.nd + 2)  # site axis 0 in a per-direction slice (*, *shape, N, N)
    out = []
    for mu in range(lat.nd):
        f = torch.flip(u[mu], dims=(d0,))
        out.append(dagger(f) if mu == 0 else torch.roll(f, 1, dims=d0))
    return torch.stack(out)


def _swap01(u, lat):
    """Exchange of axes 0 and 1 (a reflection through the diagonal, det -1)."""
    v = u.transpose(1, 2)
    return torch.stack([v[1], v[0], *v[2:]])


@pytest.mark.parametrize("name", GROUPS)
def test_clover_charge_parity_odd(name):
    """Q is a pseudo-scalar: reflecting one axis, or swapping two, flips its sign, while the
    action is unchanged. A charge without the epsilon tensor (or with wrong signs between
    the three plane pairings) would fail this on a generic smoothed field."""
    g, lat = get_group(name), Lattice((3, 3, 4, 2))
    u = wilson_flow(make_field(lat, g, seed=5), lat, 0.05, 2)
    q = topological_charge_clover(u, lat).item()
    assert abs(q) > 1e-4
    for op in (_reflect0, _swap01):
        up = op(u, lat)
        assert abs(wilson_action(up, lat, 1.0).item() - wilson_action(u, lat, 1.0).item()) < 1e-10
        assert abs(topological_charge_clover(up, lat).item() + q) < 1e-12


# ---- Wilson flow ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", GROUPS)
@pytest.mark.parametrize("shape", [(4, 4), (3, 2, 3, 2)])
def test_wilson_flow_decreases_action_and_stays_in_group(name, shape):
    g, lat = get_group(name), Lattice(shape)
    u = make_field(lat, g, seed=6)
    s = [wilson_action(u, lat, 1.0).item()]
    v = u
    for _ in range(10):
        v = wilson_flow(v, lat, 0.05, 1)
        s.append(wilson_action(v, lat, 1.0).item())
    assert all(b < a for a, b in itertools.pairwise(s)), s
    assert_in_group(v, g, 1e-12)


def test_wilson_flow_third_order():
    """RK3 is third order: halving eps cuts the global error by ~8 (ratio > 6 required)."""
    g, lat = get_group("su3"), Lattice((2, 2, 2, 2))
    u = make_field(lat, g, seed=7)
    ref = wilson_flow(u, lat, 0.2 / 64, 64)
    e1 = (wilson_flow(u, lat, 0.2 / 4, 4) - ref).abs().max().item()
    e2 = (wilson_flow(u, lat, 0.2 / 8, 8) - ref).abs().max().item()
    assert e1 / e2 > 6, (e1, e2)


def test_wilson_flow_smooths_towards_integer_charge_u1_2d():
    """Flow in 2D U(1) preserves the charge of a smooth field; zero steps is the identity."""
    lat = Lattice((8, 8))
    u = _embed(_constant_flux_angles(lat.shape, {(0, 1): 2}), "u1")
    assert torch.equal(wilson_flow(u, lat, 0.1, 0), u)
    v = wilson_flow(u, lat, 0.1, 5)
    assert abs(topological_charge_u1_2d(v, lat).item() - 2) < 1e-10


@pytest.mark.parametrize("name", GROUPS)
def test_complex64_observables(name):
    g, lat = get_group(name), Lattice((3, 2, 2, 3))
    u = make_field(lat, g, seed=8)
    u32 = u.to(torch.complex64)
    assert abs(wilson_loop(u32, lat, 2, 1).item() - wilson_loop(u, lat, 2, 1).item()) < 1e-5
    assert abs(polyakov_loop(u32, lat).item() - polyakov_loop(u, lat).item()) < 1e-5
    v, v32 = wilson_flow(u, lat, 0.05, 2), wilson_flow(u32, lat, 0.05, 2)
    assert v32.dtype == torch.complex64 and (v32.to(v.dtype) - v).abs().max() < 1e-5
    q, q32 = topological_charge_clover(v, lat), topological_charge_clover(v32, lat)
    assert abs(q32.item() - q.item()) < 1e-5


def test_wilson_loop_on_halo_padded_array():
    """halo >= max(R, T) makes the interior of a padded copy exact (and halo 2 < 3 is not)."""
    g = get_group("su2")
    full = Lattice((5, 6))
    u = make_field(full, g, seed=9)
    w = wilson_loop(u, full, 2, 3).item()
    pad = Lattice((5, 6), halo=3)
    up = pad_periodic(u, pad)
    assert abs(wilson_loop(up, pad, 2, 3).item() - w) < 1e-13
    assert abs(polyakov_loop(up, pad).item() - polyakov_loop(u, full).item()) < 1e-13
    short = Lattice((5, 6), halo=2)
    assert abs(wilson_loop(pad_periodic(u, short), short, 2, 3).item() - w) > 1e-6


def test_bad_arguments():
    lat = Lattice((4, 4))
    u = cold_field(lat, get_group("su2"))
    with pytest.raises(ValueError, match="R must be a positive int"):
        wilson_loop(u, lat, 0, 1)
    with pytest.raises(ValueError, match="nd=4"):
        topological_charge_clover(u, lat)
    with pytest.raises(ValueError, match="2D U\\(1\\)"):
        topological_charge_u1_2d(u, lat)
    with pytest.raises(ValueError, match="eps"):
        wilson_flow(u, lat, -0.1, 1)


@pytest.mark.parametrize("name", ["u1", "su3"])
def test_wilson_flow_with_halo_exchange(name):
    """On a halo-padded array the flow exchanges halos before each RK stage: the interior
    equals the flow of the unpadded field, and interior-summed observables agree."""
    g = get_group(name)
    full = Lattice((3, 4, 2, 3))
    pad = Lattice((3, 4, 2, 3), halo=1)
    comm = PeriodicHaloComm()
    u = make_field(full, g, seed=10)
    v = wilson_flow(u, full, 0.05, 3)
    vp = wilson_flow(pad_periodic(u, pad), pad, 0.05, 3, comm=comm)
    assert torch.allclose(vp[pad.interior_slices(2)], v, atol=1e-12)
    vp = comm.exchange(vp, pad)
    q, qp = topological_charge_clover(v, full), topological_charge_clover(vp, pad, comm)
    assert abs(qp.item() - q.item()) < 1e-12
