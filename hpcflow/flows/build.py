"""One entry point for every gauge group: ``build_flow(flow_cfg, lat, group, dtype)``.

``u1`` goes to the U(1) plaquette coupling flow (Kanwar et al. 2020, 2D), ``su2``/``su3`` to the
spectral SU(N) flow (Boyda et al. 2021, 2D and 4D); both are a
:class:`hpcflow.flows.base.GaugeFlow` of their theory. The CLI/driver calls this and never
imports the group-specific builders. :func:`build_model` builds the flow of a run's config
with its seeded initial weights.
"""

from __future__ import annotations

from typing import Any

import torch

from hpcflow.dtypes import precision_dtypes
from hpcflow.flows.arch import REAL_DTYPES, check_flow_config, flow_architecture
from hpcflow.flows.base import GaugeFlow
from hpcflow.lattice.geometry import Lattice
from hpcflow.lattice.groups import Group

__all__ = ["build_flow", "build_model", "check_flow_config", "flow_architecture"]

def build_flow(
    flow_cfg: Any, lat: Lattice, group: Group | str, dtype: torch.dtype = torch.float64
) -> GaugeFlow:
    """The flow of the config's ``flow:`` section for ``group`` (name or :class:`Group`).

    ``dtype``: ``torch.float64`` (default; complex128 links for SU(N)) or ``torch.float32``.
    """
    name = group.name if isinstance(group, Group) else group
    if not isinstance(name, str):
        raise TypeError(f"group must be a group name or Group, got {type(group).__name__}: {group!r}")
    key = name.strip().lower()
    if dtype not in REAL_DTYPES:
        raise TypeError(f"dtype must be torch.float64 or torch.float32, got {dtype}")
    if key == "u1":
        from hpcflow.flows.u1 import build_u1_flow

        return build_u1_flow(flow_cfg, lat, dtype)
    if key in ("su2", "su3"):
        from hpcflow.flows.sun import build_sun_flow

        return build_sun_flow(flow_cfg, lat, key, dtype)
    raise ValueError(f"group must be one of 'u1', 'su2', 'su3', got {name!r}")


def build_model(cfg: Any, lat: Lattice) -> GaugeFlow:
    """The configured flow for ``cfg.group`` on ``lat`` (``cfg``: a ``hpcflow.config.Config``),
    with initial weights from the config seed (the same on every rank and every rerun);
    architecture errors become one-line ``ConfigError``s."""
    import zlib

    from hpcflow.config import ConfigError
    from hpcflow.lattice.groups import get_group
    from hpcflow.rng import spawn_seed

    dtype = precision_dtypes(cfg.precision)[1]
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spawn_seed(cfg.seed, zlib.crc32(b"model-init")) % 2**63)
            return build_flow(cfg.flow, lat, get_group(cfg.group), dtype)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"{cfg.source}: flow architecture does not fit the lattice: {e}") from None
