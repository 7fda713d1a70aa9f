"""hpcflow.flows.diagnostics.u1_diagnostics: KL gap against the exact log Z, charge sectors
against the exact P(Q), importance weights, acceptance split by sector; JSON output."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hpcflow.analysis import u1_2d_charge_distribution, u1_2d_log_z
from hpcflow.flows import HaarPriorU1, build_u1_flow, u1_action, u1_topological_charge
from hpcflow.flows.diagnostics import _sum_min_ratio, exact_u1_reference, u1_diagnostics
from hpcflow.flows.train import acceptance_estimate
from hpcflow.lattice.geometry import Lattice


def _prior_batch(L: int, beta: float, batch: int, seed: int, shape: tuple[int, int] | None = None):
    lat = Lattice(shape or (L, L))
    prior = HaarPriorU1(lat)
    z = prior.sample(batch, torch.Generator().manual_seed(seed))
    return z, prior.log_prob(z), u1_action(z, lat, beta)


def _flow_batch(L: int, beta: float, batch: int, seed: int = 0):
    torch.manual_seed(seed)
    lat = Lattice((L, L))
    cfg = SimpleNamespace(n_layers=4, kernel="ncp", n_components=2, n_knots=4, hidden=(4,),
                          kernel_size=3, checkpoint_activations=False)
    m = build_u1_flow(cfg, lat)
    with torch.no_grad():
        for layer in m.layers:  # away from the identity, so the weights are not all equal
            for p in layer.net.convs[-1].parameters():
                p.mul_(4.0)
        x, logq = m.sample(batch, torch.Generator().manual_seed(seed + 1))
    return x, logq, u1_action(x, lat, beta)


def _dict(pairs: list[list[float]]) -> dict[int, float]:
    return {int(q): v for q, v in pairs}


def test_exact_sampler_beta0() -> None:
    """At beta = 0 the uniform prior is p itself: kl_gap = 0 to rounding, every weight equal
    (ESS 1, acceptance 1, q_weighted = q_hist), and the sector fractions of 20000 proposals
    match the exact P(Q) within 3 binomial sigma; TV small."""
    L, B = 8, 20000
    z, logq, s = _prior_batch(L, 0.0, B, seed=11)
    d = u1_diagnostics(z, logq, s, 0.0, (L, L))
    assert abs(d["kl_gap"]) < 1e-10
    assert d["log_z"] == pytest.approx(2 * L * L * math.log(2 * math.pi), rel=1e-15)
    assert d["ess"] == pytest.approx(1.0) and d["acceptance"] == pytest.approx(1.0)
    np.testing.assert_allclose(np.array(d["q_weighted"]), np.array(d["q_hist"]), rtol=1e-12)
    q, p = u1_2d_charge_distribution(0.0, L=L)
    exact = dict(zip(q.tolist(), p.tolist()))
    hist = _dict(d["q_hist"])
    assert _dict(d["q_exact"]) == pytest.approx({k: exact.get(k, 0.0) for k in hist}, abs=1e-15)
    for k, f in hist.items():
        pk = exact.get(k, 0.0)
        assert abs(f - pk) <= 3 * math.sqrt(pk * (1 - pk) / B) + 1e-12, (k, f, pk)
    assert d["q_tv"] < 0.03
    assert d["q2"] == pytest.approx(d["q2_exact"], rel=0.05)
    # every proposal is accepted; a different sector whenever the two charges differ
    f = np.array(list(hist.values()))
    assert d["tunnel_rate"] == pytest.approx(1 - np.sum(f * (B * f - 1) / (B - 1)), rel=1e-9)


def test_reweighted_sectors_estimate_exact_p() -> None:
    """Uniform proposals at beta = 1 on 4x4: the importance-weighted sector fractions
    estimate the exact P(Q) within 3 delta-method errors, and KL >= 0."""
    L, B, beta = 4, 40000, 1.0
    z, logq, s = _prior_batch(L, beta, B, seed=12)
    d = u1_diagnostics(z, logq, s, beta, (L, L))
    assert d["kl_gap"] > 0
    assert d["kl_gap"] == pytest.approx(float((logq + s).mean()) + u1_2d_log_z(beta, L=L))
    logw = (-(s + logq)).numpy()
    W = np.exp(logw - logw.max())
    W /= W.sum()
    qs = np.rint(u1_topological_charge(z, Lattice((L, L))).numpy()).astype(int)
    exact = _dict(d["q_exact"])
    for k, f in _dict(d["q_weighted"]).items():
        err = math.sqrt(float(np.sum(W**2 * ((qs == k) - f) ** 2)))
        if exact[k] > 1e-3:
            assert abs(f - exact[k]) < 3 * err, (k, f, exact[k], err)
    assert d["q_tv_weighted"] < d["q_tv"]  # reweighting removes the prior's bias in Q


def test_flow_batch_acceptance_and_json() -> None:
    """A poor (random) flow at beta = 2: kl_gap > 0, the acceptance equals
    hpcflow.flows.train.acceptance_estimate, its split by sector averages back to it, the
    tunnelling part is below it, and the dict survives strict JSON."""
    L, beta = 8, 2.0
    x, logq, s = _flow_batch(L, beta, 256)
    d = u1_diagnostics(x, logq, s, beta, (L, L))
    assert d["kl_gap"] > 0
    assert d["acceptance"] == pytest.approx(acceptance_estimate(-(s + logq)), rel=1e-10)
    assert 0 <= d["tunnel_rate"] <= d["acceptance"] <= 1
    W = _dict(d["q_weighted"])
    by_q = _dict(d["acceptance_by_q"])
    assert sum(W[k] * a for k, a in by_q.items()) == pytest.approx(d["acceptance"], rel=1e-10)
    assert sum(W.values()) == pytest.approx(1.0)
    assert sum(v for _, v in d["q_hist"]) == pytest.approx(1.0)
    back = json.loads(json.dumps(d, allow_nan=False))
    assert back["kl_gap"] == d["kl_gap"] and back["shape"] == [L, L]
    for key in ("q_hist", "q_exact", "q_weighted"):
        assert [q for q, _ in d[key]] == list(range(-(len(d[key]) // 2), len(d[key]) // 2 + 1))


def test_sum_min_ratio_matches_the_matrix() -> None:
    lw = np.random.default_rng(0).normal(size=300) * 5
    lw[:20] = lw[20]  # ties
    a = np.exp(np.minimum(lw[None, :] - lw[:, None], 0.0))
    np.fill_diagonal(a, 0.0)
    np.testing.assert_allclose(_sum_min_ratio(lw), a.sum(1), rtol=1e-12)
    assert _sum_min_ratio(np.array([0.3])).tolist() == [0.0]


def test_charges_given_non_square_and_validation() -> None:
    """q replaces phi; a non-square torus uses V = L0 L1; bad input raises; a diverged
    batch (NaN in log q) reports None, still valid JSON."""
    z, logq, s = _prior_batch(0, 0.0, 64, seed=3, shape=(4, 8))
    q = u1_topological_charge(z, Lattice((4, 8)))
    d1 = u1_diagnostics(z, logq, s, 0.0, (4, 8))
    d2 = u1_diagnostics(None, logq, s, 0.0, (4, 8), q=q)
    assert d1 == d2
    assert d1["log_z"] == pytest.approx(u1_2d_log_z(0.0, volume=32))
    with pytest.raises(ValueError, match="phi must have shape"):
        u1_diagnostics(z, logq, s, 0.0, (8, 4))
    with pytest.raises(ValueError, match="give phi or q"):
        u1_diagnostics(None, logq, s, 0.0, (4, 8))
    with pytest.raises(ValueError, match="one entry per proposal"):
        u1_diagnostics(z, logq[:3], s, 0.0, (4, 8))
    bad = logq.clone()
    bad[0] = float("nan")
    d3 = u1_diagnostics(z, bad, s, 0.0, (4, 8))
    assert d3["kl_gap"] is None and d3["ess"] is None and d3["q_weighted"] is None
    json.dumps(d3, allow_nan=False)


def test_exact_reference_cached() -> None:
    """The exact reference is computed once per (beta, shape) and reused (no timing here:
    benchmarks never run as timed assertions)."""
    L, beta = 16, 3.0
    x, logq, s = _flow_batch(L, beta, 64)
    exact_u1_reference.cache_clear()
    first = u1_diagnostics(x, logq, s, beta, (L, L))
    assert exact_u1_reference.cache_info().misses == 1
    for _ in range(5):
        assert u1_diagnostics(x, logq, s, beta, (L, L)) == first
    assert exact_u1_reference.cache_info().hits >= 5 and exact_u1_reference.cache_info().misses == 1


def test_float32_proposals_at_l16() -> None:
    """Regression: a float32 batch at 16x16 (the seed-scale training's precision) gave charges
    0.9999989 in float32 arithmetic and the diagnostics refused them; the charge is now formed
    in float64 and equals the float64 batch's."""
    x, logq, s = _flow_batch(16, 2.0, 32)
    d32 = u1_diagnostics(x.to(torch.float32), logq.to(torch.float32), s.to(torch.float32), 2.0, (16, 16))
    d64 = u1_diagnostics(x, logq, s, 2.0, (16, 16))
    assert d32["q_hist"] == d64["q_hist"]
