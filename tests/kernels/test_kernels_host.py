"""Host-compiled CUDA kernels equal the torch reference of hpcflow.lattice.action.

Same ``.cu`` sources as the GPU build, compiled with g++ through ``host_harness.h``, and
the SIMD kernels of ``host_simd.cpp`` (the default host variant; every lane width).
Tolerances: 1e-13 (float64) and 1e-5 (float32), absolute, on O(1) unitary links.
Comparisons are on interior sites (the kernels write 0 on halo sites, where the reference
holds wrapped values); with halo 0 that is every site, which checks the periodic wrap.
"""

from __future__ import annotations

import pytest
import torch

from hpcflow.kernels import host
from hpcflow.kernels._common import field_info
from hpcflow.lattice.action import plaquette_re_tr_torch, staple_sum_torch
from hpcflow.lattice.geometry import Lattice

TOL = {torch.complex128: 1e-13, torch.complex64: 1e-5}

# (global extents, halo, padded dims): odd and even extents, extent 2 (x+1 == x-1), full
# halos, and a halo in one dimension only (the slab decomposition of a 1-D process grid).
GEOMETRIES = {
    2: [((5, 4), 0, None), ((3, 6), 1, None), ((4, 5), 2, (1,))],
    4: [((3, 4, 2, 5), 0, None), ((2, 3, 3, 4), 1, None), ((3, 2, 4, 3), 1, (0,))],
}


def _cases():
    for n in (1, 2, 3):
        for nd in (2, 4):
            for gi, (gs, halo, dims) in enumerate(GEOMETRIES[nd]):
                for dtype in (torch.complex128, torch.complex64):
                    yield pytest.param(
                        n, nd, gs, halo, dims, dtype,
                        id=f"N{n}-{nd}d-g{gi}-h{halo}-{str(dtype)[6:]}",
                    )


def _lattice(gs, halo, dims) -> Lattice:
    return Lattice(gs, halo=halo, padded_dims=dims)


@pytest.mark.parametrize("n, nd, gs, halo, dims, dtype", list(_cases()))
def test_plaquette_and_staple_equal_reference(host_libs, random_links, n, nd, gs, halo, dims,
                                              dtype):
    """Plaquette field and staple sum agree with the reference on interior sites, for
    U(1)/SU(2)/SU(3)-sized matrices, 2D and 4D, float64 and float32, with a batch axis;
    halo sites of the kernel outputs are exactly 0."""
    lat = _lattice(gs, halo, dims)
    U = random_links((2, nd, *lat.shape), n, dtype, seed=n * 10 + nd)
    tol = TOL[dtype]
    p_ref = plaquette_re_tr_torch(U, lat)
    p = host.plaquette_re_tr(U, lat, variant="harness")
    assert p.shape == p_ref.shape and p.dtype == p_ref.dtype
    inner = lat.interior_slices(0)
    torch.testing.assert_close(p[inner], p_ref[inner], atol=tol, rtol=0)
    p_simd = host.plaquette_re_tr(U, lat, variant="simd")
    assert p_simd.shape == p_ref.shape and p_simd.dtype == p_ref.dtype
    torch.testing.assert_close(p_simd[inner], p_ref[inner], atol=tol, rtol=0)
    assert torch.all(p_simd[..., ~lat.interior()] == 0)
    s_ref = staple_sum_torch(U, lat)
    inner2 = lat.interior_slices(2)
    halo_mask = ~lat.interior()
    assert torch.all(p[..., halo_mask] == 0)
    for variant in host.VARIANTS:  # auto, simd, harness
        s = host.staple_sum(U, lat, variant=variant)
        assert s.shape == s_ref.shape and s.dtype == s_ref.dtype
        torch.testing.assert_close(s[inner2], s_ref[inner2], atol=tol, rtol=0)
        assert torch.all(s.movedim((-2, -1), (1, 2))[..., halo_mask] == 0)


# Rows (the last, SIMD-lane dimension) longer than every lane count, not multiples of it,
# with and without a halo in that dimension, and a halo only in the first (slab) dimension.
SIMD_GEOMETRIES = {
    2: [((3, 21), 0, None), ((4, 19), 1, None), ((5, 17), 2, (0,))],
    4: [((2, 3, 2, 19), 0, None), ((3, 2, 2, 17), 1, None), ((3, 2, 3, 9), 1, (0,))],
}


def _simd_cases():
    for nbytes in (8, 16, 32, 64):
        for n in (1, 3):
            for nd in (2, 4):
                for gi, (gs, halo, dims) in enumerate(SIMD_GEOMETRIES[nd]):
                    for dtype in (torch.complex128, torch.complex64):
                        if nbytes == 8 and n == 1:
                            continue  # (the 8-byte libraries are checked for SU(3))
                        yield pytest.param(nbytes, n, nd, gs, halo, dims, dtype,
                                           id=f"{nbytes}B-N{n}-{nd}d-g{gi}-h{halo}-{str(dtype)[6:]}")


@pytest.mark.parametrize("nbytes, n, nd, gs, halo, dims, dtype", list(_simd_cases()))
def test_simd_kernels_every_lane_width(monkeypatch, random_links, nbytes, n, nd, gs, halo,
                                         dims, dtype):
    """host_simd.cpp at every vector width (1 to 16 lanes) equals the reference: the
    plaquette and the staple on interior sites (exactly 0 on halo sites), and the weighted,
    all-sites, dagger staple on every site against the harness build (the gradient mode,
    whose halo sites use wrapped neighbours). Covers row tails shorter than a vector, the
    periodic wrap of the last dimension across tiles in both directions, halos in the lane
    and in the slab dimension."""
    monkeypatch.setenv("HPCFLOW_SIMD_BYTES", str(nbytes))
    lat = _lattice(gs, halo, dims)
    U = random_links((2, nd, *lat.shape), n, dtype, seed=nbytes + n)
    tol = TOL[dtype]
    halo_mask = ~lat.interior()
    p = host.plaquette_re_tr(U, lat, variant="simd")
    p_ref = plaquette_re_tr_torch(U, lat)
    inner = lat.interior_slices(0)
    torch.testing.assert_close(p[inner], p_ref[inner], atol=tol, rtol=0)
    assert torch.all(p[..., halo_mask] == 0)
    s = host.staple_sum(U, lat, variant="simd")
    s_ref = staple_sum_torch(U, lat)
    inner2 = lat.interior_slices(2)
    torch.testing.assert_close(s[inner2], s_ref[inner2], atol=tol, rtol=0)
    assert torch.all(s.movedim((-2, -1), (1, 2))[..., halo_mask] == 0)
    w = torch.rand((2, lat.n_planes, *lat.shape), dtype=p.dtype,
                   generator=torch.Generator().manual_seed(nbytes))
    kw = dict(weights=w, all_sites=True, dagger=True)
    torch.testing.assert_close(host.staple_sum(U, lat, variant="simd", **kw),
                               host.staple_sum(U, lat, variant="harness", **kw), atol=tol, rtol=0)


def test_simd_kernels_reuse_scratch_across_sizes(random_links):
    """The SIMD kernels' scratch (kept between calls) gives right answers when a large call
    follows a small one and vice versa (stale data of the larger call must not leak)."""
    for gs in ((4, 4, 4, 6), (6, 4, 6, 10), (2, 2, 2, 3), (6, 4, 6, 10)):
        lat = Lattice(gs)
        U = random_links((lat.nd, *lat.shape), 3, torch.complex128, seed=sum(gs))
        torch.testing.assert_close(host.plaquette_re_tr(U, lat, variant="simd"),
                                   plaquette_re_tr_torch(U, lat), atol=1e-13, rtol=0)
        torch.testing.assert_close(host.staple_sum(U, lat, variant="simd"),
                                   staple_sum_torch(U, lat), atol=1e-13, rtol=0)


def test_bad_variant_and_width_are_rejected(monkeypatch, random_links):
    lat = Lattice((4, 4))
    U = random_links((2, *lat.shape), 1, torch.complex128)
    with pytest.raises(ValueError, match="host kernel variant 'fast': allowed auto, simd, harness"):
        host.plaquette_re_tr(U, lat, variant="fast")
    with pytest.raises(ValueError, match="host kernel variant 'fast': allowed auto, simd, harness"):
        host.staple_sum(U, lat, variant="fast")
    monkeypatch.setenv("HPCFLOW_SIMD_BYTES", "48")
    with pytest.raises(ValueError, match="HPCFLOW_SIMD_BYTES='48': allowed 8, 16, 32, 64"):
        host.plaquette_re_tr(U, lat, variant="simd")
    with pytest.raises(ValueError, match="SIMD width"):
        host.build_simd_library(1, "double", 2, nbytes=4)


def test_auto_variant_picks_simd_for_4d_arrays_of_1024_sites(monkeypatch, random_links):
    """``auto`` (the default) runs host_simd.cpp exactly for 4D local arrays of >= 1024
    sites (halos counted) and the harness build otherwise: checked by disabling one."""
    calls = []
    real_load = host.load_simd_library
    monkeypatch.setattr(host, "load_simd_library", lambda *a: calls.append(a) or real_load(*a))
    for gs, halo, simd in (((4, 4, 4, 4), 0, False), ((4, 4, 4, 16), 0, True),
                           ((4, 4, 4, 14), 1, True), ((64, 64), 0, False)):
        lat = Lattice(gs, halo=halo)
        U = random_links((lat.nd, *lat.shape), 2, torch.complex128, seed=1)
        calls.clear()
        p = host.plaquette_re_tr(U, lat)
        s = host.staple_sum(U, lat)
        assert bool(calls) == simd and len(calls) in (0, 2), (gs, halo, calls)
        inner = lat.interior_slices(0)
        torch.testing.assert_close(p[inner], plaquette_re_tr_torch(U, lat)[inner], atol=1e-13, rtol=0)
        inner2 = lat.interior_slices(2)
        torch.testing.assert_close(s[inner2], staple_sum_torch(U, lat)[inner2], atol=1e-13, rtol=0)


def test_no_batch_and_multi_batch(host_libs, random_links):
    """No batch axis and two batch axes give the same per-configuration results."""
    lat = Lattice((3, 4, 3, 2))
    U = random_links((2, 3, 4, *lat.shape), 3, torch.complex128, seed=5)
    p = host.plaquette_re_tr(U, lat)
    s = host.staple_sum(U, lat)
    torch.testing.assert_close(p[1, 2], host.plaquette_re_tr(U[1, 2], lat), atol=0, rtol=0)
    torch.testing.assert_close(s[1, 2], host.staple_sum(U[1, 2], lat), atol=0, rtol=0)
    torch.testing.assert_close(p, plaquette_re_tr_torch(U, lat), atol=1e-13, rtol=0)
    ph = host.plaquette_re_tr(U, lat, variant="harness")
    torch.testing.assert_close(ph[1, 2], host.plaquette_re_tr(U[1, 2], lat, variant="harness"),
                               atol=0, rtol=0)
    torch.testing.assert_close(p, ph, atol=1e-13, rtol=0)


def test_noncontiguous_and_conj_views(host_libs, random_links):
    """Views (transposed storage, lazily conjugated tensors) are read by value, not layout."""
    lat = Lattice((4, 5))
    U = random_links((2, *lat.shape), 2, torch.complex128, seed=7)
    V = U.mT.contiguous().mT.conj()  # non-contiguous and with the conj bit set
    assert not V.is_contiguous() and V.is_conj()
    torch.testing.assert_close(host.plaquette_re_tr(V, lat),
                               plaquette_re_tr_torch(V.resolve_conj(), lat), atol=1e-13, rtol=0)
    torch.testing.assert_close(host.staple_sum(V, lat),
                               staple_sum_torch(V.resolve_conj(), lat), atol=1e-13, rtol=0)


def test_weighted_staple_is_gradient_of_weighted_sum(host_libs, random_links):
    """The weighted, all-sites, dagger mode equals torch autograd of
    sum_{x, plane} w Re tr P with the reference (periodic lattice, halo 0)."""
    lat = Lattice((3, 2, 4, 3))
    U = random_links((lat.nd, *lat.shape), 2, torch.complex128, seed=11)
    w = torch.rand((lat.n_planes, *lat.shape), dtype=torch.float64,
                   generator=torch.Generator().manual_seed(3))
    Ug = U.clone().requires_grad_(True)
    (w * plaquette_re_tr_torch(Ug, lat)).sum().backward()
    for variant in host.VARIANTS:
        got = host.staple_sum(U, lat, weights=w, all_sites=True, dagger=True, variant=variant)
        torch.testing.assert_close(got, Ug.grad, atol=1e-13, rtol=0)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: (torch.zeros(2, 4, 5, 3, 3, dtype=torch.complex128), Lattice((4, 4))),
         "trailing shape"),
        (lambda: (torch.zeros(2, 4, 4, 3, 3, dtype=torch.float64), Lattice((4, 4))), "dtype"),
        (lambda: (torch.zeros(2, 4, 4, 4, 4, dtype=torch.complex128), Lattice((4, 4))),
         "matrix size N"),
        (lambda: (torch.zeros(3, 4, 4, 4, 3, 3, dtype=torch.complex128), Lattice((4, 4, 4))),
         "lat.nd"),
        (lambda: (torch.zeros(4, 3, 3, dtype=torch.complex128), Lattice((4, 4))), "must have"),
    ],
)
def test_bad_input_raises_clearly(make, match):
    """Unsupported shapes, dtypes, N and Nd are rejected with an error naming the value."""
    U, lat = make()
    with pytest.raises((ValueError, TypeError), match=match):
        host.plaquette_re_tr(U, lat)
    with pytest.raises((ValueError, TypeError), match=match):
        host.staple_sum(U, lat)


# 4D geometries with x_1 long enough to be split: halo 0, halo 1 everywhere, a halo in x_1
# only; row lengths not multiples of the lanes.
X1_BLOCK_GEOMETRIES = [((3, 7, 2, 9), 0, None), ((4, 8, 3, 10), 1, None), ((3, 9, 2, 11), 1, (1,))]


@pytest.mark.parametrize("n, dtype", [(3, torch.complex128), (2, torch.complex64), (1, torch.complex128)])
@pytest.mark.parametrize("gi", range(len(X1_BLOCK_GEOMETRIES)))
def test_simd_kernels_in_x1_blocks(monkeypatch, random_links, n, dtype, gi):
    """Slabs processed in blocks of x_1 (what large lattices get, forced here by small
    window budgets) give the values of whole slabs: the plaquette and the staple against
    the reference on interior sites (0 on halo sites), and the weighted all-sites dagger
    staple against the harness on every site. Blocks of 1, 2 and 3 x_1 values, with a
    shorter last block; the block size each call uses is asserted, so the test cannot pass
    on whole slabs."""
    gs, halo, dims = X1_BLOCK_GEOMETRIES[gi]
    lat = _lattice(gs, halo, dims)
    real = "double" if dtype == torch.complex128 else "float"
    U = random_links((2, 4, *lat.shape), n, dtype, seed=10 + gi + n)
    info = field_info(U, lat)
    tol = TOL[dtype]
    w = torch.rand((2, lat.n_planes, *lat.shape), dtype=torch.float64 if real == "double" else torch.float32,
                   generator=torch.Generator().manual_seed(gi))
    kw = dict(weights=w, all_sites=True, dagger=True)
    ref_p, ref_s = plaquette_re_tr_torch(U, lat), staple_sum_torch(U, lat)
    ref_w = host.staple_sum(U, lat, variant="harness", **kw)
    inner, inner2, halo_mask = lat.interior_slices(0), lat.interior_slices(2), ~lat.interior()

    def block(budget: int, **which) -> int:
        monkeypatch.setenv("HPCFLOW_SIMD_WINDOW_BYTES", str(budget))
        return host.simd_x1_block(info.ext, info.halo, n, real, **which)

    def budget_for(nblk: int, **which) -> int:
        lo, hi = 1, 1 << 40  # the block grows with the budget: smallest budget giving >= nblk
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if block(mid, **which) < nblk else (lo, mid)
        assert block(lo, **which) == nblk, (nblk, which)
        return lo

    assert block(1 << 40) == info.ext[1] and block(1 << 40, staple=True) == info.ext[1]  # whole slabs
    for nblk in (1, 2, 3):
        monkeypatch.setenv("HPCFLOW_SIMD_WINDOW_BYTES", str(budget_for(nblk)))
        p = host.plaquette_re_tr(U, lat, variant="simd")
        torch.testing.assert_close(p[inner], ref_p[inner], atol=tol, rtol=0)
        assert torch.all(p[..., halo_mask] == 0)
        monkeypatch.setenv("HPCFLOW_SIMD_WINDOW_BYTES", str(budget_for(nblk, staple=True)))
        s = host.staple_sum(U, lat, variant="simd")
        torch.testing.assert_close(s[inner2], ref_s[inner2], atol=tol, rtol=0)
        assert torch.all(s.movedim((-2, -1), (1, 2))[..., halo_mask] == 0)
        monkeypatch.setenv("HPCFLOW_SIMD_WINDOW_BYTES", str(budget_for(nblk, staple=True, all_sites=True)))
        torch.testing.assert_close(host.staple_sum(U, lat, variant="simd", **kw), ref_w, atol=tol, rtol=0)


def test_bad_window_budget_is_rejected(monkeypatch, random_links):
    lat = Lattice((4, 4, 4, 16))
    U = random_links((4, *lat.shape), 3, torch.complex128)
    for bad in ("0", "-5", "8MB"):
        monkeypatch.setenv("HPCFLOW_SIMD_WINDOW_BYTES", bad)
        with pytest.raises(ValueError, match=f"HPCFLOW_SIMD_WINDOW_BYTES='{bad}': allowed a positive integer"):
            host.plaquette_re_tr(U, lat, variant="simd")
        with pytest.raises(ValueError, match="HPCFLOW_SIMD_WINDOW_BYTES"):
            host.staple_sum(U, lat)
