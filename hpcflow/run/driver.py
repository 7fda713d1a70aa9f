"""The main job: ``hpcflow run`` / ``hpcflow train`` from a validated :class:`Config`.

``run`` builds the lattice, runs the configured Markov chain (HMC, heat bath; flow and mixed
chains train or load a flow first), measures observables into ``<output.dir>/history.jsonl``
(one JSON line per measurement, flushed as it goes), and writes ``<output.dir>/summary.json``
with, for each observable, the mean, its Gamma-method error, tau_int and its error, the
number of measurements and the exact value where one is known.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from hpcflow.backend import run_backend
from hpcflow.config import Config, ConfigError, to_yaml
from hpcflow.dtypes import precision_dtypes
from hpcflow.exit_codes import EXIT_OK, EXIT_RESUMABLE
from hpcflow.flows.build import build_model
from hpcflow.lattice.geometry import Comm, Lattice
from hpcflow.progress import ChainProgress, time_split
from hpcflow.run.autoplots import write_plots_safely
from hpcflow.run.measurements import Measurer, loop_halo
from hpcflow.run.world import environment_errors
from hpcflow.sampling.chain import HistorySink

__all__ = ["Measurer", "RunResult", "run", "train", "exact_values", "summarize_history", "format_summary"]

log = logging.getLogger("hpcflow")


@dataclass
class RunResult:
    exit_code: int = 0
    summary: dict = field(default_factory=dict)


def make_comm(cfg: Config) -> Comm:
    """The lattice communicator: MPI when launched with several ranks, else serial. A process
    grid that does not fit the number of ranks (or the lattice) is a one-line ``ConfigError``
    on every rank (the grid is checked on every rank before any collective call)."""
    from hpcflow.lattice.geometry import SerialComm

    try:
        from hpcflow.comm import world_size
    except ImportError:
        return SerialComm()
    if world_size() <= 1 and cfg.grid in (None, (1,) * cfg.nd):
        return SerialComm()
    from hpcflow.comm import LatticeComm

    try:
        return LatticeComm.from_config(cfg)
    except ValueError as e:
        raise ConfigError(f"{cfg.source}: key 'grid': {e}") from None


def make_lattice(cfg: Config, comm: Comm) -> Lattice:
    # the halo must cover the reach of every measured quantity: max(R, T) of the Wilson
    # loops (updates and plaquettes need 1); a serial comm gives the whole lattice, no halo
    lat = comm.local_lattice(cfg.lattice.shape, halo=loop_halo(cfg))
    return dataclasses.replace(lat, backend=run_backend(cfg))


def exact_values(cfg: Config) -> dict[str, dict]:
    """Exact (or reference) values of the measured observables, where known.

    2D U(1): finite-volume exact results (PHYSICS.md) for the plaquette, Q^2 and Wilson
    loops. 2D SU(2)/SU(3): infinite-volume plaquette (finite-volume corrections are
    exponentially small in the volume for the 2D plaquette; labelled as such).
    4D SU(3) at beta = 6.0: the large-volume literature plaquette 0.5937.
    """
    from hpcflow import analysis

    out: dict[str, dict] = {}
    beta = cfg.action.beta
    shape = cfg.lattice.shape
    if cfg.nd == 2 and cfg.group == "u1":
        ex = analysis.u1_2d_exact(beta, volume=shape[0] * shape[1])
        out["plaquette"] = {"value": ex.plaquette, "kind": "exact finite volume"}
        out["Q2"] = {"value": ex.q2, "kind": "exact finite volume"}
        for r, t in cfg.measure.wilson_loops:
            out[f"W_{r}x{t}"] = {"value": ex.wilson_loop(r * t), "kind": "exact finite volume"}
    elif cfg.nd == 2 and cfg.group == "su2":
        out["plaquette"] = {"value": analysis.su2_2d_plaquette(beta), "kind": "exact infinite volume"}
    elif cfg.nd == 2 and cfg.group == "su3":
        out["plaquette"] = {"value": analysis.su3_2d_plaquette(beta), "kind": "exact infinite volume"}
    elif cfg.nd == 4 and cfg.group == "su3" and abs(beta - 6.0) < 1e-12:
        out["plaquette"] = {"value": 0.5937, "kind": "literature, large volume"}
    return out


def summarize_history(records: list[dict], exact: dict[str, dict]) -> dict:
    """Gamma-method summary of every numeric observable in a measurement history; what went
    wrong in the Gamma method (a window search at its limit, a negative autocorrelation sum) is
    in ``flags`` (:data:`hpcflow.analysis.gamma.FLAGS`), marked ``!`` by :func:`format_summary`
    (not printed as Python warnings)."""
    import warnings

    from hpcflow.analysis import gamma_method

    keys = [k for k in (records[0] if records else {}) if k not in ("step", "time")]
    out: dict[str, dict] = {}
    for k in keys:
        xs = [r[k] for r in records if isinstance(r.get(k), (int, float))]
        if len(xs) < 2:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            g = gamma_method(torch.tensor(xs, dtype=torch.float64).numpy())
        d = {"mean": g.mean, "error": g.error, "tau_int": g.tau_int,
             "tau_int_error": g.tau_int_error, "n": len(xs), "flags": list(g.flags)}
        if k in exact:
            e = exact[k]
            d["exact"] = e["value"]
            d["exact_kind"] = e["kind"]
            d["deviation_sigma"] = (g.mean - e["value"]) / g.error if g.error > 0 else None
        out[k] = d
    return out


def format_summary(summary: dict) -> str:
    from hpcflow.analysis.gamma import FLAGS

    lines = [f"{'observable':<14} {'mean':>12} {'error':>10} {'tau_int':>9} {'n':>6}   exact"]
    seen: list[str] = []
    for k, d in summary.items():
        ex = ""
        if "exact" in d:
            dev = d.get("deviation_sigma")
            ex = f"{d['exact']:.6g} ({d['exact_kind']}" + (f", {dev:+.1f} sigma)" if dev is not None else ")")
        flags = [f for f in d.get("flags", []) if f in ("window_limit", "nonpositive_sum")]
        seen += [f for f in flags if f not in seen]
        lines.append(f"{k:<14} {d['mean']:>12.6g} {d['error']:>10.2g} {d['tau_int']:>9.2f}{'!' if flags else ' '}"
                     f"{d['n']:>6d}   {ex}")
    lines += [f"! {FLAGS[f]}" for f in seen]
    return "\n".join(lines)


def _atomic_write_text(path: str, text: str) -> None:
    from hpcflow.io.checkpoint import atomic_write_bytes

    atomic_write_bytes(path, text.encode("utf-8"))


def _prepare_output(cfg: Config, comm: Any) -> str:
    """``output.dir`` (made by the lock of :func:`hpcflow.run.outdir.output_dir`; again here for
    library calls without it). ``config.yaml`` is written by :func:`_write_config` once the
    run has checked its checkpoints, so a refused resume changes no file."""
    out = cfg.output.dir
    if comm.is_root:
        try:
            os.makedirs(out, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"{cfg.source}: key 'output.dir': cannot create {out!r} ({e.strerror})") from None
    return out


def _write_config(cfg: Config, writer: bool) -> None:
    """``<output.dir>/config.yaml``: the resolved configuration of the run (root rank)."""
    if writer:
        _atomic_write_text(os.path.join(cfg.output.dir, "config.yaml"), to_yaml(cfg))


def _stop_scope(stop: Any) -> tuple[Any, Any]:
    """``(flag, context)``: the caller's stop flag (its handlers are installed already: a
    ``StopFlag`` must not be entered twice) or a new ``StopFlag`` to enter."""
    from hpcflow.signals import StopFlag

    if stop is not None:
        return stop, contextlib.nullcontext(stop)
    flag = StopFlag()
    return flag, flag


def _run_fingerprint(cfg: Config) -> str:
    """What must match for a resumed ``hpcflow run`` to continue the same chain (the
    checkpoint holds the global state: the process grid may change)."""
    from hpcflow.config import config_to_dict, flow_fingerprint_part
    from hpcflow.io.checkpoint import config_fingerprint

    d = config_to_dict(cfg)
    d["run"] = {k: v for k, v in d["run"].items() if k not in ("n_steps", "progress", "plots")}
    keys = ("lattice", "group", "action", "algorithm", "seed", "precision", "hmc", "heatbath",
            "measure", "run")
    if cfg.algorithm in ("flow", "mixed"):
        d["sample"] = {k: v for k, v in d["sample"].items() if k in ("n_therm", "batch")}
        d["flow"] = flow_fingerprint_part(d["flow"])
        keys = keys + ("flow", "mixed", "sample")
    return config_fingerprint(d, keys)


class _RunSink(HistorySink):
    """The history sink of ``hpcflow run``; writes ``config.yaml`` once the checkpoint has been
    checked (``recover``), so that a refused resume leaves every file as it was.

    Only the writer (the root rank) writes files; a write that fails there (a full disk: exit
    4, naming the file) is agreed with the other ranks, which would otherwise wait for it in
    their next collective until the job is aborted: at once in ``recover`` and at the
    checkpoints, and a failed history line at the next checkpoint (no collective per row;
    the history is rewritten from the checkpoint on resume)."""

    def __init__(self, cfg: Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._cfg = cfg
        self._failed: BaseException | None = None  # the writer's failed history write

    def _named(self, e: BaseException, path: str) -> BaseException:
        from hpcflow.run.world import environment_failure

        return environment_failure(e, (self.out,), path=path) or e

    def _agree(self, err: BaseException | None) -> None:
        from hpcflow.run.world import agree_error

        agree_error(self.comm, err)

    def recover(self, resume: bool | None) -> dict[str, Any] | None:
        st, err = None, None
        try:
            st = super().recover(resume)
            _write_config(self._cfg, self.writer)
        except Exception as e:  # noqa: BLE001 - agreed with the other ranks, then raised
            err = self._named(e, self.out)
        self._agree(err)
        return st

    def store(self, step: int, info: Any, update: Any) -> None:
        try:
            super().store(step, info, update)  # the record is kept before its line is written
        except OSError as e:
            if self._fh is None:
                raise
            err = self._named(e, os.path.join(self.out, "history.jsonl"))
            if self.comm.size == 1:
                raise err from e
            self._failed = err
            with contextlib.suppress(OSError):
                self._fh.close()
            self._fh = None

    def _checkpoint(self, step: int) -> None:
        from hpcflow.io.checkpoint import save_checkpoint

        if step == self._last_ckpt:
            return
        state = self.snapshot(step)  # collective (gathers the global field)
        err = self._failed
        if self.writer and err is None:
            try:
                os.makedirs(self.ckpt_dir, exist_ok=True)
                save_checkpoint(self.ckpt, state, fingerprint=self.fp)
            except Exception as e:  # noqa: BLE001 - agreed with the other ranks, then raised
                err = self._named(e, self.ckpt)
        self._agree(err)
        self._last_ckpt = step


def run_chain(cfg: Config, comm: Any, lat: Any, out: str, resume: bool, model: Any = None,
              control: Any = None, writer: bool | None = None,
              stop: Any = None) -> tuple[int, Any, Any]:
    """Chain 0 of ``cfg`` (the chain ``hpcflow sample`` writes as chain 0) with a history sink:
    measurements in ``<out>/history.jsonl``, a checkpoint every ``sample.checkpoint_every``
    steps and on a stop signal (``stop``: the command's ``StopFlag``, or None for a new one).
    Returns ``(exit code, chain, sink)``."""
    from hpcflow.run.chains import update_of_config
    from hpcflow.sampling.chain import Chain

    flow = cfg.algorithm in ("flow", "mixed")
    update, lat, _ = update_of_config(cfg, 0, comm, lat, model=model)
    writer = comm.is_root if writer is None else writer
    log = print if writer else (lambda msg: None)
    sink = _RunSink(cfg, out, comm, Measurer(cfg, lat, comm), _run_fingerprint(cfg),
                    cfg.sample.checkpoint_every, writer=writer, flow=flow, log=log)
    n_therm = cfg.sample.n_therm if flow else cfg.run.n_therm
    n_steps = cfg.sample.n_steps if flow else cfg.run.n_steps
    flag, scope = _stop_scope(stop)
    with scope:
        chain = Chain(update, sink, control if control is not None else comm, n_therm, n_steps,
                      cfg.run.measure_every, stop=flag)
        bar = ChainProgress(chain, cfg.run.progress and writer, f"hpcflow run {cfg.algorithm}")
        chain.progress = bar
        t0 = time.perf_counter()
        try:
            code = chain.run(resume)
        finally:
            bar.close()
            sink.close()
        if writer:
            print(time_split(time.perf_counter() - t0, sink.measure_seconds))
        if code != EXIT_OK and writer:
            print(f"hpcflow: stopped by {flag.signal_name or 'signal'} after step "
                  f"{sink.last_checkpoint}; checkpoint written to {sink.ckpt_dir}; rerun with "
                  "--resume to continue")
    return code, chain, sink


def run_baseline(cfg: Config, comm: Any = None, resume: bool = False, stop: Any = None) -> RunResult:
    """HMC or heat-bath chain with measurements, history, summary, checkpoints and resume.

    Chain 0 of ``hpcflow sample`` (:func:`run_chain`): every ``sample.checkpoint_every``
    steps, and when SIGTERM/SIGUSR1/SIGINT arrives, the root rank writes the global field,
    the step and the measurements so far to ``<output.dir>/checkpoints/run.ckpt`` (atomic).
    ``--resume`` continues from there (the RNG is counter-based, so the step is the whole RNG
    state) and the result equals an uninterrupted run; without a checkpoint it starts fresh.
    A stop by signal exits with 3. (No lock here: :func:`run` takes it.)
    """
    if cfg.algorithm not in ("hmc", "heatbath"):
        raise ConfigError(f"{cfg.source}: key 'algorithm': got {cfg.algorithm}; allowed here: hmc, heatbath")
    comm = make_comm(cfg) if comm is None else comm
    out = _prepare_output(cfg, comm)
    lat = make_lattice(cfg, comm)
    t0 = time.perf_counter()
    code, chain, sink = run_chain(cfg, comm, lat, out, resume, stop=stop)
    if code != EXIT_OK:
        return RunResult(code, {})
    elapsed = time.perf_counter() - t0
    return _finish(cfg, comm, sink.records, elapsed, chain.total - chain.first_step, out)


def _finish(cfg: Config, comm: Any, records: list[dict], elapsed: float, n_updates: int,
            out: str, extra: dict | None = None) -> RunResult:
    from hpcflow.provenance import provenance

    exact = exact_values(cfg)
    obs = summarize_history(records, exact)
    summary = {
        "algorithm": cfg.algorithm,
        "group": cfg.group,
        "lattice": list(cfg.lattice.shape),
        "beta": cfg.action.beta,
        "seed": cfg.seed,
        "precision": cfg.precision,
        "ranks": comm.size,
        "updates": n_updates,
        "seconds": elapsed,
        "seconds_per_update": elapsed / max(n_updates, 1),
        "observables": obs,
        "provenance": provenance(),
    }
    if extra:
        summary.update(extra)
    if comm.is_root:
        _atomic_write_text(os.path.join(out, "summary.json"), json.dumps(summary, indent=2) + "\n")
        print(f"hpcflow {cfg.algorithm}: {cfg.group} {'x'.join(map(str, cfg.lattice.shape))} "
              f"beta={cfg.action.beta} ranks={comm.size}: {n_updates} updates in {elapsed:.1f} s")
        print(format_summary(obs))
        print(f"history: {os.path.join(out, 'history.jsonl')}  summary: {os.path.join(out, 'summary.json')}")
        if cfg.run.plots and cfg.algorithm in ("hmc", "heatbath"):  # flow runs plot after their summary
            write_plots_safely(out)
    return RunResult(0, summary)


def _check_memory(cfg: Config, command: str) -> None:
    """Bounds before work (:mod:`hpcflow.run.resources`): refuse a job that cannot fit."""
    from hpcflow.run.resources import check_memory
    from hpcflow.run.world import launched_size

    replicas = cfg.train.replicas if cfg.algorithm in ("flow", "mixed") else 1
    check_memory(cfg, command, ranks_per_chain=max(1, launched_size() // max(1, replicas)))


def run(cfg: Config, resume: bool = False, fresh: bool = False, stop: Any = None) -> RunResult:
    """``hpcflow run``: the configured algorithm end to end.

    Holds the lock of ``output.dir`` throughout (:func:`hpcflow.run.outdir.output_dir`):
    results of an earlier run there need ``resume`` (continue them) or ``fresh`` (move them
    aside first). One stop flag (SIGTERM/SIGUSR1/SIGINT) covers the whole command, set-up,
    training and chain: a signal at any moment ends with a checkpoint and exit 3."""
    from hpcflow.run.outdir import output_dir

    _check_memory(cfg, "run")
    flag, scope = _stop_scope(stop)
    with environment_errors(cfg.output.dir), scope, output_dir(cfg, "run", resume=resume, fresh=fresh):
        if cfg.algorithm in ("hmc", "heatbath"):
            return run_baseline(cfg, resume=resume, stop=flag)
        return run_flow(cfg, resume=resume, stop=flag)


def train(cfg: Config, resume: bool = False, fresh: bool = False, stop: Any = None) -> RunResult:
    """``hpcflow train``: train the configured flow (lock and results rules as :func:`run`;
    ``resume`` without a training checkpoint is an error)."""
    from hpcflow.run.outdir import output_dir

    if cfg.algorithm not in ("flow", "mixed"):
        raise ConfigError(f"{cfg.source}: key 'algorithm': got {cfg.algorithm}; "
                          "'hpcflow train' needs flow or mixed")
    if cfg.flow.model is not None:
        raise ConfigError(f"{cfg.source}: key 'flow.model': got {cfg.flow.model!r}; allowed: null with "
                          "'hpcflow train' (a shipped model is sampled as it is: `hpcflow sample` or `hpcflow "
                          "run`; to fine-tune it, set train.init_from to its checkpoint.pt)")
    _check_memory(cfg, "train")
    flag, scope = _stop_scope(stop)
    with environment_errors(cfg.output.dir), scope, output_dir(cfg, "train", resume=resume, fresh=fresh):
        return train_flow(cfg, resume=resume, stop=flag)


# ---- flows: train, then sample (algorithm: flow | mixed) ------------------------------------
def _real_dtype(cfg: Config) -> torch.dtype:
    return precision_dtypes(cfg.precision)[1]


def _trainer(cfg: Config, model: Any, lat: Any, comm: Any) -> Any:
    from hpcflow.flows.train import Trainer

    if isinstance(comm, _HybridComm):  # domain-decomposed flow (issue 7)
        return _distributed_trainer(cfg, model, comm.hybrid)

    kwargs: dict[str, Any] = {}
    action = getattr(model, "action", None)
    if callable(action):  # SU(N) flows bring their own action on their own variables
        kwargs["action_at"] = lambda x, beta: action(x, beta)  # any beta: train.beta_schedule
    try:
        return Trainer(model, lat, cfg.action.beta, cfg.train, cfg.output.dir, comm=comm, seed=cfg.seed,
                       dtype=_real_dtype(cfg), progress=cfg.run.progress and comm.is_root, **kwargs)
    except ValueError as e:
        raise ConfigError(f"{cfg.source}: {e}") from None


def _train(cfg: Config, comm: Any, lat: Any, model: Any, resume: bool, stop: Any = None,
           on_ready: Any = None) -> tuple[Any, int]:
    """Train to ``train.steps``; returns (trainer, exit code). Resume if a checkpoint exists
    and ``resume`` was asked for; a finished training is not repeated (no file is touched).
    Without a checkpoint to resume, ``train.init_from`` warm-starts the model (a bad source is
    a config error). A model that chains were sampled with is never trained further (one-line
    refusal; nothing written). ``on_ready()`` runs once the checkpoint has been checked,
    before anything is written."""
    from hpcflow.flows.train import TrainSetupError
    from hpcflow.io.lock import RunDirError
    from hpcflow.run.outdir import model_references
    from hpcflow.run.world import agreed, world_control

    tr = _trainer(cfg, model, lat, comm)
    have_ckpt = tr.ckpt_path.exists()
    if resume and not have_ckpt and comm.is_root:
        print(f"hpcflow: --resume: no training checkpoint at {tr.ckpt_path}; starting training")
    if resume and have_ckpt:
        try:
            tr.load_checkpoint()  # checks lattice, group, architecture, ranks: before any write
        except ValueError as e:
            raise ConfigError(str(e)) from None
        steps = int(cfg.train.steps)
        if tr.step >= steps:
            if on_ready is not None:
                on_ready()
            if comm.is_root:
                print(f"hpcflow train: training complete ({tr.step} steps, train.steps = {steps}); "
                      f"not repeated: {tr.ckpt_path}")
            return tr, EXIT_OK
        refs = agreed(world_control(), model_references, cfg.output.dir, cfg.algorithm)
        if refs:
            raise RunDirError(
                f"{tr.ckpt_path}: training would continue from step {tr.step} to {steps} and replace "
                f"the model that {', '.join(refs[:3])} {'was' if len(refs) == 1 else 'were'} sampled "
                f"with; keep train.steps = {tr.step}, or use --fresh (moves them aside with the "
                "model) or another output.dir")
    if on_ready is not None:
        on_ready()
    t0 = time.perf_counter()
    flag, scope = _stop_scope(stop)
    try:
        with scope:
            rows = tr.train(resume=resume and have_ckpt, stop=flag)
    except TrainSetupError as e:  # train.init_from: missing, unreadable or another architecture
        raise ConfigError(f"{cfg.source}: {e}") from None
    except ValueError as e:  # checkpoint from another lattice/group/architecture
        raise ConfigError(str(e)) from None
    if tr.stopped:
        if comm.is_root:
            print(f"hpcflow: training stopped by a signal at step {tr.step}; checkpoint written to "
                  f"{tr.ckpt_path}; rerun with --resume to continue")
        return tr, EXIT_RESUMABLE
    if comm.is_root and rows:
        last = rows[-1]
        print(f"hpcflow train: {tr.step} steps ({len(rows)} this run) in {time.perf_counter() - t0:.1f} s; "
              f"loss {last['loss']:.4f}, batch ESS {last['ess']:.3f}, acceptance estimate "
              f"{last['acceptance']:.3f} (beta {last.get('beta', cfg.action.beta):g}, batch "
              f"{last.get('batch', cfg.train.batch)}); "
              f"metrics: {tr.metrics_path}")
        if tr.init_record is not None:
            print(f"hpcflow train: warm-started from {tr.init_record['path']} "
                  f"(sha256 {tr.init_record['sha256'][:16]}..., lattice {tr.init_record['lattice']})")
    return tr, EXIT_OK


def train_flow(cfg: Config, resume: bool = False, stop: Any = None) -> RunResult:
    dist = _distributed_setup(cfg)
    if dist is not None:
        comm, lat, model = dist
    else:
        comm = make_comm(cfg)
        lat = _flow_lattice(cfg)
        model = build_model(cfg, lat)
    _prepare_output(cfg, comm)
    _, code = _train(cfg, comm, lat, model, resume, stop=stop,
                     on_ready=lambda: _write_config(cfg, comm.is_root))
    return RunResult(code, {})


def _flow_lattice(cfg: Config) -> Any:
    from hpcflow.lattice.geometry import Lattice

    return Lattice(cfg.lattice.shape, backend=run_backend(cfg))


def run_flow(cfg: Config, resume: bool = False, stop: Any = None) -> RunResult:
    """Train (or finish training), then sample the exact chain and summarise it.

    The chain is chain 0 of ``hpcflow sample`` with the trained model (``sample.n_therm`` +
    ``sample.n_steps`` Markov steps; ``algorithm: mixed`` in the ``mixed.pattern``), with the
    history sink of ``hpcflow run`` (measurements, checkpoints, resume). The summary adds the
    flow steps' acceptance and, over every independent proposal, the ESS per proposal and the
    importance-reweighted plaquette and Q^2 (reweighting applies to the proposals only: the
    chain's states are already distributed as exp(-S)/Z).
    """
    from hpcflow.analysis import ess, reweighted_estimate

    dist = _distributed_setup(cfg)
    if dist is not None:
        if cfg.algorithm != "flow":
            raise ConfigError(f"{cfg.source}: key 'algorithm': {cfg.algorithm!r} runs on one rank per "
                              "chain; domain-decomposed sampling supports algorithm: flow")
        comm, lat, model = dist
    else:
        comm = make_comm(cfg)
        if comm.size > 1 and not comm.decomposed:
            raise ConfigError(f"{cfg.source}: flows run data-parallel only in training so far; "
                              "sample with one rank")
        lat = _flow_lattice(cfg)
        model = build_model(cfg, lat)
    out = _prepare_output(cfg, comm)
    if cfg.flow.model is not None:  # a shipped model: sampled as it is, never trained here
        from hpcflow.run.chains import load_weights

        sha = load_weights(cfg, model)
        training_steps = _shipped_steps(cfg)
        if comm.is_root:
            print(f"hpcflow run: flow.model {cfg.flow.model} (sha256 {sha[:16]}..., {training_steps} training "
                  "steps); no training")
    else:
        tr, code = _train(cfg, comm, lat, model, resume, stop=stop)
        if code != EXIT_OK:
            return RunResult(code, {})
        training_steps = tr.step
    model.eval()
    t0 = time.perf_counter()
    if dist is not None:
        # every replica group runs the same decomposition-independent chain (same seed, same
        # proposal numbers as the one-rank chain); world rank 0 writes
        hybrid = comm.hybrid
        code, chain, sink = run_chain(cfg, hybrid.domain, model.lat, out, resume, model=model,
                                      control=hybrid, writer=hybrid.is_root, stop=stop)
    else:
        code, chain, sink = run_chain(cfg, _serial_if_plain(comm), lat, out, resume, model=model,
                                      stop=stop)
    if code != EXIT_OK:
        return RunResult(code, {})
    elapsed = time.perf_counter() - t0
    records = sink.records
    flow_steps = [r["accepted"] for r in records if r.get("kind") == "flow"]
    extra: dict[str, Any] = {"acceptance": float(np.mean(flow_steps)) if flow_steps else float("nan"),
                             "accepted_flow_steps": int(np.sum(flow_steps)) if flow_steps else None,
                             "training_steps": training_steps}
    if cfg.algorithm == "mixed":  # local updates move the chain too: the count bounds nothing
        extra["accepted_flow_steps"] = None
    if cfg.flow.model is not None:
        extra["model"] = cfg.flow.model
    if sink.proposals:
        prop = np.asarray(sink.proposals, dtype=np.float64)
        lw = prop[:, 0]
        rw = {name: reweighted_estimate(x, lw).as_dict()
              for name, x in (("plaquette", prop[:, 1]), ("Q2", prop[:, 2] ** 2))}
        pl = rw["plaquette"]
        extra.update(ess_per_proposal=float(ess(lw)), ess_lognormal=pl["ess_lognormal"], n_eff=pl["n_eff"],
                     max_weight=pl["max_weight"], proposals=int(lw.size))
        extra["reweighted"] = rw
    warnings = flow_chain_warnings(extra, summarize_history(records, {}))
    extra["warnings"] = warnings
    result = _finish(cfg, comm, records, elapsed, chain.total - chain.first_step, out, extra=extra)
    if comm.is_root:
        line = f"flow-step acceptance {extra['acceptance']:.3f}"
        if "ess_per_proposal" in extra:
            line += (f", ESS per proposal {extra['ess_per_proposal']:.3g} ({extra['n_eff']:.1f} effective of "
                     f"{extra['proposals']} proposals), largest normalised weight {extra['max_weight']:.3g}")
            rw = extra["reweighted"]
            line += (f"; reweighted proposals: plaquette {rw['plaquette']['mean']:.5f} +- "
                     f"{rw['plaquette']['error']:.5f}, Q2 {rw['Q2']['mean']:.4f} +- {rw['Q2']['error']:.4f}")
        print(line)
        for w in warnings:
            print(f"hpcflow: warning: {w}")
        if cfg.run.plots:
            write_plots_safely(out)  # history, autocorrelation, topology and training plots
    return result


def flow_chain_warnings(extra: dict[str, Any], observables: dict[str, dict]) -> list[str]:
    """What makes a flow chain's numbers untrustworthy, one line each: observables measured on
    fewer than ``SHORT_CHAIN_TAUS`` tau_int states, fewer than ``MIN_EFFECTIVE`` accepted
    proposals (an independence chain's distinct states; not for mixed chains), a low flow-step
    acceptance, few effective proposals or one dominant importance weight
    (:mod:`hpcflow.analysis.reweighting`)."""
    from hpcflow.analysis.ensemble import LOW_FLOW_QUALITY, SHORT_CHAIN_TAUS
    from hpcflow.analysis.reweighting import HEAVY_WEIGHT, MIN_EFFECTIVE

    out = []
    short = [f"{k} ({d['n']} < {SHORT_CHAIN_TAUS} x {d['tau_int']:.1f})" for k, d in observables.items()
             if k not in ("accepted", "acceptance", "logw", "logq", "S") and d.get("tau_int") is not None
             and math.isfinite(d["tau_int"]) and d["n"] < SHORT_CHAIN_TAUS * max(d["tau_int"], 0.5)]
    if short:
        out.append(f"the chain is shorter than {SHORT_CHAIN_TAUS} tau_int for " + ", ".join(short)
                   + ": its errors and tau_int are unreliable (run more sample.n_steps)")
    n_acc = extra.get("accepted_flow_steps")
    if n_acc is not None and n_acc < MIN_EFFECTIVE:
        out.append(f"only {n_acc} flow proposals were accepted: the chain visited at most {n_acc + 1} distinct "
                   f"configurations (< {MIN_EFFECTIVE}) and every estimate rests on them, whatever its printed "
                   "error (a stuck chain also hides its autocorrelation)")
    acc = extra.get("acceptance")
    if acc is not None and math.isfinite(acc) and acc < LOW_FLOW_QUALITY:
        out.append(f"flow-step acceptance {acc:.3g} < {LOW_FLOW_QUALITY}: the chain sticks and its importance "
                   "weights are heavy-tailed (train the flow longer)")
    if "n_eff" in extra:
        if extra["n_eff"] < MIN_EFFECTIVE:
            out.append(f"the reweighted estimates rest on {extra['n_eff']:.1f} effective proposals "
                       f"(< {MIN_EFFECTIVE}; ESS per proposal {extra['ess_per_proposal']:.3g}, log-normal "
                       f"estimate {extra['ess_lognormal']:.3g}): their errors are floors from the ESS, not precise")
        if extra["max_weight"] > HEAVY_WEIGHT:
            out.append(f"one proposal carries {extra['max_weight']:.0%} of the importance weight "
                       f"(> {HEAVY_WEIGHT:.0%}): heavy-tailed weights")
    return out


def _shipped_steps(cfg: Config) -> int:
    """The training steps ``model.json`` of ``flow.model`` records (0 when it does not say)."""
    from hpcflow.models import resolve_model

    try:
        return int(resolve_model(str(cfg.flow.model)).meta.get("training_steps", 0))
    except (TypeError, ValueError):
        return 0


def _serial_if_plain(comm: Comm) -> Comm:
    """Flow chains without a domain decomposition run on one rank: a serial communicator."""
    from hpcflow.lattice.geometry import SerialComm

    return comm if comm.decomposed else SerialComm()


# ---- domain-decomposed flows (issue 7): world = train.replicas x domain grid -----------------
class _HybridComm:
    """What the flow driver needs of a communicator (``size``, ``is_root``) for a hybrid run."""

    def __init__(self, hybrid: Any) -> None:
        self.hybrid = hybrid
        self.size = hybrid.world_size
        self.rank = hybrid.world_rank
        self.is_root = hybrid.is_root


def _distributed_setup(cfg: Config) -> tuple[Any, Any, Any] | None:
    """``(comm, local lattice, DistributedFlow)`` when the flow is decomposed, else ``None``.

    Used under MPI with more than one rank when the config names a process grid or a replica
    count (``train.replicas``, default 1): the world is split into ``replicas`` groups of
    ``prod(grid)`` ranks, each training/sampling one copy of the model on its sub-lattices.
    """
    import dataclasses

    replicas = cfg.train.replicas
    try:
        from hpcflow.comm import world_size
    except ImportError:
        return None
    if world_size() <= 1 and cfg.algorithm != "flow":
        return None  # mixed chains run on one rank with the plain flow
    from hpcflow.comm.hybrid import HybridGrid
    from hpcflow.flows.distributed import DistributedFlow
    from hpcflow.lattice.geometry import Lattice

    try:
        hybrid = HybridGrid(cfg.lattice.shape, replicas, cfg.grid)
        template = build_model(cfg, Lattice(cfg.lattice.shape, backend=run_backend(cfg)))
        model = DistributedFlow(template, hybrid.domain,
                                checkpoint_layers=cfg.flow.checkpoint_activations)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"{cfg.source}: domain-decomposed flow: {e}") from None
    return _HybridComm(hybrid), dataclasses.replace(model.lat), model


def _distributed_trainer(cfg: Config, model: Any, hybrid: Any) -> Any:
    from hpcflow.flows.distributed_train import DistributedTrainer

    try:
        return DistributedTrainer(model, cfg.action.beta, cfg.train, cfg.output.dir, hybrid=hybrid,
                                  seed=cfg.seed, dtype=_real_dtype(cfg),
                                  progress=cfg.run.progress and hybrid.is_root)
    except ValueError as e:
        raise ConfigError(f"{cfg.source}: {e}") from None
