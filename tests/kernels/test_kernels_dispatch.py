"""Backend selection of hpcflow.kernels.dispatch: valid names, clear errors, and equal
results from the 'torch' and 'host' backends (values and gradients)."""

from __future__ import annotations

import pytest
import torch

from hpcflow.kernels import dispatch
from hpcflow.lattice.geometry import Lattice


def test_resolve_backend_on_cpu(monkeypatch):
    """'auto' is the host kernels on CPU tensors where a compiler exists, else the torch
    reference; explicit names are kept."""
    U = torch.zeros(2, 2, 2, 1, 1, dtype=torch.complex128)
    assert dispatch.resolve_backend("auto", U) == "host"
    monkeypatch.setenv("HPCFLOW_CXX", "no-such-compiler-hpcflow")
    assert dispatch.resolve_backend("auto", U) == "torch"
    monkeypatch.delenv("HPCFLOW_CXX")
    assert dispatch.resolve_backend("torch", U) == "torch"
    assert dispatch.resolve_backend("host", U) == "host"


def test_choose_backend_auto_rule(monkeypatch, caplog):
    """A run's 'auto' is 'host' on CPUs where the host library builds; without a compiler it
    is 'torch' with exactly one warning line that says why; explicit names are kept."""
    import logging

    dispatch._host_build_error.cache_clear()
    assert dispatch.choose_backend("auto", "cpu", 3, "double", 4) == "host"
    assert dispatch.choose_backend("auto", "cpu", 1, "float", 2) == "host"
    assert dispatch.choose_backend("torch", "cpu") == "torch"
    assert dispatch.choose_backend("host", "cpu") == "host"
    monkeypatch.setenv("HPCFLOW_CXX", "no-such-compiler-hpcflow")
    dispatch._host_build_error.cache_clear()
    with caplog.at_level(logging.WARNING, logger="hpcflow"):
        assert dispatch.choose_backend("auto", "cpu", 2, "double", 4) == "torch"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "no-such-compiler-hpcflow" in lines[0] and "\n" not in lines[0]
    monkeypatch.delenv("HPCFLOW_CXX")
    dispatch._host_build_error.cache_clear()
    with pytest.raises(ValueError, match="backend must be one of"):
        dispatch.choose_backend("gpu", "cpu")


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


@pytest.mark.parametrize("halo", [0, 1])
def test_action_module_routes_through_lattice_backend(host_libs, random_links, halo):
    """hpcflow.lattice.action uses Lattice.backend: Wilson action, average plaquette and
    HMC-style gradients are the same with backend 'host' and 'torch' (2D SU(2))."""
    from hpcflow.lattice import action

    vals = {}
    for b in ("torch", "host"):
        lat = Lattice((4, 5), halo=halo, backend=b)
        U = random_links((3, lat.nd, *lat.shape), 2, torch.complex128, seed=4)
        Ug = U.clone().requires_grad_(True)
        S = action.wilson_action(Ug, lat, beta=2.5)
        S.sum().backward()
        inner2 = lat.interior_slices(2)
        vals[b] = (S.detach(), action.average_plaquette(U, lat), Ug.grad,
                   action.staple_sum(U, lat)[inner2])
    for got, want in zip(vals["host"], vals["torch"]):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_lattice_rejects_unknown_backend():
    """A misspelt backend is caught when the lattice is built."""
    with pytest.raises(ValueError, match="backend must be one of .* got 'cpu'"):
        Lattice((4, 4), backend="cpu")
