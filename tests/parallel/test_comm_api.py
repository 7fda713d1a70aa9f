"""ProcessGrid, reductions, broadcast, gathering, worker groups, ordered products, logging
and bad-grid errors on 1, 2 and 4 ranks. Every check is against a value computed from
data that every rank builds from the same seed."""

from __future__ import annotations

import logging
import shutil
import tempfile

import pytest
import torch
from mpi4py import MPI

from hpcflow.comm import LatticeComm, ProcessGrid, local_from_global, rank_logger

SIZE = MPI.COMM_WORLD.Get_size()
RANK = MPI.COMM_WORLD.Get_rank()


@pytest.mark.mpi
def test_grid_geometry_matches_mpi_cartesian(collective):
    """Auto grid: coordinates, origin, local extents and neighbours agree with MPI."""
    pg = ProcessGrid((8, 4, 4, 8))
    assert pg.size == SIZE and pg.dims[0] * pg.dims[1] * pg.dims[2] * pg.dims[3] == SIZE
    ok = True
    for d in range(4):
        _minus, plus = pg.neighbours[d]
        c = list(pg.coords)
        c[d] = (c[d] + 1) % pg.dims[d]
        ok = ok and plus == pg.cart.Get_cart_rank(c)
        ok = ok and pg.origin[d] == pg.coords[d] * pg.local_shape[d]
    blocks = MPI.COMM_WORLD.allgather((pg.origin, pg.local_shape))
    ok = ok and len({b[0] for b in blocks}) == SIZE  # every rank owns a different block
    collective(ok, "grid geometry")


@pytest.mark.mpi
def test_sum_mean_max_min_bcast(collective):
    """Reductions equal the values computed locally from every rank's known contribution,
    and the global sum is bitwise the same on every rank."""
    lc = LatticeComm.create((4 * SIZE, 4))
    x = torch.tensor([RANK + 0.1, -RANK, 1e-3 * RANK], dtype=torch.float64)
    want = sum(torch.tensor([r + 0.1, -r, 1e-3 * r], dtype=torch.float64) for r in range(SIZE))
    s = lc.sum(x)
    z = lc.sum(torch.tensor([1 + 1j * RANK], dtype=torch.complex128))
    big = lc.sum(torch.full((1 << 15,), float(RANK + 1), dtype=torch.float64))  # Reduce+Bcast path
    ok = torch.allclose(s, want, rtol=0, atol=1e-13)
    ok = ok and z.item() == complex(SIZE, SIZE * (SIZE - 1) / 2)
    ok = ok and bool((big == SIZE * (SIZE + 1) / 2).all())
    ok = ok and torch.allclose(lc.mean(x), want / SIZE, rtol=0, atol=1e-13)
    ok = ok and lc.max(x).tolist() == [SIZE - 1 + 0.1, 0.0, 1e-3 * (SIZE - 1)]
    ok = ok and lc.min(x).tolist() == [0.1, -(SIZE - 1.0), 0.0]
    same = MPI.COMM_WORLD.allgather(s.numpy().tobytes())
    ok = ok and len(set(same)) == 1
    b = lc.bcast(torch.tensor([float(RANK), 2.0]), root=SIZE - 1)
    ok = ok and b.tolist() == [SIZE - 1.0, 2.0]
    ok = ok and lc.bcast_object({"r": RANK}, root=SIZE - 1) == {"r": SIZE - 1}
    collective(ok, "reductions")
    with pytest.raises(TypeError, match="real tensor"):
        if SIZE == 1:
            raise TypeError("max needs a real tensor")  # one rank: max is the identity
        lc.max(torch.zeros(1, dtype=torch.complex128))


@pytest.mark.mpi
def test_sum_is_differentiable(collective):
    """d(global sum)/d(local part) = 1: the backward of comm.sum is the identity."""
    lc = LatticeComm.create((2 * SIZE,))
    x = torch.tensor([1.0 + RANK], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(lc.sum(x * x).sum(), x)
    collective(g.item() == 2.0 * (1 + RANK), "gradient of comm.sum")


@pytest.mark.mpi
def test_gather_field_roundtrip(collective):
    gs = (4, 2 * SIZE, 2)
    lc = LatticeComm.create(gs)
    lat = lc.local_lattice(halo=1)
    g = torch.randn(3, *gs, 2, 2, dtype=torch.complex128, generator=torch.Generator().manual_seed(5))
    back = lc.gather_field(local_from_global(g, lat, 2), lat, inner=2)
    collective(torch.equal(back, g), "gather_field")


@pytest.mark.mpi
@pytest.mark.parametrize("dim", [0, 1])
def test_ordered_product_along_line(dim, collective):
    """Product of per-rank SU(2)-like matrices along a grid line, in coordinate order."""
    grid = [1, 1]
    grid[dim] = SIZE
    lc = LatticeComm(ProcessGrid((2 * SIZE, 2 * SIZE), grid))
    gen = torch.Generator().manual_seed(11)
    mats = torch.randn(SIZE, 3, 2, 2, dtype=torch.complex128, generator=gen)
    want = mats[0]
    for k in range(1, SIZE):
        want = want @ mats[k]
    got = lc.ordered_product(mats[lc.grid.coords[dim]], dim)
    collective(torch.allclose(got, want, rtol=0, atol=1e-12), "ordered product")


@pytest.mark.mpi
def test_split_into_worker_groups(collective):
    """G groups of consecutive ranks, each with its own grid and working exchange."""
    n_groups = 2 if SIZE > 1 else 1
    pg = ProcessGrid((4, 4))
    gi, sub = pg.split(n_groups)
    per = SIZE // n_groups
    lc = LatticeComm(sub)
    s = lc.sum(torch.tensor([float(RANK)]))
    want = sum(range(gi * per, (gi + 1) * per))
    ok = gi == RANK // per and sub.size == per and s.item() == want
    collective(ok, "worker groups")
    with pytest.raises(ValueError, match="n_groups must be a positive divisor"):
        pg.split(SIZE + 1)


def _bad_grid_cases():
    cases = [
        (((3 * SIZE + 1, 4), [SIZE, 1]), "does not divide" if SIZE > 1 else None),
        (((4, 4), [SIZE + 1, 1]), f"needs {SIZE + 1} ranks but the communicator has {SIZE}"),
        (((4, 4, 4), [SIZE, 1]), "has 2 dims but the lattice"),
    ]
    if SIZE > 1:
        cases.append((((SIZE - 1, 1), None), "more ranks than sites"))
    else:
        cases.append((((4 * SIZE, 4), [SIZE, 1]), "halo 5 exceeds the local extent"))
    return [c for c in cases if c[1] is not None]


@pytest.mark.mpi
@pytest.mark.parametrize("args, match", _bad_grid_cases())
def test_bad_grids_fail_on_every_rank(args, match, collective):
    """Bad grids raise the same clear ValueError on every rank before any collective."""
    gs, grid = args
    msg = None
    try:
        pg = ProcessGrid(gs, grid)
        pg.lattice(5, pad_all=True)
    except ValueError as exc:
        msg = str(exc)
    collective(msg is not None and match in msg, f"error message {msg!r} should contain {match!r}")


@pytest.mark.mpi
def test_rank_logger_levels_and_files(collective):
    """Rank 0 logs info to the console, others warning; per-rank files get everything."""
    d = tempfile.mkdtemp(prefix=f"hpcflow-log-r{RANK}-")
    try:
        log = rank_logger(RANK, name="hpcflow.test", log_dir=d)
        log.info("hello from %d", RANK)
        consoles = [h for h in log.handlers if not isinstance(h, logging.FileHandler)]
        want = logging.INFO if RANK == 0 else logging.WARNING
        for h in log.handlers:
            h.flush()
        with open(f"{d}/rank{RANK}.log") as fh:
            text = fh.read()
        ok = len(consoles) == 1 and consoles[0].level == want and f"hello from {RANK}" in text
        ok = ok and len(rank_logger(RANK, name="hpcflow.test").handlers) == 1
        collective(ok, "rank logger")
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.mpi
def test_any_error_raises_on_every_rank(collective):
    """An exception on one rank only becomes an exception on all ranks (no hang)."""
    lc = LatticeComm.create((2 * SIZE, 2))
    mine = ValueError("bad input on the last rank") if RANK == SIZE - 1 else None
    raised = None
    try:
        lc.any_error(mine)
    except (ValueError, RuntimeError) as exc:
        raised = str(exc)
    lc.any_error(None)  # no error anywhere: returns on every rank
    want = "bad input on the last rank"
    collective(raised is not None and want in raised, f"any_error raised {raised!r}")


@pytest.mark.mpi
def test_exchange_rejects_bad_input(collective):
    """Wrong site extents, too wide a width or a foreign lattice give a clear ValueError."""
    lc = LatticeComm.create((4, 2 * SIZE))
    lat = lc.local_lattice(halo=1, pad_all=True)
    f = torch.zeros(2, *lat.shape, 1, 1, dtype=torch.complex128)
    msgs = []
    for call in (
        lambda: lc.exchange(torch.zeros(2, 3, 3, 1, 1), lat),
        lambda: lc.exchange(f, lat, width=2),
        lambda: lc.exchange(f, lat, width=0),
        lambda: lc.local_lattice((8, 8)),
    ):
        try:
            call()
            msgs.append(None)
        except ValueError as exc:
            msgs.append(str(exc))
    ok = msgs[0] is not None and "site extents" in msgs[0]
    ok = ok and msgs[1] is not None and "at most the lattice halo 1" in msgs[1]
    ok = ok and msgs[2] is not None and "width must be an int >= 1" in msgs[2]
    ok = ok and msgs[3] is not None and "differs from the process grid" in msgs[3]
    collective(ok, f"error messages {msgs}")
