"""Slurm: the batch script of each (chain, stage) job, submission with ``afterok`` dependencies,
and the campaign's book-keeping under ``dir``.

``hpcflow campaign CAMPAIGN.yaml`` writes one batch script per (chain, stage) that calls only
the ``hpcflow`` CLI, and submits the scripts with ``sbatch --dependency=afterok:...`` so a
chain's sampling starts only after its training succeeded. Running it again resubmits exactly
the unfinished work: stages that finished are skipped, jobs still queued or running are kept,
anything else (failed, cancelled, lost) is submitted again, with ``--resume`` so it continues
from its checkpoints.
"""

from __future__ import annotations

import json
import os
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
    """Files of one (chain, stage) job under the campaign directory: config, script, status, log."""
    tag = f"{ch.id}.{st.name}"
    return {"config": os.path.join(c.dir, "configs", f"{tag}.yaml"),
            "script": os.path.join(c.dir, "scripts", f"{tag}.sbatch"),
            "status": os.path.join(c.dir, "status", f"{tag}.json"),
            "log": os.path.join(c.dir, "logs", f"{tag}.%j.out")}


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


def _rerun_flags(c: Campaign, ch: Chain, st: Stage) -> str:
    """The shell lines that set ``resume`` (the flags of a rerun) in the batch script.

    ``stage.resume`` true: a rerun continues. ``run --resume`` (continues from the checkpoint,
    or starts when the first attempt left none); ``train --resume`` when a training checkpoint
    exists, else a plain start; ``sample`` continues from its chain checkpoints by itself
    (``sample --resume`` would require one). ``stage.resume`` false: a rerun starts the stage
    afresh with ``--fresh``, which moves the earlier attempt's results aside (``previous-<time>/``).
    """
    q = shlex.quote
    if not st.resume:
        return ("# stage.resume is false: a rerun starts the stage afresh (--fresh moves the earlier\n"
                "# attempt's results aside)\n"
                'if [ "$rerun" = 1 ]; then resume=(--fresh); fi')
    if st.command == "sample":
        return "# hpcflow sample continues from its chain checkpoints by itself (no flag needed)"
    if st.command == "train":
        out = job_config(c, ch, st).get("output", {}).get("dir", ch.dir)
        out = _text(c.source, f"stages.{st.name}.set.output.dir", out, "the stage's output directory")
        model = q(os.path.join(out, TRAIN_CHECKPOINT))
        return ("# continue the training from its checkpoint, if the first attempt wrote one\n"
                f'if [ "$rerun" = 1 ] && [ -e {model} ]; then resume=(--resume); fi')
    return 'if [ "$rerun" = 1 ]; then resume=(--resume); fi'


def render_script(c: Campaign, ch: Chain, st: Stage) -> str:
    """The Slurm batch script of one (chain, stage) job.

    Time limits: ``--signal=TERM@N`` makes Slurm send SIGTERM to the hpcflow ranks N seconds
    before the limit; hpcflow checkpoints and exits 3 (resumable), and the script requeues the
    job (``scontrol requeue``; same job id, so ``afterok`` dependants keep waiting). A rerun
    (``SLURM_RESTART_COUNT > 0``, or an earlier attempt left a status file) continues or starts
    afresh as :func:`_rerun_flags` says.

    Every value is checked again here (:func:`check_job_values`); names and Slurm values are of
    closed grammars, paths are quoted for sbatch in ``#SBATCH`` lines and with ``shlex.quote``
    in commands, and the campaign file name appears only JSON-escaped in a comment.
    """
    check_job_values(c, ch, st)
    r = st.resources
    p = job_paths(c, ch, st)
    q = shlex.quote
    log_dir, log_name = os.path.split(p["log"])
    lines = ["#!/bin/bash",
             f"#SBATCH --job-name={c.name}.{ch.id}.{st.name}",
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
    launch = "srun" if c.mpi == "none" else f"srun --mpi={q(c.mpi)}"
    device = " --set device=cuda" if r.gpus_per_task else ""
    rerun_flags = _rerun_flags(c, ch, st)
    body = f"""
# Generated by 'hpcflow campaign' from {json.dumps(c.source)}: campaign {c.name}, chain {ch.id}, stage {st.name}.
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
# a rerun (requeued: SLURM_RESTART_COUNT > 0; resubmitted: an earlier attempt left a status file)
rerun=0
if [ "${{SLURM_RESTART_COUNT:-0}}" -gt 0 ] || [ -e "$status" ]; then rerun=1; fi
resume=()
{rerun_flags}
mark running null
{launch} {q(c.hpcflow)} {q(st.command)} {q(p['config'])}{device} "${{resume[@]}}"
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


def queue_states(ids: Sequence[str], run: Runner) -> dict[str, str]:
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


def _sbatch(script: str, deps: Sequence[str], run: Runner) -> str:
    cmd = ["sbatch", "--parsable"]
    if deps:
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
    """Submit every unfinished (chain, stage) job in dependency order; returns the campaign state.

    A stage is skipped when its status file says ``done``; kept when its last job is still
    queued or running and nothing upstream was resubmitted; otherwise (never submitted,
    failed, cancelled, or upstream resubmitted) it is submitted with ``afterok`` on the
    upstream jobs that have not finished. ``dry_run`` prints the scripts and submits nothing.
    """
    chains = expand_chains(c)
    state: dict[str, Any] = load_state(c) if not dry_run else {"campaign": c.name, "jobs": {}}
    jobs = state["jobs"]
    known = [str(j["job_id"]) for j in jobs.values() if j.get("job_id")]
    queue = {} if dry_run else queue_states(known, run)
    n_new = 0
    for ch in chains:
        current: dict[str, str] = {}  # stage -> job id that will run it (unfinished stages only)
        fresh: set[str] = set()
        for st in c.stages:
            key = f"{ch.id}/{st.name}"
            p = job_paths(c, ch, st)
            rec = jobs.get(key, {})
            mark = read_json(p["status"]) or {}
            if not dry_run and mark.get("state") == "done":
                continue
            deps = [current[a] for a in st.after if a in current]
            jid = str(rec.get("job_id", ""))
            upstream_new = any(a in fresh for a in st.after)
            if jid and queue.get(jid) in ACTIVE_STATES and not upstream_new:
                current[st.name] = jid
                continue
            if jid and queue.get(jid) in ACTIVE_STATES:
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
