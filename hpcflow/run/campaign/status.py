"""Campaign state: one row per chain with each stage's job id and state, and the chain's
committed configurations and acceptance read from its output; ``format_status`` makes the
table ``hpcflow campaign status`` prints.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from .slurm import ACTIVE_STATES, Runner, job_paths, load_state, queue_states, read_json
from .spec import Campaign, Chain, expand_chains, job_config

__all__ = ["campaign_status", "format_status"]


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
            return _ensemble_counts(ens_dir)
        except Exception as e:  # noqa: BLE001 - status must never fail on one unreadable chain
            print(f"hpcflow campaign: {ens_dir}: {e}; using history.jsonl", file=sys.stderr)
    return _history_counts(out_dir)


def _ensemble_counts(ens_dir: str) -> tuple[int, float | None]:
    """(committed configurations, acceptance) of an HDF5 ensemble."""
    from hpcflow.io import open_ensemble

    # rows only (digests and row checksums): a status table must not read every configuration
    ens = open_ensemble(ens_dir, verify="rows")
    rec = ens.records()
    n = ens.n_committed()
    return n, (float(rec["accepted"].mean()) if n else None)


def _history_counts(out_dir: str) -> tuple[int | None, float | None]:
    """(measured configurations, acceptance) from ``history.jsonl``, acceptance else from ``summary.json``."""
    n: int | None = None
    accs: list[float] = []
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
    summ = read_json(os.path.join(out_dir, "summary.json"))
    if summ and acc is None:
        if isinstance(summ.get("acceptance"), (int, float)):
            acc = float(summ["acceptance"])
        elif isinstance(summ.get("observables", {}).get("accepted"), dict):
            acc = summ["observables"]["accepted"].get("mean")
    return n, acc


def campaign_status(c: Campaign, run: Runner = subprocess.run) -> list[dict[str, Any]]:
    """One row per chain: scan point, seed, per-stage job id and state, configurations, acceptance.

    A stage's state is the scheduler's (sacct, else squeue: :func:`queue_states`) while Slurm knows
    the array task, else the job's own
    status file (``done``, ``failed``, ...), else ``not submitted``.
    """
    state = load_state(c)
    jobs = state["jobs"]
    queue = queue_states([str(j["job_id"]) for j in jobs.values() if j.get("job_id")], run)
    rows = []
    for ch in expand_chains(c):
        row: dict[str, Any] = {"chain": ch.id, "point": dict(ch.point), "seed": ch.seed, "stages": {}}
        for st in c.stages:
            rec = jobs.get(f"{ch.id}/{st.name}", {})
            jid = str(rec.get("job_id", "")) or None
            mark = read_json(job_paths(c, ch, st)["status"]) or {}
            if mark and str(mark.get("job_id")) != jid:
                mark = {}  # status of an older job of this stage
            q = queue.get(jid or "")
            if mark.get("state") == "done":
                s = "done"
            elif q in ACTIVE_STATES:
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
