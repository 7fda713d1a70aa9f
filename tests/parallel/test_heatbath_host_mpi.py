"""Host heat bath + overrelaxation (kernels/heatbath_host.cpp) on a decomposed lattice equals
the single-rank host chain to 1e-12 on 1, 2 and 4 ranks (4D SU(2), batched and not): the
draws are keyed by the global link index, the sweeps exchange halos before every sub-step,
and only interior links change. The reference runs on the global lattice (SerialComm) on
every rank; a check against the torch sweep on the global lattice closes the loop."""

from __future__ import annotations

import pytest
import torch
from mpi4py import MPI

from hpcflow.comm import LatticeComm, ProcessGrid, local_from_global
from hpcflow.kernels.heatbath_host import heatbath_or_sweep_host
from hpcflow.lattice.action import average_plaquette
from hpcflow.lattice.geometry import Lattice, SerialComm
from hpcflow.lattice.groups import get_group, random_field
from hpcflow.rng import CounterRNG
from hpcflow.sampling.heatbath import heatbath_or_sweep

SIZE = MPI.COMM_WORLD.Get_size()
TOL = 1e-12
CASES = {  # (global shape, grid, batch)
    1: [((4, 4, 4, 4), (1, 1, 1, 1), ()), ((4, 4, 6, 4), (1, 1, 1, 1), (2,))],
    2: [((4, 4, 4, 4), (1, 1, 1, 2), ()), ((4, 4, 6, 4), (2, 1, 1, 1), (2,))],
    4: [((4, 4, 4, 4), (1, 1, 2, 2), ()), ((4, 4, 6, 4), (2, 1, 1, 2), (2,))],
}[SIZE]
IDS = [f"{'x'.join(map(str, s))}-grid{''.join(map(str, g))}-B{len(b)}" for s, g, b in CASES]


def _chain(U, lat, comm, beta=2.3, n_sweeps=3):
    rng = CounterRNG(99, stream=4)
    U = comm.exchange(U, lat)
    hist = []
    for s in range(1, n_sweeps + 1):
        U = heatbath_or_sweep_host(U, lat, beta, rng, s, n_or=1, comm=comm)
        U = comm.exchange(U, lat)
        hist.append(average_plaquette(U, lat, comm))
    return torch.stack(hist), U


@pytest.mark.mpi
@pytest.mark.parametrize("gs, grid, batch", CASES, ids=IDS)
def test_host_heatbath_chain_is_decomposition_independent(gs, grid, batch, collective):
    group = get_group("su2")
    glat = Lattice(gs)
    U0 = random_field(glat, group, CounterRNG(2024, stream=3), 0, batch=batch).contiguous()
    ref, Uref = _chain(U0, glat, SerialComm())
    lc = LatticeComm(ProcessGrid(gs, grid))
    lat = lc.local_lattice(halo=1)
    loc = local_from_global(U0, lat, 2).contiguous()
    loc[..., ~lat.interior(), :, :] = 7.0  # garbage in the halos: the exchanges refill them
    hist, U = _chain(loc, lat, lc)
    inner = lat.interior_slices(2)
    ok = bool(torch.allclose(hist, ref, rtol=0, atol=TOL))
    ok = ok and bool(torch.allclose(U[inner], local_from_global(Uref, lat, 2)[inner], rtol=0,
                                    atol=TOL))
    ok = ok and float(ref.std()) > 0  # the chain moved
    collective(ok, f"host heat-bath chain on grid {grid}")


@pytest.mark.mpi
def test_host_sweep_matches_torch_decomposed(collective):
    """One decomposed host sweep equals the decomposed torch sweep (ordered start, where the
    compound sweep is well conditioned) on every rank's interior."""
    gs, grid, _ = CASES[0]
    group = get_group("su2")
    glat = Lattice(gs)
    gen = torch.Generator().manual_seed(5)
    H = torch.randn(glat.nd, *gs, 2, 2, dtype=torch.complex128, generator=gen)
    H = (H - H.mH) / 2
    H = H - torch.eye(2) * H.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None]
    U0 = torch.linalg.matrix_exp(0.5 * H).contiguous()
    lc = LatticeComm(ProcessGrid(gs, grid))
    lat = lc.local_lattice(halo=1)
    loc = lc.exchange(local_from_global(U0, lat, 2).contiguous(), lat)
    rng = CounterRNG(3, stream=1)
    out = heatbath_or_sweep_host(loc, lat, 2.3, rng, 1, n_or=1, comm=lc)
    ref = heatbath_or_sweep(loc, lat, group, 2.3, rng, 1, n_or=1, comm=lc)
    inner = lat.interior_slices(2)
    ok = bool(torch.allclose(out[inner], ref[inner], rtol=0, atol=TOL))
    collective(ok, f"host vs torch decomposed sweep on grid {grid}")
