"""Production ensembles written by P ranks equal the one-rank ensembles (pytest-mpi, P = 1, 2, 4).

What is proven:
* a heat-bath or HMC chain on a P-rank process grid (one worker group, collective ``mpio``
  segment writes) stores the same configurations (bit for bit), the same SciDAC checksums,
  and S and plaquette within 1e-12 of the one-rank chain (no MPI, ``SerialComm``);
* with ``sample.n_workers = 2`` worker groups (P >= 2) each group writes its own chain, and
  chain c equals the one-rank run of chain c alone (stream c), and the chains differ;
* flow chains with one rank per worker group (``n_workers = P``) under mpirun equal the
  one-rank runs of the same chains;
* one flow chain on a worker group spanning all P ranks (domain-decomposed flow, grid
  ``[1, 1]``/``[2, 1]``/``[2, 2]``, every rank writing its hyperslab) stores the one-rank
  ensemble configuration for configuration (same steps and accept decisions, fields within
  1e-12, S/log q/log w/plaquette within 1e-10, every checksum that of its stored field; the
  decomposed flow equals the one-rank flow to rounding, not bitwise: the CNN on a padded
  sub-lattice sums in another order, so SciDAC checksums of P > 1 runs can differ in the last
  bit), is the ``hpcflow run`` chain (``flow_chain`` with the decomposed model on the same
  ranks), and a stop + resume on P ranks gives the uninterrupted P-rank ensemble bit for bit
  (checksums equal); a mixed chain on several ranks per chain is refused with
  one clear error on every rank, nothing written;
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

from hpcflow.backend import run_backend
from hpcflow.config import ConfigError, config_from_dict
from hpcflow.io.ensemble import SegmentWriter, field_checksum, open_ensemble
from hpcflow.lattice.geometry import Lattice, SerialComm
from hpcflow.run.sample import EXIT_OK, chain_of_config, ensemble_dir, sample
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


def _same(a, b, what: str, bitwise: bool = True) -> tuple[bool, str]:  # type: ignore[no-untyped-def]
    """Same chain: bitwise (configurations and checksums), or with ``bitwise=False`` fields to
    1e-12 (the host kernels on a decomposed lattice sum staples in another order than on one
    rank, so the last bits, and with them the SciDAC checksums, may differ)."""
    (ra, ua), (rb, ub) = a, b
    if len(ua) != len(ub) or len(ua) == 0:
        return False, f"{what}: {len(ua)} vs {len(ub)} configurations"
    if bitwise and not all(torch.equal(x, y) for x, y in zip(ua, ub)):
        return False, f"{what}: configurations differ"
    if not bitwise and not all(torch.allclose(x, y, rtol=0, atol=1e-12) for x, y in zip(ua, ub)):
        return False, f"{what}: configurations differ beyond 1e-12"
    for k in ("chain", "step", "accepted") + (("checksum",) if bitwise else ()):
        if not np.array_equal(ra[k], rb[k]):
            return False, f"{what}: {k} differs: {ra[k]} vs {rb[k]}"
    for k in ("S", "plaquette"):
        if not np.allclose(ra[k], rb[k], rtol=1e-12, atol=1e-12):
            return False, f"{what}: {k} differs beyond 1e-12: {ra[k]} vs {rb[k]}"
    return True, ""


def _serial_chain(cfg, chain: int) -> tuple[dict, list[torch.Tensor]]:  # type: ignore[no-untyped-def]
    """Chain ``chain`` of ``cfg`` run alone on this rank without MPI (the reference)."""
    lat = Lattice(cfg.lattice.shape, backend=run_backend(cfg))
    assert chain_of_config(cfg, chain, SerialComm(), lat, StopFlag()).run() == EXIT_OK
    return _chain(ensemble_dir(cfg), chain)


def _finish(base: str) -> None:
    WORLD.Barrier()
    if RANK == 0:
        shutil.rmtree(base, ignore_errors=True)


# torch path: 2D U(1), bitwise; host kernels (the CPU default): 4D SU(2), fields to 1e-12
# (the rows carry the configured Wilson loops: on 4 ranks the 4^4 lattice is split into local
# extents of 1, so only 1x1 loops fit a rank's sub-lattice; larger ones are refused in one line)
SETUPS = {"torch": {"backend": "torch"},
          "host": {"backend": "host", "group": "su2", "lattice": {"shape": [4, 4, 4, 4]},
                   "measure": {"wilson_loops": [[1, 1]]}}}


@pytest.mark.mpi
@pytest.mark.parametrize("backend", list(SETUPS))
@pytest.mark.parametrize("algorithm", ["heatbath", "hmc"])
def test_p_rank_grid_ensemble_equals_one_rank(algorithm, backend, collective) -> None:
    base = _tmpdir()
    grid = [SIZE, 1] if backend == "torch" else [SIZE, 1, 1, 1]
    try:
        cfg = _cfg(f"{base}/par", algorithm, grid=grid, **SETUPS[backend])
        code = sample(cfg, use_mpi=True)
        ok, why = code == EXIT_OK, f"exit {code}"
        if RANK == 0 and ok:
            ref = _cfg(f"{base}/ser", algorithm, **SETUPS[backend])
            assert sample(ref, use_mpi=False) == EXIT_OK
            ok, why = _same(_chain(ensemble_dir(cfg), 0), _chain(ensemble_dir(ref), 0), algorithm,
                            bitwise=backend == "torch")
            attrs = open_ensemble(ensemble_dir(cfg)).attrs
            if ok and int(attrs["ranks_per_chain"]) != SIZE:
                ok, why = False, f"ranks_per_chain {attrs['ranks_per_chain']} != {SIZE}"
        collective(ok, f"{algorithm} ({backend}) on grid {grid}: {why}")
    finally:
        _finish(base)


@pytest.mark.mpi
def test_worker_groups_are_the_single_chains(collective) -> None:
    n_workers = 2 if SIZE >= 2 else 1
    per = SIZE // n_workers
    base = _tmpdir()
    try:
        cfg = _cfg(f"{base}/par", "heatbath", n_workers=n_workers, grid=[per, 1], backend="torch")
        code = sample(cfg, use_mpi=True)
        ok, why = code == EXIT_OK, f"exit {code}"
        if RANK == 0 and ok:
            ref = _cfg(f"{base}/ser", "heatbath", n_workers=n_workers, backend="torch")
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
    from hpcflow.flows.build import build_model
    from hpcflow.flows.train import Trainer

    lat = Lattice(cfg.lattice.shape)
    Trainer(build_model(cfg, lat), lat, cfg.action.beta, cfg.train, cfg.output.dir, seed=cfg.seed,
            progress=False).train()


def _flow_cfg(out: str, n_workers: int, algorithm: str = "flow", **kw):  # type: ignore[no-untyped-def]
    return _cfg(out, algorithm, n_workers=n_workers,
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
    finally:
        _finish(base)


DOMAIN_GRID = {1: [1, 1], 2: [2, 1], 4: [2, 2]}.get(SIZE, [SIZE, 1])  # local extents >= layer halo
# weak coupling: the 2-step flow proposes well enough that the chain both accepts and rejects
DECOMP = {"grid": DOMAIN_GRID, "action": {"beta": 0.2}}


def _same_flow(a, b, what: str, tol: float = 1e-12) -> tuple[bool, str]:  # type: ignore[no-untyped-def]
    """Same chain: steps and accept decisions exactly, fields to ``tol``, S/log q/log w/plaquette
    to 1e-10, and every stored checksum is the SciDAC checksum of its stored field."""
    (ra, ua), (rb, ub) = a, b
    if len(ua) != len(ub) or len(ua) == 0:
        return False, f"{what}: {len(ua)} vs {len(ub)} configurations"
    for k in ("chain", "step", "accepted"):
        if not np.array_equal(ra[k], rb[k]):
            return False, f"{what}: {k} differs: {ra[k]} vs {rb[k]}"
    if not all(torch.allclose(x, y, rtol=0, atol=tol) for x, y in zip(ua, ub)):
        return False, f"{what}: configurations differ beyond {tol}"
    for k in ("S", "log_q", "log_w", "plaquette"):
        if not np.allclose(ra[k], rb[k], rtol=1e-10, atol=1e-10):
            return False, f"{what}: {k} differs beyond 1e-10: {ra[k]} vs {rb[k]}"
    one = Lattice(ua[0].shape[1:-2])
    for r, u in ((ra, ua), (rb, ub)):
        if [field_checksum(U, one) for U in u] != list(r["checksum"]):
            return False, f"{what}: a stored checksum is not the checksum of its stored field"
    if tol == 0 and not np.array_equal(ra["checksum"], rb["checksum"]):
        return False, f"{what}: checksums differ: {ra['checksum']} vs {rb['checksum']}"
    return True, ""


class _StopAfter(StopFlag):
    """'Receives a signal' after ``polls`` chain steps (the same on every rank)."""

    def __init__(self, polls: int) -> None:
        super().__init__()
        self.left = polls

    @property  # type: ignore[override]
    def stop_requested(self) -> bool:
        self.left -= 1
        return self.left < 0

    @stop_requested.setter
    def stop_requested(self, v: bool) -> None:
        pass


@pytest.mark.mpi
def test_decomposed_flow_chain_equals_one_rank(collective) -> None:
    """One flow chain on all P ranks (sub-lattice per rank) == the one-rank chain; == flow_chain."""
    from hpcflow.run.sample import EXIT_RESUMABLE

    base = _tmpdir()
    try:
        cfg = _flow_cfg(f"{base}/par", 1, **DECOMP)
        stopped = _flow_cfg(f"{base}/stop", 1, **DECOMP)
        if RANK == 0:
            _train_tiny(cfg)
            for d in ("ser", "stop", "mixed"):
                os.makedirs(f"{base}/{d}/train")
                shutil.copy(f"{base}/par/train/checkpoint.pt", f"{base}/{d}/train/checkpoint.pt")
        WORLD.Barrier()
        code = sample(cfg, use_mpi=True)
        ok, why = code == EXIT_OK, f"exit {code}"
        # the decomposed chain of hpcflow run (flow_chain, stream 0) on the same ranks
        from hpcflow.comm import LatticeComm, ProcessGrid
        from hpcflow.flows.distributed import DistributedFlow
        from hpcflow.rng import CounterRNG
        from hpcflow.run.sample import load_model
        from hpcflow.sampling.flow_chains import flow_chain

        plain, _ = load_model(cfg, Lattice(cfg.lattice.shape))
        dist = DistributedFlow(plain, LatticeComm(ProcessGrid(cfg.lattice.shape, DOMAIN_GRID)))
        n = cfg.sample.n_therm + cfg.sample.n_steps
        run = flow_chain(dist, cfg.action.beta, n, cfg.sample.batch, CounterRNG(cfg.seed, 0))
        # stop after steps 2 and 4 (mid-batch, mid-segment), then resume to the end
        codes = [sample(stopped, use_mpi=True, stop=_StopAfter(k)) for k in (1, 1, 100)]
        if RANK == 0 and ok:
            attrs = open_ensemble(ensemble_dir(cfg)).attrs
            par = _chain(ensemble_dir(cfg), 0)
            ok, why = _same_flow(par, _serial_chain(_flow_cfg(f"{base}/ser", 1, action=DECOMP["action"]), 0), "decomposed flow chain")
            if ok and int(attrs["ranks_per_chain"]) != SIZE:
                ok, why = False, f"ranks_per_chain {attrs['ranks_per_chain']} != {SIZE}"
            rec, sl = par[0], slice(cfg.sample.n_therm, n)
            if ok and not (np.array_equal(rec["accepted"].astype(bool), run["accepted"][sl])
                           and np.allclose(rec["S"], run["S"][sl], rtol=1e-10, atol=1e-10)
                           and np.allclose(rec["log_q"], run["logq"][sl], rtol=1e-10, atol=1e-10)):
                ok, why = False, (f"differs from flow_chain: accepted {rec['accepted']} vs "
                                  f"{run['accepted'][sl]}, S {rec['S']} vs {run['S'][sl]}")
            if ok and not 0 < rec["accepted"].sum() < len(rec["accepted"]):
                ok, why = False, f"want accepts and rejects, got {rec['accepted']}"
            if ok and codes != [EXIT_RESUMABLE, EXIT_RESUMABLE, EXIT_OK]:
                ok, why = False, f"stop/resume exit codes {codes}"
            if ok:
                ok, why = _same_flow(_chain(ensemble_dir(stopped), 0), par, "stopped and resumed", tol=0)
        collective(ok, f"flow chain on grid {DOMAIN_GRID}: {why}")
        if SIZE > 1:  # mixed (flow + heat bath) on several ranks per chain: refused everywhere
            msg = ""
            try:
                sample(_flow_cfg(f"{base}/mixed", 1, "mixed", **DECOMP,
                                 mixed={"pattern": ["flow", "heatbath"]}), use_mpi=True)
            except ConfigError as e:
                msg = str(e)
            collective("one rank per chain" in msg and "sample.n_workers" in msg,
                       f"expected a one-line refusal, got {msg!r}")
            collective(not os.path.exists(f"{base}/mixed/ensemble/chain000"), "refused run wrote files")
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


@pytest.mark.mpi
def test_loops_longer_than_a_ranks_extent_are_refused_on_every_rank(collective) -> None:
    """The default loops [[1, 1], [2, 2]] on 4^4 split over P ranks along x_0: with local extent
    4/P < 2 (P = 4) the 2x2 loop cannot be measured on a sub-lattice: one ConfigError naming
    measure.wilson_loops on every rank, before any file is written; with P <= 2 it runs."""
    base = _tmpdir()
    try:
        cfg = _cfg(f"{base}/par", "heatbath", grid=[SIZE, 1, 1, 1], backend="host", group="su2",
                   lattice={"shape": [4, 4, 4, 4]})
        msg = ""
        try:
            code = sample(cfg, use_mpi=True)
        except ConfigError as e:
            msg, code = str(e), None
        if SIZE == 4:
            collective("measure.wilson_loops" in msg and "local extent" in msg, f"expected a refusal, got {msg!r}")
            collective(not os.path.exists(f"{base}/par/ensemble/chain000") or
                       not os.listdir(f"{base}/par/ensemble/chain000"), "the refused run wrote segments")
        else:
            collective(code == EXIT_OK, f"P = {SIZE}: exit {code}, {msg!r}")
    finally:
        _finish(base)
