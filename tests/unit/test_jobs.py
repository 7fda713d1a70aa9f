"""Job templates (jobs/*.sh): what reaches the launcher.

PBS: there is no PBS here. ``jobs/pbs.sh`` runs under bash with a stub ``qsub`` and
``PBS_NODEFILE`` pointing to a temporary node file; the arguments the launcher receives are
recorded by a stub mpirun, and once more the real Open MPI ``mpirun`` (Debian's, built without
PBS/TM support) runs the job from the node file, each rank reporting its CPU binding.
Slurm: the templates' srun lines are checked here as text; the binding itself is checked inside
real Slurm jobs in tests/slurm/test_slurm_binding.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

STUB = """#!/bin/bash
printf '%s\\0' "$@" >> "$STUB_LOG/{name}.args"
printf '\\n' >> "$STUB_LOG/{name}.calls"
{body}
"""


def _stub(d: Path, name: str, body: str) -> None:
    (d / name).write_text(STUB.format(name=name, body=body))
    (d / name).chmod(0o755)


def _argv(log: Path, name: str) -> list[str]:
    return (log / f"{name}.args").read_bytes().decode().split("\0")[:-1]


def _pbs_env(tmp: Path, stubs: Path, log: Path, nodes: str) -> dict[str, str]:
    (tmp / "nodes").write_text(nodes)
    return {"PATH": f"{stubs}:/usr/bin:/bin", "STUB_LOG": str(log), "PBS_O_WORKDIR": str(tmp),
            "PBS_NODEFILE": str(tmp / "nodes"), "CONFIG": "run.yaml", "CMD": "run", "WALLTIME_S": "3600",
            "MARGIN_S": "300"}


def test_pbs_mpirun_gets_the_node_file(tmp_path: Path) -> None:
    """A 2-node job (2 ranks per node in PBS_NODEFILE): mpirun gets --hostfile PBS_NODEFILE, as
    many ranks as the file has lines, core binding and the OpenMP variables; exit 3 resubmits."""
    stubs, log = tmp_path / "stubs", tmp_path / "log"
    stubs.mkdir()
    log.mkdir()
    _stub(stubs, "mpirun", 'while [ "$1" != hpcflow ]; do shift; done\nshift\nexit "${STUB_RC:-0}"')
    _stub(stubs, "qsub", "exit 0")
    env = _pbs_env(tmp_path, stubs, log, "n1\nn1\nn2\nn2\n")
    r = subprocess.run(["bash", str(ROOT / "jobs" / "pbs.sh")], env={**env, "OMP_NUM_THREADS": "2"},
                       cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    argv = _argv(log, "mpirun")
    assert argv[:8] == ["--hostfile", str(tmp_path / "nodes"), "-n", "4", "--map-by", "slot:PE=2",
                        "--bind-to", "core"], argv
    assert argv[argv.index("hpcflow"):] == ["hpcflow", "run", "run.yaml"]
    for v in ("OMP_NUM_THREADS", "OMP_PLACES", "OMP_PROC_BIND"):
        assert argv[argv.index(v) - 1] == "-x"
    # exit 3: resubmitted with RESUME=1
    for f in log.iterdir():
        f.unlink()
    r = subprocess.run(["bash", str(ROOT / "jobs" / "pbs.sh")], env={**env, "STUB_RC": "3"}, cwd=tmp_path,
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    assert _argv(log, "qsub")[1].startswith("CONFIG=run.yaml,CMD=run,RESUME=1,")
    # a TM-aware mpiexec reads the allocation itself: no node file needed
    for f in log.iterdir():
        f.unlink()
    _stub(stubs, "mpiexec", 'while [ "$1" != hpcflow ]; do shift; done\nshift\nexit 0')
    r = subprocess.run(["bash", str(ROOT / "jobs" / "pbs.sh")], cwd=tmp_path, capture_output=True, text=True,
                       env={**env, "HPCFLOW_PBS_LAUNCHER": "mpiexec", "PBS_NODEFILE": ""}, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    assert _argv(log, "mpiexec") == ["hpcflow", "run", "run.yaml"]


@pytest.mark.parametrize(("change", "msg"), [({"PBS_NODEFILE": ""}, "PBS_NODEFILE is not set"),
                                              ({"HPCFLOW_PBS_LAUNCHER": "mpirun;x"}, "HPCFLOW_PBS_LAUNCHER"),
                                              ({"OMP_NUM_THREADS": "$(touch PWNED)"}, "OMP_NUM_THREADS")])
def test_pbs_bad_settings_refused(tmp_path: Path, change: dict, msg: str) -> None:
    stubs, log = tmp_path / "stubs", tmp_path / "log"
    stubs.mkdir()
    log.mkdir()
    _stub(stubs, "mpirun", "exit 0")
    env = {**_pbs_env(tmp_path, stubs, log, "n1\n"), **change}
    r = subprocess.run(["bash", str(ROOT / "jobs" / "pbs.sh")], env=env, cwd=tmp_path, capture_output=True,
                       text=True, timeout=60, check=False)
    assert r.returncode == 2 and msg in r.stderr, r.stderr
    assert not (log / "mpirun.args").exists() and not list(tmp_path.rglob("PWNED*"))


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="no mpirun (Open MPI) on this machine")
def test_pbs_real_mpirun_places_ranks_from_the_node_file(tmp_path: Path) -> None:
    """The real mpirun (Open MPI without TM) starts one rank per node-file line, each bound to
    its own core: 2 lines of this host -> 2 ranks on 2 different CPUs."""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs 2 CPUs")
    stubs, log = tmp_path / "stubs", tmp_path / "log"
    stubs.mkdir()
    log.mkdir()
    probe = stubs / "hpcflow"
    probe.write_text(f"#!{sys.executable}\nimport json, os\n"
                     f"print(json.dumps({{'rank': os.environ.get('OMPI_COMM_WORLD_RANK'), "
                     f"'cpus': sorted(os.sched_getaffinity(0)), 'omp': os.environ.get('OMP_NUM_THREADS')}}))\n")
    probe.chmod(0o755)
    _stub(stubs, "qsub", "exit 0")
    env = {**_pbs_env(tmp_path, stubs, log, "localhost\nlocalhost\n"),
           "PATH": f"{stubs}:{os.path.dirname(shutil.which('mpirun') or '')}:/usr/bin:/bin", "HOME": str(tmp_path)}
    if os.geteuid() == 0:  # Open MPI refuses root without these (containers)
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    r = subprocess.run(["bash", str(ROOT / "jobs" / "pbs.sh")], env=env, cwd=tmp_path, capture_output=True,
                       text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    recs = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert sorted(x["rank"] for x in recs) == ["0", "1"], r.stdout
    assert all(len(x["cpus"]) == 1 and x["omp"] == "1" for x in recs), recs
    assert recs[0]["cpus"] != recs[1]["cpus"], recs


@pytest.mark.parametrize("name", ["slurm_single_node.sh", "slurm_multi_node.sh", "slurm_gpu.sh"])
def test_slurm_templates_pass_cpus_to_srun(tmp_path: Path, name: str) -> None:
    """srun gets --cpus-per-task (srun does not inherit it since Slurm 22.05) and --cpu-bind=cores;
    OMP_NUM_THREADS/OMP_PLACES/OMP_PROC_BIND come from the allocation; account, partition and
    qos placeholders are there (commented out)."""
    text = (ROOT / "jobs" / name).read_text()
    for line in ("##SBATCH --account=PROJECT", "##SBATCH --partition=PARTITION", "##SBATCH --qos=QOS"):
        assert line in text
    stubs, log = tmp_path / "stubs", tmp_path / "log"
    stubs.mkdir()
    log.mkdir()
    _stub(stubs, "srun", 'env > "$STUB_LOG/srun.env"\nexit 0')
    _stub(stubs, "scontrol", "exit 0")
    env = {"PATH": f"{stubs}:/usr/bin:/bin", "STUB_LOG": str(log), "SLURM_JOB_ID": "5", "SLURM_CPUS_PER_TASK": "8"}
    r = subprocess.run(["bash", str(ROOT / "jobs" / name), "run.yaml", "run"], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    argv = _argv(log, "srun")
    assert argv[1:3] == ["--cpus-per-task=8", "--cpu-bind=cores"] and argv[0].startswith("--mpi="), argv
    if name == "slurm_gpu.sh":
        assert "--gpu-bind=single:1" in argv and argv[-2:] == ["--set", "device=cuda"]
    srun_env = dict(x.split("=", 1) for x in (log / "srun.env").read_text().splitlines() if "=" in x)
    assert {k: srun_env.get(k) for k in ("SRUN_CPUS_PER_TASK", "OMP_NUM_THREADS", "OMP_PLACES", "OMP_PROC_BIND")} == {
        "SRUN_CPUS_PER_TASK": "8", "OMP_NUM_THREADS": "8", "OMP_PLACES": "cores", "OMP_PROC_BIND": "close"}
