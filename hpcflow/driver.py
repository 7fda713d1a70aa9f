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
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from hpcflow.backend import run_backend
from hpcflow.config import Config, ConfigError, to_yaml

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


def _baseline_updater(cfg: Config, lat: Any, comm: Any, rng: Any) -> Callable:
    """One Markov step (trajectory or sweep) of the configured baseline: (U, step) -> (U, info)."""
    from hpcflow.lattice.groups import get_group

    group = get_group(cfg.group)
    beta = cfg.action.beta
    if cfg.algorithm == "hmc":
        from hpcflow.sampling.hmc import HMC

        hmc = HMC(lat, group, beta, cfg.hmc.n_steps, cfg.hmc.tau, cfg.hmc.integrator, rng,
                  comm=comm, lam=cfg.hmc.lam)

        def hmc_step(U: torch.Tensor, step: int) -> tuple[torch.Tensor, dict]:
            U, acc, dH = hmc.trajectory(U, step)
            return U, {"accepted": float(acc), "dH": float(dH), "exp_mdH": math.exp(-float(dH))}

        return hmc_step
    if cfg.algorithm == "heatbath":
        from hpcflow.sampling.heatbath import heatbath_sweep, overrelax_sweep

        def hb_step(U: torch.Tensor, step: int) -> tuple[torch.Tensor, dict]:
            U = heatbath_sweep(U, lat, group, beta, rng, step, comm=comm)
            for _ in range(cfg.heatbath.n_overrelax):
                U = overrelax_sweep(U, lat, group, beta, comm=comm)
            return U, {}

        return hb_step
    raise ConfigError(f"{cfg.source}: key 'algorithm': got {cfg.algorithm}; allowed here: hmc, heatbath")


def _run_fingerprint(cfg: Config, comm: Any) -> str:
    """What must match for a resumed ``hpcflow run`` to continue the same chain."""
    from hpcflow.config import config_to_dict
    from hpcflow.io.checkpoint import config_fingerprint

    d = config_to_dict(cfg)
    d["run"] = {k: v for k, v in d["run"].items() if k not in ("n_steps", "progress")}
    d["ranks"] = comm.size
    return config_fingerprint(d, ("lattice", "group", "action", "algorithm", "seed", "precision",
                                  "grid", "hmc", "heatbath", "measure", "run", "ranks"))


def run_baseline(cfg: Config, comm: Any = None, resume: bool = False) -> RunResult:
    """HMC or heat-bath chain with measurements, history, summary, checkpoints and resume.

    Every ``sample.checkpoint_every`` steps, and when SIGTERM/SIGUSR1/SIGINT arrives, each
    rank writes its local field, the step and (rank 0) the measurements so far to
    ``<output.dir>/checkpoints/run.rank<R>.ckpt`` (atomic). ``--resume`` continues from there
    (the RNG is counter-based, so the step is the whole RNG state) and the result equals an
    uninterrupted run; without a checkpoint it starts fresh. A stop by signal exits with 3.
    """
    from hpcflow.cli import EXIT_RESUMABLE
    from hpcflow.io.checkpoint import load_checkpoint, save_checkpoint
    from hpcflow.lattice.groups import cold_field, get_group, random_field
    from hpcflow.rng import CounterRNG
    from hpcflow.signals import StopFlag

    comm = make_comm(cfg) if comm is None else comm
    out = _prepare_output(cfg, comm)
    lat = make_lattice(cfg, comm)
    cdtype, _ = dtypes(cfg)
    device = torch.device(cfg.device)
    group = get_group(cfg.group)
    rng = CounterRNG(cfg.seed, stream=0)
    ckpt_dir = os.path.join(out, "checkpoints")
    ckpt = os.path.join(ckpt_dir, f"run.rank{comm.rank}.ckpt")
    fp = _run_fingerprint(cfg, comm)
    records: list[dict] = []
    first = 1
    have = torch.tensor(float(os.path.exists(ckpt)))
    n_have = int(comm.sum(have.clone()))
    if resume and 0 < n_have < comm.size:
        raise ConfigError(f"{ckpt_dir}: --resume: checkpoints exist for {n_have} of {comm.size} ranks; "
                          "resume with the same number of ranks and grid")
    if resume and n_have == comm.size:
        state = load_checkpoint(ckpt, fingerprint=fp)
        U = state["U"].to(device=device, dtype=cdtype)
        first = int(state["step"]) + 1
        records = list(state.get("records", []))
        if comm.is_root:
            print(f"hpcflow: resuming {cfg.algorithm} chain at step {first} from {ckpt_dir}")
    else:
        if resume and comm.is_root:
            print(f"hpcflow: --resume: no checkpoint in {ckpt_dir}; starting a fresh chain")
        if cfg.run.start == "hot":
            U = random_field(lat, group, rng, step=0, dtype=cdtype, device=device)
        else:
            U = cold_field(lat, group, dtype=cdtype, device=device)
    update = _baseline_updater(cfg, lat, comm, rng)
    measure = Measurer(cfg, lat, comm)
    total = cfg.run.n_therm + cfg.run.n_steps
    hist_path = os.path.join(out, "history.jsonl")
    fh = None
    if comm.is_root:  # the history always equals the checkpointed records plus what follows
        fh = open(hist_path, "w", encoding="utf-8")
        fh.writelines(json.dumps(r) + "\n" for r in records)
        fh.flush()

    def checkpoint(step: int) -> None:
        if comm.is_root:
            os.makedirs(ckpt_dir, exist_ok=True)
        comm.sum(torch.zeros(()))  # directory exists before any rank writes
        save_checkpoint(ckpt, {"U": U.cpu(), "step": step,
                               "records": records if comm.is_root else []}, fingerprint=fp)

    t0 = time.perf_counter()
    bar = _progress(total, cfg.run.progress and comm.is_root, cfg.algorithm)
    bar.update(first - 1)
    stopped = None
    try:
        with StopFlag() as flag:
            for step in range(first, total + 1):
                # RNG counter 'step' is the Markov step: decomposition-independent and resumable
                U, info = update(U, step)
                bar.update(1)
                if step > cfg.run.n_therm and (step - cfg.run.n_therm) % cfg.run.measure_every == 0:
                    rec = {"step": step, **measure(U), **info}
                    records.append(rec)
                    if fh is not None:
                        fh.write(json.dumps(rec) + "\n")
                        fh.flush()
                    bar.set_postfix(plaq=f"{rec['plaquette']:.4f}")
                # every rank must agree to stop at the same step
                stop = float(comm.max(torch.tensor(float(flag.stop_requested)))) > 0
                if stop or step % cfg.sample.checkpoint_every == 0 or step == total:
                    checkpoint(step)
                if stop and step < total:
                    stopped = (step, flag.signal_name or "signal")
                    break
    finally:
        bar.close()
        if fh is not None:
            fh.close()
    if stopped is not None:
        if comm.is_root:
            print(f"hpcflow: stopped by {stopped[1]} after step {stopped[0]}; checkpoint written to "
                  f"{ckpt_dir}; rerun with --resume to continue")
        return RunResult(EXIT_RESUMABLE, {})
    elapsed = time.perf_counter() - t0
    return _finish(cfg, comm, records, elapsed, total - first + 1, out)


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
