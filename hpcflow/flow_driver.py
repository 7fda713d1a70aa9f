"""``hpcflow train`` and ``hpcflow run`` for ``algorithm: flow`` and ``algorithm: mixed``.

``train``: reverse-KL training of the configured gauge-equivariant flow, with checkpoints,
``--resume`` and a clean stop (checkpoint, exit 3) on SIGTERM/SIGUSR1/SIGINT.
``run``: train (or continue training up to ``train.steps``), then run the exact Markov chain
(independence Metropolis with flow proposals, or the mixed pattern of flow steps with heat
bath / HMC) and summarise it like every other chain: ``history.jsonl``, ``summary.json``,
observables with Gamma-method errors and tau_int beside the exact values.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from hpcflow.backend import run_backend
from hpcflow.config import Config, ConfigError
from hpcflow.driver import RunResult, _finish, _prepare_output, make_comm, run_chain
from hpcflow.flows.build import build_model

__all__ = ["build_model", "train", "run"]


def _real_dtype(cfg: Config) -> torch.dtype:
    return torch.float32 if cfg.precision == "float32" else torch.float64


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


def run(cfg: Config, resume: bool = False) -> RunResult:
    """Train (or finish training), then sample the exact chain and summarise it.

    The chain is chain 0 of ``hpcflow sample`` with the trained model (``sample.n_therm`` +
    ``sample.n_steps`` Markov steps; ``algorithm: mixed`` in the ``mixed.pattern``), with the
    history sink of ``hpcflow run`` (measurements, checkpoints, resume). The summary adds the
    flow steps' acceptance and, over every independent proposal, the ESS per proposal and the
    importance-reweighted plaquette and Q^2 (reweighting applies to the proposals only: the
    chain's states are already distributed as exp(-S)/Z).
    """
    from hpcflow.analysis import ess, reweighted_gamma
    from hpcflow.exit_codes import EXIT_OK

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
    if dist is not None:
        # every replica group runs the same decomposition-independent chain (same seed, same
        # proposal numbers as the one-rank chain); world rank 0 writes
        hybrid = comm.hybrid
        code, chain, sink = run_chain(cfg, hybrid.domain, model.lat, out, resume, model=model,
                                      control=hybrid, writer=hybrid.is_root)
    else:
        code, chain, sink = run_chain(cfg, _serial_if_plain(comm), lat, out, resume, model=model)
    if code != EXIT_OK:
        return RunResult(code, {})
    elapsed = time.perf_counter() - t0
    records = sink.records
    flow_steps = [r["accepted"] for r in records if r.get("kind") == "flow"]
    extra: dict[str, Any] = {"acceptance": float(np.mean(flow_steps)) if flow_steps else float("nan"),
                             "training_steps": tr.step}
    if sink.proposals:
        prop = np.asarray(sink.proposals, dtype=np.float64)
        lw = prop[:, 0]
        extra["ess_per_proposal"] = float(ess(lw))
        rw = {}
        for name, x in (("plaquette", prop[:, 1]), ("Q2", prop[:, 2] ** 2)):
            g = reweighted_gamma(x, lw)
            rw[name] = {"mean": float(g.mean), "error": float(g.error)}
        extra["reweighted"] = rw
    result = _finish(cfg, comm, records, elapsed, chain.total - chain.first_step, out, extra=extra)
    if comm.is_root:
        line = f"flow-step acceptance {extra['acceptance']:.3f}"
        if "ess_per_proposal" in extra:
            line += f", ESS per proposal {extra['ess_per_proposal']:.3f}"
            rw = extra["reweighted"]
            line += (f"; reweighted proposals: plaquette {rw['plaquette']['mean']:.5f} +- "
                     f"{rw['plaquette']['error']:.5f}, Q2 {rw['Q2']['mean']:.4f} +- {rw['Q2']['error']:.4f}")
        print(line)
    return result


def _serial_if_plain(comm: Any) -> Any:
    """Flow chains without a domain decomposition run on one rank: a serial communicator."""
    from hpcflow.lattice.geometry import SerialComm

    return comm if hasattr(comm, "local_lattice") else SerialComm()


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
