"""Decomposition-independent Markov chains: a heat-bath(+overrelaxation) chain of 20 sweeps
and an HMC chain of 10 trajectories give the same plaquette history (to 1e-10 in float64),
the same accept/reject decisions and the same final field on the current number of ranks
(1, 2 or 4) as on one rank. Random numbers are CounterRNG draws keyed by the global link
index and the update step, so they do not depend on which rank owns a link; the reference
chain runs on the global lattice (SerialComm) on every rank."""

from __future__ import annotations

import pytest
import torch
from mpi4py import MPI

from hpcflow.comm import LatticeComm, ProcessGrid, local_from_global
from hpcflow.lattice.action import average_plaquette
from hpcflow.lattice.geometry import Lattice, SerialComm
from hpcflow.lattice.groups import get_group, random_field
from hpcflow.rng import CounterRNG
from hpcflow.sampling.heatbath import heatbath_or_sweep
from hpcflow.sampling.hmc import HMC

SIZE = MPI.COMM_WORLD.Get_size()
HB = {  # (group, beta, global shape, grid)
    1: [("u1", 1.5, (8, 8), (1, 1)), ("su2", 2.3, (4, 4, 4, 4), (1, 1, 1, 1))],
    2: [("u1", 1.5, (8, 8), (2, 1)), ("su2", 2.3, (4, 4, 4, 4), (1, 1, 1, 2))],
    4: [("u1", 1.5, (8, 8), (2, 2)), ("su2", 2.3, (4, 4, 4, 4), (1, 1, 2, 2))],
}[SIZE]
HMC_CASE = {1: (1, 1, 1, 1), 2: (2, 1, 1, 1), 4: (2, 1, 1, 2)}[SIZE]


def _run_heatbath(group, beta, lat, comm, n_sweeps=20):
    rng = CounterRNG(99, stream=1)
    U = comm.exchange(random_field(lat, group, rng, 0), lat)
    hist = []
    for s in range(1, n_sweeps + 1):
        U = heatbath_or_sweep(U, lat, group, beta, rng, s, n_or=1, comm=comm)
        U = comm.exchange(U, lat)
        hist.append(float(average_plaquette(U, lat, comm)))
    return torch.tensor(hist, dtype=torch.float64), U


@pytest.mark.mpi
@pytest.mark.parametrize("gname, beta, gs, grid", HB, ids=[c[0] for c in HB])
def test_heatbath_chain_is_decomposition_independent(gname, beta, gs, grid, collective):
    group = get_group(gname)
    glat = Lattice(gs)
    ref, Uref = _run_heatbath(group, beta, glat, SerialComm())
    lc = LatticeComm(ProcessGrid(gs, grid))
    lat = lc.local_lattice(halo=1)
    hist, U = _run_heatbath(group, beta, lat, lc)
    ok = torch.allclose(hist, ref, rtol=0, atol=1e-10)
    ok = ok and torch.allclose(U, local_from_global(Uref, lat, 2), rtol=0, atol=1e-10)
    ok = ok and float(ref.std()) > 0  # the chain moved
    collective(ok, f"heat-bath history on grid {grid}")


def _run_hmc(lat, comm, n_traj=10):
    group = get_group("su3")
    rng = CounterRNG(7, stream=2)
    hmc = HMC(lat, group, beta=5.7, n_steps=4, tau=0.5, integrator="omelyan", rng=rng, comm=comm)
    U = comm.exchange(random_field(lat, group, rng, 0), lat)
    hist, accs, dhs = [], [], []
    for s in range(1, n_traj + 1):
        U, acc, dH = hmc.trajectory(U, s)
        U = comm.exchange(U, lat)
        hist.append(float(average_plaquette(U, lat, comm)))
        accs.append(bool(acc))
        dhs.append(float(dH))
    return torch.tensor(hist, dtype=torch.float64), accs, torch.tensor(dhs), U


@pytest.mark.mpi
def test_hmc_chain_is_decomposition_independent(collective):
    gs = (4, 4, 4, 4)
    ref, acc_ref, dh_ref, Uref = _run_hmc(Lattice(gs), SerialComm())
    lc = LatticeComm(ProcessGrid(gs, HMC_CASE))
    lat = lc.local_lattice(halo=1)
    hist, accs, dhs, U = _run_hmc(lat, lc)
    ok = torch.allclose(hist, ref, rtol=0, atol=1e-10) and accs == acc_ref
    ok = ok and torch.allclose(dhs, dh_ref, rtol=0, atol=1e-8)
    ok = ok and torch.allclose(U, local_from_global(Uref, lat, 2), rtol=0, atol=1e-10)
    ok = ok and any(acc_ref) and float(ref.std()) > 0  # the chain moved
    collective(ok, f"HMC history on grid {HMC_CASE}: acc {accs} vs {acc_ref}")
