"""The run-directory rules on P ranks (issue 18, items 1, 3, 10): rank 0 takes the lock of
``output.dir`` and decides on results and ``--fresh``; every rank learns the outcome, so a
locked directory, results without ``--resume`` or a process grid that does not fit the
ranks give the *same* error on every rank (the CLI prints it once and every rank exits with
the same code), and no rank touches a file without the lock."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import pytest
from mpi4py import MPI

from hpcflow.config import ConfigError, load_config
from hpcflow.io.checkpoint import CheckpointError
from hpcflow.io.lock import LOCK_NAME, DirectoryLocked
from hpcflow.run.driver import run
from hpcflow.run.outdir import ResultsPresent
from hpcflow.run.sample import sample
from hpcflow.run.world import agree_error, agreed, world_control

WORLD = MPI.COMM_WORLD
SIZE, RANK = WORLD.Get_size(), WORLD.Get_rank()
COMMON = ["lattice.shape=[4,8]", "group=u1", "algorithm=heatbath", "seed=3", "backend=torch",
          "run.n_therm=1", "run.n_steps=3", "run.progress=false", "measure.wilson_loops=[]",
          f"grid=[1,{SIZE}]"]

_HOLDER = """
import sys, time
from hpcflow.io.lock import DirLock
DirLock(sys.argv[1], command="holder").acquire()
print("held", flush=True)
time.sleep(600)
"""


def _outcome(fn, *args, **kwargs) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    try:
        fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - compared across ranks
        return type(e).__name__, str(e)
    return "ok", ""


def _same_everywhere(outcome: tuple[str, str], collective, what: str) -> None:  # type: ignore[no-untyped-def]
    everyone = WORLD.allgather(outcome)
    collective(all(o == everyone[0] for o in everyone), f"{what}: outcomes differ across ranks: {everyone}")


def _tmp() -> str:
    return WORLD.bcast(tempfile.mkdtemp(prefix="hpcflow-lock-mpi-") if RANK == 0 else None)


@pytest.mark.mpi
def test_locked_directory_same_refusal_on_every_rank_then_run_and_fresh(collective) -> None:
    base = _tmp()
    out = f"{base}/out"
    holder = None
    try:
        if RANK == 0:  # another process holds the directory
            env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_", "PMI_"))}
            holder = subprocess.Popen([sys.executable, "-c", _HOLDER, out], stdout=subprocess.PIPE,
                                      text=True, env=env)
            assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        WORLD.Barrier()
        cfg = load_config(None, COMMON + [f"output.dir={out}"])
        got = _outcome(run, cfg)
        _same_everywhere(got, collective, "run on a locked output.dir")
        pid = WORLD.bcast(holder.pid if holder is not None else None)
        collective(got[0] == DirectoryLocked.__name__ and f"pid {pid}" in got[1], f"got {got}")
        _same_everywhere(_outcome(sample, cfg, use_mpi=True), collective, "sample on a locked output.dir")
        collective(sorted(os.listdir(out)) == [LOCK_NAME], f"files written without the lock: {os.listdir(out)}")
        if holder is not None:
            holder.kill()
            holder.wait()
        WORLD.Barrier()
        collective(run(cfg).exit_code == 0, "run after the holder died")
        again = _outcome(run, cfg)  # results present, no --resume: refused everywhere
        _same_everywhere(again, collective, "run over results")
        collective(again[0] == ResultsPresent.__name__, f"got {again}")
        collective(run(cfg, fresh=True).exit_code == 0, "run --fresh")
        prev = [n for n in os.listdir(out) if n.startswith("previous-")]
        collective(len(prev) == 1 and os.path.exists(f"{out}/{prev[0]}/history.jsonl"),
                   f"--fresh moved aside once, on rank 0: {os.listdir(out)}")
    finally:
        if holder is not None and holder.poll() is None:
            holder.kill()
            holder.wait()
        WORLD.Barrier()
        if RANK == 0:
            shutil.rmtree(base, ignore_errors=True)


@pytest.mark.mpi
def test_grid_that_does_not_fit_the_ranks_same_config_error_everywhere(collective) -> None:
    base = _tmp()
    try:
        bad = [c for c in COMMON if not c.startswith("grid=")] + [f"grid=[2,{2 * SIZE}]", "lattice.shape=[4,16]"]
        cfg = load_config(None, bad + [f"output.dir={base}/run"])
        got = _outcome(run, cfg)
        _same_everywhere(got, collective, "run with a bad grid")
        collective(got[0] == "ConfigError" and "key 'grid'" in got[1] and f"has {SIZE}" in got[1], f"got {got}")
        cfg = load_config(None, bad + [f"output.dir={base}/sample"])
        got = _outcome(sample, cfg, use_mpi=True)
        _same_everywhere(got, collective, "sample with a bad grid")
        collective(got[0] == "ConfigError" and "key 'grid'" in got[1], f"got {got}")
        collective(not os.path.exists(f"{base}/sample/ensemble"), "a refused sample wrote its ensemble")
    finally:
        WORLD.Barrier()
        if RANK == 0:
            shutil.rmtree(base, ignore_errors=True)


@pytest.mark.mpi
def test_agreement_helpers_raise_the_same_error_on_every_rank(collective) -> None:
    ctl = world_control(True)
    collective(ctl.size == SIZE and ctl.rank == RANK, "the world control spans every rank")

    def root_only() -> int:
        raise ConfigError(f"decided on rank {RANK}")

    got = _outcome(agreed, ctl, root_only)
    _same_everywhere(got, collective, "agreed")
    collective(got == ("ConfigError", "decided on rank 0"), f"got {got}")
    collective(agreed(ctl, lambda: RANK + 7) == 7, "agreed returns the root's result")
    err = CheckpointError("only the last rank failed") if RANK == SIZE - 1 else None
    got = _outcome(agree_error, ctl, err)
    _same_everywhere(got, collective, "agree_error")
    collective(got == ("CheckpointError", "only the last rank failed"), f"got {got}")
    collective(_outcome(agree_error, ctl, None) == ("ok", ""), "no error: no raise")
