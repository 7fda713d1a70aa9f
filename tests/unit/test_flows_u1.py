"""U(1) gauge-equivariant flow layers: bijection contract, log-det, equivariance, bad input."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from hpcflow.flows import build_u1_flow, u1_action, u1_topological_charge
from hpcflow.flows.circular import TWO_PI, make_kernel
from hpcflow.flows.u1 import angles_from_links, links_from_angles, plaquette_masks
from hpcflow.lattice.geometry import Lattice
from hpcflow.rng import CounterRNG

KERNELS = ["ncp", "spline"]


def _cfg(kernel: str = "ncp", n_layers: int = 8, **kw) -> SimpleNamespace:
    base = {"n_layers": n_layers, "kernel": kernel, "n_components": 3, "n_knots": 5,
            "hidden": (6, 6), "kernel_size": 3, "checkpoint_activations": False}
    base.update(kw)
    return SimpleNamespace(**base)


def _model(kernel: str, lat: Lattice, dtype=torch.float64, seed: int = 0, **kw):
    torch.manual_seed(seed)
    m = build_u1_flow(_cfg(kernel, **kw), lat, dtype)
    # default init is close to the identity map; a larger last convolution makes every check
    # non-trivial (O(1) kernel parameters) without building a pathologically steep map
    with torch.no_grad():
        for layer in m.layers:
            for p in layer.net.convs[-1].parameters():
                p.mul_(4.0)
    return m


def _circ(a: torch.Tensor) -> torch.Tensor:
    """Distance on the circle, elementwise."""
    return (torch.remainder(a + math.pi, TWO_PI) - math.pi).abs()


def _theta(lat: Lattice, batch: int, seed: int = 1, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return TWO_PI * torch.rand((batch, 2, *lat.shape), generator=g, dtype=dtype)


@pytest.mark.parametrize("kernel", KERNELS)
def test_kernels_are_circle_bijections(kernel: str) -> None:
    """h maps [0, 2pi) into itself, inverse(h) = id, and log h' matches autograd."""
    k = make_kernel(kernel, n_components=3, n_knots=6).double()
    g = torch.Generator().manual_seed(3)
    x = TWO_PI * torch.rand(500, generator=g, dtype=torch.float64)
    p = 2.0 * torch.randn(500, k.n_params, generator=g, dtype=torch.float64)
    y, logj = k(x, p)
    assert bool(((y >= 0) & (y < TWO_PI)).all())
    xb, logj_inv = k.inverse(y, p)
    assert float(_circ(xb - x).max()) < 1e-10
    assert torch.allclose(logj_inv, logj, atol=1e-8)
    xr = x.clone().requires_grad_(True)
    (dy,) = torch.autograd.grad(k(xr, p)[0].sum(), xr)
    assert torch.allclose(torch.log(dy), logj, atol=1e-9)


@pytest.mark.parametrize("kernel", KERNELS)
def test_every_layer_inverts_and_stays_in_range(kernel: str) -> None:
    """inverse(forward(theta)) = theta to 1e-10 and logdets cancel, for all 8 (mu, offset)."""
    lat = Lattice((8, 4))
    m = _model(kernel, lat)
    th = _theta(lat, 3)
    for layer in m.layers:
        out, ld = layer(th)
        assert bool(((out >= 0) & (out < TWO_PI)).all())
        back, ld_inv = layer.inverse(out)
        assert float(_circ(back - th).detach().max()) < 1e-10
        assert float((ld + ld_inv).detach().abs().max()) < 1e-10
        # the layer moves exactly the links of its mask, and does move them
        moved = _circ(out - th) > 1e-12
        links = torch.zeros_like(moved[0])
        links[layer.mu] = plaquette_masks(lat, layer.mu, layer.offset)["links"]
        assert bool((moved & ~links).sum() == 0) and bool(moved.any())
    z, logq = m.sample(4, torch.Generator().manual_seed(2))
    assert torch.allclose(m.log_prob(z), logq, atol=1e-9)


@pytest.mark.parametrize("kernel", KERNELS)
def test_logdet_equals_autograd_jacobian(kernel: str) -> None:
    """Each layer's log-det equals log|det| of the full autograd Jacobian on a 4x4 lattice."""
    lat = Lattice((4, 4))
    m = _model(kernel, lat)
    th = _theta(lat, 1, seed=5)[0]
    n = th.numel()
    for layer in m.layers:
        def f(v: torch.Tensor, layer=layer, shape=th.shape) -> torch.Tensor:
            return layer(v.view(1, *shape))[0].reshape(n)

        jac = torch.autograd.functional.jacobian(f, th.reshape(n))
        _, logabs = torch.linalg.slogdet(jac)
        ld = layer(th[None])[1][0].detach()
        assert abs(float(logabs - ld)) < 1e-9
        assert abs(float(ld)) > 1e-3  # a non-trivial Jacobian was tested
        th = layer(th[None])[0][0].detach()


@pytest.mark.parametrize("kernel", KERNELS)
def test_flow_is_gauge_equivariant(kernel: str) -> None:
    """f(g.U) = g.f(U) to 1e-10 under random gauge transformations; log q is gauge invariant."""
    from hpcflow.lattice.gauge import gauge_transform, random_gauge
    from hpcflow.lattice.groups import get_group

    lat = Lattice((8, 8))
    m = _model(kernel, lat)
    th = _theta(lat, 2, seed=7)
    g = random_gauge(lat, get_group("u1"), CounterRNG(11), step=0, batch=(2,))
    gth = angles_from_links(gauge_transform(links_from_angles(th), g, lat))
    assert float(_circ(gth - th).max()) > 0.1  # the transformation is not trivial
    f_gth, ld_g = m(gth)
    g_fth = angles_from_links(gauge_transform(links_from_angles(m(th)[0]), g, lat))
    assert float(_circ(f_gth - g_fth).max()) < 1e-10
    assert torch.allclose(ld_g, m(th)[1], atol=1e-10)


def test_u1_angle_physics_matches_lattice_core() -> None:
    """The flow's angle-space action and charge equal the lattice core's on links."""
    from hpcflow.lattice.action import wilson_action
    from hpcflow.lattice.observables import topological_charge_u1_2d

    lat = Lattice((4, 8))
    th = _theta(lat, 3, seed=9)
    u = links_from_angles(th)
    assert torch.allclose(u1_action(th, lat, 1.7), wilson_action(u, lat, 1.7), atol=1e-10)
    assert torch.allclose(u1_topological_charge(th, lat), topological_charge_u1_2d(u, lat),
                          atol=1e-10)


def test_float32_flow() -> None:
    """The float32 option: parameters, samples and log q in float32, invertible, and agreeing
    with the same weights run in float64 to float32 accuracy."""
    import copy

    lat = Lattice((4, 4))
    m = _model("ncp", lat, dtype=torch.float32, n_layers=4)
    with torch.no_grad():
        theta, logq = m.sample(8, torch.Generator().manual_seed(0))
        assert theta.dtype == torch.float32 and logq.dtype == torch.float32
        z, _ = m.inverse(theta)
        assert float(_circ(m(z)[0] - theta).max()) < 1e-4
        m64 = copy.deepcopy(m).double()
        assert torch.allclose(m64.log_prob(theta.double()), logq.double(), atol=1e-3)


def test_checkpoint_activations_same_result() -> None:
    """Recomputing activations in backward changes memory, not numbers."""
    lat = Lattice((4, 4))
    th = _theta(lat, 2)
    grads = []
    for ck in (False, True):
        m = _model("ncp", lat, n_layers=2, checkpoint_activations=ck)
        out, ld = m(th)
        (ld.sum() + out.sum()).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in m.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-12)


def test_halo_width_from_receptive_field() -> None:
    """Halo of a layer = CNN reach (n_conv * (k-1)/2) + 1 for the plaquette's forward links."""
    lat = Lattice((8, 8))
    m = build_u1_flow(_cfg(hidden=(4, 4), kernel_size=5, n_layers=2), lat)
    assert m.layers[0].halo == 3 * 2 + 1
    assert m.halo == 2 * 7


@pytest.mark.parametrize(
    ("shape", "kw", "match"),
    [
        ((6, 8), {}, r"lattice.shape \[6, 8\].*multiple of the mask period 4"),
        ((4, 4, 4), {}, r"2D lattice"),
        ((8, 8), {"kernel": "affine"}, r"flow.kernel must be 'ncp' or 'spline', got 'affine'"),
        ((8, 8), {"kernel_size": 4}, r"flow.kernel_size must be a positive odd int, got 4"),
        ((8, 8), {"n_layers": 0}, r"flow.n_layers must be >= 1, got 0"),
    ],
)
def test_bad_architecture_is_a_clear_error(shape, kw, match) -> None:
    cfg = _cfg(**{"kernel": "ncp", **kw})
    with pytest.raises(ValueError, match=match):
        build_u1_flow(cfg, Lattice(shape))


def test_bad_links_shape() -> None:
    with pytest.raises(ValueError, match=r"trailing matrix shape \(1, 1\)"):
        angles_from_links(torch.ones(2, 4, 4, 2, 2, dtype=torch.complex128))
