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
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from typing import Any

import torch

from hpcflow.backend import run_backend
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
    "FLOW_ALGORITHMS",
    "LOCAL_STREAM_OFFSET",
    "ChainRunner",
    "chain_checkpoint_path",
    "ensemble_attrs",
    "ensemble_dir",
    "load_model",
    "main",
    "model_checkpoint_path",
    "sample",
]

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_RESUMABLE = 3  # == hpcflow.cli.EXIT_RESUMABLE: "stopped, checkpoint written, rerun to continue"
FLOW_ALGORITHMS = ("flow", "mixed")
# local updates (heat bath, HMC) of mixed chain c draw from stream LOCAL_STREAM_OFFSET + c, so
# they never reuse a number of the flow proposals/accepts (stream c) of any chain
LOCAL_STREAM_OFFSET = 2**32

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
        flat.update(flow=d["flow"], mixed=d["mixed"], sample_n_therm=d["sample"]["n_therm"],
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


class _LocalUpdates:
    """HMC or heat bath + overrelaxation on the group's (domain-decomposed) link field."""

    def __init__(self, cfg: Config, lat: Any, comm: Any, rng: Any, dtype: torch.dtype,
                 device: torch.device) -> None:
        from hpcflow.lattice.groups import get_group

        self.cfg, self.lat, self.comm, self.rng = cfg, lat, comm, rng
        self.group = get_group(cfg.group)
        self.dtype, self.device = dtype, device
        beta = cfg.action.beta
        if cfg.algorithm == "hmc":
            from hpcflow.sampling.hmc import HMC

            self._hmc = HMC(lat, self.group, beta, cfg.hmc.n_steps, cfg.hmc.tau, cfg.hmc.integrator, rng,
                            comm=comm, lam=cfg.hmc.lam)
        self.U: torch.Tensor | None = None

    def start(self, st: dict[str, Any] | None) -> None:
        from hpcflow.comm.fields import local_from_global
        from hpcflow.lattice.groups import cold_field, random_field

        if st is None:
            if self.cfg.run.start == "hot":
                self.U = random_field(self.lat, self.group, self.rng, step=0, dtype=self.dtype,
                                      device=self.device)
            else:
                self.U = cold_field(self.lat, self.group, dtype=self.dtype, device=self.device)
            return
        Ug = st["U"].to(self.dtype)
        self.U = (local_from_global(Ug, self.lat) if self.comm.size > 1 else Ug).to(self.device)

    def advance(self, step: int) -> bool:
        from hpcflow.sampling.heatbath import heatbath_sweep, overrelax_sweep

        assert self.U is not None
        if self.cfg.algorithm == "hmc":
            self.U, acc, _ = self._hmc.trajectory(self.U, step)
            return bool(acc)
        beta = self.cfg.action.beta
        U = heatbath_sweep(self.U, self.lat, self.group, beta, self.rng, step, comm=self.comm)
        for _ in range(self.cfg.heatbath.n_overrelax):
            U = overrelax_sweep(U, self.lat, self.group, beta, comm=self.comm)
        self.U = U
        return True

    def row(self) -> tuple[torch.Tensor, dict[str, float]]:
        from hpcflow.lattice.action import average_plaquette, wilson_action

        assert self.U is not None
        self.U = self.comm.exchange(self.U, self.lat)  # valid halos for the measurements
        S = float(wilson_action(self.U, self.lat, self.cfg.action.beta, comm=self.comm))
        plaq = float(average_plaquette(self.U, self.lat, comm=self.comm))
        return self.U, {"S": S, "log_q": math.nan, "log_w": math.nan, "plaquette": plaq}

    def state(self) -> dict[str, Any]:
        assert self.U is not None
        Ug = self.comm.gather_field(self.U, self.lat) if self.comm.size > 1 else self.U
        return {"U": Ug.detach().cpu().clone()}


class _FlowUpdates:
    """Independence Metropolis with flow proposals, alone or in a mixed pattern with local updates.

    ``model`` is a :class:`hpcflow.flows.distributed.DistributedFlow` (one code path for one
    rank and for a worker group of several ranks, each holding its sub-lattice with halos);
    everything theory-specific goes through its hooks (``action``, ``observables``,
    ``to_links``, ``from_links``), so U(1) and SU(N) flows run the same chain. Markov step
    ``s`` (1-based) is ``pattern[(s - 1) % len(pattern)]`` (``("flow",)`` for ``algorithm:
    flow``). Flow step number ``p`` (0-based, over the chain) uses proposal ``p``: prior draws
    keyed on (global link, ``p``) and the accept uniform at index ``p``, step ``ACCEPT_STEP``,
    of ``CounterRNG(seed, stream=chain)``; it accepts with probability ``min(1, w'/w)``,
    ``log w = -S - log q`` (ALGORITHMS.md). This is the layout of
    :func:`hpcflow.sampling.flow_chains.flow_chain` (``hpcflow run``), whose proposal and
    accept code is shared here (:func:`theory_proposals`, :func:`metropolis_accept`), so chain 0
    of ``hpcflow sample`` is the chain of ``hpcflow run``. Proposals are drawn in batches
    aligned to multiples of ``sample.batch`` (proposal ``p`` lies in batch ``p // batch``
    whatever the stop/resume history), so a resumed chain evaluates every proposal in the
    same forward pass as an uninterrupted one: bit-identical. ``S`` and ``log q`` are global
    sums (``comm.sum``, bitwise identical on every rank of the group), so the ranks of a group
    always take the same decision. Heat bath/HMC steps (one rank per chain) use
    ``CounterRNG(seed, stream=LOCAL_STREAM_OFFSET + chain)`` keyed on ``s``; after them the
    state did not come from the flow, and its ``log q`` is recomputed by the inverse flow
    (``model.log_prob``) when a row is stored or the next flow step needs it. Checkpoints hold
    the *global* state (gathered), so they do not depend on the decomposition.
    """

    def __init__(self, cfg: Config, chain: int, lat: Any, comm: Any, model: Any) -> None:
        from hpcflow.lattice.groups import get_group
        from hpcflow.rng import CounterRNG

        self.cfg, self.lat, self.comm, self.model = cfg, lat, comm, model
        self.group = get_group(cfg.group)
        self.cdtype = torch.complex64 if cfg.precision == "float32" else torch.complex128
        self.frng = CounterRNG(cfg.seed, stream=chain)
        self.lrng = CounterRNG(cfg.seed, stream=LOCAL_STREAM_OFFSET + chain)
        self.pattern = ("flow",) if cfg.algorithm == "flow" else tuple(cfg.mixed.pattern)
        self.batch = int(cfg.sample.batch)
        if "hmc" in self.pattern:
            from hpcflow.sampling.hmc import HMC

            self._hmc = HMC(lat, self.group, cfg.action.beta, cfg.hmc.n_steps, cfg.hmc.tau,
                            cfg.hmc.integrator, self.lrng, comm=comm, lam=cfg.hmc.lam)
        self.x: torch.Tensor | None = None  # current state in the model's variables (local, halos valid)
        self.cur: dict[str, float] = {}
        self.p = 0  # next proposal number
        self._buf: dict[str, torch.Tensor] = {}
        self._buf_first = -1

    # -- variables -------------------------------------------------------------------------
    def links(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.to_links(x).to(self.cdtype)

    def from_links(self, U: torch.Tensor) -> torch.Tensor:
        return self.model.from_links(U)

    def _measure(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        S = self.model.action(x, self.cfg.action.beta)
        return S.to(torch.float64), self.model.observables(x)["plaquette"].to(torch.float64)

    # -- updates ---------------------------------------------------------------------------
    @torch.no_grad()
    def _proposal(self, p: int) -> int:
        from hpcflow.sampling.flow_chains import theory_proposals

        first = p - p % self.batch
        if self._buf_first != first:
            prop = theory_proposals(self.model, self.cfg.action.beta, self.frng, first, self.batch)
            self._buf = {"x": prop["U"], "S": prop["S"].to(torch.float64),
                         "log_q": prop["logq"].to(torch.float64), "log_w": prop["logw"].to(torch.float64),
                         "plaquette": prop["plaquette"].to(torch.float64)}
            self._buf_first = first
        return p - first

    @torch.no_grad()
    def _current_logw(self) -> float:
        assert self.x is not None
        if math.isnan(self.cur["log_q"]):
            lq = float(self.model.log_prob(self.x[None])[0])
            self.cur["log_q"], self.cur["log_w"] = lq, -self.cur["S"] - lq
        return self.cur["log_w"]

    def start(self, st: dict[str, Any] | None) -> None:
        if st is not None:
            x = st["x"]
            if x is not None:
                x = x.to(self.model.cdtype)
                if self.comm.size > 1:  # the checkpoint holds the global state
                    from hpcflow.comm.fields import local_from_global

                    x = local_from_global(x, self.lat, inner=self.model.inner)
            self.x = x
            self.cur = {k: float(v) for k, v in st["cur"].items()}
            self.p = int(st["p"])

    def _start_field(self) -> torch.Tensor:
        from hpcflow.lattice.groups import cold_field, random_field

        if self.cfg.run.start == "hot":  # step 0 of the local stream: no update uses it
            U = random_field(self.lat, self.group, self.lrng, step=0, dtype=self.cdtype)
        else:
            U = cold_field(self.lat, self.group, dtype=self.cdtype)
        return self.from_links(U)

    @torch.no_grad()
    def advance(self, step: int) -> bool:
        from hpcflow.sampling.heatbath import heatbath_or_sweep
        from hpcflow.sampling.metropolis import ACCEPT_STEP, metropolis_accept

        kind = self.pattern[(step - 1) % len(self.pattern)]
        if kind == "flow":
            j = self._proposal(self.p)
            u = self.frng.uniform(torch.tensor([self.p]), ACCEPT_STEP, 1)[:, 0]
            # the very first state of a pure flow chain is its first proposal (log w0 = -inf,
            # as in flow_chain: exact from there on)
            lw0 = -math.inf if self.x is None else self._current_logw()
            _, accepted = metropolis_accept(self._buf["log_w"][j : j + 1], lw0, u)
            acc = bool(accepted[0])
            if acc:
                self.x = self._buf["x"][j].clone()
                self.cur = {k: float(self._buf[k][j]) for k in ("S", "log_q", "log_w", "plaquette")}
            self.p += 1
            return acc
        if self.x is None:
            self.x = self._start_field()
        U = self.links(self.x)
        if kind == "heatbath":
            U = heatbath_or_sweep(U, self.lat, self.group, self.cfg.action.beta, self.lrng, step,
                                  self.cfg.heatbath.n_overrelax)
            acc = True
        else:
            U, acc, _ = self._hmc.trajectory(U, step)
        self.x = self.from_links(U)
        S, plaq = self._measure(self.x)
        self.cur = {"S": float(S), "log_q": math.nan, "log_w": math.nan, "plaquette": float(plaq)}
        return bool(acc)

    def row(self) -> tuple[torch.Tensor, dict[str, float]]:
        assert self.x is not None
        self._current_logw()
        return self.links(self.x), dict(self.cur)

    def state(self) -> dict[str, Any]:
        x = self.x
        if x is not None and self.comm.size > 1:  # global state: decomposition-independent
            x = self.comm.gather_field(x, self.lat, inner=self.model.inner)
        return {"x": None if x is None else x.detach().cpu().clone(), "cur": dict(self.cur),
                "p": self.p, "rng_local": self.lrng.state_dict()}


def model_checkpoint_path(cfg: Config) -> str:
    """The trained flow a flow/mixed chain samples with: ``<output.dir>/train/checkpoint.pt``."""
    return os.path.join(cfg.output.dir, "train", "checkpoint.pt")


def load_model(cfg: Config, lat: Any) -> tuple[Any, str]:
    """``(model, sha256 of its checkpoint file)``; a one-line :class:`CheckpointError` ("missing
    model") when the checkpoint is absent, unreadable, or from another lattice, group,
    architecture or beta."""
    from hpcflow.flow_driver import build_model
    from hpcflow.flows.train import load_flow_checkpoint
    from hpcflow.io.checkpoint import file_sha256

    path = model_checkpoint_path(cfg)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing model: algorithm {cfg.algorithm} needs a trained flow; "
                              "run `hpcflow train CONFIG` with the same config first")
    model = build_model(cfg, lat)
    sha = file_sha256(path)
    try:
        load_flow_checkpoint(model, path, cfg.action.beta)
    except Exception as e:  # noqa: BLE001 - unpickling/shape errors of a foreign file: one clear line
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: missing model for this run: the checkpoint does not fit "
                              f"({msg})") from None
    model.eval()
    return model, sha


class ChainRunner:
    """One Markov chain of a worker group: update, store, commit, checkpoint, stop, resume.

    ``hmc``/``heatbath``: ``run.n_therm`` + ``run.n_steps`` steps on the group's process
    grid. ``flow``/``mixed``: ``sample.n_therm`` + ``sample.n_steps`` Markov steps with the
    model of ``<output.dir>/train/checkpoint.pt`` (``flow``: any number of ranks per chain,
    domain-decomposed; ``mixed``: one rank per chain). Every ``run.measure_every``-th step after
    thermalisation is stored.
    """

    def __init__(self, cfg: Config, chain: int, comm: Any, lat: Any, stop: StopFlag) -> None:
        from hpcflow.rng import CounterRNG

        if cfg.algorithm not in ("hmc", "heatbath") + FLOW_ALGORITHMS:
            raise ConfigError(f"{cfg.source}: key 'algorithm': got {cfg.algorithm}; production sampling "
                              f"supports hmc, heatbath, {', '.join(FLOW_ALGORITHMS)}")
        self.cfg, self.chain, self.comm, self.lat, self.stop = cfg, chain, comm, lat, stop
        self.root = ensemble_dir(cfg)
        self.ckpt = chain_checkpoint_path(cfg, chain)
        self.ckpt_next = self.ckpt + ".next"
        self.fp = _fingerprint(cfg)
        self.rng = CounterRNG(cfg.seed, stream=chain)
        self.dtype = torch.complex64 if cfg.precision == "float32" else torch.complex128
        self.device = torch.device(cfg.device)
        self.K = cfg.sample.checkpoint_every
        self.flow = cfg.algorithm in FLOW_ALGORITHMS
        self.n_therm = cfg.sample.n_therm if self.flow else cfg.run.n_therm
        n_steps = cfg.sample.n_steps if self.flow else cfg.run.n_steps
        self.total = self.n_therm + n_steps
        self.n_rows_total = n_steps // cfg.run.measure_every
        self.attrs: dict[str, Any] = {}
        self.model_sha256 = ""
        self.upd: _LocalUpdates | _FlowUpdates
        if self.flow:
            if comm.size > 1 and cfg.algorithm != "flow":
                raise ConfigError(
                    f"{cfg.source}: key 'sample.n_workers': got {cfg.sample.n_workers} with {comm.size} ranks "
                    f"per chain; algorithm {cfg.algorithm} (flow steps mixed with heat bath/HMC) runs on one "
                    "rank per chain; allowed: algorithm flow on several ranks per chain, or one rank per "
                    "chain (sample.n_workers = number of MPI ranks)")
            from hpcflow.flows.distributed import DistributedFlow
            from hpcflow.lattice.geometry import Lattice

            plain, self.model_sha256 = load_model(cfg, Lattice(cfg.lattice.shape, backend=run_backend(cfg)))
            try:
                # the group's ranks each transform their sub-lattice (halo = the layers' reach);
                # one rank: the same code on the whole lattice without halos
                model = DistributedFlow(plain, comm if comm.size > 1 else None)
            except ValueError as e:
                raise ConfigError(f"{cfg.source}: domain-decomposed flow: {e}") from None
            model.eval()
            self.lat = model.lat
            self.upd = _FlowUpdates(cfg, chain, model.lat, comm, model)
        else:
            self.upd = _LocalUpdates(cfg, lat, comm, self.rng, self.dtype, self.device)

    def _stored(self, step: int) -> bool:
        k = step - self.n_therm
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
        if have:  # verify before touching anything else
            st = load_checkpoint(self.ckpt, self.fp)
            if st.get("model_sha256", "") != self.model_sha256:
                raise CheckpointError(
                    f"{self.ckpt}: the chain was sampled with the model of sha256 "
                    f"{str(st.get('model_sha256'))[:12]}..., but {model_checkpoint_path(self.cfg)} now has "
                    f"sha256 {self.model_sha256[:12]}...; restore that model or use a fresh output.dir")
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

    def _snapshot(self, step: int, n_rows: int, n_segments: int) -> dict[str, Any]:
        return {**self.upd.state(), "step": step, "n_rows": n_rows, "n_segments": n_segments,
                "chain": self.chain, "rng": self.rng.state_dict(), "algorithm": self.cfg.algorithm,
                "model_sha256": self.model_sha256}

    def _checkpoint(self, state: dict[str, Any], path: str) -> None:
        self._ckpt_step = state["step"]
        if self.comm.is_root:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            save_checkpoint(path, state, self.fp)
        self.comm.barrier()

    def _commit(self, seg: SegmentWriter, step: int, n_rows: int, n_segments: int) -> None:
        seg.prepare()
        self._checkpoint(self._snapshot(step, n_rows, n_segments), self.ckpt_next)
        seg.publish()  # commit point
        if self.comm.is_root:
            os.replace(self.ckpt_next, self.ckpt)
            fsync_dir(os.path.dirname(self.ckpt))
        self.comm.barrier()

    # -- the chain -------------------------------------------------------------------------
    def run(self, resume: bool | None = None) -> int:
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
        self.attrs = ensemble_attrs(cfg, self.chain, comm, self.model_sha256)
        self.upd.start(st)
        if st is None:
            step, n_rows, n_seg = 0, 0, 0
            self._ckpt_step = -1
        else:
            step, n_rows, n_seg = int(st["step"]), int(st["n_rows"]), int(st["n_segments"])
            self.rng.load_state_dict(st["rng"])
            self._ckpt_step = step
        seg: SegmentWriter | None = None
        while step < self.total:
            step += 1
            accepted = self.upd.advance(step)
            if self._stored(step):
                if seg is None:
                    cap = min(self.K, self.n_rows_total - n_rows)
                    seg = SegmentWriter(self.root, self.chain, n_seg, lat, cap, self.dtype,
                                        cfg.n_colors, self.attrs, comm if comm.size > 1 else None)
                U, rec = self.upd.row()
                seg.append(U, {"chain": self.chain, "step": step, "accepted": int(accepted),
                               "multiplicity": 1, **rec})
                n_rows += 1
                if len(seg) == seg.capacity:
                    n_seg += 1
                    self._commit(seg, step, n_rows, n_seg)
                    seg = None
            stop = any(comm.allgather_object(self.stop.stop_requested))
            if stop and step < self.total:
                if seg is not None and len(seg):
                    n_seg += 1
                    self._commit(seg, step, n_rows, n_seg)
                else:
                    self._checkpoint(self._snapshot(step, n_rows, n_seg), self.ckpt)
                return EXIT_RESUMABLE
        if seg is not None:  # cannot happen: capacities add up to n_rows_total
            seg.abort()
        if self._ckpt_step != step:  # steps after the last stored row (measure_every > 1)
            self._checkpoint(self._snapshot(step, n_rows, n_seg), self.ckpt)
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
    lat = dataclasses.replace(lc.local_lattice(halo=1), backend=run_backend(cfg))
    return chain, lc, lat, LatticeComm(world)


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
            chain, comm, lat, world = 0, _Serial(), Lattice(cfg.lattice.shape, backend=run_backend(cfg)), _Serial()
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
