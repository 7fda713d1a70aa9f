"""Production sampling: worker groups, ensembles, crash-safe commits, signals and resume.

``sample(cfg, resume=None) -> exit status`` runs ``sample.n_workers`` independent Markov
chains. The world's ranks are split into consecutive worker groups
(``ProcessGrid.split``); group ``c`` runs chain ``c`` on its own process grid with its own
random stream ``CounterRNG(seed, stream=c)`` (chain 0 is the chain of ``hpcflow run``).

Chain loop (HMC or heat bath + overrelaxation): Markov step ``s = 1, 2, ...`` uses RNG
counter ``s``; after ``run.n_therm`` steps every ``run.measure_every``-th configuration is
stored, ``run.n_steps`` steps in all after thermalisation. Stored rows go into segment
files of ``sample.checkpoint_every`` rows (``hpcflow.io.ensemble``).

Flow and mixed chains (``algorithm: flow | mixed``): the model is loaded from
``<output.dir>/train/checkpoint.pt`` (written by ``hpcflow train``; its sha256 goes into
the file attributes and the chain checkpoint); ``sample.n_therm`` + ``sample.n_steps``
Markov steps, independence Metropolis with aligned proposal batches, optionally in the
``mixed.pattern`` with heat bath/HMC (:class:`_FlowUpdates`). Rows carry ``S``, ``log q``,
``log w = -S - log q``, the accepted flag and the plaquette. The chain checkpoint holds the
Metropolis state (current configuration in the model's variables, ``S``, ``log q``,
``log w``, gathered to the global field) and the next proposal number. The model runs as a
:class:`hpcflow.flows.distributed.DistributedFlow`: a worker group of several ranks (grid
from ``grid:``) runs one ``algorithm: flow`` chain with each rank holding its sub-lattice and
writing its hyperslab; proposals are keyed on global link indices, so the ensemble equals the
one-rank ensemble configuration for configuration. Chain 0 is the chain of ``hpcflow run``
(:func:`hpcflow.sampling.flow_chains.flow_chain`: same proposal numbering and accept draws).
Mixed chains run on one rank per worker group.

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

One writer: :func:`sample` holds the lock of ``output.dir`` (``hpcflow.run.outdir``) from
before it reads anything until it returns; ``fresh=True`` (``--fresh``) first moves the
ensemble and the chain checkpoints aside into ``<output.dir>/previous-<UTC time>/``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any

import torch

from hpcflow.analysis.reweighting import WeightStats
from hpcflow.backend import run_backend
from hpcflow.config import Config, ConfigError, config_to_dict, flow_fingerprint_part, to_yaml
from hpcflow.dtypes import precision_dtypes
from hpcflow.exit_codes import EXIT_BAD_INPUT, EXIT_OK, EXIT_RESUMABLE
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
    check_tail,
    committed_segments,
    remove_uncommitted,
)
from hpcflow.progress import ChainProgress, time_split
from hpcflow.run.autoplots import write_plots_safely
from hpcflow.run.chains import load_model, model_checkpoint_path, update_of_config
from hpcflow.run.world import agree_error, environment_errors, environment_failure, launched_size
from hpcflow.sampling.chain import Chain
from hpcflow.sampling.updates import LOCAL_STREAM_OFFSET
from hpcflow.signals import StopFlag

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_OK",
    "EXIT_RESUMABLE",
    "FLOW_ALGORITHMS",
    "LOCAL_STREAM_OFFSET",
    "EnsembleSink",
    "chain_checkpoint_path",
    "chain_of_config",
    "ensemble_attrs",
    "ensemble_dir",
    "load_model",
    "main",
    "model_checkpoint_path",
    "sample",
]

FLOW_ALGORITHMS = ("flow", "mixed")
#: The ``kind`` row column: the update of the step that produced the row (``heatbath``,
#: ``hmc``, ``flow``), as ASCII bytes.
KIND_DTYPE = "S16"

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
    keys = _FINGERPRINT_KEYS
    if cfg.algorithm in FLOW_ALGORITHMS:
        # the proposal batch is in: batched forward passes need not be bitwise batch-independent
        flat.update(flow=flow_fingerprint_part(d["flow"]), mixed=d["mixed"], sample_n_therm=d["sample"]["n_therm"],
                    batch=d["sample"]["batch"])
        keys = keys + ("flow", "mixed", "sample_n_therm", "batch")
    return config_fingerprint(flat, keys)


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


class EnsembleSink:
    """The ensemble of one chain of a worker group: segment files, commits, chain checkpoint.

    Implements the chain-sink protocol of :mod:`hpcflow.sampling.chain` with the two-phase
    commit of the module docstring: stored states fill segments of ``checkpoint_every`` rows;
    a full segment is prepared, the checkpoint after its last row written to ``.ckpt.next``,
    the segment renamed (the commit) and the checkpoint promoted. A stop commits the partial
    segment (or just checkpoints); :meth:`recover` cleans up after a crash and verifies the
    checkpoint against the committed segments before anything is touched.
    """

    def __init__(self, cfg: Config, chain: int, comm: Any, lat: Any, dtype: torch.dtype,
                 n_rows_total: int, model_sha256: str, rng: Any, measurer: Any = None) -> None:
        from hpcflow.run.measurements import Measurer

        self.cfg, self.chain, self.comm, self.lat, self.dtype = cfg, chain, comm, lat, dtype
        # the observables of every stored configuration (those of `hpcflow run`: run == sample)
        self.measurer = measurer if measurer is not None else Measurer(cfg, lat, comm)
        self.columns: dict[str, Any] = {"kind": (KIND_DTYPE, ()), **self.measurer.columns()}
        self.measure_seconds = 0.0
        self.accepted = 0  # stored rows accepted (this process's run)
        # the chain's flow proposals' log w (carried by the checkpoints: whole chain on resume)
        self.weights = WeightStats()
        self._counted = 0  # the last step whose proposal is in self.weights
        self.stored = 0
        self.root = ensemble_dir(cfg)
        self.ckpt = chain_checkpoint_path(cfg, chain)
        self.ckpt_next = self.ckpt + ".next"
        self.fp = _fingerprint(cfg)
        self.K = cfg.sample.checkpoint_every
        self.n_rows_total = n_rows_total
        self.model_sha256, self.rng = model_sha256, rng
        self.attrs: dict[str, Any] = {}
        self.n_rows = self.n_seg = 0
        self.seg: SegmentWriter | None = None
        self._ckpt_step = -1
        self.snapshot: Any = None  # set by the Chain

    # -- recovery -------------------------------------------------------------------------
    def _recover_root(self, resume: bool | None) -> dict[str, Any] | None:
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
        if have:  # verify before touching anything else
            st = load_checkpoint(self.ckpt, self.fp)
            if st.get("model_sha256", "") != self.model_sha256:
                raise CheckpointError(
                    f"{self.ckpt}: the chain was sampled with the model of sha256 "
                    f"{str(st.get('model_sha256'))[:12]}..., but {model_checkpoint_path(self.cfg)} now has "
                    f"sha256 {self.model_sha256[:12]}...; restore that model or use a fresh output.dir")
            # the committed tail must be this run's, whole and intact: never append after a
            # foreign, truncated or corrupt segment (read-only; one line naming what to move)
            check_tail(self.root, self.chain, self.fp, n_segments=int(st["n_segments"]),
                       n_rows=int(st["n_rows"]), checkpoint=self.ckpt)
        remove_uncommitted(self.root, self.chain)
        if not have:
            if segs:
                raise EnsembleError(f"{self.root}: chain {self.chain} has {len(segs)} committed segments "
                                    f"but no checkpoint {self.ckpt}; refusing to overwrite them")
            return None
        if st["n_segments"] != len(segs):
            raise EnsembleError(f"{self.ckpt}: checkpoint expects {st['n_segments']} committed segments "
                                f"of chain {self.chain}, found {len(segs)} in {self.root}")
        return st

    def recover(self, resume: bool | None) -> dict[str, Any] | None:
        comm = self.comm
        st: dict[str, Any] | None = None
        err: BaseException | None = None
        if comm.is_root:
            try:
                os.makedirs(self.root, exist_ok=True)
                st = self._recover_root(resume)
            except (CheckpointError, EnsembleError, OSError) as e:
                err = e
        agree_error(comm, err)  # the same error class and message on every rank of the group
        st = comm.bcast_object(st)
        self.attrs = ensemble_attrs(self.cfg, self.chain, comm, self.model_sha256)
        if self.measurer.flow_times:  # the flow-time grid of the t2E_* columns
            self.attrs["flow_times"] = list(self.measurer.flow_times)
            self.attrs["flow_every"] = int(self.measurer.flow_every)
        if st is not None:
            self.n_rows, self.n_seg = int(st["n_rows"]), int(st["n_segments"])
            self.rng.load_state_dict(st["rng"])
            self._ckpt_step = int(st["step"])
            self._counted = int(st["step"])
            if st.get("proposal_weights"):  # the chain's proposals up to the checkpoint
                self.weights = WeightStats.from_dict(st["proposal_weights"])
        if comm.is_root:  # the resume point of every chain (one line per worker group)
            print(f"hpcflow sample: chain {self.chain}: " + (
                "fresh start" if st is None else
                f"resuming after step {int(st['step'])} ({self.n_rows} configurations in {self.n_seg} "
                "segments committed)"), flush=True)
        return st

    # -- files ----------------------------------------------------------------------------
    def fields(self) -> dict[str, Any]:
        return {"n_rows": self.n_rows, "n_segments": self.n_seg, "chain": self.chain,
                "rng": self.rng.state_dict(), "algorithm": self.cfg.algorithm,
                "model_sha256": self.model_sha256, "proposal_weights": self.weights.as_dict()}

    def _checkpoint(self, state: dict[str, Any], path: str) -> None:
        self._ckpt_step = state["step"]
        self._root_writes(save_checkpoint, path, state, self.fp)

    def _root_writes(self, fn: Any, path: str, *args: Any) -> None:
        """``fn(path, *args)`` on the root rank; collective: a failure (a full disk: exit 4,
        naming ``path``) is raised on every rank of the group, which would otherwise wait for
        the root in their next collective."""
        err: BaseException | None = None
        if self.comm.is_root:
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                fn(path, *args)
            except Exception as e:  # noqa: BLE001 - agreed with the group, then raised
                err = environment_failure(e, (os.path.dirname(path),), path=path) or e
        agree_error(self.comm, err)

    def _promote(self, path: str) -> None:
        os.replace(self.ckpt_next, path)
        fsync_dir(os.path.dirname(path))

    def _commit(self, step: int) -> None:
        assert self.seg is not None
        self.n_seg += 1
        try:
            self.seg.prepare()
            self._checkpoint(self.snapshot(step), self.ckpt_next)
        except Exception:
            # not committed: the prepared (closed) temporary segment goes now (a resume would
            # delete it too); a segment that failed while being written was discarded already
            self.seg.abort()
            self.seg = None
            raise
        self.seg.publish()  # commit point
        self.seg = None
        self._root_writes(self._promote, self.ckpt)

    # -- the chain's calls ------------------------------------------------------------------
    def on_step(self, step: int, info: Any) -> None:
        self._count(step, info)

    def _count(self, step: int, info: Any) -> None:
        """The chain's proposals for the summary's ESS and largest weight, each step once: from
        :meth:`store` (before a commit's checkpoint, which must hold this step's) or from
        :meth:`on_step` (steps that are not stored)."""
        if step > self._counted:
            self._counted = step
            if info.proposal is not None:
                self.weights.add(info.proposal["log_w"])

    def store(self, step: int, info: Any, update: Any) -> None:
        comm = self.comm
        self._count(step, info)
        if self.seg is None:
            cap = min(self.K, self.n_rows_total - self.n_rows)
            self.seg = SegmentWriter(self.root, self.chain, self.n_seg, self.lat, cap, self.dtype,
                                     self.cfg.n_colors, self.attrs, comm if comm.size > 1 else None,
                                     fingerprint=self.fp, columns=self.columns)
        U = update.links()
        rec = update.row()
        t = time.perf_counter()
        m = self.measurer(U, self.n_rows)  # index: the stored configurations before it
        self.measure_seconds += time.perf_counter() - t
        # S, log q, log w from the update (a flow chain's from the model); the rest measured on
        # the links, as `hpcflow run` measures them
        rec = {**rec, **{k: v for k, v in m.items() if k not in ("S", "log_q", "log_w")}}
        self.seg.append(U, {"chain": self.chain, "step": step, "accepted": int(info.accepted),
                            "multiplicity": 1, "kind": info.kind.encode(), **rec})
        self.stored += 1
        self.accepted += int(info.accepted)
        self.n_rows += 1
        if len(self.seg) == self.seg.capacity:
            self._commit(step)

    def stop(self, step: int) -> None:
        if self.seg is not None and len(self.seg):
            self._commit(step)
        else:
            self._checkpoint(self.snapshot(step), self.ckpt)

    def finish(self, step: int) -> None:
        if self.seg is not None:  # cannot happen: capacities add up to n_rows_total
            self.seg.abort()
        if self._ckpt_step != step:  # steps after the last stored row (measure_every > 1)
            self._checkpoint(self.snapshot(step), self.ckpt)


def chain_of_config(cfg: Config, chain: int, comm: Any, lat: Any, stop: Any) -> Chain:
    """Chain ``chain`` of ``hpcflow sample`` (``hpcflow run`` is chain 0 of it).

    ``hmc``/``heatbath``: ``run.n_therm`` + ``run.n_steps`` steps on the group's process
    grid. ``flow``/``mixed``: ``sample.n_therm`` + ``sample.n_steps`` Markov steps with the
    model of ``<output.dir>/train/checkpoint.pt`` (``flow``: any number of ranks per chain,
    domain-decomposed; ``mixed``: one rank per chain). Every ``run.measure_every``-th step
    after thermalisation is stored.
    """
    from hpcflow.rng import CounterRNG

    if cfg.algorithm not in ("hmc", "heatbath") + FLOW_ALGORITHMS:
        raise ConfigError(f"{cfg.source}: key 'algorithm': got {cfg.algorithm}; production sampling "
                          f"supports hmc, heatbath, {', '.join(FLOW_ALGORITHMS)}")
    flow = cfg.algorithm in FLOW_ALGORITHMS
    if flow and comm.size > 1 and cfg.algorithm != "flow":
        raise ConfigError(
            f"{cfg.source}: key 'sample.n_workers': got {cfg.sample.n_workers} with {comm.size} ranks "
            f"per chain; algorithm {cfg.algorithm} (flow steps mixed with heat bath/HMC) runs on one "
            "rank per chain; allowed: algorithm flow on several ranks per chain, or one rank per "
            "chain (sample.n_workers = number of MPI ranks)")
    update, lat, sha = update_of_config(cfg, chain, comm, lat)
    n_therm = cfg.sample.n_therm if flow else cfg.run.n_therm
    n_steps = cfg.sample.n_steps if flow else cfg.run.n_steps
    dtype = precision_dtypes(cfg.precision)[0]
    sink = EnsembleSink(cfg, chain, comm, lat, dtype, n_steps // cfg.run.measure_every, sha,
                        CounterRNG(cfg.seed, stream=chain))
    return Chain(update, sink, comm, n_therm, n_steps, cfg.run.measure_every, stop=stop)


def _group_comm(cfg: Config) -> tuple[int, Any, Any, Any]:
    """(chain index, group comm, group lattice, world comm) for this rank."""
    from hpcflow.comm import LatticeComm, ProcessGrid

    n = cfg.sample.n_workers
    try:
        world = ProcessGrid(cfg.lattice.shape, None)
    except ValueError as e:  # more ranks than sites, or no grid of that many ranks fits
        raise ConfigError(f"{cfg.source}: key 'lattice.shape': {e}") from None
    if world.size % n:
        raise ConfigError(f"{cfg.source}: key 'sample.n_workers': got {n}; allowed: a divisor of the "
                          f"{world.size} MPI ranks")
    try:  # checked on every rank before the collective split: the same error everywhere
        chain, sub = world.split(n, cfg.grid)
    except ValueError as e:
        raise ConfigError(f"{cfg.source}: key 'grid': {e} (per worker group of {world.size // n} "
                          f"ranks: sample.n_workers = {n})") from None
    lc = LatticeComm(sub)
    lat = dataclasses.replace(lc.local_lattice(halo=1), backend=run_backend(cfg))
    return chain, lc, lat, LatticeComm(world)


def sample(cfg: Config, resume: bool | None = None, stop: StopFlag | None = None,
           use_mpi: bool | None = None, fresh: bool = False) -> int:
    """Run every chain of ``cfg`` to completion or to a stop signal; returns the exit status.

    ``resume``: None = continue if a checkpoint exists, else start; True = must continue;
    False = must start fresh (refuses to touch an existing ensemble). ``fresh``: move an
    existing ensemble and its chain checkpoints aside first, then start fresh (``--fresh``).
    ``use_mpi``: None = MPI when launched with several ranks (``hpcflow.run.world.
    launched_size``) or a grid or several workers is configured. The lock of ``output.dir``
    is held throughout. Exit status: 0 done, 3 stopped and resumable.
    """
    from hpcflow.run.outdir import output_dir
    from hpcflow.run.resources import check_memory

    # bounds before work: a job that cannot fit is refused before anything is allocated or written
    check_memory(cfg, "sample", ranks_per_chain=max(1, launched_size() // max(1, cfg.sample.n_workers)))
    if fresh:
        resume = False
    if use_mpi is None:
        use_mpi = launched_size() > 1 or cfg.sample.n_workers > 1 or cfg.grid not in (None, (1,) * cfg.nd)
    flag = stop if stop is not None else StopFlag()
    # a full disk, a read-only file system, permission denied in the output: exit 4, one line
    with environment_errors(cfg.output.dir, ensemble_dir(cfg)), flag, \
            output_dir(cfg, "sample", resume=None if fresh else resume, fresh=fresh, use_mpi=use_mpi):
        if use_mpi:
            chain, comm, lat, world = _group_comm(cfg)
        else:
            from hpcflow.lattice.geometry import Lattice, SerialComm

            if cfg.sample.n_workers != 1:
                raise ConfigError(f"{cfg.source}: key 'sample.n_workers': got {cfg.sample.n_workers}; "
                                  "allowed: 1 without MPI")
            comm = world = SerialComm()
            chain, lat = 0, Lattice(cfg.lattice.shape, backend=run_backend(cfg))
        err: BaseException | None = None
        runner = None
        try:
            runner = chain_of_config(cfg, chain, comm, lat, flag)
        except (ConfigError, CheckpointError) as e:
            err = e
        except ValueError as e:  # a setting the chain cannot use: one line, exit 2
            err = ConfigError(f"{cfg.source}: {e}")
        agree_error(world, err)
        assert runner is not None
        say = print if world.is_root else (lambda *a, **k: None)
        say(_start_line(cfg, world.size), flush=True)
        bar = None
        if chain == 0 and comm.is_root:  # chain 0's progress: a bar on a terminal, lines in a batch log
            bar = runner.progress = ChainProgress(runner, cfg.run.progress, "hpcflow sample chain 0")
        t0 = time.perf_counter()
        try:
            code = runner.run(resume)
        finally:
            if bar is not None:
                bar.close()
        sink = runner.sink
        assert isinstance(sink, EnsembleSink)
        mine = ((chain, sink.n_rows, sink.stored, sink.accepted, sink.measure_seconds, sink.weights.as_dict())
                if comm.is_root else None)
        gathered = world.allgather_object((code, mine))
        codes = [c for c, _ in gathered]
        say(_closing_line(cfg, [m for _, m in gathered if m is not None], max(codes), flag,
                          time.perf_counter() - t0), flush=True)
    if max(codes) == EXIT_OK and cfg.run.plots and world.is_root:
        write_plots_safely(cfg.output.dir, say)
    return max(codes)


def _start_line(cfg: Config, ranks: int) -> str:
    n = cfg.sample.n_workers
    flow = cfg.algorithm in FLOW_ALGORITHMS
    n_therm = cfg.sample.n_therm if flow else cfg.run.n_therm
    n_steps = cfg.sample.n_steps if flow else cfg.run.n_steps
    return (f"hpcflow sample: {cfg.source}: {cfg.algorithm} {cfg.group} {'x'.join(map(str, cfg.lattice.shape))} "
            f"beta={cfg.action.beta}; {n} chain{'s' if n > 1 else ''} x {ranks // max(1, n)} rank(s); per chain "
            f"{n_therm} + {n_steps} steps, every {cfg.run.measure_every}-th stored "
            f"({n_steps // cfg.run.measure_every} configurations) in segments of {cfg.sample.checkpoint_every}; "
            f"ensemble {ensemble_dir(cfg)}")


def _closing_line(cfg: Config, chains: list[Any], code: int, flag: Any, elapsed: float) -> str:
    """The closing summary: configurations committed, acceptance, time and its split."""
    committed = sum(int(m[1]) for m in chains)
    stored = sum(int(m[2]) for m in chains)
    acc = sum(int(m[3]) for m in chains)
    meas = max([float(m[4]) for m in chains] or [0.0])
    head = ("hpcflow sample: done" if code == EXIT_OK else
            f"hpcflow sample: stopped by {getattr(flag, 'signal_name', None) or 'a signal'}")
    line = (f"{head}: {committed} configurations committed in {len(chains)} chain{'s' if len(chains) != 1 else ''} "
            f"({stored} this run")
    if stored and cfg.algorithm != "heatbath":
        line += f", acceptance {acc / stored:.3f}"
    line += f"); {time_split(elapsed, meas).removeprefix('hpcflow: ')}"
    if code != EXIT_OK:
        line += "; rerun the same command to resume"
    ws = WeightStats()
    for m in chains:
        ws = ws.merge(WeightStats.from_dict(m[5]))
    if ws.n:
        line += "\n" + proposal_line(ws)
    return line


def proposal_line(ws: WeightStats) -> str:
    """The flow proposals of the chains (all chains: one flow; a resumed chain's from its start,
    as its checkpoints carry the summary): ESS per proposal, the effective
    count, the largest normalised weight, and a warning when they are too few or one dominates
    (``hpcflow measure`` then gives the chains' errors and their short-chain warnings)."""
    from hpcflow.analysis.reweighting import HEAVY_WEIGHT, MIN_EFFECTIVE

    n_eff = max(1.0, ws.n * min(ws.ess, ws.ess_lognormal if ws.n > 1 else 1.0))
    line = (f"hpcflow sample: flow proposals: {ws.n}, ESS per proposal {ws.ess:.3g} (log-normal "
            f"estimate {ws.ess_lognormal:.3g}; {n_eff:.1f} effective), largest normalised weight {ws.max_weight:.3g}")
    bad = []
    if n_eff < MIN_EFFECTIVE:
        bad.append(f"fewer than {MIN_EFFECTIVE} effective proposals")
    if ws.max_weight > HEAVY_WEIGHT:
        bad.append(f"one proposal carries {ws.max_weight:.0%} of the weight")
    if bad:
        line += ("\nhpcflow: warning: " + " and ".join(bad) + ": heavy-tailed importance weights; the chain "
                 "sticks and its errors need many tau_int (check `hpcflow measure`, train the flow longer)")
    return line


def main(argv: list[str] | None = None) -> int:
    """``python -m hpcflow.run.sample CONFIG [--set k=v ...] [--fresh|--resume]``: the same as
    ``hpcflow sample ...`` (errors and exit codes as the CLI, also under MPI)."""
    import argparse

    from hpcflow.config import load_config
    from hpcflow.run.world import run_guarded

    p = argparse.ArgumentParser(prog="python -m hpcflow.run.sample")
    p.add_argument("config")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", dest="resume", action="store_const", const=True, default=None)
    g.add_argument("--fresh", action="store_true")
    a = p.parse_args(argv)
    return run_guarded(lambda: sample(load_config(a.config, a.overrides), resume=a.resume,
                                      fresh=a.fresh), mpi=True)


if __name__ == "__main__":
    sys.exit(main())
