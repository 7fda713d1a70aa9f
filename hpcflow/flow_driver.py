"""``hpcflow train`` and ``hpcflow run`` for ``algorithm: flow`` and ``algorithm: mixed``.

``train``: reverse-KL training of the configured gauge-equivariant flow, with checkpoints,
``--resume`` and a clean stop (checkpoint, exit 3) on SIGTERM/SIGUSR1/SIGINT.
``run``: train (or continue training up to ``train.steps``), then run the exact Markov chain
(independence Metropolis with flow proposals, or the mixed pattern of flow steps with heat
bath / HMC) and summarise it like every other chain: ``history.jsonl``, ``summary.json``,
observables with Gamma-method errors and tau_int beside the exact values.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from typing import Any

import numpy as np
import torch

from hpcflow.backend import run_backend
from hpcflow.config import Config, ConfigError
from hpcflow.driver import RunResult, _finish, _prepare_output, make_comm

__all__ = ["build_model", "train", "run"]


def _real_dtype(cfg: Config) -> torch.dtype:
    return torch.float32 if cfg.precision == "float32" else torch.float64


def build_model(cfg: Config, lat: Any) -> Any:
    """The configured flow for ``cfg.group`` on ``lat``; architecture errors become config errors."""
    from hpcflow.flows.build import build_flow
    from hpcflow.lattice.groups import get_group
    from hpcflow.rng import spawn_seed

    dtype = _real_dtype(cfg)
    try:
        # initial weights from the config seed, the same on every rank and every rerun
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spawn_seed(cfg.seed, zlib.crc32(b"model-init")) % 2**63)
            return build_flow(cfg.flow, lat, get_group(cfg.group), dtype)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"{cfg.source}: flow architecture does not fit the lattice: {e}") from None


def _trainer(cfg: Config, model: Any, lat: Any, comm: Any) -> Any:
    from hpcflow.flows.train import Trainer

    if getattr(comm, "hybrid", None) is not None:  # domain-decomposed flow (issue 7)
        return _distributed_trainer(cfg, model, comm.hybrid)

    kwargs: dict[str, Any] = {}
    action = getattr(model, "action", None)
    if callable(action):  # SU(N) flows bring their own action on their own variables
        kwargs["action"] = lambda x: action(x, cfg.action.beta)
    try:
        return Trainer(model, lat, cfg.action.beta, cfg.train, cfg.output.dir, comm=comm, seed=cfg.seed,
                       dtype=_real_dtype(cfg), progress=cfg.run.progress and comm.is_root, **kwargs)
    except ValueError as e:
        raise ConfigError(f"{cfg.source}: {e}") from None


def _train(cfg: Config, comm: Any, lat: Any, model: Any, resume: bool) -> tuple[Any, int]:
    """Train to ``train.steps``; returns (trainer, exit code). Resume if a checkpoint exists
    and ``resume`` was asked for; a finished training is not repeated."""
    from hpcflow.cli import EXIT_OK, EXIT_RESUMABLE
    from hpcflow.signals import StopFlag

    tr = _trainer(cfg, model, lat, comm)
    have_ckpt = tr.ckpt_path.exists()
    if resume and not have_ckpt and comm.is_root:
        print(f"hpcflow: --resume: no training checkpoint at {tr.ckpt_path}; starting training")
    t0 = time.perf_counter()
    try:
        with StopFlag() as flag:
            rows = tr.train(resume=resume and have_ckpt, stop=flag)
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
              f"{last['acceptance']:.3f}; metrics: {tr.metrics_path}")
    return tr, EXIT_OK


def train(cfg: Config, resume: bool = False) -> RunResult:
    dist = _distributed_setup(cfg)
    if dist is not None:
        comm, lat, model = dist
        _prepare_output(cfg, comm)
        _, code = _train(cfg, comm, lat, model, resume)
        return RunResult(code, {})
    comm = make_comm(cfg)
    _prepare_output(cfg, comm)
    lat = _flow_lattice(cfg)
    model = build_model(cfg, lat)
    _, code = _train(cfg, comm, lat, model, resume)
    return RunResult(code, {})


def _flow_lattice(cfg: Config) -> Any:
    from hpcflow.lattice.geometry import Lattice

    return Lattice(cfg.lattice.shape, backend=run_backend(cfg))


def _records_from_chain(res: dict, first_step: int, n_therm: int) -> list[dict]:
    out = []
    for i in range(n_therm, len(res["accepted"])):
        q = float(res["Q"][i])
        out.append({"step": first_step + i, "plaquette": float(res["plaquette"][i]), "Q": q, "Q2": q * q,
                    "S": float(res["S"][i]), "accepted": float(res["accepted"][i]),
                    **({"logq": float(res["logq"][i]), "logw": float(res["logw"][i])} if "logq" in res else {})})
    return out


def run(cfg: Config, resume: bool = False) -> RunResult:
    """Train (or finish training), then sample the exact chain and summarise it."""
    from hpcflow.analysis import ess, reweighted_gamma
    from hpcflow.cli import EXIT_OK
    from hpcflow.rng import CounterRNG

    dist = _distributed_setup(cfg)
    if dist is not None:
        if cfg.algorithm != "flow":
            raise ConfigError(f"{cfg.source}: key 'algorithm': {cfg.algorithm!r} runs on one rank per "
                              "chain; domain-decomposed sampling supports algorithm: flow")
        comm, lat, model = dist
    else:
        comm = make_comm(cfg)
        if comm.size > 1 and not hasattr(comm, "local_lattice"):
            raise ConfigError(f"{cfg.source}: flows run data-parallel only in training so far; "
                              "sample with one rank")
        lat = _flow_lattice(cfg)
        model = build_model(cfg, lat)
    out = _prepare_output(cfg, comm)
    tr, code = _train(cfg, comm, lat, model, resume)
    if code != EXIT_OK:
        return RunResult(code, {})
    model.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        if dist is not None:
            # every replica group runs the same decomposition-independent chain (same seed,
            # same proposal numbers as the one-rank chain); world rank 0 writes
            from hpcflow.sampling.flow_chains import flow_chain

            res = flow_chain(model, cfg.action.beta, cfg.sample.n_steps, cfg.sample.batch,
                             rng=CounterRNG(cfg.seed, 0))
            n_updates = cfg.sample.n_steps
        elif cfg.algorithm == "flow":
            from hpcflow.sampling.metropolis import metropolis_chain

            res = metropolis_chain(model, lat, cfg.action.beta, cfg.sample.n_steps, cfg.sample.batch,
                                   rng=CounterRNG(cfg.seed, 0), progress=cfg.run.progress and comm.is_root)
            n_updates = cfg.sample.n_steps
        else:
            n_cycles = max(1, cfg.sample.n_steps // len(cfg.mixed.pattern))
            pattern = list(cfg.mixed.pattern)
            if cfg.group == "u1":
                from hpcflow.sampling.mixed import mixed_chain

                res = mixed_chain(model, lat, cfg.action.beta, pattern, n_cycles, cfg.seed,
                                  batch=cfg.sample.batch, hmc_cfg=cfg.hmc, n_overrelax=cfg.heatbath.n_overrelax,
                                  progress=cfg.run.progress and comm.is_root)
            else:  # SU(N) flows drive the chain through their model hooks
                from hpcflow.sampling.flow_chains import flow_mixed_chain

                res = flow_mixed_chain(model, cfg.action.beta, pattern, n_cycles, cfg.seed,
                                       batch=cfg.sample.batch, hmc_cfg=cfg.hmc,
                                       n_overrelax=cfg.heatbath.n_overrelax)
            n_updates = n_cycles * len(cfg.mixed.pattern)
    elapsed = time.perf_counter() - t0
    records = _records_from_chain(res, 1, cfg.sample.n_therm)
    if comm.is_root:
        with open(os.path.join(out, "history.jsonl"), "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in records)
    extra: dict[str, Any] = {"acceptance": float(np.mean(res["accepted"][cfg.sample.n_therm:])),
                             "training_steps": tr.step}
    if "proposal_logw" in res:
        lw = np.asarray(res["proposal_logw"], dtype=np.float64)
        extra["ess_per_proposal"] = float(ess(lw))
        rw = {}
        for name, x in (("plaquette", res["proposal_plaquette"]), ("Q2", np.asarray(res["proposal_Q"]) ** 2)):
            g = reweighted_gamma(np.asarray(x, dtype=np.float64), lw)
            rw[name] = {"mean": float(g.mean), "error": float(g.error)}
        extra["reweighted"] = rw
    result = _finish(cfg, comm, records, elapsed, n_updates, out, extra=extra)
    if comm.is_root:
        line = f"chain acceptance {extra['acceptance']:.3f}"
        if "ess_per_proposal" in extra:
            line += f", ESS per proposal {extra['ess_per_proposal']:.3f}"
            rw = extra["reweighted"]
            line += (f"; reweighted proposals: plaquette {rw['plaquette']['mean']:.5f} +- "
                     f"{rw['plaquette']['error']:.5f}, Q2 {rw['Q2']['mean']:.4f} +- {rw['Q2']['error']:.4f}")
        print(line)
    return result


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
