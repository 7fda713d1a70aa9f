"""Tests of hpcflow.rng: Philox4x32-10 known answers, counter mapping, distributions."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from hpcflow.rng import CounterRNG, _mulhilo, philox4x32, spawn_seed

M = 0xFFFFFFFF

# Random123 tests/kat_vectors (github.com/DEShawResearch/random123), "philox4x32 10" lines:
# counter (4 words), key (2 words) -> output (4 words).
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M, M, M, M), (M, M), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_philox_known_answers(ctr, key, expected):
    """The torch int64 implementation reproduces Random123's known-answer vectors."""
    assert philox4x32(ctr, key) == expected


def test_mulhilo_matches_python_bigint():
    """The 16-bit-split product equals exact 64-bit arithmetic, including the extremes."""
    rnd = random.Random(7)
    xs = [0, 1, M, M - 1, 1 << 31, (1 << 31) - 1] + [rnd.getrandbits(32) for _ in range(2000)]
    x = torch.tensor(xs, dtype=torch.int64)
    for m in (0xD2511F53, 0xCD9E8D57, M):
        hi, lo = _mulhilo(m, x)
        exp_hi = [(m * v) >> 32 for v in xs]
        exp_lo = [(m * v) & M for v in xs]
        assert hi.tolist() == exp_hi
        assert lo.tolist() == exp_lo


def test_determinism_and_state_dict():
    """Same (seed, stream, index, step) -> same numbers, also after a state_dict round trip."""
    idx = torch.arange(50)
    a = CounterRNG(123, 4)
    b = CounterRNG(0)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.uniform(idx, 9, 3), b.uniform(idx, 9, 3))
    assert torch.equal(a.normal(idx, 9, 3), b.normal(idx, 9, 3))
    assert torch.equal(a.uniform_scalar(5, 2), b.uniform_scalar(5, 2))
    assert a.state_dict() == {"generator": "philox4x32-10", "seed": 123, "stream": 4}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_slices_equal_full_draw(dtype):
    """Draws for a subset of indices equal the same entries of the full draw.

    This is the domain-decomposition property: a rank that owns some sites, in any order
    and any array shape, gets exactly the numbers the single-rank run gets there.
    """
    rng = CounterRNG(2024, 1)
    full_idx = torch.arange(4 * 6 * 6).reshape(4, 6, 6)
    full_u = rng.uniform(full_idx, 17, 5, dtype)
    full_n = rng.normal(full_idx, 17, 5, dtype)
    sub = full_idx[1:3, 2:5, ::2]
    assert torch.equal(rng.uniform(sub, 17, 5, dtype), full_u[1:3, 2:5, ::2])
    assert torch.equal(rng.normal(sub, 17, 5, dtype), full_n[1:3, 2:5, ::2])
    perm = torch.randperm(full_idx.numel(), generator=torch.Generator().manual_seed(0))
    flat = full_idx.reshape(-1)[perm]
    assert torch.equal(rng.uniform(flat, 17, 5, dtype), full_u.reshape(-1, 5)[perm])
    # the first k draws do not depend on how many are requested
    assert torch.equal(rng.uniform(sub, 17, 2, dtype), full_u[1:3, 2:5, ::2, :2])
    assert torch.equal(rng.normal(sub, 17, 3, dtype), full_n[1:3, 2:5, ::2, :3])


def test_distinct_inputs_give_distinct_draws():
    """Changing any of seed, stream, index, step, draw number or kind changes the numbers."""
    idx = torch.arange(64)
    base = CounterRNG(5, 0).uniform(idx, 3, 4)
    variants = [
        CounterRNG(6, 0).uniform(idx, 3, 4),
        CounterRNG(5, 1).uniform(idx, 3, 4),
        CounterRNG(5, 0).uniform(idx + 64, 3, 4),
        CounterRNG(5, 0).uniform(idx, 4, 4),
        CounterRNG(5, 0).uniform(idx, 3, 8)[..., 4:],
    ]
    for v in variants:
        assert not torch.isin(v, base).any()
    # large indices use the high counter word
    big = torch.tensor([5, 5 + (1 << 32)])
    u = CounterRNG(5).uniform(big, 0, 2)
    assert not torch.equal(u[0], u[1])
    # chain-level draws are not the site draws of index 0
    r = CounterRNG(5)
    assert not torch.isin(r.uniform_scalar(3, 4), r.uniform(torch.tensor([0]), 3, 4)).any()
    # all 64 * 4 draws of one call are distinct
    assert base.unique().numel() == base.numel()


def test_uniform_open_interval_and_dtype():
    """Uniforms are strictly inside (0, 1) in both precisions and carry the requested dtype."""
    rng = CounterRNG(1)
    idx = torch.arange(20000)
    u64 = rng.uniform(idx, 0, 8)
    u32 = rng.uniform(idx, 0, 8, dtype=torch.float32)
    assert u64.dtype == torch.float64 and u32.dtype == torch.float32
    for u in (u64, u32):
        assert bool((u > 0).all()) and bool((u < 1).all())
    # float64 carries 53 random bits: multiples of 2^-53 well below 2^-24 do occur
    frac = u64 * 2.0**24 - torch.floor(u64 * 2.0**24)
    assert bool((frac != 0).float().mean() > 0.99)
    assert rng.normal(idx[:3], 0, 2, dtype=torch.float32).dtype == torch.float32


def test_uniform_moments_chi2_ks():
    """2*10^5 float64 uniforms: mean, variance, 100-bin chi^2 and Kolmogorov-Smirnov.

    Each moment is compared with its exact value within 5 standard errors; chi^2 with
    99 degrees of freedom within 5 sigma (sigma = sqrt(2*99)); the KS statistic below the
    alpha = 0.001 critical value 1.95/sqrt(n). Neighbouring indices are uncorrelated within
    5/sqrt(n).
    """
    rng = CounterRNG(99, 3)
    n = 200_000
    u = rng.uniform(torch.arange(n // 2), 7, 2).reshape(-1).numpy()
    se_mean = math.sqrt(1 / 12 / n)
    assert abs(u.mean() - 0.5) < 5 * se_mean
    # Var of (u-1/2)^2 is 1/80 - 1/144
    assert abs(((u - 0.5) ** 2).mean() - 1 / 12) < 5 * math.sqrt((1 / 80 - 1 / 144) / n)
    counts = np.bincount((u * 100).astype(int), minlength=100)
    chi2 = ((counts - n / 100) ** 2 / (n / 100)).sum()
    assert abs(chi2 - 99) < 5 * math.sqrt(2 * 99)
    s = np.sort(u)
    grid = np.arange(1, n + 1) / n
    d = max(np.max(grid - s), np.max(s - (grid - 1 / n)))
    assert d < 1.95 / math.sqrt(n)
    v = rng.uniform(torch.arange(n), 8, 1).reshape(-1).numpy() - 0.5
    corr = (v[1:] * v[:-1]).mean() / (1 / 12)
    assert abs(corr) < 5 / math.sqrt(n)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_normal_moments(dtype):
    """Box-Muller normals: mean 0, variance 1, kurtosis 3 and zero cos/sin pair correlation,
    each within 5 standard errors (Var x = 1, Var x^2 = 2, Var x^4 = 96, Var xy = 1)."""
    rng = CounterRNG(31415, 2)
    n_idx, k = 50_000, 4
    z = rng.normal(torch.arange(n_idx), 11, k, dtype=dtype).to(torch.float64)
    x = z.reshape(-1)
    n = x.numel()
    assert abs(float(x.mean())) < 5 / math.sqrt(n)
    assert abs(float((x**2).mean()) - 1) < 5 * math.sqrt(2 / n)
    assert abs(float((x**4).mean()) - 3) < 5 * math.sqrt(96 / n)
    # the two members of one Box-Muller pair are uncorrelated
    assert abs(float((z[:, 0] * z[:, 1]).mean())) < 5 / math.sqrt(n_idx)
    zs = rng.normal_scalar(3, 10_000)
    assert abs(float(zs.mean())) < 5 / math.sqrt(10_000)


def test_scalar_helpers_shape_and_range():
    """Chain-level draws have shape (n,) and lie in (0, 1)."""
    u = CounterRNG(8).uniform_scalar(12, 1000)
    assert u.shape == (1000,) and bool((u > 0).all() and (u < 1).all())
    assert abs(float(u.mean()) - 0.5) < 5 * math.sqrt(1 / 12 / 1000)


def test_spawn_seed():
    """spawn_seed is deterministic, 64-bit, and different for different key tuples."""
    a = spawn_seed(42, 0)
    assert a == spawn_seed(42, 0)
    assert 0 <= a < 1 << 64
    seeds = {spawn_seed(42, r) for r in range(100)} | {spawn_seed(42, 0, r) for r in range(100)}
    seeds.add(spawn_seed(43, 0))
    assert len(seeds) == 201


def test_bad_input_errors():
    """Bad arguments raise one-line errors naming the argument."""
    with pytest.raises(ValueError, match="seed"):
        CounterRNG(-1)
    with pytest.raises(TypeError, match="seed"):
        CounterRNG(1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="stream"):
        CounterRNG(1, 1 << 64)
    rng = CounterRNG(1)
    with pytest.raises(TypeError, match="index"):
        rng.uniform(torch.zeros(3), 0, 1)
    with pytest.raises(ValueError, match="index"):
        rng.uniform(torch.tensor([-1]), 0, 1)
    with pytest.raises(ValueError, match="step"):
        rng.uniform(torch.tensor([1]), 1 << 32, 1)
    with pytest.raises(TypeError, match="dtype"):
        rng.uniform(torch.tensor([1]), 0, 1, dtype=torch.float16)
    with pytest.raises(ValueError, match="generator"):
        rng.load_state_dict({"generator": "mt19937", "seed": 1, "stream": 0})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    """On a GPU the draws are bit-identical to the CPU draws and stay on the index's device."""
    rng = CounterRNG(77, 5)
    idx = torch.arange(1000)
    for dtype in (torch.float64, torch.float32):
        u = rng.uniform(idx.cuda(), 3, 4, dtype)
        assert u.device.type == "cuda"
        assert torch.equal(u.cpu(), rng.uniform(idx, 3, 4, dtype))
        z = rng.normal(idx.cuda(), 3, 4, dtype)
        torch.testing.assert_close(z.cpu(), rng.normal(idx, 3, 4, dtype), rtol=0, atol=1e-6)
    assert torch.equal(rng.uniform_scalar(2, 8, device="cuda").cpu(), rng.uniform_scalar(2, 8))
