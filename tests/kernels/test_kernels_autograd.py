"""The autograd Functions (forward: plaquette kernel, backward: staple kernel) give the
same values and gradients as torch autograd of the reference, including batch axes and
halo-padded arrays, where links in the halo receive the gradient of interior plaquettes.
"""

from __future__ import annotations

import pytest
import torch

from hpcflow.kernels import host
from hpcflow.kernels.autograd import PlaquetteField, PlaquetteSum
from hpcflow.lattice.action import plaquette_re_tr_torch
from hpcflow.lattice.geometry import Lattice

GEOMS = [
    pytest.param(Lattice((3, 4)), 1, id="2d-N1-h0"),
    pytest.param(Lattice((3, 4), halo=1), 2, id="2d-N2-h1"),
    pytest.param(Lattice((2, 3, 2, 3)), 3, id="4d-N3-h0"),
    pytest.param(Lattice((3, 2, 2, 2), halo=1, padded_dims=(0, 2)), 3, id="4d-N3-h1"),
]


def _ref_sum(U: torch.Tensor, lat: Lattice) -> torch.Tensor:
    return lat.interior_sum(plaquette_re_tr_torch(U, lat), inner=0).sum(-1)


@pytest.mark.parametrize("lat, n", GEOMS)
def test_plaquette_sum_value_and_gradient(host_libs, random_links, lat, n):
    """PlaquetteSum equals the reference interior sum and its gradient (batch of 2, random
    upstream weights per configuration) equals torch autograd of the reference to 1e-13."""
    U = random_links((2, lat.nd, *lat.shape), n, torch.complex128, seed=n)
    g = torch.tensor([0.7, -1.3], dtype=torch.float64)
    Uk = U.clone().requires_grad_(True)
    sk = PlaquetteSum.apply(Uk, lat, host)
    Ur = U.clone().requires_grad_(True)
    sr = _ref_sum(Ur, lat)
    torch.testing.assert_close(sk, sr.detach(), atol=1e-12, rtol=0)
    (g * sk).sum().backward()
    (g * sr).sum().backward()
    torch.testing.assert_close(Uk.grad, Ur.grad, atol=1e-13, rtol=0)


@pytest.mark.parametrize("lat, n", GEOMS)
def test_plaquette_field_gradient(host_libs, random_links, lat, n):
    """PlaquetteField's backward (weighted staple) equals autograd of the reference for a
    loss that weights every interior plaquette differently; halo outputs are constants."""
    U = random_links((lat.nd, *lat.shape), n, torch.complex128, seed=10 + n)
    w = torch.randn((lat.n_planes, *lat.shape), dtype=torch.float64,
                    generator=torch.Generator().manual_seed(1))
    mask = lat.interior().to(torch.float64)
    Uk = U.clone().requires_grad_(True)
    (w * PlaquetteField.apply(Uk, lat, host)).sum().backward()
    Ur = U.clone().requires_grad_(True)
    (w * mask * plaquette_re_tr_torch(Ur, lat)).sum().backward()
    torch.testing.assert_close(Uk.grad, Ur.grad, atol=1e-13, rtol=0)


def test_gradcheck_float64(host_libs, random_links):
    """Finite differences (torch.autograd.gradcheck, complex input) confirm the gradient
    convention of PlaquetteSum independently of the reference."""
    lat = Lattice((2, 3))
    U = random_links((lat.nd, *lat.shape), 2, torch.complex128, seed=3).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda u: PlaquetteSum.apply(u, lat, host), (U,),
                                    eps=1e-6, atol=1e-8)


def test_float32_gradient(host_libs, random_links):
    """complex64 gradients agree with the float64 reference to 1e-5."""
    lat = Lattice((2, 3, 2, 2))
    U = random_links((lat.nd, *lat.shape), 3, torch.complex128, seed=4)
    Uk = U.to(torch.complex64).requires_grad_(True)
    PlaquetteSum.apply(Uk, lat, host).backward()
    Ur = U.clone().requires_grad_(True)
    _ref_sum(Ur, lat).backward()
    assert Uk.grad.dtype == torch.complex64
    torch.testing.assert_close(Uk.grad.to(torch.complex128), Ur.grad, atol=1e-5, rtol=0)


def test_double_backward_raises(host_libs, random_links):
    """Second derivatives are not provided by the kernels and say so."""
    lat = Lattice((2, 2))
    U = random_links((lat.nd, *lat.shape), 1, torch.complex128).requires_grad_(True)
    (gU,) = torch.autograd.grad(PlaquetteSum.apply(U, lat, host), U, create_graph=True)
    with pytest.raises(RuntimeError, match="does not require grad|once_differentiable"):
        gU.abs().sum().backward()
