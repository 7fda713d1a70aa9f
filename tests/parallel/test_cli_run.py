"""`hpcflow run` on P ranks (the function the CLI calls, launched under mpirun) writes the
same measurement history as the one-rank run: heat bath + overrelaxation and HMC for 4D
SU(3) on process grids that split the time direction. Histories agree to 1e-10."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import pytest
from mpi4py import MPI

from hpcflow.config import load_config
from hpcflow.lattice.geometry import SerialComm
from hpcflow.run.driver import run, run_baseline

WORLD = MPI.COMM_WORLD
SIZE, RANK = WORLD.Get_size(), WORLD.Get_rank()
GRID = {1: "[1,1,1,1]", 2: "[1,1,1,2]", 4: "[1,1,2,2]"}[SIZE]
ALGOS = {
    "heatbath": ["algorithm=heatbath", "heatbath.n_overrelax=1"],
    "hmc": ["algorithm=hmc", "hmc.n_steps=4", "hmc.tau=0.5"],
}


def _history(d: str) -> list[dict]:
    with open(os.path.join(d, "history.jsonl"), encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


@pytest.mark.mpi
@pytest.mark.parametrize("algo", list(ALGOS))
def test_run_on_p_ranks_equals_one_rank(algo, collective):
    base = WORLD.bcast(tempfile.mkdtemp(prefix="hpcflow-cli-") if RANK == 0 else None)
    common = [
        "lattice.shape=[4,4,4,4]", "group=su3", "action.beta=5.8", "seed=11",
        "run.n_therm=0", "run.n_steps=4", "run.measure_every=1", "run.progress=false",
        "measure.flow_time=0.0", "measure.wilson_loops=[[1,1],[1,2]]",
    ] + ALGOS[algo]
    try:
        cfg = load_config(None, common + [f"grid={GRID}", f"output.dir={base}/par"])
        res = run(cfg)
        ok, why = res.exit_code == 0, f"exit code {res.exit_code}"
        if RANK == 0 and ok:
            ref_cfg = load_config(None, common + [f"output.dir={base}/ser"])
            run_baseline(ref_cfg, comm=SerialComm())
            par, ser = _history(f"{base}/par"), _history(f"{base}/ser")
            keys = [k for k in ser[0] if k not in ("time",) and isinstance(ser[0][k], (int, float))]
            ok = len(par) == len(ser) == 4 and all(
                abs(p[k] - s[k]) <= 1e-10 * max(1.0, abs(s[k])) for p, s in zip(par, ser) for k in keys
            )
            why = f"histories differ: {par} vs {ser}"
        collective(ok, f"{algo} on {SIZE} ranks: {why}")
    finally:
        WORLD.Barrier()
        if RANK == 0:
            shutil.rmtree(base, ignore_errors=True)
