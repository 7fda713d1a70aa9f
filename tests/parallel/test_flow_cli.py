"""`hpcflow run` with a flow on P ranks (the function the CLI calls, under mpirun) trains and
samples the same chain as the one-rank command: every training loss and every measurement
agree to 1e-10, and the accept/reject decisions are identical. The one-rank reference is the
real command line run as a separate (non-MPI) process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
from mpi4py import MPI

from hpcflow.config import load_config, to_yaml
from hpcflow.run.driver import run

WORLD = MPI.COMM_WORLD
SIZE, RANK = WORLD.Get_size(), WORLD.Get_rank()
LAYOUT = {1: ("[1,1]", 1), 2: ("[1,2]", 1), 4: ("[2,1]", 2)}[SIZE]  # (domain grid, replicas)
COMMON = ["lattice.shape=[8,8]", "group=u1", "action.beta=2.0", "algorithm=flow", "seed=5",
          "flow.n_layers=2", "flow.hidden=[4]", "train.steps=3", "train.batch=4",
          "train.checkpoint_every=2", "sample.n_steps=24", "sample.batch=8", "run.progress=false"]


def _lines(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(x) for x in fh if x.strip()]


def _close(a: list[dict], b: list[dict], keys: list[str]) -> bool:
    return len(a) == len(b) > 0 and all(
        abs(x[k] - y[k]) <= 1e-10 * max(1.0, abs(y[k])) for x, y in zip(a, b) for k in keys)


@pytest.mark.mpi
def test_flow_run_on_p_ranks_equals_one_rank_command(collective):
    base = WORLD.bcast(tempfile.mkdtemp(prefix="hpcflow-flowcli-") if RANK == 0 else None)
    grid, replicas = LAYOUT
    try:
        cfg = load_config(None, COMMON + [f"grid={grid}", f"train.replicas={replicas}",
                                          f"output.dir={base}/par"])
        res = run(cfg)
        ok, why = res.exit_code == 0, f"exit code {res.exit_code}"
        if RANK == 0 and ok:
            env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_", "PMI_"))}
            exe = os.path.join(os.path.dirname(sys.executable), "hpcflow")
            with open(f"{base}/ser.yaml", "w", encoding="utf-8") as fh:
                fh.write(to_yaml(load_config(None, COMMON + [f"output.dir={base}/ser"])))
            args = [exe, "run", f"{base}/ser.yaml"]
            r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
            ok, why = r.returncode == 0, f"one-rank command failed: {r.stderr[-500:]}"
            if ok:
                hp, hs = _lines(f"{base}/par/history.jsonl"), _lines(f"{base}/ser/history.jsonl")
                mp = _lines(f"{base}/par/train/metrics.jsonl")
                ms = _lines(f"{base}/ser/train/metrics.jsonl")
                ok = (_close(hp, hs, ["plaquette", "Q", "S", "logq", "logw", "accepted"])
                      and [x["accepted"] for x in hp] == [x["accepted"] for x in hs]
                      and _close(mp, ms, ["loss", "ess"]))
                why = f"P={SIZE} ({grid} x {replicas} replicas) differs from one rank"
        collective(ok, why)
    finally:
        WORLD.Barrier()
        if RANK == 0:
            shutil.rmtree(base, ignore_errors=True)
