"""YAML configuration -> validated, frozen dataclasses.

The configuration is parsed once (by the CLI) and passed explicitly to everything else.
Every problem is reported as one line naming the file, the dotted key, the bad value and
what is allowed, e.g.::

    hpcflow: config error: run.yaml: key 'action.beta': got -1.0; allowed: a number > 0

Stable dotted keys that scripts and campaigns may rely on: ``lattice.shape``, ``group``,
``action.beta``, ``algorithm``, ``seed``, ``precision``, ``grid``, ``output.dir``.
Any key can be overridden on the command line with ``--set key=value`` (value in YAML
syntax, e.g. ``--set lattice.shape=[6,6]``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from hpcflow.kernels.backends import BACKENDS

__all__ = [
    "BetaScheduleError",
    "ConfigError",
    "Config",
    "LatticeConfig",
    "ActionConfig",
    "HMCConfig",
    "HeatbathConfig",
    "FlowConfig",
    "TrainConfig",
    "SampleConfig",
    "MixedConfig",
    "RunConfig",
    "MeasureConfig",
    "OutputConfig",
    "load_config",
    "config_from_dict",
    "apply_overrides",
    "default_yaml",
    "config_to_dict",
    "beta_schedule_points",
    "parse_beta_schedule",
    "flow_fingerprint_part",
]

GROUPS = ("u1", "su2", "su3")
ALGORITHMS = ("hmc", "heatbath", "flow", "mixed")
PRECISIONS = ("float64", "float32")
INTEGRATORS = ("omelyan", "leapfrog")
KERNELS = ("ncp", "spline")
SCHEDULES = ("constant", "cosine", "step")
GRADIENTS = ("reparam", "path")
STARTS = ("hot", "cold")
MIXED_STEPS = ("flow", "heatbath", "hmc")


class ConfigError(ValueError):
    """A configuration problem; ``str()`` is the one-line message for the user."""


def _opt(help: str, **kw: Any) -> dict:
    """Field metadata: help text for the commented defaults plus validation rules."""
    return {"help": help, **kw}


# ---- sections -----------------------------------------------------------------------------
@dataclass(frozen=True)
class LatticeConfig:
    shape: tuple[int, ...] = field(
        default=(8, 8),
        metadata=_opt("global extents [L0, L1] (2D) or [L0, L1, L2, L3] (4D); the last axis is time",
                      kind="extents"),
    )

    @property
    def nd(self) -> int:
        return len(self.shape)


@dataclass(frozen=True)
class ActionConfig:
    name: str = field(default="wilson", metadata=_opt("gauge action", choices=("wilson",)))
    beta: float = field(default=2.0, metadata=_opt("inverse coupling beta", kind="float", gt=0.0))


@dataclass(frozen=True)
class HMCConfig:
    n_steps: int = field(default=10, metadata=_opt("integration steps per trajectory", kind="int", ge=1))
    tau: float = field(default=1.0, metadata=_opt("trajectory length", kind="float", gt=0.0))
    integrator: str = field(default="omelyan", metadata=_opt("molecular-dynamics integrator",
                                                             choices=INTEGRATORS))
    lam: float = field(default=0.1932, metadata=_opt("Omelyan 2MN parameter lambda", kind="float",
                                                     gt=0.0, lt=0.5))


@dataclass(frozen=True)
class HeatbathConfig:
    n_overrelax: int = field(default=1, metadata=_opt("overrelaxation sweeps after each heat-bath sweep",
                                                      kind="int", ge=0))


@dataclass(frozen=True)
class FlowConfig:
    n_layers: int = field(default=16, metadata=_opt("gauge-equivariant coupling layers", kind="int", ge=1))
    kernel: str = field(default="ncp", metadata=_opt("plaquette kernel: NCP mixture or circular spline",
                                                     choices=KERNELS))
    n_components: int = field(default=2, metadata=_opt("NCP mixture components", kind="int", ge=1))
    n_knots: int = field(default=8, metadata=_opt("circular spline knots", kind="int", ge=2))
    hidden: tuple[int, ...] = field(default=(8, 8), metadata=_opt("CNN hidden channels",
                                                                  kind="intlist", ge=1, minlen=0))
    kernel_size: int = field(default=3, metadata=_opt("CNN kernel size (odd)", kind="int", ge=1, odd=True))
    checkpoint_activations: bool = field(default=False,
                                         metadata=_opt("recompute activations in backward to save memory",
                                                       kind="bool"))
    model: str | None = field(default=None, metadata=_opt(
        "sample with a shipped model instead of training: its name (`hpcflow models` lists them) or a "
        "model directory; lattice.shape, group and the flow.* architecture are the model's (a different "
        "value is an error), algorithm, action.beta and precision default to the model's", kind="optpath"))


@dataclass(frozen=True)
class TrainConfig:
    steps: int = field(default=1000, metadata=_opt("optimizer steps", kind="int", ge=0))
    batch: int = field(default=64, metadata=_opt("global batch size (split over data-parallel ranks)",
                                                 kind="int", ge=1))
    lr: float = field(default=1e-3, metadata=_opt("Adam learning rate", kind="float", gt=0.0))
    schedule: str = field(default="cosine", metadata=_opt("learning-rate schedule", choices=SCHEDULES))
    grad_clip: float = field(default=10.0, metadata=_opt("max gradient norm, 0 = off", kind="float", ge=0.0))
    checkpoint_every: int = field(default=100, metadata=_opt("steps between checkpoints", kind="int", ge=1))
    log_every: int = field(default=10, metadata=_opt("steps between progress reports", kind="int", ge=1))
    replicas: int = field(default=1, metadata=_opt(
        "data-parallel replicas under MPI: world = replicas x prod(grid) ranks", kind="int", ge=1))
    beta_schedule: Any = field(default=None, metadata=_opt(
        "beta annealing: null (train at action.beta), [[step, beta], ...] (piecewise linear from step 0, "
        "constant after the last point, which must be action.beta) or {from: beta0, steps: n} "
        "(linear from beta0 to action.beta over n steps)", kind="betaschedule"))
    init_from: str | None = field(default=None, metadata=_opt(
        "warm start: a flow checkpoint (train/checkpoint.pt) of the same architecture on another "
        "lattice size or beta; null = the seeded initial weights", kind="optpath"))
    gradient: str = field(default="reparam", metadata=_opt(
        "reverse-KL gradient estimator: reparam (reparameterisation) or path (Vaitl et al. 2022: "
        "drops the zero-mean score term; one extra inverse pass per step)", choices=GRADIENTS))
    accumulate: int = field(default=1, metadata=_opt(
        "micro-batches of train.batch per optimizer step (effective batch = accumulate x batch)",
        kind="int", ge=1))
    diagnostics_every: int = field(default=0, metadata=_opt(
        "2D U(1): steps between topology diagnostics of the training batch "
        "(hpcflow.flows.diagnostics) in metrics.jsonl; 0 = off", kind="int", ge=0))


@dataclass(frozen=True)
class SampleConfig:
    n_steps: int = field(default=2000, metadata=_opt("Markov-chain length (flow proposals)", kind="int", ge=1))
    batch: int = field(default=256, metadata=_opt("proposals generated per forward pass", kind="int", ge=1))
    n_therm: int = field(default=0, metadata=_opt("chain steps discarded before measuring", kind="int", ge=0))
    n_workers: int = field(default=1, metadata=_opt(
        "worker groups (independent Markov chains); the ranks are split evenly among them", kind="int", ge=1))
    checkpoint_every: int = field(default=100, metadata=_opt("configurations between chain checkpoints",
                                                             kind="int", ge=1))


@dataclass(frozen=True)
class MixedConfig:
    pattern: tuple[str, ...] = field(default=("flow", "heatbath"),
                                     metadata=_opt("one cycle of the mixed chain",
                                                   kind="strlist", choices=MIXED_STEPS))


@dataclass(frozen=True)
class RunConfig:
    n_therm: int = field(default=100, metadata=_opt("thermalization steps (not measured)", kind="int", ge=0))
    n_steps: int = field(default=1000, metadata=_opt("measured steps (trajectories / sweeps)", kind="int", ge=1))
    measure_every: int = field(default=1, metadata=_opt("steps between measurements", kind="int", ge=1))
    start: str = field(default="hot", metadata=_opt("initial configuration", choices=STARTS))
    progress: bool = field(default=True, metadata=_opt(
        "progress on rank 0 (a bar on a terminal, one line every 10% or 60 s otherwise)", kind="bool"))
    plots: bool = field(default=True, metadata=_opt(
        "write <output.dir>/plots at the end of run and sample (a plotting failure is a warning)",
        kind="bool"))


@dataclass(frozen=True)
class MeasureConfig:
    wilson_loops: tuple[tuple[int, int], ...] = field(
        default=((1, 1), (2, 2)), metadata=_opt("rectangular Wilson loops [R, T] to measure", kind="looplist"))
    flow_time: float = field(default=1.0, metadata=_opt("Wilson-flow time for the 4D clover charge",
                                                        kind="float", ge=0.0))
    flow_eps: float = field(default=0.02, metadata=_opt("Wilson-flow step size", kind="float", gt=0.0))
    flow_every: int = field(default=0, metadata=_opt(
        "4D: Wilson-flow (Q, t^2 E, t0, w0) every this many stored configurations; the others store NaN "
        "there. 0 = auto: ceil(5 * flow steps / run.measure_every), so that the flow (about one update per "
        "flow step) costs at most ~20% of the updates", kind="int", ge=0))


@dataclass(frozen=True)
class OutputConfig:
    dir: str = field(default="runs/default", metadata=_opt("output directory", kind="path"))


@dataclass(frozen=True)
class Config:
    lattice: LatticeConfig = field(default_factory=LatticeConfig, metadata=_opt("lattice geometry"))
    group: str = field(default="u1", metadata=_opt("gauge group", choices=GROUPS))
    action: ActionConfig = field(default_factory=ActionConfig, metadata=_opt("gauge action"))
    algorithm: str = field(default="hmc", metadata=_opt("Markov-chain algorithm", choices=ALGORITHMS))
    seed: int = field(default=1234, metadata=_opt("master seed; every stream is derived from it",
                                                  kind="int", ge=0, lt=2**63))
    precision: str = field(default="float64", metadata=_opt("float64 (complex128 links) or float32",
                                                            choices=PRECISIONS))
    device: str = field(default="cpu", metadata=_opt("torch device: cpu, cuda or cuda:N", kind="device"))
    backend: str = field(default="auto", metadata=_opt(
        "kernels of updates, actions and flows: auto (C++ host kernels on CPUs where g++ builds them, "
        "CUDA kernels on GPUs with cupy, else torch, with one warning), torch, host (C++), cuda",
        choices=BACKENDS))
    grid: tuple[int, ...] | None = field(default=None, metadata=_opt(
        "MPI process grid, one entry per dimension; null = factorise the number of ranks", kind="grid"))
    hmc: HMCConfig = field(default_factory=HMCConfig, metadata=_opt("hybrid Monte Carlo"))
    heatbath: HeatbathConfig = field(default_factory=HeatbathConfig, metadata=_opt("heat bath + overrelaxation"))
    flow: FlowConfig = field(default_factory=FlowConfig, metadata=_opt("normalizing-flow architecture"))
    train: TrainConfig = field(default_factory=TrainConfig, metadata=_opt("flow training"))
    sample: SampleConfig = field(default_factory=SampleConfig, metadata=_opt("flow sampling"))
    mixed: MixedConfig = field(default_factory=MixedConfig, metadata=_opt("mixed chains"))
    run: RunConfig = field(default_factory=RunConfig, metadata=_opt("chain length and measurements"))
    measure: MeasureConfig = field(default_factory=MeasureConfig, metadata=_opt("observables"))
    output: OutputConfig = field(default_factory=OutputConfig, metadata=_opt("where results go"))
    source: str = field(default="<defaults>", compare=False, metadata={"internal": True})

    @property
    def nd(self) -> int:
        return self.lattice.nd

    @property
    def n_colors(self) -> int:
        return {"u1": 1, "su2": 2, "su3": 3}[self.group]


# ---- parsing ------------------------------------------------------------------------------
def _fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]


def _all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    keys = []
    for f in _fields(cls):
        k = prefix + f.name
        keys.append(k)
        sub = _section_type(cls, f)
        if sub is not None:
            keys += _all_keys(sub, k + ".")
    return keys


def _section_type(cls: type, f: dataclasses.Field) -> Any:
    """The dataclass type of a section field (annotations are strings here)."""
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        t = f.default_factory  # type: ignore[misc]
        if dataclasses.is_dataclass(t):
            return t
    return None


def _section_keys(cls: type = Config, prefix: str = "") -> set[str]:
    out = set()
    for f in _fields(cls):
        sub = _section_type(cls, f)
        if sub is not None:
            out.add(prefix + f.name)
            out |= _section_keys(sub, prefix + f.name + ".")
    return out


def _typename(v: Any) -> str:
    return type(v).__name__ if v is not None else "null"


MAX_SHOWN = 120  # characters of a bad value an error line shows (values can be megabytes)


def _shown_path(path: str) -> str:
    """A path as an error line shows it: printable, bounded."""
    shown = path if path.isprintable() else repr(path)
    return shown if len(shown) <= 4 * MAX_SHOWN else shown[:4 * MAX_SHOWN] + "..."


def show_value(value: Any) -> str:
    """``value`` in flow-style YAML on one line, cut to :data:`MAX_SHOWN` characters."""
    try:
        shown = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    except yaml.YAMLError:
        shown = repr(value)
    if shown.endswith("\n..."):
        shown = shown[:-4]
    shown = " ".join(shown.removesuffix("...").split())
    return shown if len(shown) <= MAX_SHOWN else shown[:MAX_SHOWN] + f"... ({len(shown)} characters)"


class _Ctx:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, value: Any, allowed: str) -> ConfigError:
        return ConfigError(f"{self.source}: key '{_shown_path(key)}': got {show_value(value)} ({_typename(value)}); "
                           f"allowed: {allowed}")


def _bound_text(meta: Mapping[str, Any], what: str) -> str:
    parts = []
    if "ge" in meta:
        parts.append(f">= {meta['ge']}")
    if "gt" in meta:
        parts.append(f"> {meta['gt']}")
    if "lt" in meta:
        parts.append(f"< {meta['lt']}")
    txt = what + (" " + " and ".join(parts) if parts else "")
    if meta.get("odd"):
        txt += ", odd"
    return txt


def _check_bounds(ctx: _Ctx, key: str, v: Any, meta: Mapping[str, Any], what: str) -> None:
    ok = True
    if "ge" in meta and not v >= meta["ge"]:
        ok = False
    if "gt" in meta and not v > meta["gt"]:
        ok = False
    if "lt" in meta and not v < meta["lt"]:
        ok = False
    if meta.get("odd") and v % 2 == 0:
        ok = False
    if not ok:
        raise ctx.fail(key, v, _bound_text(meta, what))


def _as_int(ctx: _Ctx, key: str, v: Any, meta: Mapping[str, Any], what: str = "an integer") -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer() and not isinstance(v, bool):
            v = int(v)
        else:
            raise ctx.fail(key, v, _bound_text(meta, what))
    _check_bounds(ctx, key, v, meta, what)
    return int(v)


def _as_float(ctx: _Ctx, key: str, v: Any, meta: Mapping[str, Any]) -> float:
    if isinstance(v, str):
        try:  # YAML 1.1 reads 1e-3 (no dot) as a string
            v = float(v)
        except ValueError:
            raise ctx.fail(key, v, _bound_text(meta, "a number")) from None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ctx.fail(key, v, _bound_text(meta, "a finite number"))
    _check_bounds(ctx, key, float(v), meta, "a number")
    return float(v)


def _as_bool(ctx: _Ctx, key: str, v: Any, meta: Mapping[str, Any]) -> bool:
    if not isinstance(v, bool):
        raise ctx.fail(key, v, "true or false")
    return v


def _as_path(ctx: _Ctx, key: str, v: Any, meta: Mapping[str, Any]) -> str:
    if not isinstance(v, str) or not v.strip():
        raise ctx.fail(key, v, "a non-empty path string")
    return v


def _as_optpath(ctx: _Ctx, key: str, v: Any, meta: Mapping[str, Any]) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str) or not v.strip():
        raise ctx.fail(key, v, "null or a non-empty path string")
    return v


class BetaScheduleError(ValueError):
    """A bad ``train.beta_schedule``: ``key`` (``train.beta_schedule`` or one of its parts),
    the bad ``value`` and what is ``allowed`` (turned into the one-line config error)."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        super().__init__(f"key '{key}': got {value!r}; allowed: {allowed}")
        self.key, self.value, self.allowed = key, value, allowed


_SCHEDULE_FORMS = ("null, a list of [step, beta] pairs (first step 0, steps increasing, betas > 0) "
                   "or a mapping {from: beta0, steps: n}")


def _schedule_number(key: str, v: Any, integer: bool, lower: float, strict: bool) -> Any:
    """An int (``integer``) or finite float ``>= lower`` (``> lower`` when ``strict``)."""
    if isinstance(v, str) and not integer:
        try:  # YAML 1.1 reads 1e-3 (no dot) as a string
            v = float(v)
        except ValueError:
            pass
    if isinstance(v, float) and integer and v.is_integer():
        v = int(v)
    ok_type = (isinstance(v, int) if integer else isinstance(v, (int, float))) and not isinstance(v, bool)
    bound = f"> {lower:g}" if strict else f">= {lower:g}"
    what = "an integer" if integer else "a finite number"
    if not ok_type or (not integer and not math.isfinite(v)) or (v <= lower if strict else v < lower):
        raise BetaScheduleError(key, v, f"{what} {bound}")
    return int(v) if integer else float(v)


def parse_beta_schedule(v: Any, key: str = "train.beta_schedule") -> Any:
    """The shape of a ``train.beta_schedule`` value: ``None``; a list of ``[step, beta]``
    pairs -> a tuple of ``(int, float)`` pairs (first step 0, steps strictly increasing,
    betas > 0); a mapping ``{from: beta0, steps: n}`` -> ``{"from": float, "steps": int}``.
    Raises :class:`BetaScheduleError` naming the offending part."""
    if v is None:
        return None
    if isinstance(v, Mapping):
        if set(v) != {"from", "steps"}:
            raise BetaScheduleError(key, dict(v), "a mapping with exactly the keys from and steps, "
                                    "e.g. {from: 1.0, steps: 500}")
        return {"from": _schedule_number(f"{key}.from", v["from"], False, 0.0, True),
                "steps": _schedule_number(f"{key}.steps", v["steps"], True, 1, False)}
    if not isinstance(v, (list, tuple)) or not v:
        raise BetaScheduleError(key, v, _SCHEDULE_FORMS)
    points: list[tuple[int, float]] = []
    for i, pair in enumerate(v):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise BetaScheduleError(f"{key}[{i}]", pair, "a pair [step, beta]")
        step = _schedule_number(f"{key}[{i}][0]", pair[0], True, 0, False)
        beta = _schedule_number(f"{key}[{i}][1]", pair[1], False, 0.0, True)
        if i == 0 and step != 0:
            raise BetaScheduleError(f"{key}[0][0]", step, "0 (the schedule starts at step 0)")
        if i > 0 and step <= points[-1][0]:
            raise BetaScheduleError(f"{key}[{i}][0]", step,
                                    f"a step > {points[-1][0]} (steps strictly increasing)")
        points.append((step, beta))
    return tuple(points)


def beta_schedule_points(v: Any, final_beta: float, steps: int | None = None,
                         key: str = "train.beta_schedule") -> tuple[tuple[int, float], ...] | None:
    """``train.beta_schedule`` as ``((0, beta_0), ..., (s_n, final_beta))`` (or ``None``):
    the mapping form ``{from: b0, steps: n}`` is ``((0, b0), (n, final_beta))``. The last beta
    must equal ``final_beta`` (``action.beta``) exactly, and the last step must not exceed
    ``steps`` (``train.steps``) when given. Raises :class:`BetaScheduleError`."""
    shape = parse_beta_schedule(v, key)
    if shape is None:
        return None
    if isinstance(shape, dict):
        points = ((0, shape["from"]), (shape["steps"], float(final_beta)))
    else:
        points = shape
        if points[-1][1] != float(final_beta):
            raise BetaScheduleError(f"{key}[{len(points) - 1}][1]", points[-1][1],
                                    f"action.beta = {final_beta:g} (the schedule ends at the beta "
                                    "the flow is trained for)")
    if steps is not None and points[-1][0] > int(steps):
        raise BetaScheduleError(key, [list(p) for p in points],
                                f"a schedule whose last step is <= train.steps = {int(steps)}")
    return tuple((int(s), float(b)) for s, b in points)


def _as_beta_schedule(ctx: _Ctx, key: str, v: Any, meta: Mapping[str, Any]) -> Any:
    try:
        return parse_beta_schedule(v, key)
    except BetaScheduleError as e:
        raise ctx.fail(e.key, e.value, e.allowed) from None


def _as_device(ctx: _Ctx, key: str, v: Any, meta: Mapping[str, Any]) -> str:
    ok = isinstance(v, str) and (v == "cpu" or v == "cuda" or (v.startswith("cuda:") and v[5:].isdigit()))
    if not ok:
        raise ctx.fail(key, v, "cpu, cuda or cuda:N")
    return v


def _as_extents(ctx: _Ctx, key: str, v: Any, meta: Mapping[str, Any]) -> tuple[int, ...]:
    if not isinstance(v, (list, tuple)) or len(v) not in (2, 4):
        raise ctx.fail(key, v, "a list of 2 (2D) or 4 (4D) integer extents, e.g. [8, 8]")
    return tuple(_as_int(ctx, f"{key}[{i}]", x, {"ge": 2}, "an integer extent") for i, x in enumerate(v))


def _as_grid(ctx: _Ctx, key: str, v: Any, meta: Mapping[str, Any]) -> tuple[int, ...] | None:
    if v is None:
        return None
    if not isinstance(v, (list, tuple)) or len(v) == 0:
        raise ctx.fail(key, v, "null or a list with one positive integer per lattice dimension")
    return tuple(_as_int(ctx, f"{key}[{i}]", x, {"ge": 1}) for i, x in enumerate(v))


def _as_intlist(ctx: _Ctx, key: str, v: Any, meta: Mapping[str, Any]) -> tuple[int, ...]:
    if not isinstance(v, (list, tuple)):
        raise ctx.fail(key, v, "a list of positive integers, e.g. [8, 8]")
    return tuple(_as_int(ctx, f"{key}[{i}]", x, meta) for i, x in enumerate(v))


def _as_strlist(ctx: _Ctx, key: str, v: Any, meta: Mapping[str, Any]) -> tuple[str, ...]:
    """A list of ``meta['choices']``; a string is split at commas and blanks."""
    choices = meta["choices"]
    if isinstance(v, str):
        v = v.replace(",", " ").split()
    if not isinstance(v, (list, tuple)) or not v:
        raise ctx.fail(key, v, f"a non-empty list of {', '.join(choices)}")
    for i, x in enumerate(v):
        if x not in choices:
            raise ctx.fail(f"{key}[{i}]", x, ", ".join(choices))
    return tuple(v)


def _as_looplist(ctx: _Ctx, key: str, v: Any, meta: Mapping[str, Any]) -> tuple[tuple[int, ...], ...]:
    if not isinstance(v, (list, tuple)):
        raise ctx.fail(key, v, "a list of [R, T] pairs, e.g. [[1, 1], [2, 2]]")
    out = []
    for i, x in enumerate(v):
        if not isinstance(x, (list, tuple)) or len(x) != 2:
            raise ctx.fail(f"{key}[{i}]", x, "a pair [R, T] of positive integers")
        out.append(tuple(_as_int(ctx, f"{key}[{i}]", y, {"ge": 1}) for y in x))
    return tuple(out)


def _as_choice(ctx: _Ctx, key: str, v: Any, meta: Mapping[str, Any]) -> str:
    """One of ``meta['choices']``, case-insensitive; stored in lower case."""
    choices = meta["choices"]
    if not isinstance(v, str) or v.lower() not in choices:
        raise ctx.fail(key, v, ", ".join(choices))
    return v.lower()


# field metadata ``kind`` -> converter; a field without a kind is a choice among ``choices``
_CONVERTERS: dict[str, Callable[[_Ctx, str, Any, Mapping[str, Any]], Any]] = {
    "int": _as_int,
    "float": _as_float,
    "bool": _as_bool,
    "path": _as_path,
    "device": _as_device,
    "extents": _as_extents,
    "grid": _as_grid,
    "intlist": _as_intlist,
    "strlist": _as_strlist,
    "looplist": _as_looplist,
    "optpath": _as_optpath,
    "betaschedule": _as_beta_schedule,
}


def _convert(ctx: _Ctx, key: str, v: Any, f: dataclasses.Field) -> Any:
    """The value of field ``f`` at dotted ``key``, checked and converted by its ``kind``."""
    meta = f.metadata
    convert = _CONVERTERS.get(meta.get("kind", ""))
    if convert is not None:
        return convert(ctx, key, v, meta)
    if meta.get("choices") is not None:
        return _as_choice(ctx, key, v, meta)
    raise AssertionError(f"unhandled config field {key}")  # pragma: no cover


def _unknown(ctx: _Ctx, key: str, value: Any, valid: Sequence[str]) -> ConfigError:
    keys = _all_keys()
    key = key if isinstance(key, str) else str(key)
    if len(key) > 200 or not key.isprintable():  # no fuzzy matching of a huge or binary key
        return ConfigError(f"{ctx.source}: unknown key {show_value(key)} (valid here: {', '.join(valid)})")
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if not close:  # a misplaced or misspelt leaf: 'beta' or 'bet' -> 'action.beta'
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in reversed(keys)}
        leaf = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(by_leaf), n=1, cutoff=0.6)
        close = [by_leaf[leaf[0]]] if leaf else []
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"{ctx.source}: unknown key '{key}'{hint} (valid here: {', '.join(valid)})")


def _build(ctx: _Ctx, cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ctx.fail(prefix.rstrip(".") or "<top level>", raw, "a mapping of keys to values")
    fields = {f.name: f for f in _fields(cls)}
    for k in raw:
        if not isinstance(k, str) or k not in fields:
            raise _unknown(ctx, f"{prefix}{k}", raw[k], list(fields))
    kwargs = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        key = prefix + name
        sub = _section_type(cls, f)
        if sub is not None:
            kwargs[name] = _build(ctx, sub, raw[name], key + ".")
        else:
            kwargs[name] = _convert(ctx, key, raw[name], f)
    return cls(**kwargs)


def _cross_checks(ctx: _Ctx, cfg: Config) -> None:
    shape = cfg.lattice.shape
    if cfg.grid is not None:
        if len(cfg.grid) != len(shape):
            raise ctx.fail("grid", list(cfg.grid),
                           f"null or a list of {len(shape)} integers (one per dimension of lattice.shape)")
        for d, (n, p) in enumerate(zip(shape, cfg.grid)):
            if n % p != 0:
                raise ctx.fail(f"grid[{d}]", p, f"a divisor of lattice.shape[{d}] = {n}")
    needs_even = cfg.algorithm == "heatbath" or (
        cfg.algorithm == "mixed" and "heatbath" in cfg.mixed.pattern)
    if needs_even:
        for d, n in enumerate(shape):
            if n % 2:
                raise ctx.fail(f"lattice.shape[{d}]", n,
                               f"an even extent (the {cfg.algorithm} checkerboard needs even extents)")
    if cfg.algorithm in ("flow", "mixed") and cfg.group == "u1" and len(shape) != 2:
        raise ctx.fail("lattice.shape", list(shape), "2 extents: U(1) flows are implemented in 2D")
    _measure_checks(ctx, cfg)


def _measure_checks(ctx: _Ctx, cfg: Config) -> None:
    """Measurement settings against the lattice (before any work: a loop that cannot be measured
    used to fail after the whole run, or be dropped without a word)."""
    shape = cfg.lattice.shape
    for i, (r, t) in enumerate(cfg.measure.wilson_loops):
        if max(r, t) > min(shape):
            raise ctx.fail(f"measure.wilson_loops[{i}]", [r, t],
                           f"R and T <= {min(shape)}, the smallest extent of lattice.shape {list(shape)}")
    if cfg.measure.flow_time > 0 and cfg.measure.flow_eps > cfg.measure.flow_time:
        raise ctx.fail("measure.flow_eps", cfg.measure.flow_eps,
                       f"a step <= measure.flow_time = {cfg.measure.flow_time} (or flow_time: 0 to measure "
                       "without the Wilson flow)")


def _diagnostics_module_present() -> bool:
    """Whether ``hpcflow.flows.diagnostics`` exists, without importing it (config imports no
    torch): already imported, or its source file beside this package's ``flows``."""
    import sys

    if "hpcflow.flows.diagnostics" in sys.modules:
        return True
    here = os.path.dirname(os.path.abspath(__file__))
    return any(os.path.exists(os.path.join(here, "flows", f"diagnostics{ext}")) for ext in (".py", ".pyc"))


def _train_checks(ctx: _Ctx, cfg: Config) -> Config:
    """Cross-checks of the ``train`` section; the mapping form of ``train.beta_schedule`` is
    resolved against ``action.beta`` into the equivalent list of pairs."""
    tr = cfg.train
    if tr.beta_schedule is not None:
        try:
            points = beta_schedule_points(tr.beta_schedule, cfg.action.beta, tr.steps)
        except BetaScheduleError as e:
            raise ctx.fail(e.key, e.value, e.allowed) from None
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(tr, beta_schedule=points))
    if tr.diagnostics_every > 0:
        if cfg.group != "u1" or cfg.nd != 2:
            raise ctx.fail("train.diagnostics_every", tr.diagnostics_every,
                           f"0 for group {cfg.group} in {cfg.nd}D (the diagnostics are for 2D U(1))")
        if not _diagnostics_module_present():
            raise ctx.fail("train.diagnostics_every", tr.diagnostics_every,
                           "0 (off): this installation has no hpcflow.flows.diagnostics module")
    return cfg


# ``flow.model``: keys that must be the model's (taken from it when absent) and keys that
# default to the model's (another value is allowed: e.g. sampling at a nearby beta is exact)
MODEL_FIXED = ("lattice.shape", "group", "flow.n_layers", "flow.kernel", "flow.n_components", "flow.n_knots",
               "flow.hidden", "flow.kernel_size")
MODEL_DEFAULTS = ("algorithm", "action.beta", "precision")


def _raw_get(raw: Any, key: str) -> tuple[bool, Any]:
    node = raw
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _raw_set(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        node[part] = dict(child) if isinstance(child, Mapping) else {}
        node = node[part]
    node[parts[-1]] = value


def _attr(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _with_model(ctx: _Ctx, raw: Any) -> tuple[Any, Config | None, str]:
    """``raw`` completed from the model ``flow.model`` names (see :data:`MODEL_FIXED`,
    :data:`MODEL_DEFAULTS`), the model's own validated config and its name; unchanged without one."""
    has, ref = _raw_get(raw, "flow.model")
    if not has or ref is None:
        return raw, None, ""
    allowed = "null, or a shipped model's name (`hpcflow models` lists them) or a model directory"
    if not isinstance(ref, str) or not ref.strip():
        raise ctx.fail("flow.model", ref, allowed)
    from hpcflow.models import ModelError, resolve_model

    try:
        m = resolve_model(ref)
    except ModelError as e:
        raise ctx.fail("flow.model", ref, f"{allowed}: {e}") from None
    mraw = dict(m.config)
    if isinstance(mraw.get("flow"), Mapping):
        mraw["flow"] = {k: v for k, v in mraw["flow"].items() if k != "model"}
    try:
        mcfg = config_from_dict(mraw, source=str(m.path / "config.yaml"))
    except ConfigError as e:
        raise ctx.fail("flow.model", ref, f"a usable model: its config.yaml is invalid ({e})") from None
    out = dict(raw)
    for key in MODEL_FIXED + MODEL_DEFAULTS:
        if not _raw_get(raw, key)[0]:
            _raw_set(out, key, _raw_get(mraw, key)[1] if _raw_get(mraw, key)[0] else _plain(_attr(mcfg, key)))
    return out, mcfg, m.name


def _plain(v: Any) -> Any:
    return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v


def _model_checks(ctx: _Ctx, cfg: Config, mcfg: Config, name: str) -> None:
    for key in MODEL_FIXED:
        if _attr(cfg, key) != _attr(mcfg, key):
            raise ctx.fail(key, _plain(_attr(cfg, key)),
                           f"{_plain(_attr(mcfg, key))!r}, the value of model {name} (flow.model); omit the key "
                           "to take the model's")
    if cfg.algorithm not in ("flow", "mixed"):
        raise ctx.fail("algorithm", cfg.algorithm, "flow or mixed with flow.model (a model is sampled by "
                       "a flow chain); or remove flow.model")


def flow_fingerprint_part(flow: dict) -> dict:
    """The ``flow`` section as run fingerprints see it: ``flow.model`` only when set (runs from
    before the key existed keep their fingerprints, so they resume and verify unchanged)."""
    return {k: v for k, v in flow.items() if not (k == "model" and v is None)}


def config_from_dict(raw: Any, source: str = "<dict>") -> Config:
    """Validate a raw mapping (as loaded from YAML) into a :class:`Config`."""
    ctx = _Ctx(source)
    raw, mcfg, name = _with_model(ctx, raw)
    cfg = _build(ctx, Config, raw, "")
    cfg = dataclasses.replace(cfg, source=source)
    if mcfg is not None:
        _model_checks(ctx, cfg, mcfg, name)
    _cross_checks(ctx, cfg)
    return _train_checks(ctx, cfg)


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"--set '{item}': expected KEY=VALUE, e.g. --set action.beta=3.0")
    key, _, text = item.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError(f"--set '{item}': empty key; expected KEY=VALUE")
    from hpcflow.yamlio import YAMLReadError, load_bounded

    try:
        value = load_bounded(text) if text.strip() else None
    except YAMLReadError as e:
        raise ConfigError(f"--set {_shown_path(key)}: value {show_value(text)} is not valid YAML ({e})") from None
    return key, value


def apply_overrides(raw: Any, overrides: Sequence[str]) -> dict:
    """Apply ``KEY=VALUE`` overrides (dotted keys, YAML values) to a raw config mapping."""
    out: dict = dict(raw or {})
    for item in overrides:
        key, value = _parse_override(item)
        parts = key.split(".")
        node = out
        leaves = set(_all_keys()) - _section_keys()
        for i, p in enumerate(parts[:-1]):
            if ".".join(parts[: i + 1]) in leaves:
                raise ConfigError(f"--set {key}: '{'.'.join(parts[: i + 1])}' is not a section")
            child = node.get(p)
            if child is None:
                child = {}
            elif not isinstance(child, Mapping):
                raise ConfigError(f"--set {key}: '{'.'.join(parts[: i + 1])}' is not a section")
            node[p] = dict(child)
            node = node[p]
        node[parts[-1]] = value
    return out


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML file (or the defaults when ``path`` is None) and apply ``--set`` overrides."""
    if path is None:
        raw: Any = {}
        source = "<defaults>"
    else:
        source = os.fspath(path)
        if not os.path.exists(source):
            raise ConfigError(f"{source}: no such config file")
        if os.path.isdir(source):
            raise ConfigError(f"{source}: is a directory, expected a YAML config file")
        from hpcflow.yamlio import YAMLReadError, read_yaml

        try:  # bounded: size, nesting and alias expansion (a YAML alias bomb fails in milliseconds)
            raw = read_yaml(source)
        except YAMLReadError as e:
            raise ConfigError(f"{_shown_path(source)}: {e}") from None
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise ConfigError(
                f"{source}: top level must be a mapping of keys to values, got {_typename(raw)}")
    if overrides:
        raw = apply_overrides(raw, overrides)
        if path is not None:
            source = f"{source} (with --set)"
        else:
            source = "--set"
    return config_from_dict(raw, source)


# ---- output -----------------------------------------------------------------------------
def config_to_dict(cfg: Any) -> dict:
    """Plain-YAML-able dict of a config (tuples become lists)."""
    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in _fields(type(v))}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v
    return plain(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)


def default_yaml() -> str:
    """A complete default configuration, every key with a comment."""
    lines = ["# hpcflow configuration: every key with its default. Override any key with",
             "#   hpcflow run CONFIG --set key=value   (e.g. --set action.beta=3.0)", ""]

    def emit(obj: Any, indent: str) -> None:
        for f in _fields(type(obj)):
            v = getattr(obj, f.name)
            helptext = f.metadata.get("help", "")
            choices = f.metadata.get("choices")
            if choices and f.metadata.get("kind") != "strlist":
                helptext += f" ({' | '.join(choices)})"
            if dataclasses.is_dataclass(v):
                lines.append(f"{indent}{f.name}:  # {helptext}")
                emit(v, indent + "  ")
            else:
                text = yaml.safe_dump(config_to_dict(v) if dataclasses.is_dataclass(v) else
                                      ([list(x) if isinstance(x, tuple) else x for x in v]
                                       if isinstance(v, tuple) else v),
                                      default_flow_style=True).strip()
                text = text.removesuffix("...").strip()
                lines.append(f"{indent}{f.name}: {text}  # {helptext}")
    emit(Config(), "")
    return "\n".join(lines) + "\n"
