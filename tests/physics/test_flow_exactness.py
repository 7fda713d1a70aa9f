"""Exactness of flow-based Markov chains on 2D U(1): whatever the model quality, the
independence-Metropolis chain (and a mixed flow / heat-bath chain) samples exp(-S)/Z, so
<cos P> and <Q^2> agree with the exact finite-volume values (PHYSICS.md) within 3 Gamma-method
standard errors. Fixed seeds; a deliberately under-trained model is used on purpose."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hpcflow.analysis.exact import u1_2d_plaquette, u1_2d_q2
from hpcflow.analysis.gamma import gamma_method
from hpcflow.analysis.reweighting import reweighted_mean_error
from hpcflow.flows import build_u1_flow
from hpcflow.flows.train import Trainer
from hpcflow.lattice.geometry import Lattice
from hpcflow.rng import CounterRNG
from hpcflow.sampling.flow_chains import metropolis_chain, mixed_chain
from hpcflow.sampling.metropolis import chain_summary

pytestmark = pytest.mark.slow
L = 4
N_SIGMA = 3.0


@dataclass(frozen=True)
class _Train:
    steps: int
    batch: int = 64
    lr: float = 5e-3
    schedule: str = "cosine"
    grad_clip: float = 10.0
    checkpoint_every: int = 1000
    log_every: int = 10


def _model(n_layers: int, beta: float, train_steps: int, tmp_path):
    torch.manual_seed(2020)
    cfg = SimpleNamespace(n_layers=n_layers, kernel="ncp", n_components=2, n_knots=4,
                          hidden=(8, 8), kernel_size=3)
    lat = Lattice((L, L))
    m = build_u1_flow(cfg, lat)
    if train_steps:
        Trainer(m, lat, beta, _Train(train_steps), tmp_path, seed=7, progress=False).train()
    return m.eval(), lat


def _assert_exact(x: np.ndarray, exact: float, name: str) -> None:
    g = gamma_method(np.asarray(x, dtype=np.float64))
    assert g.error > 0
    assert abs(g.mean - exact) < N_SIGMA * g.error, f"{name}: {g} vs exact {exact:.6g}"


@pytest.mark.parametrize(
    ("beta", "train_steps", "max_acceptance"),
    [(1.0, 0, 0.6),    # untrained: the flow is close to the Haar prior
     (1.5, 40, 0.6)],  # trained a little, far from converged
)
def test_independence_metropolis_is_exact(tmp_path, beta, train_steps, max_acceptance) -> None:
    """20000 proposals: chain means of cos P and Q^2 match exact values within 3 sigma, and so
    does the reweighted (importance-sampling) mean of cos P. The models are poor on purpose;
    beta is kept where their weights are not so heavy-tailed that 20000 steps cannot give a
    trustworthy Gamma-method error (at beta = 2 with this budget the chain sticks for long
    stretches and error bars become unreliable, which is about statistics, not bias)."""
    m, lat = _model(8, beta, train_steps, tmp_path)
    res = metropolis_chain(m, lat, beta, 20000, 1000, CounterRNG(31, 0))
    acc = float(res["accepted"].mean())
    assert 0.02 < acc < max_acceptance  # a poor proposal density, yet the answer must be exact
    _assert_exact(res["plaquette"], u1_2d_plaquette(beta, L=L), "<cos P>")
    _assert_exact(res["Q"] ** 2, u1_2d_q2(beta, L=L), "<Q^2>")
    summary = chain_summary(res)
    assert summary["acceptance"] == pytest.approx(acc)
    # importance-sampling estimate from the same (independent) proposals, delta-method error
    mean, err = reweighted_mean_error(res["proposal_plaquette"], res["proposal_logw"])
    assert abs(mean - u1_2d_plaquette(beta, L=L)) < N_SIGMA * err


def test_mixed_flow_heatbath_chain_is_exact(tmp_path) -> None:
    """600 cycles of [flow, heatbath] with an untrained 4-layer flow at beta = 2: chain means of
    cos P and Q^2 (after every update) match exact values within 3 sigma; flow steps accept
    sometimes and the heat bath moves the rest."""
    beta = 2.0
    m, lat = _model(4, beta, 0, tmp_path)
    res = mixed_chain(m, lat, beta, ["flow", "heatbath"], 600, seed=77, batch=200)
    flow_acc = res["accepted"][res["kind"] == 0].mean()
    assert 0.0 < flow_acc < 0.5
    _assert_exact(res["plaquette"][20:], u1_2d_plaquette(beta, L=L), "<cos P>")
    _assert_exact(res["Q"][20:] ** 2, u1_2d_q2(beta, L=L), "<Q^2>")


def test_mixed_chain_bad_pattern() -> None:
    lat = Lattice((4, 4))
    m = build_u1_flow(SimpleNamespace(n_layers=1, kernel="ncp", n_components=1, n_knots=4,
                                      hidden=(), kernel_size=3), lat)
    with pytest.raises(ValueError, match=r"mixed.pattern entries must be one of .* got 'metropolis'"):
        mixed_chain(m, lat, 1.0, ["flow", "metropolis"], 1, seed=1)
    with pytest.raises(ValueError, match=r"contains 'hmc' but no hmc config"):
        mixed_chain(m, lat, 1.0, ["hmc"], 1, seed=1)
