"""One entry point for every gauge group: ``build_flow(flow_cfg, lat, group, dtype)``.

``u1`` goes to the U(1) plaquette coupling flow (Kanwar et al. 2020, 2D), ``su2``/``su3`` to the
spectral SU(N) flow (Boyda et al. 2021, 2D and 4D). The CLI/driver calls this and never
imports the group-specific builders.
"""

from __future__ import annotations

from typing import Any

import torch

from hpcflow.lattice.geometry import Lattice
from hpcflow.lattice.groups import Group

__all__ = ["build_flow"]


def build_flow(
    flow_cfg: Any, lat: Lattice, group: Group | str, dtype: torch.dtype = torch.float64
) -> torch.nn.Module:
    """The flow of the config's ``flow:`` section for ``group`` (name or :class:`Group`).

    ``dtype``: ``torch.float64`` (default; complex128 links for SU(N)) or ``torch.float32``.
    """
    name = group.name if isinstance(group, Group) else group
    if not isinstance(name, str):
        raise TypeError(f"group must be a group name or Group, got {type(group).__name__}: {group!r}")
    key = name.strip().lower()
    if dtype not in (torch.float64, torch.float32):
        raise TypeError(f"dtype must be torch.float64 or torch.float32, got {dtype}")
    if key == "u1":
        from hpcflow.flows.u1 import build_u1_flow

        return build_u1_flow(flow_cfg, lat, dtype)
    if key in ("su2", "su3"):
        from hpcflow.flows.sun import build_sun_flow

        return build_sun_flow(flow_cfg, lat, key, dtype)
    raise ValueError(f"group must be one of 'u1', 'su2', 'su3', got {name!r}")
