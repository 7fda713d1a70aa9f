"""A campaign YAML -> validated, frozen dataclasses, and its expansion into jobs.

:func:`parse_campaign` checks the whole file (format in ``docs/HPC.md``) and every job's
hpcflow config before anything is submitted; each problem is one line naming the file, the
key, the bad value and what is allowed (:class:`CampaignError`). :func:`expand_chains` and
:func:`job_config` turn a :class:`Campaign` into its chains and the complete config of each
(chain, stage) job.

Chain seeds are ``spawn_seed(campaign seed, hash(scan point), chain index)``: independent,
reproducible, and unchanged when scan points are added to the campaign later.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

__all__ = [
    "MPI_PLUGINS",
    "STAGE_COMMANDS",
    "Campaign",
    "CampaignError",
    "Chain",
    "Resources",
    "Stage",
    "expand_chains",
    "job_config",
    "load_campaign",
    "parse_campaign",
]

STAGE_COMMANDS = ("train", "sample", "run")
MPI_PLUGINS = ("pmix", "pmi2", "none")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_TIME_RE = re.compile(r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$|^\d+$")
_TOP_KEYS = ("name", "seed", "dir", "base", "config", "scan", "beta", "chains", "stages", "slurm", "hpcflow")
_STAGE_KEYS = ("command", "after", "set", "resources", "resume")
# integer resources and their lower bounds, in the order they are checked
_INT_RESOURCES = {"nodes": 1, "ntasks_per_node": 1, "cpus_per_task": 1, "gpus_per_task": 0}


class CampaignError(ValueError):
    """A problem with a campaign file or its submission; ``str()`` is the one-line message."""


@dataclass(frozen=True)
class Resources:
    """Slurm resources of one stage's job (``#SBATCH`` lines)."""

    nodes: int = 1
    ntasks_per_node: int = 1
    cpus_per_task: int = 1
    gpus_per_task: int = 0
    time: str = "01:00:00"
    partition: str | None = None
    account: str | None = None
    mem: str | None = None
    extra: tuple[str, ...] = ()


@dataclass(frozen=True)
class Stage:
    """One step of every chain: ``hpcflow <command> CONFIG`` with stage overrides."""

    name: str
    command: str
    after: tuple[str, ...] = ()
    set: Mapping[str, Any] = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)
    resume: bool = True


@dataclass(frozen=True)
class Chain:
    """One Markov chain of the campaign: a scan point and a chain index."""

    id: str
    point: Mapping[str, Any]
    index: int
    seed: int
    dir: str


@dataclass(frozen=True)
class Campaign:
    name: str
    seed: int
    dir: str
    base: Mapping[str, Any]
    axes: tuple[tuple[str, tuple[Any, ...]], ...]
    chains: int
    stages: tuple[Stage, ...]  # in dependency order
    hpcflow: str
    mpi: str = "pmix"
    signal_seconds: int = 300
    source: str = "<campaign>"


# ---- values -------------------------------------------------------------------------------
def _err(src: str, key: str, value: Any, allowed: str) -> CampaignError:
    shown = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return CampaignError(f"{src}: key '{key}': got {shown}; allowed: {allowed}")


def _int(src: str, key: str, v: Any, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise _err(src, key, v, f"an integer >= {lo}")
    return v


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _axis_values(src: str, key: str, spec: Any) -> tuple[Any, ...]:
    """Scan values: a list of numbers, ``{start, stop, num}`` (inclusive) or ``{start, stop, step}``."""
    allowed = ("a non-empty list of numbers, or a mapping {start, stop, num} (both ends included) "
               "or {start, stop, step}")
    if isinstance(spec, list):
        if not spec or not all(_is_number(x) for x in spec):
            raise _err(src, key, spec, allowed)
        if len(set(spec)) != len(spec):
            raise _err(src, key, spec, "a list without repeated values")
        return tuple(spec)
    if not (isinstance(spec, dict) and set(spec) in ({"start", "stop", "num"}, {"start", "stop", "step"})):
        raise _err(src, key, spec, allowed)
    if not all(_is_number(x) for x in spec.values()):
        raise _err(src, key, spec, allowed)
    return _linspace(src, key, spec) if "num" in spec else _arange(src, key, spec)


def _linspace(src: str, key: str, spec: Mapping[str, Any]) -> tuple[Any, ...]:
    """``{start, stop, num}``: ``num`` evenly spaced values, both ends included."""
    a, b, n = spec["start"], spec["stop"], spec["num"]
    if not isinstance(n, int) or n < 1:
        raise _err(src, f"{key}.num", n, "an integer >= 1")
    return tuple(a + (b - a) * i / (n - 1) for i in range(n)) if n > 1 else (a,)


def _arange(src: str, key: str, spec: Mapping[str, Any]) -> tuple[Any, ...]:
    """``{start, stop, step}``: start, start + step, ... up to stop (included when on the grid)."""
    a, b, step = spec["start"], spec["stop"], spec["step"]
    if step <= 0 or b < a:
        raise _err(src, key, spec, "step > 0 and stop >= start")
    n = math.floor((b - a) / step + 1e-9) + 1
    return tuple(round(a + i * step, 12) for i in range(n))


def _resources(src: str, key: str, raw: Any, defaults: Mapping[str, Any]) -> Resources:
    raw = {**defaults, **(raw or {})}
    if not isinstance(raw, dict):
        raise _err(src, key, raw, "a mapping of resources")
    known = set(Resources.__dataclass_fields__)
    for k in raw:
        if k not in known:
            raise _err(src, f"{key}.{k}", raw[k], f"one of the keys {', '.join(sorted(known))}")
    out: dict[str, Any] = {k: _int(src, f"{key}.{k}", raw[k], lo) for k, lo in _INT_RESOURCES.items() if k in raw}
    if "time" in raw:
        out["time"] = _slurm_time(src, f"{key}.time", raw["time"])
    for k in ("partition", "account", "mem"):
        if raw.get(k) is not None:
            out[k] = str(raw[k])
    if "extra" in raw:
        out["extra"] = _sbatch_options(src, f"{key}.extra", raw["extra"])
    return Resources(**out)


def _slurm_time(src: str, key: str, v: Any) -> str:
    t = str(v)
    if not _TIME_RE.match(t):
        raise _err(src, key, v, "a Slurm time: MM, HH:MM:SS or D-HH:MM:SS")
    return t


def _sbatch_options(src: str, key: str, v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(x, str) and x.startswith("--") for x in v):
        raise _err(src, key, v, "a list of sbatch options like '--qos=normal'")
    return tuple(v)


# ---- stages -------------------------------------------------------------------------------
def _stage(src: str, sname: Any, sraw: Any, res_defaults: Mapping[str, Any]) -> Stage:
    """One entry of ``stages``: ``{command, after, set, resources, resume}``."""
    key = f"stages.{sname}"
    if not isinstance(sname, str) or not _NAME_RE.match(sname):
        raise _err(src, "stages", sname, "stage names of letters, digits, '_', '.', '-'")
    if sraw is None:
        sraw = {}
    if not isinstance(sraw, dict):
        raise _err(src, key, sraw, "a mapping with command, after, set, resources, resume")
    for k in sraw:
        if k not in _STAGE_KEYS:
            raise _err(src, f"{key}.{k}", sraw[k], f"one of the keys {', '.join(sorted(_STAGE_KEYS))}")
    cmd = sraw.get("command", sname if sname in STAGE_COMMANDS else None)
    if cmd not in STAGE_COMMANDS:
        raise _err(src, f"{key}.command", cmd, ", ".join(STAGE_COMMANDS))
    after = _stage_after(src, f"{key}.after", sraw.get("after", []))
    sset = sraw.get("set", {}) or {}
    if not isinstance(sset, dict):
        raise _err(src, f"{key}.set", sset, "a mapping of dotted config keys to values")
    resume = sraw.get("resume", True)
    if not isinstance(resume, bool):
        raise _err(src, f"{key}.resume", resume, "true or false")
    return Stage(sname, cmd, after, dict(sset),
                 _resources(src, f"{key}.resources", sraw.get("resources"), res_defaults), resume)


def _stage_after(src: str, key: str, after: Any) -> tuple[str, ...]:
    """``after``: one stage name or a list of them."""
    if isinstance(after, str):
        after = [after]
    if not isinstance(after, list) or not all(isinstance(a, str) for a in after):
        raise _err(src, key, after, "a list of stage names")
    return tuple(after)


def _stages(src: str, rs: Any, res_defaults: Mapping[str, Any]) -> tuple[Stage, ...]:
    """The ``stages`` section, in dependency order."""
    if rs is None:
        raise CampaignError(f"{src}: missing key 'stages' (e.g. stages: {{train: {{...}}, "
                            "sample: {after: [train], ...}}})")
    if not isinstance(rs, dict) or not rs:
        raise _err(src, "stages", rs, "a non-empty mapping of stage name to stage")
    stages = {sname: _stage(src, sname, sraw, res_defaults) for sname, sraw in rs.items()}
    return _order_stages(src, stages)


def _order_stages(src: str, stages: dict[str, Stage]) -> tuple[Stage, ...]:
    """Topological order (depth first); a cycle is reported with its path."""
    for s in stages.values():
        for a in s.after:
            if a not in stages:
                raise CampaignError(f"{src}: stage '{s.name}': 'after' names '{a}', which is not a stage; "
                                    f"defined stages: {', '.join(stages)}")
    order: list[Stage] = []
    done: set[str] = set()
    visiting: list[str] = []

    def visit(name: str) -> None:
        if name in done:
            return
        if name in visiting:
            cyc = visiting[visiting.index(name):] + [name]
            raise CampaignError(f"{src}: stages: cyclic dependency {' -> '.join(cyc)}; "
                                "'after' must form a chain or a tree (e.g. sample after train)")
        visiting.append(name)
        for a in stages[name].after:
            visit(a)
        visiting.pop()
        done.add(name)
        order.append(stages[name])

    for n in stages:
        visit(n)
    _check_trained_before_sample(src, order)
    return tuple(order)


def _check_trained_before_sample(src: str, order: list[Stage]) -> None:
    """A flow sampling stage needs a trained flow from an earlier stage."""
    by_name = {s.name: s for s in order}
    upstream: dict[str, set[str]] = {}
    for s in order:
        upstream[s.name] = set().union(*([{a} | upstream[a] for a in s.after] or [set()]))
        if s.command == "sample" and not any(by_name[u].command == "train" for u in upstream[s.name]):
            raise CampaignError(f"{src}: stage '{s.name}' runs 'hpcflow sample', which needs a trained flow, "
                                "but no 'train' stage comes before it: add a stages.train section and "
                                f"'after: [train]' to stage '{s.name}'")


# ---- top-level sections -------------------------------------------------------------------
def _check_top_level(src: str, raw: Any) -> None:
    if not isinstance(raw, dict):
        raise CampaignError(f"{src}: top level must be a mapping, got {type(raw).__name__}")
    for k in raw:
        if k not in _TOP_KEYS:
            raise _err(src, k, raw[k], f"one of the keys {', '.join(sorted(_TOP_KEYS))}")


def _campaign_name(src: str, raw: Mapping[str, Any]) -> str:
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise _err(src, "name", name, "a name of letters, digits, '_', '.', '-'")
    return name


def _campaign_dir(src: str, raw: Mapping[str, Any], name: str, base_dir: str) -> str:
    d = raw.get("dir", os.path.join("runs", name))
    if not isinstance(d, str) or not d:
        raise _err(src, "dir", d, "a directory path")
    return os.path.abspath(os.path.join(base_dir, d))


def _read_base(src: str, p: Any, base_dir: str) -> dict[str, Any]:
    """The hpcflow config named by ``base`` (relative to ``base_dir``)."""
    if not isinstance(p, str):
        raise _err(src, "base", p, "the path of an hpcflow YAML config")
    p = os.path.join(base_dir, p)
    try:
        with open(p, encoding="utf-8") as fh:
            base = yaml.safe_load(fh) or {}
    except OSError as e:
        raise CampaignError(f"{src}: key 'base': cannot read {p!r} ({e.strerror})") from None
    if not isinstance(base, dict):
        raise CampaignError(f"{src}: key 'base': {p!r} is not a mapping of config keys")
    return base


def _base_config(src: str, raw: Mapping[str, Any], base_dir: str) -> dict[str, Any]:
    """``base`` file, then the inline ``config`` keys merged over it."""
    base = _read_base(src, raw["base"], base_dir) if "base" in raw else {}
    inline = raw.get("config", {})
    if not isinstance(inline, dict):
        raise _err(src, "config", inline, "a mapping of hpcflow config keys (dotted or nested)")
    return _merge(base, _nest(inline))


def _scan_axes(src: str, raw: Mapping[str, Any]) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    """``scan`` (dotted key -> values) plus the shorthand ``beta`` for ``scan.action.beta``."""
    scan = raw.get("scan", {})
    if not isinstance(scan, dict):
        raise _err(src, "scan", scan, "a mapping of dotted config keys to value lists")
    scan = dict(scan)
    if "beta" in raw:
        if "action.beta" in scan:
            raise CampaignError(f"{src}: 'beta' and 'scan.action.beta' both given; use one")
        scan["action.beta"] = raw["beta"]
    return tuple((k, _axis_values(src, "beta" if ("beta" in raw and k == "action.beta") else f"scan.{k}", v))
                 for k, v in scan.items())


def _slurm_settings(src: str, raw: Mapping[str, Any]) -> tuple[str, int, dict[str, Any]]:
    """``slurm``: (MPI plugin, signal seconds, default resources of every stage)."""
    slurm = raw.get("slurm", {}) or {}
    if not isinstance(slurm, dict):
        raise _err(src, "slurm", slurm, "a mapping (mpi, signal_seconds, and default resources)")
    mpi = slurm.get("mpi", "pmix")
    if mpi not in MPI_PLUGINS:
        raise _err(src, "slurm.mpi", mpi, ", ".join(MPI_PLUGINS))
    sig = _int(src, "slurm.signal_seconds", slurm.get("signal_seconds", 300), 1)
    res_defaults = {k: v for k, v in slurm.items() if k not in ("mpi", "signal_seconds")}
    _resources(src, "slurm", res_defaults, {})
    return mpi, sig, res_defaults


def _hpcflow_command(src: str, raw: Mapping[str, Any]) -> str:
    hp = raw.get("hpcflow", None)
    if hp is not None and (not isinstance(hp, str) or not hp.strip()):
        raise _err(src, "hpcflow", hp, "the hpcflow command (path of the console script)")
    return hp or _default_hpcflow()


def _default_hpcflow() -> str:
    """The hpcflow console script next to this Python (venv on a shared filesystem), else PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "hpcflow")
    if os.access(here, os.X_OK):
        return here
    return shutil.which("hpcflow") or "hpcflow"


def parse_campaign(raw: Any, source: str = "<campaign>", base_dir: str = ".") -> Campaign:
    """Validate a campaign mapping (see docs/HPC.md); relative paths are relative to ``base_dir``.

    Sections are checked in file order of importance (name, dir, config, scan, slurm, stages),
    then every job's hpcflow config, so the first problem found is the one reported.
    """
    src = source
    _check_top_level(src, raw)
    name = _campaign_name(src, raw)
    seed = _int(src, "seed", raw.get("seed", 0), 0)
    d = _campaign_dir(src, raw, name, base_dir)
    base = _base_config(src, raw, base_dir)
    axes = _scan_axes(src, raw)
    chains = _int(src, "chains", raw.get("chains", 1), 1)
    mpi, sig, res_defaults = _slurm_settings(src, raw)
    stages = _stages(src, raw.get("stages"), res_defaults)
    camp = Campaign(name=name, seed=seed, dir=d, base=base, axes=axes, chains=chains, stages=stages,
                    hpcflow=_hpcflow_command(src, raw), mpi=mpi, signal_seconds=sig, source=src)
    # every job's hpcflow config must be valid before anything is submitted
    for ch in expand_chains(camp):
        for st in camp.stages:
            job_config(camp, ch, st, validate=True)
    return camp


def load_campaign(path: str | os.PathLike) -> Campaign:
    """Read and validate a campaign YAML file."""
    p = os.fspath(path)
    try:
        with open(p, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh)
    except OSError as e:
        raise CampaignError(f"{p}: cannot read campaign file ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise CampaignError(f"{p}: malformed YAML: {str(e).splitlines()[0]}") from None
    return parse_campaign(raw, source=p, base_dir=os.path.dirname(os.path.abspath(p)))


# ---- expansion ----------------------------------------------------------------------------
def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{'a.b': 1}`` -> ``{'a': {'b': 1}}`` (nested mappings are kept and merged)."""
    out: dict[str, Any] = {}
    for k, v in flat.items():
        node = out
        parts = str(k).split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise CampaignError(f"config key '{k}': '{p}' is both a value and a section")
        node[parts[-1]] = _merge(node[parts[-1]], v) if isinstance(v, dict) and isinstance(
            node.get(parts[-1]), dict) else (_nest(v) if isinstance(v, dict) else v)
    return out


def _merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _fmt(v: Any) -> str:
    return format(v, "g") if isinstance(v, float) else str(v)


def expand_chains(c: Campaign) -> list[Chain]:
    """All chains: the product of the scan axes times ``chains`` independent chains each."""
    from hpcflow.rng import spawn_seed

    keys = [k for k, _ in c.axes]
    out = []
    for values in itertools.product(*(v for _, v in c.axes)):
        point = dict(zip(keys, values))
        label = "_".join(f"{k.split('.')[-1]}{_fmt(v)}" for k, v in point.items()) or "point"
        # the seed depends on the point's values, not its position: adding points later keeps seeds
        h = int.from_bytes(hashlib.sha256(json.dumps(point, sort_keys=True).encode()).digest()[:8], "little")
        for i in range(c.chains):
            cid = f"{label}-c{i}"
            out.append(Chain(cid, point, i, spawn_seed(c.seed, h, i) % 2**63,
                             os.path.join(c.dir, "chains", cid)))
    return out


def _subst(v: Any, ctx: Mapping[str, str]) -> Any:
    if isinstance(v, str):
        try:
            return v.format(**ctx)
        except (KeyError, IndexError, ValueError):
            raise CampaignError(f"value {v!r}: unknown placeholder; allowed: "
                                + ", ".join("{" + k + "}" for k in ctx)) from None
    if isinstance(v, list):
        return [_subst(x, ctx) for x in v]
    if isinstance(v, dict):
        return {k: _subst(x, ctx) for k, x in v.items()}
    return v


def job_config(c: Campaign, ch: Chain, st: Stage, validate: bool = False) -> dict[str, Any]:
    """The complete raw hpcflow config of one job: base, scan point, chain seed, output dir, stage set.

    Stage values may use ``{chain_dir}``, ``{chain}``, ``{stage}``, ``{campaign_dir}``.
    """
    ctx = {"chain_dir": ch.dir, "chain": ch.id, "stage": st.name, "campaign_dir": c.dir}
    raw = _merge(c.base, _nest({**ch.point, "seed": ch.seed, "output.dir": ch.dir}))
    try:
        raw = _merge(raw, _nest(_subst(dict(st.set), ctx)))
    except CampaignError as e:
        raise CampaignError(f"{c.source}: stages.{st.name}.set: {e}") from None
    if validate:
        from hpcflow.config import ConfigError, config_from_dict

        try:
            config_from_dict(raw, f"{c.source} (chain {ch.id}, stage {st.name})")
        except ConfigError as e:
            raise CampaignError(str(e)) from None
    return raw
