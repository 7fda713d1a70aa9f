"""The kernel benchmarks' own logic, on machines without a GPU: the nominal peak bandwidth
formula of the GPU target against published figures, a clear one-line refusal of
``bench/kernels.py --device cuda`` where there is no GPU (the GPU benchmark itself runs in
tests/kernels/test_kernels_cuda.py, on GPU machines), the GPU benchmark's SU(3) generator,
and the A/B tool bench/kernels_ab.py. No timing is asserted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hpcflow.kernels import cuda as cuda_kernels

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("clock_khz, bus_bits, published_gbs", [
    (1_215_000, 5120, 1555),  # A100 40 GB (HBM2): NVIDIA's 1555 GB/s
    (2_619_000, 5120, 3352),  # H100 SXM (HBM3): NVIDIA's 3.35 TB/s
])
def test_peak_bandwidth_formula_matches_published_figures(clock_khz, bus_bits, published_gbs):
    """2 transfers per memory clock across the bus reproduces the vendors' numbers (0.5%)."""
    got = cuda_kernels.peak_bandwidth_gbs(clock_khz, bus_bits)
    assert abs(got - published_gbs) / published_gbs < 5e-3, got


@pytest.mark.parametrize("clock_khz, bus_bits", [(0, 5120), (1_215_000, 0), (-1, 64)])
def test_peak_bandwidth_rejects_nonpositive(clock_khz, bus_bits):
    with pytest.raises(ValueError, match="must be positive"):
        cuda_kernels.peak_bandwidth_gbs(clock_khz, bus_bits)


@pytest.mark.skipif(torch.cuda.is_available() and cuda_kernels.cupy_available(),
                    reason="a GPU and cupy are present: the benchmark runs instead")
def test_gpu_benchmark_refuses_clearly_without_a_gpu():
    """No traceback: exit status 2 and one line saying what is missing."""
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "kernels.py"), "--device", "cuda"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "--device cuda cannot run here" in lines[0], res.stderr
    assert "Traceback" not in res.stderr


def test_benchmark_rejects_bad_sizes():
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "kernels.py"), "--sizes", "1"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 2 and "--sizes" in res.stderr and "[1]" in res.stderr


def test_benchmark_su3_generator_gives_su3():
    """The GPU benchmark's link generator (run here on the CPU) gives unitary links of
    determinant 1: its correctness check against torch then compares O(1) numbers."""
    import importlib.util

    from hpcflow.lattice.geometry import Lattice

    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "bench" / "kernels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    U = mod.random_su3_on_device(Lattice((2, 3, 2, 3)), seed=4, device="cpu")
    assert U.shape == (4, 2, 3, 2, 3, 3, 3)
    eye = torch.eye(3, dtype=U.dtype)
    assert float((U @ U.mH - eye).abs().max()) < 1e-14
    assert float((torch.linalg.det(U) - 1).abs().max()) < 1e-14
    assert float(U.abs().std()) > 0.1  # not a constant field


def test_kernel_ab_tool_runs_and_rejects_unknown_revisions():
    """bench/kernels_ab.py builds HEAD's and the working tree's SIMD kernels side by side,
    checks they agree and reports both (a smoke test: no timing asserted); an unknown
    revision is refused in one line."""
    cmd = [sys.executable, str(ROOT / "bench" / "kernels_ab.py"), "--L", "4", "--calls", "2"]
    res = subprocess.run([*cmd, "--rev", "HEAD", "--rev", "worktree"], capture_output=True, text=True,
                         cwd=ROOT, timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stdout.splitlines() if "ns/site best" in ln]
    assert [ln.split(":")[0].strip() for ln in lines] == ["HEAD", "worktree"]
    res = subprocess.run([*cmd, "--rev", "no-such-revision"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode != 0 and "no-such-revision" in res.stderr and "Traceback" not in res.stderr
