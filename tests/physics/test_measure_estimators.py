"""Every number `hpcflow measure` prints, on flow ensembles, against an exact or independent value.

Regression for issue 19: `measure` used to reweight the accepted chain states by their
importance weights. Chain states of an exact independence-Metropolis chain are already
distributed as p, so that 'plaquette_reweighted' was biased (7.9 sigma on the demo's
ensemble); with a deliberately poor model the bias is large. The point (2D U(1), 4x4,
beta = 1.5) is used nowhere else in the tests.

Issue 19 item 3: `measure` now prints every stored column (plaquette, S, acceptance, log q,
log w, and since item 2 the Wilson loops W_1x1 and W_2x2, Q, Q^2 and |Polyakov loop|: exact
values for the loops, Q and Q^2, fresh reweighted proposals for the Polyakov loop), per chain and combined, with --skip and --bin, and the ESS per proposal estimated from
the chain states. References: exact plaquette and S; acceptance, ESS and the p-means of log q
and log w from fresh, independent proposals of the same model (the acceptance as before; log q
and log w reweighted, which is valid for independent proposals; the ESS as
(sum w)^2 / sum w^2). For the poor model the weights are heavy-tailed and every estimate of
the ESS (the proposals' too) is rough; the fixed seed keeps the comparison reproducible.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from hpcflow.analysis import exact, gamma_method, gamma_method_derived, reweighted_gamma
from hpcflow.analysis.ensemble import measure_ensemble
from hpcflow.config import config_from_dict
from hpcflow.io import open_ensemble
from hpcflow.run.sample import EXIT_OK, ensemble_dir, sample

L, BETA, SEED = 4, 1.5, 4242
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cfg(out, train_steps: int, n_steps: int):  # type: ignore[no-untyped-def]
    return config_from_dict({
        "lattice": {"shape": [L, L]}, "group": "u1", "algorithm": "flow", "seed": SEED,
        "action": {"beta": BETA}, "flow": {"n_layers": 8, "hidden": [8], "kernel_size": 3},
        "train": {"steps": train_steps, "batch": 32, "lr": 0.01, "checkpoint_every": max(train_steps, 1)},
        "run": {"measure_every": 1, "progress": False},
        "sample": {"n_therm": 20, "n_steps": n_steps, "batch": 256, "checkpoint_every": n_steps},
        "output": {"dir": str(out)}})


def _flow_ensemble(out, train_steps: int, n_steps: int):  # type: ignore[no-untyped-def]
    from hpcflow.flows.build import build_model
    from hpcflow.flows.train import Trainer
    from hpcflow.lattice.geometry import Lattice

    cfg = _cfg(out, train_steps, n_steps)
    lat = Lattice(cfg.lattice.shape)
    torch.manual_seed(SEED)
    Trainer(build_model(cfg, lat), lat, cfg.action.beta, cfg.train, cfg.output.dir, seed=cfg.seed,
            progress=False).train()
    assert sample(cfg, use_mpi=False) == EXIT_OK
    return cfg, ensemble_dir(cfg)


def _independent(cfg, root: str) -> dict[str, tuple[float, float]]:  # type: ignore[no-untyped-def]
    """Independent references from fresh proposals y ~ q of the same model: the acceptance
    E_{x~p} E_{y~q} min(1, w(y)/w(x)) (x = the chain's states, their stored log w; error by the
    Gamma method over the x series), the p-means of log q and log w by reweighting the
    proposals (<w f>/<w>, iid: S = 0), and the ESS per proposal (sum w)^2 / (N sum w^2)."""
    from hpcflow.flows.u1 import links_from_angles
    from hpcflow.lattice.action import wilson_action
    from hpcflow.lattice.geometry import Lattice
    from hpcflow.lattice.observables import polyakov_loop
    from hpcflow.run.sample import load_model

    lat = Lattice(cfg.lattice.shape)
    model, _ = load_model(cfg, lat)
    torch.manual_seed(SEED + 1)
    with torch.no_grad():
        lq_y, lw_y, pol_y = [], [], []
        for _ in range(8):
            x, log_q = model.sample(512)
            U = links_from_angles(x).to(torch.complex128)
            S = wilson_action(U, lat, BETA)
            lq_y.append(log_q.double().numpy())
            lw_y.append((-S.double() - log_q.double()).numpy())
            pol_y.append(polyakov_loop(U, lat).abs().double().numpy())
    lq, lw, pol = np.concatenate(lq_y), np.concatenate(lw_y), np.concatenate(pol_y)
    lw_x = open_ensemble(root).records(0)["log_w"]
    f = np.minimum(1.0, np.exp(lw[None, :] - lw_x[:, None])).mean(axis=1)
    g = gamma_method(f)
    out = {"acceptance": (g.mean, g.error)}
    for name, v in (("log_q", lq), ("log_w", lw), ("polyakov_abs", pol)):
        r = reweighted_gamma(v, lw, S=0)
        out[name] = (r.mean, r.error)
    w = np.exp(lw - lw.max())
    e = gamma_method_derived([w, w * w], lambda a, b: a * a / b, S=0)
    out["proposal_ess"] = (e.mean, e.error)
    return out


def _check(printed: dict, want: dict[str, tuple[float, float]], n_rows: int) -> None:
    entries = dict(printed["observables"], proposal_ess=printed["proposal_ess"])
    assert set(entries) == set(want), f"measure prints {set(entries) ^ set(want)}, which this test does not know"
    for key, v in entries.items():
        ref, ref_err = want[key]
        for label, e in [("all", v), *v["chains"].items()]:
            assert e["error"] is not None and e["error"] > 0, (key, label, e)
            assert e["tau_int"] is not None and e["tau_int"] > 0, (key, label, e)
            sigma = np.hypot(e["error"], ref_err)
            assert abs(e["mean"] - ref) < 3 * sigma, (key, label, e, ref, ref_err)
        assert v["chains"]["0"]["mean"] == v["mean"] and v["chains"]["0"]["error"] == v["error"]
    assert printed["observables"]["plaquette"]["n"] == n_rows


@pytest.mark.parametrize("train_steps,n_steps", [(20, 6000), (400, 3000)], ids=["poor", "trained"])
def test_measure_prints_unbiased_numbers(tmp_path, train_steps: int, n_steps: int) -> None:
    cfg, root = _flow_ensemble(tmp_path, train_steps, n_steps)
    plaq = exact.u1_2d_plaquette(BETA, L=L)
    ex = exact.u1_2d_exact(BETA, L=L)
    # the rows' observables (issue 19 item 2): the default Wilson loops, the charge and its
    # square exactly; |Polyakov loop| from the independent proposals
    want = {"plaquette": (plaq, 0.0), "S": (-BETA * L * L * plaq, 0.0), "W_1x1": (ex.wilson_loop(1), 0.0),
            "W_2x2": (ex.wilson_loop(4), 0.0), "Q": (0.0, 0.0), "Q2": (exact.u1_2d_q2(BETA, L=L), 0.0),
            **_independent(cfg, root)}
    for extra, n_rows in (([], n_steps), (["--skip", "500", "--bin", "10"], (n_steps - 500) // 10)):
        r = subprocess.run([sys.executable, "-m", "hpcflow.run.cli", "measure", root, "--json", *extra], cwd=REPO,
                           capture_output=True, text=True, check=False)
        assert r.returncode == 0, r.stderr
        printed = json.loads(r.stdout, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
        skip, bin_size = (500, 10) if extra else (0, 1)
        assert printed == json.loads(json.dumps(measure_ensemble(root, skip=skip, bin_size=bin_size)))
        _check(printed, want, n_rows)
    table = subprocess.run([sys.executable, "-m", "hpcflow.run.cli", "measure", root], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout
    p = printed["observables"]["plaquette"]
    assert "plaquette" in table and "ESS/proposal (est.)" in table
    if train_steps == 20:
        assert printed["observables"]["acceptance"]["mean"] < 0.3  # the model is poor indeed
        assert printed["proposal_ess"]["mean"] < 0.15
    else:
        assert p["tau_int"] < 5 and not printed["warnings"]
