"""Every number `hpcflow measure` prints, on flow ensembles, against an exact or independent value.

Regression for issue 19: `measure` used to reweight the accepted chain states by their
importance weights. Chain states of an exact independence-Metropolis chain are already
distributed as p, so that 'plaquette_reweighted' was biased (7.9 sigma on the demo's
ensemble); with a deliberately poor model the bias is large. The point (2D U(1), 4x4,
beta = 1.5) is used nowhere else in the tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from hpcflow.analysis import exact, gamma_method
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


def _independent_acceptance(cfg, root: str) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """E_{x~p} E_{y~q} min(1, w(y)/w(x)): x = the chain's states (their stored log w),
    y = fresh proposals of the same model; error by the Gamma method over the x series."""
    from hpcflow.flows.u1 import links_from_angles
    from hpcflow.lattice.action import wilson_action
    from hpcflow.lattice.geometry import Lattice
    from hpcflow.run.sample import load_model

    lat = Lattice(cfg.lattice.shape)
    model, _ = load_model(cfg, lat)
    torch.manual_seed(SEED + 1)
    with torch.no_grad():
        lw_y = []
        for _ in range(8):
            x, log_q = model.sample(512)
            S = wilson_action(links_from_angles(x).to(torch.complex128), lat, BETA)
            lw_y.append((-S.double() - log_q.double()).numpy())
    lw_y = np.concatenate(lw_y)
    lw_x = open_ensemble(root).records(0)["log_w"]
    f = np.minimum(1.0, np.exp(lw_y[None, :] - lw_x[:, None])).mean(axis=1)
    g = gamma_method(f)
    return g.mean, g.error


@pytest.mark.parametrize("train_steps,n_steps", [(20, 6000), (400, 3000)], ids=["poor", "trained"])
def test_measure_prints_unbiased_numbers(tmp_path, train_steps: int, n_steps: int) -> None:
    cfg, root = _flow_ensemble(tmp_path, train_steps, n_steps)
    plaq = exact.u1_2d_plaquette(BETA, L=L)
    want = {"plaquette": plaq, "S": -BETA * L * L * plaq}
    r = subprocess.run([sys.executable, "-m", "hpcflow.run.cli", "measure", root], cwd=REPO,
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    printed = json.loads(r.stdout, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert printed == json.loads(json.dumps(measure_ensemble(root)))
    acc, acc_err = _independent_acceptance(cfg, root)
    for key, v in printed.items():
        assert v["error"] is not None and v["error"] > 0, (key, v)
        if key == "acceptance":
            ref, ref_err = acc, acc_err
        else:
            base = key.split("_")[0]
            assert base in want, f"measure prints {key!r}, which this test does not know"
            ref, ref_err = want[base], 0.0
        sigma = np.hypot(v["error"], ref_err)
        assert abs(v["mean"] - ref) < 3 * sigma, (key, v, ref, ref_err)
    if train_steps == 20:
        assert printed["acceptance"]["mean"] < 0.3  # the model is poor indeed
