"""CPU binding inside real Slurm jobs: each task gets the CPUs it asked for.

A second private cluster (scripts/slurm_test_cluster.sh) with ``TaskPlugin=task/affinity``
(slurmd binds every task with sched_setaffinity; no cgroups needed) and the machine's real CPU
count (affinity masks of CPUs the machine lacks cannot be applied). The job templates
(``jobs/slurm_single_node.sh``, ``jobs/slurm_multi_node.sh``) and a campaign's job arrays run
with a stub ``hpcflow`` that records, per task, ``os.sched_getaffinity(0)`` and the OpenMP
variables. Designed for 2 CPUs (the smallest machine the tests run on): 2 tasks x 1 CPU and
1 task x 2 CPUs. Since Slurm 22.05 srun does not inherit ``--cpus-per-task`` from sbatch, so
without the templates' ``srun --cpus-per-task`` a 2-CPU task would get one CPU when the step
has more than one task.

Waits are for scheduler states (squeue: every job COMPLETED), never a clock window; the
safety net only turns a hang into a failure. If the daemons cannot start the fixture fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from hpcflow.run import campaign as cp

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "scripts" / "slurm_test_cluster.sh"
SAFETY_NET_S = 900
TERMINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
                      "DEADLINE", "OUT_OF_MEMORY", "SPECIAL_EXIT"})
NCPU = os.cpu_count() or 1

#: the stub hpcflow: one JSON line per task (rank, affinity, OpenMP variables) into $PROBE_DIR
PROBE = """#!{python}
import json, os, sys
d = os.environ["PROBE_DIR"]
tag = os.path.basename(sys.argv[2]) if len(sys.argv) > 2 else "job"
rec = {{"args": sys.argv[1:], "rank": os.environ.get("SLURM_PROCID"), "job": os.environ.get("SLURM_JOB_ID"),
       "task": os.environ.get("SLURM_ARRAY_TASK_ID"), "cpus": sorted(os.sched_getaffinity(0)),
       "omp": [os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_PLACES", "OMP_PROC_BIND")]}}
with open(os.path.join(d, f"{{tag}}.{{rec['job']}}.{{rec['rank']}}.json"), "w") as fh:
    json.dump(rec, fh)
"""


@pytest.fixture(scope="module")
def bound(tmp_path_factory: pytest.TempPathFactory):
    """A private Slurm with task/affinity and the real CPU count; SLURM_CONF set while it lives."""
    if NCPU < 2:
        pytest.fail("the binding test needs at least 2 CPUs")
    d = tmp_path_factory.mktemp("slurm_affinity")
    env = {**os.environ, "SLURM_TEST_TASK_PLUGIN": "task/affinity", "SLURM_TEST_CPUS": str(NCPU)}
    r = subprocess.run(["bash", str(CLUSTER), "start", str(d)], check=False, capture_output=True, text=True,
                       timeout=900, env=env)
    if r.returncode != 0:
        subprocess.run(["bash", str(CLUSTER), "stop", str(d)], check=False, capture_output=True, timeout=120)
        pytest.fail(f"the Slurm test cluster did not start (rc {r.returncode}): {r.stderr.strip()[-2000:]}")
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(d / "slurm.conf")
    try:
        yield d
    finally:
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        subprocess.run(["bash", str(CLUSTER), "stop", str(d)], check=False, capture_output=True, timeout=120)


def _probe(tmp: Path) -> tuple[Path, Path]:
    """(directory with the stub hpcflow, directory its records go to)."""
    bin_dir, out = tmp / "bin", tmp / "probe"
    bin_dir.mkdir()
    out.mkdir()
    (bin_dir / "hpcflow").write_text(PROBE.format(python=sys.executable))
    (bin_dir / "hpcflow").chmod(0o755)
    return bin_dir, out


def _states(ids) -> dict[str, str]:
    r = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-j", ",".join(sorted({str(i).split("_")[0] for i in ids})),
                        "-o", "%i %T"], check=False, capture_output=True, text=True)
    return dict(line.split(None, 1) for line in r.stdout.splitlines() if len(line.split()) == 2)


def _wait_completed(ids, d: Path, n_tasks: int) -> None:
    """Until every task of ``ids`` (job ids or array ids) is COMPLETED; fail at once on another end."""
    deadline = time.monotonic() + SAFETY_NET_S
    while True:
        st = _states(ids)
        bad = {j: s for j, s in st.items() if s in TERMINAL and s != "COMPLETED"}
        if bad:
            pytest.fail(f"jobs ended {bad}\nslurmd: {(d / 'log' / 'slurmd.log').read_text()[-1500:]}")
        if len(st) >= n_tasks and all(s == "COMPLETED" for s in st.values()):
            return
        if time.monotonic() > deadline:
            pytest.fail(f"safety net: {SAFETY_NET_S} s and jobs {st} not all COMPLETED")
        time.sleep(0.2)


def _records(out: Path) -> list[dict]:
    return [json.loads(f.read_text()) for f in sorted(out.glob("*.json"))]


def _check_binding(recs: list[dict], ntasks: int, cpt: int) -> None:
    """``ntasks`` records, each with exactly ``cpt`` CPUs, disjoint, OpenMP threads = CPUs, pinned to cores."""
    assert len(recs) == ntasks, recs
    assert sorted(int(r["rank"]) for r in recs) == list(range(ntasks)), recs
    for r in recs:
        assert len(r["cpus"]) == cpt, r
        assert r["omp"] == [str(cpt), "cores", "close"], r
    seen = [c for r in recs for c in r["cpus"]]
    assert len(seen) == len(set(seen)), recs  # no two tasks share a CPU


@pytest.mark.parametrize("template", ["slurm_single_node.sh", "slurm_multi_node.sh"])
@pytest.mark.parametrize(("ntasks", "cpt"), [(2, 1), (1, 2)], ids=["2x1", "1x2"])
def test_template_tasks_get_their_cpus(bound: Path, tmp_path: Path, template: str, ntasks: int, cpt: int) -> None:
    """The job template, run by the real sbatch/srun with the allocation overridden on the sbatch
    command line (which wins over '#SBATCH'): each task is bound to cpus-per-task CPUs of its own."""
    bin_dir, out = _probe(tmp_path)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PROBE_DIR": str(out)}
    r = subprocess.run(["sbatch", "--parsable", "--nodes=1", f"--ntasks-per-node={ntasks}", f"--cpus-per-task={cpt}",
                        "--time=10", f"--output={tmp_path}/job.%j.out", str(ROOT / "jobs" / template),
                        str(tmp_path / "run.yaml"), "run"], check=False, capture_output=True, text=True, env=env,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    jid = r.stdout.strip().split(";")[0]
    _wait_completed([jid], bound, 1)
    log = (tmp_path / f"job.{jid}.out").read_text()
    _check_binding(_records(out), ntasks, cpt)
    assert "lacks support for cpu binding" not in log, log


def test_campaign_arrays_bind_cpus(bound: Path, tmp_path: Path) -> None:
    """A campaign's job arrays (2 chains; stage a: 2 tasks x 1 CPU, stage b after a: 1 task x 2
    CPUs): every array task binds its tasks to their CPUs, and b's array starts after a's."""
    bin_dir, out = _probe(tmp_path)
    raw = {"name": "bind", "seed": 1, "dir": "camp", "beta": [1.0], "chains": 2, "hpcflow": str(bin_dir / "hpcflow"),
           "config": {"lattice.shape": [4, 4], "group": "u1", "algorithm": "hmc", "run": {"n_steps": 2}},
           "slurm": {"mpi": "none", "time": "10"},
           "stages": {"a": {"command": "run", "resources": {"ntasks_per_node": 2, "cpus_per_task": 1}},
                      "b": {"command": "run", "after": ["a"], "resources": {"ntasks_per_node": 1, "cpus_per_task": 2}}}}
    path = tmp_path / "campaign.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    c = cp.load_campaign(path)
    os.environ["PROBE_DIR"] = str(out)
    try:
        state = cp.submit(c, out=lambda s: None)
    finally:
        os.environ.pop("PROBE_DIR", None)
    ids = [j["job_id"] for j in state["jobs"].values()]
    assert len({i.split("_")[0] for i in ids}) == 2  # one array per stage
    _wait_completed(ids, bound, 4)
    recs = _records(out)
    for ch in cp.expand_chains(c):
        _check_binding([r for r in recs if r["args"][1].endswith(f"{ch.id}.a.yaml")], 2, 1)
        _check_binding([r for r in recs if r["args"][1].endswith(f"{ch.id}.b.yaml")], 1, 2)
        for st in ("a", "b"):
            assert json.loads((Path(c.dir) / "status" / f"{ch.id}.{st}.json").read_text())["state"] == "done"
