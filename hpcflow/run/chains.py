"""From a config to a chain's update: the one place where ``Config`` meets the updates.

``hpcflow run`` and ``hpcflow sample`` both build their chain here, so the same config and
seed give the same chain (``run`` is chain 0 of ``sample``): stream ``c`` for chain ``c``,
mixed chains' heat-bath/HMC steps on stream ``LOCAL_STREAM_OFFSET + c``, every parameter
of the config section passed explicitly (``hmc.lam`` included).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from hpcflow.config import Config
from hpcflow.dtypes import precision_dtypes
from hpcflow.io.checkpoint import CheckpointError
from hpcflow.sampling.updates import (
    LOCAL_STREAM_OFFSET,
    FlowUpdate,
    HeatbathUpdate,
    HMCUpdate,
    MixedUpdate,
)

__all__ = ["load_model", "load_weights", "local_update", "model_checkpoint_path", "update_of_config"]


def model_checkpoint_path(cfg: Config) -> str:
    """The trained flow a flow/mixed chain samples with: the shipped model ``flow.model``
    names (:mod:`hpcflow.models`), else ``<output.dir>/train/checkpoint.pt``."""
    if cfg.flow.model is not None:
        from hpcflow.models import ModelError, resolve_model

        try:
            return str(resolve_model(cfg.flow.model).checkpoint)
        except ModelError as e:
            raise CheckpointError(f"flow.model {cfg.flow.model!r}: {e}") from None
    return os.path.join(cfg.output.dir, "train", "checkpoint.pt")


def load_weights(cfg: Config, model: Any) -> str:
    """Load the weights ``cfg`` samples with into ``model`` (a flow of ``cfg``'s architecture,
    plain or decomposed) and return the sha256 of their file. A shipped model (``flow.model``)
    is checked against the sha256 of its ``model.json`` first and may be used at another
    ``action.beta``; a trained one (``<output.dir>/train/checkpoint.pt``) must be of this beta.
    A one-line :class:`CheckpointError` ("missing model") when the file is absent, damaged,
    unreadable, or from another lattice, group, architecture or beta."""
    from hpcflow.flows.train import load_flow_checkpoint
    from hpcflow.io.checkpoint import file_sha256

    beta: float | None = cfg.action.beta
    if cfg.flow.model is not None:
        from hpcflow.models import ModelError, resolve_model, verify_model

        try:
            shipped = resolve_model(cfg.flow.model)
            sha = verify_model(shipped)
        except ModelError as e:
            raise CheckpointError(f"flow.model {cfg.flow.model!r}: {e}") from None
        path, beta = str(shipped.checkpoint), None
    else:
        path = model_checkpoint_path(cfg)
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: missing model: algorithm {cfg.algorithm} needs a trained flow; "
                                  "run `hpcflow train CONFIG` with the same config first, or name a shipped "
                                  "model in flow.model")
        sha = file_sha256(path)
    try:
        load_flow_checkpoint(model, path, beta)
    except Exception as e:  # noqa: BLE001 - unpickling/shape errors of a foreign file: one clear line
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: missing model for this run: the checkpoint does not fit "
                              f"({msg})") from None
    return sha


def load_model(cfg: Config, lat: Any) -> tuple[Any, str]:
    """``(model, sha256 of its checkpoint file)`` of ``cfg`` on ``lat`` (see :func:`load_weights`)."""
    from hpcflow.flows.build import build_model

    model = build_model(cfg, lat)
    sha = load_weights(cfg, model)
    model.eval()
    return model, sha


def local_update(cfg: Config, kind: str, lat: Any, comm: Any, rng: Any) -> Any:
    """The heat-bath or HMC update of ``cfg`` on ``lat`` drawing from ``rng``."""
    common = (lat, cfg.group, cfg.action.beta, rng, comm, precision_dtypes(cfg.precision)[0], cfg.device, cfg.run.start)
    if kind == "heatbath":
        return HeatbathUpdate(*common, n_overrelax=cfg.heatbath.n_overrelax)
    if kind == "hmc":
        return HMCUpdate(*common, n_steps=cfg.hmc.n_steps, tau=cfg.hmc.tau,
                         integrator=cfg.hmc.integrator, lam=cfg.hmc.lam)
    raise ValueError(f"no local update {kind!r}; allowed: heatbath, hmc")


def update_of_config(cfg: Config, chain: int, comm: Any, lat: Any,
                     model: Any = None) -> tuple[Any, Any, str]:
    """``(update, lattice, model sha256)`` of chain ``chain`` of ``cfg``.

    ``hmc``/``heatbath``: the link update on ``lat`` (stream ``chain``). ``flow``/``mixed``:
    independence Metropolis with ``model`` (default: the trained model of
    ``<output.dir>/train/checkpoint.pt``, whose sha256 is returned), run as a
    ``DistributedFlow`` on ``comm`` (its lattice is returned: halos of the layers' reach).
    """
    from hpcflow.lattice.groups import cold_field, get_group, random_field
    from hpcflow.rng import CounterRNG

    rng = CounterRNG(cfg.seed, stream=chain)
    if cfg.algorithm in ("hmc", "heatbath"):
        return local_update(cfg, cfg.algorithm, lat, comm, rng), lat, ""
    from hpcflow.flows.distributed import DistributedFlow

    sha = ""
    if model is None:
        from hpcflow.backend import run_backend
        from hpcflow.lattice.geometry import Lattice

        model, sha = load_model(cfg, Lattice(cfg.lattice.shape, backend=run_backend(cfg)))
    if not isinstance(model, DistributedFlow):
        try:
            # the group's ranks each transform their sub-lattice (halo = the layers' reach);
            # one rank: the same code on the whole lattice without halos
            model = DistributedFlow(model, comm if comm.size > 1 else None)
        except ValueError as e:
            from hpcflow.config import ConfigError

            raise ConfigError(f"{cfg.source}: domain-decomposed flow: {e}") from None
    model.eval()
    flat = model.lat
    group = get_group(cfg.group)
    cdtype = precision_dtypes(cfg.precision)[0]
    lrng = CounterRNG(cfg.seed, stream=LOCAL_STREAM_OFFSET + chain)

    def start_field() -> torch.Tensor:
        if cfg.run.start == "hot":  # step 0 of the local stream: no update uses it
            return random_field(flat, group, lrng, step=0, dtype=cdtype)
        return cold_field(flat, group, dtype=cdtype)

    flow = FlowUpdate(model, cfg.action.beta, rng, comm, cfg.sample.batch, cdtype, start_field)
    if cfg.algorithm == "flow":
        return flow, flat, sha
    local = {k: local_update(cfg, k, flat, comm, lrng) for k in set(cfg.mixed.pattern) - {"flow"}}
    return MixedUpdate(flow, cfg.mixed.pattern, local), flat, sha
