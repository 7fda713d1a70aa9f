"""Lattice physics on a decomposed lattice equals the single-rank values to 1e-12:
plaquette, Wilson action, staple sums, Wilson loops (up to the halo width), Polyakov loop
(time split or not), 2D U(1) geometric charge and the 4D clover charge after Wilson flow.
The global field is built identically on every rank (CounterRNG, same seed); each rank
computes the single-rank reference on the global lattice and the decomposed value on its
halo-padded local array after ``comm.exchange``."""

from __future__ import annotations

import pytest
import torch
from mpi4py import MPI

from hpcflow.comm import LatticeComm, ProcessGrid, local_from_global
from hpcflow.lattice import action, observables
from hpcflow.lattice.geometry import Lattice
from hpcflow.lattice.groups import get_group, random_field
from hpcflow.rng import CounterRNG

SIZE = MPI.COMM_WORLD.Get_size()
TOL = 1e-12

CASES = {  # (group, global shape, grid)
    1: [("u1", (8, 8), (1, 1)), ("su2", (4, 4, 4, 4), (1, 1, 1, 1))],
    2: [("u1", (8, 8), (1, 2)), ("su3", (4, 4, 4, 4), (1, 1, 1, 2)), ("su2", (4, 4, 4, 4), (2, 1, 1, 1))],
    4: [
        ("u1", (8, 8), (2, 2)),
        ("su3", (4, 4, 4, 4), (1, 1, 2, 2)),
        ("su2", (4, 4, 4, 4), (2, 1, 1, 2)),
        ("su3", (4, 4, 4, 4), (2, 2, 1, 1)),
    ],
}[SIZE]
IDS = [f"{g}-{'x'.join(map(str, s))}-grid{''.join(map(str, p))}" for g, s, p in CASES]


def _setup(group_name, gs, grid, halo, dtype=torch.complex128):
    group = get_group(group_name)
    glat = Lattice(gs)
    U = random_field(glat, group, CounterRNG(2024, stream=3), 0, dtype=dtype)
    lc = LatticeComm(ProcessGrid(gs, grid))
    lat = lc.local_lattice(halo=halo)
    loc = local_from_global(U, lat, 2)
    poisoned = loc.clone()
    mask = ~lat.interior()
    poisoned[:, mask] = 7.0  # garbage in the halos: the exchange must overwrite it
    return group, glat, U, lc, lat, lc.exchange(poisoned, lat), loc


def _close(a, b, tol=TOL):
    return bool(torch.allclose(torch.as_tensor(a), torch.as_tensor(b), rtol=0, atol=tol))


@pytest.mark.mpi
@pytest.mark.parametrize("group_name, gs, grid", CASES, ids=IDS)
def test_plaquette_action_staples(group_name, gs, grid, collective):
    _, glat, U, lc, lat, Ul, loc = _setup(group_name, gs, grid, halo=1)
    ok = torch.equal(Ul, loc) if lat.halo else True
    ok = ok and _close(action.average_plaquette(Ul, lat, lc), action.average_plaquette(U, glat))
    s_ref = action.wilson_action(U, glat, 5.5)  # O(10^3): compare to 1e-12 relative
    ok = ok and _close(action.wilson_action(Ul, lat, 5.5, lc), s_ref, TOL * float(s_ref.abs()))
    # staples on the interior equal the global staples at the same global sites
    st = action.staple_sum(Ul, lat)[lat.interior_slices(2)]
    st_ref = local_from_global(action.staple_sum(U, glat), lat, 2)[lat.interior_slices(2)]
    ok = ok and _close(st, st_ref)
    # plaquette per plane and site, interior
    re = action.plaquette_re_tr(Ul, lat)[lat.interior_slices(0)]
    re_ref = local_from_global(action.plaquette_re_tr(U, glat), lat, 0)[lat.interior_slices(0)]
    ok = ok and _close(re, re_ref)
    collective(ok, "plaquette/action/staples")


@pytest.mark.mpi
@pytest.mark.parametrize("group_name, gs, grid", CASES, ids=IDS)
def test_wilson_loops_up_to_halo(group_name, gs, grid, collective):
    """R x T loops with max(R, T) <= halo = 2 need no more than the halo."""
    _, glat, U, lc, lat, Ul, _ = _setup(group_name, gs, grid, halo=2)
    ok = True
    for r, t in [(1, 1), (1, 2), (2, 2)]:
        ok = ok and _close(observables.wilson_loop(Ul, lat, r, t, lc), observables.wilson_loop(U, glat, r, t))
    collective(ok, "Wilson loops")


@pytest.mark.mpi
@pytest.mark.parametrize("group_name, gs, grid", CASES, ids=IDS)
def test_polyakov_loop(group_name, gs, grid, collective):
    """The product along t crosses ranks when t is split; compare with the one-rank value."""
    _, glat, U, lc, lat, Ul, _ = _setup(group_name, gs, grid, halo=1)
    ref = observables.polyakov_loop(U, glat)
    ok = _close(observables.polyakov_loop(Ul, lat, lc), ref)
    collective(ok, "Polyakov loop")


@pytest.mark.mpi
@pytest.mark.parametrize("group_name, gs, grid", CASES, ids=IDS)
def test_topological_charge(group_name, gs, grid, collective):
    """2D U(1): geometric charge; 4D: clover charge after 2 Wilson-flow steps (the flow
    exchanges halos before every stage)."""
    _, glat, U, lc, lat, Ul, _ = _setup(group_name, gs, grid, halo=1)
    if len(gs) == 2:
        q, qref = observables.topological_charge_u1_2d(Ul, lat, lc), observables.topological_charge_u1_2d(U, glat)
        ok = _close(q, qref) and abs(qref.item() - round(qref.item())) < 1e-9
    else:
        V = lc.exchange(observables.wilson_flow(Ul, lat, 0.02, 2, lc), lat)
        Vref = observables.wilson_flow(U, glat, 0.02, 2)
        ok = _close(V[lat.interior_slices(2)], local_from_global(Vref, lat, 2)[lat.interior_slices(2)])
        ok = ok and _close(observables.topological_charge_clover(V, lat, lc), observables.topological_charge_clover(Vref, glat))
    collective(ok, "topological charge")


@pytest.mark.mpi
def test_complex64_plaquette(collective):
    """complex64 by option: the decomposed plaquette equals the one-rank one to float32 rounding."""
    gname, gs, grid = CASES[-1]
    _, glat, U, lc, lat, Ul, _ = _setup(gname, gs, grid, halo=1, dtype=torch.complex64)
    p, pref = action.average_plaquette(Ul, lat, lc), action.average_plaquette(U, glat)
    collective(Ul.dtype == torch.complex64 and _close(p.double(), pref.double(), 1e-5), "complex64 plaquette")
