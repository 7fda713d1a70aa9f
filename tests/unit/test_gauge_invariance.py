"""Gauge invariance of every observable, and gauge equivariance of the Wilson flow.

Each test draws a Haar-random field and a Haar-random gauge transformation
``U_mu(x) -> g(x) U_mu(x) g(x+mu)^dag`` and checks the observable is unchanged to 1e-12
(float64). A wrong shift direction, a missing dagger or an open loop breaks these.
"""

from __future__ import annotations

import pytest
import torch

from hpcflow.lattice.action import average_plaquette, staple_sum, wilson_action
from hpcflow.lattice.gauge import gauge_transform, gauge_transform_site, random_gauge
from hpcflow.lattice.geometry import Lattice
from hpcflow.lattice.groups import get_group
from hpcflow.lattice.observables import (
    clover_field_strength,
    energy_density_clover,
    polyakov_loop,
    topological_charge_clover,
    topological_charge_u1_2d,
    wilson_flow,
    wilson_loop,
)
from hpcflow.rng import CounterRNG
from tests.helpers import GROUPS, SMALL_SHAPES, assert_in_group, make_field, make_gauge


def _pair(name, shape, seed=0, batch=(2,)):
    g, lat = get_group(name), Lattice(shape)
    u = make_field(lat, g, seed=seed, batch=batch)
    gt = make_gauge(lat, g, seed=seed + 100, batch=batch)
    return g, lat, u, gauge_transform(u, gt, lat), gt


@pytest.mark.parametrize("name", GROUPS)
@pytest.mark.parametrize("shape", SMALL_SHAPES)
def test_transform_stays_in_group_and_changes_links(name, shape):
    g, _, u, ug, _ = _pair(name, shape)
    assert_in_group(ug, g, 1e-12)
    assert (ug - u).abs().max() > 0.1  # the transformation is not trivially the identity


@pytest.mark.parametrize("name", GROUPS)
@pytest.mark.parametrize("shape", SMALL_SHAPES)
def test_action_and_plaquette_invariant(name, shape):
    _, lat, u, ug, _ = _pair(name, shape)
    assert torch.allclose(wilson_action(ug, lat, 2.3), wilson_action(u, lat, 2.3), atol=1e-12)
    assert torch.allclose(average_plaquette(ug, lat), average_plaquette(u, lat), atol=1e-14)


@pytest.mark.parametrize("name", GROUPS)
@pytest.mark.parametrize("shape", SMALL_SHAPES)
def test_staple_covariant(name, shape):
    """U_mu(x) A_mu(x) is a loop based at x: it transforms as g(x) (U A) g(x)^dag."""
    _, lat, u, ug, gt = _pair(name, shape)
    ua = u @ staple_sum(u, lat)
    uag = ug @ staple_sum(ug, lat)
    assert torch.allclose(uag, gauge_transform_site(ua, gt.unsqueeze(-(lat.nd + 3))), atol=1e-12)


@pytest.mark.parametrize("name", GROUPS)
@pytest.mark.parametrize("shape", SMALL_SHAPES)
@pytest.mark.parametrize("rt", [(1, 1), (1, 2), (2, 3)])
def test_wilson_loop_invariant(name, shape, rt):
    _, lat, u, ug, _ = _pair(name, shape)
    w, wg = wilson_loop(u, lat, *rt), wilson_loop(ug, lat, *rt)
    assert torch.allclose(wg, w, atol=1e-12)


@pytest.mark.parametrize("name", GROUPS)
@pytest.mark.parametrize("shape", SMALL_SHAPES)
def test_polyakov_loop_invariant(name, shape):
    _, lat, u, ug, _ = _pair(name, shape)
    p, pg = polyakov_loop(u, lat), polyakov_loop(ug, lat)
    assert p.is_complex() and torch.allclose(pg, p, atol=1e-12)


def test_u1_2d_charge_invariant():
    _, lat, u, ug, _ = _pair("u1", (6, 6), batch=(8,))
    q, qg = topological_charge_u1_2d(u, lat), topological_charge_u1_2d(ug, lat)
    assert torch.equal(torch.round(q), torch.round(qg))
    assert torch.allclose(qg, q, atol=1e-10)


@pytest.mark.parametrize("name", GROUPS)
def test_clover_charge_and_energy_invariant(name):
    _, lat, u, ug, gt = _pair(name, (3, 4, 2, 3))
    assert torch.allclose(
        topological_charge_clover(ug, lat), topological_charge_clover(u, lat), atol=1e-12
    )
    assert torch.allclose(energy_density_clover(ug, lat), energy_density_clover(u, lat), atol=1e-12)
    # the clover field strength itself is covariant at x
    f, fg = clover_field_strength(u, lat), clover_field_strength(ug, lat)
    assert torch.allclose(fg, gauge_transform_site(f, gt.unsqueeze(-(lat.nd + 3))), atol=1e-12)


@pytest.mark.parametrize("name", GROUPS)
@pytest.mark.parametrize("shape", [(4, 4), (3, 2, 3, 2)])
def test_wilson_flow_equivariant(name, shape):
    """flow(g.U) = g.flow(U): the flow is gauge covariant, so flowed observables are invariant."""
    _, lat, u, ug, gt = _pair(name, shape, batch=())
    v = wilson_flow(u, lat, 0.02, 3)
    vg = wilson_flow(ug, lat, 0.02, 3)
    assert torch.allclose(vg, gauge_transform(v, gt, lat), atol=1e-12)
    if lat.nd == 4:
        assert torch.allclose(
            topological_charge_clover(vg, lat), topological_charge_clover(v, lat), atol=1e-12
        )


@pytest.mark.parametrize("name", GROUPS)
def test_random_gauge_counter_rng(name):
    """random_gauge with a CounterRNG: in the group, reproducible, batch entry 0 unbatched."""
    g, lat = get_group(name), Lattice((3, 4))
    gt = random_gauge(lat, g, CounterRNG(3), step=1, batch=(2,))
    assert gt.shape == (2, 3, 4, g.N, g.N)
    assert_in_group(gt, g)
    assert torch.equal(gt[0], random_gauge(lat, g, CounterRNG(3), step=1))
    assert not torch.allclose(gt[0], gt[1])
