"""The stored per-configuration observables of a 2D U(1) ensemble against the exact
finite-volume values (hpcflow.analysis.exact): <Q^2> and Wilson loops."""

from __future__ import annotations

import numpy as np

from hpcflow.analysis import gamma_method
from hpcflow.analysis.exact import u1_2d_exact
from hpcflow.config import config_from_dict
from hpcflow.io import open_ensemble
from hpcflow.run.sample import EXIT_OK, ensemble_dir, sample


def test_u1_rows_reproduce_exact_q2_and_wilson_loops(tmp_path) -> None:
    cfg = config_from_dict({
        "lattice": {"shape": [8, 8]}, "group": "u1", "algorithm": "heatbath", "seed": 11,
        "action": {"beta": 1.5}, "heatbath": {"n_overrelax": 1},
        "run": {"n_therm": 100, "n_steps": 3000, "progress": False, "plots": False},
        "sample": {"checkpoint_every": 1000},
        "measure": {"wilson_loops": [[1, 1], [2, 2], [1, 3]]},
        "output": {"dir": str(tmp_path)}})
    assert sample(cfg, use_mpi=False) == EXIT_OK
    rec = open_ensemble(ensemble_dir(cfg)).records(0)
    ex = u1_2d_exact(1.5, volume=64)
    for name, want in (("Q2", ex.q2), ("W_1x1", ex.wilson_loop(1)), ("W_2x2", ex.wilson_loop(4)),
                       ("W_1x3", ex.wilson_loop(3))):
        g = gamma_method(np.asarray(rec[name], dtype=np.float64))
        assert abs(g.mean - want) < 4 * g.error, (name, g.mean, g.error, want)
