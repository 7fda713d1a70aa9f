"""Per-configuration observables: what ``hpcflow run`` writes to ``history.jsonl`` and
``hpcflow sample`` stores in every ensemble row (one function for both, so run == sample).

:class:`Measurer` ``(cfg, lat, comm)`` measures a stored configuration (``index``: its number
among the stored configurations of the chain, 0-based):

* every configuration: ``plaquette``, the configured Wilson loops ``W_RxT``
  (``measure.wilson_loops``), ``polyakov_abs`` = ``|P|``; 2D U(1): the geometric charge ``Q``
  and ``Q2`` (exact integers);
* 4D with ``measure.flow_time > 0``, every ``flow_every``-th configuration (index 0, F, 2F, ...;
  the others hold NaN): Wilson flow to ``measure.flow_time`` in steps of ``measure.flow_eps``;
  the clover charge ``Q``/``Q2`` of the flowed field; ``t2E_clov``/``t2E_plaq`` = ``t^2 E(t)``
  on the flow-time grid :attr:`Measurer.flow_times` (every ``k`` flow steps, at most 50
  points) with the clover and the plaquette ``E``; ``t0_clov``/``t0_plaq`` (``t0/a^2``) and
  ``w0_clov``/``w0_plaq`` (``w0/a``) where the flow reaches them (Luscher, arXiv 1006.4518;
  BMW, arXiv 1203.4469; NaN when ``flow_time`` is too short).

``flow_every`` is ``measure.flow_every``, or with 0 (the default) :func:`auto_flow_every`:
the cost rule ``ceil(5 * n_flow / run.measure_every)`` (``n_flow`` RK3 flow steps per flowed
configuration, one flow step counted as one update: the issue's 4x4x6x4 SU(3) measurements,
50 flow steps for 10-40 heat-bath updates, give 0.2-0.8 update per step), so that flowing costs
at most ~20% of the updates.

Wilson loops on a decomposed lattice need halos of at least ``max(R, T)`` sites
(:func:`hpcflow.run.driver.make_lattice` and the sample worker groups build them); a loop
that does not fit the halo (or the local extent) is refused at set-up with a one-line
:class:`~hpcflow.config.ConfigError` naming ``measure.wilson_loops``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from hpcflow.config import Config, ConfigError

__all__ = ["FLOW_GRID_MAX", "MEASURE_BUDGET", "Measurer", "auto_flow_every", "flow_steps", "loop_halo"]

#: At most this many flow times in ``t2E_*`` (the grid step is ``ceil(n_flow / FLOW_GRID_MAX)``).
FLOW_GRID_MAX = 50
#: The share of the update time the automatic ``flow_every`` allows the flow, one flow step
#: counted as one update.
MEASURE_BUDGET = 0.2


def flow_steps(cfg: Config) -> int:
    """RK3 Wilson-flow steps per flowed configuration (0: no flow)."""
    m = cfg.measure
    if cfg.nd != 4 or m.flow_time <= 0:
        return 0
    return max(1, round(m.flow_time / m.flow_eps))


def auto_flow_every(n_flow: int, measure_every: int) -> int:
    """``ceil(n_flow / (MEASURE_BUDGET * measure_every))``: flow steps per update <= 0.2."""
    if n_flow <= 0:
        return 1
    return max(1, math.ceil(n_flow / (MEASURE_BUDGET * max(1, measure_every)) - 1e-9))


def loop_halo(cfg: Config) -> int:
    """The halo the configured Wilson loops need: ``max(1, max(R, T))``."""
    return max([1] + [max(r, t) for r, t in cfg.measure.wilson_loops])


class Measurer:
    """Observables of one stored configuration (module docstring). ``columns()``: the row
    columns it fills beyond ``plaquette`` (dtype, per-row shape), as the ensemble stores them."""

    def __init__(self, cfg: Config, lat: Any, comm: Any) -> None:
        import dataclasses

        self.cfg, self.comm = cfg, comm
        self.chain_lat = self.lat = lat
        self.loops = [(int(r), int(t)) for r, t in cfg.measure.wilson_loops]
        padded = tuple(getattr(lat, "padded_dims", ()) or ())
        reach = loop_halo(cfg)
        for r, t in self.loops:
            if padded and any(max(r, t) > lat.local_shape[d] for d in padded):
                raise ConfigError(
                    f"{cfg.source}: key 'measure.wilson_loops': loop [{r}, {t}] reaches {max(r, t)} sites, more "
                    f"than the local extent {list(lat.local_shape)} of a rank's sub-lattice (decomposed dims "
                    f"{list(padded)}); allowed: loops with max(R, T) <= the local extent (fewer ranks per "
                    "chain, or smaller loops)")
        if padded and reach > lat.halo:  # the chain's halos are too thin: measure on a re-padded copy
            self.lat = dataclasses.replace(lat, halo=reach)
        self.u1_2d = cfg.nd == 2 and cfg.group == "u1"
        self.n_flow = flow_steps(cfg)
        self.flow_every = (cfg.measure.flow_every or auto_flow_every(self.n_flow, cfg.run.measure_every)) \
            if self.n_flow else 1
        self.grid_step = max(1, math.ceil(self.n_flow / FLOW_GRID_MAX)) if self.n_flow else 1
        self.flow_times = [cfg.measure.flow_eps * min(j * self.grid_step, self.n_flow)
                           for j in range(1, math.ceil(self.n_flow / self.grid_step) + 1)] if self.n_flow else []

    def columns(self) -> dict[str, tuple[Any, tuple[int, ...]]]:
        f8: Any = np.float64
        cols: dict[str, tuple[Any, tuple[int, ...]]] = {}
        for r, t in self.loops:
            cols[f"W_{r}x{t}"] = (f8, ())
        cols["polyakov_abs"] = (f8, ())
        if self.u1_2d or self.n_flow:
            cols["Q"] = (f8, ())
            cols["Q2"] = (f8, ())
        if self.n_flow:
            m = len(self.flow_times)
            cols.update(t2E_clov=(f8, (m,)), t2E_plaq=(f8, (m,)), t0_clov=(f8, ()), t0_plaq=(f8, ()),
                        w0_clov=(f8, ()), w0_plaq=(f8, ()))
        return cols

    def flowed(self, index: int) -> bool:
        """Whether stored configuration ``index`` gets the Wilson-flowed observables."""
        return bool(self.n_flow) and index % self.flow_every == 0

    def __call__(self, U: torch.Tensor, index: int = 0) -> dict[str, Any]:
        from hpcflow.lattice import observables as obs
        from hpcflow.lattice.action import average_plaquette

        cfg, lat, comm = self.cfg, self.lat, self.comm
        if lat is not self.chain_lat:  # copy the interior into arrays with halos wide enough
            V = U.new_zeros(U.shape[: U.dim() - (lat.nd + 3)] + (lat.nd,) + tuple(lat.shape) + tuple(U.shape[-2:]))
            V[lat.interior_slices(2)] = U[self.chain_lat.interior_slices(2)]
            U = V
        U = comm.exchange(U, lat)  # updates leave halos stale; observables read them
        m: dict[str, Any] = {"plaquette": float(average_plaquette(U, lat, comm=comm))}
        for r, t in self.loops:
            m[f"W_{r}x{t}"] = float(obs.wilson_loop(U, lat, r, t, comm=comm))
        m["polyakov_abs"] = float(abs(obs.polyakov_loop(U, lat, comm=comm)))
        if self.u1_2d:
            q = float(obs.topological_charge_u1_2d(U, lat, comm=comm))
            m["Q"], m["Q2"] = q, q * q
        elif self.n_flow:
            nan = math.nan
            if self.flowed(index):
                V, ts, ec, ep = obs.flow_energy(U, lat, cfg.measure.flow_eps, self.n_flow, self.grid_step,
                                                comm=comm)
                q = float(obs.topological_charge_clover(V, lat, comm=comm))
                t2c = [t * t * e for t, e in zip(ts, ec)]
                t2p = [t * t * e for t, e in zip(ts, ep)]
                m.update(Q=q, Q2=q * q, t2E_clov=t2c, t2E_plaq=t2p,
                         t0_clov=obs.flow_scale_t0(ts, t2c), t0_plaq=obs.flow_scale_t0(ts, t2p),
                         w0_clov=obs.flow_scale_w0(ts, t2c), w0_plaq=obs.flow_scale_w0(ts, t2p))
            else:
                k = len(self.flow_times)
                m.update(Q=nan, Q2=nan, t2E_clov=[nan] * k, t2E_plaq=[nan] * k, t0_clov=nan, t0_plaq=nan,
                         w0_clov=nan, w0_plaq=nan)
        return m
