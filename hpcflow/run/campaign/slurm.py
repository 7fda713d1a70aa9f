"""Slurm: the batch script of each stage (a job array over the chains), submission with
``afterok`` dependencies, and the campaign's book-keeping under ``dir``.

``hpcflow campaign CAMPAIGN.yaml`` writes one batch script per stage that calls only the
``hpcflow`` CLI and submits it as a job array over the chains (chain ``i`` = index ``i``) with
``sbatch --array=... --dependency=afterok:<upstream array>``, so sampling starts only after the
training succeeded; scheduler state comes from ``sacct``, else ``squeue``. Running it again
resubmits exactly the unfinished work: stages that finished are skipped, jobs still queued or running are kept,
anything else (failed, cancelled, lost) is submitted again, with ``--resume`` so it continues
from its checkpoints.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

import yaml

from .spec import Campaign, CampaignError, Chain, Stage, _text, check_job_values, expand_chains, job_config

__all__ = [
    "ACTIVE_STATES",
    "Runner",
    "job_paths",
    "load_state",
    "queue_states",
    "read_json",
    "render_script",
    "submit",
]

# squeue states of a job that will still run (or is running): keep it, do not resubmit
ACTIVE_STATES = frozenset({"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD",
                           "REQUEUE_FED", "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING"})

Runner = Callable[..., subprocess.CompletedProcess]


# ---- scripts ------------------------------------------------------------------------------
def job_paths(c: Campaign, ch: Chain, st: Stage) -> dict[str, str]:
    """Files of one (chain, stage) job under the campaign directory: config, status (per chain),
    script (one per stage: the job array of all its chains) and log (Slurm pattern: ``%A`` the
    array's job id, ``%a`` the chain's array index)."""
    tag = f"{ch.id}.{st.name}"
    return {"config": os.path.join(c.dir, "configs", f"{tag}.yaml"),
            "script": os.path.join(c.dir, "scripts", f"{st.name}.sbatch"),
            "status": os.path.join(c.dir, "status", f"{tag}.json"),
            "log": os.path.join(c.dir, "logs", f"{st.name}.%A_%a.out")}


def _sbatch_word(s: str) -> str:
    """``s`` as one argument of an ``#SBATCH`` line: sbatch splits those lines at whitespace,
    groups quoted text, drops a backslash before any character and ends the line at an unquoted
    ``#`` (Slurm's ``get_argument``); inside double quotes only ``"`` and ``\\`` need escaping."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _output_pattern(path: str) -> str:
    """A literal path as a Slurm ``--output`` pattern (Slurm expands ``%`` sequences: ``%%`` is ``%``)."""
    return path.replace("%", "%%")


#: ``hpcflow train`` resumes from this file under its ``output.dir`` (hpcflow.run.outdir.MODEL);
#: ``train --resume`` without it is an error, so a rerun adds ``--resume`` only when it exists
TRAIN_CHECKPOINT = os.path.join("train", "checkpoint.pt")


def _train_checkpoint(c: Campaign, ch: Chain, st: Stage) -> str:
    """The training checkpoint a rerun of a ``train`` stage resumes from (under its output.dir)."""
    out = job_config(c, ch, st).get("output", {}).get("dir", ch.dir)
    out = _text(c.source, f"stages.{st.name}.set.output.dir", out, "the stage's output directory")
    return os.path.join(out, TRAIN_CHECKPOINT)


def _rerun_flags(st: Stage) -> str:
    """The shell lines that set ``resume`` (the flags of a rerun) in the batch script.

    ``stage.resume`` true: a rerun continues. ``run --resume`` (continues from the checkpoint,
    or starts when the first attempt left none); ``train --resume`` when a training checkpoint
    exists, else a plain start; ``sample`` continues from its chain checkpoints by itself
    (``sample --resume`` would require one). ``stage.resume`` false: a rerun starts the stage
    afresh with ``--fresh``, which moves the earlier attempt's results aside (``previous-<time>/``).
    """
    if not st.resume:
        return ("# stage.resume is false: a rerun starts the stage afresh (--fresh moves the earlier\n"
                "# attempt's results aside)\n"
                'if [ "$rerun" = 1 ]; then resume=(--fresh); fi')
    if st.command == "sample":
        return "# hpcflow sample continues from its chain checkpoints by itself (no flag needed)"
    if st.command == "train":
        return ("# continue the training from its checkpoint, if the first attempt wrote one\n"
                'if [ "$rerun" = 1 ] && [ -e "$model" ]; then resume=(--resume); fi')
    return 'if [ "$rerun" = 1 ]; then resume=(--resume); fi'


def render_script(c: Campaign, st: Stage, chains: Sequence[Chain] | None = None) -> str:
    """The Slurm batch script of one stage: a job array over ``chains`` (default: all chains of
    the campaign, :func:`expand_chains`), array index ``i`` running chain ``chains[i]``.

    The script maps ``SLURM_ARRAY_TASK_ID`` to the chain's config, status file and (train)
    checkpoint through a ``case`` of literal, ``shlex.quote``d paths; an index it does not know
    exits 2. CPUs: ``srun --cpus-per-task`` (and ``SRUN_CPUS_PER_TASK``: srun no longer inherits
    sbatch's value since Slurm 22.05) with ``--cpu-bind=cores``; ``OMP_NUM_THREADS`` is the
    allocation's CPUs per task, threads pinned to cores (``OMP_PLACES=cores``,
    ``OMP_PROC_BIND=close``).

    Time limits: ``--signal=TERM@N`` makes Slurm send SIGTERM to the hpcflow ranks N seconds
    before the limit; hpcflow checkpoints and exits 3 (resumable), and the script requeues its
    own array task (``scontrol requeue <array id>_<index>``; same ids, so ``afterok``
    dependants keep waiting). A rerun (``SLURM_RESTART_COUNT > 0``, or an earlier attempt left
    a status file) continues or starts afresh as :func:`_rerun_flags` says.

    Every value is checked again here (:func:`check_job_values`); names and Slurm values are of
    closed grammars, paths are quoted for sbatch in ``#SBATCH`` lines and with ``shlex.quote``
    in commands, and the campaign file name appears only JSON-escaped in a comment.
    """
    chains = list(expand_chains(c) if chains is None else chains)
    if not chains:
        raise CampaignError(f"{c.source}: stage {st.name}: no chains")
    for ch in chains:
        check_job_values(c, ch, st)
    r = st.resources
    q = shlex.quote
    p0 = job_paths(c, chains[0], st)
    log_dir, log_name = os.path.split(p0["log"])
    # '%A' and '%a' are Slurm's (array job id, array index): only the directory is escaped
    lines = ["#!/bin/bash",
             f"#SBATCH --job-name={c.name}.{st.name}",
             f"#SBATCH --output={_sbatch_word(_output_pattern(log_dir) + '/' + log_name)}",
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
    mpi = "" if c.mpi == "none" else f" --mpi={q(c.mpi)}"
    launch = f'srun --cpus-per-task="$cpt" --cpu-bind=cores{mpi}'
    device = " --set device=cuda" if r.gpus_per_task else ""
    table = []
    for i, ch in enumerate(chains):
        p = job_paths(c, ch, st)
        model = f" model={q(_train_checkpoint(c, ch, st))}" if st.command == "train" else ""
        table.append(f"  {i}) chain={q(ch.id)} config={q(p['config'])} status={q(p['status'])}{model} ;;")
    body = f"""
# Generated by 'hpcflow campaign' from {json.dumps(c.source)}: campaign {c.name}, stage {st.name}.
# A job array: index i runs chain i of the table below. Calls only the hpcflow CLI. Exit status
# of hpcflow: 0 done, 2 bad input, 3 stopped by a signal with a checkpoint written (resumable)
# -> requeue this array task; anything else fails it (4: the file system).
set -uo pipefail
case "${{SLURM_ARRAY_TASK_ID:-}}" in
{chr(10).join(table)}
  *) printf 'no chain with array index %q in this campaign stage\\n' "${{SLURM_ARRAY_TASK_ID:-}}" >&2; exit 2 ;;
esac
task="${{SLURM_ARRAY_JOB_ID:-${{SLURM_JOB_ID:-}}}}_${{SLURM_ARRAY_TASK_ID}}"
# CPUs: srun does not inherit --cpus-per-task from sbatch (Slurm >= 22.05): pass it, bind each
# task to its cores, one OpenMP thread per CPU of the task
cpt="${{SLURM_CPUS_PER_TASK:-{r.cpus_per_task}}}"
case "$cpt" in ''|*[!0-9]*) cpt={r.cpus_per_task} ;; esac
export SRUN_CPUS_PER_TASK="$cpt" OMP_NUM_THREADS="$cpt" OMP_PLACES=cores OMP_PROC_BIND=close
mkdir -p "$(dirname "$status")"
mark() {{
  printf '{{"state": "%s", "exit_code": %s, "job_id": "%s", "chain": "%s", "restarts": %s, "time": %s}}\\n' \\
    "$1" "$2" "$task" "$chain" "${{SLURM_RESTART_COUNT:-0}}" "$(date +%s)" >"$status.tmp" \\
    && mv -f "$status.tmp" "$status"
}}
# a rerun (requeued: SLURM_RESTART_COUNT > 0; resubmitted: an earlier attempt left a status file)
rerun=0
if [ "${{SLURM_RESTART_COUNT:-0}}" -gt 0 ] || [ -e "$status" ]; then rerun=1; fi
resume=()
{_rerun_flags(st)}
mark running null
{launch} {q(c.hpcflow)} {q(st.command)} "$config"{device} "${{resume[@]}}"
rc=$?
case $rc in
  0) mark done 0; exit 0 ;;
  3) mark requeued 3
     # this array task only, same ids: jobs depending on the array (afterok) keep waiting
     scontrol requeue "$task" && exit 0
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


def load_state(c: Campaign) -> dict[str, Any]:
    """``campaign_state.json``: the job ids submitted per chain/stage (empty before the first submission)."""
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


def read_json(path: str) -> dict[str, Any] | None:
    """A JSON file written by a job (status, summary), or None when it is missing or cut."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError):
        return None


_ARRAY_RE = re.compile(r"\A(?P<job>[0-9]+)_\[(?P<spec>[0-9,\-]+)(%[0-9]+)?\]\Z")


def _expand_ids(jid: str) -> list[str]:
    """``123_[0-3,7%2]`` (a pending array's tasks, as sacct and squeue write them) ->
    ``123_0 ... 123_3, 123_7``; any other id as it is."""
    m = _ARRAY_RE.match(jid)
    if m is None:
        return [jid]
    out = []
    for part in m.group("spec").split(","):
        lo, _, hi = part.partition("-")
        if lo.isdigit() and (not hi or hi.isdigit()):
            out += [f"{m.group('job')}_{i}" for i in range(int(lo), int(hi or lo) + 1)]
    return out


def parse_sacct(text: str) -> dict[str, str]:
    """``sacct --parsable2 --noheader --allocations --format=JobID,State,ExitCode`` -> job id ->
    state (``CANCELLED by 0`` -> ``CANCELLED``); array tasks are ``<array id>_<index>``, a
    pending array's compressed ``123_[0-3]`` is expanded. Steps (``123.batch``) are skipped."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split("|")
        if len(parts) < 2 or not parts[0] or "." in parts[0] or not parts[1].strip():
            continue
        for j in _expand_ids(parts[0].strip()):
            out[j] = parts[1].split()[0]
    return out


def parse_squeue(text: str) -> dict[str, str]:
    """``squeue -h -r -t all -o '%i %T'`` -> job id -> state (compressed array ids expanded)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            for j in _expand_ids(parts[0]):
                out[j] = parts[1]
    return out


def queue_states(ids: Sequence[str], run: Runner) -> dict[str, str]:
    """Scheduler state of the given jobs and array tasks (``123`` or ``123_4``; an array's
    tasks are asked for by its job id): ``sacct`` (the accounting database: finished jobs too,
    whatever MinJobAge), else ``squeue`` when sacct is missing or accounting is off (it fails:
    "Slurm accounting storage is disabled"); a job neither knows is absent."""
    jobs = sorted({str(i).split("_")[0] for i in ids if i})
    if not jobs:
        return {}
    try:
        r = run(["sacct", "--noheader", "--parsable2", "--allocations", "-j", ",".join(jobs),
                 "--format=JobID,State,ExitCode"], capture_output=True, text=True)
        if r.returncode == 0:
            return parse_sacct(r.stdout)
    except FileNotFoundError:
        pass
    try:
        r = run(["squeue", "-h", "-r", "-t", "all", "-j", ",".join(jobs), "-o", "%i %T"],
                capture_output=True, text=True)
    except FileNotFoundError:
        return {}
    return parse_squeue(r.stdout)


#: Variables that describe a running MPI job or an MPI singleton (Open MPI's singleton init
#: setenv()s them into the submitting process, and sbatch --export=ALL would carry them into the
#: job, where concurrent ``srun --mpi=pmix`` jobs then share one shared-memory namespace).
_LAUNCHER_PREFIXES = ("PMIX_", "PMI_", "ORTE_", "OMPI_COMM_WORLD_", "OMPI_MCA_ess", "OMPI_MCA_orte_",
                      "OMPI_MCA_pmix", "OMPI_APP_CTX_", "OMPI_NUM_APP_CTX", "OMPI_FIRST_RANKS",
                      "OMPI_UNIVERSE_SIZE", "OMPI_ARGV", "OMPI_COMMAND", "OMPI_FILE_LOCATION",
                      "OMPI_MCA_initial_wdir")


def job_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a submitted job inherits: the user's (``os.environ``, the process's
    environment at start-up), less any MPI launcher or singleton state. User tuning such as
    ``OMPI_MCA_btl`` is kept."""
    env = dict(os.environ if environ is None else environ)
    return {k: v for k, v in env.items() if not k.startswith(_LAUNCHER_PREFIXES)}


def array_spec(indices: Sequence[int], limit: int = 0) -> str:
    """``--array`` value of the given indices: ranges compressed (``0-3,7``), ``%limit`` when > 0."""
    idx = sorted(set(indices))
    parts: list[str] = []
    i = 0
    while i < len(idx):
        j = i
        while j + 1 < len(idx) and idx[j + 1] == idx[j] + 1:
            j += 1
        parts.append(str(idx[i]) if i == j else f"{idx[i]}-{idx[j]}")
        i = j + 1
    return ",".join(parts) + (f"%{limit}" if limit else "")


def _sbatch(script: str, deps: Sequence[str], run: Runner, array: str | None = None) -> str:
    cmd = ["sbatch", "--parsable"]
    if array is not None:
        if not re.fullmatch(r"[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*(%[0-9]+)?", array):
            raise CampaignError(f"sbatch {script}: bad array specification {array!r}")
        cmd.append(f"--array={array}")
    if deps:
        if not all(d.isdigit() for d in deps):
            raise CampaignError(f"sbatch {script}: bad dependency job ids {list(deps)!r}")
        cmd.append("--dependency=afterok:" + ":".join(deps))
    cmd.append(script)
    try:
        r = run(cmd, capture_output=True, text=True, env=job_environment())
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
    """Submit every unfinished (chain, stage) in dependency order, one job array per stage;
    returns the campaign state.

    Chain ``i`` of :func:`expand_chains` is array index ``i`` of every stage. Per chain, a stage
    is skipped when its status file says ``done``; kept when its array task is still queued or
    running and nothing upstream of that chain was resubmitted; otherwise (never submitted,
    failed, cancelled, lost, or upstream resubmitted: a pending task is cancelled) the chain
    goes into the stage's new array (``--array=<indices>[%slurm.array_limit]``), which depends
    (``afterok``: every task of the array completed with exit 0) on the arrays of the upstream
    stages that still hold unfinished tasks of these chains. ``dry_run`` prints the scripts
    and submits nothing.
    """
    chains = expand_chains(c)
    state: dict[str, Any] = load_state(c) if not dry_run else {"campaign": c.name, "jobs": {}}
    jobs = state["jobs"]
    known = [str(j["job_id"]) for j in jobs.values() if j.get("job_id")]
    queue = {} if dry_run else queue_states(known, run)
    # (chain index, stage) -> array job id that will run it (unfinished only); chains resubmitted
    current: dict[tuple[int, str], str] = {}
    fresh: set[tuple[int, str]] = set()
    n_new = 0
    for st in c.stages:
        todo: list[int] = []
        for i, ch in enumerate(chains):
            key = f"{ch.id}/{st.name}"
            rec = jobs.get(key, {})
            mark = read_json(job_paths(c, ch, st)["status"]) or {}
            if not dry_run and mark.get("state") == "done":
                continue
            jid = str(rec.get("job_id", ""))
            upstream_new = any((i, a) in fresh for a in st.after)
            if jid and queue.get(jid) in ACTIVE_STATES and not upstream_new:
                current[(i, st.name)] = jid.split("_")[0]
                continue
            if jid and queue.get(jid) in ACTIVE_STATES:
                # it waits on a job that failed: replace it with one depending on the new upstream
                run(["scancel", jid], capture_output=True, text=True)
            todo.append(i)
        if not todo:
            continue
        deps = sorted({current[(i, a)] for i in todo for a in st.after if (i, a) in current}, key=int)
        for i in todo:
            job_config(c, chains[i], st, validate=True)
        script = render_script(c, st, chains)
        spec = array_spec(todo, c.array_limit)
        p = job_paths(c, chains[todo[0]], st)
        if dry_run:
            out(f"# ---- {p['script']} --array={spec} (after: {', '.join(st.after) or '-'})")
            out(script)
            for i in todo:
                current[(i, st.name)] = "0"
                fresh.add((i, st.name))
            continue
        if max(todo) >= c.max_array_size:
            raise CampaignError(f"{c.source}: stage {st.name}: array index {max(todo)} >= MaxArraySize "
                                f"{c.max_array_size}; use fewer chains per campaign")
        for i in todo:
            ch = chains[i]
            _atomic_write(job_paths(c, ch, st)["config"], f"# hpcflow config of campaign {c.name}, chain "
                          f"{ch.id}, stage {st.name}\n" + yaml.safe_dump(job_config(c, ch, st), sort_keys=False))
        _atomic_write(p["script"], script)
        os.makedirs(os.path.join(c.dir, "logs"), exist_ok=True)
        new = _sbatch(p["script"], deps, run, array=spec)
        for i in todo:
            ch = chains[i]
            key = f"{ch.id}/{st.name}"
            rec = jobs.get(key, {})
            tid = f"{new}_{i}"
            jobs[key] = {"job_id": tid, "array_job_id": new, "array_index": i, "submitted": time.time(),
                         "chain": ch.id, "stage": st.name, "history": list(rec.get("history", [])) + [tid]}
            current[(i, st.name)] = new
            fresh.add((i, st.name))
        n_new += 1
        # record each submission at once: a crash mid-campaign leaves no untracked job
        _atomic_write(_state_path(c), json.dumps(state, indent=2) + "\n")
    if not dry_run:
        _atomic_write(_state_path(c), json.dumps(state, indent=2) + "\n")
        n_tasks = sum(1 for (_, s) in fresh)
        out(f"campaign {c.name}: {n_new} job array(s) submitted ({n_tasks} task(s)), {len(chains)} chain(s) x "
            f"{len(c.stages)} stage(s)")
    return state
