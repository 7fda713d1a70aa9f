"""Host kernels of the 4D SU(3) flow (``kernels/flow_sun.cpp``, ``backend: host``) equal the
torch path (``backend: torch``, the code they replace) in float64.

What this proves: a spectral coupling layer and a whole flow on the host kernels give the same
output links, log-det and log q (to ~1e-12), the same gradients of every parameter and the
same gradient of the input field in the tangent directions (the only ones a flow's
parameter gradients contract it with; the host backward represents it by its tangent part),
for every layer kind of the 8-layer plan, masks of period 4 and 2, extents that differ per
direction, batches that do not fill the SIMD lanes, multi-axis batches, loops with
near-degenerate eigenvalues (two eigen-angles 1e-4 / 1e-7 apart, close to the face
``theta_1 - theta_3 = 2 pi``, and all three close: a loop near the identity), activation
checkpointing, the per-layer path (layers called one by one) and a one-rank
:class:`DistributedFlow`. The host Haar draws (Gram-Schmidt; torch generator and counter RNG) and the host clover
charge equal ``SUN.haar`` and ``topological_charge_clover``. float32 stays within 1e-4 of
the float64 torch path. No timings are asserted here (bench/train_sun.py measures them).
"""

from __future__ import annotations

import math
import os
import shutil
from types import SimpleNamespace

import pytest
import torch

from hpcflow.flows.build import build_flow
from hpcflow.flows.distributed import DistributedFlow
from hpcflow.flows.prior import HaarPriorSUN
from hpcflow.lattice.action import plaquette, wilson_action
from hpcflow.lattice.geometry import Lattice
from hpcflow.lattice.groups import dagger, get_group
from hpcflow.lattice.observables import topological_charge_clover
from hpcflow.rng import CounterRNG

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("HPCFLOW_CXX", "g++")) is None,
                                reason="the host kernels need a C++ compiler")

SU3 = get_group("su3")


def _cfg(n_layers: int = 8, hidden=(8,), n_components: int = 2, **kw) -> SimpleNamespace:
    base = {"n_layers": n_layers, "kernel": "ncp", "n_components": n_components, "n_knots": 4,
            "hidden": tuple(hidden), "kernel_size": 3, "checkpoint_activations": False}
    base.update(kw)
    return SimpleNamespace(**base)


def _pair(shape, cfg, dtype=torch.float64, seed: int = 0, scale: float = 0.3):
    """The same flow (same weights, all of them non-zero) on a host and a torch lattice."""
    torch.manual_seed(seed)
    host = build_flow(cfg, Lattice(shape, backend="host"), "su3", dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in host.parameters():
            p.copy_((scale * torch.randn(p.shape, generator=gen, dtype=torch.float64)).to(dtype))
    torch.manual_seed(seed)
    ref = build_flow(cfg, Lattice(shape, backend="torch"), "su3", dtype)
    ref.load_state_dict(host.state_dict())
    return host, ref


def _field(shape, batch, seed: int = 3, dtype=torch.complex128) -> torch.Tensor:
    prior = HaarPriorSUN(Lattice(shape), SU3)
    return prior.sample(batch, torch.Generator().manual_seed(seed), dtype=dtype)


def _tangent(U: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """The tangent part of a link gradient: traceless Hermitian part of ``i U G^dag``."""
    F = 1j * U @ dagger(G)
    F = 0.5 * (F + dagger(F))
    tr = torch.diagonal(F, dim1=-2, dim2=-1).sum(-1) / 3
    return F - tr[..., None, None] * torch.eye(3, dtype=F.dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _check_layer(lh, lt, U, tol_f=1e-11, tol_g=1e-9) -> None:
    """Forward, log-det, parameter and tangent input gradients of two copies of a layer."""
    w = torch.randn(U.shape, dtype=U.dtype, generator=torch.Generator().manual_seed(11))
    outs = []
    for layer in (lh, lt):
        x = U.clone().requires_grad_(True)
        y, ld = layer(x)
        loss = (y * w).real.sum() + 0.37 * ld.sum()
        grads = torch.autograd.grad(loss, [x, *layer.parameters()])
        outs.append((y, ld, grads))
    (yh, ldh, gh), (yt, ldt, gt) = outs
    assert _rel(yh, yt) < tol_f
    ldh, ldt = ldh.detach(), ldt.detach()
    assert float((ldh - ldt).abs().max()) < tol_f * max(1.0, float(ldt.abs().max()))
    for a, b in zip(gh[1:], gt[1:], strict=True):
        assert _rel(a, b) < tol_g
    assert _rel(_tangent(U, gh[0]), _tangent(U, gt[0])) < tol_g


# ---- one layer ---------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(4, 4, 4, 4), (4, 6, 4, 8)])
def test_every_layer_kind_equals_torch(shape) -> None:
    """All 8 layers of the plan (mu = 0..3, offsets 0..1; nu = the first other direction) and,
    on (4, 6, 4, 8), the period-2 masks across the extent 6; batch 3 (5 padding lanes)."""
    host, ref = _pair(shape, _cfg(8))
    U = _field(shape, 3)
    for lh, lt in zip(host.layers, ref.layers, strict=True):
        assert lh.host_ready(U) and not lt.host_ready(U)
        _check_layer(lh, lt, U)


def test_other_planes_and_deeper_cnn() -> None:
    """nu != the first other direction (layers 16.. of a 48-layer plan), two hidden layers,
    three NCP components, batch 10 (two lane chunks)."""
    shape = (4, 4, 4, 4)
    host, ref = _pair(shape, _cfg(48, hidden=(5, 6), n_components=3), scale=0.2)
    U = _field(shape, 10, seed=4)
    for i in (16, 21, 34, 47):
        _check_layer(host.layers[i], ref.layers[i], U)


def _set_active_loops(U: torch.Tensor, layer, target: torch.Tensor) -> torch.Tensor:
    """``U`` with the active links of ``layer`` changed so that its active loops equal
    ``target[n_act, 3, 3]`` (broadcast over the batch)."""
    lat, mu, nu = layer.lat, layer.mu, layer.nu
    P = plaquette(U, lat, mu, nu).flatten(1, 4)  # (B, V, 3, 3)
    idx = layer.active_idx
    Umu = U[:, mu].flatten(1, 4).clone()
    Umu[:, idx] = target @ dagger(P[:, idx]) @ Umu[:, idx]
    out = U.clone()
    out[:, mu] = Umu.reshape(U[:, mu].shape)
    return out


def _spectra(n: int, kind: str, delta: float, seed: int = 5) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    V = SU3.haar(torch.randn(n, 18, generator=gen, dtype=torch.float64))
    t = (torch.rand(n, generator=gen, dtype=torch.float64) - 0.5) * 2.0
    if kind == "pair":  # two eigen-angles delta apart
        ang = torch.stack([t + delta / 2, t - delta / 2, -2 * t], -1)
    elif kind == "cface":  # theta_1 - theta_3 = 2 pi - delta
        ang = torch.stack([math.pi - delta / 2 + 0 * t, 0 * t, -math.pi + delta / 2 + 0 * t], -1)
    else:  # all three within delta: near the identity
        ang = torch.stack([delta * (1 + 0.3 * t), -delta * (0.5 - 0.2 * t), -delta * (0.5 + 0.1 * t)], -1)
        ang = ang - ang.mean(-1, keepdim=True)
    D = torch.diag_embed(torch.polar(torch.ones_like(ang), ang))
    return V @ D @ dagger(V)


@pytest.mark.parametrize("kind,delta,tol_f,tol_g", [
    ("pair", 1e-4, 1e-11, 1e-9), ("pair", 1e-7, 1e-11, 1e-7),
    ("cface", 1e-5, 1e-9, 1e-6), ("center", 1e-3, 1e-11, 1e-8)])
def test_near_degenerate_loops_equal_torch(kind: str, delta: float, tol_f: float, tol_g: float) -> None:
    """Active loops with (near-)degenerate spectra. The host backward uses the bounded ratios
    sin(g'/2)/sin(g/2) where eigh's backward has 1/(t_j - t_k): the torch path's gradient
    loses ~eps/delta (eps/delta^2 with three close angles), hence the looser gradient
    tolerances. Near the face theta_1 - theta_3 = 2 pi both paths form c' = 2 pi - a' - b'
    (1e-7 after the map), each ~1e-8 off in log-det per loop (against a 40-digit evaluation
    of the same formulas); they agree to 1e-9 relative on the layer's log-det."""
    shape = (4, 4, 4, 4)
    host, ref = _pair(shape, _cfg(8), scale=0.2)
    for i in (0, 5):
        lh, lt = host.layers[i], ref.layers[i]
        U = _set_active_loops(_field(shape, 2, seed=8), lh, _spectra(lh.active_idx.numel(), kind, delta))
        _check_layer(lh, lt, U, tol_f=tol_f, tol_g=tol_g)


# ---- whole flows ---------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [(5,), (2, 3)])
def test_flow_push_and_loss_gradients_equal_torch(batch) -> None:
    """The fused walk (one node for all layers, in place): x, log q, the reverse-KL loss and
    the gradients of all parameters; multi-axis batches keep their shape. (Weights of scale
    0.05: with larger random weights the 8-layer map expands differences by ~5x per layer,
    which the per-layer tests above cover without the amplification.)"""
    shape = (4, 4, 4, 4)
    host, ref = _pair(shape, _cfg(8), scale=0.05)
    z = _field(shape, math.prod(batch), seed=6).reshape(*batch, *_field(shape, 1).shape[1:])
    res = []
    for m, lat in ((host, host.lat), (ref, ref.lat)):
        x, logq = m.push(z)
        loss = (logq + wilson_action(x, lat, 1.5)).mean()
        res.append((x, logq, torch.autograd.grad(loss, list(m.parameters()))))
    (xh, qh, gh), (xt, qt, gt) = res
    assert xh.shape == xt.shape == z.shape
    assert _rel(xh, xt) < 1e-11
    assert float((qh - qt).detach().abs().max()) < 1e-9
    for a, b in zip(gh, gt, strict=True):
        assert _rel(a, b) < 1e-9
    # the torch inverse of the host forward gives back its log q (NCP inverse by bisection
    # and Newton: ~1e-10 relative)
    with torch.no_grad():
        lq = ref.log_prob(xh.detach())
    assert float((lq - qh.detach()).abs().max()) < 1e-9 * float(qh.detach().abs().max())


def test_checkpointing_per_layer_walk_and_distributed_flow() -> None:
    """Activation checkpointing (one recomputed node per layer), the layers called one by one
    (the per-layer host path, one layout conversion each, as under halo exchanges) and a
    one-rank DistributedFlow give the fused walk's values and gradients."""
    shape = (4, 4, 4, 4)
    host, _ = _pair(shape, _cfg(4), scale=0.2)
    ck, _ = _pair(shape, _cfg(4, checkpoint_activations=True), scale=0.2)
    dist = DistributedFlow(host)
    z = _field(shape, 3, seed=9)

    def one_by_one(x):
        total = torch.zeros(x.shape[0], dtype=torch.float64)
        for layer in host.layers:
            x, ld = layer(x)
            total = total + ld
        return x, -total

    res = []
    for run, model in ((host.push, host), (ck.push, ck), (one_by_one, host), (dist.push, dist)):
        x, logq = run(z)
        res.append((x, logq, torch.autograd.grad(logq.sum() + x.real.sum(), list(model.parameters()))))
    x0, q0, g0 = res[0]
    for x1, q1, g1 in res[1:]:
        assert _rel(x1, x0) < 1e-13 and float((q1 - q0).detach().abs().max()) < 1e-10
        for a, b in zip(g1, g0, strict=True):
            assert _rel(a, b) < 1e-11


def _sun_nodes(t: torch.Tensor) -> list:
    """The fused SU(3) autograd nodes in the graph of ``t``."""
    out, todo, seen = [], [t.grad_fn], set()
    while todo:
        n = todo.pop()
        if n is None or id(n) in seen:
            continue
        seen.add(id(n))
        if "SUNFlow" in type(n).__name__:
            out.append(n)
        todo.extend(f for f, _ in n.next_functions)
    return out


def test_backward_releases_the_layer_buffers() -> None:
    """The defect: the fused node kept its final field (one of its outputs) and every layer's
    saved buffers as ctx attributes, a cycle output -> grad_fn -> ctx that only Python's cyclic
    collector could free; the per-layer walk of a decomposed training grew ~90 MB per rank and
    step at 8x4^3 (0.5-0.8 GB at 8^4, OOM-killed at 12 GB per rank). After the backward the
    nodes hold nothing and the fields are freed without a collection; a second backward is
    refused clearly."""
    import gc
    import weakref

    shape = (4, 4, 4, 4)
    host, _ = _pair(shape, _cfg(2), scale=0.2)
    gc.disable()
    try:
        for walk in ("per layer", "fused"):
            x = _field(shape, 2, seed=4)
            total = torch.zeros(2, dtype=torch.float64)
            if walk == "per layer":  # the path of a DistributedFlow with halo exchanges
                for layer in host.layers:
                    x, ld = layer(x)
                    total = total + ld
            else:
                x, logq = host.push(x)
                total = -logq
            loss = total.sum() + x.real.sum()
            nodes = _sun_nodes(loss)
            assert len(nodes) == (len(host.layers) if walk == "per layer" else 1)
            probes = [weakref.ref(n.final) for n in nodes]
            loss.backward(retain_graph=True)
            assert all(n.final is None and n.saved_layers is None for n in nodes)
            with pytest.raises(RuntimeError, match="already walked back"):
                loss.backward()
            del x, loss, total, nodes
            if walk == "per layer":  # the fused walk's final field is its output's storage
                assert all(p() is None for p in probes)  # freed by reference counting alone
    finally:
        gc.enable()


def test_float32_close_to_float64() -> None:
    shape = (4, 4, 4, 4)
    host32, _ = _pair(shape, _cfg(4), dtype=torch.float32, scale=0.05)
    _, ref64 = _pair(shape, _cfg(4), dtype=torch.float64, scale=0.05)
    ref64.load_state_dict({k: v.double() for k, v in host32.state_dict().items()})
    z = _field(shape, 3, seed=2)
    x32, q32 = host32.push(z.to(torch.complex64))
    x64, q64 = ref64.push(z)
    assert _rel(x32.to(torch.complex128), x64) < 1e-4
    assert float((q32.double() - q64).detach().abs().max()) < 1e-4 * float(q64.detach().abs().max())
    g = torch.autograd.grad(q32.sum(), list(host32.parameters()))
    assert all(bool(torch.isfinite(t).all()) for t in g)


# ---- prior draws, observables, layout --------------------------------------------------------
def test_host_haar_draws_equal_qr() -> None:
    from hpcflow.kernels.flow_sun import haar_su3

    normals = torch.randn(500, 18, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert _rel(haar_su3(normals), SU3.haar(normals)) < 1e-12
    shape = (4, 4, 2, 4)
    ph, pt = (HaarPriorSUN(Lattice(shape, backend=b), SU3) for b in ("host", "torch"))
    a = ph.sample(3, torch.Generator().manual_seed(4))
    b = pt.sample(3, torch.Generator().manual_seed(4))
    assert _rel(a, b) < 1e-12
    rng = CounterRNG(17, 3)
    a = ph.sample_counter(rng, 11, 5, dtype=torch.complex64)
    b = pt.sample_counter(rng, 11, 5, dtype=torch.complex64)
    assert a.dtype == torch.complex64 and _rel(a, b) < 1e-6
    a = ph.sample_counter(rng, 11, 5)
    b = pt.sample_counter(rng, 11, 5)
    assert _rel(a, b) < 1e-12


def test_host_clover_charge_equals_torch() -> None:
    from hpcflow.flows.sun import SUNTheory

    shape = (4, 6, 4, 2)
    U = _field(shape, 3, seed=12)
    th, tt = (SUNTheory(Lattice(shape, backend=b), SU3) for b in ("host", "torch"))
    assert th.host_observables(U) and not tt.host_observables(U)
    q = th.observables(U)["Q"]
    assert float((q - topological_charge_clover(U, tt.lat)).abs().max()) < 1e-13
    assert float((th.observables(U)["plaquette"] - tt.observables(U)["plaquette"]).abs().max()) < 1e-13


def test_lanes_layout_round_trip_and_gradient() -> None:
    from hpcflow.kernels.flow_sun import from_lanes, to_lanes

    U = _field((2, 4, 2, 4), 11, seed=1).requires_grad_(True)
    Ut = to_lanes(U, 8)
    assert Ut.shape == (2, 4, 64, 18, 8)
    assert torch.equal(from_lanes(Ut, 11, (2, 4, 2, 4)), U.detach())
    w = torch.randn(U.shape, dtype=U.dtype, generator=torch.Generator().manual_seed(2))
    (g,) = torch.autograd.grad((from_lanes(to_lanes(U, 8), 11, (2, 4, 2, 4)) * w).real.sum(), U)
    (g_ref,) = torch.autograd.grad((U * w).real.sum(), U)
    assert torch.equal(g, g_ref)


def test_host_action_equals_wilson_action_and_its_gradient() -> None:
    from hpcflow.flows.sun import SUNTheory

    shape = (4, 6, 2, 4)
    U = _field(shape, 5, seed=13)
    th, tt = (SUNTheory(Lattice(shape, backend=b), SU3) for b in ("host", "torch"))
    res = []
    for t in (th, tt):
        x = U.clone().requires_grad_(True)
        S = t.action(x, 5.5)
        res.append((S.detach(), torch.autograd.grad(S.sum(), x)[0]))
    assert _rel(res[0][0], res[1][0]) < 1e-13
    assert _rel(res[0][1], res[1][1]) < 1e-13


def test_fused_walk_backward_twice_is_refused() -> None:
    """The fused walk runs its backward in place on the final field: a second backward
    through the same graph (retain_graph) is refused with a clear error, not a wrong answer."""
    host, _ = _pair((4, 4, 4, 4), _cfg(2), scale=0.1)
    x, logq = host.push(_field((4, 4, 4, 4), 2, seed=3))
    loss = logq.sum() + x.real.sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already walked back"):
        loss.backward()
