"""Campaigns: a scan of ensembles expanded into Slurm jobs with dependencies.

A campaign YAML (format in ``docs/HPC.md``) names a base hpcflow config, scan axes (e.g.
``beta: [5.8, 6.0]``), a number of independent chains per scan point and stages (``train``
then ``sample``) with their resources. ``hpcflow campaign CAMPAIGN.yaml`` expands it into one
batch script per (chain, stage) that calls only the ``hpcflow`` CLI, and submits the scripts
with ``sbatch --dependency=afterok:...`` so a chain's sampling starts only after its training
succeeded. Running it again resubmits exactly the unfinished work: stages that finished are
skipped, jobs still queued or running are kept, anything else (failed, cancelled, lost) is
submitted again, with ``--resume`` so it continues from its checkpoints.

Book-keeping under the campaign directory ``dir``::

    campaign_state.json            submitted job ids per chain/stage (atomic writes)
    configs/<chain>.<stage>.yaml   the complete hpcflow config of the job (validated before submission)
    scripts/<chain>.<stage>.sbatch the batch script
    status/<chain>.<stage>.json    written by the job itself: running / done / requeued / failed
    logs/<chain>.<stage>.<jobid>.out
    chains/<chain>/                output.dir of the chain (ensemble, checkpoints, summary)

Chain seeds are ``spawn_seed(campaign seed, hash(scan point), chain index)``: independent,
reproducible, and unchanged when scan points are added to the campaign later.
Every error in the campaign (format, unknown stage, cycle, invalid hpcflow config of any
job) is reported before a single job is submitted.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

__all__ = [
    "Campaign",
    "CampaignError",
    "Chain",
    "Resources",
    "Stage",
    "campaign_status",
    "expand_chains",
    "format_status",
    "job_config",
    "load_campaign",
    "main",
    "parse_campaign",
    "render_script",
    "submit",
]

STAGE_COMMANDS = ("train", "sample", "run")
MPI_PLUGINS = ("pmix", "pmi2", "none")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_TIME_RE = re.compile(r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$|^\d+$")
# squeue states of a job that will still run (or is running): keep it, do not resubmit
_ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD",
           "REQUEUE_FED", "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING"}

Runner = Callable[..., subprocess.CompletedProcess]


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


# ---- parsing ------------------------------------------------------------------------------
def _err(src: str, key: str, value: Any, allowed: str) -> CampaignError:
    shown = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return CampaignError(f"{src}: key '{key}': got {shown}; allowed: {allowed}")


def _int(src: str, key: str, v: Any, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise _err(src, key, v, f"an integer >= {lo}")
    return v


def _axis_values(src: str, key: str, spec: Any) -> tuple[Any, ...]:
    """Scan values: a list of numbers, ``{start, stop, num}`` (inclusive) or ``{start, stop, step}``."""
    allowed = ("a non-empty list of numbers, or a mapping {start, stop, num} (both ends included) "
               "or {start, stop, step}")
    if isinstance(spec, list):
        if not spec or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in spec):
            raise _err(src, key, spec, allowed)
        if len(set(spec)) != len(spec):
            raise _err(src, key, spec, "a list without repeated values")
        return tuple(spec)
    if isinstance(spec, dict) and set(spec) in ({"start", "stop", "num"}, {"start", "stop", "step"}):
        a, b = spec["start"], spec["stop"]
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in spec.values()):
            raise _err(src, key, spec, allowed)
        if "num" in spec:
            n = spec["num"]
            if not isinstance(n, int) or n < 1:
                raise _err(src, f"{key}.num", n, "an integer >= 1")
            return tuple(a + (b - a) * i / (n - 1) for i in range(n)) if n > 1 else (a,)
        step = spec["step"]
        if step <= 0 or b < a:
            raise _err(src, key, spec, "step > 0 and stop >= start")
        n = math.floor((b - a) / step + 1e-9) + 1
        return tuple(round(a + i * step, 12) for i in range(n))
    raise _err(src, key, spec, allowed)


def _resources(src: str, key: str, raw: Any, defaults: Mapping[str, Any]) -> Resources:
    raw = {**defaults, **(raw or {})}
    if not isinstance(raw, dict):
        raise _err(src, key, raw, "a mapping of resources")
    known = {f for f in Resources.__dataclass_fields__}
    for k in raw:
        if k not in known:
            raise _err(src, f"{key}.{k}", raw[k], f"one of the keys {', '.join(sorted(known))}")
    out: dict[str, Any] = {}
    for k in ("nodes", "ntasks_per_node", "cpus_per_task"):
        if k in raw:
            out[k] = _int(src, f"{key}.{k}", raw[k], 1)
    if "gpus_per_task" in raw:
        out["gpus_per_task"] = _int(src, f"{key}.gpus_per_task", raw["gpus_per_task"], 0)
    if "time" in raw:
        t = str(raw["time"])
        if not _TIME_RE.match(t):
            raise _err(src, f"{key}.time", raw["time"], "a Slurm time: MM, HH:MM:SS or D-HH:MM:SS")
        out["time"] = t
    for k in ("partition", "account", "mem"):
        if raw.get(k) is not None:
            out[k] = str(raw[k])
    if "extra" in raw:
        ex = raw["extra"]
        if not isinstance(ex, list) or not all(isinstance(x, str) and x.startswith("--") for x in ex):
            raise _err(src, f"{key}.extra", ex, "a list of sbatch options like '--qos=normal'")
        out["extra"] = tuple(ex)
    return Resources(**out)


def _order_stages(src: str, stages: dict[str, Stage]) -> tuple[Stage, ...]:
    """Topological order (Kahn); a cycle is reported with its path."""
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
    # a flow sampling stage needs a trained flow from an earlier stage
    upstream: dict[str, set[str]] = {}
    for s in order:
        upstream[s.name] = set().union(*([{a} | upstream[a] for a in s.after] or [set()]))
        if s.command == "sample" and not any(stages[u].command == "train" for u in upstream[s.name]):
            raise CampaignError(f"{src}: stage '{s.name}' runs 'hpcflow sample', which needs a trained flow, "
                                "but no 'train' stage comes before it: add a stages.train section and "
                                f"'after: [train]' to stage '{s.name}'")
    return tuple(order)


def _default_hpcflow() -> str:
    """The hpcflow console script next to this Python (venv on a shared filesystem), else PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "hpcflow")
    if os.access(here, os.X_OK):
        return here
    return shutil.which("hpcflow") or "hpcflow"


def parse_campaign(raw: Any, source: str = "<campaign>", base_dir: str = ".") -> Campaign:
    """Validate a campaign mapping (see docs/HPC.md); relative paths are relative to ``base_dir``."""
    src = source
    if not isinstance(raw, dict):
        raise CampaignError(f"{src}: top level must be a mapping, got {type(raw).__name__}")
    known = {"name", "seed", "dir", "base", "config", "scan", "beta", "chains", "stages", "slurm", "hpcflow"}
    for k in raw:
        if k not in known:
            raise _err(src, k, raw[k], f"one of the keys {', '.join(sorted(known))}")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise _err(src, "name", name, "a name of letters, digits, '_', '.', '-'")
    seed = _int(src, "seed", raw.get("seed", 0), 0)
    d = raw.get("dir", os.path.join("runs", name))
    if not isinstance(d, str) or not d:
        raise _err(src, "dir", d, "a directory path")
    d = os.path.abspath(os.path.join(base_dir, d))

    base: dict[str, Any] = {}
    if "base" in raw:
        p = raw["base"]
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
    inline = raw.get("config", {})
    if not isinstance(inline, dict):
        raise _err(src, "config", inline, "a mapping of hpcflow config keys (dotted or nested)")
    base = _merge(base, _nest(inline))

    scan = raw.get("scan", {})
    if not isinstance(scan, dict):
        raise _err(src, "scan", scan, "a mapping of dotted config keys to value lists")
    scan = dict(scan)
    if "beta" in raw:
        if "action.beta" in scan:
            raise CampaignError(f"{src}: 'beta' and 'scan.action.beta' both given; use one")
        scan["action.beta"] = raw["beta"]
    axes = tuple((k, _axis_values(src, "beta" if ("beta" in raw and k == "action.beta") else f"scan.{k}", v))
                 for k, v in scan.items())
    chains = _int(src, "chains", raw.get("chains", 1), 1)

    slurm = raw.get("slurm", {}) or {}
    if not isinstance(slurm, dict):
        raise _err(src, "slurm", slurm, "a mapping (mpi, signal_seconds, and default resources)")
    mpi = slurm.get("mpi", "pmix")
    if mpi not in MPI_PLUGINS:
        raise _err(src, "slurm.mpi", mpi, ", ".join(MPI_PLUGINS))
    sig = _int(src, "slurm.signal_seconds", slurm.get("signal_seconds", 300), 1)
    res_defaults = {k: v for k, v in slurm.items() if k not in ("mpi", "signal_seconds")}
    _resources(src, "slurm", res_defaults, {})

    rs = raw.get("stages")
    if rs is None:
        raise CampaignError(f"{src}: missing key 'stages' (e.g. stages: {{train: {{...}}, "
                            "sample: {after: [train], ...}}})")
    if not isinstance(rs, dict) or not rs:
        raise _err(src, "stages", rs, "a non-empty mapping of stage name to stage")
    stages: dict[str, Stage] = {}
    for sname, sraw in rs.items():
        key = f"stages.{sname}"
        if not isinstance(sname, str) or not _NAME_RE.match(sname):
            raise _err(src, "stages", sname, "stage names of letters, digits, '_', '.', '-'")
        if sraw is None:
            sraw = {}
        if not isinstance(sraw, dict):
            raise _err(src, key, sraw, "a mapping with command, after, set, resources, resume")
        for k in sraw:
            if k not in ("command", "after", "set", "resources", "resume"):
                raise _err(src, f"{key}.{k}", sraw[k], "one of the keys after, command, resources, resume, set")
        cmd = sraw.get("command", sname if sname in STAGE_COMMANDS else None)
        if cmd not in STAGE_COMMANDS:
            raise _err(src, f"{key}.command", cmd, ", ".join(STAGE_COMMANDS))
        after = sraw.get("after", [])
        if isinstance(after, str):
            after = [after]
        if not isinstance(after, list) or not all(isinstance(a, str) for a in after):
            raise _err(src, f"{key}.after", after, "a list of stage names")
        sset = sraw.get("set", {}) or {}
        if not isinstance(sset, dict):
            raise _err(src, f"{key}.set", sset, "a mapping of dotted config keys to values")
        resume = sraw.get("resume", True)
        if not isinstance(resume, bool):
            raise _err(src, f"{key}.resume", resume, "true or false")
        stages[sname] = Stage(sname, cmd, tuple(after), dict(sset),
                              _resources(src, f"{key}.resources", sraw.get("resources"), res_defaults), resume)
    ordered = _order_stages(src, stages)

    hp = raw.get("hpcflow", None)
    if hp is not None and (not isinstance(hp, str) or not hp.strip()):
        raise _err(src, "hpcflow", hp, "the hpcflow command (path of the console script)")
    camp = Campaign(name=name, seed=seed, dir=d, base=base, axes=axes, chains=chains, stages=ordered,
                    hpcflow=hp or _default_hpcflow(), mpi=mpi, signal_seconds=sig, source=src)
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


# ---- scripts ------------------------------------------------------------------------------
def _paths(c: Campaign, ch: Chain, st: Stage) -> dict[str, str]:
    tag = f"{ch.id}.{st.name}"
    return {"config": os.path.join(c.dir, "configs", f"{tag}.yaml"),
            "script": os.path.join(c.dir, "scripts", f"{tag}.sbatch"),
            "status": os.path.join(c.dir, "status", f"{tag}.json"),
            "log": os.path.join(c.dir, "logs", f"{tag}.%j.out")}


def render_script(c: Campaign, ch: Chain, st: Stage) -> str:
    """The Slurm batch script of one (chain, stage) job.

    Time limits: ``--signal=TERM@N`` makes Slurm send SIGTERM to the hpcflow ranks N seconds
    before the limit; hpcflow checkpoints and exits 3 (resumable), and the script requeues the
    job (``scontrol requeue``; same job id, so ``afterok`` dependants keep waiting). A restarted
    job (``SLURM_RESTART_COUNT > 0``, or an earlier attempt left a status file) adds ``--resume``.
    """
    r = st.resources
    p = _paths(c, ch, st)
    q = shlex.quote
    lines = ["#!/bin/bash",
             f"#SBATCH --job-name={c.name}.{ch.id}.{st.name}",
             f"#SBATCH --output={p['log']}",
             "#SBATCH --open-mode=append",
             f"#SBATCH --nodes={r.nodes}",
             f"#SBATCH --ntasks-per-node={r.ntasks_per_node}",
             f"#SBATCH --cpus-per-task={r.cpus_per_task}",
             f"#SBATCH --time={r.time}",
             "#SBATCH --requeue",
             f"#SBATCH --signal=TERM@{c.signal_seconds}"]
    if r.gpus_per_task:
        lines.append(f"#SBATCH --gpus-per-task={r.gpus_per_task}")
    for k in ("partition", "account", "mem"):
        if getattr(r, k):
            lines.append(f"#SBATCH --{k}={getattr(r, k)}")
    lines += [f"#SBATCH {x}" for x in r.extra]
    launch = "srun" if c.mpi == "none" else f"srun --mpi={c.mpi}"
    device = " --set device=cuda" if r.gpus_per_task else ""
    resume_test = ('if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ] || [ -e "$status" ]; then resume=(--resume); fi'
                   if st.resume else "# stage.resume is false: a restarted job starts the stage afresh")
    body = f"""
# Generated by 'hpcflow campaign' ({c.source}): campaign {c.name}, chain {ch.id}, stage {st.name}.
# Calls only the hpcflow CLI. Exit status of hpcflow: 0 done, 2 bad input, 3 stopped by a
# signal with a checkpoint written (resumable) -> requeue this job.
set -uo pipefail
export OMP_NUM_THREADS="${{SLURM_CPUS_PER_TASK:-1}}"
status={q(p['status'])}
mkdir -p "$(dirname "$status")"
mark() {{
  printf '{{"state": "%s", "exit_code": %s, "job_id": "%s", "restarts": %s, "time": %s}}\\n' \\
    "$1" "$2" "${{SLURM_JOB_ID:-}}" "${{SLURM_RESTART_COUNT:-0}}" "$(date +%s)" >"$status.tmp" \\
    && mv -f "$status.tmp" "$status"
}}
resume=()
{resume_test}
mark running null
{launch} {q(c.hpcflow)} {st.command} {q(p['config'])}{device} "${{resume[@]}}"
rc=$?
case $rc in
  0) mark done 0; exit 0 ;;
  3) mark requeued 3
     # same job id: jobs depending on it (afterok) keep waiting for the resumed run
     scontrol requeue "$SLURM_JOB_ID" && exit 0
     mark failed 3; exit 3 ;;
  *) mark failed "$rc"; exit "$rc" ;;
esac
"""
    return "\n".join(lines) + "\n" + body


# ---- state and submission -----------------------------------------------------------------
def _atomic_write(path: str, text: str) -> None:
    from hpcflow.io.checkpoint import atomic_write_bytes

    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_bytes(path, text.encode("utf-8"))


def _state_path(c: Campaign) -> str:
    return os.path.join(c.dir, "campaign_state.json")


def _load_state(c: Campaign) -> dict[str, Any]:
    try:
        with open(_state_path(c), encoding="utf-8") as fh:
            st = json.load(fh)
    except FileNotFoundError:
        return {"campaign": c.name, "jobs": {}}
    except (OSError, json.JSONDecodeError) as e:
        raise CampaignError(f"{_state_path(c)}: unreadable campaign state ({e})") from None
    if st.get("campaign") != c.name:
        raise CampaignError(f"{_state_path(c)}: belongs to campaign {st.get('campaign')!r}, not {c.name!r}; "
                            "give this campaign its own 'dir'")
    return st


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError):
        return None


def _queue_states(ids: Sequence[str], run: Runner) -> dict[str, str]:
    """Scheduler state of the given job ids that Slurm still knows (squeue)."""
    if not ids:
        return {}
    try:
        r = run(["squeue", "-h", "-t", "all", "-j", ",".join(ids), "-o", "%i %T"],
                capture_output=True, text=True)
    except FileNotFoundError:
        return {}
    out = {}
    for line in r.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2:
            out[parts[0]] = parts[1]
    return out


def _sbatch(script: str, deps: Sequence[str], run: Runner) -> str:
    cmd = ["sbatch", "--parsable"]
    if deps:
        cmd.append("--dependency=afterok:" + ":".join(deps))
    cmd.append(script)
    try:
        r = run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        raise CampaignError("sbatch not found: submit on a Slurm login node, or use --dry-run") from None
    if r.returncode != 0:
        raise CampaignError(f"sbatch {script} failed ({r.returncode}): {r.stderr.strip()}")
    jid = r.stdout.strip().split(";")[0]
    if not jid.isdigit():
        raise CampaignError(f"sbatch {script}: unexpected output {r.stdout.strip()!r}")
    return jid


def submit(c: Campaign, dry_run: bool = False, run: Runner = subprocess.run,
           out: Callable[[str], None] = print) -> dict[str, Any]:
    """Submit every unfinished (chain, stage) job in dependency order; returns the campaign state.

    A stage is skipped when its status file says ``done``; kept when its last job is still
    queued or running and nothing upstream was resubmitted; otherwise (never submitted,
    failed, cancelled, or upstream resubmitted) it is submitted with ``afterok`` on the
    upstream jobs that have not finished. ``dry_run`` prints the scripts and submits nothing.
    """
    chains = expand_chains(c)
    state = _load_state(c) if not dry_run else {"campaign": c.name, "jobs": {}}
    jobs = state["jobs"]
    known = [str(j["job_id"]) for j in jobs.values() if j.get("job_id")]
    queue = {} if dry_run else _queue_states(known, run)
    n_new = 0
    for ch in chains:
        current: dict[str, str] = {}  # stage -> job id that will run it (unfinished stages only)
        fresh: set[str] = set()
        for st in c.stages:
            key = f"{ch.id}/{st.name}"
            p = _paths(c, ch, st)
            rec = jobs.get(key, {})
            mark = _read_json(p["status"]) or {}
            if not dry_run and mark.get("state") == "done":
                continue
            deps = [current[a] for a in st.after if a in current]
            jid = str(rec.get("job_id", ""))
            upstream_new = any(a in fresh for a in st.after)
            if jid and queue.get(jid) in _ACTIVE and not upstream_new:
                current[st.name] = jid
                continue
            if jid and queue.get(jid) in _ACTIVE:
                # it waits on a job that failed: replace it with one depending on the new upstream
                run(["scancel", jid], capture_output=True, text=True)
            cfg = job_config(c, ch, st, validate=True)
            script = render_script(c, ch, st)
            if dry_run:
                out(f"# ---- {p['script']} (after: {', '.join(st.after) or '-'})")
                out(script)
                current[st.name] = f"<{key}>"
                fresh.add(st.name)
                continue
            _atomic_write(p["config"], f"# hpcflow config of campaign {c.name}, chain {ch.id}, stage "
                          f"{st.name}\n" + yaml.safe_dump(cfg, sort_keys=False))
            _atomic_write(p["script"], script)
            os.makedirs(os.path.join(c.dir, "logs"), exist_ok=True)
            new = _sbatch(p["script"], deps, run)
            jobs[key] = {"job_id": new, "submitted": time.time(), "chain": ch.id, "stage": st.name,
                         "history": list(rec.get("history", [])) + [new]}
            current[st.name] = new
            fresh.add(st.name)
            n_new += 1
            # record each submission at once: a crash mid-campaign leaves no untracked job
            _atomic_write(_state_path(c), json.dumps(state, indent=2) + "\n")
    if not dry_run:
        _atomic_write(_state_path(c), json.dumps(state, indent=2) + "\n")
        out(f"campaign {c.name}: {n_new} job(s) submitted, {len(chains)} chain(s) x {len(c.stages)} stage(s)")
    return state


# ---- status -------------------------------------------------------------------------------
def _chain_output(c: Campaign, ch: Chain) -> tuple[str, str]:
    """(output.dir, ensemble folder) of the chain's last sampling stage (train-only campaigns:
    the last stage); the ensemble folder is ``output.ensemble`` or ``<output.dir>/ensemble``,
    as ``hpcflow sample`` writes it."""
    prod = [s for s in c.stages if s.command in ("sample", "run")] or list(c.stages)
    out = job_config(c, ch, prod[-1]).get("output", {})
    d = str(out.get("dir", ch.dir))
    return d, str(out.get("ensemble") or os.path.join(d, "ensemble"))


def _measure_output(out_dir: str, ens_dir: str | None = None) -> tuple[int | None, float | None]:
    """(configurations committed, acceptance) of a chain's output directory.

    The HDF5 ensemble (``ens_dir``, default ``<out>/ensemble``) when there is one; otherwise
    the measurement history (one JSON line per measured configuration) and ``summary.json``.
    """
    ens_dir = ens_dir or os.path.join(out_dir, "ensemble")
    if os.path.isdir(ens_dir):
        try:
            from hpcflow.io import open_ensemble

            ens = open_ensemble(ens_dir)
            rec = ens.records()
            n = ens.n_committed()
            acc = float(rec["accepted"].mean()) if n else None
            return n, acc
        except Exception as e:  # noqa: BLE001 - status must never fail on one unreadable chain
            print(f"hpcflow campaign: {ens_dir}: {e}; using history.jsonl", file=sys.stderr)
    n, accs = None, []
    try:
        with open(os.path.join(out_dir, "history.jsonl"), encoding="utf-8") as fh:
            n = 0
            for line in fh:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill is not a committed measurement
                n += 1
                if isinstance(rec.get("accepted"), (int, float)):
                    accs.append(float(rec["accepted"]))
    except OSError:
        pass
    acc = sum(accs) / len(accs) if accs else None
    summ = _read_json(os.path.join(out_dir, "summary.json"))
    if summ and acc is None:
        if isinstance(summ.get("acceptance"), (int, float)):
            acc = float(summ["acceptance"])
        elif isinstance(summ.get("observables", {}).get("accepted"), dict):
            acc = summ["observables"]["accepted"].get("mean")
    return n, acc


def campaign_status(c: Campaign, run: Runner = subprocess.run) -> list[dict[str, Any]]:
    """One row per chain: scan point, seed, per-stage job id and state, configurations, acceptance.

    A stage's state is the scheduler's (squeue) while Slurm knows the job, else the job's own
    status file (``done``, ``failed``, ...), else ``not submitted``.
    """
    state = _load_state(c)
    jobs = state["jobs"]
    queue = _queue_states([str(j["job_id"]) for j in jobs.values() if j.get("job_id")], run)
    rows = []
    for ch in expand_chains(c):
        row: dict[str, Any] = {"chain": ch.id, "point": dict(ch.point), "seed": ch.seed, "stages": {}}
        for st in c.stages:
            rec = jobs.get(f"{ch.id}/{st.name}", {})
            jid = str(rec.get("job_id", "")) or None
            mark = _read_json(_paths(c, ch, st)["status"]) or {}
            if mark and str(mark.get("job_id")) != jid:
                mark = {}  # status of an older job of this stage
            q = queue.get(jid or "")
            if mark.get("state") == "done":
                s = "done"
            elif q in _ACTIVE:
                s = q.lower()
            elif mark.get("state"):
                s = mark["state"] + (f" ({mark.get('exit_code')})" if mark.get("state") == "failed" else "")
            elif q:
                s = q.lower()
            else:
                s = "not submitted" if jid is None else "lost"
            row["stages"][st.name] = {"job_id": jid, "state": s, "restarts": mark.get("restarts", 0)}
        row["configs"], row["acceptance"] = _measure_output(*_chain_output(c, ch))
        rows.append(row)
    return rows


def format_status(c: Campaign, rows: list[dict[str, Any]]) -> str:
    """A table: one line per chain, one column per stage (job id and state)."""
    heads = ["chain", "seed"] + [s.name for s in c.stages] + ["configs", "acceptance"]
    table = []
    for r in rows:
        cells = [r["chain"], str(r["seed"])]
        for s in c.stages:
            d = r["stages"][s.name]
            cells.append(f"{d['job_id'] or '-'} {d['state']}")
        cells.append("-" if r["configs"] is None else str(r["configs"]))
        cells.append("-" if r["acceptance"] is None else f"{r['acceptance']:.3f}")
        table.append(cells)
    w = [max(len(h), *(len(t[i]) for t in table)) if table else len(h) for i, h in enumerate(heads)]
    fmt = "  ".join(f"{{:<{x}}}" for x in w)
    n_done = sum(all(r["stages"][s.name]["state"] == "done" for s in c.stages) for r in rows)
    return "\n".join([f"campaign {c.name}: {n_done}/{len(rows)} chains finished", fmt.format(*heads)]
                     + [fmt.format(*t) for t in table])


# ---- command line -------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """``hpcflow campaign [submit] CAMPAIGN.yaml [--dry-run]`` / ``hpcflow campaign status CAMPAIGN.yaml``.

    Exit status: 0 success, 2 bad input (campaign file) or a failed submission.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="hpcflow campaign",
                                description="expand a campaign into Slurm jobs, submit, resubmit, status")
    p.add_argument("action", nargs="?", choices=("submit", "status"), default="submit",
                   help="submit (default; resubmits unfinished chains) or status")
    p.add_argument("campaign", help="campaign YAML file")
    p.add_argument("--dry-run", action="store_true", help="print the batch scripts, submit nothing")
    p.add_argument("--json", action="store_true", help="status as JSON")
    pos = [a for a in args if not a.startswith("-")]
    if pos and pos[0] not in ("submit", "status"):
        args = ["submit", *args]  # 'hpcflow campaign FILE' means submit
    ns = p.parse_args(args)
    try:
        c = load_campaign(ns.campaign)
        if ns.action == "status":
            rows = campaign_status(c)
            print(json.dumps(rows, indent=2) if ns.json else format_status(c, rows))
            return 0
        submit(c, dry_run=ns.dry_run)
        return 0
    except CampaignError as e:
        print(f"hpcflow campaign: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
