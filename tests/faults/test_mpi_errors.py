"""Errors under MPI (issue 18, item 10): printed once, the same exit code on every rank, no hang.

Regression: under ``mpirun -n 4`` every rank printed the same error line (4 copies), and a
process grid that does not match the number of ranks ended in a traceback on every rank.
Now rank 0 prints one line and every rank exits with the same code (``mpirun`` returns it);
a rank that fails alone, while the others wait for it in a collective, prints its own line
(with its rank) and aborts the job instead of hanging it. Runs in the serial tier; it
launches ``mpirun -n 2`` and ``-n 4`` (oversubscribed) itself, as tests/faults/test_kill_resume.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest
import yaml

from hpcflow.io.lock import DirLock

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HPCFLOW = os.path.join(os.path.dirname(sys.executable), "hpcflow")


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_COMM_WORLD", "PMIX_", "PMI_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=REPO, OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_rmaps_base_oversubscribe="1", **extra)
    return env


def _mpirun(n: int, args: list[str], timeout: float = 240, **env: str) -> tuple[int, str, float]:
    assert shutil.which("mpirun") is not None, "mpirun not installed: run scripts/bootstrap.sh"
    t0 = time.time()
    r = subprocess.run(["mpirun", "--oversubscribe", "-n", str(n), *args], env=_env(**env), cwd=REPO,
                       capture_output=True, text=True, timeout=timeout, check=False)
    return r.returncode, r.stdout + r.stderr, time.time() - t0


def _hpcflow_lines(out: str) -> list[str]:
    return [x for x in out.splitlines() if x.startswith("hpcflow:")]


def _cfg(tmp_path, out, **over) -> str:  # type: ignore[no-untyped-def]
    d = {"lattice": {"shape": [8, 8]}, "group": "u1", "algorithm": "heatbath", "seed": 1,
         "backend": "torch", "run": {"n_therm": 1, "n_steps": 4, "progress": False},
         "measure": {"wilson_loops": []}, "output": {"dir": str(out)}, **over}
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(d))
    return str(p)


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("command", ["run", "sample"])
def test_grid_not_matching_the_ranks_one_line_exit_2(tmp_path, n: int, command: str) -> None:
    cfg = _cfg(tmp_path, tmp_path / "out", grid=[2 * n, 1])
    rc, out, _ = _mpirun(n, [HPCFLOW, command, cfg])
    lines = _hpcflow_lines(out)
    assert rc == 2, out[-3000:]
    assert len(lines) == 1, out[-3000:]
    assert "key 'grid'" in lines[0] and f"has {n}" in lines[0] and "Traceback" not in out


@pytest.mark.parametrize("n", [2, 4])
def test_locked_output_dir_one_line_exit_2(tmp_path, n: int) -> None:
    out = tmp_path / "out"
    cfg = _cfg(tmp_path, out)
    with DirLock(out, command="test holder"):
        rc, text, _ = _mpirun(n, [HPCFLOW, "sample", cfg])
        assert sorted(os.listdir(out)) == [".hpcflow.lock"]
    lines = _hpcflow_lines(text)
    assert rc == 2 and len(lines) == 1, text[-3000:]
    assert f"pid {os.getpid()}" in lines[0] and "test holder" in lines[0]


def test_results_present_one_line_exit_2(tmp_path) -> None:
    out = tmp_path / "out"
    cfg = _cfg(tmp_path, out)
    rc, text, _ = _mpirun(2, [HPCFLOW, "run", cfg])
    assert rc == 0, text[-3000:]
    rc, text, _ = _mpirun(2, [HPCFLOW, "run", cfg])
    lines = _hpcflow_lines(text)
    assert rc == 2 and len(lines) == 1 and "--resume" in lines[0], text[-3000:]


_ALONE = """
import sys
from hpcflow.config import ConfigError
from hpcflow.run.world import run_guarded, world_control

def body():
    ctl = world_control()
    if ctl.rank == ctl.size - 1:
        raise ConfigError("only the last rank fails")
    ctl.barrier()  # waits for the failed rank forever
    return 0

sys.exit(run_guarded(body, mpi=True))
"""

_ALL = """
import sys
from hpcflow.run.world import run_guarded

def body():
    raise RuntimeError("a bug on every rank")

sys.exit(run_guarded(body, mpi=True))
"""


def test_a_rank_failing_alone_aborts_the_job_instead_of_hanging(tmp_path) -> None:
    # a hang would end in subprocess.TimeoutExpired (the test fails); no assertion on the time
    rc, out, _ = _mpirun(2, [sys.executable, "-c", _ALONE], timeout=240, HPCFLOW_SETTLE_S="2")
    assert rc == 2, out[-3000:]
    assert _hpcflow_lines(out) == ["hpcflow: [rank 1] config error: only the last rank fails"], out[-3000:]


def test_an_internal_error_on_every_rank_one_traceback_exit_1(tmp_path) -> None:
    rc, out, _ = _mpirun(2, [sys.executable, "-c", _ALL], timeout=120)
    assert rc == 1, out[-3000:]
    assert out.count("Traceback (most recent call last)") == 1 and out.count("a bug on every rank") == 1, out
