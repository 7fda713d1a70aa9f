"""The main job: ``hpcflow run`` / ``hpcflow train`` from a validated :class:`Config`.

``run`` builds the lattice, runs the configured Markov chain (HMC, heat bath; flow and mixed
chains train or load a flow first), measures observables into ``<output.dir>/history.jsonl``
(one JSON line per measurement, flushed as it goes), and writes ``<output.dir>/summary.json``
with, for each observable, the mean, its Gamma-method error, tau_int and its error, the
number of measurements and the exact value where one is known.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from hpcflow.backend import run_backend
from hpcflow.config import Config, ConfigError, to_yaml
from hpcflow.exit_codes import EXIT_OK

__all__ = ["RunResult", "run", "train", "exact_values", "summarize_history", "format_summary"]

log = logging.getLogger("hpcflow")


@dataclass
class RunResult:
    exit_code: int = 0
    summary: dict = field(default_factory=dict)


def dtypes(cfg: Config) -> tuple[torch.dtype, torch.dtype]:
    """(complex dtype of links, real dtype) for the configured precision."""
    if cfg.precision == "float32":
        return torch.complex64, torch.float32
    return torch.complex128, torch.float64


def make_comm(cfg: Config) -> Any:
    """The lattice communicator: MPI when launched with several ranks, else serial."""
    from hpcflow.lattice.geometry import SerialComm

    try:
        from hpcflow.comm import world_size
    except ImportError:
        return SerialComm()
    if world_size() <= 1 and cfg.grid in (None, (1,) * cfg.nd):
        return SerialComm()
    from hpcflow.comm import LatticeComm

    return LatticeComm.from_config(cfg)


def make_lattice(cfg: Config, comm: Any) -> Any:
    from hpcflow.lattice.geometry import Lattice

    if hasattr(comm, "local_lattice"):
        # the halo must cover the reach of every measured quantity: max(R, T) of the
        # Wilson loops (updates and plaquettes need 1)
        loops = [max(r, t) for r, t in cfg.measure.wilson_loops if max(r, t) <= min(cfg.lattice.shape)]
        lat = comm.local_lattice(cfg.lattice.shape, halo=max([1] + loops))
        return dataclasses.replace(lat, backend=run_backend(cfg))
    return Lattice(cfg.lattice.shape, backend=run_backend(cfg))


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


class Measurer:
    """Observables measured on the chain, per configuration."""

    def __init__(self, cfg: Config, lat: Any, comm: Any) -> None:
        self.cfg, self.lat, self.comm = cfg, lat, comm
        self.loops = [(r, t) for r, t in cfg.measure.wilson_loops
                      if max(r, t) <= min(cfg.lattice.shape)]

    def __call__(self, U: torch.Tensor) -> dict[str, float]:
        from hpcflow.lattice import observables as obs
        from hpcflow.lattice.action import average_plaquette

        cfg, lat, comm = self.cfg, self.lat, self.comm
        U = comm.exchange(U, lat)  # updates leave halos stale; observables read them
        m: dict[str, float] = {"plaquette": float(average_plaquette(U, lat, comm=comm))}
        for r, t in self.loops:
            m[f"W_{r}x{t}"] = float(obs.wilson_loop(U, lat, r, t, comm=comm))
        m["polyakov_abs"] = float(abs(obs.polyakov_loop(U, lat, comm=comm)))
        if cfg.nd == 2 and cfg.group == "u1":
            q = float(obs.topological_charge_u1_2d(U, lat, comm=comm))
            m["Q"], m["Q2"] = q, q * q
        elif cfg.nd == 4 and cfg.measure.flow_time > 0:
            n = max(1, round(cfg.measure.flow_time / cfg.measure.flow_eps))
            V = obs.wilson_flow(U, lat, cfg.measure.flow_eps, n, comm=comm)
            q = float(obs.topological_charge_clover(V, lat, comm=comm))
            m["Q"], m["Q2"] = q, q * q
        return m


def summarize_history(records: list[dict], exact: dict[str, dict]) -> dict:
    """Gamma-method summary of every numeric observable in a measurement history."""
    from hpcflow.analysis import gamma_method

    keys = [k for k in (records[0] if records else {}) if k not in ("step", "time")]
    out: dict[str, dict] = {}
    for k in keys:
        xs = [r[k] for r in records if isinstance(r.get(k), (int, float))]
        if len(xs) < 2:
            continue
        g = gamma_method(torch.tensor(xs, dtype=torch.float64).numpy())
        d = {"mean": g.mean, "error": g.error, "tau_int": g.tau_int,
             "tau_int_error": g.tau_int_error, "n": len(xs)}
        if k in exact:
            e = exact[k]
            d["exact"] = e["value"]
            d["exact_kind"] = e["kind"]
            d["deviation_sigma"] = (g.mean - e["value"]) / g.error if g.error > 0 else None
        out[k] = d
    return out


def format_summary(summary: dict) -> str:
    lines = [f"{'observable':<14} {'mean':>12} {'error':>10} {'tau_int':>9} {'n':>6}   exact"]
    for k, d in summary.items():
        ex = ""
        if "exact" in d:
            dev = d.get("deviation_sigma")
            ex = f"{d['exact']:.6g} ({d['exact_kind']}" + (f", {dev:+.1f} sigma)" if dev is not None else ")")
        lines.append(f"{k:<14} {d['mean']:>12.6g} {d['error']:>10.2g} {d['tau_int']:>9.2f} "
                     f"{d['n']:>6d}   {ex}")
    return "\n".join(lines)


def _atomic_write_text(path: str, text: str) -> None:
    from hpcflow.io.checkpoint import atomic_write_bytes

    atomic_write_bytes(path, text.encode("utf-8"))


def _prepare_output(cfg: Config, comm: Any) -> str:
    out = cfg.output.dir
    if comm.is_root:
        try:
            os.makedirs(out, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"{cfg.source}: key 'output.dir': cannot create {out!r} ({e.strerror})") from None
        _atomic_write_text(os.path.join(out, "config.yaml"), to_yaml(cfg))
    return out


def _progress(total: int, enabled: bool, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, mininterval=1.0, dynamic_ncols=True)


def _run_fingerprint(cfg: Config) -> str:
    """What must match for a resumed ``hpcflow run`` to continue the same chain (the
    checkpoint holds the global state: the process grid may change)."""
    from hpcflow.config import config_to_dict
    from hpcflow.io.checkpoint import config_fingerprint

    d = config_to_dict(cfg)
    d["run"] = {k: v for k, v in d["run"].items() if k not in ("n_steps", "progress")}
    keys = ("lattice", "group", "action", "algorithm", "seed", "precision", "hmc", "heatbath",
            "measure", "run")
    if cfg.algorithm in ("flow", "mixed"):
        d["sample"] = {k: v for k, v in d["sample"].items() if k in ("n_therm", "batch")}
        keys = keys + ("flow", "mixed", "sample")
    return config_fingerprint(d, keys)


class _ProgressBar:
    """The chain's progress callback: a bar on the writing rank, created at the first step
    (when a resumed chain knows where it continues)."""

    def __init__(self, cfg: Config, chain: Any, enabled: bool) -> None:
        self.cfg, self.chain, self.enabled = cfg, chain, enabled
        self.bar: Any = None

    def __call__(self, step: int, info: Any) -> None:
        if self.bar is None:
            self.bar = _progress(self.chain.total, self.enabled, self.cfg.algorithm)
            self.bar.update(step - 1)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_chain(cfg: Config, comm: Any, lat: Any, out: str, resume: bool, model: Any = None,
              control: Any = None, writer: bool | None = None) -> tuple[int, Any, Any]:
    """Chain 0 of ``cfg`` (the chain ``hpcflow sample`` writes as chain 0) with a history sink:
    measurements in ``<out>/history.jsonl``, a checkpoint every ``sample.checkpoint_every``
    steps and on a stop signal. Returns ``(exit code, chain, sink)``."""
    from hpcflow.run.chains import update_of_config
    from hpcflow.sampling.chain import Chain, HistorySink
    from hpcflow.signals import StopFlag

    flow = cfg.algorithm in ("flow", "mixed")
    update, lat, _ = update_of_config(cfg, 0, comm, lat, model=model)
    writer = comm.is_root if writer is None else writer
    log = print if writer else (lambda msg: None)
    sink = HistorySink(out, comm, Measurer(cfg, lat, comm), _run_fingerprint(cfg),
                       cfg.sample.checkpoint_every, writer=writer, flow=flow, log=log)
    n_therm = cfg.sample.n_therm if flow else cfg.run.n_therm
    n_steps = cfg.sample.n_steps if flow else cfg.run.n_steps
    with StopFlag() as flag:
        chain = Chain(update, sink, control if control is not None else comm, n_therm, n_steps,
                      cfg.run.measure_every, stop=flag)
        bar = _ProgressBar(cfg, chain, cfg.run.progress and writer)
        chain.progress = bar
        try:
            code = chain.run(resume)
        finally:
            bar.close()
            sink.close()
        if code != EXIT_OK and writer:
            print(f"hpcflow: stopped by {flag.signal_name or 'signal'} after step "
                  f"{sink.last_checkpoint}; checkpoint written to {sink.ckpt_dir}; rerun with "
                  "--resume to continue")
    return code, chain, sink


def run_baseline(cfg: Config, comm: Any = None, resume: bool = False) -> RunResult:
    """HMC or heat-bath chain with measurements, history, summary, checkpoints and resume.

    Chain 0 of ``hpcflow sample`` (:func:`run_chain`): every ``sample.checkpoint_every``
    steps, and when SIGTERM/SIGUSR1/SIGINT arrives, the root rank writes the global field,
    the step and the measurements so far to ``<output.dir>/checkpoints/run.ckpt`` (atomic).
    ``--resume`` continues from there (the RNG is counter-based, so the step is the whole RNG
    state) and the result equals an uninterrupted run; without a checkpoint it starts fresh.
    A stop by signal exits with 3.
    """
    if cfg.algorithm not in ("hmc", "heatbath"):
        raise ConfigError(f"{cfg.source}: key 'algorithm': got {cfg.algorithm}; allowed here: hmc, heatbath")
    comm = make_comm(cfg) if comm is None else comm
    out = _prepare_output(cfg, comm)
    lat = make_lattice(cfg, comm)
    t0 = time.perf_counter()
    code, chain, sink = run_chain(cfg, comm, lat, out, resume)
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
    return RunResult(0, summary)


def run(cfg: Config, resume: bool = False) -> RunResult:
    """``hpcflow run``: the configured algorithm end to end."""
    if cfg.algorithm in ("hmc", "heatbath"):
        return run_baseline(cfg, resume=resume)
    from hpcflow import flow_driver

    return flow_driver.run(cfg, resume=resume)


def train(cfg: Config, resume: bool = False) -> RunResult:
    """``hpcflow train``: train the configured flow."""
    if cfg.algorithm not in ("flow", "mixed"):
        raise ConfigError(f"{cfg.source}: key 'algorithm': got {cfg.algorithm}; "
                          "'hpcflow train' needs flow or mixed")
    from hpcflow import flow_driver

    return flow_driver.train(cfg, resume=resume)
