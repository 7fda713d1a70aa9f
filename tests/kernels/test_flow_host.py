"""Host convolutions of the U(1) flows' context CNN (``kernels/flow_conv.cpp``) equal torch.

What this proves: :func:`hpcflow.kernels.flow.circular_cnn` (one autograd node, C++ forward and
backward on the batch-last layout) computes the same network as
:class:`hpcflow.flows.context.ContextCNN` on the torch path (``nn.Conv2d`` after circular
padding), for the output and for the gradients with respect to the input and every weight and
bias: periodic wrap on both axes, kernel sizes 1/3/5, no hidden layer, the active-rows output
on both axes, extents that are odd or not multiples of 4 (halo-padded local arrays), and batch
sizes that are not multiples of the SIMD width (the scalar tail loops). Tolerances are relative
to the largest value compared: 1e-12 (float64) and 2e-5 (float32; summation order differs).
A coupling layer and a whole flow with ``backend: host`` equal ``backend: torch``.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from hpcflow.flows import build_u1_flow
from hpcflow.flows.context import ContextCNN
from hpcflow.kernels.flow import circular_cnn
from hpcflow.lattice.geometry import Lattice

RTOL = {torch.float64: 1e-12, torch.float32: 2e-5}

# (batch N, L0, L1, hidden, out channels, kernel size, rows)
CASES = [
    (64, 8, 8, (8, 8), 5, 3, None),
    (64, 8, 8, (8, 8), 5, 3, (0, 1, 4)),
    (37, 10, 6, (5,), 7, 3, (1, 2, 4)),
    (5, 12, 8, (4, 3), 5, 5, (0, 3, 4)),
    (20, 7, 5, (), 3, 1, None),
    (17, 9, 11, (6,), 4, 3, (1, 0, 4)),
]


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    a, b = a.detach(), b.detach()
    scale = float(b.abs().max())
    assert scale > 0, "comparison of all-zero tensors proves nothing"
    err = float((a - b).abs().max())
    assert err <= RTOL[dtype] * scale, f"max error {err:.3e} vs scale {scale:.3e}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=[f"c{i}" for i in range(len(CASES))])
def test_host_cnn_equals_torch_values_and_gradients(case, dtype) -> None:
    n, l0, l1, hidden, cout, k, rows = case
    torch.manual_seed(1)
    net = ContextCNN(2, hidden, cout, k).to(dtype)
    x = torch.randn(n, 2, l0, l1, dtype=dtype, requires_grad=True)
    ref = net(x, rows)
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (x, *net.parameters()), g)

    xc = x.detach().permute(1, 2, 3, 0).contiguous().requires_grad_()
    out = circular_cnn(xc, [c.weight for c in net.convs], [c.bias for c in net.convs], rows)
    assert out.shape == ref.permute(1, 2, 3, 0).shape
    grads = torch.autograd.grad(out, (xc, *net.parameters()), g.permute(1, 2, 3, 0).contiguous())
    _close(out.permute(3, 0, 1, 2), ref, dtype)
    _close(grads[0].permute(3, 0, 1, 2), ref_grads[0], dtype)
    for a, b in zip(grads[1:], ref_grads[1:], strict=True):
        _close(a, b, dtype)


def test_host_cnn_gradcheck() -> None:
    """Finite differences agree with the C++ backward (float64, small case, strided rows)."""
    torch.manual_seed(2)
    net = ContextCNN(2, (3,), 2, 3).double()
    x = torch.randn(2, 5, 4, 3, dtype=torch.float64, requires_grad=True)  # [C, L0, L1, N]
    params = [p.detach().clone().requires_grad_() for p in net.parameters()]

    def f(x, w1, b1, w2, b2):
        return circular_cnn(x, [w1, w2], [b1, b2], (0, 1, 2))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-7)


def test_context_cnn_forward_cf_same_on_both_backends() -> None:
    torch.manual_seed(3)
    a = ContextCNN(2, (4,), 3, 3).double()
    b = ContextCNN(2, (4,), 3, 3, backend="host").double()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 8, 4, 6, dtype=torch.float64)
    _close(b.forward_cf(x, (1, 1, 4)), a.forward_cf(x, (1, 1, 4)), torch.float64)


def _flow(backend: str, dtype: torch.dtype, ck: bool = False):
    lat = Lattice((8, 4), backend=backend)
    arch = SimpleNamespace(n_layers=4, kernel="ncp", n_components=2, n_knots=8, hidden=(6, 5),
                           kernel_size=3, checkpoint_activations=ck)
    torch.manual_seed(4)
    return build_u1_flow(arch, lat, dtype)


@pytest.mark.parametrize("ck", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_u1_flow_host_backend_equals_torch(dtype, ck) -> None:
    """Same weights: the same configurations, log-densities and parameter gradients (also
    with activation checkpointing, which reruns the host forward in the backward pass)."""
    ft, fh = _flow("torch", dtype), _flow("host", dtype, ck)
    fh.load_state_dict(ft.state_dict())
    assert fh.layers[0].net.backend == "host" and ft.layers[0].net.backend == "torch"
    z = 2 * torch.pi * torch.rand(6, 2, 8, 4, generator=torch.Generator().manual_seed(5), dtype=dtype)
    out = []
    for f in (ft, fh):
        theta, logq = f.push(z)
        loss = (logq + torch.cos(theta).sum((-3, -2, -1))).mean()
        grads = torch.autograd.grad(loss, list(f.parameters()))
        out.append((theta, logq, grads))
    (t0, q0, g0), (t1, q1, g1) = out
    # angles live on [0, 2 pi): compare on the circle
    _close(torch.remainder(t1 - t0 + torch.pi, 2 * torch.pi) - torch.pi + t0, t0, dtype)
    _close(q1, q0, dtype)
    tol = 1e-10 if dtype == torch.float64 else 1e-3
    for a, b in zip(g1, g0, strict=True):
        assert float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


def test_bad_inputs_have_clear_errors() -> None:
    w = [torch.zeros(3, 2, 3, 3)]
    b = [torch.zeros(3)]
    with pytest.raises(TypeError, match="float32 and float64"):
        circular_cnn(torch.zeros(2, 4, 4, 3, dtype=torch.float16), w, b)
    with pytest.raises(ValueError, match="does not fit 5 input channels"):
        circular_cnn(torch.zeros(5, 4, 4, 3), w, b)
    with pytest.raises(ValueError, match="rows must be"):
        circular_cnn(torch.zeros(2, 4, 4, 3), w, b, rows=(2, 0, 4))
    with pytest.raises(ValueError, match="backend must be one of"):
        ContextCNN(2, (), 3, 3, backend="gpu")


# ---- the NCP-mixture kernel (kernels/flow_ncp.cpp) ------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("k", [1, 2, 6])
def test_host_ncp_equals_torch_kernel(k: int, dtype) -> None:
    """ncp_mixture(x, p[2K+1, ...]) == NCPMixtureKernel.forward(x, p[..., 2K+1]): values and the
    gradients of a random linear function of (y, log h') with respect to x and every parameter.
    x covers the whole circle, including points next to 0, pi and 2 pi (tan(x/2) at the pole)."""
    from hpcflow.flows.circular import NCPMixtureKernel
    from hpcflow.kernels.flow import ncp_mixture

    g = torch.Generator().manual_seed(10 + k)
    x = 2 * torch.pi * torch.rand(7, 3, 5, generator=g, dtype=torch.float64)
    x[0, 0, :3] = torch.tensor([1e-7, torch.pi - 1e-4, 2 * torch.pi - 1e-7], dtype=torch.float64)
    x = x.to(dtype).requires_grad_()
    p = (1.5 * torch.randn(2 * k + 1, 7, 3, 5, generator=g, dtype=torch.float64)).to(dtype)
    p.requires_grad_()
    ker = NCPMixtureKernel(k)
    y0, l0 = ker(x, p.movedim(0, -1))
    y1, l1 = ncp_mixture(x, p, k)
    # outputs are angles in [0, 2 pi): compare on the circle
    dy = torch.remainder(y1 - y0 + torch.pi, 2 * torch.pi) - torch.pi
    assert float(dy.detach().abs().max()) <= RTOL[dtype] * 2 * torch.pi
    _close(l1, l0, dtype)
    wy, wl = torch.randn_like(y0), torch.randn_like(l0)
    g0 = torch.autograd.grad((y0 * wy + l0 * wl).sum(), (x, p))
    g1 = torch.autograd.grad((y1 * wy + l1 * wl).sum(), (x, p))
    tol = 1e-10 if dtype == torch.float64 else 1e-4  # autograd through tan near the pole
    for a, b in zip(g1, g0, strict=True):
        assert float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))
    # only one of the two outputs used: the other gradient arrives as None
    (gy_only,) = torch.autograd.grad(ncp_mixture(x, p, k)[0].sum(), (p,))
    (gy_ref,) = torch.autograd.grad(ker(x, p.movedim(0, -1))[0].sum(), (p,))
    assert float((gy_only - gy_ref).abs().max()) <= tol * max(1.0, float(gy_ref.abs().max()))


def test_host_ncp_gradcheck() -> None:
    from hpcflow.kernels.flow import ncp_mixture

    g = torch.Generator().manual_seed(3)
    x = (0.2 + 5.8 * torch.rand(6, generator=g, dtype=torch.float64)).requires_grad_()
    p = torch.randn(5, 6, generator=g, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, p: ncp_mixture(x, p, 2), (x, p), eps=1e-6, atol=1e-7)


def test_host_flow_inverse_is_identity() -> None:
    """With backend host the forward runs the C++ kernels, the inverse the torch path: the two
    agree to rounding, so inverse(forward(z)) = z and the log-dets cancel (1e-10, float64)."""
    f = _flow("host", torch.float64)
    z = 2 * torch.pi * torch.rand(3, 2, 8, 4, generator=torch.Generator().manual_seed(6),
                                  dtype=torch.float64)
    with torch.no_grad():
        th, ld = f(z)
        back, ld_inv = f.inverse(th)
    err = torch.remainder(back - z + torch.pi, 2 * torch.pi) - torch.pi
    assert float(err.abs().max()) < 1e-10
    assert float((ld + ld_inv).abs().max()) < 1e-10
    assert float(ld.abs().max()) > 1e-3  # the layers are not the identity


def test_host_ncp_bad_inputs() -> None:
    from hpcflow.kernels.flow import ncp_mixture

    with pytest.raises(ValueError, match="do not fit x of shape"):
        ncp_mixture(torch.zeros(4), torch.zeros(4, 4), 2)
    with pytest.raises(TypeError, match="float32 and float64"):
        ncp_mixture(torch.zeros(4, dtype=torch.float16), torch.zeros(5, 4, dtype=torch.float16), 2)
    with pytest.raises(ValueError, match="components"):
        ncp_mixture(torch.zeros(4), torch.zeros(201, 4), 100)
