"""Fault injection: a 2-rank sampling run is SIGKILLed at random moments, then resumed.

What is proven (crash rule, ARCHITECTURE.md): after each SIGKILL of the whole ``mpirun``
job (ranks included), at random moments, most of them while a segment is open for
parallel HDF5 writing, every committed file opens and reads, the committed count never
decreases, no configuration checksum appears twice, and the final ensemble equals the
uninterrupted reference run (same seed, same 2-rank grid) configuration for
configuration, bit for bit. Runs in the serial pytest tier; it launches ``mpirun -n 2``.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml

from hpcflow.io.ensemble import open_ensemble

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
N_KILLS = 5


def _cfg(out: str) -> dict:
    return {"lattice": {"shape": [16, 16]}, "group": "u1", "algorithm": "heatbath", "seed": 2024,
            "action": {"beta": 2.0}, "grid": [2, 1], "heatbath": {"n_overrelax": 1},
            "run": {"n_therm": 2, "n_steps": 60, "measure_every": 1},
            "sample": {"checkpoint_every": 3}, "output": {"dir": out}}


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO, "OMPI_ALLOW_RUN_AS_ROOT": "1",
            "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMPI_MCA_rmaps_base_oversubscribe": "1"}


def _cmd(cfg_path: str) -> list[str]:
    return ["mpirun", "--oversubscribe", "-n", "2", sys.executable, "-m", "hpcflow.sampling.production",
            cfg_path]


def _write_cfg(d: str) -> str:
    os.makedirs(d, exist_ok=True)
    p = os.path.join(d, "run.yaml")
    with open(p, "w") as fh:
        yaml.safe_dump(_cfg(os.path.join(d, "out")), fh)
    return p


def _read_all(root: str) -> tuple[dict, list[torch.Tensor]]:
    ens = open_ensemble(root)  # opens every committed segment
    return ens.records(0), [U for _, U in ens.iter_configs(0)]


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not installed (scripts/bootstrap.sh)")
def test_sigkill_at_random_moments_then_resume(tmp_path) -> None:
    rng = random.Random(12345)
    ref_cfg = _write_cfg(str(tmp_path / "ref"))
    r = subprocess.run(_cmd(ref_cfg), env=_env(), cwd=REPO, capture_output=True, text=True, timeout=170,
                       check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    ref = _read_all(str(tmp_path / "ref" / "out" / "ensemble"))
    assert len(ref[0]["step"]) == 60

    cfg = _write_cfg(str(tmp_path / "run"))
    root = str(tmp_path / "run" / "out" / "ensemble")
    chain_dir = os.path.join(root, "chain000")
    last, during_write = 0, 0
    for _ in range(N_KILLS):
        p = subprocess.Popen(_cmd(cfg), env=_env(), cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
        t0 = time.time()
        # wait until the chain is past start-up (a segment is open), then a random delay
        while p.poll() is None and time.time() - t0 < 60:
            if os.path.isdir(chain_dir) and any(n.endswith(".tmp") for n in os.listdir(chain_dir)):
                break
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 1.0))
        if p.poll() is None:
            during_write += any(n.endswith(".tmp") for n in os.listdir(chain_dir))
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
        time.sleep(0.2)  # let the killed ranks go
        recs, Us = _read_all(root)
        n = len(recs["step"])
        assert n >= last, f"committed count decreased from {last} to {n}"
        assert len(set(recs["checksum"].tolist())) == n, "a configuration was committed twice"
        assert list(recs["step"]) == list(range(3, 3 + n))
        last = n
    assert during_write >= 1, "no kill landed while a segment was being written"
    r = subprocess.run(_cmd(cfg), env=_env(), cwd=REPO, capture_output=True, text=True, timeout=170,
                       check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    recs, Us = _read_all(root)
    for k in ref[0]:
        np.testing.assert_array_equal(recs[k], ref[0][k], err_msg=k)
    assert len(Us) == len(ref[1]) and all(torch.equal(a, b) for a, b in zip(Us, ref[1]))
