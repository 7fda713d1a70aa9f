"""Production ensembles written by P ranks equal the one-rank ensembles (pytest-mpi, P = 1, 2, 4).

What is proven:
* a heat-bath or HMC chain on a P-rank process grid (one worker group, collective ``mpio``
  segment writes) stores the same configurations (bit for bit), the same SciDAC checksums,
  and S and plaquette within 1e-12 of the one-rank chain (no MPI, ``_Serial`` comm);
* with ``sample.n_workers = 2`` worker groups (P >= 2) each group writes its own chain, and
  chain c equals the one-rank run of chain c alone (stream c), and the chains differ;
* flow chains with one rank per worker group (``n_workers = P``) under mpirun equal the
  one-rank runs of the same chains; more than one rank per flow chain is refused with one
  clear error on every rank (until the domain-decomposed flow exists);
* a reader sees only committed segments: rows appended collectively to an open segment are
  invisible until the commit (rename), and visible, with the right checksums, after it.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import pytest
import torch
from mpi4py import MPI

from hpcflow.config import ConfigError, config_from_dict
from hpcflow.io.ensemble import SegmentWriter, field_checksum, open_ensemble
from hpcflow.lattice.geometry import Lattice
from hpcflow.sampling.production import EXIT_OK, ChainRunner, _Serial, ensemble_dir, sample
from hpcflow.signals import StopFlag

WORLD = MPI.COMM_WORLD
SIZE, RANK = WORLD.Get_size(), WORLD.Get_rank()


def _tmpdir() -> str:
    return WORLD.bcast(tempfile.mkdtemp(prefix="hpcflow-ens-") if RANK == 0 else None)


def _cfg(out: str, algorithm: str = "heatbath", n_workers: int = 1, grid=None, **extra):  # type: ignore[no-untyped-def]
    d = {"lattice": {"shape": [8, 8]}, "group": "u1", "algorithm": algorithm, "seed": 31,
         "action": {"beta": 2.0}, "hmc": {"n_steps": 3, "tau": 0.5}, "heatbath": {"n_overrelax": 1},
         "grid": grid, "run": {"n_therm": 1, "n_steps": 5, "measure_every": 1, "progress": False},
         "sample": {"checkpoint_every": 2, "n_workers": n_workers}, "output": {"dir": out}}
    d.update(extra)
    return config_from_dict(d)


def _chain(root: str, chain: int) -> tuple[dict, list[torch.Tensor]]:
    ens = open_ensemble(root)
    return ens.records(chain), [U for _, U in ens.iter_configs(chain)]


def _same(a, b, what: str) -> tuple[bool, str]:  # type: ignore[no-untyped-def]
    (ra, ua), (rb, ub) = a, b
    if len(ua) != len(ub) or len(ua) == 0:
        return False, f"{what}: {len(ua)} vs {len(ub)} configurations"
    if not all(torch.equal(x, y) for x, y in zip(ua, ub)):
        return False, f"{what}: configurations differ"
    for k in ("chain", "step", "accepted", "checksum"):
        if not np.array_equal(ra[k], rb[k]):
            return False, f"{what}: {k} differs: {ra[k]} vs {rb[k]}"
    for k in ("S", "plaquette"):
        if not np.allclose(ra[k], rb[k], rtol=1e-12, atol=1e-12):
            return False, f"{what}: {k} differs beyond 1e-12: {ra[k]} vs {rb[k]}"
    return True, ""


def _serial_chain(cfg, chain: int) -> tuple[dict, list[torch.Tensor]]:  # type: ignore[no-untyped-def]
    """Chain ``chain`` of ``cfg`` run alone on this rank without MPI (the reference)."""
    runner = ChainRunner(cfg, chain, _Serial(), Lattice(cfg.lattice.shape), StopFlag())
    assert runner.run() == EXIT_OK
    return _chain(ensemble_dir(cfg), chain)


def _finish(base: str) -> None:
    WORLD.Barrier()
    if RANK == 0:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.mpi
@pytest.mark.parametrize("algorithm", ["heatbath", "hmc"])
def test_p_rank_grid_ensemble_equals_one_rank(algorithm, collective) -> None:
    base = _tmpdir()
    try:
        cfg = _cfg(f"{base}/par", algorithm, grid=[SIZE, 1])
        code = sample(cfg, use_mpi=True)
        ok, why = code == EXIT_OK, f"exit {code}"
        if RANK == 0 and ok:
            ref = _cfg(f"{base}/ser", algorithm)
            assert sample(ref, use_mpi=False) == EXIT_OK
            ok, why = _same(_chain(ensemble_dir(cfg), 0), _chain(ensemble_dir(ref), 0), algorithm)
            attrs = open_ensemble(ensemble_dir(cfg)).attrs
            if ok and int(attrs["ranks_per_chain"]) != SIZE:
                ok, why = False, f"ranks_per_chain {attrs['ranks_per_chain']} != {SIZE}"
        collective(ok, f"{algorithm} on grid [{SIZE}, 1]: {why}")
    finally:
        _finish(base)


@pytest.mark.mpi
def test_worker_groups_are_the_single_chains(collective) -> None:
    n_workers = 2 if SIZE >= 2 else 1
    per = SIZE // n_workers
    base = _tmpdir()
    try:
        cfg = _cfg(f"{base}/par", "heatbath", n_workers=n_workers, grid=[per, 1])
        code = sample(cfg, use_mpi=True)
        ok, why = code == EXIT_OK, f"exit {code}"
        if RANK == 0 and ok:
            ref = _cfg(f"{base}/ser", "heatbath", n_workers=n_workers)
            chains = [_chain(ensemble_dir(cfg), c) for c in range(n_workers)]
            for c in range(n_workers):
                ok, why = _same(chains[c], _serial_chain(ref, c), f"chain {c}")
                if not ok:
                    break
            if ok and n_workers > 1 and set(chains[0][0]["checksum"]) & set(chains[1][0]["checksum"]):
                ok, why = False, "chains 0 and 1 share a configuration: streams not independent"
        collective(ok, f"{n_workers} worker groups of {per} ranks: {why}")
    finally:
        _finish(base)


def _train_tiny(cfg) -> None:  # type: ignore[no-untyped-def]
    from hpcflow.flow_driver import build_model
    from hpcflow.flows.train import Trainer

    lat = Lattice(cfg.lattice.shape)
    Trainer(build_model(cfg, lat), lat, cfg.action.beta, cfg.train, cfg.output.dir, seed=cfg.seed,
            progress=False).train()


def _flow_cfg(out: str, n_workers: int, **kw):  # type: ignore[no-untyped-def]
    return _cfg(out, "flow", n_workers=n_workers,
                flow={"n_layers": 2, "hidden": [4], "kernel_size": 3},
                train={"steps": 2, "batch": 4, "lr": 0.01},
                sample={"n_therm": 1, "n_steps": 5, "batch": 3, "checkpoint_every": 2,
                        "n_workers": n_workers}, **kw)


@pytest.mark.mpi
def test_flow_chains_one_rank_per_group(collective) -> None:
    base = _tmpdir()
    try:
        cfg = _flow_cfg(f"{base}/par", SIZE)
        if RANK == 0:
            _train_tiny(cfg)
            for d in ("ser", "bad"):
                os.makedirs(f"{base}/{d}/train")
                shutil.copy(f"{base}/par/train/checkpoint.pt", f"{base}/{d}/train/checkpoint.pt")
        WORLD.Barrier()
        code = sample(cfg, use_mpi=True)
        ok, why = code == EXIT_OK, f"exit {code}"
        if RANK == 0 and ok:
            ref = _flow_cfg(f"{base}/ser", SIZE)
            for c in range(SIZE):
                ok, why = _same(_chain(ensemble_dir(cfg), c), _serial_chain(ref, c), f"flow chain {c}")
                if not ok:
                    break
            sha = {open_ensemble(ensemble_dir(cfg)).attrs["model_sha256"]}
            if ok and (len(sha) != 1 or len(next(iter(sha))) != 64):
                ok, why = False, f"model_sha256 attribute {sha}"
        collective(ok, f"flow chains on {SIZE} ranks: {why}")
        if SIZE > 1:  # several ranks per flow chain: refused everywhere, nothing written
            msg = ""
            try:
                sample(_flow_cfg(f"{base}/bad", 1), use_mpi=True)
            except ConfigError as e:
                msg = str(e)
            collective("domain-decomposed flow" in msg and "sample.n_workers" in msg,
                       f"expected a one-line refusal, got {msg!r}")
            collective(not os.path.exists(f"{base}/bad/ensemble/chain000"), "refused run wrote files")
    finally:
        _finish(base)


@pytest.mark.mpi
def test_readers_see_only_committed_segments(collective) -> None:
    from hpcflow.comm import LatticeComm, ProcessGrid
    from hpcflow.lattice.groups import get_group, random_field
    from hpcflow.rng import CounterRNG

    base = _tmpdir()
    try:
        shape = (8, 4)
        lc = LatticeComm(ProcessGrid(shape, [SIZE, 1]))
        lat = lc.local_lattice(halo=1)
        g = get_group("su2")
        fields = [random_field(lat, g, CounterRNG(7), step=s) for s in range(3)]
        root = f"{base}/ens"
        w = SegmentWriter(root, 0, 0, lat, 2, torch.complex128, 2, {"test": 1}, lc)
        cks = [w.append(fields[0], {"step": 1}), w.append(fields[1], {"step": 2})]
        w.prepare()  # data flushed and closed under the temporary name: still not committed
        seen = open_ensemble(root).n_committed() if RANK == 0 else 0
        collective(seen == 0, f"reader saw {seen} rows before the commit")
        w.publish()
        w2 = SegmentWriter(root, 0, 1, lat, 1, torch.complex128, 2, {"test": 1}, lc)
        w2.append(fields[2], {"step": 3})  # open, written, not committed
        ok, why = True, ""
        if RANK == 0:
            ens = open_ensemble(root)
            r = ens.records(0)
            ok = ens.n_committed() == 2 and list(r["step"]) == [1, 2] and list(r["checksum"]) == cks
            why = f"committed rows {ens.n_committed()}, steps {list(r['step'])}"
            one = Lattice(shape)  # checksum of the stored global field == the one written in parallel
            stored = [ens.config(0, i) for i in range(2)]
            ok = ok and all(field_checksum(U, one) == ck for U, ck in zip(stored, cks))
        collective(ok, f"after one commit: {why}")
        gathered = [lc.gather_field(f, lat) for f in fields]
        w2.commit()
        ok = True
        if RANK == 0:
            ens = open_ensemble(root)
            ok = ens.n_committed() == 3 and all(torch.equal(ens.config(0, i), gathered[i]) for i in range(3))
        collective(ok, "after the second commit the reader sees all three configurations")
    finally:
        _finish(base)
