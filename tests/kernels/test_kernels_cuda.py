"""CUDA path (CuPy + torch CUDA): the kernels on a GPU equal the torch reference and the
host build, and the autograd Function matches torch autograd. These tests need a CUDA GPU
and cupy; elsewhere they are skipped with that reason (the only skips of this suite).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from hpcflow.kernels import dispatch
from hpcflow.lattice.action import plaquette_re_tr_torch, staple_sum_torch
from hpcflow.lattice.geometry import Lattice

_HAVE_GPU = torch.cuda.is_available()
_HAVE_CUPY = importlib.util.find_spec("cupy") is not None
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (_HAVE_GPU and _HAVE_CUPY),
                       reason=f"needs a CUDA GPU and cupy (GPU: {_HAVE_GPU}, cupy: {_HAVE_CUPY})"),
]

TOL = {torch.complex128: 1e-13, torch.complex64: 1e-5}


@pytest.mark.parametrize("dtype", [torch.complex128, torch.complex64])
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("gs, halo", [((5, 4), 0), ((3, 6), 1), ((3, 4, 2, 5), 0),
                                      ((2, 3, 3, 4), 1)])
def test_cuda_kernels_equal_reference(random_links, gs, halo, n, dtype):
    """Plaquette field and staple sum on the GPU equal the reference on interior sites."""
    lat = Lattice(gs, halo=halo)
    U = random_links((2, lat.nd, *lat.shape), n, dtype, seed=n).cuda()
    assert dispatch.resolve_backend("auto", U) == "cuda"
    i0, i2 = lat.interior_slices(0), lat.interior_slices(2)
    p = dispatch.plaquette_re_tr(U, lat, "cuda")
    s = dispatch.staple_sum(U, lat, "cuda")
    assert p.is_cuda and s.is_cuda
    torch.testing.assert_close(p[i0], plaquette_re_tr_torch(U, lat)[i0], atol=TOL[dtype], rtol=0)
    torch.testing.assert_close(s[i2], staple_sum_torch(U, lat)[i2], atol=TOL[dtype], rtol=0)


@pytest.mark.parametrize("halo", [0, 1])
def test_cuda_autograd_matches_reference(random_links, halo):
    """Gradient of the plaquette sum through the staple kernel equals torch autograd."""
    lat = Lattice((2, 3, 2, 3), halo=halo)
    U = random_links((2, lat.nd, *lat.shape), 3, torch.complex128, seed=9).cuda()
    grads = []
    for b in ("cuda", "torch"):
        Ug = U.clone().requires_grad_(True)
        dispatch.plaquette_sum(Ug, lat, b).sum().backward()
        grads.append(Ug.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-13, rtol=0)


def test_cuda_runs_on_current_stream(random_links):
    """Work launched on a side stream is ordered with torch work on that stream."""
    lat = Lattice((4, 4, 4, 4))
    U = random_links((lat.nd, *lat.shape), 3, torch.complex128, seed=1).cuda()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        V = U * 1.0  # produced on the side stream
        p = dispatch.plaquette_re_tr(V, lat, "cuda")
    side.synchronize()
    torch.testing.assert_close(p, plaquette_re_tr_torch(U, lat), atol=1e-13, rtol=0)


def test_gpu_kernel_benchmark_runs(tmp_path):
    """bench/kernels.py --device cuda runs end to end on a small lattice: the kernels pass its
    correctness checks against torch on the GPU and every reported rate is positive and
    finite (a smoke test of the GPU benchmark, no timing asserted)."""
    import importlib.util
    import math
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--device", "cuda", "--sizes", "8", "--reps", "2", "--json", str(tmp_path / "g.json")])
    assert out["peak_gbs"] > 0 and out["copy_gbs"] > 0
    for k in ("plaquette", "staple"):
        x = out["sizes"][0][k]
        assert all(math.isfinite(v) and v > 0 for v in x.values()), x
    assert (tmp_path / "g.json").exists()
