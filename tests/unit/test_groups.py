"""Gauge groups: Haar sampling, projection, exponential map, Lie-algebra coordinates."""

from __future__ import annotations

import math

import pytest
import torch

from hpcflow.lattice.geometry import Lattice
from hpcflow.lattice.groups import (
    cold_field,
    dagger,
    get_group,
    group_for_field,
    random_field,
)
from tests.helpers import GROUPS, assert_in_group, unitarity_error


def _normals(group, n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, group.n_haar_normals, generator=gen, dtype=torch.float64)


def test_get_group_attributes():
    expected = {"u1": (1, 1, 2), "su2": (2, 3, 4), "su3": (3, 8, 18)}
    for name, (n, na, nh) in expected.items():
        g = get_group(name)
        assert (g.name, g.N, g.n_algebra, g.n_haar_normals) == (name, n, na, nh)
    assert get_group("SU3") == get_group("su3")


def test_get_group_unknown_name_lists_allowed():
    with pytest.raises(ValueError, match=r"'su4'.*u1, su2, su3"):
        get_group("su4")
    with pytest.raises(TypeError, match="group name"):
        get_group(3)


@pytest.mark.parametrize("name", GROUPS)
def test_haar_elements_in_group(name):
    g = get_group(name)
    u = g.haar(_normals(g, 2000))
    assert u.shape == (2000, g.N, g.N) and u.dtype == torch.complex128
    assert_in_group(u, g, 1e-12)


@pytest.mark.parametrize("name", ["su2", "su3"])
def test_haar_moments_sun(name):
    """Haar moments of SU(N): <tr U> = 0 and <|tr U|^2> = 1 (character orthonormality).

    20000 samples; the standard errors come from the sample variances, and the means must
    agree with the exact values within 4 standard errors.
    """
    g = get_group(name)
    n = 20000
    tr = torch.diagonal(g.haar(_normals(g, n, seed=7)), dim1=-2, dim2=-1).sum(-1)
    # SU(2) traces are real; SU(3) traces have both parts
    parts = (tr.real, tr.imag) if name == "su3" else (tr.real,)
    if name == "su2":
        assert tr.imag.abs().max() < 1e-15
    for x in parts:
        assert abs(x.mean().item()) < 4 * x.std().item() / math.sqrt(n)
    a2 = tr.abs() ** 2
    assert abs(a2.mean().item() - 1.0) < 4 * a2.std().item() / math.sqrt(n)


def test_haar_su2_trace_distribution():
    """For Haar SU(2), a = (1/2) tr U has density (2/pi) sqrt(1 - a^2): <a^2> = 1/4, <a^4> = 1/8.

    20000 samples, 4 standard errors.
    """
    g = get_group("su2")
    n = 20000
    a = torch.diagonal(g.haar(_normals(g, n, seed=3)), dim1=-2, dim2=-1).sum(-1).real / 2
    for k, exact in ((2, 0.25), (4, 0.125)):
        x = a**k
        assert abs(x.mean().item() - exact) < 4 * x.std().item() / math.sqrt(n)


def test_haar_u1_uniform_angle():
    """Haar U(1): angle uniform, so <cos k theta> = 0 for k = 1, 2 (4 standard errors)."""
    g = get_group("u1")
    n = 20000
    theta = torch.angle(g.haar(_normals(g, n, seed=5))[..., 0, 0])
    for k in (1, 2):
        c = torch.cos(k * theta)
        assert abs(c.mean().item()) < 4 * c.std().item() / math.sqrt(n)


def test_haar_left_invariance_su3_moment():
    """Haar is left-invariant: <Re tr(V U)> = 0 for a fixed V far from 1 (within 4 s.e.).

    A U(N) sampler with a wrong det fix would bias tr(V U) for V = diag phases.
    """
    g = get_group("su3")
    n = 20000
    u = g.haar(_normals(g, n, seed=11))
    v = torch.diag(torch.exp(1j * torch.tensor([0.3, 1.1, -1.4], dtype=torch.float64)))
    x = torch.diagonal(v @ u, dim1=-2, dim2=-1).sum(-1).real
    assert abs(x.mean().item()) < 4 * x.std().item() / math.sqrt(n)


@pytest.mark.parametrize("name", GROUPS)
def test_generators_normalised(name):
    g = get_group(name)
    t = g.generators()
    assert t.shape == (g.n_algebra, g.N, g.N)
    assert torch.allclose(t, dagger(t), atol=0, rtol=0)
    if name != "u1":
        gram = torch.einsum("aij,bji->ab", t, t)
        assert torch.allclose(gram, torch.eye(g.n_algebra, dtype=t.dtype) / 2, atol=1e-15)
        assert torch.diagonal(t, dim1=-2, dim2=-1).sum(-1).abs().max() < 1e-15


@pytest.mark.parametrize("name", GROUPS)
def test_algebra_coords_roundtrip_and_ta(name):
    g = get_group(name)
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(50, g.n_algebra, generator=gen, dtype=torch.float64)
    x = g.algebra_from_coords(w)
    assert torch.allclose(x, -dagger(x), atol=1e-15)
    assert torch.allclose(g.coords_from_algebra(x), w, atol=1e-14)
    # TA is a projection onto the algebra: TA(X) = X for X in the algebra, and TA(M) is
    # in the algebra for any M.
    assert torch.allclose(g.traceless_antihermitian(x), x, atol=1e-15)
    m = torch.randn(50, g.N, g.N, generator=gen, dtype=torch.complex128)
    ta = g.traceless_antihermitian(m)
    assert torch.allclose(ta, -dagger(ta), atol=1e-15)
    if name != "u1":
        assert torch.diagonal(ta, dim1=-2, dim2=-1).sum(-1).abs().max() < 1e-14
    else:
        assert torch.allclose(ta, 1j * m.imag, atol=1e-15)


@pytest.mark.parametrize("name", GROUPS)
def test_exp_lands_in_group_and_matches_matrix_exp(name):
    g = get_group(name)
    gen = torch.Generator().manual_seed(4)
    # norms from ~1e-8 (Taylor branch of the SU(2) closed form) up to several times pi
    scale = torch.logspace(-8, 1, 200, dtype=torch.float64)[:, None]
    w = torch.randn(200, g.n_algebra, generator=gen, dtype=torch.float64) * scale
    x = g.algebra_from_coords(w)
    u = g.exp(x)
    assert_in_group(u, g, 1e-13)
    assert torch.allclose(u, torch.linalg.matrix_exp(x), atol=1e-12)


def test_su2_exp_autograd_finite_at_zero():
    g = get_group("su2")
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    u = g.exp(g.algebra_from_coords(w))
    (u.real.sum() + u.imag.sum()).backward()
    assert torch.isfinite(w.grad).all()
    # d/dw_a of sum(Re + Im) of exp(i w.sigma/2) at 0 equals sum(Re + Im) of i sigma_a / 2
    t = g.generators()
    expected = (1j * t).real.sum((-1, -2)) + (1j * t).imag.sum((-1, -2))
    assert torch.allclose(w.grad, expected, atol=1e-14)


@pytest.mark.parametrize("name", GROUPS)
def test_project(name):
    g = get_group(name)
    gen = torch.Generator().manual_seed(9)
    u = g.haar(_normals(g, 100, seed=1))
    # group elements are fixed points
    assert torch.allclose(g.project(u), u, atol=1e-13)
    # a perturbed element projects back into the group, close to where it started
    noise = 1e-3 * torch.randn(u.shape, generator=gen, dtype=torch.complex128)
    p = g.project(u + noise)
    assert_in_group(p, g, 1e-13)
    assert (p - u).abs().max() < 1e-2
    # arbitrary matrices land in the group as well
    assert_in_group(g.project(torch.randn(u.shape, generator=gen, dtype=torch.complex128)), g)


@pytest.mark.parametrize("name", GROUPS)
def test_complex64_path(name):
    g = get_group(name)
    nrm = _normals(g, 500)
    u64 = g.haar(nrm.float())
    assert u64.dtype == torch.complex64
    assert_in_group(u64, g, 1e-5)
    assert torch.allclose(u64.to(torch.complex128), g.haar(nrm), atol=1e-5)
    x = g.algebra_from_coords(torch.randn(500, g.n_algebra))
    assert x.dtype == torch.complex64
    assert_in_group(g.exp(x), g, 1e-5)


@pytest.mark.parametrize("name", GROUPS)
def test_random_and_cold_field(name):
    from hpcflow.rng import CounterRNG

    g = get_group(name)
    lat = Lattice((3, 4))
    u = random_field(lat, g, CounterRNG(5), step=2, batch=(2, 3))
    assert u.shape == (2, 3, 2, 3, 4, g.N, g.N)
    assert_in_group(u, g)
    # configurations of a batch differ, and the same (seed, step) reproduces bit for bit
    assert not torch.allclose(u[0, 0], u[0, 1])
    assert torch.equal(u, random_field(lat, g, CounterRNG(5), step=2, batch=(2, 3)))
    # batch entry b uses counters b * nd * V + link: entry 0 is the unbatched field
    assert torch.equal(u[0, 0], random_field(lat, g, CounterRNG(5), step=2))
    assert not torch.equal(u, random_field(lat, g, CounterRNG(5), step=3, batch=(2, 3)))
    u32 = random_field(lat, g, CounterRNG(5), step=2, batch=(2, 3), dtype=torch.complex64)
    assert u32.dtype == torch.complex64 and torch.allclose(u32.to(u.dtype), u, atol=1e-6)
    c = cold_field(lat, g, batch=4)
    assert c.shape == (4, 2, 3, 4, g.N, g.N) and unitarity_error(c) == 0
    assert group_for_field(c) == g


def test_random_field_decomposition_independent():
    """A halo-padded local array gets the same links as the matching part of the full field."""
    from hpcflow.rng import CounterRNG

    g = get_group("su2")
    full = Lattice((4, 6))
    part = Lattice((4, 6), local_shape=(2, 3), origin=(2, 3), halo=1)
    uf = random_field(full, g, CounterRNG(1))
    up = random_field(part, g, CounterRNG(1))
    rows = torch.arange(1, 5) % 4  # global x0 = origin - halo .. origin + local + halo - 1
    cols = torch.arange(2, 7) % 6
    assert torch.equal(up, uf[:, rows][:, :, cols])


def test_bad_dtype_and_rng():
    g = get_group("su3")
    with pytest.raises(TypeError, match="dtype"):
        cold_field(Lattice((2, 2)), g, dtype=torch.float64)
    with pytest.raises(TypeError, match="rng"):
        random_field(Lattice((2, 2)), g, rng=42)
    with pytest.raises(ValueError, match="normals"):
        g.haar(torch.zeros(3, 4, dtype=torch.float64))
