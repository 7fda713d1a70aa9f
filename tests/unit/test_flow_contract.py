"""One flow contract for every group and dimension (hpcflow.flows.base.GaugeFlow)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from hpcflow.flows.base import GaugeFlow
from hpcflow.flows.build import build_flow
from hpcflow.flows.distributed import DistributedFlow
from hpcflow.flows.u1 import u1_action, u1_mean_cos_plaquette, u1_topological_charge
from hpcflow.lattice.action import wilson_action
from hpcflow.lattice.geometry import Lattice
from hpcflow.lattice.groups import get_group
from hpcflow.rng import CounterRNG

CASES = [("u1", (4, 4), ()), ("su2", (4, 4), (2, 2)), ("su3", (4, 4), (3, 3)), ("su2", (4, 4, 4, 4), (2, 2))]


def _cfg(n_layers: int) -> SimpleNamespace:
    return SimpleNamespace(n_layers=n_layers, kernel="ncp", n_components=2, n_knots=4, hidden=(2,),
                           kernel_size=3, checkpoint_activations=False)


@pytest.mark.parametrize("group,shape,mat", CASES)
def test_event_shape_and_batch_axes(group, shape, mat) -> None:
    """Event shape ``(nd, *lat.shape[, N, N])`` from lattice and group; log-dets, log q and the
    theory hooks have the shape of the batch axes, however many there are."""
    lat = Lattice(shape)
    torch.manual_seed(0)
    m = build_flow(_cfg(2 if len(shape) == 4 else 4), lat, group)
    assert isinstance(m, GaugeFlow) and m.group == get_group(group)
    assert m.event_shape == (len(shape), *shape, *mat) and m.inner == len(mat)
    z = m.prior.sample_counter(CounterRNG(1), 0, 6, dtype=m.cdtype)
    z = z.reshape(2, 3, *z.shape[1:])
    x, logdet = m(z)
    assert x.shape == z.shape and logdet.shape == (2, 3) and logdet.dtype == torch.float64
    z2, ld_inv = m.inverse(x)
    assert torch.allclose(ld_inv, -logdet, atol=1e-9)
    assert torch.allclose(m.to_links(z2), m.to_links(z), atol=1e-9)
    assert m.log_prob(x).shape == (2, 3) and m.action(x, 1.0).shape == (2, 3)
    assert {k: v.shape for k, v in m.observables(x).items()} == {"plaquette": (2, 3), "Q": (2, 3)}
    links = m.to_links(x)
    assert links.shape[-2:] == (get_group(group).N,) * 2 and links.is_complex()
    assert torch.allclose(m.to_links(m.from_links(links)), links, atol=1e-12)


def test_u1_theory_hooks_are_the_angle_physics() -> None:
    """The U(1) flow's hooks are the angle-field functions the U(1) drivers use, bit for bit,
    and the links its actions see are those of the Wilson action on links."""
    lat = Lattice((4, 4))
    torch.manual_seed(1)
    m = build_flow(_cfg(4), lat, "u1")
    x, _ = m.sample_counter(CounterRNG(2), 0, 3)
    assert torch.equal(m.action(x, 1.3), u1_action(x, lat, 1.3))
    obs = m.observables(x)
    assert torch.equal(obs["plaquette"], u1_mean_cos_plaquette(x, lat))
    assert torch.equal(obs["Q"], u1_topological_charge(x, lat))
    assert torch.allclose(wilson_action(m.to_links(x), lat, 1.3), m.action(x, 1.3), atol=1e-12)
    assert m.cdtype == torch.float64 and m.link_dtype == torch.complex128


@pytest.mark.parametrize("group", ["u1", "su2"])
def test_distributed_flow_is_the_same_gauge_flow(group) -> None:
    """``DistributedFlow`` on one rank: a GaugeFlow of the same theory, same state_dict keys,
    same proposals, log q, action and observables."""
    lat = Lattice((4, 4))
    torch.manual_seed(2)
    m = build_flow(_cfg(4), lat, group)
    d = DistributedFlow(m)
    assert isinstance(d, GaugeFlow) and d.group == m.group and d.inner == m.inner
    assert d.cdtype == m.cdtype and list(d.state_dict()) == list(m.state_dict())
    with torch.no_grad():
        x, lq = m.sample_counter(CounterRNG(4), 5, 3)
        xd, lqd = d.sample_counter(CounterRNG(4), 5, 3)
        assert torch.equal(x, xd) and torch.equal(lq, lqd)
        assert torch.equal(m.action(x, 2.0), d.action(xd, 2.0))
        assert torch.equal(m.observables(x)["plaquette"], d.observables(xd)["plaquette"])
        assert torch.equal(m.log_prob(x), d.log_prob(xd))
    with pytest.raises(TypeError, match="U1GaugeFlow or SUNGaugeFlow"):
        DistributedFlow(d)
