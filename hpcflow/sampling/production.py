"""Production sampling: worker groups, ensembles, crash-safe commits, signals and resume.

``sample(cfg, resume=None) -> exit status`` runs ``sample.n_workers`` independent Markov
chains. The world's ranks are split into consecutive worker groups
(``ProcessGrid.split``); group ``c`` runs chain ``c`` on its own process grid with its own
random stream ``CounterRNG(seed, stream=c)`` (chain 0 is the chain of ``hpcflow run``).

Chain loop (HMC or heat bath + overrelaxation): Markov step ``s = 1, 2, ...`` uses RNG
counter ``s``; after ``run.n_therm`` steps every ``run.measure_every``-th configuration is
stored, ``run.n_steps`` steps in all after thermalisation. Stored rows go into segment
files of ``sample.checkpoint_every`` rows (``hpcflow.io.ensemble``).

Commit protocol (two phases, the rename of the segment is the commit point):

1. the segment is flushed, closed and fsynced under its temporary name; the chain
   checkpoint after its last row (configuration, S, step, RNG state, counters) is written
   atomically to ``chainNNN.ckpt.next``;
2. the segment is renamed to its final name (commit), then ``.ckpt.next`` is renamed to
   ``.ckpt``.

Resume: a ``.ckpt.next`` whose segment is committed is promoted, otherwise deleted;
temporary segments are deleted; the checkpoint must match the committed segment count.
The RNG is counter based, so the resumed chain is the uninterrupted one, configuration
for configuration: nothing committed is lost or repeated.

Signals (``hpcflow.signals``): SIGTERM, SIGUSR1 or SIGINT finish the current step; the
group agrees on the stop, commits what it has, checkpoints and returns
``EXIT_RESUMABLE = 3``. Rerunning the same command continues (``resume=None`` resumes
automatically when a checkpoint exists).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from typing import Any

import torch

from hpcflow.config import Config, ConfigError, config_to_dict, to_yaml
from hpcflow.io.checkpoint import (
    CheckpointError,
    config_fingerprint,
    fsync_dir,
    load_checkpoint,
    save_checkpoint,
)
from hpcflow.io.ensemble import (
    EnsembleError,
    SegmentWriter,
    committed_segments,
    remove_uncommitted,
)
from hpcflow.signals import StopFlag

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_OK",
    "EXIT_RESUMABLE",
    "ChainRunner",
    "chain_checkpoint_path",
    "ensemble_attrs",
    "ensemble_dir",
    "main",
    "sample",
]

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_RESUMABLE = 3  # == hpcflow.cli.EXIT_RESUMABLE: "stopped, checkpoint written, rerun to continue"

# Keys whose change makes a checkpoint belong to another run. run.n_steps is left out so a
# finished chain can be extended; sample.checkpoint_every only moves segment boundaries.
_FINGERPRINT_KEYS = ("lattice", "group", "action", "algorithm", "seed", "precision", "hmc",
                     "heatbath", "n_workers", "n_therm", "measure_every", "start")


def ensemble_dir(cfg: Config) -> str:
    """``output.ensemble`` if the config has it, else ``<output.dir>/ensemble``."""
    return getattr(cfg.output, "ensemble", None) or os.path.join(cfg.output.dir, "ensemble")


def chain_checkpoint_path(cfg: Config, chain: int) -> str:
    return os.path.join(cfg.output.dir, "checkpoints", f"chain{chain:03d}.ckpt")


def _fingerprint(cfg: Config) -> str:
    d = config_to_dict(cfg)
    flat = {k: d[k] for k in ("lattice", "group", "action", "algorithm", "seed", "precision", "hmc",
                              "heatbath")}
    flat["n_workers"] = d["sample"]["n_workers"]
    flat["n_therm"] = d["run"]["n_therm"]
    flat["measure_every"] = d["run"]["measure_every"]
    flat["start"] = d["run"]["start"]
    return config_fingerprint(flat, _FINGERPRINT_KEYS)


def ensemble_attrs(cfg: Config, chain: int, comm: Any, model_sha256: str = "") -> dict[str, Any]:
    """File attributes of every segment: config, provenance, physics, stream (same on all ranks)."""
    import h5py
    import numpy as np

    import hpcflow
    from hpcflow.provenance import git_commit

    mpi = ""
    if comm.is_root:
        try:
            from hpcflow.comm.mpi_info import mpi_info

            info = mpi_info()
            mpi = f"{info.get('mpi_library')} (mpi4py {info.get('mpi4py')})"
        except Exception:  # noqa: BLE001 - provenance must not stop a run
            mpi = "unknown"
        commit = git_commit() or ""
    else:
        commit = ""
    if comm.size > 1:  # collective attribute writes need identical values on every rank
        mpi, commit = comm.bcast_object((mpi, commit))
    return {
        "config_yaml": to_yaml(cfg),
        "hpcflow_version": hpcflow.__version__,
        "git_commit": commit,
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "h5py_version": h5py.version.version,
        "hdf5_version": h5py.version.hdf5_version,
        "mpi_version": mpi,
        "lattice": list(cfg.lattice.shape),
        "group": cfg.group,
        "action": cfg.action.name,
        "beta": cfg.action.beta,
        "algorithm": cfg.algorithm,
        "precision": cfg.precision,
        "seed": cfg.seed,
        "stream": chain,
        "n_chains": cfg.sample.n_workers,
        "ranks_per_chain": comm.size,
        "model_sha256": model_sha256,
        "layout": "U[row, mu, x_0..x_{Nd-1}, i, j], link x -> x+mu; checksum = SciDAC suma<<32|sumb "
                  "of big-endian site bytes (site = Nd links, rank x_0 fastest)",
    }


class _Serial:
    """The comm protocol for one rank without MPI (plus the driver helpers used here)."""

    rank, size, is_root = 0, 1, True

    def exchange(self, f: torch.Tensor, lat: Any, inner: int = 2) -> torch.Tensor:
        return f

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def max(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def barrier(self) -> None:
        pass

    def allgather_object(self, obj: Any) -> list:
        return [obj]

    def bcast_object(self, obj: Any, root: int = 0) -> Any:
        return obj

    def any_error(self, exc: BaseException | None) -> None:
        if exc is not None:
            raise exc

    def gather_field(self, f: torch.Tensor, lat: Any, inner: int = 2) -> torch.Tensor:
        return f


class ChainRunner:
    """One Markov chain of a worker group: update, store, commit, checkpoint, stop, resume."""

    def __init__(self, cfg: Config, chain: int, comm: Any, lat: Any, stop: StopFlag) -> None:
        from hpcflow.rng import CounterRNG

        if cfg.algorithm not in ("hmc", "heatbath"):
            raise ConfigError(f"{cfg.source}: key 'algorithm': got {cfg.algorithm}; production sampling "
                              "supports hmc, heatbath (flow/mixed chains: not wired yet)")
        self.cfg, self.chain, self.comm, self.lat, self.stop = cfg, chain, comm, lat, stop
        self.root = ensemble_dir(cfg)
        self.ckpt = chain_checkpoint_path(cfg, chain)
        self.ckpt_next = self.ckpt + ".next"
        self.fp = _fingerprint(cfg)
        self.rng = CounterRNG(cfg.seed, stream=chain)
        self.dtype = torch.complex64 if cfg.precision == "float32" else torch.complex128
        self.device = torch.device(cfg.device)
        self.K = cfg.sample.checkpoint_every
        self.total = cfg.run.n_therm + cfg.run.n_steps
        self.n_rows_total = cfg.run.n_steps // cfg.run.measure_every
        self.attrs: dict[str, Any] = {}
        self.update = self._updater()

    # -- Markov step ---------------------------------------------------------------------
    def _updater(self) -> Callable[[torch.Tensor, int], tuple[torch.Tensor, bool]]:
        from hpcflow.lattice.groups import get_group

        cfg, lat, comm, rng = self.cfg, self.lat, self.comm, self.rng
        group = get_group(cfg.group)
        beta = cfg.action.beta
        if cfg.algorithm == "hmc":
            from hpcflow.sampling.hmc import HMC

            hmc = HMC(lat, group, beta, cfg.hmc.n_steps, cfg.hmc.tau, cfg.hmc.integrator, rng,
                      comm=comm, lam=cfg.hmc.lam)

            def hmc_step(U: torch.Tensor, step: int) -> tuple[torch.Tensor, bool]:
                U, acc, _ = hmc.trajectory(U, step)
                return U, bool(acc)

            return hmc_step
        from hpcflow.sampling.heatbath import heatbath_sweep, overrelax_sweep

        def hb_step(U: torch.Tensor, step: int) -> tuple[torch.Tensor, bool]:
            U = heatbath_sweep(U, lat, group, beta, rng, step, comm=comm)
            for _ in range(cfg.heatbath.n_overrelax):
                U = overrelax_sweep(U, lat, group, beta, comm=comm)
            return U, True

        return hb_step

    def _stored(self, step: int) -> bool:
        k = step - self.cfg.run.n_therm
        return k > 0 and k % self.cfg.run.measure_every == 0

    # -- files ----------------------------------------------------------------------------
    def _recover(self, resume: bool | None) -> dict[str, Any] | None:
        """Root: clean up after a crash and load the checkpoint (None: fresh start)."""
        segs = committed_segments(self.root, self.chain)
        if os.path.exists(self.ckpt_next):
            try:
                st = load_checkpoint(self.ckpt_next, self.fp)
                promote = len(segs) == st["n_segments"]
            except CheckpointError:
                promote = False
            if promote:  # crash between the segment rename (commit) and the checkpoint rename
                os.replace(self.ckpt_next, self.ckpt)
                fsync_dir(os.path.dirname(self.ckpt))
            else:
                os.unlink(self.ckpt_next)
        have = os.path.exists(self.ckpt)
        if resume is False and (have or segs):
            raise EnsembleError(f"{self.root}: chain {self.chain} already has "
                                f"{'a checkpoint' if have else 'committed segments'}; resume it "
                                "(rerun without disabling resume) or choose a new output.dir")
        if resume is True and not have:
            raise CheckpointError(f"{self.ckpt}: no such checkpoint; nothing to resume")
        remove_uncommitted(self.root, self.chain)
        if not have:
            if segs:
                raise EnsembleError(f"{self.root}: chain {self.chain} has {len(segs)} committed segments "
                                    f"but no checkpoint {self.ckpt}; refusing to overwrite them")
            return None
        st = load_checkpoint(self.ckpt, self.fp)
        if st["n_segments"] != len(segs):
            raise EnsembleError(f"{self.ckpt}: checkpoint expects {st['n_segments']} committed segments "
                                f"of chain {self.chain}, found {len(segs)} in {self.root}")
        return st

    def _snapshot(self, U: torch.Tensor, step: int, n_rows: int, n_segments: int) -> dict[str, Any]:
        Ug = self.comm.gather_field(U, self.lat) if self.comm.size > 1 else U
        return {"U": Ug.detach().cpu().clone(), "step": step, "n_rows": n_rows, "n_segments": n_segments,
                "chain": self.chain, "rng": self.rng.state_dict(), "algorithm": self.cfg.algorithm}

    def _checkpoint(self, state: dict[str, Any], path: str) -> None:
        self._ckpt_step = state["step"]
        if self.comm.is_root:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            save_checkpoint(path, state, self.fp)
        self.comm.barrier()

    def _commit(self, seg: SegmentWriter, U: torch.Tensor, step: int, n_rows: int, n_segments: int) -> None:
        seg.prepare()
        self._checkpoint(self._snapshot(U, step, n_rows, n_segments), self.ckpt_next)
        seg.publish()  # commit point
        if self.comm.is_root:
            os.replace(self.ckpt_next, self.ckpt)
            fsync_dir(os.path.dirname(self.ckpt))
        self.comm.barrier()

    # -- the chain -------------------------------------------------------------------------
    def run(self, resume: bool | None = None) -> int:
        from hpcflow.comm.fields import local_from_global
        from hpcflow.lattice.action import average_plaquette, wilson_action
        from hpcflow.lattice.groups import cold_field, get_group, random_field

        cfg, comm, lat = self.cfg, self.comm, self.lat
        st: dict[str, Any] | None = None
        err: BaseException | None = None
        if comm.is_root:
            try:
                os.makedirs(self.root, exist_ok=True)
                st = self._recover(resume)
            except (CheckpointError, EnsembleError, OSError) as e:
                err = e
        comm.any_error(err)
        st = comm.bcast_object(st)
        self.attrs = ensemble_attrs(cfg, self.chain, comm)
        if st is None:
            group = get_group(cfg.group)
            if cfg.run.start == "hot":
                U = random_field(lat, group, self.rng, step=0, dtype=self.dtype, device=self.device)
            else:
                U = cold_field(lat, group, dtype=self.dtype, device=self.device)
            step, n_rows, n_seg = 0, 0, 0
            self._ckpt_step = -1
        else:
            Ug = st["U"].to(self.dtype)
            U = (local_from_global(Ug, lat) if comm.size > 1 else Ug).to(self.device)
            step, n_rows, n_seg = int(st["step"]), int(st["n_rows"]), int(st["n_segments"])
            self.rng.load_state_dict(st["rng"])
            self._ckpt_step = step
        seg: SegmentWriter | None = None
        while step < self.total:
            step += 1
            U, accepted = self.update(U, step)
            if self._stored(step):
                if seg is None:
                    cap = min(self.K, self.n_rows_total - n_rows)
                    seg = SegmentWriter(self.root, self.chain, n_seg, lat, cap, self.dtype,
                                        cfg.n_colors, self.attrs, comm if comm.size > 1 else None)
                U = comm.exchange(U, lat)  # valid halos for the measurements below
                S = float(wilson_action(U, lat, cfg.action.beta, comm=comm))
                plaq = float(average_plaquette(U, lat, comm=comm))
                seg.append(U, {"chain": self.chain, "step": step, "accepted": int(accepted),
                               "multiplicity": 1, "S": S, "log_q": math.nan, "log_w": math.nan,
                               "plaquette": plaq})
                n_rows += 1
                if len(seg) == seg.capacity:
                    n_seg += 1
                    self._commit(seg, U, step, n_rows, n_seg)
                    seg = None
            stop = any(comm.allgather_object(self.stop.stop_requested))
            if stop and step < self.total:
                if seg is not None and len(seg):
                    n_seg += 1
                    self._commit(seg, U, step, n_rows, n_seg)
                else:
                    self._checkpoint(self._snapshot(U, step, n_rows, n_seg), self.ckpt)
                return EXIT_RESUMABLE
        if seg is not None:  # cannot happen: capacities add up to n_rows_total
            seg.abort()
        if self._ckpt_step != step:  # steps after the last stored row (measure_every > 1)
            self._checkpoint(self._snapshot(U, step, n_rows, n_seg), self.ckpt)
        return EXIT_OK


def _group_comm(cfg: Config) -> tuple[int, Any, Any, Any]:
    """(chain index, group comm, group lattice, world comm) for this rank."""
    from hpcflow.comm import LatticeComm, ProcessGrid

    n = cfg.sample.n_workers
    world = ProcessGrid(cfg.lattice.shape, None)
    if world.size % n:
        raise ConfigError(f"{cfg.source}: key 'sample.n_workers': got {n}; allowed: a divisor of the "
                          f"{world.size} MPI ranks")
    chain, sub = world.split(n, cfg.grid)
    lc = LatticeComm(sub)
    return chain, lc, lc.local_lattice(halo=1), LatticeComm(world)


def sample(cfg: Config, resume: bool | None = None, stop: StopFlag | None = None,
           use_mpi: bool | None = None) -> int:
    """Run every chain of ``cfg`` to completion or to a stop signal; returns the exit status.

    ``resume``: None = continue if a checkpoint exists, else start; True = must continue;
    False = must start fresh (refuses to touch an existing ensemble). ``use_mpi``: None =
    MPI when launched with several ranks (``OMPI_COMM_WORLD_SIZE``/``PMI_SIZE``) or a grid
    or several workers is configured. Exit status: 0 done, 3 stopped and resumable.
    """
    if use_mpi is None:
        env = os.environ.get("OMPI_COMM_WORLD_SIZE") or os.environ.get("PMI_SIZE") or "1"
        use_mpi = int(env) > 1 or cfg.sample.n_workers > 1 or cfg.grid not in (None, (1,) * cfg.nd)
    flag = stop if stop is not None else StopFlag()
    with flag:
        if use_mpi:
            chain, comm, lat, world = _group_comm(cfg)
        else:
            from hpcflow.lattice.geometry import Lattice

            if cfg.sample.n_workers != 1:
                raise ConfigError(f"{cfg.source}: key 'sample.n_workers': got {cfg.sample.n_workers}; "
                                  "allowed: 1 without MPI")
            chain, comm, lat, world = 0, _Serial(), Lattice(cfg.lattice.shape), _Serial()
        err: BaseException | None = None
        runner = None
        try:
            runner = ChainRunner(cfg, chain, comm, lat, flag)
        except (ConfigError, ValueError) as e:
            err = e
        world.any_error(err)
        assert runner is not None
        code = runner.run(resume)
        codes = world.allgather_object(code)
    return max(codes)


def main(argv: list[str] | None = None) -> int:
    """``python -m hpcflow.sampling.production CONFIG [--set k=v ...] [--fresh|--resume]``."""
    import argparse

    from hpcflow.config import load_config

    p = argparse.ArgumentParser(prog="python -m hpcflow.sampling.production")
    p.add_argument("config")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", dest="resume", action="store_const", const=True, default=None)
    g.add_argument("--fresh", dest="resume", action="store_const", const=False)
    a = p.parse_args(argv)
    try:
        cfg = load_config(a.config, a.overrides)
        return sample(cfg, resume=a.resume)
    except (ConfigError, CheckpointError, EnsembleError, ValueError) as e:
        print(f"hpcflow: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
