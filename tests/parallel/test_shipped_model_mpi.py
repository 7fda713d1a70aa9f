"""A shipped model (``flow.model: u1-L16-b1``) sampled by one worker group spanning all P
ranks (the 16x16 lattice decomposed on a process grid) gives the one-rank chain: the same
accept/reject decisions, configurations to 1e-12 and S, log q, log w, plaquette to 1e-10
(float64; the model's float32 weights are exact in float64), and every rank records the model's
sha256. The reference is the same config's chain 0 run alone on each rank without MPI."""

from __future__ import annotations

import shutil
import tempfile

import numpy as np
import pytest
import torch
from mpi4py import MPI

from hpcflow.backend import run_backend
from hpcflow.config import config_from_dict
from hpcflow.io.ensemble import open_ensemble
from hpcflow.lattice.geometry import Lattice, SerialComm
from hpcflow.models import resolve_model
from hpcflow.run.sample import EXIT_OK, chain_of_config, ensemble_dir, sample
from hpcflow.signals import StopFlag

WORLD = MPI.COMM_WORLD
SIZE, RANK = WORLD.Get_size(), WORLD.Get_rank()
GRID = {1: [1, 1], 2: [2, 1], 4: [2, 2]}.get(SIZE, [SIZE, 1])


def _cfg(out: str):  # type: ignore[no-untyped-def]
    return config_from_dict({"flow": {"model": "u1-L16-b1"}, "precision": "float64", "seed": 8, "grid": GRID,
                             "sample": {"n_steps": 12, "batch": 4, "checkpoint_every": 5},
                             "run": {"progress": False}, "output": {"dir": out}})


def _chain(root: str) -> tuple[dict, list[torch.Tensor]]:
    ens = open_ensemble(root)
    return ens.records(0), [U for _, U in ens.iter_configs(0)]


@pytest.mark.mpi
def test_shipped_model_decomposed_sampling_equals_one_rank(collective) -> None:
    base = WORLD.bcast(tempfile.mkdtemp(prefix="hpcflow-shipped-") if RANK == 0 else None)
    try:
        cfg = _cfg(f"{base}/par")
        code = sample(cfg, use_mpi=True)
        ok, why = code == EXIT_OK, f"exit {code}"
        if ok and RANK == 0:
            ref_cfg = _cfg(f"{base}/ser")
            lat = Lattice(ref_cfg.lattice.shape, backend=run_backend(ref_cfg))
            assert chain_of_config(ref_cfg, 0, SerialComm(), lat, StopFlag()).run() == EXIT_OK
            (ra, ua), (rb, ub) = _chain(ensemble_dir(cfg)), _chain(ensemble_dir(ref_cfg))
            attrs = open_ensemble(ensemble_dir(cfg)).attrs
            if len(ua) != len(ub) or len(ua) != 12:
                ok, why = False, f"{len(ua)} vs {len(ub)} configurations"
            elif not np.array_equal(ra["accepted"], rb["accepted"]) or not 0 < ra["accepted"].sum() < 12:
                ok, why = False, f"accepted {ra['accepted']} vs {rb['accepted']} (want both outcomes)"
            elif not all(torch.allclose(x, y, rtol=0, atol=1e-12) for x, y in zip(ua, ub)):
                ok, why = False, "configurations differ beyond 1e-12"
            elif not all(np.allclose(ra[k], rb[k], rtol=1e-10, atol=1e-10)
                         for k in ("S", "log_q", "log_w", "plaquette")):
                ok, why = False, "S / log q / log w / plaquette differ beyond 1e-10"
            elif attrs["model_sha256"] != resolve_model("u1-L16-b1").sha256 or int(attrs["ranks_per_chain"]) != SIZE:
                ok, why = False, f"attributes {attrs['model_sha256']!r}, ranks_per_chain {attrs['ranks_per_chain']}"
        ok = WORLD.bcast(ok)
        why = WORLD.bcast(why)
        collective(ok, f"shipped model on grid {GRID}: {why}")
    finally:
        WORLD.Barrier()
        if RANK == 0:
            shutil.rmtree(base, ignore_errors=True)
