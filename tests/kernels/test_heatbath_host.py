"""Host heat bath / overrelaxation (kernels/heatbath_host.cpp) == the torch code of
hpcflow.sampling.heatbath to rounding: single sub-steps and whole sweeps, SU(2) and SU(3),
2D and 4D, batched and unbatched, Creutz (small beta) and Kennedy-Pendleton (large beta),
complex128 (1e-12) and complex64 (~1e-5), on periodic arrays and on halo-padded blocks
(halos filled from the periodic field). Plus a statistical check of the 2D SU(2) plaquette
against the exact infinite-volume value I_2(beta)/I_1(beta)."""

from __future__ import annotations

import itertools

import pytest
import torch

from hpcflow.kernels import heatbath_host as hh
from hpcflow.lattice.geometry import Lattice, SerialComm
from hpcflow.lattice.groups import get_group, random_field
from hpcflow.rng import CounterRNG
from hpcflow.sampling import heatbath as hb

TOL = {torch.complex128: 1e-12, torch.complex64: 2e-5}


def _field(gname, lat, batch=(), dtype=torch.complex128, seed=11):
    U = random_field(lat, get_group(gname), CounterRNG(seed, 4), 0, batch=batch, dtype=dtype)
    return U.contiguous()


def _maxdiff(a, b) -> float:
    return float((a.to(torch.complex128) - b.to(torch.complex128)).abs().max())


def _pad(U, gs, origin, local, halo):
    """Halo-padded block of the periodic field ``U[..., mu, *gs, N, N]``."""
    idx = [torch.arange(o - halo, o + n + halo) % g for g, o, n in zip(gs, origin, local)]
    mesh = torch.meshgrid(*idx, indexing="ij")
    nd = len(gs)
    lead = (slice(None),) * (U.dim() - nd - 2)
    return U[(*lead, *mesh)].contiguous()


class PeriodicHaloComm(SerialComm):
    """One rank owning the whole lattice on a halo-padded array: ``exchange`` refills the
    halos from the periodic interior (what the MPI exchange does on a 1-rank grid)."""

    decomposed = True  # halos to fill, like a LatticeComm

    def exchange(self, f, lat, inner=2, width=None):
        inner_part = f[lat.interior_slices(inner)]
        nd = lat.nd
        h = lat.halo
        out = inner_part
        for d in range(nd):
            ax = out.dim() - inner - nd + d
            n = out.shape[ax]
            idx = torch.arange(-h, n + h) % n
            out = out.index_select(ax, idx)
        return out.contiguous()


CASES = [  # (group, global shape, beta, batch)
    ("su2", (4, 4, 4, 4), 2.3, ()),
    ("su2", (4, 4, 6, 4), 0.4, (2,)),
    ("su3", (4, 4, 4, 4), 5.7, ()),
    ("su3", (4, 4, 6, 4), 0.8, (2,)),
    ("su3", (4, 4, 6, 4), 12.0, ()),
    ("su3", (2, 10, 4, 4), 3.0, ()),  # x_1 = 10: a partial row tile
    ("su2", (8, 6), 1.0, (3,)),
    ("su2", (6, 8), 6.0, ()),
    ("su3", (6, 4), 2.5, (2,)),
    ("su3", (8, 8), 0.2, ()),
]
IDS = [f"{g}-{'x'.join(map(str, s))}-b{b}-B{len(B) and B[0]}" for g, s, b, B in CASES]


@pytest.mark.parametrize("dtype", [torch.complex128, torch.complex64], ids=["c128", "c64"])
@pytest.mark.parametrize("gname, gs, beta, batch", CASES, ids=IDS)
def test_substeps_match_torch(gname, gs, beta, batch, dtype):
    lat = Lattice(gs)
    group = get_group(gname)
    U = _field(gname, lat, batch, dtype)
    rng = CounterRNG(77, 3)
    for mu, p in [(0, 0), (lat.nd - 1, 1)]:
        ref = hb.heatbath_substep(U, lat, group, beta, rng, 5, mu, p)
        out = hh.heatbath_substep_host(U.clone(), lat, beta, rng, 5, mu, p)
        assert _maxdiff(out, ref) < TOL[dtype]
        assert _maxdiff(out, U) > 0.1  # something happened
        ref = hb.overrelax_substep(U, lat, group, beta, mu, p)
        out = hh.overrelax_substep_host(U.clone(), lat, mu, p)
        assert _maxdiff(out, ref) < TOL[dtype]


def _warm(gname, lat, batch=(), eps=0.5, seed=11, dtype=torch.complex128):
    """exp(eps X) with random traceless anti-Hermitian X: an ordered start."""
    group = get_group(gname)
    gen = torch.Generator().manual_seed(seed)
    n = group.N
    H = torch.randn(*batch, lat.nd, *lat.shape, n, n, dtype=torch.complex128, generator=gen)
    H = (H - H.mH) / 2
    H = H - torch.eye(n) * H.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None]
    return torch.linalg.matrix_exp(eps * H).to(dtype).contiguous()


@pytest.mark.parametrize("gname, gs, beta, batch", CASES, ids=IDS)
def test_heatbath_sweeps_match_torch(gname, gs, beta, batch):
    """Heat-bath sweeps from a hot start, every beta: 1e-12."""
    lat = Lattice(gs)
    group = get_group(gname)
    U = _field(gname, lat, batch)
    U0 = U.clone()
    rng = CounterRNG(123, 0)
    out = hh.heatbath_sweep_host(U, lat, beta, rng, 4)
    assert torch.equal(U, U0)  # the caller's field is untouched
    assert out.shape == U.shape and out.dtype == U.dtype
    assert _maxdiff(out, hb.heatbath_sweep(U, lat, group, beta, rng, 4)) < 1e-12


# Overrelaxation is a deterministic map whose sensitivity to rounding grows with the number
# of sub-steps when staples are small (hot configurations, small beta): torch itself, fed a
# field perturbed by 1e-16, then moves by up to ~1e-7 after HB + 2 OR sweeps at SU(3)
# beta = 0.8 (see test_compound_sweep_within_rounding_sensitivity). 1e-12 comparisons of
# whole compound sweeps therefore use ordered starts at large beta.
WARM_CASES = [
    ("su2", (4, 4, 4, 4), 2.3, ()),
    ("su2", (4, 4, 6, 4), 2.5, (2,)),
    ("su3", (4, 4, 4, 4), 5.7, ()),
    ("su3", (4, 4, 6, 4), 12.0, (2,)),
    ("su2", (8, 6), 1.0, (3,)),
    ("su2", (6, 8), 6.0, ()),
    ("su3", (6, 4), 8.0, (2,)),
]


@pytest.mark.parametrize("gname, gs, beta, batch", WARM_CASES,
                         ids=[f"{g}-{'x'.join(map(str, s))}-b{b}" for g, s, b, _ in WARM_CASES])
def test_compound_sweeps_match_torch(gname, gs, beta, batch):
    lat = Lattice(gs)
    group = get_group(gname)
    U = _warm(gname, lat, batch)
    rng = CounterRNG(123, 0)
    ref = hb.heatbath_or_sweep(U, lat, group, beta, rng, 9, n_or=2)
    out = hh.heatbath_or_sweep_host(U, lat, beta, rng, 9, n_or=2)
    assert out.shape == U.shape and out.dtype == U.dtype
    assert _maxdiff(out, ref) < 1e-12
    assert _maxdiff(hh.overrelax_sweep_host(U, lat), hb.overrelax_sweep(U, lat, group, beta)) < 1e-12
    assert _maxdiff(hh.heatbath_or_sweep_host(U, lat, beta, rng, 3, n_or=0),
                    hb.heatbath_or_sweep(U, lat, group, beta, rng, 3, n_or=0)) < 1e-12


@pytest.mark.parametrize("gname, gs, beta", [("su3", (4, 4, 6, 4), 0.8), ("su3", (8, 8), 0.2),
                                             ("su2", (4, 4, 6, 4), 0.4)])
def test_compound_sweep_within_rounding_sensitivity(gname, gs, beta):
    """Hot start, small beta, HB + 2 OR: host - torch is no larger than the change of the torch
    result itself under a 1e-16 relative perturbation of its input (x 20, + 1e-12)."""
    lat = Lattice(gs)
    group = get_group(gname)
    U = _field(gname, lat, (2,))
    rng = CounterRNG(123, 0)
    ref = hb.heatbath_or_sweep(U, lat, group, beta, rng, 9, n_or=2)
    gen = torch.Generator().manual_seed(0)
    pert = (U * (1 + 1e-16 * torch.randn(U.shape, dtype=torch.float64, generator=gen)))
    sens = _maxdiff(hb.heatbath_or_sweep(pert.contiguous(), lat, group, beta, rng, 9, n_or=2), ref)
    out = hh.heatbath_or_sweep_host(U, lat, beta, rng, 9, n_or=2)
    assert _maxdiff(out, ref) < 20 * sens + 1e-12


def test_sweep_complex64_and_batch_entry_zero():
    """complex64 sweeps track torch; entry 0 of a batch is the unbatched chain."""
    gs = (4, 4, 4, 4)
    lat = Lattice(gs)
    U = _warm("su3", lat, (2,), dtype=torch.complex64)
    rng = CounterRNG(5, 5)
    ref = hb.heatbath_or_sweep(U, lat, "su3", 6.0, rng, 1, n_or=1)
    out = hh.heatbath_or_sweep_host(U, lat, 6.0, rng, 1, n_or=1)
    assert out.dtype == torch.complex64
    assert _maxdiff(out, ref) < 1e-4
    single = hh.heatbath_or_sweep_host(U[0].to(torch.complex128), lat, 6.0, rng, 1, n_or=1)
    batched = hh.heatbath_or_sweep_host(U.to(torch.complex128), lat, 6.0, rng, 1, n_or=1)
    assert _maxdiff(single, batched[0]) < 1e-13


@pytest.mark.parametrize("gname, gs, grid, batch", [
    ("su3", (4, 4, 6, 4), (2, 1, 1, 2), ()),
    ("su2", (4, 4, 4, 4), (1, 2, 2, 1), (2,)),
    ("su2", (8, 6), (2, 3), ()),
    ("su3", (4, 8), (1, 2), (2,)),
])
def test_substeps_on_padded_blocks(gname, gs, grid, batch):
    """Each halo-1 block (halos from the periodic field) updated by the host kernel equals the
    global torch sub-step on its interior; halo links are left alone."""
    glat = Lattice(gs)
    group = get_group(gname)
    U = _field(gname, glat, batch)
    rng = CounterRNG(9, 9)
    local = tuple(g // n for g, n in zip(gs, grid))
    nlead = len(batch) + 1
    for mu, p in [(0, 1), (len(gs) - 1, 0)]:
        ref_hb = hb.heatbath_substep(U, glat, group, 1.7, rng, 2, mu, p)
        ref_or = hb.overrelax_substep(U, glat, group, 1.7, mu, p)
        for coords in itertools.product(*(range(n) for n in grid)):
            origin = tuple(c * n for c, n in zip(coords, local))
            lat = Lattice(gs, local_shape=local, origin=origin, halo=1)
            own = (slice(None),) * nlead + tuple(slice(o, o + n) for o, n in zip(origin, local))
            inner = lat.interior_slices(2)
            ub = _pad(U, gs, origin, local, 1)
            out = hh.heatbath_substep_host(ub.clone(), lat, 1.7, rng, 2, mu, p)
            assert _maxdiff(out[inner], ref_hb[own]) < 1e-12
            halo_mask = ~lat.interior()
            assert torch.equal(out[..., halo_mask, :, :], ub[..., halo_mask, :, :])
            out = hh.overrelax_substep_host(ub.clone(), lat, mu, p)
            assert _maxdiff(out[inner], ref_or[own]) < 1e-12


@pytest.mark.parametrize("gname, gs", [("su3", (4, 4, 4, 6)), ("su2", (6, 8))])
def test_sweep_with_halo_exchange(gname, gs):
    """Whole sweeps on a halo-padded array with a halo-refilling comm: the interior equals the
    periodic torch sweep, and the torch sweep on the same padded array."""
    glat = Lattice(gs)
    lat = Lattice(gs, halo=1)
    group = get_group(gname)
    U = _warm(gname, glat, (2,))
    rng = CounterRNG(31, 7)
    comm = PeriodicHaloComm()
    ub = _pad(U, gs, (0,) * len(gs), gs, 1)
    ub[..., ~lat.interior(), :, :] = 7.0  # garbage: the sweep's exchange must refill it
    ref = hb.heatbath_or_sweep(U, glat, group, 6.0, rng, 3, n_or=1)
    out = hh.heatbath_or_sweep_host(ub, lat, 6.0, rng, 3, n_or=1, comm=comm)
    inner = lat.interior_slices(2)
    assert _maxdiff(out[inner], ref) < 1e-12
    ref_pad = hb.heatbath_or_sweep(ub, lat, group, 6.0, rng, 3, n_or=1, comm=comm)
    assert _maxdiff(out[inner], ref_pad[inner]) < 1e-12


def test_checks_and_predicate():
    lat = Lattice((4, 4))
    U = _field("su2", lat)
    assert hh.supports_heatbath_host(U, lat)
    assert not hh.supports_heatbath_host(_field("u1", lat), lat)
    assert not hh.supports_heatbath_host(U, Lattice((4, 4, 4)))
    assert not hh.supports_heatbath_host(U.real, lat)
    with pytest.raises(ValueError, match="even"):
        hh.heatbath_sweep_host(_field("su2", Lattice((4, 5))), Lattice((4, 5)), 1.0,
                               CounterRNG(1), 0)
    with pytest.raises(ValueError, match="contiguous"):
        hh.heatbath_substep_host(U.transpose(-1, -2), lat, 1.0, CounterRNG(1), 0, 0, 0)
    with pytest.raises(ValueError, match="beta"):
        hh.heatbath_sweep_host(U, lat, -1.0, CounterRNG(1), 0)
    with pytest.raises(ValueError, match="mu"):
        hh.overrelax_substep_host(U.clone(), lat, 2, 0)
    with pytest.raises(ValueError, match="n_or"):
        hh.heatbath_or_sweep_host(U, lat, 1.0, CounterRNG(1), 0, n_or=-1)


@pytest.mark.parametrize("beta", [1.0, 2.0, 4.0])
def test_su2_2d_plaquette_exact(beta):
    """2D SU(2): plaquettes are independent, <(1/2) Re tr P> = I_2(beta) / I_1(beta) in
    infinite volume (finite-size corrections ~ (I_2/I_1)^V are negligible on 32 x 32).
    Heat bath + 1 OR sweep, 4 chains in a batch, fixed seed; agreement within 3 sigma
    (Gamma method). beta = 1: Creutz's sampler (alpha < 2) throughout; 4: mostly
    Kennedy-Pendleton; 2: both."""
    from hpcflow.analysis.gamma import gamma_method
    from hpcflow.lattice.action import average_plaquette

    b = torch.tensor(beta, dtype=torch.float64)
    i0, i1 = torch.special.i0(b), torch.special.i1(b)
    exact = float((i0 - 2.0 / b * i1) / i1)  # I_2 = I_0 - (2/x) I_1
    lat = Lattice((32, 32))
    U = _field("su2", lat, (4,), seed=3)
    rng = CounterRNG(2025, 0)
    series = []
    for step in range(620):
        U = hh.heatbath_or_sweep_host(U, lat, beta, rng, step, n_or=1)
        if step >= 20:
            series.append(average_plaquette(U, lat).numpy())
    res = gamma_method([list(s) for s in zip(*series)])
    assert res.error < 1e-3
    assert abs(res.mean - exact) < 3 * res.error, (res.mean, res.error, exact)


@pytest.mark.parametrize("gname, gs, dtype", [("su2", (4, 4, 4, 4), torch.complex128),
                                              ("su3", (6, 4), torch.complex128),
                                              ("su3", (4, 4, 4, 4), torch.complex64)])
def test_unitarity_violation_and_reprojection(gname, gs, dtype):
    """The host violation equals hmc.unitarity_violation (interior of a padded array); a
    drifted field is re-projected at the end of the sweep like the torch sweep does."""
    from hpcflow.sampling.hmc import unitarity_violation

    lat = Lattice(gs, halo=1)
    U = _warm(gname, lat, (2,), dtype=dtype)
    U = (U * (1 + 1e-3 * torch.rand(U.shape[:-2], generator=torch.Generator().manual_seed(1))
              [..., None, None])).to(dtype).contiguous()
    U[..., ~lat.interior(), :, :] *= 3.0  # halo links do not count
    geo = hh._Geom(lat)
    lib = hh.load_heatbath_library(U.shape[-1], hh._DTYPES[dtype], lat.nd)
    got = lib.hpcflow_hb_unitarity_violation(U.data_ptr(), 2, geo.ext, geo.halo)
    ref = unitarity_violation(U, lat)
    assert abs(got - ref) < (1e-12 if dtype == torch.complex128 else 1e-6) * max(ref, 1.0)
    if dtype == torch.complex128:
        glat = Lattice(gs)
        Ug = _warm(gname, glat, (2,))
        Ug = (Ug * (1 + 1e-9)).contiguous()  # drifted beyond 1e3 eps: both sweeps re-project
        out = hh.overrelax_sweep_host(Ug, glat)
        assert _maxdiff(out, hb.overrelax_sweep(Ug, glat, gname, 1.0)) < 1e-12
        assert unitarity_violation(out, glat) < 1e-13


# ---- whole sweeps in one call (hpcflow_hb_sweeps_vn: structure-of-arrays copy) ---------------
VN_CASES = [  # periodic 4D float64 fields with x_0..x_2 extents multiples of 4
    ("su3", (4, 4, 4, 4), 5.7, ()),
    ("su3", (4, 8, 4, 6), 12.0, (2,)),
    ("su3", (8, 4, 4, 2), 6.0, ()),
    ("su2", (4, 4, 8, 4), 2.3, (2,)),
]


@pytest.mark.parametrize("gname, gs, beta, batch", VN_CASES,
                         ids=[f"{g}-{'x'.join(map(str, s))}-B{len(B)}" for g, s, _, B in VN_CASES])
def test_vn_sweeps_match_substep_path_and_torch(gname, gs, beta, batch, monkeypatch):
    """The one-call sweeps equal the per-sub-step host path and the torch sweeps (ordered
    start) to 1e-12: heat bath alone, overrelaxation alone, HB + 2 OR."""
    lat = Lattice(gs)
    group = get_group(gname)
    assert hh._vn_ok(_warm(gname, lat, batch), lat, None)
    U = _warm(gname, lat, batch)
    U0 = U.clone()
    rng = CounterRNG(123, 0)
    vn = [hh.heatbath_sweep_host(U, lat, beta, rng, 4), hh.overrelax_sweep_host(U, lat),
          hh.heatbath_or_sweep_host(U, lat, beta, rng, 9, n_or=2)]
    assert torch.equal(U, U0)  # the caller's field is untouched
    ref = [hb.heatbath_sweep(U, lat, group, beta, rng, 4),
           hb.overrelax_sweep(U, lat, group, beta),
           hb.heatbath_or_sweep(U, lat, group, beta, rng, 9, n_or=2)]
    monkeypatch.setattr(hh, "_vn_ok", lambda *a: False)
    sub = [hh.heatbath_sweep_host(U, lat, beta, rng, 4), hh.overrelax_sweep_host(U, lat),
           hh.heatbath_or_sweep_host(U, lat, beta, rng, 9, n_or=2)]
    for a, b, c in zip(vn, sub, ref):
        assert a.shape == U.shape and a.dtype == U.dtype
        assert _maxdiff(a, b) < 1e-12
        assert _maxdiff(a, c) < 1e-12


def test_vn_hot_heatbath_sweep_and_eligibility():
    """Hot start heat-bath sweep (KP retries and Creutz lanes at beta 0.8) against torch, and
    which fields take the one-call path."""
    lat = Lattice((4, 4, 4, 4))
    U = _field("su3", lat, (2,))
    rng = CounterRNG(7, 1)
    for beta in (0.8, 5.7):
        out = hh.heatbath_sweep_host(U, lat, beta, rng, 2)
        assert _maxdiff(out, hb.heatbath_sweep(U, lat, "su3", beta, rng, 2)) < 1e-12
    assert hh._vn_ok(U, lat, None) and hh._vn_ok(U, lat, SerialComm())
    assert not hh._vn_ok(U, lat, PeriodicHaloComm())
    assert not hh._vn_ok(U.to(torch.complex64), lat, None)
    assert not hh._vn_ok(_field("su3", Lattice((4, 6, 4, 4))), Lattice((4, 6, 4, 4)), None)
    assert not hh._vn_ok(_field("su3", Lattice((4, 4, 4, 4), halo=1)), Lattice((4, 4, 4, 4),
                                                                                 halo=1), None)


def test_vn_reprojection_between_sweeps():
    """A drifted field: the one-call path stops after the drifted sweep, re-projects like
    reproject_if_drifted after every sweep of the torch compound, and continues."""
    from hpcflow.sampling.hmc import unitarity_violation

    lat = Lattice((4, 4, 4, 4))
    U = (_warm("su3", lat, (2,)) * (1 + 1e-9)).contiguous()
    rng = CounterRNG(3, 2)
    out = hh.heatbath_or_sweep_host(U, lat, 6.0, rng, 5, n_or=2)
    ref = hb.heatbath_or_sweep(U, lat, "su3", 6.0, rng, 5, n_or=2)
    assert _maxdiff(out, ref) < 1e-12
    assert unitarity_violation(out, lat) < 1e-13
    out = hh.overrelax_sweep_host(U, lat)
    assert _maxdiff(out, hb.overrelax_sweep(U, lat, "su3", 6.0)) < 1e-12
