"""The host inverse of the 4D SU(3) flow (``kernels/flow_sun.cpp`` ``spec_inv``,
:func:`hpcflow.kernels.flow_sun.sun_flow_inverse`) equals the torch inverse it replaces when
no gradient is needed (``Flow.inverse`` / ``log_prob`` under ``torch.no_grad``, as a mixed
chain calls it).

What this proves: on random fields of a small flow with non-zero weights (the map is far from
the identity: log-dets of order 10), the host inverse gives the torch inverse's links and
log-dets (1e-10 in float64; float32 within its rounding of the float64 result), for batches
that do not fill the SIMD lanes and multi-axis batches; ``forward(inverse(U)) = U`` and
``log_prob`` gives back the ``log q`` of the forward's samples; loops with near-degenerate
spectra (two eigen-angles 1e-7 apart, close to the face ``theta_1 - theta_3 = 2 pi``, all three
close) have the log-det of a 40-digit evaluation of the same maps (as far as the eigen-angles'
rounding allows) and the torch inverse's links, and a cold field (every loop the identity,
where the torch inverse's Weyl factors are ``log 0 - log 0``) has a finite log q; per-layer
inverses and a one-rank :class:`DistributedFlow` take the host path too; with gradients
needed the torch path runs (and the host one refuses). Also: the torch NCP inverse
(early-stopping Newton) still inverts the forward to rounding with its implicit gradient.
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
from hpcflow.flows.kernels1d import IntervalNCPKernel
from hpcflow.flows.prior import HaarPriorSUN
from hpcflow.lattice.action import plaquette
from hpcflow.lattice.geometry import Lattice
from hpcflow.lattice.groups import dagger, get_group

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("HPCFLOW_CXX", "g++")) is None,
                                reason="the host kernels need a C++ compiler")

SU3 = get_group("su3")
SHAPE = (4, 4, 4, 4)


def _cfg(n_layers: int = 4, n_components: int = 3) -> SimpleNamespace:
    return SimpleNamespace(n_layers=n_layers, kernel="ncp", n_components=n_components, n_knots=4,
                           hidden=(4,), kernel_size=3, checkpoint_activations=False)


def _pair(cfg: SimpleNamespace, dtype=torch.float64, scale: float = 0.03):
    """The same flow (every weight non-zero) on a host and a torch lattice."""
    torch.manual_seed(0)
    host = build_flow(cfg, Lattice(SHAPE, backend="host"), "su3", dtype)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in host.parameters():
            p.copy_((scale * torch.randn(p.shape, generator=gen, dtype=torch.float64)).to(dtype))
    ref = build_flow(cfg, Lattice(SHAPE, backend="torch"), "su3", dtype)
    ref.load_state_dict(host.state_dict())
    return host, ref


def _field(batch: int, seed: int = 3, dtype=torch.complex128) -> torch.Tensor:
    return HaarPriorSUN(Lattice(SHAPE), SU3).sample(batch, torch.Generator().manual_seed(seed),
                                                    dtype=dtype)


def _torch_only(monkeypatch, model) -> None:
    """Make the torch path of ``model``'s layers fail: the host path must be taken."""
    for layer in model.layers:
        monkeypatch.setattr(layer, "_couple", lambda *a: pytest.fail("torch path taken"))


@pytest.mark.parametrize("n_components", [2, 4])
def test_host_inverse_equals_torch_float64(monkeypatch, n_components: int) -> None:
    """Links and log-dets of the inverse flow (batch 3: 5 padding lanes; batch (2, 5): two
    lane chunks and two batch axes) equal the torch inverse's to 1e-10."""
    host, ref = _pair(_cfg(4, n_components))
    _torch_only(monkeypatch, host)
    for batch in ((3,), (2, 5)):
        U = _field(math.prod(batch)).reshape(*batch, *_field(1).shape[1:])
        with torch.no_grad():
            zh, lh = host.inverse(U)
            zt, lt = ref.inverse(U)
        assert zh.shape == U.shape and lh.shape == batch
        assert float((zh - zt).abs().max()) < 1e-10
        assert float(lt.abs().min()) > 1.0  # far from the identity map
        assert float((lh - lt).abs().max()) < 1e-10 * float(lt.abs().max())


def test_host_inverse_float32() -> None:
    """float32 (16 lanes) against the float64 torch inverse of the same weights."""
    host32, _ = _pair(_cfg(4), torch.float32)
    _, ref64 = _pair(_cfg(4), torch.float64)
    U = _field(3)
    with torch.no_grad():
        z32, l32 = host32.inverse(U.to(torch.complex64))
        z64, l64 = ref64.inverse(U)
    assert z32.dtype == torch.complex64 and l32.dtype == torch.float32
    assert float((z32.to(torch.complex128) - z64).abs().max()) < 1e-4
    assert float((l32.double() - l64).abs().max()) < 1e-5 * float(l64.abs().max())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_round_trip_and_log_q(dtype) -> None:
    """``forward(inverse(U)) = U``, ``inverse(forward(z)) = z`` and ``log_prob`` gives back the
    forward's ``log q`` (the 16 layers of a 4^4 plan: every link updated once)."""
    host, _ = _pair(_cfg(16), dtype, scale=0.02)
    tol = 1e-11 if dtype == torch.float64 else 1e-4
    cd = torch.complex128 if dtype == torch.float64 else torch.complex64
    with torch.no_grad():
        x, logq = host.sample(5, torch.Generator().manual_seed(2))
        lq = host.log_prob(x)
        z, _ = host.inverse(x)
        x2, _ = host(z)
        U = _field(5, seed=4, dtype=cd)
        w, _ = host.inverse(U)
        U2, _ = host(w)
    assert float((lq - logq).abs().max()) < tol * max(1.0, float(logq.abs().max()))
    assert float((x2 - x).abs().max()) < tol
    assert float((U2 - U).abs().max()) < tol
    # the inverse's output is in SU(3)
    eye = torch.eye(3, dtype=cd)
    assert float((w @ dagger(w) - eye).abs().max()) < 10 * tol


def _with_loops(U: torch.Tensor, layer, target: torch.Tensor) -> torch.Tensor:
    """``U`` with the active links of ``layer`` changed so that its active loops equal
    ``target[n_act, 3, 3]``."""
    lat, mu, nu = layer.lat, layer.mu, layer.nu
    P = plaquette(U, lat, mu, nu).flatten(1, 4)
    idx = layer.active_idx
    Umu = U[:, mu].flatten(1, 4).clone()
    Umu[:, idx] = target @ dagger(P[:, idx]) @ Umu[:, idx]
    out = U.clone()
    out[:, mu] = Umu.reshape(U[:, mu].shape)
    return out


def _spectra(n: int, kind: str, delta: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed(5)
    V = SU3.haar(torch.randn(n, 18, generator=gen, dtype=torch.float64))
    t = (torch.rand(n, generator=gen, dtype=torch.float64) - 0.5) * 2.0
    if kind == "pair":  # two eigen-angles delta apart
        ang = torch.stack([t + delta / 2, t - delta / 2, -2 * t], -1)
    elif kind == "cface":  # theta_1 - theta_3 = 2 pi - delta
        ang = torch.stack([math.pi - delta / 2 + 0 * t, 0 * t, -math.pi + delta / 2 + 0 * t], -1)
    else:  # all three within delta: near the identity
        ang = torch.stack([delta * (1 + 0.3 * t), -delta * (0.5 - 0.2 * t), -delta * (0.5 + 0.1 * t)], -1)
        ang = ang - ang.mean(-1, keepdim=True)
    return V @ torch.diag_embed(torch.polar(torch.ones_like(ang), ang)) @ dagger(V)


def _ncp(x, p, k: int, mp):
    """``(g(x), g'(x))`` of :class:`IntervalNCPKernel` (``s_max`` 5) in mpmath."""
    s = [5 * mp.tanh(mp.mpf(float(p[i])) / 5) for i in range(k)]
    a = [mp.mpf(float(p[k + i])) for i in range(k)]
    w = [mp.exp(ai) / mp.fsum(mp.exp(aj) for aj in a) for ai in a]
    z = mp.pi * x / 2
    g = mp.fsum(w[i] * 2 / mp.pi * mp.atan(mp.exp(s[i]) * mp.tan(z)) for i in range(k))
    gp = mp.fsum(w[i] / (mp.exp(-s[i]) * mp.cos(z) ** 2 + mp.exp(s[i]) * mp.sin(z) ** 2)
                 for i in range(k))
    return g, gp


def _ncp_inverse(y, p, k: int, mp):
    lo, hi = mp.mpf(0), mp.mpf(1)
    for _ in range(20):  # bisection to 1e-6, then Newton (quadratic) to 40 digits
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _ncp(mid, p, k, mp)[0] < y else (lo, mid)
    x = (lo + hi) / 2
    for _ in range(5):
        g, gp = _ncp(x, p, k, mp)
        x = x - (g - y) / gp
    return x


def _reference_logdet(P: torch.Tensor, p: torch.Tensor, k: int) -> float:
    """The forward's log-det at the pre-image of the SU(3) loop ``P`` (40 digits): the
    module docstring's formulas on the eigen-angles of ``P``."""
    mp = pytest.importorskip("mpmath").mp
    mp.dps = 40
    ev = mp.eig(mp.matrix(P.tolist()))[0]
    phi = [mp.arg(e) for e in ev]
    n = int(mp.nint(mp.fsum(phi) / (2 * mp.pi)))
    if n == 1:
        phi[phi.index(max(phi))] -= 2 * mp.pi
    elif n == -1:
        phi[phi.index(min(phi))] += 2 * mp.pi
    t = sorted(phi, reverse=True)
    a2, b2 = t[0] - t[1], t[1] - t[2]
    u2, v2 = a2 / (2 * mp.pi), b2 / (2 * mp.pi - a2)
    u = _ncp_inverse(u2, p[: 2 * k], k, mp)
    x = mp.pi * u
    feat = [1, mp.cos(x), mp.sin(x), mp.cos(2 * x), mp.sin(2 * x)]
    p2 = [mp.fsum(float(p[2 * k + f * 2 * k + j]) * feat[f] for f in range(5)) for j in range(2 * k)]
    v = _ncp_inverse(v2, p2, k, mp)
    a = 2 * mp.pi * u
    b = (2 * mp.pi - a) * v
    weyl = sum(2 * mp.log(abs(mp.sin(y2 / 2) / mp.sin(y / 2))) for y2, y in ((a2, a), (b2, b), (a2 + b2, a + b)))
    return float(mp.log(_ncp(u, p[: 2 * k], k, mp)[1]) + mp.log(_ncp(v, p2, k, mp)[1])
                 + mp.log(1 - u2) - mp.log(1 - u) + weyl)


@pytest.mark.parametrize("kind,delta,tol", [("pair", 1e-7, 1e-13), ("ident", 1e-4, 1e-11),
                                            ("cface", 1e-5, 1e-9)])
def test_near_degenerate_loops(kind: str, delta: float, tol: float) -> None:
    """Active loops with (near-)degenerate spectra: the layer's host inverse gives the log-det
    of a 40-digit evaluation of the same maps on the eigen-angles of the same loops to ``tol``
    per loop, the torch inverse's links, and the host forward maps it back. Two cases are
    limited by the eigen-angles' rounding (eps absolute), not by the inverse: near the face
    theta_1 - theta_3 = 2 pi the gap c' = 2 pi - a' - b' has lost the digits, and near the
    identity the log-det depends on the direction b'/a' of the approach (module docstring of
    the host kernels; host 5e-13 per loop at delta 1e-4, the torch inverse 2e-11)."""
    host, ref = _pair(_cfg(4))
    lh, lt = host.layers[0], ref.layers[0]
    U = _with_loops(_field(1, seed=7), lh, _spectra(lh.active_idx.numel(), kind, delta))
    with torch.no_grad():
        zh, ldh = lh.inverse(U)
        zt, _ = lt.inverse(U)
        back, ldf = lh(zh)
        P = plaquette(U, lt.lat, lt.mu, lt.nu).flatten(1, 4)[0, lt.active_idx]
        prm = lt._params(U)[0, lt.active_idx]
    ref_ld = -sum(_reference_logdet(P[i], prm[i], 3) for i in range(P.shape[0]))
    assert abs(float(ldh[0]) - ref_ld) < tol * P.shape[0]
    assert float((zh - zt).abs().max()) < 1e-9
    assert float((back - U).abs().max()) < 1e-9
    assert float((ldf + ldh).abs().max()) < tol * P.shape[0]


def test_cold_field_finite() -> None:
    """Every loop the identity (a cold start), where the torch inverse's Weyl factors are
    log 0 - log 0: the host log q is finite (a limit along the alcove's coordinate lines: the
    density has no unique value there) and the inverse keeps the field; a field 1e-6 away
    has the torch inverse's log q (which loses ~eps / 1e-6 per loop there)."""
    host, ref = _pair(_cfg(16), scale=0.02)
    cold = torch.eye(3, dtype=torch.complex128).expand(1, 4, *SHAPE, 3, 3).clone()
    gen = torch.Generator().manual_seed(8)
    H = 1e-6 * torch.randn(1, 4, *SHAPE, 3, 3, dtype=torch.complex128, generator=gen)
    H = 0.5 * (H + dagger(H))
    H = H - torch.diagonal(H, dim1=-2, dim2=-1).mean(-1)[..., None, None] * torch.eye(3, dtype=H.dtype)
    near = torch.linalg.matrix_exp(1j * H)
    with torch.no_grad():
        z, _ = host.inverse(cold)
        lq = host.log_prob(cold)
        lq_near, lq_near_host = ref.log_prob(near), host.log_prob(near)
    assert bool(torch.isfinite(lq).all())
    assert float((z - cold).abs().max()) < 1e-12
    assert float((lq_near_host - lq_near).abs().max()) < 1e-8 * float(lq_near.abs().max())


def test_per_layer_and_distributed_inverse(monkeypatch) -> None:
    """The layers inverted one by one (one layout conversion each, as under halo exchanges)
    and a one-rank DistributedFlow's ``log_prob`` equal the fused inverse walk."""
    host, _ = _pair(_cfg(4))
    _torch_only(monkeypatch, host)
    dist = DistributedFlow(host)
    U = _field(3, seed=9)
    with torch.no_grad():
        z, ld = host.inverse(U)
        x, total = U, torch.zeros(3, dtype=torch.float64)
        for layer in reversed(host.layers):
            x, ldl = layer.inverse(x)
            total = total + ldl
        lq, lq_fused = dist.log_prob(U), host.log_prob(U)
    assert float((x - z).abs().max()) < 1e-13
    assert float((total - ld).abs().max()) < 1e-12 * float(ld.abs().max())
    assert float((lq - lq_fused).abs().max()) < 1e-12 * float(lq.abs().max())


def test_gradient_needed_takes_torch_path() -> None:
    """With gradients needed (path gradients of ``log_prob``) the torch path runs and the
    gradients flow; the host inverse refuses a call that would need its (missing) backward."""
    from hpcflow.kernels.flow_sun import lanes, sun_flow_inverse, to_lanes

    host, ref = _pair(_cfg(4))
    U = _field(2)
    layer = host.layers[0]
    assert not layer.host_inverse_ready(U)
    with torch.no_grad():
        assert layer.host_inverse_ready(U)
    lq = host.log_prob(U)
    assert lq.requires_grad
    grads = torch.autograd.grad(lq.sum(), list(host.parameters()))
    grads_ref = torch.autograd.grad(ref.log_prob(U).sum(), list(ref.parameters()))
    for a, b in zip(grads, grads_ref, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    ws, bs = layer.conv_params()
    with pytest.raises(RuntimeError, match="no backward"):
        sun_flow_inverse(to_lanes(U, lanes(torch.float64)), [layer.lanes_spec()], [ws], [bs])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torch_ncp_inverse(dtype) -> None:
    """The torch NCP inverse (Newton stopped at the rounding level) inverts the forward to
    rounding, and its last Newton step carries the implicit gradient ``dx/dy = 1/g'``."""
    k = IntervalNCPKernel(4)
    gen = torch.Generator().manual_seed(3)
    p = (3.0 * torch.randn(2000, 8, generator=gen, dtype=torch.float64)).to(dtype)
    x0 = torch.rand(2000, generator=gen, dtype=torch.float64).to(dtype)
    y, lj = k(x0, p)
    yg = y.clone().requires_grad_(True)
    x, lj_inv = k.inverse(yg, p)
    eps = torch.finfo(dtype).eps
    assert float((x.detach() - x0).abs().max()) < 200 * eps
    assert float((lj_inv.detach() - lj).abs().max()) < 1e3 * eps
    (dx,) = torch.autograd.grad(x.sum(), yg)
    assert float((dx * lj.exp() - 1).abs().max()) < 1e3 * eps
