"""Backend selection of hpcflow.kernels.dispatch: valid names, clear errors, and equal
results from the 'torch' and 'host' backends (values and gradients)."""

from __future__ import annotations

import pytest
import torch
from hpcflow.kernels import dispatch

from hpcflow.lattice.geometry import Lattice


def test_resolve_backend_on_cpu():
    """'auto' falls back to the torch reference for CPU tensors; explicit names are kept."""
    U = torch.zeros(2, 2, 2, 1, 1, dtype=torch.complex128)
    assert dispatch.resolve_backend("auto", U) == "torch"
    assert dispatch.resolve_backend("torch", U) == "torch"
    assert dispatch.resolve_backend("host", U) == "host"


def test_bad_backend_names_and_devices():
    """Unknown names, and 'cuda' for a CPU tensor, are rejected with a one-line reason."""
    U = torch.zeros(2, 2, 2, 1, 1, dtype=torch.complex128)
    with pytest.raises(ValueError, match="backend must be one of .* got 'gpu'"):
        dispatch.resolve_backend("gpu", U)
    with pytest.raises((ValueError, RuntimeError), match="backend 'cuda' needs"):
        dispatch.resolve_backend("cuda", U)


@pytest.mark.parametrize("halo", [0, 1])
def test_host_and_torch_backends_agree(host_libs, random_links, halo):
    """Both backends give the same interior plaquettes, plaquette sums, staples and
    gradients of the plaquette sum (float64, 4D SU(3), batch of 2)."""
    lat = Lattice((3, 2, 2, 4), halo=halo)
    U = random_links((2, lat.nd, *lat.shape), 3, torch.complex128, seed=halo)
    inner0, inner2 = lat.interior_slices(0), lat.interior_slices(2)
    res = {}
    for b in ("torch", "host"):
        Ug = U.clone().requires_grad_(True)
        s = dispatch.plaquette_sum(Ug, lat, b)
        s.sum().backward()
        with torch.no_grad():
            res[b] = (dispatch.plaquette_re_tr(U, lat, b)[inner0], s.detach(),
                      dispatch.staple_sum(U, lat, b)[inner2], Ug.grad)
    for got, want in zip(res["host"], res["torch"]):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_plaquette_field_is_differentiable_on_host(host_libs, random_links):
    """With grad enabled the host plaquette field carries the staple-kernel backward."""
    lat = Lattice((3, 4))
    U = random_links((lat.nd, *lat.shape), 2, torch.complex128, seed=2)
    grads = {}
    for b in ("torch", "host"):
        Ug = U.clone().requires_grad_(True)
        out = dispatch.plaquette_re_tr(Ug, lat, b)
        assert out.requires_grad
        (out ** 2).sum().backward()
        grads[b] = Ug.grad
    torch.testing.assert_close(grads["host"], grads["torch"], atol=1e-12, rtol=0)
