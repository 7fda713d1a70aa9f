"""SU(2)/SU(3) spectral flows: kernels, canonical cell, every layer's bijection contract, log-det
against the autograd Jacobian in algebra coordinates, gauge equivariance, Haar prior moments,
builder dispatch, training/sampling through the generic drivers, bad input."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hpcflow.flows.build import build_flow
from hpcflow.flows.sun import (
    HaarPriorSUN,
    SUNGaugeFlow,
    SUNSpectralCoupling,
    layer_plan,
    make_interval_kernel,
    su2_spectral,
    su3_alcove,
    su3_n_params,
    su3_spectral,
    sun_masks,
)
from hpcflow.lattice.action import wilson_action
from hpcflow.lattice.gauge import gauge_transform
from hpcflow.lattice.geometry import Lattice
from hpcflow.lattice.groups import dagger, get_group
from hpcflow.rng import CounterRNG
from tests.helpers import assert_in_group, make_field, make_gauge

TWO_PI = 2 * math.pi


def _cfg(kernel: str = "spline", n_layers: int = 8, **kw) -> SimpleNamespace:
    base = {"n_layers": n_layers, "kernel": kernel, "n_components": 3, "n_knots": 5, "hidden": (4,),
                "kernel_size": 3, "checkpoint_activations": False}
    base.update(kw)
    return SimpleNamespace(**base)


def _sharpen(module: torch.nn.Module, scale: float = 1.0, seed: int = 99) -> None:
    """Random last convolution of every layer (the builder zero-initialises it, making each
    layer the identity), normalised by its fan-in: O(1) kernel parameters make every check
    non-trivial without an ill-conditioned map."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in module.layers if hasattr(module, "layers") else [module]:
            conv = layer.net.convs[-1]
            fan_in = conv.weight[0].numel()
            conv.weight.copy_(scale / math.sqrt(fan_in) * torch.randn(conv.weight.shape, generator=gen,
                                                                      dtype=torch.float64))
            conv.bias.copy_(0.5 * scale * torch.randn(conv.bias.shape, generator=gen, dtype=torch.float64))


def _layer(group: str, shape, mu: int, nu: int, off: int, kernel: str = "spline",
           seed: int = 0, dtype=torch.float64) -> SUNSpectralCoupling:
    torch.manual_seed(seed)
    lat = Lattice(shape)
    layer = SUNSpectralCoupling(lat, group, mu, nu, off, make_interval_kernel(kernel, 3, 5), (4,), 3)
    layer = layer.to(dtype)
    _sharpen(layer)
    return layer


# ---- interval kernels and the canonical cell ---------------------------------------------
@pytest.mark.parametrize("kind", ["ncp", "spline"])
def test_interval_kernels(kind: str) -> None:
    """g maps [0,1] onto itself fixing 0 and 1, inverse(g) = id, log g' = autograd, p=0 is id."""
    k = make_interval_kernel(kind, 3, 6).double()
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2000, generator=g, dtype=torch.float64)
    p = 1.5 * torch.randn(2000, k.n_params, generator=g, dtype=torch.float64)
    y, lj = k(x, p)
    assert bool(((y >= 0) & (y <= 1)).all())
    ends, _ = k(torch.tensor([0.0, 1.0], dtype=torch.float64), p[:2])
    assert torch.allclose(ends, torch.tensor([0.0, 1.0], dtype=torch.float64), atol=1e-14)
    xb, lj_inv = k.inverse(y, p)
    assert float((xb - x).abs().max()) < 1e-10
    assert float((lj_inv - lj).abs().max()) < 1e-8
    xr = x.clone().requires_grad_(True)
    (dy,) = torch.autograd.grad(k(xr, p)[0].sum(), xr)
    assert torch.allclose(torch.log(dy), lj, atol=1e-9)
    y0, lj0 = k(x, torch.zeros_like(p))
    assert torch.allclose(y0, x, atol=1e-14) and float(lj0.abs().max()) < 1e-12


def test_su3_alcove_is_a_canonical_cell() -> None:
    """(a, b) lie in the simplex a, b >= 0, a + b <= 2 pi, do not depend on the order or the
    2 pi lifts of the eigen-angles, and reproduce the angles through perm (mod 2 pi)."""
    g = torch.Generator().manual_seed(5)
    t12 = (torch.rand(4000, 2, generator=g, dtype=torch.float64) - 0.5) * 4 * math.pi
    phi = torch.cat([t12, -t12.sum(-1, keepdim=True)], -1)
    a, b, perm = su3_alcove(phi)
    assert bool((a >= 0).all() and (b >= 0).all() and (a + b <= TWO_PI + 1e-12).all())
    shuffled = phi[:, torch.tensor([2, 0, 1])] + TWO_PI * torch.tensor([1.0, -2.0, 1.0], dtype=torch.float64)
    a2, b2, _ = su3_alcove(shuffled)
    assert torch.allclose(a2, a, atol=1e-12) and torch.allclose(b2, b, atol=1e-12)
    th = torch.stack([(2 * a + b) / 3, (b - a) / 3, -(a + 2 * b) / 3], -1)
    diff = torch.remainder(torch.gather(phi, -1, perm) - th + math.pi, TWO_PI) - math.pi
    assert float(diff.abs().max()) < 1e-12


def _near_degenerate(group: str, n: int, eps: float, seed: int = 7) -> torch.Tensor:
    """Random conjugates of diagonal elements with two eigen-angles eps apart (and SU(2): near +-1)."""
    grp = get_group(group)
    gen = torch.Generator().manual_seed(seed)
    W = grp.haar(torch.randn(n, grp.n_haar_normals, generator=gen, dtype=torch.float64))
    t = (torch.rand(n, generator=gen, dtype=torch.float64) - 0.5) * 2 * math.pi
    if group == "su2":
        th = torch.where(torch.arange(n) % 2 == 0, torch.full_like(t, eps), math.pi - eps)
        ang = torch.stack([th, -th], -1)
    else:
        ang = torch.stack([t, t + eps, -2 * t - eps], -1)
    D = torch.diag_embed(torch.polar(torch.ones_like(ang), ang))
    return W @ D @ dagger(W)


@pytest.mark.parametrize("group", ["su2", "su3"])
@pytest.mark.parametrize("eps", [1e-3, 1e-6])
def test_spectral_map_near_degenerate(group: str, eps: float) -> None:
    """Near-degenerate loops: the map stays in the group, inverts, commutes with conjugation,
    keeps (near-)degenerate eigenvalues (near-)degenerate, and its gradient is finite."""
    grp = get_group(group)
    P = _near_degenerate(group, 64, eps)
    k = make_interval_kernel("spline", 3, 5).double()
    n_par = k.n_params if group == "su2" else su3_n_params(k)
    p = torch.randn(64, n_par, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    f = su2_spectral if group == "su2" else su3_spectral
    P2, ld = f(P, k, p)
    assert_in_group(P2, grp, 1e-12)
    P3, ld_inv = f(P2, k, p, inverse=True)
    assert float((P3 - P).abs().max()) < 1e-9
    assert float((ld - ld_inv).abs().max()) < 1e-6 * max(1.0, float(ld.abs().max()))
    W = grp.haar(torch.randn(64, grp.n_haar_normals, generator=torch.Generator().manual_seed(2),
                             dtype=torch.float64))
    P4, _ = f(W @ P @ dagger(W), k, p)
    assert float((P4 - W @ P2 @ dagger(W)).abs().max()) < 1e-10
    # the eigenvalue gap shrinks or grows by a bounded factor (the map preserves the cell's faces)
    ev, ev2 = torch.linalg.eigvals(P), torch.linalg.eigvals(P2)
    def gap(e):
        return (e[:, :, None] - e[:, None, :]).abs().add(10 * torch.eye(e.shape[-1])).amin((-1, -2))
    assert float((gap(ev2) / gap(ev)).max()) < 1e3
    pr = p.clone().requires_grad_(True)
    Pr = P.clone().requires_grad_(True)
    out, ldr = f(Pr, k, pr)
    gp, gP = torch.autograd.grad((out.real.sum() + ldr.sum()), (pr, Pr))
    assert bool(torch.isfinite(gp).all()) and bool(torch.isfinite(gP.real).all())


# ---- layers ------------------------------------------------------------------------------
LAYER_CASES = [
    ("su2", (8, 4), 0, 1, 0, "spline"),
    ("su2", (4, 8), 1, 0, 3, "ncp"),
    ("su3", (4, 8), 0, 1, 2, "spline"),
    ("su3", (8, 4), 1, 0, 1, "ncp"),
    ("su3", (4, 2, 3, 4), 3, 0, 1, "spline"),
    ("su2", (2, 4, 3, 2), 0, 1, 2, "ncp"),
    ("su3", (6, 6), 0, 1, 1, "spline"),  # mask period 2
]


@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda c: f"{c[0]}-{len(c[1])}d-mu{c[2]}nu{c[3]}-{c[5]}")
@torch.no_grad()
def test_layer_contract(case) -> None:
    """Every layer: inverse(forward(U)) = U (1e-10), log-dets cancel, unitarity and det 1 kept,
    exactly the masked links move, f(g.U) = g.f(U) with the same log-det (1e-10)."""
    group, shape, mu, nu, off, kernel = case
    layer = _layer(group, shape, mu, nu, off, kernel)
    lat, grp = layer.lat, get_group(group)
    U = make_field(lat, grp, seed=11, batch=2)
    V, ld = layer(U)
    assert ld.shape == (2,)
    assert_in_group(V, grp, 1e-12)
    W, ld_inv = layer.inverse(V)
    assert float((W - U).abs().max()) < 1e-10
    assert float((ld + ld_inv).abs().max()) < 1e-10 * max(1.0, float(ld.abs().max()))
    moved = (V - U).abs().amax((-1, -2)) > 1e-13
    expect = torch.zeros_like(moved[0])
    expect[mu] = sun_masks(lat, mu, nu, off)["links"]
    assert torch.equal(moved, expect.expand_as(moved))
    g = make_gauge(lat, grp, seed=12, batch=2)
    Vg, ldg = layer(gauge_transform(U, g, lat))
    assert float((Vg - gauge_transform(V, g, lat)).abs().max()) < 1e-10
    assert float((ldg - ld).abs().max()) < 1e-10


def _algebra_jacobian_logdet(layer: SUNSpectralCoupling, U0: torch.Tensor) -> float:
    """log|det dw'/dw| at w = 0 with U = exp(i w.T) U0 and U' = exp(i w'.T) f(U0): the layer's
    log-det w.r.t. Haar measure (exponential coordinates have unit Haar density at w = 0).
    ``w'`` is read off through the anti-Hermitian part of ``U' f(U0)^dag``, equal to
    ``i w'.T`` to first order (a local matrix log)."""
    grp = layer.group
    U1 = layer(U0)[0].detach()
    n = grp.n_algebra

    def f(w: torch.Tensor) -> torch.Tensor:
        U = grp.exp(grp.algebra_from_coords(w.view(*U0.shape[:-2], n))) @ U0
        M = layer(U)[0] @ dagger(U1)
        return grp.coords_from_algebra(0.5 * (M - dagger(M))).reshape(-1)

    w0 = torch.zeros(U0[..., 0, 0].numel() * n, dtype=torch.float64)
    J = torch.autograd.functional.jacobian(f, w0, vectorize=True)
    sign, lad = torch.linalg.slogdet(J)
    assert float(sign) != 0.0
    return float(lad)


@pytest.mark.parametrize("case", [
    ("su2", (2, 4), 0, 1, 1, "spline"),
    ("su2", (4, 2), 1, 0, 2, "ncp"),
    ("su3", (2, 4), 0, 1, 2, "ncp"),
    ("su3", (4, 2), 1, 0, 0, "spline"),
    ("su2", (2, 2, 2, 4), 0, 3, 1, "spline"),
    ("su2", (2, 6), 0, 1, 1, "ncp"),  # mask period 2: context from no frozen loop of the plane
], ids=lambda c: f"{c[0]}-{'x'.join(map(str, c[1]))}-mu{c[2]}nu{c[3]}-{c[5]}")
def test_logdet_equals_autograd_jacobian(case) -> None:
    """The layer's log-det equals log|det| of the full autograd Jacobian of all links in Lie-algebra
    coordinates. This also proves the masks: a context that saw an updated link would make the
    Jacobian non-triangular and the two numbers differ."""
    group, shape, mu, nu, off, kernel = case
    layer = _layer(group, shape, mu, nu, off, kernel, seed=3)
    U0 = make_field(layer.lat, layer.group, seed=21)
    ld = float(layer(U0)[1].detach())
    assert abs(ld) > 1e-3  # a non-trivial map
    assert abs(_algebra_jacobian_logdet(layer, U0) - ld) < 1e-9


# ---- masks and the layer plan -----------------------------------------------------------
def test_layer_plan_covers_links_and_planes() -> None:
    """4 Nd layers update every link exactly once; 4 Nd (Nd-1) layers use every ordered plane with
    every offset. Frozen plaquettes hold no updated link (checked link by link)."""
    for nd, shape in ((2, (4, 8)), (4, (4, 4, 4, 8))):
        lat = Lattice(shape)
        count = torch.zeros(nd, *shape, dtype=torch.int64)
        for mu, nu, off in layer_plan(nd, 4 * nd):
            count[mu] += sun_masks(lat, mu, nu, off)["links"].long()
        assert bool((count == 1).all())
        full = layer_plan(nd, 4 * nd * (nd - 1))
        assert len(set(full)) == 4 * nd * (nd - 1)
        assert {(m, n) for m, n, _ in full} == {(m, n) for m in range(nd) for n in range(nd) if m != n}
    lat = Lattice((4, 4, 4, 4))
    grp = get_group("su2")
    layer = SUNSpectralCoupling(lat, grp, 2, 1, 3, make_interval_kernel("ncp", 2, 4), (), 1).double()
    U = make_field(lat, grp, seed=4)
    base = layer.context_features(U)
    links = sun_masks(lat, 2, 1, 3)["links"]
    U2 = U.clone()
    U2[2][links] = grp.haar(torch.randn(int(links.sum()), 4, dtype=torch.float64)).to(U.dtype)
    assert torch.equal(layer.context_features(U2), base)  # updated links never reach the context
    other = U.clone()
    other[2][~links] = grp.haar(torch.randn(int((~links).sum()), 4, dtype=torch.float64)).to(U.dtype)
    assert not torch.equal(layer.context_features(other), base)


# ---- whole flows -------------------------------------------------------------------------
@pytest.mark.parametrize("group,shape,dtype,tol", [
    ("su2", (4, 4), torch.float64, 1e-10),
    ("su3", (4, 4), torch.float64, 1e-10),
    # FP32: the round trip loses eps32 times the condition number of the sharpened map (its
    # log-det is about -40 over 16 sites); the forward pass is compared with FP64 separately
    ("su3", (4, 4), torch.float32, 1e-3),
    ("su3", (4, 4, 2, 2), torch.float64, 1e-10),
])
def test_flow_roundtrip_equivariance_dtype(group: str, shape, dtype, tol: float) -> None:
    """The composed flow (all layers of the plan): round trip, group membership and gauge
    equivariance in FP64 and FP32/complex64; log q = log prior - sum logdet; log_prob inverts."""
    torch.manual_seed(0)
    lat = Lattice(shape)
    n_layers = 8 if len(shape) == 2 else 4
    model = build_flow(_cfg("spline", n_layers), lat, group, dtype)
    _sharpen(model)
    assert isinstance(model, SUNGaugeFlow)
    cd = torch.complex128 if dtype == torch.float64 else torch.complex64
    U, logq = model.sample(3, torch.Generator().manual_seed(1))
    assert U.dtype == cd and logq.dtype == dtype and logq.shape == (3,)
    assert_in_group(U, model.group, 1e-12 if dtype == torch.float64 else 1e-5)
    with torch.no_grad():
        lq = model.log_prob(U)
        assert float((lq - logq).abs().max()) < tol * 100 * max(1.0, float(logq.abs().max()))
        z, _ = model.inverse(U)
        assert float((model(z)[0] - U).abs().max()) < tol
        g = make_gauge(lat, model.group, seed=5, batch=3, dtype=cd)
        Ug, ldg = model(gauge_transform(z, g, lat))
        assert float((Ug - gauge_transform(U, g, lat)).abs().max()) < tol
        assert float((model.prior.log_prob(z) - ldg - logq).abs().max()) < tol * 100 * max(1.0, float(logq.abs().max()))


def test_flow_fp32_forward_matches_fp64() -> None:
    """complex64 forward pass equals the complex128 one to FP32 accuracy (same weights, same z)."""
    lat = Lattice((4, 4))
    torch.manual_seed(0)
    m64 = build_flow(_cfg("spline"), lat, "su3", torch.float64)
    _sharpen(m64)
    m32 = build_flow(_cfg("spline"), lat, "su3", torch.float32)
    m32.load_state_dict({k: v.float() for k, v in m64.state_dict().items()})
    z = m64.prior.sample(3, torch.Generator().manual_seed(1))
    with torch.no_grad():
        U64, ld64 = m64(z)
        U32, ld32 = m32(z.to(torch.complex64))
    assert U32.dtype == torch.complex64 and ld32.dtype == torch.float32
    assert float((U32 - U64).abs().max()) < 2e-5
    assert float((ld32 - ld64).abs().max()) < 1e-5 * float(ld64.abs().max()) + 1e-4


@pytest.mark.parametrize("group", ["su2", "su3"])
def test_haar_prior_trace_moments(group: str) -> None:
    """Haar prior draws (counter RNG) reproduce exact Haar moments of the trace: <tr U> = 0,
    <|tr U|^2> = 1, <|tr U|^4> = 2, and for SU(3) <(tr U)^3> = 1 (the epsilon-tensor invariant
    that distinguishes SU(3) from U(3)); each within 4 standard errors of 6144 links."""
    lat = Lattice((4, 4, 4, 4)) if group == "su3" else Lattice((8, 8))
    prior = HaarPriorSUN(lat, group)
    U = prior.sample_counter(CounterRNG(17), 0, 6144 // (lat.nd * lat.volume))
    assert_in_group(U, prior.group, 1e-12)
    assert torch.equal(prior.log_prob(U), torch.zeros(U.shape[0], dtype=torch.float64))
    t = torch.diagonal(U, dim1=-2, dim2=-1).sum(-1).reshape(-1).numpy()
    checks = [(t.real, 0.0), (np.abs(t) ** 2, 1.0), (np.abs(t) ** 4, 2.0)]
    if group == "su3":
        checks += [(t.imag, 0.0), ((t**3).real, 1.0), ((t**3).imag, 0.0)]
    else:
        assert float(np.abs(t.imag).max()) < 1e-15  # SU(2) traces are real
    for x, exact in checks:
        assert abs(x.mean() - exact) < 4 * x.std() / math.sqrt(len(x)), (x.mean(), exact)
    # the same proposals on any batch split (decomposition/batch independence of the draws)
    assert torch.equal(prior.sample_counter(CounterRNG(17), 1, 1)[0], U[1])


def test_build_flow_dispatch_and_bad_input() -> None:
    """u1 goes to the U(1) flow, su2/su3 to the spectral flow; bad input gets a clear error."""
    from hpcflow.flows.u1 import U1GaugeFlow

    assert isinstance(build_flow(_cfg("ncp"), Lattice((4, 4)), "u1"), U1GaugeFlow)
    m = build_flow(_cfg("ncp", 2), Lattice((4, 4, 4, 4)), get_group("su3"))
    assert m.arch["group"] == "su3" and m.halo == 2 * (2 + 1)  # 2 layers x (2 convolutions of reach 1 + plaquette)
    with pytest.raises(ValueError, match="group"):
        build_flow(_cfg(), Lattice((4, 4)), "su4")
    with pytest.raises(TypeError, match="dtype"):
        build_flow(_cfg(), Lattice((4, 4)), "su2", torch.complex128)
    with pytest.raises(ValueError, match="must be even"):
        build_flow(_cfg(), Lattice((4, 5)), "su2")
    with pytest.raises(ValueError, match="2D or 4D"):
        build_flow(_cfg(), Lattice((4, 4, 4)), "su3")
    with pytest.raises(ValueError, match="flow.kernel"):
        build_flow(_cfg("affine"), Lattice((4, 4)), "su2")
    with pytest.raises(ValueError, match="n_layers"):
        build_flow(_cfg(n_layers=0), Lattice((4, 4)), "su2")
    with pytest.raises(ValueError, match="distinct directions"):
        sun_masks(Lattice((4, 4)), 1, 1, 0)


def test_trainer_and_chains_work_for_sun(tmp_path) -> None:
    """The U(1) Trainer trains an SU(2) flow through the same contract (loss falls, checkpoint
    resumes the same step), and the generic drivers run flow / mixed chains on it."""
    from hpcflow.flows.train import Trainer
    from hpcflow.sampling.flow_chains import flow_chain, flow_mixed_chain

    lat = Lattice((4, 4))
    torch.manual_seed(0)
    model = build_flow(_cfg("ncp", 4, hidden=(8,)), lat, "su2")
    cfg = SimpleNamespace(steps=30, batch=16, lr=5e-3, schedule="constant", grad_clip=10.0,
                          checkpoint_every=10, log_every=10)
    tr = Trainer(model, lat, 2.0, cfg, tmp_path, action=lambda U: wilson_action(U, lat, 2.0), progress=False)
    rows = tr.train()
    first, last = np.mean([r["loss"] for r in rows[:5]]), np.mean([r["loss"] for r in rows[-5:]])
    assert last < first, (first, last)
    res = flow_chain(model, 2.0, 40, 16, CounterRNG(3))
    assert len(res["accepted"]) == 40 and 0 < res["accepted"].mean() <= 1
    again = flow_chain(model, 2.0, 40, 7, CounterRNG(3))  # batch size does not change the chain
    assert np.array_equal(again["S"], res["S"])
    hmc = SimpleNamespace(n_steps=4, tau=0.5, integrator="omelyan")
    mix = flow_mixed_chain(model, 2.0, ["flow", "heatbath", "hmc"], 3, seed=4, batch=4, hmc_cfg=hmc)
    assert list(mix["kind"]) == [0, 1, 2] * 3 and mix["state"].shape == (2, 4, 4, 2, 2)
    assert_in_group(mix["state"], get_group("su2"), 1e-10)
    with pytest.raises(ValueError, match="pattern"):
        flow_mixed_chain(model, 2.0, ["flow", "metropolis"], 1, seed=4)


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    """checkpoint_activations recomputes each layer in backward: identical loss and gradients."""
    lat = Lattice((4, 4, 2, 2))
    grads = []
    for ck in (False, True):
        torch.manual_seed(0)
        model = build_flow(_cfg("ncp", 4, checkpoint_activations=ck), lat, "su3")
        _sharpen(model)
        U, logq = model.sample(2, torch.Generator().manual_seed(3))
        loss = (logq + wilson_action(U, lat, 2.0)).mean()
        loss.backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    assert float(grads[0].abs().max()) > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-12, rtol=1e-10)
