"""A campaign YAML -> validated, frozen dataclasses, and its expansion into jobs.

:func:`parse_campaign` checks the whole file (format in ``docs/HPC.md``) and every job's
hpcflow config before anything is submitted; each problem is one line naming the file, the
key, the bad value and what is allowed (:class:`CampaignError`). :func:`expand_chains` and
:func:`job_config` turn a :class:`Campaign` into its chains and the complete config of each
(chain, stage) job.

Chain seeds are ``spawn_seed(campaign seed, hash(scan point), chain index)``: independent,
reproducible, and unchanged when scan points are added to the campaign later.

Every value that reaches a batch script is checked against a grammar here (names, paths,
Slurm time/memory/partition/account, sbatch options; see "Values" in ``docs/HPC.md``) and
again by :func:`check_job_values` where the script is written; the YAML itself is read by a
bounded loader (:func:`load_yaml`: file size, alias-expanded size, nesting depth).
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

from hpcflow.yamlio import YAMLReadError, read_yaml

__all__ = [
    "MPI_PLUGINS",
    "STAGE_COMMANDS",
    "Campaign",
    "CampaignError",
    "Chain",
    "Resources",
    "Stage",
    "expand_chains",
    "check_job_values",
    "job_config",
    "load_campaign",
    "load_yaml",
    "parse_campaign",
]

STAGE_COMMANDS = ("train", "sample", "run")
MPI_PLUGINS = ("pmix", "pmi2", "none")
_TOP_KEYS = ("name", "seed", "dir", "base", "config", "scan", "beta", "chains", "stages", "slurm", "hpcflow")
_STAGE_KEYS = ("command", "after", "set", "resources", "resume")
# integer resources and their lower bounds, in the order they are checked
_INT_RESOURCES = {"nodes": 1, "ntasks_per_node": 1, "cpus_per_task": 1, "gpus_per_task": 0}
_INT_MAX = 1_000_000  # upper bound of every integer resource
_SLURM_OWN_KEYS = ("mpi", "signal_seconds", "array_limit", "max_array_size")  # slurm: keys that are no resources
MAX_AXIS_VALUES = 1000  # values per scan axis
MAX_CHAINS = 10_000  # scan points x chains


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
    array_limit: int = 0  # sbatch --array=...%K: at most K tasks of a stage's array at once (0: no limit)
    max_array_size: int = 1001  # the cluster's MaxArraySize: array indices (chains) 0 .. this - 1


# ---- values: showing them, and the grammar of everything that reaches a job script --------
_SHOW_MAX = 100  # characters of a bad value shown in an error message


def _show(v: Any) -> str:
    """A bad value for a one-line message: ``repr`` of a string, JSON of anything else, escaped
    (no control characters) and cut to ``_SHOW_MAX`` characters with its full length."""
    if isinstance(v, str):
        s = repr(v[: _SHOW_MAX + 1])
        n = len(v)
    else:
        try:
            s = json.dumps(v, default=str)
        except (ValueError, TypeError, RecursionError):
            s = f"<{type(v).__name__}>"
        n = len(s)
    if n > _SHOW_MAX:
        s = f"{s[:_SHOW_MAX]}... ({n} characters)"
    return s


def _key(k: Any) -> str:
    """A key for a message: itself when it is short printable text, else :func:`_show`."""
    return k if isinstance(k, str) and k.isprintable() and 0 < len(k) <= 80 else _show(k)


def _err(src: str, key: str, value: Any, allowed: str) -> CampaignError:
    return CampaignError(f"{src}: key '{key}': got {_show(value)}; allowed: {allowed}")


# names used in paths, job names and chain ids
_NAME_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]*\Z")
_NAME_MAX = 64
_CHAIN_ID_MAX = 128
NAME_RULE = (f"1-{_NAME_MAX} characters: letters, digits, '_', '.', '-', starting with a letter or digit")
# dotted config keys of scan axes: parts of letters, digits and '_'
_CONFIG_KEY_RE = re.compile(r"\A[A-Za-z][A-Za-z0-9_]*(\.[A-Za-z][A-Za-z0-9_]*)*\Z")
# Slurm: the time formats of sbatch --time, one regex per form (components checked in _slurm_time)
_TIME_FORMS = (
    re.compile(r"\A(?P<m>[0-9]{1,7})\Z"),                                              # minutes
    re.compile(r"\A(?P<m>[0-9]{1,7}):(?P<s>[0-9]{2})\Z"),                              # MM:SS
    re.compile(r"\A(?P<h>[0-9]{1,5}):(?P<m>[0-9]{2}):(?P<s>[0-9]{2})\Z"),              # HH:MM:SS
    re.compile(r"\A(?P<d>[0-9]{1,4})-(?P<h>[0-9]{1,2})\Z"),                            # D-HH
    re.compile(r"\A(?P<d>[0-9]{1,4})-(?P<h>[0-9]{1,2}):(?P<m>[0-9]{2})\Z"),            # D-HH:MM
    re.compile(r"\A(?P<d>[0-9]{1,4})-(?P<h>[0-9]{1,2}):(?P<m>[0-9]{2}):(?P<s>[0-9]{2})\Z"),  # D-HH:MM:SS
)
TIME_RULE = ("a Slurm time: MINUTES, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS (digits; minutes and "
             "seconds after ':' 00-59, hours after '-' 0-23; more than 0 and at most 2**31-1 seconds)")
_MEM_RE = re.compile(r"\A[0-9]{1,12}[KMGTkmgt]?\Z")
MEM_RULE = "a Slurm memory size: an integer (megabytes) with an optional K, M, G or T suffix, e.g. 4000 or 64G"
_SLURM_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_SLURM_NAME_RE = re.compile(rf"\A{_SLURM_NAME}\Z")
_PARTITION_RE = re.compile(rf"\A{_SLURM_NAME}(,{_SLURM_NAME})*\Z")
SLURM_NAME_RULE = "a Slurm name: letters, digits, '_', '.', '-' (not starting with '.' or '-'), at most 128"
PARTITION_RULE = "a Slurm partition name or a comma-separated list of them (letters, digits, '_', '.', '-')"
# extra sbatch options: --name or --name=value, value of a closed set of characters that sbatch
# reads as one word in a '#SBATCH' line (no whitespace, quotes, '\' or '#')
_OPTION_RE = re.compile(r"\A--(?P<name>[a-z][a-z0-9]*(-[a-z0-9]+)*)(=(?P<value>[A-Za-z0-9_.,:@+=/&|*!()\[\]-]{1,256}))?\Z")
OPTION_RULE = ("a list of long sbatch options '--name' or '--name=value' (value: letters, digits and "
               "_ . , : @ + = / & | * ! ( ) [ ] -; no spaces, quotes, '$', '`', ';', '#' or '\\')")
#: sbatch options the campaign writes itself: in ``extra`` they are refused, naming the key to use
_OWN_OPTIONS = {"nodes": "resources.nodes", "ntasks-per-node": "resources.ntasks_per_node",
                "cpus-per-task": "resources.cpus_per_task", "gpus-per-task": "resources.gpus_per_task",
                "time": "resources.time", "partition": "resources.partition", "account": "resources.account",
                "mem": "resources.mem", "signal": "slurm.signal_seconds", "job-name": None, "output": None,
                "error": None, "open-mode": None, "requeue": None, "no-requeue": None, "dependency": None,
                "parsable": None, "wrap": None, "array": None}
#: extra options whose value is a Slurm name (qos, reservation, ...)
_NAME_OPTIONS = ("qos", "reservation", "wckey")
_TEXT_MAX = 4096


def _text(src: str, key: str, v: Any, what: str) -> str:
    """Text that reaches a job script inside quotes (paths, commands): printable characters
    only (no control or format characters, no line separators, no non-ASCII spaces)."""
    if not isinstance(v, str) or not v.strip() or len(v) > _TEXT_MAX or not v.isprintable():
        raise _err(src, key, v, f"{what}: printable text of at most {_TEXT_MAX} characters, no control "
                                "characters (newline, tab, ...)")
    return v


def _name(src: str, key: str, v: Any, limit: int = _NAME_MAX) -> str:
    """A name used in paths and job names: ``\\A[A-Za-z0-9][A-Za-z0-9._-]*\\Z``, not '.' or '..'."""
    if not isinstance(v, str) or not _NAME_RE.match(v) or v in (".", "..") or len(v) > limit:
        raise _err(src, key, v, NAME_RULE.replace(str(_NAME_MAX), str(limit)))
    return v


def _int(src: str, key: str, v: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        raise _err(src, key, v, f"an integer >= {lo}" + (f" and <= {hi}" if hi is not None else ""))
    return v


def _slurm_time(src: str, key: str, v: Any) -> str:
    """sbatch ``--time``: one of Slurm's six forms (YAML integers are minutes)."""
    t = str(v) if isinstance(v, int) and not isinstance(v, bool) else v
    m = next((f.match(t) for f in _TIME_FORMS if isinstance(t, str) and f.match(t)), None)
    if m is None:
        raise _err(src, key, v, TIME_RULE)
    g = {k: int(x) for k, x in m.groupdict().items()}
    d, h, mi, s = g.get("d", 0), g.get("h", 0), g.get("m", 0), g.get("s", 0)
    leading = "d" if "d" in g else ("h" if "h" in g else "m")
    ok = (s <= 59 and (mi <= 59 or leading == "m") and (h <= 23 or leading == "h")
          and 0 < d * 86400 + h * 3600 + mi * 60 + s <= 2**31 - 1)
    if not ok:
        raise _err(src, key, v, TIME_RULE)
    return t


def _slurm_mem(src: str, key: str, v: Any) -> str:
    t = str(v) if isinstance(v, int) and not isinstance(v, bool) else v
    if not isinstance(t, str) or not _MEM_RE.match(t):
        raise _err(src, key, v, MEM_RULE)
    return t


def _slurm_name(src: str, key: str, v: Any, partition: bool = False) -> str:
    rx, rule = (_PARTITION_RE, PARTITION_RULE) if partition else (_SLURM_NAME_RE, SLURM_NAME_RULE)
    if not isinstance(v, str) or not rx.match(v) or len(v) > 1024:
        raise _err(src, key, v, rule)
    return v


def _sbatch_options(src: str, key: str, v: Any) -> tuple[str, ...]:
    """``extra``: a list of long sbatch options, each ``--name`` or ``--name=value`` (see OPTION_RULE);
    options the campaign writes itself are refused (naming the key to use instead)."""
    if not isinstance(v, list):
        raise _err(src, key, v, OPTION_RULE)
    for i, x in enumerate(v):
        m = _OPTION_RE.match(x) if isinstance(x, str) else None
        if m is None:
            raise _err(src, f"{key}[{i}]", x, OPTION_RULE)
        name, value = m.group("name"), m.group("value")
        if name in _OWN_OPTIONS:
            use = _OWN_OPTIONS[name]
            raise _err(src, f"{key}[{i}]", x, f"options other than --{name}, which the campaign sets itself"
                       + (f" (use {use})" if use else ""))
        if name in _NAME_OPTIONS and value is not None:
            _slurm_name(src, f"{key}[{i}]", value)
    return tuple(v)


def _finite(x: Any) -> bool:
    """A number of a campaign value: not bool, finite, integers within 64 bits."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    return abs(x) < 2**63 if isinstance(x, int) else math.isfinite(x)


def _axis_values(src: str, key: str, spec: Any) -> tuple[Any, ...]:
    """Scan values: a list of numbers, ``{start, stop, num}`` (inclusive) or ``{start, stop, step}``."""
    allowed = ("a non-empty list of finite numbers, or a mapping {start, stop, num} (both ends included) "
               f"or {{start, stop, step}} of finite numbers; at most {MAX_AXIS_VALUES} values")
    if isinstance(spec, list):
        if not spec or len(spec) > MAX_AXIS_VALUES or not all(_finite(x) for x in spec):
            raise _err(src, key, spec, allowed)
        if len(set(spec)) != len(spec):
            raise _err(src, key, spec, "a list without repeated values")
        return tuple(spec)
    if not (isinstance(spec, dict) and set(spec) in ({"start", "stop", "num"}, {"start", "stop", "step"})):
        raise _err(src, key, spec, allowed)
    if not all(_finite(x) for x in spec.values()):
        raise _err(src, key, spec, allowed)
    vals = _linspace(src, key, spec) if "num" in spec else _arange(src, key, spec)
    if not all(math.isfinite(x) for x in vals):
        raise _err(src, key, spec, allowed + " (the values overflow)")
    return vals


def _linspace(src: str, key: str, spec: Mapping[str, Any]) -> tuple[Any, ...]:
    """``{start, stop, num}``: ``num`` evenly spaced values, both ends included."""
    a, b, n = spec["start"], spec["stop"], spec["num"]
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_AXIS_VALUES:
        raise _err(src, f"{key}.num", n, f"an integer >= 1 and <= {MAX_AXIS_VALUES}")
    return tuple(a + (b - a) * i / (n - 1) for i in range(n)) if n > 1 else (a,)


def _arange(src: str, key: str, spec: Mapping[str, Any]) -> tuple[Any, ...]:
    """``{start, stop, step}``: start, start + step, ... up to stop (included when on the grid)."""
    a, b, step = spec["start"], spec["stop"], spec["step"]
    if step <= 0 or b < a:
        raise _err(src, key, spec, "step > 0 and stop >= start")
    span = (b - a) / step
    if not math.isfinite(span) or span + 1 > MAX_AXIS_VALUES:
        raise _err(src, key, spec, f"at most {MAX_AXIS_VALUES} values: (stop - start) / step < {MAX_AXIS_VALUES}")
    n = math.floor(span + 1e-9) + 1
    return tuple(round(a + i * step, 12) for i in range(n))


def _resources(src: str, key: str, raw: Any, defaults: Mapping[str, Any]) -> Resources:
    if raw is not None and not isinstance(raw, dict):
        raise _err(src, key, raw, "a mapping of resources")
    raw = {**defaults, **(raw or {})}
    known = set(Resources.__dataclass_fields__)
    for k in raw:
        if k not in known:
            raise _err(src, f"{key}.{_key(k)}", raw[k], f"one of the keys {', '.join(sorted(known))}")
    out: dict[str, Any] = {k: _int(src, f"{key}.{k}", raw[k], lo, _INT_MAX)
                           for k, lo in _INT_RESOURCES.items() if k in raw}
    if "time" in raw:
        out["time"] = _slurm_time(src, f"{key}.time", raw["time"])
    if raw.get("partition") is not None:
        out["partition"] = _slurm_name(src, f"{key}.partition", raw["partition"], partition=True)
    if raw.get("account") is not None:
        out["account"] = _slurm_name(src, f"{key}.account", raw["account"])
    if raw.get("mem") is not None:
        out["mem"] = _slurm_mem(src, f"{key}.mem", raw["mem"])
    if "extra" in raw:
        out["extra"] = _sbatch_options(src, f"{key}.extra", raw["extra"])
    return Resources(**out)


def check_job_values(c: Campaign, ch: Chain, st: Stage) -> None:
    """Check again every value that :func:`hpcflow.run.campaign.slurm.render_script` writes into a
    batch script, whatever built the dataclasses (``load_campaign`` checks them with the file's
    keys in the messages; this catches values that did not come through it)."""
    src = c.source if c.source.isprintable() else _show(c.source)
    _name(src, "name", c.name)
    _name(src, "chain", ch.id, _CHAIN_ID_MAX)
    _name(src, "stages", st.name)
    _text(src, "dir", c.dir, "the campaign directory")
    _text(src, "chain dir", ch.dir, "the chain directory")
    if "\\" in c.dir:
        raise _err(src, "dir", c.dir, "a path without '\\' (Slurm reads it as an escape in --output)")
    _text(src, "hpcflow", c.hpcflow, "the hpcflow command")
    if c.mpi not in MPI_PLUGINS:
        raise _err(src, "slurm.mpi", c.mpi, ", ".join(MPI_PLUGINS))
    if st.command not in STAGE_COMMANDS:
        raise _err(src, f"stages.{st.name}.command", st.command, ", ".join(STAGE_COMMANDS))
    _int(src, "slurm.signal_seconds", c.signal_seconds, 1, 65535)
    r, key = st.resources, f"stages.{st.name}.resources"
    for k, lo in _INT_RESOURCES.items():
        _int(src, f"{key}.{k}", getattr(r, k), lo, _INT_MAX)
    _slurm_time(src, f"{key}.time", r.time)
    if r.partition is not None:
        _slurm_name(src, f"{key}.partition", r.partition, partition=True)
    if r.account is not None:
        _slurm_name(src, f"{key}.account", r.account)
    if r.mem is not None:
        _slurm_mem(src, f"{key}.mem", r.mem)
    _sbatch_options(src, f"{key}.extra", list(r.extra))


# ---- stages -------------------------------------------------------------------------------
def _stage(src: str, sname: Any, sraw: Any, res_defaults: Mapping[str, Any]) -> Stage:
    """One entry of ``stages``: ``{command, after, set, resources, resume}``."""
    _name(src, "stages", sname)
    key = f"stages.{sname}"
    if sraw is None:
        sraw = {}
    if not isinstance(sraw, dict):
        raise _err(src, key, sraw, "a mapping with command, after, set, resources, resume")
    for k in sraw:
        if k not in _STAGE_KEYS:
            raise _err(src, f"{key}.{_key(k)}", sraw[k], f"one of the keys {', '.join(sorted(_STAGE_KEYS))}")
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
                raise CampaignError(f"{src}: stage '{s.name}': 'after' names {_show(a)}, which is not a stage; "
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
            raise _err(src, _key(k), raw[k], f"one of the keys {', '.join(sorted(_TOP_KEYS))}")


def _campaign_name(src: str, raw: Mapping[str, Any]) -> str:
    return _name(src, "name", raw.get("name"))


def _campaign_dir(src: str, raw: Mapping[str, Any], name: str, base_dir: str) -> str:
    """``dir`` (default ``runs/<name>``), relative to the campaign file: any printable path but '\\'."""
    d = raw.get("dir", os.path.join("runs", name))
    _text(src, "dir", d, "a directory path")
    out = os.path.abspath(os.path.join(base_dir, d))
    _text(src, "dir", out, "a directory path (made absolute)")
    if "\\" in out:
        raise _err(src, "dir", out, "a path without '\\' (Slurm reads it as an escape in --output)")
    return out


def _read_base(src: str, p: Any, base_dir: str) -> dict[str, Any]:
    """The hpcflow config named by ``base`` (relative to ``base_dir``), read like hpcflow reads a
    config (YAML 1.1 scalars) but through the bounded loader."""
    if not isinstance(p, str) or not p.strip():
        raise _err(src, "base", p, "the path of an hpcflow YAML config")
    p = os.path.join(base_dir, p)
    base = load_yaml(p, what=f"{src}: key 'base': {_show(p)}", base_60=True) or {}
    if not isinstance(base, dict):
        raise CampaignError(f"{src}: key 'base': {_show(p)} is not a mapping of config keys")
    return base


def _base_config(src: str, raw: Mapping[str, Any], base_dir: str) -> dict[str, Any]:
    """``base`` file, then the inline ``config`` keys merged over it."""
    base = _read_base(src, raw["base"], base_dir) if "base" in raw else {}
    inline = raw.get("config", {})
    if not isinstance(inline, dict):
        raise _err(src, "config", inline, "a mapping of hpcflow config keys (dotted or nested)")
    try:
        return _merge(base, _nest(inline))
    except CampaignError as e:
        raise CampaignError(f"{src}: config: {e}") from None


def _scan_axes(src: str, raw: Mapping[str, Any]) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    """``scan`` (dotted key -> values) plus the shorthand ``beta`` for ``scan.action.beta``."""
    scan = raw.get("scan", {})
    if not isinstance(scan, dict):
        raise _err(src, "scan", scan, "a mapping of dotted config keys to value lists")
    for k in scan:
        if not isinstance(k, str) or not _CONFIG_KEY_RE.match(k) or len(k) > 128:
            raise _err(src, "scan", k, "dotted config keys (parts of letters, digits and '_', "
                                       "starting with a letter), e.g. action.beta")
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
    # sbatch --signal takes at most 65535 seconds
    sig = _int(src, "slurm.signal_seconds", slurm.get("signal_seconds", 300), 1, 65535)
    res_defaults = {k: v for k, v in slurm.items() if k not in _SLURM_OWN_KEYS}
    _resources(src, "slurm", res_defaults, {})
    return mpi, sig, res_defaults


def _array_settings(src: str, raw: Mapping[str, Any]) -> tuple[int, int]:
    """``slurm.array_limit`` (``--array=...%K``, 0: none) and ``slurm.max_array_size`` (the
    cluster's MaxArraySize, default Slurm's 1001)."""
    slurm = raw.get("slurm", {}) or {}
    limit = _int(src, "slurm.array_limit", slurm.get("array_limit", 0), 0, MAX_CHAINS)
    size = _int(src, "slurm.max_array_size", slurm.get("max_array_size", 1001), 1, 4_000_001)
    return limit, size


def _hpcflow_command(src: str, raw: Mapping[str, Any]) -> str:
    hp = raw.get("hpcflow", None)
    if hp is not None:
        return _text(src, "hpcflow", hp, "the hpcflow command (path of the console script)")
    return _text(src, "hpcflow", _default_hpcflow(), "the hpcflow command found next to this Python")


def _default_hpcflow() -> str:
    """The hpcflow console script next to this Python (venv on a shared filesystem), else PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "hpcflow")
    if os.access(here, os.X_OK):
        return here
    return shutil.which("hpcflow") or "hpcflow"


def _count_chains(src: str, axes: tuple[tuple[str, tuple[Any, ...]], ...], chains: int) -> None:
    n = math.prod(len(v) for _, v in axes) * chains
    if n > MAX_CHAINS:
        raise _err(src, "chains", chains, f"at most {MAX_CHAINS} chains in all (scan points x chains); "
                                          f"this campaign has {n}")


def parse_campaign(raw: Any, source: str = "<campaign>", base_dir: str = ".") -> Campaign:
    """Validate a campaign mapping (see docs/HPC.md); relative paths are relative to ``base_dir``.

    Sections are checked in file order of importance (name, dir, config, scan, slurm, stages),
    then every job's hpcflow config, so the first problem found is the one reported.
    """
    src = source if source.isprintable() else _show(source)
    _check_top_level(src, raw)
    name = _campaign_name(src, raw)
    seed = _int(src, "seed", raw.get("seed", 0), 0, 2**64 - 1)
    d = _campaign_dir(src, raw, name, base_dir)
    base = _base_config(src, raw, base_dir)
    axes = _scan_axes(src, raw)
    chains = _int(src, "chains", raw.get("chains", 1), 1, MAX_CHAINS)
    _count_chains(src, axes, chains)
    mpi, sig, res_defaults = _slurm_settings(src, raw)
    limit, size = _array_settings(src, raw)
    n_chains = math.prod(len(v) for _, v in axes) * chains
    if n_chains > size:
        raise _err(src, "chains", chains, f"at most slurm.max_array_size = {size} chains in all (scan points x "
                                          f"chains: one job array per stage, chain i is index i); this campaign "
                                          f"has {n_chains}")
    stages = _stages(src, raw.get("stages"), res_defaults)
    camp = Campaign(name=name, seed=seed, dir=d, base=base, axes=axes, chains=chains, stages=stages,
                    hpcflow=_hpcflow_command(src, raw), mpi=mpi, signal_seconds=sig, source=src,
                    array_limit=limit, max_array_size=size)
    # every job's hpcflow config must be valid before anything is submitted
    for ch in expand_chains(camp):
        for st in camp.stages:
            job_config(camp, ch, st, validate=True)
            check_job_values(camp, ch, st)
    return camp


def load_campaign(path: str | os.PathLike) -> Campaign:
    """Read (:func:`load_yaml`: bounded, ``1:30`` is text) and validate a campaign YAML file."""
    p = os.fspath(path)
    src = p if p.isprintable() else _show(p)
    raw = load_yaml(p, what=src, base_60=False)
    return parse_campaign(raw, source=p, base_dir=os.path.dirname(os.path.abspath(p)))


# ---- YAML: the bounded reader of hpcflow.yamlio ------------------------------------------
def load_yaml(path: str, what: str | None = None, base_60: bool = False) -> Any:
    """Read one YAML document safely and within bounds (:func:`hpcflow.yamlio.read_yaml`: size,
    UTF-8, nesting and alias expansion bounded). ``base_60=False`` (campaign files) reads
    ``1:30`` as text. Every failure is a one-line :class:`CampaignError` starting with ``what``."""
    what = what or (path if path.isprintable() else _show(path))
    try:
        return read_yaml(path, base_60=base_60)
    except YAMLReadError as e:
        raise CampaignError(f"{what}: {e}") from None


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
                raise CampaignError(f"config key {_show(str(k))}: {_show(p)} is both a value and a section")
        node[parts[-1]] = _merge(node[parts[-1]], v) if isinstance(v, dict) and isinstance(
            node.get(parts[-1]), dict) else (_nest(v) if isinstance(v, dict) else v)
    return out


def _merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _fmt(v: Any) -> str:
    """A scan value in a chain id: 6 significant digits, no '+' (``1e+06`` -> ``1e06``)."""
    return format(v, "g").replace("+", "") if isinstance(v, float) else str(v)


def expand_chains(c: Campaign) -> list[Chain]:
    """All chains: the product of the scan axes times ``chains`` independent chains each.

    Chain ids are names (``\\A[A-Za-z0-9][A-Za-z0-9._-]*\\Z``, at most 128 characters) and
    distinct: scan values that differ only beyond the 6 significant digits of the id are refused.
    """
    from hpcflow.rng import spawn_seed

    keys = [k for k, _ in c.axes]
    out = []
    seen: dict[str, Any] = {}
    for values in itertools.product(*(v for _, v in c.axes)):
        point = dict(zip(keys, values))
        label = "_".join(f"{k.split('.')[-1]}{_fmt(v)}" for k, v in point.items()) or "point"
        # the seed depends on the point's values, not its position: adding points later keeps seeds
        h = int.from_bytes(hashlib.sha256(json.dumps(point, sort_keys=True).encode()).digest()[:8], "little")
        for i in range(c.chains):
            cid = f"{label}-c{i}"
            key = "beta" if keys == ["action.beta"] else "scan"
            _name(c.source, key, cid, _CHAIN_ID_MAX)
            if cid in seen:
                raise CampaignError(f"{c.source}: key '{key}': scan points {_show(seen[cid])} and {_show(point)} "
                                    f"both give the chain id '{cid}'; allowed: values that differ within "
                                    "6 significant digits (chain ids and directories must be distinct)")
            seen[cid] = point
            out.append(Chain(cid, point, i, spawn_seed(c.seed, h, i) % 2**63,
                             os.path.join(c.dir, "chains", cid)))
    return out


_PLACEHOLDER_RE = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")


class _Placeholder(Exception):
    """An unknown placeholder (its text) in a stage value."""


def _subst(v: Any, ctx: Mapping[str, str]) -> Any:
    """``{chain_dir}``, ``{chain}``, ``{stage}``, ``{campaign_dir}`` in stage values (``{{``/``}}``
    for literal braces); nothing else: no attribute, index, conversion or format spec."""
    if isinstance(v, str):
        def one(m: re.Match[str]) -> str:
            t = m.group(0)
            if t in ("{{", "}}"):
                return t[0]
            if m.group(1) is not None and m.group(1) in ctx:
                return ctx[m.group(1)]
            raise _Placeholder(t)
        return _PLACEHOLDER_RE.sub(one, v)
    if isinstance(v, list):
        return [_subst(x, ctx) for x in v]
    if isinstance(v, dict):
        return {k: _subst(x, ctx) for k, x in v.items()}
    return v


def _subst_set(src: str, key: str, sset: Mapping[str, Any], ctx: Mapping[str, str]) -> dict[str, Any]:
    """A stage's ``set`` with placeholders substituted; an unknown one names the key and value."""
    out = {}
    for k, v in sset.items():
        try:
            out[k] = _subst(v, ctx)
        except _Placeholder as e:
            raise _err(src, f"{key}.{_key(k)}", v, f"the placeholders {', '.join('{' + c + '}' for c in ctx)} "
                       f"('{{{{' and '}}}}' for literal braces); unknown: {_show(str(e))}") from None
    return out


def job_config(c: Campaign, ch: Chain, st: Stage, validate: bool = False) -> dict[str, Any]:
    """The complete raw hpcflow config of one job: base, scan point, chain seed, output dir, stage set.

    Stage values may use ``{chain_dir}``, ``{chain}``, ``{stage}``, ``{campaign_dir}``.
    """
    ctx = {"chain_dir": ch.dir, "chain": ch.id, "stage": st.name, "campaign_dir": c.dir}
    raw = _merge(c.base, _nest({**ch.point, "seed": ch.seed, "output.dir": ch.dir}))
    try:
        sset = _nest(_subst_set(c.source, f"stages.{st.name}.set", st.set, ctx))
    except CampaignError as e:
        if str(e).startswith(c.source):
            raise
        raise CampaignError(f"{c.source}: stages.{st.name}.set: {e}") from None
    raw = _merge(raw, sset)
    if validate:
        from hpcflow.config import ConfigError, config_from_dict

        try:
            config_from_dict(raw, f"{c.source} (chain {ch.id}, stage {st.name})")
        except ConfigError as e:
            raise CampaignError(str(e)) from None
    return raw
