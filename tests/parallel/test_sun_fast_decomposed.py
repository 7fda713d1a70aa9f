"""The 4D SU(3) flow on the host kernels (``backend: host``, kernels/flow_sun.cpp) decomposed
over ranks equals the same flow on the global lattice (float64, to 1e-10).

On a process grid the local arrays carry halos, so the layers run one by one on the padded
arrays (the host kernels wrap periodically like the torch path's circular padding and
``Lattice.shift``), with a halo exchange before each; on one rank the fused walk runs all
layers as one node. Proposals, ``log q``, the action, the reverse-KL loss and every
parameter's gradient agree, with and without per-layer checkpointing; the host-kernel action
and clover charge of the decomposed field (interior sums + ``comm.sum``) equal the global ones.
"""

from __future__ import annotations

import pytest
import torch
from mpi4py import MPI

from hpcflow.comm import LatticeComm, ProcessGrid, local_from_global
from hpcflow.config import FlowConfig
from hpcflow.flows.build import build_flow
from hpcflow.flows.distributed import DistributedFlow, sum_gradients
from hpcflow.lattice.geometry import Lattice
from hpcflow.rng import CounterRNG
from hpcflow.sampling.flow_chains import FLOW_STREAM

SIZE = MPI.COMM_WORLD.Get_size()
TOL = 1e-10
# local extents 4 on the split axes: the halo of a layer with one hidden layer is 3
SHAPE = {1: (4, 4, 4, 4), 2: (4, 4, 4, 8), 4: (4, 4, 8, 8)}[SIZE]
GRID = {1: (1, 1, 1, 1), 2: (1, 1, 1, 2), 4: (1, 1, 2, 2)}[SIZE]


def _flow(hidden) -> torch.nn.Module:
    cfg = FlowConfig(n_layers=3, hidden=hidden, kernel_size=3, kernel="ncp", n_components=2)
    torch.manual_seed(11)
    flow = build_flow(cfg, Lattice(SHAPE, backend="host"), "su3")
    with torch.no_grad():
        for p in flow.parameters():
            fan = p[0].numel() if p.dim() > 1 else 1
            p.copy_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) / fan**0.5)
    return flow


def _loss_and_grads(model: DistributedFlow, beta: float, sum_fn=None):
    model.zero_grad()
    x, logq = model.sample_counter(CounterRNG(5, FLOW_STREAM), 3, 2)
    s = model.action(x, beta)
    loss = (logq + s).mean()
    loss.backward()
    if sum_fn is not None:
        sum_gradients(model.parameters(), sum_fn)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return x.detach(), logq.detach(), s.detach(), loss.detach(), grads


@pytest.mark.mpi
@pytest.mark.parametrize("hidden", [(), (4,)])
def test_host_su3_flow_decomposed_equals_global(hidden, collective):
    flow = _flow(hidden)
    ref = DistributedFlow(flow)  # one rank, no halos: the fused walk
    xr, lqr, sr, loss_r, g_ref = _loss_and_grads(ref, 5.0)
    with torch.no_grad():
        obs_r = ref.observables(xr)
    bad: list[str] = []

    def check(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        err = float((a - b).abs().max())
        if not err <= TOL * max(1.0, float(b.abs().max())):
            bad.append(f"{name} off by {err:.3g}")

    lc = LatticeComm(ProcessGrid(SHAPE, GRID))
    for ckpt in (False, True):
        model = DistributedFlow(flow, lc, checkpoint_layers=ckpt)
        x, logq, s, loss, grads = _loss_and_grads(model, 5.0, lc.sum)
        check("x (halos included)", x, local_from_global(xr, model.lat, 2))
        check("log q", logq, lqr)
        check("S", s, sr)
        check("loss", loss, loss_r)
        for n in g_ref:
            check(f"grad {n} (checkpoint_layers={ckpt})", grads[n], g_ref[n])
        with torch.no_grad():
            obs = model.observables(x)
        check("plaquette", obs["plaquette"], obs_r["plaquette"])
        check("Q", obs["Q"], obs_r["Q"])
    collective(not bad, f"host SU(3) flow on grid {GRID}, hidden {hidden}: {bad}")
