"""Hybrid parallel training (replicas x domain grid) of a U(1) 8x8 flow.

Layout by rank count: 1 = 1 x (1,1); 2 = 2 replicas x (1,1); 4 = 2 replicas x (1,2) domains.
Proves: (1) the summed gradient of one training step equals the single-rank gradient on the
full batch (float64, 1e-10), identically on every rank; (2) a run stopped after 2 of 4 steps
and resumed from its checkpoint ends with bitwise the same parameters and the same losses as
the uninterrupted run. Counter-RNG batches make both independent of the layout.
"""

from __future__ import annotations

import shutil
import tempfile

import pytest
import torch
from mpi4py import MPI

from hpcflow.comm.hybrid import HybridGrid
from hpcflow.config import FlowConfig, TrainConfig
from hpcflow.flows.build import build_flow
from hpcflow.flows.distributed import DistributedFlow
from hpcflow.flows.distributed_train import DistributedTrainer
from hpcflow.lattice.geometry import Lattice

SIZE = MPI.COMM_WORLD.Get_size()
GS = (8, 8)
REPLICAS, GRID = {1: (1, (1, 1)), 2: (2, (1, 1)), 4: (2, (1, 2))}[SIZE]
BETA = 1.0


def _flow() -> torch.nn.Module:
    torch.manual_seed(3)
    return build_flow(FlowConfig(n_layers=2, hidden=(3,), kernel_size=3), Lattice(GS), "u1")


def _cfg(steps: int = 4) -> TrainConfig:
    return TrainConfig(steps=steps, batch=4, lr=1e-2, schedule="cosine", grad_clip=10.0,
                       checkpoint_every=1, log_every=1)


def _shared_tmpdir() -> str:
    d = tempfile.mkdtemp(prefix="hpcflow-hybrid-") if MPI.COMM_WORLD.Get_rank() == 0 else None
    return MPI.COMM_WORLD.bcast(d, root=0)


def _trainer(out: str, hybrid: HybridGrid | None) -> DistributedTrainer:
    model = DistributedFlow(_flow(), None if hybrid is None else hybrid.domain)
    return DistributedTrainer(model, BETA, _cfg(), out, hybrid=hybrid, seed=17, progress=False)


@pytest.mark.mpi
def test_hybrid_gradient_equals_single_rank_full_batch(collective):
    """replicas x domains: summed gradient == one rank's gradient on the whole batch."""
    out = _shared_tmpdir()
    try:
        one = _trainer(out + "/one", None)
        loss1, _, _ = one.compute_gradients()
        g1 = torch.cat([p.grad.reshape(-1) for p in one.model.parameters()])
        hy = HybridGrid(GS, REPLICAS, GRID)
        tr = _trainer(out + "/hy", hy)
        local, _, _ = tr.compute_gradients()
        g = torch.cat([p.grad.reshape(-1) for p in tr.model.parameters()])
        loss = float(hy.sum_replicas(local.detach().reshape(1))[0])
        ok = torch.allclose(g, g1, rtol=0, atol=1e-10) and abs(loss - float(loss1.detach())) < 1e-10
        ok = ok and float(g1.abs().sum()) > 0
        same = MPI.COMM_WORLD.allgather(g.numpy().tobytes())
        ok = ok and len(set(same)) == 1  # replicated parameters stay bitwise identical
        err = float((g - g1).abs().max())
        collective(ok, f"{REPLICAS} replicas x grid {GRID}: gradient off by {err:.3g}")
        hy.free()
    finally:
        MPI.COMM_WORLD.Barrier()
        if MPI.COMM_WORLD.Get_rank() == 0:
            shutil.rmtree(out, ignore_errors=True)


@pytest.mark.mpi
def test_hybrid_training_stop_and_resume_equals_uninterrupted(collective):
    """4 steps in one go == 2 steps, stop, resume from the checkpoint, 2 more steps."""
    out = _shared_tmpdir()
    try:
        hy = HybridGrid(GS, REPLICAS, GRID)
        full = _trainer(out + "/full", hy)
        rows_full = full.train()
        part = _trainer(out + "/part", hy)
        part.train(stop_at=2)
        assert part.step == 2
        again = _trainer(out + "/part", hy)
        rows = again.train(resume=True)
        ok = again.step == full.step == 4
        ok = ok and all(torch.equal(a, b) for a, b in zip(again.model.parameters(), full.model.parameters()))
        ok = ok and [r["loss"] for r in rows] == [r["loss"] for r in rows_full]
        ok = ok and len({r["loss"] for r in rows_full}) == 4  # the model changed every step
        collective(ok, f"resume on {REPLICAS} replicas x grid {GRID}: losses "
                       f"{[r['loss'] for r in rows]} vs {[r['loss'] for r in rows_full]}")
        hy.free()
    finally:
        MPI.COMM_WORLD.Barrier()
        if MPI.COMM_WORLD.Get_rank() == 0:
            shutil.rmtree(out, ignore_errors=True)
