"""Host-kernel HMC (kernels/md_host.py) on a decomposed lattice equals the single-rank run to
1e-12: two Omelyan/leapfrog trajectories of 4D SU(3) and SU(2) (fields, dH, accept
decisions, counters), and the host Wilson flow. Every rank builds the same global field
(CounterRNG), runs the single-rank reference on the global lattice and the decomposed run
on its halo-padded local array (halos poisoned before the first exchange)."""

from __future__ import annotations

import pytest
import torch
from mpi4py import MPI

from hpcflow.comm import LatticeComm, ProcessGrid, local_from_global
from hpcflow.kernels import md_host
from hpcflow.lattice.geometry import Lattice, SerialComm
from hpcflow.lattice.groups import get_group, random_field
from hpcflow.rng import CounterRNG
from hpcflow.sampling import hmc as hmc_mod
from hpcflow.sampling.hmc import HMC

SIZE = MPI.COMM_WORLD.Get_size()
TOL = 1e-12

CASES = {  # (group, integrator, global shape, grid)
    1: [("su3", "omelyan", (4, 4, 4, 4), (1, 1, 1, 1)), ("su2", "leapfrog", (4, 4, 4, 4), (1, 1, 1, 1))],
    2: [("su3", "omelyan", (4, 4, 4, 4), (1, 1, 1, 2)), ("su2", "leapfrog", (4, 4, 4, 4), (2, 1, 1, 1))],
    4: [("su3", "omelyan", (4, 4, 4, 4), (1, 1, 2, 2)), ("su2", "leapfrog", (4, 4, 4, 4), (2, 1, 1, 2))],
}[SIZE]
IDS = [f"{g}-{i}-grid{''.join(map(str, p))}" for g, i, _, p in CASES]
BETA = {"su2": 2.3, "su3": 5.7}


def _chain(lat, group, gname, integrator, comm, U, n_traj=2):  # type: ignore[no-untyped-def]
    hmc = HMC(lat, group, beta=BETA[gname], n_steps=4, tau=0.5, integrator=integrator,
              rng=CounterRNG(13, stream=2), comm=comm)
    accs, dhs = [], []
    for s in range(1, n_traj + 1):
        U, acc, dH = hmc_mod.hmc_trajectory_host(hmc, U, s)
        U = comm.exchange(U, lat)
        accs.append(bool(acc))
        dhs.append(float(dH))
    return U, accs, torch.tensor(dhs, dtype=torch.float64), (hmc.n_trajectories, hmc.n_accepted)


@pytest.mark.mpi
@pytest.mark.parametrize("gname, integrator, gs, grid", CASES, ids=IDS)
def test_host_hmc_is_decomposition_independent(gname, integrator, gs, grid, collective):
    group = get_group(gname)
    glat = Lattice(gs)
    U = random_field(glat, group, CounterRNG(2024, stream=3), 0)
    Uref, acc_ref, dh_ref, cnt_ref = _chain(glat, group, gname, integrator, SerialComm(), U)
    lc = LatticeComm(ProcessGrid(gs, grid))
    lat = lc.local_lattice(halo=1)
    loc = local_from_global(U, lat, 2).clone()
    loc[:, ~lat.interior()] = 7.0  # garbage in the halos: the exchange must overwrite it
    Ul, accs, dhs, cnt = _chain(lat, group, gname, integrator, lc, lc.exchange(loc, lat))
    inner = lat.interior_slices(2)
    err = float((Ul[inner] - local_from_global(Uref, lat, 2)[inner]).abs().max())
    H = 6 * BETA[gname] * glat.volume  # |H| scale: dH is a difference of two O(H) sums
    ok = err <= TOL and accs == acc_ref and cnt == cnt_ref
    ok = ok and bool(torch.allclose(dhs, dh_ref, rtol=0, atol=TOL * H))
    collective(ok, f"host HMC on grid {grid}: |dU| {err:.3g}, acc {accs} vs {acc_ref}, "
                   f"dH {dhs.tolist()} vs {dh_ref.tolist()}")


@pytest.mark.mpi
def test_host_wilson_flow_is_decomposition_independent(collective):
    gname, _, gs, grid = CASES[0]
    group = get_group(gname)
    glat = Lattice(gs)
    U = random_field(glat, group, CounterRNG(2024, stream=5), 0)
    ref = md_host.wilson_flow_host(U, glat, 0.02, 4)
    lc = LatticeComm(ProcessGrid(gs, grid))
    lat = lc.local_lattice(halo=1)
    W = md_host.wilson_flow_host(lc.exchange(local_from_global(U, lat, 2), lat), lat, 0.02, 4, lc)
    inner = lat.interior_slices(2)
    err = float((W[inner] - local_from_global(ref, lat, 2)[inner]).abs().max())
    collective(err <= TOL, f"host Wilson flow on grid {grid}: max |dW| {err:.3g}")
