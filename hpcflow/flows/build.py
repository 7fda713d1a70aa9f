"""One entry point for every gauge group: ``build_flow(flow_cfg, lat, group, dtype)``.

``u1`` goes to the U(1) plaquette coupling flow (Kanwar et al. 2020, 2D), ``su2``/``su3`` to the
spectral SU(N) flow (Boyda et al. 2021, 2D and 4D); both are a
:class:`hpcflow.flows.base.GaugeFlow` of their theory. The CLI/driver calls this and never
imports the group-specific builders. :func:`build_model` builds the flow of a run's config
with its seeded initial weights.

Two architecture questions the trainer asks (``train.init_from``, ``train.gradient: path``):
:func:`transfer_problem` (can the weights of a flow trained on one lattice drive a flow on
another?) and :func:`missing_inverse` (does every layer and kernel have an inverse?).
"""

from __future__ import annotations

from typing import Any

import torch

from hpcflow.dtypes import precision_dtypes
from hpcflow.flows.arch import REAL_DTYPES, check_flow_config, flow_architecture
from hpcflow.flows.base import GaugeFlow
from hpcflow.lattice.geometry import Lattice
from hpcflow.lattice.groups import Group

__all__ = [
    "build_flow",
    "build_model",
    "check_flow_config",
    "flow_architecture",
    "mask_periods",
    "missing_inverse",
    "transfer_problem",
]

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


# ---- volume transfer and invertibility ---------------------------------------------------
def mask_periods(group: str, shape: Any) -> list[int]:
    """Stripe period of the coupling masks across each direction of a lattice of extents
    ``shape`` (0: no mask fits that extent). U(1): 4 everywhere; SU(N): 4, or 2 for extents
    that are even but not multiples of 4 (:func:`hpcflow.flows.sun.mask_period`)."""
    if group == "u1":
        from hpcflow.flows.u1 import MASK_PERIOD

        return [MASK_PERIOD if int(n) % MASK_PERIOD == 0 else 0 for n in shape]
    from hpcflow.flows.sun import mask_period

    return [mask_period(int(n)) for n in shape]


def transfer_problem(src_meta: dict[str, Any], arch: dict[str, Any]) -> str | None:
    """Why the weights of a trained flow (its checkpoint ``meta``) cannot initialise the flow of
    architecture ``arch`` on another lattice, or ``None`` when they can.

    The layers' parameters are those of translation-equivariant convolutions (no lattice size
    in them), so they transfer when the group and every architecture field but the lattice
    agree, the dimension is the same, and the coupling masks are the same pattern on both
    lattices: per direction the same mask period, dividing both extents."""
    src = dict(src_meta.get("arch") or {})
    group_src = src.get("group", src_meta.get("group"))
    if group_src != arch.get("group"):
        return f"group is {group_src!r} in the source, {arch.get('group')!r} in this run"
    for key in sorted((set(src) | set(arch)) - {"group", "lattice"}):
        if src.get(key) != arch.get(key):
            return f"flow.{key} is {src.get(key)!r} in the source, {arch.get(key)!r} in this run"
    a = [int(n) for n in (src.get("lattice") or src_meta.get("lattice") or [])]
    b = [int(n) for n in arch.get("lattice", [])]
    if len(a) != len(b):
        return f"the source lattice {a} has {len(a)} dimensions, this run's {b} has {len(b)}"
    for d, (pa, pb) in enumerate(zip(mask_periods(str(arch["group"]), a),
                                     mask_periods(str(arch["group"]), b))):
        if pa == 0 or pa != pb or a[d] % pa or b[d] % pa:
            p = pa or pb or 4
            return (f"the mask period {p} of direction {d} must divide both lattice extents "
                    f"(source {a}, this run {b})")
    return None


def missing_inverse(flow: torch.nn.Module) -> str | None:
    """The first layer (or its kernel) without an inverse, as ``"layer i (Type)"``, or
    ``None`` when the whole flow can be run backwards (``log_prob``, path gradients)."""
    from hpcflow.flows.base import Bijection
    from hpcflow.flows.kernels1d import CircularKernel, IntervalKernel

    abstract = {Bijection.inverse, CircularKernel.inverse, IntervalKernel.inverse}
    for i, layer in enumerate(getattr(flow, "layers", [])):
        if getattr(type(layer), "inverse", Bijection.inverse) in abstract:
            return f"layer {i} ({type(layer).__name__})"
        kernel = getattr(layer, "kernel", None)
        if kernel is not None and getattr(type(kernel), "inverse", Bijection.inverse) in abstract:
            return f"layer {i} (kernel {type(kernel).__name__})"
    return None
