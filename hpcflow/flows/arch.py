"""What every flow builder shares: the config checks and the architecture record a
checkpoint stores to recognise its model (imported by the group-specific builders and by
:mod:`hpcflow.flows.build`, which imports those builders: kept apart so nothing cycles)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from hpcflow.lattice.geometry import Lattice

__all__ = ["REAL_DTYPES", "check_flow_config", "flow_architecture"]

REAL_DTYPES = (torch.float64, torch.float32)


def check_flow_config(flow_cfg: Any, dtype: torch.dtype, dtypes: Sequence[torch.dtype] = REAL_DTYPES) -> int:
    """Check ``dtype`` (one of ``dtypes``) and ``flow.n_layers >= 1``; returns ``n_layers``."""
    if dtype not in dtypes:
        raise TypeError(f"dtype must be torch.float64 or torch.float32, got {dtype}")
    n_layers = int(flow_cfg.n_layers)
    if n_layers < 1:
        raise ValueError(f"flow.n_layers must be >= 1, got {n_layers}")
    return n_layers


def flow_architecture(flow_cfg: Any, lat: Lattice, group: str, layer: str | None = None) -> dict[str, Any]:
    """What a checkpoint records to recognise the model: group, lattice and every knob
    (``layer``: the coupling-layer family where a group has a non-default one)."""
    arch: dict[str, Any] = {
        "group": group,
        "lattice": list(lat.global_shape),
        "n_layers": int(flow_cfg.n_layers),
        "kernel": str(flow_cfg.kernel),
        "n_components": int(flow_cfg.n_components),
        "n_knots": int(flow_cfg.n_knots),
        "hidden": [int(h) for h in flow_cfg.hidden],
        "kernel_size": int(flow_cfg.kernel_size),
    }
    if layer is not None:
        arch["layer"] = layer
    return arch
